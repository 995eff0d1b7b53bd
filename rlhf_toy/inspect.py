"""`rlhf-toy inspect`: every number of the token MDP, one row per sampled response token.

Shapes: B sampled responses, P prompt length, T response length.

For a PPO checkpoint the columns are what the PPO update uses: `collect_rollout` with the
run's own beta, KL estimator, gamma and lam, keeping the raw GAE advantages (before batch
whitening). For every real token t of a response:

    kl[t]        = kl_per_token(logprob[t], ref_logprob[t], kl_estimator)
    reward[t]    = -beta * kl[t]  (+ score on the last token)
    advantage[t] = GAE(reward, value; gamma, lam)[t]
    return[t]    = advantage[t] + value[t]              (the critic's target)

`score` is the score that enters the rewards: the reward model's, minus the run's
`missing_eos_penalty` for a response cut by the length limit (whitened over the n samples
if the run whitened scores). A run with an adaptive KL controller is shown with the beta
it ended with (the last `beta` in its metrics.jsonl).

For a DPO checkpoint there is no critic: `kl` is k1, `reward` is the implicit per-token
reward beta * (logprob - ref_logprob) (Rafailov et al. 2023, section 5), `score` is the
reward model's (for comparison only), and `value`, `return`, `advantage` are None.

A report (what `inspect_samples` returns and `--json` writes):
    {"stage", "checkpoint", "beta", "gamma", "lam", "kl_estimator",
     "samples": [{"prompt", "response", "score", "gold", "token": [...], "logprob": [...],
                  ..., "advantage": [...]}]}
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import random
import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rlhf_toy.config import _f, check
from rlhf_toy.core import kl_per_token, logprobs_from_logits
from rlhf_toy.errors import UsageError
from rlhf_toy.models import (
    VALUE_HEAD_FILE,
    PolicyWithCritic,
    PolicyWithValueHead,
    RewardCritic,
    freeze,
    load_policy,
    load_reward_model,
    response_logits,
    reward_scores,
)
from rlhf_toy.rollout import decode_responses, encode_prompts, sample
from rlhf_toy.tasks import get_task
from rlhf_toy.tokenizer import load_tokenizer
from rlhf_toy.train.common import read_run_config
from rlhf_toy.train.memory import check_memory
from rlhf_toy.train.snapshots import CRITIC_COLUMNS, ppo_records, token_records

if TYPE_CHECKING:  # train.ppo imports this module
    from rlhf_toy.train.ppo import PPOConfig

COLUMNS = ("token", "logprob", "ref_logprob", "kl", "reward", "value", "return", "advantage")
SIGNED = ("kl", "reward", "value", "return", "advantage")  # coloured by sign in the table


@dataclass
class InspectConfig:
    """Per-token log-probs, KL, rewards, values, returns and advantages of sampled responses."""

    checkpoint: str = _f("runs/default/ppo", "a PPO or DPO run directory")
    n: int = _f(4, "responses to sample")
    prompt: str = _f("", "answer this prompt (n times) instead of sampling task prompts")
    json: str = _f("", "write the report as JSON to this file")
    html: str = _f("", "write a self-contained HTML page (tokens coloured by advantage)")
    png: str = _f("", "write a heatmap figure (tokens by quantity)")
    seed: int = _f(0, "seed of the prompts and the sampling")
    device: str = _f("cpu", "cpu | cuda | auto")
    beta: float | None = _f(None, "override the run's KL coefficient (PPO) or DPO beta")
    kl_estimator: str = _f("", "override the run's KL estimator: k1 | k2 | k3 (PPO only)")
    gamma: float | None = _f(None, "override the run's discount (PPO only)")
    lam: float | None = _f(None, "override the run's GAE lambda (PPO only)")

    def __post_init__(self) -> None:
        check(self.n > 0, "n", "> 0", self.n)
        check(self.device in ("auto", "cpu", "cuda"), "device", "auto, cpu or cuda", self.device)
        read_checkpoint(self.checkpoint)
        for name in ("json", "html", "png"):
            path = getattr(self, name)
            if path and os.path.isdir(path):
                raise UsageError(f"{name} {path!r} is a directory; give a file name")
            parent = os.path.dirname(os.path.abspath(path))
            if path and os.path.isdir(parent) and not os.access(parent, os.W_OK):
                raise UsageError(f"{name} {path!r} cannot be written (directory not writable)")
        check_memory(self, "inspect")


# --------------------------------------------------------------------------- loading


def read_checkpoint(path: str) -> dict:
    """The run config of a PPO or DPO run directory (`UsageError` for anything else)."""
    if not os.path.isdir(path):
        raise UsageError(f"checkpoint {path!r} does not exist (give a ppo or dpo run directory)")
    run = read_run_config(path)
    if run.get("stage") not in ("ppo", "dpo"):
        what = f"a {run['stage']!r} run" if run.get("stage") else "no run_config.json"
        raise UsageError(f"checkpoint {path!r} holds {what}; give a ppo or dpo run directory")
    return run


def _input_dir(path: str, checkpoint: str) -> str:
    """A run's recorded input dir; a relative one that moved is looked up next to the run."""
    if os.path.isdir(path):
        return path
    sibling = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), os.path.basename(path))
    return sibling if os.path.isdir(sibling) else path


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("device must be cpu or auto here: no CUDA device is available")
    return torch.device(name)


