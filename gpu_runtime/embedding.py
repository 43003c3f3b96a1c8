"""Batched sentence embeddings with a sentence-transformers model.

The model's own module list (Transformer -> Pooling -> [Normalize]) decides pooling and
normalisation; this engine only plans batches by token length and records truncation, so its
vectors equal ``SentenceTransformer.encode``'s. A normalising model computes in its own dtype
(bf16 on a GPU) and the float32 result is normalised once more, so norms are 1 to float32
precision. A prompt (``prompt_name``, or the model's default prompt) is prepended to every text,
as sentence-transformers does, and counts towards the token limit. A batch that runs out of
memory is halved and retried, and later batches of the engine are capped at the size that worked
(see backoff.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .backoff import BatchBackoff
from .batching import plan_batches
from .compute_thread import check_cancelled, on_compute_thread
from .device import default_dtype
from .dummy import build_sentence_transformer
from .errors import EngineError
from .prefetch import pin_for, prefetched, to_device

if TYPE_CHECKING:
    from .model_specs import ResolvedModel

__all__ = ["EmbeddingEngine", "EmbeddingOutput"]


@dataclass
class EmbeddingOutput:
    """Embeddings in input order: ``vectors`` is float32 ``[n, dim]``; ``n_tokens`` counts each
    text's tokens (special tokens included) before truncation; ``truncated`` marks texts longer
    than the model's ``max_seq_length``, whose tail did not influence the vector."""

    vectors: np.ndarray
    n_tokens: list[int]
    truncated: list[bool]


class EmbeddingEngine:
    """A ``SentenceTransformer`` ready for batched embedding.

    Obtain one with :func:`gpu_runtime.load_embedding_engine` (cached per process). Calls to
    :meth:`embed` on one engine run one at a time (shared device, thread-unsafe tokenizer).
    """

    def __init__(self, model: Any, info: dict[str, Any]) -> None:
        self.model = model
        self.dim: int = int(model.get_embedding_dimension())
        self.max_seq_length: int = int(model.max_seq_length or model.tokenizer.model_max_length)
        self.normalize = any(type(module).__name__ == "Normalize" for module in model)
        self.info: dict[str, Any] = {**info, "dim": self.dim, "normalize": self.normalize}
        self._lock = threading.Lock()
        # Lives as long as the engine: a batch size that ran out of memory is not tried again.
        self.backoff = BatchBackoff(self.device, what=f"embedding with {info.get('spec')!r}")

    @classmethod
    def from_resolved(cls, resolved: ResolvedModel, device: torch.device) -> EmbeddingEngine:
        """Load ``resolved`` onto ``device``; a plain transformers checkpoint gets mean pooling
        from sentence-transformers itself, a ``dummy:`` spec seeded random weights (see dummy.py)."""
        from sentence_transformers import SentenceTransformer

        if resolved.gguf_file is not None:
            raise EngineError(f"{resolved.spec!r} is a GGUF model; embedding models must be transformers checkpoints")
        dtype = default_dtype(device)
        if resolved.source == "dummy":
            model = build_sentence_transformer(resolved.spec, device, dtype)
        else:
            model_kwargs = {"dtype": dtype} if dtype != torch.float32 else None
            model = SentenceTransformer(resolved.path, device=str(device), model_kwargs=model_kwargs)
        model.eval()
        info = resolved.engine_info(dtype, device)
        return cls(model, info)

    def prompt(self, prompt_name: str | None = None) -> str:
        """The text put before every input: the model's prompt called ``prompt_name``, or its
        default prompt when none is named (``""`` when the model has none)."""
        defined = {name: text for name, text in (self.model.prompts or {}).items() if text is not None}
        if prompt_name is None:
            default = getattr(self.model, "default_prompt_name", None)
            return defined.get(default, "") if default else ""
        if prompt_name not in defined:
            known = ", ".join(sorted(defined)) or "none"
            raise ValueError(
                f"embedding model {self.info.get('spec')!r} has no prompt {prompt_name!r} (its prompts: {known})"
            )
        return defined[prompt_name]

    def embed(
        self,
        texts: Sequence[str],
        *,
        token_budget: int = 16384,
        max_batch_size: int = 64,
        prompt_name: str | None = None,
    ) -> EmbeddingOutput:
        """Embed ``texts`` (returned in input order); over-long texts are truncated by the model.
        ``prompt_name`` picks one of the model's prompts (``query``, ``document``...); None uses
        its default prompt, if it defines one."""
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"text {i} must be a string, got {text!r}")
        prompt = self.prompt(prompt_name)
        if not texts:
            return EmbeddingOutput(np.zeros((0, self.dim), dtype=np.float32), [], [])
        return on_compute_thread(self._embed, texts, token_budget, max_batch_size, prompt)

    def _embed(self, texts: list[str], token_budget: int, max_batch_size: int, prompt: str) -> EmbeddingOutput:
        with self._lock:
            # verbose=False: over-long inputs are expected; the model truncates them itself.
            # The prompt is part of what the model reads, so it counts towards the limit.
            encoded = self.model.tokenizer(
                [prompt + text for text in texts], add_special_tokens=True, truncation=False, verbose=False
            )
            n_tokens = [len(ids) for ids in encoded["input_ids"]]
            # What a row costs in a batch is its length after truncation.
            batches = plan_batches(
                [min(n, self.max_seq_length) for n in n_tokens],
                token_budget=token_budget,
                max_batch_size=max_batch_size,
            )
            vectors = np.empty((len(texts), self.dim), dtype=np.float32)
            # The next batch is tokenized (and pinned, on CUDA) while this one computes.
            for batch, features in prefetched(batches, lambda rows: self._features(texts, rows, prompt)):
                check_cancelled()
                rows = self.backoff.run(
                    batch,
                    self._encode_rows(texts, prompt, batch, features),
                    describe_row=lambda i: f"text {i}: {min(n_tokens[i], self.max_seq_length)} tokens",
                )
                vectors[batch] = np.stack(rows)
        if self.normalize:
            # The model normalised in its own dtype (bf16 norms are off by ~1e-3): again in float32.
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            np.divide(vectors, norms, out=vectors, where=norms > 0)
        return EmbeddingOutput(vectors, n_tokens, [n > self.max_seq_length for n in n_tokens])

    @property
    def device(self) -> torch.device:
        return torch.device(self.model.device)

    def _features(self, texts: list[str], rows: list[int], prompt: str) -> dict[str, Any]:
        """The model's inputs for ``prompt`` + ``texts[rows]``, as ``SentenceTransformer.encode``
        builds them (truncation, prompt length for pooling), in pinned memory when bound for CUDA.
        Runs on the prefetch thread."""
        features = self.model.preprocess([texts[i] for i in rows], prompt=prompt or None)
        return pin_for(features, self.device)

    def _encode_rows(
        self, texts: list[str], prompt: str, batch: list[int], features: dict[str, Any]
    ) -> Callable[[list[int]], list[np.ndarray]]:
        """``rows -> one float32 vector per row``: ``features`` when the rows are the prepared
        ``batch``, else (a batch split after running out of memory) the rows prepared now."""

        def encode(rows: list[int]) -> list[np.ndarray]:
            return self._encode_features(features if rows == batch else self._features(texts, rows, prompt))

        return encode

    def _encode_features(self, features: dict[str, Any]) -> list[np.ndarray]:
        """One forward pass: one float32 vector per row of ``features``, as ``encode`` returns them."""
        with torch.inference_mode():
            out = self.model(to_device(features, self.device))["sentence_embedding"]
            return list(out.float().cpu().numpy())
