"""What every stage's loop shares: run directory, accelerator, seeding, logs, batches."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from rlhf_toy.config import UsageError, to_dict

RUN_CONFIG = "run_config.json"


def prepare_output_dir(path: str) -> str:
    """Create `path`; a clear error if it is a file or cannot be created."""
    if os.path.isfile(path):
        raise UsageError(f"output_dir {path!r} is a file; give a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"output_dir {path!r} cannot be created: {exc.strerror}") from None
    return path


def make_accelerator(cfg: Any) -> Accelerator:
    """One `Accelerator` per stage: device, mixed precision, gradient accumulation."""
    acc = Accelerator(cpu=cfg.device == "cpu", mixed_precision=cfg.mixed_precision,
                      gradient_accumulation_steps=getattr(cfg, "gradient_accumulation_steps", 1))
    if cfg.device == "cuda" and acc.device.type != "cuda":
        raise UsageError("device must be cpu or auto here: no CUDA device is available")
    set_seed(cfg.seed, device_specific=False)
    return acc


def start_stage(cfg: Any, stage: str) -> tuple[Accelerator, float]:
    """Seed, build the accelerator, create the output dir and record the config."""
    prepare_output_dir(cfg.output_dir)
    acc = make_accelerator(cfg)
    if acc.is_main_process:
        write_json(os.path.join(cfg.output_dir, RUN_CONFIG), {"stage": stage, **to_dict(cfg)})
    return acc, time.perf_counter()


def read_run_config(path: str) -> dict:
    """The `run_config.json` a stage wrote next to its checkpoint ({} if none)."""
    file = os.path.join(path, RUN_CONFIG)
    if not os.path.isfile(file):
        return {}
    with open(file) as fh:
        return json.load(fh)


def write_json(path: str, obj: Any) -> None:
    """Write JSON atomically (temporary file, then rename): a crash never leaves half a file."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


class MetricsLog:
    """`metrics.jsonl`: one JSON object per logged step, flushed as it is written."""

    def __init__(self, output_dir: str, enabled: bool = True, keep_until_step: int | None = None):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.enabled = enabled
        if enabled:
            self._truncate(keep_until_step)

    def _truncate(self, keep_until_step: int | None) -> None:
        rows = []
        if keep_until_step is not None and os.path.isfile(self.path):
            with open(self.path) as fh:
                rows = [line for line in fh if json.loads(line).get("step", 0) <= keep_until_step]
        with open(self.path, "w") as fh:
            fh.writelines(rows)

    def write(self, step: int, **metrics: float) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item()
    return v


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the examples in batch `step`: epochs of seeded permutations.

    A pure function of (seed, step), so a resumed run sees exactly the same data.
    """
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[k * batch_size: (k + 1) * batch_size]


def stage_line(stage: str, summary: dict, keys: list[str]) -> str:
    """One line with a stage's headline numbers."""
    parts = [f"{k}={summary[k]:.3f}" if isinstance(summary[k], float) else f"{k}={summary[k]}"
             for k in keys if k in summary]
    return f"[{stage}] " + "  ".join(parts)


def progress(total: int, desc: str, enabled: bool = True):
    """A tqdm progress bar on stderr for a stage's loop (only on the main process)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                leave=False)
