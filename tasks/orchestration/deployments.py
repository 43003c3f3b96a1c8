"""One date partition of a backfill, run through the ``enrich-partition`` deployment exactly once.

The partition is skipped when its output is already complete. Otherwise the deployment is asked
for a run under an idempotency key, so a second backfill over the same dates (even at the same
time) gets the run that already exists instead of a duplicate. A key whose run ended badly is
never reused: the next backfill moves on to the next attempt's key and really reruns it.
"""

from __future__ import annotations

import time
from typing import Any

from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

from shardwise.tasks.schedule.partitions import idempotency_key, partition_config, partition_done

POLL_SECONDS = 2.0
MAX_ATTEMPTS = 50  # keys tried before giving up on finding a fresh one


def wait_for_run(flow_run_id: Any, poll_seconds: float = POLL_SECONDS) -> Any:
    """Block until a flow run reaches a final state (it may first wait for a concurrency slot)."""
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            time.sleep(poll_seconds)


def run_partition(job: str | dict[str, Any], date: str, deployment: str) -> dict[str, Any]:
    """Skip, join or start the partition's run; returns what happened, for the backfill report."""
    cfg = partition_config(job, date)
    outcome: dict[str, Any] = {"date": date, "output": cfg.output}
    if partition_done(cfg):
        return {**outcome, "status": "skipped", "reason": "already complete"}
    for attempt in range(1, MAX_ATTEMPTS + 1):
        key = idempotency_key(deployment, cfg, date, attempt)
        run = run_deployment(
            deployment,
            parameters={"job": job, "date": date},
            idempotency_key=key,
            timeout=0,
            flow_run_name=f"dt={date}",
        )
        stale = (
            run.state is not None and run.state.is_final() and not (run.state.is_completed() and partition_done(cfg))
        )
        if stale:  # an earlier attempt failed, or its output has gone since: a fresh key
            continue
        run = wait_for_run(run.id)
        ok = run.state.is_completed() and partition_done(cfg)
        return {
            **outcome,
            "status": "ran" if ok else "failed",
            "flow_run_id": str(run.id),
            "attempt": attempt,
            "state": run.state.name,
            "message": run.state.message or "",
        }
    return {**outcome, "status": "failed", "reason": f"{MAX_ATTEMPTS} earlier attempts ended badly"}
