"""The per-run pictures logged to MLflow: throughput per shard over time and cumulative cost; generated
lengths tonight vs the quality baseline."""

from __future__ import annotations

from typing import Any

from shardwise.tasks.config.prices import Price
from shardwise.tasks.records.results import ShardResult


def _figure(width: float, height: float, **margins: float) -> Any:
    """A bare matplotlib Figure with fixed margins: no pyplot (whose import and figure registry
    cost ~0.15 s a run and need an explicit close) and no tight_layout (~0.2 s of text measuring).
    MLflow's ``log_figure`` saves it through the Agg canvas like any other."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    figure.subplots_adjust(**margins)
    return figure


def throughput_figure(results: list[ShardResult], price: Price) -> Any:
    ordered = sorted(results, key=lambda r: r.finished_at)
    start = min(r.finished_at - r.seconds for r in ordered)
    times = [r.finished_at - start for r in ordered]
    rows_per_s = [r.rows / max(r.seconds, 1e-9) for r in ordered]
    tok_per_s = [r.tokens.generated / max(r.timings.compute, 1e-9) for r in ordered]
    cumulative, total = [], 0.0
    for r in ordered:
        uncached = r.tokens - r.cached_tokens
        total += price.total_cost(r.seconds, uncached.prompt, uncached.generated, uncached.embedded)
        cumulative.append(total)

    figure = _figure(8, 6, left=0.1, right=0.9, bottom=0.09, top=0.94, hspace=0.3)
    top, bottom = figure.subplots(2, 1, sharex=True)
    top.plot(times, rows_per_s, "o-", color="tab:blue", label="rows/s")
    top.set_ylabel("rows/s", color="tab:blue")
    if any(tok_per_s):
        right = top.twinx()
        right.plot(times, tok_per_s, "s--", color="tab:orange", label="generated tok/s")
        right.set_ylabel("generated tok/s", color="tab:orange")
    top.set_title(f"Throughput per shard ({len(ordered)} shards)")
    top.grid(alpha=0.3)
    bottom.step(times, cumulative, where="post", color="tab:green")
    bottom.set_ylabel(f"cumulative cost ({price.currency})")
    bottom.set_xlabel("seconds since the first shard started")
    tokens = f"; {price.token_basis()}" if price.endpoint_roles else ""
    bottom.set_title(f"Cost at {price.per_hour:.2f} {price.currency}/h ({price.device_type}){tokens}")
    bottom.grid(alpha=0.3)
    return figure


def generated_length_figure(
    tonight: dict[str, int], baseline: dict[str, int] | None, baseline_label: str | None = None
) -> Any:
    """Distribution of generated lengths (tokens per answer) tonight next to the baseline's, as
    shares of answers so that outputs of different sizes compare."""
    figure = _figure(8, 4, left=0.1, right=0.97, bottom=0.13, top=0.9)
    axes = figure.subplots()
    for histogram, label, colour, offset in (
        (baseline, f"baseline ({baseline_label})", "tab:gray", -0.2),
        (tonight, "tonight", "tab:blue", 0.2),
    ):
        if not histogram:
            continue
        total = sum(histogram.values())
        lengths = sorted(histogram, key=int)
        axes.bar(
            [int(n) + offset for n in lengths],
            [histogram[n] / total for n in lengths],
            width=0.4,
            color=colour,
            label=label,
        )
    axes.set_xlabel("generated tokens per answer")
    axes.set_ylabel("share of answers")
    axes.set_title("Generated lengths: tonight vs baseline" if baseline else "Generated lengths (no baseline)")
    axes.legend()
    axes.grid(alpha=0.3)
    return figure
