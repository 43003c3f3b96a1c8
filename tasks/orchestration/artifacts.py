"""The Prefect artifacts of a flow run: shard progress while it runs, then the run summary and the
shard table, and the quality gate's comparison. Their content is made by plain functions
(:mod:`shardwise.tasks.tracking.reporting`, :mod:`shardwise.tasks.quality.report`)."""

from __future__ import annotations

import time
from typing import Any

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from shardwise.tasks.output.verdict import QualityVerdict
from shardwise.tasks.quality.report import markdown
from shardwise.tasks.tracking.reporting import summary_markdown


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


def publish_run_report(summary: dict[str, Any], shard_rows: list[dict[str, Any]]) -> None:
    """The shard table and the run summary, as the flow run's artifacts."""
    create_table_artifact(shard_rows, key="shard-results", description="One row per shard")
    create_markdown_artifact(summary_markdown(summary), key="run-summary", description="shardwise run summary")


def publish_verdict(verdict: QualityVerdict) -> None:
    """The quality gate's comparison of tonight with the baseline, as a markdown artifact."""
    create_markdown_artifact(markdown(verdict), key="quality-gate", description="tonight vs baseline")
