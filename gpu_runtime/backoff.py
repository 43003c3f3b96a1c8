"""Out-of-memory back-off for batched inference.

The batch planner bounds a batch by a padded-token budget, but what really fits depends on the
device, the dtype, the attention kernel and what else lives in memory. When a batch runs out of
memory, :class:`BatchBackoff` splits it in half and retries each half (recursively), frees cached
device memory first, and caps every later batch at the size that worked. Each engine keeps one
for its lifetime, so a too-generous ``max_batch_size`` costs one failed attempt per worker, not
one per batch or per shard.

This is accelerate's ``find_executable_batch_size`` idea fitted to the engines' structure: they
run pre-planned batches of row *indices* (longest first), not a loop over a batch-size argument,
and a failed batch has to be split in place so that every row keeps its result slot.

Results do not depend on the split for greedy decoding and embeddings (each row is computed on its
own, padding is masked); with sampling the random stream is consumed differently, so a sampled
row's text may differ from an un-split run's.
"""

from __future__ import annotations

import gc
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from .errors import EngineError

__all__ = ["BatchBackoff", "free_device_memory", "is_out_of_memory"]

logger = logging.getLogger(__name__)

_R = TypeVar("_R")

# Lower-case fragments of allocation failures that torch raises as a plain RuntimeError.
_OOM_MESSAGES = (
    "out of memory",  # CUDA ("CUDA out of memory"), MPS, HIP, XPU
    "can't allocate memory",  # CPU: "DefaultCPUAllocator: can't allocate memory: you tried to allocate ..."
    "defaultcpuallocator",
    "cublas_status_alloc_failed",  # cuBLAS could not get its workspace
)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a device or host allocation failure that a smaller batch may avoid."""
    if isinstance(exc, EngineError):  # our own verdict (e.g. one row does not fit) is final
        return False
    oom_types: tuple[type[BaseException], ...] = (MemoryError,)
    for owner in (torch, getattr(torch, "cuda", None)):
        cls = getattr(owner, "OutOfMemoryError", None)
        if isinstance(cls, type):
            oom_types += (cls,)
    if isinstance(exc, oom_types):
        return True
    if isinstance(exc, RuntimeError):
        message = str(exc).lower()
        return any(fragment in message for fragment in _OOM_MESSAGES)
    return False


def free_device_memory(device: torch.device | None = None) -> None:
    """Collect garbage (tensors kept alive by reference cycles) and release the allocator's cache."""
    gc.collect()
    device_type = device.type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device_type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


class BatchBackoff:
    """Runs batches of row indices, halving any batch that runs out of memory.

    One instance lives as long as its engine: ``limit`` (``None`` until the first out-of-memory
    error) is the largest batch size allowed from then on, in this call and every later one. ``attempts`` lists the size
    of every batch tried and ``splits`` counts the batches that were halved, for logs and tests.
    """

    def __init__(self, device: torch.device | None, *, what: str) -> None:
        self.device = device
        self.what = what
        self.limit: int | None = None
        self.splits = 0
        self.attempts: list[int] = []

    def run(
        self,
        batch: Sequence[int],
        fn: Callable[[list[int]], Sequence[_R]],
        *,
        describe_row: Callable[[int], str] | None = None,
    ) -> list[_R]:
        """``fn(rows)`` for ``batch``, split as needed; returns one result per row, in ``batch`` order.

        ``fn`` must return exactly one result per index it is given. A single row that still runs
        out of memory raises :class:`EngineError` (``describe_row(index)`` says what that row was).
        """
        results: list[_R] = []
        work: deque[list[int]] = deque([list(batch)])
        while work:
            chunk = work.popleft()
            if self.limit is not None and len(chunk) > self.limit:
                # A size that already failed: do not try it again.
                pieces = [chunk[k : k + self.limit] for k in range(0, len(chunk), self.limit)]
                work.extendleft(reversed(pieces))
                continue
            self.attempts.append(len(chunk))
            try:
                out = fn(chunk)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                if len(chunk) == 1:
                    row = describe_row(chunk[0]) if describe_row is not None else f"row {chunk[0]}"
                    message = (
                        f"{self.what}: out of memory on a batch of a single row ({row}) on {self._where()}, "
                        f"even after halving the batch {self.splits} time(s); shorten the input or the "
                        f"output (max_input_tokens / max_new_tokens) or use a device with more memory. "
                        f"Original error: {type(exc).__name__}: {_first_line(exc)}"
                    )
                    # The cause is kept for its type and message, not its frames: a caller that holds
                    # on to the error (a task runner's state) must not hold the failed batch's tensors.
                    exc.with_traceback(None)
                    free_device_memory(self.device)
                    raise EngineError(message) from exc
                failure = f"{type(exc).__name__}: {_first_line(exc)}"
            else:
                if len(out) != len(chunk):
                    raise EngineError(f"{self.what}: got {len(out)} results for a batch of {len(chunk)} rows")
                results.extend(out)
                continue
            # Outside the except block, so the failed attempt's frames (and tensors) can be freed.
            free_device_memory(self.device)
            half = (len(chunk) + 1) // 2
            self.limit = half if self.limit is None else min(self.limit, half)
            self.splits += 1
            logger.warning(
                "%s: out of memory on a batch of %d rows on %s (%s); retrying it in halves and capping "
                "later batches at %d rows",
                self.what,
                len(chunk),
                self._where(),
                failure,
                self.limit,
            )
            work.extendleft([chunk[half:], chunk[:half]])
        return results

    def _where(self) -> str:
        return str(self.device) if self.device is not None else "the device"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"
