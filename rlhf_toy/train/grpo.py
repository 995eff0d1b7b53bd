"""Stage `grpo`: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, sec. 4).

Shapes: B rollouts per iteration (B / G prompts, G completions each), T response length.

No critic: each prompt is answered G times and a completion's advantage is its reward
normalized within its group (`group_advantages`), the same on every one of its tokens.
The loss is the token-level clipped objective with the KL to the reference as a k3 loss
term (the paper's eq. 3; `--kl_in loss`), or the KL in the reward before normalization
(`--kl_in reward`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from rlhf_toy.config import OnPolicyConfig, _f, check
from rlhf_toy.core import group_advantages, grpo_policy_loss, shape_rewards
from rlhf_toy.train.onpolicy import (
    OnPolicyMethod,
    Rollout,
    critic_free_policy,
    run_onpolicy,
    sequence_advantages,
)


@dataclass
class GRPOConfig(OnPolicyConfig):
    """GRPO: group-normalized outcome rewards, no critic (Shao et al. 2024)."""

    output_dir: str = _f("runs/default/grpo", "directory this stage writes its artifacts into")

    num_generations: int = _f(4, "G: completions per prompt, the group a reward is "
                                 "normalized in (>= 2)")
    beta: float = _f(0.2, "KL coefficient (the paper uses 0.04; 0.2 keeps the tiny policy "
                          "from over-optimizing the reward model here)")
    ppo_epochs: int = _f(2, "passes over each rollout batch")
    kl_in: str = _f("loss", "where the KL to the reference goes: loss (beta * k3 per token in "
                            "the loss, as the paper) | reward (beta * kl_estimator summed "
                            "over the completion, subtracted from its score)")
    scale_advantages: bool = _f(True, "divide by the group's standard deviation (false: "
                                      "only centre, as Dr. GRPO)")

    def __post_init__(self) -> None:
        OnPolicyConfig.__post_init__(self)
        check(self.num_generations >= 2, "num_generations", ">= 2 (a group baseline)",
              self.num_generations)
        check(self.kl_in in ("loss", "reward"), "kl_in", "loss or reward", self.kl_in)


def grpo_advantages(batch: Rollout, cfg: GRPOConfig, beta: float) -> Rollout:
    """Each completion's reward (score, minus its KL with `kl_in reward`), normalized in
    its group, on every token."""
    reward_beta = beta if cfg.kl_in == "reward" else 0.0
    rewards = shape_rewards(batch.scores, batch.logprobs, batch.ref_logprobs, batch.mask,
                            reward_beta, cfg.kl_estimator)  # (B, T)
    advantages = group_advantages(rewards.sum(-1), cfg.num_generations,
                                  cfg.scale_advantages)  # (B, T) -> (B,)
    return replace(batch, rewards=rewards, advantages=sequence_advantages(batch, advantages))


def grpo_loss(logprobs: torch.Tensor, values: None, mb: Rollout, cfg: GRPOConfig, beta: float):
    """The token-level clipped objective, plus beta * k3 with `kl_in loss`."""
    loss_beta = beta if cfg.kl_in == "loss" else 0.0
    # a completion's advantage sits on each of its tokens; the first is always real
    loss, stats = grpo_policy_loss(logprobs, mb.logprobs, mb.ref_logprobs, mb.advantages[:, 0],
                                   mb.mask, cfg.clip_range, loss_beta)
    return loss, {"policy_loss": loss}, stats


GRPO = OnPolicyMethod("grpo", critic_free_policy, grpo_advantages, grpo_loss)


def run_grpo(cfg: GRPOConfig) -> dict:
    return run_onpolicy(cfg, GRPO)
