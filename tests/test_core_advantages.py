"""Critic-free advantages and losses (GRPO, RLOO, REINFORCE++): closed forms, naive loops,
and TRL 1.16's own loss code on the same tensors."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from rlhf_toy.core import (
    center_scores,
    discounted_returns,
    group_advantages,
    grpo_policy_loss,
    kl_per_token,
    ppo_policy_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    rloo_policy_loss,
    whiten,
)

# ---------------------------------------------------------------- advantages


def test_group_advantages_closed_form():
    """Two prompts, G = 3. Group [1, 2, 3]: mean 2, unbiased std 1, so A = [-1, 0, 1]
    (up to eps). Group [0, 0, 6]: mean 2, std sqrt((4 + 4 + 16) / 2) = sqrt(12),
    A = [-2, -2, 4] / sqrt(12)."""
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    adv = group_advantages(scores, 3, eps=0.0)
    s12 = 12 ** 0.5
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, -2 / s12, -2 / s12, 4 / s12]))
    # eps enters the denominator: std + eps
    torch.testing.assert_close(group_advantages(scores, 3, eps=1.0)[:3],
                               torch.tensor([-0.5, 0.0, 0.5]))
    # scale=False only centres (Dr. GRPO)
    torch.testing.assert_close(group_advantages(scores, 3, scale=False),
                               torch.tensor([-1.0, 0.0, 1.0, -2.0, -2.0, 4.0]))


def test_group_advantages_of_equal_rewards_are_zero_and_bad_groups_raise():
    assert torch.equal(group_advantages(torch.full((4,), 0.7), 2), torch.zeros(4))
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        group_advantages(torch.ones(4), 1)
    with pytest.raises(ValueError, match="multiple of group_size=3"):
        group_advantages(torch.ones(4), 3)


def test_group_advantages_match_trl_grpo_on_the_same_scores():
    """TRL's GRPOTrainer (scale_rewards="group"): (r - group mean) / (nanstd + 1e-4)."""
    from trl.trainer.utils import nanstd

    scores = torch.randn(12, generator=torch.Generator().manual_seed(0))
    grouped = scores.view(-1, 4)
    mean = grouped.mean(1).repeat_interleave(4)
    std = nanstd(grouped, dim=1).repeat_interleave(4)
    torch.testing.assert_close(group_advantages(scores, 4), (scores - mean) / (std + 1e-4))


def test_center_scores_subtracts_the_batch_or_each_prompts_mean():
    """[1, 3, 10, 14]: batch mean 7 -> [-6, -4, 3, 7]; two prompts of G = 2, means 2 and 12
    -> [-1, 1, -2, 2]. A per-prompt offset (what a pairwise reward model cannot know)
    disappears with G = 2 but not with the batch mean."""
    scores = torch.tensor([1.0, 3.0, 10.0, 14.0])
    torch.testing.assert_close(center_scores(scores), torch.tensor([-6.0, -4.0, 3.0, 7.0]))
    torch.testing.assert_close(center_scores(scores, 2), torch.tensor([-1.0, 1.0, -2.0, 2.0]))
    offset = torch.tensor([5.0, 5.0, -3.0, -3.0])
    torch.testing.assert_close(center_scores(scores + offset, 2), center_scores(scores, 2))
    assert not torch.allclose(center_scores(scores + offset), center_scores(scores))
    with pytest.raises(ValueError, match="multiple of group_size=3"):
        center_scores(scores, 3)


def test_rloo_advantages_closed_form_and_naive_loop():
    """Group [1, 2, 6]: baselines (2 + 6) / 2 = 4, (1 + 6) / 2 = 3.5, (1 + 2) / 2 = 1.5,
    so A = [-3, -1.5, 4.5] = 3/2 * (r - mean 3)."""
    scores = torch.tensor([1.0, 2.0, 6.0])
    torch.testing.assert_close(rloo_advantages(scores, 3), torch.tensor([-3.0, -1.5, 4.5]))
    r = torch.randn(20, generator=torch.Generator().manual_seed(1))
    naive = torch.tensor([r[i] - (sum(r[j] for j in range(g, g + 5) if j != i) / 4)
                          for g in range(0, 20, 5) for i in range(g, g + 5)])
    torch.testing.assert_close(rloo_advantages(r, 5), naive)
    # and each group's advantages sum to 0
    torch.testing.assert_close(rloo_advantages(r, 5).view(4, 5).sum(1), torch.zeros(4),
                               atol=1e-5, rtol=0)


