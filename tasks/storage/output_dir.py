"""The one owner of an output directory: what shardwise writes there, and what it may remove.

Layout, all under one root::

    part-<shard id>.parquet   one per shard, published whole (never a partial object)
    _manifest.json            the plan while running; the per-shard outcome at commit
    _SUCCESS                  written last: only then is the directory complete
    _quality.json             the output's quality profile (see shardwise.tasks.quality.gate)
    _QUALITY_HOLD             instead of _SUCCESS when the quality gate holds the output
    _shardwise.lease          who is writing here now (host, pid, flow run, epoch), renewed while it lives
    _staging/<fence>/part-*   parts as workers write them, before the lease holder publishes them
    .tmp-*, .shardwise-write-probe-*   in-flight local writes and write checks (debris if killed)

Fencing: every run that takes the lease gets a higher *epoch* and a fresh token (its
:class:`Fence`). Workers never write a ``part-*`` at the root: they stage it under
``_staging/<fence>/``, and only the lease holder's own process moves it to the root, after
reading the lease and finding its own token there. A worker that outlives its run (its parent
was killed, or the whole run was paused past the lease timeout) can only ever add files under
its dead fence's staging directory, which no run publishes and the next run removes.

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
import posixpath
import re
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from shardwise.tasks.errors import ConfigError, LeaseLost, StorageError
from shardwise.tasks.redaction import redact_values
from shardwise.tasks.storage.fs import PROBE_PREFIX, TEMP_PREFIX, atomic_write_bytes, filesystem, join

MANIFEST_NAME = "_manifest.json"
SUCCESS_NAME = "_SUCCESS"
QUALITY_NAME = "_quality.json"
HOLD_NAME = "_QUALITY_HOLD"
LEASE_NAME = "_shardwise.lease"
STAGING_DIR = "_staging"
LINEAGE_PREFIX = "shardwise."  # footer keys of every part shardwise writes
_PART = re.compile(r"part-(?P<shard_id>[A-Za-z0-9_-]{1,48}-\d{10}-[0-9a-f]{10})\.parquet")

logger = logging.getLogger("shardwise.output")


def part_name(shard_id: str) -> str:
    return f"part-{shard_id}.parquet"


def part_shard_id(name: str) -> str | None:
    """The shard id a file name claims, when it has the shape of a shardwise part."""
    match = _PART.fullmatch(name)
    return match["shard_id"] if match else None


def _normalised(uri: str, storage_options: dict[str, Any] | None) -> tuple[tuple[str, ...], str]:
    fs, path = filesystem(uri, storage_options)
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if isinstance(fs, LocalFileSystem):
        path = os.path.normpath(os.path.abspath(path))
    else:
        path = posixpath.normpath("/" + path.strip("/")).lstrip("/")
    return protocol, path.rstrip("/") or "/"


def _literal_root(uri: str) -> str:
    """A glob input's fixed directory (``in/2024-*/x.parquet`` -> ``in``); other URIs as they are."""
    head = re.split(r"[*?\[]", uri, maxsplit=1)[0]
    return head if head == uri else head.rsplit("/", 1)[0] or "/"


def check_separate(
    input_uri: str, output_uri: str, storage_options: dict[str, Any] | None = None, input_is_pattern: bool = False
) -> None:
    """Refuse an output that is the input, lies inside it, or contains it: a run must never
    write into (or clean) the data it reads. Paths are compared literally after normalising."""
    source = _literal_root(input_uri) if input_is_pattern else input_uri
    in_proto, in_path = _normalised(source, storage_options)
    out_proto, out_path = _normalised(output_uri, storage_options)
    if set(in_proto).isdisjoint(out_proto):
        return

    def inside(child: str, parent: str) -> bool:
        return child == parent or child.startswith(parent.rstrip("/") + "/")

    if inside(out_path, in_path) or inside(in_path, out_path):
        relation = (
            "is the input"
            if in_path == out_path
            else "is inside the input"
            if inside(out_path, in_path)
            else "contains the input"
        )
        raise ConfigError(f"output {output_uri} {relation} {input_uri}: choose an output outside the input")


