"""Stage `compare`: PPO versus DPO against the SFT reference, and a gold-reward/KL frontier.

Shapes: N held-out prompts, one sampled response each (lists of N floats per policy).

Every policy is measured the same way (`Evaluator.measure`): one sample per held-out
prompt (the same prompts, the same sampling seed), then
- `gold_reward`: mean hidden gold reward (the truth; nothing trained on it);
- `proxy_reward`: mean reward-model score (what PPO optimised);
- `kl_to_ref`: KL(pi || ref) per response, estimated from the samples as the mean over
  responses of sum_t (log pi(a_t|s_t) - log ref(a_t|s_t)) (k1 summed over the response);
- `win_rate_vs_ref`: how often its response beats the reference's under gold (ties 1/2);
- `response_len`: mean response tokens, EOS included.

The frontier: short PPO and DPO runs over a list of betas, each a (KL, gold) point, plus
the main runs and the reference itself at KL 0. Which method is ahead is read at equal
KL: the best gold each reaches with KL at most the largest KL both methods reached.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

from rlhf_toy.config import CompareConfig, DPOConfig
from rlhf_toy.evaluate import SamplingArgs, eval_prompts, evaluate_policy, win_rate
from rlhf_toy.models import freeze, load_policy, load_reward_model
from rlhf_toy.tasks import get_task
from rlhf_toy.tokenizer import load_tokenizer
from rlhf_toy.train.common import finish_stage, read_run_config, start_stage
from rlhf_toy.train.ppo import PPOConfig
from rlhf_toy.train.rundir import commit_run

METHOD_KEYS = ("gold_reward", "proxy_reward", "kl_to_ref", "win_rate_vs_ref", "response_len")
METHODS = ("ppo", "dpo")


class Evaluator:
    """Measures any policy against one reference, reward model, prompt set and sampling seed."""

    def __init__(self, cfg: CompareConfig, device):
        self.task = get_task(cfg.task)
        self.tokenizer = load_tokenizer(cfg.sft_dir)
        self.prompts = eval_prompts(self.task, cfg.n_eval_prompts)
        self.args = SamplingArgs(cfg.max_new_tokens, cfg.temperature, cfg.top_k)
        self.seed, self.device = cfg.seed, device
        self.ref_model = freeze(load_policy(cfg.sft_dir)).to(device)
        self.reward_model = freeze(load_reward_model(cfg.reward_dir)).to(device)
        self.ref_gold: list[float] | None = None
        self.ref_gold = self.measure(self.ref_model)["gold"]

    def measure(self, policy) -> dict:
        """`METHOD_KEYS` (floats), `gold_se` (standard error of the gold mean), `eos_frac`,
        and the per-prompt `gold` list (N,)."""
        ev = evaluate_policy(policy.to(self.device), self.tokenizer, self.task, self.prompts,
                             self.args, self.seed, self.reward_model, self.ref_model)
        gold = ev["gold"]
        mean = sum(gold) / len(gold)
        var = sum((g - mean) ** 2 for g in gold) / max(1, len(gold) - 1)
        ref_gold = self.ref_gold if self.ref_gold is not None else gold
        return {"gold_reward": ev["gold_reward"], "proxy_reward": ev["proxy_reward"],
                "kl_to_ref": ev["kl_to_ref"], "win_rate_vs_ref": win_rate(gold, ref_gold),
                "response_len": ev["response_len"], "eos_frac": ev["eos_frac"],
                "gold_se": math.sqrt(var / len(gold)), "gold": gold}

    def measure_dir(self, path: str) -> dict:
        """`measure` of the policy saved in `path` (without the per-prompt list)."""
        result = self.measure(load_policy(path))
        result.pop("gold")
        return result


def _base_config(cls: type, main_dir: str, cfg: CompareConfig, **overrides) -> object:
    """A `cls` config: the main run's recorded settings (defaults where none), plus overrides."""
    names = {f.name for f in dataclasses.fields(cls)}
    recorded = {k: v for k, v in read_run_config(main_dir).items() if k in names}
    # one process holds one accelerate state: every run here uses compare's device and precision
    shared = {"seed": cfg.seed, "task": cfg.task, "device": cfg.device,
              "mixed_precision": cfg.mixed_precision, "sft_dir": cfg.sft_dir,
              "reward_dir": cfg.reward_dir, "n_eval_prompts": cfg.n_eval_prompts,
              "eval_steps": 0, "save_steps": 0, "inspect_steps": 0, "resume_from_checkpoint": ""}
    return cls(**{**recorded, **{k: v for k, v in shared.items() if k in names}, **overrides})


