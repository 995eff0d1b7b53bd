"""Stage `ppo`: PPO with a critic and a per-token KL penalty to a frozen reference model.

Shapes: B rollouts per iteration, T response length.

PPO on the shared on-policy loop (`train/onpolicy.py`): its advantages are GAE over the
KL-penalized per-token rewards with a learned critic (step 4: 3 rewards, 4 GAE), its loss
the clipped surrogate plus the clipped value loss (step 5). The math is `rlhf_toy.core`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from rlhf_toy.config import (
    DEFAULT_TARGET_KL,
    OnPolicyConfig,
    _f,
    _positive,
    _unit,
    check,
    policy_dir,
    policy_flag,
)
from rlhf_toy.core import (
    gae,
    last_token_index,
    ppo_policy_loss,
    ppo_value_loss,
    shape_rewards,
    whiten,
)
from rlhf_toy.models import (
    PolicyWithCritic,
    PolicyWithValueHead,
    RewardCritic,
    load_policy,
    load_reward_model,
)
from rlhf_toy.train.onpolicy import OnPolicyMethod, Rollout, run_onpolicy


@dataclass
class PPOConfig(OnPolicyConfig):
    """PPO with a per-token KL penalty to the frozen SFT reference (Ziegler et al. 2019)."""

    output_dir: str = _f("runs/default/ppo", "directory this stage writes its artifacts into")

    # PPO's defaults (README, "Defaults that hold on every task": chosen by
    # scripts/sweep_defaults.py over both tasks and seeds 0-4)
    learning_rate: float = _f(3e-4, "AdamW learning rate (peak)")
    lr_scheduler_type: str = _f("linear", "constant | linear (decay towards 0 at max_steps)")
    num_generations: int = _f(4, "completions per prompt, contiguous in the batch; "
                                 "batch_size / num_generations prompts per iteration")
    beta: float = _f(0.3, "KL coefficient (initial value if adaptive_kl)")
    adaptive_kl: bool = _f(True, "adapt beta towards target_kl (Ziegler et al. 2019)")
    target_kl: float | None = _f(None, "target sequence KL (nats per response) of the adaptive "
                                       "controller; default: the task's target_kl if it "
                                       f"proposes one, else {DEFAULT_TARGET_KL:g}")
    kl_horizon: int = _f(160, "horizon (in rollouts) of the adaptive controller")
    center_scores: bool = _f(True, "subtract each prompt's mean score over its completions "
                                   "(the batch's with num_generations 1; see README)")
    eval_steps: int = _f(10, "held-out gold/proxy evaluation every N iterations; 0 = start and end")

    gamma: float = _f(1.0, "discount over response tokens")
    lam: float = _f(0.95, "GAE lambda")
    clip_range_value: float = _f(0.2, "value clipping around the old values")
    # the value head shares the policy's trunk: at 0.5 its loss's gradients, large when the
    # returns are (a large beta), moved a tiny policy further than the KL penalty held it
    vf_coef: float = _f(0.1, "value loss coefficient")
    critic: str = _f("value_head", "value_head (on the policy) | reward_model (separate critic)")
    whiten_scores: bool = _f(False, "whiten reward-model scores over the batch")
    whiten_advantages: bool = _f(True, "whiten advantages over the batch's real tokens")

    def __post_init__(self) -> None:
        OnPolicyConfig.__post_init__(self)
        _positive(self, "clip_range_value")
        _unit(self, "gamma", "lam")
        check(self.critic in ("value_head", "reward_model"), "critic",
              "value_head or reward_model", self.critic)
        check(self.vf_coef >= 0, "vf_coef", ">= 0", self.vf_coef)


def build_actor_critic(cfg: PPOConfig) -> torch.nn.Module:
    """The trainable policy with its critic: a value head, or a critic from the reward model."""
    policy = load_policy(policy_dir(cfg), policy_flag(cfg))
    if cfg.critic == "value_head":
        return PolicyWithValueHead(policy)
    return PolicyWithCritic(policy,
                            RewardCritic(load_reward_model(cfg.reward_dir)))


def ppo_advantages(batch: Rollout, cfg: PPOConfig, beta: float) -> Rollout:
    """KL-penalized per-token rewards, then GAE with the critic's values (and returns)."""
    # whitening takes precedence over centering (it removes the mean too)
    scores = whiten(batch.raw_scores, torch.ones_like(batch.raw_scores)) if cfg.whiten_scores \
        else batch.scores
    # 3. the KL penalty on every token, the score on the last one
    rewards = shape_rewards(scores, batch.logprobs, batch.ref_logprobs, batch.mask, beta,
                            cfg.kl_estimator)
    # 4. GAE: the episode ends at the last real token (EOS, or the length limit)
    dones = F.one_hot(last_token_index(batch.mask), batch.mask.shape[1]).float()  # (B,) -> (B, T)
    advantages, returns = gae(rewards, batch.values, dones, cfg.gamma, cfg.lam, batch.mask)
    if cfg.whiten_advantages:
        advantages = whiten(advantages, batch.mask)
    return replace(batch, scores=scores, rewards=rewards, advantages=advantages,
                               returns=returns)


def ppo_loss(logprobs: torch.Tensor, values: torch.Tensor, mb: Rollout, cfg: PPOConfig,
             beta: float):
    """The clipped surrogate plus `vf_coef` times the clipped value loss."""
    pg_loss, pg_stats = ppo_policy_loss(logprobs, mb.logprobs, mb.advantages, mb.mask,
                                        cfg.clip_range)
    vf_loss, vf_stats = ppo_value_loss(values.float(), mb.values, mb.returns, mb.mask,
                                       cfg.clip_range_value)
    return (pg_loss + cfg.vf_coef * vf_loss, {"policy_loss": pg_loss, "value_loss": vf_loss},
            {**pg_stats, **vf_stats})


PPO = OnPolicyMethod("ppo", build_actor_critic, ppo_advantages, ppo_loss)


def run_ppo(cfg: PPOConfig) -> dict:
    return run_onpolicy(cfg, PPO)
