"""The quality gate: a profile of every output, compared with a baseline before it is published.

Batch LLM outputs regress silently (an engine upgrade, a new model revision, a prompt edit), so
every run measures what it wrote and compares it with the last published output of the same job:

- each shard measures its own rows while it writes them (:func:`shard_profile`; kept in the
  ``ShardResult``, the manifest and the part's footer, so a resumed part keeps its figures) and the
  commit merges them (:func:`merge_profiles`): no second pass over the data;
- canary rows (``quality.canaries``, :mod:`~shardwise.tasks.quality.canaries`), a fixed file run
  greedily with every job, whose answers must not change from one night to the next;
- the baseline (:mod:`~shardwise.tasks.quality.baseline`): ``quality.baseline``, else for a dated
  run the latest earlier partition of the job that was published (``_SUCCESS``) with a profile;
- checks (:func:`run_checks`, here) with the thresholds of ``quality:``; with ``gate: hold`` a
  failed check withholds ``_SUCCESS`` and writes ``_QUALITY_HOLD`` instead, until
  :func:`~shardwise.tasks.quality.release.release_output` publishes it after a person has looked;
- the verdict's report (:mod:`~shardwise.tasks.quality.report`): MLflow figures and the markdown
  the flow shows.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from shardwise.tasks.config.quality import QualityConfig
from shardwise.tasks.output.verdict import CheckResult, QualityVerdict
from shardwise.tasks.quality.baseline import find_baseline
from shardwise.tasks.quality.canaries import changed_canaries, cosine, read_canaries
from shardwise.tasks.quality.significance import centroid_shift_p, mean_change_p, rate_increase_p
from shardwise.tasks.records.profile import merge_profiles

if TYPE_CHECKING:
    from shardwise.tasks.config.job import JobConfig
    from shardwise.tasks.records.results import ShardResult

PROFILE_FORMAT = "shardwise-quality/1"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def run_context(cfg: JobConfig, results: list[ShardResult]) -> dict[str, Any]:
    """What produced the output (settings, weights, prompt, engine): shown next to a failed check,
    so a person can tell a change made on purpose from one that was not."""
    from shardwise.tasks.tracking.runs import prompt_hash

    engines = {}
    for r in results:
        for role, info in r.models.items():
            if info.get("engine"):
                engines[role] = f"{info['engine']} {info.get('engine_version') or ''}".strip()
    context: dict[str, Any] = {"settings_fingerprint": cfg.settings_fingerprint(), "models": cfg.model_identities()}
    if cfg.runs_generation:
        context["prompt_hash"] = prompt_hash(cfg)
    if engines:
        context["engines"] = engines
    return context


def check_quality_settings(cfg: JobConfig) -> None:
    """Fail fast (exit 2) on a canary file or baseline that cannot be used, before any work."""
    if cfg.quality.canaries is not None:
        read_canaries(cfg)
    if cfg.quality.baseline is not None:
        find_baseline(cfg)


def _ceiling(name: str, value: float | None, threshold: float | None) -> CheckResult | None:
    if threshold is None or value is None:
        return None
    return CheckResult(name, value, threshold, passed=value <= threshold)


def run_checks(settings: QualityConfig, profile: dict[str, Any], baseline: dict[str, Any] | None) -> list[CheckResult]:
    """Every enabled check that applies to this output; comparisons only against a baseline.

    A comparison fails when its change is past its threshold and, by the test of
    :mod:`~shardwise.tasks.quality.significance`, unlikely to come from the two outputs' sampling
    (p below ``significance``). Profiles without the figures for that test (older versions) are
    compared only when both have ``min_rows`` rows; canaries are compared row by row at any size."""
    checks = [
        _ceiling("error_rate", profile.get("error_rate"), settings.max_error_rate),
        _ceiling("empty_rate", profile.get("empty_rate"), settings.max_empty_rate),
        _ceiling("refusal_rate", profile.get("refusal_rate"), settings.max_refusal_rate),
    ]
    base = baseline or {}
    sized = bool(base) and min(profile.get("rows", 0), base.get("rows", 0)) >= settings.min_rows

    def compared(name: str, change: float, threshold: float, p: float | None, before: float | None = None):
        if p is None and not sized:
            return None  # a handful of rows, and no way to tell their noise
        past = change > threshold
        significant = p is None or p < settings.significance
        note = "" if p is None else f"p={p:.2g}" + ("" if significant or not past else ": within sampling noise")
        return CheckResult(name, change, threshold, before, not (past and significant), note=note)

    if settings.max_length_rate_increase is not None and "length_rate" in profile and "length_rate" in base:
        increase = profile["length_rate"] - base["length_rate"]
        p = None
        if "answered_rows" in profile and "answered_rows" in base:
            n_base, n_now = base["answered_rows"], profile["answered_rows"]
            p = rate_increase_p(
                round(base["length_rate"] * n_base), n_base, round(profile["length_rate"] * n_now), n_now
            )
        checks.append(
            compared("length_rate_increase", increase, settings.max_length_rate_increase, p, base["length_rate"])
        )
    if (
        settings.max_generated_tokens_change is not None
        and "generated_tokens" in profile
        and "generated_tokens" in base
    ):
        before, now = base["generated_tokens"]["mean"], profile["generated_tokens"]["mean"]
        change = abs(now - before) / before if before else (0.0 if not now else math.inf)
        p = mean_change_p(base["generated_tokens"].get("histogram"), profile["generated_tokens"].get("histogram"))
        checks.append(compared("generated_tokens_change", change, settings.max_generated_tokens_change, p, before))
    if settings.max_centroid_drift is not None and profile.get("embedding") and base.get("embedding"):
        now_c, before_c = profile["embedding"]["centroid"], base["embedding"]["centroid"]
        if len(now_c) == len(before_c) and now_c:
            drift = 1 - cosine(now_c, before_c)
            p = centroid_shift_p(base["embedding"], profile["embedding"])
            checks.append(compared("centroid_drift", drift, settings.max_centroid_drift, p))
        elif sized:
            checks.append(
                CheckResult(
                    "centroid_drift",
                    None,
                    settings.max_centroid_drift,
                    note="embedding dimensions differ from the baseline's",
                )
            )
    if settings.max_canary_changes is not None and profile.get("canaries") and base.get("canaries"):
        changed = changed_canaries(profile["canaries"], base["canaries"])
        checks.append(
            CheckResult(
                "canaries_changed",
                float(len(changed)),
                settings.max_canary_changes,
                0.0,
                len(changed) <= settings.max_canary_changes,
                note=f"changed: {', '.join(changed[:10])}" if changed else "",
            )
        )
    return [c for c in checks if c is not None]


def assess(cfg: JobConfig, results: list[ShardResult], canaries: dict[str, Any] | None) -> QualityVerdict:
    """Profile the committed results, find the baseline and run the checks."""
    profile = {
        "format": PROFILE_FORMAT,
        "created_at": _now(),
        "output": cfg.output,
        **merge_profiles([r.quality for r in results if r.status == "committed"]),
        "context": run_context(cfg, results),
    }
    if canaries:
        profile["canaries"] = canaries
    baseline_uri, baseline = find_baseline(cfg)
    profile["baseline"] = baseline_uri
    checks = run_checks(cfg.quality, profile, baseline)
    failed = any(not c.passed for c in checks)
    status = "passed" if not failed else ("held" if cfg.quality.gate == "hold" else "warned")
    return QualityVerdict(status, profile, checks, baseline_uri, baseline)


__all__ = ["PROFILE_FORMAT", "assess", "check_quality_settings", "run_checks", "run_context"]
