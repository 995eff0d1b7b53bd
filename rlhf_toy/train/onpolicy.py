"""The on-policy loop every on-policy stage runs (`ppo`, `grpo`, `rloo`, `reinforce_pp`).

Shapes: B rollouts per iteration, P prompt length, T response length, V vocabulary.

Each iteration: 1 sample (KV cache), 2 score (reward model at the last real token),
3 log-probs of the policy (and values, with a critic) and of the reference, 4 advantages
(the algorithm's), 5 epochs of minibatch updates (the algorithm's loss). An algorithm is
an `OnPolicyMethod`: how it builds its trainable model, its advantages and its loss.
Checkpointing, resume, the non-finite guard, health warnings, evaluation and the
progress bar are shared here.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate.utils import DistributedType

from rlhf_toy.config import DEFAULT_TARGET_KL, OnPolicyConfig, policy_dir, policy_flag
from rlhf_toy.core import (
    AdaptiveKLController,
    FixedKLController,
    center_scores,
    entropy_from_logits,
    last_token_index,
    logprobs_from_logits,
    masked_mean,
    masked_var,
)
from rlhf_toy.datafiles import stage_prompts
from rlhf_toy.evaluate import SamplingArgs, evaluate_policy, gold_summary
from rlhf_toy.lora import apply_lora, enable_checkpointing, reference_model
from rlhf_toy.models import (
    AUDIT_DIR,
    CriticFreePolicy,
    context_length,
    freeze,
    load_policy,
    load_reward_model,
    response_logits,
    reward_scores,
)
from rlhf_toy.overoptimization import OveroptimizationMonitor
from rlhf_toy.rollout import Samples, decode_responses, encode_prompts, sample
from rlhf_toy.sharding import plain, sampling_policy
from rlhf_toy.tasks import get_task
from rlhf_toy.tokenizer import load_tokenizer
from rlhf_toy.train.common import (
    check_context,
    check_vocab,
    clip_grad_norm,
    finish_stage,
    first_non_finite,
    open_run,
    optimizer_step,
    progress,
    scheduled_learning_rate,
    start_stage,
)
from rlhf_toy.train.snapshots import write_training_snapshot

logger = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One iteration's rollouts and everything an update needs.

    Attributes:
        prompt_ids, prompt_mask: (B, P) left-padded prompts.
        response_ids, mask: (B, T) right-padded responses; mask 1 on real tokens (EOS too).
        logprobs: (B, T) log pi_old(a_t | s_t) at the sampling temperature.
        ref_logprobs: (B, T) the same under the frozen reference.
        scores: (B,) the scores that enter the rewards: reward-model scores minus the
            missing-EOS penalty, centered if center_scores (over B, or over each prompt's
            completions if num_generations > 1; PPO whitens raw_scores instead if
            whiten_scores).
        rewards: (B, T) the per-token rewards the algorithm optimises (the score on the
            last token, with the KL penalty where it is in the reward); 0 on padding.
        advantages: (B, T) the algorithm's advantages, on every real token.
        values: (B, T) V_old(s_t) from a critic, or None (critic-free algorithms).
        returns: (B, T) the critic's targets (or returns-to-go), or None.
        raw_scores: (B,) the scores before centering (logged as `score`).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    scores: torch.Tensor
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    values: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    raw_scores: torch.Tensor | None = None

    def select(self, index: torch.Tensor | slice) -> Rollout:
        """The rollouts at `index` (B', or a slice: views) as a new `Rollout`; None fields
        stay None."""
        return Rollout(*(None if (x := getattr(self, f.name)) is None else x[index]
                         for f in dataclasses.fields(self)))


# advantages(rollout, cfg, beta) -> the rollout with rewards and advantages (and returns)
Advantages = Callable[[Rollout, OnPolicyConfig, float], Rollout]
# loss(logprobs, values, minibatch, cfg, beta) -> (loss, named scalar losses, stats)
Loss = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]]


@dataclass(frozen=True)
class OnPolicyMethod:
    """What one on-policy algorithm adds to the shared loop.

    Attributes:
        stage: its stage name (checkpoints record it; resume checks it).
        build_model: cfg -> the trainable model: `forward(prompt_ids, prompt_mask,
            response_ids, mask, temperature)` returning (logits (B, T, V), values (B, T)
            or None), with the policy as `.policy` (`models.PolicyWithValueHead`,
            `models.CriticFreePolicy`).
        advantages: step 4, `Advantages`.
        loss: step 5, `Loss`; the named losses are logged (e.g. `policy_loss`).
    """

    stage: str
    build_model: Callable[[OnPolicyConfig], torch.nn.Module]
    advantages: Advantages
    loss: Loss


@torch.no_grad()
def collect_rollout(method: OnPolicyMethod, model, ref_model, reward_model, tokenizer,
                    prompts: list[str], cfg: OnPolicyConfig, beta: float,
                    generator: torch.Generator, score_fn=None) -> Rollout:
    """Steps 1-4 of an iteration: sample, score, log-probs, the method's advantages.

    `score_fn`, if given, replaces the reward model (pass `reward_model=None`): a function
    (prompt_ids, prompt_mask, response_ids, mask) -> scores (B,), e.g. an exact reward.
    """
    device = next(model.parameters()).device
    # 1. sample responses with the KV cache
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
    with sampling_policy(model.policy) as policy:  # full weights, also under FSDP
        s = sample(policy, prompt_ids, prompt_mask, cfg.max_new_tokens, tokenizer.eos_token_id,
                   tokenizer.pad_token_id, cfg.temperature, cfg.top_k, generator=generator)
    # the sampler's log-probs are pi_old's, at the same temperature and, in full precision,
    # equal to a forward pass's up to float rounding: without a critic to evaluate, the
    # policy needs no pass of its own
    own = isinstance(model, CriticFreePolicy) and cfg.mixed_precision == "no"
    return score_rollout(method, model, ref_model, reward_model, s, cfg, beta, score_fn,
                         sampler_logprobs=own)


@torch.no_grad()
def score_rollout(method: OnPolicyMethod, model, ref_model, reward_model, s: Samples,
                  cfg: OnPolicyConfig, beta: float, score_fn=None,
                  sampler_logprobs: bool = False) -> Rollout:
    """Steps 2-4 of an iteration on sampled responses `s`, whichever policy sampled them
    (`rlhf-toy inspect` scores one set of responses under several methods).

    `sampler_logprobs`: `s` was sampled by `model`'s policy in full precision and `model`
    has no critic: take the old log-probs from `s.logprobs` instead of a forward pass.
    """
    inputs = (s.prompt_ids, s.prompt_mask, s.response_ids, s.mask)
    # 2. score: the reward model reads the last real token; a cut response pays a penalty
    scores = (reward_scores(reward_model, *inputs) if score_fn is None
              else score_fn(*inputs)).float()
    raw_scores = scores - cfg.missing_eos_penalty * (~s.ended_with_eos).float()
    # an untrained critic turns a score shared by every response into a length bias; with
    # several completions per prompt, each prompt's own mean (a reward model trained on
    # pairs knows each prompt's scores only up to a constant)
    scores = center_scores(raw_scores, cfg.num_generations) if cfg.center_scores else raw_scores
    # 3. old log-probs (and values) in one pass, reference log-probs
    mask = s.mask.float()
    if sampler_logprobs:
        logprobs, values = s.logprobs, None  # already 0 on padding
    else:
        logits, values = model(*inputs, temperature=cfg.temperature)
        logprobs = logprobs_from_logits(logits, s.response_ids) * mask
    ref_logits = response_logits(ref_model, *inputs, temperature=cfg.temperature)
    ref_logprobs = logprobs_from_logits(ref_logits, s.response_ids) * mask
    batch = Rollout(s.prompt_ids, s.prompt_mask, s.response_ids, mask, logprobs, ref_logprobs,
                    scores, values=None if values is None else values.float() * mask,
                    raw_scores=raw_scores)
    # 4. advantages, the algorithm's own
    return method.advantages(batch, cfg, beta)


def update(method: OnPolicyMethod, model, optimizer, acc, batch: Rollout, cfg: OnPolicyConfig,
           beta: float, generator: torch.Generator) -> dict[str, float]:
    """Step 5: `ppo_epochs` passes of the method's loss over shuffled minibatches."""
    stats: dict[str, list[float]] = {}
    n = batch.mask.shape[0]
    micro = cfg.mini_batch_size // cfg.gradient_accumulation_steps
    updated = False  # has an optimizer step of this call changed the model yet?
    params = list(model.parameters())
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(n, generator=generator).to(batch.mask.device)
        shuffled = batch.select(perm)  # one gather per epoch; its minibatches are views
        for start in range(0, n, micro):
            mb = shuffled.select(slice(start, start + micro))
            with acc.accumulate(model):
                logits, values = model(mb.prompt_ids, mb.prompt_mask, mb.response_ids, mb.mask,
                                       temperature=cfg.temperature)
                logprobs = logprobs_from_logits(logits, mb.response_ids)
                loss, losses, mb_stats = method.loss(logprobs, values, mb, cfg, beta)
                # without an entropy bonus the entropy is only logged: no backward through it
                with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.ent_coef != 0):
                    entropy = masked_mean(entropy_from_logits(logits.float()), mb.mask)
                loss = loss - cfg.ent_coef * entropy
                acc.backward(loss)
                grad_norm = (clip_grad_norm(acc, params, cfg.max_grad_norm)
                             if acc.sync_gradients else None)
                # one sync for the logged losses and the finite check, before the step:
                # a non-finite update is never applied
                logged = finite_or_raise(updated, **losses, entropy=entropy, loss=loss,
                                         grad_norm=grad_norm)
                optimizer_step(acc, optimizer)
                updated = updated or acc.sync_gradients
            for k, v in {**mb_stats, **logged}.items():
                stats.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in stats.items()}


