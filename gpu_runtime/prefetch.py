"""Prepare the next batch on the host while the device computes the current one.

Tokenizing and collating a batch is CPU work; done between forward passes it leaves a fast
device idle. :func:`prefetched` runs a ``prepare`` step (tokenize, collate, pin) on a background
thread a few items ahead of the consumer, and hands the items back in their original order, so
results are the same as preparing each item right before use. Fast tokenizers are Rust code that
releases the GIL, so the preparation overlaps with the model's forward pass.

:func:`to_device` moves a prepared batch: on CUDA from pinned (page-locked) host memory with
``non_blocking=True``, so the copy is asynchronous with respect to the host; elsewhere a plain move.
:func:`host_tensor` turns a batch built with numpy on the prefetch thread into such a tensor without
torch kernels on that thread: a large torch fill or copy there would start a second OpenMP team in
the process (see :mod:`shardwise.gpu_runtime.compute_thread`).
"""

from __future__ import annotations

import concurrent.futures
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import numpy as np
import torch

__all__ = ["host_tensor", "pin_for", "prefetched", "to_device"]

_T = TypeVar("_T")
_R = TypeVar("_R")


def prefetched(items: Iterable[_T], prepare: Callable[[_T], _R], *, depth: int = 1) -> Iterator[tuple[_T, _R]]:
    """``(item, prepare(item))`` for each item, in order; ``prepare`` runs on a background thread
    up to ``depth`` items ahead of the one being consumed.

    An exception from ``prepare`` is raised when its item is reached, not earlier. Closing the
    iterator early (a ``break``, an error in the consumer) cancels what was not started and waits
    for the one in progress, so no preparation outlives the call.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    pending: deque[tuple[_T, concurrent.futures.Future[_R]]] = deque()
    source = iter(items)
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardwise-prefetch")
    try:
        for item in source:
            pending.append((item, executor.submit(prepare, item)))
            if len(pending) > depth:
                ready, future = pending.popleft()
                yield ready, future.result()
        while pending:
            ready, future = pending.popleft()
            yield ready, future.result()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def pin_for(features: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """``features`` with its CPU tensors in pinned memory when they are bound for a CUDA device
    (the precondition of an asynchronous copy); unchanged otherwise."""
    if device.type != "cuda":
        return dict(features)
    return {
        k: v.pin_memory() if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v for k, v in features.items()
    }


def host_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` as a CPU tensor bound for ``device``: in pinned memory, filled by numpy, for a CUDA
    device; elsewhere sharing ``array``'s memory."""
    if device.type != "cuda":
        return torch.from_numpy(array)
    pinned = torch.empty(array.shape, dtype=torch.from_numpy(np.empty(0, dtype=array.dtype)).dtype, pin_memory=True)
    pinned.numpy()[...] = array
    return pinned


def to_device(features: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """``features``' tensors on ``device``; non-blocking when the source is pinned memory and the
    target is CUDA (kernels on the same stream still see the data in order)."""
    moved: dict[str, Any] = {}
    for key, value in features.items():
        if isinstance(value, torch.Tensor):
            non_blocking = device.type == "cuda" and value.is_pinned()
            moved[key] = value.to(device, non_blocking=non_blocking)
        else:
            moved[key] = value
    return moved
