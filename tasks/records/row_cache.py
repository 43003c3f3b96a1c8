"""A content-addressed cache of computed rows, so a rerun over mostly unchanged data pays only for
what changed.

A row's key hashes everything that produced its value and nothing else (not its id, file or
position): for generation the prompt the engine receives (the row's prompt wrapped by the model's
chat template with the system prompt, the template variables and the run's date, as
:func:`shardwise.gpu_runtime.prompts.build_chat` renders it), the model's weights identity, the engine and
device/dtype, the output schema in its property order, and every decoding setting that changes
values; for embeddings the cleaned text, the model's weights identity, device/dtype and the prompt
name. Settings that only may change the prompt (a date a template does not print) are not keyed on
themselves: the rendered prompt shows whether they did. See :func:`generation_keys` and
:func:`embedding_context`.

Layout under the cache URI (any fsspec URI; one cache may be shared by many jobs and workers)::

    v1/<kind>/<p>/<UTC time>-<writer id>.parquet   kind: generate | embed; p: first hex digit of the key
    v1/runs/<UTC time>-<writer id>.json            one record per run: rows cached / computed

Entry files are immutable and written atomically (temp file + rename locally, one PUT on S3), so
concurrent writers never touch each other's files; a key written twice holds the same value. A
lookup reads only the ``key`` column of the files in the partitions its keys fall in, one file at
a time (memory stays flat), then the values of the matching rows. Every failure of the cache (an
unreachable store, a corrupt file) is logged as a warning and treated as a miss: the cache can
make a run cheaper, never fail it.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shardwise.tasks.storage.fs import TEMP_PREFIX, atomic_write_bytes, filesystem, join

if TYPE_CHECKING:
    from shardwise.gpu_runtime import EmbeddingEngine, EmbeddingOutput, Generation, GenerationEngine, GenerationParams
    from shardwise.tasks.config.job import JobConfig

logger = logging.getLogger("shardwise.cache")

LAYOUT = "v1"
KINDS = ("generate", "embed")
PREFIX_DIGITS = 1  # 16 partitions: a shard's keys touch them all, so more only means more small files
# A partition holding more files than this is merged into one after a shard's add: lookup time
# follows the number of files read (bench/run.py, incremental), not the number of entries.
COMPACT_AT = 24

ENTRY_SCHEMAS = {
    "generate": pa.schema(
        [
            pa.field("key", pa.string()),
            pa.field("generated_text", pa.string()),
            pa.field("n_prompt_tokens", pa.int32()),
            pa.field("n_generated_tokens", pa.int32()),
            pa.field("finish_reason", pa.string()),
            pa.field("truncated", pa.bool_()),
        ]
    ),
    "embed": pa.schema(
        [
            pa.field("key", pa.string()),
            pa.field("embedding", pa.list_(pa.float32())),
            pa.field("n_tokens", pa.int32()),
            pa.field("truncated", pa.bool_()),
        ]
    ),
}


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


@functools.lru_cache(maxsize=4)
def _tokenizer(spec: str) -> Any:
    """A model spec's tokenizer (tokenizer files only), loaded once per process."""
    from shardwise.gpu_runtime.token_count import load_tokenizer

    return load_tokenizer(spec)


def _device_and_dtype(cfg: JobConfig) -> str:
    """Where values are computed changes them (fp32 on CPU, bf16 on CUDA)."""
    from shardwise.gpu_runtime import default_dtype, select_device

    device = select_device(cfg.device)
    return f"{device.type}/{default_dtype(device)}"


