"""Named crash points, so tests can prove exactly-once outputs by killing a real run anywhere.

``SHARDWISE_CRASH_AT=<point>[:<n>]`` makes this process SIGKILL itself the n-th time (default 1st)
it reaches ``<point>``. Unset (always, outside tests) it costs one dictionary lookup.

``SHARDWISE_HANG_AT=<point>[:<n>]`` makes the n-th arrival sleep (interruptibly, in Python) for an
hour instead: a hung worker, for the per-shard timeout to catch. With ``SHARDWISE_HANG_UNTIL=<file>``
the sleep writes ``<file>.reached`` on arrival and ends as soon as ``<file>`` exists, so a test can
release a late worker at the moment it chooses.

``SHARDWISE_RAISE_AT=<point>[:<n>]`` raises :class:`InjectedFault` there instead: an exception
leaving the code mid-way, as a timeout raised into a worker thread or a Ctrl-C would.

The runners hand these variables to every worker they start: worker processes inherit them, and
Ray workers get them through the job's ``runtime_env`` (:func:`fault_environment`).

Points: ``shard-compute`` (rows read, engines running), ``part-write`` (half of a part's bytes
written), ``before-manifest`` (every part published, final manifest not yet written),
``before-success`` (manifest written, ``_SUCCESS`` not yet).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

_reached: Counter[tuple[str, str]] = Counter()
_lock = threading.Lock()


def _arrived(variable: str, name: str) -> bool:
    spec = os.environ.get(variable)
    if not spec:
        return False
    point, _, nth = spec.partition(":")
    if point != name:
        return False
    with _lock:
        _reached[(variable, name)] += 1
        return _reached[(variable, name)] == int(nth or 1)


FAULT_VARIABLES = ("SHARDWISE_CRASH_AT", "SHARDWISE_RAISE_AT", "SHARDWISE_HANG_AT", "SHARDWISE_HANG_UNTIL")


def fault_environment() -> dict[str, str]:
    """The fault variables set in this process, for workers that do not inherit its environment."""
    return {name: os.environ[name] for name in FAULT_VARIABLES if os.environ.get(name)}


class InjectedFault(RuntimeError):
    """Raised at a crash point named by ``SHARDWISE_RAISE_AT``."""


def crash_point(name: str) -> None:
    if _arrived("SHARDWISE_CRASH_AT", name):
        os.kill(os.getpid(), signal.SIGKILL)
    if _arrived("SHARDWISE_RAISE_AT", name):
        raise InjectedFault(f"injected fault at {name}")
    if _arrived("SHARDWISE_HANG_AT", name):
        release = os.environ.get("SHARDWISE_HANG_UNTIL")
        if release:
            with open(f"{release}.reached", "w") as marker:
                marker.write(str(os.getpid()))
        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline and not (release and os.path.exists(release)):
            time.sleep(0.05)
