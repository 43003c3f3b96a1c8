"""Length-aware batch planning.

Padding wastes compute in proportion to the length spread inside a batch, so rows are sorted by
token length (longest first) and packed greedily under a padded-token budget. Longest first means
an out-of-memory error, if any, shows up on the first batch rather than after an hour of work.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["plan_batches"]


def plan_batches(
    lengths: Sequence[int],
    *,
    token_budget: int,
    max_batch_size: int,
    extra_tokens_per_row: int = 0,
) -> list[list[int]]:
    """Group row indices into batches whose padded cost fits ``token_budget``.

    Returns lists of *original* indices; batches are ordered longest first and every index
    appears exactly once. A batch's cost is ``len(batch) * (max_len + extra_tokens_per_row)``
    (``extra_tokens_per_row`` accounts for e.g. tokens still to be generated). A row that is over
    budget on its own still gets a batch of one, so no row is ever dropped.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if extra_tokens_per_row < 0:
        raise ValueError(f"extra_tokens_per_row must be >= 0, got {extra_tokens_per_row}")
    if any(n < 0 for n in lengths):
        raise ValueError("lengths must be >= 0")

    # Stable sort: equal lengths keep input order, so plans are deterministic.
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    row_cost = 0  # padded cost of one row in `current` (its first row is its longest)
    for i in order:
        if current and len(current) < max_batch_size and (len(current) + 1) * row_cost <= token_budget:
            current.append(i)
            continue
        if current:
            batches.append(current)
        current = [i]
        row_cost = lengths[i] + extra_tokens_per_row
    if current:
        batches.append(current)
    return batches
