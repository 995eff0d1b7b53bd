"""The benchmark runs end to end at the smallest size and writes every field (not timed)."""

import json
import os
import subprocess
import sys

import pytest

from rlhf_toy import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ("ours_s", "baseline_s", "speedup", "tokens_per_s", "peak_mem_mb", "mfu")


def test_bench_script_writes_all_rows_with_positive_fields(tmp_path):
    out = tmp_path / "bench.json"
    # this checkout's package, not whichever rlhf_toy is installed
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench.py"),
                           "--device", "cpu", "--size", "test", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"].startswith("cpu") and result["size"] == "test"
    assert [r["name"] for r in result["rows"]] == ["rollout", "ppo_iteration", "grpo_step",
                                                   "rloo_step", "dpo_step"]
    for row in result["rows"]:
        assert row["baseline"], row["name"]
        for field in FIELDS:
            assert row[field] > 0, (row["name"], field)
        assert row["speedup"] == pytest.approx(row["baseline_s"] / row["ours_s"])
        low, mid, high = row["pair_speedup_quartiles"]
        assert 0 < low <= mid <= high
        assert row["name"] in proc.stdout
    assert "RLOOTrainer" in proc.stdout and "no PPO trainer" in proc.stdout
    assert "GRPOTrainer" in proc.stdout


def test_bench_without_trl_skips_the_baseline_with_a_note(monkeypatch):
    monkeypatch.setattr(bench, "_have_trl", lambda: False)
    result = bench.run_bench("cpu", "test", rows=("ppo_iteration", "grpo_step", "dpo_step"), repeats=1)
    for row in result["rows"]:
        assert row["baseline"] is None and row["baseline_s"] is None and row["speedup"] is None
        assert row["ours_s"] > 0 and row["mfu"] > 0 and "baseline skipped" in row["note"]
    assert "skipped" in bench.format_table(result)


def test_pair_speedup_quartiles_are_those_of_the_per_pair_ratios():
    """Ratios baseline / ours per pair: 1, 2, 3, 4, 5 (ours always 1 s, listed out of order);
    the inclusive quartiles of five sorted values are the 2nd, 3rd and 4th: 2, 3, 4."""
    assert bench.pair_speedup_quartiles([1.0, 2.0, 0.5, 1.0, 1.0],
                                        [3.0, 2.0, 1.0, 5.0, 4.0]) == [2.0, 3.0, 4.0]
    assert bench.pair_speedup_quartiles([2.0], [3.0]) == [1.5, 1.5, 1.5]
    assert bench.pair_speedup_quartiles([2.0], []) is None