def test_reinforce_pp_advantages_closed_form():
    """One response of 3 tokens, one of 2 (then padding), beta = 0.5, k1 KL [0.2, 0, -0.2] and
    [0.4, 0.4]; scores 1 and 0. Rewards: [-0.1, 0, 0.1 + 1] and [-0.2, -0.2 + 0];
    returns-to-go (gamma 1): [1.0, 1.1, 1.1] and [-0.4, -0.2]; advantages whiten those 5."""
    logprobs = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -5.0]])
    ref = torch.tensor([[-1.2, -1.0, -0.8], [-1.4, -1.4, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, returns, adv = reinforce_pp_advantages(torch.tensor([1.0, 0.0]), logprobs, ref,
                                                    mask, beta=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.1, 0.0, 1.1], [-0.2, -0.2, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.1, 1.1], [-0.4, -0.2, 0.0]]))
    real = torch.tensor([1.0, 1.1, 1.1, -0.4, -0.2])
    expected = (real - real.mean()) / real.std()
    torch.testing.assert_close(adv[mask.bool()], expected, atol=1e-4, rtol=0)
    assert adv[1, 2] == 0.0
    # gamma < 1 discounts: G_0 = -0.1 + 0.5 * 0 + 0.25 * 1.1
    _, returns, _ = reinforce_pp_advantages(torch.tensor([1.0, 0.0]), logprobs, ref, mask,
                                            beta=0.5, gamma=0.5)
    assert returns[0, 0].item() == pytest.approx(-0.1 + 0.25 * 1.1)


def test_reinforce_pp_advantages_equal_whitened_discounted_returns_on_random_batches():
    g = torch.Generator().manual_seed(2)
    logprobs, ref = -torch.rand(6, 9, generator=g), -torch.rand(6, 9, generator=g)
    lengths = torch.randint(1, 10, (6,), generator=g)
    mask = (torch.arange(9)[None] < lengths[:, None]).float()
    scores = torch.randn(6, generator=g)
    rewards, returns, adv = reinforce_pp_advantages(scores, logprobs, ref, mask, 0.1, 0.9, "k3")
    dones = torch.zeros(6, 9)
    dones[torch.arange(6), lengths - 1] = 1
    torch.testing.assert_close(returns, discounted_returns(rewards, dones, 0.9) * mask)
    torch.testing.assert_close(adv, whiten(returns, mask))
    kl = kl_per_token(logprobs, ref, "k3")
    torch.testing.assert_close(rewards.sum(-1), scores - 0.1 * (kl * mask).sum(-1))


# ---------------------------------------------------------------- losses: closed forms


