"""Device and dtype choice, in one place so generation and embedding agree."""

from __future__ import annotations

import os
import threading

import torch

from .errors import EngineError

__all__ = [
    "TOKENIZERS_DEFAULTED",
    "default_dtype",
    "device_lock",
    "pin_worker",
    "placement_kwargs",
    "select_device",
    "tokenize_on_all_cores",
    "visible_gpu_count",
]

# Set (to "1") by whoever put TOKENIZERS_PARALLELISM=false as a default rather than the user's
# choice: shardwise's CLI, so that compute on the CPU keeps every core.
TOKENIZERS_DEFAULTED = "SHARDWISE_TOKENIZERS_PARALLELISM_DEFAULTED"


def select_device(preference: str | torch.device | None = "auto") -> torch.device:
    """Resolve a device preference: ``"auto"``/``None`` picks CUDA when available, else CPU.

    Explicit ``"cpu"``, ``"cuda"`` and ``"cuda:N"`` are honoured; asking for a GPU that is not
    there raises ``EngineError`` rather than silently running on CPU for hours.
    """
    if preference is None or (isinstance(preference, str) and preference.strip().lower() == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    try:
        device = torch.device(preference.strip().lower() if isinstance(preference, str) else preference)
    except RuntimeError as exc:
        raise ValueError(f"not a device: {preference!r} (use 'auto', 'cpu', 'cuda' or 'cuda:N')") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EngineError(f"device {preference!r} requested but CUDA is not available")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise EngineError(
                f"device {preference!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        device = torch.device("cuda", index)
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (half the memory, same range as fp32); fp32 on CPU, where bf16 is slow."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def placement_kwargs(device: torch.device) -> dict[str, object]:
    """``from_pretrained`` kwargs that put weights straight on ``device``.

    On CUDA, accelerate's ``device_map`` loads each tensor directly onto the GPU instead of
    materialising the model on CPU first; on CPU nothing is needed.
    """
    if device.type == "cuda":
        return {"device_map": {"": device.index if device.index is not None else 0}}
    return {}


_DEVICE_LOCKS: dict[str, threading.Lock] = {}
_DEVICE_LOCKS_GUARD = threading.Lock()


def device_lock(device: str | torch.device | None) -> threading.Lock:
    """One lock per device in this process: the compute of one shard at a time, so that a second
    shard in flight reads its rows or writes its part while the first one computes."""
    key = str(device or "cpu")
    with _DEVICE_LOCKS_GUARD:
        return _DEVICE_LOCKS.setdefault(key, threading.Lock())


def visible_gpu_count() -> int:
    """CUDA devices this process may use (after ``CUDA_VISIBLE_DEVICES``); 0 without CUDA."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pin_worker(slot: int, workers: int, gpus: int, cpus: int | None = None, gpus_per_worker: int = 1) -> str:
    """Give worker process ``slot`` of ``workers`` its own GPU(s), or its share of the CPU cores.

    Runs in the worker before it touches CUDA: with GPUs, ``CUDA_VISIBLE_DEVICES`` is narrowed to
    ``gpus_per_worker`` of the parent's visible devices (a tensor-parallel engine's GPUs; workers
    beyond the GPU count share round-robin), so the engine's ``auto``/``cuda`` device is that GPU.
    On CPU, torch's intra-op threads are split between the workers so they do not oversubscribe
    the cores. Returns a label for logs.
    """
    cpus = cpus or os.cpu_count() or 1
    threads = max(1, cpus // max(1, workers))
    if gpus > 0:
        parent = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        ids = parent if parent else [str(i) for i in range(gpus)]
        per = max(1, min(gpus_per_worker, len(ids)))
        first = (slot * per) % len(ids)
        mine = (ids[first:] + ids[:first])[:per]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
        label = f"gpu {','.join(mine)}"
    else:
        label = f"cpu x{threads}"
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    return label


def tokenize_on_all_cores(device: torch.device) -> None:
    """Where the engine computes on a GPU, fast tokenizers use all host cores (their own Rust
    thread pool, TOKENIZERS_PARALLELISM=true): the host is idle while the device computes, and
    one thread tokenizes ~10,000 short texts/s (docs/benchmarks.md), below what a GPU embeds.
    On the CPU the cores belong to the model. A TOKENIZERS_PARALLELISM the user set stays."""
    if device.type != "cuda":
        return
    if "TOKENIZERS_PARALLELISM" not in os.environ or os.environ.get(TOKENIZERS_DEFAULTED) == "1":
        os.environ["TOKENIZERS_PARALLELISM"] = "true"  # read by tokenizers at every call
