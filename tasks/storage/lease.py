"""The lease on an output directory: which run writes there now, and the fence its writes carry.

Fencing: every run that takes the lease gets a higher *epoch* and a fresh token (its
:class:`Fence`). Workers never write a ``part-*`` at the root: they stage it under
``_staging/<fence>/``, and only the lease holder's own process moves it to the root, after
reading the lease and finding its own token there. A worker that outlives its run (its parent
was killed, or the whole run was paused past the lease timeout) can only ever add files under
its dead fence's staging directory, which no run publishes and the next run removes.

The lease file holds its :class:`LeaseHolder` as JSON. It is created only where none exists, renewed
by the holder every quarter of the timeout, and taken over (with a warning) once it has not been
renewed for the timeout or its holder's process on this host is gone. This module never touches
storage itself: it reads and writes the lease file through the output directory's one owner,
:class:`~shardwise.tasks.storage.output_dir.OutputDir` (seen here as a :class:`LeaseFile`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, Protocol

from shardwise.tasks.errors import ConfigError, StorageError

logger = logging.getLogger("shardwise.output")


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


def recorded_epoch(manifest: dict[str, Any] | None) -> int:
    """The lease epoch a manifest records (0 when none, or not a number)."""
    try:
        return int((manifest or {}).get("lease_epoch") or 0)
    except (TypeError, ValueError):
        return 0


def holder_bytes(holder: LeaseHolder) -> bytes:
    """The lease file's content for ``holder``."""
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


def holder_from_bytes(raw: bytes) -> LeaseHolder:
    """The holder a lease file names; an unreadable file names a holder that is stale at once."""
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


class LeaseFile(Protocol):
    """The lease file of one output directory, as its owner reads and writes it."""

    uri: str

    def read_lease(self) -> LeaseHolder | None: ...

    def read_manifest(self) -> dict[str, Any] | None: ...

    def create_lease(self, holder: LeaseHolder) -> bool: ...

    def write_lease(self, holder: LeaseHolder) -> None: ...

    def remove_lease(self, token: str) -> None: ...

    def check_lease_free(self, timeout_s: float) -> None: ...

    def check_fence(self, fence: Fence) -> None: ...


class OutputWatch:
    """Whether a run can still publish: asked after a shard fails, it reads the lease once. When
    that read fails (the output's storage does not answer) or names another run, ``lost`` says
    why, and the run starts no more shards, since none of them could be published."""

    def __init__(self, directory: LeaseFile, fence: Fence) -> None:
        self.directory, self.fence = directory, fence
        self.lost: str | None = None

    def check(self) -> None:
        if self.lost is not None:
            return
        try:
            self.directory.check_fence(self.fence)
        except StorageError as err:
            self.lost = f"stopped starting shards: {err}"


def acquire(directory: LeaseFile, timeout_s: float, flow_run_id: str | None) -> Lease:
    """Take the lease of ``directory``, or take over (with a warning) one not renewed for
    ``timeout_s`` or whose holder's process on this host is gone.

    The new holder's epoch is one more than the highest one recorded there (the lease it takes
    over, or the manifest of the last run), so epochs only grow on an output.

    Raises :class:`ConfigError` naming the holder when a live run has it."""
    token = uuid.uuid4().hex
    last = 0  # the highest epoch seen, kept across a takeover's removal of the old lease
    for _ in range(3):
        holder = directory.read_lease()
        manifest = directory.read_manifest()
        last = max(last, holder.epoch if holder else 0, recorded_epoch(manifest))
        me = LeaseHolder(socket.gethostname(), os.getpid(), flow_run_id, token, time.time(), last + 1)
        if directory.create_lease(me):
            return Lease(directory, me, timeout_s)
        holder = directory.read_lease()
        if holder is None:
            continue  # released between our create and our read
        if holder.is_live(timeout_s):
            directory.check_lease_free(timeout_s)
        reason = "whose process is gone" if holder.is_dead_here() else "that stopped renewing it"
        logger.warning("taking over the lease on %s from a run %s (%s)", directory.uri, reason, holder.describe())
        directory.remove_lease(holder.token)
    directory.check_lease_free(timeout_s)
    raise ConfigError(f"output {directory.uri}: could not take its lease; try again")


class Lease:
    """A held lease, renewed by a background thread until :meth:`release`."""

    def __init__(self, output: LeaseFile, holder: LeaseHolder, timeout_s: float) -> None:
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
                self.output.write_lease(self.holder)
            except Exception as err:  # noqa: BLE001 - a storage hiccup; the next renewal retries
                logger.warning("could not renew the lease on %s: %s", self.output.uri, err)

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        try:
            self.output.remove_lease(self.holder.token)
        except Exception as err:  # noqa: BLE001 - it expires on its own
            logger.warning("could not release the lease on %s: %s", self.output.uri, err)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


__all__ = [
    "Fence",
    "Lease",
    "LeaseFile",
    "LeaseHolder",
    "acquire",
    "holder_bytes",
    "holder_from_bytes",
    "recorded_epoch",
]
