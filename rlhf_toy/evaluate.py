"""Measure a policy against the truth: gold reward, proxy reward, KL to the reference.

Shapes: B batch, P prompt length, T response length.

All methods are evaluated on the same fixed held-out prompts (`eval_prompts`) with the
same sampling settings and seeds, so their numbers are comparable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from rlhf_toy.core import logprobs_from_logits
from rlhf_toy.models import response_logits, reward_scores
from rlhf_toy.rollout import Samples, decode_responses, encode_prompts, sample

EVAL_PROMPT_SEED = 20_231_129
NO_GOLD = "no gold reward"  # what summaries and reports say where there is no gold reward


def eval_prompts(task, n: int) -> list[str]:
    """The fixed held-out prompt set (independent of the training seed)."""
    return task.sample_prompts(n, random.Random(EVAL_PROMPT_SEED))


@dataclass
class SamplingArgs:
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0


@torch.no_grad()
def sample_batched(policy, tokenizer, prompts: list[str], args: SamplingArgs, seed: int,
                   batch_size: int = 256) -> tuple[list[Samples], list[str]]:
    """Sample one response per prompt, in batches; returns (sample batches, response texts)."""
    device = next(policy.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    batches, texts = [], []
    for i in range(0, len(prompts), batch_size):
        ids, mask = encode_prompts(tokenizer, prompts[i: i + batch_size], device)
        s = sample(policy, ids, mask, args.max_new_tokens, tokenizer.eos_token_id,
                   tokenizer.pad_token_id, args.temperature, args.top_k, generator=gen)
        batches.append(s)
        texts.extend(decode_responses(tokenizer, s.response_ids, s.mask))
    return batches, texts


@torch.no_grad()
def sequence_logprob(model, s: Samples, temperature: float) -> torch.Tensor:
    """Sum over response tokens of log pi(a_t | s_t) under `model`: (B,)."""
    logits = response_logits(model, s.prompt_ids, s.prompt_mask, s.response_ids, s.mask,
                             temperature)
    return (logprobs_from_logits(logits, s.response_ids) * s.mask).sum(-1)  # (B, T) -> (B,)


@torch.no_grad()
def evaluate_policy(policy, tokenizer, task, prompts: list[str], args: SamplingArgs, seed: int,
                    reward_model=None, ref_model=None, audit_model=None) -> dict:
    """Sample once per prompt and measure.

    Returns:
        dict with `gold_reward` (mean gold), `response_len` (mean tokens, EOS included),
        `eos_frac`; with `reward_model`, `proxy_reward` (mean score); with `ref_model`,
        `kl_to_ref`: the sequence-level KL(pi || ref) estimated from the samples as the mean of
        sum_t (log pi - log ref) (the k1 estimator summed over the response); plus the
        per-sample lists `responses`, `gold`; with `audit_model` (a second reward model),
        `audit_reward` (its mean score). With `task` None (a user's prompts, no gold reward)
        `gold_reward` and `gold` are left out.
    """
    was_training = policy.training
    policy.eval()
    batches, texts = sample_batched(policy, tokenizer, prompts, args, seed)
    result = {
        "response_len": float(torch.cat([b.mask.sum(-1) for b in batches]).float().mean()),
        "eos_frac": float(torch.cat([b.ended_with_eos for b in batches]).float().mean()),
        "responses": texts,
    }
    if task is not None:
        gold = task.gold_batch(prompts, texts)
        result = {"gold_reward": sum(gold) / len(gold), **result, "gold": gold}
    for key, model in (("proxy_reward", reward_model), ("audit_reward", audit_model)):
        if model is not None:
            scores = torch.cat([reward_scores(model, b.prompt_ids, b.prompt_mask,
                                              b.response_ids, b.mask) for b in batches])
            result[key] = float(scores.float().mean())
    if ref_model is not None:
        kl = torch.cat([b.logprobs.sum(-1) - sequence_logprob(ref_model, b, args.temperature)
                        for b in batches])
        result["kl_to_ref"] = float(kl.mean())
    policy.train(was_training)
    return result


def gold_summary(before: float | None, after: float | None) -> dict:
    """The gold keys of a method's summary: `gold_reward_before`, `gold_reward_after`, or
    `gold: NO_GOLD` where there is no gold reward (None)."""
    if after is None:
        return {"gold": NO_GOLD}
    return {"gold_reward_before": before, "gold_reward_after": after}


def win_rate(gold_a: list[float], gold_b: list[float]) -> float:
    """Fraction of prompts where a's response beats b's under the gold reward (ties count 1/2)."""
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(gold_a, gold_b, strict=True)]
    return sum(wins) / len(wins)
