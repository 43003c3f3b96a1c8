"""A run says where its time went outside the shards' read, compute and write (CLI, MLflow), and
updates its progress artifact without one API call per shard."""

from __future__ import annotations

import re

import pytest

from shardwise.tasks.records.demo_data import write_reviews_dataset


@pytest.mark.slow
def test_run_reports_its_phases_and_per_shard_overhead(cli, tmp_path):
    import json

    from mlflow.tracking import MlflowClient

    from shardwise.tasks.storage.local_state import tracking_uri

    write_reviews_dataset(str(tmp_path / "in"), files=2, rows_per_file=20, rows_per_group=10)
    run = cli(
        "run",
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "out"),
        "--task",
        "embed",
        "--embed-model",
        "dummy:bert-tiny",
        "--id-column",
        "review_id",
        "--rows-per-shard",
        "10",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    line = re.search(r"^overhead\s+(.*)$", run.stdout, re.M)
    assert line, run.stdout
    assert re.search(
        r"s per run \(plan [\d.]+, forecast [\d.]+, start [\d.]+, commit [\d.]+, report [\d.]+\), "
        r"[\d.]+s per shard; before the flow: checks and forecast [\d.]+s; "
        r"waited for the Prefect server [\d.]+s",
        line.group(1),
    ), line.group(1)

    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    metrics = MlflowClient(tracking_uri()).get_run(manifest["mlflow_run_id"]).data.metrics
    phases = ("seconds_plan", "seconds_forecast", "seconds_start", "seconds_shards", "seconds_commit", "seconds_report")
    assert all(metrics[p] >= 0 for p in phases)
    # The phases cover the flow body; fixed is all of it but the shards phase.
    assert metrics["seconds_fixed"] == pytest.approx(
        sum(metrics[p] for p in phases) - metrics["seconds_shards"], abs=0.5
    )
    busy = sum(metrics[f"seconds_{part}"] for part in ("read", "compute", "write"))
    assert metrics["seconds_shard_overhead"] == pytest.approx(max(0.0, metrics["seconds_shards"] - busy) / 4, abs=1e-6)
    assert "seconds_prefect_server_start" in metrics  # ~0 here: the tests share one running server
    assert metrics["seconds_preflight"] > 0  # the checks, plan and forecast the CLI runs before the flow


def test_progress_updates_are_held_back_then_the_latest_is_sent(prefect_server):
    from prefect.client.orchestration import get_client

    from shardwise.tasks.orchestration.artifacts import ProgressUpdates, start_progress

    artifact_id = start_progress(total=50, done=0)
    progress = ProgressUpdates(artifact_id, 50, min_interval_s=3600)
    sent = [progress.update(done) for done in range(1, 51)]
    assert not any(sent)  # none due within the interval

    def shown() -> float:
        with get_client(sync_client=True) as client:
            return _artifact_progress(client, artifact_id)

    assert shown() == 0.0
    progress.finish()
    assert shown() == 100.0
    assert ProgressUpdates(artifact_id, 50, min_interval_s=0).update(25) is True
    assert shown() == 50.0


def _artifact_progress(client, artifact_id) -> float:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId

    (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[artifact_id])))
    return float(artifact.data)


def _temporary_server_children() -> list[int]:
    """Live child processes of this one that are Prefect's temporary server."""
    import os
    from pathlib import Path

    found = []
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and b"prefect.server.api.server:create_app" in cmdline:
            found.append(int(proc.name))
    return found


@pytest.mark.slow
def test_the_temporary_prefect_server_starts_before_the_checks_and_stops_with_the_run(tmp_path, monkeypatch):
    """Without PREFECT_API_URL a run starts its temporary server before its checks and forecast, so
    that the start-up overlaps them; a run refused by its budget stops it too, and a run that goes
    through waits for it only as long as the checks did not cover."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from shardwise.tasks.orchestration import task_runners
    from tests.cli import run_cli

    started = []
    original = task_runners._TemporaryServer.__init__

    def recording(self):
        original(self)
        started.append((self, _temporary_server_children()))

    monkeypatch.setattr(task_runners._TemporaryServer, "__init__", recording)
    write_reviews_dataset(str(tmp_path / "in"), files=1, rows_per_file=12, rows_per_group=12)
    args = ["run", "--input", str(tmp_path / "in"), "--id-column", "review_id", "--task", "embed"]
    env = {"PREFECT_API_URL": None, "PREFECT_HOME": str(tmp_path / "prefect")}

    # As in a process started without PREFECT_API_URL (this one's settings hold the session's server).
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        refused = run_cli(*args, "--output", str(tmp_path / "refused"), "--max-cost", "1e-12", env=env)
        assert refused.returncode == 2 and "exceeds max_cost" in refused.stderr
        assert len(started) == 1 and len(started[0][1]) == 1  # it was running during the checks
        assert started[0][0].process is None and _temporary_server_children() == []

        done = run_cli(*args, "--output", str(tmp_path / "out"), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(started) == 2 and _temporary_server_children() == []
    overhead = next(line for line in done.stdout.splitlines() if "overhead" in line)
    assert re.search(r"before the flow: checks and forecast [\d.]+s; waited for the Prefect server [\d.]+s", overhead)
