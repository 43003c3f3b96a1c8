"""Grouped keys and values read in place: the same bits as transformers' sdpa, without its copies."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations import sdpa_attention

from shardwise.gpu_runtime import GenerationParams
from shardwise.gpu_runtime.attention import GROUPED_KV_SDPA, grouped_kv_sdpa, use_grouped_kv_attention

PROMPTS = [
    "Say hi.",
    "Summarise in one sentence: the parcel came two days late, but the blender inside works well "
    "and is quieter than the one it replaced, although the lid does not sit quite straight.",
    "List three colours.",
    "What is the capital of France? Answer in one word.",
]


class _Module(torch.nn.Module):
    num_key_value_groups = 3
    is_causal = True


def test_a_masked_grouped_call_gives_transformers_bits_without_copying_keys_and_values(monkeypatch):
    g = torch.Generator().manual_seed(0)
    query = torch.randn(5, 9, 1, 16, generator=g)
    key, value = torch.randn(5, 3, 40, 16, generator=g), torch.randn(5, 3, 40, 16, generator=g)
    mask = torch.ones(5, 1, 1, 40, dtype=torch.bool)
    for row in range(5):
        mask[row, ..., : row * 7] = False  # left padding of 0..28 positions
    want, _ = sdpa_attention.sdpa_attention_forward(_Module(), query, key, value, mask, scaling=0.25)
    copies = []
    original = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda *a: copies.append(a) or original(*a))
    got, _ = grouped_kv_sdpa(_Module(), query, key, value, mask, scaling=0.25)
    assert torch.equal(got, want)
    assert copies == []
    # Without a mask, transformers' own function runs (it needs no copy there either).
    unmasked, _ = grouped_kv_sdpa(_Module(), query, key, value, None, scaling=0.25)
    assert torch.equal(
        unmasked, sdpa_attention.sdpa_attention_forward(_Module(), query, key, value, None, scaling=0.25)[0]
    )


@pytest.mark.slow
def test_the_cpu_generation_engine_reads_grouped_kv_in_place_and_answers_the_same(generation_engine, monkeypatch):
    """SmolLM2 has 3 key/value heads for 9 query heads. Its padded batches used to copy every
    layer's cache three times per decode step; the answers with and without the copies are equal."""
    model = generation_engine.model
    assert generation_engine.info["attn_implementation"] == GROUPED_KV_SDPA
    assert model.config._attn_implementation == GROUPED_KV_SDPA
    copies = []
    original = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda x, n: copies.append(n) or original(x, n))
    params = GenerationParams(max_new_tokens=12)
    in_place = generation_engine.generate(PROMPTS, params)
    assert copies == []
    try:
        model.set_attn_implementation("sdpa")
        copied = generation_engine.generate(PROMPTS, params)
    finally:
        model.set_attn_implementation(GROUPED_KV_SDPA)
    assert copies, "plain sdpa copies grouped keys and values under a padding mask"
    assert [(g.text, g.n_generated_tokens, g.finish_reason) for g in in_place] == [
        (g.text, g.n_generated_tokens, g.finish_reason) for g in copied
    ]


def test_the_switch_is_made_only_where_it_saves_the_copies():
    def model(kv_heads: int, attention: str = "sdpa") -> LlamaForCausalLM:
        config = LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=kv_heads,
            attn_implementation=attention,
        )
        return LlamaForCausalLM(config).eval()

    assert use_grouped_kv_attention(model(2)) is True
    assert use_grouped_kv_attention(model(4)) is False  # one key/value head per query head: no copies
    assert use_grouped_kv_attention(model(2, "eager")) is False  # a kernel the user chose stays
    switched = model(2)
    use_grouped_kv_attention(switched)
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    plain = model(2)
    plain.load_state_dict(switched.state_dict())
    with torch.inference_mode():
        assert torch.equal(
            switched(input_ids=ids, attention_mask=mask).logits, plain(input_ids=ids, attention_mask=mask).logits
        )
