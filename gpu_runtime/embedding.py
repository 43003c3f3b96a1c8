"""Batched sentence embeddings with a sentence-transformers model.

The model's own module list (Transformer -> Pooling -> [Normalize]) decides pooling and
normalisation; this engine only plans batches by token length and records truncation, so its
vectors equal ``SentenceTransformer.encode``'s. A normalising model computes in its own dtype
(bf16 on a GPU) and the float32 result is normalised once more, so norms are 1 to float32
precision. A prompt (``prompt_name``, or the model's default prompt) is prepended to every text,
as sentence-transformers does, and counts towards the token limit. A batch that runs out of
memory is halved and retried, and later batches of the engine are capped at the size that worked
(see backoff.py).

Each text is tokenized once, on the caller's thread, by the Rust tokenizer directly (checked on the
first call against the transformers tokenizer's columns): the same pass counts its tokens (to plan
batches) and gives the ids the model reads, so a worker holding two shards tokenizes the next
while the device computes the current one. An over-long text is cut to the model's limit from
those ids (special tokens kept); the first such cut is compared with the tokenizer's own
truncation, and a tokenizer that truncates differently tokenizes over-long texts again. The
prefetch thread only pads a batch's ids into tensors. That equals ``SentenceTransformer.preprocess`` for a plain text model; the first batch of
each prompt is built both ways and compared, and a model whose preprocessing differs (a chat
template, flattened inputs, its own padding) gets ``preprocess`` for every batch instead.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .backoff import BatchBackoff
from .batching import plan_batches
from .compute_thread import check_cancelled, on_compute_thread
from .device import default_dtype, tokenize_on_all_cores
from .dummy import build_sentence_transformer
from .embedding_output import EmbeddingOutput
from .errors import EngineError
from .prefetch import host_tensor, pin_for, prefetched, to_device
from .sizing import embedding_batch_size

if TYPE_CHECKING:
    from .model_specs import ResolvedModel

__all__ = ["EmbeddingEngine", "EmbeddingOutput"]

logger = logging.getLogger(__name__)


@dataclass
class _Tokenized:
    """One call's texts (each after the prompt) tokenized once: per row, the tokenizer's columns
    (``input_ids``, ``attention_mask``...) as the model reads them, i.e. truncated as the model
    truncates, and the row's token count before truncation."""

    columns: dict[str, list[list[int]]]
    n_tokens: list[int]


