"""plan_batches: the budget and size caps hold, every row appears once, longest rows first."""

from __future__ import annotations

import random

import pytest

from shardwise.gpu_runtime import plan_batches


def _check_plan(lengths, batches, budget, max_size, extra):
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
    order = [lengths[i] for i in flat]
    assert order == sorted(order, reverse=True)  # longest first, across and within batches
    for batch in batches:
        assert 1 <= len(batch) <= max_size
        cost = len(batch) * (max(lengths[i] for i in batch) + extra)
        assert cost <= budget or len(batch) == 1  # only a lone row may exceed the budget


@pytest.mark.parametrize("seed", range(200))
def test_random_plans_respect_every_rule(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(0, 20), rng.randint(1, 600)]) for _ in range(rng.randint(0, 80))]
    budget = rng.randint(1, 2000)
    max_size = rng.randint(1, 16)
    extra = rng.randint(0, 64)
    batches = plan_batches(lengths, token_budget=budget, max_batch_size=max_size, extra_tokens_per_row=extra)
    _check_plan(lengths, batches, budget, max_size, extra)


def test_greedy_packing_fills_batches():
    # 10 rows of 10 tokens, budget 50: five per batch, not fewer.
    assert [len(b) for b in plan_batches([10] * 10, token_budget=50, max_batch_size=32)] == [5, 5]


def test_max_batch_size_caps_rows():
    assert [len(b) for b in plan_batches([1] * 7, token_budget=10_000, max_batch_size=3)] == [3, 3, 1]


def test_oversized_row_gets_its_own_batch():
    batches = plan_batches([5, 1000, 6, 4], token_budget=100, max_batch_size=8)
    assert batches[0] == [1]
    assert batches[1:] == [[2, 0, 3]]


def test_extra_tokens_count_against_the_budget():
    # 4 rows of 10 fit in 40, but not once each row also needs 10 generated tokens.
    assert len(plan_batches([10] * 4, token_budget=40, max_batch_size=8)) == 1
    assert [len(b) for b in plan_batches([10] * 4, token_budget=40, max_batch_size=8, extra_tokens_per_row=10)] == [
        2,
        2,
    ]


def test_ties_keep_input_order_and_empty_input():
    assert plan_batches([3, 3, 3], token_budget=100, max_batch_size=8) == [[0, 1, 2]]
    assert plan_batches([], token_budget=100, max_batch_size=8) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"token_budget": 0, "max_batch_size": 1},
        {"token_budget": 10, "max_batch_size": 0},
        {"token_budget": 10, "max_batch_size": 1, "extra_tokens_per_row": -1},
    ],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        plan_batches([1, 2], **kwargs)
