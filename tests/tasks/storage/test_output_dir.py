"""OutputDir: literal listing, own-part proof, overlap checks and the lease, on disk and on S3."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardwise.tasks.errors import ConfigError, LeaseLost
from shardwise.tasks.storage.fs import atomic_write_bytes
from shardwise.tasks.storage.lease import Fence
from shardwise.tasks.storage.locations import check_separate
from shardwise.tasks.storage.output_dir import OutputDir
from shardwise.tasks.storage.output_layout import LEASE_NAME, MANIFEST_NAME, part_name


def _part(shard_id: str | None) -> bytes:
    table = pa.table({"x": [1]})
    if shard_id is not None:
        table = table.replace_schema_metadata({b"shardwise.shard_id": shard_id.encode()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def test_only_parts_proven_by_name_and_footer_are_removed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    own = part_name("in-0000000000-0123456789")
    (out / own).write_bytes(_part("in-0000000000-0123456789"))
    (out / part_name("in-0000000003-abcdefabcd")).write_bytes(_part("someone-else"))  # footer disagrees
    (out / "part-00000-1b2c-c000.snappy.parquet").write_bytes(_part(None))
    (tmp_path / "out1").mkdir()
    (tmp_path / "out1" / own).write_bytes(_part("in-0000000000-0123456789"))

    output = OutputDir(str(out))
    assert output.foreign_files() == ["part-00000-1b2c-c000.snappy.parquet", part_name("in-0000000003-abcdefabcd")]
    assert output.remove_own_parts() == [own]
    assert sorted(os.listdir(out)) == sorted(
        ["part-00000-1b2c-c000.snappy.parquet", part_name("in-0000000003-abcdefabcd")]
    )
    assert (tmp_path / "out1" / own).exists()
    assert OutputDir(str(tmp_path / "out[1]")).names() == []  # literal: not out1


def test_overlap_is_refused_literally_and_per_protocol(tmp_path):
    for source, output in [
        ("/d/in", "/d/in"),
        ("/d/in", "/d/in/out"),
        ("/d/in", "/d"),
        ("/d/in/", "/d/x/../in"),
        ("s3://b/in", "s3://b/in/o"),
        ("s3://b/in/*.parquet", "s3://b/in"),
    ]:
        with pytest.raises(ConfigError):
            check_separate(source, output, input_is_pattern="*" in source)
    for source, output in [
        ("/d/in", "/d/input"),
        ("/d/in", "/d/out"),
        ("s3://b/in", "/b/in"),
        ("s3://b/in", "s3://c/in"),
    ]:
        check_separate(source, output)


def _age_lease(output: OutputDir, seconds: float) -> None:
    data = json.loads(output.fs.cat_file(output.path_of(LEASE_NAME)))
    data["renewed_at"] -= seconds
    output.fs.pipe_file(output.path_of(LEASE_NAME), json.dumps(data).encode())


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        return OutputDir(str(tmp_path / "out"))
    fs, bucket = request.getfixturevalue("s3")
    from shardwise.tasks.storage.fs import runtime_storage_options

    return OutputDir(f"s3://{bucket}/out", runtime_storage_options())


def test_the_lease_is_exclusive_renewed_taken_over_when_stale_and_released(output, caplog):
    lease = output.acquire_lease(timeout_s=0.8, flow_run_id="run-1")
    try:
        with pytest.raises(ConfigError, match=f"pid {os.getpid()}, flow run run-1"):
            output.acquire_lease(timeout_s=0.8, flow_run_id="run-2")
        first = output.read_lease().renewed_at
        time.sleep(0.6)
        assert output.read_lease().renewed_at > first  # renewed by its thread
        output.check_fence(lease.fence)
        with pytest.raises(LeaseLost, match="no longer holds the lease"):
            output.check_fence(Fence(lease.fence.epoch, "someone-else"))
    finally:
        lease.release()
    assert output.read_lease() is None

    # A lease nobody renews (its run was killed) is taken over, with a warning, by a higher epoch;
    # from then on the old holder's fence fails every check.
    dead = output.acquire_lease(timeout_s=60, flow_run_id="killed")
    dead._stop.set()
    _age_lease(output, 120)
    with caplog.at_level(logging.WARNING, logger="shardwise.output"):
        with output.acquire_lease(timeout_s=60, flow_run_id="run-3") as taken:
            assert output.read_lease().flow_run_id == "run-3"
            assert taken.fence.epoch == dead.fence.epoch + 1
            with pytest.raises(LeaseLost, match="held by .*flow run run-3"):
                output.check_fence(dead.fence)
    assert "taking over the lease" in caplog.text and "stopped renewing" in caplog.text
    assert output.read_lease() is None

    # A fresh lease of a process of this host that is gone is taken over at once.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    orphan = output.acquire_lease(timeout_s=60, flow_run_id="killed")
    orphan._stop.set()
    data = json.loads(output.fs.cat_file(output.path_of(LEASE_NAME)))
    output.fs.pipe_file(output.path_of(LEASE_NAME), json.dumps({**data, "pid": gone.pid}).encode())
    with output.acquire_lease(timeout_s=60, flow_run_id="run-4"):
        assert output.read_lease().flow_run_id == "run-4"
    assert "whose process is gone" in caplog.text


def test_only_the_lease_holders_staged_parts_are_published_and_epochs_only_grow(output):
    name = part_name("a-0000000000-0123456789")
    first = output.acquire_lease(timeout_s=60, flow_run_id="run-1")
    first.release()
    output.write_json(MANIFEST_NAME, {"lease_epoch": first.fence.epoch})  # the lease file is gone now

    stale = Fence(first.fence.epoch, first.fence.token)
    with output.acquire_lease(timeout_s=60, flow_run_id="run-2") as lease:
        assert lease.fence.epoch == first.fence.epoch + 1  # from the manifest, not the removed lease
        for fence in (stale, lease.fence):
            atomic_write_bytes(
                f"{output.staging_uri(fence)}/{name}", _part("a-0000000000-0123456789"), output.storage_options
            )

        with pytest.raises(LeaseLost):
            output.publish_staged(stale, name)
        assert name not in output.names()

        assert output.publish_staged(lease.fence, name) == output.uri_of(name)
        assert name in output.names() and output.owns_part(name)
        assert stale.name in output.staged_fences()  # the stale run's part stays staged: never published

        assert stale.name in output.remove_staging()
        assert output.staged_fences() == [] and output.names() == sorted([LEASE_NAME, MANIFEST_NAME, name])


def test_an_interrupted_s3_upload_publishes_nothing(s3):
    from shardwise.tasks.faults import InjectedFault
    from shardwise.tasks.storage.fs import runtime_storage_options

    fs, bucket = s3
    options = {**runtime_storage_options(), "default_block_size": 5 * 2**20}
    os.environ["SHARDWISE_RAISE_AT"] = "part-write"
    try:
        with pytest.raises(InjectedFault):
            atomic_write_bytes(
                f"s3://{bucket}/out/part-x.parquet", os.urandom(11 * 2**20), options, fault_point="part-write"
            )
    finally:
        del os.environ["SHARDWISE_RAISE_AT"]
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/out/part-x.parquet")
    assert not fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads")


def test_an_input_named_like_a_glob_is_that_directory_and_a_real_glob_still_works(tmp_path):
    from shardwise.tasks.planning.shards import list_input_files

    for name in ["in[1]", "in1"]:
        (tmp_path / name).mkdir()
        pq.write_table(pa.table({"x": [1]}), tmp_path / name / f"{name}.parquet")
    assert [p.rsplit("/", 1)[-1] for p in list_input_files(str(tmp_path / "in[1]"))] == ["in[1].parquet"]
    assert [p.rsplit("/", 1)[-1] for p in list_input_files(str(tmp_path / "in?/*.parquet"))] == ["in1.parquet"]
