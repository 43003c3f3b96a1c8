"""The ``shardwise`` commands ``run``, ``plan``, ``demo``, ``status``, ``lineage``, ``cache`` and
``release`` (``backfill`` is :mod:`shardwise.flows.backfill_cli`). Each takes the parsed arguments
and returns the exit code; a run is :mod:`shardwise.flows.run`'s, and every text printed is
:mod:`shardwise.flows.render`'s. Errors are raised (:mod:`shardwise.tasks.errors`) for the command
line to report."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shardwise.flows import render
from shardwise.flows.flags import config_from_args

if TYPE_CHECKING:
    from shardwise.flows.run import RunSummary

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "conf" / "jobs" / "demo.yaml"


def run_job(cfg: Any) -> RunSummary:
    """Prepare and run ``cfg`` with progress on stderr and the summary on stdout; the summary's
    ``exit_code`` is the command's."""
    from shardwise.flows.run import execute_run, prepare_run
    from shardwise.tasks.orchestration.task_runners import prefect_api_starting

    with prefect_api_starting():  # the temporary Prefect server starts while the run is checked and planned
        summary = execute_run(prepare_run(cfg, render.notify), render.notify)
    render.run_summary(summary)
    return summary


def cmd_run(args: argparse.Namespace) -> int:
    return run_job(config_from_args(args)).exit_code


def cmd_plan(args: argparse.Namespace) -> int:
    """The forecast of ``run`` with the same flags; reads inputs, tokenizers and MLflow, writes nothing."""
    from shardwise.flows.run import plan_run
    from shardwise.tasks.forecasting.forecast import over_budget

    cfg = config_from_args(args)
    forecast = plan_run(cfg, args.sample_rows, args.calibrate)
    comparison = None
    if args.compare:
        from shardwise.tasks.forecasting.compare import compare_endpoints

        comparison = compare_endpoints(cfg, forecast)
    render.plan(forecast, cfg.max_cost, over_budget(cfg, forecast), args.json, comparison)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import shutil

    from shardwise.tasks.config.loading import build_config
    from shardwise.tasks.records.demo_data import write_reviews_dataset
    from shardwise.tasks.storage.local_state import state_dir

    if args.rows < 1:
        from shardwise.tasks.errors import ConfigError

        raise ConfigError(f"demo --rows must be at least 1, got {args.rows}")
    root = state_dir() / "demo"
    earlier = read_manifest_rows(root / "output")
    if earlier is not None:
        render.demo_replaced(earlier, root / "output")
    shutil.rmtree(root / "output", ignore_errors=True)  # the demo always computes from scratch
    input_dir = root / "input"
    shutil.rmtree(input_dir, ignore_errors=True)  # a smaller demo must not keep a bigger one's files
    files = write_reviews_dataset(str(input_dir), rows=args.rows, rows_per_group=4)
    overrides: dict[str, Any] = {"input": str(input_dir), "output": str(root / "output")}
    if args.max_new_tokens:
        overrides["generate"] = {"max_new_tokens": args.max_new_tokens}
    cfg = build_config(DEMO_CONFIG, overrides, args.set_options)
    render.demo_dataset(args.rows, len(files), input_dir)
    code = run_job(cfg).exit_code
    if code == 0:
        render.demo_pointers(cfg.output)
    return code


def read_manifest_rows(output: Any) -> int | None:
    """The rows an earlier output's manifest counts, or None where there is none to read."""
    import json

    try:
        return int(json.loads((output / "_manifest.json").read_text())["totals"]["rows"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cmd_status(args: argparse.Namespace) -> int:
    """0 published, 1 incomplete or not as its manifest lists it, 4 held by the quality gate."""
    from shardwise.tasks.output.manifest import read_status
    from shardwise.tasks.quality.release import read_hold
    from shardwise.tasks.storage.fs import exists, runtime_storage_options

    options = runtime_storage_options()
    if not exists(args.output, options):
        render.error(f"no such output: {args.output}")
        return 2
    status = read_status(args.output, options)
    if status.state == "no manifest":
        render.error(f"no shardwise output at {args.output}: it has no _manifest.json")
        return 2
    render.status(status)
    if not status.as_published:
        render.not_as_published(status, args.output)
        return 1
    hold = read_hold(args.output, options)
    if hold is not None:
        render.hold(hold, args.output)
        return 4
    return 0 if status.success else 1


def cmd_release(args: argparse.Namespace) -> int:
    from shardwise.tasks.quality.release import release_output
    from shardwise.tasks.storage.fs import runtime_storage_options

    render.released(args.output, release_output(args.output, args.reason, runtime_storage_options()))
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from shardwise.tasks.records.lineage import find_row, list_parts, part_lineage
    from shardwise.tasks.storage.fs import runtime_storage_options

    options = runtime_storage_options()
    if args.row_id is not None:
        part, row = find_row(args.target, args.row_id, options)
        render.row_lineage(args.row_id, part, row, part_lineage(part, options))
        return 0
    parts = list_parts(args.target, options)
    if not parts:
        render.error(f"no part-*.parquet under {args.target}")
        return 2
    for part in parts:
        render.out(part)
        render.part_lineage(part_lineage(part, options), indent="  ")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """``cache stats`` and ``cache prune``; an unreachable cache is a storage error (exit 3)."""
    from shardwise.tasks.errors import ConfigError, StorageError
    from shardwise.tasks.records.row_cache import RowCache
    from shardwise.tasks.storage.fs import exists, runtime_storage_options

    options = runtime_storage_options()
    cache = RowCache(args.uri, options)
    try:
        if not exists(args.uri, options):
            render.error(f"no row cache at {args.uri}")
            return 2
        if args.cache_command == "prune":
            if args.older_than < 0:
                raise ConfigError(f"--older-than must be 0 or more days, got {args.older_than:g}")
            render.cache_pruned(args.uri, cache.prune(args.older_than), args.older_than)
            return 0
        stats = cache.stats()
    except (OSError, ValueError) as err:
        raise StorageError(f"cannot read the row cache {args.uri}: {type(err).__name__}: {err}") from None
    render.cache_stats(args.uri, stats, args.json)
    return 0
