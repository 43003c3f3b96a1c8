"""A run's and a shard's cost in the figures MLflow and the summary get: device-hours, plus the
tokens of the sections a serving endpoint ran at the job's per-token prices."""

from __future__ import annotations

import pytest

from shardwise.tasks.config.prices import Price
from shardwise.tasks.records.results import RunTotals, ShardResult, ShardTimings, TokenCounts
from shardwise.tasks.tracking.runs import run_metrics, shard_metrics

ENDPOINT = Price(
    "endpoint:127.0.0.1:8000",
    0.0,
    endpoint_roles=("generate",),
    per_million_input_tokens=0.5,
    per_million_output_tokens=2.0,
    batch_discount=0.5,
)


def _totals() -> RunTotals:
    return RunTotals(
        shards=1, committed=1, rows=10, rows_computed=10, prompt_tokens=3_000_000, generated_tokens=1_000_000,
        prompt_tokens_computed=3_000_000, generated_tokens_computed=1_000_000, device_seconds=3600.0,
    )  # fmt: skip


def test_an_endpoint_runs_cost_is_its_tokens_and_its_cost_per_million_tokens_is_logged():
    metrics = run_metrics(_totals(), 3600.0, ENDPOINT, 0)
    # (3M in * 0.5 + 1M out * 2.0) / 1M, half off; an endpoint's hours cost nothing
    assert metrics["cost"] == pytest.approx(1.75)
    assert (metrics["token_cost"], metrics["device_cost"]) == (pytest.approx(1.75), 0.0)
    assert metrics["cost_per_1m_tokens"] == pytest.approx(1.75 / 4)
    assert (metrics["endpoint_input_tokens"], metrics["endpoint_output_tokens"]) == (3e6, 1e6)
    assert metrics["price_per_million_output_tokens"] == 2.0
    # a local run's figures stay what they are
    local = run_metrics(_totals(), 3600.0, Price("cpu", 3.6), 0)
    assert local["cost"] == pytest.approx(3.6)
    assert not {"token_cost", "device_cost", "cost_per_1m_tokens"} & local.keys()


def test_an_embedding_endpoint_bills_the_embedded_tokens_at_the_input_price():
    price = Price("cpu", 3.6, endpoint_roles=("embed",), per_million_input_tokens=1.0)
    metrics = run_metrics(_totals(), 3600.0, price, 0, embedded_tokens=2_000_000)
    assert metrics["cost"] == pytest.approx(3.6 + 2.0)  # the local generation's hour, the endpoint's tokens
    assert metrics["cost_per_1m_tokens"] == pytest.approx(5.6 / 6)


def test_a_shards_cost_counts_the_tokens_the_endpoint_processed_for_it():
    shard = ShardResult(
        index=0, shard_id="0", name="shard-0", source="x", status="committed", rows=4,
        tokens=TokenCounts(prompt=2_000_000, generated=1_000_000),
        cached_tokens=TokenCounts(prompt=1_000_000),  # rows from the row cache: not sent to the endpoint
        timings=ShardTimings(compute=10.0),
    )  # fmt: skip
    metrics = shard_metrics(shard, ENDPOINT)
    assert metrics["shard_cost"] == pytest.approx((1 * 0.5 + 1 * 2.0) / 2)
    assert metrics["shard_cost_per_1m_tokens"] == pytest.approx(1.25 / 2)
