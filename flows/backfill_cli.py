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
import json
import sys
from typing import Any

from shardwise.flows.cli import config_from_args, execute_with_summary
from shardwise.tasks.errors import ConfigError, InputError, ShardwiseError
from shardwise.tasks.forecasting.forecast import (
    SAMPLE_ROWS,
    Forecast,
    format_forecast,
    make_forecast,
    over_budget,
    sum_forecasts,
)
from shardwise.tasks.redaction import redact_text
from shardwise.tasks.schedule.backfill import backfill_summary
from shardwise.tasks.schedule.partitions import dated, partition_dates, partition_done


def _out(text: str) -> None:
    """Command output; paths in it come from the user, so with credentials redacted."""
    print(redact_text(text))


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


def _resolve_models(cfg) -> None:
    """A model that cannot be found fails the whole backfill once, before any partition."""
    from shardwise.gpu_runtime import resolve_model_spec

    if cfg.runs_generation:
        resolve_model_spec(cfg.generate.model)
    if cfg.runs_embedding:
        resolve_model_spec(cfg.embed.model)


def _print_plan(cfg, total: Forecast, partitions: list[dict[str, Any]], as_json: bool) -> None:
    refusal = over_budget(cfg, total)
    if as_json:
        entries = [{k: (v.to_dict() if isinstance(v, Forecast) else v) for k, v in p.items()} for p in partitions]
        print(
            json.dumps(
                {**total.to_dict(), "partitions": entries, "max_cost": cfg.max_cost, "refused": refusal}, indent=2
            )
        )
        return
    lines = [
        "",
        f"{'partition':<14}{'rows':>10}{'to compute':>12}{'device-s':>12}"
        f"{f'cost ({total.currency})':>16}{'cost high':>14}",
    ]
    for p in partitions:
        f = p.get("forecast")
        if f is None:
            lines.append(f"{'dt=' + p['date']:<14}  cannot run: {p['error']}")
            continue
        lines.append(
            f"{'dt=' + p['date']:<14}{f.rows:>10}{f.rows_to_compute:>12}{f.device_seconds.expected:>12.1f}"
            f"{f.cost.expected:>16.6f}{f.cost.high:>14.6f}"
        )
    _out("\n".join(lines))
    _out(format_forecast(total, f"shardwise backfill plan, {len(partitions)} dates (nothing was run)"))
    if refusal:
        _out(f"\nbackfill would be refused: {refusal}")


def _run_partitions(cfg, dates: list[str]) -> list[dict[str, Any]]:
    from shardwise.tasks.compute.runners import shared_prefect_api

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
            print(f"shardwise: backfill: dt={date}", file=sys.stderr, flush=True)
            try:
                code, summary, message = execute_with_summary(day)
            except ShardwiseError as err:  # this partition's bad input or storage; the others go on
                print(redact_text(f"shardwise: error: dt={date}: {err}"), file=sys.stderr, flush=True)
                code, summary, message = err.exit_code, None, str(err)
            cost = float(summary.get("cost", 0.0)) if summary else 0.0
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
    _resolve_models(cfg)
    if args.plan or cfg.max_cost is not None:
        total, partitions = plan_partitions(cfg, dates, args.sample_rows or SAMPLE_ROWS, args.calibrate)
        if args.plan:
            if total is None:
                _print_plan_errors(partitions)
                raise ConfigError(f"no partition from {dates[0]} to {dates[-1]} can be planned")
            _print_plan(cfg, total, partitions, args.json)
            return 0
        refusal = over_budget(cfg, total)
        if refusal:
            raise ConfigError(f"backfill {dates[0]} to {dates[-1]}: {refusal}")
    outcomes = _run_partitions(cfg, dates)
    summary, message = backfill_summary(outcomes)
    _out("")
    _out("shardwise backfill summary")
    for o in outcomes:
        cost = f"  cost {o['cost']:.6f}" if "cost" in o else ""
        _out(
            f"  dt={o['date']:<12}{o['status']:<12}{o['output']}{cost}" + (f"  {o['message']}" if o["message"] else "")
        )
    _out(message)
    if summary["failed"] or summary.get("not started"):
        return 1
    return 4 if summary.get("held") else 0  # held by the quality gate: written, not published


def _print_plan_errors(partitions: list[dict[str, Any]]) -> None:
    for p in partitions:
        _out(f"dt={p['date']}: cannot run: {p['error']}")
