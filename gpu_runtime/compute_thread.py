"""One thread per process runs all of shardwise's model work.

torch runs its CPU kernels on an OpenMP thread team, and GNU OpenMP gives every thread that
starts parallel work a team of its own, kept for that thread's life. Once a process holds more
OpenMP threads than it has cores (a second team: the main thread loaded or warmed a model, then a
Prefect worker thread runs it), libgomp stops spin-waiting and parks its workers after every
parallel region, so every kernel pays a futex wake-up. On 2 cores that was 137,000 context
switches and 15% slower generation for a 128-row shard (docs/benchmarks.md, 2026-11-28).

So the engines load models and compute on this module's thread, whichever thread calls them:
one team per process, however many task threads, retries or shards in flight there are.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["ComputeCancelled", "check_cancelled", "on_compute_thread"]

_T = TypeVar("_T")

# How often a waiting caller wakes up. Between waits it runs Python code, so an exception raised
# into it from another thread (how Prefect times out a task in a worker thread) gets through.
_WAIT_SLICE_S = 0.5

_guard = threading.Lock()
_executor: concurrent.futures.ThreadPoolExecutor | None = None
_executor_pid: int | None = None
_job = threading.local()  # on the compute thread: the running job's cancel event


class ComputeCancelled(RuntimeError):
    """The caller stopped waiting (it was interrupted or timed out), so the job stopped early."""


def on_compute_thread(fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
    """Run ``fn(*args, **kwargs)`` on the compute thread and return its result (or raise its error).

    Called on the compute thread itself (a nested call), it runs inline. The caller's context
    variables go along. If the caller is interrupted while it waits, the job is asked to stop at
    its next :func:`check_cancelled` (the engines check between batches) and the interruption
    propagates.
    """
    if getattr(_job, "on_compute_thread", False):
        return fn(*args, **kwargs)
    cancel = threading.Event()
    future = _compute_executor().submit(contextvars.copy_context().run, _run_job, cancel, fn, args, kwargs)
    try:
        while not future.done():
            concurrent.futures.wait([future], timeout=_WAIT_SLICE_S)
    except BaseException:
        if not future.cancel():
            cancel.set()
        raise
    return future.result()


def check_cancelled() -> None:
    """Raise :class:`ComputeCancelled` if the caller of the running job has stopped waiting for it."""
    cancel = getattr(_job, "cancel", None)
    if cancel is not None and cancel.is_set():
        raise ComputeCancelled("the caller stopped waiting for this model call")


def _run_job(cancel: threading.Event, fn: Callable[..., _T], args: tuple, kwargs: dict) -> _T:
    _job.on_compute_thread, _job.cancel = True, cancel
    try:
        return fn(*args, **kwargs)
    finally:
        _job.cancel = None


def _compute_executor() -> concurrent.futures.ThreadPoolExecutor:
    """The process's single-thread executor; a forked child gets its own (threads do not survive fork)."""
    global _executor, _executor_pid
    with _guard:
        if _executor is None or _executor_pid != os.getpid():
            _executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardwise-compute")
            _executor_pid = os.getpid()
        return _executor
