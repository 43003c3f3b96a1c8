import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.errors import StorageError
from shardwise.tasks.planning.shards import plan_shards
from shardwise.tasks.records.shard_io import read_part_lineage, read_shard, write_part
from shardwise.tasks.storage.fs import check_writable, join


def test_read_shard_returns_exactly_its_rows(reviews_dir):
    plan = plan_shards(JobConfig(input=str(reviews_dir), output="x", id_column="review_id", rows_per_shard=3))
    ids = []
    for shard in plan.shards:
        table = read_shard(shard, ["review_id"])
        assert table.num_rows == shard.num_rows
        ids += table.column("review_id").to_pylist()
    assert ids == [f"r-{i:06d}" for i in range(30)]


def test_write_part_is_atomic_and_carries_lineage(reviews_dir, tmp_path):
    plan = plan_shards(JobConfig(input=str(reviews_dir), output="x", id_column="review_id"))
    shard = plan.shards[0]
    table = read_shard(shard, None)
    out = tmp_path / "out"
    part = write_part(table, str(out), shard, {"mlflow_run_id": "abc", "source": shard.source})
    assert os.listdir(out) == [shard.part_name]  # no temporary file left behind
    assert pq.read_table(part.uri).num_rows == shard.num_rows == part.rows
    lineage = read_part_lineage(part.uri)
    assert lineage.pop("part_write_id") == part.write_id and len(part.write_id) == 32
    assert lineage == {"mlflow_run_id": "abc", "source": shard.source}


def test_join_refuses_names_that_escape_the_root():
    assert join("s3://b/out", "part-1.parquet") == "s3://b/out/part-1.parquet"
    for bad in ["..", "../x", "a/b", "", "."]:
        with pytest.raises(StorageError):
            join("/tmp/out", bad)


def test_unwritable_output_fails_early(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="not writable"):
        check_writable(str(blocker / "out"))
    check_writable(str(tmp_path / "fine"))
    assert os.listdir(tmp_path / "fine") == []


def test_corrupt_data_pages_fail_the_shard_naming_the_file(tmp_path):
    from shardwise.tasks.errors import InputError

    path = tmp_path / "in" / "pages.parquet"
    path.parent.mkdir()
    texts = [f"review number {i} " * 20 for i in range(200)]
    pq.write_table(pa.table({"id": list(range(200)), "text": texts}), path, compression="snappy")
    raw = bytearray(path.read_bytes())
    for offset in range(200, 2200):  # scribble over the first data pages, keep the footer intact
        raw[offset] = 0xAB
    path.write_bytes(bytes(raw))
    plan = plan_shards(JobConfig(input=str(path.parent), output="x"))  # the footer still plans
    with pytest.raises(InputError, match=r"pages\.parquet: corrupt Parquet data"):
        read_shard(plan.shards[0], None)


def test_a_storage_failure_mid_read_is_a_storage_error_not_bad_data(tmp_path):
    from shardwise.tasks.records.shard_io import _StorageReads

    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": list(range(1000))}), path)

    class FlakyFile:
        def __init__(self) -> None:
            self.handle, self.reads = open(path, "rb"), 0

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def read(self, *args):
            self.reads += 1
            if self.reads > 1:
                raise ConnectionResetError("connection reset by peer")
            return self.handle.read(*args)

    with pytest.raises(StorageError, match="connection reset by peer"):
        pq.ParquetFile(_StorageReads(FlakyFile(), str(path))).read()
