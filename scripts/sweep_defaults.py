"""Choose PPO and DPO defaults by measurement: a grid of variants over tasks x seeds.

    python scripts/sweep_defaults.py --base_dir runs/sweep --tasks sentiment sorting \
        --seeds 0 1 2 3 4 --variants ppo_default dpo_default [--list]

For each task and seed it builds BASE_DIR/<task>/seed<N>/{sft,prefs,reward} once (the
pipeline's stages at their defaults), then trains every variant from them into
BASE_DIR/<task>/seed<N>/<variant>/ (a run whose summary.json exists is reused) and prints,
per task and variant, the held-out gold gain over SFT (mean +- standard error over the
seeds, and the smallest seed's gain) and the final KL to the reference. A variant is a
method and a list of overrides of that method's defaults (see VARIANTS; `--list` prints them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from rlhf_toy.cli import _stages  # noqa: E402
from rlhf_toy.config import UsageError, parse_config  # noqa: E402

# PPO's previous defaults (before per-prompt centering): one completion per prompt, a
# constant learning rate, target KL 3 on every task
PREV = ["--num_generations", "1", "--lr_scheduler_type", "constant", "--target_kl", "3",
        "--vf_coef", "0.5"]
VF05 = ["--vf_coef", "0.5"]  # the value-loss coefficient of every run before vf_coef 0.1
# DPO's previous budget: 300 steps of 32 pairs
PREV_DPO = ["--batch_size", "32", "--max_steps", "300"]

# name -> (method, overrides of the method's current defaults)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "ppo_default": ("ppo", []),
    "ppo_t2": ("ppo", ["--target_kl", "2"] + VF05),
    "ppo_t2.5": ("ppo", ["--target_kl", "2.5"] + VF05),
    "ppo_t3": ("ppo", ["--target_kl", "3"] + VF05),
    "ppo_const_lr_t2": ("ppo", ["--lr_scheduler_type", "constant", "--target_kl", "2"] + VF05),
    "ppo_const_lr_t3": ("ppo", ["--lr_scheduler_type", "constant", "--target_kl", "3"] + VF05),
    "ppo_const_lr_t3_gen8": ("ppo", ["--lr_scheduler_type", "constant", "--target_kl", "3",
                                     "--num_generations", "8"] + VF05),
    "ppo_const_lr_t3_lr1e-4": ("ppo", ["--lr_scheduler_type", "constant", "--target_kl", "3",
                                       "--learning_rate", "1e-4"] + VF05),
    "ppo_const_lr_t3_beta1": ("ppo", ["--lr_scheduler_type", "constant", "--target_kl", "3",
                                      "--beta", "1.0"] + VF05),
    "ppo_beta0": ("ppo", ["--beta", "0"]),
    "ppo_beta0_vf0.5": ("ppo", ["--beta", "0"] + VF05),
    "ppo_vf0.5": ("ppo", ["--vf_coef", "0.5"]),
    "ppo_critic_rm": ("ppo", ["--critic", "reward_model"] + VF05),
    "ppo_prev_defaults": ("ppo", PREV),
    "ppo_old_defaults": ("ppo", PREV + ["--adaptive_kl", "false", "--beta", "0.05",
                                        "--learning_rate", "1e-3", "--center_scores", "false"]),
    "ppo_fixed_beta": ("ppo", PREV + ["--adaptive_kl", "false"]),
    "ppo_no_center": ("ppo", PREV + ["--center_scores", "false"]),
    "ppo_lr1e-3": ("ppo", PREV + ["--learning_rate", "1e-3"]),
    "ppo_warmup10": ("ppo", PREV + ["--warmup_steps", "10"]),
    "ppo_target_kl2": ("ppo", PREV + ["--target_kl", "2"]),
    "ppo_target_kl4": ("ppo", PREV + ["--target_kl", "4"]),
    "dpo_default": ("dpo", []),
    "dpo_prev_default": ("dpo", PREV_DPO),
    "dpo_old_defaults": ("dpo", PREV_DPO + ["--learning_rate", "1e-3"]),
    "dpo_beta0.2": ("dpo", PREV_DPO + ["--beta", "0.2"]),
    "dpo_steps600": ("dpo", ["--batch_size", "32"]),
    "dpo_bs64": ("dpo", ["--max_steps", "300"]),
    "dpo_ls0.1": ("dpo", PREV_DPO + ["--label_smoothing", "0.1"]),
    "dpo_ls0.2": ("dpo", PREV_DPO + ["--label_smoothing", "0.2"]),
}
BASE_STAGES = ("sft", "prefs", "reward")
STAGE_INPUTS = {"sft_dir": "sft", "prefs_dir": "prefs", "reward_dir": "reward"}


def run_stage(stage: str, seed_dir: str, out: str, seed: int, task: str,
              extra: list[str]) -> dict:
    """Run one stage from SEED_DIR's base stages into OUT (reused if its summary exists)."""
    summary_path = os.path.join(out, "summary.json")
    if os.path.isfile(summary_path):
        with open(summary_path) as fh:
            return json.load(fh)
    cls, runner, _ = _stages()[stage]
    argv = ["--output_dir", out, "--seed", str(seed), "--task", task, "--device", "cpu"]
    for name, source in STAGE_INPUTS.items():
        if name in cls.__dataclass_fields__:
            argv += [f"--{name}", os.path.join(seed_dir, source)]
    return runner(parse_config(cls, argv + extra, prog=f"sweep {stage}"))


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n); 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def sweep(args: argparse.Namespace) -> list[dict]:
    rows = []
    for seed in args.seeds:
        for task in args.tasks:
            seed_dir = os.path.join(args.base_dir, task, f"seed{seed}")
            for stage in BASE_STAGES:
                run_stage(stage, seed_dir, os.path.join(seed_dir, stage), seed, task, [])
            for name in args.variants:
                method, extra = VARIANTS[name]
                s = run_stage(method, seed_dir, os.path.join(seed_dir, name), seed, task, extra)
                rows.append({"task": task, "seed": seed, "variant": name,
                             "gain": s["gold_reward_after"] - s["gold_reward_before"],
                             "gold": s["gold_reward_after"], "kl": s["kl_to_ref"]})
                print(f"{task} seed {seed} {name}: gold {s['gold_reward_before']:.3f} -> "
                      f"{s['gold_reward_after']:.3f}, KL {s['kl_to_ref']:.2f}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| task | variant | gold gain (mean +- s.e.) | smallest gain | KL (mean +- s.e.) "
             "| seeds |", "|---|---|---|---|---|---|"]
    keys = dict.fromkeys((r["task"], r["variant"]) for r in rows)
    for task, variant in keys:
        sel = [r for r in rows if r["task"] == task and r["variant"] == variant]
        gain, gain_se = mean_se([r["gain"] for r in sel])
        kl, kl_se = mean_se([r["kl"] for r in sel])
        lines.append(f"| {task} | {variant} | {gain:+.3f} +- {gain_se:.3f} | "
                     f"{min(r['gain'] for r in sel):+.3f} | {kl:.2f} +- {kl_se:.2f} | "
                     f"{len(sel)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base_dir", default="runs/sweep")
    parser.add_argument("--tasks", nargs="+", default=["sentiment", "sorting"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", default=["ppo_default", "dpo_default"],
                        choices=sorted(VARIANTS))
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, (method, extra) in VARIANTS.items():
            print(f"{name}: {method} {' '.join(extra)}")
        return 0
    try:
        rows = sweep(args)
    except UsageError as exc:
        print(f"sweep_defaults: error: {exc}", file=sys.stderr)
        return 2
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
