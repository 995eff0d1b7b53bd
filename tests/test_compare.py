"""`compare`: its KL estimate, its equal-KL verdicts, its report, and a tiny two-seed run."""

import html
import json
import math
import os
import re

import pytest
from conftest import run_stage

from rlhf_toy.compare import (
    Evaluator,
    below_reference,
    equal_kl_pair,
    frontier,
    run_compare,
    sweep_betas,
)
from rlhf_toy.compare_report import indicator_lines, report_markdown
from rlhf_toy.config import CompareConfig, UsageError, parse_config
from rlhf_toy.core.stats import standard_error
from rlhf_toy.models import load_policy

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _inputs(root: str) -> list[str]:
    return ["--device", "cpu", "--sft_dir", os.path.join(root, "sft"),
            "--reward_dir", os.path.join(root, "reward")]


def test_reference_against_itself_has_zero_kl_and_even_win_rate(tiny_run):
    """Sampled log-probs (KV cache) minus a fresh reference forward: KL ~ 0, all ties."""
    root, _ = tiny_run
    cfg = parse_config(CompareConfig, [*_inputs(root), "--n_eval_prompts", "32"])
    evaluator = Evaluator(cfg, 0, os.path.join(root, "sft"), os.path.join(root, "reward"), "cpu")
    m = evaluator.measure(load_policy(os.path.join(root, "sft")))
    assert abs(m["kl_to_ref"]) < 1e-4
    assert m["win_rate_vs_ref"] == 0.5
    assert m["gold"] == evaluator.ref_gold


def _point(kl, gold, se=0.01, label="p"):
    return {"kl_to_ref": kl, "gold_reward": gold, "gold_reward_se": se, "label": label}


def test_equal_kl_verdict_reads_both_methods_within_the_shared_kl():
    """PPO reaches KL 4 at most, DPO KL 9: the budget is 4, DPO's 0.9 at KL 9 is out of it.
    Best within it: PPO 0.8, DPO 0.7; gap 0.1, se sqrt(2) * 0.01 = 0.0141: 7.1 s.e."""
    ppo = [_point(1.0, 0.6), _point(4.0, 0.8)]
    dpo = [_point(2.0, 0.7), _point(9.0, 0.9)]
    v = equal_kl_pair(ppo, dpo, "ppo", "dpo", n_seeds=3)
    assert v["kl_budget"] == 4.0 and v["gold"] == [0.8, 0.7]
    assert math.isclose(v["diff_se"], math.sqrt(2) * 0.01) and v["significant"]
    assert v["sentence"].startswith("PPO is ahead of DPO") and "7.1 standard errors" in v["sentence"]
    # 0.79 against 0.8 with se 0.01 each: 0.7 standard errors, no verdict
    close = equal_kl_pair(ppo, [_point(4.0, 0.79)], "ppo", "dpo", n_seeds=3)
    assert not close["significant"]
    assert close["sentence"].startswith("No significant difference between PPO and DPO")
    # one seed: no standard error, never significant, and the sentence says why
    one = equal_kl_pair([_point(4.0, 0.9, math.nan)], [_point(4.0, 0.1, math.nan)], "ppo",
                        "dpo", n_seeds=1)
    assert not one["significant"] and "With one seed" in one["sentence"]
    # DPO's every point lies beyond PPO's largest KL: no comparison at equal KL
    apart = equal_kl_pair([_point(1.0, 0.6)], [_point(3.0, 0.7)], "ppo", "dpo", n_seeds=3)
    assert "cannot be compared at equal KL" in apart["sentence"] and "significant" not in apart


def _summary(sft_gold, ppo_golds, ppo_sweep_gold):
    """A compare summary over two seeds; the SFT KL is float-rounding noise below 0."""
    def agg(golds, kl):
        rows = [{"seed": s, "gold_reward": g, "kl_to_ref": kl, "proxy_reward": 0.0,
                 "win_rate_vs_ref": 0.5, "response_len": 5.0} for s, g in enumerate(golds)]
        out = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "seed"}
        out.update({f"{k}_se": standard_error([r[k] for r in rows]) for k in rows[0]})
        return {**out, "per_seed": rows}

    summary = {"task": "sentiment", "seeds": [0, 1], "n_eval_prompts": 16, "methods": ["ppo"],
               "sft": agg(sft_gold, -3e-8), "ppo": {**agg(ppo_golds, 5.0), "beta": 0.05},
               "sweep": [{"method": "ppo", "beta": 0.2, **agg(ppo_sweep_gold, 2.0)}],
               "plots": {"frontier": "frontier.png", "training_curves": "training_curves.png"}}
    fronts = frontier(summary, ["ppo"])
    summary["below_reference"] = below_reference(summary, ["ppo"], fronts)
    summary["verdict"] = {"pairs": []}
    return summary, fronts


