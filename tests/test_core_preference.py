"""rlhf_toy.core: SimPO, the preference-loss registry and the per-token implicit rewards.

Closed forms used below:

SimPO (beta = 2, gamma = 0.5), pi_c = -2 over 2 tokens (avg -1), pi_r = -6 over 3 (avg -2):
    z = beta * (avg_c - avg_r) - gamma = 2 * 1 - 0.5 = 1.5
    loss = -log sigmoid(1.5) = log(1 + e^-1.5)                              = 0.201413
    d loss / d pi_c = -sigmoid(-1.5) * beta / |y_c| = -0.182426 * 1          = -0.182426
    d loss / d pi_r = +sigmoid(-1.5) * beta / |y_r| = 0.182426 * 2 / 3       =  0.121617
    rewards: beta * avg = -2 (chosen), -4 (rejected)
  at equal averages (z = -gamma): loss = softplus(gamma) = log(1 + e^0.5)  = 0.974077

IPO through the registry (per-token averages, as TRL), beta = 0.5 so 1 / (2 beta) = 1:
    pi_c - ref_c = -4 - -6 = 2 over 2 tokens -> +1;  pi_r - ref_r = -9 - -6 = -3 over 3 -> -1
    h = 1 - (-1) = 2;  loss = (2 - 1)^2 = 1
    d loss / d pi_c = 2 (h - 1) / |y_c| = 1 > 0: past the target margin IPO pulls the
        chosen log-prob back down (DPO never does);  d loss / d pi_r = -2 (h - 1) / 3
    at pi = ref: h = 0, loss = (1 / (2 beta))^2 = 1; with beta = 0.25: 4
"""

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_toy.core import (
    PREFERENCE_LOSSES,
    dpo_loss,
    implicit_token_rewards,
    ipo_loss,
    simpo_loss,
)


def _t(*values, grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


# ---------------------------------------------------------------- SimPO


def test_simpo_loss_by_hand_and_its_gradient_direction():
    pc, pr = _t(-2.0, grad=True), _t(-6.0, grad=True)
    losses, c_rew, r_rew = simpo_loss(pc, pr, torch.tensor([2]), torch.tensor([3]), beta=2.0,
                                      simpo_gamma=0.5)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1.5)))
    assert losses.item() == pytest.approx(0.201413, abs=1e-6)
    assert (c_rew.item(), r_rew.item()) == pytest.approx((-2.0, -4.0))
    assert not c_rew.requires_grad
    losses.sum().backward()
    s = 1.0 / (1.0 + math.exp(1.5))  # sigmoid(-1.5) = 0.182426
    assert pc.grad.item() == pytest.approx(-s * 2.0 / 2)  # raise the chosen log-prob
    assert pr.grad.item() == pytest.approx(s * 2.0 / 3)  # lower the rejected one


def test_simpo_loss_at_equal_average_logprobs_is_softplus_gamma():
    """Lengths differ, averages agree: z = -gamma, the loss is softplus(gamma) for any beta."""
    pc, lc, lr = _t(-6.0, -1.0, -12.0), torch.tensor([3, 1, 6]), torch.tensor([2, 3, 1])
    pr = pc / lc * lr  # (-4, -3, -2): the same averages (-2, -1, -2) over other lengths
    for beta, gamma in ((2.0, 0.5), (0.3, 1.4), (8.0, 0.0)):
        losses, c_rew, r_rew = simpo_loss(pc, pr, lc, lr, beta, gamma)
        expected = F.softplus(torch.tensor(gamma, dtype=torch.float64))
        torch.testing.assert_close(losses, expected.expand(3))
        torch.testing.assert_close(c_rew, r_rew)
    assert expected.item() == 0.0 + math.log(2)  # gamma 0: log 2, as DPO at the reference
    assert simpo_loss(pc, pr, lc, lr, 2.0, 0.5)[0][0].item() == pytest.approx(0.974077, abs=1e-6)