def learning_rate(cfg: OnPolicyConfig, it: int) -> float:
    """The learning rate of iteration `it` (1-based): a linear warm-up over `warmup_steps`
    iterations, then constant or, with `lr_scheduler_type` linear, decaying as DPO's."""
    return scheduled_learning_rate(cfg, it, cfg.warmup_steps)


class NonFiniteUpdate(Exception):
    """A non-finite loss or gradient norm in `update`, caught before its optimizer step.

    Attributes: quantity (its name); updated (whether earlier minibatches of this
    iteration already changed the model)."""

    def __init__(self, quantity: str, updated: bool):
        super().__init__(quantity)
        self.quantity, self.updated = quantity, updated


def finite_or_raise(updated: bool, **scalars: torch.Tensor | None) -> dict[str, float]:
    """The scalars as floats (one device sync); `NonFiniteUpdate` if one is NaN or inf.
    All but `loss` and `grad_norm` are returned (the logged ones)."""
    names = [k for k, v in scalars.items() if v is not None]
    # plain: under FSDP2 the gradient norm is a DTensor
    floats = torch.stack([plain(scalars[k]).detach().float() for k in names]).tolist()
    for name, value in zip(names, floats, strict=True):
        if not math.isfinite(value):
            raise NonFiniteUpdate(name, updated)
    return {k: v for k, v in zip(names, floats, strict=True) if k not in ("loss", "grad_norm")}


