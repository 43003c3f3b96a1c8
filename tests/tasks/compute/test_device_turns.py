"""Shards' turns on a device: one at a time for most engines, side by side for an engine that
batches concurrent calls, and in both cases billed seconds that add up to the device's busy time."""

from __future__ import annotations

import threading
import time

from shardwise.tasks.compute.device_turns import device_turn


def _run_turns(device: str, shared: bool, holds: list[float]) -> tuple[list, float]:
    """Threads that each hold a turn for the given seconds, started together; their turns and the
    wall time from the first start to the last end."""
    turns: list = [None] * len(holds)
    start = threading.Barrier(len(holds))

    def hold(i: int) -> None:
        start.wait()
        with device_turn(device, shared) as turn:
            time.sleep(holds[i])
        turns[i] = turn

    threads = [threading.Thread(target=hold, args=(i,)) for i in range(len(holds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(t.ended for t in turns) - min(t.started for t in turns)
    return turns, wall


def test_exclusive_turns_run_one_at_a_time_each_billed_its_own_span():
    turns, wall = _run_turns("test-exclusive", shared=False, holds=[0.3, 0.3])
    first, second = sorted(turns, key=lambda t: t.started)
    assert second.started >= first.ended  # the device lock: no overlap
    for turn in turns:
        assert abs(turn.billed - turn.span) < 1e-6 and turn.span >= 0.3
    assert wall >= 0.6


def test_shared_turns_overlap_and_split_the_time_they_share():
    turns, wall = _run_turns("test-shared", shared=True, holds=[0.6, 0.3])
    long, short = turns
    assert short.started < long.ended and long.started < short.ended  # side by side
    # Billed seconds add up to the device's busy time, not to the sum of the spans.
    assert abs(long.billed + short.billed - wall) < 0.02
    assert long.billed + short.billed < long.span + short.span - 0.2
    # While both ran, each was billed half; the long one alone for the rest.
    assert abs(short.billed - short.span / 2) < 0.02
    assert abs(long.billed - (long.span - short.span / 2)) < 0.02
