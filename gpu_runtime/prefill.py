"""A decode batch's prompts prefilled in chunks on a shared prefix, joined into one KV cache.

Within a call, the tokens every prompt starts with (the chat template's system turn, the prompt
template's first words) are run through the model once (:func:`shared_prefix`) and their KV cache
is shared. Each batch's rows are then prefilled in chunks of similar length on top of it and
joined, left-padded, into one wide decode batch (:func:`prefill`). Prefill is compute-bound and
decoding is bound by reading the weights, so the two want different batch shapes (see
docs/benchmarks.md). Models whose cache cannot be joined that way (sliding-window,
encoder-decoder) and ``cache="static"`` run each batch's whole prompts through ``generate``.

:func:`batch_inputs` builds a batch's host-side tensors for either path with numpy only, so it can
run on the prefetch thread (:mod:`shardwise.gpu_runtime.prefetch`) while the device generates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .batching import plan_batches
from .prefetch import host_tensor, to_device

if TYPE_CHECKING:
    from .generation_params import GenerationParams

__all__ = [
    "MIN_SHARED_PREFIX",
    "PREFILL_CHUNK_TOKENS",
    "BatchInputs",
    "PrefillChunk",
    "Prefix",
    "batch_inputs",
    "prefill",
    "shared_prefix",
]

MIN_SHARED_PREFIX = 8  # shorter shared prefixes are not worth a cache of their own
PREFILL_CHUNK_TOKENS = 2048  # padded prompt tokens prefilled together


@dataclass
class Prefix:
    """The tokens every prompt of a call starts with (``length`` of them) and their KV per layer."""

    length: int
    kv: list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class PrefillChunk:
    """One prefill chunk's host tensors: its rows' places in the decode batch, their left-padded
    prompt bodies (``width`` columns), the mask over prefix + body, and the bodies' positions."""

    rows: torch.Tensor
    width: int
    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor


@dataclass
class BatchInputs:
    """A decode batch's inputs on the host: ``plain`` (input ids, attention mask) for whole prompts
    through generate, or the prefill ``chunks``, the joined cache's mask and each row's last token."""

    rows: int
    plain: tuple[torch.Tensor, torch.Tensor] | None = None
    chunks: list[PrefillChunk] = field(default_factory=list)
    joined_mask: torch.Tensor | None = None
    last: torch.Tensor | None = None


def shared_prefix(
    model: Any, cache_arg: str | None, prompts: list[list[int]], params: GenerationParams
) -> Prefix | None:
    """The tokens every prompt of the call starts with (chat template, system prompt, the
    template's opening words) and their KV cache, computed once; None where reuse does not apply.
    ``cache_arg`` is the forward's name for a joinable KV cache (None: the model has none)."""
    if cache_arg is None or params.cache != "dynamic" or len(prompts) < 2:
        return None
    # Every row keeps at least its last prompt token for generate() to process.
    limit = min(len(ids) for ids in prompts) - 1
    first, n = prompts[0], 0
    while n < limit and all(ids[n] == first[n] for ids in prompts):
        n += 1
    if n < MIN_SHARED_PREFIX:
        return None
    from . import kv_cache  # imports transformers: not at module level (see __init__.py)

    cache = kv_cache.new_cache(model)
    with torch.inference_mode():
        model(
            input_ids=torch.tensor([first[:n]], device=model.device),
            use_cache=True,
            logits_to_keep=1,
            **{cache_arg: cache},
        )
    return Prefix(n, [(layer.keys, layer.values) for layer in cache.layers])


def _uses_joined_cache(cache_arg: str | None, batch_ids: list[list[int]], config: Any, prefix: Prefix | None) -> bool:
    """Whether a batch is prefilled in chunks and joined (else: whole prompts through generate)."""
    # A one-token prompt with nothing cached before it has no KV cache to pad and join.
    return (
        cache_arg is not None
        and config.cache_implementation is None
        and (prefix is not None or min(len(ids) for ids in batch_ids) > 1)
    )


