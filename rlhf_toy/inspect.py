"""`rlhf-toy inspect`: every number of the token MDP, one row per sampled response token,
for a checkpoint of any registered method, or for several side by side.

Shapes: B sampled responses, P prompt length, T response length.

Each checkpoint's columns are computed by its method's own objects (`rlhf_toy.credit`).
For a PPO checkpoint they are what the PPO update uses: `score_rollout` with the run's
own beta, KL estimator, gamma and lam, keeping the raw GAE advantages (before batch
whitening). For every real token t of a response:

    kl[t]        = kl_per_token(logprob[t], ref_logprob[t], kl_estimator)
    reward[t]    = -beta * kl[t]  (+ score on the last token)
    advantage[t] = GAE(reward, value; gamma, lam)[t]
    return[t]    = advantage[t] + value[t]              (the critic's target)

The critic-free methods show their own `reward` and `advantage` (and REINFORCE++ its
returns-to-go as `return`), with `value` None: GRPO the group-normalized sequence reward
and RLOO the score minus the leave-one-out mean, on every token of a completion (their
groups are G consecutive completions of one prompt, so `n` must be a multiple of G);
REINFORCE++ the per-token KL reward and its returns-to-go whitened over the B responses.

`score` is the score that enters the rewards: the reward model's, minus the run's
`missing_eos_penalty` for a response cut by the length limit, centered if the run centered
scores (over each prompt's `num_generations` completions, or the n samples with one per
prompt) or whitened if it whitened them; `rm_score`, shown where it differs, is the same
before centering. A run with an adaptive KL controller is shown with the beta
it ended with (the last `beta` in its metrics.jsonl).

For a preference checkpoint (`dpo`, `ipo`, `simpo`) there is no critic: `kl` is k1,
`reward` is the loss's implicit per-token reward (`core.implicit_token_rewards`: beta *
(logprob - ref_logprob) for DPO and IPO, beta / |y| * logprob for SimPO), `score` is the
reward model's (for comparison only), and `value`, `return`, `advantage` are None.

With several checkpoints (`--compare_dirs`) the responses are sampled once, from the
first checkpoint's policy with its run's decoding settings, and every checkpoint scores
those same responses with its own credit.

A report (what `inspect_samples` returns and `--json` writes; with several checkpoints
`--json` writes {"reports": [report, ...]}):
    {"stage", "method", "checkpoint", "beta", "gamma", "lam", "kl_estimator", "credit",
     "samples": [{"prompt", "response", "score", "gold", "token": [...], "logprob": [...],
                  ..., "advantage": [...]}]}
"""

from __future__ import annotations

import html
import json
import os
import random
import textwrap
from dataclasses import dataclass, field

import torch

from rlhf_toy.config import _f, check
from rlhf_toy.credit import group_size, load_credits, read_checkpoint
from rlhf_toy.datafiles import run_prompts
from rlhf_toy.errors import UsageError
from rlhf_toy.evaluate import NO_GOLD
from rlhf_toy.models import context_length
from rlhf_toy.rollout import decode_responses, encode_prompts, sample
from rlhf_toy.train.memory import check_memory

COLUMNS = ("token", "logprob", "ref_logprob", "kl", "reward", "value", "return", "advantage")
SIGNED = ("kl", "reward", "value", "return", "advantage")  # coloured by sign in the table