# Diagnostics far from their usual range, each warned about once per run: (metric, test,
# message). Usual values: clip_frac 0.05-0.3, approx_kl < 0.1 (per token).
HEALTH_CHECKS = (
    ("kl", lambda v: v < -0.05, "mean KL to the reference is negative (%.3f): a sign of a "
                                "mismatch between sampling and scoring log-probs"),
    ("clip_frac", lambda v: v > 0.5, "clip fraction is far above normal (%.3f > 0.5): the "
                                     "policy moves too far per update; lower learning_rate"),
    ("approx_kl", lambda v: v > 1.0, "approximate KL between updates is far above normal "
                                     "(%.3f > 1.0): lower learning_rate or ppo_epochs"),
    ("eos_frac", lambda v: v < 0.5, "most responses hit the length limit without EOS (EOS "
                                    "fraction %.3f): raise max_new_tokens or missing_eos_penalty"),
)


def warn_unhealthy(row: dict[str, float], it: int, warned: set[str]) -> None:
    """Log each `HEALTH_CHECKS` warning the first time its metric leaves the usual range."""
    for metric, unusual, message in HEALTH_CHECKS:
        if metric in row and metric not in warned and unusual(row[metric]):
            logger.warning(message + " at iteration %d", row[metric], it)
            warned.add(metric)


