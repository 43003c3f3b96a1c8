"""``--max-cost`` against an input whose prompts are far longer than those of the job's history:
the forecast counts this input's prompt tokens, so a budget that long prompts would blow is not
spent past. Through the console script, real model and MLflow; the history is one earlier run of
short rows, recorded as the flow records it."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.flows.test_cli import shardwise
from tests.flows.test_forecast import _job as forecast_job

LONG = "The kettle boils fast and quietly, and the handle stays cool. " * 120  # about 1,700 tokens
MAX_COST = 0.05  # USD; at 3600 USD per device-hour, 0.05 device-seconds


def _job(source: Path, output: Path, name: str) -> list[str]:
    """The forecast tests' generation job, answering in up to 4 tokens at a price that makes a
    device-second cost 1 USD."""
    return forecast_job(source, output, name, "--max-new-tokens", "4", "--set", "price_per_device_hour=3600")


def _short_rows_history(name: str, job: list[str]) -> str:
    """An earlier run of the job over 1,000 short rows (30 prompt tokens, 4 generated each) that took
    one device-second: cheap per row, for rows like those."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from shardwise.flows.cli import build_parser
    from shardwise.flows.flags import config_from_args
    from shardwise.tasks.storage.local_state import tracking_uri
    from shardwise.tasks.tracking.runs import _flatten, prompt_hash

    cfg = config_from_args(build_parser().parse_args(["run", *job]))
    client = MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    run = client.create_run(experiment_id)
    params: dict[str, str] = {}
    _flatten("", cfg.public_dict(), params)
    params["generate.prompt_hash"] = prompt_hash(cfg)
    figures = {
        "computed_valid_rows": 1000.0,
        "generated_tokens_computed": 4000.0,
        "prompt_tokens_computed": 30000.0,
        "device_seconds": 1.0,
    }
    client.log_batch(
        run.info.run_id,
        params=[Param(k, v) for k, v in params.items()],
        metrics=[Metric(k, v, 0, 0) for k, v in figures.items()],
        tags=[RunTag("shardwise.device_type", "cpu")],
    )
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _spent(name: str, history_run: str) -> float:
    from mlflow.tracking import MlflowClient

    from shardwise.tasks.storage.local_state import tracking_uri

    client = MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id])
    return sum(r.data.metrics.get("cost", 0.0) for r in runs if r.info.run_id != history_run)


@pytest.mark.slow
def test_long_prompts_do_not_spend_past_max_cost_on_a_short_rows_history(prefect_server, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    table = pa.table({"id": [f"r{i}" for i in range(4)], "text": [f"{i}: {LONG}" for i in range(4)]})
    pq.write_table(table, source / "a.parquet", row_group_size=2)
    name = "budget-long-prompts"
    job = _job(source, tmp_path / "out", name)
    history = _short_rows_history(name, job)

    run = shardwise("run", *job, "--max-cost", str(MAX_COST))
    # Refused up front (exit 2) or stopped by the budget (exit 1); never more spent than allowed.
    assert run.returncode in (1, 2), run.stderr[-3000:]
    spent = _spent(name, history)
    assert spent <= MAX_COST, (spent, run.stderr[-3000:])
