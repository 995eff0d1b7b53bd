"""rlhf_toy.core.kl: the estimators against their formulas, reward shaping, controllers."""

import json
import math

import pytest
import torch

from rlhf_toy.core import AdaptiveKLController, FixedKLController, kl_per_token, shape_rewards


def _random_logprobs(seed, shape=(4, 6)):
    g = torch.Generator().manual_seed(seed)
    logprobs = -3.0 * torch.rand(shape, generator=g, dtype=torch.float64)
    ref_logprobs = -3.0 * torch.rand(shape, generator=g, dtype=torch.float64)
    return logprobs, ref_logprobs


def test_each_estimator_matches_its_formula():
    logp, ref = _random_logprobs(0)
    torch.testing.assert_close(kl_per_token(logp, ref), logp - ref)  # k1 is the default
    torch.testing.assert_close(kl_per_token(logp, ref, "k1"), logp - ref)
    torch.testing.assert_close(kl_per_token(logp, ref, "k2"), 0.5 * (logp - ref) ** 2)
    torch.testing.assert_close(kl_per_token(logp, ref, "k3"),
                               torch.exp(ref - logp) - 1 - (ref - logp))


def test_k2_and_k3_are_nonnegative_and_zero_at_equality():
    logp, ref = _random_logprobs(1, shape=(50, 50))
    assert (kl_per_token(logp, ref, "k3") >= 0).all()
    assert (kl_per_token(logp, ref, "k2") >= 0).all()
    for est in ("k1", "k2", "k3"):
        assert (kl_per_token(logp, logp, est) == 0).all()


def test_unknown_estimator_is_a_value_error_naming_the_choices():
    logp, ref = _random_logprobs(2)
    with pytest.raises(ValueError, match="k1.*k2.*k3"):
        kl_per_token(logp, ref, "k4")
    with pytest.raises(ValueError, match="estimator"):
        shape_rewards(torch.zeros(4), logp, ref, torch.ones(4, 6), 0.1, estimator="abs")


def test_k3_clamps_its_exponent_and_stays_finite():
    logp = torch.tensor([[0.0, -1e4, 0.0]])
    ref = torch.tensor([[-1e4, 0.0, -30.0]])
    kl = kl_per_token(logp, ref, "k3")
    assert torch.isfinite(kl).all()
    # log r = ref - logp: -1e4 -> e^-1e4 - 1 + 1e4; +1e4 clamped to 20 -> e^20 - 1 - 20
    torch.testing.assert_close(kl[0, :2], torch.tensor([1e4 - 1.0, math.exp(20) - 21.0]))


P = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)  # pi (samples come from here)
Q = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64)  # ref
TRUE_KL = (P * (P / Q).log()).sum().item()  # 0.5 ln 1.25 + 0.3 ln 0.75 = 0.025268


def test_k1_and_k3_are_unbiased_exactly():
    """E_{a~p}[k] = sum_a p(a) k(a) = KL(p || q) for k1 and k3 (since sum_a q(a) = 1)."""
    assert TRUE_KL == pytest.approx(0.5 * math.log(1.25) + 0.3 * math.log(0.75))
    for est in ("k1", "k3"):
        k = kl_per_token(P.log()[None], Q.log()[None], est)[0]  # (1, 3) -> (3,)
        assert (P * k).sum().item() == pytest.approx(TRUE_KL, rel=1e-12)


def test_monte_carlo_k3_approximates_true_kl_with_lower_variance_than_k1():
    g = torch.Generator().manual_seed(0)
    actions = torch.multinomial(P, 200_000, replacement=True, generator=g)  # (N,)
    logp, ref = P.log()[actions][None], Q.log()[actions][None]  # (1, N)
    k1, k2, k3 = (kl_per_token(logp, ref, est) for est in ("k1", "k2", "k3"))
    # standard errors: k1 ~ 6e-4, k3 ~ 8e-5 at N = 2e5
    assert k3.mean().item() == pytest.approx(TRUE_KL, abs=5e-4)
    assert k1.mean().item() == pytest.approx(TRUE_KL, abs=3e-3)
    assert k2.mean().item() == pytest.approx(TRUE_KL, rel=0.1)  # biased, but close for p ~ q
    assert k3.var().item() < 0.1 * k1.var().item()


# ---------------------------------------------------------------- reward shaping


