"""``dummy:<shape>`` models: seeded random weights with the exact shapes of real models.

They exist to measure throughput (tokens/s, rows/s, memory) of the real code path where real
weights cannot be shipped or downloaded, like vLLM's ``load_format="dummy"``:

=====================  =============================  =========================================
spec                   shape of                       architecture
=====================  =============================  =========================================
``dummy:llama-135m``   HuggingFaceTB/SmolLM2-135M     LlamaForCausalLM, 30 layers, hidden 576
``dummy:llama-1b``     meta-llama/Llama-3.2-1B        LlamaForCausalLM, 16 layers, hidden 2048
``dummy:llama-8b``     meta-llama/Llama-3.1-8B        LlamaForCausalLM, 32 layers, hidden 4096
``dummy:minilm``       sentence-transformers/         BertModel, 6 layers, hidden 384, mean
                       all-MiniLM-L6-v2               pooling + Normalize (a SentenceTransformer)
``dummy:bert-tiny``    google/bert_uncased_L-2_H-     BertModel, 2 layers, hidden 128, as above:
                       128_A-2                        for memory and overhead benchmarks
``dummy:bert-nano``    (no real model)                BertModel, 1 layer, hidden 32, texts cut at
                                                      16 tokens: compute is negligible, for the
                                                      pipeline-ceiling benchmark
=====================  =============================  =========================================

This module holds the shapes alone (no torch, no transformers), so spec resolution can check a
``dummy:`` spec without building anything; :mod:`shardwise.gpu_runtime.dummy` builds the models.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import EngineError, ModelNotFoundError

__all__ = ["DUMMY_PREFIX", "DUMMY_SEED", "DUMMY_SHAPES", "DummyShape", "dummy_revision", "dummy_shape"]

DUMMY_PREFIX = "dummy:"
DUMMY_SEED = 0


@dataclass(frozen=True)
class DummyShape:
    kind: Literal["generation", "embedding"]
    mimics: str  # the Hub model whose config.json this copies
    config: Mapping[str, Any] = field(repr=False)
    tokenizer_spec: str  # bundled model whose tokenizer is used
    max_seq_length: int | None = None  # sentence-transformers truncation (embedding shapes)


_LLAMA_COMMON: dict[str, Any] = {
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "attention_bias": False,
    "mlp_bias": False,
    "initializer_range": 0.02,
}
_LLAMA3_ROPE = {
    "rope_theta": 500000.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}

# What every BERT shape here shares (the uncased 30522-token vocabulary of the bundled MiniLM tokenizer).
_BERT_UNCASED: dict[str, Any] = {
    "vocab_size": 30522,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "initializer_range": 0.02,
}

DUMMY_SHAPES: dict[str, DummyShape] = {
    "llama-135m": DummyShape(
        kind="generation",
        mimics="HuggingFaceTB/SmolLM2-135M",
        tokenizer_spec="bundled:smollm2-135m-instruct",
        config={
            **_LLAMA_COMMON,
            "vocab_size": 49152,
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "head_dim": 64,
            "max_position_embeddings": 8192,
            "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
            "tie_word_embeddings": True,
        },
    ),
    "llama-1b": DummyShape(
        kind="generation",
        mimics="meta-llama/Llama-3.2-1B",
        tokenizer_spec="bundled:smollm2-135m-instruct",
        config={
            **_LLAMA_COMMON,
            "vocab_size": 128256,
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "max_position_embeddings": 131072,
            "rope_parameters": {**_LLAMA3_ROPE, "factor": 32.0},
            "tie_word_embeddings": True,
        },
    ),
    "llama-8b": DummyShape(
        kind="generation",
        mimics="meta-llama/Llama-3.1-8B",
        tokenizer_spec="bundled:smollm2-135m-instruct",
        config={
            **_LLAMA_COMMON,
            "vocab_size": 128256,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "max_position_embeddings": 131072,
            "rope_parameters": {**_LLAMA3_ROPE, "factor": 8.0},
            "tie_word_embeddings": False,
        },
    ),
    "minilm": DummyShape(
        kind="embedding",
        mimics="sentence-transformers/all-MiniLM-L6-v2",
        tokenizer_spec="bundled:all-minilm-l6-v2",
        max_seq_length=256,
        config={
            **_BERT_UNCASED,
            "hidden_size": 384,
            "num_hidden_layers": 6,
            "num_attention_heads": 12,
            "intermediate_size": 1536,
        },
    ),
    # Compute is nearly free: for measuring what is *not* the model (memory, I/O, orchestration).
    "bert-tiny": DummyShape(
        kind="embedding",
        mimics="google/bert_uncased_L-2_H-128_A-2",
        tokenizer_spec="bundled:all-minilm-l6-v2",
        max_seq_length=128,
        config={
            **_BERT_UNCASED,
            "hidden_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 512,
        },
    ),
    # Compute next to nothing: a whole flow with it measures how fast the pipeline itself can feed
    # a device (the pipeline-ceiling benchmark in bench/run.py).
    "bert-nano": DummyShape(
        kind="embedding",
        mimics="(no real model: a pipeline-ceiling probe)",
        tokenizer_spec="bundled:all-minilm-l6-v2",
        max_seq_length=16,
        config={
            **_BERT_UNCASED,
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        },
    ),
}


def dummy_revision(name: str, seed: int = DUMMY_SEED) -> str:
    return f"dummy-{name}-seed{seed}"


def dummy_shape(spec_or_name: str, kind: Literal["generation", "embedding"]) -> tuple[str, DummyShape]:
    """The (name, shape) of a dummy spec, checking it suits the engine ``kind``."""
    name = spec_or_name.removeprefix(DUMMY_PREFIX)
    shape = DUMMY_SHAPES.get(name)
    if shape is None:
        known = ", ".join(DUMMY_PREFIX + n for n in DUMMY_SHAPES)
        raise ModelNotFoundError(f"unknown dummy model shape {spec_or_name!r}; known: {known}")
    if shape.kind != kind:
        fitting = ", ".join(DUMMY_PREFIX + n for n, s in DUMMY_SHAPES.items() if s.kind == kind)
        raise EngineError(f"{DUMMY_PREFIX + name!r} is a {shape.kind} shape, not a {kind} one; use one of: {fitting}")
    return name, shape
