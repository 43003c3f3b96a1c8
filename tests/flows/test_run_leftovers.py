"""What a run killed outright leaves behind is tidied by the next run on the same output: its
MLflow run, left RUNNING by the SIGKILL, ends as KILLED. Through the console script, real MLflow
(sqlite), a real SIGKILL at a named crash point (``SHARDWISE_CRASH_AT``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from shardwise.tasks.records.demo_data import write_reviews_dataset

pytestmark = pytest.mark.slow

SHARDWISE = str(Path(sys.executable).with_name("shardwise"))


def run(tmp_path: Path, experiment: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [
        SHARDWISE,
        "run",
        "--input",
        str(tmp_path / "in"),
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
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def test_a_rerun_ends_the_mlflow_run_a_sigkill_left_running(prefect_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from shardwise.tasks.storage.local_state import tracking_uri

    experiment = f"leftover-{uuid.uuid4().hex[:8]}"
    write_reviews_dataset(str(tmp_path / "in"), files=1, rows_per_file=4, rows_per_group=2)
    killed = run(tmp_path, experiment, {"SHARDWISE_CRASH_AT": "shard-compute"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["status"] == "running"
    orphan = manifest["mlflow_run_id"]
    client = MlflowClient(tracking_uri())
    assert client.get_run(orphan).info.status == "RUNNING"

    rerun = run(tmp_path, experiment)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    ended = client.get_run(orphan)
    assert ended.info.status == "KILLED"
    assert ended.info.end_time is not None
    new_manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert new_manifest["mlflow_run_id"] != orphan
    assert client.get_run(new_manifest["mlflow_run_id"]).info.status == "FINISHED"
    # which run ended it: the rerun's Prefect flow run
    assert ended.data.tags["shardwise.ended_by"] == f"prefect flow run {new_manifest['prefect_flow_run_id']}"