def test_frontier_holds_trained_policies_only_and_the_report_says_when_below_reference():
    """SFT gold 0.60 and 0.62 (mean 0.61); PPO 0.30 and 0.36 (mean 0.33): PPO is worse on
    both seeds, and its sweep point (0.50) too. se of each: |a - b| / 2 = 0.01 and 0.03."""
    summary, fronts = _summary([0.60, 0.62], [0.30, 0.36], [0.50, 0.50])
    assert [p["kl_to_ref"] for p in fronts["ppo"]] == [2.0, 5.0]  # no SFT point at KL 0
    (line,) = summary["below_reference"]
    assert line.startswith("PPO made the policy worse: its main run ends below the reference")
    assert "gold 0.330 against SFT's 0.610 (difference -0.2800 +- 0.0316; lower on 2 of 2 " \
           "seeds)" in line  # se sqrt(0.01^2 + 0.03^2) = 0.0316: 8.9 s.e., significant
    assert "Every PPO policy of the sweep is below the reference too." in line
    report = report_markdown(summary)
    assert f"**{line}**" in report
    assert not re.search(r"-0\.000(?!\d)", report)
    # gold, proxy (0 here), then the KL of -3e-8: "0.000", not "-0.000"
    assert "| sft (reference) |  | 0.610 ± 0.010 | 0.000 ± 0.000 | 0.000 ± 0.000 |" in report
    assert "| ppo | 0.05 | 0.330 ± 0.030 |" in report
    # a method above the reference draws no warning; one just below it, a softer one
    assert _summary([0.60, 0.62], [0.70, 0.76], [0.50, 0.50])[0]["below_reference"] == []
    (near,) = _summary([0.60, 0.62], [0.58, 0.63], [0.50, 0.50])[0]["below_reference"]
    assert near.startswith("PPO ends below the reference, within the noise: gold 0.605")


def test_report_lists_the_runs_whose_indicator_fired(tmp_path):
    """A run whose summary.json holds a fired indicator gets one report line with the
    warning its stage printed; a quiet run, a DPO run (no indicator) and a missing summary
    give none; with none fired the report says the indicator stayed quiet."""
    from rlhf_toy.compare import indicator
    from rlhf_toy.overoptimization import OveroptimizationMonitor

    m = OveroptimizationMonitor(kl_budget=6.0)
    for step, proxy, kl in [(0, 0.0, 0.0), (10, 1.0, 7.0), (20, 1.5, 8.0)]:
        m.update(step, proxy, kl, None)
    for name, summary in (("fired", {"overoptimization": m.summary()}),
                          ("quiet", {"overoptimization": OveroptimizationMonitor().summary()}),
                          ("dpo", {"gold_reward_after": 0.5})):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    fired = indicator(str(tmp_path / "fired"))
    assert (fired["rule"], fired["step"], fired["message"]) == ("kl_budget", 20, m.message())
    assert [indicator(str(tmp_path / n)) for n in ("quiet", "dpo", "missing")] == [None] * 3
    rows = {"ppo": {"per_seed": [{"seed": 0, "overoptimization": None},
                                 {"seed": 1, "overoptimization": fired}]},
            "dpo": {"per_seed": [{"seed": 0, "overoptimization": None}]}}
    lines = indicator_lines(rows, ["ppo", "dpo"])
    assert lines[-1] == f"- ppo, seed 1: {m.message()}" and len(lines) == 3
    rows["ppo"]["per_seed"][1]["overoptimization"] = None
    assert "stayed quiet on every on-policy run" in indicator_lines(rows, ["ppo", "dpo"])[0]


def test_sweep_betas_scale_the_main_beta():
    assert sweep_betas(0.05, [0.2, 4.0]) == [0.01, 0.2]
    assert sweep_betas(0.5, [0.2, 1.0, 4.0]) == [0.1, 2.0]  # factor 1 is the main run
    assert sweep_betas(None, [0.2]) == []


