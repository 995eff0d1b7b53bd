"""Losses: PPO (policy and value), the DPO family (DPO, IPO, SimPO), Bradley-Terry; log-prob helpers.

Shapes: B batch, T response length, V vocabulary.

PPO losses return a scalar (a masked mean over every real token of the batch) plus a dict
of detached statistics as python floats. The DPO family returns per-pair losses (B,) and
the implicit rewards: callers reduce.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rlhf_toy.core.kl import MAX_LOG_RATIO, kl_per_token
from rlhf_toy.core.returns import masked_mean

LSE_CHUNK = 1 << 24  # elements of logits converted to float32 at a time (64 MiB)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens] without materialising the (B, T, V) log-softmax.

    Naive equivalent (cf. TRL's `selective_log_softmax`):

        torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    Here log p = logit[token] - logsumexp(logits), with the logsumexp taken in float32
    (stable for bf16 logits) over chunks of rows of at most `LSE_CHUNK` elements: one
    vectorized call for the small vocabularies here, bounded extra memory for large ones.

    Args:
        logits: (B, T, V) in any float dtype.
        tokens: (B, T) long token ids in [0, V).
    Returns:
        (B, T) float32 log-probs.
    """
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).float()  # (B, T, V) -> (B, T)
    rows = max(1, LSE_CHUNK // max(1, logits.shape[1] * logits.shape[2]))
    lse = torch.cat([torch.logsumexp(chunk.float(), dim=-1)
                     for chunk in logits.split(rows)])  # (B, T)
    return picked - lse


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy H = -sum_v p_v log p_v of softmax(logits) at each position.

    Tokens with p = 0 (logit -inf, e.g. after top-k masking) contribute 0, not NaN.

    Args:
        logits: (B, T, V).
    Returns:
        (B, T) entropy in nats, float32.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)  # (B, T, V) -> (B, T)


def _check_clip_range(clip_range: float) -> None:
    if not clip_range > 0:
        raise ValueError(f"clip_range must be > 0 (got {clip_range})")


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                    advantages: torch.Tensor, mask: torch.Tensor,
                    clip_range: float) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise:

        ratio = exp(logprobs - old_logprobs)
        loss  = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))

    The log-ratio is clamped to <= 20 before the exp (finite for any log-probs; such a
    ratio is clipped for A > 0 anyway). Padding is zeroed first, so garbage there gets
    neither into the loss nor into the gradient.

    Args:
        logprobs: (B, T) under the current policy (with grad).
        old_logprobs: (B, T) from the rollout policy.
        advantages: (B, T).
        mask: (B, T), 1 = real token.
        clip_range: eps > 0.
    Returns:
        (loss, stats): loss is a scalar; stats holds python floats:
        `clip_frac` (fraction of real tokens where the clipped term is strictly the larger,
        i.e. the gradient is cut), `approx_kl` (masked mean of k3 = (ratio - 1) - log ratio,
        an estimate of KL(old || new)), `ratio_mean`, `ratio_max`.
    """
    _check_clip_range(clip_range)
    real = mask.bool()
    zero = torch.zeros_like(logprobs)
    log_ratio = torch.where(real, logprobs - old_logprobs, zero)  # (B, T), 0 on padding
    adv = torch.where(real, advantages.to(logprobs.dtype), zero)
    per_token, ratio, cut = _clipped_surrogate(log_ratio, adv, clip_range)
    loss = masked_mean(per_token, mask)
    return loss, _ratio_stats(log_ratio, ratio, cut, mask)


def _clipped_surrogate(log_ratio: torch.Tensor, adv: torch.Tensor, clip_range: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) elementwise, with the ratio and
    where the clipped term is strictly the larger (the gradient is cut), any shape."""
    ratio = torch.exp(log_ratio.clamp(max=MAX_LOG_RATIO))
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), ratio, clipped > unclipped


@torch.no_grad()
def _ratio_stats(log_ratio: torch.Tensor, ratio: torch.Tensor, cut: torch.Tensor,
                 mask: torch.Tensor) -> dict[str, float]:
    """`clip_frac`, `approx_kl` (k3 of KL(old || new)), `ratio_mean`, `ratio_max` over the
    real elements, as python floats."""
    real = mask.bool()
    # k3 with "samples from old": kl_per_token(old, new) uses log r = new - old
    approx_kl = kl_per_token(torch.zeros_like(log_ratio), log_ratio, "k3")
    real_ratio = torch.where(real, ratio, torch.full_like(ratio, -math.inf))
    ratio_max = real_ratio.amax() if real_ratio.numel() else real_ratio.new_tensor(-math.inf)
    # one host sync for all four (float64 holds each float32 exactly, as `.item()` would)
    clip_frac, kl, ratio_mean, ratio_max = torch.stack([
        masked_mean(cut.float(), mask).double(), masked_mean(approx_kl, mask).double(),
        masked_mean(ratio, mask).double(), ratio_max.double()]).tolist()
    return {"clip_frac": clip_frac, "approx_kl": kl, "ratio_mean": ratio_mean,
            "ratio_max": ratio_max if ratio_max > -math.inf else 1.0}  # no real element: 1


