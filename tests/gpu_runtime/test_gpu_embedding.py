"""The embedding engine on the bundled all-MiniLM-L6-v2 (slow)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow

TEXTS = [
    "hello world",
    "A",
    "The hotel was clean and the staff were friendly.",
    ("A long text about nothing in particular, repeated. " * 100)[:5000],  # ~1,000 tokens
    "Ein kurzer deutscher Satz.",
    " ".join(f"word{i}" for i in range(300)),
    "Prices rose 3.2% in May, the fastest pace since 2023.",
    "🙂 emoji and ünïcödé",
    "short",
    "The quick brown fox jumps over the lazy dog. " * 12,
    "What is the capital of France?",
    "Paris is the capital of France.",
    "Sentence embeddings map text to vectors.",
    "GPU batch inference over Parquet shards",
    "a b c d e f g",
    "This review is about a terrible product that broke after a day. " * 3,
    "Numbers: 1 2 3 4 5 6 7 8 9 10",
    "Tabs\tand\nnewlines",
    "   leading and trailing spaces   ",
    "The end.",
]


def test_matches_sentence_transformers_encode(embedding_engine):
    out = embedding_engine.embed(TEXTS, token_budget=600, max_batch_size=4)
    reference = embedding_engine.model.encode(TEXTS, convert_to_numpy=True, show_progress_bar=False)

    assert out.vectors.dtype == np.float32
    assert out.vectors.shape == (len(TEXTS), 384)
    cosine = np.sum(out.vectors * reference, axis=1) / (
        np.linalg.norm(out.vectors, axis=1) * np.linalg.norm(reference, axis=1)
    )
    assert cosine.min() >= 0.9999, cosine
    np.testing.assert_allclose(np.linalg.norm(out.vectors, axis=1), 1.0, atol=1e-5)


def test_token_counts_and_truncation_flags(embedding_engine):
    out = embedding_engine.embed(TEXTS, token_budget=600, max_batch_size=4)
    assert out.n_tokens[0] == 4  # [CLS] hello world [SEP]
    assert out.truncated == [n > embedding_engine.max_seq_length for n in out.n_tokens]
    assert out.truncated[3] is True and out.truncated[5] is True
    assert out.truncated[0] is False
    assert sum(out.truncated) == 2


def test_empty_input_and_info(embedding_engine):
    out = embedding_engine.embed([])
    assert out.vectors.shape == (0, 384) and out.vectors.dtype == np.float32
    assert out.n_tokens == [] and out.truncated == []
    assert embedding_engine.dim == 384 and embedding_engine.max_seq_length == 256
    info = embedding_engine.info
    assert info["normalize"] is True and info["dim"] == 384 and info["source"] == "bundled"
    assert info["dtype"] == "float32" and len(info["revision"]) == 64


def test_batching_does_not_change_vectors(embedding_engine):
    one_by_one = embedding_engine.embed(TEXTS[:6], max_batch_size=1).vectors
    together = embedding_engine.embed(TEXTS[:6], max_batch_size=64).vectors
    np.testing.assert_allclose(one_by_one, together, atol=1e-5)
