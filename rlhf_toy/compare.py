"""Stage `compare`: every method on every seed against the SFT reference, with error bars.

Shapes: N held-out prompts, one sampled response each (lists of N floats per policy).

For each seed, compare reuses the finished runs it is given (the pipeline's, for its own
seed) and trains the rest with the same settings: sft, prefs, reward, then every method
(`rlhf_toy.methods.METHODS`) and its beta sweep (the method's beta times each of
`beta_factors`). Every policy of a seed is measured the same way (`Evaluator.measure`):
one sample per held-out prompt (the same prompts for every seed; the seed's sampling
seed), against that seed's SFT reference and reward model:
- `gold_reward`: mean hidden gold reward (the truth; nothing trained on it);
- `proxy_reward`: mean reward-model score (what the on-policy methods optimise);
- `kl_to_ref`: KL(pi || ref) per response, estimated from the samples as the mean over
  responses of sum_t (log pi(a_t|s_t) - log ref(a_t|s_t)) (k1 summed over the response);
- `win_rate_vs_ref`: how often its response beats the reference's under gold (ties 1/2);
- `response_len`, `eos_frac`: mean response tokens (EOS included), fraction ending in EOS.

With `prompts_path` (a user's prompts, no task) there is no gold reward: `gold_reward` and
`win_rate_vs_ref` are left out, the frontier is proxy reward against KL, no method is
ranked, and the reports say "no gold reward". With `prefs_path` every seed's reward and
preference runs read the user's pairs and no prefs stage runs.

Over the seeds each number becomes a mean and its standard error (`core/stats.py`).
A method's frontier is its trained policies only (main run and sweep), never the SFT
point. Two methods are compared at equal KL: the best mean gold each reaches with mean KL
at most the largest KL both reached; one is called ahead only when the gap is at least
2 standard errors.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import sys
import time

from rlhf_toy.compare_report import plot_frontier, plot_training_curves, report_markdown
from rlhf_toy.config import CompareConfig, parse_config, to_dict
from rlhf_toy.core.stats import difference, is_significant, mean, standard_error
from rlhf_toy.datafiles import load_prompts, split_prompts
from rlhf_toy.errors import UsageError
from rlhf_toy.evaluate import NO_GOLD, SamplingArgs, eval_prompts, evaluate_policy, win_rate
from rlhf_toy.methods import METHODS, STAGES
from rlhf_toy.models import freeze, load_policy, load_reward_model
from rlhf_toy.report_html import render_compare_html
from rlhf_toy.tasks import get_task
from rlhf_toy.tokenizer import load_tokenizer
from rlhf_toy.train.common import finish_stage, read_run_config, start_stage
from rlhf_toy.train.rundir import commit_run

METRICS = ("gold_reward", "proxy_reward", "kl_to_ref", "win_rate_vs_ref", "response_len",
           "eos_frac")
BASE_STAGES = ("sft", "prefs", "reward")


class Evaluator:
    """Measures any policy against one reference, reward model, prompt set and sampling seed."""

    def __init__(self, cfg: CompareConfig, seed: int, sft_dir: str, reward_dir: str, device):
        self.task = None if cfg.prompts_path else get_task(cfg.task)
        self.tokenizer = load_tokenizer(sft_dir)
        self.prompts = (eval_prompts(self.task, cfg.n_eval_prompts) if self.task is not None
                        else split_prompts(load_prompts(cfg.prompts_path, self.tokenizer),
                                           cfg.n_eval_prompts,
                                           f"prompts_path {cfg.prompts_path!r}")[1])
        self.args = SamplingArgs(cfg.max_new_tokens, cfg.temperature, cfg.top_k)
        self.seed, self.device = seed, device
        self.ref_model = freeze(load_policy(sft_dir)).to(device)
        self.reward_model = freeze(load_reward_model(reward_dir)).to(device)
        self.ref_gold: list[float] | None = None
        self.ref_gold = self.measure(self.ref_model).get("gold")

    def measure(self, policy) -> dict:
        """`METRICS` (floats) and the per-prompt `gold` list (N,); without a task, the
        metrics other than `gold_reward` and `win_rate_vs_ref`, and no list."""
        ev = evaluate_policy(policy.to(self.device), self.tokenizer, self.task, self.prompts,
                             self.args, self.seed, self.reward_model, self.ref_model)
        if "gold" not in ev:
            return {k: ev[k] for k in METRICS if k in ev}
        gold = ev["gold"]
        ref_gold = self.ref_gold if self.ref_gold is not None else gold
        return {**{k: ev[k] for k in METRICS if k in ev},
                "win_rate_vs_ref": win_rate(gold, ref_gold), "gold": gold}

    def measure_dir(self, path: str) -> dict:
        """`measure` of the policy saved in `path` (without the per-prompt list)."""
        result = self.measure(load_policy(path))
        result.pop("gold", None)
        return result


# --------------------------------------------------------------------------- the runs


def stage_template(cfg: CompareConfig, stage: str, reused: str, overrides=()) -> dict:
    """The settings every seed's run of `stage` repeats: those recorded by the finished run
    `reused` when there is one, else `config_dir/<stage>.yaml` (if any) plus `overrides`."""
    if reused:
        recorded = read_run_config(reused)
        if recorded.get("seed", cfg.seed) != cfg.seed:
            raise UsageError(f"seed must be the seed of the runs compare reuses: {reused!r} "
                             f"was trained with seed {recorded['seed']} (got {cfg.seed})")
        return recorded
    cls = STAGES[stage].load()[0]
    yaml = os.path.join(cfg.config_dir, f"{stage}.yaml") if cfg.config_dir else ""
    argv = ["--config", yaml] if yaml and os.path.isfile(yaml) else []
    return to_dict(parse_config(cls, [*argv, *overrides], prog=f"rlhf-toy {stage}"))


def stage_config(stage: str, template: dict, **fixed) -> object:
    """`stage`'s config: `template` with `fixed` on top (keys the stage lacks are dropped)."""
    cls = STAGES[stage].load()[0]
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in {**template, **fixed}.items() if k in names})


