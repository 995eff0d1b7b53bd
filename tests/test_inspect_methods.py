"""`rlhf-toy inspect` on real tiny checkpoints of every registered method, alone and side by
side: each method's columns obey its own identities, checked with naive loops written out
here (not `core`). With d = logprob - ref_logprob and score s_i of response i:

    GRPO (kl_in loss):  reward = s_i on the last token, 0 before; advantage[t] = A_i on
                        every token, A_i = (s_i - mean_g) / (std_g + 1e-4) over the G
                        responses of its group (std with Bessel's correction)
    RLOO:               reward[t] = -beta d_t (+ s_i last); R_i = sum_t reward[t];
                        advantage[t] = R_i - mean of the other G - 1 R_j of its group
    REINFORCE++:        reward as RLOO's; return[t] = sum_{k >= t} gamma^(k-t) reward[k];
                        advantage = (return - m) / sqrt(v + 1e-8), m and v (Bessel) over
                        every token of the n responses; no value
    IPO:                reward[t] = beta d_t;  SimPO: reward[t] = beta / |y| logprob[t], so
                        sum_t reward[t] = beta * mean_t logprob[t]
"""

import json
import math
import statistics

import pytest
from conftest import run_stage
from test_inspect import ATOL, naive_kl

from rlhf_toy.cli import main
from rlhf_toy.config import LOSS_TYPE_DEFAULTS
from rlhf_toy.errors import UsageError
from rlhf_toy.inspect import COLUMNS, inspect_methods, inspect_samples

ON_POLICY = ("grpo", "rloo", "reinforce_pp")
BETA, GAMMA, G = 0.1, 0.9, 4


@pytest.fixture(scope="module")
def dirs(tiny_run, tmp_path_factory):
    """Two-step runs of every method but PPO and DPO (tests/test_inspect.py has those)."""
    root, _ = tiny_run
    out = str(tmp_path_factory.mktemp("inspect_methods"))
    small = ["--max_steps", "2", "--batch_size", "8", "--mini_batch_size", "8",
             "--n_eval_prompts", "8", "--beta", str(BETA)]
    run_stage("grpo", root, "--output_dir", f"{out}/grpo", *small, "--num_generations", str(G))
    run_stage("rloo", root, "--output_dir", f"{out}/rloo", *small, "--num_generations", str(G))
    run_stage("reinforce_pp", root, "--output_dir", f"{out}/reinforce_pp", *small,
              "--gamma", str(GAMMA))
    for loss in ("ipo", "simpo"):
        run_stage("dpo", root, "--output_dir", f"{out}/{loss}", "--max_steps", "3",
                  "--batch_size", "16", "--eval_steps", "0", "--n_eval_prompts", "8",
                  "--loss_type", loss)
    return {m: f"{out}/{m}" for m in (*ON_POLICY, "ipo", "simpo")}


def groups(samples: list[dict], size: int) -> list[list[dict]]:
    return [samples[i: i + size] for i in range(0, len(samples), size)]


def assert_grpo(report: dict) -> None:
    for group in groups(report["samples"], G):
        assert len({s["prompt"] for s in group}) == 1
        scores = [s["score"] for s in group]
        mean, std = statistics.mean(scores), statistics.stdev(scores)
        for s in group:
            assert s["reward"] == pytest.approx([0.0] * (len(s["token"]) - 1) + [s["score"]],
                                                abs=ATOL)
            a = (s["score"] - mean) / (std + 1e-4)
            assert s["advantage"] == pytest.approx([a] * len(s["token"]), abs=ATOL)
            assert s["value"] is None


def kl_rewards(s: dict, beta: float) -> list[float]:
    pairs = zip(s["logprob"], s["ref_logprob"], strict=True)
    reward = [-beta * naive_kl(lp, ref, "k1") for lp, ref in pairs]
    reward[-1] += s["score"]
    return reward


def assert_rloo(report: dict) -> None:
    for group in groups(report["samples"], G):
        totals = [sum(kl_rewards(s, report["beta"])) for s in group]
        for i, s in enumerate(group):
            assert s["reward"] == pytest.approx(kl_rewards(s, report["beta"]), abs=ATOL)
            a = totals[i] - (sum(totals) - totals[i]) / (G - 1)
            assert s["advantage"] == pytest.approx([a] * len(s["token"]), abs=ATOL)