def location_relation(
    uri: str, other_uri: str, storage_options: dict[str, Any] | None = None, other_is_pattern: bool = False
) -> str | None:
    """How location ``uri`` lies towards ``other_uri``: ``"is"``, ``"is inside"``, ``"contains"``,
    or None when they do not overlap (another store, or apart). Compared as :func:`check_separate`
    compares: literally after normalising, a glob by its fixed directory."""
    other = _literal_root(other_uri) if other_is_pattern else other_uri
    proto, path = _normalised(uri, storage_options)
    other_proto, other_path = _normalised(other, storage_options)
    if set(proto).isdisjoint(other_proto):
        return None

    def inside(child: str, parent: str) -> bool:
        return child == parent or child.startswith(parent.rstrip("/") + "/")

    if path == other_path:
        return "is"
    if inside(path, other_path):
        return "is inside"
    if inside(other_path, path):
        return "contains"
    return None


def recorded_epoch(manifest: dict[str, Any] | None) -> int:
    """The lease epoch a manifest records (0 when none, or not a number)."""
    try:
        return int((manifest or {}).get("lease_epoch") or 0)
    except (TypeError, ValueError):
        return 0


@dataclass(frozen=True)
class Fence:
    """A lease holder's identity for writes: its epoch (grows with every run that takes the lease)
    and its token (unique to that run). Writes that can become visible check it first."""

    epoch: int
    token: str

    @property
    def name(self) -> str:
        """The staging directory of this fence's parts (``_staging/<name>/``)."""
        return f"epoch-{self.epoch:06d}-{self.token[:12]}"


def _is_own_upload(name: str) -> bool:
    """True for an upload shardwise starts under an output: a part (staged or published), a
    marker, the manifest or a write probe; ``name`` is relative to the output's root."""
    staged = name.split("/")
    if len(staged) == 3 and staged[0] == STAGING_DIR:
        return part_shard_id(staged[2]) is not None
    return "/" not in name and (
        part_shard_id(name) is not None
        or name in (MANIFEST_NAME, SUCCESS_NAME, QUALITY_NAME, HOLD_NAME)
        or name.startswith(PROBE_PREFIX)
    )


