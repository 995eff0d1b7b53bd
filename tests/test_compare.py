"""The PPO-versus-DPO comparison: its KL estimate, its verdict, and a tiny end-to-end run."""

import json
import os

import pytest
from conftest import TINY

from rlhf_toy.compare import Evaluator, equal_kl_verdict, run_compare
from rlhf_toy.config import CompareConfig, DPOConfig, parse_config
from rlhf_toy.models import load_policy
from rlhf_toy.train.dpo import run_dpo
from rlhf_toy.train.ppo import PPOConfig, run_ppo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _inputs(root: str) -> list[str]:
    return ["--device", "cpu", "--sft_dir", os.path.join(root, "sft"),
            "--reward_dir", os.path.join(root, "reward")]


def test_reference_against_itself_has_zero_kl_and_even_win_rate(tiny_run):
    """Sampled log-probs (KV cache) minus a fresh reference forward: KL ~ 0, all ties."""
    root, _ = tiny_run
    cfg = parse_config(CompareConfig, [*_inputs(root), "--n_eval_prompts", "32"])
    evaluator = Evaluator(cfg, "cpu")
    m = evaluator.measure(load_policy(os.path.join(root, "sft")))
    assert abs(m["kl_to_ref"]) < 1e-4
    assert m["win_rate_vs_ref"] == 0.5
    assert m["gold"] == evaluator.ref_gold


def _point(kl, gold, se=0.01):
    return {"kl_to_ref": kl, "gold_reward": gold, "gold_se": se}


def test_equal_kl_verdict_reads_both_methods_within_the_shared_kl():
    """PPO reaches KL 4 at most, DPO KL 9: the budget is 4, DPO's 0.9 at KL 9 is out of it."""
    ref = _point(0.0, 0.5)
    frontier = {"ppo": [ref, _point(1.0, 0.6), _point(4.0, 0.8)],
                "dpo": [ref, _point(2.0, 0.7), _point(9.0, 0.9)]}
    v = equal_kl_verdict(frontier, seed=3, n_prompts=128)
    assert v["kl_budget"] == 4.0
    assert (v["best_ppo_gold"], v["best_dpo_gold"]) == (0.8, 0.7)
    assert "PPO is ahead of DPO by 0.100" in v["sentence"] and "one seed (3)" in v["sentence"]
    close = equal_kl_verdict({"ppo": frontier["ppo"], "dpo": [ref, _point(4.0, 0.79)]}, 0, 128)
    assert "neither is clearly ahead" in close["sentence"]


@pytest.fixture(scope="module")
def main_runs(tiny_run, tmp_path_factory):
    """A 4-iteration PPO run and a 4-step DPO run on the tiny pipeline."""
    root, _ = tiny_run
    out = tmp_path_factory.mktemp("compare_main")
    ppo_dir, dpo_dir = str(out / "ppo"), str(out / "dpo")
    run_ppo(parse_config(PPOConfig, [*_inputs(root), "--output_dir", ppo_dir, *TINY["ppo"],
                                     "--eval_steps", "2"]))
    run_dpo(parse_config(DPOConfig, [*_inputs(root), "--output_dir", dpo_dir, "--prefs_dir",
                                     os.path.join(root, "prefs"), "--max_steps", "4",
                                     "--eval_steps", "2", "--n_eval_prompts", "16"]))
    return ppo_dir, dpo_dir


def test_tiny_compare_writes_summary_report_and_plots(tiny_run, main_runs, tmp_path):
    root, _ = tiny_run
    ppo_dir, dpo_dir = main_runs
    out = tmp_path / "compare"
    summary = run_compare(parse_config(CompareConfig, [
        *_inputs(root), "--output_dir", str(out), "--prefs_dir", os.path.join(root, "prefs"),
        "--ppo_dir", ppo_dir, "--dpo_dir", dpo_dir, "--n_eval_prompts", "16",
        "--ppo_betas", "0.1", "--dpo_betas", "0.5", "--sweep_ppo_steps", "2",
        "--sweep_dpo_steps", "4"]))
    on_disk = json.loads((out / "summary.json").read_text())
    for method in ("sft", "ppo", "dpo"):
        for key in ("gold_reward", "proxy_reward", "kl_to_ref", "win_rate_vs_ref",
                    "response_len"):
            assert isinstance(on_disk[method][key], float), (method, key)
    assert on_disk["sft"]["win_rate_vs_ref"] == 0.5 and abs(on_disk["sft"]["kl_to_ref"]) < 1e-4
    assert [(p["method"], p["beta"], p["steps"]) for p in on_disk["sweep"]] == [
        ("ppo", 0.1, 2), ("dpo", 0.5, 4)]
    assert (out / "sweep" / "ppo_beta_0.1" / "config.json").is_file()
    # the DPO point is the main run's own configuration: reused, not retrained
    assert on_disk["sweep"][1]["dir"] == dpo_dir and not (out / "sweep" / "dpo_beta_0.5").exists()
    assert on_disk["sweep"][1]["gold_reward"] == on_disk["dpo"]["gold_reward"]
    for path in on_disk["plots"].values():
        data = open(path, "rb").read()
        assert data[:8] == PNG_MAGIC and len(data) > 1024, path
    report = (out / "report.md").read_text()
    assert "![gold reward vs KL](frontier.png)" in report
    assert "| ppo | 0.1 | 2 |" in report and "one seed (0)" in report
    assert summary["verdict"]["sentence"] in report