def assert_reinforce_pp(report: dict) -> None:
    gamma = report["gamma"]
    flat = []
    for s in report["samples"]:
        r = kl_rewards(s, report["beta"])
        assert s["reward"] == pytest.approx(r, abs=ATOL) and s["value"] is None
        rtg = [sum(gamma ** (k - t) * r[k] for k in range(t, len(r))) for t in range(len(r))]
        assert s["return"] == pytest.approx(rtg, abs=ATOL)
        flat += rtg
    m, v = statistics.mean(flat), statistics.variance(flat)
    got = [a for s in report["samples"] for a in s["advantage"]]
    assert got == pytest.approx([(x - m) / math.sqrt(v + 1e-8) for x in flat], abs=1e-4)


def assert_preference(report: dict) -> None:
    for s in report["samples"]:
        assert s["value"] is s["return"] is s["advantage"] is None
        if report["method"] == "simpo":
            n = len(s["token"])
            assert s["reward"] == pytest.approx([report["beta"] / n * lp for lp in s["logprob"]],
                                                abs=ATOL)
            assert sum(s["reward"]) == pytest.approx(
                report["beta"] * statistics.mean(s["logprob"]), abs=ATOL)
        else:
            pairs = zip(s["logprob"], s["ref_logprob"], strict=True)
            assert s["reward"] == pytest.approx([report["beta"] * (a - b) for a, b in pairs],
                                                abs=ATOL)


IDENTITIES = {"grpo": assert_grpo, "rloo": assert_rloo, "reinforce_pp": assert_reinforce_pp,
              "ipo": assert_preference, "simpo": assert_preference}


@pytest.mark.parametrize("method", IDENTITIES)
def test_each_method_alone_obeys_its_identities(dirs, method):
    r = inspect_samples(dirs[method], n=8, seed=0)
    assert r["method"] == method and len(r["samples"]) == 8
    for s in r["samples"]:
        assert all(s[c] is None or len(s[c]) == len(s["token"]) for c in COLUMNS)
    IDENTITIES[method](r)
    if method == "simpo":
        assert r["beta"] == LOSS_TYPE_DEFAULTS["simpo"]["beta"] and "beta / |y| * logprob" in r["credit"]
    if method in ON_POLICY:
        assert r["beta"] == BETA
    # the policy moved away from the reference (training did something to inspect)
    assert any(abs(a - b) > 1e-3 for s in r["samples"]
               for a, b in zip(s["logprob"], s["ref_logprob"], strict=True))


def test_side_by_side_scores_the_same_responses_under_every_method(dirs):
    order = ["grpo", "rloo", "reinforce_pp", "ipo", "simpo"]
    reports = inspect_methods([dirs[m] for m in order], n=8, seed=1)
    assert [r["method"] for r in reports] == order
    first = reports[0]["samples"]
    for r in reports:
        assert [(s["prompt"], s["token"], s["gold"]) for s in r["samples"]] == [
            (s["prompt"], s["token"], s["gold"]) for s in first]
        IDENTITIES[r["method"]](r)
    # the responses were sampled from the first checkpoint: its report alone is the same
    assert reports[0] == inspect_samples(dirs["grpo"], n=8, seed=1)
    # log-probs differ between methods: each column is its own policy's
    assert reports[1]["samples"][0]["logprob"] != pytest.approx(
        reports[3]["samples"][0]["logprob"], abs=1e-4)


def test_cli_compare_dirs_writes_a_page_with_a_switch(dirs, tmp_path, capsys):
    page, doc = str(tmp_path / "p.html"), str(tmp_path / "r.json")
    argv = ["inspect", "--checkpoint", dirs["grpo"], "--compare_dirs", dirs["rloo"],
            dirs["simpo"], "--n", "4", "--html", page, "--json", doc]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "grpo advantage" in out and "rloo advantage" in out and "simpo reward" in out
    reports = json.load(open(doc))["reports"]
    assert [r["method"] for r in reports] == ["grpo", "rloo", "simpo"]
    text = open(page).read()
    assert "<script" not in text and text.count('type="radio"') == 3
    assert text.count('class="tok"') == 3 * sum(len(s["token"]) for s in reports[0]["samples"])
    assert f"<td>{reports[1]['samples'][0]['advantage'][0]:+.4f}</td>" in text


def test_group_size_and_overrides_are_checked(dirs, capsys):
    with pytest.raises(UsageError, match="n must be a multiple of 4"):
        inspect_samples(dirs["rloo"], n=6)
    with pytest.raises(UsageError, match="lam applies to checkpoints of ppo only"):
        inspect_samples(dirs["grpo"], n=4, lam=0.5)
    assert main(["inspect", "--checkpoint", dirs["rloo"], "--n", "3"]) == 2
    assert "n must be a multiple of 4" in capsys.readouterr().err
