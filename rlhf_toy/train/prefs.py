"""Stage `prefs`: preference pairs sampled from the SFT policy, labelled by the gold reward."""

from __future__ import annotations

import time

import torch

from rlhf_toy.config import PrefsConfig, policy_dir, policy_flag
from rlhf_toy.data import build_preferences, gold_accuracy
from rlhf_toy.evaluate import SamplingArgs
from rlhf_toy.models import load_policy
from rlhf_toy.tasks import get_task
from rlhf_toy.tokenizer import load_tokenizer
from rlhf_toy.train.common import check_context, finish_stage, start_stage
from rlhf_toy.train.rundir import commit_run


def run_prefs(cfg: PrefsConfig) -> dict:
    """Stage `prefs`: write the preference dataset (`save_to_disk`) and its summary."""
    task = get_task(cfg.task)
    check_context(policy_dir(cfg), task.max_prompt_tokens, cfg.max_new_tokens, policy_flag(cfg))
    acc, t0 = start_stage(cfg, "prefs")
    policy = load_policy(policy_dir(cfg), policy_flag(cfg)).to(acc.device).eval()
    tokenizer = load_tokenizer(policy_dir(cfg))
    data = build_preferences(policy, tokenizer, task, cfg.n_pairs, cfg.test_fraction,
                             cfg.label_temperature,
                             SamplingArgs(cfg.max_new_tokens, cfg.temperature, cfg.top_k), cfg.seed)
    train = data["train"]
    gold_gap = torch.tensor(list(train["chosen_gold"])) - torch.tensor(list(train["rejected_gold"]))
    summary = {"train_pairs": len(data["train"]), "test_pairs": len(data["test"]),
               "gold_accuracy": gold_accuracy(data["test"]),
               "label_agreement_train": float((gold_gap > 0).float().mean()),
               "ties_train": float((gold_gap == 0).float().mean()),
               "wall_s": time.perf_counter() - t0}
    if acc.is_main_process:
        commit_run(cfg.output_dir)
        data.save_to_disk(cfg.output_dir)
    finish_stage(cfg, acc, None, None, summary)
    return summary
