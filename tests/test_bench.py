"""The benchmark runs end to end at the smallest size and writes every field (not timed)."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from rlhf_toy import bench, bench_common
from rlhf_toy.models import build_policy
from rlhf_toy.tasks import get_task
from rlhf_toy.tokenizer import build_tokenizer

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
    assert "skipped" in bench_common.format_table(result)


def test_pair_speedup_quartiles_are_those_of_the_per_pair_ratios():
    """Ratios baseline / ours per pair: 1, 2, 3, 4, 5 (ours always 1 s, listed out of order);
    the inclusive quartiles of five sorted values are the 2nd, 3rd and 4th: 2, 3, 4."""
    assert bench_common.pair_speedup_quartiles([1.0, 2.0, 0.5, 1.0, 1.0],
                                        [3.0, 2.0, 1.0, 5.0, 4.0]) == [2.0, 3.0, 4.0]
    assert bench_common.pair_speedup_quartiles([2.0], [3.0]) == [1.5, 1.5, 1.5]
    assert bench_common.pair_speedup_quartiles([2.0], []) is None


GPT2_ROWS = ["rollout", "ppo_iteration", "dpo_step"]


def test_gpt2_size_is_gpt2_small_on_long_reviews_and_runs_three_rows_by_default():
    s = bench.SIZES["gpt2"]
    assert (s.n_layer, s.n_embd, s.n_head) == (12, 768, 12) and s.n_positions >= 256
    assert s.task == "long_review" and s.max_new_tokens >= 64
    assert list(bench.default_rows("gpt2")) == GPT2_ROWS
    assert bench.default_rows("tiny") == tuple(bench.ROWS)


def _check_gpt2_rows(result, batch_size):
    assert result["size"] == "gpt2" and [r["name"] for r in result["rows"]] == GPT2_ROWS
    for row in result["rows"]:
        assert row["baseline"], row["name"]
        for field in FIELDS:
            assert row[field] > 0, (row["name"], field)
    dpo = result["rows"][2]
    assert "equal work" in dpo["note"]
    # real tokens of one step: chosen + rejected of each pair, each a 3-token prompt, a
    # long_review response of 64 to 88 tokens and EOS
    tokens = dpo["tokens_per_s"] * dpo["ours_s"]
    assert 2 * batch_size * (3 + 64 + 1) <= round(tokens) <= 2 * batch_size * (3 + 88 + 1)


def test_gpt2_rows_run_on_a_small_shape():
    """The gpt2 rows (long_review data, 256 positions, 64-token responses, DPOTrainer
    precomputing its reference) on a 1-layer 32-wide model: fields, not timings. With a
    given peak P, a DPO step's MFU is 6 N tokens / ours_s / P = 6 N tokens_per_s / P."""
    shape = replace(bench.SIZES["gpt2"], n_layer=1, n_embd=32, n_head=2, batch_size=4,
                    mini_batch_size=2)
    result = bench.run_bench("cpu", "gpt2", repeats=1, warmup=0, shape=shape, peak_tflops=0.5)
    _check_gpt2_rows(result, 4)
    assert result["peak_tflops"] == 0.5 and result["matmul_tflops"] > 0
    assert "given peak of 0.500" in bench_common.format_table(result)
    task = get_task("long_review")
    n = bench_common.n_flop_params(build_policy(build_tokenizer(task.words), 1, 32, 2, 256))
    dpo = result["rows"][2]
    assert dpo["mfu"] == pytest.approx(6 * n * dpo["tokens_per_s"] / 0.5e12)


@pytest.mark.slow
def test_gpt2_rows_run_at_the_real_size():
    """One timed pair per row of the 12-layer model (3.5 minutes on 2 shared CPU cores)."""
    _check_gpt2_rows(bench.run_bench("cpu", "gpt2", repeats=1, warmup=0),
                     bench.SIZES["gpt2"].batch_size)
