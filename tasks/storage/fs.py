"""The storage seam: every read and write goes through an fsspec URI plus storage options.

Local paths and ``s3://`` (or any fsspec protocol) take the same code path. Writes are atomic per
file: local files are written to a temporary name, renamed, and the directory fsynced; on object
stores the upload is committed explicitly only after every byte is sent, and discarded (the
multipart upload aborted) when anything interrupts it, so no partial object is ever published.
"""

from __future__ import annotations

import errno
import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from shardwise.tasks.errors import StorageError

TEMP_PREFIX = ".tmp-"  # local in-flight writes; never taken for a part
PROBE_PREFIX = ".shardwise-write-probe-"


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


def _fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (a crash after ``os.replace`` cannot undo it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # platforms without directory handles
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(
    uri: str, data: bytes, storage_options: dict[str, Any] | None = None, fault_point: str | None = None
) -> None:
    """Write ``data`` so that readers see either the old file/no file, or the whole new file.

    ``fault_point`` names the crash point (``shardwise.tasks.faults``) reached half-way through the bytes."""
    from shardwise.tasks.faults import crash_point

    fs, path = filesystem(uri, storage_options)
    half = len(data) // 2
    if isinstance(fs, LocalFileSystem):
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f"{TEMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}")
        try:
            with open(tmp, "wb") as handle:
                handle.write(data[:half])
                if fault_point:
                    crash_point(fault_point)
                handle.write(data[half:])
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
            _fsync_directory(directory)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    # autocommit=False: close() only uploads the buffered bytes; the object appears at commit().
    # Anything leaving early (an exception, a timeout raised into this thread, Ctrl-C) discards
    # the upload instead; a SIGKILL leaves an unfinished multipart upload that is not an object
    # (the next run aborts it, see OutputDir.remove_debris).
    handle = fs.open(path, "wb", autocommit=False)
    try:
        handle.write(data[:half])
        if fault_point:
            crash_point(fault_point)
        handle.write(data[half:])
        handle.close()
        handle.commit()
    except BaseException:
        try:
            handle.discard()
        finally:
            handle.closed = True  # nothing left to flush: keep close()/__del__ from uploading
        raise


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    fs, path = filesystem(uri, storage_options)
    return fs.cat_file(path)


def exists(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    return fs.exists(path)


def check_writable(uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Create the output location and prove a write works, before any model is loaded."""
    probe = join(uri, f"{PROBE_PREFIX}{uuid.uuid4().hex}")
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


_CLIENT_LIBRARIES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "google", "azure", "gcsfs", "adlfs")


def is_storage_failure(err: BaseException) -> bool:
    """An error of the storage itself (an OS error or one from a storage client library), as
    opposed to one about the bytes read (pyarrow raising on a damaged file)."""
    import pyarrow as pa

    if isinstance(err, pa.ArrowException):
        return False
    return isinstance(err, OSError) or type(err).__module__.split(".")[0] in _CLIENT_LIBRARIES


def is_transient(err: BaseException) -> bool:
    """A storage error worth retrying: throttling, timeouts, dropped connections, 5xx.

    Missing files and permission errors are not transient, nor is anything about the data."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(err, (TimeoutError, ConnectionError)):
        return True
    if not is_storage_failure(err):
        return False
    # An HTTP status on the error (aiohttp's ``status``, requests' ``response.status_code``), or
    # s3fs's errno for a 500 answer (EREMOTEIO).
    status = getattr(err, "status", None) or getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(status, int) and (status in _TRANSIENT_STATUSES):
        return True
    if isinstance(err, OSError) and err.errno == errno.EREMOTEIO:
        return True
    text = f"{type(err).__name__} {err}".lower()
    markers = (
        "slowdown",
        "slow down",
        "throttl",
        "timeout",
        "timed out",
        "connect",
        "serviceunavailable",
        "service unavailable",
        "internalerror",
        "internal error",
        "internal server error",
        "bad gateway",
        "503",
        "500 ",
        "reduce your request rate",
    )
    return any(m in text for m in markers)


_TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})


def with_storage_retries(action, what: str, attempts: int = 4, first_delay_s: float = 0.5):
    """``action()``, retried with backoff while it fails transiently; a persistent storage failure
    becomes :class:`StorageError` (exit 3), never a silent recompute."""
    import time

    delay = first_delay_s
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as err:  # noqa: BLE001 - sorted by is_transient below
            if not is_transient(err):
                raise
            if attempt == attempts:
                raise StorageError(f"{what}: {type(err).__name__}: {err} (after {attempts} tries)") from None
            time.sleep(delay)
            delay *= 2


# Storage options can hold credentials, so they never travel as Prefect flow parameters: a flow
# gets them from its starting process (tasks/compute/handoff.py) or from the environment.


def runtime_storage_options() -> dict[str, Any]:
    """Storage options from ``$SHARDWISE_STORAGE_OPTIONS`` (a JSON object); empty when unset."""
    import json

    options: dict[str, Any] = {}
    raw = os.environ.get("SHARDWISE_STORAGE_OPTIONS")
    if raw:
        try:
            options.update(json.loads(raw))
        except ValueError:
            raise StorageError("SHARDWISE_STORAGE_OPTIONS is not a JSON object") from None
    return options
