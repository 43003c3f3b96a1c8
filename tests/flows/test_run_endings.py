"""However a ``shardwise run`` ends, its MLflow run ends too: KILLED on Ctrl-C or SIGTERM (exit 130 or
143), FAILED when a step before the report raises. Through the console script, real MLflow (sqlite)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from shardwise.tasks.records.demo_data import write_reviews_dataset
from tests.cli import run_cli

pytestmark = pytest.mark.slow

SHARDWISE = str(Path(sys.executable).with_name("shardwise"))


def mlflow_runs(experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    from shardwise.tasks.storage.local_state import tracking_uri

    client = MlflowClient(tracking_uri())
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


def job(tmp_path: Path, experiment: str) -> list[str]:
    source = tmp_path / "in"
    write_reviews_dataset(str(source), files=1, rows_per_file=4, rows_per_group=2)
    return [
        SHARDWISE,
        "run",
        "--input",
        str(source),
        "--output",
        str(tmp_path / "out"),
        "--task",
        "embed",
        "--id-column",
        "review_id",
        "--set",
        f"name={experiment}",
        "--set",
        "shard_retries=0",
    ]


@pytest.mark.parametrize(("sig", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_run_ends_the_mlflow_run_killed(prefect_server, tmp_path, sig, exit_code):
    experiment = f"signal-{uuid.uuid4().hex[:8]}"
    # A shard that computes until stopped; it writes <never>.reached once it is in the shard.
    never = tmp_path / "never-created"
    env = {**os.environ, "SHARDWISE_HANG_AT": "shard-compute", "SHARDWISE_HANG_UNTIL": str(never)}
    # A shell's background jobs inherit SIGINT ignored; a terminal's Ctrl-C reaches a default handler.
    proc = subprocess.Popen(
        job(tmp_path, experiment),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        manifest = tmp_path / "out" / "_manifest.json"
        in_the_shard = Path(f"{never}.reached")
        deadline = time.monotonic() + 300
        while not (in_the_shard.exists() and manifest.exists() and mlflow_runs(experiment)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never reached its shard"
            time.sleep(0.2)
        assert [r.info.status for r in mlflow_runs(experiment)] == ["RUNNING"]
        running = run_cli("status", str(tmp_path / "out"))
        assert (
            running.returncode == 1
            and f"state    running (host {socket.gethostname()}, pid {proc.pid}" in running.stdout
        )
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == exit_code, stderr[-3000:]
    assert "Traceback" not in stderr
    assert ("terminated" if sig == signal.SIGTERM else "interrupted") in stderr
    assert [r.info.status for r in mlflow_runs(experiment)] == ["KILLED"]
    stopped = run_cli("status", str(tmp_path / "out"))
    assert stopped.returncode == 1 and "state    interrupted: no run is writing it" in stopped.stdout, stopped.stdout


def test_a_step_that_raises_ends_the_mlflow_run_failed(prefect_server, tmp_path):
    experiment = f"raises-{uuid.uuid4().hex[:8]}"
    command = job(tmp_path, experiment)
    # A directory where _SUCCESS goes: withdrawing the old marker at the start of the run fails.
    (tmp_path / "out" / "_SUCCESS").mkdir(parents=True)
    (tmp_path / "out" / "_SUCCESS" / "keep").write_text("not a marker")
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1].startswith("shardwise: error: run failed"), proc.stderr[-3000:]
    runs = mlflow_runs(experiment)
    assert [r.info.status for r in runs] == ["FAILED"], [r.info for r in runs]
