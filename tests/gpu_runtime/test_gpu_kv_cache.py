"""The joinable KV cache: in-place growth that matches transformers' DynamicLayer, and which
models may use it."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from gpu_runtime.kv_cache import PreallocatedLayer, joinable_cache_argument

SMALL = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8}


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


def test_only_plain_full_attention_caches_are_joinable():
    """Sliding-window and encoder-decoder models keep transformers' own path: their caches cannot
    be padded and joined row by row."""
    from transformers import (
        Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration,
    )

    assert joinable_cache_argument(LlamaForCausalLM(LlamaConfig(**SMALL))) in ("cache", "past_key_values")
    assert joinable_cache_argument(Gemma2ForCausalLM(Gemma2Config(**SMALL, sliding_window=4))) is None
    t5 = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    assert joinable_cache_argument(T5ForConditionalGeneration(t5)) is None
