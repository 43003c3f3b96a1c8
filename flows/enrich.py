"""The ``enrich`` flow: plan shards -> one task per shard -> commit -> report.

Orchestration only; every step is a task of ``shardwise.tasks.orchestration.steps`` over a plain
function of the packages under ``tasks/``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.states import Failed

from shardwise.tasks.compute.handoff import job_from_parameters, plan_from_parameters
from shardwise.tasks.compute.runners import completions_while, finished_in_turn, worker_count
from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.errors import StorageError
from shardwise.tasks.forecasting.budget import (
    BudgetGuard,
    ProgressMeter,
    shard_capacity,
    unstarted,
)
from shardwise.tasks.forecasting.estimates import Forecast
from shardwise.tasks.forecasting.forecast import over_budget
from shardwise.tasks.forecasting.history import log_computed, log_forecast
from shardwise.tasks.orchestration.artifacts import ProgressUpdates, start_progress
from shardwise.tasks.orchestration.interrupts import ended_on_error
from shardwise.tasks.orchestration.steps import (
    assess_task,
    commit_output_task,
    find_committed_task,
    forecast_task,
    log_verdict_task,
    plan_shards_task,
    prepare_output_task,
    process_shard,
    report_task,
    run_canaries_task,
    start_output_task,
    start_tracking_task,
)
from shardwise.tasks.orchestration.task_runners import ShardThreadPool, shard_placement, shard_tags, shard_task_runner
from shardwise.tasks.output.manifest import publish_part, unchanged_outcome
from shardwise.tasks.output.verdict import QualityVerdict, published_quality
from shardwise.tasks.planning.shards import ShardPlan
from shardwise.tasks.records.results import ShardResult
from shardwise.tasks.redaction import install_log_redaction, redact_text
from shardwise.tasks.storage.lease import Fence, OutputWatch
from shardwise.tasks.storage.output_dir import OutputDir
from shardwise.tasks.tracking.reporting import price_for
from shardwise.tasks.tracking.runs import end_orphaned_run, log_shard, log_timings, prompt_hash, shard_cost
from shardwise.tasks.tracking.timings import SHARDS_PHASE, RunTimer, timing_figures


class _ThreadTimeoutWarningOnce(logging.Filter):
    """Prefect warns on every shard that a thread-run timeout cannot interrupt a blocking call.
    True (and documented in the README), but once per process is enough."""

    _seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "Timeouts in worker threads cannot interrupt" not in record.getMessage():
            return True
        seen, _ThreadTimeoutWarningOnce._seen = _ThreadTimeoutWarningOnce._seen, True
        return not seen


logging.getLogger("prefect.task_runs").addFilter(_ThreadTimeoutWarningOnce())


def shard_outcome(future: PrefectFuture, shard_by_name: dict[str, Any]) -> ShardResult:
    """A finished shard future as a ShardResult, failed ones included (with their reason)."""
    value = future.result(raise_on_failure=False)
    if isinstance(value, ShardResult):
        return value
    shard = shard_by_name[future.task_run_id]
    reason = redact_text(f"{type(value).__name__}: {value}" if isinstance(value, BaseException) else str(value))
    return ShardResult(
        index=shard.index,
        shard_id=shard.shard_id,
        name=shard.name,
        source=shard.source,
        status="failed",
        error=reason,
        finished_at=time.time(),
    )


def chat_date_info(cfg: JobConfig) -> dict[str, str]:
    """The date chat templates print in this run (the configured one, else today in UTC), fixed
    once so every shard of the run renders the same prompt; recorded in the manifest and parts."""
    if not cfg.runs_generation:
        return {}
    return {"chat_date": cfg.run_chat_date().isoformat()}


def part_lineage(cfg: JobConfig, run_info: dict[str, Any]) -> dict[str, str]:
    lineage = {k: str(v) for k, v in run_info.items() if v}
    lineage["config_fingerprint"] = cfg.output_fingerprint()
    if cfg.runs_generation:
        lineage["generate_model"] = cfg.generate.model
        lineage["prompt_hash"] = prompt_hash(cfg)
    if cfg.runs_embedding:
        lineage["embed_model"] = cfg.embed.model
    return lineage


def process_shards(
    cfg: JobConfig,
    plan: ShardPlan,
    done: list[ShardResult],
    run_id: str,
    lineage: dict[str, str],
    fence: Fence,
    forecast: Forecast | None = None,
    guard: BudgetGuard | None = None,
) -> list[ShardResult]:
    """Submit one task per shard not already committed; publish each part from the run's staging
    directory as its shard finishes (while ``fence`` holds the lease) and log it to MLflow.

    Shards are submitted a few at a time (all at once on Ray), within the budget when there is a
    ``guard`` (``max_cost``). When a shard fails and the output's storage no longer answers (or
    the lease is gone), no further shard starts: none could be published. Those in flight finish,
    and :class:`StorageError` (exit 3) says how many never started; committed parts stay for the rerun."""
    logger = get_run_logger()
    committed = {r.index for r in done}
    pending = [s for s in plan.shards if s.index not in committed]
    if done:
        logger.info("resuming: %d of %d shards already committed, %d to do", len(done), len(plan.shards), len(pending))
    shard_task = process_shard.with_options(
        retries=cfg.shard_retries,
        timeout_seconds=cfg.shard_timeout_s,
        tags=shard_tags(cfg),
    )
    output = OutputDir(cfg.output, cfg.storage_options)
    staging = output.staging_uri(fence)
    watch = OutputWatch(output, fence)
    with shard_placement(cfg) as resources:
        if resources:
            logger.info("each shard asks Ray for %s", resources)
        if guard is None and cfg.runner == "ray":
            # Ray schedules every shard across the cluster's resources at once.
            futures = shard_task.map(pending, unmapped(cfg), unmapped(lineage), unmapped(staging))
            by_future = dict(zip(futures, pending))
            finished = ((f, by_future[f]) for f in finished_in_turn(list(futures)))
        else:
            # As many at a time as the runner runs at once, so the run can stop starting shards:
            # when the budget is reached, or the output's storage is gone.
            finished = completions_while(
                lambda shard: shard_task.submit(shard, cfg, lineage, staging),
                pending,
                lambda shard: watch.lost is None and (guard is None or guard.may_start(shard)),
                capacity=shard_capacity(cfg),
            )
        results: list[ShardResult] = list(done)
        progress = ProgressUpdates(start_progress(len(plan.shards), len(done)), len(plan.shards))
        meter = ProgressMeter(
            sum(s.num_rows for s in pending),
            forecast.cost.expected if forecast and forecast.cost else None,
            forecast.currency if forecast else "USD",
        )
        for future, shard in finished:
            result = publish_part(cfg, fence, shard_outcome(future, {future.task_run_id: shard}))
            results.append(result)
            price = price_for(cfg, [result])
            cost = shard_cost(result, price)
            meter.add(result, cost)
            if guard is not None:
                guard.finished(result, cost)
            progress.update(sum(r.status == "committed" for r in results), meter.line())
            log_shard(run_id, result, price)
            if result.status == "committed":
                logger.info(
                    "%s committed (%d/%d) by %s: %d rows in %.1fs, %.1f generated tok/s; %s",
                    result.name,
                    len(results),
                    len(plan.shards),
                    result.worker.name,
                    result.rows,
                    result.seconds,
                    # tokens this run generated: rows from the row cache took no compute
                    (result.tokens - result.cached_tokens).generated / max(result.timings.compute, 1e-9),
                    meter.line(),
                )
            else:
                logger.error("%s failed (%d/%d): %s", result.name, len(results), len(plan.shards), result.error)
                watch.check()
        progress.finish()
    if watch.lost is not None:
        committed = sum(r.status == "committed" for r in results)
        raise StorageError(
            f"{watch.lost}; {unstarted(list(plan.shards), results)} shard(s) not started, "
            f"{committed} of {len(plan.shards)} committed (kept: rerun when the storage is back)"
        )
    return results


def quality_verdict(cfg: JobConfig, plan: ShardPlan, results: list[ShardResult]) -> QualityVerdict | None:
    """The quality gate's verdict on a complete output (canaries run on the shards' runner);
    None when shards failed, since such an output is not published anyway."""
    if plan.unreadable or sum(r.status == "committed" for r in results) < len(plan.shards):
        return None
    canaries = run_canaries_task.submit(cfg).result() if cfg.quality.canaries else None
    return assess_task(cfg, results, canaries)


def failure_message(summary: dict[str, Any], plan: ShardPlan) -> str:
    failed = len(plan.shards) - summary["shards_committed"]
    parts = [f"{failed} of {len(plan.shards)} shards failed"]
    if plan.unreadable:
        parts.append(f"{len(plan.unreadable)} input files unreadable")
    return ", ".join(parts)


@flow(name="enrich", task_runner=ShardThreadPool(max_workers=1))
def enrich(job: dict[str, Any], forecast: dict[str, Any] | None = None) -> dict[str, Any]:
    """Enrich a Parquet dataset with generated text and/or embeddings; returns the run summary.

    Called directly it runs one shard at a time in this process; :func:`enrich_for` picks the
    runner the job asks for (worker processes, Ray, a second shard in flight on a GPU). ``job`` is
    the public config; pass ``shardwise.tasks.compute.handoff.flow_parameters(cfg)`` to keep credentials out of
    it (see that module), and ``flow_parameters(cfg, plan)`` to hand over a shard plan already made
    (the CLI's); without one the flow plans. ``forecast`` is what ``shardwise plan`` computes (the
    CLI passes the one it checked ``max_cost`` against); without it the flow makes its own."""
    timer = RunTimer()
    install_log_redaction()
    cfg = job_from_parameters(job)
    with timer.phase("plan"):
        plan = plan_from_parameters(job)
        if plan is None:
            plan = plan_shards_task(cfg)
    with timer.phase("forecast"):
        expected = Forecast.from_dict(forecast) if forecast else forecast_task(cfg, plan)
    if cfg.max_cost is not None and over_budget(cfg, expected):
        return Failed(message=over_budget(cfg, expected))
    output = OutputDir(cfg.output, cfg.storage_options)
    # One run per output at a time; its fence guards every write readers can see.
    with output.acquire_lease(cfg.lease_timeout_s, flow_run.get_id()) as lease:
        end_orphaned_run(output.read_manifest(), flow_run.get_id(), cfg.output)  # a killed run's MLflow run
        with timer.phase("start"):
            prepare_output_task(cfg)
            done, published = find_committed_task(cfg, plan)
            run_id = start_tracking_task(cfg, plan, flow_run.get_id(), flow_run.ui_url)
            log_forecast(run_id, expected)
        run_info = {
            "mlflow_run_id": run_id,
            "prefect_flow_run_id": flow_run.get_id(),
            "lease_epoch": lease.fence.epoch,
            **chat_date_info(cfg),
        }
        guard = None
        with ended_on_error(run_id):
            if published is not None:
                get_run_logger().info("%s is already published from this config and input: nothing to do", cfg.output)
                verdict, outcome = None, unchanged_outcome(output, plan, done, published)
            else:
                with timer.phase("start"):
                    start_output_task(cfg, plan, run_info, lease.fence)
                guard = BudgetGuard.for_forecast(cfg.max_cost, expected) if cfg.max_cost is not None else None
                with timer.phase(SHARDS_PHASE):
                    results = process_shards(
                        cfg, plan, done, run_id, part_lineage(cfg, run_info), lease.fence, expected, guard
                    )
                with timer.phase("commit"):
                    verdict = quality_verdict(cfg, plan, results)
                    outcome = commit_output_task(cfg, plan, results, run_info, lease.fence, verdict)
            results = outcome.results  # a part replaced since it was written counts as failed
            with timer.phase("report"):
                if verdict is not None:
                    log_verdict_task(run_id, verdict)
                summary = report_task(cfg, outcome, results, run_id, timer.elapsed(), plan.unreadable)
                if verdict is not None:
                    summary["quality"] = verdict.summary()
                elif published is not None and published.get("quality"):
                    summary["quality"] = published_quality(published["quality"])
                summary["forecast"] = expected.to_dict() if expected else None
                log_computed(run_id, results)
            summary["timings"] = timing_figures(timer, results, workers=worker_count(cfg))
            log_timings(run_id, summary["timings"])
    if outcome.held:
        return Failed(message=verdict.message(), data=summary)
    if not outcome.succeeded:
        message = failure_message(summary, plan)
        if guard is not None and guard.stopped:
            message = guard.message(unstarted(list(plan.shards), results), summary["currency"])
        return Failed(message=message, data=summary)
    return summary


def enrich_for(cfg: JobConfig):
    """The ``enrich`` flow with the task runner this job asks for (threads, worker processes or Ray)."""
    return enrich.with_options(task_runner=shard_task_runner(cfg))