def _load_actor_critic(checkpoint: str, run: dict, reward_dir: str):
    """The trained policy with the critic saved next to it (frozen)."""
    if run.get("critic", "value_head") == "value_head":
        if not os.path.isfile(os.path.join(checkpoint, VALUE_HEAD_FILE)):
            raise UsageError(f"PPO checkpoint {checkpoint!r} has no {VALUE_HEAD_FILE}")
        return freeze(PolicyWithValueHead.from_pretrained(checkpoint))
    critic_file = os.path.join(checkpoint, "critic.pt")
    if not os.path.isfile(critic_file):
        raise UsageError(f"PPO checkpoint {checkpoint!r} has no critic.pt")
    model = PolicyWithCritic(load_policy(checkpoint), RewardCritic(load_reward_model(reward_dir)))
    model.critic.load_state_dict(torch.load(critic_file, weights_only=True))
    return freeze(model)


def _final_beta(checkpoint: str, cfg: PPOConfig) -> float:
    """The KL coefficient the run ended with (the adaptive controller moves it)."""
    metrics = os.path.join(checkpoint, "metrics.jsonl")
    if not cfg.adaptive_kl or not os.path.isfile(metrics):
        return cfg.beta
    with open(metrics) as fh:
        betas = [row["beta"] for row in map(json.loads, fh) if "beta" in row]
    return betas[-1] if betas else cfg.beta


def _prompts(task, tokenizer, policy, n: int, prompt: str, seed: int,
             max_new_tokens: int) -> list[str]:
    """`n` task prompts, or `prompt` n times after checking it fits the model."""
    if not prompt:
        return task.sample_prompts(n, random.Random(seed))
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    unknown = [w for w, i in zip(prompt.split(), ids, strict=False) if i == tokenizer.unk_token_id]
    if not ids or unknown:
        raise UsageError(f"prompt must be words of the {task.name!r} task (got {prompt!r}; "
                         f"unknown: {unknown})")
    room = policy.config.n_positions - max_new_tokens
    check(len(ids) <= room, "prompt", f"at most {room} tokens (n_positions - max_new_tokens)",
          prompt)
    return [prompt] * n


# --------------------------------------------------------------------------- records


@torch.no_grad()
def _ppo_report(checkpoint: str, run: dict, n: int, prompt: str, seed: int,
                device: torch.device, beta: float | None, overrides: dict) -> dict:
    from rlhf_toy.train.onpolicy import collect_rollout
    from rlhf_toy.train.ppo import PPO, PPOConfig

    names = {f.name for f in dataclasses.fields(PPOConfig)}
    cfg = PPOConfig(**{k: v for k, v in run.items() if k in names})
    beta = _final_beta(checkpoint, cfg) if beta is None else beta
    # raw advantages: whitening is a batch-level rescaling applied after GAE
    cfg = dataclasses.replace(cfg, **overrides, beta=beta, whiten_advantages=False)
    reward_dir = _input_dir(cfg.reward_dir, checkpoint)
    model = _load_actor_critic(checkpoint, run, reward_dir).to(device)
    ref_model = freeze(load_policy(_input_dir(cfg.sft_dir, checkpoint))).to(device)
    reward_model = freeze(load_reward_model(reward_dir)).to(device)
    task, tokenizer = get_task(cfg.task), load_tokenizer(checkpoint)
    prompts = _prompts(task, tokenizer, model.policy, n, prompt, seed, cfg.max_new_tokens)
    gen = torch.Generator(device=device).manual_seed(seed)
    batch = collect_rollout(PPO, model, ref_model, reward_model, tokenizer, prompts, cfg, beta,
                            gen)
    gold = task.gold_batch(prompts, decode_responses(tokenizer, batch.response_ids, batch.mask))
    samples = ppo_records(batch, tokenizer, prompts, gold, cfg.kl_estimator, batch.advantages)
    return {"stage": "ppo", "checkpoint": checkpoint, "beta": beta, "gamma": cfg.gamma,
            "lam": cfg.lam, "kl_estimator": cfg.kl_estimator, "samples": samples}


