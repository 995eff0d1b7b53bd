"""Per-token KL estimators, KL-penalized rewards, and the KL coefficient controllers.

Shapes: B batch, T response length.

Estimators of KL(pi || ref) from samples a_t ~ pi, with log r = ref_logprobs - logprobs
(Schulman, "Approximating KL Divergence", 2020):
    k1 = -log r                 unbiased, can be negative per token
    k2 = 0.5 * (log r)^2        biased, low variance, >= 0
    k3 = (r - 1) - log r        unbiased, >= 0
"""

from __future__ import annotations

import torch

from rlhf_toy.core.returns import last_token_index

ESTIMATORS = ("k1", "k2", "k3")
_MAX_LOG_RATIO = 20.0  # exp(20) ~ 5e8: keeps k3 finite for extreme log-probs


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                 estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate.

    Args:
        logprobs, ref_logprobs: (B, T) log pi(a_t|s_t) and log ref(a_t|s_t).
        estimator: "k1" | "k2" | "k3".
    Returns:
        kl: (B, T). (k3's log-ratio is clamped to <= 20 so it never overflows.)
    """
    log_ratio = ref_logprobs - logprobs  # log r, (B, T)
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.pow(2)
    if estimator == "k3":
        log_ratio = log_ratio.clamp(max=_MAX_LOG_RATIO)
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"estimator must be one of {ESTIMATORS} (got {estimator!r})")


def shape_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                  mask: torch.Tensor, beta: float, estimator: str = "k1") -> torch.Tensor:
    """Per-token rewards of the KL-regularized token MDP (Ziegler et al. 2019, eq. 2).

        rewards[b, t] = -beta * kl[b, t] on every real token,
                        + scores[b] on the last real token of row b.

    Args:
        scores: (B,) sequence-level reward-model scores.
        logprobs, ref_logprobs, mask: (B, T); left- or right-padded.
    Returns:
        rewards: (B, T), 0 on padding.
    """
    m = mask.to(logprobs.dtype)
    kl = torch.where(m.bool(), kl_per_token(logprobs, ref_logprobs, estimator),
                     torch.zeros_like(logprobs))
    rewards = -beta * kl
    last = last_token_index(m)  # (B,)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    has_token = m.sum(-1) > 0
    rewards[rows, last] += torch.where(has_token, scores.to(rewards.dtype),
                                       torch.zeros_like(scores, dtype=rewards.dtype))
    return rewards


class FixedKLController:
    """A constant KL coefficient `beta` (same interface as the adaptive one)."""

    def __init__(self, beta: float):
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No change."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Proportional control of beta towards a target KL (Ziegler et al. 2019, sec. 2.2):

        e = clip(KL / target - 1, -0.2, 0.2);   beta <- beta * (1 + e * n_steps / horizon)
    """

    def __init__(self, init_beta: float, target: float, horizon: int):
        super().__init__(init_beta)
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
