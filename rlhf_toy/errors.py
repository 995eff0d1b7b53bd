"""The two errors a run ends with on purpose; the CLI turns each into one line."""


class UsageError(ValueError):
    """Bad input from the user: a config value, a path, a dataset. One line, exit code 2."""


class NonFiniteError(RuntimeError):
    """Training produced a NaN or inf (loss, logits, values, advantages). One line naming the
    quantity and the step, exit code 1; the last good state is on disk."""


class StorageError(RuntimeError):
    """Writing a run's files failed (disk full, file size limit, permissions changed while
    running). One line naming the file and the cause, exit code 1; the previous checkpoint
    is left intact."""
