"""What the engines receive for a job's rows: each row's rendered prompt and the decoding settings,
made here alone so that what ``plan`` counts and the row cache keys is what runs."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import TYPE_CHECKING

import pyarrow as pa

from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.config.output_schema import schema_text

if TYPE_CHECKING:
    from shardwise.gpu_runtime import GenerationParams


def render_prompts(cfg: JobConfig, table: pa.Table, texts: list[str | None], rows: list[int]) -> list[str]:
    """The prompt template filled in for each row index in ``rows``, with that row's cleaned text
    from ``texts``; the one place prompts are rendered, so what ``plan`` counts is what runs."""
    from shardwise.gpu_runtime import render_prompt, template_fields

    values = table.select(template_fields(cfg.template)).to_pylist()
    prompts = []
    for i in rows:
        fields = {k: ("" if v is None else v) for k, v in values[i].items()}
        fields[cfg.text_column] = texts[i]
        prompts.append(render_prompt(cfg.template, fields))
    return prompts


def generation_params(cfg: JobConfig, chat_date: dt.date | str | None = None) -> GenerationParams:
    """The engine's decoding settings for ``cfg`` (``chat_date`` as in
    :func:`shardwise.tasks.records.enrichment.enrich_table`).

    Every field ``GenerationParams`` shares with ``GenerateConfig`` is carried by name, so a new
    decoding setting needs no copying here; only the fields whose form differs are converted."""
    from shardwise.gpu_runtime import GenerationParams

    g = cfg.generate
    shared = {f.name for f in dataclasses.fields(GenerationParams)} & set(type(g).model_fields)
    values = {name: getattr(g, name) for name in shared}
    values.update(
        chat_template_kwargs=dict(g.chat_template_kwargs) or None,
        chat_date=g.chat_date or (dt.date.fromisoformat(chat_date) if isinstance(chat_date, str) else chat_date),
        output_schema=schema_text(g.output_schema) if g.output_schema is not None else None,
    )
    return GenerationParams(**values)
