"""Property tests of rlhf_toy.core (hypothesis): random shapes, masks and paddings.

The invariant checked throughout: whatever sits at padded positions (huge numbers, inf,
NaN) never changes a result at a real position, nor a loss, nor a gradient on real tokens.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_toy.core import (
    discounted_returns,
    dpo_loss,
    entropy_from_logits,
    gae,
    ipo_loss,
    kl_per_token,
    last_token_index,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    ppo_policy_loss,
    ppo_value_loss,
    shape_rewards,
    whiten,
)

FAST = settings(deadline=None, max_examples=50)


class Batch(NamedTuple):
    mask: torch.Tensor  # (B, T) bool
    kind: str  # "right", "left" or "random" padding
    gen: torch.Generator  # seeded by hypothesis, for the tensor contents

    def randn(self, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(self.mask.shape, generator=self.gen, dtype=torch.float64)


@st.composite
def batches(draw, kinds=("right", "left", "random")) -> Batch:
    b, t = draw(st.integers(1, 4)), draw(st.integers(1, 8))
    kind = draw(st.sampled_from(kinds))
    if kind == "random":
        rows = draw(st.lists(st.lists(st.booleans(), min_size=t, max_size=t),
                             min_size=b, max_size=b))
        mask = torch.tensor(rows, dtype=torch.bool).reshape(b, t)
    else:
        lengths = torch.tensor(draw(st.lists(st.integers(0, t), min_size=b, max_size=b)))
        mask = torch.arange(t)[None, :] < lengths[:, None]  # (B, T), right-padded
        if kind == "left":
            mask = mask.flip(-1)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return Batch(mask, kind, gen)


def corrupt(x: torch.Tensor, batch: Batch) -> torch.Tensor:
    """`x` with every padded position replaced by garbage: huge, +-inf or NaN."""
    choices = torch.tensor([1e30, -1e30, float("inf"), float("-inf"), float("nan"), 7.0],
                           dtype=x.dtype)
    garbage = choices[torch.randint(0, 6, x.shape, generator=batch.gen)]  # (B, T)
    return torch.where(batch.mask, x, garbage)


def same_on_real(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> None:
    torch.testing.assert_close(a[mask], b[mask])


@FAST
@given(batches())
def test_masked_stats_and_whiten_ignore_padding(batch):
    x, m = batch.randn(3.0), batch.mask
    bad = corrupt(x, batch)
    for mask in (m, m.double()):
        torch.testing.assert_close(masked_mean(bad, mask), masked_mean(x, mask))
        torch.testing.assert_close(masked_mean(bad, mask, dim=-1), masked_mean(x, mask, dim=-1))
        torch.testing.assert_close(masked_var(bad, mask), masked_var(x, mask))
        for shift in (True, False):
            w = whiten(bad, mask, shift_mean=shift)
            torch.testing.assert_close(w, whiten(x, mask, shift_mean=shift))
            assert torch.isfinite(w).all() and (w[~m] == 0).all()
    if m.any():
        torch.testing.assert_close(masked_mean(x, m), x[m].mean())


@FAST
@given(batches(), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_gae_padding_never_influences_real_steps(batch, gamma, lam):
    rewards, values, m = batch.randn(), batch.randn(), batch.mask
    dones = (torch.rand(m.shape, generator=batch.gen) < 0.3).double()
    adv, ret = gae(rewards, values, dones, gamma, lam, mask=m)
    bad_dones = torch.where(m, dones, torch.ones_like(dones))  # a done in padding is ignored too
    adv2, ret2 = gae(corrupt(rewards, batch), corrupt(values, batch), bad_dones, gamma, lam,
                     mask=m.double())
    torch.testing.assert_close(adv2, adv)
    torch.testing.assert_close(ret2, ret)
    assert (adv[~m] == 0).all() and (ret[~m] == 0).all()
    assert torch.isfinite(adv).all()
    # a padded step is invisible: each row equals its real steps run as one unpadded row
    for b in range(m.shape[0]):
        real = m[b]
        a_row, r_row = gae(rewards[b, real], values[b, real], dones[b, real], gamma, lam)
        torch.testing.assert_close(adv[b, real], a_row)
        torch.testing.assert_close(ret[b, real], r_row)


@FAST
@given(batches(), st.floats(0.0, 1.0))
def test_gae_lam_1_equals_discounted_returns_minus_values(batch, gamma):
    rewards, values = batch.randn(), batch.randn()
    dones = (torch.rand(rewards.shape, generator=batch.gen) < 0.3).double()
    adv, ret = gae(rewards, values, dones, gamma, 1.0)
    g = discounted_returns(rewards, dones, gamma)
    torch.testing.assert_close(adv, g - values)
    torch.testing.assert_close(ret, g)


@FAST
@given(batches(kinds=("right", "left")), st.floats(0.0, 1.0))
def test_discounted_returns_ignore_padding_outside_the_episode(batch, gamma):
    """With done at the last real step, right padding comes after the episode's end and
    left padding before its start: neither reaches a real step's return."""
    m = batch.mask
    rewards = batch.randn()
    dones = F.one_hot(last_token_index(m), m.shape[1]).double() * m  # (B,) -> (B, T)
    g = discounted_returns(rewards, dones, gamma)
    same_on_real(discounted_returns(corrupt(rewards, batch), dones, gamma), g, m)
    # and it is GAE with lam = 1, zero values, and the same mask
    same_on_real(gae(rewards, torch.zeros_like(rewards), dones, gamma, 1.0, mask=m)[1], g, m)


