"""The README's per-seed tables from pipeline runs: `python scripts/results_table.py runs/*`.

Reads each RUN_DIR/{sft,reward,<method>}/summary.json, groups the runs by task (runs of
different tasks are never averaged together) and prints, per task and method, a Markdown
table (seed, SFT gold, reward-model accuracy, gold before -> after, KL, wall time) and the
gain over SFT as mean ± standard error over the seeds.
"""

from __future__ import annotations

import json
import os
import sys

from rlhf_toy.core.stats import mean, standard_error
from rlhf_toy.methods import METHODS


def _load(run_dir: str, stage: str) -> dict:
    path = os.path.join(run_dir, stage, "summary.json")
    if not os.path.isfile(path):
        raise SystemExit(f"results_table: error: {path} does not exist (run the pipeline first)")
    with open(path) as fh:
        return json.load(fh)


def _run_config(run_dir: str) -> dict:
    path = os.path.join(run_dir, "sft", "run_config.json")
    if not os.path.isfile(path):
        raise SystemExit(f"results_table: error: {path} does not exist (run the pipeline first)")
    with open(path) as fh:
        return json.load(fh)


def _pm(values: list[float], fmt: str = "+.3f") -> str:
    se = standard_error(values)
    return f"{mean(values):{fmt}}" + ("" if se != se else f" ± {se:.3f}")  # NaN: one seed


def table(run_dirs: list[str], method: str, stage: str) -> str:
    """One method's table over `run_dirs` (runs of one task; the method's runs in
    RUN_DIR/`stage`), and its mean gain ± s.e."""
    lines = [f"| seed | SFT gold | RM held-out acc (gold ceiling) | {method.upper()} gold before "
             "-> after | KL to ref (nats/response) | wall time |", "|---|---|---|---|---|---|"]
    gains, kls = [], []
    for run in run_dirs:
        sft, rm, s = _load(run, "sft"), _load(run, "reward"), _load(run, stage)
        gain = s["gold_reward_after"] - s["gold_reward_before"]
        gains.append(gain)
        kls.append(s["kl_to_ref"])
        lines.append(f"| {_run_config(run)['seed']} | {sft['gold_reward']:.3f} | "
                     f"{rm['eval_accuracy']:.3f} ({rm['gold_accuracy']:.3f}) | "
                     f"{s['gold_reward_before']:.3f} -> **{s['gold_reward_after']:.3f}** "
                     f"({gain:+.3f}) | {s['kl_to_ref']:.2f} | {s['wall_s']:.0f} s |")
    seeds = f"{len(gains)} seed{'s' if len(gains) > 1 else ''}"
    lines.append(f"\nGain over SFT, mean ± standard error over {seeds}: {_pm(gains)} "
                 f"(smallest {min(gains):+.3f}); KL {_pm(kls, '.2f')}.")
    return "\n".join(lines)


def by_task(run_dirs: list[str]) -> dict[str, list[str]]:
    """task -> its run dirs, in the order given."""
    groups: dict[str, list[str]] = {}
    for run in run_dirs:
        groups.setdefault(_run_config(run)["task"], []).append(run)
    return groups


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    for task, runs in by_task(argv).items():
        print(f"## {task}\n")
        for name, method in METHODS.items():
            if method.overrides or not all(
                    os.path.isdir(os.path.join(run, method.stage)) for run in runs):
                continue  # a method the pipeline does not run on its own stage
            print(table(runs, name, method.stage), end="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
