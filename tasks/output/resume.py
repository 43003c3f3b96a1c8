"""Resuming into an existing output: refuse a different config, verify and keep committed parts.

A part counts as committed when it exists, its footer says it holds the shard's row count, and its
lineage metadata names this shard and this config's fingerprint. Anything else is redone; a part
that cannot be read because storage is failing is not redone silently: transient errors are
retried, and a persistent one fails the run (exit 3).
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shardwise.tasks.config.job import EXECUTION_KNOBS, FINGERPRINT_SETTINGS, JobConfig
from shardwise.tasks.config.output_schema import canonical_schema_text
from shardwise.tasks.errors import ConfigError, StorageError
from shardwise.tasks.planning.shards import Shard, ShardPlan
from shardwise.tasks.records.results import PartInfo, RowIds, ShardResult, TokenCounts
from shardwise.tasks.redaction import redact_values
from shardwise.tasks.storage.fs import is_storage_failure, is_transient, with_storage_retries
from shardwise.tasks.storage.locations import check_separate, location_relation
from shardwise.tasks.storage.output_dir import OutputDir
from shardwise.tasks.storage.output_layout import LINEAGE_PREFIX


def _differs(name: str, old: Any, new: Any) -> bool:
    """A setting compared as the fingerprint sees it: an output schema with its property order."""
    if name == "output_schema" and isinstance(old, dict) and isinstance(new, dict):
        return canonical_schema_text(old) != canonical_schema_text(new)
    return old != new


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    changed = []
    for key in FINGERPRINT_SETTINGS:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += [
                f"{key}.{k}"
                for k in sorted(set(a) | set(b))
                if _differs(k, a.get(k), b.get(k)) and k not in EXECUTION_KNOBS
            ]
        elif a != b:
            changed.append(key)
    return changed


def check_output_compatible(cfg: JobConfig) -> bool:
    """True when the output holds a previous run of a different config that ``overwrite`` allows
    replacing; raises :class:`ConfigError` when it does and ``overwrite`` is off."""
    manifest = OutputDir(cfg.output, cfg.storage_options).read_manifest()
    if manifest is None or manifest.get("config_fingerprint") == cfg.output_fingerprint():
        return False
    if cfg.overwrite:
        return True
    changed = _differences(manifest.get("config", {}), cfg.public_dict()) + cfg.model_changes(manifest.get("models"))
    printed, written = cfg.printed_chat_date(), manifest.get("chat_date")
    if printed is not None and written != printed:
        changed.append(f"the date the chat template prints ({written or 'not recorded'} -> {printed})")
    raise ConfigError(
        f"output {cfg.output} was written with a different config ({', '.join(changed or ['settings'])} changed); "
        "use another output or --overwrite to replace it"
    )


def check_output_location(cfg: JobConfig) -> None:
    """Refuse (exit 2) an output that overlaps the input, a row cache that overlaps either (see
    :func:`check_cache_location`), or an output that holds files shardwise did not write: a run
    never deletes or changes a file it cannot prove it wrote."""
    from shardwise.tasks.planning.shards import is_input_pattern

    input_is_pattern = is_input_pattern(cfg.input, cfg.storage_options)
    check_separate(cfg.input, cfg.output, cfg.storage_options, input_is_pattern)
    check_cache_location(cfg, input_is_pattern)
    output = OutputDir(cfg.output, cfg.storage_options)
    if output.is_file():
        raise ConfigError(
            f"output {cfg.output} is a file: --output names a directory for the parts (created if missing)"
        )
    foreign = output.foreign_files()
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ConfigError(
            f"output {cfg.output} holds files shardwise did not write ({shown}); use an empty or new output directory"
        )


# Why each overlap of the row cache with a run's data is refused.
_CACHE_OVERLAPS = {
    ("input", "is"): "a run would read the cache's entry files as input",
    ("input", "is inside"): "a run would read the cache's entry files as input",
    ("input", "contains"): "the cache's tree would hold the data it caches",
    ("output", "is"): "the output would hold files that are not its parts, which stops its next run",
    ("output", "is inside"): "the output would hold files that are not its parts, which stops its next run",
}


def check_cache_location(cfg: JobConfig, input_is_pattern: bool = False) -> None:
    """Refuse (exit 2) a row cache (``--cache`` / ``cache:``) that is or lies inside the input or
    the output, or that contains the input: its entry files are Parquet, which the next run
    would read as input, and files in an output that no run wrote there stop every later run."""
    if not cfg.cache:
        return
    for role, uri, is_pattern in (("input", cfg.input, input_is_pattern), ("output", cfg.output, False)):
        relation = location_relation(cfg.cache, uri, cfg.storage_options, is_pattern)
        why = _CACHE_OVERLAPS.get((role, relation)) if relation else None
        if why:
            raise ConfigError(
                f"row cache (--cache / cache:) {cfg.cache} {relation} the {role} {uri}: {why}; "
                "choose a cache location outside the input and the output"
            )


def clear_output(cfg: JobConfig) -> None:
    """Remove what shardwise wrote there (``_SUCCESS`` first, then parts, then the manifest)."""
    OutputDir(cfg.output, cfg.storage_options).clear()


def verify_part(cfg: JobConfig, shard: Shard) -> ShardResult | None:
    """The committed result of ``shard`` if its part is complete and from this config, else None.

    A damaged or foreign part gives None (it is redone); storage errors are retried while they
    look transient and otherwise raise :class:`StorageError`."""
    output = OutputDir(cfg.output, cfg.storage_options)
    uri = output.uri_of(shard.part_name)
    path = output.path_of(shard.part_name)

    def read() -> tuple[dict[str, str], pa.Table, int] | None:
        try:
            with output.fs.open(path, "rb") as handle:
                parquet = pq.ParquetFile(handle)
                metadata = parquet.schema_arrow.metadata or {}
                lineage = {k.decode(): v.decode() for k, v in metadata.items()}
                if (
                    parquet.metadata.num_rows != shard.num_rows
                    or lineage.get(f"{LINEAGE_PREFIX}shard_id") != shard.shard_id
                    or lineage.get(f"{LINEAGE_PREFIX}config_fingerprint") != cfg.output_fingerprint()
                ):
                    return None
                # With an output schema, the typed column's nulls are the answers that did not match it.
                schema_column = ["generated"] if cfg.output_schema_hash is not None else []
                table = parquet.read(columns=[cfg.id_column, "error", *schema_column])
                return lineage, table, output.fs.size(path)
        except FileNotFoundError:
            return None
        except Exception as err:  # noqa: BLE001 - sorted: storage trouble is retried, bad bytes redone
            if is_transient(err):
                raise
            if is_storage_failure(err):
                raise StorageError(f"cannot read {uri}: {type(err).__name__}: {err}") from None
            return None  # damaged part (bad footer, bad pages): redo it

    found = with_storage_retries(read, f"cannot read {uri}")
    if found is None:
        return None
    lineage, table, size = found
    error_rows = table.num_rows - table.column(1).null_count
    schema_valid_rows = table.num_rows - table.column(2).null_count if table.num_columns > 2 else None
    return ShardResult(
        index=shard.index,
        shard_id=shard.shard_id,
        name=shard.name,
        source=shard.source,
        status="committed",
        rows=shard.num_rows,
        error_rows=error_rows,
        part=PartInfo(uri=uri, bytes=size, write_id=lineage.get(f"{LINEAGE_PREFIX}part_write_id")),
        resumed=True,
        ids=RowIds(table.column(0)),
        tokens=TokenCounts(
            prompt=int(lineage.get(f"{LINEAGE_PREFIX}prompt_tokens", 0)),
            generated=int(lineage.get(f"{LINEAGE_PREFIX}generated_tokens", 0)),
        ),
        schema_valid_rows=schema_valid_rows,
        quality=footer_quality(lineage.get(f"{LINEAGE_PREFIX}quality")),
    )


def footer_quality(raw: str | None) -> dict[str, Any] | None:
    """A part's partial quality figures from its footer; None for a part written without them."""
    try:
        quality = json.loads(raw) if raw else None
    except ValueError:
        return None
    return quality if isinstance(quality, dict) else None