def generation_context(cfg: JobConfig) -> str:
    """Hash of every generation input shared by a job's rows besides the prompt, which each row's
    key adds as the engine receives it (:func:`generation_keys`). The system prompt, the chat
    template, its variables and the date are in that prompt, so they are not here."""
    from shardwise.tasks.config.output_schema import canonical_schema_text

    g = cfg.generate
    return _sha(
        {
            "layout": LAYOUT,
            "model": cfg.model_identities()["generate"],
            "engine": cfg.generation_engine(),
            "device": _device_and_dtype(cfg),
            "max_new_tokens": g.max_new_tokens,
            "max_input_tokens": g.max_input_tokens,
            "temperature": g.temperature,
            "top_p": g.top_p,
            "seed": g.seed,
            "ignore_eos": g.ignore_eos,
            # as text: _sha sorts keys, and the answers follow the properties' order
            "output_schema": None if g.output_schema is None else canonical_schema_text(g.output_schema),
        }
    )


def engine_prompts(tokenizer: Any, prompts: list[str], params: GenerationParams) -> list[str]:
    """Each row's prompt as the generation engine receives it: wrapped by the chat template with
    the system prompt, the template variables and the date of ``params`` (before tokenizing and
    truncating, which ``max_input_tokens`` and the model decide)."""
    from shardwise.gpu_runtime.prompts import build_chat

    return [
        build_chat(
            tokenizer,
            prompt,
            params.system_prompt,
            template_kwargs=params.chat_template_kwargs,
            date=params.chat_date,
        )
        for prompt in prompts
    ]


def generation_keys(
    context: str, prompts: list[str], params: GenerationParams, spec: str, tokenizer: Any = None
) -> list[str]:
    """One key per row prompt: the context (:func:`generation_context`) and the prompt as the
    engine receives it, rendered with ``spec``'s tokenizer unless ``tokenizer`` is given."""
    return row_keys(context, engine_prompts(tokenizer or _tokenizer(spec), prompts, params))


def embedding_context(cfg: JobConfig) -> str:
    """Hash of every embedding input shared by a job's rows; a row's key adds its cleaned text.
    Truncation length and normalisation belong to the model, so its weights identity covers them."""
    return _sha(
        {
            "layout": LAYOUT,
            "model": cfg.model_identities()["embed"],
            "device": _device_and_dtype(cfg),
            "prompt_name": cfg.embed.prompt_name,
        }
    )


def row_keys(context: str, texts: list[str]) -> list[str]:
    """One key per text: sha256 of the context hash and the text."""
    prefix = context.encode() + b"\0"
    return [hashlib.sha256(prefix + text.encode("utf-8", "surrogatepass")).hexdigest() for text in texts]


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


def _stamp(now: float | None = None) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now if now is not None else time.time()))


