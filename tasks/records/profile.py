"""What a shard's rows look like (lengths, refusals, empty answers, schema validity): partial
profiles each shard computes as it writes, merged into the output's profile the quality gate checks."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa


def _percentile(histogram: dict[str, int], q: float) -> float:
    total = sum(histogram.values())
    if not total:
        return 0.0
    rank, seen = math.ceil(q * total), 0
    for value in sorted(histogram, key=int):
        seen += histogram[value]
        if seen >= max(rank, 1):
            return float(value)
    return float(max(histogram, key=int))


def shard_profile(table: pa.Table, refusal_patterns: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Partial figures of one enriched shard, additive across shards (see :func:`merge_profiles`).

    Generated-token counts are kept as a histogram (``max_new_tokens`` bounds its size), so
    percentiles over the whole output are exact; the embedding centroid as a sum vector."""
    columns = set(table.column_names)
    errors = table.column("error").to_pylist()
    partial: dict[str, Any] = {"rows": table.num_rows, "error_rows": sum(e is not None for e in errors)}
    if "generated_text" in columns:
        texts = table.column("generated_text").to_pylist()
        reasons = table.column("finish_reason").to_pylist()
        generated = table.column("n_generated_tokens").to_pylist()
        prompts = table.column("n_prompt_tokens").to_pylist()
        lowered = [p.lower() for p in refusal_patterns]
        answered = [i for i, t in enumerate(texts) if t is not None]
        histogram: dict[str, int] = {}
        for i in answered:
            key = str(generated[i] or 0)
            histogram[key] = histogram.get(key, 0) + 1
        partial.update(
            answered_rows=len(answered),
            empty_rows=sum(not texts[i].strip() for i in answered),
            refusal_rows=sum(any(p in texts[i].lower() for p in lowered) for i in answered),
            length_rows=sum(reasons[i] == "length" for i in answered),
            prompt_tokens=sum(prompts[i] or 0 for i in answered),
            generated_tokens_histogram=histogram,
        )
        if "generated" in columns:
            partial["schema_valid_rows"] = table.num_rows - table.column("generated").null_count
    if "embedding" in columns:
        import numpy as np

        column = table.column("embedding").combine_chunks()
        dim = column.type.list_size
        vectors = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float64).reshape(-1, dim)
        norms = np.linalg.norm(vectors, axis=1)
        embedded = norms > 0  # rows with an error hold all-zero vectors
        partial.update(
            embedded_rows=int(embedded.sum()),
            embedding_norm_sum=float(norms[embedded].sum()),
            embedding_sq_norm_sum=float((norms[embedded] ** 2).sum()),
            embedding_sum=[round(float(v), 7) for v in vectors[embedded].sum(axis=0)],
        )
    return partial


def merge_profiles(partials: list[dict[str, Any] | None]) -> dict[str, Any]:
    """The output's profile from its shards' partial figures (None: a part written without one)."""
    known = [p for p in partials if p is not None]
    total: dict[str, Any] = {}
    histogram: dict[str, int] = {}
    embedding_sum: list[float] | None = None
    for p in known:
        for key, value in p.items():
            if key == "generated_tokens_histogram":
                for n, count in value.items():
                    histogram[n] = histogram.get(n, 0) + count
            elif key == "embedding_sum":
                embedding_sum = list(value) if embedding_sum is None else [a + b for a, b in zip(embedding_sum, value)]
            else:
                total[key] = total.get(key, 0) + value
    rows = total.get("rows", 0)
    profile: dict[str, Any] = {
        "rows": rows,
        "shards_profiled": len(known),
        "shards_without_profile": len(partials) - len(known),
        "error_rate": total.get("error_rows", 0) / rows if rows else 0.0,
    }
    if "answered_rows" in total:
        answered = total["answered_rows"]

        def rate(key: str) -> float:
            return total.get(key, 0) / answered if answered else 0.0

        generated = sum(int(n) * c for n, c in histogram.items())
        profile.update(
            answered_rows=answered,
            empty_rate=rate("empty_rows"),
            refusal_rate=rate("refusal_rows"),
            length_rate=rate("length_rows"),
            prompt_tokens_mean=total.get("prompt_tokens", 0) / answered if answered else 0.0,
            generated_tokens={
                "mean": generated / answered if answered else 0.0,
                "p50": _percentile(histogram, 0.5),
                "p95": _percentile(histogram, 0.95),
                "histogram": dict(sorted(histogram.items(), key=lambda kv: int(kv[0]))),
            },
        )
        if "schema_valid_rows" in total:
            profile["schema_valid_rate"] = total["schema_valid_rows"] / rows if rows else 0.0
    if embedding_sum is not None:
        embedded = total.get("embedded_rows", 0)
        profile["embedding"] = {
            "rows": embedded,
            "centroid": [round(v / embedded, 7) for v in embedding_sum] if embedded else [],
            "mean_norm": total.get("embedding_norm_sum", 0.0) / embedded if embedded else 0.0,
        }
        if "embedding_sq_norm_sum" in total and embedded:  # the spread the quality gate's test needs
            profile["embedding"]["mean_sq_norm"] = total["embedding_sq_norm_sum"] / embedded
    return profile
