"""rlhf_toy.core.returns against closed forms and naive loops."""

import math

import pytest
import torch

from rlhf_toy.core import discounted_returns, gae, last_token_index, masked_mean, masked_var, whiten

# The 4-step episode used by several tests below: gamma = lam = 0.5, done after step 3.
REWARDS = [1.0, 0.0, 2.0, 1.0]
VALUES = [0.5, 1.0, 0.0, 2.0]
DONES = [0.0, 0.0, 0.0, 1.0]


def t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


# ---------------------------------------------------------------- masked statistics


def test_masked_mean_and_var_equal_stats_of_the_real_elements_only():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 7, generator=g) > 0.4
    x_padded = torch.where(mask, x, torch.full_like(x, 1e9))  # padding must not matter
    real = x[mask]
    for m in (mask, mask.float()):
        assert masked_mean(x_padded, m).item() == pytest.approx(real.mean().item(), rel=1e-12)
        assert masked_var(x_padded, m).item() == pytest.approx(real.var().item(), rel=1e-10)
        assert masked_var(x_padded, m, unbiased=False).item() == pytest.approx(
            real.var(unbiased=False).item(), rel=1e-10)


def test_masked_mean_over_a_dim():
    x = t([[1.0, 2.0, 9.0], [4.0, 9.0, 9.0], [9.0, 9.0, 9.0]])
    mask = t([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    # rows: (1 + 2) / 2, 4 / 1, and 0 for a row without a real element
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), t([1.5, 4.0, 0.0]))
    # columns: (1 + 4) / 2, 2 / 1, nothing
    torch.testing.assert_close(masked_mean(x, mask, dim=0), t([2.5, 2.0, 0.0]))


def test_masked_mean_ignores_inf_and_nan_in_padding():
    x = t([[1.0, float("inf")], [3.0, float("nan")]])
    mask = t([[1, 0], [1, 0]])
    assert masked_mean(x, mask).item() == 2.0


def test_masked_var_with_fewer_than_two_real_elements_is_zero_not_nan():
    x = t([[5.0, -3.0, 7.0]])
    assert masked_var(x, t([[0, 1, 0]])).item() == 0.0  # n = 1, unbiased
    assert masked_var(x, t([[0, 1, 0]]), unbiased=False).item() == 0.0
    assert masked_var(x, t([[0, 0, 0]])).item() == 0.0  # n = 0
    # n = 2: ((5 - 6)^2 + (7 - 6)^2) / (2 - 1) = 2
    assert masked_var(x, t([[1, 0, 1]])).item() == pytest.approx(2.0)


def test_whiten_has_zero_mean_unit_variance_and_zero_padding():
    g = torch.Generator().manual_seed(1)
    x = 3.0 + 2.0 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, :2] = False
    w = whiten(torch.where(mask, x, torch.full_like(x, float("nan"))), mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert masked_var(w, mask).item() == pytest.approx(1.0, rel=1e-6)  # var / (var + 1e-8)
    assert (w[~mask] == 0).all()
    # shift_mean=False keeps the mean and only rescales
    w_keep = whiten(x, mask, shift_mean=False)
    mean, std = masked_mean(x, mask), masked_var(x, mask).sqrt()
    torch.testing.assert_close(w_keep[mask], ((x - mean) / std + mean)[mask], rtol=1e-6, atol=1e-6)


def test_whiten_of_a_constant_is_finite_zero():
    x = torch.full((2, 5), 3.0)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    w = whiten(x, mask)
    assert torch.isfinite(w).all()
    assert (w == 0).all()
    assert torch.allclose(whiten(x, mask, shift_mean=False)[mask.bool()], torch.tensor(3.0))
    # a single real element has no spread either
    assert torch.isfinite(whiten(torch.tensor([[2.0, 8.0]]), torch.tensor([[0, 1]]))).all()


# ---------------------------------------------------------------- last real token


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.long])
def test_last_token_index_left_right_and_empty_rows(dtype):
    mask = torch.tensor([
        [1, 1, 0, 0, 0],  # right-padded -> 1
        [0, 0, 1, 1, 1],  # left-padded -> 4
        [0, 0, 1, 1, 0],  # both -> 3
        [1, 1, 1, 1, 1],  # full -> 4
        [1, 0, 0, 0, 0],  # one token at the start -> 0
        [0, 1, 0, 1, 0],  # holes: the largest real index -> 3
        [0, 0, 0, 0, 0],  # empty: defined as 0
    ], dtype=dtype)
    idx = last_token_index(mask)
    assert idx.dtype == torch.long
    assert idx.tolist() == [1, 4, 3, 4, 0, 3, 0]


# ---------------------------------------------------------------- returns and GAE


def test_discounted_returns_4_step_episode():
    """gamma = 0.5, rewards [1, 0, 2, 1], done after step 3:
    G3 = 1; G2 = 2 + 0.5 * 1 = 2.5; G1 = 0 + 0.5 * 2.5 = 1.25; G0 = 1 + 0.5 * 1.25 = 1.625.
    """
    g = discounted_returns(t([REWARDS]), t([DONES]), 0.5)
    torch.testing.assert_close(g, t([[1.625, 1.25, 2.5, 1.0]]))
    # 1-D input (the tabular code): same numbers, same shape
    g1 = discounted_returns(t(REWARDS), t(DONES), 0.5)
    assert g1.shape == (4,)
    torch.testing.assert_close(g1, t([1.625, 1.25, 2.5, 1.0]))


