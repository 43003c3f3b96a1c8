"""What a run reports, through the CLI: escaped Prefect markdown, and honest accounting on resume
(computed and reused rows apart, rates and cost over what this run computed)."""

from __future__ import annotations

import json
import re

import pytest

from shardwise.tasks.records.demo_data import write_reviews_dataset

pytestmark = pytest.mark.slow

NASTY_NAME = "bad|name*<script>alert(1)`tick`_x_[y]\nline2.parquet"  # no "/": not allowed in a name


def flow_run_artifacts(flow_run_id: str) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a.data for a in artifacts}


def test_file_names_and_errors_are_escaped_in_the_markdown_summary(cli, tmp_path):
    source = tmp_path / "in"
    write_reviews_dataset(str(source), files=1, rows_per_file=4, rows_per_group=2)
    good = (source / "reviews-000.parquet").read_bytes()
    (source / NASTY_NAME).write_bytes(good[: len(good) // 2])  # truncated: unreadable, so reported
    output = tmp_path / "out"
    proc = cli("run", "--input", str(source), "--output", str(output), "--task", "embed", "--id-column", "review_id")
    assert proc.returncode == 1, proc.stderr[-3000:]
    manifest = json.loads((output / "_manifest.json").read_text())
    summary = flow_run_artifacts(manifest["prefect_flow_run_id"])["run-summary"]
    assert isinstance(summary, str) and "## Failed shards" in summary
    assert "<script>" not in summary and "&lt;script&gt;" in summary
    # No markdown syntax survives from the name or the error text: each of these is escaped.
    for char in "|*`[]":
        assert not re.search(r"(?<!\\)" + re.escape(char), summary), (char, summary)
    # The newline in the name does not start a line of its own.
    assert not any(line.startswith("line2") for line in summary.splitlines()), summary
    failure = [line for line in summary.splitlines() if "alert(1)" in line or "alert\\(1\\)" in line]
    assert len(failure) == 1 and failure[0].startswith("- ") and "line2" in failure[0], summary


def test_resumed_run_reports_computed_and_reused_rows_and_bills_only_computed(cli, tmp_path):
    from mlflow.tracking import MlflowClient

    from shardwise.tasks.storage.local_state import tracking_uri

    source = tmp_path / "in"
    write_reviews_dataset(str(source), files=2, rows_per_file=6, rows_per_group=3)
    output = tmp_path / "out"
    job = [
        "run",
        "--input",
        str(source),
        "--output",
        str(output),
        "--task",
        "both",
        "--id-column",
        "review_id",
        "--rows-per-shard",
        "3",
        "--max-new-tokens",
        "2",
        "--set",
        "price_per_device_hour=3.6",
    ]
    first = cli(*job)
    assert first.returncode == 0, first.stderr[-3000:]
    first_manifest = json.loads((output / "_manifest.json").read_text())
    first_totals = first_manifest["totals"]
    assert first_totals["rows_computed"] == 12 and first_totals["rows_reused"] == 0

    # Lose one part (and the _SUCCESS that vouched for it): the rerun recomputes 3 rows, reuses 9.
    lost = first_manifest["shards"][1]
    (output / lost["part"]).unlink()
    (output / "_SUCCESS").unlink()
    rerun = cli(*job)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert re.search(r"^rows\s+12 \(", rerun.stdout, re.M), rerun.stdout
    assert re.search(r"^computed\s+3 rows \(9 reused from earlier runs\)", rerun.stdout, re.M), rerun.stdout

    manifest = json.loads((output / "_manifest.json").read_text())
    totals = manifest["totals"]
    assert (totals["rows"], totals["rows_computed"], totals["rows_reused"]) == (12, 3, 9)
    # Tokens of the whole output (reused parts carry theirs in their footers), and of this run alone.
    assert totals["generated_tokens"] == first_totals["generated_tokens"] > 0
    assert 0 < totals["generated_tokens_computed"] < totals["generated_tokens"]
    assert totals["generated_tokens_computed"] == lost_tokens(first_manifest, lost["shard_id"])

    metrics = MlflowClient(tracking_uri()).get_run(manifest["mlflow_run_id"]).data.metrics
    assert (metrics["rows"], metrics["rows_computed"], metrics["rows_reused"]) == (12, 3, 9)
    assert metrics["cost"] > 0
    assert metrics["cost_per_1k_rows"] == pytest.approx(metrics["cost"] / 3 * 1000)
    assert metrics["rows_per_s"] == pytest.approx(3 / metrics["seconds"])
    assert metrics["generated_tok_per_s"] == pytest.approx(totals["generated_tokens_computed"] / metrics["seconds"])
    assert metrics["cost"] == pytest.approx(metrics["device_seconds"] * 3.6 / 3600)

    table = flow_run_artifacts(manifest["prefect_flow_run_id"])["shard-results"]
    rows = json.loads(table) if isinstance(table, str) else table
    by_status = {}
    for row in rows:
        by_status.setdefault(row["status"], []).append(row)
    assert len(by_status["committed"]) == 1 and len(by_status["reused"]) == 3, rows
    assert all(r["rows_per_s"] == 0 and r["cost"] == 0 for r in by_status["reused"]), rows
    assert by_status["committed"][0]["rows"] == 3 and by_status["committed"][0]["rows_per_s"] > 0

    markdown = flow_run_artifacts(manifest["prefect_flow_run_id"])["run-summary"]
    assert "3 computed, 9 reused" in markdown


def lost_tokens(manifest: dict, shard_id: str) -> int:
    (entry,) = [s for s in manifest["shards"] if s["shard_id"] == shard_id]
    return entry["generated_tokens"]
