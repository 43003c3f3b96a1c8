"""The report of a backfill: what happened to each date partition, counted by outcome.

Each partition is run at most once per backfill (see
:mod:`shardwise.tasks.orchestration.deployments`); its outcome is a dict with ``date``, ``output``
and ``status`` (``ran``, ``skipped``, ``failed``, ...) and whatever else explains it.
"""

from __future__ import annotations

from typing import Any


def backfill_summary(outcomes: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """The report of a backfill (the deployment's or the CLI's) and its one-line message."""
    statuses = ["ran", "skipped", "failed"] + sorted({o["status"] for o in outcomes} - {"ran", "skipped", "failed"})
    counts = {s: sum(o["status"] == s for o in outcomes) for s in statuses}
    message = ", ".join(f"{n} {s}" for s, n in counts.items())
    return {"dates": len(outcomes), **counts, "partitions": outcomes}, f"{message} of {len(outcomes)} dates"
