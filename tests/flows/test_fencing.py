"""Fencing: a run that lost the output's lease publishes nothing, whatever its processes do later.

Real processes throughout, since what is tested is processes outliving their run: worker processes
orphaned by a SIGKILLed parent, and a whole run paused (SIGSTOP) past its lease timeout while
another run takes the output over and publishes. Afterwards the output must hold exactly the parts
its manifest lists, readable as one table, and ``shardwise status`` must say so.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from shardwise.tasks.records.demo_data import write_reviews_dataset
from tests.flows.test_integrity import SHARDWISE, shardwise
from tests.flows.test_output_safety import wait_for

pytestmark = pytest.mark.slow

# Two configs with different columns: run 1 keeps the input's columns, run 2 only the id. Parts of
# both under one _SUCCESS would not even read as one table.
EMBED = ["--task", "embed", "--id-column", "review_id", "--rows-per-shard", "3", "--set", "lease_timeout_s=3"]
ID_ONLY = ["--keep-columns", "id", "--overwrite"]


def footer_run(part: Path) -> str:
    return pq.read_schema(part).metadata[b"shardwise.prefect_flow_run_id"].decode()


def late_parts(out: Path, flow_run_id: str) -> int:
    """Parts written by the run ``flow_run_id``, anywhere under ``out`` (staged or at the root)."""
    written = 0
    for part in [*out.glob("part-*.parquet"), *out.glob("_staging/*/part-*.parquet")]:
        try:
            written += footer_run(part) == flow_run_id
        except (FileNotFoundError, OSError):
            pass  # moved or replaced while listed
    return written


def assert_only_the_publishing_run(out: Path) -> None:
    """The parts at the root are exactly the manifest's, all written by the run it describes."""
    manifest = json.loads((out / "_manifest.json").read_text())
    parts = sorted(p.name for p in out.glob("part-*.parquet"))
    assert parts == sorted(manifest["parts"]), (parts, manifest["parts"])
    assert {footer_run(out / p) for p in parts} == {manifest["prefect_flow_run_id"]}
    table = pl.read_parquet(str(out / "part-*.parquet"))  # one schema: readable as one table
    assert table.columns == ["review_id", "embedding", "truncated", "error"], table.columns
    assert sorted(table["review_id"]) == [f"r-{i:06d}" for i in range(6)]
    status = shardwise("status", str(out))
    assert status.returncode == 0, status.stdout + status.stderr
    assert "unlisted" not in status.stdout and "replaced" not in status.stdout


def test_orphaned_workers_of_a_killed_run_never_publish_after_a_newer_run(prefect_server, tmp_path):
    write_reviews_dataset(str(tmp_path / "in"), files=1, rows_per_file=6, rows_per_group=3)
    job = ["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), *EMBED]
    out, late = tmp_path / "out", tmp_path / "release-late-workers"

    # Run 1, two worker processes: each hangs half-way through its part; the parent is SIGKILLed,
    # leaving its workers behind (in its own session, so the test can end them). Its output goes
    # to a file: the orphaned workers keep inherited pipes open after the kill.
    with open(tmp_path / "first.log", "w") as first_log:
        first = subprocess.Popen(
            [SHARDWISE, *job, "--workers", "2"],
            stdout=first_log,
            stderr=first_log,
            start_new_session=True,
            env={**os.environ, "SHARDWISE_HANG_AT": "part-write", "SHARDWISE_HANG_UNTIL": str(late)},
        )
    try:
        wait_for(Path(f"{late}.reached"), first)
        first.kill()
        first.wait(timeout=60)
        killed_lease = json.loads((out / "_shardwise.lease").read_text())

        # Run 2, another config, takes the output over and publishes it.
        second = shardwise(*job, *ID_ONLY)
        assert second.returncode == 0, second.stderr[-3000:]
        assert "taking over the lease" in second.stderr, second.stderr[-3000:]
        published = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

        # Now the late workers of run 1 finish their parts: staged under run 1's fence, never at the root.
        late.touch()
        deadline = time.monotonic() + 300
        while late_parts(out, killed_lease["flow_run_id"]) < 2:
            assert time.monotonic() < deadline, "the late workers never wrote"
            time.sleep(0.2)
    finally:
        late.touch()
        try:
            os.killpg(first.pid, signal.SIGKILL)  # the orphaned workers of run 1
        except ProcessLookupError:
            pass
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == published
    assert_only_the_publishing_run(out)
    assert json.loads(published["_manifest.json"])["lease_epoch"] == killed_lease["epoch"] + 1

    # The next run finds the output published as it would publish it: nothing changes but the
    # dead run's staged parts, which it removes.
    third = shardwise(*job, "--keep-columns", "id")
    assert third.returncode == 0, third.stderr[-3000:]
    assert "nothing to do" in third.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == published
    assert not (out / "_staging").exists()


def test_a_run_paused_past_its_lease_publishes_nothing_when_it_resumes(prefect_server, tmp_path):
    write_reviews_dataset(str(tmp_path / "in"), files=1, rows_per_file=6, rows_per_group=3)
    job = ["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), *EMBED]
    out, go = tmp_path / "out", tmp_path / "go"

    first = subprocess.Popen(
        [SHARDWISE, *job],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "SHARDWISE_HANG_AT": "shard-compute", "SHARDWISE_HANG_UNTIL": str(go)},
    )
    try:
        wait_for(Path(f"{go}.reached"), first)
        first.send_signal(signal.SIGSTOP)  # the whole run: its shard, its flow and its lease renewal
        go.touch()  # seen only once it runs again
        time.sleep(4)  # past lease_timeout_s

        second = shardwise(*job, *ID_ONLY)
        assert second.returncode == 0, second.stderr[-3000:]
        assert "stopped renewing it" in second.stderr, second.stderr[-3000:]
        published = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

        first.send_signal(signal.SIGCONT)  # it computes its shards and tries to publish them
        stdout, stderr = first.communicate(timeout=600)
    finally:
        go.touch()
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == published
    assert_only_the_publishing_run(out)
    assert first.returncode == 3, (first.returncode, stderr[-3000:])
    assert "no longer holds the lease" in stderr, stderr[-3000:]
