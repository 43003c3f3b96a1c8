"""What a run records in MLflow, written from one place (the flow's process).

MLflow's active run is thread-local and sqlite dislikes many writers, so shard tasks never log:
they return a :class:`~shardwise.tasks.records.results.ShardResult` and the flow logs it here, step = shard index.
Nothing in ``storage_options`` reaches MLflow (see ``JobConfig.public_dict``), and every param and
tag passes :func:`shardwise.tasks.redaction.redact_text` on its way out. The store itself is
reached through :mod:`shardwise.tasks.tracking.mlflow_store`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.config.prices import Price
from shardwise.tasks.errors import Terminated
from shardwise.tasks.planning.shards import ShardPlan
from shardwise.tasks.records.results import RunTotals, ShardResult
from shardwise.tasks.redaction import redact_text, redact_uri, redact_values
from shardwise.tasks.storage.local_state import state_dir
from shardwise.tasks.tracking import mlflow_store

_PARAM_LIMIT = 6000

# What ends a run as KILLED rather than FAILED: Ctrl-C, SIGTERM, a cancellation. The flow adds its
# orchestrator's own form of SIGTERM (see ``ended_on_error``).
INTERRUPTS: tuple[type[BaseException], ...] = (KeyboardInterrupt, Terminated, asyncio.CancelledError)


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else key, inner, out)
    else:
        text = "" if value is None else str(value)
        out[prefix] = text if len(text) <= _PARAM_LIMIT else text[: _PARAM_LIMIT - 20] + "...[truncated]"


def prompt_hash(cfg: JobConfig) -> str:
    blob = f"{cfg.template}\x00{cfg.generate.system_prompt or ''}".encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def start_run(
    cfg: JobConfig,
    plan: ShardPlan,
    flow_run_id: str | None,
    uri: str | None = None,
    flow_run_url: str | None = None,
) -> str:
    """Create the MLflow run for this flow run, with its config, inputs and code version."""
    from shardwise.tasks.records.lineage import code_version

    # A new experiment's artifacts go next to the default sqlite database rather than wherever the
    # process happens to run.
    location = None if uri or os.environ.get("MLFLOW_TRACKING_URI") else (state_dir() / "mlartifacts").as_uri()
    experiment_id = mlflow_store.experiment_for(cfg.name, location, uri)
    tags = {
        "mlflow.runName": f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}",
        "shardwise.input": redact_uri(cfg.input),
        "shardwise.output": redact_uri(cfg.output),
        "shardwise.task": cfg.task,
    }
    if flow_run_id:
        tags["prefect.flow_run_id"] = flow_run_id
    if flow_run_url:
        tags["prefect.flow_run_url"] = flow_run_url
    tags.update(code_version())
    run_id = mlflow_store.create_run(experiment_id, tags, uri)
    params: dict[str, str] = {}
    _flatten("", cfg.public_dict(), params)
    params["input.files"] = str(len(plan.files))
    params["input.rows"] = str(plan.total_rows)
    params["shards.planned"] = str(len(plan.shards))
    if cfg.runs_generation:
        params["generate.prompt_hash"] = prompt_hash(cfg)
        params["generate.effective_prompt_template"] = cfg.template[:_PARAM_LIMIT]
        if cfg.output_schema_hash is not None:
            params["generate.output_schema_hash"] = cfg.output_schema_hash
    mlflow_store.log_values(
        run_id,
        params={k: redact_text(v) for k, v in params.items()},
        tags={k: redact_text(v) for k, v in tags.items() if k != "mlflow.runName"},
        uri=uri,
    )
    mlflow_store.log_dict(run_id, cfg.public_dict(), "job_config.json", uri)
    mlflow_store.log_input_files(run_id, plan.files, uri)
    _start_system_metrics(run_id, uri)
    return run_id


def _start_system_metrics(run_id: str, uri: str | None) -> None:
    """GPU utilisation, memory and power as MLflow ``system/*`` metrics, when NVML is available."""
    from shardwise.tasks.config.prices import nvml_available

    if nvml_available():
        mlflow_store.start_system_metrics(run_id, uri)


def shard_metrics(result: ShardResult, price: Price) -> dict[str, float]:
    """A shard's figures; a shard reused from an earlier run computed nothing now: its rates are 0."""
    seconds = max(result.seconds, 1e-9) if not result.resumed else float("inf")
    timings, tokens = result.timings, result.tokens
    uncached = tokens - result.cached_tokens
    compute = max(timings.compute, 1e-9) if not result.resumed else float("inf")
    metrics = {
        "shard_rows": result.rows,
        "shard_error_rows": result.error_rows,
        "shard_seconds": result.seconds,
        "shard_seconds_read": timings.read,
        "shard_seconds_wait": timings.wait,
        "shard_seconds_compute": timings.compute,
        "shard_seconds_write": timings.write,
        "shard_rows_cached": result.rows_cached,
        # rates over what the shard computed: rows from the row cache cost no device time
        "shard_rows_per_s": (result.rows - result.rows_cached) / seconds,
        "shard_prompt_tok_per_s": uncached.prompt / compute,
        "shard_generated_tok_per_s": uncached.generated / compute,
        "shard_cost": shard_cost(result, price),
        "shard_failed": 0.0 if result.status == "committed" else 1.0,
    }
    cost = metrics["shard_cost"]
    metrics["shard_cost_per_1k_rows"] = cost / result.rows * 1000 if result.rows else 0.0
    if tokens.generated:
        metrics["shard_cost_per_1m_generated_tokens"] = cost / tokens.generated * 1e6
    if price.endpoint_roles:
        metrics |= _token_metrics("shard_", cost, uncached.prompt, uncached.generated, uncached.embedded, price)
    if result.worker.energy_j is not None:
        metrics["shard_energy_j"] = result.worker.energy_j
    return metrics


def shard_cost(result: ShardResult, price: Price) -> float:
    """What a shard cost: its device-seconds at the hourly price, plus the tokens an endpoint
    processed for it (rows from the row cache cost none); 0 for a shard reused from an earlier run."""
    if result.resumed:
        return 0.0
    uncached = result.tokens - result.cached_tokens
    return price.total_cost(result.seconds, uncached.prompt, uncached.generated, uncached.embedded)


def _token_metrics(
    prefix: str, cost: float, prompt: float, generated: float, embedded: float, price: Price
) -> dict[str, float]:
    """The token side of an endpoint job's cost: the tokens it bills, their cost, and the cost per
    1M tokens of all kinds (prompt, generated and embedded, wherever they were processed)."""
    every = prompt + generated + embedded
    metrics = {
        f"{prefix}token_cost": price.token_cost(prompt, generated, embedded),
        f"{prefix}endpoint_input_tokens": float(price.input_tokens(prompt, embedded)),
        f"{prefix}endpoint_output_tokens": float(price.output_tokens(generated)),
        f"{prefix}cost_per_1m_tokens": cost / every * 1e6 if every else 0.0,
    }
    if not prefix:
        metrics["batch_discount"] = price.batch_discount
        for key in ("per_million_input_tokens", "per_million_output_tokens"):
            if getattr(price, key) is not None:
                metrics[f"price_{key}"] = float(getattr(price, key))
    return metrics


def log_shard(run_id: str, result: ShardResult, price: Price, uri: str | None = None) -> None:
    mlflow_store.log_values(run_id, metrics=shard_metrics(result, price), step=result.index, uri=uri)


def log_timings(run_id: str, figures: dict[str, float], uri: str | None = None) -> None:
    """Where the run's wall time went (see tasks/tracking/timings.py), logged once the report is done."""
    mlflow_store.log_values(run_id, metrics=figures, uri=uri)


def run_metrics(
    totals: RunTotals, wall_seconds: float, price: Price, duplicate_ids: int, embedded_tokens: int = 0
) -> dict[str, float]:
    """Run figures; rates and cost per row or token are over what this run computed, not over rows
    or tokens reused from parts an earlier run committed (``embedded_tokens``: those this run
    embedded, which an embedding endpoint bills)."""
    wall = max(wall_seconds, 1e-9)
    cost = price.total_cost(
        totals.device_seconds, totals.prompt_tokens_computed, totals.generated_tokens_computed, embedded_tokens
    )
    energy = {} if totals.energy_j is None else {"energy_j": totals.energy_j}
    if totals.schema_valid_rows is not None:
        energy |= {
            "schema_valid_rows": totals.schema_valid_rows,
            "schema_valid_rate": totals.schema_valid_rows / totals.schema_rows if totals.schema_rows else 0.0,
        }
    computed_tokens = totals.generated_tokens_computed
    metrics = energy | {
        "rows": totals.rows,
        "rows_computed": totals.rows_computed,
        "rows_reused": totals.rows_reused,
        "rows_cached": totals.rows_cached,
        "error_rows": totals.error_rows,
        "truncated_rows": totals.truncated_rows,
        "duplicate_ids": duplicate_ids,
        "shards_committed": totals.committed,
        "shards_failed": totals.failed,
        "prompt_tokens": totals.prompt_tokens,
        "generated_tokens": totals.generated_tokens,
        "prompt_tokens_computed": totals.prompt_tokens_computed,
        "generated_tokens_computed": computed_tokens,
        "seconds": wall_seconds,
        "device_seconds": totals.device_seconds,
        "seconds_read": totals.seconds_read,
        "seconds_compute": totals.seconds_compute,
        "seconds_write": totals.seconds_write,
        "rows_per_s": totals.rows_computed / wall,
        "prompt_tok_per_s": totals.prompt_tokens_computed / wall,
        "generated_tok_per_s": computed_tokens / wall,
        "cost": cost,
        "price_per_device_hour": price.per_hour,
        "cost_per_1k_rows": cost / totals.rows_computed * 1000 if totals.rows_computed else 0.0,
        "cost_per_1m_generated_tokens": cost / computed_tokens * 1e6 if computed_tokens else 0.0,
        # what the cached rows would have cost at this run's cost per computed row
        "cost_saved_estimate": cost / totals.rows_computed * totals.rows_cached if totals.rows_computed else 0.0,
    }
    if price.endpoint_roles:
        metrics |= _token_metrics("", cost, totals.prompt_tokens_computed, computed_tokens, embedded_tokens, price)
        metrics["device_cost"] = price.cost(totals.device_seconds)
    return metrics


def finish_run(
    run_id: str,
    metrics: dict[str, float],
    manifest: dict[str, Any] | None,
    succeeded: bool,
    price: Price,
    output: str,
    results: list[ShardResult],
    uri: str | None = None,
) -> None:
    """Totals, models, the output dataset and manifest, the throughput figure; then close the run."""
    from shardwise.tasks.records.lineage import model_params
    from shardwise.tasks.tracking.figures import throughput_figure

    models: dict[str, dict[str, Any]] = {}
    for result in results:
        models.update(result.models)
    logged = mlflow_store.get_run(run_id, uri).params
    mlflow_store.log_values(
        run_id,
        metrics=metrics,
        params={k: redact_text(v) for k, v in model_params(models).items() if k not in logged},
        tags={"shardwise.device_type": price.device_type, "shardwise.currency": price.currency},
        uri=uri,
    )
    if manifest is not None:
        mlflow_store.log_dict(run_id, redact_values(manifest), "manifest.json", uri)
        mlflow_store.log_output_dataset(run_id, output, manifest, uri)
    computed = [r for r in results if not r.resumed and r.status == "committed"]
    if computed:
        mlflow_store.log_figure(run_id, throughput_figure(computed, price), "throughput.png", uri)
    mlflow_store.end_run(run_id, "FINISHED" if succeeded else "FAILED", uri)


@contextlib.contextmanager
def ended_on_error(
    run_id: str, uri: str | None = None, interrupts: tuple[type[BaseException], ...] = INTERRUPTS
) -> Iterator[None]:
    """Whatever stops the run before it reports ends its MLflow run: KILLED when it is one of
    ``interrupts``, FAILED otherwise, so no run is left RUNNING forever."""
    try:
        yield
    except BaseException as err:
        status = "KILLED" if isinstance(err, interrupts) else "FAILED"
        try:
            mlflow_store.end_run(run_id, status, uri)
        except Exception as close_err:  # noqa: BLE001 - the original error is the one to report
            logging.getLogger(__name__).warning("could not mark MLflow run %s %s: %s", run_id, status, close_err)
        raise


def end_orphaned_run(
    manifest: dict[str, Any] | None, flow_run_id: str | None, output: str, uri: str | None = None
) -> str | None:
    """End, as KILLED, the MLflow run of an earlier run on this output that died without ending it
    (SIGKILL, a lost machine); returns its id, or None when there was nothing to end.

    ``manifest`` is the output's ``_manifest.json`` as the dead run left it, read after this run
    took the output's lease and before anything rewrites it: holding the lease means no other run
    is writing this output, so an MLflow run it names that is still RUNNING has lost its process.
    A run that is not found (another tracking store, deleted) or not RUNNING is left alone."""
    run_id = (manifest or {}).get("mlflow_run_id")
    if not isinstance(run_id, str) or not run_id:
        return None
    log = logging.getLogger(__name__)
    try:
        if mlflow_store.run_status(run_id, uri) != "RUNNING":
            return None
        ended_by = f"prefect flow run {flow_run_id}" if flow_run_id else f"pid {os.getpid()}"
        mlflow_store.log_values(
            run_id,
            tags={
                "shardwise.ended_by": ended_by,
                "shardwise.ended_reason": redact_text(
                    f"left RUNNING by a run that died; ended by the next run on {output}"
                ),
            },
            uri=uri,
        )
        mlflow_store.end_run(run_id, "KILLED", uri)
    except Exception as err:  # noqa: BLE001 - tidying another run's record must not stop this one
        log.warning("could not end the MLflow run %s of an earlier run on this output: %s", run_id, err)
        return None
    log.warning("MLflow run %s of an earlier run on this output was still RUNNING: ended as KILLED", run_id)
    return run_id