def test_discounted_returns_accepts_int_rewards_and_bool_dones():
    g = discounted_returns(torch.tensor([1, 0, 2, 1]), torch.tensor([0, 0, 0, 1]).bool(), 0.5)
    assert g.is_floating_point()
    torch.testing.assert_close(g, torch.tensor([1.625, 1.25, 2.5, 1.0]))


def test_gae_4_step_episode_by_hand():
    """gamma = lam = 0.5, rewards [1, 0, 2, 1], values [0.5, 1, 0, 2], done after step 3.

    delta_3 = 1 + 0 - 2 = -1               (done: V_4 not read)
    delta_2 = 2 + 0.5 * 2 - 0 = 3
    delta_1 = 0 + 0.5 * 0 - 1 = -1
    delta_0 = 1 + 0.5 * 1 - 0.5 = 1
    A_3 = -1
    A_2 = 3 + 0.25 * (-1) = 2.75
    A_1 = -1 + 0.25 * 2.75 = -0.3125
    A_0 = 1 + 0.25 * (-0.3125) = 0.921875
    returns = A + V = [1.421875, 0.6875, 2.75, 1.0]
    """
    adv, ret = gae(t([REWARDS]), t([VALUES]), t([DONES]), gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv, t([[0.921875, -0.3125, 2.75, -1.0]]))
    torch.testing.assert_close(ret, t([[1.421875, 0.6875, 2.75, 1.0]]))
    adv1, ret1 = gae(t(REWARDS), t(VALUES), t(DONES), gamma=0.5, lam=0.5)  # (T,) in, (T,) out
    assert adv1.shape == ret1.shape == (4,)
    torch.testing.assert_close(adv1, adv[0])


def _random_episodes(seed, b=5, n=9):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(b, n, generator=g, dtype=torch.float64)
    values = torch.randn(b, n, generator=g, dtype=torch.float64)
    dones = (torch.rand(b, n, generator=g) < 0.3).double()
    return rewards, values, dones


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
def test_gae_lam_1_is_discounted_returns_minus_values(gamma):
    rewards, values, dones = _random_episodes(2)
    adv, ret = gae(rewards, values, dones, gamma, lam=1.0)
    g = discounted_returns(rewards, dones, gamma)
    torch.testing.assert_close(adv, g - values)
    torch.testing.assert_close(ret, g)


def test_gae_lam_0_is_the_one_step_td_error():
    rewards, values, dones = _random_episodes(3)
    gamma = 0.9
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)  # V_{t+1}
    td = rewards + gamma * (1 - dones) * next_values - values
    adv, ret = gae(rewards, values, dones, gamma, lam=0.0)
    torch.testing.assert_close(adv, td)
    torch.testing.assert_close(ret, td + values)


def _naive_gae(rewards, values, dones, gamma, lam):
    """Textbook double loop over rows and time, for one unpadded batch."""
    adv = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        a_next, v_next = 0.0, 0.0
        for k in reversed(range(rewards.shape[1])):
            keep = 1.0 - dones[b, k].item()
            delta = rewards[b, k].item() + gamma * keep * v_next - values[b, k].item()
            a_next = delta + gamma * lam * keep * a_next
            v_next = values[b, k].item()
            adv[b, k] = a_next
    return adv


def test_gae_vectorized_equals_naive_loop():
    rewards, values, dones = _random_episodes(4)
    adv, _ = gae(rewards, values, dones, 0.97, 0.9)
    torch.testing.assert_close(adv, _naive_gae(rewards, values, dones, 0.97, 0.9))


def test_nothing_is_bootstrapped_past_a_done():
    """Two episodes in one row, done after step 1 and step 3; gamma = 0.9, lam = 1.

    Episode 1: G1 = 2, G0 = 1 + 0.9 * 2 = 2.8. Episode 2: G3 = 4, G2 = 3 + 0.9 * 4 = 6.6.
    The second episode's rewards and values never reach the first.
    """
    rewards, dones = t([[1.0, 2.0, 3.0, 4.0]]), t([[0.0, 1.0, 0.0, 1.0]])
    values = t([[0.5, 0.25, 1.0, 2.0]])
    torch.testing.assert_close(discounted_returns(rewards, dones, 0.9), t([[2.8, 2.0, 6.6, 4.0]]))
    adv, ret = gae(rewards, values, dones, 0.9, 1.0)
    torch.testing.assert_close(ret, t([[2.8, 2.0, 6.6, 4.0]]))
    for garbage in (1e6, float("inf"), float("nan")):
        r2, v2 = rewards.clone(), values.clone()
        r2[0, 2:], v2[0, 2:] = garbage, garbage
        torch.testing.assert_close(discounted_returns(r2, dones, 0.9)[0, :2], t([2.8, 2.0]))
        for lam in (0.0, 0.5, 1.0):
            a_ref, _ = gae(rewards, values, dones, 0.9, lam)
            a2, _ = gae(r2, v2, dones, 0.9, lam)
            torch.testing.assert_close(a2[0, :2], a_ref[0, :2])


