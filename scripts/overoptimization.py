"""How `beta` trades reward against drift: PPO at several KL coefficients from one pipeline run.

    python scripts/overoptimization.py --run_dir runs/demo [--betas 0 0.05 5] [--max_steps 100]

For each beta it trains PPO from RUN_DIR/sft against RUN_DIR/reward (beta fixed, everything
else at the PPO defaults), evaluates the held-out gold reward, proxy (reward-model) score and KL to the
reference every `--eval_steps` iterations, and writes into RUN_DIR/overoptimization/:
`summary.json` (the curves), `report.md` (a table) and `curves.png` (gold and proxy against
iteration, and gold against KL). With beta=0 nothing holds the policy near the reference:
the proxy score keeps rising while the gold reward falls (the reward model is over-optimized);
a large beta keeps the KL near 0 and the policy near the SFT model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from rlhf_toy.config import parse_config  # noqa: E402
from rlhf_toy.errors import UsageError  # noqa: E402
from rlhf_toy.train.common import write_json  # noqa: E402
from rlhf_toy.train.ppo import PPOConfig, run_ppo  # noqa: E402


def curve(run_dir: str) -> list[dict]:
    """The evaluation rows (step, eval_gold, eval_proxy, eval_kl) of a PPO run's metrics.jsonl."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [{"step": r["step"], "gold": r["eval_gold"], "proxy": r["eval_proxy"],
             "kl": r["eval_kl"]} for r in rows if "eval_gold" in r]


def run(args: argparse.Namespace) -> dict:
    out = os.path.join(args.run_dir, "overoptimization")
    results = {}
    for beta in args.betas:
        argv = ["--sft_dir", os.path.join(args.run_dir, "sft"),
                "--reward_dir", os.path.join(args.run_dir, "reward"),
                "--output_dir", os.path.join(out, f"beta_{beta:g}"), "--seed", str(args.seed),
                "--beta", str(beta), "--adaptive_kl", "false", "--max_steps", str(args.max_steps),
                "--eval_steps", str(args.eval_steps), "--device", "cpu"]
        summary = run_ppo(parse_config(PPOConfig, argv, prog="overoptimization"))
        points = [{"step": 0, "gold": summary["gold_reward_before"],
                   "proxy": summary["proxy_reward_before"], "kl": 0.0},
                  *curve(os.path.join(out, f"beta_{beta:g}"))]
        results[f"{beta:g}"] = {"beta": beta, "summary": summary, "curve": points}
        print(f"beta {beta:g}: gold {summary['gold_reward_before']:.3f} -> "
              f"{summary['gold_reward_after']:.3f}, proxy {summary['proxy_reward_before']:.3f} "
              f"-> {summary['proxy_reward_after']:.3f}, KL {summary['kl_to_ref']:.2f}", flush=True)
    report = {"run_dir": args.run_dir, "seed": args.seed, "max_steps": args.max_steps,
              "betas": results}
    write_json(os.path.join(out, "summary.json"), report)
    with open(os.path.join(out, "report.md"), "w") as fh:
        fh.write(markdown(report))
    plot(report, os.path.join(out, "curves.png"))
    return report


def markdown(report: dict) -> str:
    lines = ["| beta | gold (SFT -> best -> final) | proxy (SFT -> final) | KL to ref (final) |",
             "|---|---|---|---|"]
    for r in report["betas"].values():
        c = r["curve"]
        best = max(p["gold"] for p in c)
        lines.append(f"| {r['beta']:g} | {c[0]['gold']:.3f} -> {best:.3f} -> {c[-1]['gold']:.3f} "
                     f"| {c[0]['proxy']:.3f} -> {c[-1]['proxy']:.3f} | {c[-1]['kl']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for r in report["betas"].values():
        c, label = r["curve"], f"beta {r['beta']:g}"
        steps = [p["step"] for p in c]
        axes[0].plot(steps, [p["gold"] for p in c], marker="o", label=label)
        axes[1].plot(steps, [p["proxy"] for p in c], marker="o", label=label)
        axes[2].plot([p["kl"] for p in c], [p["gold"] for p in c], marker="o", label=label)
    for ax, (x, y) in zip(axes, [("PPO iteration", "held-out gold reward (truth)"),
                                 ("PPO iteration", "held-out proxy score (reward model)"),
                                 ("KL(policy || SFT), nats per response", "gold reward")], strict=True):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"PPO at several KL coefficients (seed {report['seed']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", default="runs/demo", help="a pipeline run (sft/, reward/)")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.05, 5.0])
    parser.add_argument("--max_steps", type=int, default=100)
    parser.add_argument("--eval_steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        run(args)
    except UsageError as exc:
        print(f"overoptimization: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
