"""Exactly-once outputs under SIGKILL, on local disk and on a real S3 API; storage outages; bad files.

Runs report to the session's Prefect server, with real models. A run is killed at a named crash
point (``SHARDWISE_CRASH_AT``), then rerun; the final output must equal an uninterrupted run's.
Killed runs, their reruns and the run that loses its storage are the real console script in a
subprocess; the others run the command in the test process (tests/cli.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from shardwise.tasks.records.demo_data import write_reviews_dataset

pytestmark = pytest.mark.slow

SHARDWISE = str(Path(sys.executable).with_name("shardwise"))
JOB = [
    "--task",
    "both",
    "--id-column",
    "review_id",
    "--rows-per-shard",
    "3",
    "--max-new-tokens",
    "2",
    "--prompt-template",
    "Summarise: {text}",
]


def shardwise(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SHARDWISE, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


class Storage:
    """Local or S3 paths plus the reads a test needs, through the same fsspec calls."""

    def __init__(self, root: str, fs=None) -> None:
        self.root, self.fs = root, fs

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def listdir(self, name: str) -> list[str]:
        if self.fs is None:
            directory = Path(self.path(name))
            return sorted(p.name for p in directory.iterdir()) if directory.exists() else []
        self.fs.invalidate_cache()
        target = self.path(name).removeprefix("s3://")
        return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(target)) if self.fs.exists(target) else []

    def read_output(self, name: str) -> pl.DataFrame:
        parts = [p for p in self.listdir(name) if p.startswith("part-")]
        tables = []
        for part in parts:
            uri = self.path(f"{name}/{part}")
            if self.fs is None:
                tables.append(pl.from_arrow(pq.read_table(uri)))
            else:
                with self.fs.open(uri.removeprefix("s3://"), "rb") as handle:
                    tables.append(pl.from_arrow(pq.read_table(handle)))
        return pl.concat(tables).sort("review_id")


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path, prefect_server):
    if request.param == "local":
        store = Storage(str(tmp_path))
        write_reviews_dataset(store.path("in"), files=2, rows_per_file=6, rows_per_group=3)
    else:
        fs, bucket = request.getfixturevalue("s3")
        store = Storage(f"s3://{bucket}", fs)
        from shardwise.tasks.storage.fs import runtime_storage_options

        write_reviews_dataset(
            store.path("in"), files=2, rows_per_file=6, rows_per_group=3, storage_options=runtime_storage_options()
        )
    return store


def run_job(store: Storage, output: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return shardwise("run", "--input", store.path("in"), "--output", store.path(output), *JOB, env=env)


# In the order a run reaches them: one output is killed at each in turn (2 files of 6 rows, 4 shards).
CRASH_POINTS = ["shard-compute:2", "part-write:3", "before-manifest", "before-success"]


@pytest.fixture(scope="module")
def uninterrupted_output(prefect_server, tmp_path_factory) -> pl.DataFrame:
    """One uninterrupted run on local disk: the rows every killed-then-rerun output must equal, on
    either storage (the rows do not depend on where they are stored, so one reference serves both)."""
    store = Storage(str(tmp_path_factory.mktemp("uninterrupted")))
    write_reviews_dataset(store.path("in"), files=2, rows_per_file=6, rows_per_group=3)
    reference = run_job(store, "reference")  # a process of its own, as each killed run and rerun is
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = store.read_output("reference")
    assert expected.height == 12 and expected["review_id"].n_unique() == 12
    return expected


def test_sigkill_anywhere_then_rerun_gives_the_uninterrupted_output(storage, uninterrupted_output):
    """SIGKILLed at each crash point in turn on one output: every run after the first starts from
    what the last kill left (resume, debris, a stale lease) and is killed at the next point, and
    the run after the last kill completes. The output equals the uninterrupted run's."""
    expected = uninterrupted_output
    for point in CRASH_POINTS:
        killed = run_job(storage, "out", env={"SHARDWISE_CRASH_AT": point})
        assert killed.returncode == -signal.SIGKILL, (point, killed.returncode, killed.stderr[-2000:])
        assert "_SUCCESS" not in storage.listdir("out"), point

    rerun = run_job(storage, "out")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    files = storage.listdir("out")
    assert "_SUCCESS" in files and "_manifest.json" in files, files
    assert not [f for f in files if f.startswith(".tmp-") or f == "_staging"], files  # no debris
    got = storage.read_output("out")
    assert got["review_id"].to_list() == expected["review_id"].to_list()  # none lost, none twice
    assert got.equals(expected)


