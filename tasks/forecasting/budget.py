"""A cost ceiling for one run (``max_cost``) and the progress line that reports against the forecast.

With ``max_cost`` set, the flow hands shards to the task runner a few at a time (as many as can run
at once, on Ray too) instead of mapping them all up front, and starts the next one only while the cost spent
so far, plus the estimated cost of the shards in flight, plus the next shard's own estimate stays
within the ceiling. The flow is the one place that sees every shard finish, on every runner
(threads, worker processes, Ray), so no shared ledger is needed. A shard's estimate is the
forecast's expected cost of that shard (its rows, and its own prompt tokens where the forecast
counted them: a shard of long prompts costs more than one of short prompts), or its rows at the
cost per row measured so far in this run when that is higher. Shards already committed stay; the
run ends failed with "budget reached", and a rerun with a higher ceiling resumes from them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shardwise.tasks.planning.shards import Shard
from shardwise.tasks.records.results import ShardResult


@dataclass
class BudgetGuard:
    """Decides whether the next shard may start under ``max_cost``."""

    max_cost: float
    forecast_cost_per_row: float
    spent: float = 0.0
    computed_rows: int = 0
    in_flight: dict[int, float] = field(default_factory=dict)
    stopped: bool = False
    # The forecast's expected cost of one shard; without it, its rows at ``forecast_cost_per_row``.
    shard_forecast: Callable[[Shard], float] | None = None

    @classmethod
    def for_forecast(cls, max_cost: float, forecast: Any) -> BudgetGuard:
        """A guard whose shard estimates come from ``forecast`` (a ``Forecast``, or None: no estimate)."""
        if forecast is None:
            return cls(max_cost, 0.0)
        return cls(max_cost, forecast.cost_per_row(), shard_forecast=forecast.shard_cost)

    def cost_per_row(self) -> float:
        measured = self.spent / self.computed_rows if self.computed_rows else 0.0
        return max(self.forecast_cost_per_row, measured)

    def estimate(self, shard: Shard) -> float:
        """What ``shard`` is expected to cost: the forecast's figure for it, or more when this run's
        shards so far cost more per row."""
        forecast = self.shard_forecast(shard) if self.shard_forecast else self.forecast_cost_per_row * shard.num_rows
        measured = self.spent / self.computed_rows if self.computed_rows else 0.0
        return max(forecast, measured * shard.num_rows)

    def may_start(self, shard: Shard) -> bool:
        """Whether ``shard`` fits under the ceiling now; once one does not, none starts after it."""
        if self.stopped:
            return False
        estimate = self.estimate(shard)
        if self.spent + sum(self.in_flight.values()) + estimate > self.max_cost:
            self.stopped = True
            return False
        self.in_flight[shard.index] = estimate
        return True

    def finished(self, result: ShardResult, cost: float) -> None:
        self.in_flight.pop(result.index, None)
        self.spent += cost
        if result.status == "committed":
            self.computed_rows += result.rows

    def message(self, not_started: int, currency: str) -> str:
        return (
            f"budget reached: spent {self.spent:.6f} of max_cost {self.max_cost:g} {currency}; "
            f"{not_started} shard(s) not started (committed ones are kept: rerun with a higher "
            "--max-cost to finish)"
        )


def unstarted(shards: list[Shard], results: list[ShardResult]) -> int:
    seen = {r.index for r in results}
    return sum(1 for s in shards if s.index not in seen)


@dataclass
class ProgressMeter:
    """Rows done, rate, ETA and cost so far against the forecast, for the per-shard log line."""

    rows_to_compute: int
    forecast_cost: float | None
    currency: str
    started: float = field(default_factory=time.perf_counter)
    rows_done: int = 0
    cost: float = 0.0

    def add(self, result: ShardResult, cost: float) -> None:
        self.cost += cost
        if result.status == "committed" and not result.resumed:
            self.rows_done += result.rows

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = self.rows_done / elapsed
        left = max(self.rows_to_compute - self.rows_done, 0)
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        against = f" of {self.forecast_cost:.6f} forecast" if self.forecast_cost is not None else ""
        return (
            f"{self.rows_done}/{self.rows_to_compute} rows, {rate:.2f} rows/s, ETA {eta}, "
            f"cost {self.cost:.6f}{against} {self.currency}"
        )

    def percent(self) -> float:
        return 100.0 * self.rows_done / self.rows_to_compute if self.rows_to_compute else 100.0


def forecast_from(data: dict[str, Any] | None) -> Any:
    from shardwise.tasks.forecasting.estimates import Forecast

    return Forecast.from_dict(data) if data else None


def shard_capacity(cfg: Any) -> int:
    """How many shards the job's task runner runs at once (what a budgeted run keeps in flight)."""
    from shardwise.tasks.compute.runners import shards_in_flight, worker_count

    workers = worker_count(cfg)
    return shards_in_flight(cfg) if workers == 1 and cfg.runner == "local" else workers