@pytest.mark.parametrize(("argv", "message"), [
    (["--methods", "ppo", "nope"], "methods must be a list from"),
    (["--seeds", "1", "1"], "seeds must be distinct integers >= 0"),
    (["--beta_factors", "0"], "beta_factors must be a list of values > 0"),
    (["--method_dirs", "ppo"], "method_dirs must be METHOD=DIR items"),
    (["--sft_dir", "/no/such/dir"], "sft_dir must be an existing directory or empty"),
])
def test_config_rejects_bad_values(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_config(CompareConfig, argv)


def test_reused_runs_must_belong_to_one_of_the_seeds(tiny_run):
    root, _ = tiny_run
    with pytest.raises(UsageError, match=r"seeds must be a list holding --seed \(0\)"):
        parse_config(CompareConfig, [*_inputs(root), "--seeds", "1", "2"])


@pytest.fixture(scope="module")
def main_runs(tiny_run, tmp_path_factory):
    """A 4-iteration PPO run and a 4-step DPO run on the tiny pipeline (seed 0)."""
    root, _ = tiny_run
    out = tmp_path_factory.mktemp("compare_main")
    ppo_dir, dpo_dir = str(out / "ppo"), str(out / "dpo")
    run_stage("ppo", root, "--output_dir", ppo_dir, "--eval_steps", "2")
    run_stage("dpo", root, "--output_dir", dpo_dir, "--max_steps", "4", "--eval_steps", "2",
              "--n_eval_prompts", "16")
    return ppo_dir, dpo_dir


def test_two_seeds_reuse_seed_0_train_seed_1_and_report_error_bars(tiny_run, main_runs,
                                                                    tmp_path, capsys):
    root, _ = tiny_run
    ppo_dir, dpo_dir = main_runs
    out = tmp_path / "compare"
    argv = [*_inputs(root), "--output_dir", str(out), "--prefs_dir", os.path.join(root, "prefs"),
            "--method_dirs", f"ppo={ppo_dir}", f"dpo={dpo_dir}", "--methods", "ppo", "dpo",
            "--seeds", "0", "1", "--n_eval_prompts", "16", "--beta_factors", "4"]
    summary = run_compare(parse_config(CompareConfig, argv))
    trained = capsys.readouterr().err
    on_disk = json.loads((out / "summary.json").read_text())
    # seed 0 reuses the given runs; seed 1 trains every stage with their recorded settings
    seed1 = out / "seed_1"
    assert not (out / "seed_0" / "sft").exists() and not (out / "seed_0" / "ppo").exists()
    for stage in ("sft", "prefs", "reward", "ppo", "dpo"):
        recorded = json.loads((seed1 / stage / "run_config.json").read_text())
        assert recorded["seed"] == 1, stage
    assert json.loads((seed1 / "ppo" / "run_config.json").read_text())["max_steps"] == 4
    assert json.loads((seed1 / "sft" / "run_config.json").read_text())["max_steps"] == 120
    assert on_disk["ppo"]["dirs"] == [ppo_dir, str(seed1 / "ppo")]
    # every entry: the mean and standard error of its per-seed values
    for name in ("sft", "ppo", "dpo"):
        entry = on_disk[name]
        assert [r["seed"] for r in entry["per_seed"]] == [0, 1]
        for key in ("gold_reward", "proxy_reward", "kl_to_ref", "win_rate_vs_ref"):
            values = [r[key] for r in entry["per_seed"]]
            assert math.isclose(entry[key], sum(values) / 2), (name, key)
            assert math.isclose(entry[f"{key}_se"], standard_error(values)), (name, key)
    # the sweep: beta times 4 (PPO 0.3, DPO 0.5) on both seeds, each point over the seeds
    assert [(p["method"], p["beta"]) for p in on_disk["sweep"]] == [("ppo", 1.2), ("dpo", 2.0)]
    assert [r["seed"] for r in on_disk["sweep"][0]["per_seed"]] == [0, 1]
    assert (out / "seed_0" / "sweep" / "ppo_beta_1.2" / "summary.json").is_file()
    for path in on_disk["plots"].values():
        data = open(path, "rb").read()
        assert data[:8] == PNG_MAGIC and len(data) > 1024, path
    report = (out / "report.md").read_text()
    assert "![gold reward vs KL](frontier.png)" in report and "mean over 2 seeds" in report
    assert "| ppo | 1.2 | " in report and not re.search(r"-0\.000(?!\d)", report)
    assert summary["verdict"]["pairs"][0]["sentence"] in report
    page = (out / "report.html").read_text()  # the same report as one page, plots inline
    assert page.count("data:image/png;base64,") == 2 and "seeds 0, 1" in page
    assert html.escape(summary["verdict"]["pairs"][0]["sentence"]) in page
    assert "compare: seed 1: sft" in trained and "compare: seed 0: sft" not in trained
