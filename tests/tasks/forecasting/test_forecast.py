"""The forecast's token counts against the engines' own counts, its sample interval, and the budget guard."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from shardwise.tasks.config.loading import build_config
from shardwise.tasks.forecasting.budget import BudgetGuard
from shardwise.tasks.forecasting.forecast import make_forecast
from shardwise.tasks.planning.shards import plan_shards
from shardwise.tasks.records.results import ShardResult


def _cfg(reviews_dir: Path, tmp_path: Path, **overrides):
    return build_config(
        None,
        {
            "input": str(reviews_dir),
            "output": str(tmp_path / "out"),
            "id_column": "review_id",
            "rows_per_shard": 4,
            "name": "forecast-unit",
            **overrides,
        },
    )


def test_embed_only_counts_match_the_embedding_engine(reviews_dir, tmp_path):
    from shardwise.gpu_runtime import load_embedding_engine

    cfg = _cfg(reviews_dir, tmp_path, task="embed")
    forecast = make_forecast(cfg, plan_shards(cfg))
    assert forecast.generated_tokens is None and forecast.prompt_tokens is None
    texts = [t for f in sorted(reviews_dir.glob("*.parquet")) for t in pq.read_table(f)["text"].to_pylist()]
    engine = load_embedding_engine(cfg.embed.model, device="cpu")
    assert forecast.embedded_tokens.expected == sum(engine.embed(texts).n_tokens)
    assert forecast.embedded_tokens.basis.startswith("exact")
    assert not (tmp_path / "out").exists()


def test_a_sample_states_an_interval_that_holds_the_exact_count(reviews_dir, tmp_path):
    cfg = _cfg(reviews_dir, tmp_path, task="generate")
    plan = plan_shards(cfg)
    exact = make_forecast(cfg, plan).prompt_tokens
    sampled = make_forecast(cfg, plan, sample_rows=8).prompt_tokens
    assert exact.low == exact.expected == exact.high
    assert sampled.basis.startswith("sample") and "95%" in sampled.basis
    assert sampled.low < sampled.high
    assert sampled.low <= exact.expected <= sampled.high


def _shard_result(index: int, rows: int) -> ShardResult:
    return ShardResult(
        index=index, shard_id=str(index), name=f"shard-{index}", source="x", status="committed", rows=rows
    )


def test_budget_guard_counts_spent_and_in_flight_and_learns_the_real_cost():
    from shardwise.tasks.planning.shards import Shard

    shards = [Shard(i, str(i), "x", "f", (i,), 0, 10, 10 * i) for i in range(4)]
    guard = BudgetGuard(max_cost=1.0, forecast_cost_per_row=0.02)  # 0.2 per shard expected
    assert guard.may_start(shards[0]) and guard.may_start(shards[1])  # 0.4 in flight
    guard.finished(_shard_result(0, 10), cost=0.5)  # dearer than forecast: 0.05 per row from now on
    assert guard.cost_per_row() == 0.05
    assert not guard.may_start(shards[2])  # 0.5 spent + 0.2 in flight + 0.5 > 1.0
    assert guard.stopped
    assert "budget reached" in guard.message(2, "USD")
