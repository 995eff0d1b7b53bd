"""rlhf_toy.core.losses against hand-computed values and naive implementations."""

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_toy.core import (
    bradley_terry_loss,
    dpo_loss,
    entropy_from_logits,
    ipo_loss,
    kl_per_token,
    logprobs_from_logits,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
)

# ---------------------------------------------------------------- log-prob helpers


def _naive_logprobs(logits, tokens):
    return torch.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def test_logprobs_from_logits_equals_the_naive_gather_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    logits = 5.0 * torch.randn(3, 7, 11, generator=g)
    tokens = torch.randint(0, 11, (3, 7), generator=g)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours, naive = logprobs_from_logits(a, tokens), _naive_logprobs(b, tokens)
    assert ours.shape == (3, 7) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, naive)
    ours.sum().backward()
    naive.sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_logprobs_from_logits_bf16_is_computed_in_float32():
    g = torch.Generator().manual_seed(1)
    logits = (3.0 * torch.randn(2, 5, 50, generator=g)).bfloat16()
    tokens = torch.randint(0, 50, (2, 5), generator=g)
    torch.testing.assert_close(logprobs_from_logits(logits, tokens), _naive_logprobs(logits, tokens))


def test_entropy_from_logits():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 8, generator=g)
    p = logits.softmax(-1)
    torch.testing.assert_close(entropy_from_logits(logits), -(p * p.log()).sum(-1))
    # uniform over V = 8: log 8; a one-hot with -inf elsewhere (top-k masking): 0, not NaN
    assert entropy_from_logits(torch.zeros(1, 1, 8)).item() == pytest.approx(math.log(8))
    one_hot = torch.full((1, 1, 8), float("-inf"))
    one_hot[..., 3] = 0.0
    one_hot.requires_grad_()
    h = entropy_from_logits(one_hot)
    h.sum().backward()
    assert h.item() == 0.0 and torch.isfinite(one_hot.grad).all()