def _stamp_time(name: str) -> float | None:
    try:
        return dt.datetime.strptime(name.split("-", 1)[0], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        return None


class RowCache:
    """The cache at ``uri``. ``lookup`` and ``add`` never raise: failures are warnings and misses."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = uri
        self.storage_options = storage_options or {}
        self.warnings: list[str] = []

    def _warn(self, message: str) -> None:
        from shardwise.tasks.redaction import redact_text

        message = redact_text(message)
        self.warnings.append(message)
        logger.warning("row cache: %s", message)

    def _partition(self, kind: str, prefix: str) -> str:
        return join(self.uri, LAYOUT, kind, prefix)

    def _entry_files(self, fs: Any, directory: str) -> list[str]:
        try:
            names = fs.ls(directory, detail=False)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.endswith(".parquet") and not n.rsplit("/", 1)[-1].startswith(TEMP_PREFIX))

    def lookup(self, kind: str, keys: list[str]) -> dict[str, dict[str, Any]]:
        """``{key: values}`` for the keys the cache holds; unreadable files count as misses."""
        wanted = set(keys)
        if not wanted:
            return {}
        found: dict[str, dict[str, Any]] = {}
        try:
            fs, _ = filesystem(self.uri, self.storage_options)
            prefixes = sorted({k[:PREFIX_DIGITS] for k in wanted})
            for prefix in prefixes:
                _, directory = filesystem(self._partition(kind, prefix), self.storage_options)
                for path in self._entry_files(fs, directory):
                    missing = wanted - found.keys()
                    if not any(k.startswith(prefix) for k in missing):
                        break
                    found.update(self._read_matches(fs, path, kind, missing))
        except Exception as err:  # noqa: BLE001 - an unreachable cache must not fail the run
            self._warn(f"cannot read {self.uri} ({type(err).__name__}: {err}); computing the rows instead")
        return found

    def _read_matches(self, fs: Any, path: str, kind: str, wanted: set[str]) -> dict[str, dict[str, Any]]:
        try:
            with fs.open(path, "rb") as handle:
                parquet = pq.ParquetFile(handle)
                if parquet.schema_arrow != ENTRY_SCHEMAS[kind]:
                    raise ValueError("not a cache entry file of this layout")
                keys = parquet.read(columns=["key"]).column("key")
                mask = pc.is_in(keys, value_set=pa.array(sorted(wanted & set(keys.to_pylist())), pa.string()))
                if not pc.any(mask).as_py():
                    return {}
                rows = parquet.read().filter(mask).to_pylist()
        except FileNotFoundError:
            return {}  # merged away by a compaction since it was listed
        except Exception as err:  # noqa: BLE001 - a corrupt file is skipped, never fatal
            self._warn(f"skipping unreadable cache file {path} ({type(err).__name__}: {err})")
            return {}
        return {row.pop("key"): row for row in rows}

    def add(self, kind: str, entries: dict[str, dict[str, Any]]) -> int:
        """Write new entries as immutable files (one per partition); returns how many were written."""
        if not entries:
            return 0
        writer = f"{_stamp()}-{uuid.uuid4().hex}"
        by_prefix: dict[str, list[str]] = {}
        for key in sorted(entries):
            by_prefix.setdefault(key[:PREFIX_DIGITS], []).append(key)
        written = 0
        schema = ENTRY_SCHEMAS[kind]
        try:
            for prefix, keys in by_prefix.items():
                columns = {f.name: [entries[k][f.name] for k in keys] for f in schema if f.name != "key"}
                table = pa.table({"key": keys, **columns}, schema=schema)
                sink = pa.BufferOutputStream()
                pq.write_table(table, sink, compression="zstd")
                atomic_write_bytes(
                    join(self._partition(kind, prefix), f"{writer}.parquet"),
                    sink.getvalue().to_pybytes(),
                    self.storage_options,
                )
                written += len(keys)
        except Exception as err:  # noqa: BLE001 - the part is committed; only reuse is lost
            self._warn(f"cannot write to {self.uri} ({type(err).__name__}: {err}); these rows will be computed again")
        return written

    def compact(self, kind: str, at: int = COMPACT_AT) -> int:
        """Merge each partition holding more than ``at`` files into one file sorted by key, then
        delete the merged files; returns the files merged. Concurrent compactions at worst write
        the same entries twice; a lookup listing meanwhile at worst misses some rows (computed
        again). Holds one partition in memory. Never raises."""
        merged = 0
        try:
            fs, _ = filesystem(self.uri, self.storage_options)
            for prefix in (f"{n:x}" for n in range(16**PREFIX_DIGITS)):
                _, directory = filesystem(self._partition(kind, prefix), self.storage_options)
                paths = self._entry_files(fs, directory)
                if len(paths) <= at:
                    continue
                tables = []
                for path in paths:
                    try:
                        with fs.open(path, "rb") as handle:
                            table = pq.read_table(handle)
                        if table.schema != ENTRY_SCHEMAS[kind]:
                            raise ValueError("not a cache entry file of this layout")
                        tables.append(table)
                    except Exception as err:  # noqa: BLE001 - a corrupt file is dropped with the rest
                        self._warn(f"dropping unreadable cache file {path} ({type(err).__name__}: {err})")
                table = pa.concat_tables(tables).sort_by("key")
                keys = table.column("key").to_pylist()
                first = [i for i, k in enumerate(keys) if i == 0 or k != keys[i - 1]]
                table = table.take(pa.array(first, pa.int64()))
                sink = pa.BufferOutputStream()
                pq.write_table(table, sink, compression="zstd", row_group_size=8192)
                atomic_write_bytes(
                    join(self._partition(kind, prefix), f"{_stamp()}-{uuid.uuid4().hex}.parquet"),
                    sink.getvalue().to_pybytes(),
                    self.storage_options,
                )
                for path in paths:
                    try:
                        fs.rm_file(path)
                    except FileNotFoundError:  # another compaction took it
                        pass
                merged += len(paths)
        except Exception as err:  # noqa: BLE001 - compaction only speeds lookups up
            self._warn(f"cannot compact {self.uri} ({type(err).__name__}: {err})")
        return merged

    def record_run(self, record: dict[str, Any]) -> None:
        """Note one run's rows cached/computed, for ``cache stats``' hit rate."""
        name = f"{_stamp()}-{uuid.uuid4().hex}.json"
        try:
            atomic_write_bytes(
                join(self.uri, LAYOUT, "runs", name),
                json.dumps({**record, "finished_at": time.time()}).encode(),
                self.storage_options,
            )
        except Exception as err:  # noqa: BLE001
            self._warn(f"cannot record the run in {self.uri} ({type(err).__name__}: {err})")

    # ---------------------------------------------------------------- maintenance (CLI)

    def stats(self, recent_runs: int = 10) -> dict[str, Any]:
        """Entries, files and bytes per kind (from Parquet footers) and the hit rate of recent runs."""
        fs, _ = filesystem(self.uri, self.storage_options)
        kinds: dict[str, dict[str, Any]] = {}
        for kind in KINDS:
            entries = files = size = 0
            oldest = newest = None
            for path, info in self._all_files(fs, kind):
                files += 1
                size += int(info.get("size") or 0)
                try:
                    with fs.open(path, "rb") as handle:
                        entries += pq.ParquetFile(handle).metadata.num_rows
                except Exception as err:  # noqa: BLE001
                    self._warn(f"skipping unreadable cache file {path} ({type(err).__name__}: {err})")
                made = _stamp_time(path.rsplit("/", 1)[-1])
                if made is not None:
                    oldest = made if oldest is None else min(oldest, made)
                    newest = made if newest is None else max(newest, made)
            kinds[kind] = {
                "entries": entries,
                "files": files,
                "bytes": size,
                "oldest": _iso(oldest),
                "newest": _iso(newest),
            }
        runs = self._runs(fs)[-recent_runs:]
        cached = sum(int(r.get("rows_cached", 0)) for r in runs)
        computed = sum(int(r.get("rows_computed", 0)) for r in runs)
        return {
            "uri": self.uri,
            "kinds": kinds,
            "entries": sum(k["entries"] for k in kinds.values()),
            "bytes": sum(k["bytes"] for k in kinds.values()),
            "recent_runs": runs,
            "hit_rate": cached / (cached + computed) if cached + computed else None,
        }

    def _all_files(self, fs: Any, kind: str) -> list[tuple[str, dict[str, Any]]]:
        _, root = filesystem(join(self.uri, LAYOUT, kind), self.storage_options)
        try:
            found = fs.find(root, detail=True)
        except FileNotFoundError:
            return []
        return sorted(
            (p, i)
            for p, i in found.items()
            if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith(TEMP_PREFIX)
        )

    def _runs(self, fs: Any) -> list[dict[str, Any]]:
        _, root = filesystem(join(self.uri, LAYOUT, "runs"), self.storage_options)
        try:
            paths = sorted(fs.find(root))
        except FileNotFoundError:
            return []
        runs = []
        for path in paths:
            try:
                runs.append(json.loads(fs.cat_file(path)))
            except Exception as err:  # noqa: BLE001
                self._warn(f"skipping unreadable run record {path} ({type(err).__name__}: {err})")
        return runs

    def prune(self, older_than_days: float, now: float | None = None) -> dict[str, int]:
        """Delete entry files and run records written more than ``older_than_days`` ago.
        Files are immutable, so a run reading meanwhile either reads a whole file or misses it."""
        fs, _ = filesystem(self.uri, self.storage_options)
        cutoff = (now if now is not None else time.time()) - older_than_days * 86400
        removed = {"files": 0, "entries": 0, "bytes": 0}
        old: list[str] = []
        for kind in KINDS:
            for path, info in self._all_files(fs, kind):
                made = _stamp_time(path.rsplit("/", 1)[-1])
                if made is not None and made < cutoff:
                    try:
                        with fs.open(path, "rb") as handle:
                            removed["entries"] += pq.ParquetFile(handle).metadata.num_rows
                    except Exception:  # noqa: BLE001 - a corrupt file is pruned all the same
                        pass
                    removed["bytes"] += int(info.get("size") or 0)
                    old.append(path)
        _, runs_root = filesystem(join(self.uri, LAYOUT, "runs"), self.storage_options)
        try:
            old += [p for p in fs.find(runs_root) if (t := _stamp_time(p.rsplit("/", 1)[-1])) and t < cutoff]
        except FileNotFoundError:
            pass
        for path in old:
            fs.rm_file(path)
        removed["files"] = len(old)
        return removed


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


# --------------------------------------------------------------------------------------------
# One shard's use of the cache
# --------------------------------------------------------------------------------------------


@dataclass
class ShardCache:
    """A shard's lookups and the entries it computed, added with :meth:`add_computed` once the
    part has committed. Calls are over the same list of rows with text, in the same order."""

    cache: RowCache
    gen_context: str | None = None
    gen_model: str | None = None  # the spec whose chat template renders the prompts keyed
    embed_context: str | None = None
    hits: dict[str, list[bool]] = field(default_factory=dict)
    new: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    cached_prompt_tokens: int = 0
    cached_generated_tokens: int = 0
    cached_embedded_tokens: int = 0

    def generate(self, generator: GenerationEngine, prompts: list[str], params: GenerationParams) -> list[Generation]:
        from shardwise.gpu_runtime import Generation

        assert self.gen_context is not None and self.gen_model is not None
        keys = generation_keys(self.gen_context, prompts, params, self.gen_model)
        found = self.cache.lookup("generate", keys)
        misses = [j for j, k in enumerate(keys) if k not in found]
        computed = dict(zip(misses, generator.generate([prompts[j] for j in misses], params))) if misses else {}
        outputs = []
        for j, key in enumerate(keys):
            if j in computed:
                out = computed[j]
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
        return EmbeddingOutput(vectors, n_tokens, truncated)

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
        gen_model=cfg.generate.model if cfg.runs_generation else None,
        embed_context=embedding_context(cfg) if cfg.runs_embedding else None,
    )


def cached_rows(
    cfg: JobConfig, table: pa.Table, cleaned: list[tuple[str | None, str | None]], chat_date: dt.date | str | None
) -> set[int]:
    """Positions of the rows with text whose every value the cache holds (for ``plan``); empty
    without a cache. The keys are those :func:`shardwise.tasks.records.enrichment.enrich_table` uses."""
    if not cfg.cache:
        return set()
    from shardwise.tasks.records.enrichment import generation_params, render_prompts

    cache = RowCache(cfg.cache, cfg.storage_options)
    valid = [i for i, (_, err) in enumerate(cleaned) if err is None]
    hit = set(valid)
    if cfg.runs_generation:
        prompts = render_prompts(cfg, table, [text for text, _ in cleaned], valid)
        params = generation_params(cfg, chat_date)
        keys = generation_keys(generation_context(cfg), prompts, params, cfg.generate.model)
        found = cache.lookup("generate", keys)
        hit &= {i for i, k in zip(valid, keys) if k in found}
    if cfg.runs_embedding:
        keys = row_keys(embedding_context(cfg), [cleaned[i][0] for i in valid])
        found = cache.lookup("embed", keys)
        hit &= {i for i, k in zip(valid, keys) if k in found}
    return hit
