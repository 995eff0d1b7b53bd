"""Per-token KL estimators, KL-penalized rewards, and the KL coefficient controllers.

Shapes: B batch, T response length.

Estimators of KL(pi || ref) from samples a_t ~ pi, with log r = ref_logprobs - logprobs
(J. Schulman, "Approximating KL Divergence", 2020, http://joschu.net/blog/kl-approx.html):
    k1 = -log r                 unbiased, high variance, can be negative per token
    k2 = 0.5 * (log r)^2        biased (exact to second order), low variance, >= 0
    k3 = (r - 1) - log r        unbiased, low variance, >= 0 (since log r <= r - 1)
"""

from __future__ import annotations

import torch

from rlhf_toy.core.returns import last_token_index

ESTIMATORS = ("k1", "k2", "k3")
# k3 exponentiates log r: exp(20) ~ 5e8 keeps it finite in float32 (exp overflows at ~88)
# and is far beyond any log-ratio a healthy run produces.
MAX_LOG_RATIO = 20.0


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                 estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) at the sampled tokens (Schulman 2020).

        k1 = logprobs - ref_logprobs
        k2 = 0.5 * (logprobs - ref_logprobs)^2
        k3 = exp(ref - logp) - 1 - (ref - logp),  with ref - logp clamped to <= 20

    The clamp keeps k3 finite for extreme log-probs (e.g. -1e4); the result is exact
    whenever |ref - logp| <= 20.

    Args:
        logprobs: (B, T) log pi(a_t | s_t) of the sampled tokens.
        ref_logprobs: (B, T) log ref(a_t | s_t).
        estimator: "k1", "k2" or "k3".
    Returns:
        kl: (B, T), on every position (mask it yourself, or use `shape_rewards`).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS} (got {estimator!r})")
    log_ratio = ref_logprobs - logprobs  # log r, (B, T)
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.pow(2)
    log_ratio = log_ratio.clamp(max=MAX_LOG_RATIO)
    return torch.expm1(log_ratio) - log_ratio  # expm1: exact near r = 1, where k3 ~ 0


def shape_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                  mask: torch.Tensor, beta: float, estimator: str = "k1") -> torch.Tensor:
    """Per-token rewards of the KL-regularized token MDP (Ziegler et al. 2019, eq. 2):

        rewards[b, t] = -beta * kl[b, t]                        on every real token
                        + scores[b]   if t = last_token_index(mask)[b]
                        0                                       on padding

    Args:
        scores: (B,) sequence-level reward-model scores.
        logprobs, ref_logprobs: (B, T) log-probs of the sampled tokens.
        mask: (B, T), 1 = real; left- or right-padded (any pattern works).
        beta: KL coefficient (>= 0).
        estimator: "k1", "k2" or "k3" (see `kl_per_token`).
    Returns:
        rewards: (B, T). A row without real tokens is all 0 (its score is dropped).
    """
    if beta < 0:
        raise ValueError(f"beta must be >= 0 (got {beta})")
    real = mask.bool()
    kl = kl_per_token(logprobs, ref_logprobs, estimator)
    rewards = torch.where(real, -beta * kl, torch.zeros_like(kl))  # (B, T)
    last = last_token_index(mask).unsqueeze(-1)  # (B,) -> (B, 1)
    score = torch.where(real.any(-1), scores.to(rewards.dtype), torch.zeros_like(rewards[:, 0]))
    bonus = torch.zeros_like(rewards).scatter(-1, last, score.unsqueeze(-1))  # (B, 1) -> (B, T)
    return rewards + bonus


class FixedKLController:
    """A constant KL coefficient `beta`, with the adaptive controller's interface."""

    def __init__(self, beta: float):
        if beta < 0:
            raise ValueError(f"beta must be >= 0 (got {beta})")
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No change (the interface of `AdaptiveKLController.update`)."""

    def state_dict(self) -> dict[str, float]:
        """Plain floats, to save with a checkpoint."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from `state_dict()` when resuming a run."""
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional control of beta towards a target KL (Ziegler et al. 2019, sec. 2.2):

        e    = clip(KL / target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n_steps / horizon)

    Args:
        init_beta: starting coefficient (>= 0; the update is multiplicative, so 0 stays 0).
        target: the KL per sequence to aim for (> 0).
        horizon: number of samples over which the error is corrected (> 0).
    """

    def __init__(self, init_beta: float, target: float, horizon: int):
        if not init_beta >= 0:
            raise ValueError(f"init_beta must be >= 0 (got {init_beta})")
        for name, val in (("target", target), ("horizon", horizon)):
            if not val > 0:
                raise ValueError(f"{name} must be > 0 (got {val})")
        self.value, self.target, self.horizon = float(init_beta), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """One step of the controller, after `n_steps` samples with mean KL `current_kl`."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """Plain floats, to save with a checkpoint."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from `state_dict()` when resuming a run."""
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))
