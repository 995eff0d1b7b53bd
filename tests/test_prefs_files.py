"""A user's data: `--prefs_path` in every file format and both TRL formats, pairs without
gold rewards, unknown words, `--prompts_path` without a task, and every error's line."""

import csv
import json
import os
import random
import re

import pytest
from conftest import run_stage
from datasets import Dataset, DatasetDict

from rlhf_toy.cli import main
from rlhf_toy.datafiles import load_preference_file, load_prompts, split_prompts
from rlhf_toy.evaluate import NO_GOLD
from rlhf_toy.tasks import get_task
from rlhf_toy.tokenizer import build_tokenizer

PAIRS = [("the movie was", " great .", " bad ."), ("the plot is", " very good .", " dull ."),
         ("the cast felt", " wonderful !", " awful !"), ("the music seemed", " fun .", " loud ."),
         ("the ending was", " brilliant .", " boring .")]
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


def test_reward_and_dpo_from_a_jsonl_file_without_gold(tiny_run, tmp_path, capsys):
    """reward then dpo on the tiny run's pairs exported to JSONL without gold: both train
    (held-out pair accuracy above chance), the reward summary has no gold ceiling, and
    dpo measures gold on the task's held-out prompts as before."""
    out, summaries = tiny_run
    path = export_jsonl(os.path.join(out, "prefs"), str(tmp_path / "pairs.jsonl"))
    code = main(["reward", "--sft_dir", os.path.join(out, "sft"), "--prefs_path", path,
                 "--output_dir", str(tmp_path / "reward"), "--device", "cpu",
                 "--max_steps", "60", "--batch_size", "32", "--audit_steps", "0"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0 and line.endswith(NO_GOLD) and "eval_accuracy=" in line
    reward = json.load(open(tmp_path / "reward" / "summary.json"))
    assert "gold_accuracy" not in reward and reward["train_pairs"] == 800
    assert reward["eval_accuracy"] > 0.6  # the prefs_dir run of the same pairs: > 0.6 too
    dpo = run_stage("dpo", str(tmp_path), "--sft_dir", os.path.join(out, "sft"),
                    "--prefs_path", path, "--reward_dir", str(tmp_path / "reward"),
                    "--max_steps", "20", "--eval_steps", "0", "--n_eval_prompts", "32")
    assert dpo["eval_accuracy"] > dpo["eval_accuracy_before"] + 0.05
    assert "gold_reward_after" in dpo and "gold" not in dpo


def test_ppo_and_dpo_from_prompts_path_say_no_gold_reward(tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    task = get_task("sentiment")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(task.sample_prompts(40, random.Random(5))) + "\n")
    code = main(["ppo", "--sft_dir", os.path.join(out, "sft"), "--reward_dir",
                 os.path.join(out, "reward"), "--prompts_path", str(prompts), "--output_dir",
                 str(tmp_path / "ppo"), "--device", "cpu", "--max_steps", "4", "--batch_size",
                 "16", "--mini_batch_size", "8", "--n_eval_prompts", "8", "--eval_steps", "2",
                 "--inspect_steps", "2"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0 and line.startswith("[ppo] proxy_reward_after=") and NO_GOLD in line
    summary = json.load(open(tmp_path / "ppo" / "summary.json"))
    assert summary["gold"] == NO_GOLD and "gold_reward_after" not in summary
    rows = [json.loads(x) for x in open(tmp_path / "ppo" / "metrics.jsonl")]
    assert not any("gold" in r or "eval_gold" in r for r in rows)
    assert [r["step"] for r in rows if "eval_proxy" in r] == [2, 4]
    snapshot = json.load(open(tmp_path / "ppo" / "inspect" / "step_2.json"))
    assert snapshot["samples"][0]["gold"] is None
    # inspect draws from the run's held-out prompts and shows no gold
    code = main(["inspect", "--checkpoint", str(tmp_path / "ppo"), "--n", "2", "--html",
                 str(tmp_path / "i.html")])
    text = capsys.readouterr().out
    # two sample headers and the stage line, no gold number anywhere
    assert code == 0 and text.count(NO_GOLD) == 3 and re.search(r"gold[ =]\d", text) is None
    assert NO_GOLD in (tmp_path / "i.html").read_text()
    assert main(["inspect", "--checkpoint", str(tmp_path / "ppo"), "--n", "4", "--json",
                 str(tmp_path / "i.json")]) == 0
    _, held_out = split_prompts(load_prompts(str(prompts), None), 8, "x")
    report = json.loads((tmp_path / "i.json").read_text())
    assert all(s["prompt"] in held_out and s["gold"] is None for s in report["samples"])
    dpo = run_stage("dpo", str(tmp_path), "--sft_dir", os.path.join(out, "sft"),
                    "--prefs_dir", os.path.join(out, "prefs"), "--reward_dir",
                    os.path.join(out, "reward"), "--prompts_path", str(prompts),
                    "--max_steps", "2", "--eval_steps", "0", "--n_eval_prompts", "8")
    assert dpo["gold"] == NO_GOLD and "gold_reward_before" not in dpo
