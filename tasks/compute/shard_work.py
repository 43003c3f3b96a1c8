"""One shard end to end: read its rows, run the engines, write its part.

Models come from ``gpu_runtime``'s per-process cache, so a worker loads each model once however
many shards it processes. Bad data (an ``InputError``) fails the shard at once; anything else (a
storage hiccup, an engine crash) is retried by the shard task
(:func:`shardwise.tasks.orchestration.steps.process_shard`).
"""

from __future__ import annotations

import json
import time
from typing import Any

from shardwise.tasks.compute.device_turns import device_turn
from shardwise.tasks.compute.runners import worker_label
from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.config.prices import gpu_energy_mj
from shardwise.tasks.errors import ConfigError, InputError
from shardwise.tasks.faults import crash_point
from shardwise.tasks.planning.shards import Shard
from shardwise.tasks.records.enrichment import enrich_table, invalid_utf8_rows
from shardwise.tasks.records.profile import shard_profile
from shardwise.tasks.records.results import PartInfo, RowIds, ShardResult, ShardTimings, TokenCounts, WorkerInfo
from shardwise.tasks.records.shard_cache import shard_cache
from shardwise.tasks.records.shard_io import read_shard, write_part
from shardwise.tasks.redaction import install_log_redaction


def load_engines(cfg: JobConfig) -> tuple[Any, Any]:
    """The configured engines, from this process's model cache."""
    from shardwise.gpu_runtime import load_embedding_engine, load_generation_engine

    generator = None
    if cfg.runs_generation:
        generator = load_generation_engine(
            cfg.generate.model,
            device=cfg.device,
            attn_implementation=cfg.generate.attn_implementation,
            engine=cfg.generation_engine(),
            vllm_options=cfg.vllm_options(),
            endpoint=cfg.endpoint_options("generate") if cfg.generate.engine == "openai" else None,
        )
    embedder = None
    if cfg.runs_embedding:
        endpoint = cfg.endpoint_options("embed") if cfg.embed.engine == "openai" else None
        embedder = load_embedding_engine(cfg.embed.model, device=cfg.device, engine=cfg.embed.engine, endpoint=endpoint)
    return generator, embedder


def check_engine_weights(cfg: JobConfig, engines: dict[str, Any]) -> None:
    """Refuse to compute with weights other than those in the run's fingerprint: a long-lived
    worker (Ray) keeps a model loaded across runs, and files can change during a run."""
    expected = cfg.model_identities()
    for role, engine in engines.items():
        if engine is None:
            continue
        loaded = f"{engine.info.get('source')}:{engine.info.get('revision')}"
        if loaded != expected[role]:
            raise ConfigError(
                f"{role} model {engine.info.get('spec')}: this worker holds weights {loaded[:30]}…, but the run "
                f"resolved {expected[role][:30]}… (its files changed); restart the workers and rerun"
            )


def check_ids(table: Any, id_column: str, shard: Shard) -> None:
    """Ids are written exactly as read or not at all: a shard whose id column holds invalid UTF-8
    fails (not retried: it is bad input) naming file, column and row, before any model work. Checked
    here, on rows the shard reads anyway, rather than at planning, which reads only footers."""
    bad = invalid_utf8_rows(table.column(id_column))
    if bad:
        more = f" (and {len(bad) - 1} more up to row {shard.first_row + bad[-1]})" if len(bad) > 1 else ""
        raise InputError(
            f"{shard.source}: id column {id_column!r} holds invalid UTF-8 at row {shard.first_row + bad[0]}{more}; "
            "ids are never rewritten, so these rows are not written: fix the file and rerun"
        )


def loads_of_this_worker() -> dict[str, int]:
    """How many times this process has loaded each model (1 each when the cache works)."""
    from shardwise.gpu_runtime import model_load_counts

    return {str(spec): count for spec, count in model_load_counts().items()}


def input_columns(cfg: JobConfig) -> list[str] | None:
    """Columns to read: all when they are all kept, else only what the engines and the id need."""
    if cfg.keep_columns == "all":
        return None
    from shardwise.gpu_runtime import template_fields

    needed = [cfg.id_column, cfg.text_column]
    if cfg.runs_generation:
        needed += template_fields(cfg.template)
    return list(dict.fromkeys(needed))


