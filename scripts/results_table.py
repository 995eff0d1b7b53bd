"""The README's per-seed tables from pipeline runs: `python scripts/results_table.py runs/seed*`.

Reads each RUN_DIR/{sft,reward,ppo,dpo}/summary.json and prints two Markdown tables:
PPO (seed, SFT gold, reward-model accuracy, gold before -> after, KL, wall time) and DPO
(the same columns for DPO), plus the mean gain over the seeds.
"""

from __future__ import annotations

import json
import os
import sys


def _load(run_dir: str, stage: str) -> dict:
    path = os.path.join(run_dir, stage, "summary.json")
    if not os.path.isfile(path):
        raise SystemExit(f"results_table: error: {path} does not exist (run the pipeline first)")
    with open(path) as fh:
        return json.load(fh)


def _seed(run_dir: str) -> str:
    with open(os.path.join(run_dir, "sft", "run_config.json")) as fh:
        return str(json.load(fh)["seed"])


def table(run_dirs: list[str], method: str) -> str:
    lines = [f"| seed | SFT gold | RM held-out acc (gold ceiling) | {method.upper()} gold before "
             "-> after | KL to ref (nats/response) | wall time |", "|---|---|---|---|---|---|"]
    gains = []
    for run in run_dirs:
        sft, rm, s = _load(run, "sft"), _load(run, "reward"), _load(run, method)
        gain = s["gold_reward_after"] - s["gold_reward_before"]
        gains.append(gain)
        lines.append(f"| {_seed(run)} | {sft['gold_reward']:.3f} | {rm['eval_accuracy']:.3f} "
                     f"({rm['gold_accuracy']:.3f}) | {s['gold_reward_before']:.3f} -> "
                     f"**{s['gold_reward_after']:.3f}** ({gain:+.3f}) | {s['kl_to_ref']:.2f} | "
                     f"{s['wall_s']:.0f} s |")
    seeds = f"{len(gains)} seed{'s' if len(gains) > 1 else ''}"
    lines.append(f"\nMean gain over {seeds}: {sum(gains) / len(gains):+.3f} "
                 f"(smallest {min(gains):+.3f}).")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    for method in ("ppo", "dpo"):
        print(table(argv, method), end="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
