"""What earlier runs of a job measured, read back from MLflow for its forecasts, and what each run
records there for the forecasts after it: its forecast (``forecast_*``) and its per-row actuals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.forecasting.estimates import Forecast
from shardwise.tasks.tracking import mlflow_store


@dataclass(frozen=True)
class PastRun:
    """The figures of one earlier run that forecasts scale from."""

    run_id: str
    valid_rows: float
    generated_tokens: float
    embedded_tokens: float
    device_seconds: float
    prompt_tokens: float = 0.0


def past_runs(cfg: JobConfig, device_type: str) -> list[PastRun]:
    """Finished runs of this job with the same model and generation settings on this device type.

    A default sqlite tracking store that does not exist yet means no history (and is not created)."""
    from shardwise.tasks.tracking.runs import prompt_hash

    same = {"task": cfg.task}
    if cfg.runs_generation:
        g = cfg.generate
        same |= {
            "generate.model": g.model,
            "generate.max_new_tokens": str(g.max_new_tokens),
            "generate.temperature": str(g.temperature),
            "generate.top_p": str(g.top_p),
            "generate.ignore_eos": str(g.ignore_eos),
            "generate.prompt_hash": prompt_hash(cfg),
            "generate.max_input_tokens": "" if g.max_input_tokens is None else str(g.max_input_tokens),
        }
    if cfg.runs_embedding:
        same["embed.model"] = cfg.embed.model
    conditions = [f"params.`{k}` = '{v}'" for k, v in same.items() if v != ""]
    conditions.append(f"tags.`shardwise.device_type` = '{device_type}'")
    past = []
    for run in mlflow_store.search_runs(cfg.name, " and ".join(conditions), max_results=20):
        m = run.metrics
        if m.get("computed_valid_rows", 0) <= 0 or m.get("device_seconds", 0) <= 0:
            continue
        past.append(
            PastRun(
                run.run_id,
                m["computed_valid_rows"],
                m.get("generated_tokens_computed", m.get("generated_tokens", 0.0)),
                m.get("computed_embedded_tokens", 0.0),
                m["device_seconds"],
                m.get("prompt_tokens_computed", 0.0),
            )
        )
    return past


def history_metrics(results: list[Any]) -> dict[str, float]:
    """What later forecasts learn from, over the shards this run computed (resumed ones excluded)."""
    computed = [r for r in results if r.status == "committed" and not r.resumed]
    return {
        "computed_rows": float(sum(r.rows_computed for r in computed)),
        "computed_valid_rows": float(sum(r.rows - r.error_rows - r.rows_cached for r in computed)),
        "computed_embedded_tokens": float(sum((r.tokens - r.cached_tokens).embedded for r in computed)),
    }


def log_forecast(run_id: str, forecast: Forecast | None) -> None:
    """The forecast as ``forecast_*`` params and metrics, next to the actuals the run logs."""
    if forecast is not None:
        params, metrics = forecast.mlflow_values()
        mlflow_store.log_values(run_id, metrics=metrics, params=params)


def log_computed(run_id: str, results: list[Any]) -> None:
    """The per-row actuals later forecasts of this job are made from (see :func:`past_runs`)."""
    mlflow_store.log_values(run_id, metrics=history_metrics(results))