def sweep_configs(cfg: CompareConfig) -> list[tuple[str, float, object]]:
    """(method, beta, config) of every short run of the frontier sweep."""
    runs = []
    for beta in cfg.ppo_betas:
        out = os.path.join(cfg.output_dir, "sweep", f"ppo_beta_{beta:g}")
        runs.append(("ppo", beta, _base_config(PPOConfig, cfg.ppo_dir, cfg, output_dir=out,
                                               beta=beta, max_steps=cfg.sweep_ppo_steps)))
    for beta in cfg.dpo_betas:
        out = os.path.join(cfg.output_dir, "sweep", f"dpo_beta_{beta:g}")
        runs.append(("dpo", beta, _base_config(DPOConfig, cfg.dpo_dir, cfg, output_dir=out,
                                               prefs_dir=cfg.prefs_dir, beta=beta,
                                               max_steps=cfg.sweep_dpo_steps)))
    return runs


def _same_as_main(run_cfg, main_dir: str) -> bool:
    """True when the main run was trained with exactly these settings (then it is reused)."""
    recorded = read_run_config(main_dir)
    skip = {"output_dir", "eval_steps", "save_steps", "n_eval_prompts", "logging_steps",
            "inspect_steps", "resume_from_checkpoint", "overwrite_output_dir"}
    return bool(recorded) and all(recorded.get(k) == v for k, v in dataclasses.asdict(run_cfg)
                                  .items() if k not in skip)


def run_sweep(cfg: CompareConfig, evaluator: Evaluator, main: dict) -> list[dict]:
    """Train and measure every sweep run; a run identical to a main run reuses its numbers."""
    from rlhf_toy.train.dpo import run_dpo
    from rlhf_toy.train.ppo import run_ppo

    runners = {"ppo": (run_ppo, cfg.ppo_dir), "dpo": (run_dpo, cfg.dpo_dir)}
    points = []
    runs = sweep_configs(cfg)
    for k, (method, beta, run_cfg) in enumerate(runs, start=1):
        runner, main_dir = runners[method]
        # 1. reuse the main run when it is this very configuration (same seed, same steps)
        if _same_as_main(run_cfg, main_dir):
            metrics, path = main[method], main_dir
        else:
            # 2. otherwise train the short run and measure its saved policy
            print(f"compare: sweep run {k}/{len(runs)}: {method} beta {beta:g}, "
                  f"{run_cfg.max_steps} steps", file=sys.stderr, flush=True)
            runner(run_cfg)
            metrics, path = evaluator.measure_dir(run_cfg.output_dir), run_cfg.output_dir
        points.append({"method": method, "beta": beta, "steps": run_cfg.max_steps,
                       "dir": path, **metrics})
    return points


def _frontier(summary: dict) -> dict[str, list[dict]]:
    """Per method, its (KL, gold) points: the reference at KL 0, the sweep and the main run."""
    ref = {"kl_to_ref": 0.0, "gold_reward": summary["sft"]["gold_reward"], "label": "sft"}
    out = {}
    for method in METHODS:
        points = [ref] + [{**p, "label": f"beta {p['beta']:g}"} for p in summary["sweep"]
                          if p["method"] == method and p["dir"] != summary[method]["dir"]]
        beta = summary[method].get("beta")
        points.append({**summary[method], "label": "main" if beta is None else f"main, beta {beta:g}"})
        out[method] = sorted(points, key=lambda p: p["kl_to_ref"])
    return out