@dataclass
class InspectConfig:
    """Per-token log-probs, KL, rewards, values, returns and advantages of sampled responses."""

    checkpoint: str = _f("runs/default/ppo", "a run directory of any method (ppo, grpo, "
                                             "rloo, reinforce_pp, dpo, ipo, simpo)")
    compare_dirs: list[str] = field(default_factory=list, metadata={
        "help": "more run directories: the checkpoint's sampled responses scored under each "
                "one's credit too (side by side; an HTML switch between methods)"})
    n: int = _f(4, "responses to sample (a multiple of GRPO/RLOO's num_generations)")
    prompt: str = _f("", "answer this prompt (n times) instead of sampling task prompts")
    json: str = _f("", "write the report as JSON to this file")
    html: str = _f("", "write a self-contained HTML page (tokens coloured by advantage)")
    png: str = _f("", "write a heatmap figure (tokens by quantity)")
    seed: int = _f(0, "seed of the prompts and the sampling")
    device: str = _f("cpu", "cpu | cuda | auto")
    beta: float | None = _f(None, "override the runs' KL coefficient or preference beta")
    kl_estimator: str = _f("", "override the runs' KL estimator: k1 | k2 | k3 (on-policy)")
    gamma: float | None = _f(None, "override the runs' discount (ppo, reinforce_pp)")
    lam: float | None = _f(None, "override the run's GAE lambda (ppo)")

    def __post_init__(self) -> None:
        check(self.n > 0, "n", "> 0", self.n)
        check(self.device in ("auto", "cpu", "cuda"), "device", "auto, cpu or cuda", self.device)
        for path in (self.checkpoint, *self.compare_dirs):
            read_checkpoint(path)
        for name in ("json", "html", "png"):
            path = getattr(self, name)
            if path and os.path.isdir(path):
                raise UsageError(f"{name} {path!r} is a directory; give a file name")
            parent = os.path.dirname(os.path.abspath(path))
            if path and os.path.isdir(parent) and not os.access(parent, os.W_OK):
                raise UsageError(f"{name} {path!r} cannot be written (directory not writable)")
        check_memory(self, "inspect")


# --------------------------------------------------------------------------- records


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("device must be cpu or auto here: no CUDA device is available")
    return torch.device(name)


def _prompts(task, tokenizer, policy, n: int, prompt: str, seed: int, max_new_tokens: int,
             group: int) -> list[str]:
    """n / group task prompts, each `group` times in a row, or `prompt` n times after
    checking it fits the model."""
    if not prompt:
        prompts = task.sample_prompts(n // group, random.Random(seed))
        return [p for p in prompts for _ in range(group)]
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    unknown = [w for w, i in zip(prompt.split(), ids, strict=False) if i == tokenizer.unk_token_id]
    if not ids or unknown:
        raise UsageError(f"prompt must be words of the {task.name!r} task (got {prompt!r}; "
                         f"unknown: {unknown})")
    room = context_length(policy.config) - max_new_tokens
    check(len(ids) <= room, "prompt", f"at most {room} tokens (n_positions - max_new_tokens)",
          prompt)
    return [prompt] * n


def inspect_methods(checkpoints: list[str], n: int = 4, prompt: str = "", seed: int = 0,
                    device: str = "cpu", beta: float | None = None, kl_estimator: str = "",
                    gamma: float | None = None, lam: float | None = None) -> list[dict]:
    """Sample `n` responses once from the first checkpoint's policy and build each
    checkpoint's per-token records of those same responses.

    Args:
        checkpoints: run directories of registered methods (the first one samples).
        n: responses to sample, a multiple of every group size (GRPO/RLOO's G); prompt:
            answer this prompt n times instead of task prompts.
        seed: seeds the prompts and the draws (same seed, same responses whatever lam is).
        beta, kl_estimator, gamma, lam: override the runs' own values (None / "" keep
            them); gamma, lam and kl_estimator apply to the runs that have them.
    Returns:
        one report per checkpoint, as described in the module docstring.
    Raises:
        UsageError: not a registered method's run, n not a positive multiple of the group
            size, an override out of range or not applicable.
    """
    check(n > 0, "n", "> 0", n)
    overrides = {k: v for k, v in (("kl_estimator", kl_estimator), ("gamma", gamma),
                                   ("lam", lam)) if v not in (None, "")}
    dev = _device(device)
    credits = load_credits(checkpoints, dev, beta, overrides)
    group = group_size(credits)
    check(n % group == 0, "n", f"a multiple of {group} (completions are scored in groups of "
          "num_generations per prompt)", n)
    first, tokenizer = credits[0].sampling, credits[0].tokenizer
    task, prompt_source = run_prompts(checkpoints[0], credits[0].task_name, tokenizer)
    prompts = _prompts(prompt_source, tokenizer, first.policy, n, prompt, seed,
                       first.max_new_tokens, group)
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, dev)
    with torch.no_grad():
        s = sample(first.policy, prompt_ids, prompt_mask, first.max_new_tokens,
                   tokenizer.eos_token_id, tokenizer.pad_token_id, first.temperature,
                   first.top_k, generator=torch.Generator(device=dev).manual_seed(seed))
    gold = None if task is None else task.gold_batch(
        prompts, decode_responses(tokenizer, s.response_ids, s.mask))
    return [c.report(s, prompts, gold) for c in credits]


