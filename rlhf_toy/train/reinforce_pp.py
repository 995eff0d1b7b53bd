"""Stage `reinforce_pp`: REINFORCE++ (Hu 2025), PPO's clipped update without a critic.

Shapes: B rollouts per iteration, T response length.

The KL to the reference is a per-token reward (as PPO's), the advantage of token t is
its return-to-go normalized over every real token of the batch (`reinforce_pp_advantages`)
in place of a critic's GAE, and the loss is PPO's clipped surrogate (`ppo_policy_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from rlhf_toy.config import OnPolicyConfig, _f, _unit
from rlhf_toy.core import ppo_policy_loss, reinforce_pp_advantages
from rlhf_toy.train.onpolicy import OnPolicyMethod, Rollout, critic_free_policy, run_onpolicy


@dataclass
class ReinforcePPConfig(OnPolicyConfig):
    """REINFORCE++: token-level KL reward, globally whitened returns-to-go, no critic."""

    output_dir: str = _f("runs/default/reinforce_pp", "directory this stage writes its artifacts into")

    gamma: float = _f(1.0, "discount of the returns-to-go over response tokens")
    learning_rate: float = _f(5e-4, "AdamW learning rate (half PPO's: without a critic's "
                                    "baseline the updates are noisier)")
    ppo_epochs: int = _f(2, "passes over each rollout batch")

    def __post_init__(self) -> None:
        OnPolicyConfig.__post_init__(self)
        _unit(self, "gamma")


def rpp_advantages(batch: Rollout, cfg: ReinforcePPConfig, beta: float) -> Rollout:
    """Per-token KL-penalized rewards, their returns-to-go, whitened over the batch."""
    rewards, returns, adv = reinforce_pp_advantages(batch.scores, batch.logprobs,
                                                    batch.ref_logprobs, batch.mask, beta,
                                                    cfg.gamma, cfg.kl_estimator)
    return replace(batch, rewards=rewards, returns=returns, advantages=adv)


def rpp_loss(logprobs: torch.Tensor, values: None, mb: Rollout, cfg: ReinforcePPConfig,
             beta: float):
    """PPO's clipped surrogate on the token-level advantages."""
    pg_loss, stats = ppo_policy_loss(logprobs, mb.logprobs, mb.advantages, mb.mask,
                                     cfg.clip_range)
    return pg_loss, {"policy_loss": pg_loss}, stats


REINFORCE_PP = OnPolicyMethod("reinforce_pp", critic_free_policy, rpp_advantages, rpp_loss)


def run_reinforce_pp(cfg: ReinforcePPConfig) -> dict:
    return run_onpolicy(cfg, REINFORCE_PP)