def test_grpo_loss_at_ratio_one_and_reference_policy_is_minus_mean_advantage():
    """pi = pi_old = ref: ratio 1 and k3 = 0, so the loss is -mean_i A_i (each completion's
    token mean of A_i is A_i) whatever the lengths and beta."""
    logprobs = -torch.rand(3, 5, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    adv = torch.tensor([1.0, -2.0, 4.0])
    loss, stats = grpo_policy_loss(logprobs, logprobs, logprobs, adv, mask, 0.2, beta=0.3)
    assert loss.item() == pytest.approx(-1.0)
    assert stats["clip_frac"] == 0.0 and stats["kl_ref"] == 0.0


def test_grpo_loss_weights_tokens_per_completion_and_adds_beta_k3():
    """Two completions of 1 and 3 tokens, A = [1, 0], ratio 1 everywhere, log r = ref - logp
    = -1 on completion 1's token, 0 elsewhere: k3 = e^-1 - 1 + 1 = e^-1 there.
    Per-completion means: (-1 + beta e^-1) / 1 and 0 / 3, so loss = (-1 + beta e^-1) / 2."""
    logprobs = torch.zeros(2, 3)
    ref = torch.tensor([[-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    loss, _ = grpo_policy_loss(logprobs, logprobs, ref, torch.tensor([1.0, 0.0]), mask, 0.2, 0.5)
    assert loss.item() == pytest.approx((-1 + 0.5 * torch.e ** -1) / 2)


def test_grpo_loss_with_beta_zero_and_equal_lengths_is_ppo_loss():
    """All completions of the same length: the mean of per-completion means is the token mean,
    so GRPO (beta 0) is the PPO surrogate with A_i broadcast to every token."""
    g = torch.Generator().manual_seed(3)
    logprobs, old = -torch.rand(4, 6, generator=g), -torch.rand(4, 6, generator=g)
    adv, mask = torch.randn(4, generator=g), torch.ones(4, 6)
    grpo, grpo_stats = grpo_policy_loss(logprobs, old, old, adv, mask, 0.2, 0.0)
    ppo, ppo_stats = ppo_policy_loss(logprobs, old, adv[:, None].expand(4, 6), mask, 0.2)
    torch.testing.assert_close(grpo, ppo)
    assert grpo_stats["clip_frac"] == ppo_stats["clip_frac"] > 0


def test_rloo_loss_is_clipped_on_the_sequence_ratio():
    """Completion 1: log-ratios 0.1 + 0.2 = 0.3, ratio e^0.3 = 1.35 > 1.2, A = 2 > 0: clipped,
    -2 * 1.2. Completion 2: log-ratio -0.5 (its padded token ignored), ratio 0.61, A = 1:
    unclipped wins the max, -0.61. Loss = mean of the two."""
    old = torch.zeros(2, 2)
    logprobs = torch.tensor([[0.1, 0.2], [-0.5, 7.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, stats = rloo_policy_loss(logprobs, old, torch.tensor([2.0, 1.0]), mask, 0.2)
    r2 = torch.exp(torch.tensor(-0.5)).item()
    assert loss.item() == pytest.approx((-2 * 1.2 - r2) / 2, rel=1e-6)
    assert stats["clip_frac"] == 0.5


# ---------------------------------------------------------------- parity with TRL's own code


class _OneProcess:
    """What TRL's loss code asks of its `Accelerator` on one process."""

    num_processes, process_index, sync_gradients = 1, 0, True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def _trl_trainer_stub(logprobs: torch.Tensor, **attrs) -> SimpleNamespace:
    """The attributes TRL's `_compute_loss` reads, its forward pass returning `logprobs`."""
    return SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_OneProcess(), aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)}, epsilon_low=0.2, epsilon_high=0.2,
        _get_per_token_logps_and_entropies=lambda *a, **k: (logprobs, torch.zeros_like(logprobs),
                                                            None),
        **attrs)


def _fixed_batch():
    g = torch.Generator().manual_seed(7)
    b, t = 6, 5
    old = -torch.rand(b, t, generator=g) * 2
    logprobs = old + 0.3 * torch.randn(b, t, generator=g)  # some ratios outside [0.8, 1.2]
    ref = old + 0.2 * torch.randn(b, t, generator=g)
    lengths = torch.tensor([5, 3, 1, 4, 5, 2])
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    inputs = {"prompt_ids": torch.zeros(b, 2, dtype=torch.long),
              "prompt_mask": torch.ones(b, 2, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask}
    return logprobs, old, ref, mask, inputs


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_and_gradient_match_trl_grpo_trainer(beta):
    from trl import GRPOTrainer

    logprobs, old, ref, mask, inputs = _fixed_batch()
    adv = group_advantages(torch.randn(6, generator=torch.Generator().manual_seed(8)), 3)
    ours_lp, trl_lp = logprobs.clone().requires_grad_(), logprobs.clone().requires_grad_()
    stub = _trl_trainer_stub(
        trl_lp, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type="grpo", use_vllm=False,
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None))
    trl_loss = GRPOTrainer._compute_loss(stub, None, {**inputs, "advantages": adv,
                                                      "old_per_token_logps": old,
                                                      "ref_per_token_logps": ref})
    ours, stats = grpo_policy_loss(ours_lp, old, ref, adv, mask, 0.2, beta)
    torch.testing.assert_close(ours, trl_loss)
    assert stats["clip_frac"] > 0
    ours.backward()
    trl_loss.backward()
    torch.testing.assert_close(ours_lp.grad, trl_lp.grad)


def test_rloo_loss_and_gradient_match_trl_rloo_trainer():
    from trl import RLOOTrainer

    logprobs, old, _, mask, inputs = _fixed_batch()
    adv = rloo_advantages(torch.randn(6, generator=torch.Generator().manual_seed(9)), 2)
    ours_lp, trl_lp = logprobs.clone().requires_grad_(), logprobs.clone().requires_grad_()
    stub = _trl_trainer_stub(trl_lp)
    trl_loss = RLOOTrainer._compute_loss(stub, None, {**inputs, "advantages": adv,
                                                      "old_logps": (old * mask).sum(1)})
    ours, stats = rloo_policy_loss(ours_lp, old, adv, mask, 0.2)
    torch.testing.assert_close(ours, trl_loss)
    ours.backward()
    trl_loss.backward()
    torch.testing.assert_close(ours_lp.grad, trl_lp.grad)
    assert stats["clip_frac"] > 0  # the batch exercises the clip
