"""Every text the ``shardwise`` command prints for people: progress, warning and error lines, the
run summary and its forecast line, ``plan``, ``status``, ``lineage``, ``cache``, ``release``, the
demo's pointers, and the backfill's plan table and summary.

Commands decide what to show and their exit code; the wording and layout are here. Command output
goes to stdout, progress and errors to stderr. A line that can hold a URI the user gave passes
through :func:`~shardwise.tasks.redaction.redact_text`, so credentials in it are never printed.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from shardwise.tasks.redaction import redact_text, redact_uri

# Timings of what a run spends before its flow starts (shardwise.flows.run.execute_run adds them).
OUTSIDE_FLOW = ("seconds_preflight", "seconds_prefect_server_start")

LINEAGE_ORDER = [
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


def out(line: str = "") -> None:
    """A line of command output (stdout)."""
    print(redact_text(line))


def notify(line: str) -> None:
    """A progress line of the command (stderr; stdout is for the command's output)."""
    print(redact_text(f"shardwise: {line}"), file=sys.stderr, flush=True)


def warning(message: str) -> None:
    print(f"shardwise: warning: {redact_text(message)}", file=sys.stderr, flush=True)


def error(message: str) -> None:
    print(f"shardwise: error: {redact_text(message)}", file=sys.stderr, flush=True)


# ---- run -------------------------------------------------------------------------------------------


def run_summary(summary: Any) -> None:
    """A finished run (a :class:`~shardwise.flows.run.RunSummary`): the summary table on stdout, the
    quality gate's warning, and why it did not succeed."""
    if summary.details:
        out(format_summary(summary.details))
        quality = summary.details.get("quality") or {}
        if quality.get("status") == "warned":
            warning(quality["message"])
    if summary.exit_code == 4:
        error(summary.message)
    elif summary.exit_code:
        error(f"run failed: {summary.message}")


def format_forecast_line(forecast: dict[str, Any] | Any) -> str:
    """A forecast (a ``Forecast`` or its ``to_dict()``) on one line: rows, tokens, device time, cost."""
    data = forecast if isinstance(forecast, dict) else forecast.to_dict()
    cost, seconds = data["cost"], data["device_seconds"]
    tokens = data.get("generated_tokens") or data.get("embedded_tokens") or {}
    return (
        f"{data['rows_to_compute']} rows to compute, "
        f"{tokens.get('expected', 0):.0f} {'generated' if data.get('generated_tokens') else 'embedded'} tokens, "
        f"{seconds['expected']:.1f}s device time ({seconds['low']:.1f}-{seconds['high']:.1f}), "
        f"cost {cost['expected']:.6f} {data['currency']} ({cost['low']:.6f}-{cost['high']:.6f})"
    )


def format_summary(summary: dict[str, Any]) -> str:
    """The flow's summary of a run as the table the command prints."""
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
        ("estimated cost", format_cost(summary)),
        ("MLflow run", f"{summary['mlflow_run_id']} ({redact_uri(tracking_uri())})"),
    ]
    if "token_cost" in summary:
        rows.insert(-1, ("cost/1M tokens", f"{summary['cost_per_1m_tokens']:.6f} {summary['currency']} (all tokens)"))
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


def format_cost(summary: dict[str, Any]) -> str:
    """A run's cost and its basis: device-hours, and the tokens of the sections an endpoint served."""
    line = f"{summary['cost']:.6f} {summary['currency']} ({summary['device_type']} at {summary['price_per_device_hour']:.2f}/h"
    if "token_cost" in summary:
        line += (
            f": {summary['device_cost']:.6f}; {summary['endpoint_input_tokens']:.0f} input + "
            f"{summary['endpoint_output_tokens']:.0f} output tokens: {summary['token_cost']:.6f}, {summary['token_basis']}"
        )
    return line + ")"


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
        line += f"; waited for the Prefect server {timings['seconds_prefect_server_start']:.1f}s"
    if timings.get("seconds_write_hidden"):
        line += f"; writes hidden behind compute {timings['seconds_write_hidden']:.2f}s"
    return line


# ---- plan and demo ---------------------------------------------------------------------------------


