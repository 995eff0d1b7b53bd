"""What `compare` writes for people: `report.md`, `frontier.png`, `training_curves.png`.

Numbers are means over seeds with their standard errors ("mean ± s.e."); with one seed
there is no standard error and the cells show the value alone. A compare without a gold
reward (`summary["gold"]`, a user's prompts) shows no gold column, plots proxy reward
against KL, and says "no gold reward".
"""

from __future__ import annotations

import json
import math
import os

COLS = ("gold_reward", "proxy_reward", "kl_to_ref", "win_rate_vs_ref", "response_len")
COL_NAMES = {"gold_reward": "gold reward", "proxy_reward": "proxy reward",
             "kl_to_ref": "KL to ref", "win_rate_vs_ref": "win rate vs ref",
             "response_len": "response length"}
GOLD_COLS = ("gold_reward", "win_rate_vs_ref")  # measured under the gold reward


def _cols(summary: dict) -> tuple[str, ...]:
    """The table's columns: all of COLS, or those that need no gold reward."""
    return tuple(k for k in COLS if "gold" not in summary or k not in GOLD_COLS)


def _header(cols: tuple[str, ...]) -> str:
    return "| " + " | ".join(COL_NAMES[k] for k in cols) + " |"


def _num(x: float) -> str:
    """Three decimals, never "-0.000" (a KL of -1e-7 from float rounding is 0)."""
    text = f"{x:.3f}"
    return "0.000" if text == "-0.000" else text


def _cell(m: dict, key: str) -> str:
    se = m.get(f"{key}_se")
    if se is None or math.isnan(se):
        return _num(m[key])
    return f"{_num(m[key])} ± {se:.3f}"


def _row(name: str, m: dict, cols: tuple[str, ...], *extra: str) -> str:
    return "| " + " | ".join([name, *extra, *(_cell(m, k) for k in cols)]) + " |"


def _seeds_note(seeds: list[int]) -> str:
    if len(seeds) < 2:
        return ("One seed: no error bars exist. A standard error over seeds needs the runs of "
                "at least two seeds; the spread over prompts within one run says nothing about "
                "how training on another seed would end, so no difference below is called "
                "significant. Run with `--seeds` listing two or more seeds.")
    return (f"Each cell is the mean over {len(seeds)} seeds ({', '.join(map(str, seeds))}) ± "
            "its standard error (the standard deviation over seeds / sqrt(n)). A method is "
            "called ahead of another only when the gap is at least 2 standard errors.")


def indicator_lines(summary: dict, methods: list[str]) -> list[str]:
    """The gold-free over-optimization indicator of every main on-policy run: one line per
    run where it fired, or one line saying it stayed quiet."""
    fired = [f"- {m}, seed {r['seed']}: {r['overoptimization']['message']}"
             for m in methods for r in summary[m]["per_seed"] if r.get("overoptimization")]
    if not fired:
        return ["The gold-free over-optimization indicator (README, \"Defaults that hold on "
                "every task\") stayed quiet on every on-policy run."]
    return ["The gold-free over-optimization indicator fired (no gold reward needed; an "
            "earlier policy or a smaller target KL is likely better):", "", *fired]


