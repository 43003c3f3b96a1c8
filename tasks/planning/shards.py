"""Shard planning from Parquet footers only: no row data is read to plan.

A shard is a contiguous row range of one input file, expressed as row groups plus an optional slice
(large row groups are split). Shard ids are derived from the file, its row range and a fingerprint
of the file, so a rerun over the same input plans the same shards and an edited file new ones.

The fingerprint combines the size, the footer bytes and what the storage says about the object
without reading its data (:func:`storage_identity`): an edit that keeps the size and the footer
(one letter of an uncompressed text) still changes the fingerprint.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.config.output_columns import collision_message
from shardwise.tasks.errors import InputError, StorageError
from shardwise.tasks.storage.fs import filesystem, full_uri

STRING_TYPES = (pa.string(), pa.large_string(), pa.string_view())


@dataclass(frozen=True)
class InputFile:
    """One Parquet input file as its footer describes it."""

    uri: str
    size: int
    fingerprint: str  # sha256 of size, footer bytes and storage identity: changes when the file does
    num_rows: int
    row_group_rows: tuple[int, ...]
    schema: pa.Schema = field(compare=False, repr=False)


@dataclass(frozen=True)
class Shard:
    """A unit of work: rows ``[slice_start, slice_start + num_rows)`` of the given row groups."""

    index: int
    shard_id: str
    source: str
    source_fingerprint: str
    row_groups: tuple[int, ...]
    slice_start: int
    num_rows: int
    first_row: int  # position of the shard's first row within its file

    @property
    def name(self) -> str:
        """Task-run name shown in the Prefect UI."""
        return f"shard-{self.index:05d}"

    @property
    def part_name(self) -> str:
        from shardwise.tasks.storage.output_layout import part_name

        return part_name(self.shard_id)


@dataclass(frozen=True)
class UnreadableFile:
    """An input file whose footer cannot be read: its rows cannot be planned, so the run fails."""

    uri: str
    reason: str


@dataclass(frozen=True)
class ShardPlan:
    files: tuple[InputFile, ...]
    shards: tuple[Shard, ...]
    unreadable: tuple[UnreadableFile, ...] = ()

    @property
    def total_rows(self) -> int:
        return sum(s.num_rows for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": [
                {"uri": f.uri, "size": f.size, "fingerprint": f.fingerprint, "num_rows": f.num_rows} for f in self.files
            ],
            "shards": [
                {
                    "index": s.index,
                    "shard_id": s.shard_id,
                    "source": s.source,
                    "row_groups": list(s.row_groups),
                    "first_row": s.first_row,
                    "num_rows": s.num_rows,
                }
                for s in self.shards
            ],
        }


def is_input_pattern(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    """True when ``uri`` is meant as a glob: it has ``*``, ``?`` or ``[`` and no file or directory
    has that literal name (so an input directory called ``in[1]`` is that directory)."""
    fs, path = filesystem(uri, storage_options)
    return any(ch in path for ch in "*?[") and not fs.exists(path)


def list_input_files(uri: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """A file, a directory (recursively, ``*.parquet``) or a glob -> sorted file URIs."""
    fs, path = filesystem(uri, storage_options)
    # A long-lived process (a worker, a test session) must not plan from an older listing: the
    # sizes and ETags it holds are what the fingerprints are made of.
    fs.invalidate_cache()
    try:
        if is_input_pattern(uri, storage_options):
            paths = [p for p in fs.glob(path) if fs.isfile(p)]
        elif fs.isdir(path):
            # Skip hidden and underscore entries *below* the input root (_SUCCESS, .tmp-*, _temp/),
            # whatever the root itself is called (it may well live under ~/.something).
            root = path.rstrip("/") + "/"
            paths = [
                p
                for p in fs.find(path)
                if p.endswith(".parquet") and not any(part.startswith(("_", ".")) for part in p[len(root) :].split("/"))
            ]
        elif fs.isfile(path):
            paths = [path]
        else:
            raise InputError(f"input not found: {uri}")
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - any backend failure (e.g. HTTP 401) is a storage failure
        raise StorageError(f"cannot list input {uri}: {type(err).__name__}: {err}") from None
    if not paths and not fs.isdir(path):
        raise InputError(f"input not found: {uri} (no file matches)")
    return [full_uri(fs, p) for p in sorted(paths)]


# Object metadata that changes whenever the object's bytes do, best first: the ETag (S3: a hash of
# the content; GCS, Azure, HTTP: new on every write), else a version (GCS generation, S3 VersionId),
# else a content hash. One key only, and one that a listing reports as well as a HEAD does, so the
# same object gets the same fingerprint however it was looked up.
_VERSION_KEYS = ("etag", "generation", "versionid", "version_id", "md5hash", "content_md5", "crc32c")
# Only where none of those exists: a modification time, which an identical re-upload changes too.
_TIME_KEYS = ("mtime", "last_modified", "lastmodified", "updated", "modified")


def storage_identity(fs: Any, path: str, info: dict[str, Any]) -> str:
    """What storage tells about a file's version for free (no data read): for a local file its
    inode, size and mtime in nanoseconds; for an object its ETag (or generation, version id).
    Empty when the backend reports none of these (then size + footer are all there is)."""
    if isinstance(fs, LocalFileSystem):
        stat = os.stat(path)
        return f"local:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}"
    lowered = {str(k).lower(): v for k, v in info.items()}
    for key in _VERSION_KEYS + _TIME_KEYS:
        if lowered.get(key) not in (None, "", "null"):
            return f"{key}={lowered[key]}"
    return ""


def _read_footer(uri: str, storage_options: dict[str, Any] | None) -> tuple[int, bytes, pq.FileMetaData, str]:
    fs, path = filesystem(uri, storage_options)
    try:
        info = fs.info(path)
        size = int(info["size"])
        identity = storage_identity(fs, path, info)
        with fs.open(path, "rb") as handle:
            if size < 12:
                raise InputError(f"{uri}: not a Parquet file ({size} bytes)")
            handle.seek(size - 8)
            tail = handle.read(8)
            if tail[4:] != b"PAR1":
                raise InputError(f"{uri}: not a Parquet file or truncated (no PAR1 footer magic)")
            footer_len = struct.unpack("<i", tail[:4])[0]
            if footer_len <= 0 or footer_len > size - 12:
                raise InputError(f"{uri}: corrupt Parquet footer (length {footer_len})")
            handle.seek(size - 8 - footer_len)
            footer = handle.read(footer_len)
            handle.seek(0)
            metadata = pq.ParquetFile(handle).metadata
    except InputError:
        raise
    except pa.ArrowException as err:
        raise InputError(f"{uri}: corrupt Parquet file ({err})") from None
    except FileNotFoundError:
        raise InputError(f"input not found: {uri}") from None
    except OSError as err:
        raise StorageError(f"cannot read {uri}: {err}") from None
    return size, footer, metadata, identity


def inspect_file(uri: str, storage_options: dict[str, Any] | None = None) -> InputFile:
    size, footer, metadata, identity = _read_footer(uri, storage_options)
    fingerprint = hashlib.sha256(f"{size}\0{identity}\0".encode() + footer).hexdigest()
    rows = tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
    return InputFile(uri, size, fingerprint, metadata.num_rows, rows, metadata.schema.to_arrow_schema())


def is_string_type(type_: pa.DataType) -> bool:
    """Text, however stored: string, large_string, string_view, or dictionary-encoded strings (what
    pandas writes for a categorical column)."""
    if pa.types.is_dictionary(type_):
        type_ = type_.value_type
    return type_ in STRING_TYPES


def column_role(cfg: JobConfig, column: str) -> str:
    """Which setting asks for ``column``, for a message about it (with the default when it is one)."""
    from shardwise.gpu_runtime.prompts import template_fields

    roles = []
    for setting, flag in (("id_column", "--id-column"), ("text_column", "--text-column")):
        if column == getattr(cfg, setting):
            default = JobConfig.model_fields[setting].default
            suffix = f", whose default is {default!r}" if column == default else ""
            roles.append(f"the {setting.replace('_', ' ')}: {flag}{suffix}")
    if cfg.runs_generation and column in template_fields(cfg.template):
        roles.append(f"the prompt template's field {{{column}}}")
    return "; ".join(roles) or "a column the job needs"


def validate_schemas(files: list[InputFile], cfg: JobConfig) -> None:
    """Required columns exist with usable types, no kept column has the name of a column shardwise
    writes, and every file agrees with the first (no drift)."""
    if not files:
        return
    from shardwise.gpu_runtime.prompts import template_fields

    needed = [cfg.id_column, cfg.text_column]
    if cfg.runs_generation:
        needed += [c for c in template_fields(cfg.template) if c not in needed]
    reference = files[0]
    for file in files:
        names = file.schema.names
        for column in needed:
            if column not in names:
                raise InputError(
                    f"{file.uri}: column {column!r} not found ({column_role(cfg, column)}); "
                    f"columns are: {', '.join(names)}"
                )
        text_type = file.schema.field(cfg.text_column).type
        if not is_string_type(text_type):
            raise InputError(
                f"{file.uri}: text column {cfg.text_column!r} (--text-column) has type {text_type}, "
                "expected a string column"
            )
        collision = collision_message(cfg, names)
        if collision:
            raise InputError(f"{file.uri}: {collision}")
        if file is reference:
            continue
        for ref_field in reference.schema:
            if ref_field.name not in names:
                raise InputError(
                    f"schema drift: {file.uri} has no column {ref_field.name!r} (present in {reference.uri})"
                )
            other = file.schema.field(ref_field.name).type
            if other != ref_field.type:
                raise InputError(
                    f"schema drift: {file.uri} column {ref_field.name!r} is {other}, "
                    f"but {ref_field.type} in {reference.uri}"
                )
        extra = [n for n in names if n not in reference.schema.names]
        if extra:
            raise InputError(f"schema drift: {file.uri} has extra columns {extra} not in {reference.uri}")


def _shard_id(file: InputFile, row_groups: tuple[int, ...], slice_start: int, rows: int, first_row: int) -> str:
    """``<file stem>-<first row>-<hash>``: stable across reruns and independent of other files, so
    fixing or adding one file never renames another file's parts. The stem is reduced to safe
    characters so a file name can never place a part outside the output root."""
    name = file.uri.rsplit("/", 1)[-1]
    if "://" in file.uri:  # the path's last name, never a query string (which may hold a signature)
        name = urlsplit(file.uri).path.rsplit("/", 1)[-1]
    stem = name.removesuffix(".parquet")
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", stem)[:48] or "input"
    key = f"{file.uri}|{file.fingerprint}|{row_groups}|{slice_start}|{rows}".encode()
    return f"{stem}-{first_row:010d}-{hashlib.sha256(key).hexdigest()[:10]}"


def split_file(file: InputFile, rows_per_shard: int, first_index: int) -> list[Shard]:
    """Pack consecutive row groups up to ``rows_per_shard`` rows; split row groups larger than that."""
    shards: list[Shard] = []
    pending: list[int] = []
    pending_rows = 0
    pending_first = 0
    file_row = 0

    def emit(groups: tuple[int, ...], slice_start: int, rows: int, first_row: int) -> None:
        index = first_index + len(shards)
        shards.append(
            Shard(
                index=index,
                shard_id=_shard_id(file, groups, slice_start, rows, first_row),
                source=file.uri,
                source_fingerprint=file.fingerprint,
                row_groups=groups,
                slice_start=slice_start,
                num_rows=rows,
                first_row=first_row,
            )
        )

    for group, rows in enumerate(file.row_group_rows):
        if rows == 0:
            continue
        if pending and pending_rows + rows > rows_per_shard:
            emit(tuple(pending), 0, pending_rows, pending_first)
            pending, pending_rows = [], 0
        if rows > rows_per_shard:
            for start in range(0, rows, rows_per_shard):
                emit((group,), start, min(rows_per_shard, rows - start), file_row + start)
        else:
            if not pending:
                pending_first = file_row
            pending.append(group)
            pending_rows += rows
        file_row += rows
    if pending:
        emit(tuple(pending), 0, pending_rows, pending_first)
    return shards


def plan_shards(cfg: JobConfig) -> ShardPlan:
    """Inspect footers, validate schemas, and cut the input into shards.

    A file with an unreadable footer (corrupt, truncated) does not stop the others: it is listed in
    ``plan.unreadable`` and the run ends failed once every other shard is committed. Only when
    no file at all is readable is that an immediate :class:`InputError`.
    """
    files: list[InputFile] = []
    unreadable: list[UnreadableFile] = []
    uris = list_input_files(cfg.input, cfg.storage_options)
    for uri in uris:
        try:
            files.append(inspect_file(uri, cfg.storage_options))
        except InputError as err:
            unreadable.append(UnreadableFile(uri, str(err)))
    if unreadable and not files:
        raise InputError(
            unreadable[0].reason
            + (f" (and {len(unreadable) - 1} more unreadable files)" if len(unreadable) > 1 else "")
        )
    validate_schemas(files, cfg)
    shards: list[Shard] = []
    for file in files:
        shards.extend(split_file(file, cfg.rows_per_shard, first_index=len(shards)))
    if not shards and not unreadable and not cfg.allow_empty:
        found = f"{len(files)} file(s), 0 rows" if files else "no Parquet files"
        raise InputError(
            f"input {cfg.input} has no rows ({found}): an empty partition is usually an upstream "
            "failure; set allow_empty: true (--set allow_empty=true) to publish an empty output"
        )
    return ShardPlan(files=tuple(files), shards=tuple(shards), unreadable=tuple(unreadable))
