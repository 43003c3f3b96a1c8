"""Token counts without model weights, for forecasts made before a run (``shardwise plan``).

Counts follow the engines exactly: a generation prompt goes through
:func:`~shardwise.gpu_runtime.prompts.encode_chat`, the generation engine's own encoder (chat template,
template variables, run date, truncation to the same input limit); an embedding text is the model's
prompt plus the text, tokenized with special tokens and untruncated, as the embedding engine counts
it. Only tokenizers and config files are read.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .dummy import llama_tokenizer_dir
from .dummy_shapes import DUMMY_PREFIX, DUMMY_SHAPES
from .gguf_cache import converted_gguf_dir
from .model_specs import bundled_files, resolve_model_spec
from .prompts import encode_chat

__all__ = ["PromptCounter", "load_tokenizer"]

# The engine's own sentinel test: model_max_length is a huge number when the tokenizer does not know it.
_SANE_CONTEXT = 10_000_000


def _tokenizer_source(spec: str) -> tuple[str, dict[str, Any]]:
    """(directory or Hub id, extra from_pretrained kwargs) holding ``spec``'s tokenizer."""
    if spec.startswith(DUMMY_PREFIX):
        shape = DUMMY_SHAPES[spec[len(DUMMY_PREFIX) :]]
        if shape.tokenizer_spec == "bundled:smollm2-135m-instruct":
            return llama_tokenizer_dir(spec), {}
        _, directory = bundled_files(shape.tokenizer_spec, needed_by=spec)
        return str(directory), {}
    if spec == "bundled:smollm2-135m-instruct":
        return llama_tokenizer_dir(spec), {}  # reading a GGUF's tokenizer takes seconds: cached once
    resolved = resolve_model_spec(spec)
    if resolved.gguf_file is None:
        return resolved.path, {}
    converted = converted_gguf_dir(resolved)
    if converted is not None:
        return str(converted), {}
    return resolved.path, {"gguf_file": resolved.gguf_file}


def load_tokenizer(spec: str) -> Any:
    """The tokenizer of a model spec (bundled, local, GGUF, Hub or dummy), without its weights.

    Loaded once per process while its directory's files stay the same (a run's fingerprint,
    forecast and row cache each need it, and loading takes a few hundred ms); the object is
    shared, so callers only read it."""
    from transformers import AutoTokenizer

    source, kwargs = _tokenizer_source(spec)
    key = (source, json.dumps(kwargs, sort_keys=True), _files_signature(source))
    with _TOKENIZERS_GUARD:
        tokenizer = _TOKENIZERS.get(key)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        with _TOKENIZERS_GUARD:
            if len(_TOKENIZERS) >= _TOKENIZERS_KEPT:
                del _TOKENIZERS[next(iter(_TOKENIZERS))]
            tokenizer = _TOKENIZERS.setdefault(key, tokenizer)
    return tokenizer


_TOKENIZERS: dict[tuple[str, str, tuple | None], Any] = {}
_TOKENIZERS_GUARD = threading.Lock()
_TOKENIZERS_KEPT = 8


def _files_signature(source: str) -> tuple | None:
    """Names, sizes and modification times of a local directory's files (None for a Hub id):
    an edited tokenizer or chat template is loaded again."""
    try:
        entries = list(os.scandir(source))
    except OSError:
        return None
    return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries if e.is_file()))


def _max_context(spec: str, tokenizer: Any) -> int | None:
    """The engine's context length: the model config's ``max_position_embeddings``, else the tokenizer's."""
    candidates: list[Any] = []
    try:
        from transformers import AutoConfig

        source, kwargs = _tokenizer_source(spec)
        if not kwargs:  # a GGUF's config needs its tensors parsed: the tokenizer's figure does
            candidates.append(getattr(AutoConfig.from_pretrained(source), "max_position_embeddings", None))
    except Exception:  # noqa: BLE001 - a tokenizer-only directory has no config: use the tokenizer's
        pass
    candidates.append(getattr(tokenizer, "model_max_length", None))
    for value in candidates:
        if isinstance(value, int) and 0 < value < _SANE_CONTEXT:
            return value
    return None


class PromptCounter:
    """Counts the tokens a generation engine will see for each user text, with no model loaded."""

    def __init__(self, spec: str, max_new_tokens: int, max_input_tokens: int | None) -> None:
        self.tokenizer = load_tokenizer(spec)
        limit: float = max_input_tokens or math.inf
        context = _max_context(spec, self.tokenizer)
        if context is not None:
            limit = min(limit, context - max_new_tokens)
        self.limit = int(limit) if limit != math.inf else 2**62

    def count(
        self,
        user_texts: Sequence[str],
        system_prompt: str | None,
        template_kwargs: Mapping[str, Any] | None = None,
        date: dt.date | None = None,
    ) -> list[int]:
        """Prompt tokens per text, as the engine encodes (and, when too long, truncates) it."""
        return [
            len(
                encode_chat(
                    self.tokenizer,
                    text,
                    self.limit,
                    system_prompt=system_prompt,
                    template_kwargs=template_kwargs,
                    date=date,
                )[0]
            )
            for text in user_texts
        ]


def embedding_prompt(spec: str, prompt_name: str | None) -> str:
    """The text the embedding engine puts before every input (see ``EmbeddingEngine.prompt``), read
    from the model's ``config_sentence_transformers.json``; ``""`` when it defines none."""
    source, _ = _tokenizer_source(spec)
    config = Path(source) / "config_sentence_transformers.json"
    data = json.loads(config.read_text()) if config.is_file() else {}
    defined = {k: v for k, v in (data.get("prompts") or {}).items() if v is not None}
    if prompt_name is None:
        default = data.get("default_prompt_name")
        return defined.get(default, "") if default else ""
    if prompt_name not in defined:
        raise ValueError(
            f"embedding model {spec!r} has no prompt {prompt_name!r} (its prompts: "
            f"{', '.join(sorted(defined)) or 'none'})"
        )
    return defined[prompt_name]


def count_embedding_tokens(tokenizer: Any, texts: Sequence[str], prompt: str = "") -> list[int]:
    """Tokens per text as the embedding engine reports them (its prompt and special tokens included,
    untruncated)."""
    if not texts:
        return []
    ids = tokenizer([prompt + text for text in texts], add_special_tokens=True, truncation=False, verbose=False)[
        "input_ids"
    ]
    return [len(row) for row in ids]
