"""Stage `rloo`: REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics").

Shapes: B rollouts per iteration (B / k prompts, k completions each), T response length.

No critic: each prompt is answered k times; a completion's reward is its score minus
beta times its sequence KL to the reference, and its baseline the mean reward of the
other k - 1 completions (`rloo_advantages`). The whole completion is one action: the
clipped objective uses the sequence-level probability ratio (`rloo_policy_loss`, as TRL).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from rlhf_toy.config import OnPolicyConfig, _f, check
from rlhf_toy.core import rloo_advantages, rloo_policy_loss, shape_rewards
from rlhf_toy.train.onpolicy import (
    OnPolicyMethod,
    Rollout,
    critic_free_policy,
    run_onpolicy,
    sequence_advantages,
)


@dataclass
class RLOOConfig(OnPolicyConfig):
    """RLOO: a leave-one-out baseline over k completions per prompt, no critic."""

    output_dir: str = _f("runs/default/rloo", "directory this stage writes its artifacts into")

    num_generations: int = _f(4, "k: completions per prompt (>= 2)")
    ppo_epochs: int = _f(2, "passes over each rollout batch (a sequence-level ratio moves "
                            "faster than a token's: fewer passes than PPO)")

    def __post_init__(self) -> None:
        OnPolicyConfig.__post_init__(self)
        check(self.num_generations >= 2, "num_generations", ">= 2 (a leave-one-out baseline)",
              self.num_generations)


def rloo_step_advantages(batch: Rollout, cfg: RLOOConfig, beta: float) -> Rollout:
    """Sequence rewards score - beta * KL, minus the leave-one-out baseline, on every token."""
    rewards = shape_rewards(batch.scores, batch.logprobs, batch.ref_logprobs, batch.mask, beta,
                            cfg.kl_estimator)  # (B, T); sums to score - beta * KL
    advantages = rloo_advantages(rewards.sum(-1), cfg.num_generations)  # (B, T) -> (B,)
    return replace(batch, rewards=rewards, advantages=sequence_advantages(batch, advantages))


def rloo_loss(logprobs: torch.Tensor, values: None, mb: Rollout, cfg: RLOOConfig, beta: float):
    """The clipped objective on the sequence-level ratio."""
    # a completion's advantage sits on each of its tokens; the first is always real
    loss, stats = rloo_policy_loss(logprobs, mb.logprobs, mb.advantages[:, 0], mb.mask,
                                   cfg.clip_range)
    return loss, {"policy_loss": loss}, stats


RLOO = OnPolicyMethod("rloo", critic_free_policy, rloo_step_advantages, rloo_loss)


def run_rloo(cfg: RLOOConfig) -> dict:
    return run_onpolicy(cfg, RLOO)
