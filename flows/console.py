"""What a person reads on the terminal during a command: the forecast, one progress line per
shard, the flow run's link in the Prefect UI, warnings, errors and the summary.

The rest (Prefect's task-state and server lines, MLflow's store set-up, weight-loading progress
bars, vLLM's engine log) still reaches the Prefect and MLflow UIs unchanged, and the terminal
with ``-v``. Prefect's warning that a thread-run timeout cannot interrupt a blocking call is left
out too: shard timeouts are documented in the README.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

# Read when these libraries are imported: in this process when that comes later, and in worker
# processes, which inherit the environment.
QUIET_ENVIRONMENT = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
}

_OWN_CODE = tuple(str(Path(__file__).resolve().parents[1] / name) for name in ("flows", "tasks", "gpu_runtime"))


class QuietConsole(logging.Filter):
    """Passes warnings and errors, shardwise's own lines (logged through Prefect's run loggers too)
    and the flow run's "View at" link; drops the rest of the libraries' informational lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return "Timeouts in worker threads cannot interrupt" not in record.getMessage()
        if record.name.startswith("shardwise") or record.pathname.startswith(_OWN_CODE):
            return True
        return record.name == "prefect.flow_runs" and str(record.msg).startswith("View at ")


@contextlib.contextmanager
def console(verbose: bool | None) -> Iterator[None]:
    """The terminal as described above for the duration of one command that runs flows
    (everything with ``verbose``; ``None``: a command that runs none, left alone); what it
    changes in this process is put back afterwards."""
    if verbose is None or verbose:
        yield
        return
    import prefect.main  # noqa: F401 - sets up Prefect's logging (its console handler) now, not mid-run

    saved_environment = {name: os.environ.get(name) for name in QUIET_ENVIRONMENT}
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    quiet = QuietConsole()
    handlers = [h for h in logging.getLogger().handlers if type(h).__name__ == "PrefectConsoleHandler"]
    for handler in handlers:
        handler.addFilter(quiet)
    mlflow_logger = logging.getLogger("mlflow")  # if already imported; else MLFLOW_LOGGING_LEVEL
    mlflow_level = mlflow_logger.level
    mlflow_logger.setLevel(logging.WARNING)
    bars = _progress_bars(enabled=False)
    try:
        yield
    finally:
        for name, value in saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _progress_bars(bars)
        mlflow_logger.setLevel(mlflow_level)
        for handler in handlers:
            handler.removeFilter(quiet)


def _progress_bars(enabled: bool | dict[str, bool]) -> dict[str, bool]:
    """Turn the progress bars of huggingface_hub and transformers, those imported, on or off (or
    each back to what a returned dict says); returns whether each was on."""
    was_on = {}
    for name in ("huggingface_hub.utils", "transformers.utils.logging"):
        module = sys.modules.get(name)
        if module is None or (isinstance(enabled, dict) and name not in enabled):
            continue
        on = enabled if isinstance(enabled, bool) else enabled[name]
        if name == "huggingface_hub.utils":
            was_on[name] = not module.are_progress_bars_disabled()
            module.enable_progress_bars() if on else module.disable_progress_bars()
        else:
            was_on[name] = module.is_progress_bar_enabled()
            module.enable_progress_bar() if on else module.disable_progress_bar()
    return was_on
