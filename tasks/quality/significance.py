"""Whether a change between tonight's output and its baseline is more than the noise of their sizes.

A comparison check fails only when its change is past the threshold *and* unlikely to come from
sampling alone (p below ``quality.significance``): 24 rows whose answers collapsed are held, while
the few percent by which two healthy nights of 10,000 rows differ are not. Each test uses only the
figures the profiles already hold (counts, the generated-token histogram, embedding sums), so a
resumed part's figures serve as they are:

- a rate (``length_rate``): a one-sided two-proportion z test (pooled, continuity-corrected);
- mean generated tokens: a two-sided Welch z test, the variances read from the two histograms;
- the embedding centroid: the squared distance between the two centroids against what it is
  expected to be by sampling alone (trace of each side's covariance over its rows), read as a
  chi-square with ``CENTROID_DOF`` degrees of freedom: sentence embeddings spread over a few tens
  of directions, so 10 is on the cautious side.

Each function returns None when the profiles lack the figures it needs (written by an older
version); the gate then falls back to comparing only outputs of ``quality.min_rows`` rows or more.
"""

from __future__ import annotations

import math
from typing import Any

CENTROID_DOF = 10


def _normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def rate_increase_p(base_hits: int, base_n: int, now_hits: int, now_n: int) -> float | None:
    """One-sided p-value that tonight's rate is higher than the baseline's by sampling alone."""
    if base_n <= 0 or now_n <= 0:
        return None
    pooled = (base_hits + now_hits) / (base_n + now_n)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / base_n + 1 / now_n))
    difference = now_hits / now_n - base_hits / base_n
    if spread == 0:
        return 1.0 if difference <= 0 else 0.0
    correction = 0.5 * (1 / base_n + 1 / now_n)
    return _normal_sf((difference - correction) / spread)


def _moments(histogram: dict[str, int]) -> tuple[int, float, float]:
    n = sum(histogram.values())
    if not n:
        return 0, 0.0, 0.0
    mean = sum(int(k) * c for k, c in histogram.items()) / n
    variance = sum(c * (int(k) - mean) ** 2 for k, c in histogram.items()) / max(n - 1, 1)
    return n, mean, variance


def mean_change_p(base_histogram: dict[str, int] | None, now_histogram: dict[str, int] | None) -> float | None:
    """Two-sided p-value that the mean generated tokens differ this much by sampling alone."""
    if not base_histogram or not now_histogram:
        return None
    (n1, m1, v1), (n2, m2, v2) = _moments(base_histogram), _moments(now_histogram)
    if not n1 or not n2:
        return None
    spread = math.sqrt(v1 / n1 + v2 / n2)
    if spread == 0:
        return 1.0 if m1 == m2 else 0.0
    return 2 * _normal_sf(abs(m2 - m1) / spread)


def _chi2_sf_even(x: float, dof: int) -> float:
    """P(X > x) for X chi-square with an even number of degrees of freedom (a closed form)."""
    half = x / 2
    term, total = 1.0, 1.0
    for i in range(1, dof // 2):
        term *= half / i
        total += term
    return min(1.0, math.exp(-half) * total)


def centroid_shift_p(base: dict[str, Any] | None, now: dict[str, Any] | None) -> float | None:
    """P-value that the two embedding centroids lie this far apart by sampling alone."""
    if not base or not now or "mean_sq_norm" not in base or "mean_sq_norm" not in now:
        return None
    n1, n2 = base.get("rows", 0), now.get("rows", 0)
    c1, c2 = base.get("centroid") or [], now.get("centroid") or []
    if not n1 or not n2 or len(c1) != len(c2) or not c1:
        return None

    def spread(profile: dict[str, Any], centroid: list[float]) -> float:  # trace of the covariance
        return max(profile["mean_sq_norm"] - sum(v * v for v in centroid), 0.0)

    expected = spread(base, c1) / n1 + spread(now, c2) / n2
    observed = sum((a - b) ** 2 for a, b in zip(c1, c2))
    if expected == 0:
        return 1.0 if observed == 0 else 0.0
    return _chi2_sf_even(CENTROID_DOF * observed / expected, CENTROID_DOF)


__all__ = ["CENTROID_DOF", "centroid_shift_p", "mean_change_p", "rate_increase_p"]
