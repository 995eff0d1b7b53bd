"""Stage `sft`: supervised fine-tuning on the task corpus, of a freshly initialised tiny GPT
or of a local Hugging Face causal LM (`--model_name_or_path`).

The loss is the token-mean negative log-likelihood of the response tokens (EOS
included); prompt tokens are context only.
"""

from __future__ import annotations

import os
import time

import torch

from rlhf_toy.config import SFTConfig
from rlhf_toy.core import logprobs_from_logits
from rlhf_toy.data import select_batch, sft_dataset, tokenize_pairs
from rlhf_toy.errors import UsageError
from rlhf_toy.evaluate import SamplingArgs, eval_prompts, evaluate_policy
from rlhf_toy.lora import apply_lora, enable_checkpointing
from rlhf_toy.models import build_policy, load_policy, response_logits
from rlhf_toy.tasks import get_task
from rlhf_toy.tokenizer import build_tokenizer, load_tokenizer
from rlhf_toy.train.common import (
    batch_indices,
    check_context,
    check_vocab,
    clip_grad_norm,
    finish_stage,
    first_non_finite,
    open_run,
    optimizer_step,
    progress,
    start_stage,
)
from rlhf_toy.train.rundir import FRESH_BASE_DIR, commit_run


def nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token-mean negative log-likelihood of the response tokens of a batch."""
    logits = response_logits(model, batch["prompt_ids"], batch["prompt_mask"],
                             batch["response_ids"], batch["response_mask"])  # (B, T, V)
    logp = logprobs_from_logits(logits, batch["response_ids"])  # (B, T)
    mask = batch["response_mask"].float()
    return -(logp * mask).sum() / mask.sum()  # (B, T) -> scalar


def starting_model(cfg: SFTConfig, task):
    """(policy, tokenizer) to fine-tune: `--model_name_or_path`'s, else a fresh tiny GPT
    over the task's words."""
    if cfg.model_name_or_path:
        check_context(cfg.model_name_or_path, task.max_prompt_tokens, cfg.max_new_tokens,
                      "--model_name_or_path")
        where = f"--model_name_or_path {cfg.model_name_or_path!r}"
        tokenizer = load_tokenizer(cfg.model_name_or_path)
        model = load_policy(cfg.model_name_or_path, "--model_name_or_path")
        check_vocab(tokenizer, where, {where: model})
        return model, tokenizer
    if task.max_prompt_tokens + cfg.max_new_tokens > cfg.n_positions:
        raise UsageError(f"max_new_tokens must be <= {cfg.n_positions - task.max_prompt_tokens} "
                         f"so that prompt + response fit n_positions={cfg.n_positions} "
                         f"(got {cfg.max_new_tokens})")
    tokenizer = build_tokenizer(task.words)
    return build_policy(tokenizer, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions), tokenizer


def save_fresh_base(model, cfg: SFTConfig, is_main: bool) -> str:
    """Save the freshly initialised model once into OUTPUT_DIR/base/, the base its LoRA
    adapters refer to; returns that directory (a resumed run keeps it: `rundir`)."""
    path = os.path.join(cfg.output_dir, FRESH_BASE_DIR)
    if is_main and not cfg.resume_from_checkpoint:
        commit_run(cfg.output_dir)  # the run's first write: an earlier run's files go first
        model.save_pretrained(path)
    return path


def run_sft(cfg: SFTConfig) -> dict:
    acc, t0 = start_stage(cfg, "sft")
    task = get_task(cfg.task)
    model, tokenizer = starting_model(cfg, task)
    if cfg.use_peft:  # adapters on a local model (their base), or on a fresh one saved as it
        base = cfg.model_name_or_path or save_fresh_base(model, cfg, acc.is_main_process)
        model = apply_lora(model, cfg, base)
    enable_checkpointing(model, cfg)

    # 1. generated train and held-out corpora, tokenized once
    train = sft_dataset(task, cfg.n_train, cfg.seed)
    held_out = sft_dataset(task, cfg.n_eval, cfg.seed + 1)
    train_t = tokenize_pairs(tokenizer, train["prompt"], train["completion"], acc.device)
    eval_t = tokenize_pairs(tokenizer, held_out["prompt"], held_out["completion"], acc.device)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    model, optimizer = acc.prepare(model, optimizer)
    ckpt, resumed, log = open_run(cfg, "sft", acc, acc.unwrap_model(model), optimizer)
    start = resumed["step"] if resumed else 0
    bar = progress(cfg.max_steps, "sft", acc.is_main_process, initial=start)

    # 2. next-token training on responses
    model.train()
    params = list(model.parameters())
    for step in range(start + 1, cfg.max_steps + 1):
        for micro in range(cfg.gradient_accumulation_steps):
            idx = batch_indices(cfg.n_train, cfg.batch_size,
                                (step - 1) * cfg.gradient_accumulation_steps + micro, cfg.seed)
            with acc.accumulate(model):
                loss = nll(model, select_batch(train_t, idx))
                acc.backward(loss)
                if acc.sync_gradients:
                    clip_grad_norm(acc, params, cfg.max_grad_norm)
                optimizer_step(acc, optimizer)
        if step % cfg.logging_steps == 0 or step == cfg.max_steps:
            # checked where the loss is read anyway (no extra sync): the fault is caught at
            # the next logging step, and the last periodic checkpoint is the good state
            if first_non_finite(loss=loss):
                raise ckpt.fail("loss", step)
            log.write(step, loss=loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
        ckpt.maybe_save(step, dict)
        bar.update(1)
    bar.close()

    # 3. held-out loss and gold reward of sampled responses
    model = acc.unwrap_model(model).eval()
    with torch.no_grad():
        eval_loss = nll(model, eval_t).item()
    args = SamplingArgs(cfg.max_new_tokens, cfg.temperature, cfg.top_k)
    ev = evaluate_policy(model, tokenizer, task, eval_prompts(task, cfg.n_eval_prompts), args,
                         cfg.seed)
    summary = {"gold_reward": ev["gold_reward"], "eval_loss": eval_loss,
               "response_len": ev["response_len"], "eos_frac": ev["eos_frac"],
               "wall_s": time.perf_counter() - t0}
    if acc.is_main_process:
        log.write(cfg.max_steps, eval_loss=eval_loss, gold_reward=ev["gold_reward"])
    finish_stage(cfg, acc, model, tokenizer, summary)
    return summary
