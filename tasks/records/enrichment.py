"""Rows in, enriched rows out: prompt building, per-row validation and the output schema.

Bad rows (null, empty or unusable text) never reach an engine: they are written with ``error`` set
and every other row is processed. One output row per input row, in input order.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.config.output_columns import GENERATION_FIELDS, enrichment_fields
from shardwise.tasks.config.output_schema import parse_generated
from shardwise.tasks.records.engine_inputs import generation_params, render_prompts

if TYPE_CHECKING:  # engines are loaded by the shard task; this module only needs their interface
    from shardwise.gpu_runtime import EmbeddingEngine, GenerationEngine
    from shardwise.tasks.records.shard_cache import ShardCache

# C0/C1 control characters except tab, newline and carriage return; lone surrogates from bad UTF-8.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def clean_text(value: Any) -> tuple[str | None, str | None]:
    """``(text, error)``: control characters removed; an error for null, empty or non-text values."""
    if value is None:
        return None, "text is null"
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        return None, f"text is {type(value).__name__}, not a string"
    cleaned = _CONTROL.sub("", value)
    if not cleaned.strip():
        return None, "text is empty"
    return cleaned, None


def invalid_utf8_rows(column: pa.Array | pa.ChunkedArray) -> list[int]:
    """Positions of the values of a string column that are not valid UTF-8 (empty for valid or
    non-string columns). Validation is one vectorised pass; rows are searched only on failure."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return []
    try:
        column.validate(full=True)
        return []
    except pa.ArrowInvalid:
        pass
    binary = pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()
    bad = []
    for position, value in enumerate(column.cast(binary).to_pylist()):
        if value is not None:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                bad.append(position)
    return bad


def repair_utf8(table: pa.Table, keep: list[str] | tuple[str, ...] = ()) -> pa.Table:
    """Replace invalid UTF-8 in string columns with U+FFFD, so neither Python nor the analysts'
    readers (polars refuses such files) choke on it.
    Columns in ``keep`` (the id) are never altered: two ids "repaired" alike would become one."""
    for index, field in enumerate(table.schema):
        if field.name in keep:
            continue
        if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
            continue
        column = table.column(index)
        try:
            column.validate(full=True)
            continue
        except pa.ArrowInvalid:
            pass
        binary = pa.large_binary() if pa.types.is_large_string(field.type) else pa.binary()
        raw = column.cast(binary).to_pylist()
        fixed = [None if b is None else b.decode("utf-8", errors="replace") for b in raw]
        table = table.set_column(index, field, pa.array(fixed, field.type))
    return table


def output_schema(input_schema: pa.Schema, cfg: JobConfig, embedding_dim: int | None) -> pa.Schema:
    """Kept input columns, then the enrichment columns (:mod:`shardwise.tasks.config.output_columns`), in a
    fixed order for every part."""
    kept = [input_schema.field(cfg.id_column)] if cfg.keep_columns == "id" else list(input_schema)
    added = enrichment_fields(cfg, -1 if embedding_dim is None else embedding_dim)
    return pa.schema(kept + added)


@dataclass
class EnrichStats:
    rows: int = 0
    error_rows: int = 0
    truncated_rows: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    embedded_tokens: int = 0
    schema_valid_rows: int | None = None  # rows whose answer follows generate.output_schema; None without one
    rows_cached: int = 0  # rows whose every value came from the row cache (their tokens are in the totals above)
    cached_prompt_tokens: int = 0
    cached_generated_tokens: int = 0
    cached_embedded_tokens: int = 0


