"""The bad-input table: every case exits with code 2 and one stderr line naming the field
(or path) and what is allowed, never a traceback. Non-finite training values stop the run
with code 1 after saving the last good state; unusual PPO diagnostics warn once."""

import json
import logging
import os
import shutil

import pytest
import torch
from conftest import run_stage
from test_reliability_resume import small_prefs

from rlhf_toy.cli import main
from rlhf_toy.data import fit_pairs_to_context
from rlhf_toy.errors import NonFiniteError
from rlhf_toy.train import dpo as dpo_module
from rlhf_toy.train import onpolicy as onpolicy_module
from rlhf_toy.train.checkpoint import list_checkpoints

# (argv, the message the one line must contain): values checked before anything is loaded
CONFIG_CASES = [
    (["ppo", "--beta", "-0.1"], "beta must be in [0, 1000] (got -0.1)"),
    (["dpo", "--beta", "0"], "beta must be in (0, 1000] (got 0.0)"),
    (["ppo", "--clip_range", "0"], "clip_range must be > 0 (got 0.0)"),
    (["ppo", "--clip_range", "-0.2"], "clip_range must be > 0"),
    (["ppo", "--gamma", "1.01"], "gamma must be in [0, 1] (got 1.01)"),
    (["ppo", "--gamma", "-0.5"], "gamma must be in [0, 1]"),
    (["ppo", "--lam", "2"], "lam must be in [0, 1] (got 2.0)"),
    (["ppo", "--lam", "-0.1"], "lam must be in [0, 1]"),
    (["ppo", "--batch_size", "0"], "batch_size must be > 0 (got 0)"),
    (["dpo", "--batch_size", "-4"], "batch_size must be > 0"),
    (["sft", "--batch_size", "0"], "batch_size must be > 0"),
    (["reward", "--eval_batch_size", "0"], "eval_batch_size must be > 0"),
    (["ppo", "--mini_batch_size", "0"], "mini_batch_size must be > 0"),
    (["ppo", "--batch_size", "8", "--mini_batch_size", "16"],
     "mini_batch_size must be <= batch_size (8) (got 16)"),
    (["ppo", "--save_steps", "-1"], "save_steps must be >= 0 (got -1)"),
    (["sft", "--max_new_tokens", "40"], "max_new_tokens must be <= 29"),
    (["ppo", "--no_such_key", "1"], "unknown argument '--no_such_key'"),
    (["ppo", "--beta", "high"], "invalid float value: 'high'"),
    (["ppo", "--resume_from_checkpoint", "/no/such/checkpoint-3"],
     "resume_from_checkpoint '/no/such/checkpoint-3' does not exist"),
    (["dpo", "--resume_from_checkpoint", "latest"], "'latest' found no checkpoint-N/"),
    (["sft", "--seed", "-1"], "seed must be in [0, 2**32 - 1] (got -1)"),
    (["sft", "--seed", "4294967296"], "seed must be in [0, 2**32 - 1] (got 4294967296)"),
    (["ppo", "--learning_rate", "inf"], "learning_rate must be a finite number (got inf)"),
    (["sft", "--learning_rate", "inf"], "learning_rate must be a finite number (got inf)"),
    (["dpo", "--learning_rate", "1e38"], "learning_rate must be in (0, 1] (got 1e+38)"),
    (["dpo", "--beta", "1e400"], "beta must be a finite number (got inf)"),
    (["ppo", "--beta", "1e6"], "beta must be in [0, 1000] (got 1000000.0)"),
    (["ppo", "--missing_eos_penalty", "nan"], "missing_eos_penalty must be a finite number"),
    (["ppo", "--temperature", "0"], "temperature must be in [0.01, 100] (got 0.0)"),
    (["prefs", "--label_temperature", "1e-9"], "label_temperature must be >= 0.01 (got 1e-09)"),
    (["ppo", "--gradient_accumulation_steps", "8", "--mini_batch_size", "4"],
     "mini_batch_size must be a multiple of gradient_accumulation_steps (8) (got 4)"),
    (["sft", "--n_train", "1000000000000"], "this run needs at least"),
    (["sft", "--n_layer", "100000000"], "this run needs at least"),
    (["sft", "--n_embd", "1000000"], "GiB is available; lower n_layer, n_embd or n_positions"),
    (["sft", "--n_positions", "1000000000"], "this run needs at least"),
]


