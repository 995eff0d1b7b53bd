"""The real trainers against the exact optimum on an enumerable task (rlhf_toy.bridge).

Closed forms (Rafailov et al. 2023, eqs. 3-4): J(pi) = E_pi[r] - beta KL(pi || pi_ref) is
maximized by pi* = pi_ref exp(r / beta) / Z with J* = beta log Z, and for every pi

    J* - J(pi) = beta KL(pi || pi*)  >= 0.

The population DPO loss (pairs from pi_ref, Bradley-Terry labels sigmoid(r1 - r2)) is
log 2 at pi_ref and smallest at pi*.
"""

import importlib.util
import json
import math
import os

import pytest
import torch

from rlhf_toy.bridge import (
    BridgeConfig,
    exact_mdp,
    fit_reference,
    make_task,
    response_probs,
    run_bridge,
)
from rlhf_toy.rollout import sample

TINY = {"sft_steps": 20, "ppo_steps": 2, "dpo_steps": 2, "dpo_pairs": 64}
TRAINED = ("ppo", "dpo")


@pytest.fixture(scope="module")
def result():
    """The default run (about 10 s): the numbers the README quotes."""
    return run_bridge(BridgeConfig())


@pytest.fixture
def one_thread():
    """As `run_bridge` does: tiny models on a busy machine are far faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_exact_enumeration_of_every_policy_sums_to_one(result):
    for name, row in result["policies"].items():
        assert row["total_prob"] == pytest.approx(1.0, abs=1e-9), name
    assert result["n_responses"] >= 39  # 3 + 9 + 27 task responses (+ EOS first, if any mass)


def test_enumeration_matches_the_log_probs_of_sampled_responses(one_thread):
    """pi(y) read off the prefix table equals exp(sum of `sample`'s per-token log-probs)."""
    task = make_task(BridgeConfig())
    model = fit_reference(task, BridgeConfig(sft_steps=20))
    probs = response_probs(model, task, exact_mdp(model, task))
    prompt_ids = torch.full((256, 1), task.prompt[0])
    s = sample(model, prompt_ids, torch.ones_like(prompt_ids), task.max_len, task.eos_id,
               task.tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0))
    for ids, mask, logprobs in zip(s.response_ids.tolist(), s.mask, s.logprobs, strict=True):
        y = tuple(ids[: int(mask.sum())])
        assert math.log(probs[y]) == pytest.approx(float(logprobs.sum()), abs=1e-5)


def test_reference_starts_with_a_clearly_positive_gap(result):
    ref = result["policies"]["reference"]
    assert ref["gap"] > 0.2 and ref["kl_to_optimum"] > 0.4
    assert ref["kl_to_ref"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("method", TRAINED)
def test_trainers_close_most_of_the_gap(result, method):
    """The README's claim: each trainer closes 92-95 % of the reference's gap (seed 0: PPO
    92.2 %, DPO 95.4 %; seeds 1 and 2: PPO 95 % / 93 %, DPO 92.5 % / 87 %)."""
    ref, row = result["policies"]["reference"], result["policies"][method]
    assert row["gap"] < 0.10 * ref["gap"]
    assert row["kl_to_optimum"] < 0.10 * ref["kl_to_optimum"]
    assert row["expected_reward"] > ref["expected_reward"] + 0.3
    assert result["curves"][method][-1] == pytest.approx(row["gap"], abs=1e-12)


def test_optimum_bounds_every_policy_and_gap_is_beta_kl(result):
    beta = result["config"]["beta"]
    for name, row in result["policies"].items():
        assert row["J"] <= result["j_star"] + 1e-9, name
        assert row["gap"] == pytest.approx(beta * row["kl_to_optimum"], abs=1e-9), name
    assert result["policies"]["optimum"]["gap"] == pytest.approx(0.0, abs=1e-9)


def test_population_dpo_loss_is_log2_at_the_reference_and_least_at_the_optimum(result):
    losses = {name: row["dpo_population_loss"] for name, row in result["policies"].items()}
    assert losses["reference"] == pytest.approx(math.log(2), abs=1e-9)
    assert all(losses["optimum"] < losses[name] for name in ("reference", *TRAINED))


def test_same_seed_same_numbers_and_the_script_writes_them(tmp_path):
    first = run_bridge(BridgeConfig(**TINY))
    spec = importlib.util.spec_from_file_location(
        "bridge_script", os.path.join(os.path.dirname(__file__), "..", "scripts", "bridge.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = str(tmp_path / "summary.json")
    script.main([f"--{k}={v}" for k, v in TINY.items()] + ["--out", out])
    with open(out) as fh:
        second = json.load(fh)
    for key in ("j_star", "policies", "curves"):
        assert second[key] == first[key]
