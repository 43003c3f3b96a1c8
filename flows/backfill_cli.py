"""``shardwise backfill --start --end [--plan]``: every date partition of a job, from the shell.

Partitions run one after another in this process through the same ``enrich`` flow as ``run
--date``, and are skipped, as the ``backfill`` deployment skips them, when :func:`partition_done`
says their output is complete with this config. ``--plan`` runs nothing and prints the forecast of
each partition and their sum. ``max_cost`` is the budget of the whole backfill: refused up front
when the summed forecast's high end exceeds it; then each partition gets what is left, and the
first partition refused or stopped by it ends the backfill (a rerun skips what finished).
"""

from __future__ import annotations

import argparse
from typing import Any

from shardwise.flows import render
from shardwise.flows.commands import run_job
from shardwise.flows.flags import config_from_args
from shardwise.flows.run import resolve_models
from shardwise.tasks.errors import ConfigError, InputError, ShardwiseError
from shardwise.tasks.forecasting.estimates import Forecast, sum_forecasts
from shardwise.tasks.forecasting.forecast import SAMPLE_ROWS, make_forecast, over_budget
from shardwise.tasks.schedule.backfill import backfill_summary
from shardwise.tasks.schedule.partitions import dated, partition_dates, partition_done


def plan_partitions(
    cfg, dates: list[str], sample_rows: int = SAMPLE_ROWS, calibrate_rows: int = 0
) -> tuple[Forecast | None, list[dict[str, Any]]]:
    """The summed forecast of the partitions that can be planned, and one entry per date: its
    forecast, or why it cannot run (no input yet, say). A calibration is made once, on the first
    partition with rows to compute, and used for all."""
    from shardwise.tasks.planning.shards import plan_shards

    forecasts: list[Forecast] = []
    partitions: list[dict[str, Any]] = []
    calibration = None
    for date in dates:
        day = dated(cfg, date)
        try:
            plan = plan_shards(day)
        except InputError as err:
            partitions.append({"date": date, "output": day.output, "error": str(err)})
            continue
        forecast = make_forecast(day, plan, sample_rows, 0 if calibration else calibrate_rows, calibration)
        calibration = calibration or forecast.calibration
        forecasts.append(forecast)
        partitions.append({"date": date, "output": day.output, "forecast": forecast})
    return (sum_forecasts(forecasts) if forecasts else None), partitions


def _run_partitions(cfg, dates: list[str]) -> list[dict[str, Any]]:
    from shardwise.tasks.orchestration.task_runners import shared_prefect_api

    outcomes: list[dict[str, Any]] = []
    spent = 0.0
    stopped = ""
    with shared_prefect_api():  # one Prefect server for every partition's flow run
        for date in dates:
            day = dated(cfg, date)
            outcome: dict[str, Any] = {"date": date, "output": day.output}
            if stopped:
                outcomes.append({**outcome, "status": "not started", "message": stopped})
                continue
            if partition_done(day):
                outcomes.append({**outcome, "status": "skipped", "message": "already complete"})
                continue
            if cfg.max_cost is not None:
                day = day.model_copy(update={"max_cost": max(cfg.max_cost - spent, 0.0)})
            render.notify(f"backfill: dt={date}")
            try:
                summary = run_job(day)
                code, cost, message = summary.exit_code, summary.cost, summary.message
            except ShardwiseError as err:  # this partition's bad input or storage; the others go on
                render.error(f"dt={date}: {err}")
                code, cost, message = err.exit_code, 0.0, str(err)
            spent += cost
            outcomes.append(
                {**outcome, "status": {0: "ran", 4: "held"}.get(code, "failed"), "cost": cost, "message": message}
            )
            if cfg.max_cost is not None and ("budget reached" in message or "exceeds max_cost" in message):
                stopped = f"backfill budget reached: spent {spent:.6f} of max_cost {cfg.max_cost:g}"
    return outcomes


def cmd_backfill(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    dates = partition_dates(args.start, args.end)
    resolve_models(cfg)  # a model that cannot be found fails the whole backfill once, before any partition
    if args.plan or cfg.max_cost is not None:
        total, partitions = plan_partitions(cfg, dates, args.sample_rows or SAMPLE_ROWS, args.calibrate)
        if args.plan:
            if total is None:
                render.backfill_plan_errors(partitions)
                raise ConfigError(f"no partition from {dates[0]} to {dates[-1]} can be planned")
            render.backfill_plan(total, partitions, cfg.max_cost, over_budget(cfg, total), args.json)
            return 0
        refusal = over_budget(cfg, total)
        if refusal:
            raise ConfigError(f"backfill {dates[0]} to {dates[-1]}: {refusal}")
    outcomes = _run_partitions(cfg, dates)
    summary, message = backfill_summary(outcomes)
    render.backfill_summary(outcomes, message)
    if summary["failed"] or summary.get("not started"):
        return 1
    return 4 if summary.get("held") else 0  # held by the quality gate: written, not published
