"""Out-of-memory back-off: the helper on its own (fast) and injected into the real engines (slow).

The engine tests wrap the generation engine's real per-batch device work (``_generate_batch``: prefill
and decoding) / the real sentence-transformers module forward
so that batches above a size raise ``torch.OutOfMemoryError`` and smaller ones run for real."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from shardwise.gpu_runtime import EngineError, GenerationParams
from shardwise.gpu_runtime.backoff import BatchBackoff, is_out_of_memory


def _injected() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory (injected)")


# --- the helper ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        torch.cuda.OutOfMemoryError("CUDA out of memory"),
        RuntimeError("CUDA error: out of memory"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:116] . DefaultCPUAllocator: can't allocate memory: you tried"),
        RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        MemoryError(),
    ],
)
def test_out_of_memory_errors_are_recognised(exc):
    assert is_out_of_memory(exc)


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("shape mismatch"),
        ValueError("out of memory"),  # not an allocation failure type
        EngineError("out of memory on a batch of a single row"),  # our own final verdict
        KeyError("input_ids"),
    ],
)
def test_other_errors_are_not_out_of_memory(exc):
    assert not is_out_of_memory(exc)


class _Flaky:
    """Squares its rows; raises an out-of-memory error for batches of more than ``max_rows``."""

    def __init__(self, max_rows: int, error=_injected) -> None:
        self.max_rows = max_rows
        self.error = error
        self.attempts: list[list[int]] = []

    def __call__(self, rows: list[int]) -> list[int]:
        self.attempts.append(list(rows))
        if len(rows) > self.max_rows:
            raise self.error()
        return [r * r for r in rows]


def test_backoff_halves_in_order_and_caps_later_batches(caplog):
    backoff = BatchBackoff(torch.device("cpu"), what="test")
    fn = _Flaky(max_rows=2)
    with caplog.at_level(logging.WARNING, logger="shardwise.gpu_runtime.backoff"):
        first = backoff.run([9, 8, 7, 6, 5], fn)
        second = backoff.run([4, 3, 2, 1, 0], fn)
    assert first == [81, 64, 49, 36, 25] and second == [16, 9, 4, 1, 0]
    # 5 -> 3 + 2; 3 -> 2 + 1; the limit (2) then splits the next batch up front.
    assert [len(a) for a in fn.attempts] == [5, 3, 2, 1, 2, 2, 2, 1]
    assert fn.attempts[:5] == [[9, 8, 7, 6, 5], [9, 8, 7], [9, 8], [7], [6, 5]]
    assert backoff.limit == 2 and backoff.splits == 2
    assert backoff.attempts == [5, 3, 2, 1, 2, 2, 2, 1]
    assert "out of memory on a batch of 5 rows" in caplog.text


def test_backoff_without_errors_runs_each_batch_once():
    backoff = BatchBackoff(None, what="test")
    fn = _Flaky(max_rows=100)
    assert backoff.run([1, 2, 3], fn) == [1, 4, 9]
    assert fn.attempts == [[1, 2, 3]] and backoff.limit is None and backoff.splits == 0


def test_a_single_row_that_runs_out_of_memory_is_an_engine_error():
    backoff = BatchBackoff(torch.device("cpu"), what="generation with 'x'")
    fn = _Flaky(max_rows=0)
    with pytest.raises(EngineError, match=r"generation with 'x'.*single row \(prompt 3: 99 tokens\)") as info:
        backoff.run([3, 1, 2], fn, describe_row=lambda i: f"prompt {i}: 99 tokens")
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert info.value.__cause__.__traceback__ is None  # the failed attempt's frames (tensors) are not kept
    assert [len(a) for a in fn.attempts] == [3, 2, 1]


def test_other_errors_propagate_unchanged_and_cpu_allocator_errors_split():
    with pytest.raises(KeyError):
        BatchBackoff(None, what="test").run([1, 2], _Flaky(0, error=lambda: KeyError("input_ids")))
    cpu_oom = _Flaky(
        1, error=lambda: RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB")
    )
    assert BatchBackoff(None, what="test").run([1, 2, 3], cpu_oom) == [1, 4, 9]


def test_wrong_number_of_results_is_an_engine_error():
    with pytest.raises(EngineError, match="2 results for a batch of 3"):
        BatchBackoff(None, what="test").run([1, 2, 3], lambda rows: rows[:2])


# --- injected into the real engines (slow) ------------------------------------------------------

PROMPTS = [
    "Hi",
    "What is the capital of France?",
    "Explain in one sentence why the sky is blue.",
    "List three fruits.",
    "Summarize this review: " + "The hotel was clean, the staff friendly, the breakfast cold. " * 4,
    "Translate 'good morning' to Spanish.",
]


@pytest.fixture
def fresh_caps(generation_engine, embedding_engine, monkeypatch):
    """The session's engines with no learned out-of-memory cap (and their own back afterwards):
    the cap persists on an engine, so one test's injected failures must not size the next's."""
    for engine in (generation_engine, embedding_engine):
        monkeypatch.setattr(engine, "backoff", BatchBackoff(engine.device, what=engine.backoff.what))


def _rows(inputs, *args, **kwargs) -> int:
    """The rows of one batch's device work (``GenerationEngine._generate_batch``: prefill and decode)."""
    return inputs.rows


