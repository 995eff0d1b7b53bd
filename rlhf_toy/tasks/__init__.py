"""Toy tasks with a hidden gold reward: built-ins by name, the user's own by
"package.module:ClassName" (a `Task` subclass in any importable module)."""

from __future__ import annotations

import importlib
import inspect
import os
import sys

from rlhf_toy.errors import UsageError
from rlhf_toy.tasks.base import Task
from rlhf_toy.tasks.long_review import LongReviewTask
from rlhf_toy.tasks.sentiment import SentimentTask
from rlhf_toy.tasks.sorting import SortingTask

TASKS: dict[str, type[Task]] = {"sentiment": SentimentTask, "sorting": SortingTask,
                                "long_review": LongReviewTask}


def _import(module_name: str):
    """Import `module_name`; the current directory is searched last (as `python -m` would
    search it first), so a module beside the user's runs dir is found from `rlhf-toy`."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        top = module_name.split(".")[0]
        if exc.name != top or os.getcwd() in sys.path:
            raise
    sys.path.append(os.getcwd())
    return importlib.import_module(module_name)


def task_class(spec: str) -> type[Task]:
    """The `Task` class named by `spec`: a built-in name or "package.module:ClassName".

    Raises:
        UsageError: unknown name, module not found, no such class, not a `Task` subclass,
            abstract methods left unimplemented, or an empty vocabulary.
    """
    allowed = f"one of {sorted(TASKS)} or package.module:ClassName"
    if ":" not in spec:
        if spec not in TASKS:
            raise UsageError(f"task must be {allowed} (got {spec!r})")
        return TASKS[spec]
    module_name, _, name = spec.partition(":")
    if not module_name or not name.isidentifier():
        raise UsageError(f"task must be {allowed} (got {spec!r})")
    try:
        module = _import(module_name)
    except ModuleNotFoundError as exc:
        raise UsageError(f"task {spec!r}: no module named {exc.name!r} (is it on PYTHONPATH?)"
                         ) from None
    except Exception as exc:  # the user's module failed while importing: one line, its cause
        raise UsageError(f"task {spec!r}: importing {module_name!r} failed: "
                         f"{type(exc).__name__}: {exc}") from None
    cls = getattr(module, name, None)
    if cls is None:
        raise UsageError(f"task {spec!r}: module {module_name!r} has no attribute {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise UsageError(f"task {spec!r}: {name} must be a subclass of rlhf_toy.tasks.Task")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise UsageError(f"task {spec!r}: {name} must implement {missing}")
    if not cls.words or cls.max_prompt_tokens <= 0 or cls.max_response_tokens <= 0:
        raise UsageError(f"task {spec!r}: {name} must set words, max_prompt_tokens > 0 and "
                         "max_response_tokens > 0")
    return cls


def get_task(spec: str) -> Task:
    """An instance of the task named by `spec` (see `task_class`)."""
    return task_class(spec)()


__all__ = ["TASKS", "Task", "get_task", "task_class", "SentimentTask", "SortingTask",
           "LongReviewTask"]
