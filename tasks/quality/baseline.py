"""The baseline an output is compared with: ``quality.baseline``, else for a dated run the latest
earlier partition of the job that was published (``_SUCCESS``) with a profile."""

from __future__ import annotations

import datetime as dt
import re
from typing import TYPE_CHECKING, Any

from shardwise.tasks.errors import ConfigError, StorageError
from shardwise.tasks.storage.output_dir import OutputDir
from shardwise.tasks.storage.output_layout import QUALITY_NAME, SUCCESS_NAME

if TYPE_CHECKING:
    from shardwise.tasks.config.job import JobConfig

_PARTITION_DIR = re.compile(r"dt=(\d{4}-\d{2}-\d{2})")
_MAX_TEMPLATE_DAYS_BACK = 92  # a {date} output is probed day by day, this far back at most


def read_profile(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """An output's ``_quality.json``, or None when it has none (or it cannot be parsed)."""
    _, profile = OutputDir(uri, storage_options).read_json(QUALITY_NAME)
    return profile if isinstance(profile, dict) else None


def _published_profile(uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    directory = OutputDir(uri, storage_options)
    names = directory.names()
    if SUCCESS_NAME not in names or QUALITY_NAME not in names:
        return None
    return read_profile(uri, storage_options)


def _earlier_partitions(cfg: JobConfig) -> list[str]:
    """Output URIs of the job's partitions before this one, latest first."""
    from shardwise.tasks.storage.fs import filesystem, join

    partition = cfg.quality.partition
    assert partition is not None
    if "{date}" in partition.output:
        days = (partition.date - dt.timedelta(days=n) for n in range(1, _MAX_TEMPLATE_DAYS_BACK + 1))
        return [partition.output.replace("{date}", d.isoformat()) for d in days]
    fs, root = filesystem(partition.output, cfg.storage_options)
    try:
        entries = fs.ls(root.rstrip("/") or "/", detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as err:
        raise StorageError(f"cannot list {partition.output}: {err}") from None
    dates = []
    for entry in entries:
        match = _PARTITION_DIR.fullmatch(entry["name"].rstrip("/").rsplit("/", 1)[-1])
        if entry.get("type") == "directory" and match and match[1] < partition.date.isoformat():
            dates.append(match[1])
    return [join(partition.output, f"dt={d}") for d in sorted(dates, reverse=True)]


def find_baseline(cfg: JobConfig) -> tuple[str | None, dict[str, Any] | None]:
    """``(uri, profile)`` of the output tonight is compared with, or ``(None, None)``."""
    if cfg.quality.baseline is not None:
        profile = read_profile(cfg.quality.baseline, cfg.storage_options)
        if profile is None:
            raise ConfigError(
                f"quality.baseline: {cfg.quality.baseline} has no {QUALITY_NAME} "
                "(choose an output written by a run with the quality gate)"
            )
        return cfg.quality.baseline, profile
    if cfg.quality.partition is None:
        return None, None
    for uri in _earlier_partitions(cfg):
        profile = _published_profile(uri, cfg.storage_options)
        if profile is not None:
            return uri, profile
    return None, None


__all__ = ["find_baseline", "read_profile"]
