"""Stage `reward`: a Bradley-Terry reward model on the preference pairs.

The model is GPT-2 (backbone initialised from the SFT policy) with a scalar head read
at the last real token of prompt + response + EOS. Loss (Bradley & Terry 1952;
Ouyang et al. 2022 eq. 1): mean(-log sigmoid(r(chosen) - r(rejected))).

With `audit_steps > 0` the stage also trains an audit reward model, the same recipe on the
held-out (test) pairs that the main model never sees, into OUTPUT_DIR/audit/. The on-policy
stages score their evaluations with both: when the main model's score keeps rising while the
audit model's falls, the policy exploits errors of the main model (over-optimization, no
gold needed).
"""

from __future__ import annotations

import os
import time

import torch

from rlhf_toy.config import RewardConfig, policy_dir, policy_flag
from rlhf_toy.core import bradley_terry_loss
from rlhf_toy.data import gold_accuracy, has_gold, select_batch, tokenize_preferences
from rlhf_toy.datafiles import load_preference_data, prefs_source
from rlhf_toy.evaluate import NO_GOLD
from rlhf_toy.lora import apply_lora, enable_checkpointing, save_adapter_extras
from rlhf_toy.models import AUDIT_DIR, context_length, reward_model_from_policy, reward_scores
from rlhf_toy.tokenizer import load_tokenizer
from rlhf_toy.train.common import (
    batch_indices,
    check_vocab,
    clip_grad_norm,
    finish_stage,
    first_non_finite,
    open_run,
    optimizer_step,
    progress,
    start_stage,
)
from rlhf_toy.train.rundir import commit_run


def pair_scores(model, chosen: dict, rejected: dict, index: torch.Tensor):
    """Reward-model scores of the chosen and rejected responses of pairs `index`: (B,), (B,)."""
    c, r = select_batch(chosen, index), select_batch(rejected, index)
    return (reward_scores(model, c["prompt_ids"], c["prompt_mask"], c["response_ids"],
                          c["response_mask"]),
            reward_scores(model, r["prompt_ids"], r["prompt_mask"], r["response_ids"],
                          r["response_mask"]))


@torch.no_grad()
def evaluate_pairs(model, chosen: dict, rejected: dict, batch_size: int) -> dict:
    """Held-out pairwise accuracy (ties count 1/2) and Bradley-Terry loss."""
    n = chosen["prompt_ids"].shape[0]
    sc, sr = [], []
    for i in range(0, n, batch_size):
        c, r = pair_scores(model, chosen, rejected, torch.arange(i, min(n, i + batch_size)))
        sc.append(c)
        sr.append(r)
    sc, sr = torch.cat(sc).float(), torch.cat(sr).float()
    acc = ((sc > sr).float() + 0.5 * (sc == sr).float()).mean()
    return {"eval_accuracy": float(acc), "eval_loss": float(bradley_terry_loss(sc, sr))}


def fit_pairs(model, optimizer, acc, chosen: dict, rejected: dict, steps: int, cfg: RewardConfig,
              seed: int) -> None:
    """`steps` plain Bradley-Terry steps on the pairs (no checkpoints, no logging)."""
    n, params = chosen["prompt_ids"].shape[0], list(model.parameters())
    model.train()
    for step in range(steps):
        sc, sr = pair_scores(model, chosen, rejected, batch_indices(n, cfg.batch_size, step, seed))
        acc.backward(bradley_terry_loss(sc, sr))
        clip_grad_norm(acc, params, cfg.max_grad_norm)
        optimizer_step(acc, optimizer)
    model.eval()


def trainable_reward_model(cfg: RewardConfig):
    """The reward model to train: from the SFT policy; with `use_peft`, LoRA on the backbone
    and the score head trained in full."""
    model = apply_lora(reward_model_from_policy(policy_dir(cfg), cfg.head_init_std,
                                                policy_flag(cfg)),
                       cfg, policy_dir(cfg), modules_to_save=["score"])
    enable_checkpointing(model, cfg)
    return model


