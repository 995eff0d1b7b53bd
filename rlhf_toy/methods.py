"""Every stage and every training method by name: one registration line each.

A stage is a command, `rlhf-toy STAGE`: its config class, its runner and the summary keys
printed after it. A method is what `compare` trains and puts on the gold-versus-KL
frontier: on-policy methods learn from the reward model through their own rollouts,
preference methods from the pairs. Several methods may share a stage (a preference loss
is the `dpo` stage with its `--loss_type`).

Entries name "module:attribute" and are imported when used, so `--help` stays fast and
this registry imports no training code (no import cycles through it).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# the headline numbers of every method's summary.json (DESIGN: ppo, dpo keys)
METHOD_KEYS = ("gold_reward_before", "gold_reward_after", "proxy_reward_after", "kl_to_ref",
               "wall_s")


def _load(spec: str) -> Any:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Stage:
    """A command: `config` and `run` as "module:attribute", and its headline summary keys."""

    config: str
    run: str
    keys: tuple[str, ...]

    def load(self) -> tuple[type, Callable[..., dict]]:
        """(config class, runner)."""
        return _load(self.config), _load(self.run)


STAGES: dict[str, Stage] = {
    "sft": Stage("rlhf_toy.config:SFTConfig", "rlhf_toy.train.sft:run_sft",
                 ("gold_reward", "eval_loss", "wall_s")),
    "prefs": Stage("rlhf_toy.config:PrefsConfig", "rlhf_toy.train.prefs:run_prefs",
                   ("train_pairs", "test_pairs", "gold_accuracy", "wall_s")),
    "reward": Stage("rlhf_toy.config:RewardConfig", "rlhf_toy.train.reward:run_reward",
                    ("eval_accuracy", "gold_accuracy", "eval_loss", "wall_s")),
    "ppo": Stage("rlhf_toy.train.ppo:PPOConfig", "rlhf_toy.train.ppo:run_ppo", METHOD_KEYS),
    "grpo": Stage("rlhf_toy.train.grpo:GRPOConfig", "rlhf_toy.train.grpo:run_grpo", METHOD_KEYS),
    "rloo": Stage("rlhf_toy.train.rloo:RLOOConfig", "rlhf_toy.train.rloo:run_rloo", METHOD_KEYS),
    "reinforce_pp": Stage("rlhf_toy.train.reinforce_pp:ReinforcePPConfig",
                          "rlhf_toy.train.reinforce_pp:run_reinforce_pp", METHOD_KEYS),
    "dpo": Stage("rlhf_toy.config:DPOConfig", "rlhf_toy.train.dpo:run_dpo",
                 (*METHOD_KEYS[:-1], "eval_accuracy", "wall_s")),
    "compare": Stage("rlhf_toy.config:CompareConfig", "rlhf_toy.compare:run_compare",
                     ("sft_gold_reward", "ppo_gold_reward", "dpo_gold_reward", "ppo_kl_to_ref",
                      "dpo_kl_to_ref", "wall_s")),
    "inspect": Stage("rlhf_toy.inspect:InspectConfig", "rlhf_toy.inspect:run_inspect",
                     ("stage", "samples", "score", "gold", "kl")),
}


@dataclass(frozen=True)
class Method:
    """A training method: its `kind` ("on_policy" or "preference"), the `stage` that trains
    it and the extra command-line arguments that select it within that stage."""

    name: str
    kind: str
    stage: str
    overrides: tuple[str, ...] = ()


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("ppo", "on_policy", "ppo"),
    Method("grpo", "on_policy", "grpo"),
    Method("rloo", "on_policy", "rloo"),
    Method("reinforce_pp", "on_policy", "reinforce_pp"),
    Method("dpo", "preference", "dpo"),
    Method("ipo", "preference", "dpo", ("--loss_type", "ipo")),
    Method("simpo", "preference", "dpo", ("--loss_type", "simpo")),
)}
