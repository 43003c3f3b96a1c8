"""The ``quality:`` section of a job config: what the publish gate compares, and how strictly.

Kept apart from ``shardwise.tasks.quality.gate`` (which computes profiles and runs checks) so that the job config
can validate it without importing anything heavy. Every threshold can be switched off with
``null``; a bad value is a config error (exit 2) like any other setting.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shardwise.tasks.config.paths import absolute_location

DEFAULT_REFUSAL_PATTERNS = ("I can't", "I cannot", "As an AI", "I'm sorry, but", "I am unable to")


class PartitionRef(BaseModel):
    """The date partition a dated run writes and the job's undated output, where the earlier
    partitions it is compared with live. Set by ``--date`` and the deployments, not by hand."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    date: dt.date
    output: str = Field(min_length=1)

    @field_validator("output")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return absolute_location(value)


class QualityConfig(BaseModel):
    """Checks run on every output before it is published (``_SUCCESS``).

    The comparisons with a baseline are on by default. The ceilings on error, empty and refusal
    rates are off unless set: their right level depends on the job (rows with bad input are
    written with an ``error`` and the run goes on, by contract), so each job chooses its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gate: Literal["hold", "warn"] = Field(
        default="hold", description="hold: a failed check withholds _SUCCESS; warn: publish and only report it"
    )
    baseline: str | None = Field(
        default=None,
        min_length=1,
        description="output to compare with (--baseline); null: the latest earlier published partition, if any",
    )
    canaries: str | None = Field(
        default=None, min_length=1, description="Parquet file of fixed input rows run with every job (greedy)"
    )
    refusal_patterns: tuple[str, ...] = Field(
        default=DEFAULT_REFUSAL_PATTERNS, description="an answer containing one of these (any case) is a refusal"
    )
    max_error_rate: float | None = Field(
        default=None, ge=0, le=1, description="ceiling on the share of rows with an error; null: no ceiling"
    )
    max_empty_rate: float | None = Field(
        default=None, ge=0, le=1, description="ceiling on the share of empty answers; null: no ceiling"
    )
    max_refusal_rate: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="ceiling on the share of answers matching a refusal pattern; null: no ceiling",
    )
    significance: float = Field(
        default=0.01,
        gt=0,
        lt=1,
        description="a comparison fails only when its change is past the threshold and this unlikely by sampling alone",
    )
    min_rows: int = Field(
        default=100,
        ge=1,
        description="compare figures whose sampling noise a profile does not record (older versions) only "
        "when both sides have this many rows",
    )
    max_length_rate_increase: float | None = Field(
        default=0.20, ge=0, le=1, description="rise of the finish_reason=length rate over the baseline (rate points)"
    )
    max_generated_tokens_change: float | None = Field(
        default=0.30, ge=0, description="relative change of mean generated tokens against the baseline"
    )
    max_centroid_drift: float | None = Field(
        default=0.05, ge=0, le=2, description="1 - cosine between tonight's and the baseline's embedding centroids"
    )
    max_canary_changes: int | None = Field(
        default=0, ge=0, description="canary rows whose answer (or embedding) differs from the baseline's"
    )
    partition: PartitionRef | None = Field(default=None, description="set by --date and the deployments")

    @field_validator("baseline", "canaries")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        return absolute_location(value)

    @field_validator("refusal_patterns")
    @classmethod
    def _patterns_are_text(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not p.strip() for p in value):
            raise ValueError("refusal patterns must not be empty (an empty pattern matches every answer)")
        return value


__all__ = ["DEFAULT_REFUSAL_PATTERNS", "PartitionRef", "QualityConfig"]
