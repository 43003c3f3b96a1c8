"""KV caches the generation engine can pad, join by row and grow in place.

The engine prefills rows in chunks and joins their caches into one decode batch
(:mod:`shardwise.gpu_runtime.prefill`). That needs a plain full-attention cache (one tensor per layer
that can be left-padded), so sliding-window, hybrid and encoder-decoder models are left to
transformers' own handling. The joined cache preallocates room for the tokens to come:
transformers' ``DynamicLayer`` concatenates at every decode step, copying the whole cache, which
was 46% of a 64-row SmolLM2 decode step on CPU. Chunks are written straight into the joined
cache's buffers (:class:`JoinedKV`), so joining never holds the batch's KV twice.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

__all__ = ["JoinedKV", "PreallocatedLayer", "joinable_cache_argument", "new_cache"]


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` that writes new keys and values into preallocated room and hands out
    views. It regrows (one copy) when the room runs out or when transformers has replaced its
    tensors (crop, reorder, batch select), so every ``DynamicLayer`` operation keeps working."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._views: tuple[torch.Tensor, torch.Tensor] | None = None
        self._length = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if (
            self._buffers is None
            or self._views is None
            or self.keys is not self._views[0]
            or self.values is not self._views[1]
            or self._length + new > self._buffers[0].shape[-2]
        ):
            self._regrow(key_states, value_states, new)
        keys, values = self._buffers  # type: ignore[misc]
        keys[..., self._length : self._length + new, :] = key_states
        values[..., self._length : self._length + new, :] = value_states
        self._length += new
        self.keys, self.values = keys[..., : self._length, :], values[..., : self._length, :]
        self._views = (self.keys, self.values)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices`` (finished rows leaving a decode batch): one copy of the
        buffers, spare room included, where transformers' own would copy twice to regrow."""
        if (
            self._buffers is None
            or self._views is None
            or self.keys is not self._views[0]
            or self.values is not self._views[1]
        ):
            super().batch_select_indices(indices)
            return
        self._buffers = (self._buffers[0][indices], self._buffers[1][indices])
        self.keys, self.values = self._buffers[0][..., : self._length, :], self._buffers[1][..., : self._length, :]
        self._views = (self.keys, self.values)

    @classmethod
    def adopt(cls, keys: torch.Tensor, values: torch.Tensor, length: int, room: int) -> PreallocatedLayer:
        """A layer whose first ``length`` positions are already written in ``keys``/``values``
        (buffers of ``length`` + spare positions), growing by ``room`` when they fill up."""
        layer = cls(room)
        layer.lazy_initialization(keys, values)
        layer._buffers = (keys, values)
        layer._length = length
        layer.keys, layer.values = keys[..., :length, :], values[..., :length, :]
        layer._views = (layer.keys, layer.values)
        return layer

    def _regrow(self, key_states: torch.Tensor, value_states: torch.Tensor, new: int) -> None:
        # Before the first update, keys/values are empty 1-d placeholders.
        length = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        capacity = length + new + self.room
        buffers = []
        for cached, states in ((self.keys, key_states), (self.values, value_states)):
            buffer = states.new_empty((*states.shape[:-2], capacity, states.shape[-1]))
            if length:
                buffer[..., :length, :] = cached
            buffers.append(buffer)
        self._buffers = (buffers[0], buffers[1])
        self._length = length


class JoinedKV:
    """The KV cache of a decode batch, assembled from separately prefilled chunks of its rows.

    Each chunk's per-layer keys and values (``[chunk rows, heads, positions, head_dim]``) are
    written into one preallocated buffer per layer, right-aligned at ``length`` (left padding),
    at the chunk's row numbers; positions never written stay zero (the attention mask hides
    them, and zeros keep a masked position from turning the output into NaN). The buffers have
    ``room`` spare positions for the tokens to come.
    """

    def __init__(self, rows: int, length: int, room: int) -> None:
        self.rows, self.length, self.room = rows, length, room
        self._buffers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def write(self, rows: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy one chunk's cache (``layers``: per layer ``(keys, values)``) into batch rows ``rows``."""
        for index, (keys, values) in enumerate(layers):
            if index == len(self._buffers):
                shape = (self.rows, keys.shape[1], self.length + self.room, keys.shape[-1])
                self._buffers.append((keys.new_zeros(shape), values.new_zeros(shape)))
            keys_buffer, values_buffer = self._buffers[index]
            start = self.length - keys.shape[-2]
            keys_buffer[rows, :, start : self.length] = keys
            values_buffer[rows, :, start : self.length] = values

    def cache(self, model: Any) -> DynamicCache:
        """The joined cache, ready for ``generate``; it grows in place into the spare room."""
        cache = DynamicCache(config=model.config)
        if len(self._buffers) != len(cache.layers):
            raise ValueError(f"{len(self._buffers)} layers written, the model has {len(cache.layers)}")
        cache.layers = [PreallocatedLayer.adopt(k, v, self.length, self.room) for k, v in self._buffers]
        return cache


def new_cache(model: Any, room: int | None = None) -> DynamicCache:
    """An empty ``DynamicCache`` for ``model``; with ``room``, its layers preallocate that many
    positions beyond what they are first given (only for a model :func:`joinable_cache_argument` accepts)."""
    cache = DynamicCache(config=model.config)
    if room is not None:
        cache.layers = [PreallocatedLayer(room) for _ in cache.layers]
    return cache


def joinable_cache_argument(model: Any) -> str | None:
    """The name under which the model's forward takes a KV cache ("cache" from transformers 5.2x,
    "past_key_values" before) if its cache can be padded and joined by row; None for sliding-window
    or hybrid layers, encoder-decoders, or a forward without the arguments the engine passes."""
    if getattr(model.config, "is_encoder_decoder", False):
        return None
    accepted = inspect.signature(model.forward).parameters
    if not {"position_ids", "logits_to_keep", "attention_mask"} <= accepted.keys():
        return None
    try:
        layers = new_cache(model).layers
    except Exception:  # noqa: BLE001 - a model whose cache we cannot build keeps the plain path
        return None
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    return next((name for name in ("cache", "past_key_values") if name in accepted), None)
