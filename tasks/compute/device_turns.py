"""A shard's turn on its device, and the device seconds it is billed for.

Most engines compute one shard at a time on a device (the device lock): a second shard in flight
reads or writes meanwhile, and its compute waits. An engine that batches the rows of several
callers together (vLLM: ``batches_across_calls``) computes the shards in flight at once; while
``n`` shards compute together, each is billed ``1/n`` of that wall time, so the shards' billed
seconds add up to the time the device was busy, as with one shard at a time.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["DeviceTurn", "device_turn"]


@dataclass
class DeviceTurn:
    """One shard's compute on a device: its wall span and its billed share of it."""

    started: float = 0.0
    ended: float = 0.0
    billed: float = 0.0

    @property
    def span(self) -> float:
        return self.ended - self.started


class _SharedDevice:
    """The turns computing on one device now, each accruing its share of the wall time."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._active: list[DeviceTurn] = []
        self._since = 0.0

    def _advance(self, now: float) -> None:
        if self._active:
            share = (now - self._since) / len(self._active)
            for turn in self._active:
                turn.billed += share
        self._since = now

    def enter(self, turn: DeviceTurn) -> None:
        with self._guard:
            turn.started = time.perf_counter()
            self._advance(turn.started)
            self._active.append(turn)

    def leave(self, turn: DeviceTurn) -> None:
        with self._guard:
            turn.ended = time.perf_counter()
            self._advance(turn.ended)
            self._active.remove(turn)


_DEVICES: dict[str, _SharedDevice] = {}
_DEVICES_GUARD = threading.Lock()


@contextlib.contextmanager
def device_turn(device: str | None, shared: bool) -> Iterator[DeviceTurn]:
    """A turn on ``device`` for the block: alone on it (after the device lock) unless ``shared``,
    when the engines batch concurrent calls together and shards compute side by side."""
    from shardwise.gpu_runtime import device_lock

    key = str(device or "cpu")
    with _DEVICES_GUARD:
        accounts = _DEVICES.setdefault(key, _SharedDevice())
    turn = DeviceTurn()
    with contextlib.nullcontext() if shared else device_lock(key):
        accounts.enter(turn)
        try:
            yield turn
        finally:
            accounts.leave(turn)
