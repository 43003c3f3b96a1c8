"""Which task failures Prefect should retry: not bad input, which fails the same way every time."""

from __future__ import annotations

from typing import Any

from tasks.errors import ConfigError, InputError


def retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry storage and engine failures, never bad data."""
    try:
        state.result()
    except (InputError, ConfigError):
        return False
    except Exception:  # noqa: BLE001 - any other failure is worth another try
        return True
    return True
