"""Per-token records of rollouts (what `rlhf-toy inspect` shows), and the snapshots a PPO
run writes of them while it trains (`--inspect_steps`).

Shapes: B rollouts, T response length.
"""

from __future__ import annotations

import os

import torch

from rlhf_toy.core import kl_per_token
from rlhf_toy.rollout import decode_responses
from rlhf_toy.train.common import write_json
from rlhf_toy.train.rundir import commit_run

CRITIC_COLUMNS = ("value", "return", "advantage")
TRAINING_SAMPLES = 4  # rollouts per `inspect_steps` snapshot during PPO training


def token_records(tokenizer, prompts: list[str], gold: list[float] | None, scores: torch.Tensor,
                  response_ids: torch.Tensor, mask: torch.Tensor,
                  columns: dict[str, torch.Tensor | None]) -> list[dict]:
    """One record per response: its texts and scalars, and each column cut to its real tokens.

    Args:
        prompts, gold: B prompts and gold rewards (gold None: there is no gold reward).
        scores: (B,) the scores that enter the rewards.
        response_ids, mask: (B, T) right-padded responses, mask 1 on real tokens.
        columns: name -> (B, T) tensor, or None for a column that does not apply.
    """
    responses = decode_responses(tokenizer, response_ids, mask)
    records = []
    for i, prompt in enumerate(prompts):
        n = int(mask[i].sum())
        rec = {"prompt": prompt, "response": responses[i], "score": float(scores[i]),
               "gold": None if gold is None else float(gold[i]),
               "token": tokenizer.convert_ids_to_tokens(response_ids[i, :n].tolist())}
        for name, x in columns.items():
            rec[name] = None if x is None else x[i, :n].float().tolist()
        records.append(rec)
    return records


def ppo_records(batch, tokenizer, prompts: list[str], gold: list[float], kl_estimator: str,
                advantages: torch.Tensor) -> list[dict]:
    """Records of an on-policy `Rollout`; `advantages` (B, T) as they should be shown (raw GAE
    ones for PPO, not whitened)."""
    kl = kl_per_token(batch.logprobs, batch.ref_logprobs, kl_estimator) * batch.mask  # (B, T)
    records = token_records(tokenizer, prompts, gold, batch.scores, batch.response_ids,
                            batch.mask, {"logprob": batch.logprobs,
                                         "ref_logprob": batch.ref_logprobs, "kl": kl,
                                         "reward": batch.rewards, "value": batch.values,
                                         "return": batch.returns, "advantage": advantages})
    if batch.raw_scores is not None:  # before centering or whitening
        for rec, raw in zip(records, batch.raw_scores.tolist(), strict=True):
            rec["rm_score"] = raw
    return records


def write_training_snapshot(output_dir: str, step: int, batch, tokenizer, prompts: list[str],
                            gold: list[float], cfg, beta: float,
                            n: int = TRAINING_SAMPLES, stage: str = "ppo") -> str:
    """Write OUTPUT_DIR/inspect/step_<step>.json: the first `n` rollouts of an iteration.

    With a critic the advantages are recomputed raw as `returns - values` (the batch's may
    be whitened); critic-free rollouts show their own advantages (value/return may be None).
    """
    commit_run(output_dir)  # the run's first output may be this snapshot
    head = batch.select(torch.arange(min(n, len(prompts)), device=batch.mask.device))
    raw = head.advantages if head.values is None else head.returns - head.values
    samples = ppo_records(head, tokenizer, prompts[:n], None if gold is None else gold[:n],
                          cfg.kl_estimator, raw)
    os.makedirs(os.path.join(output_dir, "inspect"), exist_ok=True)
    path = os.path.join(output_dir, "inspect", f"step_{step}.json")
    write_json(path, {"stage": stage, "checkpoint": output_dir, "step": step, "beta": beta,
                      "gamma": getattr(cfg, "gamma", None), "lam": getattr(cfg, "lam", None),
                      "kl_estimator": cfg.kl_estimator, "samples": samples})
    return path