def plan(forecast: Any, max_cost: float | None, refusal: str | None, as_json: bool, comparison: Any = None) -> None:
    """``shardwise plan``: the forecast, why ``max_cost`` would refuse the run, and with ``--compare``
    the job on each endpoint of its config (``ComparisonRow``s, its own first)."""
    from shardwise.tasks.forecasting.estimates import format_forecast

    if as_json:
        extra = {} if comparison is None else {"comparison": [row.to_dict() for row in comparison]}
        print(json.dumps({**forecast.to_dict(), "max_cost": max_cost, "refused": refusal, **extra}, indent=2))
        return
    print(format_forecast(forecast))
    if comparison is not None:
        print(format_comparison(comparison, forecast.currency))
    if refusal:
        print(f"\nrun would be refused: {refusal}")


def format_comparison(rows: list[Any], currency: str) -> str:
    """``plan --compare``'s table (expected tokens and wall seconds, the cost's range), then the bases."""
    w = max(12, *(len(r.name) for r in rows)) + 2, max(16, *(len(r.where) for r in rows)) + 2
    head = f"{'compared':<{w[0]}}{'where':<{w[1]}}{'input tok':>12}{'output tok':>12}{'wall s':>10}"
    lines = ["", head + f"{f'cost {currency} low':>18}{'expected':>12}{'high':>12}"]
    for r in rows:
        wall = "?" if r.wall_seconds is None else f"{r.wall_seconds.expected:.1f}"
        lines.append(
            f"{r.name:<{w[0]}}{r.where:<{w[1]}}{r.input_tokens.expected:>12,.0f}{r.output_tokens.expected:>12,.0f}"
            f"{wall:>10}{r.cost.low:>18.6f}{r.cost.expected:>12.6f}{r.cost.high:>12.6f}"
        )
    lines += [
        f"{r.name}: cost {r.cost.basis}" + (f"; time {r.wall_seconds.basis}" if r.wall_seconds else "") for r in rows
    ]
    if len(rows) == 1:
        lines.append("no endpoints to compare with: list them under endpoints: in the job config (see the README)")
    return "\n".join(lines)


def demo_dataset(rows: int, files: int, input_dir: Any) -> None:
    print(f"shardwise demo: {rows} synthetic reviews in {files} files in {input_dir}", file=sys.stderr)


def demo_replaced(rows: int, output: Any) -> None:
    print(f"shardwise demo: replacing the earlier demo output ({rows} rows) in {output}", file=sys.stderr)


def demo_pointers(output: str) -> None:
    """Where a finished demo's output, MLflow run and Prefect runs can be looked at."""
    from shardwise.tasks.storage.local_state import tracking_uri

    print(
        "\nWhere to look:\n"
        f"  output Parquet : {output}/part-*.parquet  (manifest: {output}/_manifest.json)\n"
        f"    python -c \"import polars as pl; print(pl.read_parquet('{output}/part-*.parquet'))\"\n"
        f"  MLflow         : mlflow ui --backend-store-uri {redact_uri(tracking_uri())}\n"
        "  Prefect        : runs went to a temporary server; `prefect server start` and\n"
        "                   PREFECT_API_URL=http://127.0.0.1:4200/api keep them for the UI\n"
        f"  status         : shardwise status {output}"
    )


# ---- status and release ----------------------------------------------------------------------------


def status(state: Any) -> None:
    """An output's progress (an ``OutputStatus``)."""
    out(f"output   {state.output}")
    if state.state == "interrupted":
        out("state    interrupted: no run is writing it; rerun the same job to finish it")
    elif state.holder:
        out(f"state    {state.state} ({state.holder})")
    else:
        out(f"state    {state.state}")
    out(f"shards   {state.shards_done}/{state.shards_total} done")
    out(f"rows     {state.rows}")
    out(f"_SUCCESS {'yes' if state.success else 'no'}")


def not_as_published(state: Any, output: str) -> None:
    """Parts a reader of ``part-*.parquet`` would read that the manifest does not list as they are."""
    for label, names in (("unlisted", state.unlisted), ("replaced", state.replaced)):
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            out(f"{label:<8} {len(names)} part(s) not as the manifest lists them: {shown}")
    out(f"  a reader of part-*.parquet would read them; rerun the job on {output} to repair it")


def hold(held: dict[str, Any], output: str) -> None:
    """The quality gate's hold on an output: why, and how to release it."""
    out(f"held     by the quality gate since {held.get('held_at', '?')}: {held.get('message', '')}")
    for check in held.get("failed_checks") or []:
        out(
            f"  {check.get('check')}: {check.get('value')} (threshold {check.get('threshold')}, "
            f"baseline {check.get('baseline_value')})"
        )
    out(f"  release it with: shardwise release {output} --reason '...'")


