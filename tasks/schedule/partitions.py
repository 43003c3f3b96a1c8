"""Date partitions for scheduled and backfill runs: which date a run owns and where its data lives.

A partitioned job writes ``<output>/dt=YYYY-MM-DD/`` and reads ``<input>/dt=YYYY-MM-DD/``; a
``{date}`` placeholder in ``input`` or ``output`` puts the date elsewhere in the path instead.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from shardwise.gpu_runtime.errors import ModelNotFoundError
from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.config.loading import build_config, read_config_file
from shardwise.tasks.config.quality import PartitionRef
from shardwise.tasks.errors import ConfigError, InputError
from shardwise.tasks.output.manifest import read_manifest
from shardwise.tasks.planning.shards import inspect_file, list_input_files
from shardwise.tasks.storage.fs import exists, join
from shardwise.tasks.storage.output_layout import SUCCESS_NAME

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MAX_BACKFILL_DAYS = 3660


def parse_date(value: str | dt.date, what: str = "date") -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value).strip())
    except ValueError:
        raise ConfigError(f"{what}: expected YYYY-MM-DD, got {value!r}") from None


def partition_dates(start: str | dt.date, end: str | dt.date) -> list[str]:
    """Every date from ``start`` to ``end``, both included, as ``YYYY-MM-DD``."""
    first, last = parse_date(start, "start"), parse_date(end, "end")
    if last < first:
        raise ConfigError(f"end {last} is before start {first}")
    days = (last - first).days + 1
    if days > MAX_BACKFILL_DAYS:
        raise ConfigError(f"{days} days from {first} to {last}: more than {MAX_BACKFILL_DAYS}; split the backfill")
    return [(first + dt.timedelta(days=i)).isoformat() for i in range(days)]


def nightly_date(scheduled_start: dt.datetime, timezone: str = "UTC", days_back: int = 1) -> str:
    """The partition a scheduled run owns: its *scheduled* start, in the schedule's timezone, minus
    ``days_back`` days. A run that starts hours late still processes its own night."""
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"timezone: unknown time zone {timezone!r}") from None
    if scheduled_start.tzinfo is None:
        scheduled_start = scheduled_start.replace(tzinfo=dt.UTC)
    local = scheduled_start.astimezone(zone)
    return (local.date() - dt.timedelta(days=days_back)).isoformat()


def resolve_job_file(path: str) -> Path:
    """A job config path as given, else under ``$SHARDWISE_PROJECT_DIR`` (the image sets it) or this
    checkout: a deployment's flow run starts in a temporary directory, not the project."""
    candidate = Path(path)
    if candidate.is_absolute() or candidate.is_file():
        return candidate
    for root in (os.environ.get("SHARDWISE_PROJECT_DIR"), PROJECT_ROOT):
        if root and (Path(root) / candidate).is_file():
            return Path(root) / candidate
    return candidate


def load_job(job: str | dict[str, Any]) -> dict[str, Any]:
    """A deployment's ``job`` parameter: a YAML path or the settings themselves (never credentials)."""
    if isinstance(job, dict):
        return dict(job)
    return read_config_file(resolve_job_file(job))


def _place_date(uri: str, date: str) -> str:
    if "{date}" in uri:
        return uri.replace("{date}", date)
    return join(uri, f"dt={date}")


def dated(cfg: JobConfig, date: str) -> JobConfig:
    """``cfg`` narrowed to one date partition of its input and output; a chat template that prints
    a date prints the partition's (unless ``generate.chat_date`` is set), so reruns match."""
    parsed = parse_date(date)
    day = parsed.isoformat()
    update: dict[str, Any] = {"input": _place_date(cfg.input, day), "output": _place_date(cfg.output, day)}
    if cfg.generate.chat_date is None:
        update["generate"] = cfg.generate.model_copy(update={"chat_date": parsed})
    # where the quality gate finds earlier partitions of this job to compare with
    update["quality"] = cfg.quality.model_copy(update={"partition": PartitionRef(date=parsed, output=cfg.output)})
    return cfg.model_copy(update=update)


def partition_config(job: str | dict[str, Any], date: str) -> JobConfig:
    """The job for one date partition, validated, with storage options from the environment."""
    return dated(build_config(None, load_job(job)), date)


def partition_done(cfg: JobConfig) -> bool:
    """True when the partition's output is complete, was written with this very config (model
    weights included), and from the input files the partition holds now: the same names with the
    same fingerprints. A partition that was empty or half-landed when it ran, or whose files were
    rewritten or withdrawn since, is not done (its rerun resumes what still matches).

    Costs a listing and one footer read per input file. A model this process cannot resolve, or an
    input it cannot list, counts as not done: the partition's own run then says why."""
    if not exists(join(cfg.output, SUCCESS_NAME), cfg.storage_options):
        return False
    manifest = read_manifest(cfg.output, cfg.storage_options) or {}
    try:
        if manifest.get("config_fingerprint") != cfg.output_fingerprint():
            return False
    except ModelNotFoundError:
        return False
    recorded = {f.get("uri"): f.get("fingerprint") for f in manifest.get("input") or []}
    try:
        uris = list_input_files(cfg.input, cfg.storage_options)
        current = {uri: inspect_file(uri, cfg.storage_options).fingerprint for uri in uris}
    except InputError:
        return False
    return current == recorded


def idempotency_key(deployment: str, cfg: JobConfig, date: str, attempt: int = 1) -> str:
    """One key per (deployment, output partition, config) and attempt: asking twice for the same
    partition returns the run already made, so concurrent or repeated backfills never duplicate it."""
    digest = hashlib.sha256(f"{deployment}|{cfg.output}|{cfg.settings_fingerprint()}".encode()).hexdigest()[:16]
    key = f"shardwise:{deployment}:dt={parse_date(date).isoformat()}:{digest}"
    return key if attempt == 1 else f"{key}:attempt-{attempt}"
