"""The Prefect tasks of a run, each over a plain function of the packages below: its name, retries
and retry rule are the orchestration; what it does is the function's.

Bad input, bad config, a missing model or a lost lease fail the same way every time, so the tasks
that read or write data are not retried on those (:func:`~shardwise.tasks.retry_policy.retry_unless_bad_input`).
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task

from shardwise.tasks.compute.shard_work import run_shard
from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.forecasting.estimates import Forecast
from shardwise.tasks.forecasting.forecast import forecast_for_run
from shardwise.tasks.orchestration.artifacts import publish_run_report, publish_verdict
from shardwise.tasks.orchestration.deployments import run_partition
from shardwise.tasks.output.manifest import CommitOutcome, commit_output, start_output
from shardwise.tasks.output.resume import committed_and_published, prepare_output
from shardwise.tasks.output.verdict import QualityVerdict
from shardwise.tasks.planning.shards import Shard, ShardPlan, UnreadableFile, plan_shards
from shardwise.tasks.quality.canaries import run_canaries
from shardwise.tasks.quality.gate import assess
from shardwise.tasks.quality.report import log_verdict
from shardwise.tasks.records.results import ShardResult
from shardwise.tasks.retry_policy import retry_unless_bad_input
from shardwise.tasks.storage.lease import Fence
from shardwise.tasks.tracking.reporting import report
from shardwise.tasks.tracking.runs import start_run

# ---- planning and the forecast --------------------------------------------------------------


@task(name="plan-shards", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_unless_bad_input)
def plan_shards_task(cfg: JobConfig) -> ShardPlan:
    return plan_shards(cfg)


@task(name="forecast")
def forecast_task(cfg: JobConfig, plan: ShardPlan) -> Forecast | None:
    """The forecast for a run started without one (the flow called directly, e.g. as a subflow);
    None, with a warning, when it cannot be made and the job sets no ``max_cost``."""
    return forecast_for_run(cfg, plan, get_run_logger())


# ---- the output -----------------------------------------------------------------------------


@task(name="prepare-output", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_unless_bad_input)
def prepare_output_task(cfg: JobConfig) -> None:
    prepare_output(cfg)


@task(name="find-committed", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_unless_bad_input)
def find_committed_task(cfg: JobConfig, plan: ShardPlan) -> tuple[list[ShardResult], dict[str, Any] | None]:
    """The committed shards, and the published manifest when the run has nothing to change."""
    return committed_and_published(cfg, plan)


@task(name="start-output", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_unless_bad_input)
def start_output_task(cfg: JobConfig, plan: ShardPlan, run_info: dict[str, Any], fence: Fence) -> None:
    start_output(cfg, plan, run_info, fence)


@task(name="commit-output", retries=3, retry_delay_seconds=[2, 5, 10], retry_condition_fn=retry_unless_bad_input)
def commit_output_task(
    cfg: JobConfig,
    plan: ShardPlan,
    results: list[ShardResult],
    run_info: dict[str, Any],
    fence: Fence,
    verdict: QualityVerdict | None = None,
) -> CommitOutcome:
    return commit_output(cfg, plan, results, run_info, fence, verdict)


# ---- shards ---------------------------------------------------------------------------------


@task(
    name="enrich-shard",
    task_run_name="{shard.name}",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_bad_input,
)
def process_shard(shard: Shard, cfg: JobConfig, lineage: dict[str, str], staging: str) -> ShardResult:
    return run_shard(shard, cfg, lineage, staging)


# ---- tracking and the report ----------------------------------------------------------------


@task(name="start-tracking", retries=2, retry_delay_seconds=2)
def start_tracking_task(cfg: JobConfig, plan: ShardPlan, flow_run_id: str | None, flow_run_url: str | None) -> str:
    return start_run(cfg, plan, flow_run_id, flow_run_url=flow_run_url)


@task(name="report", retries=2, retry_delay_seconds=2)
def report_task(
    cfg: JobConfig,
    outcome: CommitOutcome,
    results: list[ShardResult],
    run_id: str,
    wall_seconds: float,
    unreadable: tuple[UnreadableFile, ...] = (),
) -> dict[str, Any]:
    """Close the run in MLflow and publish its summary and shard table; returns the summary."""
    summary, shard_rows = report(cfg, outcome, results, run_id, wall_seconds, unreadable)
    publish_run_report(summary, shard_rows)
    return summary


# ---- the quality gate -----------------------------------------------------------------------


@task(name="quality-canaries", retries=1, retry_delay_seconds=2)
def run_canaries_task(cfg: JobConfig) -> dict[str, Any]:
    return run_canaries(cfg)


@task(name="quality-gate", retries=2, retry_delay_seconds=2)
def assess_task(cfg: JobConfig, results: list[ShardResult], canaries: dict[str, Any] | None) -> QualityVerdict:
    return assess(cfg, results, canaries)


@task(name="quality-report", retries=2, retry_delay_seconds=2)
def log_verdict_task(run_id: str, verdict: QualityVerdict) -> None:
    """The verdict's figures in MLflow, and its comparison as a markdown artifact."""
    log_verdict(run_id, verdict)
    publish_verdict(verdict)


# ---- backfills ------------------------------------------------------------------------------


@task(name="partition", task_run_name="dt={date}")
def run_partition_task(job: str | dict[str, Any], date: str, deployment: str) -> dict[str, Any]:
    return run_partition(job, date, deployment)
