"""Preference losses behind one signature, and each loss's implicit reward per token.

Shapes: B pairs, T response length; `mask` is 1 on real response tokens (EOS included).

Every entry of `PREFERENCE_LOSSES` is called the same way, so a training loop calls one
thing whatever the loss (the idea of torchtune's `PreferenceLoss`):

    losses, chosen_rewards, rejected_rewards = PREFERENCE_LOSSES[name](
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
        chosen_lengths, rejected_lengths, beta, **extras)

with log-probs summed over each response's tokens (B,), lengths counting those tokens
(B,), and the loss's own keyword extras (`extras` of its entry). A `reference_free` loss
ignores the reference log-probs (None may be passed), so the loop can skip the reference
pass. `implicit_token_rewards` spreads each loss's implicit sequence reward over the
response tokens: summed over a response it gives that loss's `chosen_rewards`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhf_toy.core.losses import dpo_loss, ipo_loss, simpo_loss


def _sigmoid(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
             chosen_lengths, rejected_lengths, beta, label_smoothing=0.0):
    """`dpo_loss` on summed log-probs (TRL `loss_type="sigmoid"`); lengths unused."""
    return dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                    label_smoothing)


def _ipo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
         chosen_lengths, rejected_lengths, beta):
    """`ipo_loss` on per-token averages, as TRL 1.16's `DPOTrainer` with `loss_type="ipo"`
    does: it divides each response's summed log-ratio by its number of completion tokens
    (EOS included) before eq. 17, so that 1 / (2 beta) is a margin per token, whatever the
    lengths. The returned rewards are TRL's logged ones: beta * summed log-ratio."""
    c_len, r_len = chosen_lengths.clamp(min=1), rejected_lengths.clamp(min=1)
    losses, _, _ = ipo_loss(chosen_logps / c_len, rejected_logps / r_len,
                            ref_chosen_logps / c_len, ref_rejected_logps / r_len, beta)
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps).detach()  # (B,)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def _simpo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
           chosen_lengths, rejected_lengths, beta, simpo_gamma=0.5):
    """`simpo_loss` (reference-free: the reference log-probs are ignored)."""
    return simpo_loss(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, beta,
                      simpo_gamma)


def _log_ratio_rewards(logprobs, ref_logprobs, mask, beta):
    """beta * (logprob - ref_logprob)"""
    return beta * (logprobs - ref_logprobs)  # (B, T)


def _length_normalized_rewards(logprobs, ref_logprobs, mask, beta):
    """beta / |y| * logprob"""
    lengths = mask.sum(-1, keepdim=True).clamp(min=1)  # (B, T) -> (B, 1)
    return beta * logprobs / lengths  # (B, T)


@dataclass(frozen=True)
class PreferenceLoss:
    """One preference loss of the registry.

    Attributes:
        loss: the loss with the common signature (module docstring).
        token_rewards: (logprobs, ref_logprobs, mask, beta) -> (B, T), the loss's implicit
            reward of each token before padding is zeroed.
        reference_free: True when the loss never reads reference log-probs.
        extras: names of the keyword arguments the loss takes beyond the common ones.
    """

    loss: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    token_rewards: Callable[..., torch.Tensor]
    reference_free: bool
    extras: tuple[str, ...]

    def __call__(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.loss(*args, **kwargs)


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    # DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * h), h on summed log-ratios
    "sigmoid": PreferenceLoss(_sigmoid, _log_ratio_rewards, False, ("label_smoothing",)),
    # IPO (Azar et al. 2023, eq. 17): (h - 1 / (2 beta))^2, h on per-token averages
    "ipo": PreferenceLoss(_ipo, _log_ratio_rewards, False, ()),
    # SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta * (avg_c - avg_r) - gamma)
    "simpo": PreferenceLoss(_simpo, _length_normalized_rewards, True, ("simpo_gamma",)),
}


def implicit_token_rewards(loss_type: str, logprobs: torch.Tensor,
                           ref_logprobs: torch.Tensor | None, mask: torch.Tensor,
                           beta: float) -> torch.Tensor:
    """The implicit reward of each response token under preference loss `loss_type`:

        sigmoid, ipo:  r_t = beta * (logprob_t - ref_logprob_t)    (Rafailov et al., sec. 5)
        simpo:         r_t = beta / |y| * logprob_t                (|y| = real tokens of y)

    Summed over a response's real tokens, r_t is the sequence reward that the loss's
    registry entry returns (`chosen_rewards`), so the per-token view adds up to it.

    Args:
        loss_type: a key of `PREFERENCE_LOSSES`.
        logprobs: (B, T) policy log-probs of the response tokens.
        ref_logprobs: (B, T) reference log-probs; may be None for a reference-free loss.
        mask: (B, T), 1 = real response token.
        beta: > 0, the run's beta.
    Returns:
        (B, T) float rewards, exactly 0 on padding (whatever the log-probs hold there).
    """
    if loss_type not in PREFERENCE_LOSSES:
        raise ValueError(f"loss_type must be one of {sorted(PREFERENCE_LOSSES)} (got {loss_type!r})")
    entry = PREFERENCE_LOSSES[loss_type]
    if ref_logprobs is None and not entry.reference_free:
        raise ValueError(f"loss_type {loss_type!r} needs ref_logprobs")
    real = mask.bool()
    zero = torch.zeros_like(logprobs)
    logprobs = torch.where(real, logprobs, zero)
    ref_logprobs = zero if ref_logprobs is None else torch.where(real, ref_logprobs, zero)
    return torch.where(real, entry.token_rewards(logprobs, ref_logprobs, mask, beta), zero)
