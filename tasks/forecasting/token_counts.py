"""Prompt and embedded tokens of the rows a run would compute, counted exactly with the model's
tokenizer and chat template (no weights are loaded): every row, or whole shards drawn at random
until enough rows are read, extrapolated with a 95% confidence interval. Rows the row cache holds
are counted apart: a run does not compute them.

A section on a serving endpoint (``engine: openai``) whose model name resolves to no local tokenizer
(a hosted name such as ``gpt-4o-mini``) has its tokens estimated at :data:`CHARS_PER_TOKEN`
characters per token instead; :attr:`TokenCounts.approximated` names such sections."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.forecasting.estimates import Estimate
from shardwise.tasks.planning.shards import Shard

Z_95 = 1.96
# Characters per token of English text for the tokenizers of hosted models: an estimate.
CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class TokenCounts:
    """Per-row counts over the rows read (all rows to compute, or a sample of them)."""

    rows_read: int
    valid: list[bool]
    prompt: list[int]
    embedded: list[int]
    rows_cached: int = 0  # rows read that the row cache holds whole: left out of the lists above
    shard_prompt: dict[str, int] = field(default_factory=dict)  # prompt tokens per shard id, as above
    approximated: tuple[str, ...] = ()  # sections counted at CHARS_PER_TOKEN: "generate", "embed"


class _CharacterCounter:
    """Tokens estimated from characters, for a model whose tokenizer is not here."""

    def count(
        self, texts: list[str], system_prompt: str | None = None, template_kwargs: Any = None, date: Any = None
    ) -> list[int]:
        extra = len(system_prompt or "")
        return [math.ceil((len(text) + extra) / CHARS_PER_TOKEN) for text in texts]


def _local_or_approximate(cfg: JobConfig, role: str, load: Callable[[], Any]) -> Any:
    """``load()``'s tokenizer, or a :class:`_CharacterCounter` when ``role`` runs on an endpoint and
    its model name resolves to no local tokenizer."""
    from shardwise.gpu_runtime import ModelNotFoundError

    try:
        return load()
    except (ModelNotFoundError, OSError):
        if role not in cfg.endpoint_sections():
            raise
        return _CharacterCounter()


def count_rows(cfg: JobConfig, shards: list[Shard]) -> TokenCounts:
    """Token counts of every row of ``shards``, read in full and tokenized."""
    from shardwise.gpu_runtime.token_count import (
        PromptCounter,
        count_embedding_tokens,
        embedding_prompt,
        load_tokenizer,
    )
    from shardwise.tasks.compute.shard_work import input_columns
    from shardwise.tasks.records.engine_inputs import render_prompts
    from shardwise.tasks.records.enrichment import clean_text
    from shardwise.tasks.records.shard_io import read_shard

    g, e = cfg.generate, cfg.embed
    counter = (
        _local_or_approximate(cfg, "generate", lambda: PromptCounter(g.model, g.max_new_tokens, g.max_input_tokens))
        if cfg.runs_generation
        else None
    )
    embed_tokenizer = (
        _local_or_approximate(cfg, "embed", lambda: load_tokenizer(e.model)) if cfg.runs_embedding else None
    )
    # An endpoint embeds the text as sent: a local model's prompt is not put before it.
    embed_local = cfg.runs_embedding and "embed" not in cfg.endpoint_sections()
    embed_prompt = embedding_prompt(e.model, e.prompt_name) if embed_local else ""
    approximated = tuple(
        role
        for role, tool in (("generate", counter), ("embed", embed_tokenizer))
        if isinstance(tool, _CharacterCounter)
    )
    # The date a run's chat template prints: the configured one, else today (as the flow fixes it).
    chat_date = cfg.run_chat_date()
    valid: list[bool] = []
    prompt: list[int] = []
    embedded: list[int] = []
    rows_cached = 0
    shard_prompt: dict[str, int] = {}
    from shardwise.tasks.records.shard_cache import cached_rows

    for shard in shards:
        table = read_shard(shard, input_columns(cfg), cfg.storage_options)
        cleaned = [clean_text(v) for v in table.column(cfg.text_column).to_pylist()]
        ok = [i for i, (_, err) in enumerate(cleaned) if err is None]
        row_prompt = [0] * table.num_rows
        row_embed = [0] * table.num_rows
        if counter is not None:
            prompts = render_prompts(cfg, table, [text for text, _ in cleaned], ok)
            counts = counter.count(
                prompts, cfg.generate.system_prompt, dict(cfg.generate.chat_template_kwargs) or None, chat_date
            )
            for i, n in zip(ok, counts):
                row_prompt[i] = n
        if embed_tokenizer is not None:
            texts = [cleaned[i][0] or "" for i in ok]
            counted = (
                embed_tokenizer.count(texts)
                if isinstance(embed_tokenizer, _CharacterCounter)
                else count_embedding_tokens(embed_tokenizer, texts, embed_prompt)
            )
            for i, n in zip(ok, counted):
                row_embed[i] = n
        hit = cached_rows(cfg, table, cleaned, chat_date)
        rows_cached += len(hit)
        keep = [i for i in range(table.num_rows) if i not in hit]
        valid += [cleaned[i][1] is None for i in keep]
        prompt += [row_prompt[i] for i in keep]
        embedded += [row_embed[i] for i in keep]
        shard_prompt[shard.shard_id] = sum(row_prompt[i] for i in keep)
    return TokenCounts(len(valid) + rows_cached, valid, prompt, embedded, rows_cached, shard_prompt, approximated)


def extrapolate(values: list[int] | list[bool], total_rows: int, what: str) -> Estimate:
    """Exact when every row was read; else a sample mean times the rows, with a 95% interval."""
    n = len(values)
    total = float(sum(values))
    if n >= total_rows:
        return Estimate(total, total, total, f"exact: {what} of all {n} rows")
    mean = total / n if n else 0.0
    variance = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else mean**2
    # Finite-population correction: the sample is drawn without replacement from total_rows.
    half = Z_95 * math.sqrt(variance / max(n, 1) * (1 - n / total_rows)) * total_rows
    expected = mean * total_rows
    return Estimate(
        max(0.0, expected - half),
        expected,
        expected + half,
        f"sample: {what} of {n} of {total_rows} rows (random shards), 95% confidence interval",
    )


def sample_shards(shards: list[Shard], sample_rows: int) -> list[Shard]:
    if sum(s.num_rows for s in shards) <= sample_rows:
        return shards
    order = list(shards)
    random.Random(0).shuffle(order)
    picked, rows = [], 0
    for shard in order:
        picked.append(shard)
        rows += shard.num_rows
        if rows >= sample_rows:
            break
    return picked
