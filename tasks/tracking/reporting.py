"""The end of a run: totals, cost, the MLflow close-out, and the run summary and shard table
that the flow shows people (``shardwise.tasks.orchestration.artifacts`` publishes them)."""

from __future__ import annotations

import re
from typing import Any

from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.config.prices import Price, detect_device_type, job_price
from shardwise.tasks.output.manifest import CommitOutcome
from shardwise.tasks.planning.shards import UnreadableFile
from shardwise.tasks.records.results import ShardResult
from shardwise.tasks.redaction import redact_text, redact_uri
from shardwise.tasks.tracking import mlflow_store
from shardwise.tasks.tracking.runs import finish_run, run_metrics, shard_metrics


def price_for(cfg: JobConfig, results: list[ShardResult]) -> Price:
    """The price of the device the shards actually ran on (or the config's override), with the
    token prices of the sections an endpoint served."""
    device = next((r.worker.device for r in results if r.worker.device), None)
    device_type = cfg.device_type or detect_device_type(device)
    # A section run here next to one on an endpoint: its device's hours are what is paid for.
    local_roles = [role for role in ("generate", "embed") if role not in cfg.endpoint_sections()]
    local = next(
        (r.models[role].get("device") for r in results for role in local_roles if r.models.get(role, {}).get("device")),
        None,
    )
    return job_price(cfg, device_type, detect_device_type(str(local)) if local else None)


def worker_usage(results: list[ShardResult]) -> dict[str, dict[str, Any]]:
    """Shards each worker ran in this run, and how often it loaded each model (1 when cached)."""
    usage: dict[str, dict[str, Any]] = {}
    for r in results:
        if r.resumed or r.worker.name is None:
            continue
        entry = usage.setdefault(r.worker.name, {"shards": 0, "model_loads": {}})
        entry["shards"] += 1
        for spec, count in r.worker.model_loads.items():
            entry["model_loads"][spec] = max(count, entry["model_loads"].get(spec, 0))
    return usage


def build_summary(
    cfg: JobConfig,
    outcome: CommitOutcome,
    results: list[ShardResult],
    run_id: str,
    wall_seconds: float,
    price: Price,
    unreadable: tuple[UnreadableFile, ...] = (),
) -> dict[str, Any]:
    embedded = sum((r.tokens - r.cached_tokens).embedded for r in results if r.status == "committed" and not r.resumed)
    metrics = run_metrics(outcome.totals, wall_seconds, price, outcome.duplicate_ids, embedded)
    failures = [
        {"shard": "(unplanned)", "source": redact_uri(u.uri), "error": redact_text(u.reason)} for u in unreadable
    ]
    failures += [
        {"shard": r.name, "source": redact_uri(r.source), "error": redact_text(r.error or "")}
        for r in sorted(results, key=lambda r: r.index)
        if r.status != "committed"
    ]
    workers = worker_usage(results)
    return {
        "succeeded": outcome.succeeded,
        "output": redact_uri(cfg.output),
        "workers": workers,
        "worker_processes": len(workers),
        "manifest": outcome.manifest_uri,
        "mlflow_run_id": run_id,
        "mlflow_run_url": mlflow_run_url(run_id),
        "shards_total": outcome.totals.shards,
        "shards_committed": outcome.totals.committed,
        "failures": failures,
        "currency": price.currency,
        "device_type": price.device_type,
        **({"token_basis": price.token_basis()} if price.endpoint_roles else {}),
        **metrics,
    }


def mlflow_run_url(run_id: str) -> str | None:
    """A browser link when MLflow is a server; a sqlite file has no UI address of its own."""
    from shardwise.tasks.storage.local_state import tracking_uri

    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    experiment_id = mlflow_store.get_run(run_id, uri).experiment_id
    return f"{redact_uri(uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


# Inline markdown that could change what a value shows: code spans, emphasis, links, tables. Values
# never start a line here (each follows "- label: "), so line-start markers (#, -, 1.) cannot act,
# and "_" inside a word is no emphasis: paths and file names stay readable as they are.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*\[\]|])")
_HTML_SPECIAL = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}