def rollout_stats(batch: Rollout, gold: list[float] | None,
                  eos_token_id: int) -> dict[str, float]:
    """Per-iteration diagnostics of a rollout (gold, where there is one, is logged only,
    never trained on); `explained_var` of the critic where there is one."""
    kl_seq = ((batch.logprobs - batch.ref_logprobs) * batch.mask).sum(-1)  # (B, T) -> (B,)
    row = {"score": batch.raw_scores.mean().item(),
           **({"gold": sum(gold) / len(gold)} if gold is not None else {}),
           "kl": kl_seq.mean().item()}
    if batch.values is not None:
        residual_var = masked_var(batch.returns - batch.values, batch.mask)
        explained = 1.0 - residual_var / masked_var(batch.returns, batch.mask).clamp(min=1e-8)
        row["explained_var"] = explained.item()
    last = batch.response_ids.gather(1, last_token_index(batch.mask)[:, None])  # (B, 1)
    return {**row, "response_len": batch.mask.sum(-1).mean().item(),
            "eos_frac": (last == eos_token_id).float().mean().item()}


def iteration_prompts(task, cfg: OnPolicyConfig, it_seed: int) -> list[str]:
    """batch_size / num_generations prompts of `task` (a task, or a user's `datafiles.PromptList`),
    each repeated num_generations times in a row (a group's completions are contiguous)."""
    prompts = task.sample_prompts(cfg.batch_size // cfg.num_generations, random.Random(it_seed))
    return [p for p in prompts for _ in range(cfg.num_generations)]


def critic_free_policy(cfg: OnPolicyConfig) -> CriticFreePolicy:
    """The trainable model of a critic-free method: the SFT policy alone."""
    return CriticFreePolicy(load_policy(policy_dir(cfg), policy_flag(cfg)))


def sequence_advantages(batch: Rollout, advantages: torch.Tensor) -> torch.Tensor:
    """One advantage per completion (B,) on each of its real tokens: (B, T)."""
    return advantages[:, None] * batch.mask  # (B,) -> (B, T)


def build_models(method: OnPolicyMethod, cfg: OnPolicyConfig, acc):
    """The trainable model (prepared by `acc`, and unwrapped), its AdamW optimizer, the
    frozen reference policy, the frozen reward model and the tokenizer."""
    reward_model = freeze(load_reward_model(cfg.reward_dir))
    model = method.build_model(cfg)
    model.policy = apply_lora(model.policy, cfg, policy_dir(cfg))
    enable_checkpointing(model, cfg)  # the policy's and a separate critic's
    # with LoRA, the policy's base with the adapter disabled (one copy of the base weights)
    ref_model = reference_model(model.policy, lambda: load_policy(policy_dir(cfg),
                                                                  policy_flag(cfg)))
    tokenizer = load_tokenizer(policy_dir(cfg))
    source = f"{policy_flag(cfg)} {policy_dir(cfg)!r}"
    check_vocab(tokenizer, source, {source: model.policy,
                                    f"--reward_dir {cfg.reward_dir!r}": reward_model})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  # one fused kernel per step (FSDP keeps foreach)
                                  fused=acc.distributed_type != DistributedType.FSDP)
    model, optimizer = acc.prepare(model, optimizer)
    return (model, acc.unwrap_model(model), optimizer, ref_model.to(acc.device),
            reward_model.to(acc.device), tokenizer)