def gold_text(rec: dict) -> str:
    """A sample's gold reward as shown, or NO_GOLD."""
    return NO_GOLD if rec["gold"] is None else f"gold={rec['gold']:.3f}"


def inspect_samples(checkpoint: str, n: int = 4, prompt: str = "", seed: int = 0,
                    device: str = "cpu", beta: float | None = None, kl_estimator: str = "",
                    gamma: float | None = None, lam: float | None = None) -> dict:
    """`inspect_methods` of one checkpoint: its report (what `--json` writes)."""
    return inspect_methods([checkpoint], n, prompt, seed, device, beta, kl_estimator, gamma,
                           lam)[0]


# --------------------------------------------------------------------------- views


def sequence_kl(rec: dict) -> float:
    """The response's KL: its `kl` column summed over tokens."""
    return float(sum(rec["kl"]))


def describe(report: dict) -> str:
    """One line naming the checkpoint, the constants and how its credit is computed."""
    head = f"{report.get('method', report['stage'])} checkpoint {report['checkpoint']}: "
    if colour_column(report) == "reward":  # a preference method: its credit says it all
        return head + report["credit"]
    constants = " ".join(f"{k}={report[k]:g}" for k in ("beta", "gamma", "lam")
                         if report[k] is not None)
    credit = report.get("credit", "advantage before batch whitening")
    return f"{head}{constants} kl_estimator={report['kl_estimator']}; {credit}"


def sample_header(i: int, rec: dict) -> str:
    raw = rec.get("rm_score")
    rm = f"rm_score={raw:+.3f}  " if raw is not None and raw != rec["score"] else ""
    return (f"#{i} prompt: {rec['prompt']!r}  response: {rec['response']!r}  "
            f"{rm}score={rec['score']:+.3f}  {gold_text(rec)}  KL={sequence_kl(rec):+.3f}")


def _present(report: dict) -> list[str]:
    first = report["samples"][0] if report["samples"] else {}
    return [c for c in COLUMNS if first.get(c) is not None]


def render_terminal(report: dict, console=None) -> None:
    """One rich table per response: a row per token, signs coloured (green +, red -)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    console.print(Text(describe(report)))
    columns = _present(report)
    for i, rec in enumerate(report["samples"]):
        # collapsed padding: the eight columns fit an 80-column terminal
        # the header on its own line: a table title would wrap at the table's width
        console.print(Text(sample_header(i, rec)), soft_wrap=True)
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for c in columns:
            table.add_column(c, justify="left" if c == "token" else "right", no_wrap=True)
        for t, token in enumerate(rec["token"]):
            table.add_row(Text(token), *(_cell(c, rec[c][t]) for c in columns[1:]))
        console.print(table)


def _cell(column: str, value: float):
    """A table cell: the value with its sign, green if > 0 and red if < 0 (signed columns)."""
    from rich.text import Text

    style = ""
    if column in SIGNED and abs(value) >= 5e-4:
        style = "green" if value > 0 else "red"
    return Text(f"{value:+.3f}", style=style)


def colour_column(report: dict) -> str:
    """What the HTML and the side-by-side table show: the advantage where the method has
    one (on-policy), the implicit reward otherwise (preference)."""
    first = report["samples"][0] if report["samples"] else {}
    return "advantage" if first.get("advantage") is not None else "reward"


def render_side_by_side(reports: list[dict], console=None) -> None:
    """One table per response: a row per token, a column per method with its credit
    (`colour_column`), for responses every report shares."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    for r in reports:
        console.print(Text(describe(r)), soft_wrap=True)
    keys = [colour_column(r) for r in reports]
    for i, rec in enumerate(reports[0]["samples"]):
        console.print(Text(sample_header(i, rec)), soft_wrap=True)
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        table.add_column("token", no_wrap=True)
        for r, key in zip(reports, keys, strict=True):
            table.add_column(f"{r['method']} {key}", justify="right", no_wrap=True)
        for t, token in enumerate(rec["token"]):
            table.add_row(Text(token), *(_cell(key, r["samples"][i][key][t])
                                         for r, key in zip(reports, keys, strict=True)))
        console.print(table)