def batch_inputs(
    batch_ids: list[list[int]],
    config: Any,
    prefix: Prefix | None,
    *,
    cache_arg: str | None,
    pad_id: int,
    device: torch.device,
) -> BatchInputs:
    """The host-side inputs of one decode batch (see :func:`prefill` for their layout), built
    with numpy (no tokenizer, no torch kernels: this runs on the prefetch thread, beside the
    compute thread's generate and the decode thread's tokenizer) and pinned when bound for CUDA."""
    if not _uses_joined_cache(cache_arg, batch_ids, config, prefix):
        # Left padding to a multiple of 8 (as tokenizer.pad(pad_to_multiple_of=8) does): it
        # keeps the number of distinct shapes (and kernel choices) small.
        width = -(-max(len(ids) for ids in batch_ids) // 8) * 8
        ids_array, mask = _left_padded(batch_ids, width, pad_id)
        return BatchInputs(len(batch_ids), plain=(host_tensor(ids_array, device), host_tensor(mask, device)))
    shared = prefix.length if prefix else 0
    bodies = [ids[shared:-1] for ids in batch_ids]
    chunk_tokens = PREFILL_CHUNK_TOKENS if device.type == "cpu" else 4 * PREFILL_CHUNK_TOKENS
    chunks = plan_batches([len(b) for b in bodies], token_budget=chunk_tokens, max_batch_size=len(bodies))
    length = shared + max(len(b) for b in bodies)
    joined_mask = np.zeros((len(bodies), length), dtype=np.int64)
    prepared: list[PrefillChunk] = []
    for rows in chunks:
        width = max(len(bodies[i]) for i in rows)
        ids_array, body_mask = _left_padded([bodies[i] for i in rows], width, pad_id)
        mask = np.concatenate([np.ones((len(rows), shared), dtype=np.int64), body_mask], axis=1)
        # Right-aligned, as the chunk's keys and values are (see JoinedKV).
        joined_mask[rows, length - mask.shape[1] :] = mask
        # Positions count unmasked tokens only, as with plain left padding.
        positions = np.maximum(mask.cumsum(-1) - 1, 0)[:, shared:]
        prepared.append(
            PrefillChunk(
                rows=host_tensor(np.asarray(rows, dtype=np.int64), device),
                width=width,
                ids=host_tensor(ids_array, device),
                mask=host_tensor(mask, device),
                positions=host_tensor(np.ascontiguousarray(positions), device),
            )
        )
    last = np.asarray([[ids[-1]] for ids in batch_ids], dtype=np.int64)
    return BatchInputs(
        len(batch_ids),
        chunks=prepared,
        joined_mask=host_tensor(joined_mask, device),
        last=host_tensor(last, device),
    )


def prefill(
    model: Any, cache_arg: str, inputs: BatchInputs, prefix: Prefix | None, room: int
) -> tuple[Any, torch.Tensor]:
    """The KV cache of every prompt but its last token, as one left-padded batch, and its mask.

    Rows are prefilled in chunks of similar length on top of the shared prefix, then joined
    into one decode batch. Prefill is compute-bound, so a wider chunk buys only padding;
    decoding is bound by reading the weights, so the wider its batch, the cheaper each token.
    A row reads ``[left pad | shared prefix | pad | rest of its prompt]``; the mask hides the
    pads and positions count unmasked tokens only, as with plain left padding. The joined cache
    has ``room`` more positions per row preallocated for the tokens to come. ``inputs`` holds
    the host tensors :func:`batch_inputs` built for this layout.
    """
    from . import kv_cache

    assert inputs.joined_mask is not None
    # Every chunk's cache is written straight into the joined one, then dropped: the batch's
    # KV is never held twice.
    joined = kv_cache.JoinedKV(inputs.rows, inputs.joined_mask.shape[1], room)
    for chunk in inputs.chunks:
        on_device = to_device(
            {"rows": chunk.rows, "ids": chunk.ids, "mask": chunk.mask, "positions": chunk.positions}, model.device
        )
        n_rows = chunk.ids.shape[0]
        cache = kv_cache.new_cache(model)
        if prefix:
            for layer, (keys, values) in enumerate(prefix.kv):
                cache.update(keys.expand(n_rows, -1, -1, -1), values.expand(n_rows, -1, -1, -1), layer)
        if chunk.width:
            model(
                input_ids=on_device["ids"],
                attention_mask=on_device["mask"],
                position_ids=on_device["positions"],
                use_cache=True,
                logits_to_keep=1,
                **{cache_arg: cache},
            )
        joined.write(on_device["rows"], [(layer.keys, layer.values) for layer in cache.layers])
        del cache
    return joined.cache(model), to_device({"mask": inputs.joined_mask}, model.device)["mask"]


def _left_padded(rows: list[list[int]], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` right-aligned in a ``(len(rows), width)`` array of ``pad_id``, and the mask of the real tokens."""
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for j, row in enumerate(rows):
        if row:
            ids[j, width - len(row) :] = row
            mask[j, width - len(row) :] = 1
    return ids, mask