def train(stage: str, run_cfg) -> str:
    """Run `stage` with `run_cfg`; returns its output_dir."""
    print(f"compare: seed {run_cfg.seed}: {stage} -> {run_cfg.output_dir}", file=sys.stderr,
          flush=True)
    STAGES[stage].load()[1](run_cfg)
    return run_cfg.output_dir


def sweep_betas(beta: float | None, factors: list[float]) -> list[float]:
    """The sweep's betas: `beta` times each factor, rounded to 6 significant digits
    (0.05 * 0.2 -> 0.01), without the main run's own beta; none for a method without one."""
    if beta is None:
        return []
    betas = [float(f"{beta * f:.6g}") for f in factors]
    return [b for b in dict.fromkeys(betas) if b != beta]


def stage_inputs(dirs: dict[str, str]) -> dict[str, str]:
    """The input fields of a seed's run: `<stage>_dir` of each earlier stage; once this
    seed has an SFT run, a `model_name_or_path` recorded by the template is not read (the
    run starts from that SFT run, as the template's did from its own)."""
    inputs = {f"{k}_dir": v for k, v in dirs.items()}
    return {**inputs, "model_name_or_path": ""} if "sft" in dirs else inputs


def run_seed(cfg: CompareConfig, seed: int, templates: dict[str, dict], device) -> dict:
    """Every stage and method of one seed, trained or reused, measured the same way.

    Returns:
        {"seed", "sft": metrics, "methods": {name: metrics}, "sweep": [points]}; metrics
        carry `METRICS`, `dir` and, for methods, `beta`.
    """
    root = os.path.join(cfg.output_dir, f"seed_{seed}")
    own = seed == cfg.seed  # the seed whose finished runs were given
    fixed = {"seed": seed, "task": cfg.task, "device": cfg.device,
             "mixed_precision": cfg.mixed_precision, "resume_from_checkpoint": "",
             "prefs_path": cfg.prefs_path, "prompts_path": cfg.prompts_path}
    # 1. sft, prefs, reward: the given runs for --seed, else trained with their settings
    dirs: dict[str, str] = {}
    for stage in BASE_STAGES:
        if stage == "prefs" and cfg.prefs_path:  # the user's pairs instead
            continue
        given = getattr(cfg, f"{stage}_dir") if own else ""
        inputs = stage_inputs(dirs)
        dirs[stage] = given or train(stage, stage_config(
            stage, templates[stage], **fixed, **inputs, output_dir=os.path.join(root, stage)))
    inputs = stage_inputs(dirs)
    evaluator = Evaluator(cfg, seed, dirs["sft"], dirs["reward"], device)
    result = {"seed": seed, "sft": {**evaluator.measure_dir(dirs["sft"]), "dir": dirs["sft"]},
              "methods": {}, "sweep": []}
    # 2. every method: its main run (given or trained), then the short sweep runs
    given_dirs = cfg.reused_method_dirs() if own else {}
    for name in cfg.methods:
        stage = METHODS[name].stage
        main_dir = given_dirs.get(name) or train(stage, stage_config(
            stage, templates[name], **fixed, **inputs, output_dir=os.path.join(root, name)))
        beta = read_run_config(main_dir).get("beta")
        result["methods"][name] = {**evaluator.measure_dir(main_dir), "dir": main_dir,
                                   "beta": beta, "overoptimization": indicator(main_dir)}
        for b in sweep_betas(beta, cfg.beta_factors) if cfg.sweep else []:
            out = os.path.join(root, "sweep", f"{name}_beta_{b:g}")
            path = train(stage, stage_config(
                stage, templates[name], **fixed, **inputs, output_dir=out, beta=b,
                eval_steps=0, save_steps=0, inspect_steps=0, adaptive_kl=False))
            result["sweep"].append({"method": name, "beta": b, "dir": path,
                                    **evaluator.measure_dir(path)})
    return result


