"""`rlhf-toy inspect` on real tiny PPO and DPO checkpoints: every row obeys the token MDP.

The identities, checked against naive per-token loops written out here (not `core`):
    kl[t]        = d  (k1),  d^2 / 2  (k2),  e^-d - 1 + d  (k3),   d = logprob - ref_logprob
    reward[t]    = -beta * kl[t],  plus the score on the last token
    advantage[t] = delta_t + gamma * lam * advantage[t+1]
    delta_t      = reward[t] + gamma * value[t+1] - value[t]   (0 after the last token)
    return[t]    = advantage[t] + value[t]
lam = 0 makes advantage[t] = delta_t; lam = 1 makes return[t] = sum_{k>=t} gamma^(k-t) reward[k].
"""

import json
import math
import os

import pytest
from conftest import run_stage

from rlhf_toy.cli import main
from rlhf_toy.config import parse_config
from rlhf_toy.errors import UsageError
from rlhf_toy.inspect import COLUMNS, inspect_samples, render_terminal
from rlhf_toy.train.ppo import PPOConfig

# the tiny PPO run uses settings that differ from every default, so inspect must read them
BETA, GAMMA, LAM, ESTIMATOR = 0.1, 0.97, 0.9, "k3"
ATOL = 2e-5


@pytest.fixture(scope="module")
def ppo_dir(tiny_run, tmp_path_factory):
    """Two PPO iterations with a snapshot at each (inspect_steps 1)."""
    root, _ = tiny_run
    out = str(tmp_path_factory.mktemp("inspect") / "ppo")
    run_stage("ppo", root, "--output_dir", out, "--max_steps", "2", "--batch_size", "8",
              "--mini_batch_size", "8", "--ppo_epochs", "2", "--n_eval_prompts", "8",
              "--beta", str(BETA), "--gamma", str(GAMMA), "--lam", str(LAM),
              "--kl_estimator", ESTIMATOR, "--inspect_steps", "1", "--adaptive_kl", "false")
    return out


@pytest.fixture(scope="module")
def dpo_dir(tiny_run, tmp_path_factory):
    root, _ = tiny_run
    out = str(tmp_path_factory.mktemp("inspect") / "dpo")
    run_stage("dpo", root, "--output_dir", out, "--max_steps", "3", "--batch_size", "16",
              "--eval_steps", "0", "--n_eval_prompts", "8", "--beta", "0.3")
    return out


@pytest.fixture(scope="module")
def ppo_report(ppo_dir):
    return inspect_samples(ppo_dir, n=8, seed=0)


def naive_kl(logprob: float, ref: float, estimator: str) -> float:
    log_r = ref - logprob
    return {"k1": -log_r, "k2": 0.5 * log_r ** 2, "k3": math.exp(log_r) - 1 - log_r}[estimator]


def naive_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    advantages, running, next_value = [0.0] * len(rewards), 0.0, 0.0
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t], next_value = running, values[t]
    return advantages


def assert_token_mdp(report: dict) -> None:
    """Every identity of the module docstring, on every row of every sample."""
    beta, gamma, lam, est = (report[k] for k in ("beta", "gamma", "lam", "kl_estimator"))
    for s in report["samples"]:
        n = len(s["token"])
        assert n >= 1 and all(len(s[c]) == n for c in COLUMNS)
        words = s["response"].split()
        assert s["token"][: len(words)] == words and n - len(words) in (0, 1)  # EOS or cut
        assert all(lp <= 0 for lp in s["logprob"] + s["ref_logprob"])
        pairs = zip(s["logprob"], s["ref_logprob"], strict=True)
        kl = [naive_kl(lp, ref, est) for lp, ref in pairs]
        assert s["kl"] == pytest.approx(kl, abs=ATOL)
        reward = [-beta * k for k in s["kl"]]
        reward[-1] += s["score"]
        assert s["reward"] == pytest.approx(reward, abs=ATOL)
        assert s["advantage"] == pytest.approx(naive_gae(s["reward"], s["value"], gamma, lam),
                                               abs=ATOL)
        pairs = zip(s["advantage"], s["value"], strict=True)
        assert s["return"] == pytest.approx([a + v for a, v in pairs], abs=ATOL)