def _one_line_error(argv, capsys, code=2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("rlhf-toy: error: ") == 1, err
    # the error is the last line; a run stopped mid-training may leave a progress bar before it
    lines = err[err.index("rlhf-toy: error: "):].strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(("argv", "message"), CONFIG_CASES)
def test_config_table(argv, message, tmp_path, capsys):
    line = _one_line_error([*argv, "--output_dir", str(tmp_path / "out")], capsys)
    assert message in line


@pytest.mark.parametrize(("text", "message"), [
    ("beta: 0.1\nbogus_key: 1\n", "unknown config key 'bogus_key'"),
    ("beta: [0.1\n", "is not valid YAML (line 2)"),
    ("- just\n- a list\n", "must hold a mapping of field: value"),
    ("gamma: 3\n", "gamma must be in [0, 1] (got 3.0)"),
    ("clip_range: [0.2]\n", "config key 'clip_range' in"),
    ("clip_range: [0.2]\n", "must be a single value, not a list (got [0.2])"),
    ("clip_range: {a: 1}\n", "must be a single value, not a dict"),
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe\x00", "is not valid YAML (not UTF-8 text)"),
])
def test_yaml_table(text, message, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    line = _one_line_error(["ppo", "--config", str(path), "--output_dir", str(tmp_path)], capsys)
    assert message in line


def test_several_config_files_merge_in_order(tmp_path):
    """`--config a --config b`: b wins over a, the command line over both."""
    from rlhf_toy.config import parse_config
    from rlhf_toy.train.ppo import PPOConfig

    (tmp_path / "a.yaml").write_text("beta: 0.1\ngamma: 0.9\nlam: 0.5\n")
    (tmp_path / "b.yaml").write_text("beta: 0.3\ngamma: 0.8\n")
    cfg = parse_config(PPOConfig, ["--config", str(tmp_path / "a.yaml"), "--lam", "0.7",
                                   "--config", str(tmp_path / "b.yaml"), "--gamma", "0.6"])
    assert (cfg.beta, cfg.gamma, cfg.lam) == (0.3, 0.6, 0.7)


# ------------------------------------------------------------------ inputs on disk


def _save_prefs(path, train: dict, test: dict | None = None) -> str:
    from datasets import Dataset, DatasetDict

    DatasetDict(train=Dataset.from_dict(train),
                test=Dataset.from_dict(test or train)).save_to_disk(str(path))
    return str(path)


def _damaged(src: str, dst, file: str, how: str, keep_manifest: bool = True) -> str:
    """A copy of the checkpoint `src` whose `file` is cut in half ("cut"), replaced by random
    bytes of the same size ("random"), deleted ("missing") or holds bad JSON ("json")."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, file)
    if how == "missing":
        os.remove(path)
    elif how == "json":
        with open(path, "w") as fh:
            fh.write('{"n_layer": 2,,')
    else:
        size = os.path.getsize(path)
        data = open(path, "rb").read()[: size // 2] if how == "cut" else os.urandom(size)
        with open(path, "wb") as fh:
            fh.write(data)
    if not keep_manifest:
        os.remove(os.path.join(dst, "manifest.json"))
    return str(dst)


@pytest.fixture(scope="module")
def bad_inputs(tiny_run, tmp_path_factory):
    """Broken checkpoints and datasets next to the good tiny run."""
    from rlhf_toy.models import build_policy
    from rlhf_toy.tasks import get_task
    from rlhf_toy.tokenizer import build_tokenizer

    root, _ = tiny_run
    tmp = tmp_path_factory.mktemp("bad_inputs")
    swapped = tmp / "sft_other_tokenizer"  # the sft model with the sorting task's tokenizer
    shutil.copytree(os.path.join(root, "sft"), swapped)
    build_tokenizer(get_task("sorting").words).save_pretrained(str(swapped))
    narrow = str(tmp / "sft_narrow")  # an SFT checkpoint of another width
    tokenizer = build_tokenizer(get_task("sentiment").words)
    build_policy(tokenizer, n_embd=32).save_pretrained(narrow)
    tokenizer.save_pretrained(narrow)
    sft = os.path.join(root, "sft")
    ppo = str(tmp / "ppo")  # one PPO iteration, its resumable checkpoint-1
    run_stage("ppo", root, "--output_dir", ppo, "--max_steps", "1", "--save_steps", "1",
              "--batch_size", "4", "--mini_batch_size", "4", "--n_eval_prompts", "4")
    ck = os.path.join(ppo, "checkpoint-1")
    long_prompt = " ".join(["the"] * 40)
    pair = {"prompt": ["the movie was"], "chosen": ["great ."], "rejected": ["bad ."]}
    two = {"prompt": ["the movie was", "the film is"], "chosen": ["great .", "good ."],
           "rejected": ["bad .", "dull ."]}
    prefs = os.path.join(root, "prefs")
    arrow = next(os.path.relpath(os.path.join(d, f), prefs) for d, _, fs in os.walk(prefs)
                 for f in fs if f.endswith(".arrow"))
    return {
        "root": root,
        "sft": sft,
        "reward": os.path.join(root, "reward"),
        "prefs": prefs,
        "sft_sub": os.path.join(sft, "sub"),
        "swapped": str(swapped),
        "narrow": narrow,
        "ck": ck,
        "cut": _damaged(sft, tmp / "cut", "model.safetensors", "cut"),
        "cut_bare": _damaged(sft, tmp / "cut_bare", "model.safetensors", "cut", False),
        "random": _damaged(sft, tmp / "random", "model.safetensors", "random"),
        "random_bare": _damaged(sft, tmp / "random_bare", "model.safetensors", "random", False),
        "no_tokenizer": _damaged(sft, tmp / "no_tok", "tokenizer.json", "missing"),
        "bad_json": _damaged(sft, tmp / "bad_json", "config.json", "json"),
        "ck_cut": _damaged(ck, tmp / "ck_cut", "model.safetensors", "cut"),
        "ck_no_config": _damaged(ck, tmp / "ck_no_config", "config.json", "missing"),
        "ck_no_head": _damaged(ck, tmp / "ck_no_head", "value_head.pt", "missing"),
        "ck_bad_head": _damaged(ck, tmp / "ck_bad_head", "value_head.pt", "random", False),
        "ck_bad_state": _damaged(ck, tmp / "ck_bad_state", "trainer_state.pt", "cut"),
        "prefs_cut": _damaged(prefs, tmp / "prefs_cut", arrow, "cut"),
        "prefs_cut_bare": _damaged(prefs, tmp / "prefs_cut_bare", arrow, "cut", False),
        "empty": _save_prefs(tmp / "empty", {k: [] for k in pair}, pair),
        "no_prompt": _save_prefs(tmp / "no_prompt", {k: v for k, v in pair.items()
                                                     if k != "prompt"}),
        "no_chosen": _save_prefs(tmp / "no_chosen", {k: v for k, v in pair.items()
                                                     if k != "chosen"}),
        "empty_prompt": _save_prefs(tmp / "empty_prompt", {**two, "prompt": ["the movie", ""]}),
        "none_value": _save_prefs(tmp / "none_value", {**two, "chosen": ["great .", None]}),
        "int_value": _save_prefs(tmp / "int_value", {**two, "rejected": [3, 4]}),
        "chosen_empty": _save_prefs(tmp / "chosen_empty", {**two, "chosen": ["", ""]}),
        "all_same": _save_prefs(tmp / "all_same", {**two, "rejected": two["chosen"]}),
        "long": _save_prefs(tmp / "long", {"prompt": [long_prompt, "the movie was"],
                                           "chosen": ["great ."] * 2,
                                           "rejected": ["bad ."] * 2}),
        "missing": str(tmp / "missing"),
    }


def _stage_argv(stage, b, tmp_path, **override):
    dirs = {"sft_dir": os.path.join(b["root"], "sft"), "reward_dir": os.path.join(b["root"],
            "reward"), "prefs_dir": os.path.join(b["root"], "prefs")}
    dirs.update(override)
    keys = {"ppo": ("sft_dir", "reward_dir"), "dpo": ("sft_dir", "reward_dir", "prefs_dir"),
            "reward": ("sft_dir", "prefs_dir"), "prefs": ("sft_dir",)}[stage]
    argv = [stage, "--output_dir", str(tmp_path / stage), "--device", "cpu"]
    for key in keys:
        argv += [f"--{key}", dirs[key]]
    return argv


# (stage, overrides of the input dirs by bad_inputs key or "sft"/"reward", extra argv, message)
INPUT_CASES = [
    ("ppo", {"sft_dir": "missing"}, [], "checkpoint {missing!r} does not exist"),
    ("dpo", {"reward_dir": "missing"}, [], "does not exist"),
    ("ppo", {"sft_dir": "reward"}, [], "holds a ['GPT2ForSequenceClassification'] model, not "
                                       "a causal LM policy"),
    ("ppo", {"reward_dir": "sft"}, [], "holds a ['GPT2LMHeadModel'] model, not a "
                                       "sequence-classification reward model"),
    ("dpo", {"sft_dir": "swapped"}, [], "--sft_dir {swapped!r} has a vocabulary of 38 but its "
                                        "tokenizer has 16 tokens"),
    ("reward", {"sft_dir": "swapped"}, [], "has a vocabulary of 38 but its tokenizer has 16"),
    ("ppo", {"sft_dir": "swapped"}, [], "has a vocabulary of 38 but its tokenizer has 16"),
    ("ppo", {}, ["--max_new_tokens", "30"], "max_new_tokens must be <= 29 so that prompt + "
                                            "response fit n_positions=32"),
    ("dpo", {}, ["--max_new_tokens", "30"], "max_new_tokens must be <= 29"),
    ("prefs", {}, ["--max_new_tokens", "30"], "max_new_tokens must be <= 29"),
    ("dpo", {"prefs_dir": "empty"}, [], "preference dataset {empty!r} has an empty split"),
    ("reward", {"prefs_dir": "empty"}, [], "has an empty split"),
    ("dpo", {"prefs_dir": "no_prompt"}, [], "lacks column 'prompt'"),
    ("reward", {"prefs_dir": "no_chosen"}, [], "lacks column 'chosen'"),
    ("dpo", {"prefs_dir": "missing"}, [], "prefs_dir {missing!r} does not exist"),
    ("dpo", {"prefs_dir": "long"}, [], "truncate_prompts must be true to use {long} (train): "
                                       "1 of 2 prompts do not fit n_positions=32"),
    ("reward", {"prefs_dir": "long"}, [], "truncate_prompts must be true"),
    ("ppo", {}, ["--resume_from_checkpoint", "sft"], "is not a resumable checkpoint"),
    # an output directory that is an input, inside one or around one
    ("ppo", {}, ["--output_dir", "sft"], "output_dir must not be sft_dir, inside it or around"),
    ("dpo", {}, ["--output_dir", "reward"], "output_dir must not be reward_dir"),
    ("reward", {}, ["--output_dir", "prefs"], "output_dir must not be prefs_dir"),
    ("ppo", {}, ["--output_dir", "sft_sub"], "output_dir must not be sft_dir"),
    ("ppo", {}, ["--output_dir", "root"], "output_dir must not be sft_dir"),
    # sizes that cannot fit
    ("ppo", {}, ["--batch_size", "10000000", "--mini_batch_size", "10000000"],
     "lower batch_size"),
    ("ppo", {}, ["--n_eval_prompts", "1000000000000"], "lower n_eval_prompts"),
    ("prefs", {}, ["--n_pairs", "1000000000000"], "lower n_pairs"),
    # damaged checkpoints: one line naming the file
    ("ppo", {"sft_dir": "cut"}, [], "--sft_dir checkpoint {cut!r}: model.safetensors is truncated "
                                    "or altered"),
    ("ppo", {"sft_dir": "cut_bare"}, [], "model.safetensors is truncated or altered"),
    ("dpo", {"sft_dir": "random"}, [], "model.safetensors is corrupted (its checksum differs"),
    ("ppo", {"sft_dir": "random_bare"}, [], "model.safetensors is not a readable safetensors"),
    ("ppo", {"sft_dir": "no_tokenizer"}, [], "holds no tokenizer (tokenizer.json missing)"),
    ("reward", {"sft_dir": "bad_json"}, [], "config.json is not valid JSON (line 1)"),
    ("ppo", {}, ["--resume_from_checkpoint", "ck_cut"], "model.safetensors is truncated"),
    ("ppo", {}, ["--resume_from_checkpoint", "ck_no_config"], "holds no model (config.json "
                                                              "missing)"),
    ("ppo", {}, ["--resume_from_checkpoint", "ck_no_head"], "{ck_no_head!r}: value_head.pt is "
                                                            "missing"),
    ("ppo", {}, ["--resume_from_checkpoint", "ck_bad_head"], "value_head.pt cannot be read"),
    ("ppo", {}, ["--resume_from_checkpoint", "ck_bad_state"], "trainer_state.pt is truncated"),
    ("ppo", {}, ["--resume_from_checkpoint", "ck", "--critic", "reward_model"],
     "critic must be 'value_head' to resume from"),
    ("ppo", {"sft_dir": "narrow"}, ["--resume_from_checkpoint", "ck"],
     "holds weights of another shape than this run's model"),
    # preference rows
    ("dpo", {"prefs_dir": "prefs_cut"}, [], "is truncated or altered"),
    ("reward", {"prefs_dir": "prefs_cut_bare"}, [], "cannot be read (truncated or corrupted"),
    ("dpo", {"prefs_dir": "empty_prompt"}, [], "(train) row 1: 'prompt' must not be empty"),
    ("reward", {"prefs_dir": "none_value"}, [], "row 1: 'chosen' must be a string (got None)"),
    ("dpo", {"prefs_dir": "int_value"}, [], "row 0: 'rejected' must be a string (got 3)"),
    ("reward", {"prefs_dir": "chosen_empty"}, [], "every 'chosen' response is empty"),
    ("dpo", {"prefs_dir": "all_same"}, [], "every pair has chosen == rejected"),
]


@pytest.mark.parametrize(("stage", "override", "extra", "message"), INPUT_CASES)
def test_input_table(bad_inputs, stage, override, extra, message, tmp_path, capsys):
    b = named = bad_inputs
    argv = _stage_argv(stage, b, tmp_path, **{k: named[v] for k, v in override.items()})
    extra = [named.get(x, x) for x in extra]
    line = _one_line_error([*argv, *extra], capsys)
    assert message.format(**named) in line


def test_truncated_prompts_keep_their_last_tokens_and_warn(caplog):
    """With truncation on, a prompt too long for the context keeps the tokens next to its
    response, both responses of the pair see the same prompt, and the log says how many."""
    pad = 0
    chosen = {"prompt_ids": torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]]),
              "prompt_mask": torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]),
              "response_ids": torch.tensor([[11, 2], [12, 2]]),
              "response_mask": torch.tensor([[1, 1], [1, 1]])}
    rejected = {**chosen, "response_ids": torch.tensor([[13, 14, 2], [2, 0, 0]]),
                "response_mask": torch.tensor([[1, 1, 1], [1, 0, 0]])}
    with caplog.at_level(logging.WARNING):
        c, r = fit_pairs_to_context(chosen, rejected, 5, pad, True, "toy")
    # row 0: 2 + 3 = 5 fits; row 1: 4 + 2 > 5 keeps its last 3 prompt tokens
    assert c["prompt_ids"].tolist() == [[0, 5, 6], [8, 9, 10]]
    assert c["prompt_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
    assert torch.equal(r["prompt_ids"], c["prompt_ids"])
    assert "toy: 1 of 2 prompts are longer than the context" in caplog.text


# ------------------------------------------------------------------ numerical faults


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def test_non_finite_score_stops_ppo_after_saving_the_last_good_state(tiny_run, tmp_path,
                                                                     monkeypatch):
    root, _ = tiny_run
    calls = {"n": 0}
    real = onpolicy_module.reward_scores

    def scores_nan_at_iteration_2(*args):
        calls["n"] += 1
        s = real(*args)
        return s * float("nan") if calls["n"] == 2 else s

    monkeypatch.setattr(onpolicy_module, "reward_scores", scores_nan_at_iteration_2)
    out = str(tmp_path / "ppo")
    with pytest.raises(NonFiniteError, match=r"non-finite scores at step 2; training stopped, "
                                             r"last good state saved in .*checkpoint-1"):
        run_stage("ppo", root, "--output_dir", out, "--logging_steps", "1", "--eval_steps", "0",
                  "--batch_size", "8", "--mini_batch_size", "4", "--n_eval_prompts", "8")
    assert [s for s, _ in list_checkpoints(out)] == [1]
    assert [r["step"] for r in _rows(out)] == [1]
    assert not os.path.exists(os.path.join(out, "summary.json"))
    assert not os.path.exists(os.path.join(out, "model.safetensors"))


def test_non_finite_dpo_loss_exits_1_with_one_line(tiny_run, tmp_path, monkeypatch, capsys):
    root, _ = tiny_run
    real = dpo_module.batch_loss
    calls = {"n": 0}

    def loss_nan_at_step_3(*args):
        calls["n"] += torch.is_grad_enabled()  # training calls only, not evaluation
        value, stats = real(*args)
        return (value * float("inf") if calls["n"] == 3 else value), stats

    monkeypatch.setattr(dpo_module, "batch_loss", loss_nan_at_step_3)
    out = tmp_path / "dpo"
    argv = [*_stage_argv("dpo", {"root": root}, tmp_path), "--output_dir", str(out),
            "--prefs_dir", small_prefs(root, str(tmp_path / "prefs")),
            "--max_steps", "4", "--batch_size", "8", "--n_eval_prompts", "8", "--eval_steps",
            "0", "--logging_steps", "1"]
    line = _one_line_error(argv, capsys, code=1)
    assert "non-finite loss at step 3; training stopped, last good state saved in" in line
    assert [s for s, _ in list_checkpoints(str(out))] == [2]
    assert [r["step"] for r in _rows(str(out))] == [0, 1, 2]


def test_health_warnings_are_logged_once(caplog):
    warned: set[str] = set()
    bad = {"kl": -0.2, "clip_frac": 0.8, "approx_kl": 3.0, "eos_frac": 0.1}
    with caplog.at_level(logging.WARNING, logger="rlhf_toy.train.onpolicy"):
        onpolicy_module.warn_unhealthy(bad, 3, warned)
        onpolicy_module.warn_unhealthy(bad, 4, warned)
        onpolicy_module.warn_unhealthy({"kl": 0.1, "clip_frac": 0.1, "approx_kl": 0.01,
                                   "eos_frac": 1.0}, 5, set())
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4
    for text in ("KL to the reference is negative (-0.200)", "clip fraction is far above normal",
                 "approximate KL between updates is far above normal",
                 "most responses hit the length limit without EOS"):
        assert sum(text in m for m in messages) == 1, text
    assert all(m.endswith("at iteration 3") for m in messages)


def test_non_finite_weights_reach_the_sampler_and_the_guard_names_them(tiny_run, tmp_path,
                                                                       monkeypatch):
    """Weights gone NaN in an update (an overflowing learning rate) make the sampler's
    probabilities NaN: sampling goes on (no torch.multinomial crash), the guard stops the
    run at the next rollout naming the quantity and step, and the checkpoint it points to
    is the finite one of step 1 (the NaN state is never saved as good)."""
    root, _ = tiny_run
    real, calls = onpolicy_module.collect_rollout, {"n": 0}

    def nan_weights_then_rollout(method, model, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the weights after iteration 1's update, as if it overflowed
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))
        return real(method, model, *args, **kwargs)

    monkeypatch.setattr(onpolicy_module, "collect_rollout", nan_weights_then_rollout)
    out = str(tmp_path / "ppo")
    with pytest.raises(NonFiniteError, match=r"non-finite logprobs at step 2; training stopped, "
                                             r"last good checkpoint: .*checkpoint-1$"):
        run_stage("ppo", root, "--output_dir", out, "--batch_size", "4", "--save_steps", "1",
                  "--mini_batch_size", "4", "--n_eval_prompts", "4", "--max_steps", "4")
    assert [s for s, _ in list_checkpoints(out)] == [1]


def test_inspect_bad_run_config_and_unwritable_json(bad_inputs, tmp_path, capsys):
    ppo = os.path.dirname(bad_inputs["ck"])
    broken = tmp_path / "ppo"
    shutil.copytree(ppo, broken)
    (broken / "run_config.json").write_text('{"stage": "ppo",')
    line = _one_line_error(["inspect", "--checkpoint", str(broken)], capsys)
    assert "run_config.json is not valid JSON (line 1)" in line
    line = _one_line_error(["inspect", "--checkpoint", ppo, "--n", "4", "--json",
                            "/proc/no/x.json"], capsys)
    assert "'/proc/no/x.json' cannot be written" in line
    line = _one_line_error(["inspect", "--checkpoint", ppo, "--n", "1000000000000"], capsys)
    assert "lower n" in line
