"""The prefetching of batches: order, errors, early close, and embeddings equal to the serial path."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from shardwise.gpu_runtime.prefetch import pin_for, prefetched, to_device


def test_items_come_back_in_order_with_their_preparation():
    out = list(prefetched(range(20), lambda i: i * i, depth=3))
    assert out == [(i, i * i) for i in range(20)]


def test_preparation_runs_ahead_on_another_thread_while_the_consumer_works():
    prepared_at: dict[int, float] = {}
    threads: set[str] = set()

    def prepare(i: int) -> int:
        threads.add(threading.current_thread().name)
        prepared_at[i] = time.perf_counter()
        return i

    consumed_at = {}
    for i, _ in prefetched(range(4), prepare, depth=1):
        consumed_at[i] = time.perf_counter()
        time.sleep(0.2)  # the "device" computing batch i
    assert threading.current_thread().name not in threads
    # Item i + 1 was ready before the consumer finished item i.
    for i in range(3):
        assert prepared_at[i + 1] < consumed_at[i] + 0.2


def test_an_error_in_preparation_is_raised_when_its_item_is_reached():
    def prepare(i: int) -> int:
        if i == 2:
            raise ValueError("bad batch 2")
        return i

    seen = []
    with pytest.raises(ValueError, match="bad batch 2"):
        for i, _ in prefetched(range(5), prepare):
            seen.append(i)
    assert seen == [0, 1]


def test_closing_early_stops_the_preparation():
    started: list[int] = []

    def prepare(i: int) -> int:
        started.append(i)
        return i

    items = prefetched(range(100), prepare, depth=2)
    next(items)
    items.close()
    count = len(started)
    time.sleep(0.1)
    assert len(started) == count <= 4


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth"):
        list(prefetched([1], lambda i: i, depth=0))


def test_cpu_features_are_neither_pinned_nor_changed():
    features = {"input_ids": torch.ones(2, 3, dtype=torch.long), "prompt_length": 4}
    pinned = pin_for(features, torch.device("cpu"))
    moved = to_device(pinned, torch.device("cpu"))
    assert torch.equal(moved["input_ids"], features["input_ids"]) and moved["prompt_length"] == 4


def test_prefetched_embeddings_equal_sentence_transformers_encode():
    from shardwise.gpu_runtime import load_embedding_engine

    engine = load_embedding_engine("dummy:bert-tiny", device="cpu")
    texts = [("word " * (i % 37)) + f"text {i}" for i in range(150)]
    out = engine.embed(texts, max_batch_size=16)  # ten batches: nine of them prefetched
    expected = engine.model.encode(texts, batch_size=16, convert_to_numpy=True)
    np.testing.assert_allclose(out.vectors, expected, atol=1e-5)
