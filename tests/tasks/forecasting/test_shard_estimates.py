"""A shard's cost estimate follows its own prompts: the budget guard does not start a shard of long
prompts whose own expected cost would pass ``max_cost``, though the average row's would fit."""

from __future__ import annotations

import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.forecasting.budget import BudgetGuard
from shardwise.tasks.forecasting.estimates import Estimate, Forecast
from shardwise.tasks.forecasting.forecast import make_forecast
from shardwise.tasks.planning.shards import plan_shards

LONG = "The kettle boils fast and quietly, and the handle stays cool. " * 60


def _forecast(**extra) -> Forecast:
    return Forecast(
        rows=4,
        rows_to_compute=4,
        shards=2,
        shards_to_compute=2,
        files=1,
        device_type="cpu",
        price_per_device_hour=3600.0,
        currency="USD",
        workers=1,
        **extra,
    )


def test_the_guard_refuses_a_shard_whose_own_prompts_pass_the_budget(tmp_path):
    plan = plan_shards(JobConfig(input=str(_input(tmp_path / "in")), output="x", rows_per_shard=2))
    short, long = plan.shards
    forecast = _forecast(
        prompt_tokens=Estimate(2020, 2020, 2020, "exact"),
        cost=Estimate(0.4, 0.4, 0.4, "test"),
        prompt_token_cost=0.0002,
        shard_prompt_tokens={short.shard_id: 20, long.shard_id: 2000},
    )
    assert forecast.shard_cost(short) == pytest.approx(0.2 + 0.0002 * (20 - 1010))
    assert forecast.shard_cost(long) == pytest.approx(0.2 + 0.0002 * (2000 - 1010))
    guard = BudgetGuard.for_forecast(0.3, forecast)
    assert not guard.may_start(long)  # 0.398 expected: past 0.3, though 2 average rows (0.2) fit
    assert BudgetGuard.for_forecast(0.3, forecast).may_start(short)


def _input(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    texts = ["Short and fine.", "Broke in a week.", LONG, LONG + " Again."]
    table = pa.table({"id": [f"r{i}" for i in range(4)], "text": texts})
    pq.write_table(table, directory / "a.parquet", row_group_size=2)
    return directory


def test_the_forecast_prices_long_prompts_above_a_short_rows_history(tmp_path):
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from shardwise.tasks.storage.local_state import tracking_uri
    from shardwise.tasks.tracking.runs import _flatten, prompt_hash

    cfg = JobConfig(
        name=f"shard-estimates-{uuid.uuid4().hex[:8]}",
        input=str(_input(tmp_path / "in")),
        output=str(tmp_path / "out"),
        task="generate",
        rows_per_shard=2,
        device="cpu",
        price_per_device_hour=3600,
        generate={"max_new_tokens": 4},
    )
    client = MlflowClient(tracking_uri())
    run = client.create_run(client.create_experiment(cfg.name))
    params: dict[str, str] = {}
    _flatten("", cfg.public_dict(), params)
    params["generate.prompt_hash"] = prompt_hash(cfg)
    figures = {"computed_valid_rows": 1000, "generated_tokens_computed": 4000, "prompt_tokens_computed": 30000}
    client.log_batch(
        run.info.run_id,
        params=[Param(k, v) for k, v in params.items()],
        metrics=[Metric(k, float(v), 0, 0) for k, v in {**figures, "device_seconds": 1.0}.items()],
        tags=[RunTag("shardwise.device_type", "cpu")],
    )
    client.set_terminated(run.info.run_id)

    plan = plan_shards(cfg)
    forecast = make_forecast(cfg, plan)
    assert forecast.history_runs == [run.info.run_id]
    short, long = plan.shards
    assert forecast.shard_prompt_tokens[long.shard_id] > 20 * forecast.shard_prompt_tokens[short.shard_id]
    # Each shard's estimate follows its prompts, and together they are the run's expected cost.
    assert forecast.shard_cost(long) > 5 * forecast.shard_cost(short)
    assert forecast.shard_cost(short) + forecast.shard_cost(long) == pytest.approx(forecast.cost.expected)
    # Long prompts cost more than the history's 4 generated tokens a row would say.
    history_rate = 1.0 / 4000 * (4 * 4)  # device-seconds for 4 rows of 4 generated tokens, at 1 $/s
    assert forecast.cost.expected > 3 * history_rate