def test_logprob_helpers_match_trl():
    """Parity with TRL's own helpers (slow only because importing trl takes seconds)."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 13, generator=g)
    tokens = torch.randint(0, 13, (2, 4), generator=g)
    torch.testing.assert_close(logprobs_from_logits(logits, tokens),
                               trl_utils.selective_log_softmax(logits, tokens))
    torch.testing.assert_close(entropy_from_logits(logits), trl_utils.entropy_from_logits(logits))


# ---------------------------------------------------------------- PPO policy loss


def test_ppo_policy_loss_at_ratio_one_is_minus_mean_advantage():
    g = torch.Generator().manual_seed(4)
    logprobs = -torch.rand(3, 5, generator=g)
    advantages = torch.randn(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 1, 1]])
    loss, stats = ppo_policy_loss(logprobs, logprobs.clone(), advantages, mask, 0.2)
    assert loss.item() == pytest.approx(-masked_mean(advantages, mask).item(), abs=1e-7)
    assert stats["clip_frac"] == 0.0
    assert stats["approx_kl"] == 0.0
    assert stats["ratio_mean"] == pytest.approx(1.0)
    assert all(isinstance(v, float) for v in stats.values())


# Four real tokens covering both signs of A with the ratio above and below the clip range
# (eps = 0.2), plus one padded token holding garbage.
#   token  A    ratio  -A*ratio  -A*clip(ratio)  max    clipped term active?
#   0      +1   1.5    -1.5      -1.2            -1.2   yes
#   1      +1   0.5    -0.5      -0.8            -0.5   no
#   2      -1   1.5     1.5       1.2             1.5   no
#   3      -1   0.5     0.5       0.8             0.8   yes
# loss = (-1.2 - 0.5 + 1.5 + 0.8) / 4 = 0.15; clip_frac = 2 / 4
# approx_kl = mean((r - 1) - ln r) = (2 * (0.5 - ln 1.5) + 2 * (-0.5 - ln 0.5)) / 4
RATIOS = [1.5, 0.5, 1.5, 0.5, 1.0]
ADVANTAGES = [1.0, 1.0, -1.0, -1.0, float("nan")]
MASK = [1, 1, 1, 1, 0]


def _policy_case():
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, float("inf")]], dtype=torch.float64)
    logprobs = (old + torch.tensor([RATIOS], dtype=torch.float64).log()).requires_grad_()
    return logprobs, old, torch.tensor([ADVANTAGES], dtype=torch.float64), torch.tensor([MASK])


def test_ppo_policy_loss_by_hand_clipping_active_and_inactive():
    logprobs, old, advantages, mask = _policy_case()
    loss, stats = ppo_policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(0.15)
    assert stats["clip_frac"] == pytest.approx(0.5)
    expected_kl = (2 * (0.5 - math.log(1.5)) + 2 * (-0.5 - math.log(0.5))) / 4  # 0.143841
    assert stats["approx_kl"] == pytest.approx(expected_kl)
    assert stats["ratio_mean"] == pytest.approx(1.0)
    assert stats["ratio_max"] == pytest.approx(1.5)
    # a clip range wide enough that nothing clips: (-1.5 - 0.5 + 1.5 + 0.5) / 4 = 0
    wide, wide_stats = ppo_policy_loss(logprobs, old, advantages, mask, clip_range=10.0)
    assert wide.item() == pytest.approx(0.0, abs=1e-12)
    assert wide_stats["clip_frac"] == 0.0


def test_ppo_policy_gradient_is_zero_where_clipping_is_active():
    """d loss / d logp_t = -A_t * ratio_t / n where the unclipped term is the max, else 0:
    tokens 0 and 3 are clipped (0); token 1: -1 * 0.5 / 4 = -0.125; token 2: 1.5 / 4 = 0.375;
    the padded token gets exactly 0 (not NaN, despite its garbage)."""
    logprobs, old, advantages, mask = _policy_case()
    loss, _ = ppo_policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    loss.backward()
    torch.testing.assert_close(logprobs.grad,
                               torch.tensor([[0.0, -0.125, 0.375, 0.0, 0.0]], dtype=torch.float64))


def test_ppo_losses_validate_clip_range():
    x, m = torch.zeros(1, 2), torch.ones(1, 2)
    for bad in (0.0, -0.1):
        with pytest.raises(ValueError, match="clip_range"):
            ppo_policy_loss(x, x, x, m, bad)
        with pytest.raises(ValueError, match="clip_range"):
            ppo_value_loss(x, x, x, m, bad)


# ---------------------------------------------------------------- PPO value loss


def test_ppo_value_loss_by_hand_with_and_without_clipping():
    """old values 0, eps = 0.2:
    token  v     R    (v-R)^2  v_clip  (v_clip-R)^2  max
    0      0.1   1    0.81      0.1    0.81          0.81   (inside the clip range)
    1      0.5   1    0.25      0.2    0.64          0.64   clipped larger
    2      0.5   0    0.25      0.2    0.04          0.25
    3     -0.5  -1    0.25     -0.2    0.64          0.64   clipped larger
    loss = 0.5 * (0.81 + 0.64 + 0.25 + 0.64) / 4 = 0.2925; value_clip_frac = 0.5.
    Without clipping (eps = 10): 0.5 * (0.81 + 0.25 + 0.25 + 0.25) / 4 = 0.195.
    """
    values = torch.tensor([[0.1, 0.5, 0.5, -0.5, 3.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 0.0, 0.0, float("nan")]], dtype=torch.float64)
    returns = torch.tensor([[1.0, 1.0, 0.0, -1.0, float("inf")]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    loss, stats = ppo_value_loss(values, old, returns, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(0.2925)
    assert stats["value_clip_frac"] == pytest.approx(0.5)
    assert stats["value_mean"] == pytest.approx(0.15)
    loss.backward()
    # d/dv of 0.5 * (v - R)^2 / 4 = (v - R) / 4 where the unclipped error is the max
    torch.testing.assert_close(values.grad,
                               torch.tensor([[-0.225, 0.0, 0.125, 0.0, 0.0]], dtype=torch.float64))
    wide, wide_stats = ppo_value_loss(values, old, returns, mask, clip_range=10.0)
    assert wide.item() == pytest.approx(0.195)
    assert wide_stats["value_clip_frac"] == 0.0


def test_ppo_value_loss_clips_around_the_old_values():
    """old values 1, eps = 0.2:
    token  v    R   (v-R)^2  v_clip = 1 + clip(v - 1)  (v_clip-R)^2  max
    0      1.5  2   0.25     1.2                       0.64          0.64  clipped larger
    1      0.9  0   0.81     0.9                       0.81          0.81
    loss = 0.5 * (0.64 + 0.81) / 2 = 0.3625 (clipping around 0 instead would give 1.0125).
    """
    values = torch.tensor([[1.5, 0.9]], dtype=torch.float64)
    old, returns = torch.ones_like(values), torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    loss, stats = ppo_value_loss(values, old, returns, torch.ones_like(values), clip_range=0.2)
    assert loss.item() == pytest.approx(0.3625)
    assert stats["value_clip_frac"] == pytest.approx(0.5)


# ---------------------------------------------------------------- DPO family, Bradley-Terry


def test_dpo_loss_is_log_2_when_policy_equals_reference():
    g = torch.Generator().manual_seed(5)
    chosen, rejected = -10 * torch.rand(6, generator=g), -10 * torch.rand(6, generator=g)
    for ls in (0.0, 0.2):
        losses, c_rew, r_rew = dpo_loss(chosen, rejected, chosen, rejected, beta=0.1,
                                        label_smoothing=ls)
        torch.testing.assert_close(losses, torch.full((6,), math.log(2)))
        assert (c_rew == 0).all() and (r_rew == 0).all()


def test_dpo_loss_by_hand_with_label_smoothing():
    """beta = 0.1; pi_c = -1, pi_r = -3, ref_c = ref_r = -2:
    h = (-1 + 2) - (-3 + 2) = 2, beta * h = 0.2;
    ls = 0:   -log sigmoid(0.2) = log(1 + e^-0.2) = 0.598139
    ls = 0.1: 0.9 * log(1 + e^-0.2) + 0.1 * log(1 + e^0.2) = 0.598139 + 0.1 * 0.2 = 0.618139
    rewards: chosen 0.1 * 1 = 0.1, rejected 0.1 * (-1) = -0.1.
    """
    pc = torch.tensor([-1.0], requires_grad=True)
    pr, rc, rr = torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])
    losses, c_rew, r_rew = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.2)))
    assert losses.item() == pytest.approx(0.598139, abs=1e-6)
    assert c_rew.item() == pytest.approx(0.1) and r_rew.item() == pytest.approx(-0.1)
    assert not c_rew.requires_grad
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.618139, abs=1e-6)
    # gradient (eq. 7's derivative): d/d pi_c = -beta * sigmoid(-beta * h)
    losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.2)))


def test_ipo_loss_by_hand():
    """beta = 0.1: 1 / (2 beta) = 5; h = 2 (as above) -> (2 - 5)^2 = 9; pi = ref -> 25."""
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.0))
    losses, c_rew, r_rew = ipo_loss(pc, pr, rc, rr, beta=0.1)
    assert losses.item() == pytest.approx(9.0)
    assert c_rew.item() == pytest.approx(0.1) and r_rew.item() == pytest.approx(-0.1)
    assert ipo_loss(pc, pr, pc, pr, beta=0.1)[0].item() == pytest.approx(25.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        ipo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)


def test_dpo_and_ipo_validate_arguments():
    x = torch.zeros(2)
    for loss_fn in (dpo_loss, ipo_loss):
        for bad in (0.0, -1.0):
            with pytest.raises(ValueError, match="beta"):
                loss_fn(x, x, x, x, beta=bad)
    for bad in (-0.1, 0.5, 1.0):
        with pytest.raises(ValueError, match=r"label_smoothing.*\[0, 0.5\)"):
            dpo_loss(x, x, x, x, beta=0.1, label_smoothing=bad)


def test_bradley_terry_loss_by_hand():
    """chosen [2, 0], rejected [1, 0]: mean(log(1 + e^-1), log 2) = (0.313262 + 0.693147) / 2."""
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1.0)) + math.log(2)) / 2)
    assert loss.item() == pytest.approx(0.503204, abs=1e-6)
    # the same as DPO with beta = 1 on "log-ratios" equal to the scores
    s = torch.tensor([0.3, -1.2])
    z = torch.zeros(2)
    assert bradley_terry_loss(s, z).item() == pytest.approx(
        dpo_loss(s, z, z, z, beta=1.0)[0].mean().item())
    assert bradley_terry_loss(s, z).item() == pytest.approx(-F.logsigmoid(s).mean().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ppo_stats_in_one_sync_equal_each_statistic_read_alone(dtype):
    """The stats come back from one host sync; each must be exactly the float that reading
    it alone (`masked_mean(...).item()`, the max over real tokens) gives, and a batch
    without real tokens reports ratio_max 1."""
    g = torch.Generator().manual_seed(0)
    logprobs, old = (torch.randn(5, 7, generator=g, dtype=dtype) * 0.3 for _ in range(2))
    values, old_values, returns = (torch.randn(5, 7, generator=g, dtype=dtype) for _ in range(3))
    advantages = torch.randn(5, 7, generator=g, dtype=dtype)
    mask = torch.rand(5, 7, generator=g) < 0.6
    _, stats = ppo_policy_loss(logprobs, old, advantages, mask, 0.1)
    log_ratio = torch.where(mask, logprobs - old, torch.zeros_like(logprobs))
    ratio = log_ratio.exp()
    cut = -advantages * ratio.clamp(0.9, 1.1) > -advantages * ratio
    approx_kl = kl_per_token(torch.zeros_like(log_ratio), log_ratio, "k3")
    assert stats["clip_frac"] == masked_mean(cut.float(), mask).item()
    assert stats["ratio_mean"] == masked_mean(ratio, mask).item()
    assert stats["ratio_max"] == ratio[mask].max().item()
    assert stats["approx_kl"] == masked_mean(approx_kl, mask).item()
    _, vstats = ppo_value_loss(values, old_values, returns, mask, 0.2)
    v_clipped = old_values + (values - old_values).clamp(-0.2, 0.2)
    worse = (v_clipped - returns).pow(2) > (values - returns).pow(2)
    assert vstats["value_clip_frac"] == masked_mean(worse.float(), mask).item()
    assert vstats["value_mean"] == masked_mean(values, mask).item()
    _, empty = ppo_policy_loss(logprobs, old, advantages, torch.zeros_like(mask), 0.1)
    assert empty["ratio_max"] == 1.0 and empty["clip_frac"] == 0.0
