"""The end of a run: totals, cost, MLflow close-out and the Prefect artifacts people look at."""

from __future__ import annotations

import re
import time
from typing import Any

from prefect import task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.config.prices import Price, detect_device_type, lookup_price
from shardwise.tasks.output.manifest import CommitOutcome
from shardwise.tasks.planning.shards import UnreadableFile
from shardwise.tasks.records.results import ShardResult
from shardwise.tasks.redaction import redact_text, redact_uri
from shardwise.tasks.tracking.runs import finish_run, run_metrics, shard_metrics


def start_progress(total: int, done: int) -> Any:
    """A progress artifact on the flow run (percent of shards committed), updated as shards land."""
    return create_progress_artifact(
        progress=100.0 * done / total if total else 100.0,
        key="shard-progress",
        description=f"Shards committed out of {total}",
    )


def update_progress(artifact_id: Any, done: int, total: int, description: str | None = None) -> None:
    update_progress_artifact(artifact_id, progress=100.0 * done / total if total else 100.0, description=description)


class ProgressUpdates:
    """Updates of the progress artifact, at most one per ``min_interval_s``, and the latest one
    always sent by :meth:`finish`: each is an API call, which with many small shards would cost
    more than the shards themselves."""

    def __init__(self, artifact_id: Any, total: int, min_interval_s: float = 2.0) -> None:
        self.artifact_id, self.total, self.min_interval_s = artifact_id, total, min_interval_s
        self._last_sent = time.monotonic()
        self._unsent: tuple[int, str | None] | None = None

    def update(self, done: int, description: str | None = None) -> bool:
        """Send ``done`` of ``total`` if the last update is old enough; True when it was sent."""
        self._unsent = (done, description)
        if time.monotonic() - self._last_sent < self.min_interval_s:
            return False
        self.finish()
        return True

    def finish(self) -> None:
        """Send the latest update if it was held back."""
        if self._unsent is not None:
            update_progress(self.artifact_id, self._unsent[0], self.total, self._unsent[1])
            self._unsent, self._last_sent = None, time.monotonic()


def price_for(cfg: JobConfig, results: list[ShardResult]) -> Price:
    """The price of the device the shards actually ran on (or the config's override)."""
    device = next((r.device for r in results if r.device), None)
    device_type = cfg.device_type or detect_device_type(device)
    return lookup_price(device_type, cfg.price_per_device_hour)


def worker_usage(results: list[ShardResult]) -> dict[str, dict[str, Any]]:
    """Shards each worker ran in this run, and how often it loaded each model (1 when cached)."""
    usage: dict[str, dict[str, Any]] = {}
    for r in results:
        if r.resumed or r.worker is None:
            continue
        entry = usage.setdefault(r.worker, {"shards": 0, "model_loads": {}})
        entry["shards"] += 1
        for spec, count in r.model_loads.items():
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
    metrics = run_metrics(outcome.totals, wall_seconds, price, outcome.duplicate_ids)
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
        **metrics,
    }


def mlflow_run_url(run_id: str) -> str | None:
    """A browser link when MLflow is a server; a sqlite file has no UI address of its own."""
    from shardwise.tasks.storage.local_state import tracking_uri

    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    from mlflow.tracking import MlflowClient

    experiment_id = MlflowClient(uri).get_run(run_id).info.experiment_id
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


def _markdown(summary: dict[str, Any]) -> str:
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
        f"- estimated cost: {summary['cost']:.6f} {md(summary['currency'])} ({md(summary['device_type'])})",
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
) -> dict[str, Any]:
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
                "worker": r.worker or "",
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
    create_table_artifact(rows, key="shard-results", description="One row per shard")
    create_markdown_artifact(_markdown(summary), key="run-summary", description="shardwise run summary")
    return summary


@task(name="report", retries=2, retry_delay_seconds=2)
def report_task(
    cfg: JobConfig,
    outcome: CommitOutcome,
    results: list[ShardResult],
    run_id: str,
    wall_seconds: float,
    unreadable: tuple[UnreadableFile, ...] = (),
) -> dict[str, Any]:
    return report(cfg, outcome, results, run_id, wall_seconds, unreadable)
