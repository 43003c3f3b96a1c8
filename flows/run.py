"""One run of a job, as the command line, the Python API and the ``enrich-partition`` deployment
all do it: prepare, then the flow.

:func:`prepare_run` does everything that can fail fast, before Prefect starts or a model loads
(the output's location and lease, the shard plan, the config against what the output holds, the
models' specs, the quality settings, the forecast and its budget, the write check) and returns a
:class:`PreparedRun`; :func:`execute_run` runs the ``enrich`` flow on it (with
:func:`flow_arguments`, as the deployment's flow does) and returns a :class:`RunSummary`.
:func:`plan_run` is the forecast alone, for ``shardwise plan`` and ``shardwise.plan``. None of
them prints: what people read goes through ``notify`` (the command line passes one that writes to
stderr, the deployment its run logger; by default it is this module's logger).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("shardwise.run")

Notify = Callable[[str], None]


@dataclass(frozen=True)
class PreparedRun:
    """A job checked and planned, with its forecast (None when none could be made)."""

    cfg: Any  # JobConfig
    plan: Any  # ShardPlan
    forecast: Any  # Forecast | None
    seconds: float  # what preparing took


@dataclass(frozen=True)
class RunSummary:
    """What a run did. ``status`` is ``succeeded``, ``failed`` (some shards failed; every good one
    is written) or ``held`` (complete, but the quality gate withheld ``_SUCCESS``); ``exit_code``
    is the command line's for it and ``message`` says why it did not succeed ("" when it did; the
    gate's verdict when held).
    ``details`` is the flow's whole summary (also in MLflow and the Prefect artifact)."""

    status: str
    exit_code: int
    message: str
    output: str
    rows: int = 0
    rows_computed: int = 0
    rows_reused: int = 0
    rows_cached: int = 0
    error_rows: int = 0
    shards_total: int = 0
    shards_committed: int = 0
    seconds: float = 0.0
    cost: float = 0.0
    currency: str = "USD"
    mlflow_run_id: str | None = None
    manifest: str | None = None
    details: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    @classmethod
    def of(cls, details: dict[str, Any] | None, exit_code: int, message: str, output: str) -> RunSummary:
        data = details or {}
        status = "succeeded" if exit_code == 0 else "held" if exit_code == 4 else "failed"

        def number(key: str, kind: type = int) -> Any:
            return kind(data.get(key) or 0)

        return cls(
            status=status,
            exit_code=exit_code,
            message=message,
            output=str(data.get("output") or output),
            rows=number("rows"),
            rows_computed=number("rows_computed"),
            rows_reused=number("rows_reused"),
            rows_cached=number("rows_cached"),
            error_rows=number("error_rows"),
            shards_total=number("shards_total"),
            shards_committed=number("shards_committed"),
            seconds=number("seconds", float),
            cost=number("cost", float),
            currency=str(data.get("currency") or "USD"),
            mlflow_run_id=data.get("mlflow_run_id"),
            manifest=data.get("manifest"),
            details=data,
        )


def prepare_run(cfg: Any, notify: Notify | None = None) -> PreparedRun:
    """Check ``cfg`` and plan it, before anything is written (the write check comes last, after a
    budget refusal could still stop the run); raises ``ConfigError``/``InputError``/``StorageError``."""
    from shardwise.tasks.compute.runners import check_engine_settings
    from shardwise.tasks.forecasting.forecast import pending_shards
    from shardwise.tasks.output.resume import check_output_compatible, check_output_location
    from shardwise.tasks.planning.shards import plan_shards
    from shardwise.tasks.quality.gate import check_quality_settings
    from shardwise.tasks.storage.fs import check_writable
    from shardwise.tasks.storage.output_dir import OutputDir

    started = time.perf_counter()
    check_engine_settings(cfg)
    check_output_location(cfg)
    OutputDir(cfg.output, cfg.storage_options).check_lease_free(cfg.lease_timeout_s)
    plan = plan_shards(cfg)
    # Read once here for the forecast; the flow reads them again holding the output's lease, since
    # another run may write to the output in between.
    pending = pending_shards(cfg, plan, check_output_compatible(cfg))
    resolve_models(cfg)
    check_quality_settings(cfg)
    forecast = run_forecast(cfg, plan, notify or logger.info, pending)
    check_writable(cfg.output, cfg.storage_options)
    return PreparedRun(cfg, plan, forecast, time.perf_counter() - started)


def resolve_models(cfg: Any) -> None:
    """Find the models the job runs here (``ModelNotFoundError`` names one that is not there); a
    section on a serving endpoint names a model the server holds, not one to find here."""
    from shardwise.gpu_runtime import resolve_model_spec

    on_endpoint = cfg.endpoint_sections()
    if cfg.runs_generation and "generate" not in on_endpoint:
        resolve_model_spec(cfg.generate.model)
    if cfg.runs_embedding and "embed" not in on_endpoint:
        resolve_model_spec(cfg.embed.model)


