"""Test-session environment: isolated Prefect/MLflow state, offline models, shared fixtures.

The environment is set before Prefect is imported anywhere, so every run in this session uses a
temporary PREFECT_HOME (its own sqlite database) and a temporary shardwise state dir.
"""

from __future__ import annotations

import json
import os
import subprocess
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

from shardwise.tasks.records.demo_data import write_reviews_dataset  # noqa: E402


def pytest_sessionstart(session):
    """Prefect's logging set up now, on the real stderr: set up on first use instead, inside a test
    that captures output, its console handlers would keep writing to that test's closed stream."""
    from prefect.logging.configuration import setup_logging

    setup_logging()


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR


@pytest.fixture(scope="session")
def prefect_server(session_dir):
    """A real ``prefect server start`` process on loopback for the whole session. In-process flows
    and ``shardwise`` subprocesses both report to it (PREFECT_API_URL)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.servers import start_prefect_server

    proc, url = start_prefect_server(session_dir / "prefect-server")
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        for service in (APILogWorker, EventsWorker):  # deliver queued logs while the server is up
            service.drain_all(timeout=10, at_exit=False)
        os.environ.pop("PREFECT_API_URL", None)
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def cli(prefect_server):
    """``run_cli`` (tests/cli.py): the ``shardwise`` command in this process, reporting to the
    session's Prefect server."""
    from tests.cli import run_cli

    return run_cli


@pytest.fixture(scope="session")
def ray_clusters(prefect_server):
    """Local Ray clusters, one at a time, reused across tests (tests/servers.py). Started after the
    Prefect server so their workers inherit PREFECT_API_URL; stopped at the end of the session."""
    from tests.servers import RayClusters

    clusters = RayClusters()
    try:
        yield clusters
    finally:
        clusters.stop()


S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback behind a cuttable TCP proxy; yields the proxy."""
    from moto.server import ThreadedMotoServer

    from tests.servers import TcpProxy, free_port

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    proxy = TcpProxy(server.get_host_and_port())
    proxy.restore()
    yield proxy
    proxy.cut()
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket; credentials and endpoint come from the environment, as in production."""
    import uuid

    import s3fs

    for key, value in {**S3_CREDENTIALS, "AWS_ENDPOINT_URL_S3": s3_server.url}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SHARDWISE_STORAGE_OPTIONS", json.dumps(S3_OPTIONS_NO_RETRY_STORM))
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(**S3_OPTIONS_NO_RETRY_STORM)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    yield fs, bucket
    s3fs.S3FileSystem.clear_instance_cache()


# Bounded retries so an unreachable endpoint fails in seconds, not minutes.
S3_OPTIONS_NO_RETRY_STORM = {
    "config_kwargs": {"connect_timeout": 2, "read_timeout": 10, "retries": {"max_attempts": 2, "mode": "standard"}}
}


@pytest.fixture
def reviews_dir(tmp_path: Path) -> Path:
    """3 files x 10 rows, row groups of 4: a small multi-file, multi-row-group dataset."""
    directory = tmp_path / "reviews"
    write_reviews_dataset(str(directory), files=3, rows_per_file=10, rows_per_group=4)
    return directory


@pytest.fixture(scope="session")
def worker(prefect_server, tmp_path_factory):
    """``prefect deploy --all`` from the project root, then one process worker polling the pool,
    for every test of the session that runs the deployments; its log file is the value."""
    import sys

    root = Path(__file__).resolve().parent.parent
    prefect_bin = str(Path(sys.executable).with_name("prefect"))
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server,
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "1",
    }
    for command in (
        ["work-pool", "create", "shardwise", "--type", "process", "--overwrite"],
        ["--no-prompt", "deploy", "--all"],
    ):
        done = subprocess.run([prefect_bin, *command], cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [prefect_bin, "worker", "start", "--pool", "shardwise", "--type", "process"],
            cwd=tmp_path_factory.mktemp("worker-cwd"),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    yield log
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# Tests that share one pytest-xdist worker (the Makefile runs the suite on two), by node id prefix;
# every other test file stays whole on one worker, so its module fixtures (a loaded model, a vLLM
# engine) load once. Ray: ``ray stop`` stops every Ray process on the machine, so two workers'
# clusters cannot coexist (RayClusters refuses a second one). Deployments: one process worker
# polls their pool for the whole session.
SHARED_WORKER = {
    "tests/flows/test_ray_runner.py": "ray",
    "tests/flows/test_security.py": "ray",  # its Ray case
    "tests/flows/test_deployments.py": "deployments",
    "tests/flows/test_quality_gate.py::test_held_nightly_partition_is_retried_by_the_next_backfill": "deployments",
}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Whole test files (or a ``SHARED_WORKER`` group) are what the workers take, one at a time."""
    from xdist.scheduler import LoadScopeScheduling

    class SharedWorkerScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            for prefix, group in SHARED_WORKER.items():
                if nodeid.startswith(prefix):
                    return group
            return nodeid.split("::", 1)[0]

    return SharedWorkerScheduling(config, log)
