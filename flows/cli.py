"""The ``shardwise`` command line: ``run``, ``plan``, ``backfill``, ``demo``, ``status``, ``lineage``,
``release`` and ``cache``.

Exit codes: 0 success; 1 the run failed (some shards failed, or an unexpected error); 2 bad input
or config (nothing was processed); 3 storage not reachable or not writable; 4 the output is complete
but held by the quality gate (no ``_SUCCESS``; see ``shardwise release``); 130 interrupted
(Ctrl-C, SIGINT); 143 terminated (SIGTERM).
Errors are one line on stderr; set ``SHARDWISE_DEBUG=1`` for a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO_ROOT / "conf" / "jobs" / "demo.yaml"


def _environment_defaults() -> None:
    """Defaults that must be in place before Prefect or tokenizers are imported."""
    # The ephemeral Prefect server takes ~12 s to start on a small machine; 20 s is too tight.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if "TOKENIZERS_PARALLELISM" not in os.environ:
        # One tokenizer thread: compute on the CPU needs the cores. An engine on a GPU turns the
        # tokenizers' threads on (shardwise.gpu_runtime.device.tokenize_on_all_cores); the marker says whose
        # choice this was.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        os.environ["SHARDWISE_TOKENIZERS_PARALLELISM_DEFAULTED"] = "1"
    # No network but package registries: telemetry would only log a failure.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardwise", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="enrich a Parquet dataset")
    run.add_argument("--config", help="YAML job config (conf/jobs/*.yaml)")
    run.add_argument("--input", help="Parquet file, directory, glob or fsspec URI")
    run.add_argument("--output", help="output directory URI")
    run.add_argument("--task", choices=["generate", "embed", "both"])
    run.add_argument("--text-column")
    run.add_argument("--id-column")
    run.add_argument("--keep-columns", choices=["all", "id"])
    run.add_argument("--prompt-template")
    run.add_argument("--system-prompt")
    run.add_argument("--max-new-tokens", type=int)
    run.add_argument(
        "--output-schema",
        metavar="FILE_OR_JSON",
        help="JSON Schema every answer follows (a .json file or inline JSON); adds the column generated",
    )
    run.add_argument("--gen-model", help="model spec: bundled:NAME, a Hugging Face id or a local path")
    run.add_argument(
        "--engine",
        choices=["auto", "hf", "vllm"],
        help="generation engine (default auto: vllm when CUDA and a CUDA vLLM are there, else hf)",
    )
    run.add_argument("--embed-model", help="model spec: bundled:NAME, a Hugging Face id or a local path")
    run.add_argument("--rows-per-shard", type=int)
    run.add_argument("--date", help="run one dt=YYYY-MM-DD partition of a partitioned job")
    run.add_argument("--workers", type=int, help="worker processes, one per device (default: visible GPUs, 1 on CPU)")
    run.add_argument("--runner", choices=["local", "ray"], help="local worker processes (default) or Ray")
    run.add_argument("--ray-address", help="Ray cluster to join (default: start a local one)")
    run.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    run.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="replace an output that was written with a different config",
    )
    run.add_argument(
        "--set",
        dest="set_options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. generate.temperature=0.7 (repeatable)",
    )
    run.add_argument(
        "--max-cost",
        type=float,
        metavar="USD",
        help="refuse the run if its forecast can cost more; start no shard past it",
    )
    run.add_argument(
        "--cache", metavar="URI", help="row cache (any fsspec URI): reuse rows computed before from the same inputs"
    )
    run.add_argument(
        "--baseline",
        metavar="OUTPUT_URI",
        help="an earlier output the quality gate compares this one with (quality.baseline)",
    )

    plan = sub.add_parser("plan", help="forecast rows, tokens, device time and cost of a run; runs nothing")
    for action in run._actions[1:]:  # exactly run's job flags (all but -h), so a plan matches its run
        plan._add_action(action)
    plan.add_argument("--json", action="store_true", help="print one JSON document")
    sample_rows = plan.add_argument(
        "--sample-rows",
        type=int,
        default=None,
        metavar="N",
        help="tokenize every row up to N rows to compute, else a random sample of shards",
    )
    calibrate = plan.add_argument(
        "--calibrate",
        type=int,
        default=0,
        metavar="N",
        help="without earlier runs of the job: load the model and answer N sampled rows "
        "to measure answer length and speed (default 0: no model is loaded)",
    )

    backfill = sub.add_parser(
        "backfill",
        help="run every dt=YYYY-MM-DD partition from --start to --end "
        "(finished ones are skipped); --plan forecasts them",
    )
    for action in run._actions[1:]:
        if action.dest != "date":  # the dates come from --start and --end
            backfill._add_action(action)
    backfill.set_defaults(date=None)
    backfill.add_argument("--start", required=True, help="first date, YYYY-MM-DD")
    backfill.add_argument("--end", required=True, help="last date, YYYY-MM-DD (included)")
    backfill.add_argument("--plan", action="store_true", help="forecast the partitions, summed; runs nothing")
    backfill.add_argument("--json", action="store_true", help="with --plan: print one JSON document")
    backfill._add_action(calibrate)
    backfill._add_action(sample_rows)

    demo = sub.add_parser("demo", help="generate a synthetic review dataset and enrich it")
    demo.add_argument("--rows", type=int, default=48, help="total rows (spread over 3 files)")
    demo.add_argument("--max-new-tokens", type=int)
    demo.add_argument("--set", dest="set_options", action="append", default=[], metavar="KEY=VALUE")

    status = sub.add_parser("status", help="progress of an output directory")
    status.add_argument("output")

    lineage = sub.add_parser("lineage", help="provenance of an output part, or of one output row")
    lineage.add_argument("target", help="an output directory or one part-*.parquet")
    lineage.add_argument("--id", dest="row_id", help="show the row with this id and where it came from")

    cache = sub.add_parser("cache", help="inspect or prune a row cache")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    stats = cache_sub.add_parser("stats", help="entries, size and the hit rate of recent runs")
    stats.add_argument("uri")
    stats.add_argument("--json", action="store_true", help="print one JSON document")
    prune = cache_sub.add_parser("prune", help="delete entries written more than DAYS days ago")
    prune.add_argument("uri")
    prune.add_argument("--older-than", type=float, required=True, metavar="DAYS")

    release = sub.add_parser("release", help="publish an output the quality gate held (writes _SUCCESS)")
    release.add_argument("output")
    release.add_argument("--reason", help="why it is released (recorded in the manifest and MLflow)")
    return parser


def config_from_args(args: argparse.Namespace):
    from shardwise.tasks.config.job import build_config

    flags = {
        "input": args.input,
        "output": args.output,
        "task": args.task,
        "text_column": args.text_column,
        "id_column": args.id_column,
        "keep_columns": args.keep_columns,
        "rows_per_shard": args.rows_per_shard,
        "workers": args.workers,
        "runner": args.runner,
        "device": args.device,
        "overwrite": args.overwrite,
        "max_cost": args.max_cost,
        "cache": args.cache,
    }
    overrides: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    generate = {
        "prompt_template": args.prompt_template,
        "system_prompt": args.system_prompt,
        "max_new_tokens": args.max_new_tokens,
        "model": args.gen_model,
        "engine": args.engine,
        "output_schema": args.output_schema,
    }
    if any(v is not None for v in generate.values()):
        overrides["generate"] = {k: v for k, v in generate.items() if v is not None}
    if args.embed_model:
        overrides["embed"] = {"model": args.embed_model}
    if args.baseline:
        overrides["quality"] = {"baseline": args.baseline}
    if args.ray_address:
        overrides["ray"] = {"address": args.ray_address}
        overrides.setdefault("runner", "ray")
    if args.config is None and ("input" not in overrides or "output" not in overrides):
        from shardwise.tasks.errors import ConfigError

        raise ConfigError(f"{args.command} needs --input and --output (or a --config that sets them)")
    cfg = build_config(args.config, overrides, args.set_options)
    if args.date:
        from shardwise.tasks.schedule.partitions import dated

        cfg = dated(cfg, args.date)
    return cfg


def execute(cfg) -> int:
    """Run the flow for ``cfg``, print the summary, return the exit code."""
    return execute_with_summary(cfg)[0]


def _notify(line: str) -> None:
    """A progress line of the command (stderr; stdout is for the summary)."""
    from shardwise.tasks.redaction import redact_text

    print(redact_text(f"shardwise: {line}"), file=sys.stderr, flush=True)


def execute_with_summary(cfg) -> tuple[int, dict[str, Any] | None, str]:
    """:func:`execute`, also returning the run summary (None when the flow produced none) and why
    the run failed ("" when it did not): :mod:`shardwise.flows.run`, rendered for people."""
    from shardwise.flows.run import execute_run, prepare_run
    from shardwise.tasks.redaction import redact_text

    summary = execute_run(prepare_run(cfg, _notify), _notify)
    if summary.details:
        print(redact_text(format_summary(summary.details)))
        quality = summary.details.get("quality") or {}
        if quality.get("status") == "warned":
            print(f"shardwise: warning: {redact_text(quality['message'])}", file=sys.stderr, flush=True)
    if summary.exit_code == 4:
        _error(summary.message)
    elif summary.exit_code:
        _error(f"run failed: {summary.message}")
    return summary.exit_code, summary.details or None, summary.message


OUTSIDE_FLOW = ("seconds_preflight", "seconds_prefect_server_start")


def format_summary(summary: dict[str, Any]) -> str:
    from shardwise.flows.run import format_forecast_line
    from shardwise.tasks.redaction import redact_uri
    from shardwise.tasks.storage.local_state import tracking_uri

    ok = summary["succeeded"]
    rows = [
        (
            "status",
            "succeeded" if ok else "HELD" if (summary.get("quality") or {}).get("status") == "held" else "FAILED",
        ),
        ("output", summary["output"]),
        (
            "rows",
            f"{summary['rows']:.0f} ({summary['error_rows']:.0f} with errors, "
            f"{summary['truncated_rows']:.0f} truncated, {summary['duplicate_ids']:.0f} duplicate ids)",
        ),
        (
            "computed",
            f"{summary['rows_computed']:.0f} rows ({summary['rows_reused']:.0f} reused from earlier runs"
            + (f", {summary['rows_cached']:.0f} from the row cache)" if summary.get("rows_cached") else ")"),
        ),
        ("shards", f"{summary['shards_committed']}/{summary['shards_total']} committed"),
        *(
            [
                (
                    "schema valid",
                    f"{summary['schema_valid_rows']:.0f}/{summary['rows']:.0f} rows "
                    f"({summary['schema_valid_rate']:.1%})",
                )
            ]
            if "schema_valid_rows" in summary
            else []
        ),
        ("seconds", f"{summary['seconds']:.1f}"),
        ("rows/s", f"{summary['rows_per_s']:.2f}"),
        ("prompt tok/s", f"{summary['prompt_tok_per_s']:.1f}"),
        ("generated tok/s", f"{summary['generated_tok_per_s']:.1f}"),
        (
            "estimated cost",
            f"{summary['cost']:.6f} {summary['currency']} "
            f"({summary['device_type']} at {summary['price_per_device_hour']:.2f}/h)",
        ),
        ("MLflow run", f"{summary['mlflow_run_id']} ({redact_uri(tracking_uri())})"),
    ]
    if summary.get("rows_cached"):
        saved = (
            f"{summary['cost_saved_estimate']:.6f} {summary['currency']} (estimated: cached rows at this "
            "run's cost per computed row)"
            if summary["rows_computed"]
            else "all rows came from the cache (no computed row to price the saving by)"
        )
        rows.insert(-1, ("cost saved", saved))
    if summary.get("forecast"):
        rows.insert(-1, ("forecast", format_forecast_line(summary["forecast"])))
    if summary.get("quality"):
        quality = summary["quality"]
        failed = ", ".join(quality["failed_checks"]) or "none failed"
        rows.insert(1, ("quality", f"{quality['status']} ({failed}; baseline {quality['baseline'] or 'none'})"))
    if timings := summary.get("timings"):
        rows.insert(-1, ("overhead", format_timings(timings)))
    for label, use in summary.get("workers", {}).items():
        rows.append(("worker", f"{label}: {use['shards']} shards"))
    width = max(len(k) for k, _ in rows)
    lines = ["", "shardwise run summary", "-" * 21] + [f"{k:<{width}}  {v}" for k, v in rows]
    for failure in summary.get("failures", []):
        lines.append(f"{'failed':<{width}}  {failure['shard']}: {failure['error']}")
    return "\n".join(lines)


def format_timings(timings: dict[str, float]) -> str:
    """Where the time outside the shards' read, compute and write went (see tasks/tracking/timings.py)."""
    phases = ", ".join(
        f"{name.removeprefix('seconds_')} {seconds:.1f}"
        for name, seconds in timings.items()
        if name
        not in ("seconds_fixed", "seconds_shard_overhead", "seconds_shards", "seconds_write_hidden", *OUTSIDE_FLOW)
    )
    line = (
        f"{timings.get('seconds_fixed', 0.0):.1f}s per run ({phases}), "
        f"{timings.get('seconds_shard_overhead', 0.0):.2f}s per shard"
    )
    if "seconds_preflight" in timings:
        line += f"; before the flow: checks and forecast {timings['seconds_preflight']:.1f}s"
    if "seconds_prefect_server_start" in timings:
        line += f"; Prefect server start-up {timings['seconds_prefect_server_start']:.1f}s"
    if timings.get("seconds_write_hidden"):
        line += f"; writes hidden behind compute {timings['seconds_write_hidden']:.2f}s"
    return line


