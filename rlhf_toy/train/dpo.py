"""Stage `dpo`: Direct Preference Optimization and its variants on the preference pairs.

Shapes: N pairs in a split, B pairs in a batch, P prompt length (left-padded),
T response length (right-padded, EOS included), V vocabulary.

The policy and the frozen reference both start from the SFT checkpoint. A response's
log-probability is summed over its tokens *including* the EOS that ends it, exactly as
TRL's `DPOTrainer` does. The reference never changes, so its log-probs are computed once
before training and cached (not at all for a reference-free loss): a step costs one
policy forward over the 2B sequences.

The loss is `core.PREFERENCE_LOSSES[cfg.loss_type]`, mean over pairs. The default,
`sigmoid`, is DPO (Rafailov et al. 2023, eq. 7): with
h = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)), `-log sigmoid(beta * h)`, and the
implicit reward of a response is `beta * (log pi - log ref)` (section 5). `ipo` (Azar et
al. 2023) squares the distance of the per-token h to 1 / (2 beta); `simpo` (Meng et al.
2024) needs no reference: `-log sigmoid(beta * (avg log pi(c) - avg log pi(r)) - gamma)`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType

from rlhf_toy.config import DPOConfig, policy_dir, policy_flag
from rlhf_toy.core import PREFERENCE_LOSSES, logprobs_from_logits
from rlhf_toy.data import select_batch, tokenize_preferences
from rlhf_toy.datafiles import load_preference_data, prefs_source, stage_prompts
from rlhf_toy.evaluate import SamplingArgs, evaluate_policy, gold_summary
from rlhf_toy.lora import apply_lora, enable_checkpointing, reference_model
from rlhf_toy.models import (
    context_length,
    freeze,
    load_policy,
    load_reward_model,
    response_logits,
)
from rlhf_toy.sharding import sampling_policy
from rlhf_toy.tasks import get_task
from rlhf_toy.tokenizer import load_tokenizer
from rlhf_toy.train.common import (
    MetricsLog,
    batch_indices,
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

EVAL_BATCH_SIZE = 256


@dataclass
class PreferenceTensors:
    """One split of preference pairs, tokenized once, with cached reference log-probs.

    Attributes:
        chosen, rejected: tokenized datasets (`data.tokenize_pairs`): `prompt_ids`,
            `prompt_mask` (N, P) and `response_ids`, `response_mask` (N, T); row i of
            each is the same pair.
        ref_chosen, ref_rejected: (N,) reference log-probs summed over response tokens;
            None when the loss is reference-free.
    """

    chosen: dict[str, torch.Tensor]
    rejected: dict[str, torch.Tensor]
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None
    _host_masks: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return self.chosen["prompt_ids"].shape[0]

    def select(self, index: torch.Tensor) -> tuple[dict, dict]:
        """`data.select_batch` of the chosen and the rejected rows `index`, with the
        all-padding columns found on host copies of the masks (made once), so that a
        step needs no device-to-host sync to size its batch."""
        if self._host_masks is None:
            self._host_masks = tuple((x["prompt_mask"].cpu(), x["response_mask"].cpu())
                                     for x in (self.chosen, self.rejected))
        host_index = index.cpu()
        device_index = index.to(self.chosen["prompt_ids"].device)
        out = []
        for data, (prompt_mask, response_mask) in zip((self.chosen, self.rejected),
                                                      self._host_masks, strict=True):
            p_keep = int(prompt_mask[host_index].sum(0).nonzero().min())  # first real column
            t_keep = int(response_mask[host_index].sum(0).nonzero().max()) + 1
            out.append({k: (v[:, p_keep:] if k.startswith("prompt") else v[:, :t_keep])[device_index]
                        for k, v in data.items()})
        return out[0], out[1]


def concat_pairs(chosen: dict, rejected: dict, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack a chosen and a rejected batch into one (2B, .) batch, chosen rows first.

    Responses are right-padded to the longer width; prompts must have the same width.
    """
    t = max(chosen["response_ids"].shape[1], rejected["response_ids"].shape[1])
    out = {}
    for key, pad in (("prompt_ids", pad_token_id), ("prompt_mask", 0),
                     ("response_ids", pad_token_id), ("response_mask", 0)):
        width = t if key.startswith("response") else chosen[key].shape[1]
        out[key] = torch.cat([F.pad(x[key], (0, width - x[key].shape[1]), value=pad)
                              for x in (chosen, rejected)])  # 2 x (B, W) -> (2B, W)
    return out


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over response tokens (EOS included) of log pi(a_t | s_t): (B,).

    Args:
        model: a causal LM (`GPT2LMHeadModel`, possibly wrapped by accelerate).
        batch: `prompt_ids`, `prompt_mask` (B, P), `response_ids`, `response_mask` (B, T).
    """
    logits = response_logits(model, batch["prompt_ids"], batch["prompt_mask"],
                             batch["response_ids"], batch["response_mask"])  # (B, T, V)
    logprobs = logprobs_from_logits(logits, batch["response_ids"])  # (B, T, V) -> (B, T)
    return (logprobs * batch["response_mask"].float()).sum(-1)  # (B, T) -> (B,)


def pair_logps(model, chosen: dict, rejected: dict,
               pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the chosen and rejected responses in one forward: (B,), (B,)."""
    logps = sequence_logps(model, concat_pairs(chosen, rejected, pad_token_id))  # (2B,)
    return logps.chunk(2)


