"""Resuming into an existing output: refuse a different config, verify and keep committed parts.

A part counts as committed when it exists, its footer says it holds the shard's row count, and its
lineage metadata names this shard and this config's fingerprint. Anything else is redone.
"""

from __future__ import annotations

from typing import Any

import pyarrow.parquet as pq
from prefect import task

from tasks.errors import ConfigError, StorageError
from tasks.job_config import JobConfig
from tasks.manifest import MANIFEST_NAME, SUCCESS_NAME, read_manifest
from tasks.planning import Shard, ShardPlan
from tasks.results import ShardResult
from tasks.retry_policy import retry_unless_bad_input
from tasks.shard_io import METADATA_PREFIX
from tasks.storage import TEMP_PREFIX, filesystem, join

_FINGERPRINT_KEYS = ("task", "text_column", "id_column", "keep_columns", "generate", "embed")


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    changed = []
    for key in _FINGERPRINT_KEYS:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += [f"{key}.{k}" for k in sorted(set(a) | set(b))
                        if a.get(k) != b.get(k) and k not in ("token_budget", "max_batch_size")]
        elif a != b:
            changed.append(key)
    return changed


def check_output_compatible(cfg: JobConfig) -> bool:
    """True when the output holds a previous run of a different config that ``overwrite`` allows
    replacing; raises :class:`ConfigError` when it does and ``overwrite`` is off."""
    manifest = read_manifest(cfg.output, cfg.storage_options)
    if manifest is None or manifest.get("config_fingerprint") == cfg.output_fingerprint():
        return False
    if cfg.overwrite:
        return True
    changed = _differences(manifest.get("config", {}), cfg.public_dict()) or ["settings"]
    raise ConfigError(
        f"output {cfg.output} was written with a different config ({', '.join(changed)} changed); "
        "use another output or --overwrite to replace it"
    )


def clear_output(cfg: JobConfig) -> None:
    """Remove what shardwise wrote there (``_SUCCESS`` first, then parts, then the manifest)."""
    fs, root = filesystem(cfg.output, cfg.storage_options)
    root = root.rstrip("/")
    paths = [f"{root}/{SUCCESS_NAME}"] + fs.glob(f"{root}/part-*.parquet") + [f"{root}/{MANIFEST_NAME}"]
    paths += fs.glob(f"{root}/{TEMP_PREFIX}*")
    for path in paths:
        if fs.exists(path):
            fs.rm_file(path)


def existing_parts(cfg: JobConfig) -> set[str]:
    fs, root = filesystem(cfg.output, cfg.storage_options)
    try:
        return {p.rsplit("/", 1)[-1] for p in fs.glob(f"{root.rstrip('/')}/part-*.parquet")}
    except OSError as err:
        raise StorageError(f"cannot list {cfg.output}: {err}") from None


def verify_part(cfg: JobConfig, shard: Shard) -> ShardResult | None:
    """The committed result of ``shard`` if its part is complete and from this config, else None."""
    uri = join(cfg.output, shard.part_name)
    fs, path = filesystem(uri, cfg.storage_options)
    try:
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            metadata = parquet.schema_arrow.metadata or {}
            lineage = {k.decode(): v.decode() for k, v in metadata.items()}
            if (
                parquet.metadata.num_rows != shard.num_rows
                or lineage.get(f"{METADATA_PREFIX}shard_id") != shard.shard_id
                or lineage.get(f"{METADATA_PREFIX}config_fingerprint") != cfg.output_fingerprint()
            ):
                return None
            table = parquet.read(columns=[cfg.id_column, "error"])
            ids = table.column(0).to_pylist()
            error_rows = table.column(1).null_count
            error_rows = table.num_rows - error_rows
            size = fs.size(path)
    except (OSError, ValueError, Exception):  # noqa: BLE001 - unreadable means "redo it"
        return None
    return ShardResult(
        index=shard.index, shard_id=shard.shard_id, name=shard.name, source=shard.source,
        status="committed", rows=shard.num_rows, error_rows=error_rows, part_uri=uri, part_bytes=size, resumed=True, ids=ids,
        prompt_tokens=int(lineage.get(f"{METADATA_PREFIX}prompt_tokens", 0)),
        generated_tokens=int(lineage.get(f"{METADATA_PREFIX}generated_tokens", 0)),
    )


def find_committed(cfg: JobConfig, plan: ShardPlan) -> list[ShardResult]:
    parts = existing_parts(cfg)
    results = []
    for shard in plan.shards:
        if shard.part_name in parts:
            result = verify_part(cfg, shard)
            if result is not None:
                results.append(result)
    return results


@task(name="find-committed", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_unless_bad_input)
def find_committed_task(cfg: JobConfig, plan: ShardPlan) -> list[ShardResult]:
    return find_committed(cfg, plan)


def prepare_output(cfg: JobConfig) -> None:
    """Refuse an output of another config, or clear it when ``overwrite`` is set; drop temporary
    files a killed run left behind."""
    if check_output_compatible(cfg):
        clear_output(cfg)
        return
    fs, root = filesystem(cfg.output, cfg.storage_options)
    for path in fs.glob(f"{root.rstrip('/')}/{TEMP_PREFIX}*"):
        fs.rm_file(path)


@task(name="prepare-output", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_unless_bad_input)
def prepare_output_task(cfg: JobConfig) -> None:
    prepare_output(cfg)