def train_audit(cfg: RewardConfig, acc, train: tuple[dict, dict], test: tuple[dict, dict]) -> dict:
    """The audit reward model: trained on the test pairs, scored on the train pairs (the
    main model's training data, which the audit model never sees). Saved to OUTPUT_DIR/audit/."""
    model = trainable_reward_model(cfg).to(acc.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    fit_pairs(model, optimizer, acc, *test, cfg.audit_steps, cfg, cfg.seed + 1)
    result = evaluate_pairs(model, *train, cfg.eval_batch_size)
    if acc.is_main_process:
        commit_run(cfg.output_dir)  # the run's first write when it logged nothing before
        model.save_pretrained(os.path.join(cfg.output_dir, AUDIT_DIR))
        save_adapter_extras(model, os.path.join(cfg.output_dir, AUDIT_DIR))
    return {"audit_accuracy": result["eval_accuracy"], "audit_loss": result["eval_loss"]}


def run_reward(cfg: RewardConfig) -> dict:
    acc, t0 = start_stage(cfg, "reward")
    tokenizer = load_tokenizer(policy_dir(cfg))
    prefs = load_preference_data(cfg, tokenizer)  # every check before training
    model = trainable_reward_model(cfg)
    where = f"{policy_flag(cfg)} {policy_dir(cfg)!r}"
    check_vocab(tokenizer, where, {where: model})
    fit = {"n_positions": context_length(model.config), "truncate_prompts": cfg.truncate_prompts}
    source = prefs_source(cfg)
    train_c, train_r = tokenize_preferences(tokenizer, prefs["train"], acc.device, **fit,
                                            what=f"{source} (train)")
    test_c, test_r = tokenize_preferences(tokenizer, prefs["test"], acc.device, **fit,
                                          what=f"{source} (test)")
    n_train = len(prefs["train"])

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    model, optimizer = acc.prepare(model, optimizer)
    ckpt, resumed, log = open_run(cfg, "reward", acc, acc.unwrap_model(model), optimizer)
    start = resumed["step"] if resumed else 0
    bar = progress(cfg.max_steps, "reward", acc.is_main_process, initial=start)
    model.train()
    params = list(model.parameters())
    for step in range(start + 1, cfg.max_steps + 1):
        for micro in range(cfg.gradient_accumulation_steps):
            idx = batch_indices(n_train, cfg.batch_size,
                                (step - 1) * cfg.gradient_accumulation_steps + micro, cfg.seed)
            with acc.accumulate(model):
                sc, sr = pair_scores(model, train_c, train_r, idx)
                loss = bradley_terry_loss(sc, sr)
                acc.backward(loss)
                if acc.sync_gradients:
                    clip_grad_norm(acc, params, cfg.max_grad_norm)
                optimizer_step(acc, optimizer)
        if step % cfg.logging_steps == 0 or step == cfg.max_steps:
            # checked where the loss is read anyway (no extra sync): the fault is caught at
            # the next logging step, and the last periodic checkpoint is the good state
            if first_non_finite(loss=loss):
                raise ckpt.fail("loss", step)
            train_acc = float((sc > sr).float().mean())
            log.write(step, loss=loss.item(), accuracy=train_acc)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{train_acc:.2f}")
        ckpt.maybe_save(step, dict)
        bar.update(1)
    bar.close()

    model = acc.unwrap_model(model).eval()
    summary = evaluate_pairs(model, test_c, test_r, cfg.eval_batch_size)
    if has_gold(prefs["test"]):  # the gold ceiling, where the pairs carry gold rewards
        summary["gold_accuracy"] = gold_accuracy(prefs["test"])
    else:
        summary["gold"] = NO_GOLD
    summary["train_pairs"], summary["test_pairs"] = n_train, len(prefs["test"])
    if cfg.audit_steps:
        summary.update(train_audit(cfg, acc, (train_c, train_r), (test_c, test_r)))
    summary["wall_s"] = time.perf_counter() - t0
    if acc.is_main_process:
        log.write(cfg.max_steps, eval_accuracy=summary["eval_accuracy"],
                  eval_loss=summary["eval_loss"])
    finish_stage(cfg, acc, model, tokenizer, summary)
    return summary