def grpo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                     ref_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                     clip_range: float, beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO's objective (Shao et al. 2024, DeepSeekMath eq. 3), as a loss to minimise:

        per_token = max(-A_i * ratio, -A_i * clip(ratio, 1 - eps, 1 + eps)) + beta * k3_t
        loss      = 1/B sum_i 1/|o_i| sum_t per_token[i, t]

    a token-level clipped surrogate with the sequence advantage A_i on every token of
    completion i, plus the KL to the reference as a loss term with Schulman's k3
    estimator at the current log-probs (eq. 4), averaged over each completion's tokens
    and then over completions. This is TRL's `GRPOTrainer` with `loss_type="grpo"`.

    Args:
        logprobs: (B, T) under the current policy (with grad).
        old_logprobs: (B, T) from the rollout policy.
        ref_logprobs: (B, T) from the frozen reference.
        advantages: (B,) one per completion (`group_advantages`).
        mask: (B, T), 1 = real token.
        clip_range: eps > 0; beta: coefficient of the KL term (>= 0; 0 drops it).
    Returns:
        (loss, stats): scalar loss; stats as `ppo_policy_loss`'s plus `kl_ref` (the masked
        mean of k3 over the batch's real tokens).
    """
    _check_clip_range(clip_range)
    real = mask.bool()
    zero = torch.zeros_like(logprobs)
    log_ratio = torch.where(real, logprobs - old_logprobs, zero)  # (B, T)
    adv = torch.where(real, advantages.to(logprobs.dtype)[:, None], zero)  # (B,) -> (B, T)
    per_token, ratio, cut = _clipped_surrogate(log_ratio, adv, clip_range)
    kl = torch.where(real, kl_per_token(logprobs, ref_logprobs, "k3"), zero)  # (B, T)
    per_token = per_token + beta * kl
    loss = masked_mean(per_token, mask, dim=-1).mean()  # (B, T) -> (B,) -> ()
    stats = _ratio_stats(log_ratio, ratio, cut, mask)
    stats["kl_ref"] = masked_mean(kl.detach(), mask).item()
    return loss, stats


def rloo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                     advantages: torch.Tensor, mask: torch.Tensor,
                     clip_range: float) -> tuple[torch.Tensor, dict[str, float]]:
    """RLOO's clipped objective with a sequence-level ratio (TRL's `RLOOTrainer`):

        ratio_i = exp(sum_t log pi(a_t | s_t) - sum_t log pi_old(a_t | s_t))
        loss    = 1/B sum_i max(-A_i * ratio_i, -A_i * clip(ratio_i, 1 - eps, 1 + eps))

    The whole completion is one action (Ahmadian et al. 2024 model the response as a
    single action); at ratio 1 the gradient is REINFORCE's -A_i * grad log pi(o_i).

    Args:
        logprobs: (B, T) under the current policy (with grad).
        old_logprobs: (B, T) from the rollout policy.
        advantages: (B,) one per completion (`rloo_advantages`).
        mask: (B, T), 1 = real token.
        clip_range: eps > 0.
    Returns:
        (loss, stats): scalar loss; stats as `ppo_policy_loss`'s, per completion.
    """
    _check_clip_range(clip_range)
    real = mask.bool()
    log_ratio = torch.where(real, logprobs - old_logprobs, torch.zeros_like(logprobs)).sum(-1)
    adv = advantages.to(logprobs.dtype)  # (B,)
    per_seq, ratio, cut = _clipped_surrogate(log_ratio, adv, clip_range)  # (B,)
    has_tokens = real.any(-1)  # (B,)
    return per_seq.mean(), _ratio_stats(log_ratio, ratio, cut, has_tokens)


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   mask: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss (as in OpenAI baselines' PPO2 and Ziegler et al.'s lm-human-preferences):

        v_clipped = old_values + clip(values - old_values, -eps, eps)
        loss      = 0.5 * masked_mean(max((values - R)^2, (v_clipped - R)^2))

    Args:
        values: (B, T) current critic (with grad).
        old_values: (B, T) critic at rollout time.
        returns: (B, T) targets R.
        mask: (B, T), 1 = real token.
        clip_range: eps > 0.
    Returns:
        (loss, stats): scalar loss; stats `value_clip_frac` (fraction of real tokens where
        the clipped error is strictly the larger) and `value_mean`.
    """
    _check_clip_range(clip_range)
    real = mask.bool()
    zero = torch.zeros_like(values)
    old = torch.where(real, old_values.to(values.dtype), zero)
    target = torch.where(real, returns.to(values.dtype), zero)
    v = torch.where(real, values, zero)
    v_clipped = old + (v - old).clamp(-clip_range, clip_range)
    err, err_clipped = (v - target).pow(2), (v_clipped - target).pow(2)
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        clip_frac, mean = torch.stack([masked_mean((err_clipped > err).float(), mask).double(),
                                       masked_mean(v, mask).double()]).tolist()  # one sync
    stats = {"value_clip_frac": clip_frac, "value_mean": mean}
    return loss, stats


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (got {beta})")


