"""The forecast's token counts against the engines' own counts, its sample interval, and the budget guard."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

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


ENDPOINT = {"engine": "openai", "base_url": "http://127.0.0.1:9/v1"}  # nothing listens: never contacted


def test_an_endpoint_jobs_forecast_costs_its_tokens_and_no_device_hours(reviews_dir, tmp_path):
    prices = {"price_per_million_input_tokens": 1.0, "price_per_million_output_tokens": 4.0}
    cfg = _cfg(reviews_dir, tmp_path, task="generate", generate={**ENDPOINT, "max_new_tokens": 8}, **prices)
    forecast = make_forecast(cfg, plan_shards(cfg))
    local = _cfg(reviews_dir, tmp_path, task="generate", generate={"max_new_tokens": 8}, device="cpu")
    # the model name resolves to a local tokenizer: the prompts are counted exactly, as for the local engine
    assert forecast.prompt_tokens == make_forecast(local, plan_shards(local)).prompt_tokens
    assert (forecast.device_type, forecast.price_per_device_hour) == ("endpoint:127.0.0.1:9", 0.0)
    p, g = forecast.prompt_tokens, forecast.generated_tokens
    for end in ("low", "expected", "high"):
        assert getattr(forecast.cost, end) == pytest.approx((getattr(p, end) * 1.0 + getattr(g, end) * 4.0) / 1e6)
    assert forecast.cost.expected > 0
    assert "1 in / 4 out USD per 1M tokens" in forecast.cost.basis
    assert forecast.device_seconds.basis.startswith("unmeasured guess for an endpoint")


def test_a_hosted_models_prompts_are_estimated_at_four_characters_per_token(reviews_dir, tmp_path):
    import math

    from shardwise.tasks.records.enrichment import clean_text

    template = "Summarise: {text}"
    generate = {**ENDPOINT, "model": "gpt-4o-mini", "prompt_template": template}
    cfg = _cfg(reviews_dir, tmp_path, task="generate", generate=generate)
    forecast = make_forecast(cfg, plan_shards(cfg))
    texts = [clean_text(t) for f in sorted(reviews_dir.glob("*.parquet")) for t in pq.read_table(f)["text"].to_pylist()]
    assert forecast.prompt_tokens.expected == sum(
        math.ceil(len(template.format(text=t)) / 4) for t, err in texts if not err
    )
    assert forecast.prompt_tokens.basis.startswith("approximate: ~4 characters per token ('gpt-4o-mini'")
    assert forecast.cost.high == 0.0 and "no token prices set" in forecast.cost.basis
