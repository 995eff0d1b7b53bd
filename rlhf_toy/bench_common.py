"""What every benchmark row shares: its size, setup, timer, peak memory, FLOP count, the
TRL interleaving and the printed table (the rows themselves are in `bench.py`).

Timings: ours and the baseline alternate (A B A B ...); a row reports medians after the
warm-up pairs and the quartiles of the per-pair speedup. Peak memory is CUDA's max
allocated, or on CPU this process's peak RSS (VmHWM, reset before each of our units).
MFU is model FLOPs (2 N per token forward, 6 N forward+backward; N = parameters without
position embeddings; attention-score FLOPs left out) over a peak FLOP/s: the given
`--peak_tflops`, or else that of a large matmul timed at the start of the run (what the
machine delivers under its load at that moment).
"""

from __future__ import annotations

import contextlib
import json
import random
import statistics
import time
from dataclasses import dataclass

import torch

from rlhf_toy.models import build_policy


@dataclass(frozen=True)
class Size:
    """Model and batch shape of one benchmark size."""

    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int
    batch_size: int  # PPO rollouts per iteration, DPO pairs per step, rollout batch
    mini_batch_size: int  # PPO minibatch
    ppo_epochs: int
    max_new_tokens: int  # response length limit (rollout, PPO, RLOO completions)
    repeats: int  # timed A/B pairs per row
    warmup: int  # untimed A/B pairs first
    task: str = "sentiment"  # prompts and preference pairs come from this task
    rows: tuple[str, ...] = ()  # the rows run by default; () = every row
    trl_dpo_precompute_ref: bool = False  # DPOTrainer also precomputes the reference (equal work)
    onpolicy_lr: float = 1e-5  # both sides' on-policy learning rate