def released(output: str, release: dict[str, Any]) -> None:
    out(
        f"released {output} (held for: {', '.join(release['failed_checks'])}) by {release['released_by']} "
        f"at {release['released_at']}; _SUCCESS written"
    )


# ---- lineage ---------------------------------------------------------------------------------------


def row_lineage(row_id: str, part: str, row: dict[str, Any], lineage: dict[str, str]) -> None:
    """One output row: where it came from, the run that wrote it, and its values."""
    values = dict(row)
    out(f"row {row_id!r}")
    out(f"  from        {lineage.get('source')} row {values.pop('_source_row')}")
    out(f"  written to  {part}")
    part_lineage(lineage, indent="  ")
    out("  values")
    for key, value in values.items():
        text = str(value)
        out(f"    {key:<20} {text if len(text) <= 200 else text[:197] + '...'}")


def part_lineage(lineage: dict[str, str], indent: str) -> None:
    """A part's provenance, the run's identity first."""
    # "quality" holds the part's partial quality figures: numbers for the gate, not provenance
    keys = [k for k in LINEAGE_ORDER if k in lineage] + sorted(
        k for k in lineage if k not in LINEAGE_ORDER and k != "quality"
    )
    for key in keys:
        out(f"{indent}{key:<24} {lineage[key]}")


# ---- row cache -------------------------------------------------------------------------------------


def cache_pruned(uri: str, removed: dict[str, int], older_than: float) -> None:
    out(
        f"removed {removed['files']} files ({removed['entries']} entries, {removed['bytes']} bytes) "
        f"written more than {older_than:g} days ago from {uri}"
    )


def cache_stats(uri: str, stats: dict[str, Any], as_json: bool) -> None:
    """``cache stats``: entries and size by kind, and the hit rate of recent runs."""
    if as_json:
        out(json.dumps(stats, indent=2))
        return
    out(f"cache    {uri}")
    for kind, figures in stats["kinds"].items():
        out(
            f"{kind:<8} {figures['entries']} entries in {figures['files']} files, {figures['bytes']} bytes"
            + (f" (written {figures['oldest']} .. {figures['newest']})" if figures["files"] else "")
        )
    runs = stats["recent_runs"]
    rate = "n/a" if stats["hit_rate"] is None else f"{stats['hit_rate']:.1%}"
    out(f"hit rate {rate} over the last {len(runs)} runs")
    for run in runs:
        out(
            f"  {run.get('job', '')}: {run.get('rows_cached', 0)} cached, {run.get('rows_computed', 0)} computed "
            f"(MLflow run {run.get('mlflow_run_id', '')})"
        )


# ---- backfill --------------------------------------------------------------------------------------


def backfill_plan(
    total: Any, partitions: list[dict[str, Any]], max_cost: float | None, refusal: str | None, as_json: bool
) -> None:
    """``backfill --plan``: one line per partition, then the summed forecast."""
    from shardwise.tasks.forecasting.estimates import Forecast, format_forecast

    if as_json:
        entries = [{k: (v.to_dict() if isinstance(v, Forecast) else v) for k, v in p.items()} for p in partitions]
        print(
            json.dumps({**total.to_dict(), "partitions": entries, "max_cost": max_cost, "refused": refusal}, indent=2)
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
    out("\n".join(lines))
    out(format_forecast(total, f"shardwise backfill plan, {len(partitions)} dates (nothing was run)"))
    if refusal:
        out(f"\nbackfill would be refused: {refusal}")


def backfill_plan_errors(partitions: list[dict[str, Any]]) -> None:
    for p in partitions:
        out(f"dt={p['date']}: cannot run: {p['error']}")


def backfill_summary(outcomes: list[dict[str, Any]], message: str) -> None:
    """One line per partition (ran, skipped, held, failed, not started), then the totals."""
    out("")
    out("shardwise backfill summary")
    for o in outcomes:
        cost = f"  cost {o['cost']:.6f}" if "cost" in o else ""
        out(f"  dt={o['date']:<12}{o['status']:<12}{o['output']}{cost}" + (f"  {o['message']}" if o["message"] else ""))
    out(message)
