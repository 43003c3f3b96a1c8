"""A forecast's figures: each quantity as a range with the basis it was made on (:class:`Estimate`),
the :class:`Forecast` of one run with its dict and MLflow forms, the sum over the partitions of a
backfill, and the table ``shardwise plan`` prints."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from shardwise.tasks.forecasting.calibration import Calibration
from shardwise.tasks.planning.shards import Shard


@dataclass(frozen=True)
class Estimate:
    """A forecast quantity: a range and the basis it was made on."""

    low: float
    expected: float
    high: float
    basis: str

    def to_dict(self) -> dict[str, Any]:
        return {"low": self.low, "expected": self.expected, "high": self.high, "basis": self.basis}

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


@dataclass
class Forecast:
    rows: int
    rows_to_compute: int
    shards: int
    shards_to_compute: int
    files: int
    device_type: str
    price_per_device_hour: float
    currency: str
    workers: int
    rows_cached: int = 0  # pending rows the row cache holds: not computed, not counted below
    prompt_tokens: Estimate | None = None
    generated_tokens: Estimate | None = None
    embedded_tokens: Estimate | None = None
    device_seconds: Estimate | None = None
    wall_seconds: Estimate | None = None
    cost: Estimate | None = None
    history_runs: list[str] = field(default_factory=list)
    calibration: Calibration | None = None
    # Expected cost of one more prompt token (part of ``cost``), and the prompt tokens of each shard
    # whose prompts were counted (by shard id): a shard's own estimate follows its prompts' length.
    prompt_token_cost: float = 0.0
    shard_prompt_tokens: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in list(data):
            if isinstance(getattr(self, key), Estimate):
                data[key] = getattr(self, key).to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Forecast:
        values = dict(data)
        for key in ("prompt_tokens", "generated_tokens", "embedded_tokens", "device_seconds", "wall_seconds", "cost"):
            if values.get(key) is not None:
                values[key] = Estimate(**values[key])
        if values.get("calibration") is not None:
            calibration = dict(values["calibration"])
            calibration["generated_per_row"] = tuple(calibration["generated_per_row"])
            values["calibration"] = Calibration(**calibration)
        return cls(**values)

    def cost_per_row(self) -> float:
        """Expected cost of computing one row (0 when there is nothing to compute)."""
        if not self.cost or not self.rows_to_compute:
            return 0.0
        return self.cost.expected / self.rows_to_compute

    def shard_cost(self, shard: Shard) -> float:
        """Expected cost of computing ``shard``: the cost per row, corrected by how far this shard's
        own prompt tokens (when counted) are from the average prompt's."""
        average = self.cost_per_row() * shard.num_rows
        tokens = self.shard_prompt_tokens.get(shard.shard_id)
        if tokens is None or self.prompt_tokens is None or not self.rows_to_compute:
            return average
        typical = self.prompt_tokens.expected / self.rows_to_compute * shard.num_rows
        return max(average + self.prompt_token_cost * (tokens - typical), 0.0)

    def mlflow_values(self) -> tuple[dict[str, str], dict[str, float]]:
        """(params, metrics) named ``forecast_*``: bases as params, numbers as metrics."""
        params: dict[str, str] = {"forecast_device_type": self.device_type}
        metrics: dict[str, float] = {"forecast_rows_to_compute": self.rows_to_compute}
        for key in ("prompt_tokens", "generated_tokens", "embedded_tokens", "device_seconds", "cost"):
            estimate = getattr(self, key)
            if estimate is None:
                continue
            params[f"forecast_{key}_basis"] = estimate.basis[:500]
            for end in ("low", "expected", "high"):
                metrics[f"forecast_{key}_{end}"] = float(getattr(estimate, end))
        return params, metrics


def sum_forecasts(forecasts: list[Forecast]) -> Forecast:
    """The forecast of running several partitions one after another (a backfill): counts, ranges
    and seconds add up; each basis is the partitions' own when they share it, else their kinds."""
    first = forecasts[0]
    total = Forecast(
        rows=sum(f.rows for f in forecasts),
        rows_to_compute=sum(f.rows_to_compute for f in forecasts),
        shards=sum(f.shards for f in forecasts),
        shards_to_compute=sum(f.shards_to_compute for f in forecasts),
        files=sum(f.files for f in forecasts),
        device_type=first.device_type,
        price_per_device_hour=first.price_per_device_hour,
        currency=first.currency,
        workers=first.workers,
        history_runs=sorted({run for f in forecasts for run in f.history_runs}),
        calibration=next((f.calibration for f in forecasts if f.calibration is not None), None),
    )
    for key in ("prompt_tokens", "generated_tokens", "embedded_tokens", "device_seconds", "wall_seconds", "cost"):
        estimates: list[Estimate] = [getattr(f, key) for f in forecasts if getattr(f, key) is not None]
        if not estimates:
            continue
        kinds = sorted({e.basis.split(":")[0] for e in estimates})
        basis = (
            f"sum over {len(estimates)} partition(s); each {estimates[0].basis}"
            if len(kinds) == 1
            else f"sum over {len(estimates)} partitions; bases: {', '.join(kinds)}"
        )
        setattr(
            total,
            key,
            Estimate(
                sum(e.low for e in estimates), sum(e.expected for e in estimates), sum(e.high for e in estimates), basis
            ),
        )
    return total


def format_forecast(forecast: Forecast, title: str = "shardwise plan (nothing was run)") -> str:
    """The human table ``shardwise plan`` prints."""

    def number(value: float, money: bool = False) -> str:
        return f"{value:.6f}" if money else f"{value:,.0f}" if value >= 100 else f"{value:.1f}"

    lines = [
        "",
        title,
        "-" * len(title),
        f"{'rows':<18}{forecast.rows} in {forecast.files} files, {forecast.shards} shards",
        f"{'to compute':<18}{forecast.rows_to_compute} rows in {forecast.shards_to_compute} shards"
        + (f" ({forecast.rows_cached} more rows from the row cache)" if forecast.rows_cached else ""),
        f"{'device':<18}{forecast.device_type} x {forecast.workers} worker(s), "
        f"{forecast.price_per_device_hour:g} {forecast.currency}/h",
        "",
        f"{'':<18}{'low':>14}{'expected':>14}{'high':>14}  basis",
    ]
    for label, key, money in (
        ("prompt tokens", "prompt_tokens", False),
        ("generated tokens", "generated_tokens", False),
        ("embedded tokens", "embedded_tokens", False),
        ("device-seconds", "device_seconds", False),
        ("wall seconds", "wall_seconds", False),
        (f"cost ({forecast.currency})", "cost", True),
    ):
        e: Estimate | None = getattr(forecast, key)
        if e is None:
            continue
        lines.append(
            f"{label:<18}{number(e.low, money):>14}{number(e.expected, money):>14}"
            f"{number(e.high, money):>14}  {e.basis}"
        )
    return "\n".join(lines)
