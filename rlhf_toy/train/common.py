"""What every stage's loop shares: run directory, accelerator, seeding, logs, batches,
input checks and the non-finite guard. Checkpoints are `train/checkpoint.py`."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed

from rlhf_toy.config import to_dict
from rlhf_toy.errors import UsageError
from rlhf_toy.train.checkpoint import Checkpointer, resolve_checkpoint

logger = logging.getLogger(__name__)

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
    """One `Accelerator` per stage: device, mixed precision, gradient accumulation.

    accelerate keeps one mixed-precision setting per process; a pipeline runs stages with
    different settings in one process, so each stage starts from a fresh state (the
    process group of a multi-process launch is kept).
    """
    AcceleratorState._reset_state()
    acc = Accelerator(cpu=cfg.device == "cpu", mixed_precision=cfg.mixed_precision,
                      gradient_accumulation_steps=getattr(cfg, "gradient_accumulation_steps", 1))
    if cfg.device == "cuda" and acc.device.type != "cuda":
        raise UsageError("device must be cpu or auto here: no CUDA device is available")
    set_seed(cfg.seed, device_specific=False)
    return acc


def start_stage(cfg: Any, stage: str) -> tuple[Accelerator, float]:
    """Seed, build the accelerator, create the output dir and record the config."""
    if getattr(cfg, "resume_from_checkpoint", ""):  # a bad path fails before any loading
        resolve_checkpoint(cfg.output_dir, cfg.resume_from_checkpoint)
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
        """Keep the rows up to `keep_until_step` (a resume point); None keeps nothing.

        A line a killed run left half-written does not parse and is dropped."""
        rows = []
        if keep_until_step is not None and os.path.isfile(self.path):
            with open(self.path) as fh:
                rows = [line for line in fh
                        if line.endswith("\n") and _row_step(line) <= keep_until_step]
        with open(self.path, "w") as fh:
            fh.writelines(rows)

    def write(self, step: int, **metrics: float) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def _row_step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return float("inf")


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


def progress(total: int, desc: str, enabled: bool = True, initial: int = 0):
    """A tqdm progress bar on stderr for a stage's loop (only on the main process).

    Live on a terminal; in a log file (CI, `nohup`) one update every 15 s at most.
    `TQDM_DISABLE=1` turns it off."""
    from tqdm.auto import tqdm

    class Bar(tqdm):
        def set_postfix(self, ordered_dict=None, refresh=False, **kwargs):
            # shown at the next update(), which respects mininterval (tqdm redraws at once)
            super().set_postfix(ordered_dict, refresh=refresh, **kwargs)

    tty = sys.stderr.isatty()
    disabled = not enabled or os.environ.get("TQDM_DISABLE", "") not in ("", "0")
    return Bar(total=total, desc=desc, disable=disabled, file=sys.stderr, dynamic_ncols=tty,
               mininterval=0.1 if tty else 15.0, leave=False, initial=initial)


def first_non_finite(**quantities: torch.Tensor | None) -> str | None:
    """The name of the first quantity holding a NaN or inf, or None; one device sync.
    None values (a quantity not computed this time) are skipped."""
    names = [name for name, q in quantities.items() if q is not None]
    flags = torch.stack([torch.isfinite(quantities[name].detach()).all() for name in names])
    if bool(flags.all()):
        return None
    return next(name for name, ok in zip(names, flags.tolist(), strict=True) if not ok)


# --------------------------------------------------------------------------- input checks


def check_context(sft_dir: str, max_prompt_tokens: int, max_new_tokens: int) -> None:
    """`max_new_tokens` must leave room for the task's longest prompt in the policy's
    context (`n_positions` of the checkpoint in `sft_dir`); checked before any loading."""
    file = os.path.join(sft_dir, "config.json")
    if not os.path.isfile(file):
        return  # loading the checkpoint reports it
    with open(file) as fh:
        n_positions = json.load(fh).get("n_positions", max_prompt_tokens + max_new_tokens)
    check_allowed = n_positions - max_prompt_tokens
    if max_new_tokens > check_allowed:
        raise UsageError(f"max_new_tokens must be <= {check_allowed} so that prompt + response "
                         f"fit n_positions={n_positions} of {sft_dir!r} (got {max_new_tokens})")


def check_vocab(tokenizer: Any, path: str, *models: Any) -> None:
    """The tokenizer saved in `path` must match the embedding table of every model."""
    for model in models:
        vocab = model.config.vocab_size
        if len(tokenizer) != vocab:
            raise UsageError(f"tokenizer in {path!r} has {len(tokenizer)} tokens but the "
                             f"{type(model).__name__} has a vocabulary of {vocab}: they come "
                             "from different checkpoints")


def open_run(cfg: Any, stage: str, acc: Accelerator, model: Any,
             optimizer: Any) -> tuple[Checkpointer, dict | None, MetricsLog]:
    """What every training loop opens with: its `Checkpointer`, the checkpoint's state when
    `--resume_from_checkpoint` is given (None for a fresh run, which also clears the
    `checkpoint-*` an earlier run left), and `metrics.jsonl` kept up to the resume point."""
    ckpt = Checkpointer(cfg, stage, acc, model, optimizer)
    resumed = ckpt.resume()
    log = MetricsLog(cfg.output_dir, acc.is_main_process,
                     keep_until_step=resumed["step"] if resumed else None)
    return ckpt, resumed, log
