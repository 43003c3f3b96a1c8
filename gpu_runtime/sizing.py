"""How big a generation batch may be: the token budget and row cap, from device memory.

What bounds a decode batch's memory is its KV cache: every padded token of every row (prompt plus
the tokens still to come) holds a key and a value per layer. On a GPU the engine therefore sizes
its budget from the memory left after the weights and the KV bytes one token costs; a CPU keeps
fixed, modest sizes (host memory is shared with everything else and batches there are
compute-bound long before memory runs out). Settings given in the job config always win, and an
out-of-memory error still halves a batch (:mod:`shardwise.gpu_runtime.backoff`).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "CPU_MAX_BATCH_SIZE",
    "CPU_TOKEN_BUDGET",
    "EMBED_CPU_MAX_BATCH_SIZE",
    "EMBED_MAX_BATCH_SIZE",
    "auto_batch_limits",
    "embedding_batch_size",
    "free_device_bytes",
    "kv_bytes_per_token",
]

CPU_TOKEN_BUDGET = 16384
# A CPU decode step is bound by reading the weights and the KV cache, so a wider batch makes each
# token cheaper (SmolLM2, one step over 120 positions: 122 ms for 32 rows, 202 ms for 64), while every
# row waits for the batch's longest answer. With grouped KV read in place (attention.py), 128 review
# rows x 32 new tokens in two 64-row calls took 24.5-25.0 s in batches of 64 against 28.1-29.4 s in
# batches of 32 (docs/benchmarks.md); the token budget above still bounds the KV cache's memory.
CPU_MAX_BATCH_SIZE = 64
# Rows per embedding batch. On a CPU, smaller batches are faster: MiniLM over 4,000 review texts in
# 1,000-row calls took 20.0 s in batches of 32 against 22.3 s in batches of 64 (sentence-transformers'
# own encode at batch 64: 23.0 s), as the activations of a batch of 32 stay in the caches. A GPU keeps 64.
EMBED_CPU_MAX_BATCH_SIZE = 32
EMBED_MAX_BATCH_SIZE = 64
# Share of the free memory the KV cache may take; the rest is left for activations (prefill
# chunks, the logits of a decode step) and allocator fragmentation.
KV_MEMORY_FRACTION = 0.8
# Rows per batch on a GPU: past this, a decode step is no longer bound by reading the weights, so
# wider batches stop paying (vLLM's default max_num_seqs is the same figure).
GPU_MAX_BATCH_SIZE = 256
# A batch always gets at least this budget, so a full device still makes progress one row at a time.
MIN_TOKEN_BUDGET = 64


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes of KV cache one token takes: layers x kv_heads x head_dim x 2 (key and value) x dtype
    size. Sliding-window layers are counted as full ones (an overestimate, so on the safe side)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = int(text.num_hidden_layers)
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    item = torch.empty((), dtype=dtype).element_size()
    return layers * kv_heads * head_dim * 2 * item


def auto_batch_limits(free_bytes: int, bytes_per_token: int) -> tuple[int, int]:
    """``(token_budget, max_batch_size)`` for a device with ``free_bytes`` available to the KV cache
    of a model whose tokens take ``bytes_per_token`` each."""
    if bytes_per_token < 1:
        raise ValueError(f"bytes_per_token must be >= 1, got {bytes_per_token}")
    token_budget = max(MIN_TOKEN_BUDGET, int(max(free_bytes, 0) * KV_MEMORY_FRACTION) // bytes_per_token)
    # A row is at least a few dozen tokens; a tiny budget must not promise hundreds of rows.
    max_batch_size = max(1, min(GPU_MAX_BATCH_SIZE, token_budget // MIN_TOKEN_BUDGET))
    return token_budget, max_batch_size


def free_device_bytes(device: torch.device) -> int:
    """Memory this process can still allocate on a CUDA device: what the driver reports free plus
    what torch's caching allocator holds but does not use."""
    free, _total = torch.cuda.mem_get_info(device)
    cached_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + max(cached_unused, 0))


def embedding_batch_size(device: torch.device) -> int:
    """Rows per embedding batch on ``device`` when the job does not set ``embed.max_batch_size``."""
    return EMBED_CPU_MAX_BATCH_SIZE if device.type == "cpu" else EMBED_MAX_BATCH_SIZE
