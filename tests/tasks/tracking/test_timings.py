"""Where a run's time went: phase timings and the per-shard overhead figure."""

from __future__ import annotations

import time

import pytest

from shardwise.tasks.records.results import ShardResult, ShardTimings
from shardwise.tasks.tracking.timings import SHARDS_PHASE, RunTimer, timing_figures


def shard(index: int, read: float, compute: float, write: float, resumed: bool = False) -> ShardResult:
    return ShardResult(
        index=index,
        shard_id=f"s{index}",
        name=f"shard-{index}",
        source="in.parquet",
        status="committed",
        rows=10,
        timings=ShardTimings(read=read, compute=compute, write=write),
        resumed=resumed,
    )


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


def spans(index: int, compute: tuple[float, float], write_end: float) -> ShardResult:
    return ShardResult(
        index=index,
        shard_id=f"s{index}",
        name=f"shard-{index}",
        source="in.parquet",
        status="committed",
        timings=ShardTimings(
            compute_started_at=compute[0],
            compute_ended_at=compute[1],
            write_started_at=compute[1],
            write_ended_at=write_end,
        ),
    )


def test_write_hidden_is_the_part_of_each_write_under_another_shards_compute():
    timer = RunTimer(phases={SHARDS_PHASE: 10.0})
    # One at a time: each write ends before the next compute starts, nothing is hidden.
    in_turn = [spans(0, (100, 102), 103), spans(1, (103, 105), 106)]
    assert timing_figures(timer, in_turn)["seconds_write_hidden"] == 0.0
    # Shard 0 writes 102-103.5 while shard 1 computes from 102; shard 1's write (104-106) runs
    # 1 s under shard 2's compute (105-107); shard 2's write is alone.
    pipelined = [spans(0, (100, 102), 103.5), spans(1, (102, 104), 106), spans(2, (105, 107), 108)]
    assert timing_figures(timer, pipelined)["seconds_write_hidden"] == pytest.approx(1.5 + 1.0)
    # Worker processes compute at once: a write under two overlapping compute spans counts once.
    parallel = [spans(0, (100, 104), 105), spans(1, (100, 103), 106), spans(2, (104.5, 110), 111)]
    assert timing_figures(timer, parallel)["seconds_write_hidden"] == pytest.approx(0.5 + (1 + 1.5))
    # Shards reused from an earlier run carry no spans and count for nothing.
    assert timing_figures(timer, [spans(0, (0, 0), 0)])["seconds_write_hidden"] == 0.0
