"""A stage's output directory: checked before anything is written, locked while a run
writes into it, never left half old and half new.

A run goes through three moments:
1. `open_run_dir` (in `start_stage`, after every input check): create the directory, take
   its lock, refuse an earlier run's files unless `--overwrite_output_dir` or
   `--resume_from_checkpoint` is given. Nothing of an earlier run is touched yet.
2. `commit` (at the run's first write: a metrics row, a checkpoint or its final files):
   clear the earlier run (`--overwrite_output_dir`), or retire the finished files and
   later checkpoints of the run being resumed; then write `run_config.json`, with the
   resume history. A run that fails before producing anything leaves the directory as it was.
3. `release` (after the final files): the lock goes. A killed run's lock goes with its
   process (`fcntl.flock`), so it never sticks.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from typing import Any

from rlhf_toy.config import to_dict
from rlhf_toy.errors import UsageError
from rlhf_toy.integrity import read_json_file, write_json

LOCK_FILE = ".lock"
RUN_CONFIG = "run_config.json"
METRICS = "metrics.jsonl"
# input fields of the stages, in the order the configs declare them
INPUT_FIELDS = ("sft_dir", "reward_dir", "prefs_dir", "ppo_dir", "dpo_dir")

_OPEN: dict[str, RunDir] = {}  # realpath of output_dir -> the run writing into it


CHECKPOINT_PREFIX = "checkpoint-"
FRESH_BASE_DIR = "base"  # a LoRA sft run's freshly initialised base model
TRACKER_DIR = "tensorboard"  # OUTPUT_DIR/tensorboard/rlhf_toy/: TensorBoard's event files
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def checkpoint_step(name: str) -> int | None:
    """The step of a `checkpoint-<step>` directory name, else None."""
    m = _CHECKPOINT_RE.match(name)
    return int(m.group(1)) if m else None


def read_run_config(path: str) -> dict:
    """The `run_config.json` a stage wrote into `path` ({} if none)."""
    file = os.path.join(path, RUN_CONFIG)
    if not os.path.isfile(file):
        return {}
    return read_json_file(file, f"run {path!r}")


def check_inputs(cfg: Any) -> None:
    """Every input directory exists (checked in the order the config declares them) and
    none of them is the output directory, inside it or around it. An empty one is not
    given (`compare` then trains that stage itself)."""
    names = [f for f in cfg.__dataclass_fields__ if f in INPUT_FIELDS and getattr(cfg, f)]
    for name in names:
        path = getattr(cfg, name)
        if not os.path.isdir(path):
            if name == "prefs_dir":
                raise UsageError(f"prefs_dir {path!r} does not exist (run `rlhf-toy prefs` "
                                 "first)")
            raise UsageError(f"{name}: checkpoint {path!r} does not exist (run the earlier "
                             "stage first)")
    out = os.path.realpath(cfg.output_dir)
    for name in names:
        path = os.path.realpath(getattr(cfg, name))
        if out == path or out.startswith(path + os.sep) or path.startswith(out + os.sep):
            raise UsageError(f"output_dir must not be {name}, inside it or around it: the run "
                             f"would overwrite its input (got {cfg.output_dir!r})")


class RunDir:
    """The lock and the commit of one run into `cfg.output_dir` (main process only)."""

    def __init__(self, cfg: Any, stage: str):
        self.cfg, self.stage, self.path = cfg, stage, cfg.output_dir
        self.resumed: dict | None = None  # set by `Checkpointer.resume`
        self.committed = False
        self._fd: int | None = None

    def lock(self) -> None:
        """Take `output_dir/.lock` (an exclusive `flock`); refuse if another run holds it."""
        file = os.path.join(self.path, LOCK_FILE)
        while True:
            try:
                fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise UsageError(f"output_dir {self.path!r} is not writable "
                                 f"({exc.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise UsageError(f"output_dir {self.path!r} is in use by another run (pid "
                                 f"{holder}); wait for it or choose another output_dir") from None
            try:  # the holder may have removed the file between our open and our lock
                same = os.fstat(fd).st_ino == os.stat(file).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def check_earlier_run(self) -> None:
        """An earlier run's files are refused unless this run overwrites or resumes it."""
        cfg = self.cfg
        if getattr(cfg, "resume_from_checkpoint", "") or cfg.overwrite_output_dir:
            return
        left = [n for n in os.listdir(self.path) if n != LOCK_FILE]
        if left:
            what = ("a finished run" if os.path.exists(os.path.join(self.path, "summary.json"))
                    else f"files of an earlier run ({sorted(left)[0]}, ...)")
            raise UsageError(f"output_dir {self.path!r} already holds {what}; pass "
                             "--overwrite_output_dir to replace it or --resume_from_checkpoint "
                             "latest to continue it")

    def commit(self) -> None:
        """The run produces its first output: clear what it replaces, record its config."""
        if self.committed:
            return
        self.committed = True
        if self.resumed is not None:
            self._retire(keep_until=self.resumed["step"])
        elif self.cfg.overwrite_output_dir:
            self._retire(keep_until=None)
        record = {"stage": self.stage, **to_dict(self.cfg)}
        if self.resumed is not None:
            earlier = read_run_config(self.path)
            record["history"] = [*earlier.get("history", []), self.resumed]
        write_json(os.path.join(self.path, RUN_CONFIG), record)

    def _retire(self, keep_until: int | None) -> None:
        """Remove an earlier run's files. Resuming (`keep_until` = the resume step) keeps
        the checkpoints up to it, the metrics, the run config and the training snapshots
        (later ones are rewritten as the run reaches them); else only the lock stays."""
        # TensorBoard drops the events past a step that is logged again
        keep = {LOCK_FILE} if keep_until is None else {LOCK_FILE, RUN_CONFIG, METRICS, "inspect",
                                                       FRESH_BASE_DIR, TRACKER_DIR}
        for name in os.listdir(self.path):
            step = checkpoint_step(name)
            if name in keep or (keep_until is not None and step is not None
                                and step <= keep_until):
                continue
            full = os.path.join(self.path, name)
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)
            else:
                os.remove(full)

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.remove(os.path.join(self.path, LOCK_FILE))
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None


def open_run_dir(cfg: Any, stage: str, is_main: bool) -> RunDir:
    """Create, lock and check `cfg.output_dir` (see the module docstring)."""
    key = os.path.realpath(cfg.output_dir)
    if key in _OPEN:  # an earlier run of this process into the same directory ended
        _OPEN.pop(key).release()
    run = RunDir(cfg, stage)
    if is_main:
        try:
            os.makedirs(cfg.output_dir, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"output_dir {cfg.output_dir!r} cannot be created: "
                             f"{exc.strerror}") from None
        if not os.access(cfg.output_dir, os.W_OK):
            raise UsageError(f"output_dir {cfg.output_dir!r} is not writable")
        run.lock()
        try:
            run.check_earlier_run()
        except UsageError:
            run.release()
            raise
    else:
        run.committed = True  # only the main process writes
    _OPEN[key] = run
    return run


def current_run(output_dir: str) -> RunDir | None:
    """The open run writing into `output_dir` (None outside `start_stage`)."""
    return _OPEN.get(os.path.realpath(output_dir))


def commit_run(output_dir: str) -> None:
    """`RunDir.commit` of the run writing into `output_dir`, if one is open."""
    run = current_run(output_dir)
    if run is not None:
        run.commit()


def release_run(output_dir: str) -> None:
    run = _OPEN.pop(os.path.realpath(output_dir), None)
    if run is not None:
        run.release()