def run_shard(shard: Shard, cfg: JobConfig, lineage: dict[str, str], staging: str) -> ShardResult:
    """Process one shard and write its part under ``staging`` (the run's fenced staging directory,
    see :class:`~shardwise.tasks.storage.lease.Fence`), for the lease holder to publish; raises on failure."""
    install_log_redaction()  # this may be a worker process, with logging handlers of its own
    generator, embedder = load_engines(cfg)
    check_engine_weights(cfg, {"generate": generator, "embed": embedder})
    started = time.perf_counter()
    table = read_shard(shard, input_columns(cfg), cfg.storage_options)
    check_ids(table, cfg.id_column, shard)
    read_done = time.perf_counter()
    crash_point("shard-compute")
    cache = shard_cache(cfg)
    engines = [e for e in (generator, embedder) if e is not None]
    engine_device = next((str(e.info.get("device")) for e in engines), None)
    # Alone on the device while another shard in flight reads or writes, unless every engine
    # batches the shards in flight together (vLLM): then they compute side by side.
    shared = bool(engines) and all(getattr(e, "batches_across_calls", False) for e in engines)
    with device_turn(engine_device, shared) as turn:
        compute_started = time.perf_counter()
        compute_started_at = time.time()
        energy_before = gpu_energy_mj(engine_device)
        enriched, stats = enrich_table(table, cfg, generator, embedder, chat_date=lineage.get("chat_date"), cache=cache)
        compute_done = time.perf_counter()
        compute_ended_at = time.time()
        energy_after = gpu_energy_mj(engine_device)
    part_lineage = {
        **lineage,
        "shard_id": shard.shard_id,
        "source": shard.source,
        "source_fingerprint": shard.source_fingerprint,
        "source_rows": f"{shard.first_row}:{shard.first_row + shard.num_rows}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "id_column": cfg.id_column,
        # so that a run reusing this part can still count the tokens it holds
        "prompt_tokens": str(stats.prompt_tokens),
        "generated_tokens": str(stats.generated_tokens),
    }
    quality = shard_profile(enriched, cfg.quality.refusal_patterns)
    part_lineage["quality"] = json.dumps(quality, separators=(",", ":"))  # a resumed part keeps its figures
    if cfg.output_schema_hash is not None:
        part_lineage["output_schema_hash"] = cfg.output_schema_hash
    for role, engine in (("generate", generator), ("embed", embedder)):
        if engine is not None:
            part_lineage[f"{role}_model_revision"] = str(engine.info.get("revision"))
            part_lineage[f"{role}_model_dtype"] = str(engine.info.get("dtype"))
            if engine.info.get("engine"):
                part_lineage[f"{role}_engine"] = f"{engine.info['engine']} ({engine.info.get('engine_version')})"
            if engine.info.get("endpoint"):
                part_lineage[f"{role}_endpoint"] = str(engine.info["endpoint"])
    part = write_part(enriched, staging, shard, part_lineage, cfg.storage_options)
    if cache is not None:
        cache.add_computed()  # after the part: an entry never describes a value not yet written
    write_done = time.perf_counter()
    write_ended_at = time.time()
    models = {}
    if generator is not None:
        models["generate"] = dict(generator.info)
    if embedder is not None:
        models["embed"] = dict(embedder.info)
    device = next((m.get("device") for m in models.values()), None)
    return ShardResult(
        index=shard.index,
        shard_id=shard.shard_id,
        name=shard.name,
        source=shard.source,
        status="committed",
        rows=stats.rows,
        error_rows=stats.error_rows,
        truncated_rows=stats.truncated_rows,
        schema_valid_rows=stats.schema_valid_rows,
        rows_cached=stats.rows_cached,
        tokens=TokenCounts(stats.prompt_tokens, stats.generated_tokens, stats.embedded_tokens),
        cached_tokens=TokenCounts(
            stats.cached_prompt_tokens, stats.cached_generated_tokens, stats.cached_embedded_tokens
        ),
        timings=ShardTimings(
            read=read_done - started,
            # Waiting for the device, and the part of a shared compute span billed to other shards.
            wait=compute_started - read_done + (turn.span - turn.billed),
            compute=turn.billed,
            write=write_done - compute_done,
            compute_started_at=compute_started_at,
            compute_ended_at=compute_ended_at,
            write_started_at=compute_ended_at,
            write_ended_at=write_ended_at,
        ),
        part=PartInfo(uri=part.uri, bytes=part.bytes, sha256=part.sha256, write_id=part.write_id),
        worker=WorkerInfo(
            name=worker_label(),
            device=str(device) if device else None,
            model_loads=loads_of_this_worker(),
            # A shared compute span's energy, in the shard's share.
            energy_j=(energy_after - energy_before) / 1000 * (turn.billed / turn.span if turn.span > 0 else 1.0)
            if energy_before is not None and energy_after is not None
            else None,
        ),
        models=models,
        finished_at=write_ended_at,
        quality=quality,
        ids=RowIds(table.column(cfg.id_column)),
    )
