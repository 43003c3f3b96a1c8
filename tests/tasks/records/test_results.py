"""Shard results: the row ids they carry stay opaque to Prefect, and duplicates are counted right."""

from __future__ import annotations

import pickle

import pyarrow as pa
from prefect.utilities.collections import visit_collection

from shardwise.tasks.output.manifest import count_duplicate_ids
from shardwise.tasks.records.results import RowIds, ShardResult


def result(index: int, ids, status: str = "committed") -> ShardResult:
    return ShardResult(
        index=index,
        shard_id=f"s{index}",
        name=f"shard-{index:05d}",
        source="x.parquet",
        status=status,
        rows=len(ids),
        ids=RowIds(ids),
    )


def test_prefect_does_not_walk_row_ids():
    # Prefect visits every task parameter for futures; a run's ids as Python lists made that seconds
    # of work per task at 50,000 rows (commit and report took 1.3 s and 2.2 s of the run's fixed cost).
    results = [result(i, pa.array([f"id-{i}-{j}" for j in range(5_000)])) for i in range(4)]
    visited = []
    visit_collection(results, lambda x: visited.append(x) or x, return_data=False)
    assert len(visited) < 500  # the results' own fields, not 20,000 ids


def test_duplicates_counted_across_shards_and_within():
    results = [
        result(0, pa.array(["a", "b", "a"])),
        result(1, pa.array(["b", "c"])),
        result(2, pa.array(["a"]), status="failed"),
    ]
    assert count_duplicate_ids(results) == 2  # the second "a" in shard 0 and "b" again in shard 1


def test_duplicates_counted_when_id_types_differ_between_files():
    results = [result(0, pa.array([1, 2])), result(1, pa.array(["1", "2", "2"]))]
    assert count_duplicate_ids(results) == 1


def test_null_ids_count_as_one_value():
    assert count_duplicate_ids([result(0, pa.array([None, None, "a"]))]) == 1


def test_row_ids_survive_pickling_and_leave_the_result_dict():
    shard = result(0, pa.chunked_array([pa.array(["a", "b"])]))
    again = pickle.loads(pickle.dumps(shard))  # worker processes and Ray send results back pickled
    assert again.ids.to_pylist() == ["a", "b"] and len(again.ids) == 2
    assert "ids" not in shard.to_dict()
