"""Token counts without model weights, for forecasts made before a run (``shardwise plan``).

Counts follow the engines exactly: a generation prompt is the user text wrapped by
:func:`~gpu_runtime.prompts.build_chat` and tokenized as :class:`~gpu_runtime.generation.GenerationEngine`
does (special tokens only for models without a chat template), capped at the same input limit; an
embedding text is tokenized with special tokens, untruncated, as the embedding engine counts it.
Only tokenizers and config files are read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .prompts import build_chat

__all__ = ["PromptCounter", "load_tokenizer"]

# The engine's own sentinel test: model_max_length is a huge number when the tokenizer does not know it.
_SANE_CONTEXT = 10_000_000


def _tokenizer_source(spec: str) -> tuple[str, dict[str, Any]]:
    """(directory or Hub id, extra from_pretrained kwargs) holding ``spec``'s tokenizer."""
    from .dummy import DUMMY_PREFIX, DUMMY_SHAPES, llama_tokenizer_dir
    from .models import _GGUF_CACHE_META, _bundled_files, gguf_cache_path, resolve_model_spec

    if spec.startswith(DUMMY_PREFIX):
        shape = DUMMY_SHAPES[spec[len(DUMMY_PREFIX):]]
        if shape.tokenizer_spec == "bundled:smollm2-135m-instruct":
            return llama_tokenizer_dir(spec), {}
        _, directory = _bundled_files(shape.tokenizer_spec, needed_by=spec)
        return str(directory), {}
    if spec == "bundled:smollm2-135m-instruct":
        return llama_tokenizer_dir(spec), {}  # reading a GGUF's tokenizer takes seconds: cached once
    resolved = resolve_model_spec(spec)
    if resolved.gguf_file is None:
        return resolved.path, {}
    converted = gguf_cache_path(resolved)
    if (converted / _GGUF_CACHE_META).exists():
        return str(converted), {}
    return resolved.path, {"gguf_file": resolved.gguf_file}


def load_tokenizer(spec: str) -> Any:
    """The tokenizer of a model spec (bundled, local, GGUF, Hub or dummy), without its weights."""
    from transformers import AutoTokenizer

    source, kwargs = _tokenizer_source(spec)
    return AutoTokenizer.from_pretrained(source, **kwargs)


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
        self._has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        limit: float = max_input_tokens or math.inf
        context = _max_context(spec, self.tokenizer)
        if context is not None:
            limit = min(limit, context - max_new_tokens)
        self.limit = limit

    def count(self, user_texts: Sequence[str], system_prompt: str | None) -> list[int]:
        """Prompt tokens per text; a text longer than the input limit counts as the limit (the engine
        truncates it to at most that)."""
        chats = [build_chat(self.tokenizer, text, system_prompt) for text in user_texts]
        if not chats:
            return []
        ids = self.tokenizer(chats, add_special_tokens=not self._has_chat_template, verbose=False)["input_ids"]
        return [int(min(len(row), self.limit)) for row in ids]


def count_embedding_tokens(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Tokens per text as the embedding engine reports them (special tokens included, untruncated)."""
    if not texts:
        return []
    ids = tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    return [len(row) for row in ids]
