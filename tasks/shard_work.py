"""One shard end to end: read its rows, run the engines, write its part. Plain function + Prefect task.

Models come from ``gpu_runtime``'s per-process cache, so a worker loads each model once however
many shards it processes. Bad data (an ``InputError``) fails the shard at once; anything else (a
storage hiccup, an engine crash) is retried by Prefect.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import task

from tasks.cost import gpu_energy_mj
from tasks.enrichment import enrich_table
from tasks.faults import crash_point
from tasks.job_config import JobConfig
from tasks.planning import Shard
from tasks.results import ShardResult
from tasks.retry_policy import retry_unless_bad_input
from tasks.runners import worker_label
from tasks.shard_io import read_shard, write_part


def device_lock(device: str | None):
    from gpu_runtime import device_lock as lock_for

    return lock_for(device)


def load_engines(cfg: JobConfig) -> tuple[Any, Any]:
    """The configured engines, from this process's model cache."""
    from gpu_runtime import load_embedding_engine, load_generation_engine

    generator = (
        load_generation_engine(cfg.generate.model, device=cfg.device, attn_implementation=cfg.generate.attn_implementation)
        if cfg.runs_generation else None
    )
    embedder = load_embedding_engine(cfg.embed.model, device=cfg.device) if cfg.runs_embedding else None
    return generator, embedder


def loads_of_this_worker() -> dict[str, int]:
    """How many times this process has loaded each model (1 each when the cache works)."""
    from gpu_runtime import model_load_counts

    return {str(spec): count for spec, count in model_load_counts().items()}


def input_columns(cfg: JobConfig) -> list[str] | None:
    """Columns to read: all when they are all kept, else only what the engines and the id need."""
    if cfg.keep_columns == "all":
        return None
    from gpu_runtime import template_fields

    needed = [cfg.id_column, cfg.text_column]
    if cfg.runs_generation:
        needed += template_fields(cfg.template)
    return list(dict.fromkeys(needed))


def run_shard(shard: Shard, cfg: JobConfig, lineage: dict[str, str]) -> ShardResult:
    """Process one shard and publish its part; raises on failure."""
    generator, embedder = load_engines(cfg)
    started = time.perf_counter()
    table = read_shard(shard, input_columns(cfg), cfg.storage_options)
    read_done = time.perf_counter()
    crash_point("shard-compute")
    engine_device = next((str(e.info.get("device")) for e in (generator, embedder) if e is not None), None)
    with device_lock(engine_device):  # another shard in flight reads or writes meanwhile
        compute_started = time.perf_counter()
        energy_before = gpu_energy_mj(engine_device)
        enriched, stats = enrich_table(table, cfg, generator, embedder, chat_date=lineage.get("chat_date"))
        compute_done = time.perf_counter()
        energy_after = gpu_energy_mj(engine_device)
    part_lineage = {
        **lineage,
        "shard_id": shard.shard_id,
        "source": shard.source,
        "source_fingerprint": shard.source_fingerprint,
        "source_rows": f"{shard.first_row}:{shard.first_row + shard.num_rows}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "id_column": cfg.id_column,
    }
    if cfg.output_schema_hash is not None:
        part_lineage["output_schema_hash"] = cfg.output_schema_hash
    for role, engine in (("generate", generator), ("embed", embedder)):
        if engine is not None:
            part_lineage[f"{role}_model_revision"] = str(engine.info.get("revision"))
            part_lineage[f"{role}_model_dtype"] = str(engine.info.get("dtype"))
    part = write_part(enriched, cfg.output, shard, part_lineage, cfg.storage_options)
    write_done = time.perf_counter()
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
        prompt_tokens=stats.prompt_tokens,
        generated_tokens=stats.generated_tokens,
        embedded_tokens=stats.embedded_tokens,
        schema_valid_rows=stats.schema_valid_rows,
        seconds_read=read_done - started,
        seconds_wait=compute_started - read_done,
        seconds_compute=compute_done - compute_started,
        seconds_write=write_done - compute_done,
        part_uri=part.uri,
        part_bytes=part.bytes,
        part_sha256=part.sha256,
        device=str(device) if device else None,
        models=models,
        energy_j=(energy_after - energy_before) / 1000 if energy_before is not None and energy_after is not None
        else None,
        finished_at=time.time(),
        worker=worker_label(),
        model_loads=loads_of_this_worker(),
        ids=table.column(cfg.id_column).to_pylist(),
    )


@task(
    name="enrich-shard",
    task_run_name="{shard.name}",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_bad_input,
)
def process_shard(shard: Shard, cfg: JobConfig, lineage: dict[str, str]) -> ShardResult:
    return run_shard(shard, cfg, lineage)
