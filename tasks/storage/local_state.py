"""Where shardwise keeps local state (MLflow database, demo data) when nothing else is configured."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    """``$SHARDWISE_HOME``, else ``./.shardwise`` in the working directory (like MLflow's own default)."""
    path = Path(os.environ.get("SHARDWISE_HOME") or ".shardwise").expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` when set, else a sqlite file in the state dir."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{state_dir() / 'mlflow.db'}"