def _oom_above(real, max_rows: int, attempts: list[int], rows_of):
    def wrapper(*args, **kwargs):
        rows = rows_of(*args, **kwargs)
        attempts.append(rows)
        if rows > max_rows:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*args, **kwargs)

    return wrapper


@pytest.mark.slow
def test_generation_splits_batches_that_run_out_of_memory(generation_engine, monkeypatch, fresh_caps):
    params = GenerationParams(max_new_tokens=6, max_batch_size=3)  # 6 prompts: batches of 3 and 3
    expected = generation_engine.generate(PROMPTS, params)

    attempts: list[int] = []
    wrapped = _oom_above(generation_engine._generate_batch, 2, attempts, _rows)
    monkeypatch.setattr(generation_engine, "_generate_batch", wrapped)
    got = generation_engine.generate(PROMPTS, params)

    assert got == expected  # same order, same greedy text, same counts
    assert [g.n_generated_tokens for g in got] == [g.n_generated_tokens for g in expected]
    # The first batch of 3 fails and is split 2 + 1; the second batch starts at the size that worked.
    assert attempts == [3, 2, 1, 2, 1]


@pytest.mark.slow
def test_the_learned_cap_persists_across_calls(generation_engine, monkeypatch, fresh_caps):
    """A batch size that ran out of memory is not tried again by the next call (the next shard)."""
    params = GenerationParams(max_new_tokens=4, max_batch_size=3)
    attempts: list[int] = []
    monkeypatch.setattr(
        generation_engine, "_generate_batch", _oom_above(generation_engine._generate_batch, 2, attempts, _rows)
    )
    first = generation_engine.generate(PROMPTS, params)
    assert attempts == [3, 2, 1, 2, 1] and generation_engine.backoff.limit == 2
    attempts.clear()
    second = generation_engine.generate(PROMPTS, params)
    assert attempts == [2, 1, 2, 1]  # no batch of 3 again: no second out-of-memory error
    assert second == first


@pytest.mark.slow
def test_generation_single_row_out_of_memory_is_an_engine_error(generation_engine, monkeypatch, fresh_caps):
    attempts: list[int] = []
    monkeypatch.setattr(
        generation_engine, "_generate_batch", _oom_above(generation_engine._generate_batch, 0, attempts, _rows)
    )
    with pytest.raises(EngineError, match=r"out of memory on a batch of a single row \(prompt \d: \d+ tokens") as info:
        generation_engine.generate(PROMPTS[:3], GenerationParams(max_new_tokens=4, max_batch_size=2))
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert attempts == [2, 1]
    assert not generation_engine._lock.locked()


@pytest.mark.slow
def test_ignore_eos_survives_a_split(generation_engine, monkeypatch, fresh_caps):
    params = GenerationParams(max_new_tokens=6, max_batch_size=4, ignore_eos=True)
    expected = generation_engine.generate(PROMPTS[:4], params)
    attempts: list[int] = []
    monkeypatch.setattr(
        generation_engine, "_generate_batch", _oom_above(generation_engine._generate_batch, 1, attempts, _rows)
    )
    got = generation_engine.generate(PROMPTS[:4], params)
    assert got == expected
    assert all(g.n_generated_tokens == 6 and g.finish_reason == "length" for g in got)
    assert attempts == [4, 2, 1, 1, 1, 1]


EMBED_TEXTS = [
    "hello world",
    "A",
    "The hotel was clean and the staff were friendly.",
    ("A long text about nothing in particular, repeated. " * 100)[:5000],
    "Ein kurzer deutscher Satz.",
    "Prices rose 3.2% in May, the fastest pace since 2023.",
    "🙂 emoji and ünïcödé",
    "short",
    "What is the capital of France?",
    "Paris is the capital of France.",
]


@pytest.mark.slow
def test_embedding_splits_batches_that_run_out_of_memory(embedding_engine, monkeypatch, fresh_caps):
    expected = embedding_engine.embed(EMBED_TEXTS, max_batch_size=4)  # batches of 4, 4, 2

    attempts: list[int] = []
    transformer = embedding_engine.model[0]  # the module that runs the BERT forward pass
    wrapped = _oom_above(transformer.forward, 2, attempts, lambda features, *a, **kw: features["input_ids"].shape[0])
    monkeypatch.setattr(transformer, "forward", wrapped)
    got = embedding_engine.embed(EMBED_TEXTS, max_batch_size=4)

    assert attempts == [4, 2, 2, 2, 2, 2]
    np.testing.assert_allclose(got.vectors, expected.vectors, atol=1e-6)
    assert got.n_tokens == expected.n_tokens and got.truncated == expected.truncated


@pytest.mark.slow
def test_embedding_single_row_out_of_memory_is_an_engine_error(embedding_engine, monkeypatch, fresh_caps):
    transformer = embedding_engine.model[0]
    attempts: list[int] = []
    wrapped = _oom_above(transformer.forward, 0, attempts, lambda features, *a, **kw: features["input_ids"].shape[0])
    monkeypatch.setattr(transformer, "forward", wrapped)
    with pytest.raises(EngineError, match=r"embedding.*single row \(text \d+: \d+ tokens\)"):
        embedding_engine.embed(EMBED_TEXTS[:3], max_batch_size=8)
    assert attempts == [3, 2, 1]
