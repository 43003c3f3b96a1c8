"""The gate's comparisons weigh each change against the sampling noise of the two outputs' sizes:
a collapse in 24 rows is held, normal variation between nights of 24 or of 10,000 rows is not."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from shardwise.tasks.config.quality import QualityConfig
from shardwise.tasks.quality.gate import run_checks
from shardwise.tasks.quality.significance import centroid_shift_p, mean_change_p, rate_increase_p
from shardwise.tasks.records.profile import merge_profiles, shard_profile


def night(tokens: list[int], reasons: list[str], vectors: np.ndarray) -> dict:
    """The profile of one night's output, through the shard profile the flow computes."""
    n = len(tokens)
    table = pa.table(
        {
            "id": [str(i) for i in range(n)],
            "generated_text": [f"answer {i}" for i in range(n)],
            "n_prompt_tokens": pa.array([40] * n, pa.int32()),
            "n_generated_tokens": pa.array(tokens, pa.int32()),
            "finish_reason": reasons,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()), vectors.shape[1]),
            "error": pa.array([None] * n, pa.string()),
        }
    )
    return merge_profiles([shard_profile(table, ("I cannot",))])


def topic(rng: np.random.Generator, center: np.ndarray, rows: int) -> np.ndarray:
    """Unit vectors scattered around ``center``, as sentence embeddings of one kind of text are."""
    vectors = center + rng.normal(scale=0.8 / np.sqrt(center.size), size=(rows, center.size))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def healthy_tokens(rng: np.random.Generator, rows: int) -> tuple[list[int], list[str]]:
    """Answers of about 22 tokens, most of them cut by max_new_tokens 24 (length rate about 0.875)."""
    tokens = [24 if rng.random() < 0.875 else int(rng.integers(8, 24)) for _ in range(rows)]
    return tokens, ["length" if t == 24 else "stop" for t in tokens]


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def verdict(now: dict, base: dict) -> dict[str, object]:
    return {c.name: c for c in run_checks(QualityConfig(), now, base)}


def test_a_collapse_in_24_rows_is_held_and_healthy_24_row_nights_pass(rng):
    center = rng.normal(size=384)
    center /= np.linalg.norm(center)
    nights = [night(*healthy_tokens(rng, 24), topic(rng, center, 24)) for _ in range(3)]
    for earlier, later in zip(nights, nights[1:]):
        checks = verdict(later, earlier)
        assert {"length_rate_increase", "generated_tokens_change", "centroid_drift"} <= set(checks)
        assert all(c.passed for c in checks.values()), [(c.name, c.value, c.note) for c in checks.values()]

    collapsed = night([3] * 24, ["length"] * 24, topic(rng, center, 24))  # 22 -> 3 tokens on average
    checks = verdict(collapsed, nights[-1])
    assert not checks["generated_tokens_change"].passed and checks["generated_tokens_change"].value > 0.8
    assert checks["generated_tokens_change"].note.startswith("p=")

    other = rng.normal(size=384)
    other /= np.linalg.norm(other)
    drifted = night(*healthy_tokens(rng, 24), topic(rng, other, 24))  # another kind of text
    assert not verdict(drifted, nights[-1])["centroid_drift"].passed


def test_normal_variation_of_10000_row_nights_is_not_held(rng):
    center = rng.normal(size=384)
    center /= np.linalg.norm(center)
    a = night(*healthy_tokens(rng, 10_000), topic(rng, center, 10_000))
    b = night(*healthy_tokens(rng, 10_000), topic(rng, center, 10_000))
    checks = verdict(b, a)
    assert len(checks) == 3 and all(c.passed for c in checks.values()), [(c.name, c.value) for c in checks.values()]


def test_a_change_past_its_threshold_within_the_noise_of_a_few_rows_passes():
    # Six answers of very uneven length each night: the means differ by 40%, the sample cannot tell.
    base, now = {"2": 3, "40": 3}, {"2": 2, "40": 4}
    p = mean_change_p(base, now)
    assert p is not None and p > 0.01
    profile = lambda hist, mean: {"rows": 6, "generated_tokens": {"mean": mean, "histogram": hist}}  # noqa: E731
    (check,) = run_checks(QualityConfig(), profile(now, 82 / 3), profile(base, 21.0))
    assert check.value > 0.3 and check.passed and "within sampling noise" in check.note


def test_the_tests_themselves():
    assert rate_increase_p(21, 24, 24, 24) > 0.01  # 0.875 -> 1.0 in 24 rows: could be chance
    assert rate_increase_p(2, 24, 20, 24) < 1e-6  # 0.08 -> 0.83: not chance
    assert rate_increase_p(10, 24, 5, 24) > 0.5  # a decrease is never an increase
    assert mean_change_p({"20": 24}, {"20": 24}) == 1.0
    assert mean_change_p(None, {"3": 24}) is None  # older profile: no histogram
    assert centroid_shift_p({"rows": 4, "centroid": [1.0, 0.0]}, {"rows": 4, "centroid": [0.0, 1.0]}) is None
