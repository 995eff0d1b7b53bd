"""Pure tensor math of RLHF: returns and advantages (GAE and the critic-free ones), KL,
losses. No models, no I/O.

Shapes: B batch, T time (response tokens), V vocabulary; `mask` is 1 on real tokens.
"""

from rlhf_toy.core.advantages import (
    center_scores,
    group_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from rlhf_toy.core.kl import (
    ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_per_token,
    shape_rewards,
)
from rlhf_toy.core.losses import (
    bradley_terry_loss,
    dpo_loss,
    entropy_from_logits,
    grpo_policy_loss,
    ipo_loss,
    logprobs_from_logits,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_policy_loss,
    simpo_loss,
)
from rlhf_toy.core.preference import PREFERENCE_LOSSES, PreferenceLoss, implicit_token_rewards
from rlhf_toy.core.returns import (
    discounted_returns,
    gae,
    last_token_index,
    masked_mean,
    masked_var,
    whiten,
)

__all__ = [
    "center_scores",
    "ESTIMATORS",
    "PREFERENCE_LOSSES",
    "PreferenceLoss",
    "AdaptiveKLController",
    "FixedKLController",
    "bradley_terry_loss",
    "discounted_returns",
    "dpo_loss",
    "entropy_from_logits",
    "gae",
    "grpo_policy_loss",
    "group_advantages",
    "implicit_token_rewards",
    "ipo_loss",
    "kl_per_token",
    "last_token_index",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "ppo_policy_loss",
    "ppo_value_loss",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "rloo_policy_loss",
    "shape_rewards",
    "simpo_loss",
    "whiten",
]
