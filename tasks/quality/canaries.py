"""Canary rows: a fixed file (``quality.canaries``) answered greedily with every job, whose answers
must not change from one night to the next. Their answers and embeddings go into the output's
profile, and the gate compares them row by row with the baseline's."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from shardwise.tasks.config.output_columns import collision_message
from shardwise.tasks.errors import ConfigError, StorageError

if TYPE_CHECKING:
    import pyarrow as pa

    from shardwise.tasks.config.job import JobConfig

# Canary prompts print this date where a chat template prints one, so their answers do not
# change with the calendar.
CANARY_CHAT_DATE = "2026-01-01"
CANARY_COSINE_TOLERANCE = 1e-4  # embeddings of the same text on the same weights agree far closer


def read_canaries(cfg: JobConfig) -> pa.Table:
    """The canary rows; a missing file or column is a config error naming it."""
    import pyarrow.parquet as pq

    from shardwise.tasks.storage.fs import filesystem

    uri = cfg.quality.canaries
    assert uri is not None
    fs, path = filesystem(uri, cfg.storage_options)
    try:
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle)
    except FileNotFoundError:
        raise ConfigError(f"quality.canaries: {uri} not found") from None
    except OSError as err:
        raise StorageError(f"cannot read {uri}: {err}") from None
    except Exception as err:  # noqa: BLE001 - anything pyarrow says about the bytes
        raise ConfigError(f"quality.canaries: {uri} is not a readable Parquet file: {err}") from None
    needed = [cfg.id_column, cfg.text_column]
    if cfg.runs_generation:
        from shardwise.gpu_runtime import template_fields

        needed += template_fields(cfg.template)
    missing = [c for c in dict.fromkeys(needed) if c not in table.column_names]
    if missing:
        raise ConfigError(
            f"quality.canaries: {uri} has no column {missing[0]!r} (it has {', '.join(table.column_names)})"
        )
    collision = collision_message(cfg, table.column_names)
    if collision:
        raise ConfigError(f"quality.canaries: {uri}: {collision}")
    return table


def run_canaries(cfg: JobConfig) -> dict[str, Any]:
    """``{id: answer}`` (and ``{id: embedding}``) of the canary rows, generated greedily."""
    from shardwise.tasks.compute.shard_work import load_engines
    from shardwise.tasks.records.enrichment import enrich_table

    table = read_canaries(cfg)
    greedy = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"temperature": 0.0})})
    generator, embedder = load_engines(greedy)
    enriched, _ = enrich_table(table, greedy, generator, embedder, chat_date=CANARY_CHAT_DATE)
    ids = [str(i) for i in enriched.column(cfg.id_column).to_pylist()]
    canaries: dict[str, Any] = {}
    if cfg.runs_generation:
        canaries["answers"] = dict(zip(ids, enriched.column("generated_text").to_pylist()))
    if cfg.runs_embedding:
        canaries["embeddings"] = {
            i: [round(float(x), 6) for x in v] for i, v in zip(ids, enriched.column("embedding").to_pylist())
        }
    return canaries


def changed_canaries(now: dict[str, Any], before: dict[str, Any]) -> list[str]:
    """Ids of canary rows present in both whose answer differs, or whose embedding moved."""
    changed = [
        i
        for i, text in now.get("answers", {}).items()
        if i in before.get("answers", {}) and before["answers"][i] != text
    ]
    for i, vector in now.get("embeddings", {}).items():
        old = before.get("embeddings", {}).get(i)
        if old is not None and i not in changed and 1 - cosine(vector, old) > CANARY_COSINE_TOLERANCE:
            changed.append(i)
    return sorted(changed)


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else (1.0 if not any(a) and not any(b) else 0.0)


__all__ = ["CANARY_CHAT_DATE", "changed_canaries", "cosine", "read_canaries", "run_canaries"]