def test_ppo_rows_follow_the_token_mdp_with_the_runs_own_constants(ppo_report):
    r = ppo_report
    assert (r["stage"], r["beta"], r["gamma"], r["lam"], r["kl_estimator"]) == (
        "ppo", BETA, GAMMA, LAM, ESTIMATOR)
    assert len(r["samples"]) == 8
    assert_token_mdp(r)
    # 2 prompts x 4 completions: score = rm_score minus its prompt's mean rm_score
    for group in (r["samples"][:4], r["samples"][4:]):
        assert len({s["prompt"] for s in group}) == 1
        mean_rm = sum(s["rm_score"] for s in group) / 4
        assert [s["score"] for s in group] == pytest.approx([s["rm_score"] - mean_rm
                                                             for s in group], abs=1e-5)
    # the trained value head was loaded (a fresh one outputs exactly 0) ...
    assert any(abs(v) > 1e-4 for s in r["samples"] for v in s["value"])
    # ... and the advantages are raw: whitened ones would have mean 0 and variance 1
    adv = [a for s in r["samples"] for a in s["advantage"]]
    mean = sum(adv) / len(adv)
    assert abs(sum((a - mean) ** 2 for a in adv) / len(adv) - 1.0) > 0.05


def test_lam_zero_and_one_change_only_the_advantages(ppo_dir, ppo_report):
    """Same seed, same responses: lam 0 gives one-step TD errors, lam 1 Monte-Carlo returns."""
    td = inspect_samples(ppo_dir, n=8, seed=0, lam=0.0)
    mc = inspect_samples(ppo_dir, n=8, seed=0, lam=1.0)
    for base, s0, s1 in zip(ppo_report["samples"], td["samples"], mc["samples"], strict=True):
        for c in ("token", "logprob", "reward", "value"):
            assert s0[c] == s1[c] == base[c]
        v, r = s0["value"] + [0.0], s0["reward"]
        assert s0["advantage"] == pytest.approx(
            [r[t] + GAMMA * v[t + 1] - v[t] for t in range(len(r))], abs=ATOL)
        assert s1["return"] == pytest.approx(
            [sum(GAMMA ** (k - t) * r[k] for k in range(t, len(r))) for t in range(len(r))],
            abs=ATOL)
    assert td["lam"] == 0.0 and mc["lam"] == 1.0
    assert_token_mdp(td)
    assert_token_mdp(mc)
    assert any(s0["advantage"] != pytest.approx(s1["advantage"], abs=1e-3)
               for s0, s1 in zip(td["samples"], mc["samples"], strict=True))


def test_prompt_option_answers_the_given_prompt(ppo_dir):
    r = inspect_samples(ppo_dir, n=4, prompt="the movie was", seed=1, kl_estimator="k1")
    assert [s["prompt"] for s in r["samples"]] == ["the movie was"] * 4
    assert r["kl_estimator"] == "k1"
    assert_token_mdp(r)
    with pytest.raises(UsageError, match="prompt must be words of the 'sentiment' task"):
        inspect_samples(ppo_dir, n=4, prompt="the movie was xyzzy")


def test_training_snapshots_hold_the_update_rollouts(ppo_dir):
    snaps = []
    for step in (1, 2):
        with open(os.path.join(ppo_dir, "inspect", f"step_{step}.json")) as fh:
            snaps.append(json.load(fh))
        assert snaps[-1]["step"] == step and len(snaps[-1]["samples"]) == 4
        assert (snaps[-1]["beta"], snaps[-1]["gamma"], snaps[-1]["lam"],
                snaps[-1]["kl_estimator"]) == (BETA, GAMMA, LAM, ESTIMATOR)
        assert_token_mdp(snaps[-1])
    # iteration 1 samples before any update: policy = reference, fresh value head = 0, so
    # every reward is 0 but the last (the score) and advantage[t] = (gamma lam)^(T-1-t) score
    for s in snaps[0]["samples"]:
        assert s["logprob"] == pytest.approx(s["ref_logprob"], abs=1e-5)
        assert s["value"] == [0.0] * len(s["token"])
        n = len(s["token"])
        assert s["advantage"] == pytest.approx(
            [(GAMMA * LAM) ** (n - 1 - t) * s["score"] for t in range(n)], abs=ATOL)
    # iteration 2 samples after one update: the critic has moved
    assert any(v != 0.0 for s in snaps[1]["samples"] for v in s["value"])


