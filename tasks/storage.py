"""The storage seam: every read and write goes through an fsspec URI plus storage options.

Local paths and ``s3://`` (or any fsspec protocol) take the same code path. Writes are atomic per
file: local files are written to a temporary name and renamed; object stores make an object visible
only once its PUT completes.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tasks.errors import StorageError

TEMP_PREFIX = ".tmp-"  # local in-flight writes; never matched by part-*.parquet


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and protocol-less path for ``uri``."""
    try:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    except (ImportError, ValueError) as err:
        raise StorageError(f"cannot open {uri}: {err}") from None
    return fs, path


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path back to a URI that another process can open (``s3://bucket/key``, or a local path)."""
    if isinstance(fs, LocalFileSystem):
        return path
    return fs.unstrip_protocol(path)


def join(uri: str, *names: str) -> str:
    """Join names under a URI; names never escape it (no ``..``, no absolute parts)."""
    for name in names:
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise StorageError(f"refusing unsafe file name {name!r} under {uri}")
    if "://" in uri:
        return posixpath.join(uri.rstrip("/"), *names)
    return os.path.join(uri, *names)


def atomic_write_bytes(uri: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write ``data`` so that readers see either the old file/no file, or the whole new file."""
    from tasks.faults import crash_point

    fs, path = filesystem(uri, storage_options)
    half = len(data) // 2
    if isinstance(fs, LocalFileSystem):
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f"{TEMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}")
        try:
            with open(tmp, "wb") as handle:
                handle.write(data[:half])
                if os.path.basename(path).startswith("part-"):
                    crash_point("part-write")
                handle.write(data[half:])
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        # The object becomes visible only when close() completes the upload (one PUT, or the
        # completion of a multipart upload): a crash before that leaves nothing behind.
        with fs.open(path, "wb") as handle:
            handle.write(data[:half])
            if path.rsplit("/", 1)[-1].startswith("part-"):
                crash_point("part-write")
            handle.write(data[half:])


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    fs, path = filesystem(uri, storage_options)
    return fs.cat_file(path)


def exists(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    return fs.exists(path)


def check_writable(uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Create the output location and prove a write works, before any model is loaded."""
    probe = join(uri, f".shardwise-write-probe-{uuid.uuid4().hex}")
    try:
        fs, path = filesystem(uri, storage_options)
        if isinstance(fs, LocalFileSystem):
            fs.makedirs(path, exist_ok=True)
        atomic_write_bytes(probe, b"ok", storage_options)
        fs.rm_file(filesystem(probe, storage_options)[1])
    except StorageError:
        raise
    except Exception as err:  # noqa: BLE001 - any backend error means "not writable"
        raise StorageError(f"output location {uri} is not writable: {type(err).__name__}: {err}") from None


# Storage options can hold credentials, so they never travel as Prefect flow parameters. The CLI
# registers the config file's options for its own process; deployments use the environment.
_runtime_options: dict[str, Any] = {}


def set_runtime_storage_options(options: dict[str, Any]) -> None:
    """Make ``options`` the storage options of flow runs started from this process."""
    _runtime_options.clear()
    _runtime_options.update(options)


def runtime_storage_options() -> dict[str, Any]:
    """Options registered by this process, over ``$SHARDWISE_STORAGE_OPTIONS`` (a JSON object)."""
    import json

    options: dict[str, Any] = {}
    raw = os.environ.get("SHARDWISE_STORAGE_OPTIONS")
    if raw:
        try:
            options.update(json.loads(raw))
        except ValueError:
            raise StorageError("SHARDWISE_STORAGE_OPTIONS is not a JSON object") from None
    options.update(_runtime_options)
    return options