@torch.no_grad()
def precompute_reference_logps(ref_model, chosen: dict, rejected: dict, pad_token_id: int,
                               batch_size: int = EVAL_BATCH_SIZE):
    """The frozen reference's summed log-probs of every pair, computed once.

    Args:
        ref_model: the reference policy (eval mode).
        chosen, rejected: tokenized datasets of N pairs (`data.tokenize_pairs`).
    Returns:
        (ref_chosen (N,), ref_rejected (N,)).
    """
    n = chosen["prompt_ids"].shape[0]
    ref_c, ref_r = [], []
    for start in range(0, n, batch_size):
        index = torch.arange(start, min(n, start + batch_size))
        c, r = pair_logps(ref_model, select_batch(chosen, index), select_batch(rejected, index),
                          pad_token_id)
        ref_c.append(c)
        ref_r.append(r)
    return torch.cat(ref_c), torch.cat(ref_r)


def preference_tensors(split, tokenizer, ref_model, device, truncate_prompts: bool = False,
                       what: str = "the preference pairs",
                       reference_free: bool = False) -> PreferenceTensors:
    """Tokenize a split of prompt/chosen/rejected pairs and cache its reference log-probs
    (none with `reference_free`).

    Pairs longer than the reference's context are an error, or with `truncate_prompts`
    keep their prompts' last tokens (`data.tokenize_preferences`)."""
    chosen, rejected = tokenize_preferences(tokenizer, split, device,
                                            context_length(ref_model.config), truncate_prompts,
                                            what)
    if reference_free:
        return PreferenceTensors(chosen, rejected, None, None)
    ref_c, ref_r = precompute_reference_logps(ref_model, chosen, rejected,
                                              tokenizer.pad_token_id)
    return PreferenceTensors(chosen, rejected, ref_c, ref_r)


def loss_extras(cfg: DPOConfig) -> dict[str, Any]:
    """The keyword extras of `cfg.loss_type`'s registry entry, read from the config."""
    return {name: getattr(cfg, name) for name in PREFERENCE_LOSSES[cfg.loss_type].extras}


def loss_fn(cfg: DPOConfig):
    """`core.PREFERENCE_LOSSES[cfg.loss_type]` with beta and the loss's extras bound."""
    return partial(PREFERENCE_LOSSES[cfg.loss_type], beta=cfg.beta, **loss_extras(cfg))


class LazyStats(Mapping):
    """Scalar diagnostics computed and copied to the host only when first read, all with
    one device sync; a training step that never reads them issues no kernel and no sync."""

    def __init__(self, compute):
        self._compute, self._values = compute, None  # compute: () -> dict of 0-dim tensors

    def _floats(self) -> dict[str, float]:
        if self._values is None:
            stats = self._compute()
            self._values = dict(zip(stats, torch.stack([v.double() for v in stats.values()]).tolist(),
                                    strict=True))
        return self._values

    def __getitem__(self, key: str) -> float:
        return self._floats()[key]

    def __iter__(self):
        return iter(self._floats())

    def __len__(self) -> int:
        return len(self._floats())


def batch_loss(model, data: PreferenceTensors, index: torch.Tensor, loss,
               pad_token_id: int) -> tuple[torch.Tensor, LazyStats]:
    """Mean preference loss of pairs `index` and its diagnostics (implicit rewards).

    Args:
        loss: a `core.PREFERENCE_LOSSES` entry with beta and extras bound (`loss_fn`).
    Returns:
        (loss (scalar, differentiable), stats): a read-only mapping to floats, computed on
        first read (`LazyStats`): `chosen_rewards`, `rejected_rewards` (batch means),
        `reward_accuracy` (ties count 1/2), `reward_margin`, `logps_chosen`, `logps_rejected`.
    """
    chosen, rejected = data.select(index)
    policy_c, policy_r = pair_logps(model, chosen, rejected, pad_token_id)
    index = index.to(policy_c.device)
    ref_c, ref_r = ((None, None) if data.ref_chosen is None
                    else (data.ref_chosen[index], data.ref_rejected[index]))
    lengths = (chosen["response_mask"].sum(-1), rejected["response_mask"].sum(-1))  # (B,) each
    losses, chosen_rewards, rejected_rewards = loss(policy_c, policy_r, ref_c, ref_r, *lengths)
    c, r = chosen_rewards.detach(), rejected_rewards.detach()
    pc, pr = policy_c.detach(), policy_r.detach()

    def compute() -> dict[str, torch.Tensor]:
        win = (c > r).float() + 0.5 * (c == r)
        return {"chosen_rewards": c.mean(), "rejected_rewards": r.mean(),
                "reward_accuracy": win.mean(), "reward_margin": (c - r).mean(),
                "logps_chosen": pc.mean(), "logps_rejected": pr.mean()}

    return losses.mean(), LazyStats(compute)


