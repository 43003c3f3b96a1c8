"""Date partitions: which night a scheduled run owns, where a partition lives, keys and completeness."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from shardwise.tasks.errors import ConfigError
from shardwise.tasks.schedule.partitions import (
    idempotency_key,
    load_job,
    nightly_date,
    partition_config,
    partition_dates,
    partition_done,
)

UTC = dt.UTC


def test_partition_dates_are_inclusive_and_checked():
    assert partition_dates("2026-02-27", "2026-03-01") == ["2026-02-27", "2026-02-28", "2026-03-01"]
    assert partition_dates("2026-11-01", "2026-11-01") == ["2026-11-01"]
    with pytest.raises(ConfigError, match="before start"):
        partition_dates("2026-11-02", "2026-11-01")
    with pytest.raises(ConfigError, match="start: expected YYYY-MM-DD"):
        partition_dates("11/02/2026", "2026-11-03")


def test_nightly_date_uses_the_schedule_timezone_not_the_clock():
    # 02:30 in Berlin on 3 November is 01:30 UTC: the run owns the night of the 2nd.
    assert nightly_date(dt.datetime(2026, 11, 3, 1, 30, tzinfo=UTC), "Europe/Berlin") == "2026-11-02"
    # 00:30 in Berlin is still the previous day in UTC: the schedule's zone decides, not UTC.
    late_evening_utc = dt.datetime(2026, 11, 2, 23, 30, tzinfo=UTC)
    assert nightly_date(late_evening_utc, "Europe/Berlin") == "2026-11-02"
    assert nightly_date(late_evening_utc, "UTC") == "2026-11-01"
    assert nightly_date(late_evening_utc, "UTC", days_back=0) == "2026-11-02"
    with pytest.raises(ConfigError, match="unknown time zone"):
        nightly_date(late_evening_utc, "Mars/Olympus")


def test_partition_paths(tmp_path):
    cfg = partition_config({"input": "s3://raw/reviews", "output": "s3://enriched/reviews/"}, "2026-11-01")
    assert cfg.input == "s3://raw/reviews/dt=2026-11-01"
    assert cfg.output == "s3://enriched/reviews/dt=2026-11-01"
    cfg = partition_config({"input": "s3://raw/{date}/*.parquet", "output": "s3://out/day={date}"}, "2026-11-01")
    assert cfg.input == "s3://raw/2026-11-01/*.parquet" and cfg.output == "s3://out/day=2026-11-01"
    with pytest.raises(ConfigError, match="expected YYYY-MM-DD"):
        partition_config({"input": "a", "output": "b"}, "yesterday")


def test_job_files_resolve_from_the_project_when_run_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a deployment's working directory is not the project
    assert load_job("conf/jobs/nightly-reviews.yaml")["name"] == "nightly-reviews"
    with pytest.raises(ConfigError, match="config file not found"):
        load_job("conf/jobs/missing.yaml")


def test_idempotency_keys_name_one_partition_config_and_attempt():
    a = partition_config({"input": "/raw", "output": "/out", "task": "embed"}, "2026-11-01")
    b = partition_config({"input": "/raw", "output": "/out", "task": "embed"}, "2026-11-02")
    c = partition_config(
        {"input": "/raw", "output": "/out", "task": "embed", "embed": {"model": "other"}}, "2026-11-01"
    )
    key = idempotency_key("enrich-partition/enrich-partition", a, "2026-11-01")
    assert key == idempotency_key("enrich-partition/enrich-partition", a, "2026-11-01")
    others = {
        idempotency_key("enrich-partition/enrich-partition", b, "2026-11-02"),
        idempotency_key("enrich-partition/enrich-partition", c, "2026-11-01"),
        idempotency_key("enrich-partition/enrich-partition", a, "2026-11-01", attempt=2),
    }
    assert key not in others and len(others) == 3


def test_partition_done_needs_success_and_the_same_config(tmp_path):
    cfg = partition_config(
        {"input": str(tmp_path / "raw"), "output": str(tmp_path / "out"), "task": "embed"}, "2026-11-01"
    )
    (tmp_path / "raw" / "dt=2026-11-01").mkdir(parents=True)  # an empty partition, processed as such
    out = tmp_path / "out" / "dt=2026-11-01"
    out.mkdir(parents=True)
    (out / "_manifest.json").write_text(json.dumps({"config_fingerprint": cfg.output_fingerprint(), "input": []}))
    assert not partition_done(cfg)  # no _SUCCESS yet
    (out / "_SUCCESS").write_text("{}")
    assert partition_done(cfg)
    other = cfg.model_copy(update={"task": "both"})
    assert not partition_done(other)  # complete, but with another config: must be recomputed


def test_partition_done_needs_the_input_files_it_was_made_from(tmp_path):
    from shardwise.tasks.planning.shards import plan_shards
    from shardwise.tasks.records.demo_data import write_reviews_dataset

    cfg = partition_config(
        {"input": str(tmp_path / "raw"), "output": str(tmp_path / "out"), "task": "embed", "id_column": "review_id"},
        "2026-11-01",
    )
    raw = tmp_path / "raw" / "dt=2026-11-01"
    write_reviews_dataset(str(raw), files=2, rows_per_file=4, rows_per_group=2)
    out = tmp_path / "out" / "dt=2026-11-01"
    out.mkdir(parents=True)

    def record_run() -> None:  # what a successful run leaves: the manifest's input list, then _SUCCESS
        files = plan_shards(cfg).to_dict()["files"]
        (out / "_manifest.json").write_text(
            json.dumps({"config_fingerprint": cfg.output_fingerprint(), "input": files})
        )
        (out / "_SUCCESS").write_text("{}")

    (raw / "reviews-001.parquet").rename(tmp_path / "late.parquet")  # half landed when it ran
    record_run()
    assert partition_done(cfg)
    (tmp_path / "late.parquet").rename(raw / "reviews-001.parquet")  # the rest lands
    assert not partition_done(cfg)
    record_run()
    assert partition_done(cfg)
    write_reviews_dataset(str(raw), files=1, rows_per_file=5, rows_per_group=2)  # reviews-000 rewritten
    assert not partition_done(cfg)
    record_run()
    (raw / "reviews-001.parquet").unlink()  # a file withdrawn
    assert not partition_done(cfg)
    for path in raw.iterdir():
        path.unlink()
    raw.rmdir()  # the whole partition gone: nothing proves the output matches it
    assert not partition_done(cfg)
