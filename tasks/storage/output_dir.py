"""The one owner of an output directory: what shardwise writes there, and what it may remove.

Every read and write under an output goes through :class:`OutputDir`: its parts, manifest and
markers (named in :mod:`shardwise.tasks.storage.output_layout`), the staging directories of
fenced writers and their publishing, the lease file (whose protocol is
:mod:`shardwise.tasks.storage.lease`), and the removal of what killed runs left behind.

Every user path is used literally: names are listed and filtered here, never globbed, so an
output called ``out[1]`` or ``out?`` means that directory and no other. A ``part-*`` file counts
as shardwise's own only when its name has shardwise's shape *and* its footer names that very
shard; anything else in the directory (a Spark part, a README) is foreign and is never changed
or removed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from shardwise.tasks.errors import ConfigError, LeaseLost, StorageError
from shardwise.tasks.redaction import redact_values
from shardwise.tasks.storage.fs import (
    PROBE_PREFIX,
    TEMP_PREFIX,
    atomic_write_bytes,
    filesystem,
    is_storage_failure,
    join,
)
from shardwise.tasks.storage.lease import Fence, Lease, LeaseHolder, acquire, holder_bytes, holder_from_bytes
from shardwise.tasks.storage.output_layout import (
    HOLD_NAME,
    LEASE_NAME,
    LINEAGE_PREFIX,
    MANIFEST_NAME,
    QUALITY_NAME,
    STAGING_DIR,
    SUCCESS_NAME,
    is_own_upload,
    part_name,
    part_shard_id,
)

logger = logging.getLogger("shardwise.output")


class OutputDir:
    """One output directory: part names, own-part listing, manifest, ``_SUCCESS``, lease, cleanup."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = uri
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = filesystem(uri, self.storage_options)
        self.root = self.root.rstrip("/") or "/"
        self._is_local = isinstance(self.fs, LocalFileSystem)

    # ---- names and listing -------------------------------------------------------------

    def uri_of(self, name: str) -> str:
        return join(self.uri, name)

    def path_of(self, name: str) -> str:
        """The filesystem path of ``name`` inside the output (for this object's ``fs``)."""
        return f"{self.root}/{name}" if self.root != "/" else f"/{name}"

    def names(self) -> list[str]:
        """Every file name directly under the root (literal listing; [] when the root is absent)."""
        try:
            self.fs.invalidate_cache(self.root)
            entries = self.fs.ls(self.root, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []  # nothing here yet (or a file in the way, which the write check reports)
        except OSError as err:
            raise StorageError(f"cannot list {self.uri}: {err}") from None
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") != "directory")

    def is_file(self) -> bool:
        """True when the root is a file (an output named after an existing file)."""
        try:
            return bool(self.fs.isfile(self.root))
        except OSError as err:
            raise StorageError(f"cannot read {self.uri}: {err}") from None

    def part_names(self) -> list[str]:
        """Files named like shardwise parts (not yet proven to be shardwise's own)."""
        return [n for n in self.names() if part_shard_id(n)]

    def part_lineage(self, name: str) -> dict[str, str]:
        """The ``shardwise.*`` footer keys of a part, without the prefix."""
        with self.fs.open(self.path_of(name), "rb") as handle:
            metadata = pq.ParquetFile(handle).schema_arrow.metadata or {}
        return {
            k.decode()[len(LINEAGE_PREFIX) :]: v.decode()
            for k, v in metadata.items()
            if k.decode().startswith(LINEAGE_PREFIX)
        }

    def owns_part(self, name: str) -> bool:
        """True when ``name`` is shardwise's: its name and its footer name the same shard."""
        shard_id = part_shard_id(name)
        if shard_id is None:
            return False
        try:
            return self.part_lineage(name).get("shard_id") == shard_id
        except FileNotFoundError:
            return False
        except Exception:  # noqa: BLE001 - unreadable: not provably ours, so left alone
            return False

    def foreign_files(self) -> list[str]:
        """Files here that shardwise did not write: by its naming and, for a part, an entry in the
        manifest or (when the manifest does not list it) a footer naming that very shard."""
        own_fixed = {MANIFEST_NAME, SUCCESS_NAME, LEASE_NAME, QUALITY_NAME, HOLD_NAME}
        names = self.names()
        manifest = self.read_manifest() if MANIFEST_NAME in names else None
        listed = {part_name(str(s.get("shard_id"))) for s in (manifest or {}).get("shards", []) if isinstance(s, dict)}
        foreign = []
        for name in names:
            if name in own_fixed or name.startswith((TEMP_PREFIX, PROBE_PREFIX)):
                continue
            if not ((part_shard_id(name) and name in listed) or self.owns_part(name)):
                foreign.append(name)
        return foreign

    # ---- manifest and markers ----------------------------------------------------------

    def write_json(self, name: str, data: dict[str, Any]) -> str:
        """Write ``data`` (redacted) as the JSON file ``name``; returns the text written."""
        data = redact_values(data)  # input URIs and error texts may hold credentials
        text = json.dumps(data, indent=2, sort_keys=False, default=str)
        try:
            atomic_write_bytes(self.uri_of(name), text.encode(), self.storage_options)
        except StorageError:
            raise
        except Exception as err:  # noqa: BLE001 - any backend failure is a storage failure here
            raise StorageError(f"cannot write {self.uri_of(name)}: {type(err).__name__}: {err}") from None
        return text

    def read_json(self, name: str) -> tuple[bool, Any]:
        """``(exists, value)`` of this directory's JSON file ``name``; value is None when the file
        is missing or not JSON. Storage trouble is a StorageError."""
        try:
            raw = self.fs.cat_file(self.path_of(name))
        except (FileNotFoundError, NotADirectoryError):
            return False, None
        except OSError as err:
            raise StorageError(f"cannot read {self.uri_of(name)}: {err}") from None
        try:
            return True, json.loads(raw)
        except ValueError:
            return True, None

    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest, or None when there is none or it cannot be parsed (then a warning).

        An unparseable manifest is not trusted and is replaced by the next run; resume never
        depends on it alone, since each part is verified from its own footer."""
        exists, manifest = self.read_json(MANIFEST_NAME)
        if not exists:
            return None
        if not isinstance(manifest, dict):
            logger.warning(
                "%s is not a readable manifest; it is ignored and will be rewritten", self.uri_of(MANIFEST_NAME)
            )
            return None
        return manifest

    def has_success(self) -> bool:
        return self.fs.exists(self.path_of(SUCCESS_NAME))

    def write_success(self, data: dict[str, Any]) -> None:
        self.write_json(SUCCESS_NAME, data)

    def remove_success(self) -> None:
        self._remove(SUCCESS_NAME)

    def remove_hold(self) -> None:
        self._remove(HOLD_NAME)

    def remove_quality(self) -> None:
        """Withdraw the quality verdict of an earlier run (its profile and any hold)."""
        self._remove(HOLD_NAME)
        self._remove(QUALITY_NAME)

    def _remove(self, name: str) -> None:
        self._remove_path(self.path_of(name))

    def _remove_path(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    # ---- staging and publishing parts --------------------------------------------------

    def staging_uri(self, fence: Fence) -> str:
        """Where workers of the run holding ``fence`` write their parts (never read as output)."""
        return join(self.uri, STAGING_DIR, fence.name)

    def publish_staged(self, fence: Fence, name: str) -> str:
        """Move the staged part ``name`` of ``fence`` to the root, if ``fence`` still holds the
        lease (checked right before the move); returns the part's URI. One atomic step on local
        disk (a rename) and one server-side copy on object stores: a part is whole or absent.

        Raises :class:`~shardwise.tasks.errors.LeaseLost` when another run holds the lease now: nothing is
        published."""
        self.check_fence(fence)
        source = f"{self.path_of(STAGING_DIR)}/{fence.name}/{name}"
        try:
            if self._is_local:
                os.replace(source, self.path_of(name))
            else:  # single-object calls: paths are literal (``copy``/``rm`` would expand globs)
                self.fs.cp_file(source, self.path_of(name))
                self.fs.rm_file(source)
        except FileNotFoundError:
            raise StorageError(f"staged part {name} of {self.uri} disappeared before it was published") from None
        except OSError as err:
            raise StorageError(f"cannot publish {self.uri_of(name)}: {err}") from None
        return self.uri_of(name)

    def staged_fences(self) -> list[str]:
        """Names of the staging directories present (one per run that staged parts here)."""
        try:
            self.fs.invalidate_cache(self.path_of(STAGING_DIR))
            entries = self.fs.ls(self.path_of(STAGING_DIR), detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as err:
            raise StorageError(f"cannot list {self.uri_of(STAGING_DIR)}: {err}") from None
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def remove_staging(self, keep: Fence | None = None) -> list[str]:
        """Delete the staging directories of every fence but ``keep``: parts of runs that lost or
        gave up the lease, which nothing publishes. Call only while holding the lease."""
        removed = []
        for fence_name in self.staged_fences():
            if keep is not None and fence_name == keep.name:
                continue
            directory = f"{self.path_of(STAGING_DIR)}/{fence_name}"
            if self._is_local:
                shutil.rmtree(directory, ignore_errors=True)
            else:  # one object at a time: ``rm(recursive=True)`` would read the path as a glob
                for key in self.fs.find(directory):
                    self._remove_path(key)
            removed.append(fence_name)
        if self._is_local and not self.staged_fences():  # object stores have no empty directories
            try:
                os.rmdir(self.path_of(STAGING_DIR))
            except OSError:
                pass  # absent, or a late writer just wrote into it: the next run removes it
        return removed

    # ---- cleanup of what shardwise wrote ------------------------------------------------

    def remove_own_parts(self, keep: set[str] = frozenset()) -> list[str]:
        """Delete shardwise's own parts whose names are not in ``keep``; foreign files stay."""
        removed = []
        for name in self.part_names():
            if name not in keep and self.owns_part(name):
                self._remove(name)
                removed.append(name)
        return removed

    def clear(self) -> None:
        """Remove what shardwise wrote here: ``_SUCCESS`` first, then its parts, then the manifest."""
        self.remove_success()
        self.remove_quality()
        self.remove_own_parts()
        self._remove(MANIFEST_NAME)
        self.remove_debris()

    def remove_debris(self) -> list[str]:
        """Temporary files, write probes, staged parts and unfinished multipart uploads that killed
        runs left.

        Call only while holding the lease: no live run of shardwise writes here then."""
        removed = [n for n in self.names() if n.startswith((TEMP_PREFIX, PROBE_PREFIX))]
        for name in removed:
            self._remove(name)
        removed += [f"{STAGING_DIR}/{f}" for f in self.remove_staging()]
        removed += self._abort_multipart_uploads()
        return removed

    def _abort_multipart_uploads(self) -> list[str]:
        if "s3" not in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)):
            return []
        bucket, _, key_prefix = self.root.partition("/")
        prefix = f"{key_prefix}/" if key_prefix else ""
        aborted = []
        try:
            listing = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
        except OSError as err:
            raise StorageError(f"cannot list unfinished uploads under {self.uri}: {err}") from None
        for upload in listing.get("Uploads") or []:
            name = upload["Key"][len(prefix) :]
            if not is_own_upload(name):
                continue  # not shardwise's: leave it to whoever started it
            self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            aborted.append(name)
        if aborted:
            logger.warning("aborted %d unfinished upload(s) of an interrupted run under %s", len(aborted), self.uri)
        return aborted

    # ---- the lease (its protocol: shardwise.tasks.storage.lease) -----------------------

    def read_lease(self) -> LeaseHolder | None:
        try:
            raw = self.fs.cat_file(self.path_of(LEASE_NAME))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except Exception as err:
            if not is_storage_failure(err):
                raise
            raise StorageError(f"cannot read {self.uri_of(LEASE_NAME)}: {type(err).__name__}: {err}") from None
        return holder_from_bytes(raw)

    def check_lease_free(self, timeout_s: float) -> None:
        """Raise :class:`ConfigError` naming the holder when a live run holds the lease."""
        holder = self.read_lease()
        if holder is not None and holder.is_live(timeout_s):
            raise ConfigError(
                f"output {self.uri} is in use by another run ({holder.describe()}); "
                f"wait for it, or for its lease to expire {timeout_s:.0f}s after its last renewal"
            )

    def check_fence(self, fence: Fence) -> None:
        """Raise :class:`StorageError` unless the lease file names ``fence`` (read from storage,
        right before a write that can become visible: a run whose lease was taken over, or that
        was paused past its timeout, must write nothing readers can see)."""
        holder = self.read_lease()
        if holder is None or holder.token != fence.token:
            raise LeaseLost(
                f"this run (epoch {fence.epoch}) no longer holds the lease on {self.uri} (held by "
                f"{holder.describe() if holder else 'nobody'}); nothing more of it is published"
            )

    def create_lease(self, holder: LeaseHolder) -> bool:
        """Create the lease file only if none exists (atomically); False when one does."""
        data = holder_bytes(holder)
        path = self.path_of(LEASE_NAME)
        if self._is_local:
            os.makedirs(self.root, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            return True
        try:
            self.fs.pipe_file(path, data, mode="create")  # S3: a conditional put (If-None-Match: *)
        except FileExistsError:
            return False
        return True

    def write_lease(self, holder: LeaseHolder) -> None:
        """Replace the lease file with ``holder`` (a renewal by the run that holds it)."""
        atomic_write_bytes(self.uri_of(LEASE_NAME), holder_bytes(holder), self.storage_options)

    def remove_lease(self, token: str) -> None:
        """Remove the lease file if it still names ``token`` (read right before the removal)."""
        current = self.read_lease()
        if current is not None and current.token == token:
            self._remove(LEASE_NAME)

    def acquire_lease(self, timeout_s: float, flow_run_id: str | None) -> Lease:
        """Take the lease, or take over (with a warning) one not renewed for ``timeout_s`` or whose
        holder's process on this host is gone (see :func:`shardwise.tasks.storage.lease.acquire`).

        Raises :class:`ConfigError` naming the holder when a live run has it."""
        return acquire(self, timeout_s, flow_run_id)


__all__ = ["OutputDir"]
