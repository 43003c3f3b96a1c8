"""Where a run's wall time went: its phases, and what the shards cost beyond reading, computing
and writing.

On a fast GPU the model work of a whole job can take seconds, so the flow's own costs (planning,
the forecast, tracking, scheduling each shard, the report) decide the real speed. The flow times
each phase with :class:`RunTimer`; :func:`timing_figures` turns that into the figures logged to
MLflow and put in the run summary:

- ``seconds_<phase>``: wall seconds of each phase of the flow body;
- ``seconds_fixed``: the run's wall time outside the shards phase (what a run costs however
  little data it has); the Prefect server's start-up is not in it (it starts before the flow);
- ``seconds_shard_overhead``: the shards phase's wall time not spent reading, computing or
  writing (task scheduling, state calls, per-shard logging), per shard;
- ``seconds_write_hidden``: seconds of the shards' writes that ran while another shard computed
  (with more than one shard in flight), i.e. write time the device did not wait for.
"""

from __future__ import annotations

import bisect
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from shardwise.tasks.records.results import ShardResult

SHARDS_PHASE = "shards"


@dataclass
class RunTimer:
    """Wall seconds per named phase, from one start."""

    started: float = field(default_factory=time.perf_counter)
    phases: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - began

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def timing_figures(timer: RunTimer, results: list[ShardResult], workers: int = 1) -> dict[str, float]:
    """The run's timing figures (see the module docstring). ``workers`` shards run at once, so
    the shards phase is compared with their read + compute + write seconds over ``workers``."""
    computed = [r for r in results if not r.resumed]
    busy = sum(r.seconds for r in computed)
    shards_wall = timer.phases.get(SHARDS_PHASE, 0.0)
    wall = timer.elapsed()
    figures = {f"seconds_{name}": seconds for name, seconds in timer.phases.items()}
    figures["seconds_fixed"] = max(0.0, wall - shards_wall)
    figures["seconds_shard_overhead"] = (
        max(0.0, shards_wall - busy / max(workers, 1)) / len(computed) if computed else 0.0
    )
    figures["seconds_write_hidden"] = write_seconds_hidden(computed)
    return figures


def write_seconds_hidden(results: list[ShardResult]) -> float:
    """Seconds of the shards' writes that overlap some shard's compute. A shard's own compute ends
    where its write starts, so the union of all compute spans serves for every shard."""
    timings = [r.timings for r in results]
    spans = sorted((t.compute_started_at, t.compute_ended_at) for t in timings if t.compute_ended_at > 0)
    merged: list[list[float]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    starts = [start for start, _ in merged]
    hidden = 0.0
    for t in timings:
        if t.write_ended_at <= 0:
            continue
        # from the last compute span starting before this write, on through those starting within it
        i = max(0, bisect.bisect_right(starts, t.write_started_at) - 1)
        while i < len(merged) and merged[i][0] < t.write_ended_at:
            hidden += max(0.0, min(merged[i][1], t.write_ended_at) - max(merged[i][0], t.write_started_at))
            i += 1
    return hidden
