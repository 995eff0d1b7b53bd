"""scripts/results_table.py: runs grouped by task, gains as mean ± standard error."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

import results_table  # noqa: E402


def _run(root, name, task, seed, before, after):
    """A pipeline run dir holding only the summaries the table reads."""
    stages = {"sft": {"gold_reward": before}, "reward": {"eval_accuracy": 0.8,
                                                          "gold_accuracy": 0.85}}
    for method in ("ppo", "dpo"):
        stages[method] = {"gold_reward_before": before, "gold_reward_after": after,
                          "kl_to_ref": 3.0, "wall_s": 5.0}
    for stage, summary in stages.items():
        os.makedirs(root / name / stage)
        (root / name / stage / "summary.json").write_text(json.dumps(summary))
    (root / name / "sft" / "run_config.json").write_text(json.dumps({"task": task,
                                                                     "seed": seed}))
    return str(root / name)


def test_tasks_are_never_averaged_together(tmp_path, capsys):
    """sentiment gains +0.3, +0.4, +0.2: mean 0.3, s^2 = (0 + 0.01 + 0.01) / 2 = 0.01,
    se = sqrt(0.01 / 3) = 0.058; sorting's one run (-0.1) stands alone, without an error bar."""
    runs = [_run(tmp_path, "a", "sentiment", 0, 0.5, 0.8),
            _run(tmp_path, "b", "sorting", 0, 0.6, 0.5),
            _run(tmp_path, "c", "sentiment", 1, 0.4, 0.8),
            _run(tmp_path, "d", "sentiment", 2, 0.5, 0.7)]
    assert results_table.main(runs) == 0
    out = capsys.readouterr().out
    sentiment, sorting = out.split("## sorting")
    assert "## sentiment" in sentiment and sentiment.count("| 0.500 | 0.800 (0.850) |") == 4
    assert "mean ± standard error over 3 seeds: +0.300 ± 0.058 (smallest +0.200)" in sentiment
    assert "over 1 seed: -0.100 (smallest -0.100)" in sorting
