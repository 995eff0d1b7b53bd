"""Toy tasks with a hidden gold reward, by name."""

from rlhf_toy.tasks.base import Task
from rlhf_toy.tasks.sentiment import SentimentTask
from rlhf_toy.tasks.sorting import SortingTask

TASKS: dict[str, type[Task]] = {"sentiment": SentimentTask, "sorting": SortingTask}


def get_task(name: str) -> Task:
    """The task called `name`.

    Raises:
        UsageError: unknown name (the message lists the known ones).
    """
    if name not in TASKS:
        from rlhf_toy.errors import UsageError

        raise UsageError(f"task must be one of {sorted(TASKS)} (got {name!r})")
    return TASKS[name]()


__all__ = ["TASKS", "Task", "get_task", "SentimentTask", "SortingTask"]
