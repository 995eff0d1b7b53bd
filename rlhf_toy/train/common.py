"""What every stage's loop shares: run directory, accelerator, seeding, logs, batches,
resumable checkpoints and the non-finite guard."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed

from rlhf_toy.config import NonFiniteError, UsageError, to_dict

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


# --------------------------------------------------------------------------- checkpoints

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.pt"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def rng_state() -> dict:
    """Python, numpy and torch (CPU and CUDA) generator states, in plain types."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete `checkpoint-<step>/` in `output_dir`, by step."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, name)) for name in os.listdir(output_dir)
             if (m := _CHECKPOINT_RE.match(name))]
    return sorted((step, path) for step, path in found
                  if os.path.isfile(os.path.join(path, TRAINER_STATE)))


def clean_checkpoints(output_dir: str, keep: bool) -> None:
    """Remove half-written temporary checkpoints (a killed save); unless `keep`, also the
    checkpoints of an earlier run, so that `latest` never mixes two runs."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.startswith(f".tmp-{CHECKPOINT_PREFIX}") or name.startswith(".old-") or (
                not keep and _CHECKPOINT_RE.match(name)):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def save_checkpoint(output_dir: str, step: int, model: Any, state: dict) -> str:
    """Write `output_dir/checkpoint-<step>/` atomically; returns its path.

    The model goes in with `save_pretrained` (so a checkpoint loads like any other
    stage output), everything else (optimizer, controller, RNG, ...) in
    `trainer_state.pt`. All of it is written into a temporary directory first and
    renamed into place: a process killed at any moment leaves either the complete new
    checkpoint or none, and never touches the previous ones.
    """
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    tmp = tempfile.mkdtemp(dir=output_dir, prefix=f".tmp-{CHECKPOINT_PREFIX}{step}-")
    model.save_pretrained(tmp)
    torch.save({"step": step, "rng": rng_state(), **state}, os.path.join(tmp, TRAINER_STATE))
    _fsync_dir(tmp)
    if os.path.exists(final):  # rename cannot replace a non-empty directory: move it aside
        old = tempfile.mkdtemp(dir=output_dir, prefix=".old-")
        os.replace(final, os.path.join(old, "c"))
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(output_dir)
    return final


def _fsync_dir(path: str) -> None:
    """Flush a directory's files and entries to disk (a power cut keeps a complete save)."""
    for name in os.listdir(path):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resolve_checkpoint(output_dir: str, spec: str) -> str:
    """The checkpoint directory `--resume_from_checkpoint` names: a path, or `latest`
    (the highest step in `output_dir`)."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise UsageError(f"resume_from_checkpoint must name a checkpoint: 'latest' found no "
                             f"{CHECKPOINT_PREFIX}N/ in {output_dir!r}")
        return found[-1][1]
    if not os.path.isdir(spec):
        raise UsageError(f"resume_from_checkpoint {spec!r} does not exist")
    if not os.path.isfile(os.path.join(spec, TRAINER_STATE)):
        raise UsageError(f"resume_from_checkpoint {spec!r} is not a resumable checkpoint "
                         f"({TRAINER_STATE} missing; give a {CHECKPOINT_PREFIX}N/ directory)")
    return spec


def load_checkpoint(path: str, stage: str, max_steps: int) -> dict:
    """Read a checkpoint's `trainer_state.pt` and check it belongs to this stage."""
    try:
        # on the CPU: the optimizer moves its state to its parameters' device when loaded
        state = torch.load(os.path.join(path, TRAINER_STATE), map_location="cpu",
                           weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise UsageError(f"resume_from_checkpoint {path!r} cannot be read "
                         f"({type(exc).__name__})") from None
    if state.get("stage") != stage:
        raise UsageError(f"resume_from_checkpoint {path!r} is a {state.get('stage')!r} "
                         f"checkpoint, not a {stage!r} one")
    if state["step"] > max_steps:
        raise UsageError(f"max_steps must be >= the checkpoint's step {state['step']} "
                         f"(got {max_steps})")
    return state


def load_model_weights(model: torch.nn.Module, path: str) -> None:
    """Load a checkpoint's weights into `model` in place: a policy or reward model, or a
    policy with a value head / separate critic (`models.PolicyWithValueHead`,
    `PolicyWithCritic`)."""
    from rlhf_toy.models import VALUE_HEAD_FILE

    policy = getattr(model, "policy", model)  # a GPT-2 policy or reward model
    saved = type(policy).from_pretrained(path, local_files_only=True)
    policy.load_state_dict(saved.state_dict())
    for name, file in (("value_head", VALUE_HEAD_FILE), ("critic", "critic.pt")):
        if hasattr(model, name):
            weights = torch.load(os.path.join(path, file), weights_only=True)
            getattr(model, name).load_state_dict(weights)


# fields that may differ between a checkpoint's run and the run resuming it
_RESUME_MAY_CHANGE = {"output_dir", "resume_from_checkpoint", "save_steps", "logging_steps",
                      "device", "sft_dir", "reward_dir", "prefs_dir"}


class Checkpointer:
    """Periodic resumable checkpoints of one stage, and resuming from one.

    `state_fn()` returns the stage's extra state (KL controller, evaluation before
    training, ...) as a dict of plain values and tensors; model weights, optimizer state
    and RNG states are added here.
    """

    def __init__(self, cfg: Any, stage: str, acc: Accelerator, model: Any, optimizer: Any):
        self.cfg, self.stage, self.acc = cfg, stage, acc
        self.model, self.optimizer = model, optimizer  # the unwrapped model
        self.last_saved: str | None = None
        if acc.is_main_process:
            clean_checkpoints(cfg.output_dir, keep=bool(cfg.resume_from_checkpoint))
        acc.wait_for_everyone()

    def resume(self) -> dict | None:
        """Restore weights, optimizer and RNG from `--resume_from_checkpoint`; returns the
        checkpoint's state (`step` and the stage's extras), or None for a fresh run."""
        if not self.cfg.resume_from_checkpoint:
            return None
        path = resolve_checkpoint(self.cfg.output_dir, self.cfg.resume_from_checkpoint)
        state = load_checkpoint(path, self.stage, self.cfg.max_steps)
        load_model_weights(self.model, path)
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        self.last_saved = path
        if self.acc.is_main_process:
            print(f"{self.stage}: resuming from {path} (step {state['step']} of "
                  f"{self.cfg.max_steps})", file=sys.stderr, flush=True)
        changed = sorted(k for k, v in state.get("config", {}).items()
                         if k not in _RESUME_MAY_CHANGE and getattr(self.cfg, k, v) != v)
        if changed:  # allowed, but the result is no longer the uninterrupted run's
            logger.warning("resuming with settings that differ from the checkpoint's: %s",
                           ", ".join(changed))
        logger.info("resumed %s from %s (step %d)", self.stage, path, state["step"])
        return state

    def maybe_save(self, step: int, state_fn) -> None:
        """Save every `save_steps` steps (not at the last one: the final model goes to
        `output_dir` itself)."""
        if self.cfg.save_steps and step % self.cfg.save_steps == 0 and step < self.cfg.max_steps:
            self.save(step, state_fn())

    def save(self, step: int, state: dict) -> str:
        path = os.path.join(self.cfg.output_dir, f"{CHECKPOINT_PREFIX}{step}")
        if self.acc.is_main_process:
            path = save_checkpoint(self.cfg.output_dir, step, self.model,
                                   {"stage": self.stage, "optimizer": self.optimizer.state_dict(),
                                    "config": to_dict(self.cfg), **state})
        self.acc.wait_for_everyone()
        self.last_saved = path
        return path

    def fail(self, quantity: str, step: int, state_fn=None) -> NonFiniteError:
        """The error for a non-finite `quantity` at `step`. With `state_fn` the model is
        still in its state after step - 1 (nothing of step `step` was applied): save it."""
        if state_fn is not None:
            where = f"last good state saved in {self.save(step - 1, state_fn())}"
        elif self.last_saved:
            where = f"last good checkpoint: {self.last_saved}"
        else:
            where = "no checkpoint was saved (set --save_steps)"
        return NonFiniteError(f"non-finite {quantity} at step {step}; training stopped, {where}")


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


def fit_pairs_to_context(chosen: dict, rejected: dict, n_positions: int, pad_token_id: int,
                         truncate: bool, what: str) -> tuple[dict, dict]:
    """Make every pair fit the context: prompt + the longer response <= `n_positions`.

    Args:
        chosen, rejected: tokenized datasets (`data.tokenize_pairs`) of the same N pairs:
            `prompt_ids`, `prompt_mask` (N, P) left-padded, `response_*` (N, T).
        truncate: keep the last tokens of a prompt that is too long (the ones next to the
            response) and log how many were cut; otherwise raise `UsageError`.
    Returns:
        (chosen, rejected), with the same (truncated) prompts in both.
    """
    prompt_len = chosen["prompt_mask"].sum(-1)  # (N,)
    response_len = torch.maximum(chosen["response_mask"].sum(-1),
                                 rejected["response_mask"].sum(-1))  # (N,)
    room = n_positions - response_len  # (N,) prompt tokens that fit; at least one is needed
    if (room < 1).any():
        raise UsageError(f"{what}: a response of {int(response_len.max())} tokens does not fit "
                         f"n_positions={n_positions} with its prompt; use a longer-context model")
    long = prompt_len > room  # (N,)
    n_long = int(long.sum())
    if n_long == 0:
        return chosen, rejected
    if not truncate:
        raise UsageError(f"truncate_prompts must be true to use {what}: {n_long} of {len(long)} "
                         f"prompts do not fit n_positions={n_positions} with their responses "
                         f"(got False)")
    logger.warning("%s: %d of %d prompts are longer than the context allows "
                   "(n_positions=%d); kept their last tokens", what, n_long, len(long),
                   n_positions)
    keep_len = torch.minimum(prompt_len, room)  # (N,)
    width = chosen["prompt_ids"].shape[1]
    keep = torch.arange(width, device=room.device)[None, :] >= (width - keep_len)[:, None]
    first = width - int(keep_len.max())  # leading columns that are now all padding
    prompt = {"prompt_ids": torch.where(keep, chosen["prompt_ids"], pad_token_id)[:, first:],
              "prompt_mask": (chosen["prompt_mask"] * keep)[:, first:]}  # (N, P')
    return {**chosen, **prompt}, {**rejected, **prompt}


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