def _html_view(report: dict) -> str:
    """A report's description and a row of tokens per response, coloured by
    `colour_column`, each token's every column in its tooltip."""
    key = colour_column(report)
    columns = _present(report)[1:]
    scale = max([abs(v) for rec in report["samples"] for v in rec[key]] + [1e-8])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    rows = []
    for i, rec in enumerate(report["samples"]):
        spans = []
        for t, token in enumerate(rec["token"]):
            cells = "".join(f"<td>{rec[c][t]:+.4f}</td>" for c in columns)
            tip = (f'<span class="tip"><b>{html.escape(repr(token))}</b> (token {t})'
                   f"<table><tr>{head}</tr><tr>{cells}</tr></table></span>")
            spans.append(f'<span class="tok" tabindex="0" '
                         f'style="background:{_rgba(rec[key][t] / scale)}">'
                         f"{html.escape(token)}{tip}</span>")
        stats = (f"score {rec['score']:+.3f} &middot; {gold_text(rec).replace('=', ' ')} &middot; "
                 f"KL {sequence_kl(rec):+.3f}")
        rows.append(f'<div class="sample"><div class="head"><b>#{i}</b> '
                    f'<span class="stats">{stats}</span></div><div class="toks">'
                    f'<em class="prompt">{html.escape(rec["prompt"])}</em> '
                    f'{" ".join(spans)}</div></div>')
    legend = (f'<span class="key" style="background:{_rgba(-1)}">-{scale:.3f}</span> '
              f'<span class="key">0</span> '
              f'<span class="key" style="background:{_rgba(1)}">+{scale:.3f}</span>')
    return (f"<p>{html.escape(describe(report))}</p>"
            f"<p>Tokens coloured by {key} {legend}; the prompt is in grey. Hover a token "
            f"for every column.</p>{''.join(rows)}")


def render_html(reports: list[dict]) -> str:
    """A self-contained page (no script): one report's view, or with several a switch
    (radio buttons styled by CSS alone) between the methods' views of the same responses."""
    if len(reports) == 1:
        body = _html_view(reports[0])
    else:
        radios = "".join(f'<input type="radio" name="method" id="m{i}"{" checked" * (i == 0)}>'
                         f'<label for="m{i}">{html.escape(r["method"])}</label>'
                         for i, r in enumerate(reports))
        views = "".join(f'<div class="view" id="v{i}">{_html_view(r)}</div>'
                        for i, r in enumerate(reports))
        show = ",".join(f"#m{i}:checked~#v{i}" for i in range(len(reports)))
        body = (f"<p>The same responses under each method's credit; pick a method:</p>"
                f"<style>.view{{display:none}}{show}{{display:block}}"
                f"input:checked+label{{font-weight:bold}}</style>{radios}{views}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>rlhf-toy inspect</title>"
            f"<style>{_CSS}</style></head><body>{body}</body></html>\n")


