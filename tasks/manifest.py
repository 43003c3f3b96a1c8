"""The output directory's commit protocol: ``part-*.parquet``, ``_manifest.json``, then ``_SUCCESS``.

Readers should trust an output directory only when ``_SUCCESS`` exists: it is written last, after
every planned shard's part is published and the manifest lists them all. While a run is in
progress the manifest says ``running`` and lists the planned shards, so ``shardwise status`` can
report progress.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from prefect import task

from tasks.errors import StorageError
from tasks.faults import crash_point
from tasks.job_config import JobConfig
from tasks.planning import ShardPlan
from tasks.redaction import redact_values
from tasks.results import RunTotals, ShardResult
from tasks.retry_policy import retry_unless_bad_input
from tasks.storage import atomic_write_bytes, exists, filesystem, join, read_bytes

MANIFEST_NAME = "_manifest.json"
SUCCESS_NAME = "_SUCCESS"
MANIFEST_FORMAT = "shardwise-manifest/1"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _write_json(uri: str, data: dict[str, Any], storage_options: dict[str, Any]) -> None:
    data = redact_values(data)  # input URIs and error texts may hold credentials
    try:
        atomic_write_bytes(uri, json.dumps(data, indent=2, sort_keys=False, default=str).encode(), storage_options)
    except StorageError:
        raise
    except Exception as err:  # noqa: BLE001 - any backend failure is a storage failure here
        raise StorageError(f"cannot write {uri}: {type(err).__name__}: {err}") from None


def read_manifest(output: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    uri = join(output, MANIFEST_NAME)
    if not exists(uri, storage_options):
        return None
    return json.loads(read_bytes(uri, storage_options))


def start_output(cfg: JobConfig, plan: ShardPlan, run_info: dict[str, Any]) -> None:
    """Withdraw any old ``_SUCCESS`` and record the planned shards before any part is written."""
    success = join(cfg.output, SUCCESS_NAME)
    if exists(success, cfg.storage_options):
        fs, path = filesystem(success, cfg.storage_options)
        fs.rm_file(path)
    manifest = {
        "format": MANIFEST_FORMAT,
        "status": "running",
        "started_at": _now(),
        "updated_at": _now(),
        "config": cfg.public_dict(),
        "config_fingerprint": cfg.output_fingerprint(),
        **run_info,
        "input": plan.to_dict()["files"],
        "shards": [
            {**shard, "status": "pending"} for shard in plan.to_dict()["shards"]
        ],
    }
    _write_json(join(cfg.output, MANIFEST_NAME), manifest, cfg.storage_options)


def count_duplicate_ids(results: list[ShardResult]) -> int:
    """Rows whose id was already seen in an earlier row (so 3 copies of one id count 2)."""
    counts = Counter(i for r in results if r.status == "committed" for i in r.ids)
    return sum(c - 1 for c in counts.values() if c > 1)


@dataclass(frozen=True)
class CommitOutcome:
    succeeded: bool
    manifest_uri: str
    duplicate_ids: int
    totals: RunTotals


def commit_output(
    cfg: JobConfig, plan: ShardPlan, results: list[ShardResult], run_info: dict[str, Any]
) -> CommitOutcome:
    """Write the final manifest, then ``_SUCCESS`` only if every planned shard committed."""
    by_index = {r.index: r for r in results}
    shards = []
    for planned in plan.to_dict()["shards"]:
        result = by_index.get(planned["index"])
        entry = {**planned, "status": result.status if result else "missing"}
        if result is not None and result.status == "committed":
            entry.update(part=result.part_uri.rsplit("/", 1)[-1] if result.part_uri else None,
                         rows=result.rows, error_rows=result.error_rows,
                         bytes=result.part_bytes, sha256=result.part_sha256, worker=result.worker,
                         prompt_tokens=result.prompt_tokens, generated_tokens=result.generated_tokens,
                         reused=result.resumed)
        elif result is not None:
            entry["error"] = result.error
        shards.append(entry)
    totals = RunTotals.of(results, planned=len(plan.shards))
    succeeded = totals.committed == len(plan.shards) and not plan.unreadable
    duplicates = count_duplicate_ids(results)
    models: dict[str, Any] = {}
    for r in results:
        models.update(r.models)
    manifest = {
        "format": MANIFEST_FORMAT,
        "status": "succeeded" if succeeded else "failed",
        "updated_at": _now(),
        "config": cfg.public_dict(),
        "config_fingerprint": cfg.output_fingerprint(),
        **run_info,
        "models": models,
        "input": plan.to_dict()["files"],
        "unreadable_files": [{"uri": u.uri, "reason": u.reason} for u in plan.unreadable],
        "totals": {**totals.__dict__, "duplicate_ids": duplicates},
        "shards": shards,
    }
    manifest_uri = join(cfg.output, MANIFEST_NAME)
    crash_point("before-manifest")
    _write_json(manifest_uri, manifest, cfg.storage_options)
    if succeeded:
        remove_stray_parts(cfg, plan)
        crash_point("before-success")
        success = {"completed_at": _now(), "rows": totals.rows, "shards": totals.committed, **run_info}
        _write_json(join(cfg.output, SUCCESS_NAME), success, cfg.storage_options)
    return CommitOutcome(succeeded, manifest_uri, duplicates, totals)


def remove_stray_parts(cfg: JobConfig, plan: ShardPlan) -> list[str]:
    """Delete parts that belong to no planned shard (an earlier plan of changed input), so that
    ``part-*.parquet`` under a ``_SUCCESS`` holds each input row exactly once."""
    fs, root = filesystem(cfg.output, cfg.storage_options)
    planned = {s.part_name for s in plan.shards}
    stray = [p for p in fs.glob(f"{root.rstrip('/')}/part-*.parquet") if p.rsplit("/", 1)[-1] not in planned]
    for path in stray:
        fs.rm_file(path)
    return stray


@task(name="start-output", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_unless_bad_input)
def start_output_task(cfg: JobConfig, plan: ShardPlan, run_info: dict[str, Any]) -> None:
    start_output(cfg, plan, run_info)


@task(name="commit-output", retries=3, retry_delay_seconds=[2, 5, 10], retry_condition_fn=retry_unless_bad_input)
def commit_output_task(
    cfg: JobConfig, plan: ShardPlan, results: list[ShardResult], run_info: dict[str, Any]
) -> CommitOutcome:
    return commit_output(cfg, plan, results, run_info)


@dataclass(frozen=True)
class OutputStatus:
    output: str
    state: str  # "succeeded", "running", "failed", "empty" (no manifest), ...
    shards_total: int
    shards_done: int
    rows: int
    success: bool


def read_status(output: str, storage_options: dict[str, Any] | None = None) -> OutputStatus:
    """Progress of an output directory, from its manifest and the parts present."""
    try:
        manifest = read_manifest(output, storage_options)
        success = exists(join(output, SUCCESS_NAME), storage_options)
        fs, path = filesystem(output, storage_options)
        parts = {p.rsplit("/", 1)[-1] for p in fs.glob(f"{path.rstrip('/')}/part-*.parquet")}
    except OSError as err:
        raise StorageError(f"cannot read {output}: {err}") from None
    if manifest is None:
        return OutputStatus(output, "no manifest", 0, len(parts), 0, success)
    shards = manifest.get("shards", [])
    done = [s for s in shards if f"part-{s['shard_id']}.parquet" in parts]
    rows = sum(s.get("num_rows", 0) for s in done)
    return OutputStatus(output, manifest.get("status", "unknown"), len(shards), len(done), rows, success)
