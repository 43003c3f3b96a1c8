"""Where a run's time went: phase timings and the per-shard overhead figure."""

from __future__ import annotations

import time

import pytest

from tasks.results import ShardResult
from tasks.run_timings import SHARDS_PHASE, RunTimer, timing_figures


def shard(index: int, read: float, compute: float, write: float, resumed: bool = False) -> ShardResult:
    return ShardResult(index=index, shard_id=f"s{index}", name=f"shard-{index}", source="in.parquet",
                       status="committed", rows=10, seconds_read=read, seconds_compute=compute,
                       seconds_write=write, resumed=resumed)


def test_phases_add_up_and_the_fixed_cost_is_everything_but_the_shards():
    timer = RunTimer()
    with timer.phase("plan"):
        time.sleep(0.05)
    with timer.phase(SHARDS_PHASE):
        time.sleep(0.2)
    with timer.phase("plan"):  # a phase entered twice adds up
        time.sleep(0.05)
    figures = timing_figures(timer, [shard(0, 0.01, 0.1, 0.01)])
    assert figures["seconds_plan"] == pytest.approx(0.1, abs=0.04)
    assert figures["seconds_shards"] == pytest.approx(0.2, abs=0.04)
    assert figures["seconds_fixed"] == pytest.approx(timer.elapsed() - figures["seconds_shards"], abs=0.01)
    # 0.2 s of shards phase, 0.12 s of it reading, computing and writing: the rest is overhead.
    assert figures["seconds_shard_overhead"] == pytest.approx(0.08, abs=0.04)


def test_shard_overhead_is_per_computed_shard_and_counts_parallel_workers():
    timer = RunTimer(phases={SHARDS_PHASE: 10.0})
    results = [shard(i, 0.5, 3.0, 0.5) for i in range(4)] + [shard(9, 0, 0, 0, resumed=True)]
    assert timing_figures(timer, results)["seconds_shard_overhead"] == 0.0  # 16 busy seconds > 10 wall
    assert timing_figures(timer, results, workers=2)["seconds_shard_overhead"] == pytest.approx((10 - 8) / 4)
    assert timing_figures(timer, [])["seconds_shard_overhead"] == 0.0