def find_committed(cfg: JobConfig, plan: ShardPlan) -> list[ShardResult]:
    """The planned shards whose parts are already committed with this config, verified from
    their footers. Each carries the models' provenance the output's manifest recorded when that
    manifest is of this config (the weights are the same: the fingerprint covers them), so a run
    that reuses parts keeps it in its manifest and MLflow run."""
    output = OutputDir(cfg.output, cfg.storage_options)
    parts = set(output.part_names())
    manifest = output.read_manifest() if parts else None
    models = (manifest or {}).get("models") if same_config(manifest, cfg) else None
    results = []
    for shard in plan.shards:
        if shard.part_name in parts:
            result = verify_part(cfg, shard)
            if result is not None:
                results.append(replace(result, models=dict(models)) if isinstance(models, dict) else result)
    return results


def same_config(manifest: dict[str, Any] | None, cfg: JobConfig) -> bool:
    return bool(manifest) and manifest.get("config_fingerprint") == cfg.output_fingerprint()


def published_manifest(cfg: JobConfig, plan: ShardPlan, committed: list[ShardResult]) -> dict[str, Any] | None:
    """The output's manifest when the output is already published exactly as this run would
    publish it: ``_SUCCESS`` present, the manifest of this config over the same input files
    (names and fingerprints), every planned shard's part verified with the write id the manifest
    lists, and no other part. A rerun of such an output changes nothing (it keeps its
    ``_SUCCESS``, its provenance and its quality verdict); None otherwise."""
    output = OutputDir(cfg.output, cfg.storage_options)
    if len(committed) != len(plan.shards) or not output.has_success():
        return None
    manifest = output.read_manifest()
    if not same_config(manifest, cfg) or manifest.get("status") != "succeeded":
        return None
    if manifest.get("input") != redact_values(json.loads(json.dumps(plan.to_dict()["files"], default=str))):
        return None
    listed = {
        s.get("part"): s.get("write_id")
        for s in manifest.get("shards", [])
        if isinstance(s, dict) and s.get("status") == "committed"
    }
    found = {r.part.name: r.part.write_id for r in committed if r.part}
    if found != listed or set(output.part_names()) != set(listed):
        return None
    return manifest


def committed_and_published(cfg: JobConfig, plan: ShardPlan) -> tuple[list[ShardResult], dict[str, Any] | None]:
    """The committed shards, and the published manifest when the run has nothing to change."""
    committed = find_committed(cfg, plan)
    return committed, published_manifest(cfg, plan, committed)


def prepare_output(cfg: JobConfig) -> None:
    """Refuse an output of another config, or clear it when ``overwrite`` is set; drop temporary
    files, write probes and unfinished uploads a killed run left behind. Call holding the lease."""
    check_output_location(cfg)
    output = OutputDir(cfg.output, cfg.storage_options)
    if check_output_compatible(cfg):
        output.clear()
        return
    output.remove_debris()