def cmd_run(args: argparse.Namespace) -> int:
    return execute(config_from_args(args))


def cmd_plan(args: argparse.Namespace) -> int:
    """The forecast of ``run`` with the same flags; reads inputs, tokenizers and MLflow, writes nothing."""
    import json

    from shardwise.gpu_runtime import resolve_model_spec
    from shardwise.tasks.forecasting.forecast import SAMPLE_ROWS, format_forecast, make_forecast, over_budget
    from shardwise.tasks.planning.shards import plan_shards

    cfg = config_from_args(args)
    plan = plan_shards(cfg)
    for role, spec in (("generate", cfg.generate.model), ("embed", cfg.embed.model)):
        if cfg.runs_generation if role == "generate" else cfg.runs_embedding:
            resolve_model_spec(spec)
    forecast = make_forecast(cfg, plan, sample_rows=args.sample_rows or SAMPLE_ROWS, calibrate_rows=args.calibrate)
    refusal = over_budget(cfg, forecast)
    if args.json:
        print(json.dumps({**forecast.to_dict(), "max_cost": cfg.max_cost, "refused": refusal}, indent=2))
    else:
        print(format_forecast(forecast))
        if refusal:
            print(f"\nrun would be refused: {refusal}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import shutil

    from shardwise.tasks.config.job import build_config
    from shardwise.tasks.records.demo_data import write_reviews_dataset
    from shardwise.tasks.storage.local_state import state_dir

    if args.rows < 1:
        from shardwise.tasks.errors import ConfigError

        raise ConfigError(f"demo --rows must be at least 1, got {args.rows}")
    root = state_dir() / "demo"
    shutil.rmtree(root / "output", ignore_errors=True)  # the demo always computes from scratch
    input_dir = root / "input"
    shutil.rmtree(input_dir, ignore_errors=True)  # a smaller demo must not keep a bigger one's files
    files = write_reviews_dataset(str(input_dir), rows=args.rows, rows_per_group=4)
    overrides: dict[str, Any] = {"input": str(input_dir), "output": str(root / "output")}
    if args.max_new_tokens:
        overrides["generate"] = {"max_new_tokens": args.max_new_tokens}
    cfg = build_config(DEMO_CONFIG, overrides, args.set_options)
    print(f"shardwise demo: {args.rows} synthetic reviews in {len(files)} files in {input_dir}", file=sys.stderr)
    code = execute(cfg)
    if code == 0:
        from shardwise.tasks.redaction import redact_uri
        from shardwise.tasks.storage.local_state import tracking_uri

        print(
            "\nWhere to look:\n"
            f"  output Parquet : {cfg.output}/part-*.parquet  (manifest: {cfg.output}/_manifest.json)\n"
            f"    python -c \"import polars as pl; print(pl.read_parquet('{cfg.output}/part-*.parquet'))\"\n"
            f"  MLflow         : mlflow ui --backend-store-uri {redact_uri(tracking_uri())}\n"
            "  Prefect        : runs went to a temporary server; `prefect server start` and\n"
            "                   PREFECT_API_URL=http://127.0.0.1:4200/api keep them for the UI\n"
            f"  status         : shardwise status {cfg.output}"
        )
    return code


def cmd_status(args: argparse.Namespace) -> int:
    from shardwise.tasks.output.manifest import read_status
    from shardwise.tasks.quality.gate import read_hold
    from shardwise.tasks.storage.fs import exists, runtime_storage_options

    options = runtime_storage_options()
    if not exists(args.output, options):
        _error(f"no such output: {args.output}")
        return 2
    status = read_status(args.output, options)
    if status.state == "no manifest":
        _error(f"no shardwise output at {args.output}: it has no _manifest.json")
        return 2
    _out(f"output   {status.output}")
    _out(f"state    {status.state}")
    _out(f"shards   {status.shards_done}/{status.shards_total} done")
    _out(f"rows     {status.rows}")
    _out(f"_SUCCESS {'yes' if status.success else 'no'}")
    if not status.as_published:
        for label, names in (("unlisted", status.unlisted), ("replaced", status.replaced)):
            if names:
                shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
                _out(f"{label:<8} {len(names)} part(s) not as the manifest lists them: {shown}")
        _out(f"  a reader of part-*.parquet would read them; rerun the job on {args.output} to repair it")
        return 1
    hold = read_hold(args.output, options)
    if hold is not None:
        _out(f"held     by the quality gate since {hold.get('held_at', '?')}: {hold.get('message', '')}")
        for check in hold.get("failed_checks") or []:
            _out(
                f"  {check.get('check')}: {check.get('value')} (threshold {check.get('threshold')}, "
                f"baseline {check.get('baseline_value')})"
            )
        _out(f"  release it with: shardwise release {args.output} --reason '...'")
        return 4
    return 0 if status.success else 1


def cmd_release(args: argparse.Namespace) -> int:
    from shardwise.tasks.quality.gate import release_output
    from shardwise.tasks.storage.fs import runtime_storage_options

    release = release_output(args.output, args.reason, runtime_storage_options())
    _out(
        f"released {args.output} (held for: {', '.join(release['failed_checks'])}) by {release['released_by']} "
        f"at {release['released_at']}; _SUCCESS written"
    )
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from shardwise.tasks.records.lineage import find_row, list_parts, part_lineage
    from shardwise.tasks.storage.fs import runtime_storage_options

    options = runtime_storage_options()
    if args.row_id is not None:
        part, row = find_row(args.target, args.row_id, options)
        lineage = part_lineage(part, options)
        _out(f"row {args.row_id!r}")
        _out(f"  from        {lineage.get('source')} row {row.pop('_source_row')}")
        _out(f"  written to  {part}")
        _print_lineage(lineage, indent="  ")
        _out("  values")
        for key, value in row.items():
            text = str(value)
            _out(f"    {key:<20} {text if len(text) <= 200 else text[:197] + '...'}")
        return 0
    parts = list_parts(args.target, options)
    if not parts:
        _error(f"no part-*.parquet under {args.target}")
        return 2
    for part in parts:
        _out(part)
        _print_lineage(part_lineage(part, options), indent="  ")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """``cache stats`` and ``cache prune``; an unreachable cache is a storage error (exit 3)."""
    import json

    from shardwise.tasks.errors import ConfigError, StorageError
    from shardwise.tasks.records.row_cache import RowCache
    from shardwise.tasks.storage.fs import exists, runtime_storage_options

    options = runtime_storage_options()
    cache = RowCache(args.uri, options)
    try:
        if not exists(args.uri, options):
            _error(f"no row cache at {args.uri}")
            return 2
        if args.cache_command == "prune":
            if args.older_than < 0:
                raise ConfigError(f"--older-than must be 0 or more days, got {args.older_than:g}")
            removed = cache.prune(args.older_than)
            _out(
                f"removed {removed['files']} files ({removed['entries']} entries, {removed['bytes']} bytes) "
                f"written more than {args.older_than:g} days ago from {args.uri}"
            )
            return 0
        stats = cache.stats()
    except (OSError, ValueError) as err:
        raise StorageError(f"cannot read the row cache {args.uri}: {type(err).__name__}: {err}") from None
    if args.json:
        _out(json.dumps(stats, indent=2))
        return 0
    _out(f"cache    {args.uri}")
    for kind, figures in stats["kinds"].items():
        _out(
            f"{kind:<8} {figures['entries']} entries in {figures['files']} files, {figures['bytes']} bytes"
            + (f" (written {figures['oldest']} .. {figures['newest']})" if figures["files"] else "")
        )
    runs = stats["recent_runs"]
    rate = "n/a" if stats["hit_rate"] is None else f"{stats['hit_rate']:.1%}"
    _out(f"hit rate {rate} over the last {len(runs)} runs")
    for run in runs:
        _out(
            f"  {run.get('job', '')}: {run.get('rows_cached', 0)} cached, {run.get('rows_computed', 0)} computed "
            f"(MLflow run {run.get('mlflow_run_id', '')})"
        )
    return 0


def _print_lineage(lineage: dict[str, str], indent: str) -> None:
    order = [
        "mlflow_run_id",
        "prefect_flow_run_id",
        "generate_model",
        "generate_model_revision",
        "generate_engine",
        "embed_model",
        "embed_model_revision",
        "prompt_hash",
        "config_fingerprint",
        "source",
        "source_rows",
        "source_fingerprint",
        "shard_id",
        "created_at",
    ]
    # "quality" holds the part's partial quality figures: numbers for the gate, not provenance
    keys = [k for k in order if k in lineage] + sorted(k for k in lineage if k not in order and k != "quality")
    for key in keys:
        _out(f"{indent}{key:<24} {lineage[key]}")


def _out(line: str) -> None:
    """A line of command output; URIs in it may come from the user, so with credentials redacted."""
    from shardwise.tasks.redaction import redact_text

    print(redact_text(line))


def _error(message: str) -> None:
    from shardwise.tasks.redaction import redact_text

    print(f"shardwise: error: {redact_text(message)}", file=sys.stderr, flush=True)


def _fail(message: str, exit_code: int) -> int:
    """Report an error exit: one line, and with ``SHARDWISE_DEBUG`` set the traceback before it."""
    if os.environ.get("SHARDWISE_DEBUG"):
        traceback.print_exc(file=sys.stderr)
    _error(message)
    return exit_code


def _exit_abandoning_threads(code: int) -> NoReturn:
    """End the process now. A shard thread abandoned by an interrupt may still be computing, and a
    normal exit joins every such thread first; the run's MLflow and Prefect states are already
    recorded, and logs still queued for Prefect get a few seconds to go out."""
    handlers = sys.modules.get("prefect.logging.handlers")
    if handlers is not None:
        handlers.APILogWorker.drain_all(timeout=5, at_exit=False)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _raise_terminated(signum: int, frame: Any) -> None:
    from shardwise.tasks.errors import Terminated

    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    _environment_defaults()
    args = build_parser().parse_args(argv)
    from shardwise.gpu_runtime.errors import EngineError, ModelNotFoundError
    from shardwise.tasks.errors import ShardwiseError, Terminated

    # SIGTERM unwinds like Ctrl-C, so the run is closed properly (while a flow runs, Prefect's own
    # handler raises TerminationSignal instead).
    signal.signal(signal.SIGTERM, _raise_terminated)

    from shardwise.flows.backfill_cli import cmd_backfill

    handlers = {
        "run": cmd_run,
        "plan": cmd_plan,
        "backfill": cmd_backfill,
        "demo": cmd_demo,
        "status": cmd_status,
        "lineage": cmd_lineage,
        "cache": cmd_cache,
        "release": cmd_release,
    }
    started = time.perf_counter()
    try:
        return handlers[args.command](args)
    except ShardwiseError as err:
        return _fail(str(err), err.exit_code)
    except ModelNotFoundError as err:
        return _fail(str(err), 2)
    except EngineError as err:
        return _fail(f"engine failed: {err}", 1)
    except KeyboardInterrupt:
        _fail(f"interrupted after {time.perf_counter() - started:.0f}s; rerun the same command to redo it", 130)
        _exit_abandoning_threads(130)
    except Exception as err:  # noqa: BLE001 - last resort: one line, traceback on request
        return _fail(f"unexpected {type(err).__name__}: {err} (SHARDWISE_DEBUG=1 shows the traceback)", 1)
    except BaseException as err:
        prefect_exceptions = sys.modules.get("prefect.exceptions")  # Prefect's SIGTERM bridge, if loaded
        if not isinstance(err, Terminated) and not (
            prefect_exceptions and isinstance(err, prefect_exceptions.TerminationSignal)
        ):
            raise
        _fail(f"terminated after {time.perf_counter() - started:.0f}s; rerun the same command to redo it", 143)
        _exit_abandoning_threads(143)


if __name__ == "__main__":
    sys.exit(main())