@dataclass(frozen=True)
class LeaseHolder:
    host: str
    pid: int
    flow_run_id: str | None
    token: str
    renewed_at: float
    epoch: int = 0

    @property
    def fence(self) -> Fence:
        return Fence(self.epoch, self.token)

    def is_dead_here(self) -> bool:
        """True when the holder ran on this host and its process is gone (killed, crashed): its
        lease is stale now, whatever its age."""
        if self.host != socket.gethostname() or self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def is_live(self, timeout_s: float) -> bool:
        return time.time() - self.renewed_at <= timeout_s and not self.is_dead_here()

    def describe(self) -> str:
        age = time.time() - self.renewed_at
        return (
            f"host {self.host}, pid {self.pid}, flow run {self.flow_run_id or '-'}, epoch {self.epoch}, "
            f"renewed {age:.0f}s ago"
        )


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
            if not _is_own_upload(name):
                continue  # not shardwise's: leave it to whoever started it
            self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            aborted.append(name)
        if aborted:
            logger.warning("aborted %d unfinished upload(s) of an interrupted run under %s", len(aborted), self.uri)
        return aborted

    # ---- the lease ----------------------------------------------------------------------

    def read_lease(self) -> LeaseHolder | None:
        try:
            raw = self.fs.cat_file(self.path_of(LEASE_NAME))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as err:
            raise StorageError(f"cannot read {self.uri_of(LEASE_NAME)}: {err}") from None
        try:
            data = json.loads(raw)
            return LeaseHolder(
                data["host"],
                int(data["pid"]),
                data.get("flow_run_id"),
                data["token"],
                float(data["renewed_at"]),
                int(data.get("epoch", 0)),
            )
        except (ValueError, KeyError, TypeError):
            # Half-written by a local writer killed between create and write: stale at once.
            return LeaseHolder("?", 0, None, "unreadable", 0.0)

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

    def _lease_bytes(self, holder: LeaseHolder) -> bytes:
        return json.dumps(
            {
                "host": holder.host,
                "pid": holder.pid,
                "flow_run_id": holder.flow_run_id,
                "token": holder.token,
                "renewed_at": holder.renewed_at,
                "epoch": holder.epoch,
            }
        ).encode()

    def _create_lease(self, holder: LeaseHolder) -> bool:
        """Create the lease file only if none exists (atomically); False when one does."""
        data = self._lease_bytes(holder)
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

    def acquire_lease(self, timeout_s: float, flow_run_id: str | None) -> Lease:
        """Take the lease, or take over (with a warning) one not renewed for ``timeout_s`` or whose
        holder's process on this host is gone.

        The new holder's epoch is one more than the highest one recorded here (the lease it takes
        over, or the manifest of the last run), so epochs only grow on an output.

        Raises :class:`ConfigError` naming the holder when a live run has it."""
        token = uuid.uuid4().hex
        last = 0  # the highest epoch seen, kept across a takeover's removal of the old lease
        for _ in range(3):
            holder = self.read_lease()
            manifest = self.read_manifest()
            last = max(last, holder.epoch if holder else 0, recorded_epoch(manifest))
            me = LeaseHolder(socket.gethostname(), os.getpid(), flow_run_id, token, time.time(), last + 1)
            if self._create_lease(me):
                return Lease(self, me, timeout_s)
            holder = self.read_lease()
            if holder is None:
                continue  # released between our create and our read
            if holder.is_live(timeout_s):
                self.check_lease_free(timeout_s)
            reason = "whose process is gone" if holder.is_dead_here() else "that stopped renewing it"
            logger.warning("taking over the lease on %s from a run %s (%s)", self.uri, reason, holder.describe())
            current = self.read_lease()
            if current is not None and current.token == holder.token:
                self._remove(LEASE_NAME)
        self.check_lease_free(timeout_s)
        raise ConfigError(f"output {self.uri}: could not take its lease; try again")


class Lease:
    """A held lease, renewed by a background thread until :meth:`release`."""

    def __init__(self, output: OutputDir, holder: LeaseHolder, timeout_s: float) -> None:
        self.output, self.holder, self.timeout_s = output, holder, timeout_s
        self.fence = holder.fence
        self.lost_to: LeaseHolder | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name="shardwise-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.timeout_s / 4):
            try:
                current = self.output.read_lease()
                if current is None or current.token != self.holder.token:
                    self.lost_to = current
                    logger.error(
                        "lost the lease on %s to %s",
                        self.output.uri,
                        current.describe() if current else "nobody (it was removed)",
                    )
                    return
                self.holder = replace(self.holder, renewed_at=time.time())
                atomic_write_bytes(
                    self.output.uri_of(LEASE_NAME), self.output._lease_bytes(self.holder), self.output.storage_options
                )
            except Exception as err:  # noqa: BLE001 - a storage hiccup; the next renewal retries
                logger.warning("could not renew the lease on %s: %s", self.output.uri, err)

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        try:
            current = self.output.read_lease()
            if current is not None and current.token == self.holder.token:
                self.output._remove(LEASE_NAME)
        except Exception as err:  # noqa: BLE001 - it expires on its own
            logger.warning("could not release the lease on %s: %s", self.output.uri, err)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


__all__ = [
    "STAGING_DIR",
    "Fence",
    "HOLD_NAME",
    "LEASE_NAME",
    "MANIFEST_NAME",
    "QUALITY_NAME",
    "SUCCESS_NAME",
    "Lease",
    "LeaseHolder",
    "OutputDir",
    "check_separate",
    "location_relation",
    "part_name",
    "part_shard_id",
]
