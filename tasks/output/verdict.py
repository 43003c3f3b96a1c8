"""The quality gate's verdict on an output, and the files it leaves there (``_quality.json``, and
``_QUALITY_HOLD`` instead of ``_SUCCESS`` when it holds the output); the commit protocol writes them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shardwise.tasks.storage.output_dir import OutputDir
from shardwise.tasks.storage.output_layout import HOLD_NAME, QUALITY_NAME

if TYPE_CHECKING:
    pass


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class CheckResult:
    name: str
    value: float | None  # None: not evaluated (see ``note``)
    threshold: float
    baseline_value: float | None = None
    passed: bool = True
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "check": self.name,
            "value": self.value,
            "threshold": self.threshold,
            "baseline_value": self.baseline_value,
            "passed": self.passed,
            "note": self.note,
        }

    def describe(self) -> str:
        return f"{self.name} {self.value:.3g} > {self.threshold:g}"


@dataclass(frozen=True)
class QualityVerdict:
    """The gate's decision on one output: ``passed``, ``held`` or ``warned``."""

    status: str
    profile: dict[str, Any]
    checks: list[CheckResult]
    baseline_uri: str | None = None
    baseline: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def held(self) -> bool:
        return self.status == "held"

    @property
    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed]

    def message(self) -> str:
        """One line naming the failed checks (empty when none failed)."""
        if not self.failed:
            return ""
        from shardwise.tasks.redaction import redact_uri

        against = f" (baseline {redact_uri(self.baseline_uri)})" if self.baseline_uri else ""
        action = (
            "output held, no _SUCCESS: check it, then `shardwise release OUTPUT`"
            if self.held
            else "published anyway (quality.gate: warn)"
        )
        return f"quality checks failed: {'; '.join(c.describe() for c in self.failed)}{against}; {action}"

    def summary(self) -> dict[str, Any]:
        """What the manifest and the run summary record of the verdict."""
        from shardwise.tasks.redaction import redact_uri

        return {
            "status": self.status,
            "baseline": redact_uri(self.baseline_uri) if self.baseline_uri else None,
            "failed_checks": [c.name for c in self.failed],
            "message": self.message(),
            "checks": [c.to_dict() for c in self.checks],
        }

    def changed_since_baseline(self) -> list[str]:
        """What produced tonight's output differently from the baseline's (settings, model
        weights, prompt, engine): a change made on purpose shows here."""
        now, before = self.profile.get("context") or {}, (self.baseline or {}).get("context") or {}
        if not before:
            return []
        return [key for key in sorted(set(now) | set(before)) if now.get(key) != before.get(key)]

    def hold_document(self, output: str, run_info: dict[str, Any]) -> dict[str, Any]:
        return {
            "held_at": _now(),
            "output": output,
            "baseline": self.baseline_uri,
            "failed_checks": [c.to_dict() for c in self.failed],
            "changed_since_baseline": self.changed_since_baseline(),
            "message": self.message(),
            **run_info,
        }


def write_verdict(output: OutputDir, verdict: QualityVerdict, run_info: dict[str, Any]) -> None:
    """``_quality.json`` always; ``_QUALITY_HOLD`` as well when the gate holds the output."""
    output.write_json(QUALITY_NAME, verdict.profile)
    if verdict.held:
        output.write_json(HOLD_NAME, verdict.hold_document(output.uri, run_info))


def published_quality(quality: dict[str, Any]) -> dict[str, Any]:
    """The quality section of an already published output, as a run that leaves it unchanged
    reports it: an output the gate held and a person released reads ``released``, not ``held``."""
    if quality.get("status") == "held" and quality.get("release"):
        return {**quality, "status": "released"}
    return quality
