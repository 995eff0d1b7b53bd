"""Stage `ppo`: PPO with a per-token KL penalty to a frozen reference model.

Shapes: B rollouts per iteration, P prompt length, T response length, V vocabulary.

Each iteration: 1 rollout (sample with a KV cache), 2 score (reward model at the last
real token), 3 KL-penalized per-token rewards, 4 GAE, 5 PPO epochs over shuffled
minibatches. The math is `rlhf_toy.core`; this file only wires it to the models.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType

from rlhf_toy.config import PPOConfig
from rlhf_toy.core import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae,
    last_token_index,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    ppo_policy_loss,
    ppo_value_loss,
    shape_rewards,
    whiten,
)
from rlhf_toy.evaluate import SamplingArgs, eval_prompts, evaluate_policy
from rlhf_toy.models import (
    PolicyWithCritic,
    PolicyWithValueHead,
    RewardCritic,
    freeze,
    load_policy,
    load_reward_model,
    response_logits,
    reward_scores,
)
from rlhf_toy.rollout import decode_responses, encode_prompts, sample
from rlhf_toy.tasks import get_task
from rlhf_toy.tokenizer import load_tokenizer
from rlhf_toy.train.common import (
    check_context,
    check_vocab,
    first_non_finite,
    open_run,
    progress,
    start_stage,
    write_json,
)
from rlhf_toy.train.snapshots import write_training_snapshot

logger = logging.getLogger(__name__)


@dataclass
class PPOBatch:
    """One iteration's rollouts and everything the update needs.

    Attributes:
        prompt_ids, prompt_mask: (B, P) left-padded prompts.
        response_ids, mask: (B, T) right-padded responses; mask 1 on real tokens (EOS too).
        logprobs: (B, T) log pi_old(a_t | s_t) at the sampling temperature.
        ref_logprobs: (B, T) the same under the frozen reference.
        values: (B, T) V_old(s_t) from the critic.
        scores: (B,) reward-model scores (minus the missing-EOS penalty).
        rewards: (B, T) per-token rewards: -beta * kl_t, plus the score on the last token.
        advantages: (B, T) GAE advantages (whitened if configured).
        returns: (B, T) advantages (before whitening) + values: the critic's targets.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def select(self, index: torch.Tensor) -> PPOBatch:
        return PPOBatch(*(getattr(self, f)[index] for f in self.__dataclass_fields__))


def build_actor_critic(cfg: PPOConfig):
    """The trainable policy with its critic, the frozen reference and the frozen reward model."""
    reward_model = freeze(load_reward_model(cfg.reward_dir))
    if cfg.critic == "value_head":
        model = PolicyWithValueHead(load_policy(cfg.sft_dir))
    else:
        model = PolicyWithCritic(load_policy(cfg.sft_dir),
                                 RewardCritic(load_reward_model(cfg.reward_dir)))
    return model, freeze(load_policy(cfg.sft_dir)), reward_model


@torch.no_grad()
def collect_rollout(model, ref_model, reward_model, tokenizer, prompts: list[str],
                    cfg: PPOConfig, beta: float, generator: torch.Generator,
                    score_fn=None) -> PPOBatch:
    """Steps 1-4 of an iteration: sample, score, shape rewards, GAE.

    `score_fn`, if given, replaces the reward model (pass `reward_model=None`): a function
    (prompt_ids, prompt_mask, response_ids, mask) -> scores (B,), e.g. an exact reward.
    """
    device = next(model.parameters()).device
    # 1. rollout: sample responses with the KV cache
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
    s = sample(model.policy, prompt_ids, prompt_mask, cfg.max_new_tokens, tokenizer.eos_token_id,
               tokenizer.pad_token_id, cfg.temperature, cfg.top_k, generator=generator)
    inputs = (s.prompt_ids, s.prompt_mask, s.response_ids, s.mask)
    # 2. score: the reward model reads the last real token; a cut response pays a penalty
    scores = (reward_scores(reward_model, *inputs) if score_fn is None
              else score_fn(*inputs)).float()
    scores = scores - cfg.missing_eos_penalty * (~s.ended_with_eos).float()
    if cfg.whiten_scores:
        scores = whiten(scores, torch.ones_like(scores))
    # 3. old log-probs and values (one pass), reference log-probs, KL-penalized rewards
    mask = s.mask.float()
    logits, values = model(*inputs, temperature=cfg.temperature)
    logprobs = logprobs_from_logits(logits, s.response_ids) * mask
    ref_logits = response_logits(ref_model, *inputs, temperature=cfg.temperature)
    ref_logprobs = logprobs_from_logits(ref_logits, s.response_ids) * mask
    rewards = shape_rewards(scores, logprobs, ref_logprobs, mask, beta, cfg.kl_estimator)
    # 4. GAE: the episode ends at the last real token (EOS, or the length limit)
    values = values.float() * mask
    dones = F.one_hot(last_token_index(mask), mask.shape[1]).float()  # (B,) -> (B, T)
    advantages, returns = gae(rewards, values, dones, cfg.gamma, cfg.lam, mask)
    if cfg.whiten_advantages:
        advantages = whiten(advantages, mask)
    return PPOBatch(s.prompt_ids, s.prompt_mask, s.response_ids, mask, logprobs, ref_logprobs,
                    values, scores, rewards, advantages, returns)


