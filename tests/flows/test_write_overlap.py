"""Two shards in flight in one process: a shard's write runs while the next shard computes, the
compute of two shards never overlaps, the rows are those of one shard in flight, and the run
reports the write time hidden behind compute."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.config.loading import build_config
from shardwise.tasks.records.demo_data import write_reviews_dataset

pytestmark = pytest.mark.slow

SHARDS = 8


def job(tmp_path: Path, output: str, **overrides) -> JobConfig:
    return JobConfig(
        input=str(tmp_path / "in"),
        output=str(tmp_path / output),
        task="embed",
        embed={"model": "dummy:bert-tiny"},
        id_column="review_id",
        rows_per_shard=300,
        device="cpu",
        **overrides,
    )


@pytest.fixture
def reviews(tmp_path: Path) -> Path:
    write_reviews_dataset(str(tmp_path / "in"), files=SHARDS, rows_per_file=300, rows_per_group=100)
    return tmp_path / "in"


def run_enrich(cfg: JobConfig) -> dict:
    from shardwise.flows.enrich import enrich_for

    state = enrich_for(cfg)(job=cfg.public_dict(), return_state=True)
    assert state.is_completed(), state.message
    return state.result()


def run_shard_tasks(cfg: JobConfig) -> list:
    """The flow's shard task over every shard, on the task runner the job gets; the results back."""
    from prefect import flow, unmapped

    from shardwise.tasks.orchestration.steps import process_shard
    from shardwise.tasks.orchestration.task_runners import shard_task_runner
    from shardwise.tasks.planning.shards import plan_shards

    @flow(name="shard-tasks", task_runner=shard_task_runner(cfg))
    def shard_tasks() -> list:
        shards = plan_shards(cfg).shards
        lineage = {"config_fingerprint": cfg.output_fingerprint()}
        return [f.result() for f in process_shard.map(shards, unmapped(cfg), unmapped(lineage), unmapped(cfg.output))]

    return shard_tasks()


def output_rows(output: Path) -> pa.Table:
    """Every part's rows sorted by id, without the parts' metadata (it holds write times)."""
    table = pa.concat_tables(pq.read_table(p) for p in sorted(output.glob("part-*.parquet")))
    return table.sort_by("review_id").replace_schema_metadata(None)


def test_a_write_runs_while_the_next_shard_computes(prefect_server, reviews, tmp_path):
    one = run_shard_tasks(job(tmp_path, "one", shards_in_flight=1))
    two = run_shard_tasks(job(tmp_path, "two", shards_in_flight=2))
    assert len(one) == len(two) == SHARDS

    def overlapping_writes(results) -> list[tuple[str, str]]:
        return [
            (w.name, c.name)
            for w in results
            for c in results
            if w is not c
            and w.timings.write_started_at < c.timings.compute_ended_at
            and c.timings.compute_started_at < w.timings.write_ended_at
        ]

    for results in (one, two):
        for r in results:
            t = r.timings
            assert 0 < t.compute_started_at <= t.compute_ended_at <= t.write_started_at < t.write_ended_at, r.name
        # Compute is serialized (the device lock, the compute thread): no two shards' spans overlap.
        spans = sorted((r.timings.compute_started_at, r.timings.compute_ended_at) for r in results)
        assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:])), spans
    assert overlapping_writes(one) == []
    assert overlapping_writes(two), [(r.name, r.timings) for r in two]

    rows = output_rows(tmp_path / "one")
    assert rows.num_rows == SHARDS * 300
    assert output_rows(tmp_path / "two").equals(rows)  # same values, bit for bit


def test_the_run_reports_write_time_hidden_behind_compute(prefect_server, reviews, tmp_path):
    from mlflow.tracking import MlflowClient

    from shardwise.tasks.storage.local_state import tracking_uri

    two = run_enrich(build_config(overrides=job(tmp_path, "two").public_dict(), set_options=["shards_in_flight=2"]))
    one = run_enrich(job(tmp_path, "one"))  # the CPU default: one shard in flight
    assert two["timings"]["seconds_write_hidden"] > 0
    assert one["timings"]["seconds_write_hidden"] == 0
    metrics = MlflowClient(tracking_uri()).get_run(two["mlflow_run_id"]).data.metrics
    assert metrics["seconds_write_hidden"] == pytest.approx(two["timings"]["seconds_write_hidden"])
    assert output_rows(tmp_path / "two").equals(output_rows(tmp_path / "one"))