def test_dpo_reward_is_the_implicit_per_token_reward(dpo_dir, capsys):
    r = inspect_samples(dpo_dir, n=4, seed=0)
    assert (r["stage"], r["beta"], r["gamma"], r["lam"], r["kl_estimator"]) == (
        "dpo", 0.3, None, None, "k1")
    for s in r["samples"]:
        assert s["value"] is s["return"] is s["advantage"] is None
        assert all(lp <= 0 for lp in s["logprob"])
        pairs = zip(s["logprob"], s["ref_logprob"], strict=True)
        assert s["kl"] == pytest.approx([a - b for a, b in pairs], abs=ATOL)
        assert s["reward"] == pytest.approx([0.3 * k for k in s["kl"]], abs=ATOL)
        assert len(s["token"]) == len(s["logprob"]) == len(s["reward"])
    # the policy moved away from the reference in 3 steps
    assert any(abs(k) > 1e-3 for s in r["samples"] for k in s["kl"])
    render_terminal(r)
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.lstrip().startswith("token"))
    assert "no critic" in out and header.split() == ["token", "logprob", "ref_logprob", "kl",
                                                     "reward"]
    with pytest.raises(UsageError, match="lam applies to checkpoints of ppo only"):
        inspect_samples(dpo_dir, n=1, lam=0.5)


def test_cli_prints_tables_and_writes_json_html_png(ppo_dir, tmp_path, capsys):
    files = {k: str(tmp_path / "views" / f"out.{k}") for k in ("json", "html", "png")}
    argv = ["inspect", "--checkpoint", ppo_dir, "--n", "4", "--seed", "3"]
    assert main(argv + [arg for k, f in files.items() for arg in (f"--{k}", f)]) == 0
    out = capsys.readouterr().out
    with open(files["json"]) as fh:
        report = json.load(fh)
    # the JSON round-trips: the Python API gives the very same report
    assert report == inspect_samples(ppo_dir, n=4, seed=3)
    assert_token_mdp(report)
    for column in COLUMNS:
        assert column in out
    for s in report["samples"]:
        assert f"score={s['score']:+.3f}" in out and f"gold={s['gold']:.3f}" in out
        assert f"{s['advantage'][-1]:+.3f}" in out
    assert "[inspect] stage=ppo  samples=4" in out
    page = open(files["html"]).read()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "http" not in page
    assert page.count('class="tok"') == sum(len(s["token"]) for s in report["samples"])
    assert f"<td>{report['samples'][0]['advantage'][0]:+.4f}</td>" in page  # its hover row
    with open(files["png"], "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(files["png"]) > 10_000


@pytest.mark.parametrize(("argv", "message"), [
    (["--checkpoint", "/nonexistent/run"], "checkpoint '/nonexistent/run' does not exist"),
    (["--n", "0"], "n must be > 0"),
    (["--lam", "1.5"], "lam must be in [0, 1]"),
    (["--kl_estimator", "k7"], "kl_estimator must be k1, k2 or k3"),
])
def test_bad_input_exits_2_with_one_line(ppo_dir, argv, message, capsys):
    argv = ["inspect", "--checkpoint", ppo_dir, *argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_a_checkpoint_that_is_neither_ppo_nor_dpo(tiny_run, capsys):
    root, _ = tiny_run
    assert main(["inspect", "--checkpoint", os.path.join(root, "sft")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"rlhf-toy: error: checkpoint {os.path.join(root, 'sft')!r} holds a 'sft' "
                   "run; give a run directory of ppo, grpo, rloo, reinforce_pp, dpo, ipo, simpo"]


def test_ppo_config_accepts_inspect_steps():
    assert parse_config(PPOConfig, ["--inspect_steps", "5"]).inspect_steps == 5
    with pytest.raises(UsageError, match="inspect_steps must be >= 0"):
        parse_config(PPOConfig, ["--inspect_steps", "-1"])