@FAST
@given(batches(), st.floats(0.0, 2.0), st.sampled_from(["k1", "k2", "k3"]))
def test_shape_rewards_padding_never_leaks(batch, beta, estimator):
    m = batch.mask
    scores = torch.randn(m.shape[0], generator=batch.gen, dtype=torch.float64)
    logprobs, ref_logprobs = -batch.randn().abs(), -batch.randn().abs()
    rewards = shape_rewards(scores, logprobs, ref_logprobs, m, beta, estimator)
    bad = shape_rewards(scores, corrupt(logprobs, batch), corrupt(ref_logprobs, batch), m.double(),
                        beta, estimator)
    torch.testing.assert_close(bad, rewards)
    assert (rewards[~m] == 0).all()
    # each non-empty row sums to its score minus beta times its total KL
    kl = kl_per_token(logprobs, ref_logprobs, estimator)
    expected = torch.where(m.any(-1), scores, torch.zeros_like(scores)) - beta * (kl * m).sum(-1)
    torch.testing.assert_close(rewards.sum(-1), expected)


@FAST
@given(batches(), st.floats(0.05, 0.5))
def test_ppo_losses_and_gradients_ignore_padding(batch, clip_range):
    m = batch.mask
    old, advantages, returns = -batch.randn().abs(), batch.randn(), batch.randn()
    logprobs = old + batch.randn(0.3)
    values, old_values = batch.randn(), batch.randn()
    results = []
    for corrupted in (False, True):
        fix = (lambda x: corrupt(x, batch)) if corrupted else (lambda x: x)
        lp = fix(logprobs).clone().requires_grad_()
        v = fix(values).clone().requires_grad_()
        pg, pg_stats = ppo_policy_loss(lp, fix(old), fix(advantages), m, clip_range)
        vf, vf_stats = ppo_value_loss(v, fix(old_values), fix(returns), m.double(), clip_range)
        (pg + vf).backward()
        results.append((pg, vf, pg_stats, vf_stats, lp.grad, v.grad))
    (pg, vf, pg_stats, vf_stats, lp_grad, v_grad), bad = results
    torch.testing.assert_close(bad[0], pg)
    torch.testing.assert_close(bad[1], vf)
    assert bad[2] == pg_stats and bad[3] == vf_stats
    for grad, bad_grad in ((lp_grad, bad[4]), (v_grad, bad[5])):
        torch.testing.assert_close(bad_grad, grad)
        assert (bad_grad[~m] == 0).all()


extreme_logprobs = st.lists(st.floats(-1e4, 0.0), min_size=1, max_size=16)


@FAST
@given(extreme_logprobs, extreme_logprobs)
def test_kl_estimators_finite_for_extreme_logprobs(a, b):
    n = min(len(a), len(b))
    logprobs, ref = torch.tensor([a[:n]]), torch.tensor([b[:n]])  # float32, (1, n)
    for est in ("k1", "k2", "k3"):
        kl = kl_per_token(logprobs, ref, est)
        assert torch.isfinite(kl).all(), est
    assert (kl_per_token(logprobs, ref, "k3") >= 0).all()


