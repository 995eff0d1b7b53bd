"""Preference data (columns, splits, label noise) and the three stages end to end."""

import json
import math
import os

import pytest
import torch
from conftest import run_stage

from rlhf_toy.data import bradley_terry_labels, load_preferences


def test_bradley_terry_label_frequencies_match_the_model():
    """With gold gap d and temperature T, P(a wins) = sigmoid(d / T): 0.5, 0.731, 0.881."""
    n = 20_000
    for gap in (0.0, 0.1, 0.2):
        labels, probs = bradley_terry_labels([0.5 + gap] * n, [0.5] * n, 0.1, seed=1)
        expected = 1 / (1 + math.exp(-gap / 0.1))
        assert probs[0] == pytest.approx(expected)
        assert sum(labels) / n == pytest.approx(expected, abs=0.015)


def test_preference_dataset_columns_splits_and_noise(tiny_run):
    out, summaries = tiny_run
    data = load_preferences(os.path.join(out, "prefs"))
    assert len(data["train"]) == 800 and len(data["test"]) == 200  # 1000 pairs, 20% held out
    for col in ("prompt", "chosen", "rejected", "chosen_gold", "rejected_gold", "p_chosen"):
        assert col in data["train"].column_names
    row = data["train"][0]
    assert all(isinstance(row[c], str) for c in ("prompt", "chosen", "rejected"))
    # the drawn label agrees with gold more often than not, but not always (noise)
    c = torch.tensor(list(data["train"]["chosen_gold"]))
    r = torch.tensor(list(data["train"]["rejected_gold"]))
    agree = float((c > r).float().mean())
    assert 0.6 < agree < 0.97
    assert summaries["prefs"]["gold_accuracy"] == pytest.approx(
        float(((torch.tensor(list(data["test"]["chosen_gold"]))
                > torch.tensor(list(data["test"]["rejected_gold"]))).float()
               + 0.5 * (torch.tensor(list(data["test"]["chosen_gold"]))
                        == torch.tensor(list(data["test"]["rejected_gold"]))).float()).mean()))


def test_three_stages_end_to_end(tiny_run):
    out, s = tiny_run
    assert 0.3 < s["sft"]["gold_reward"] < 0.7
    assert s["sft"]["eval_loss"] < 2.2  # a fresh model starts at log(41) = 3.7
    assert s["reward"]["eval_accuracy"] > 0.6  # tiny run: 800 pairs, 60 steps
    for stage, files in {"sft": ["config.json", "model.safetensors", "tokenizer.json"],
                         "reward": ["config.json", "model.safetensors"],
                         "prefs": ["dataset_dict.json"]}.items():
        for f in files + ["summary.json"]:
            assert os.path.isfile(os.path.join(out, stage, f)), (stage, f)
    rows = [json.loads(x) for x in open(os.path.join(out, "sft", "metrics.jsonl"))]
    assert rows[0]["loss"] > rows[-2]["loss"] + 0.5


def test_same_seed_same_numbers(tmp_path):
    a = run_stage("sft", str(tmp_path / "a"), "--max_steps", "20", "--n_eval_prompts", "16")
    b = run_stage("sft", str(tmp_path / "b"), "--max_steps", "20", "--n_eval_prompts", "16")
    c = run_stage("sft", str(tmp_path / "c"), "--max_steps", "20", "--n_eval_prompts", "16",
                  "--seed", "1")
    assert a["gold_reward"] == b["gold_reward"] and a["eval_loss"] == b["eval_loss"]
    assert a["eval_loss"] != c["eval_loss"]
