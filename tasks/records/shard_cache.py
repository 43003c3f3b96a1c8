"""One shard's use of the row cache: rows the cache holds are taken from it, only the others
reach the engines, and what they computed is added once the shard's part has committed."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from shardwise.tasks.records.row_cache import RowCache
from shardwise.tasks.records.row_cache_keys import embedding_context, generation_context, generation_keys, row_keys

if TYPE_CHECKING:
    from shardwise.gpu_runtime import EmbeddingEngine, EmbeddingOutput, Generation, GenerationEngine, GenerationParams
    from shardwise.tasks.config.job import JobConfig


@dataclass
class ShardCache:
    """A shard's lookups and the entries it computed, added with :meth:`add_computed` once the
    part has committed. Calls are over the same list of rows with text, in the same order."""

    cache: RowCache
    gen_context: str | None = None
    gen_model: str | None = None  # the spec whose chat template renders the prompts keyed; None: an endpoint
    embed_context: str | None = None
    hits: dict[str, list[bool]] = field(default_factory=dict)
    new: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    cached_prompt_tokens: int = 0
    cached_generated_tokens: int = 0
    cached_embedded_tokens: int = 0

    def generate(self, generator: GenerationEngine, prompts: list[str], params: GenerationParams) -> list[Generation]:
        from shardwise.gpu_runtime import Generation

        assert self.gen_context is not None
        keys = generation_keys(self.gen_context, prompts, params, self.gen_model)
        found = self.cache.lookup("generate", keys)
        misses = [j for j, k in enumerate(keys) if k not in found]
        computed = dict(zip(misses, generator.generate([prompts[j] for j in misses], params))) if misses else {}
        outputs = []
        for j, key in enumerate(keys):
            if j in computed:
                out = computed[j]
                if out.error is not None:  # a refusal is not a value: the row is asked again next time
                    outputs.append(out)
                    continue
                self.new.setdefault("generate", {})[key] = {
                    "generated_text": out.text,
                    "n_prompt_tokens": out.n_prompt_tokens,
                    "n_generated_tokens": out.n_generated_tokens,
                    "finish_reason": out.finish_reason,
                    "truncated": out.truncated,
                }
            else:
                v = found[key]
                out = Generation(
                    v["generated_text"],
                    v["n_prompt_tokens"],
                    v["n_generated_tokens"],
                    v["finish_reason"],
                    v["truncated"],
                )
                self.cached_prompt_tokens += out.n_prompt_tokens
                self.cached_generated_tokens += out.n_generated_tokens
            outputs.append(out)
        self.hits["generate"] = [k in found for k in keys]
        return outputs

    def embed(self, embedder: EmbeddingEngine, texts: list[str], **options: Any) -> EmbeddingOutput:
        import numpy as np

        from shardwise.gpu_runtime import EmbeddingOutput

        assert self.embed_context is not None
        keys = row_keys(self.embed_context, texts)
        found = self.cache.lookup("embed", keys)
        misses = [j for j, k in enumerate(keys) if k not in found]
        computed = embedder.embed([texts[j] for j in misses], **options) if misses else None
        vectors = np.zeros((len(texts), embedder.dim), dtype=np.float32)
        n_tokens = [0] * len(texts)
        truncated = [False] * len(texts)
        for position, j in enumerate(misses):
            assert computed is not None
            vectors[j] = computed.vectors[position]
            n_tokens[j] = computed.n_tokens[position]
            truncated[j] = computed.truncated[position]
            if computed.errors is not None and computed.errors[position] is not None:
                continue  # a refusal is not a value: the row is asked again next time
            self.new.setdefault("embed", {})[keys[j]] = {
                "embedding": computed.vectors[position].tolist(),
                "n_tokens": n_tokens[j],
                "truncated": truncated[j],
            }
        for j, key in enumerate(keys):
            if key in found:
                v = found[key]
                vectors[j] = np.asarray(v["embedding"], dtype=np.float32)
                n_tokens[j] = v["n_tokens"]
                truncated[j] = v["truncated"]
                self.cached_embedded_tokens += n_tokens[j]
        self.hits["embed"] = [k in found for k in keys]
        errors = None
        if computed is not None and computed.errors is not None:
            errors = [None] * len(texts)
            for position, j in enumerate(misses):
                errors[j] = computed.errors[position]
        return EmbeddingOutput(vectors, n_tokens, truncated, errors)

    def rows_cached(self) -> int:
        """Rows with text whose every value came from the cache."""
        masks = list(self.hits.values())
        if not masks:
            return 0
        return sum(all(m[j] for m in masks) for j in range(len(masks[0])))

    def add_computed(self) -> int:
        added = 0
        for kind, entries in self.new.items():
            added += self.cache.add(kind, entries)
            self.cache.compact(kind)
        return added


def shard_cache(cfg: JobConfig) -> ShardCache | None:
    """The shard's cache view, or None when the job has no cache."""
    if not cfg.cache:
        return None
    cache = RowCache(cfg.cache, cfg.storage_options)
    return ShardCache(
        cache,
        gen_context=generation_context(cfg) if cfg.runs_generation else None,
        gen_model=cfg.generate.model if cfg.runs_generation and cfg.generate.engine != "openai" else None,
        embed_context=embedding_context(cfg) if cfg.runs_embedding else None,
    )


def cached_rows(
    cfg: JobConfig, table: pa.Table, cleaned: list[tuple[str | None, str | None]], chat_date: dt.date | str | None
) -> set[int]:
    """Positions of the rows with text whose every value the cache holds (for ``plan``); empty
    without a cache. The keys are those :func:`shardwise.tasks.records.enrichment.enrich_table` uses."""
    if not cfg.cache:
        return set()
    from shardwise.tasks.records.engine_inputs import generation_params, render_prompts

    cache = RowCache(cfg.cache, cfg.storage_options)
    valid = [i for i, (_, err) in enumerate(cleaned) if err is None]
    hit = set(valid)
    if cfg.runs_generation:
        prompts = render_prompts(cfg, table, [text for text, _ in cleaned], valid)
        params = generation_params(cfg, chat_date)
        spec = None if cfg.generate.engine == "openai" else cfg.generate.model
        keys = generation_keys(generation_context(cfg), prompts, params, spec)
        found = cache.lookup("generate", keys)
        hit &= {i for i, k in zip(valid, keys) if k in found}
    if cfg.runs_embedding:
        keys = row_keys(embedding_context(cfg), [cleaned[i][0] for i in valid])
        found = cache.lookup("embed", keys)
        hit &= {i for i, k in zip(valid, keys) if k in found}
    return hit
