"""prefect.yaml deployed to a real Prefect server and run by a real process worker: backfills are
idempotent (twice, even at the same time, never duplicate a partition) and a late nightly run
processes its own night."""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import os
import threading
import time
from pathlib import Path

import pytest

from shardwise.tasks.records.demo_data import write_reviews_dataset
from tests.prefect_reads import read_all

pytestmark = pytest.mark.slow

DATES = ["2026-11-01", "2026-11-02"]  # two partitions show both the sharing and the limit of 1


def partitioned_job(tmp_path: Path, dates: list[str]) -> Path:
    for i, date in enumerate(dates):
        write_reviews_dataset(str(tmp_path / "raw" / f"dt={date}"), files=1, rows_per_file=6 + i, rows_per_group=3)
    job = {
        "name": "backfill-test",
        "input": str(tmp_path / "raw"),
        "output": str(tmp_path / "enriched"),
        "task": "embed",
        "id_column": "review_id",
        "rows_per_shard": 3,
        "device": "cpu",
    }
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(job))
    return path


def read_deployment(name: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def partition_runs(deployment_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        return read_all(
            client.read_flow_runs, deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )


def trigger_backfill(job: Path, start: str, end: str):
    from prefect.deployments import run_deployment

    return run_deployment(
        "backfill/backfill",
        parameters={"job": str(job), "start": start, "end": end},
        timeout=600,
        poll_interval=1,
        as_subflow=False,
    )


def test_deployments_from_prefect_yaml(worker):
    nightly = read_deployment("nightly-enrich/nightly-enrich")
    (schedule,) = nightly.schedules
    assert schedule.schedule.cron == "30 2 * * *" and schedule.schedule.timezone == "Europe/Berlin"
    assert nightly.parameters["timezone"] == "Europe/Berlin" and nightly.work_pool_name == "shardwise"
    assert read_deployment("backfill/backfill").parameters == {"job": "conf/jobs/nightly-reviews.yaml"}
    partition = read_deployment("enrich-partition/enrich-partition")
    assert partition.global_concurrency_limit.limit == 1


def test_backfill_twice_runs_each_partition_once(worker, tmp_path):
    job = partitioned_job(tmp_path, DATES)
    partition = read_deployment("enrich-partition/enrich-partition")
    before = {r.id for r in partition_runs(partition.id)}

    # Two backfills over the same dates at the same time: the idempotency keys make them share runs.
    results = [None, None]

    def go(i: int) -> None:
        results[i] = trigger_backfill(job, DATES[0], DATES[-1])

    # Each thread in a copy of this context, so it sees the test server's settings.
    threads = [threading.Thread(target=contextvars.copy_context().run, args=(go, i)) for i in range(2)]
    for t in threads:
        t.start()
        time.sleep(1)
    for t in threads:
        t.join(timeout=900)
    assert all(r is not None and r.state.is_completed() for r in results), [r and r.state for r in results]

    runs = [r for r in partition_runs(partition.id) if r.id not in before]
    assert sorted(r.name for r in runs) == [f"dt={d}" for d in DATES], [(r.name, r.state_name) for r in runs]
    assert all(r.state.is_completed() for r in runs)
    # The deployment's concurrency limit of 1: no two partitions ran at the same time.
    spans = sorted((r.start_time, r.end_time) for r in runs)
    assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:])), spans

    stamps = {}
    for date, rows in zip(DATES, (6, 7, 8)):
        out = tmp_path / "enriched" / f"dt={date}"
        manifest = json.loads((out / "_manifest.json").read_text())
        assert (out / "_SUCCESS").is_file() and manifest["status"] == "succeeded"
        assert manifest["totals"]["rows"] == rows
        stamps[date] = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    # Again, after they finished: every partition is skipped, nothing new runs, nothing is rewritten.
    again = trigger_backfill(job, DATES[0], DATES[-1])
    assert again.state.is_completed(), again.state
    assert {r.id for r in partition_runs(partition.id)} == before | {r.id for r in runs}
    for date in DATES:
        out = tmp_path / "enriched" / f"dt={date}"
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps[date]


def test_late_nightly_run_processes_its_own_night(worker, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.states import Scheduled

    job = partitioned_job(tmp_path, ["2026-11-02"])
    nightly = read_deployment("nightly-enrich/nightly-enrich")
    # Scheduled for 02:30 Berlin on 3 November, but picked up only now, weeks late.
    scheduled = dt.datetime(2026, 11, 3, 1, 30, tzinfo=dt.UTC)
    with get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(
            nightly.id, parameters={"job": str(job)}, state=Scheduled(scheduled_time=scheduled)
        )
        deadline = time.monotonic() + 600
        while not run.state.is_final() and time.monotonic() < deadline:
            time.sleep(1)
            run = client.read_flow_run(run.id)
    assert run.state.is_completed(), run.state
    out = tmp_path / "enriched" / "dt=2026-11-02"
    assert (out / "_SUCCESS").is_file()
    assert sorted(p.name for p in (tmp_path / "enriched").iterdir()) == ["dt=2026-11-02"]


def test_partition_run_uses_the_job_files_storage_options(worker, s3_server, tmp_path):
    """A private endpoint (and credentials) only in the job file's storage_options, none in the
    worker's environment: the partition's run reads and writes there, and the secret stays out of
    every flow run's parameters."""
    import uuid

    import s3fs
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    assert "AWS_ENDPOINT_URL_S3" not in os.environ  # the endpoint can only come from the job file
    secret = f"CANARY-{uuid.uuid4().hex}"
    options = {
        "key": "deploy-key",
        "secret": secret,
        "client_kwargs": {"endpoint_url": s3_server.url},
        "config_kwargs": {"connect_timeout": 2, "read_timeout": 10, "retries": {"max_attempts": 2}},
    }
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(**options)
    bucket = f"deploy-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    date = "2026-11-05"
    write_reviews_dataset(
        f"s3://{bucket}/raw/dt={date}", files=1, rows_per_file=4, rows_per_group=2, storage_options=options
    )
    job = tmp_path / "job.yaml"
    job.write_text(
        json.dumps(
            {
                "name": "private-endpoint",
                "input": f"s3://{bucket}/raw",
                "output": f"s3://{bucket}/enriched",
                "task": "embed",
                "id_column": "review_id",
                "device": "cpu",
                "storage_options": options,
            }
        )
    )

    run = run_deployment(
        "enrich-partition/enrich-partition",
        parameters={"job": str(job), "date": date},
        timeout=600,
        poll_interval=1,
        as_subflow=False,
    )
    assert run.state.is_completed(), run.state
    fs.invalidate_cache()
    assert fs.exists(f"{bucket}/enriched/dt={date}/_SUCCESS")
    assert len(fs.glob(f"{bucket}/enriched/dt={date}/part-*.parquet")) == 1

    with get_client(sync_client=True) as client:
        runs = read_all(client.read_flow_runs)
    subflows = [
        r
        for r in runs
        if r.parent_task_run_id
        and r.parameters.get("job", {}) != {}
        and isinstance(r.parameters["job"], dict)
        and r.parameters["job"].get("name") == "private-endpoint"
    ]
    assert subflows, "the enrich subflow ran"
    assert all(secret not in repr(r.parameters) for r in runs)