def enrich_table(
    table: pa.Table,
    cfg: JobConfig,
    generator: GenerationEngine | None,
    embedder: EmbeddingEngine | None,
    chat_date: dt.date | str | None = None,
    cache: ShardCache | None = None,
) -> tuple[pa.Table, EnrichStats]:
    """Run the configured engines over ``table``; returns the output table and its counters.

    ``chat_date`` is the run's date for chat templates that print one, used when the config does
    not set ``generate.chat_date`` (which wins). With a ``cache``, rows it holds are taken from it
    and only the others reach the engines."""
    table = repair_utf8(table, keep=[cfg.id_column])
    n = table.num_rows
    stats = EnrichStats(rows=n)
    cleaned = [clean_text(v) for v in table.column(cfg.text_column).to_pylist()]
    errors: list[str | None] = [err for _, err in cleaned]
    truncated = [False] * n
    valid = [i for i in range(n) if errors[i] is None]

    columns: dict[str, list[Any]] = {}
    if cfg.runs_generation:
        assert generator is not None
        prompts = render_prompts(cfg, table, [text for text, _ in cleaned], valid)
        g = cfg.generate
        params = generation_params(cfg, chat_date)
        if cache is not None:
            outputs = cache.generate(generator, prompts, params)
        else:
            outputs = generator.generate(prompts, params) if prompts else []
        gen_cols: dict[str, list[Any]] = {f.name: [None] * n for f in GENERATION_FIELDS}
        for i, out in zip(valid, outputs):
            if out.error is not None:  # a serving endpoint refused the row: no answer
                errors[i] = out.error
                continue
            gen_cols["generated_text"][i] = out.text
            gen_cols["n_prompt_tokens"][i] = out.n_prompt_tokens
            gen_cols["n_generated_tokens"][i] = out.n_generated_tokens
            gen_cols["finish_reason"][i] = out.finish_reason
            truncated[i] = truncated[i] or out.truncated
            stats.prompt_tokens += out.n_prompt_tokens
            stats.generated_tokens += out.n_generated_tokens
        columns.update(gen_cols)
        if g.output_schema is not None:
            # A row that does not parse (cut by max_new_tokens, say) keeps its raw text; the run goes on.
            generated: list[Any] = [None] * n
            for i in valid:
                if errors[i] is None:
                    generated[i], errors[i] = parse_generated(gen_cols["generated_text"][i], g.output_schema)
            columns["generated"] = generated
            stats.schema_valid_rows = sum(generated[i] is not None for i in valid)

    dim = None
    if cfg.runs_embedding:
        assert embedder is not None
        dim = embedder.dim
        texts = [cleaned[i][0] for i in valid]
        embed = embedder.embed if cache is None else lambda batch, **kw: cache.embed(embedder, batch, **kw)
        result = embed(
            texts,
            token_budget=cfg.embed.token_budget,
            max_batch_size=cfg.embed.max_batch_size,
            prompt_name=cfg.embed.prompt_name,
        )
        vectors: list[Any] = [None] * n
        for j, i in enumerate(valid):
            vectors[i] = result.vectors[j]
            truncated[i] = truncated[i] or result.truncated[j]
            stats.embedded_tokens += result.n_tokens[j]
            if result.errors is not None and result.errors[j] is not None:  # refused by a serving endpoint
                errors[i] = errors[i] or result.errors[j]
        columns["embedding"] = vectors

    schema = output_schema(table.schema, cfg, dim)
    kept = table.select([cfg.id_column]) if cfg.keep_columns == "id" else table
    arrays = list(kept.columns)
    for field in list(schema)[kept.num_columns :]:
        if field.name == "truncated":
            arrays.append(pa.array([t if errors[i] is None else None for i, t in enumerate(truncated)], pa.bool_()))
        elif field.name == "error":
            arrays.append(pa.array(errors, pa.string()))
        elif field.name == "embedding":
            arrays.append(_embedding_array(columns["embedding"], dim or 0))
        else:
            arrays.append(pa.array(columns[field.name], field.type))
    stats.error_rows = sum(e is not None for e in errors)
    stats.truncated_rows = sum(truncated)
    if cache is not None:
        stats.rows_cached = cache.rows_cached()
        stats.cached_prompt_tokens = cache.cached_prompt_tokens
        stats.cached_generated_tokens = cache.cached_generated_tokens
        stats.cached_embedded_tokens = cache.cached_embedded_tokens
    return pa.Table.from_arrays(arrays, schema=schema), stats


def _embedding_array(vectors: list[Any], dim: int) -> pa.Array:
    """Fixed-size float32 lists. Rows without valid text get an all-zero vector rather than null:
    pyarrow < 26 (which MLflow 3.17 pins) cannot read null fixed-size lists back from Parquet,
    and such rows are marked by ``error`` anyway."""
    import numpy as np

    flat = np.zeros((len(vectors), dim), dtype=np.float32)
    for i, v in enumerate(vectors):
        if v is not None:
            flat[i] = v
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), pa.float32()), dim)
