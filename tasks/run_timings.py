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
  writing (task scheduling, state calls, per-shard logging), per shard.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from tasks.results import ShardResult

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
    return figures
