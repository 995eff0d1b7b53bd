"""A user's data: `--prefs_path` in every file format and both TRL formats, pairs without
gold rewards, unknown words, `--prompts_path` without a task, and every error's line."""

import contextlib
import csv
import io
import json
import math
import os
import random
import re

import pytest
from conftest import run_stage
from datasets import Dataset, DatasetDict
from user_data import save_bpe_gpt2, write_task_pairs

from rlhf_toy.cli import main
from rlhf_toy.datafiles import load_preference_file, load_prompts, split_prompts
from rlhf_toy.evaluate import NO_GOLD
from rlhf_toy.tasks import get_task
from rlhf_toy.tokenizer import build_tokenizer

PAIRS = [("the movie was", " great .", " bad ."), ("the plot is", " very good .", " dull ."),
         ("the cast felt", " wonderful !", " awful !"), ("the music seemed", " fun .", " loud ."),
         ("the ending was", " brilliant .", " dull .")]
ROWS = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
# user: / assistant: turns, the reply ended by EOS (as many chat templates do)
TEMPLATE = ("{% for m in messages %}{% if m.role == 'user' %}user: {{ m.content }} "
            "{% else %}assistant: {{ m.content }}{{ eos_token }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(get_task("sentiment").words)


@pytest.fixture(scope="module")
def chat_tokenizer():
    tok = build_tokenizer([*get_task("sentiment").words, "user:", "assistant:"])
    tok.chat_template = TEMPLATE
    return tok


def write(path, rows, kind):
    """`rows` as a file of `kind` (or a datasets directory) at `path`; returns the path."""
    if kind == "jsonl":
        with open(path, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    elif kind == "json":
        with open(path, "w") as fh:
            json.dump(rows, fh)
    elif kind == "csv":
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif kind == "parquet":
        Dataset.from_list(rows).to_parquet(path)
    elif kind == "dataset":
        Dataset.from_list(rows).save_to_disk(path)
    elif kind == "datasetdict":
        DatasetDict(train=Dataset.from_list(rows)).save_to_disk(path)
    return str(path)


def pairs_of(data: DatasetDict) -> list[tuple]:
    """Every pair with its source row, train and test together, in source order."""
    rows = [(r["row"], r["prompt"], r["chosen"], r["rejected"])
            for split in ("train", "test") for r in data[split]]
    return sorted(rows)


def conversational(rows):
    return [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
             "rejected": [{"role": "assistant", "content": r["rejected"].strip()}]}
            for r in rows]


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "dataset", "datasetdict"])
def test_every_format_loads_the_same_pairs(kind, tmp_path, tokenizer):
    ext = {"dataset": "", "datasetdict": ""}.get(kind, f".{kind}")
    path = write(tmp_path / f"pairs{ext}", ROWS, kind)
    data = load_preference_file(path, tokenizer, test_fraction=0.2, seed=0)
    assert pairs_of(data) == [(i, *pair) for i, pair in enumerate(PAIRS)]
    assert len(data["test"]) == 1 and len(data["train"]) == 4  # round(5 * 0.2) held out
    assert "chosen_gold" not in data["train"].column_names


@pytest.mark.parametrize("chat", [False, True])
def test_implicit_prompt_rows_load_the_same_pairs(chat, tmp_path, tokenizer, chat_tokenizer):
    """TRL's implicit-prompt format: "the movie was great ." / "the movie was bad ." share
    "the movie was", the responses keep their leading space (TRL's `extract_prompt`);
    conversational rows share their user turn."""
    rows = conversational(ROWS) if chat else ROWS
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                for r in rows]
    tok = chat_tokenizer if chat else tokenizer
    load = [load_preference_file(write(tmp_path / f"{name}.jsonl", data, "jsonl"), tok, 0.2, 0)
            for name, data in (("explicit", rows), ("implicit", implicit))]
    assert pairs_of(load[0]) == pairs_of(load[1])
    assert pairs_of(load[1])[1][1:] == ((("user: the plot is assistant:", " very good .",
                                          " dull .")) if chat else PAIRS[1])


