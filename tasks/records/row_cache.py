"""A content-addressed cache of computed rows, so a rerun over mostly unchanged data pays only for
what changed. Its keys are made in :mod:`shardwise.tasks.records.row_cache_keys`.

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
import json
import logging
import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shardwise.tasks.records.row_cache_keys import LAYOUT
from shardwise.tasks.storage.fs import TEMP_PREFIX, atomic_write_bytes, filesystem, join

logger = logging.getLogger("shardwise.cache")

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