def markdown_text(value: Any) -> str:
    """``value`` as literal text inside markdown: file names and error messages come from users and
    from storage, and must not add links, HTML, tables or lines to an artifact."""
    text = _MARKDOWN_SPECIAL.sub(r"\\\1", str(value))
    text = "".join(_HTML_SPECIAL.get(ch, ch) for ch in text)
    return re.sub(r"\r\n|\r|\n", r"\\n", text)


def summary_markdown(summary: dict[str, Any]) -> str:
    """The run summary as markdown, every value from users or storage shown literally."""
    md = markdown_text
    url = summary.get("mlflow_run_url")
    lines = [
        f"# shardwise run {'succeeded' if summary['succeeded'] else 'FAILED'}",
        "",
        f"- output: {md(summary['output'])}",
        f"- rows: {summary['rows']:.0f} ({summary['rows_computed']:.0f} computed, {summary['rows_reused']:.0f} reused"
        + (f", {summary['rows_cached']:.0f} from the row cache" if summary["rows_cached"] else "")
        + f"; {summary['error_rows']:.0f} with errors, {summary['duplicate_ids']:.0f} duplicate ids)",
        f"- shards: {summary['shards_committed']}/{summary['shards_total']} committed",
        *(
            [f"- valid structured output: {summary['schema_valid_rows']:.0f} rows ({summary['schema_valid_rate']:.1%})"]
            if "schema_valid_rows" in summary
            else []
        ),
        f"- throughput of computed rows: {summary['rows_per_s']:.1f} rows/s, "
        f"{summary['generated_tok_per_s']:.1f} generated tok/s",
        f"- estimated cost: {summary['cost']:.6f} {md(summary['currency'])} ({md(summary['device_type'])})"
        + (f"; {md(summary['token_basis'])}" if summary.get("token_basis") else ""),
        *(
            [f"- estimated cost saved by the row cache: {summary['cost_saved_estimate']:.6f} {md(summary['currency'])}"]
            if summary["rows_cached"]
            else []
        ),
        f"- MLflow run: {md(summary['mlflow_run_id'])}" + (f" ([open](<{md(url)}>))" if url else ""),
    ]
    if summary["failures"]:
        lines += ["", "## Failed shards", ""]
        lines += [f"- {md(f['shard'])} ({md(f['source'])}): {md(f['error'])}" for f in summary["failures"]]
    return "\n".join(lines)


def report(
    cfg: JobConfig,
    outcome: CommitOutcome,
    results: list[ShardResult],
    run_id: str,
    wall_seconds: float,
    unreadable: tuple[UnreadableFile, ...] = (),
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Sum the run up, close its MLflow run and record it in the row cache; returns the summary
    and one row per shard (what the flow publishes as its artifacts)."""
    price = price_for(cfg, results)
    summary = build_summary(cfg, outcome, results, run_id, wall_seconds, price, unreadable)
    manifest = outcome.manifest()
    numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    finish_run(run_id, numbers, manifest, outcome.succeeded, price, cfg.output, results)
    rows = []
    for r in sorted(results, key=lambda r: r.index):
        m = shard_metrics(r, price)
        rows.append(
            {
                "shard": r.name,
                "rows": r.rows,
                "rows_computed": r.rows_computed,
                "rows_cached": r.rows_cached,
                "generated_tok_per_s": round(m["shard_generated_tok_per_s"], 2),
                "rows_per_s": round(m["shard_rows_per_s"], 2),
                "seconds": round(r.seconds, 3),
                "cost": round(m["shard_cost"], 6),
                "status": "reused" if r.resumed else r.status,
                "worker": r.worker.name or "",
                "error": redact_text(r.error or ""),
            }
        )
        if cfg.output_schema_hash is not None:  # every row has the column; unknown for failed shards
            rows[-1]["schema_valid_rate"] = (
                round(r.schema_valid_rows / r.rows, 4) if r.schema_valid_rows is not None and r.rows else None
            )
    if cfg.cache:
        from shardwise.tasks.records.row_cache import RowCache

        RowCache(cfg.cache, cfg.storage_options).record_run(
            {
                "job": cfg.name,
                "mlflow_run_id": run_id,
                "rows_cached": outcome.totals.rows_cached,
                "rows_computed": outcome.totals.rows_computed,
            }
        )
    return summary, rows