def test_shape_rewards_right_and_left_padded():
    """beta = 0.5, k1; rows of lengths 3 and 2; the score lands on the last real token.

    right-padded row 0: mask [1, 1, 1, 0], kl [0.2, -0.4, 0.6, *] ->
        rewards [-0.1, 0.2, -0.3 + 10, 0]
    left-padded row 1: mask [0, 0, 1, 1], kl [*, *, 1.0, 0.2] -> rewards [0, 0, -0.5, -0.1 - 3]
    """
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])
    logprobs = torch.tensor([[-1.0, -1.4, -0.4, 5.0], [9.0, 9.0, -1.0, -2.0]])
    ref_logprobs = torch.tensor([[-1.2, -1.0, -1.0, float("nan")], [float("inf"), 0.0, -2.0, -2.2]])
    scores = torch.tensor([10.0, -3.0])
    rewards = shape_rewards(scores, logprobs, ref_logprobs, mask, beta=0.5)
    expected = torch.tensor([[-0.1, 0.2, 9.7, 0.0], [0.0, 0.0, -0.5, -3.1]])
    torch.testing.assert_close(rewards, expected)
    # bool mask, same result; beta = 0 leaves only the scores
    torch.testing.assert_close(shape_rewards(scores, logprobs, ref_logprobs, mask.bool(), 0.5),
                               expected)
    only_scores = shape_rewards(scores, logprobs, ref_logprobs, mask, beta=0.0)
    torch.testing.assert_close(only_scores, torch.tensor([[0.0, 0, 10, 0], [0, 0, 0, -3]]))


def test_shape_rewards_with_k3_and_an_empty_row():
    logprobs = torch.tensor([[-1.0, -2.0], [-1.0, -1.0]])
    ref_logprobs = torch.tensor([[-2.0, -2.0], [0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    rewards = shape_rewards(torch.tensor([1.0, 5.0]), logprobs, ref_logprobs, mask, 0.1, "k3")
    k3 = math.exp(-1.0) - 1.0 + 1.0  # log r = -1 at token 0; 0 at token 1
    torch.testing.assert_close(rewards, torch.tensor([[-0.1 * k3, 1.0], [0.0, 0.0]]))


def test_shape_rewards_rejects_negative_beta():
    with pytest.raises(ValueError, match="beta"):
        shape_rewards(torch.zeros(1), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), -0.1)


# ---------------------------------------------------------------- controllers


def test_adaptive_controller_moves_beta_by_the_formula():
    """target 6, horizon 10000, 256 samples per step:
    KL 7.5: e = 7.5 / 6 - 1 = 0.25 -> clipped 0.2; beta *= 1 + 0.2 * 0.0256
    KL 4.5: e = -0.25 -> clipped -0.2; beta *= 1 - 0.2 * 0.0256
    KL 6.6: e = 0.1 (inside the clip); beta *= 1 + 0.1 * 0.0256
    """
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert ctl.value == 0.1
    ctl.update(7.5, 256)
    assert ctl.value == pytest.approx(0.1 * 1.00512)
    up = ctl.value
    ctl.update(4.5, 256)
    assert ctl.value == pytest.approx(up * 0.99488)
    assert ctl.value < up
    before = ctl.value
    ctl.update(6.6, 256)
    assert ctl.value == pytest.approx(before * (1 + 0.1 * 0.0256))
    before = ctl.value
    ctl.update(6.0, 256)  # on target: no change
    assert ctl.value == pytest.approx(before)


def test_controllers_state_dict_roundtrip_through_json():
    ctl = AdaptiveKLController(0.2, target=1.0, horizon=100)
    for kl in (3.0, 0.1, 2.0):
        ctl.update(kl, 10)
    state = json.loads(json.dumps(ctl.state_dict()))  # plain floats
    resumed = AdaptiveKLController(0.2, target=1.0, horizon=100)
    resumed.load_state_dict(state)
    assert resumed.value == ctl.value
    ctl.update(5.0, 10)
    resumed.update(5.0, 10)
    assert resumed.value == ctl.value

    fixed = FixedKLController(0.05)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(json.loads(json.dumps(fixed.state_dict())))
    assert other.value == 0.05


def test_controllers_validate_arguments():
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKLController(0.1, target=1.0, horizon=0)
    with pytest.raises(ValueError, match="init_beta"):
        AdaptiveKLController(-0.1, target=1.0, horizon=10)
    with pytest.raises(ValueError, match="beta"):
        FixedKLController(-1.0)