def test_simpo_loss_validates_arguments():
    x, n = torch.zeros(2), torch.ones(2)
    with pytest.raises(ValueError, match="beta"):
        simpo_loss(x, x, n, n, beta=0.0, simpo_gamma=0.5)
    with pytest.raises(ValueError, match="simpo_gamma must be >= 0"):
        simpo_loss(x, x, n, n, beta=1.0, simpo_gamma=-0.1)


# ---------------------------------------------------------------- the registry


def test_registry_ipo_is_length_normalized_by_hand():
    pc, pr = _t(-4.0, grad=True), _t(-9.0, grad=True)
    rc, rr, lc, lr = _t(-6.0), _t(-6.0), torch.tensor([2]), torch.tensor([3])
    losses, c_rew, r_rew = PREFERENCE_LOSSES["ipo"](pc, pr, rc, rr, lc, lr, 0.5)
    assert losses.item() == pytest.approx(1.0)
    # the logged rewards are TRL's: beta * summed log-ratio
    assert (c_rew.item(), r_rew.item()) == pytest.approx((1.0, -1.5))
    losses.sum().backward()
    assert pc.grad.item() == pytest.approx(1.0)  # h = 2 > 1: chosen pulled back down
    assert pr.grad.item() == pytest.approx(-2.0 / 3)
    # below the margin it flips: pi_c = -5, pi_r = ref_r: h = 1 / 2 -> 2 (0.5 - 1) / 2 = -0.5
    pc2 = _t(-5.0, grad=True)
    PREFERENCE_LOSSES["ipo"](pc2, _t(-6.0), rc, rr, lc, lr, 0.5)[0].sum().backward()
    assert pc2.grad.item() == pytest.approx(-0.5)


def test_registry_ipo_at_the_reference_is_the_squared_target():
    g = torch.Generator().manual_seed(0)
    logps = -10 * torch.rand(2, 5, generator=g)
    lengths = torch.randint(1, 9, (2, 5), generator=g)
    for beta in (0.25, 0.5, 3.0):
        losses, c_rew, r_rew = PREFERENCE_LOSSES["ipo"](*logps, *logps, *lengths, beta)
        torch.testing.assert_close(losses, torch.full((5,), (1 / (2 * beta)) ** 2))
        assert (c_rew == 0).all() and (r_rew == 0).all()