@torch.no_grad()
def evaluate_pairs(model, data: PreferenceTensors, loss, pad_token_id: int,
                   batch_size: int = EVAL_BATCH_SIZE) -> dict[str, float]:
    """Held-out loss and implicit-reward pair accuracy (ties count 1/2) over a whole split."""
    n, total, accuracy = len(data), 0.0, 0.0
    for start in range(0, n, batch_size):
        index = torch.arange(start, min(n, start + batch_size))
        value, stats = batch_loss(model, data, index, loss, pad_token_id)
        total += value.item() * len(index)
        accuracy += stats["reward_accuracy"] * len(index)
    return {"eval_loss": total / n, "eval_accuracy": accuracy / n}


def set_learning_rate(optimizer, cfg: DPOConfig, step: int) -> float:
    """Set and return the learning rate of optimizer step `step` (1-based): constant, or a
    linear decay from `learning_rate` to 0 after `max_steps` (the default of TRL's
    `DPOTrainer`)."""
    lr = scheduled_learning_rate(cfg, step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


@dataclass
class DPOContext:
    """Everything a DPO run reads besides the policy: frozen models, data, evaluation setup."""

    task: object  # None with prompts_path: no gold reward
    tokenizer: object
    ref_model: torch.nn.Module
    reward_model: torch.nn.Module
    train: PreferenceTensors
    test: PreferenceTensors
    held_out: list[str]
    sampling: SamplingArgs


def build_context(cfg: DPOConfig, acc, policy) -> DPOContext:
    """Load the frozen reference and reward model, tokenize both splits, cache reference
    log-probs (under the same autocast as the policy's forward; none for a reference-free
    loss, whose reference model serves the KL of the evaluation only). The reference of a
    LoRA `policy` is the policy with its adapter disabled, not a second copy."""
    # evaluation prompts from the task (with its gold reward), or from prompts_path (no gold)
    task = None if cfg.prompts_path else get_task(cfg.task)
    start, flag = policy_dir(cfg), policy_flag(cfg)
    if task is not None:
        check_context(start, task.max_prompt_tokens, cfg.max_new_tokens, flag)
    ref_model = reference_model(policy, lambda: load_policy(start, flag)).to(acc.device)
    reward_model = freeze(load_reward_model(cfg.reward_dir)).to(acc.device)
    tokenizer = load_tokenizer(start)
    where = f"{flag} {start!r}"
    check_vocab(tokenizer, where, {where: ref_model,
                                   f"--reward_dir {cfg.reward_dir!r}": reward_model})
    prefs = load_preference_data(cfg, tokenizer)
    _, held_out = stage_prompts(cfg, task, tokenizer, context_length(ref_model.config))
    with acc.autocast():
        train, test = (preference_tensors(prefs[split], tokenizer, ref_model, acc.device,
                                          cfg.truncate_prompts,
                                          f"{prefs_source(cfg)} ({split})",
                                          PREFERENCE_LOSSES[cfg.loss_type].reference_free)
                       for split in ("train", "test"))
    return DPOContext(task, tokenizer, ref_model, reward_model, train, test, held_out,
                      SamplingArgs(cfg.max_new_tokens, cfg.temperature, cfg.top_k))


def evaluate(model, ctx: DPOContext, cfg: DPOConfig) -> dict[str, float]:
    """Held-out gold / proxy reward and KL of sampled responses, and held-out pair metrics."""
    with sampling_policy(model) as policy:  # full weights, also under FSDP
        ev = evaluate_policy(policy, ctx.tokenizer, ctx.task, ctx.held_out, ctx.sampling,
                             cfg.seed, ctx.reward_model, ctx.ref_model)
    pairs = evaluate_pairs(model, ctx.test, loss_fn(cfg), ctx.tokenizer.pad_token_id)
    return {**({"eval_gold": ev["gold_reward"]} if "gold_reward" in ev else {}),
            "eval_proxy": ev["proxy_reward"], "eval_kl": ev["kl_to_ref"], "response_len": ev["response_len"],
            "eos_frac": ev["eos_frac"], **pairs}


def run_dpo(cfg: DPOConfig) -> dict:
    """Train the SFT policy with `cfg.loss_type` on the `prefs` train split; see the
    module docstring.

    Returns:
        summary: `gold_reward_before/after`, `proxy_reward_before/after`, `kl_to_ref`,
        `eval_accuracy` (held-out implicit-reward pair accuracy), `eval_loss`, `loss_type`,
        `wall_s`, ...
    """
    acc, t0 = start_stage(cfg, "dpo")
    model = apply_lora(load_policy(policy_dir(cfg), policy_flag(cfg)), cfg, policy_dir(cfg))
    enable_checkpointing(model, cfg)
    ctx = build_context(cfg, acc, model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  # one fused kernel per step (FSDP keeps foreach)
                                  fused=acc.distributed_type != DistributedType.FSDP)
    model, optimizer = acc.prepare(model, optimizer)
    unwrapped, loss, pad = acc.unwrap_model(model), loss_fn(cfg), ctx.tokenizer.pad_token_id
    # the schedule needs no state in the checkpoint: the learning rate is f(step)
    ckpt, resumed, log = open_run(cfg, "dpo", acc, unwrapped, optimizer)
    if resumed:
        before, row, start = resumed["before"], resumed["row"], resumed["step"]
    else:
        before, row, start = evaluate(unwrapped, ctx, cfg), {}, 0
        log.write(0, **before)

    def state() -> dict:  # what a checkpoint holds besides weights, optimizer and RNG
        return {"before": before, "row": row}

    bar = progress(cfg.max_steps, "dpo", acc.is_main_process, initial=start)
    gas, micro = cfg.gradient_accumulation_steps, cfg.batch_size // cfg.gradient_accumulation_steps
    model.train()
    params = list(model.parameters())
    for step in range(start + 1, cfg.max_steps + 1):
        set_learning_rate(optimizer, cfg, step)
        for k in range(gas):
            # 1. this micro-batch's pairs: a pure function of (seed, step, k, process)
            draw = ((step - 1) * gas + k) * acc.num_processes + acc.process_index
            idx = batch_indices(len(ctx.train), micro, draw, cfg.seed)
            with acc.accumulate(model):
                # 2. policy log-probs of chosen and rejected, cached reference, preference loss
                value, stats = batch_loss(model, ctx.train, idx, loss, pad)
                # 3. backward, clip, step (accelerate steps once per accumulation cycle)
                acc.backward(value)
                grad_norm = (clip_grad_norm(acc, params, cfg.max_grad_norm)
                             if acc.sync_gradients else None)
                # before the step (and before any step of this one): save the state after step - 1
                bad = first_non_finite(loss=value, grad_norm=grad_norm)
                if bad:
                    raise ckpt.fail(bad, step, state)
                optimizer_step(acc, optimizer)
        # 4. diagnostics, and the held-out gold / proxy reward every eval_steps
        row = {"loss": value.item(), "learning_rate": optimizer.param_groups[0]["lr"], **stats}
        if cfg.eval_steps and step % cfg.eval_steps == 0 and step < cfg.max_steps:
            row.update(evaluate(unwrapped, ctx, cfg))
        if step < cfg.max_steps and (step % cfg.logging_steps == 0 or "eval_proxy" in row):
            log.write(step, **row)
        ckpt.maybe_save(step, state)
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{stats['reward_accuracy']:.2f}")
        bar.update(1)
    bar.close()
    after = evaluate(unwrapped, ctx, cfg)
    return _finish(cfg, acc, unwrapped, ctx, log, (before, after, row), t0)


def _finish(cfg: DPOConfig, acc, model, ctx: DPOContext, log: MetricsLog,
            rows: tuple[dict, dict, dict], t0: float) -> dict:
    """Write the final metrics row, the checkpoint, the tokenizer and `summary.json`.

    `rows` is (evaluation before training, evaluation after, the last training row)."""
    before, after, last_row = rows
    summary = {**gold_summary(before.get("eval_gold"), after.get("eval_gold")),
               "proxy_reward_before": before["eval_proxy"],
               "proxy_reward_after": after["eval_proxy"], "kl_to_ref": after["eval_kl"],
               "eval_accuracy_before": before["eval_accuracy"],
               "eval_accuracy": after["eval_accuracy"], "eval_loss": after["eval_loss"],
               "response_len": after["response_len"], "eos_frac": after["eos_frac"],
               "train_pairs": len(ctx.train), "loss_type": cfg.loss_type,
               "wall_s": time.perf_counter() - t0}
    if acc.is_main_process:
        log.write(cfg.max_steps, **last_row, **after)
    finish_stage(cfg, acc, model, ctx.tokenizer, summary)
    return summary