def _margin_and_rewards(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                        ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
                        beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h = (pi_c - ref_c) - (pi_r - ref_r) and the detached implicit rewards, all (B,)."""
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    return (chosen_logratios - rejected_logratios, beta * chosen_logratios.detach(),
            beta * rejected_logratios.detach())


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss (Rafailov et al. 2023, eq. 7), with conservative label smoothing:

        h      = (pi_c - ref_c) - (pi_r - ref_r)
        losses = -(1 - ls) * log sigmoid(beta * h) - ls * log sigmoid(-beta * h)

    With ls = 0 this is TRL's `loss_type="sigmoid"`; with pi = ref every loss is log 2.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) policy log-probs, summed over each
            response's tokens.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the reference model.
        beta: > 0, the KL coefficient of the implicit reward.
        label_smoothing: probability that a preference label is flipped, in [0, 0.5).
    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,); the implicit rewards
        beta * (policy - ref) are detached.
    """
    _check_beta(beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) (got {label_smoothing})")
    h, chosen_rewards, rejected_rewards = _margin_and_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    losses = (-(1.0 - label_smoothing) * F.logsigmoid(beta * h)
              - label_smoothing * F.logsigmoid(-beta * h))
    return losses, chosen_rewards, rejected_rewards


def ipo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO loss (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning
    from Human Preferences", eq. 17, with tau = beta):

        losses = (h - 1 / (2 * beta))^2,     h as in `dpo_loss`

    The log-probs are used as given: TRL's `loss_type="ipo"` divides them by the number of
    response tokens first; pass per-token averages to match it (as the `ipo` entry of
    `core.PREFERENCE_LOSSES` does).

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps:
            (B,) as in `dpo_loss`.
        beta: > 0.
        label_smoothing: accepted for a signature common with `dpo_loss`; IPO has no label
            smoothing, so any value other than 0 is a ValueError (not silently ignored).
    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,); rewards detached.
    """
    _check_beta(beta)
    if label_smoothing != 0.0:
        raise ValueError(f"label_smoothing must be 0 for ipo_loss (got {label_smoothing})")
    h, chosen_rewards, rejected_rewards = _margin_and_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    return (h - 1.0 / (2.0 * beta)).pow(2), chosen_rewards, rejected_rewards


def simpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, beta: float,
               simpo_gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO loss (Meng et al. 2024, "SimPO: Simple Preference Optimization with a
    Reference-Free Reward", eq. 6): no reference model, length-normalized log-probs and a
    target reward margin gamma:

        avg_c  = pi_c / |y_c|,   avg_r = pi_r / |y_r|
        losses = -log sigmoid(beta * (avg_c - avg_r) - gamma)

    This is TRL's `CPOTrainer` with `loss_type="simpo"`, `cpo_alpha=0` (which averages the
    log-probs over the completion tokens and subtracts `simpo_gamma / beta` from the
    log-ratio before scaling by beta). At avg_c = avg_r every loss is softplus(gamma).

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) policy log-probs, summed over each
            response's tokens.
        chosen_lengths, rejected_lengths: (B,) number of response tokens (EOS included), >= 1.
        beta: > 0, the scale of the implicit reward beta * avg log-prob.
        simpo_gamma: >= 0, the target margin gamma between chosen and rejected rewards.
    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,); the implicit rewards
        beta * avg log-prob are detached.
    """
    _check_beta(beta)
    if not simpo_gamma >= 0:
        raise ValueError(f"simpo_gamma must be >= 0 (got {simpo_gamma})")
    chosen_rewards = beta * policy_chosen_logps / chosen_lengths.clamp(min=1)  # (B,)
    rejected_rewards = beta * policy_rejected_logps / rejected_lengths.clamp(min=1)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - simpo_gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Reward-model loss: mean(-log sigmoid(chosen - rejected)) (Bradley & Terry 1952;
    Ouyang et al. 2022, eq. 1).

    Args:
        chosen_scores, rejected_scores: (B,) reward-model scores of each pair.
    Returns:
        scalar loss.
    """
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()
