"""The errors shardwise raises on purpose, and the exit code each maps to.

    ShardwiseError            base: a clear one-line message, never a traceback for the user
    ├── ConfigError           the job config or CLI flags are invalid                 (exit 2)
    ├── InputError            the input data is missing, malformed or the wrong shape (exit 2)
    ├── StorageError          storage cannot be read or written                       (exit 3)
    └── RunFailed             the run finished but some shards failed                 (exit 1)

Engine failures (model loading, generation) come from ``gpu_runtime.errors`` and are not
subclasses here: ``gpu_runtime`` must not import orchestration code.
"""

from __future__ import annotations


class ShardwiseError(Exception):
    """Base class: ``str(err)`` is a complete, user-facing one-line reason."""

    exit_code = 1


class ConfigError(ShardwiseError):
    exit_code = 2


class InputError(ShardwiseError):
    exit_code = 2


class StorageError(ShardwiseError):
    exit_code = 3


class RunFailed(ShardwiseError):
    exit_code = 1