@pytest.mark.parametrize("kind", ["json", "parquet", "dataset"])
def test_conversational_rows_load_alike_from_every_format(kind, tmp_path, chat_tokenizer):
    rows = conversational(ROWS)
    ext = "" if kind == "dataset" else f".{kind}"
    got, want = (load_preference_file(write(tmp_path / f"c{ext}", rows, kind), chat_tokenizer,
                                      0.2, 0),
                 load_preference_file(write(tmp_path / "c.jsonl", rows, "jsonl"),
                                      chat_tokenizer, 0.2, 0))
    assert pairs_of(got) == pairs_of(want)


def test_conversational_rows_render_as_trl_does(tmp_path, chat_tokenizer):
    """With the template above, prompt [user "the movie was"] renders with the generation
    prompt as "user: the movie was assistant:", the conversation adds " great .[EOS]"; the
    EOS is taken off (it is appended as a token), and the pair equals TRL's
    `maybe_apply_chat_template` of the same row otherwise."""
    from trl.data_utils import maybe_apply_chat_template

    rows = conversational(ROWS)
    data = load_preference_file(write(tmp_path / "chat.jsonl", rows, "jsonl"), chat_tokenizer,
                                0.2, 0)
    got = pairs_of(data)
    assert got[0] == (0, "user: the movie was assistant:", " great .", " bad .")
    for (i, prompt, chosen, rejected), row in zip(got, rows, strict=True):
        trl = maybe_apply_chat_template(row, chat_tokenizer)
        assert (prompt, chosen + "[EOS]", rejected + "[EOS]") == (
            trl["prompt"], trl["chosen"], trl["rejected"]), i


def test_held_out_split_is_seeded_disjoint_and_complete(tmp_path, tokenizer):
    rows = [{"prompt": "the movie was", "chosen": f" {w} .", "rejected": " bad ."}
            for w in ("great", "good", "fun", "nice", "wonderful", "brilliant", "great",
                      "good", "fun", "nice")]
    path = write(tmp_path / "p.jsonl", rows, "jsonl")
    a, b = (load_preference_file(path, tokenizer, 0.3, seed=0) for _ in range(2))
    c = load_preference_file(path, tokenizer, 0.3, seed=1)
    test_rows = [list(x["test"]["row"]) for x in (a, b, c)]
    assert test_rows[0] == test_rows[1] and len(test_rows[0]) == 3
    assert sorted(list(a["train"]["row"]) + test_rows[0]) == list(range(10))
    assert test_rows[0] != test_rows[2]  # a fixed draw of 3 of 10 rows per seed


def test_a_source_with_train_and_test_keeps_its_splits(tmp_path, tokenizer):
    path = str(tmp_path / "dd")
    DatasetDict(train=Dataset.from_list(ROWS[:3]), test=Dataset.from_list(ROWS[3:])
                ).save_to_disk(path)
    data = load_preference_file(path, tokenizer, 0.2, 0)
    assert list(data["train"]["prompt"]) == [r["prompt"] for r in ROWS[:3]]
    assert list(data["test"]["prompt"]) == [r["prompt"] for r in ROWS[3:]]


def test_gold_columns_are_kept_when_given(tmp_path, tokenizer):
    rows = [{**r, "chosen_gold": 0.9, "rejected_gold": 0.1} for r in ROWS]
    data = load_preference_file(write(tmp_path / "g.csv", rows, "csv"), tokenizer, 0.2, 0)
    assert list(data["train"]["chosen_gold"]) == [0.9] * 4  # CSV strings read as floats


def test_prompts_in_every_format(tmp_path, tokenizer, chat_tokenizer):
    prompts = [p for p, _, _ in PAIRS]
    txt = tmp_path / "prompts.txt"
    txt.write_text("\n".join(prompts) + "\n\n")
    assert load_prompts(str(txt), tokenizer) == prompts
    path = write(tmp_path / "p.jsonl", ROWS, "jsonl")  # a 'prompt' column among others
    assert load_prompts(path, tokenizer) == prompts
    chat = write(tmp_path / "c.jsonl", conversational(ROWS), "jsonl")
    assert load_prompts(chat, chat_tokenizer)[0] == "user: the movie was assistant:"
    train, held = split_prompts(prompts * 4, 3, "x")
    assert len(held) == 3 and len(train.prompts) == 17  # min(3, 20 // 2) held out


