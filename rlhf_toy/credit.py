"""Each method's per-token credit of one set of sampled responses (what `rlhf-toy inspect`
shows): a checkpoint of any registered method, loaded as a `Credit`.

Shapes: B sampled responses, P prompt length, T response length.

The method of a checkpoint is looked up in the registry (`methods.METHODS`, from the run's
stage and loss type), and its credit is computed by the method's own objects, never by a
switch on its name:
- on-policy (`ppo`, `grpo`, `rloo`, `reinforce_pp`): the stage's `OnPolicyMethod` scores the
  responses with the run's own config (`onpolicy.score_rollout`: reward-model score, log-probs,
  then `OnPolicyMethod.advantages`), so `reward`, `value`, `return` and `advantage` are what
  that method's update would use. A batch-level whitening the config can turn off
  (`whiten_advantages`) is turned off, so PPO shows raw GAE; the whitening that defines a
  method (REINFORCE++'s returns-to-go) is kept and taken over the B inspected responses.
- preference (`dpo`, `ipo`, `simpo`): `reward` is `core.implicit_token_rewards` of the run's
  loss type (DPO/IPO beta * (logprob - ref_logprob), SimPO beta / |y| * logprob); no critic.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
from dataclasses import dataclass

import torch

from rlhf_toy.config import check, policy_dir
from rlhf_toy.core import (
    PREFERENCE_LOSSES,
    implicit_token_rewards,
    kl_per_token,
    logprobs_from_logits,
)
from rlhf_toy.errors import UsageError
from rlhf_toy.methods import METHODS, STAGES, Method, Stage
from rlhf_toy.models import (
    VALUE_HEAD_FILE,
    CriticFreePolicy,
    PolicyWithCritic,
    PolicyWithValueHead,
    RewardCritic,
    freeze,
    load_policy,
    load_reward_model,
    response_logits,
    reward_scores,
)
from rlhf_toy.rollout import Samples
from rlhf_toy.tokenizer import load_tokenizer
from rlhf_toy.train.common import read_run_config
from rlhf_toy.train.snapshots import CRITIC_COLUMNS, ppo_records, token_records

# the run-config fields a user may override per inspection (on-policy runs that have them)
OVERRIDABLE = ("kl_estimator", "gamma", "lam")


def method_of(run: dict) -> Method | None:
    """The registered method a run was trained as: the most specific entry of its stage
    whose overrides the run config matches (a `dpo` run with loss_type ipo is `ipo`)."""
    def matches(m: Method) -> bool:
        pairs = zip(m.overrides[::2], m.overrides[1::2], strict=True)
        return all(str(run.get(k.lstrip("-"))) == v for k, v in pairs)

    found = [m for m in METHODS.values() if m.stage == run.get("stage") and matches(m)]
    return max(found, key=lambda m: len(m.overrides)) if found else None


def read_checkpoint(path: str) -> tuple[dict, Method]:
    """The run config and registered method of a run directory (`UsageError` otherwise)."""
    allowed = "a run directory of " + ", ".join(METHODS)
    if not os.path.isdir(path):
        raise UsageError(f"checkpoint {path!r} does not exist (give {allowed})")
    run = read_run_config(path)
    method = method_of(run)
    if method is None:
        what = f"a {run['stage']!r} run" if run.get("stage") else "no run_config.json"
        raise UsageError(f"checkpoint {path!r} holds {what}; give {allowed}")
    return run, method


def onpolicy_method(stage: str):
    """The `OnPolicyMethod` object that on-policy stage `stage`'s module defines."""
    from rlhf_toy.train.onpolicy import OnPolicyMethod

    _, runner = STAGES[stage].load()
    module = importlib.import_module(runner.__module__)
    return next(obj for obj in vars(module).values()
                if isinstance(obj, OnPolicyMethod) and obj.stage == stage)


def input_dir(path: str, checkpoint: str) -> str:
    """A run's recorded input dir; a relative one that moved is looked up next to the run."""
    if os.path.isdir(path):
        return path
    sibling = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), os.path.basename(path))
    return sibling if os.path.isdir(sibling) else path


def final_beta(checkpoint: str, cfg) -> float:
    """The KL coefficient an on-policy run ended with (an adaptive controller moves it)."""
    metrics = os.path.join(checkpoint, "metrics.jsonl")
    if not cfg.adaptive_kl or not os.path.isfile(metrics):
        return cfg.beta
    with open(metrics) as fh:
        betas = [row["beta"] for row in map(json.loads, fh) if "beta" in row]
    return betas[-1] if betas else cfg.beta