TEMPERATURE = 1.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_reset(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA max allocated, or Linux's VmHWM of this process)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _peak_mb(device: torch.device) -> float:
    """Peak memory since `_peak_reset`, in MiB (peak RSS on CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    with contextlib.suppress(OSError), open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak_flops(device: torch.device, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul: bf16 8192 on CUDA, fp32 2048 on CPU (best of runs)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


class Timer:
    """Collects ours/baseline durations and ours' peak memory for one row."""

    def __init__(self, device: torch.device, warmup: int):
        self.device, self.warmup = device, warmup
        self.ours: list[float] = []
        self.baseline: list[float] = []
        self.peak_mb = 0.0

    def run_ours(self, fn) -> None:
        sync(self.device)
        _peak_reset(self.device)
        t0 = time.perf_counter()
        fn()
        sync(self.device)
        self.ours.append(time.perf_counter() - t0)
        self.peak_mb = max(self.peak_mb, _peak_mb(self.device))

    def medians(self) -> tuple[float, float | None]:
        ours = statistics.median(self.ours[self.warmup:])
        base = self.baseline[self.warmup:]
        return ours, (statistics.median(base) if base else None)


@dataclass
class Setup:
    """What every row shares: device, accelerator, tokenizer, task, size, model shape."""

    device: torch.device
    acc: object
    tokenizer: object
    task: object
    size: Size
    seed: int

    def policy(self):
        torch.manual_seed(self.seed)
        s = self.size
        return build_policy(self.tokenizer, s.n_layer, s.n_embd, s.n_head, s.n_positions)

    def reward_model(self):
        from transformers import GPT2ForSequenceClassification

        config = self.policy().config
        config.num_labels = 1
        torch.manual_seed(self.seed + 1)
        return GPT2ForSequenceClassification(config)

    def prompts(self, n: int, salt: int = 0) -> list[str]:
        return self.task.sample_prompts(n, random.Random(self.seed * 1000 + salt))


def n_flop_params(model) -> int:
    """Parameters that cost matmul FLOPs per token (tied LM head counted once; no wpe)."""
    wpe = model.transformer.wpe.weight.numel()
    return sum(p.numel() for p in model.parameters()) - wpe


def pair_speedup_quartiles(ours: list[float], baseline: list[float]) -> list[float] | None:
    """Quartiles (25 %, 50 %, 75 %) of baseline / ours over the timed A/B pairs: the spread
    of the speedup under a noisy machine (None without a baseline)."""
    if not baseline:
        return None
    ratios = [b / o for o, b in zip(ours, baseline, strict=False)]
    if len(ratios) == 1:
        return ratios * 3
    return statistics.quantiles(ratios, n=4, method="inclusive")


def row_result(name, baseline, timer, tokens, flops, peak_flops, note):
    ours_s, base_s = timer.medians()
    quartiles = pair_speedup_quartiles(timer.ours[timer.warmup:], timer.baseline[timer.warmup:])
    return {"name": name, "ours_s": ours_s, "baseline": baseline, "baseline_s": base_s,
            "speedup": (base_s / ours_s) if base_s else None, "pair_speedup_quartiles": quartiles,
            "tokens_per_s": tokens / ours_s, "peak_mem_mb": timer.peak_mb,
            "mfu": flops / ours_s / peak_flops, "note": note}


class Interleave:
    """A TRL `TrainerCallback` that times every `k` TRL optimizer steps as one baseline unit
    and runs one of our units right after it, so that the two alternate."""

    def __init__(self, timer: Timer, k: int, ours):
        self.timer, self.k, self.ours = timer, k, ours
        self.t0 = 0.0

    def callback(self):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step % outer.k == 0:
                    sync(outer.timer.device)
                    outer.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step % outer.k == 0:
                    sync(outer.timer.device)
                    outer.timer.baseline.append(time.perf_counter() - outer.t0)
                    outer.timer.run_ours(outer.ours)

        return Callback()


def quiet(trainer):
    """Drop the callback that prints TRL's end-of-training metrics dict."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def trl_args(cls, out: str, device_type: str, seed: int, **kw):
    """A TRL config for a quiet, offline, fixed-length run on a `device_type` device (bf16
    on CUDA)."""
    fields = cls.__dataclass_fields__
    cuda = device_type == "cuda"
    args = {"output_dir": out, "report_to": "none", "save_strategy": "no", "logging_steps": 10**6,
            "use_cpu": not cuda, "bf16": cuda, "seed": seed, "dataloader_num_workers": 0,
            "disable_tqdm": True, **kw}
    for name in ("gradient_checkpointing", "activation_checkpointing"):
        if name in fields:
            args[name] = False
    return cls(**{k: v for k, v in args.items() if k in fields})


def ours_only(timer: Timer, ours, s: Size) -> None:
    for _ in range(s.warmup + s.repeats):
        timer.run_ours(ours)


def format_table(result: dict) -> str:
    """The printed table: one line per row, then each row's note (what is compared)."""
    head = (f"device={result['device']} size={result['size']} precision={result['precision']} "
            f"matmul peak={result['matmul_tflops']:.3f} TFLOP/s")
    if result["peak_tflops"] != result["matmul_tflops"]:
        head += f" (MFU over a given peak of {result['peak_tflops']:.3f} TFLOP/s)"
    cols = f"{'row':<15}{'ours_s':>10}{'baseline_s':>12}{'speedup':>9}{'tok/s':>11}" \
           f"{'peak_MB':>9}{'MFU':>9}  baseline"
    lines = [head, cols]
    for r in result["rows"]:
        base = "-" if r["baseline_s"] is None else f"{r['baseline_s']:.4f}"
        speed = "-" if r["speedup"] is None else f"{r['speedup']:.2f}"
        q = r.get("pair_speedup_quartiles")
        spread = "" if q is None else f"  (pairs: {q[0]:.2f}-{q[2]:.2f})"
        lines.append(f"{r['name']:<15}{r['ours_s']:>10.4f}{base:>12}{speed:>9}"
                     f"{r['tokens_per_s']:>11.0f}{r['peak_mem_mb']:>9.0f}{r['mfu']:>9.2%}"
                     f"  {r['baseline'] or 'skipped'}{spread}")
    lines += [f"  {r['name']}: {r['note']}" for r in result["rows"]]
    return "\n".join(lines)


def write_json(path: str, result: dict) -> None:
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
        fh.write("\n")