def _response_logprobs(model, inputs: tuple, temperature: float) -> torch.Tensor:
    """log pi(a_t | s_t) of each response token, 0 on padding: (B, T)."""
    logits = response_logits(model, *inputs, temperature=temperature)  # (B, T, V)
    return logprobs_from_logits(logits, inputs[2]) * inputs[3]


@torch.no_grad()
def _dpo_report(checkpoint: str, run: dict, n: int, prompt: str, seed: int,
                device: torch.device, beta: float | None) -> dict:
    beta = run["beta"] if beta is None else beta
    check(beta > 0, "beta", "> 0", beta)
    policy = freeze(load_policy(checkpoint)).to(device)
    ref_model = freeze(load_policy(_input_dir(run["sft_dir"], checkpoint))).to(device)
    reward_model = freeze(load_reward_model(_input_dir(run["reward_dir"], checkpoint))).to(device)
    task, tokenizer = get_task(run["task"]), load_tokenizer(checkpoint)
    temperature = run["temperature"]
    prompts = _prompts(task, tokenizer, policy, n, prompt, seed, run["max_new_tokens"])
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
    s = sample(policy, prompt_ids, prompt_mask, run["max_new_tokens"], tokenizer.eos_token_id,
               tokenizer.pad_token_id, temperature, run["top_k"],
               generator=torch.Generator(device=device).manual_seed(seed))
    inputs = (s.prompt_ids, s.prompt_mask, s.response_ids, s.mask)
    logprobs = _response_logprobs(policy, inputs, temperature)  # (B, T)
    ref_logprobs = _response_logprobs(ref_model, inputs, temperature)  # (B, T)
    kl = kl_per_token(logprobs, ref_logprobs, "k1") * s.mask
    scores = reward_scores(reward_model, *inputs).float()  # (B,)
    gold = task.gold_batch(prompts, decode_responses(tokenizer, s.response_ids, s.mask))
    columns = {"logprob": logprobs, "ref_logprob": ref_logprobs, "kl": kl,
               "reward": beta * kl, **dict.fromkeys(CRITIC_COLUMNS)}
    samples = token_records(tokenizer, prompts, gold, scores, s.response_ids, s.mask, columns)
    return {"stage": "dpo", "checkpoint": checkpoint, "beta": beta, "gamma": None, "lam": None,
            "kl_estimator": "k1", "samples": samples}


def inspect_samples(checkpoint: str, n: int = 4, prompt: str = "", seed: int = 0,
                    device: str = "cpu", beta: float | None = None, kl_estimator: str = "",
                    gamma: float | None = None, lam: float | None = None) -> dict:
    """Sample `n` responses from a PPO or DPO checkpoint and build their per-token records.

    Args:
        checkpoint: a `ppo` or `dpo` run directory.
        n: responses to sample; prompt: answer this prompt n times instead of task prompts.
        seed: seeds the prompts and the draws (same seed, same responses whatever lam is).
        beta, kl_estimator, gamma, lam: override the run's own values (None / "" keep them).
    Returns:
        the report described in the module docstring (what `--json` writes).
    Raises:
        UsageError: not a ppo/dpo run, n <= 0, an override out of range or not applicable.
    """
    check(n > 0, "n", "> 0", n)
    run = read_checkpoint(checkpoint)
    overrides = {k: v for k, v in (("kl_estimator", kl_estimator), ("gamma", gamma),
                                   ("lam", lam)) if v not in (None, "")}
    if run["stage"] == "dpo":
        if overrides:
            raise UsageError(f"{sorted(overrides)[0]} applies to PPO checkpoints only "
                             f"({checkpoint!r} is a DPO run: no critic, no GAE)")
        return _dpo_report(checkpoint, run, n, prompt, seed, _device(device), beta)
    return _ppo_report(checkpoint, run, n, prompt, seed, _device(device), beta, overrides)


