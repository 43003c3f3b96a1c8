"""The verdict as people and MLflow see it: tonight's figures next to the baseline's, every
check's result, and the ``quality_*`` metrics, tag, profile and length figure of the run."""

from __future__ import annotations

import math
from typing import Any

from shardwise.tasks.output.verdict import QualityVerdict
from shardwise.tasks.tracking import mlflow_store


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def comparison_rows(verdict: QualityVerdict) -> list[tuple[str, Any, Any]]:
    """``(figure, tonight, baseline)`` for the figures both profiles may hold."""
    now, base = verdict.profile, verdict.baseline or {}
    rows = [
        (name, now.get(name), base.get(name) if verdict.baseline else None)
        for name in (
            "rows",
            "error_rate",
            "empty_rate",
            "refusal_rate",
            "length_rate",
            "schema_valid_rate",
            "prompt_tokens_mean",
        )
    ]
    for stat in ("mean", "p50", "p95"):
        rows.append(
            (
                f"generated_tokens_{stat}",
                (now.get("generated_tokens") or {}).get(stat),
                (base.get("generated_tokens") or {}).get(stat),
            )
        )
    rows.append(
        (
            "embedding_mean_norm",
            (now.get("embedding") or {}).get("mean_norm"),
            (base.get("embedding") or {}).get("mean_norm"),
        )
    )
    return [r for r in rows if r[1] is not None or r[2] is not None]


def markdown(verdict: QualityVerdict) -> str:
    from shardwise.tasks.redaction import redact_uri
    from shardwise.tasks.tracking.reporting import markdown_text as md

    lines = [
        f"# Quality gate: {verdict.status}",
        "",
        f"- baseline: {md(redact_uri(verdict.baseline_uri)) if verdict.baseline_uri else 'none (nothing earlier to compare with)'}",
    ]
    if verdict.failed:
        lines.append(f"- {md(verdict.message())}")
    lines += ["", "| figure | tonight | baseline |", "|---|---|---|"]
    lines += [f"| {name} | {_fmt(now)} | {_fmt(base)} |" for name, now, base in comparison_rows(verdict)]
    lines += ["", "| check | value | threshold | baseline | result |", "|---|---|---|---|---|"]
    for c in verdict.checks:
        result = "pass" if c.passed else "FAIL"
        lines.append(
            f"| {c.name} | {_fmt(c.value)} | {_fmt(c.threshold)} | {_fmt(c.baseline_value)} | "
            f"{result}{' (' + md(c.note) + ')' if c.note else ''} |"
        )
    return "\n".join(lines)


def log_verdict(run_id: str, verdict: QualityVerdict) -> None:
    """MLflow: a ``quality_*`` metric per check and profile figure, the ``shardwise.quality`` tag,
    the profile, and the generated-length figure tonight vs baseline (:func:`markdown` is the same
    comparison for people)."""
    from shardwise.tasks.redaction import redact_uri, redact_values
    from shardwise.tasks.tracking.figures import generated_length_figure

    metrics = {f"quality_{c.name}": c.value for c in verdict.checks if c.value is not None and math.isfinite(c.value)}
    metrics |= {
        f"quality_{name}": now
        for name, now, _ in comparison_rows(verdict)
        if isinstance(now, (int, float)) and name != "rows"
    }
    metrics["quality_failed_checks"] = len(verdict.failed)
    tags = {"shardwise.quality": verdict.status}
    if verdict.baseline_uri:
        tags["shardwise.quality.baseline"] = redact_uri(verdict.baseline_uri)
    mlflow_store.log_values(run_id, metrics=metrics, tags=tags)
    mlflow_store.log_dict(
        run_id, redact_values({**verdict.profile, "checks": [c.to_dict() for c in verdict.checks]}), "quality.json"
    )
    tonight = (verdict.profile.get("generated_tokens") or {}).get("histogram")
    if tonight:
        figure = generated_length_figure(
            tonight,
            ((verdict.baseline or {}).get("generated_tokens") or {}).get("histogram"),
            redact_uri(verdict.baseline_uri) if verdict.baseline_uri else None,
        )
        mlflow_store.log_figure(run_id, figure, "generated_lengths.png")


__all__ = ["comparison_rows", "log_verdict", "markdown"]
