import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.errors import StorageError
from tasks.job_config import JobConfig
from tasks.planning import plan_shards
from tasks.shard_io import read_part_lineage, read_shard, write_part
from tasks.storage import check_writable, join


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
    assert read_part_lineage(part.uri) == {"mlflow_run_id": "abc", "source": shard.source}


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