def indicator(run_dir: str) -> dict | None:
    """The run's gold-free over-optimization indicator where it fired (`rule`, `step`, the
    `message` it warned), else None (quiet, or a stage without one: the preference losses)."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        state = json.load(fh).get("overoptimization")
    if not state or not state.get("fired"):
        return None
    message = state.get("message") or (  # summaries written before the message was kept
        f"reward-model over-optimization at iteration {state['step']} ({state['rule']} rule)")
    return {"rule": state["rule"], "step": state["step"], "message": message}


# --------------------------------------------------------------------------- statistics


def aggregate(rows: list[dict]) -> dict:
    """Mean and standard error over seeds of every metric, plus the per-seed rows.

    Args:
        rows: one dict per seed holding `METRICS` (and anything else, e.g. `seed`, `dir`).
    Returns:
        {key: mean, key_se: standard error (NaN for one seed), "per_seed": rows}.
    """
    out: dict = {}
    for key in (k for k in METRICS if k in rows[0]):  # no gold keys without a gold reward
        values = [r[key] for r in rows]
        out[key], out[f"{key}_se"] = mean(values), standard_error(values)
    out["per_seed"] = rows
    return out


def aggregate_seeds(per_seed: list[dict], methods: list[str]) -> dict:
    """sft, each method and each sweep point as means and standard errors over the seeds."""
    summary: dict = {"sft": aggregate([{"seed": r["seed"], **r["sft"]} for r in per_seed])}
    for name in methods:
        rows = [{"seed": r["seed"], **r["methods"][name]} for r in per_seed]
        summary[name] = {**aggregate(rows), "beta": rows[0]["beta"],
                         "dirs": [row["dir"] for row in rows]}
    sweep = []
    points = sorted(({"seed": r["seed"], **p} for r in per_seed for p in r["sweep"]),
                    key=lambda p: (methods.index(p["method"]), p["beta"], p["seed"]))
    for (name, beta), group in itertools.groupby(points, key=lambda p: (p["method"], p["beta"])):
        sweep.append({"method": name, "beta": beta, **aggregate(list(group))})
    summary["sweep"] = sweep
    return summary


def frontier(summary: dict, methods: list[str]) -> dict[str, list[dict]]:
    """Per method, its trained policies (main run and sweep) by mean KL; no SFT point."""
    out = {}
    for name in methods:
        beta = summary[name]["beta"]
        points = [{**summary[name], "label": "main" if beta is None else f"main, beta {beta:g}"}]
        points += [{**p, "label": f"beta {p['beta']:g}"} for p in summary["sweep"]
                   if p["method"] == name]
        out[name] = sorted(points, key=lambda p: p["kl_to_ref"])
    return out


def equal_kl_pair(frontier_a: list[dict], frontier_b: list[dict], a: str, b: str,
                  n_seeds: int) -> dict:
    """Which of two methods reaches more gold at equal KL, as numbers and one sentence.

    The KL budget is the largest mean KL both reached (the smaller of the two maxima); each
    method's best mean gold among its points within the budget is compared, with the
    standard error of the difference; "ahead" needs at least 2 standard errors.
    """
    budget = min(max(p["kl_to_ref"] for p in f) for f in (frontier_a, frontier_b))
    best = [max((p for p in f if p["kl_to_ref"] <= budget + 1e-9),
                key=lambda p: p["gold_reward"], default=None) for f in (frontier_a, frontier_b)]
    out = {"methods": [a, b], "kl_budget": budget}
    names = f"{a.upper()} and {b.upper()}"
    if None in best:
        low = a if best[0] is None else b
        out["sentence"] = (f"{names} cannot be compared at equal KL: every {low.upper()} "
                           f"policy has a KL above the other's largest ({budget:.2f} nats).")
        return out
    (ga, sa), (gb, sb) = ((p["gold_reward"], p["gold_reward_se"]) for p in best)
    diff, se = difference(ga, sa, gb, sb)
    z = abs(diff) / se if se > 0 else math.inf
    out.update(gold=[ga, gb], gold_se=[sa, sb], labels=[p["label"] for p in best], diff=diff,
               diff_se=se, z=z, significant=is_significant(diff, se))
    where = (f"at equal KL (<= {budget:.2f} nats, the largest mean KL both reached), "
             f"{a.upper()} reaches gold {ga:.3f} and {b.upper()} {gb:.3f}")
    if n_seeds < 2:
        out["sentence"] = (f"With one seed, {where}; there is no standard error across seeds, "
                           "so no difference can be called significant.")
    elif out["significant"]:
        lead, other = (a, b) if diff > 0 else (b, a)
        out["sentence"] = (f"{lead.upper()} is ahead of {other.upper()}: {where}, a gap of "
                           f"{abs(diff):.3f} +- {se:.3f} ({z:.1f} standard errors over "
                           f"{n_seeds} seeds).")
    else:
        out["sentence"] = (f"No significant difference between {names}: {where}, a gap of "
                           f"{abs(diff):.3f} +- {se:.3f} ({z:.1f} standard errors over "
                           f"{n_seeds} seeds; a verdict needs 2).")
    return out


def below_reference(summary: dict, methods: list[str], fronts: dict) -> list[str]:
    """One plain sentence per method whose main run ends below the SFT reference in gold."""
    ref, lines = summary["sft"], []
    ref_seeds = [r["gold_reward"] for r in ref["per_seed"]]
    for name in methods:
        m = summary[name]
        if m["gold_reward"] >= ref["gold_reward"]:
            continue
        diff, se = difference(m["gold_reward"], m["gold_reward_se"], ref["gold_reward"],
                              ref["gold_reward_se"])
        lower = sum(r["gold_reward"] < g for r, g in zip(m["per_seed"], ref_seeds, strict=True))
        if not math.isfinite(se):  # one seed: no standard error, no significance
            head, spread = "ends below the reference", f"{diff:.4f}, one seed"
        else:
            head = ("made the policy worse: its main run ends below the reference" if
                    is_significant(diff, se) else "ends below the reference, within the noise")
            spread = f"{diff:.4f} +- {se:.4f}"
        line = (f"{name.upper()} {head}: gold {m['gold_reward']:.3f} against SFT's "
                f"{ref['gold_reward']:.3f} (difference {spread}; lower on "
                f"{lower} of {len(ref_seeds)} seeds).")
        if all(p["gold_reward"] < ref["gold_reward"] for p in fronts[name]):
            line += f" Every {name.upper()} policy of the sweep is below the reference too."
        lines.append(line)
    return lines


def _json_ready(obj):
    """NaN (a standard error of one seed) -> None, so summary.json is strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_ready(v) for v in obj]
    return obj