def test_corrupt_file_fails_only_its_shards_and_a_rerun_finishes_the_rest(cli, tmp_path):
    source = tmp_path / "in"
    write_reviews_dataset(str(source), files=3, rows_per_file=6, rows_per_group=3)
    good_copy = (source / "reviews-001.parquet").read_bytes()
    (source / "reviews-001.parquet").write_bytes(good_copy[: len(good_copy) // 2])  # truncated upload
    output = tmp_path / "out"
    job = [
        "run",
        "--input",
        str(source),
        "--output",
        str(output),
        "--task",
        "embed",
        "--id-column",
        "review_id",
        "--rows-per-shard",
        "3",
    ]
    failed = cli(*job)
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert "Traceback" not in failed.stderr
    assert "status           FAILED" in failed.stdout
    assert "reviews-001.parquet" in failed.stdout and "truncated" in failed.stdout
    assert not (output / "_SUCCESS").exists()
    parts_before = {p.name: p.stat().st_mtime_ns for p in output.glob("part-*.parquet")}
    assert len(parts_before) == 4  # both good files committed
    manifest = json.loads((output / "_manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["unreadable_files"][0]["uri"].endswith("reviews-001.parquet")
    # The Prefect run says so too: failed state, and the summary artifact names the file and why.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(manifest["prefect_flow_run_id"])
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
        )
    assert flow_run.state.is_failed() and "1 input files unreadable" in flow_run.state.message
    summary = next(a for a in artifacts if a.key == "run-summary").data
    assert "FAILED" in summary and "## Failed shards" in summary and "reviews-001.parquet" in summary

    (source / "reviews-001.parquet").write_bytes(good_copy)
    fixed = cli(*job)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert "resuming: 4 of 6 shards already committed" in fixed.stderr
    parts_after = {p.name: p.stat().st_mtime_ns for p in output.glob("part-*.parquet")}
    assert {k: parts_after[k] for k in parts_before} == parts_before  # committed parts untouched
    df = pl.read_parquet(output / "part-*.parquet")
    assert df.height == 18 and df["review_id"].n_unique() == 18


def test_duplicate_ids_are_processed_counted_and_reported(cli, tmp_path):
    import pyarrow as pa

    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "a", "c", "a"], "text": ["one", "two", "three", "four", "five"]}), source)
    output = tmp_path / "out"
    proc = cli("run", "--input", str(source), "--output", str(output), "--task", "embed")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 duplicate ids" in proc.stdout
    assert json.loads((output / "_manifest.json").read_text())["totals"]["duplicate_ids"] == 2
    assert pl.read_parquet(output / "part-*.parquet").height == 5


def test_storage_outage_fails_in_bounded_time_and_a_rerun_completes(cli, s3, s3_server, tmp_path):
    """The network to S3 is cut once the first part is published: the shard that fails next finds
    the output's storage gone too, so no further shard starts (none could be published) and the
    run ends with exit 3 naming the storage; the rerun, in this process, completes the output."""
    from shardwise.tasks.storage.fs import runtime_storage_options

    fs, bucket = s3
    write_reviews_dataset(
        f"s3://{bucket}/in", files=2, rows_per_file=6, rows_per_group=3, storage_options=runtime_storage_options()
    )
    args = [
        "run",
        "--input",
        f"s3://{bucket}/in",
        "--output",
        f"s3://{bucket}/out",
        "--task",
        "generate",
        "--id-column",
        "review_id",
        "--rows-per-shard",
        "3",
        "--max-new-tokens",
        "8",
        "--set",
        "shard_retries=1",
    ]
    proc = subprocess.Popen([SHARDWISE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # wait for the first committed part, then cut the network
            fs.invalidate_cache()
            # glob, not exists()+ls(): the run's write probe comes and goes between the two calls
            if fs.glob(f"{bucket}/out/part-*.parquet"):
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        s3_server.cut()
        cut_at = time.monotonic()
        stdout, stderr = proc.communicate(timeout=240)
        elapsed = time.monotonic() - cut_at
    finally:
        s3_server.restore()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, (proc.returncode, stderr[-3000:])
    assert elapsed < 180, elapsed
    error_lines = [line for line in stderr.splitlines() if line.startswith("shardwise: error:")]
    assert len(error_lines) == 1, (stdout, stderr[-3000:])
    assert "stopped starting shards: cannot read s3://" in error_lines[0], error_lines
    assert re.search(r"; [12] shard\(s\) not started, [12] of 4 committed", error_lines[0]), error_lines

    rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    fs.invalidate_cache()
    assert fs.exists(f"{bucket}/out/_SUCCESS")
    ids = []
    for part in fs.glob(f"{bucket}/out/part-*.parquet"):
        with fs.open(part, "rb") as handle:
            ids += pq.read_table(handle, columns=["review_id"]).column(0).to_pylist()
    assert sorted(ids) == [f"r-{i:06d}" for i in range(12)]
