"""The output of an input with no rows, where the job allows one (``allow_empty: true``).

An empty partition is usually an upstream failure, so a run refuses it by default (exit 2, see
:func:`shardwise.tasks.planning.shards.plan_shards`). Allowed, the output gets one zero-row part
with the columns every part of the job has (the input's own, from its files' footers, or the id
and text columns when there is no file at all), so that readers of ``part-*.parquet`` read an empty
table instead of failing on "no files found". The next run of the same output with rows removes
it like any other part of its own that the plan no longer has.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from shardwise.tasks.errors import StorageError
from shardwise.tasks.records.enrichment import output_schema
from shardwise.tasks.records.shard_io import METADATA_PREFIX
from shardwise.tasks.storage.fs import atomic_write_bytes, join
from shardwise.tasks.storage.output_layout import part_name

if TYPE_CHECKING:
    from shardwise.tasks.config.job import JobConfig
    from shardwise.tasks.planning.shards import ShardPlan

EMPTY_SHARD_ID = "empty-0000000000-0000000000"  # the shape of a shard id, so the part counts as its own


def write_empty_part(cfg: JobConfig, plan: ShardPlan, lineage: dict[str, str]) -> str:
    """Write the zero-row part of an output whose input has no rows; returns its URI."""
    if plan.files:
        input_schema = plan.files[0].schema
    else:
        input_schema = pa.schema([(cfg.id_column, pa.string()), (cfg.text_column, pa.string())])
    dim = None
    if cfg.runs_embedding:  # the embedding column's fixed size, as in the job's other outputs
        from shardwise.gpu_runtime import load_embedding_engine

        dim = load_embedding_engine(cfg.embed.model, device=cfg.device).dim
    schema = output_schema(input_schema, cfg, dim)
    metadata = {
        f"{METADATA_PREFIX}{k}".encode(): str(v).encode() for k, v in {**lineage, "shard_id": EMPTY_SHARD_ID}.items()
    }
    buffer = io.BytesIO()
    pq.write_table(schema.empty_table().replace_schema_metadata(metadata), buffer, compression="zstd")
    uri = join(cfg.output, part_name(EMPTY_SHARD_ID))
    try:
        atomic_write_bytes(uri, buffer.getvalue(), cfg.storage_options)
    except OSError as err:
        raise StorageError(f"cannot write {uri}: {err}") from None
    return uri


__all__ = ["EMPTY_SHARD_ID", "write_empty_part"]