# --------------------------------------------------------------------------- errors


def _reward(capsys, sft_dir, out, prefs_path, *extra):
    code = main(["reward", "--sft_dir", sft_dir, "--prefs_path", prefs_path, "--output_dir",
                 str(out), "--device", "cpu", "--max_steps", "1", *extra])
    return code, capsys.readouterr().err.strip().splitlines()


BAD_FILES = {  # name: (file name, contents, the error's words)
    "missing column": ("a.jsonl", '{"prompt": "the movie was", "chosen": " good ."}\n',
                       "row 0 lacks column 'rejected'; needs ['prompt', 'chosen', 'rejected']"),
    "empty prompt": ("b.jsonl", '{"prompt": " ", "chosen": " good .", "rejected": " bad ."}\n'
                                '{"prompt": "the plot is", "chosen": " good .", "rejected": " bad ."}\n',
                     "row 0: 'prompt' must not be empty"),
    "unreadable": ("c.jsonl", '{"prompt": "the movie was", "chosen": \n', "line 1 is not valid JSON"),
    "unknown extension": ("d.xml", "<pairs/>", "prefs_path must be a .jsonl, .json, .csv, "
                                               ".parquet file or a datasets directory"),
    "one gold column": ("e.jsonl", '{"prompt": "the movie was", "chosen": " good .", '
                                   '"rejected": " bad .", "chosen_gold": 1}\n',
                        "has 'chosen_gold' but lacks 'rejected_gold'"),
    "unknown word": ("f.jsonl", '{"prompt": "the plot is", "chosen": " good .", "rejected": " bad ."}\n'
                                '{"prompt": "Human: How do I bake bread? Assistant:", '
                                '"chosen": " good .", "rejected": " bad ."}\n',
                     "row 1: 'prompt' holds 'Human:', a word outside the tokenizer's vocabulary"),
    "glued response": ("g.jsonl", '{"prompt": "the plot was", "chosen": "very good .", '
                                  '"rejected": " bad ."}\n' * 2,
                       "row 0: prompt + 'chosen' ('the plot wasvery good .') tokenizes "
                       "differently joined (as TRL does) than apart; start 'chosen' with a space"),
    # TRL's extract_prompt splits implicit prompts by character: here inside "b|rilliant"
    "implicit prompt inside a word": ("i.jsonl", '{"chosen": "the ending was brilliant .", '
                                                 '"rejected": "the ending was boring ."}\n' * 2,
                                      "row 0: prompt + 'chosen' ('the ending was brilliant .') "
                                      "tokenizes differently joined"),
    "too long": ("h.jsonl", json.dumps({"prompt": "the movie was " + "very " * 30,
                                        "chosen": " good .", "rejected": " bad ."}) + "\n"
                            + json.dumps(ROWS[0]) + "\n",
                 "truncate_prompts must be true to use"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_prefs_files_exit_2_with_one_line_before_training(case, tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    name, text, message = BAD_FILES[case]
    (tmp_path / name).write_text(text)
    code, err = _reward(capsys, os.path.join(out, "sft"), tmp_path / "r", str(tmp_path / name))
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not os.path.exists(tmp_path / "r" / "metrics.jsonl")  # failed before training


BAD_PROMPTS = {  # name: (file name, contents, the error's words)
    "unknown word": ("a.txt", "the movie was\nHuman: hello there\n",
                     "row 1: 'prompt' holds 'Human:', a word outside the tokenizer's vocabulary"),
    "too long": ("b.txt", "the movie was\n" + "the " * 30 + "\n",
                 "max_new_tokens must be <= 2 so that the longest prompt of prompts_path"),
    "one prompt": ("c.txt", "the movie was\n", "holds 1 prompt; training and a held-out part "
                                                "need at least 2"),
    "no prompt column": ("d.jsonl", '{"text": "the movie was"}\n',
                         "row 0: 'prompt' must be a non-empty string (got None)"),
    "unknown extension": ("e.yaml", "- the movie was\n", "prompts_path must be a .jsonl, .json, "
                                                         ".csv, .parquet, .txt file"),
}


@pytest.mark.parametrize("case", list(BAD_PROMPTS))
def test_bad_prompts_files_exit_2_with_one_line_before_training(case, tiny_run, tmp_path,
                                                                capsys):
    out, _ = tiny_run
    name, text, message = BAD_PROMPTS[case]
    (tmp_path / name).write_text(text)
    code = main(["ppo", "--sft_dir", os.path.join(out, "sft"), "--reward_dir",
                 os.path.join(out, "reward"), "--prompts_path", str(tmp_path / name),
                 "--output_dir", str(tmp_path / "p"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not os.path.exists(tmp_path / "p" / "metrics.jsonl")


def test_missing_prefs_path_and_prompts_path(tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    code, err = _reward(capsys, os.path.join(out, "sft"), tmp_path / "r", str(tmp_path / "no.jsonl"))
    assert code == 2 and err == [f"rlhf-toy: error: prefs_path {str(tmp_path / 'no.jsonl')!r} "
                                 "does not exist"]
    code = main(["ppo", "--sft_dir", os.path.join(out, "sft"), "--reward_dir",
                 os.path.join(out, "reward"), "--prompts_path", str(tmp_path / "no.txt"),
                 "--output_dir", str(tmp_path / "p"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"rlhf-toy: error: prompts_path {str(tmp_path / 'no.txt')!r} "
                                 "does not exist"]


# --------------------------------------------------------------------------- runs without gold


def export_jsonl(prefs_dir: str, path: str) -> str:
    """The tiny run's pairs (train then test) as a JSONL file in TRL's explicit-prompt
    format, without gold columns: what a user brings."""
    from rlhf_toy.data import load_preferences

    data = load_preferences(prefs_dir)
    with open(path, "w") as fh:
        for split in ("train", "test"):
            for r in data[split]:
                fh.write(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n")
    return path


def test_gold_less_handmade_prefs_dir_trains_reward_without_crash(tiny_run, tmp_path):
    """The reported case: a `datasets` directory made by hand, without gold columns, read
    through prefs_dir: the reward stage trains and leaves the gold ceiling out."""
    from rlhf_toy.data import load_preferences

    out, _ = tiny_run
    data = load_preferences(os.path.join(out, "prefs"))
    keep = ["prompt", "chosen", "rejected"]
    DatasetDict({s: data[s].select_columns(keep) for s in ("train", "test")}
                ).save_to_disk(str(tmp_path / "handmade"))
    s = run_stage("reward", str(tmp_path), "--sft_dir", os.path.join(out, "sft"),
                  "--prefs_dir", str(tmp_path / "handmade"), "--max_steps", "5",
                  "--audit_steps", "0")
    assert "gold_accuracy" not in s and s["gold"] == NO_GOLD
    assert os.path.isfile(tmp_path / "reward" / "model.safetensors")


@pytest.fixture(scope="module")
def user_runs(tiny_run, tmp_path_factory):
    """A user's data on the tiny run's SFT model: the tiny run's pairs as a JSONL file
    without gold, 40 task prompts as a text file (no task: no gold). reward (60 steps) and
    dpo (20 steps, task prompts) from the JSONL; ppo (4 iterations) and a dpo (4 steps)
    evaluated on the text file's prompts. Returns (dirs, stage lines printed)."""
    out, _ = tiny_run
    root = tmp_path_factory.mktemp("user_runs")
    pairs = export_jsonl(os.path.join(out, "prefs"), str(root / "pairs.jsonl"))
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(get_task("sentiment").sample_prompts(40, random.Random(5))))
    sft = ["--sft_dir", os.path.join(out, "sft"), "--device", "cpu"]
    runs = {"reward": [*sft, "--prefs_path", pairs, "--max_steps", "60", "--batch_size", "32",
                       "--audit_steps", "0"],
            "dpo": [*sft, "--prefs_path", pairs, "--reward_dir", str(root / "reward"),
                    "--max_steps", "20", "--eval_steps", "0", "--n_eval_prompts", "32"],
            "ppo": [*sft, "--reward_dir", str(root / "reward"), "--prompts_path", str(prompts),
                    "--max_steps", "4", "--batch_size", "16", "--mini_batch_size", "8",
                    "--n_eval_prompts", "8", "--eval_steps", "2", "--inspect_steps", "2"],
            "dpo_prompts": [*sft, "--prefs_path", pairs, "--reward_dir", str(root / "reward"),
                            "--prompts_path", str(prompts), "--max_steps", "4",
                            "--eval_steps", "0", "--n_eval_prompts", "8"]}
    lines, dirs = {}, {"pairs": pairs, "prompts": str(prompts), "sft": sft[1]}
    for name, argv in runs.items():
        dirs[name] = str(root / name)
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            assert main([name.split("_")[0], *argv, "--output_dir", dirs[name]]) == 0, name
        lines[name] = printed.getvalue().strip().splitlines()[-1]
    return dirs, lines


def summary_of(run_dir: str) -> dict:
    return json.load(open(os.path.join(run_dir, "summary.json")))


def test_reward_and_dpo_from_a_jsonl_file_without_gold(user_runs):
    """Both train on the gold-less JSONL (held-out pair accuracy well above chance; the
    prefs_dir run of the same pairs reaches > 0.6 too), the reward summary has no gold
    ceiling and its line says so; dpo measures gold on the task's prompts as before."""
    dirs, lines = user_runs
    reward, dpo = summary_of(dirs["reward"]), summary_of(dirs["dpo"])
    assert lines["reward"].startswith("[reward] eval_accuracy=") and lines["reward"].endswith(
        NO_GOLD)
    assert "gold_accuracy" not in reward and reward["train_pairs"] == 800
    assert reward["eval_accuracy"] > 0.6
    assert dpo["eval_accuracy"] > dpo["eval_accuracy_before"] + 0.05
    assert "gold_reward_after" in dpo and "gold" not in dpo


def test_ppo_and_dpo_from_prompts_path_say_no_gold_reward(user_runs):
    dirs, lines = user_runs
    assert lines["ppo"].startswith("[ppo] proxy_reward_after=") and NO_GOLD in lines["ppo"]
    for name in ("ppo", "dpo_prompts"):
        summary = summary_of(dirs[name])
        assert summary["gold"] == NO_GOLD and "gold_reward_before" not in summary, name
    rows = [json.loads(x) for x in open(os.path.join(dirs["ppo"], "metrics.jsonl"))]
    assert not any("gold" in r or "eval_gold" in r for r in rows)
    assert [r["step"] for r in rows if "eval_proxy" in r] == [2, 4]
    snapshot = json.load(open(os.path.join(dirs["ppo"], "inspect", "step_2.json")))
    assert snapshot["samples"][0]["gold"] is None


def test_inspect_of_a_prompts_path_run_shows_no_gold(user_runs, tmp_path, capsys):
    """inspect samples the run's held-out prompts and shows no gold number anywhere."""
    dirs, _ = user_runs
    code = main(["inspect", "--checkpoint", dirs["ppo"], "--n", "4", "--html",
                 str(tmp_path / "i.html")])
    text = capsys.readouterr().out
    # four sample headers and the stage line
    assert code == 0 and text.count(NO_GOLD) == 5 and re.search(r"gold[ =]\d", text) is None
    assert NO_GOLD in (tmp_path / "i.html").read_text()
    assert main(["inspect", "--checkpoint", dirs["ppo"], "--n", "4", "--json",
                 str(tmp_path / "i.json")]) == 0
    _, held_out = split_prompts(load_prompts(dirs["prompts"], None), 8, "x")
    report = json.loads((tmp_path / "i.json").read_text())
    assert all(s["prompt"] in held_out and s["gold"] is None for s in report["samples"])


def test_compare_without_gold_reports_no_gold_reward(user_runs, tmp_path):
    """compare of the gold-less ppo and dpo runs (reused, one seed, no sweep): no gold
    numbers in summary.json, report.md or report.html, which say "no gold reward"; the
    frontier is proxy reward against KL."""
    dirs, _ = user_runs
    out = tmp_path / "compare"
    code = main(["compare", "--sft_dir", dirs["sft"], "--reward_dir", dirs["reward"],
                 "--prefs_path", dirs["pairs"], "--prompts_path", dirs["prompts"],
                 "--method_dirs", f"ppo={dirs['ppo']}", f"dpo={dirs['dpo_prompts']}",
                 "--methods", "ppo", "dpo", "--seeds", "0", "--sweep", "false",
                 "--n_eval_prompts", "8", "--output_dir", str(out), "--device", "cpu"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gold"] == NO_GOLD and not any("gold_reward" in k for k in summary)
    for name in ("sft", "ppo", "dpo"):
        assert "gold_reward" not in summary[name] and "win_rate_vs_ref" not in summary[name]
        assert summary[name]["kl_to_ref"] == summary[name]["per_seed"][0]["kl_to_ref"]
    report = (out / "report.md").read_text()
    assert NO_GOLD in report and "gold reward |" not in report
    assert "| method | beta | proxy reward | KL to ref | response length |" in report
    assert "![proxy reward vs KL](frontier.png)" in report
    page = (out / "report.html").read_text()
    assert "No gold reward" in page and "gold reward</th>" not in page


def test_pipeline_passes_a_users_data_and_skips_prefs():
    from rlhf_toy.cli import PIPELINE, PipelineConfig, _stage_argv, pipeline_stages
    from rlhf_toy.config import CompareConfig, RewardConfig
    from rlhf_toy.train.ppo import PPOConfig

    pipe = PipelineConfig(prefs_path="p.jsonl", prompts_path="q.txt")
    assert pipeline_stages(pipe) == [s for s in PIPELINE if s != "prefs"]
    assert pipeline_stages(PipelineConfig()) == list(PIPELINE)
    reward = _stage_argv(pipe, "reward", RewardConfig)
    assert reward[reward.index("--prefs_path") + 1] == "p.jsonl" and "--prompts_path" not in reward
    ppo = _stage_argv(pipe, "ppo", PPOConfig)
    assert ppo[ppo.index("--prompts_path") + 1] == "q.txt" and "--prefs_path" not in ppo
    compare = _stage_argv(pipe, "compare", CompareConfig)
    assert "--prefs_path" in compare and "--prompts_path" in compare


def test_reward_dpo_ppo_from_jsonl_on_a_tiny_bpe_gpt2(tmp_path, capsys):
    """A user's setting end to end: a byte-level BPE GPT-2 directory (random init, no
    unknown token: no word check) given as --model_name_or_path, 200 gold-less pairs as
    JSONL, 40 prompts as text. reward, dpo and ppo each run, save a model and say "no gold
    reward"; dpo's implicit reward and the reward model are scored on the same held-out pairs.
    DPO learns from the file: its held-out loss ends below log 2 (its value at the start) by
    more than 0.03 (after 30 steps, seeds 0/1/2 of model and pairs: 0.589, 0.631, 0.631)."""
    task = get_task("sentiment")
    model_dir = str(tmp_path / "model")
    save_bpe_gpt2(task, model_dir)
    pairs = write_task_pairs(task, str(tmp_path / "pairs.jsonl"), 200)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(task.sample_prompts(40, random.Random(1))) + "\n")
    common = ["--model_name_or_path", model_dir, "--device", "cpu"]
    runs = [["reward", "--prefs_path", pairs, "--max_steps", "20", "--audit_steps", "0"],
            ["dpo", "--prefs_path", pairs, "--reward_dir", str(tmp_path / "reward"),
             "--prompts_path", str(prompts), "--max_steps", "30", "--eval_steps", "0",
             "--n_eval_prompts", "8"],
            ["ppo", "--reward_dir", str(tmp_path / "reward"), "--prompts_path", str(prompts),
             "--max_steps", "2", "--batch_size", "8", "--mini_batch_size", "4",
             "--n_eval_prompts", "8"]]
    for stage, *argv in runs:
        out = str(tmp_path / stage)
        assert main([stage, *common, *argv, "--output_dir", out]) == 0, stage
        assert capsys.readouterr().out.strip().endswith(NO_GOLD), stage
        assert os.path.isfile(os.path.join(out, "model.safetensors")), stage
    reward, dpo = summary_of(str(tmp_path / "reward")), summary_of(str(tmp_path / "dpo"))
    assert reward["train_pairs"] == 160 and reward["test_pairs"] == 40  # 20 % held out
    assert dpo["train_pairs"] == 160 and dpo["gold"] == NO_GOLD
    assert dpo["eval_loss"] < math.log(2) - 0.03
