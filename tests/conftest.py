"""Test-session environment: isolated Prefect/MLflow state, offline models, shared fixtures.

The environment is set before Prefect is imported anywhere, so every run in this session uses a
temporary PREFECT_HOME (its own sqlite database) and a temporary shardwise state dir.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="shardwise-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "prefect")
os.environ["SHARDWISE_HOME"] = str(_SESSION_DIR / "state")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.3")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import pytest  # noqa: E402

from tasks.demo_data import write_reviews_dataset  # noqa: E402


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect server (the test harness's temporary one) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def reviews_dir(tmp_path: Path) -> Path:
    """3 files x 10 rows, row groups of 4: a small multi-file, multi-row-group dataset."""
    directory = tmp_path / "reviews"
    write_reviews_dataset(str(directory), files=3, rows_per_file=10, rows_per_group=4)
    return directory
