"""Shard results: the row ids they carry stay opaque to Prefect, duplicates are counted right, and the
flat record a result writes (``to_dict``) keeps its keys and reads back whole (``from_dict``)."""

from __future__ import annotations

import json
import pickle

import pyarrow as pa
from prefect.utilities.collections import visit_collection

from shardwise.tasks.output.manifest import count_duplicate_ids
from shardwise.tasks.records.results import (
    PartInfo,
    RowIds,
    ShardResult,
    ShardTimings,
    TokenCounts,
    WorkerInfo,
)


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


# The flat record's keys, in order: shard records, MLflow and existing outputs read these names.
FLAT_KEYS = [
    "index",
    "shard_id",
    "name",
    "source",
    "status",
    "rows",
    "error_rows",
    "truncated_rows",
    "prompt_tokens",
    "generated_tokens",
    "embedded_tokens",
    "schema_valid_rows",
    "rows_cached",
    "cached_prompt_tokens",
    "cached_generated_tokens",
    "cached_embedded_tokens",
    "seconds_read",
    "seconds_wait",
    "seconds_compute",
    "seconds_write",
    "part_uri",
    "part_bytes",
    "part_sha256",
    "part_write_id",
    "device",
    "models",
    "error",
    "finished_at",
    "compute_started_at",
    "compute_ended_at",
    "write_started_at",
    "write_ended_at",
    "energy_j",
    "resumed",
    "worker",
    "model_loads",
    "quality",
]


def full_result() -> ShardResult:
    """A committed result with every figure set, each to a value of its own."""
    return ShardResult(
        index=3,
        shard_id="s3",
        name="shard-00003",
        source="in/x.parquet",
        status="committed",
        rows=100,
        error_rows=2,
        truncated_rows=1,
        schema_valid_rows=97,
        rows_cached=40,
        tokens=TokenCounts(prompt=1000, generated=500, embedded=300),
        cached_tokens=TokenCounts(prompt=400, generated=200, embedded=120),
        timings=ShardTimings(
            read=0.5,
            wait=0.25,
            compute=3.0,
            write=0.75,
            compute_started_at=1000.0,
            compute_ended_at=1003.0,
            write_started_at=1003.0,
            write_ended_at=1003.75,
        ),
        part=PartInfo(uri="file:///out/part-00003.parquet", bytes=4096, sha256="ab" * 32, write_id="w1"),
        worker=WorkerInfo(name="worker 1", device="cuda:0", model_loads={"bundled:m": 1}, energy_j=12.5),
        models={"generate": {"spec": "bundled:m", "device": "cuda:0"}},
        error=None,
        finished_at=1003.75,
        resumed=False,
        quality={"answered": 98, "generated_tokens": {"mean": 5.0}},
        ids=RowIds(["a", "b"]),
    )


def test_flat_record_keeps_its_keys_and_values():
    record = full_result().to_dict()
    assert list(record) == FLAT_KEYS
    assert record == {
        "index": 3,
        "shard_id": "s3",
        "name": "shard-00003",
        "source": "in/x.parquet",
        "status": "committed",
        "rows": 100,
        "error_rows": 2,
        "truncated_rows": 1,
        "prompt_tokens": 1000,
        "generated_tokens": 500,
        "embedded_tokens": 300,
        "schema_valid_rows": 97,
        "rows_cached": 40,
        "cached_prompt_tokens": 400,
        "cached_generated_tokens": 200,
        "cached_embedded_tokens": 120,
        "seconds_read": 0.5,
        "seconds_wait": 0.25,
        "seconds_compute": 3.0,
        "seconds_write": 0.75,
        "part_uri": "file:///out/part-00003.parquet",
        "part_bytes": 4096,
        "part_sha256": "ab" * 32,
        "part_write_id": "w1",
        "device": "cuda:0",
        "models": {"generate": {"spec": "bundled:m", "device": "cuda:0"}},
        "error": None,
        "finished_at": 1003.75,
        "compute_started_at": 1000.0,
        "compute_ended_at": 1003.0,
        "write_started_at": 1003.0,
        "write_ended_at": 1003.75,
        "energy_j": 12.5,
        "resumed": False,
        "worker": "worker 1",
        "model_loads": {"bundled:m": 1},
        "quality": {"answered": 98, "generated_tokens": {"mean": 5.0}},
    }


def test_a_failed_result_without_a_part_flattens_to_the_defaults():
    failed = ShardResult(index=1, shard_id="s1", name="shard-00001", source="x", status="failed", error="boom")
    record = failed.to_dict()
    assert list(record) == FLAT_KEYS
    assert record["part_uri"] is None and record["part_bytes"] == 0 and record["part_sha256"] is None
    assert record["part_write_id"] is None and record["device"] is None and record["worker"] is None
    assert record["model_loads"] == {} and record["energy_j"] is None and record["seconds_compute"] == 0.0


def test_from_dict_reads_the_flat_record_back():
    for original in (
        full_result(),
        ShardResult(index=1, shard_id="s1", name="shard-00001", source="x", status="failed", error="boom"),
    ):
        record = original.to_dict()
        again = ShardResult.from_dict(json.loads(json.dumps(record)))  # as read back from a JSON file
        assert again == original
        assert again.to_dict() == record
        assert len(again.ids) == 0  # the record holds no row ids


def test_the_flat_record_is_a_copy():
    original = full_result()
    record = original.to_dict()
    record["models"]["generate"]["spec"] = "changed"
    record["model_loads"]["bundled:m"] = 9
    record["quality"]["answered"] = 0
    assert original == full_result()
    again = ShardResult.from_dict(record)
    record["models"]["generate"]["spec"] = "changed again"
    assert again.models["generate"]["spec"] == "changed"


def test_derived_figures_read_the_groups():
    result = full_result()
    assert result.seconds == 0.5 + 3.0 + 0.75  # waiting for the device is not billed
    assert result.rows_computed == 60
    assert result.tokens - result.cached_tokens == TokenCounts(prompt=600, generated=300, embedded=180)
    assert result.part is not None and result.part.name == "part-00003.parquet"
