"""Losses: PPO (policy and value), the DPO family, Bradley-Terry; log-prob helpers.

Shapes: B batch, T response length, V vocabulary.

Losses return a scalar (PPO, Bradley-Terry: already a masked mean) or per-example values
(DPO family: callers reduce), plus detached statistics as python floats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_toy.core.returns import masked_mean


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens] without keeping the (B, T, V) log-softmax around.

    Naive equivalent: `torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]`.

    Args:
        logits: (B, T, V); tokens: (B, T) long.
    Returns:
        (B, T) float32 log-probs.
    """
    logits = logits.float()
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T, V) -> (B, T)
    return picked - torch.logsumexp(logits, dim=-1)  # (B, T, V) -> (B, T)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) at each position: (B, T, V) -> (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                    advantages: torch.Tensor, mask: torch.Tensor,
                    clip_range: float) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise.

        ratio = exp(logprobs - old_logprobs)
        loss  = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))

    Args:
        logprobs: (B, T) under the current policy (with grad).
        old_logprobs, advantages, mask: (B, T) from the rollout.
    Returns:
        (loss, stats) with `clip_frac` (fraction of real tokens where the clipped term is
        the larger one), `approx_kl` (masked mean of (ratio - 1) - log ratio, i.e. k3 of
        old vs new), `ratio_mean`, `ratio_max`.
    """
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0 (got {clip_range})")
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio.clamp(max=20.0))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        real = mask.bool()
        stats = {
            "clip_frac": masked_mean((clipped > unclipped).float(), mask).item(),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
            "ratio_max": ratio[real].max().item() if real.any() else 1.0,
        }
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   mask: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss (as in OpenAI baselines' PPO2):

        v_clipped = old + clip(v - old, -eps, eps)
        loss = 0.5 * masked_mean(max((v - R)^2, (v_clipped - R)^2))

    Args:
        values: (B, T) current critic (with grad); old_values, returns, mask: (B, T).
    Returns:
        (loss, stats) with `value_clip_frac` and `value_mean`.
    """
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0 (got {clip_range})")
    v_clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    err, err_clipped = (values - returns).pow(2), (v_clipped - returns).pow(2)
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        stats = {"value_clip_frac": masked_mean((err_clipped > err).float(), mask).item(),
                 "value_mean": masked_mean(values, mask).item()}
    return loss, stats


def _check_beta(beta: float) -> None:
    if beta <= 0:
        raise ValueError(f"beta must be > 0 (got {beta})")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
             label_smoothing: float = 0.0):
    """DPO loss (Rafailov et al. 2023, eq. 7), with conservative label smoothing.

        h = (pi_c - ref_c) - (pi_r - ref_r)
        loss = -(1 - ls) * log sigmoid(beta * h) - ls * log sigmoid(-beta * h)

    Args:
        *_logps: (B,) log-probs summed over each response's tokens.
        label_smoothing: probability that a label is flipped, in [0, 0.5).
    Returns:
        (losses (B,), chosen_rewards (B,), rejected_rewards (B,)) with the implicit rewards
        beta * (policy - ref), detached.
    """
    _check_beta(beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) (got {label_smoothing})")
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    losses = (-(1.0 - label_smoothing) * F.logsigmoid(beta * h)
              - label_smoothing * F.logsigmoid(-beta * h))
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def ipo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
             label_smoothing: float = 0.0):
    """IPO loss (Azar et al. 2023, eq. 17): (h - 1 / (2 beta))^2, h as in `dpo_loss`.

    `label_smoothing` is accepted for a common signature and must be 0.
    Returns:
        (losses (B,), chosen_rewards (B,), rejected_rewards (B,)).
    """
    _check_beta(beta)
    if label_smoothing != 0.0:
        raise ValueError(f"label_smoothing must be 0 for ipo_loss (got {label_smoothing})")
    h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    losses = (h - 1.0 / (2.0 * beta)).pow(2)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """mean(-log sigmoid(chosen - rejected)) (Bradley & Terry 1952; Ouyang et al. 2022 eq. 1).

    Args:
        chosen_scores, rejected_scores: (B,).
    """
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()