def equal_kl_verdict(frontier: dict[str, list[dict]], seed: int, n_prompts: int) -> dict:
    """Which method reaches more gold at equal KL, as numbers and one sentence.

    The KL budget is the largest KL both methods reached (the smaller of the two maxima);
    each method's best gold among its points within the budget is compared, and the gap is
    expressed in standard errors of the two gold means (sqrt(se_a^2 + se_b^2)).
    """
    budget = min(max(p["kl_to_ref"] for p in frontier[m]) for m in METHODS)
    best = {m: max((p for p in frontier[m] if p["kl_to_ref"] <= budget + 1e-9),
                   key=lambda p: p["gold_reward"]) for m in METHODS}
    gap = best["ppo"]["gold_reward"] - best["dpo"]["gold_reward"]
    se = math.sqrt(sum(best[m].get("gold_se", 0.0) ** 2 for m in METHODS))
    z = abs(gap) / se if se > 0 else float("inf")
    lead, other = ("PPO", "DPO") if gap > 0 else ("DPO", "PPO")
    head = (f"At equal KL to the reference (KL <= {budget:.2f} nats, the largest KL both "
            f"methods reached), the best PPO policy reaches gold {best['ppo']['gold_reward']:.3f} "
            f"and the best DPO policy {best['dpo']['gold_reward']:.3f}: ")
    if z < 2.0:
        call = (f"neither is clearly ahead (gap {abs(gap):.3f}, {z:.1f} standard errors)")
    else:
        call = f"{lead} is ahead of {other} by {abs(gap):.3f} ({z:.1f} standard errors)"
    tail = (f". This rests on one seed ({seed}) and {n_prompts} held-out prompts, one "
            "training run per point; other seeds can reorder close points.")
    return {"kl_budget": budget, "best_ppo_gold": best["ppo"]["gold_reward"],
            "best_dpo_gold": best["dpo"]["gold_reward"], "gap_se": z,
            "sentence": head + call + tail}


def training_curves(run_dir: str) -> list[dict]:
    """The `eval_gold` / `eval_proxy` rows of a run's metrics.jsonl, with step 0 (from the
    run's summary) prepended when the run did not log it."""
    rows = []
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(path):
        with open(path) as fh:
            rows = [r for r in map(json.loads, fh) if "eval_gold" in r]
    summary_path = os.path.join(run_dir, "summary.json")
    if (not rows or rows[0]["step"] > 0) and os.path.isfile(summary_path):
        with open(summary_path) as fh:
            s = json.load(fh)
        if "gold_reward_before" in s:
            rows.insert(0, {"step": 0, "eval_gold": s["gold_reward_before"],
                            "eval_proxy": s.get("proxy_reward_before", float("nan"))})
    return rows


COLORS = {"ppo": "tab:blue", "dpo": "tab:orange"}