def load_audit_model(cfg: OnPolicyConfig):
    """The reward stage's frozen audit reward model, or None if it trained none."""
    path = os.path.join(cfg.reward_dir, AUDIT_DIR)
    return freeze(load_reward_model(path)) if os.path.isdir(path) else None


def eval_row(ev: dict, monitor: OveroptimizationMonitor, it: int) -> dict[str, float]:
    """The metrics.jsonl fields of one held-out evaluation; feeds the over-optimization
    monitor and warns once when it fires."""
    row = {**({"eval_gold": ev["gold_reward"]} if "gold_reward" in ev else {}),
           "eval_proxy": ev["proxy_reward"], "eval_kl": ev["kl_to_ref"]}
    if "audit_reward" in ev:
        row["eval_audit"] = ev["audit_reward"]
    if monitor.update(it, ev["proxy_reward"], ev["kl_to_ref"], ev.get("audit_reward")):
        logger.warning(monitor.message())
    return row


# the over-optimization indicator's KL budget, in units of the target KL
KL_BUDGET_FACTOR = 3.0


def task_target_kl(task) -> float:
    """The task's own target KL (`Task.target_kl`), else `DEFAULT_TARGET_KL` (also for a
    user's prompts, `task` None)."""
    proposed = getattr(task, "target_kl", None)
    return DEFAULT_TARGET_KL if proposed is None else float(proposed)


def target_kl(cfg: OnPolicyConfig, task) -> float:
    """The adaptive controller's target: `--target_kl` if given, else the task's."""
    return cfg.target_kl if cfg.target_kl is not None else task_target_kl(task)


def kl_budget(cfg: OnPolicyConfig, task) -> float:
    """The indicator's KL budget: `KL_BUDGET_FACTOR` x the adaptive controller's target, or
    x the task's target KL for a stage without the controller (fixed beta)."""
    return KL_BUDGET_FACTOR * (target_kl(cfg, task) if cfg.adaptive_kl else task_target_kl(task))