def ppo_update(model, optimizer, acc, batch: PPOBatch, cfg: PPOConfig,
               generator: torch.Generator) -> dict[str, float]:
    """Step 5: `ppo_epochs` passes of clipped policy and value updates over minibatches."""
    stats: dict[str, list[float]] = {}
    n = batch.mask.shape[0]
    micro = cfg.mini_batch_size // cfg.gradient_accumulation_steps
    updated = False  # has an optimizer step of this call changed the model yet?
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(n, generator=generator).to(batch.mask.device)
        for start in range(0, n, micro):
            mb = batch.select(perm[start: start + micro])
            with acc.accumulate(model):
                logits, values = model(mb.prompt_ids, mb.prompt_mask, mb.response_ids, mb.mask,
                                       temperature=cfg.temperature)
                logprobs = logprobs_from_logits(logits, mb.response_ids)
                pg_loss, pg_stats = ppo_policy_loss(logprobs, mb.logprobs, mb.advantages,
                                                    mb.mask, cfg.clip_range)
                vf_loss, vf_stats = ppo_value_loss(values.float(), mb.values, mb.returns,
                                                   mb.mask, cfg.clip_range_value)
                # without an entropy bonus the entropy is only logged: no backward through it
                with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.ent_coef != 0):
                    entropy = masked_mean(entropy_from_logits(logits.float()), mb.mask)
                loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * entropy
                acc.backward(loss)
                grad_norm = (acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                             if acc.sync_gradients else None)
                # one sync for the logged losses and the finite check, before the step:
                # a non-finite update is never applied
                logged = finite_or_raise(updated, policy_loss=pg_loss, value_loss=vf_loss,
                                         entropy=entropy, loss=loss, grad_norm=grad_norm)
                optimizer.step()
                optimizer.zero_grad()
                updated = updated or acc.sync_gradients
            for k, v in {**pg_stats, **vf_stats, **logged}.items():
                stats.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in stats.items()}


class NonFiniteUpdate(Exception):
    """A non-finite loss or gradient norm in `ppo_update`, caught before its optimizer step.

    Attributes: quantity (its name); updated (whether earlier minibatches of this
    iteration already changed the model)."""

    def __init__(self, quantity: str, updated: bool):
        super().__init__(quantity)
        self.quantity, self.updated = quantity, updated


def finite_or_raise(updated: bool, **scalars: torch.Tensor | None) -> dict[str, float]:
    """The scalars as floats (one device sync); `NonFiniteUpdate` if one is NaN or inf.
    Only `policy_loss`, `value_loss` and `entropy` are returned (the logged ones)."""
    names = [k for k, v in scalars.items() if v is not None]
    floats = torch.stack([scalars[k].detach().float() for k in names]).tolist()
    for name, value in zip(names, floats, strict=True):
        if not math.isfinite(value):
            raise NonFiniteUpdate(name, updated)
    return {k: v for k, v in zip(names, floats, strict=True)
            if k in ("policy_loss", "value_loss", "entropy")}


# Diagnostics far from their usual range, each warned about once per run: (metric, test,
# message). Usual PPO values: clip_frac 0.05-0.3, approx_kl < 0.1 (per token).
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


def rollout_stats(batch: PPOBatch, gold: list[float], eos_token_id: int) -> dict[str, float]:
    """Per-iteration diagnostics of a rollout (gold is logged only, never trained on)."""
    kl_seq = ((batch.logprobs - batch.ref_logprobs) * batch.mask).sum(-1)  # (B, T) -> (B,)
    residual_var = masked_var(batch.returns - batch.values, batch.mask)
    explained = 1.0 - residual_var / masked_var(batch.returns, batch.mask).clamp(min=1e-8)
    last = batch.response_ids.gather(1, last_token_index(batch.mask)[:, None])  # (B, 1)
    return {"score": batch.scores.mean().item(), "gold": sum(gold) / len(gold),
            "kl": kl_seq.mean().item(), "explained_var": explained.item(),
            "response_len": batch.mask.sum(-1).mean().item(),
            "eos_frac": (last == eos_token_id).float().mean().item()}


