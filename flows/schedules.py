"""Flows behind the deployments in ``prefect.yaml``: one date partition, the nightly run, backfills.

enrich-partition: partition config -> skip if complete -> prepare (as ``shardwise run`` does) -> enrich (as a subflow)
nightly-enrich:   partition date from the scheduled start -> enrich-partition
backfill:         dates -> one enrich-partition deployment run per date (idempotent) -> report
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner

from shardwise.flows.enrich import enrich_for
from shardwise.flows.run import flow_arguments, prepare_run
from shardwise.gpu_runtime.errors import ModelNotFoundError
from shardwise.tasks.errors import ShardwiseError
from shardwise.tasks.orchestration.steps import run_partition_task
from shardwise.tasks.redaction import redact_text
from shardwise.tasks.schedule.backfill import backfill_summary
from shardwise.tasks.schedule.partitions import nightly_date, partition_config, partition_dates, partition_done

PARTITION_DEPLOYMENT = "enrich-partition/enrich-partition"


@flow(name="enrich-partition", flow_run_name="dt={date}")
def enrich_partition(job: str | dict[str, Any], date: str):
    """Enrich one ``dt=YYYY-MM-DD`` partition of a job; a complete partition is left alone. The
    run is prepared as ``shardwise run`` prepares it (checks, plan, forecast and ``max_cost``,
    write check: :func:`~shardwise.flows.run.prepare_run`); a check that refuses it fails this run
    with its message, before the ``enrich`` flow starts."""
    logger = get_run_logger()
    cfg = partition_config(job, date)
    if partition_done(cfg):
        logger.info("%s is already complete with this config: nothing to do", cfg.output)
        return Completed(message=f"dt={date} already complete", data={"output": cfg.output, "skipped": True})
    try:
        prepared = prepare_run(cfg, logger.info)
    except (ShardwiseError, ModelNotFoundError) as err:
        message = redact_text(str(err))
        logger.error("dt=%s cannot run: %s", date, message)
        return Failed(message=message)
    # The full config (the job file's storage_options too) reaches the subflow in this process.
    return with_own_message(enrich_for(cfg)(**flow_arguments(prepared), return_state=True))


def with_own_message(state: Any) -> Any:
    """A failed subflow's state as this flow's own, so its message (a quality hold names the failed
    checks) reaches this run instead of Prefect's generic "1/1 states failed"."""
    return Failed(message=state.message) if state.is_failed() else state


@flow(name="nightly-enrich")
def nightly_enrich(job: str | dict[str, Any], timezone: str = "UTC", days_back: int = 1, date: str | None = None):
    """The partition this scheduled run owns (scheduled start in ``timezone`` minus ``days_back``)."""
    day = date or nightly_date(flow_run.scheduled_start_time, timezone, days_back)
    get_run_logger().info("scheduled for %s (%s): processing dt=%s", flow_run.scheduled_start_time, timezone, day)
    return with_own_message(enrich_partition(job=job, date=day, return_state=True))


@flow(name="backfill", flow_run_name="backfill-{start}-to-{end}", task_runner=ThreadPoolTaskRunner(max_workers=32))
def backfill(job: str | dict[str, Any], start: str, end: str, deployment: str = PARTITION_DEPLOYMENT):
    """One enrich-partition run per date from ``start`` to ``end``; how many run at once is the
    deployment's concurrency limit (and the ``gpu`` tag limit on shard tasks)."""
    dates = partition_dates(start, end)
    outcomes = [f.result() for f in run_partition_task.map(unmapped(job), dates, unmapped(deployment))]
    create_table_artifact(outcomes, key="backfill-partitions", description=f"backfill {start} to {end}")
    summary, message = backfill_summary(outcomes)
    get_run_logger().info(message)
    if summary["failed"]:
        return Failed(message=message, data=summary)
    return Completed(message=message, data=summary)
