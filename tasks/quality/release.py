"""Held outputs and their release: with ``gate: hold`` a failed check withholds ``_SUCCESS`` and
writes ``_QUALITY_HOLD`` instead, until :func:`release_output` publishes the output after a person
has looked, recording who released it, when and why."""

from __future__ import annotations

import getpass
import socket
import time
from typing import Any

from shardwise.tasks.errors import ConfigError, StorageError
from shardwise.tasks.storage.output_dir import OutputDir
from shardwise.tasks.storage.output_layout import HOLD_NAME, MANIFEST_NAME
from shardwise.tasks.tracking import mlflow_store


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_hold(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The output's ``_QUALITY_HOLD`` (why it is held), or None when it is not held."""
    exists, hold = OutputDir(uri, storage_options).read_json(HOLD_NAME)
    if not exists:
        return None
    return hold if isinstance(hold, dict) else {"message": "unreadable _QUALITY_HOLD"}


def releaser() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in this environment
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def release_output(
    uri: str, reason: str | None, storage_options: dict[str, Any] | None = None, lease_timeout_s: float = 300
) -> dict[str, Any]:
    """Publish a held output, all or nothing: check that it is held and complete, record the release
    (who, when, why) on the run's MLflow run, and only then publish it: the manifest records the
    release, ``_SUCCESS`` is written, ``_QUALITY_HOLD`` removed. A failure before publishing leaves
    the output held as it was, so the same command can simply be run again.

    Refuses (exit 2) an output that is not held, whose manifest lists no committed parts or a part
    that is missing, or whose MLflow run is not in this tracking store (another
    ``MLFLOW_TRACKING_URI`` than the run used); a tracking store that cannot be read or written is a
    storage error (exit 3)."""
    directory = OutputDir(uri, storage_options)
    hold = read_hold(uri, storage_options)
    if hold is None:
        raise ConfigError(f"{uri} is not held by the quality gate (it has no {HOLD_NAME})")
    directory.check_lease_free(lease_timeout_s)
    manifest = directory.read_manifest()
    if manifest is None or not _held_manifest(manifest):
        raise ConfigError(f"{uri}: its {MANIFEST_NAME} does not record a held run; rerun the job instead")
    _check_parts(directory, manifest)
    release = {
        "released_by": releaser(),
        "released_at": _now(),
        "reason": reason or "",
        "failed_checks": [c.get("check") for c in hold.get("failed_checks") or []],
    }
    if manifest.get("mlflow_run_id"):
        _record_release(manifest["mlflow_run_id"], release)
    # Published from here on: the manifest first, then _SUCCESS, then the hold goes. A release cut
    # short in between leaves the hold in place and is finished by running it again.
    manifest = {**manifest, "status": "succeeded", "quality": {**(manifest.get("quality") or {}), "release": release}}
    directory.write_json(MANIFEST_NAME, manifest)
    totals = manifest.get("totals") or {}
    run_info = {k: manifest[k] for k in ("mlflow_run_id", "prefect_flow_run_id") if k in manifest}
    directory.write_success(
        {
            "completed_at": _now(),
            "rows": totals.get("rows"),
            "shards": totals.get("committed"),
            **run_info,
            "released": release,
        }
    )
    directory.remove_hold()
    return release


def _held_manifest(manifest: dict[str, Any]) -> bool:
    """The manifest of a held run, or of one whose release stopped after recording itself in the
    manifest (the hold is still there): both are released by running ``release`` again."""
    if manifest.get("status") == "held":
        return True
    return manifest.get("status") == "succeeded" and bool((manifest.get("quality") or {}).get("release"))


def _check_parts(directory: OutputDir, manifest: dict[str, Any]) -> None:
    """Every shard the manifest lists is committed and its part is there; at least one is."""
    nothing = "nothing was published"
    shards = [s for s in manifest.get("shards") or [] if isinstance(s, dict)]
    parts = [s.get("part") for s in shards if s.get("status") == "committed" and s.get("part")]
    if not parts:
        raise ConfigError(f"{directory.uri}: its {MANIFEST_NAME} lists no committed parts; {nothing}")
    if len(parts) < len(shards):
        raise ConfigError(
            f"{directory.uri}: {len(shards) - len(parts)} of the {len(shards)} shards its {MANIFEST_NAME} "
            f"lists have no committed part; {nothing} (rerun the job)"
        )
    present = set(directory.names())
    missing = [p for p in parts if p not in present]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ConfigError(
            f"{directory.uri}: {len(missing)} of the {len(parts)} parts its {MANIFEST_NAME} lists are missing "
            f"({', '.join(missing[:3])}{more}); {nothing} (rerun the job to redo them)"
        )


def _record_release(run_id: str, release: dict[str, Any]) -> None:
    """The release as ``shardwise.quality.released_*`` tags on the run's MLflow run; raises, naming
    the run and the (redacted) tracking URI, when the run is not there or cannot be written."""
    from shardwise.tasks.redaction import redact_text, redact_uri
    from shardwise.tasks.storage.local_state import tracking_uri

    where = f"MLflow run {run_id} in the tracking store {redact_uri(tracking_uri())}"
    unpublished = "nothing was published; release again once it"
    try:
        run = mlflow_store.find_run(run_id)
    except Exception as err:  # noqa: BLE001 - the store cannot be reached or refused the request
        raise StorageError(f"cannot read {where}: {_one_line(err)}; {unpublished} can be read") from None
    if run is None:
        raise ConfigError(
            f"{where}: not found; nothing was published (set MLFLOW_TRACKING_URI to the store "
            "the run used, then release again)"
        )
    if run.lifecycle_stage == "deleted":
        raise ConfigError(f"{where} is deleted; nothing was published (restore it, then release again)")
    tags = {
        f"shardwise.quality.{key}": redact_text(str(release[key])) for key in ("released_by", "released_at", "reason")
    }
    try:
        mlflow_store.log_values(run_id, tags=tags)
    except Exception as err:  # noqa: BLE001 - MlflowException or a failure to reach the store
        raise StorageError(
            f"cannot record the release on {where}: {_one_line(err)}; {unpublished} can be written"
        ) from None


def _one_line(err: Exception) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


__all__ = ["read_hold", "release_output"]