def plot_frontier(frontier: dict[str, list[dict]], kl_budget: float, path: str,
                  seed: int) -> None:
    """Gold reward against KL to the reference, one curve per method -> PNG at `path`."""
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend

    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    for method, points in frontier.items():
        kls = [p["kl_to_ref"] for p in points]
        golds = [p["gold_reward"] for p in points]
        ax.plot(kls, golds, "o-", color=COLORS[method], label=method.upper())
        for p in points[1:]:
            ax.annotate(p["label"], (p["kl_to_ref"], p["gold_reward"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    ref = frontier[METHODS[0]][0]
    ax.plot([ref["kl_to_ref"]], [ref["gold_reward"]], "ks", label="SFT (reference)")
    ax.axvline(kl_budget, color="gray", ls="--", lw=0.8, label="equal-KL budget")
    ax.set_xlabel("KL(policy || reference) per response [nats], from samples")
    ax.set_ylabel("held-out gold reward")
    ax.set_title(f"Gold reward vs KL to the reference (seed {seed})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_training_curves(curves: dict[str, list[dict]], path: str) -> None:
    """Held-out gold and proxy reward against step for the main runs -> PNG at `path`."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.6, 3.8))
    axes = fig.subplots(1, 2)
    for ax, key, name in zip(axes, ("eval_gold", "eval_proxy"), ("gold reward", "proxy reward"),
                             strict=True):
        for method, rows in curves.items():
            ax.plot([r["step"] for r in rows], [r.get(key, float("nan")) for r in rows], "o-",
                    ms=3, color=COLORS[method], label=method.upper())
        ax.set_xlabel("step (PPO: iteration; DPO: optimizer step)")
        ax.set_ylabel(f"held-out {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Main runs: held-out reward during training")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _row(name: str, m: dict, *extra: str) -> str:
    cells = [name, *extra] + [f"{m[k]:.3f}" for k in METHOD_KEYS]
    return "| " + " | ".join(cells) + " |"


def report_markdown(summary: dict) -> str:
    """`report.md`: the methods table, the sweep table, the plots and the verdict."""
    cols = "| gold reward | proxy reward | KL to ref | win rate vs ref | response length |"
    lines = [f"# PPO versus DPO ({summary['task']}, seed {summary['seed']})", "",
             f"Every policy is sampled once on the same {summary['n_eval_prompts']} held-out "
             "prompts with the same sampling seed. Gold is the hidden reward; proxy is the "
             "reward model; KL is KL(policy || SFT) per response, estimated from the samples; "
             "win rate is against the SFT response to the same prompt under gold (ties 1/2).",
             "", "| method " + cols, "|---|---|---|---|---|---|"]
    lines += [_row(m, summary[m]) for m in ("sft", *METHODS)]
    if summary["sweep"]:
        lines += ["", "## Frontier sweep", "", "| method | beta | steps " + cols,
                  "|---|---|---|---|---|---|---|---|"]
        lines += [_row(p["method"], p, f"{p['beta']:g}", str(p["steps"]))
                  for p in summary["sweep"]]
    lines += ["", f"![gold reward vs KL]({os.path.basename(summary['plots']['frontier'])})", "",
              f"![training curves]({os.path.basename(summary['plots']['training_curves'])})",
              "", f"**At equal KL.** {summary['verdict']['sentence']}", ""]
    return "\n".join(lines)


def run_compare(cfg: CompareConfig) -> dict:
    """Measure SFT, PPO and DPO the same way, sweep the frontier, plot and write the report.

    Returns:
        summary: one entry per method (`sft`, `ppo`, `dpo`) with `METHOD_KEYS`; `sweep`
        (list of points); `verdict`; `plots` and `report` paths; flat headline keys
        `<method>_gold_reward`, `<method>_kl_to_ref`; `wall_s`.
    """
    acc, t0 = start_stage(cfg, "compare")
    if acc.is_main_process:  # the sweep writes into output_dir/sweep/ from here on
        commit_run(cfg.output_dir)
    evaluator = Evaluator(cfg, acc.device)
    summary: dict = {"seed": cfg.seed, "task": cfg.task, "n_eval_prompts": cfg.n_eval_prompts}
    # 1. the reference and the two main runs, on the same prompts and sampling seed
    summary["sft"] = {**evaluator.measure_dir(cfg.sft_dir), "dir": cfg.sft_dir}
    for method, path in (("ppo", cfg.ppo_dir), ("dpo", cfg.dpo_dir)):
        recorded = read_run_config(path)
        summary[method] = {**evaluator.measure_dir(path), "dir": path,
                           "beta": recorded.get("beta"), "steps": recorded.get("max_steps")}
    # 2. the frontier sweep: short runs over betas, measured the same way
    summary["sweep"] = run_sweep(cfg, evaluator, summary) if cfg.sweep else []
    # 3. equal-KL verdict, plots and report
    summary["verdict"] = equal_kl_verdict(_frontier(summary), cfg.seed, cfg.n_eval_prompts)
    for method in ("sft", *METHODS):
        summary[f"{method}_gold_reward"] = summary[method]["gold_reward"]
        summary[f"{method}_kl_to_ref"] = summary[method]["kl_to_ref"]
    summary["plots"] = {"frontier": os.path.join(cfg.output_dir, "frontier.png"),
                        "training_curves": os.path.join(cfg.output_dir, "training_curves.png")}
    summary["report"] = os.path.join(cfg.output_dir, "report.md")
    summary["wall_s"] = time.perf_counter() - t0
    if acc.is_main_process:
        plot_frontier(_frontier(summary), summary["verdict"]["kl_budget"],
                      summary["plots"]["frontier"], cfg.seed)
        plot_training_curves({m: training_curves(summary[m]["dir"]) for m in METHODS},
                             summary["plots"]["training_curves"])
        with open(summary["report"], "w") as fh:
            fh.write(report_markdown(summary))
    finish_stage(cfg, acc, None, None, summary)
    return summary