def report_markdown(summary: dict) -> str:
    """`report.md`: methods table, per-seed gold, sweep table, plots, verdicts, warnings."""
    methods, seeds, cols = summary["methods"], summary["seeds"], _cols(summary)
    head, rule = "| method | beta " + _header(cols), "|---" * (len(cols) + 2) + "|"
    plots = {k: os.path.basename(v) for k, v in summary["plots"].items()}
    gold = "gold" not in summary
    lines = [f"# Methods compared ({summary['task']}; seeds {', '.join(map(str, seeds))})", "",
             f"Every policy is sampled once on the same {summary['n_eval_prompts']} held-out "
             "prompts; each seed samples with its own seed and is measured against its own SFT "
             "reference and reward model. "
             + ("Gold is the hidden reward; proxy is the reward model; "
                "KL is KL(policy || SFT) per response, estimated from the samples; win rate is "
                "against the SFT response to the same prompt under gold (ties 1/2)." if gold else
                f"There is {summary['gold']} (the prompts are the user's): proxy is the reward "
                "model, which some methods optimise, so it ranks nothing; KL is KL(policy || "
                "SFT) per response, estimated from the samples."), "",
             _seeds_note(seeds), "", head, rule, _row("sft (reference)", summary["sft"], cols, "")]
    lines += [_row(m, summary[m], cols, f"{summary[m]['beta']:g}"
                   if summary[m]["beta"] is not None else "") for m in methods]
    if summary["below_reference"]:
        lines += ["", *(f"**{line}**" for line in summary["below_reference"])]
    if gold:
        lines += ["", "Gold reward per seed:", "",
                  "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                  "|---" * (len(seeds) + 1) + "|"]
        lines += ["| " + " | ".join([m, *(_num(r["gold_reward"])
                                          for r in summary[m]["per_seed"])]) + " |"
                  for m in ("sft", *methods)]
    lines += ["", *indicator_lines(summary, methods)]
    if summary["sweep"]:
        lines += ["", "## Frontier sweep", "", head, rule]
        lines += [_row(p["method"], p, cols, f"{p['beta']:g}") for p in summary["sweep"]]
    y_name = "gold reward" if gold else "proxy reward"
    lines += ["", f"![{y_name} vs KL]({plots['frontier']})", "",
              f"![training curves]({plots['training_curves']})", "", "## At equal KL", ""]
    lines += ([f"- {p['sentence']}" for p in summary["verdict"]["pairs"]] if gold
              else [summary["verdict"]["sentence"]])
    return "\n".join(lines) + "\n"


def training_curves(run_dir: str) -> list[dict]:
    """The held-out evaluation rows (`eval_proxy`, and `eval_gold` where there is a gold
    reward) of a run's metrics.jsonl, with step 0 (from the run's summary) prepended when
    the run did not log it."""
    rows = []
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(path):
        with open(path) as fh:
            rows = [r for r in map(json.loads, fh) if "eval_proxy" in r]
    summary_path = os.path.join(run_dir, "summary.json")
    if (not rows or rows[0]["step"] > 0) and os.path.isfile(summary_path):
        with open(summary_path) as fh:
            s = json.load(fh)
        if "proxy_reward_before" in s:
            rows.insert(0, {"step": 0, "eval_proxy": s["proxy_reward_before"],
                            **({"eval_gold": s["gold_reward_before"]}
                               if "gold_reward_before" in s else {})})
    return rows


def _err(points: list[dict], key: str) -> list[float] | None:
    errs = [p.get(f"{key}_se") for p in points]
    return None if any(e is None or math.isnan(e) for e in errs) else errs


def plot_frontier(frontier: dict[str, list[dict]], sft: dict, path: str, summary: dict) -> None:
    """Gold reward (proxy reward without a gold reward) against KL to the reference, one
    curve per method, error bars of one standard error over seeds in both directions -> PNG
    at `path`."""
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend

    y = "gold_reward" if "gold" not in summary else "proxy_reward"
    fig = Figure(figsize=(6.8, 4.6))
    ax = fig.subplots()
    for i, (method, points) in enumerate(frontier.items()):
        ax.errorbar([p["kl_to_ref"] for p in points], [p[y] for p in points],
                    xerr=_err(points, "kl_to_ref"), yerr=_err(points, y),
                    fmt="o-", ms=4, capsize=3, color=f"C{i}", label=method.upper())
        for p in points:
            ax.annotate(p["label"], (p["kl_to_ref"], p[y]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    ax.errorbar([0.0], [sft[y]], yerr=_err([sft], y), fmt="ks",
                capsize=3, label="SFT (reference)")
    pairs = summary["verdict"]["pairs"]
    if len(pairs) == 1:
        ax.axvline(pairs[0]["kl_budget"], color="gray", ls="--", lw=0.8, label="equal-KL budget")
    n = len(summary["seeds"])
    spread = f"mean ± s.e. over {n} seeds" if n > 1 else f"seed {summary['seeds'][0]}, no error bars"
    ax.set_xlabel("KL(policy || reference) per response [nats], from samples")
    name = "gold reward" if y == "gold_reward" else f"proxy reward ({summary['gold']})"
    ax.set_ylabel(f"held-out {name}")
    ax.set_title(f"{name.capitalize()} vs KL to the reference ({spread})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_training_curves(run_dirs: dict[str, str], seed: int, path: str,
                         gold: bool = True) -> None:
    """Held-out gold (where there is a gold reward) and proxy reward against step for the
    main runs of one seed -> PNG."""
    from matplotlib.figure import Figure

    panels = (("eval_gold", "gold reward"),) * gold + (("eval_proxy", "proxy reward"),)
    fig = Figure(figsize=(4.8 * len(panels), 3.8))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, name) in zip(axes, panels, strict=True):
        for i, (method, run_dir) in enumerate(run_dirs.items()):
            rows = training_curves(run_dir)
            ax.plot([r["step"] for r in rows], [r.get(key, float("nan")) for r in rows], "o-",
                    ms=3, color=f"C{i}", label=method.upper())
        ax.set_xlabel("step (on-policy: iteration; preference: optimizer step)")
        ax.set_ylabel(f"held-out {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Main runs, seed {seed}: held-out reward during training")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
