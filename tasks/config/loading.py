"""A job's config from its sources: a YAML file, then overrides (the Python API's keyword
arguments, the command line's flags), then ``--set key=value`` options, validated into a
:class:`~shardwise.tasks.config.job.JobConfig`; a bad value is a :class:`ConfigError` naming it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.errors import ConfigError


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_set_options(items: list[str]) -> dict[str, Any]:
    """``["generate.max_new_tokens=8", "task=embed"]`` -> nested dict; values are parsed as YAML."""
    data: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return data


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return data


def build_config(
    file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    set_options: list[str] | None = None,
) -> JobConfig:
    """Merge file < overrides < ``--set`` and validate; a bad value raises :class:`ConfigError`."""
    from shardwise.tasks.storage.fs import runtime_storage_options

    data: dict[str, Any] = read_config_file(file) if file else {}
    data = _merge(data, overrides or {})
    data = _merge(data, parse_set_options(set_options or []))
    # $SHARDWISE_STORAGE_OPTIONS under the file's own storage_options (the file wins).
    data["storage_options"] = _merge(runtime_storage_options(), data.get("storage_options") or {})
    return validate_config(data, source=str(file) if file else "job config")


def validate_config(data: dict[str, Any], source: str = "job config") -> JobConfig:
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        message = first["msg"].removeprefix("Value error, ")
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise ConfigError(f"{source}: {where}: {message}{more}") from None
