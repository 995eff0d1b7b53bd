"""What every stage's loop shares: run directory, accelerator, seeding, logs, batches,
input checks and the non-finite guard. Checkpoints are `train/checkpoint.py`."""

from __future__ import annotations

import importlib.util
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
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed

from rlhf_toy.config import to_dict
from rlhf_toy.errors import NonFiniteError, StorageError, UsageError
from rlhf_toy.integrity import error_reason, write_json, write_manifest  # noqa: F401 - write_json re-exported
from rlhf_toy.lora import save_adapter_extras
from rlhf_toy.sharding import plain
from rlhf_toy.train.checkpoint import (
    Checkpointer,
    list_checkpoints,
    resolve_checkpoint,
    weights_finite,
)
from rlhf_toy.train.memory import check_memory
from rlhf_toy.train.rundir import (  # noqa: F401 - read_run_config re-exported
    RUN_CONFIG,
    TRACKER_DIR,
    check_inputs,
    commit_run,
    open_run_dir,
    read_run_config,
    release_run,
)

logger = logging.getLogger(__name__)

def tracker_options(cfg: Any) -> dict:
    """The `Accelerator` arguments of `--report_to`: none, or the tracker and where it
    writes (OUTPUT_DIR/tensorboard/). A tracker whose package is missing: one line."""
    report_to = getattr(cfg, "report_to", "none")
    if report_to == "none":
        return {}
    if importlib.util.find_spec(report_to) is None:  # each tracker's package has its name
        raise UsageError(f"report_to {report_to} needs the {report_to} package: "
                         f"pip install {report_to}")
    return {"log_with": report_to, "project_config": ProjectConfiguration(
        project_dir=cfg.output_dir, logging_dir=os.path.join(cfg.output_dir, TRACKER_DIR))}


def make_accelerator(cfg: Any) -> Accelerator:
    """One `Accelerator` per stage: device, mixed precision, gradient accumulation and the
    tracker of `--report_to` (started by `MetricsLog` at the run's first row).

    accelerate keeps one mixed-precision setting per process; a pipeline runs stages with
    different settings in one process, so each stage starts from a fresh state (the
    process group of a multi-process launch is kept).
    """
    AcceleratorState._reset_state()
    acc = Accelerator(cpu=cfg.device == "cpu", mixed_precision=cfg.mixed_precision,
                      gradient_accumulation_steps=getattr(cfg, "gradient_accumulation_steps", 1),
                      **tracker_options(cfg))
    if cfg.device == "cuda" and acc.device.type != "cuda":
        raise UsageError("device must be cpu or auto here: no CUDA device is available")
    set_seed(cfg.seed, device_specific=False)
    return acc


def start_stage(cfg: Any, stage: str) -> tuple[Accelerator, float]:
    """Check the run's inputs and size, build the accelerator, seed, and open (create, lock,
    check) the output directory. Nothing is written yet: `run_config.json` goes in with the
    run's first output (`rundir.RunDir.commit`)."""
    if getattr(cfg, "resume_from_checkpoint", ""):  # a bad path fails before any loading
        resolve_checkpoint(cfg.output_dir, cfg.resume_from_checkpoint)
    check_inputs(cfg)
    check_memory(cfg, stage)
    if os.path.isfile(cfg.output_dir):
        raise UsageError(f"output_dir {cfg.output_dir!r} is a file; give a directory")
    acc = make_accelerator(cfg)
    open_run_dir(cfg, stage, acc.is_main_process)
    acc.wait_for_everyone()
    return acc, time.perf_counter()


def finish_stage(cfg: Any, acc: Accelerator, model: Any, tokenizer: Any, summary: dict) -> None:
    """Write a stage's final files (model, tokenizer, `manifest.json`, `summary.json`, in
    that order, so a directory with a summary is complete) and release the run directory.

    Raises:
        NonFiniteError: a weight is NaN or inf; nothing is saved as the final model.
        StorageError: a write failed (disk full); the checkpoints are left intact.
    """
    if model is not None and not weights_finite(model):
        raise NonFiniteError(f"non-finite weights after the last step {cfg.max_steps}; the "
                             "final model is not saved")
    if acc.is_main_process:
        commit_run(cfg.output_dir)
        try:
            if model is not None:
                model.save_pretrained(cfg.output_dir)
                save_adapter_extras(model, cfg.output_dir)
                tokenizer.save_pretrained(cfg.output_dir)
            write_manifest(cfg.output_dir)
            write_json(os.path.join(cfg.output_dir, "summary.json"), summary)
        except Exception as exc:  # noqa: BLE001 - every failed write ends the same way
            found = list_checkpoints(cfg.output_dir)
            kept = (f"the last checkpoint {found[-1][1]} is intact" if found
                    else "no checkpoint was saved")
            raise StorageError(f"saving the final files into {cfg.output_dir!r} failed "
                               f"({error_reason(exc)}); {kept}") from None
    acc.end_training()
    release_run(cfg.output_dir)


