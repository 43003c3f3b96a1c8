"""Which task failures Prefect should retry: not bad input or a bad model spec, which fail the same
way every time (``shardwise.gpu_runtime.errors``: a ``ModelNotFoundError`` cannot be helped by another try)."""

from __future__ import annotations

from typing import Any

from shardwise.gpu_runtime.errors import ModelNotFoundError
from shardwise.tasks.errors import ConfigError, InputError, LeaseLost


def retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry storage and engine failures, never bad data or config,
    nor a lost lease (another run owns the output now)."""
    try:
        state.result()
    except (InputError, ConfigError, ModelNotFoundError, LeaseLost):
        return False
    except Exception:  # noqa: BLE001 - any other failure is worth another try
        return True
    return True
