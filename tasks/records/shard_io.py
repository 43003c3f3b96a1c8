"""Reading one shard's rows and writing one output part, atomically, with lineage in the footer."""

from __future__ import annotations

import hashlib
import io
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shardwise.tasks.errors import InputError, StorageError
from shardwise.tasks.planning.shards import Shard
from shardwise.tasks.redaction import redact_text
from shardwise.tasks.storage.fs import atomic_write_bytes, filesystem, join, with_storage_retries
from shardwise.tasks.storage.output_layout import LINEAGE_PREFIX

METADATA_PREFIX = LINEAGE_PREFIX


class _StorageReads:
    """A file handle whose read failures surface as :class:`StorageError`, so that anything else
    pyarrow raises while decoding can be blamed on the data (corrupt pages), not the storage."""

    def __init__(self, handle: Any, uri: str) -> None:
        self._handle, self._uri = handle, uri
        self.failure: Exception | None = None  # the backend's own error, for the retry decision

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def _guard(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self._handle, method)(*args)
        except Exception as err:  # noqa: BLE001 - any backend failure is a storage failure
            self.failure = err
            raise StorageError(f"cannot read {self._uri}: {type(err).__name__}: {err}") from None

    def read(self, *args: Any) -> bytes:
        return self._guard("read", *args)

    def seek(self, *args: Any) -> int:
        return self._guard("seek", *args)


def read_shard(shard: Shard, columns: list[str] | None, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """The shard's rows (only ``columns`` when given), streamed from its row groups.

    Transient storage failures (5xx answers, throttling, timeouts, dropped connections) are retried
    with backoff, then raise :class:`StorageError`; only a file that storage says is not there
    (404) is an :class:`InputError` ("disappeared since planning")."""
    fs, path = filesystem(shard.source, storage_options)
    try:
        table = with_storage_retries(lambda: _read_once(shard, fs, path, columns), f"cannot read {shard.source}")
    except FileNotFoundError:
        raise InputError(f"{shard.source}: file disappeared since planning") from None
    except (InputError, StorageError):
        raise
    except Exception as err:  # noqa: BLE001 - a storage failure that did not look transient
        raise StorageError(f"cannot read {shard.source}: {type(err).__name__}: {err}") from None
    table = table.slice(shard.slice_start, shard.num_rows)
    if table.num_rows != shard.num_rows:
        raise InputError(f"{shard.source}: expected {shard.num_rows} rows in {shard.name}, read {table.num_rows}")
    return table


def _read_once(shard: Shard, fs: Any, path: str, columns: list[str] | None) -> pa.Table:
    """One try at the shard's row groups; a storage failure is raised as the backend's own error,
    for :func:`~shardwise.tasks.storage.fs.with_storage_retries` to judge."""
    try:
        handle = fs.open(path, "rb")
    except FileNotFoundError as err:
        behind = _failure_behind(err)
        if behind is not None:
            raise behind from None
        raise
    reads = _StorageReads(handle, shard.source)
    try:
        with handle:
            parquet = pq.ParquetFile(reads, pre_buffer=True)
            batches = list(parquet.iter_batches(row_groups=list(shard.row_groups), columns=columns))
            schema = (
                parquet.schema_arrow if columns is None else pa.schema([parquet.schema_arrow.field(c) for c in columns])
            )
    except StorageError:
        if reads.failure is not None:
            raise reads.failure from None
        raise
    except (pa.ArrowException, OSError, EOFError, ValueError) as err:
        if reads.failure is not None:
            raise reads.failure from None
        raise InputError(
            f"{shard.source}: corrupt Parquet data in row groups {list(shard.row_groups)}: {err}"
        ) from None
    return pa.Table.from_batches(batches, schema=schema) if batches else schema.empty_table()


def _failure_behind(err: FileNotFoundError) -> BaseException | None:
    """The storage failure an fsspec backend reported as "not found", if any: the HTTP filesystem
    raises FileNotFoundError from whatever its last request raised (a 500 answer, a reset
    connection); behind a real one there is only another FileNotFoundError or a 404/410 answer."""
    cause = err.__cause__
    while cause is not None:
        if not isinstance(cause, FileNotFoundError) and getattr(cause, "status", None) not in (404, 410):
            return cause
        cause = cause.__cause__
    return None


@dataclass(frozen=True)
class WrittenPart:
    uri: str
    rows: int
    bytes: int
    sha256: str
    write_id: str


def write_part(
    table: pa.Table,
    output: str,
    shard: Shard,
    lineage: dict[str, str],
    storage_options: dict[str, Any] | None = None,
) -> WrittenPart:
    """Serialise in memory, then publish with one atomic write: a part is whole or absent.

    The footer gets a fresh ``part_write_id``: the commit checks it, so a part written later by
    someone else (a worker of a killed run) is told apart from this one."""
    write_id = uuid.uuid4().hex
    metadata = dict(table.schema.metadata or {})
    # the source URI may hold credentials; the footer travels with the data, so never those
    metadata.update(
        {
            f"{METADATA_PREFIX}{k}".encode(): redact_text(str(v)).encode()
            for k, v in {**lineage, "part_write_id": write_id}.items()
        }
    )
    table = table.replace_schema_metadata(metadata)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    data = buffer.getvalue()
    uri = join(output, shard.part_name)
    try:
        atomic_write_bytes(uri, data, storage_options, fault_point="part-write")
    except OSError as err:
        raise StorageError(f"cannot write {uri}: {err}") from None
    return WrittenPart(
        uri=uri, rows=table.num_rows, bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), write_id=write_id
    )


def read_part_lineage(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """The ``shardwise.*`` key-value metadata of a written part."""
    fs, path = filesystem(uri, storage_options)
    with fs.open(path, "rb") as handle:
        metadata = pq.ParquetFile(handle).schema_arrow.metadata or {}
    return {
        k.decode()[len(METADATA_PREFIX) :]: v.decode()
        for k, v in metadata.items()
        if k.decode().startswith(METADATA_PREFIX)
    }