def run_compare(cfg: CompareConfig) -> dict:
    """Train or reuse every stage and method on every seed, measure, aggregate, report.

    Returns:
        summary: `sft` and one entry per method with the mean of each of `METRICS`, its
        standard error `<key>_se` and `per_seed` values; `sweep` (points, the same);
        `verdict` (`pairs`, `sentence`); `below_reference`; `plots` and `report` paths;
        flat headline keys `<method>_gold_reward`, `<method>_kl_to_ref`; `wall_s`.
    """
    acc, t0 = start_stage(cfg, "compare")
    if acc.is_main_process:  # the runs of every seed go into output_dir from here on
        commit_run(cfg.output_dir)
    seeds, given = cfg.seed_list(), cfg.reused_method_dirs()
    templates = {stage: stage_template(cfg, stage, getattr(cfg, f"{stage}_dir"))
                 for stage in BASE_STAGES}
    for name in cfg.methods:
        method = METHODS[name]
        templates[name] = stage_template(cfg, method.stage, given.get(name, ""), method.overrides)
    # 1. every seed: train or reuse, measure on the same held-out prompts
    per_seed = [run_seed(cfg, seed, templates, acc.device) for seed in seeds]
    # 2. means and standard errors over the seeds; the verdicts at equal KL
    summary = {"task": cfg.task, "seeds": seeds, "n_eval_prompts": cfg.n_eval_prompts,
               "methods": list(cfg.methods), **aggregate_seeds(per_seed, cfg.methods)}
    fronts = frontier(summary, cfg.methods)
    if "gold_reward" in summary["sft"]:
        pairs = [equal_kl_pair(fronts[a], fronts[b], a, b, len(seeds))
                 for a, b in itertools.combinations(cfg.methods, 2)]
        summary["verdict"] = {"pairs": pairs, "sentence": " ".join(p["sentence"] for p in pairs)}
        summary["below_reference"] = below_reference(summary, cfg.methods, fronts)
    else:  # the proxy is what the on-policy methods maximise: it cannot rank them
        summary["gold"] = NO_GOLD
        summary["verdict"] = {"pairs": [], "sentence": "No gold reward (prompts_path): no "
                              "method is ranked; the proxy reward is what some of them optimise."}
        summary["below_reference"] = []
    for name in ("sft", *cfg.methods):
        if "gold_reward" in summary[name]:
            summary[f"{name}_gold_reward"] = summary[name]["gold_reward"]
        summary[f"{name}_kl_to_ref"] = summary[name]["kl_to_ref"]
    # 3. plots and report
    summary["plots"] = {"frontier": os.path.join(cfg.output_dir, "frontier.png"),
                        "training_curves": os.path.join(cfg.output_dir, "training_curves.png")}
    summary["report"] = os.path.join(cfg.output_dir, "report.md")
    summary["report_html"] = os.path.join(cfg.output_dir, "report.html")
    summary["wall_s"] = time.perf_counter() - t0
    if acc.is_main_process:
        plot_frontier(fronts, summary["sft"], summary["plots"]["frontier"], summary)
        plot_training_curves({m: summary[m]["dirs"][0] for m in cfg.methods}, seeds[0],
                             summary["plots"]["training_curves"], "gold" not in summary)
        with open(summary["report"], "w") as fh:
            fh.write(report_markdown(summary))
        with open(summary["report_html"], "w") as fh:  # the same, one page: plots inline
            fh.write(render_compare_html(_json_ready(summary)))
    finish_stage(cfg, acc, None, None, _json_ready(summary))
    return summary