class MetricsLog:
    """`metrics.jsonl`: one JSON object per logged step, flushed as it is written; its
    numbers also go to the accelerator's trackers (`--report_to`), if it has any.

    A resumed run keeps the rows written before its checkpoint; the file is rewritten
    (atomically) only at the run's first new row, so a run that fails before producing
    anything leaves the earlier metrics as they were. The trackers start at that moment
    too (after the run directory's commit has retired an earlier run's events)."""

    def __init__(self, output_dir: str, enabled: bool = True, keep_rows: int | None = None,
                 keep_until_step: int | None = None, acc: Accelerator | None = None,
                 config: dict | None = None):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.enabled = enabled
        self.acc, self.config = acc, config or {}
        self._kept = self._read_kept(keep_rows, keep_until_step) if enabled else []
        self._flushed = False
        self.count = len(self._kept)  # rows of this run's record so far

    def _read_kept(self, keep_rows: int | None, keep_until_step: int | None) -> list[str]:
        """The first `keep_rows` complete rows, or those up to `keep_until_step` (a resume
        point of a checkpoint that did not record its row count); none for a fresh run.
        A line a killed run left half-written does not parse and is dropped."""
        if (keep_rows is None and keep_until_step is None) or not os.path.isfile(self.path):
            return []
        with open(self.path) as fh:
            rows = [line for line in fh if line.endswith("\n") and _row_step(line) < float("inf")]
        if keep_rows is not None:
            return rows[:keep_rows]
        return [line for line in rows if _row_step(line) <= keep_until_step]

    def flush(self) -> None:
        """Replace the file by the kept rows (once, atomically): the run has begun writing."""
        if not self.enabled or self._flushed:
            return
        commit_run(self.output_dir)
        fd, tmp = tempfile.mkstemp(dir=self.output_dir, prefix=".tmp-", suffix=".jsonl")
        with os.fdopen(fd, "w") as fh:
            fh.writelines(self._kept)
        os.replace(tmp, self.path)
        self._flushed = True
        if self.acc is not None and self.acc.log_with and not self.acc.trackers:
            # hyperparameters as trackers take them: scalars only
            hparams = {k: v for k, v in self.config.items()
                       if isinstance(v, (bool, int, float, str))}
            self.acc.init_trackers("rlhf_toy", config=hparams)

    def write(self, step: int, **metrics: float) -> None:
        if not self.enabled:
            return
        self.flush()
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        self.count += 1
        if self.acc is not None and self.acc.trackers:
            self.acc.log({k: v for k, v in row.items() if k != "step" and _is_number(v)},
                         step=step)


def _row_step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return float("inf")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item()
    return v


def scheduled_learning_rate(cfg: Any, step: int, warmup_steps: int = 0) -> float:
    """The learning rate of step `step` (1-based) of `cfg.max_steps`: `cfg.learning_rate`,
    times a linear warm-up over `warmup_steps` steps, times (with `cfg.lr_scheduler_type`
    linear) a linear decay from 1 to 1 / max_steps at the last step (TRL's default); a
    function of the step alone, so a resumed run continues it."""
    lr = cfg.learning_rate * min(1.0, step / (warmup_steps + 1))
    if cfg.lr_scheduler_type == "linear":
        lr *= 1.0 - (step - 1) / cfg.max_steps
    return lr


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the examples in batch `step`: epochs of seeded permutations.

    A pure function of (seed, step), so a resumed run sees exactly the same data.
    """
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[k * batch_size: (k + 1) * batch_size]


def stage_line(stage: str, summary: dict, keys: list[str]) -> str:
    """One line with a stage's headline numbers (and "no gold reward" where a run had none)."""
    parts = [f"{k}={summary[k]:.3f}" if isinstance(summary[k], float) else f"{k}={summary[k]}"
             for k in keys if k in summary]
    if "gold" not in keys and isinstance(summary.get("gold"), str):
        parts.append(summary["gold"])
    return f"[{stage}] " + "  ".join(parts)


def progress(total: int, desc: str, enabled: bool = True, initial: int = 0):
    """A progress bar on stderr for a stage's loop (only on the main process).

    A tqdm bar on a terminal; in a log file (CI, `nohup`, a redirect) plain lines instead
    of carriage-return redraws, one every 15 s at most. `TQDM_DISABLE=1` turns it off."""
    from tqdm.auto import tqdm

    disabled = not enabled or os.environ.get("TQDM_DISABLE", "") not in ("", "0")
    if not sys.stderr.isatty():
        return LineProgress(total, desc, disabled, initial)

    class Bar(tqdm):
        def set_postfix(self, ordered_dict=None, refresh=False, **kwargs):
            # shown at the next update(), which respects mininterval (tqdm redraws at once)
            super().set_postfix(ordered_dict, refresh=refresh, **kwargs)

    return Bar(total=total, desc=desc, disable=disabled, file=sys.stderr, dynamic_ncols=True,
               mininterval=0.1, leave=False, initial=initial)