def load_trained(checkpoint: str, run: dict, reward_dir: str) -> torch.nn.Module:
    """The trained on-policy model (frozen): the policy alone, or with the critic saved
    next to it (runs whose config has a `critic`)."""
    if "critic" not in run:
        return freeze(CriticFreePolicy(load_policy(checkpoint)))
    if run["critic"] == "value_head":
        if not os.path.isfile(os.path.join(checkpoint, VALUE_HEAD_FILE)):
            raise UsageError(f"checkpoint {checkpoint!r} has no {VALUE_HEAD_FILE}")
        return freeze(PolicyWithValueHead.from_pretrained(checkpoint))
    critic_file = os.path.join(checkpoint, "critic.pt")
    if not os.path.isfile(critic_file):
        raise UsageError(f"checkpoint {checkpoint!r} has no critic.pt")
    model = PolicyWithCritic(load_policy(checkpoint), RewardCritic(load_reward_model(reward_dir)))
    model.critic.load_state_dict(torch.load(critic_file, weights_only=True))
    return freeze(model)


def response_logprobs(model, prompt_ids, prompt_mask, response_ids, mask,
                      temperature: float) -> torch.Tensor:
    """log pi(a_t | s_t) of each response token, 0 on padding: (B, T)."""
    logits = response_logits(model, prompt_ids, prompt_mask, response_ids, mask,
                             temperature=temperature)  # (B, T, V)
    return logprobs_from_logits(logits, response_ids) * mask  # (B, T, V) -> (B, T)


@dataclass
class Sampling:
    """How a checkpoint's run sampled: the policy and its decoding settings."""

    policy: torch.nn.Module
    max_new_tokens: int
    temperature: float
    top_k: int


class OnPolicyCredit:
    """An on-policy checkpoint: its `OnPolicyMethod` scores responses as its update would."""

    def __init__(self, checkpoint: str, run: dict, method: Method, device: torch.device,
                 beta: float | None, overrides: dict):
        config_cls, _ = STAGES[method.stage].load()
        names = {f.name for f in dataclasses.fields(config_cls)}
        cfg = config_cls(**{k: v for k, v in run.items() if k in names})
        beta = final_beta(checkpoint, cfg) if beta is None else beta
        # raw advantages where whitening is an optional batch-level rescaling (PPO's)
        raw = {"whiten_advantages": False} if "whiten_advantages" in names else {}
        self.cfg = dataclasses.replace(cfg, **overrides, **raw, beta=beta)
        self.name, self.checkpoint, self.algorithm = method.name, checkpoint, onpolicy_method(
            method.stage)
        reward_dir = input_dir(self.cfg.reward_dir, checkpoint)
        self.model = load_trained(checkpoint, run, reward_dir).to(device)
        self.ref_model = freeze(load_policy(input_dir(policy_dir(self.cfg), checkpoint)))
        self.ref_model = self.ref_model.to(device)
        self.reward_model = freeze(load_reward_model(reward_dir)).to(device)
        self.task_name, self.tokenizer = self.cfg.task, load_tokenizer(checkpoint)
        self.group_size = self.cfg.num_generations
        self.sampling = Sampling(self.model.policy, self.cfg.max_new_tokens,
                                 self.cfg.temperature, self.cfg.top_k)

    @torch.no_grad()
    def report(self, s: Samples, prompts: list[str], gold: list[float]) -> dict:
        """The report of responses `s` (see `inspect`): this method's every column."""
        from rlhf_toy.train.onpolicy import score_rollout

        cfg = self.cfg
        batch = score_rollout(self.algorithm, self.model, self.ref_model, self.reward_model, s,
                              cfg, cfg.beta)
        samples = ppo_records(batch, self.tokenizer, prompts, gold, cfg.kl_estimator,
                              batch.advantages)
        gamma, lam = getattr(cfg, "gamma", None), getattr(cfg, "lam", None)
        credit = " ".join(self.algorithm.advantages.__doc__.split("\n\n")[0].split())
        if "whiten_advantages" in {f.name for f in dataclasses.fields(cfg)}:
            credit = credit.rstrip(".") + ", before batch whitening"
        return {"stage": self.algorithm.stage, "method": self.name,
                "checkpoint": self.checkpoint, "beta": cfg.beta, "gamma": gamma, "lam": lam,
                "kl_estimator": cfg.kl_estimator, "credit": f"advantage: {credit}",
                "samples": samples}