def run_ppo(cfg: PPOConfig) -> dict:
    acc, t0 = start_stage(cfg, "ppo")
    task = get_task(cfg.task)
    check_context(cfg.sft_dir, task.max_prompt_tokens, cfg.max_new_tokens)
    model, ref_model, reward_model = build_actor_critic(cfg)
    tokenizer = load_tokenizer(cfg.sft_dir)
    check_vocab(tokenizer, cfg.sft_dir, model.policy, reward_model)
    kl_ctl = (AdaptiveKLController(cfg.beta, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl
              else FixedKLController(cfg.beta))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  # one fused kernel per step (FSDP keeps foreach)
                                  fused=acc.distributed_type != DistributedType.FSDP)
    model, optimizer = acc.prepare(model, optimizer)
    ref_model, reward_model = ref_model.to(acc.device), reward_model.to(acc.device)
    unwrapped = acc.unwrap_model(model)
    args = SamplingArgs(cfg.max_new_tokens, cfg.temperature, cfg.top_k)
    held_out = eval_prompts(task, cfg.n_eval_prompts)

    def evaluate() -> dict:
        return evaluate_policy(unwrapped.policy, tokenizer, task, held_out, args, cfg.seed,
                               reward_model, ref_model)

    ckpt, resumed, log = open_run(cfg, "ppo", acc, unwrapped, optimizer)
    if resumed:
        kl_ctl.load_state_dict(resumed["kl_ctl"])
        before, start, warned = resumed["before"], resumed["step"], set(resumed["warned"])
    else:
        before, start, warned = evaluate(), 0, set()

    def state() -> dict:  # what a checkpoint holds besides weights, optimizer and RNG
        return {"kl_ctl": kl_ctl.state_dict(), "before": before, "warned": sorted(warned)}

    bar = progress(cfg.max_steps, "ppo", acc.is_main_process, initial=start)
    for it in range(start + 1, cfg.max_steps + 1):
        # every iteration's draws are a function of (seed, iteration, process): resumable
        it_seed = cfg.seed * 1_000_003 + it * 7919 + acc.process_index
        gen = torch.Generator(device=acc.device).manual_seed(it_seed)
        prompts = task.sample_prompts(cfg.batch_size, random.Random(it_seed))
        unwrapped.eval()
        batch = collect_rollout(unwrapped, ref_model, reward_model, tokenizer, prompts, cfg,
                                kl_ctl.value, gen)
        bad = first_non_finite(scores=batch.scores, logprobs=batch.logprobs,
                               ref_logprobs=batch.ref_logprobs, values=batch.values,
                               advantages=batch.advantages)
        if bad:  # nothing of this iteration is applied yet: save the state after it - 1
            raise ckpt.fail(bad, it, state)
        gold = task.gold_batch(prompts, decode_responses(tokenizer, batch.response_ids,
                                                         batch.mask))
        if cfg.inspect_steps and it % cfg.inspect_steps == 0 and acc.is_main_process:
            write_training_snapshot(cfg.output_dir, it, batch, tokenizer, prompts, gold, cfg,
                                    kl_ctl.value)
        model.train()
        try:
            update = ppo_update(model, optimizer, acc, batch, cfg,
                                torch.Generator().manual_seed(it_seed))
        except NonFiniteUpdate as exc:
            raise ckpt.fail(exc.quantity, it, None if exc.updated else state) from None
        row = {**rollout_stats(batch, gold, tokenizer.eos_token_id), **update, "beta": kl_ctl.value}
        kl_ctl.update(row["kl"], cfg.batch_size)
        warn_unhealthy(row, it, warned)
        if cfg.eval_steps and it % cfg.eval_steps == 0 and it < cfg.max_steps:
            ev = evaluate()
            row.update(eval_gold=ev["gold_reward"], eval_proxy=ev["proxy_reward"],
                       eval_kl=ev["kl_to_ref"])
        if it % cfg.logging_steps == 0 or it == cfg.max_steps or "eval_gold" in row:
            log.write(it, **row)
        ckpt.maybe_save(it, state)
        bar.set_postfix(score=f"{row['score']:.2f}", gold=f"{row['gold']:.2f}",
                        kl=f"{row['kl']:.2f}")
        bar.update(1)
    bar.close()

    after = evaluate()
    summary = {"gold_reward_before": before["gold_reward"], "gold_reward_after": after["gold_reward"],
               "proxy_reward_before": before["proxy_reward"],
               "proxy_reward_after": after["proxy_reward"], "kl_to_ref": after["kl_to_ref"],
               "response_len": after["response_len"], "eos_frac": after["eos_frac"],
               "wall_s": time.perf_counter() - t0}
    if acc.is_main_process:
        log.write(cfg.max_steps, eval_gold=after["gold_reward"], eval_proxy=after["proxy_reward"],
                  eval_kl=after["kl_to_ref"])
        unwrapped.save_pretrained(cfg.output_dir)
        tokenizer.save_pretrained(cfg.output_dir)
        write_json(os.path.join(cfg.output_dir, "summary.json"), summary)
    return summary
