"""The names shardwise gives the files of an output directory, and how it recognises its own.

Layout, all under one root::

    part-<shard id>.parquet   one per shard, published whole (never a partial object)
    _manifest.json            the plan while running; the per-shard outcome at commit
    _SUCCESS                  written last: only then is the directory complete
    _quality.json             the output's quality profile (see shardwise.tasks.quality.gate)
    _QUALITY_HOLD             instead of _SUCCESS when the quality gate holds the output
    _shardwise.lease          who is writing here now (host, pid, flow run, epoch), renewed while it lives
    _staging/<fence>/part-*   parts as workers write them, before the lease holder publishes them
    .tmp-*, .shardwise-write-probe-*   in-flight local writes and write checks (debris if killed)

A name of shardwise's shape is only a claim: a ``part-*`` file counts as shardwise's own when its
footer names that very shard too (:meth:`shardwise.tasks.storage.output_dir.OutputDir.owns_part`).
"""

from __future__ import annotations

import re

from shardwise.tasks.storage.fs import PROBE_PREFIX

MANIFEST_NAME = "_manifest.json"
SUCCESS_NAME = "_SUCCESS"
QUALITY_NAME = "_quality.json"
HOLD_NAME = "_QUALITY_HOLD"
LEASE_NAME = "_shardwise.lease"
STAGING_DIR = "_staging"
LINEAGE_PREFIX = "shardwise."  # footer keys of every part shardwise writes
_PART = re.compile(r"part-(?P<shard_id>[A-Za-z0-9_-]{1,48}-\d{10}-[0-9a-f]{10})\.parquet")


def part_name(shard_id: str) -> str:
    return f"part-{shard_id}.parquet"


def part_shard_id(name: str) -> str | None:
    """The shard id a file name claims, when it has the shape of a shardwise part."""
    match = _PART.fullmatch(name)
    return match["shard_id"] if match else None


def is_own_upload(name: str) -> bool:
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


__all__ = [
    "HOLD_NAME",
    "LEASE_NAME",
    "LINEAGE_PREFIX",
    "MANIFEST_NAME",
    "QUALITY_NAME",
    "STAGING_DIR",
    "SUCCESS_NAME",
    "is_own_upload",
    "part_name",
    "part_shard_id",
]