class LineProgress:
    """The progress bar's interface for logs: `desc: n/total key=value ...` lines."""

    def __init__(self, total: int, desc: str, disabled: bool, initial: int = 0,
                 interval: float = 15.0):
        self.total, self.desc, self.disabled, self.n = total, desc, disabled, initial
        self.interval, self.postfix = interval, ""
        self._last = time.monotonic()

    def set_postfix(self, **kwargs: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in kwargs.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if not self.disabled and (now - self._last >= self.interval):
            self._last = now
            print(f"{self.desc}: {self.n}/{self.total} {self.postfix}".rstrip(),
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _single_process_unscaled(acc: Accelerator) -> bool:
    """One process and no gradient scaler: accelerate's clipping and optimizer wrappers
    then only forward to torch."""
    return acc.distributed_type == DistributedType.NO and acc.scaler is None


def clip_grad_norm(acc: Accelerator, parameters: list[torch.nn.Parameter],
                   max_norm: float) -> torch.Tensor:
    """`acc.clip_grad_norm_`: in one process without a gradient scaler, the same
    `torch.nn.utils.clip_grad_norm_` that accelerate calls, without the package-version
    lookup accelerate makes on every call (0.2 ms of a tiny model's 8.5 ms minibatch
    update; README, "Speed"). Returns the total norm before clipping."""
    if _single_process_unscaled(acc):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return acc.clip_grad_norm_(parameters, max_norm)


def optimizer_step(acc: Accelerator, optimizer: Any) -> None:
    """`optimizer.step()` then `optimizer.zero_grad()` on an optimizer `acc` prepared: at
    the end of a gradient-accumulation cycle only. In one process without a gradient
    scaler, the wrapped optimizer's own calls, without the package lookups accelerate's
    wrapper makes on every step (0.3 ms of the same 8.5 ms)."""
    if not _single_process_unscaled(acc):
        optimizer.step()
        optimizer.zero_grad()
    elif acc.sync_gradients:
        inner = getattr(optimizer, "optimizer", optimizer)
        inner.step()
        inner.zero_grad(set_to_none=True)


def first_non_finite(**quantities: torch.Tensor | None) -> str | None:
    """The name of the first quantity holding a NaN or inf, or None; one device sync.
    None values (a quantity not computed this time) are skipped."""
    names = [name for name, q in quantities.items() if q is not None]
    # plain: under FSDP2 the gradient norm is a DTensor
    flags = torch.stack([torch.isfinite(plain(quantities[name]).detach()).all() for name in names])
    if bool(flags.all()):
        return None
    return next(name for name, ok in zip(names, flags.tolist(), strict=True) if not ok)


# --------------------------------------------------------------------------- input checks


def check_context(path: str, max_prompt_tokens: int, max_new_tokens: int,
                  flag: str = "--sft_dir") -> None:
    """`max_new_tokens` must leave room for the task's longest prompt in the policy's
    context (`n_positions` or `max_position_embeddings` of the checkpoint in `path`, given
    as `flag`); checked before any loading."""
    from rlhf_toy.models import context_length

    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        return  # loading the checkpoint reports it
    with open(file) as fh:
        n_positions = context_length(json.load(fh)) or max_prompt_tokens + max_new_tokens
    check_allowed = n_positions - max_prompt_tokens
    if max_new_tokens > check_allowed:
        raise UsageError(f"max_new_tokens must be <= {check_allowed} so that prompt + response "
                         f"fit n_positions={n_positions} of {flag} {path!r} "
                         f"(got {max_new_tokens})")


VOCAB_PADDING = 64  # checkpoints may pad their embedding table to a multiple of this


def check_vocab(tokenizer: Any, source: str, models: dict[str, Any]) -> None:
    """The tokenizer (from `source`, e.g. "--sft_dir 'runs/x/sft'") must match the embedding
    table of every model (`{where it came from: model}`): the same size, or a larger table
    padded to a multiple of `VOCAB_PADDING` (as e.g. Pythia and Qwen checkpoints are)."""
    n = len(tokenizer)
    for label, model in models.items():
        vocab = model.config.vocab_size
        if vocab == n or (vocab > n and vocab % VOCAB_PADDING == 0):
            continue
        owner = "its" if label == source else f"the policy's ({source})"
        raise UsageError(f"{label} has a vocabulary of {vocab} but {owner} tokenizer has {n} "
                         "tokens: they come from different checkpoints")


def open_run(cfg: Any, stage: str, acc: Accelerator, model: Any,
             optimizer: Any) -> tuple[Checkpointer, dict | None, MetricsLog]:
    """What every training loop opens with: its `Checkpointer`, the checkpoint's state when
    `--resume_from_checkpoint` is given (None for a fresh run, which also clears the
    `checkpoint-*` an earlier run left), and `metrics.jsonl` kept up to the resume point."""
    ckpt = Checkpointer(cfg, stage, acc, model, optimizer)
    resumed = ckpt.resume()
    keep = {}
    if resumed:
        keep = ({"keep_rows": resumed["metrics_rows"]} if "metrics_rows" in resumed
                else {"keep_until_step": resumed["step"]})
    log = MetricsLog(cfg.output_dir, acc.is_main_process, **keep, acc=acc, config=to_dict(cfg))
    ckpt.log = log
    return ckpt, resumed, log
