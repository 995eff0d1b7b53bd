"""Critic-free advantages: GRPO's group normalization, RLOO's leave-one-out baseline and
REINFORCE++'s globally whitened returns-to-go.

Shapes: B batch of rollouts, G group size (completions per prompt), T response length.
A batch holds B // G prompts, and the G completions of one prompt are contiguous:
`scores (B,)` is read as `(B // G, G)`. `mask` is 1 on real response tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_toy.core.kl import shape_rewards
from rlhf_toy.core.returns import discounted_returns, last_token_index, whiten


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """`scores` (B,) as (B // G, G); a ValueError unless G >= 2 divides B."""
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for a group baseline (got {group_size})")
    if scores.dim() != 1 or scores.shape[0] % group_size:
        raise ValueError(f"scores must be (B,) with B a multiple of group_size={group_size} "
                         f"(got shape {tuple(scores.shape)})")
    return scores.view(-1, group_size)  # (B,) -> (B // G, G)


def group_advantages(scores: torch.Tensor, group_size: int, scale: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO's outcome-supervision advantage (Shao et al. 2024, DeepSeekMath, sec. 4.1.2):

        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)

    with the unbiased (Bessel-corrected) standard deviation over the group, as TRL's
    `GRPOTrainer` (`scale_rewards="group"`, eps = 1e-4). `scale=False` keeps only the
    centering (Dr. GRPO, Liu et al. 2025). Every token of completion i gets A_i.

    Args:
        scores: (B,) sequence rewards, the G completions of each prompt contiguous.
        group_size: G >= 2, dividing B.
        scale: divide by the group's standard deviation.
        eps: added to the standard deviation (a group of equal rewards gets 0).
    Returns:
        (B,) advantages.
    """
    grouped = _groups(scores.float(), group_size)  # (B // G, G)
    centered = grouped - grouped.mean(-1, keepdim=True)
    if scale:
        centered = centered / (grouped.std(-1, keepdim=True) + eps)  # (B // G, 1) broadcast
    return centered.reshape(-1)  # (B // G, G) -> (B,)


def center_scores(scores: torch.Tensor, group_size: int = 1) -> torch.Tensor:
    """Subtract a baseline from sequence scores: the batch's mean (`group_size` 1) or each
    prompt's mean over its G contiguous completions (`group_advantages` without scaling).

    A Bradley-Terry reward model is trained on pairs of responses to the same prompt, so it
    knows each prompt's scores only up to a constant; the group mean removes that constant,
    the batch mean only its average.

    Args:
        scores: (B,) sequence scores.
        group_size: 1, or G >= 2 dividing B.
    Returns:
        (B,) centered scores.
    """
    if group_size == 1:
        return scores - scores.mean()
    return group_advantages(scores, group_size, scale=False)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024, eq. 7; Kool et al. 2019):

        A_i = r_i - 1 / (G - 1) * sum_{j != i} r_j

    the baseline of completion i is the mean reward of the other G - 1 completions of
    its prompt, so it is independent of completion i and the estimate stays unbiased.
    Equivalently A_i = G / (G - 1) * (r_i - mean(r_group)).

    Args:
        scores: (B,) sequence rewards (KL penalty included), groups contiguous.
        group_size: G >= 2, dividing B.
    Returns:
        (B,) advantages.
    """
    grouped = _groups(scores.float(), group_size)  # (B // G, G)
    others = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)  # (B // G, G)
    return (grouped - others).reshape(-1)  # (B // G, G) -> (B,)


def reinforce_pp_advantages(scores: torch.Tensor, logprobs: torch.Tensor,
                            ref_logprobs: torch.Tensor, mask: torch.Tensor, beta: float,
                            gamma: float = 1.0, estimator: str = "k1"
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025, "REINFORCE++", sec. 3): token-level KL in the reward,
    returns-to-go, and one normalization over the whole batch instead of a critic:

        r_t = -beta * kl_t  (+ score on the last real token)       (`shape_rewards`)
        G_t = sum_{s >= t} gamma^(s - t) r_s                       (`discounted_returns`)
        A_t = (G_t - mean(G)) / std(G)   over every real token of the batch (`whiten`)

    Args:
        scores: (B,) reward-model scores.
        logprobs, ref_logprobs: (B, T) log-probs of the sampled tokens (rollout policy
            and reference).
        mask: (B, T), 1 = real token.
        beta: KL coefficient (>= 0); gamma: discount in [0, 1].
        estimator: per-token KL estimator, "k1", "k2" or "k3".
    Returns:
        (rewards, returns, advantages), each (B, T), 0 on padding.
    """
    rewards = shape_rewards(scores, logprobs, ref_logprobs, mask, beta, estimator)  # (B, T)
    dones = F.one_hot(last_token_index(mask), mask.shape[1])  # (B,) -> (B, T)
    returns = discounted_returns(rewards, dones, gamma) * mask  # (B, T)
    return rewards, returns, whiten(returns, mask)