class PreferenceCredit:
    """A preference checkpoint: the implicit per-token reward of its loss type."""

    def __init__(self, checkpoint: str, run: dict, method: Method, device: torch.device,
                 beta: float | None, overrides: dict):
        self.beta = run["beta"] if beta is None else beta
        check(self.beta > 0, "beta", "> 0", self.beta)
        self.loss_type = run.get("loss_type") or "sigmoid"
        self.name, self.checkpoint, self.run = method.name, checkpoint, run
        self.policy = freeze(load_policy(checkpoint)).to(device)
        ref_dir = run.get("model_name_or_path") or run["sft_dir"]  # policy_dir of the run
        self.ref_model = freeze(load_policy(input_dir(ref_dir, checkpoint))).to(device)
        self.reward_model = freeze(load_reward_model(input_dir(run["reward_dir"],
                                                               checkpoint))).to(device)
        self.task_name, self.tokenizer = run["task"], load_tokenizer(checkpoint)
        self.group_size = 1
        self.sampling = Sampling(self.policy, run["max_new_tokens"], run["temperature"],
                                 run["top_k"])

    @torch.no_grad()
    def report(self, s: Samples, prompts: list[str], gold: list[float]) -> dict:
        """The report of responses `s`: log-probs, k1 KL and the implicit per-token reward."""
        inputs = (s.prompt_ids, s.prompt_mask, s.response_ids, s.mask)
        temperature = self.run["temperature"]
        logprobs = response_logprobs(self.policy, *inputs, temperature)  # (B, T)
        ref_logprobs = response_logprobs(self.ref_model, *inputs, temperature)  # (B, T)
        kl = kl_per_token(logprobs, ref_logprobs, "k1") * s.mask
        rewards = implicit_token_rewards(self.loss_type, logprobs, ref_logprobs, s.mask,
                                         self.beta)  # (B, T)
        scores = reward_scores(self.reward_model, *inputs).float()  # (B,)
        columns = {"logprob": logprobs, "ref_logprob": ref_logprobs, "kl": kl,
                   "reward": rewards, **dict.fromkeys(CRITIC_COLUMNS)}
        formula = PREFERENCE_LOSSES[self.loss_type].token_rewards.__doc__.strip()
        return {"stage": "dpo", "method": self.name, "checkpoint": self.checkpoint,
                "beta": self.beta, "gamma": None, "lam": None, "kl_estimator": "k1",
                "credit": f"reward = {formula} with beta={self.beta:g}, the implicit reward "
                          f"of loss_type {self.loss_type}; no critic, so no value, return or "
                          "advantage",
                "samples": token_records(self.tokenizer, prompts, gold, scores,
                                         s.response_ids, s.mask, columns)}


CREDITS = {"on_policy": OnPolicyCredit, "preference": PreferenceCredit}  # by Method.kind


def load_credits(checkpoints: list[str], device: torch.device, beta: float | None,
                 overrides: dict) -> list:
    """A `Credit` per checkpoint; an override no checkpoint's method has is a UsageError."""
    runs = [read_checkpoint(path) for path in checkpoints]
    for name in overrides:
        users = [m.name for run, m in runs if name in run and m.kind == "on_policy"]
        if not users:
            having = [m.name for m in METHODS.values()
                      if m.kind == "on_policy" and name in _fields(STAGES[m.stage])]
            raise UsageError(f"{name} applies to checkpoints of {', '.join(having)} only "
                             f"({checkpoints[0]!r} is a {runs[0][1].name} run)")
    credits = [CREDITS[m.kind](path, run, m, device, beta,
                               {k: v for k, v in overrides.items() if k in run})
               for path, (run, m) in zip(checkpoints, runs, strict=True)]
    for c in credits[1:]:
        check(c.task_name == credits[0].task_name and c.tokenizer.get_vocab()
              == credits[0].tokenizer.get_vocab(), "compare_dirs",
              f"runs of task {credits[0].task_name!r} with the same vocabulary", c.checkpoint)
    return credits


def _fields(stage: Stage) -> set[str]:
    config_cls, _ = stage.load()
    return {f.name for f in dataclasses.fields(config_cls)}


def group_size(credits: list) -> int:
    """Completions per prompt that every method's groups fit in: the lcm of their sizes."""
    return math.lcm(*(c.group_size for c in credits))