def _special_layout(tokenizer: Any) -> tuple[int, int] | None:
    """How many special tokens ``tokenizer`` adds before and after a text (``[CLS]``/``[SEP]``:
    1 and 1; a BOS alone: 1 and 0), found by tokenizing one word with and without them; None when
    the word's own tokens do not appear whole among the tokens with them."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if bare and full[start : start + len(bare)] == bare:
            return start, len(full) - start - len(bare)
    return None


class EmbeddingEngine:
    """A ``SentenceTransformer`` ready for batched embedding.

    Obtain one with :func:`gpu_runtime.load_embedding_engine` (cached per process). Calls to
    :meth:`embed` on one engine may come from several threads: each tokenizes its texts on its own
    thread (one at a time, with the engine's own copy of the tokenizer, which is not thread-safe)
    and computes on the device one at a time.
    """

    def __init__(self, model: Any, info: dict[str, Any]) -> None:
        self.model = model
        self.dim: int = int(model.get_embedding_dimension())
        self.max_seq_length: int = int(model.max_seq_length or model.tokenizer.model_max_length)
        self.normalize = any(type(module).__name__ == "Normalize" for module in model)
        self.info: dict[str, Any] = {**info, "dim": self.dim, "normalize": self.normalize}
        self._lock = threading.Lock()
        # A copy for the callers' threads, so that their tokenizing never meets the model's
        # tokenizer in use on the prefetch thread (a fast tokenizer is not thread-safe).
        self._tokenizer = copy.deepcopy(model.tokenizer)
        self._tokenizer_lock = threading.Lock()
        # How many special tokens the tokenizer puts before and after a text, to cut over-long
        # rows without tokenizing them again; whether that cut equals the tokenizer's own
        # truncation is checked on the first over-long row (None until then).
        self._special_layout = _special_layout(self._tokenizer)
        # Whether the Rust tokenizer alone gives what the transformers tokenizer does (None until the
        # first call compares them; False without a Rust backend).
        backend = getattr(self._tokenizer, "backend_tokenizer", None)
        self._backend_is_exact: bool | None = None if hasattr(backend, "encode_batch_fast") else False
        room = self._special_layout is not None and self.max_seq_length > sum(self._special_layout)
        self._cut_is_exact: bool | None = None if room else False
        # Per prompt: the non-token features preprocess adds (modality, prompt length), once the
        # padded ids were found equal to preprocess's; None where they were not.
        self._collate_extras: dict[str, dict[str, Any] | None] = {}
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
        tokenize_on_all_cores(device)
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
        max_batch_size: int | None = None,
        prompt_name: str | None = None,
    ) -> EmbeddingOutput:
        """Embed ``texts`` (returned in input order); over-long texts are truncated by the model.
        ``max_batch_size`` None is the device's default (:func:`embedding_batch_size`).
        ``prompt_name`` picks one of the model's prompts (``query``, ``document``...); None uses
        its default prompt, if it defines one."""
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"text {i} must be a string, got {text!r}")
        prompt = self.prompt(prompt_name)
        if not texts:
            return EmbeddingOutput(np.zeros((0, self.dim), dtype=np.float32), [], [])
        tokenized = self._tokenize(texts, prompt)  # on this thread, while the device may be busy
        rows = max_batch_size or embedding_batch_size(self.device)
        return on_compute_thread(self._embed, texts, tokenized, token_budget, rows, prompt)

    def _tokenize(self, texts: list[str], prompt: str) -> _Tokenized:
        """Every text after ``prompt``, tokenized once: counted whole, and cut to what the model
        reads where longer than its limit."""
        prompted = [prompt + text for text in texts]  # the prompt counts towards the limit
        with self._tokenizer_lock:
            columns = self._encode(prompted)
            n_tokens = [len(ids) for ids in columns["input_ids"]]
            long = [i for i, n in enumerate(n_tokens) if n > self.max_seq_length]
            if long:
                self._truncate(prompted, columns, long)
        return _Tokenized(columns, n_tokens)

    def _encode(self, prompted: list[str]) -> dict[str, list[list[int]]]:
        """The tokenizer's columns for ``prompted``, whole (no truncation, no padding). Straight from
        the Rust tokenizer's ``encode_batch_fast`` (no character offsets, which nothing here reads)
        once the first call found its columns equal to the transformers tokenizer's; from the
        transformers call where they were not, or where the tokenizer has no Rust backend."""
        if self._backend_is_exact is False:
            return self._by_tokenizer(prompted)
        direct = self._encoded_by_backend(prompted)
        if self._backend_is_exact is None:
            reference = self._by_tokenizer(prompted)
            self._backend_is_exact = direct == reference
            if not self._backend_is_exact:
                logger.info(
                    "embedding model %r prepares text beyond its Rust tokenizer: texts go through transformers",
                    self.info.get("spec"),
                )
                return reference
        return direct

    def _by_tokenizer(self, prompted: list[str], truncate: bool = False) -> dict[str, list[list[int]]]:
        """The transformers tokenizer's columns for ``prompted``: whole, or truncated to the
        model's limit (what ``SentenceTransformer.preprocess`` gives, before padding)."""
        # verbose=False: over-long inputs are expected; whole ones are cut afterwards.
        limit = (
            {"truncation": "longest_first", "max_length": self.max_seq_length} if truncate else {"truncation": False}
        )
        encoded = self._tokenizer(prompted, add_special_tokens=True, verbose=False, **limit)
        return {key: list(values) for key, values in encoded.items()}

    def _encoded_by_backend(self, prompted: list[str]) -> dict[str, list[list[int]]]:
        backend = self._tokenizer.backend_tokenizer
        # transformers leaves the truncation and padding of its last call set on the backend.
        if backend.truncation is not None:
            backend.no_truncation()
        if backend.padding is not None:
            backend.no_padding()
        encodings = backend.encode_batch_fast(prompted, add_special_tokens=True)
        columns = {"input_ids": [encoding.ids for encoding in encodings]}
        if "token_type_ids" in self._tokenizer.model_input_names:
            columns["token_type_ids"] = [encoding.type_ids for encoding in encodings]
        if "attention_mask" in self._tokenizer.model_input_names:
            columns["attention_mask"] = [encoding.attention_mask for encoding in encodings]
        return columns

    def _truncate(self, prompted: list[str], columns: dict[str, list[list[int]]], long: list[int]) -> None:
        """Cut the rows ``long`` of ``columns`` to the model's limit as the tokenizer's own
        truncation does (special tokens kept, the text cut on the tokenizer's truncation side),
        without tokenizing them again. The first over-long row an engine meets is also truncated
        by the tokenizer and the two compared; a tokenizer whose truncation is not that plain cut
        truncates every such row itself, in a second pass."""
        if self._cut_is_exact is None:
            reference = self._by_tokenizer([prompted[long[0]]], truncate=True)
            cut = {key: self._cut(values[long[0]]) for key, values in columns.items()}
            self._cut_is_exact = set(reference) == set(cut) and all(cut[k] == reference[k][0] for k in cut)
            if not self._cut_is_exact:
                logger.info(
                    "embedding model %r truncates its own way: over-long texts are tokenized a second time",
                    self.info.get("spec"),
                )
        if self._cut_is_exact:
            for values in columns.values():
                for i in long:
                    values[i] = self._cut(values[i])
            return
        for key, values in self._by_tokenizer([prompted[i] for i in long], truncate=True).items():
            for i, row in zip(long, values):
                columns[key][i] = row

    def _cut(self, row: list[int]) -> list[int]:
        """One over-long row's column cut to ``max_seq_length``: the special tokens the tokenizer
        adds before and after the text kept, the text's tokens cut on the truncation side."""
        before, after = self._special_layout
        keep = self.max_seq_length - before - after
        text = row[before : len(row) - after]
        text = (text[len(text) - keep :] if keep else []) if self._tokenizer.truncation_side == "left" else text[:keep]
        return row[:before] + text + row[len(row) - after :]

    def _embed(
        self, texts: list[str], tokenized: _Tokenized, token_budget: int, max_batch_size: int, prompt: str
    ) -> EmbeddingOutput:
        n_tokens = tokenized.n_tokens
        with self._lock:
            # What a row costs in a batch is its length after truncation.
            batches = plan_batches(
                [len(ids) for ids in tokenized.columns["input_ids"]],
                token_budget=token_budget,
                max_batch_size=max_batch_size,
            )
            vectors = np.empty((len(texts), self.dim), dtype=np.float32)
            # The next batch is padded (and pinned, on CUDA) while this one computes.
            features_of = lambda rows: self._features(texts, tokenized, rows, prompt)  # noqa: E731
            for batch, features in prefetched(batches, features_of):
                check_cancelled()
                rows = self.backoff.run(
                    batch,
                    self._encode_rows(features_of, batch, features),
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

    def _features(self, texts: list[str], tokenized: _Tokenized, rows: list[int], prompt: str) -> dict[str, Any]:
        """The model's inputs for ``prompt`` + ``texts[rows]``, equal to what
        ``SentenceTransformer.encode`` builds (truncation, padding, prompt length for pooling), in
        pinned memory when bound for CUDA. Runs on the prefetch thread."""
        if prompt not in self._collate_extras:
            # First batch with this prompt: padded ids only if they equal preprocess's.
            reference = self.model.preprocess([texts[i] for i in rows], prompt=prompt or None)
            self._collate_extras[prompt] = _extras_if_equal(self._collate(tokenized, rows), reference)
            if self._collate_extras[prompt] is None:
                logger.info(
                    "embedding model %r preprocesses text its own way: each batch is tokenized again",
                    self.info.get("spec"),
                )
            return pin_for(reference, self.device)
        extras = self._collate_extras[prompt]
        if extras is None:
            return pin_for(self.model.preprocess([texts[i] for i in rows], prompt=prompt or None), self.device)
        return {**self._collate(tokenized, rows), **extras}

    def _collate(self, tokenized: _Tokenized, rows: list[int]) -> dict[str, Any]:
        """``rows``' token columns padded to the longest of them, as the tokenizer pads (its side,
        pad token and pad type id), as int64 tensors in pinned memory when bound for CUDA."""
        tokenizer = self.model.tokenizer
        pad_values = {"input_ids": tokenizer.pad_token_id, "token_type_ids": tokenizer.pad_token_type_id}
        width = max(len(tokenized.columns["input_ids"][i]) for i in rows)
        left = tokenizer.padding_side == "left"
        features: dict[str, Any] = {}
        for key, per_row in tokenized.columns.items():
            pad = pad_values.get(key, 0)  # attention_mask: 0 on padding
            array = np.full((len(rows), width), pad if pad is not None else 0, dtype=np.int64)
            for r, i in enumerate(rows):
                ids = per_row[i]
                if left:
                    array[r, width - len(ids) :] = ids
                else:
                    array[r, : len(ids)] = ids
            features[key] = host_tensor(array, self.device)
        return features

    def _encode_rows(
        self,
        features_of: Callable[[list[int]], dict[str, Any]],
        batch: list[int],
        features: dict[str, Any],
    ) -> Callable[[list[int]], list[np.ndarray]]:
        """``rows -> one float32 vector per row``: ``features`` when the rows are the prepared
        ``batch``, else (a batch split after running out of memory) the rows prepared now."""

        def encode(rows: list[int]) -> list[np.ndarray]:
            return self._encode_features(features if rows == batch else features_of(rows))

        return encode

    def _encode_features(self, features: dict[str, Any]) -> list[np.ndarray]:
        """One forward pass: one float32 vector per row of ``features``, as ``encode`` returns them."""
        with torch.inference_mode():
            out = self.model(to_device(features, self.device))["sentence_embedding"]
            return list(out.float().cpu().numpy())


def _extras_if_equal(collated: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any] | None:
    """``reference``'s features other than the token columns (``modality``, ``prompt_length``) if
    its token columns equal ``collated``'s in shape, dtype and value; else None."""
    if not set(collated) <= set(reference):
        return None
    for key, tensor in collated.items():
        other = reference[key]
        if not isinstance(other, torch.Tensor) or other.dtype != tensor.dtype or not torch.equal(other, tensor):
            return None
    if any(isinstance(value, torch.Tensor) for key, value in reference.items() if key not in collated):
        return None  # a per-row tensor the single tokenization does not build
    return {key: value for key, value in reference.items() if key not in collated}
