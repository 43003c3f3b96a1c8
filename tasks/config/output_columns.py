"""The columns shardwise adds to every output row, by job config.

One list, :func:`enrichment_fields`: the enrichment code builds each part's schema from it
(:func:`shardwise.tasks.records.enrichment.output_schema`) and the up-front input checks compare the input's
columns with it (:func:`collision_message`), so a column added here is checked without more code.
An input column with the same name as one of these would be written twice into one part
(readers then fail, or silently pick one), so such an input is refused before any work.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.config.output_schema import arrow_type

GENERATION_FIELDS = [
    pa.field("generated_text", pa.string()),
    pa.field("n_prompt_tokens", pa.int32()),
    pa.field("n_generated_tokens", pa.int32()),
    pa.field("finish_reason", pa.string()),
]


def enrichment_fields(cfg: JobConfig, embedding_dim: int = -1) -> list[pa.Field]:
    """The columns ``cfg`` adds after the kept input columns, in their order in every part.

    ``embedding_dim`` is the embedder's dimension; -1 (not known before the model loads) types
    ``embedding`` as a list of any length, which is enough for checks that need only the names."""
    fields = []
    if cfg.runs_generation:
        fields += GENERATION_FIELDS
        if cfg.generate.output_schema is not None:
            fields.append(pa.field("generated", arrow_type(cfg.generate.output_schema)))
    if cfg.runs_embedding:
        fields.append(pa.field("embedding", pa.list_(pa.float32(), embedding_dim)))
    fields += [pa.field("truncated", pa.bool_()), pa.field("error", pa.string())]
    return fields


def enrichment_column_names(cfg: JobConfig) -> list[str]:
    return [f.name for f in enrichment_fields(cfg)]


def kept_input_columns(cfg: JobConfig, input_columns: Iterable[str]) -> list[str]:
    """The input columns each output row keeps: all of them, or only the id with ``keep_columns: id``."""
    return [cfg.id_column] if cfg.keep_columns == "id" else list(input_columns)


def collision_message(cfg: JobConfig, input_columns: Iterable[str]) -> str | None:
    """Why the kept input columns cannot be written next to the enrichment columns (one line), or
    None when no kept column has the name of one shardwise writes."""
    added = enrichment_column_names(cfg)
    colliding = [c for c in kept_input_columns(cfg, input_columns) if c in added]
    if not colliding:
        return None
    names = ", ".join(repr(c) for c in colliding)
    writes = f"task {cfg.task} writes {', '.join(added)}"
    if cfg.keep_columns == "id":
        return f"the id column {names} has the name of a column shardwise writes ({writes}); rename it in the input"
    plural = len(colliding) > 1
    what = f"input column{'s' if plural else ''} {names} {'have' if plural else 'has'} the name of a column"
    if cfg.id_column in colliding:
        which = f"the id column {cfg.id_column!r} is one of them" if plural else "it is the id column"
        remedy = f"rename {'them' if plural else 'it'} in the input ({which}, so --keep-columns id does not avoid it)"
    else:
        remedy = (
            f"rename or drop {'them' if plural else 'it'} in the input, or keep only the id column (--keep-columns id)"
        )
    return f"{what} shardwise writes ({writes}); {remedy}"


__all__ = [
    "GENERATION_FIELDS",
    "collision_message",
    "enrichment_column_names",
    "enrichment_fields",
    "kept_input_columns",
]