def run_onpolicy(cfg: OnPolicyConfig, method: OnPolicyMethod) -> dict:
    """Train with `method` for `cfg.max_steps` iterations; write the model, `metrics.jsonl`
    and `summary.json` (gold/proxy before and after, KL to the reference, wall time)."""
    acc, t0 = start_stage(cfg, method.stage)
    # prompts from the task (with its gold reward), or from prompts_path (no gold)
    task = None if cfg.prompts_path else get_task(cfg.task)
    if task is not None:
        check_context(policy_dir(cfg), task.max_prompt_tokens, cfg.max_new_tokens,
                      policy_flag(cfg))
    model, unwrapped, optimizer, ref_model, reward_model, tokenizer = build_models(method, cfg,
                                                                                  acc)
    prompt_source, held_out = stage_prompts(cfg, task, tokenizer,
                                            context_length(ref_model.config))
    kl_ctl = (AdaptiveKLController(cfg.beta, target_kl(cfg, task), cfg.kl_horizon)
              if cfg.adaptive_kl else FixedKLController(cfg.beta))
    audit_model = load_audit_model(cfg)
    audit_model = audit_model.to(acc.device) if audit_model is not None else None
    monitor = OveroptimizationMonitor(cfg.overopt_drop, kl_budget=kl_budget(cfg, task))
    args = SamplingArgs(cfg.max_new_tokens, cfg.temperature, cfg.top_k)

    def evaluate() -> dict:
        with sampling_policy(unwrapped.policy) as policy:
            return evaluate_policy(policy, tokenizer, task, held_out, args, cfg.seed,
                                   reward_model, ref_model, audit_model)

    ckpt, resumed, log = open_run(cfg, method.stage, acc, unwrapped, optimizer)
    if resumed:
        kl_ctl.load_state_dict(resumed["kl_ctl"])
        if "monitor" in resumed:  # absent in checkpoints written before the indicator
            monitor.load_state_dict(resumed["monitor"])
        before, start, warned = resumed["before"], resumed["step"], set(resumed["warned"])
    else:
        before, start, warned = evaluate(), 0, set()
        eval_row(before, monitor, 0)

    def state() -> dict:  # what a checkpoint holds besides weights, optimizer and RNG
        return {"kl_ctl": kl_ctl.state_dict(), "before": before, "warned": sorted(warned),
                "monitor": monitor.state_dict()}

    bar = progress(cfg.max_steps, method.stage, acc.is_main_process, initial=start)
    for it in range(start + 1, cfg.max_steps + 1):
        # every iteration's draws are a function of (seed, iteration, process): resumable
        it_seed = cfg.seed * 1_000_003 + it * 7919 + acc.process_index
        gen = torch.Generator(device=acc.device).manual_seed(it_seed)
        prompts = iteration_prompts(prompt_source, cfg, it_seed)
        unwrapped.eval()
        batch = collect_rollout(method, unwrapped, ref_model, reward_model, tokenizer, prompts,
                                cfg, kl_ctl.value, gen)
        bad = first_non_finite(scores=batch.scores, logprobs=batch.logprobs,
                               ref_logprobs=batch.ref_logprobs, values=batch.values,
                               advantages=batch.advantages)
        if bad:  # nothing of this iteration is applied yet: save the state after it - 1
            raise ckpt.fail(bad, it, state)
        gold = None if task is None else task.gold_batch(
            prompts, decode_responses(tokenizer, batch.response_ids, batch.mask))
        if cfg.inspect_steps and it % cfg.inspect_steps == 0 and acc.is_main_process:
            write_training_snapshot(cfg.output_dir, it, batch, tokenizer, prompts, gold, cfg,
                                    kl_ctl.value, stage=method.stage)
        model.train()
        for group in optimizer.param_groups:  # a function of it: resumable
            group["lr"] = learning_rate(cfg, it)
        try:
            stats = update(method, model, optimizer, acc, batch, cfg, kl_ctl.value,
                           torch.Generator().manual_seed(it_seed))
        except NonFiniteUpdate as exc:
            raise ckpt.fail(exc.quantity, it, None if exc.updated else state) from None
        row = {**rollout_stats(batch, gold, tokenizer.eos_token_id), **stats, "beta": kl_ctl.value}
        kl_ctl.update(row["kl"], cfg.batch_size)
        warn_unhealthy(row, it, warned)
        if cfg.eval_steps and it % cfg.eval_steps == 0 and it < cfg.max_steps:
            row.update(eval_row(evaluate(), monitor, it))
        if it % cfg.logging_steps == 0 or it == cfg.max_steps or "eval_proxy" in row:
            log.write(it, **row)
        ckpt.maybe_save(it, state)
        bar.set_postfix(score=f"{row['score']:.2f}",
                        **({"gold": f"{row['gold']:.2f}"} if "gold" in row else {}),
                        kl=f"{row['kl']:.2f}")
        bar.update(1)
    bar.close()
    return finish(cfg, acc, unwrapped, tokenizer, log, before, evaluate(), monitor, t0,
                  target=getattr(kl_ctl, "target", None))


def finish(cfg: OnPolicyConfig, acc, unwrapped, tokenizer, log, before: dict, after: dict,
           monitor: OveroptimizationMonitor, t0: float, target: float | None = None) -> dict:
    """The summary (the keys every on-policy and preference stage writes, and the
    over-optimization indicator's `overoptimization`; `target_kl`, the adaptive
    controller's target, where there is one); the main process saves the model, the
    tokenizer and `summary.json`."""
    final = eval_row(after, monitor, cfg.max_steps)
    summary = {**gold_summary(before.get("gold_reward"), after.get("gold_reward")),
               "proxy_reward_before": before["proxy_reward"],
               "proxy_reward_after": after["proxy_reward"], "kl_to_ref": after["kl_to_ref"],
               "response_len": after["response_len"], "eos_frac": after["eos_frac"],
               "overoptimization": monitor.summary(), "wall_s": time.perf_counter() - t0}
    if target is not None:
        summary["target_kl"] = target
    if acc.is_main_process:
        log.write(cfg.max_steps, **final)
    finish_stage(cfg, acc, unwrapped, tokenizer, summary)
    return summary