@pytest.mark.parametrize("left", [False, True])
def test_gae_padding_never_leaks(left):
    """A padded row gives, on its real steps, exactly the numbers of the unpadded episode."""
    n, pad = 4, 3
    real = torch.ones(1, n, dtype=torch.bool)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.bool), real] if left
                     else [real, torch.zeros(1, pad, dtype=torch.bool)], dim=1)

    def padded(x, fill):
        fill = torch.full((1, pad), fill, dtype=torch.float64)
        return torch.cat([fill, t([x])] if left else [t([x]), fill], dim=1)

    a_ref, r_ref = gae(t([REWARDS]), t([VALUES]), t([DONES]), 0.5, 0.5)
    for fill in (0.0, -7.0, float("inf"), float("nan")):
        adv, ret = gae(padded(REWARDS, fill), padded(VALUES, fill), padded(DONES, 1.0),
                       0.5, 0.5, mask=mask)
        torch.testing.assert_close(adv[mask], a_ref[0])
        torch.testing.assert_close(ret[mask], r_ref[0])
        assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_gae_mask_as_in_the_ppo_loop():
    """Right-padded rows with done at the last real token, as train/ppo.py builds them."""
    rewards, values, _ = _random_episodes(5, b=3, n=6)
    mask = t([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    dones = torch.nn.functional.one_hot(last_token_index(mask), 6).double()
    adv, ret = gae(rewards, values, dones, 1.0, 0.95, mask=mask)
    for b, n in enumerate([6, 3, 1]):
        a_row, r_row = gae(rewards[b, :n], values[b, :n], dones[b, :n], 1.0, 0.95)
        torch.testing.assert_close(adv[b, :n], a_row)
        torch.testing.assert_close(ret[b, :n], r_row)
    assert math.isclose(adv[2, 0].item(), rewards[2, 0].item() - values[2, 0].item())


def test_gae_padding_in_the_middle_is_invisible():
    """mask [1, 0, 1], gamma = 0.9, lam = 0.8: the same as the 2-step episode without the hole.
    delta_1 = 2 - 1 = 1 = A_1; delta_0 = 1 + 0.9 * 1 - 0.5 = 1.4; A_0 = 1.4 + 0.72 * 1 = 2.12.
    """
    rewards, values = t([[1.0, 50.0, 2.0]]), t([[0.5, 9.0, 1.0]])
    dones, mask = t([[0.0, 1.0, 1.0]]), t([[1, 0, 1]])
    adv, ret = gae(rewards, values, dones, 0.9, 0.8, mask=mask)
    torch.testing.assert_close(adv, t([[2.12, 0.0, 1.0]]))
    torch.testing.assert_close(ret, t([[2.62, 0.0, 2.0]]))


def _stepwise_gae(rewards, values, dones, gamma, lam, mask):
    """The previous implementation of `gae` (every op inside the loop over time), kept as
    the reference that the TD errors computed all at once must reproduce bit for bit."""
    real = mask.bool()
    r = torch.where(real, rewards, torch.zeros_like(rewards))
    v = torch.where(real, values, torch.zeros_like(values))
    done = dones.bool() & real
    adv = torch.zeros_like(r)
    next_value, running = r.new_zeros(r.shape[0]), r.new_zeros(r.shape[0])
    for k in reversed(range(r.shape[1])):
        keep = ~done[:, k]
        delta = r[:, k] + torch.where(keep, gamma * next_value, 0.0) - v[:, k]
        step = delta + torch.where(keep, gamma * lam * running, 0.0)
        running = torch.where(real[:, k], step, running)
        next_value = torch.where(real[:, k], v[:, k], next_value)
        adv[:, k] = torch.where(real[:, k], running, 0.0)
    return adv, torch.where(real, adv + v, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gae_is_bit_identical_to_the_stepwise_loop_for_any_padding(dtype):
    """Random rewards/values, random dones and random masks (padding at the ends and in the
    middle, empty rows, garbage in padding): exactly equal bits, not just close."""
    g = torch.Generator().manual_seed(0)
    for gamma, lam in ((1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.5, 0.0)):
        for _ in range(20):
            rewards = torch.randn(6, 9, generator=g, dtype=dtype)
            values = torch.randn(6, 9, generator=g, dtype=dtype)
            dones = (torch.rand(6, 9, generator=g) < 0.2).to(dtype)
            mask = torch.rand(6, 9, generator=g) < 0.7
            mask[0] = False  # an empty row
            rewards = torch.where(mask, rewards, torch.full_like(rewards, float("nan")))
            adv, ret = gae(rewards, values, dones, gamma, lam, mask=mask)
            want_adv, want_ret = _stepwise_gae(rewards, values, dones, gamma, lam, mask)
            assert torch.equal(adv, want_adv) and torch.equal(ret, want_ret)