# --------------------------------------------------------------------------- views


def sequence_kl(rec: dict) -> float:
    """The response's KL: its `kl` column summed over tokens."""
    return float(sum(rec["kl"]))


def describe(report: dict) -> str:
    """One line naming the checkpoint and the constants the columns were built with."""
    if report["stage"] == "dpo":
        return (f"DPO checkpoint {report['checkpoint']}: reward = beta * (logprob - ref_logprob) "
                f"with beta={report['beta']:g}, the implicit reward; no critic, so no value, "
                "return or advantage")
    return (f"PPO checkpoint {report['checkpoint']}: beta={report['beta']:g} "
            f"kl_estimator={report['kl_estimator']} gamma={report['gamma']:g} "
            f"lam={report['lam']:g}; advantages before batch whitening")


def sample_header(i: int, rec: dict) -> str:
    return (f"#{i} prompt: {rec['prompt']!r}  response: {rec['response']!r}  "
            f"score={rec['score']:+.3f}  gold={rec['gold']:.3f}  KL={sequence_kl(rec):+.3f}")


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
    """What the HTML and the terminal colour tokens by: the advantage (PPO), the reward (DPO)."""
    return "advantage" if report["stage"] == "ppo" else "reward"


def render_html(report: dict) -> str:
    """A self-contained page: per response, its prompt and a row of tokens coloured by
    `colour_column`; hovering (or focusing) a token shows its row of the table, every
    column, beside it (CSS only, no script)."""
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
        stats = (f"score {rec['score']:+.3f} &middot; gold {rec['gold']:.3f} &middot; "
                 f"KL {sequence_kl(rec):+.3f}")
        rows.append(f'<div class="sample"><div class="head"><b>#{i}</b> '
                    f'<span class="stats">{stats}</span></div><div class="toks">'
                    f'<em class="prompt">{html.escape(rec["prompt"])}</em> '
                    f'{" ".join(spans)}</div></div>')
    legend = (f'<span class="key" style="background:{_rgba(-1)}">-{scale:.3f}</span> '
              f'<span class="key">0</span> '
              f'<span class="key" style="background:{_rgba(1)}">+{scale:.3f}</span>')
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>rlhf-toy inspect</title>"
            f"<style>{_CSS}</style></head><body><p>{html.escape(describe(report))}</p>"
            f"<p>Tokens coloured by {key} {legend}; the prompt is in grey. Hover a token "
            f"for every column.</p>{''.join(rows)}</body></html>\n")


_CSS = ("body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:72em;color:#1a1a1a;"
        "line-height:1.5}.sample{margin:1.2em 0}"
        ".head{font-size:.9em;margin-bottom:.3em}.stats{color:#555;margin-left:.5em}"
        ".prompt{color:#777;font-style:normal;font-family:monospace;margin-right:.3em}"
        ".tok,.key{font-family:monospace;padding:.15em .35em;border-radius:3px;"
        "border:1px solid #bbb;cursor:default;position:relative;display:inline-block;"
        "margin:.1em 0}"
        ".tip{display:none;position:absolute;left:0;top:2em;z-index:1;background:#fff;"
        "color:#111;border:1px solid #888;border-radius:4px;padding:.4em;white-space:nowrap;"
        "box-shadow:0 2px 8px rgba(0,0,0,.3)}"
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
    report = inspect_samples(cfg.checkpoint, cfg.n, cfg.prompt, cfg.seed, cfg.device, cfg.beta,
                             cfg.kl_estimator, cfg.gamma, cfg.lam)
    render_terminal(report)
    if cfg.json:
        _write(cfg.json, json.dumps(report, indent=2) + "\n")
    if cfg.html:
        _write(cfg.html, render_html(report))
    if cfg.png:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.png)), exist_ok=True)
        render_png(report, cfg.png)
    samples = report["samples"]
    return {"stage": report["stage"], "samples": len(samples),
            "score": sum(s["score"] for s in samples) / len(samples),
            "gold": sum(s["gold"] for s in samples) / len(samples),
            "kl": sum(sequence_kl(s) for s in samples) / len(samples)}
