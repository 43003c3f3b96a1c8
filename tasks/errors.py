"""The errors shardwise raises on purpose, and the exit code each maps to.

    ShardwiseError            base: a clear one-line message, never a traceback for the user
    ├── ConfigError           the job config or CLI flags are invalid                 (exit 2)
    ├── InputError            the input data is missing, malformed or the wrong shape (exit 2)
    └── StorageError          storage cannot be read or written                       (exit 3)
        └── LeaseLost         another run holds the output's lease now: nothing more
                              of this run is published (never retried)                (exit 3)

    A run that finishes with failed shards is not an exception: the flow ends Failed   (exit 1)

    Terminated (a BaseException, like KeyboardInterrupt): SIGTERM arrived            (exit 143)

Engine failures (model loading, generation) come from ``shardwise.gpu_runtime.errors`` and are not
subclasses here: ``gpu_runtime`` must not import orchestration code.
"""

from __future__ import annotations


class ShardwiseError(Exception):
    """Base class: ``str(err)`` is a complete, user-facing one-line reason, with any credential in
    a URI it names already redacted (these messages reach logs, Prefect states and MLflow)."""

    exit_code = 1

    def __init__(self, message: str = "", *args: object) -> None:
        from shardwise.tasks.redaction import redact_text

        super().__init__(redact_text(str(message)), *args)


class ConfigError(ShardwiseError):
    exit_code = 2


class InputError(ShardwiseError):
    exit_code = 2


class StorageError(ShardwiseError):
    exit_code = 3


class LeaseLost(StorageError):
    """The output's lease names another run now (taken over while this one was paused or cut
    off): this run must write nothing more that readers can see."""


class Terminated(BaseException):
    """SIGTERM: the run stops as on Ctrl-C (not an error of the run itself, so not an Exception)."""

    exit_code = 143