_CSS = ("body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:72em;color:#1a1a1a;"
        "line-height:1.5}.sample{margin:1.2em 0}"
        ".head{font-size:.9em;margin-bottom:.3em}.stats{color:#555;margin-left:.5em}"
        ".prompt{color:#777;font-style:normal;font-family:monospace;margin-right:.3em}"
        ".tok,.key{font-family:monospace;padding:.15em .35em;border-radius:3px;"
        "border:1px solid #bbb;cursor:default;position:relative;display:inline-block;"
        "margin:.1em 0}"
        ".tip{display:none;position:absolute;left:0;top:2em;z-index:1;background:#fff;"
        "color:#111;border:1px solid #888;border-radius:4px;padding:.4em;white-space:nowrap;"
        # the pointer passes through a tip: it never hides, or keeps hovered, other tokens
        "box-shadow:0 2px 8px rgba(0,0,0,.3);pointer-events:none}"
        ".tok:hover .tip,.tok:focus .tip{display:block}"
        ".tip td,.tip th{padding:.1em .5em;text-align:right}")


def _rgba(x: float) -> str:
    """x in [-1, 1] -> a translucent red (negative) or green (positive); at most 70 %
    opaque, so dark text stays readable on the strongest colour."""
    alpha = 0.7 * min(1.0, abs(x))
    return f"rgba(46,160,67,{alpha:.3f})" if x >= 0 else f"rgba(214,39,40,{alpha:.3f})"


def render_png(report: dict, path: str) -> None:
    """A heatmap per response: quantities by tokens, each row scaled by its largest |value|."""
    from matplotlib.figure import Figure

    names = _present(report)[1:]
    samples = report["samples"]
    width = max(len(rec["token"]) for rec in samples)
    fig = Figure(figsize=(2.5 + 0.75 * width, 0.4 + (0.45 * len(names) + 0.8) * len(samples)),
                 layout="constrained")
    for ax, (i, rec) in zip(fig.subplots(len(samples), 1, squeeze=False)[:, 0],
                            enumerate(samples), strict=True):
        values = torch.tensor([rec[c] for c in names])  # (quantities, T)
        scale = values.abs().amax(dim=1, keepdim=True).clamp(min=1e-8)  # (quantities, 1)
        ax.imshow((values / scale).numpy(), cmap="RdYlGn", vmin=-1, vmax=1, aspect="auto")
        for (q, t), v in zip(torch.cartesian_prod(torch.arange(len(names)),
                                                  torch.arange(len(rec["token"]))).tolist(),
                             values.flatten().tolist(), strict=True):
            ax.text(t, q, f"{v:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(rec["token"])), rec["token"], rotation=45, ha="right",
                      fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_title(textwrap.fill(sample_header(i, rec), 100), fontsize=8, loc="left")
    fig.suptitle(textwrap.fill(describe(report), 90) + "\ncolour: each row scaled by its "
                 "largest |value| (green +, red -)", fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")  # long titles widen the page, never clip


# --------------------------------------------------------------------------- CLI


def _write(path: str, text: str) -> None:
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(text)
    except OSError as exc:
        raise UsageError(f"{path!r} cannot be written ({exc.strerror})") from None


def run_inspect(cfg: InspectConfig) -> dict:
    """`rlhf-toy inspect`: print the tables, write the requested files, return a summary."""
    reports = inspect_methods([cfg.checkpoint, *cfg.compare_dirs], cfg.n, cfg.prompt,
                              cfg.seed, cfg.device, cfg.beta, cfg.kl_estimator, cfg.gamma,
                              cfg.lam)
    report = reports[0]
    if len(reports) == 1:
        render_terminal(report)
    else:
        render_side_by_side(reports)
    if cfg.json:
        doc = report if len(reports) == 1 else {"reports": reports}
        _write(cfg.json, json.dumps(doc, indent=2) + "\n")
    if cfg.html:
        _write(cfg.html, render_html(reports))
    if cfg.png:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.png)), exist_ok=True)
        render_png(report, cfg.png)
    samples = report["samples"]
    return {"stage": report["stage"], "samples": len(samples),
            "score": sum(s["score"] for s in samples) / len(samples),
            "gold": (NO_GOLD if samples[0]["gold"] is None
                     else sum(s["gold"] for s in samples) / len(samples)),
            "kl": sum(sequence_kl(s) for s in samples) / len(samples)}