def test_registry_entries_match_their_core_losses_on_random_pairs():
    """One signature for all: sigmoid is `dpo_loss` (lengths unused), ipo is `ipo_loss` on
    per-token averages, simpo is `simpo_loss` and ignores whatever reference is passed."""
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-8 * torch.rand(6, generator=g) for _ in range(4))
    lc, lr = torch.randint(1, 10, (6,), generator=g), torch.randint(1, 10, (6,), generator=g)
    for ls in (0.0, 0.2):
        ours = PREFERENCE_LOSSES["sigmoid"](pc, pr, rc, rr, lc, lr, 0.3, label_smoothing=ls)
        for a, b in zip(ours, dpo_loss(pc, pr, rc, rr, 0.3, ls), strict=True):
            torch.testing.assert_close(a, b)
    ipo = PREFERENCE_LOSSES["ipo"](pc, pr, rc, rr, lc, lr, 0.3)[0]
    torch.testing.assert_close(ipo, ipo_loss(pc / lc, pr / lr, rc / lc, rr / lr, 0.3)[0])
    simpo = PREFERENCE_LOSSES["simpo"](pc, pr, None, None, lc, lr, 2.0, simpo_gamma=0.7)
    with_ref = PREFERENCE_LOSSES["simpo"](pc, pr, rc, rr, lc, lr, 2.0, simpo_gamma=0.7)
    for a, b, c in zip(simpo, with_ref, simpo_loss(pc, pr, lc, lr, 2.0, 0.7), strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
    # a naive loop over pairs gives the same SimPO losses
    naive = [-math.log(1 / (1 + math.exp(-(2.0 * (pc[i] / lc[i] - pr[i] / lr[i]) - 0.7))))
             for i in range(6)]
    torch.testing.assert_close(simpo[0], torch.tensor(naive, dtype=simpo[0].dtype))


def test_registry_flags_and_extras():
    assert set(PREFERENCE_LOSSES) == {"sigmoid", "ipo", "simpo"}
    assert {k: v.reference_free for k, v in PREFERENCE_LOSSES.items()} == {
        "sigmoid": False, "ipo": False, "simpo": True}
    assert PREFERENCE_LOSSES["sigmoid"].extras == ("label_smoothing",)
    assert PREFERENCE_LOSSES["simpo"].extras == ("simpo_gamma",)
    x, n = torch.zeros(2), torch.ones(2)
    with pytest.raises(TypeError):  # an extra of another loss is not silently ignored
        PREFERENCE_LOSSES["ipo"](x, x, x, x, n, n, 0.1, label_smoothing=0.1)


# ---------------------------------------------------------------- per-token implicit rewards


def test_implicit_token_rewards_by_hand_with_garbage_in_padding():
    """beta = 0.5. Row 0: 2 real tokens, logprobs (-1, -3), ref (-2, -2); row 1: 1 real token.
    sigmoid / ipo: 0.5 * (logp - ref) -> (0.5, -0.5), (0.5 * (-1 - -4) = 1.5)
    simpo: 0.5 / |y| * logp -> (-0.25, -0.75), (0.5 * -1 = -0.5); padding 0, not NaN."""
    nan, inf = float("nan"), float("inf")
    logprobs = torch.tensor([[-1.0, -3.0, nan], [-1.0, inf, nan]])
    ref = torch.tensor([[-2.0, -2.0, inf], [-4.0, nan, 1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    for loss_type in ("sigmoid", "ipo"):
        torch.testing.assert_close(implicit_token_rewards(loss_type, logprobs, ref, mask, 0.5),
                                   torch.tensor([[0.5, -0.5, 0.0], [1.5, 0.0, 0.0]]))
    simpo = torch.tensor([[-0.25, -0.75, 0.0], [-0.5, 0.0, 0.0]])
    torch.testing.assert_close(implicit_token_rewards("simpo", logprobs, None, mask, 0.5), simpo)
    torch.testing.assert_close(implicit_token_rewards("simpo", logprobs, ref, mask, 0.5), simpo)


def test_implicit_token_rewards_sum_to_each_losss_sequence_rewards():
    """Summed over a response's real tokens, the per-token view gives the `chosen_rewards`
    that the registry entry returns for that response (checked against a naive loop too)."""
    g = torch.Generator().manual_seed(2)
    logprobs, ref = -3 * torch.rand(4, 6, generator=g), -3 * torch.rand(4, 6, generator=g)
    lengths = torch.tensor([6, 1, 4, 3])
    mask = (torch.arange(6) < lengths[:, None]).long()
    seq, seq_ref = (logprobs * mask).sum(-1), (ref * mask).sum(-1)
    for loss_type in PREFERENCE_LOSSES:
        per_token = implicit_token_rewards(loss_type, logprobs, ref, mask, 0.7)
        extras = {"simpo_gamma": 0.5} if loss_type == "simpo" else {}
        _, chosen_rewards, _ = PREFERENCE_LOSSES[loss_type](seq, seq, seq_ref, seq_ref, lengths,
                                                            lengths, 0.7, **extras)
        torch.testing.assert_close(per_token.sum(-1), chosen_rewards)
        for b in range(4):
            for t in range(6):
                n = int(lengths[b])
                expected = (0.0 if t >= n else 0.7 * logprobs[b, t].item() / n
                            if loss_type == "simpo" else 0.7 * (logprobs[b, t] - ref[b, t]).item())
                assert per_token[b, t].item() == pytest.approx(expected, abs=1e-6)


def test_implicit_token_rewards_validates_arguments():
    x, m = torch.zeros(1, 2), torch.ones(1, 2)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        implicit_token_rewards("kto", x, x, m, 0.1)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        implicit_token_rewards("sigmoid", x, None, m, 0.1)
