"""The joinable KV cache: in-place growth that matches transformers' DynamicLayer, and which
models may use it."""

from __future__ import annotations

import torch
from transformers import LlamaConfig
from transformers.cache_utils import DynamicLayer

from shardwise.gpu_runtime.kv_cache import PreallocatedLayer, joinable_cache_argument

SMALL = {
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
}


def _states(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, length, 4, generator=g), torch.randn(batch, 2, length, 4, generator=g)


def test_preallocated_layer_holds_what_a_dynamic_layer_holds_and_grows_in_place():
    plain, roomy = DynamicLayer(), PreallocatedLayer(room=3)
    for step, length in enumerate([5, 1, 1, 1, 1, 2]):  # the 4th single token exceeds the room: regrow
        keys, values = _states(3, length, step)
        want, got = plain.update(keys, values), roomy.update(keys, values)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert roomy.get_seq_length() == plain.get_seq_length()
    storage = roomy.keys.untyped_storage().data_ptr()
    roomy.update(*_states(3, 1, 99))
    assert roomy.keys.untyped_storage().data_ptr() == storage  # written in place, not copied
    assert roomy.get_seq_length() == 12


def test_preallocated_layer_survives_transformers_replacing_its_tensors():
    plain, roomy = DynamicLayer(), PreallocatedLayer(room=8)
    for layer in (plain, roomy):
        layer.update(*_states(4, 6, 0))
        layer.batch_select_indices(torch.tensor([0, 2]))  # e.g. rows dropped
        layer.crop(-1)
        layer.update(*_states(2, 1, 1))
    assert torch.equal(roomy.keys, plain.keys) and torch.equal(roomy.values, plain.values)
    assert roomy.keys.shape == (2, 2, 6, 4)


def test_preallocated_layer_drops_rows_with_one_copy_and_keeps_its_room():
    plain, roomy = DynamicLayer(), PreallocatedLayer(room=4)
    for layer in (plain, roomy):
        layer.update(*_states(5, 6, 0))
        layer.batch_select_indices(torch.tensor([1, 3, 4]))  # finished rows leave the batch
    storage = roomy.keys.untyped_storage().data_ptr()
    for step in range(3):
        keys, values = _states(3, 1, step + 1)
        want, got = plain.update(keys, values), roomy.update(keys, values)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert roomy.keys.untyped_storage().data_ptr() == storage  # grew into its room, no regrow
    assert roomy.keys.shape == (3, 2, 9, 4)


def test_only_plain_full_attention_caches_are_joinable():
    """Sliding-window and encoder-decoder models keep transformers' own path: their caches cannot
    be padded and joined row by row."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    assert joinable_cache_argument(LlamaForCausalLM(LlamaConfig(**SMALL))) in ("cache", "past_key_values")
    assert joinable_cache_argument(Gemma2ForCausalLM(Gemma2Config(**SMALL, sliding_window=4))) is None
    t5 = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    assert joinable_cache_argument(T5ForConditionalGeneration(t5)) is None


def test_joined_kv_writes_chunks_in_place_like_padding_and_concatenating():
    """Chunks of rows (each its own width) written into the joined buffers equal left-padding
    each chunk to the batch's length and concatenating them in batch order, and no chunk-sized
    copy of the whole batch is made."""
    import torch.nn.functional as F

    from shardwise.gpu_runtime.kv_cache import JoinedKV

    length, room = 7, 3
    chunks = {(3, 0): 7, (1,): 4, (2, 4): 5}  # batch rows of a chunk -> its positions
    joined = JoinedKV(rows=5, length=length, room=room)
    layers_by_chunk = {}
    for seed, (rows, width) in enumerate(chunks.items()):
        layers_by_chunk[rows] = [_states(len(rows), width, 10 * seed + layer) for layer in range(2)]
        joined.write(torch.tensor(rows), layers_by_chunk[rows])
    buffers = [(k.data_ptr(), v.data_ptr()) for k, v in joined._buffers]

    order = [row for rows in chunks for row in rows]
    restore = torch.empty(len(order), dtype=torch.long)
    restore[torch.tensor(order)] = torch.arange(len(order))

    class _TwoLayers:
        config = LlamaConfig(**SMALL)

    cache = joined.cache(_TwoLayers())
    for layer in range(2):
        for which in (0, 1):
            padded = [
                F.pad(layers_by_chunk[rows][layer][which], (0, 0, length - width, 0)) for rows, width in chunks.items()
            ]
            expected = torch.cat(padded).index_select(0, restore)
            got = (cache.layers[layer].keys, cache.layers[layer].values)[which]
            assert torch.equal(got, expected)
        assert cache.layers[layer].keys.data_ptr() == buffers[layer][0]  # views of the buffers
        assert cache.layers[layer].get_seq_length() == length
    # The spare room takes the next tokens without a copy.
    cache.layers[0].update(*_states(5, 1, 99))
    assert cache.layers[0].keys.data_ptr() == buffers[0][0] and cache.layers[0].get_seq_length() == length + 1
