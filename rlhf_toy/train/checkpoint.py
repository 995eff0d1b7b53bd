"""Resumable checkpoints: atomic saves, finding and validating them, and resuming a stage
bit-exactly (weights, optimizer, RNG states and the stage's own extra state)."""

from __future__ import annotations

import logging
import os
import random
import shutil
import sys
import tempfile
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from rlhf_toy.config import to_dict
from rlhf_toy.errors import NonFiniteError, StorageError, UsageError
from rlhf_toy.integrity import error_reason, verify_manifest, write_manifest
from rlhf_toy.lora import holds_adapter, load_adapter_weights, save_adapter_extras
from rlhf_toy.train.rundir import CHECKPOINT_PREFIX, checkpoint_step, commit_run, current_run

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.pt"


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
    found = [(step, os.path.join(output_dir, name)) for name in os.listdir(output_dir)
             if (step := checkpoint_step(name)) is not None]
    return sorted((step, path) for step, path in found
                  if os.path.isfile(os.path.join(path, TRAINER_STATE)))


def clean_checkpoints(output_dir: str) -> None:
    """Remove half-written temporary checkpoints (what a killed save leaves). An earlier
    run's checkpoints go when the run that replaces it commits (`rundir.RunDir`)."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.startswith(f".tmp-{CHECKPOINT_PREFIX}") or name.startswith(".old-"):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def save_checkpoint(output_dir: str, step: int, model: Any, state: dict) -> str:
    """Write `output_dir/checkpoint-<step>/` atomically; returns its path.

    The model goes in with `save_pretrained` (so a checkpoint loads like any other
    stage output), everything else (optimizer, controller, RNG, ...) in
    `trainer_state.pt`. All of it is written into a temporary directory first and
    renamed into place: a process killed at any moment leaves either the complete new
    checkpoint or none, and never touches the previous ones. `manifest.json` records
    every file's size and checksum, so a file damaged later is named when resuming.

    Raises:
        StorageError: the save failed (disk full, file size limit); nothing of it is left.
    """
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    tmp = None
    try:
        tmp = tempfile.mkdtemp(dir=output_dir, prefix=f".tmp-{CHECKPOINT_PREFIX}{step}-")
        model.save_pretrained(tmp)
        save_adapter_extras(model, tmp)
        torch.save({"step": step, "rng": rng_state(), **state}, os.path.join(tmp, TRAINER_STATE))
        write_manifest(tmp)
        _fsync_dir(tmp)
    except Exception as exc:  # noqa: BLE001 - every failed write ends the same way
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        found = [path for at, path in list_checkpoints(output_dir) if at != step]
        kept = f"the previous checkpoint {found[-1]} is intact" if found else "no checkpoint is kept"
        raise StorageError(f"saving {final} failed ({error_reason(exc)}); {kept}") from None
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
    """Check a checkpoint's files, read its `trainer_state.pt` and check it belongs to this
    stage."""
    verify_manifest(path, f"resume_from_checkpoint {path!r}")
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
    from rlhf_toy.models import VALUE_HEAD_FILE, load_policy, load_reward_model, load_torch_file

    what = f"resume_from_checkpoint {path!r}"
    policy = getattr(model, "policy", model)  # a GPT-2 policy or reward model
    parts = []
    if holds_adapter(path):  # LoRA: the adapter weights into the live adapters
        load_adapter_weights(policy, path, what)
    else:
        saved = (load_policy if hasattr(policy, "lm_head") else load_reward_model)(path)
        parts.append((policy, saved.state_dict()))
    for name, file in (("value_head", VALUE_HEAD_FILE), ("critic", "critic.pt")):
        if hasattr(model, name):
            parts.append((getattr(model, name), load_torch_file(os.path.join(path, file), what)))
    for module, weights in parts:
        try:
            module.load_state_dict(weights)
        except (RuntimeError, AttributeError, TypeError) as exc:
            first = error_reason(exc).removeprefix("Error(s) in loading state_dict for ")
            raise UsageError(f"{what} holds weights of another shape than this run's model "
                             f"(a different sft_dir or model size?): {first}") from None


# fields that may differ between a checkpoint's run and the run resuming it
_RESUME_MAY_CHANGE = {"output_dir", "resume_from_checkpoint", "save_steps", "logging_steps",
                      "device", "sft_dir", "reward_dir", "prefs_dir", "overwrite_output_dir",
                      "gradient_checkpointing", "report_to"}
# fields that decide which weights a checkpoint holds: resuming with another value is refused
_RESUME_MUST_MATCH = ("critic", "n_layer", "n_embd", "n_head", "n_positions", "use_peft",
                      "lora_r", "lora_target_modules")


class Checkpointer:
    """Periodic resumable checkpoints of one stage, and resuming from one.

    `state_fn()` returns the stage's extra state (KL controller, evaluation before
    training, ...) as a dict of plain values and tensors; model weights, optimizer state
    and RNG states are added here. Only finite weights are ever saved as a good state.
    """

    def __init__(self, cfg: Any, stage: str, acc: Accelerator, model: Any, optimizer: Any):
        self.cfg, self.stage, self.acc = cfg, stage, acc
        self.model, self.optimizer = model, optimizer  # the unwrapped model
        self.last_saved: str | None = None
        self.log = None  # the run's `MetricsLog` (its row count goes into each checkpoint)
        if acc.is_main_process and cfg.resume_from_checkpoint:
            clean_checkpoints(cfg.output_dir)
        acc.wait_for_everyone()

    def resume(self) -> dict | None:
        """Restore weights, optimizer and RNG from `--resume_from_checkpoint`; returns the
        checkpoint's state (`step` and the stage's extras), or None for a fresh run.

        The learning rate and weight decay of this run replace the checkpoint's; any other
        changed setting is warned about. The run directory records what changed."""
        if not self.cfg.resume_from_checkpoint:
            return None
        path = resolve_checkpoint(self.cfg.output_dir, self.cfg.resume_from_checkpoint)
        state = load_checkpoint(path, self.stage, self.cfg.max_steps)
        saved_cfg = state.get("config", {})
        for name in _RESUME_MUST_MATCH:
            if name in saved_cfg and getattr(self.cfg, name, saved_cfg[name]) != saved_cfg[name]:
                raise UsageError(f"{name} must be {saved_cfg[name]!r} to resume from {path!r} "
                                 f"(got {getattr(self.cfg, name)!r})")
        load_model_weights(self.model, path)
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # this run's settings, not the checkpoint's
            group["lr"], group["weight_decay"] = self.cfg.learning_rate, self.cfg.weight_decay
        set_rng_state(state["rng"])
        self.last_saved = path
        changed = {k: {"from": v, "to": getattr(self.cfg, k)} for k, v in sorted(saved_cfg.items())
                   if k not in _RESUME_MAY_CHANGE and getattr(self.cfg, k, v) != v}
        if self.acc.is_main_process:
            print(f"{self.stage}: resuming from {path} (step {state['step']} of "
                  f"{self.cfg.max_steps})", file=sys.stderr, flush=True)
        # a longer run is the uninterrupted one unless a schedule depends on max_steps
        differ = [k for k in changed if k != "max_steps"
                  or getattr(self.cfg, "lr_scheduler_type", "constant") != "constant"]
        if differ:  # allowed, but the result is no longer the uninterrupted run's
            logger.warning("resuming with settings that differ from the checkpoint's: %s",
                           ", ".join(differ))
        run = current_run(self.cfg.output_dir)
        if run is not None:
            run.resumed = {"resumed_from": path, "step": state["step"], "changed": changed,
                           "config": saved_cfg}
        logger.info("resumed %s from %s (step %d)", self.stage, path, state["step"])
        return state

    def maybe_save(self, step: int, state_fn) -> None:
        """Save every `save_steps` steps and at the last one (as the HF Trainer does), so a
        finished run can be continued with a larger `max_steps`."""
        if self.cfg.save_steps and (step % self.cfg.save_steps == 0 or step == self.cfg.max_steps):
            self.save(step, state_fn())

    def save(self, step: int, state: dict) -> str:
        """Save the state after `step`; `NonFiniteError` instead if a weight is NaN or inf."""
        if not weights_finite(self.model):
            raise self.fail("weights", step)
        path = os.path.join(self.cfg.output_dir, f"{CHECKPOINT_PREFIX}{step}")
        if self.acc.is_main_process:
            commit_run(self.cfg.output_dir)
            rows = {}
            if self.log is not None:
                self.log.flush()
                rows = {"metrics_rows": self.log.count}
            path = save_checkpoint(self.cfg.output_dir, step, self.model,
                                   {"stage": self.stage, "optimizer": self.optimizer.state_dict(),
                                    "config": to_dict(self.cfg), **rows, **state})
        self.acc.wait_for_everyone()
        self.last_saved = path
        return path

    def fail(self, quantity: str, step: int, state_fn=None) -> NonFiniteError:
        """The error for a non-finite `quantity` at `step`. With `state_fn` the model is
        still in its state after step - 1 (nothing of step `step` was applied): save it,
        if its weights are finite."""
        if state_fn is not None and weights_finite(self.model):
            where = f"last good state saved in {self.save(step - 1, state_fn())}"
        elif self.last_saved:
            where = f"last good checkpoint: {self.last_saved}"
        else:
            where = "no checkpoint was saved (set --save_steps)"
        return NonFiniteError(f"non-finite {quantity} at step {step}; training stopped, {where}")


def weights_finite(model: torch.nn.Module) -> bool:
    """True when every parameter of `model` is finite (one device sync)."""
    flags = [torch.isfinite(p.detach()).all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True