def plan_run(cfg: Any, sample_rows: int | None = None, calibrate_rows: int = 0) -> Any:
    """The forecast of running ``cfg`` (a ``Forecast``), as ``shardwise plan`` shows it: reads the
    inputs' footers, tokenizers and MLflow history; writes nothing. ``sample_rows`` rows are
    tokenized (default ``SAMPLE_ROWS``); ``calibrate_rows`` > 0 loads the model and answers that
    many sampled rows when there is no earlier run to learn from."""
    from shardwise.tasks.forecasting.forecast import SAMPLE_ROWS, make_forecast
    from shardwise.tasks.planning.shards import plan_shards

    plan = plan_shards(cfg)
    resolve_models(cfg)
    return make_forecast(cfg, plan, sample_rows=sample_rows or SAMPLE_ROWS, calibrate_rows=calibrate_rows)


def run_forecast(cfg: Any, plan: Any, notify: Notify, pending: list[Any] | None = None) -> Any:
    """The run's forecast, told through ``notify``; refuses (ConfigError) a job whose high end
    exceeds ``max_cost``. Without ``max_cost`` a forecast that cannot be made is only a warning."""
    from shardwise.flows.render import format_forecast_line
    from shardwise.tasks.errors import ConfigError
    from shardwise.tasks.forecasting.forecast import make_forecast, over_budget, run_sample_rows

    try:
        forecast = make_forecast(cfg, plan, run_sample_rows(cfg), pending=pending)
    except Exception as err:  # noqa: BLE001 - informative unless a budget depends on it
        if cfg.max_cost is not None:
            raise ConfigError(f"max_cost is set but the cost cannot be forecast: {err}") from None
        notify(f"warning: no cost forecast: {type(err).__name__}: {err}")
        return None
    notify(f"forecast {format_forecast_line(forecast)}")
    refusal = over_budget(cfg, forecast)
    if refusal:
        raise ConfigError(refusal)
    return forecast


def flow_arguments(prepared: PreparedRun) -> dict[str, Any]:
    """The ``enrich`` flow's arguments for a prepared run: its public config with the plan made
    (held in this process: ``flow_parameters``) and the forecast ``max_cost`` was checked against."""
    from shardwise.tasks.compute.handoff import flow_parameters

    forecast = prepared.forecast
    return {"job": flow_parameters(prepared.cfg, prepared.plan), "forecast": forecast.to_dict() if forecast else None}


def execute_run(prepared: PreparedRun, notify: Notify | None = None) -> RunSummary:
    """Run the ``enrich`` flow on a prepared run (a temporary Prefect server is started when no
    ``PREFECT_API_URL`` is set) and sum it up."""
    from shardwise.flows.enrich import enrich_for
    from shardwise.tasks.orchestration.task_runners import shared_prefect_api
    from shardwise.tasks.redaction import redact_text
    from shardwise.tasks.tracking.runs import log_timings

    notify = notify or logger.info
    cfg, plan = prepared.cfg, prepared.plan
    notify(f"{plan.total_rows} rows in {len(plan.files)} files -> {len(plan.shards)} shards")
    server_started = time.perf_counter()
    with shared_prefect_api():
        server_seconds = time.perf_counter() - server_started  # waiting for the temporary server, if any
        state = enrich_for(cfg)(**flow_arguments(prepared), return_state=True)
    result = state.result(raise_on_failure=False)
    if not isinstance(result, dict):
        reason = f"{type(result).__name__}: {result}" if isinstance(result, BaseException) else state.message
        return RunSummary.of(None, getattr(result, "exit_code", 1), redact_text(str(reason)), cfg.output)
    # What was spent before the flow (checks, plan, forecast; the server's start-up), beside its own timings.
    outside = {"seconds_preflight": prepared.seconds, "seconds_prefect_server_start": server_seconds}
    result.setdefault("timings", {}).update(outside)
    if result.get("mlflow_run_id"):
        log_timings(result["mlflow_run_id"], outside)
    quality = result.get("quality") or {}
    if quality.get("status") == "held":
        return RunSummary.of(result, 4, redact_text(quality["message"]), cfg.output)
    if result.get("succeeded"):
        return RunSummary.of(result, 0, "", cfg.output)
    return RunSummary.of(result, 1, redact_text(state.message or "some shards failed"), cfg.output)


__all__ = [
    "PreparedRun",
    "RunSummary",
    "execute_run",
    "flow_arguments",
    "plan_run",
    "prepare_run",
    "resolve_models",
    "run_forecast",
]