@FAST
@given(extreme_logprobs, extreme_logprobs, st.floats(-10.0, 10.0), st.floats(0.01, 1.0))
def test_ppo_losses_finite_for_extreme_logprobs(a, b, advantage, clip_range):
    n = min(len(a), len(b))
    logprobs = torch.tensor([a[:n]], requires_grad=True)  # float32, (1, n)
    old = torch.tensor([b[:n]])
    adv, mask = torch.full((1, n), advantage), torch.ones(1, n)
    loss, stats = ppo_policy_loss(logprobs, old, adv, mask, clip_range)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logprobs.grad).all()
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    values = torch.tensor([a[:n]], requires_grad=True)
    vloss, vstats = ppo_value_loss(values, old, old, mask, clip_range)
    vloss.backward()
    assert torch.isfinite(vloss) and torch.isfinite(values.grad).all()


@FAST
@given(st.lists(st.tuples(*[st.floats(-1e4, 0.0)] * 4), min_size=1, max_size=8),
       st.floats(0.01, 10.0), st.sampled_from([0.0, 0.1, 0.4]))
def test_dpo_loss_finite_for_extreme_logprobs(rows, beta, label_smoothing):
    pc, pr, rc, rr = torch.tensor(rows).T  # (B, 4) -> 4 x (B,)
    pc.requires_grad_()
    losses, c_rew, r_rew = dpo_loss(pc, pr, rc, rr, beta, label_smoothing)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and (losses >= 0).all()
    assert torch.isfinite(pc.grad).all()
    assert torch.isfinite(c_rew).all() and torch.isfinite(r_rew).all()


@FAST
@given(batches(), st.floats(-1e6, 1e6))
def test_whiten_of_a_constant_is_finite(batch, c):
    x = torch.full(batch.mask.shape, c)
    for shift in (True, False):
        assert torch.isfinite(whiten(x, batch.mask, shift_mean=shift)).all()


@FAST
@given(batches(), st.integers(2, 6))
def test_logprobs_and_entropy_ignore_padding_logits(batch, vocab):
    """Garbage logits (huge, inf, NaN) at padded positions change nothing at real positions,
    nor the masked mean the PPO loss takes of the entropy."""
    m = batch.mask
    logits = torch.randn((*m.shape, vocab), generator=batch.gen, dtype=torch.float64)
    tokens = torch.randint(0, vocab, m.shape, generator=batch.gen)
    bad = torch.where(m[..., None], logits, corrupt(torch.zeros(m.shape, dtype=torch.float64),
                                                    batch)[..., None].expand_as(logits))
    same_on_real(logprobs_from_logits(bad, tokens), logprobs_from_logits(logits, tokens), m)
    same_on_real(entropy_from_logits(bad), entropy_from_logits(logits), m)
    torch.testing.assert_close(masked_mean(entropy_from_logits(bad), m),
                               masked_mean(entropy_from_logits(logits), m))


@FAST
@given(st.lists(st.tuples(*[st.floats(-1e4, 0.0)] * 4), min_size=1, max_size=8),
       st.floats(0.01, 10.0))
def test_ipo_loss_finite_for_extreme_logprobs(rows, beta):
    pc, pr, rc, rr = torch.tensor(rows).T  # (B, 4) -> 4 x (B,)
    pc.requires_grad_()
    losses, c_rew, r_rew = ipo_loss(pc, pr, rc, rr, beta)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all()
    assert torch.isfinite(c_rew).all() and torch.isfinite(r_rew).all()


@FAST
@given(batches(), st.sampled_from(["k1", "k2", "k3"]), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_rewards_to_whitened_advantages_finite_for_extreme_logprobs(batch, estimator, gamma,
                                                                    lam):
    """The PPO chain (shape_rewards -> gae -> whiten) stays finite in float32 for log-probs
    anywhere in [-1e4, 0], including a policy and reference that disagree completely."""
    m = batch.mask
    u = torch.rand((2, *m.shape), generator=batch.gen)
    logprobs, ref_logprobs = (-1e4 * u[0]).float(), (-1e4 * u[1]).float()  # (B, T) each
    scores = torch.randn(m.shape[0], generator=batch.gen)
    rewards = shape_rewards(scores, logprobs, ref_logprobs, m.float(), 0.1, estimator)
    dones = F.one_hot(last_token_index(m), m.shape[1]).float() * m  # (B,) -> (B, T)
    advantages, returns = gae(rewards, torch.zeros_like(rewards), dones, gamma, lam, mask=m)
    for x in (rewards, advantages, returns, whiten(advantages, m)):
        assert torch.isfinite(x).all()
