"""The commit protocol over an :class:`~shardwise.tasks.storage.output_dir.OutputDir`: parts, the manifest, then ``_SUCCESS``.

Readers should trust an output directory only when ``_SUCCESS`` exists: it is written last, after
every planned shard's part is published, confirmed to be the very part this run wrote or verified
(its footer's write id), and listed in the manifest. While a run is in progress the manifest says
``running`` and lists the planned shards, so ``shardwise status`` can report progress.

Every write here that readers can see (the manifest, a part moved out of staging, ``_SUCCESS``)
is preceded by a check that this run's :class:`~shardwise.tasks.storage.lease.Fence` still holds the
lease, so a run that lost it publishes nothing more.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.errors import StorageError
from shardwise.tasks.faults import crash_point
from shardwise.tasks.output.empty import EMPTY_SHARD_ID, write_empty_part
from shardwise.tasks.output.verdict import QualityVerdict, write_verdict
from shardwise.tasks.planning.shards import ShardPlan
from shardwise.tasks.records.results import RunTotals, ShardResult
from shardwise.tasks.storage.lease import Fence
from shardwise.tasks.storage.output_dir import OutputDir
from shardwise.tasks.storage.output_layout import MANIFEST_NAME, part_name

MANIFEST_FORMAT = "shardwise-manifest/1"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_manifest(output: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The output's manifest; None when absent or unparseable (see :meth:`OutputDir.read_manifest`)."""
    return OutputDir(output, storage_options).read_manifest()


def start_output(cfg: JobConfig, plan: ShardPlan, run_info: dict[str, Any], fence: Fence) -> None:
    """Withdraw any old ``_SUCCESS`` and record the planned shards before any part is written."""
    output = OutputDir(cfg.output, cfg.storage_options)
    output.check_fence(fence)
    output.remove_success()
    output.remove_quality()  # this run's verdict replaces any earlier one
    manifest = {
        "format": MANIFEST_FORMAT,
        "status": "running",
        "started_at": _now(),
        "updated_at": _now(),
        "config": cfg.public_dict(),
        "config_fingerprint": cfg.output_fingerprint(),
        **run_info,
        "models": cfg.models_section(),
        "input": plan.to_dict()["files"],
        "shards": [{**shard, "status": "pending"} for shard in plan.to_dict()["shards"]],
    }
    output.write_json(MANIFEST_NAME, manifest)


def count_duplicate_ids(results: list[ShardResult]) -> int:
    """Rows whose id was already seen in an earlier row (so 3 copies of one id count 2)."""
    chunks = [chunk for r in results if r.status == "committed" for chunk in r.ids.chunks() if len(chunk)]
    if not chunks:
        return 0
    try:
        ids = pa.chunked_array(chunks)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # id types differ between input files
        counts = Counter(i for chunk in chunks for i in chunk.to_pylist())
        return sum(c - 1 for c in counts.values() if c > 1)
    return len(ids) - pc.count_distinct(ids, mode="all").as_py()


@dataclass(frozen=True)
class CommitOutcome:
    succeeded: bool
    manifest_uri: str
    duplicate_ids: int
    totals: RunTotals
    results: list[ShardResult] = field(default_factory=list)  # as confirmed at commit
    held: bool = False  # complete, but the quality gate withheld _SUCCESS (see shardwise.tasks.quality.gate)
    # The final manifest as written: JSON text, which Prefect does not walk as it does a dict's
    # every shard entry when the outcome is handed to the report task.
    manifest_json: str = ""

    def manifest(self) -> dict[str, Any] | None:
        """The final manifest this commit wrote (None when it wrote none)."""
        return json.loads(self.manifest_json) if self.manifest_json else None


def final_manifest(
    cfg: JobConfig, plan: ShardPlan, results: list[ShardResult], run_info: dict[str, Any]
) -> tuple[dict[str, Any], RunTotals, int]:
    """The manifest of a finished run, its totals and its duplicate-id count."""
    by_index = {r.index: r for r in results}
    shards = []
    for planned in plan.to_dict()["shards"]:
        result = by_index.get(planned["index"])
        entry = {**planned, "status": result.status if result else "missing"}
        if result is not None and result.status == "committed":
            part = result.part
            entry.update(
                part=part.name if part else None,
                rows=result.rows,
                error_rows=result.error_rows,
                bytes=part.bytes if part else 0,
                sha256=part.sha256 if part else None,
                write_id=part.write_id if part else None,
                worker=result.worker.name,
                prompt_tokens=result.tokens.prompt,
                generated_tokens=result.tokens.generated,
                reused=result.resumed,
                rows_cached=result.rows_cached,
            )
        elif result is not None:
            entry["error"] = result.error
        shards.append(entry)
    totals = RunTotals.of(results, planned=len(plan.shards))
    succeeded = totals.committed == len(plan.shards) and not plan.unreadable
    duplicates = count_duplicate_ids(results)
    models: dict[str, Any] = cfg.models_section()
    for r in results:
        for role, info in r.models.items():
            models[role] = {**info, **models.get(role, {})}
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
        # exactly the parts this run published or verified: what a reader of the output should read
        "parts": [s["part"] for s in shards if s.get("part")],
    }
    return manifest, totals, duplicates


def publish_part(cfg: JobConfig, fence: Fence, result: ShardResult) -> ShardResult:
    """A committed shard's part moved from the run's staging directory to the output, if ``fence``
    still holds the lease; a part that cannot be published makes the shard failed (with why)."""
    if result.status != "committed" or result.resumed or result.part is None:
        return result
    output = OutputDir(cfg.output, cfg.storage_options)
    try:
        uri = output.publish_staged(fence, result.part.name)
    except StorageError as err:
        return replace(result, status="failed", error=str(err))
    return replace(result, part=replace(result.part, uri=uri))


def commit_output(
    cfg: JobConfig,
    plan: ShardPlan,
    results: list[ShardResult],
    run_info: dict[str, Any],
    fence: Fence,
    verdict: QualityVerdict | None = None,
) -> CommitOutcome:
    """Write the final manifest, then ``_SUCCESS`` only if every planned shard committed and the
    quality ``verdict`` (when given) does not hold the output: then ``_QUALITY_HOLD`` instead.

    Raises :class:`StorageError` when ``fence`` no longer holds the output's lease (another run
    took it over): then nothing more is written. A part that is no longer the one this run wrote
    or verified counts as failed; parts are checked before the manifest is written and again
    right before ``_SUCCESS``."""
    output = OutputDir(cfg.output, cfg.storage_options)
    output.check_fence(fence)
    crash_point("before-manifest")
    results = confirm_parts(output, results)
    manifest, totals, duplicates = final_manifest(cfg, plan, results, run_info)
    succeeded = manifest["status"] == "succeeded"
    held = succeeded and verdict is not None and verdict.held
    if succeeded and verdict is not None:
        manifest.update(status="held" if held else "succeeded", quality=verdict.summary())
    if succeeded and not plan.shards:
        manifest["empty_part"] = part_name(EMPTY_SHARD_ID)
    output.check_fence(fence)
    written = output.write_json(MANIFEST_NAME, manifest)
    if succeeded:
        remove_stray_parts(cfg, plan)
        if not plan.shards:  # an input with no rows, allowed: one zero-row part readers can open
            write_empty_part(cfg, plan, {k: str(v) for k, v in run_info.items() if v})
        crash_point("before-success")
        rechecked = confirm_parts(output, results)
        if rechecked != results:  # replaced while the manifest was written
            results = rechecked
            manifest, totals, duplicates = final_manifest(cfg, plan, results, run_info)
            output.check_fence(fence)
            written = output.write_json(MANIFEST_NAME, manifest)
            succeeded = held = False
        else:
            output.check_fence(fence)
            if verdict is not None:
                write_verdict(output, verdict, run_info)
            if not held:
                success = {"completed_at": _now(), "rows": totals.rows, "shards": totals.committed, **run_info}
                output.write_success(success)
    output.remove_staging()  # this run's staging is empty now; any other one is a dead run's
    return CommitOutcome(
        succeeded and not held, output.uri_of(MANIFEST_NAME), duplicates, totals, results, held, manifest_json=written
    )


def unchanged_outcome(
    output: OutputDir, plan: ShardPlan, results: list[ShardResult], manifest: dict[str, Any]
) -> CommitOutcome:
    """The outcome of a run that found its output already published as it would publish it
    (see :func:`shardwise.tasks.output.resume.published_manifest`): nothing is written."""
    totals = RunTotals.of(results, planned=len(plan.shards))
    duplicates = int((manifest.get("totals") or {}).get("duplicate_ids") or 0)
    return CommitOutcome(
        True, output.uri_of(MANIFEST_NAME), duplicates, totals, results, manifest_json=json.dumps(manifest)
    )


def confirm_parts(output: OutputDir, results: list[ShardResult]) -> list[ShardResult]:
    """Each committed result, failed instead when its part's footer no longer carries the write id
    this run recorded: a late zombie part never sits under this run's ``_SUCCESS``."""
    confirmed = []
    for result in results:
        if result.status == "committed":
            name = result.part.name if result.part else ""
            try:
                found: str | None = output.part_lineage(name).get("part_write_id")
            except FileNotFoundError:
                found = "missing"
            expected = result.part.write_id if result.part else None
            if found != expected:  # both None: a part of an older version, unchanged
                what = "disappeared" if found == "missing" else "was replaced by another writer"
                result = replace(
                    result,
                    status="failed",
                    error=f"{name} {what} after this run wrote or verified it "
                    "(a late worker of an earlier run?); rerun to verify it",
                )
        confirmed.append(result)
    return confirmed


def remove_stray_parts(cfg: JobConfig, plan: ShardPlan) -> list[str]:
    """Delete shardwise's own parts that belong to no planned shard (an earlier plan of changed
    input), so that the parts under a ``_SUCCESS`` hold each input row exactly once. Files that
    shardwise did not write are never touched."""
    output = OutputDir(cfg.output, cfg.storage_options)
    return output.remove_own_parts(keep={s.part_name for s in plan.shards})


@dataclass(frozen=True)
class OutputStatus:
    output: str
    state: str  # "succeeded", "running", "interrupted", "failed", "held", "no manifest", ...
    shards_total: int
    shards_done: int
    rows: int
    success: bool
    unlisted: tuple[str, ...] = ()  # part files of no shard the manifest lists
    replaced: tuple[str, ...] = ()  # listed parts whose footer's write id is not the one listed
    holder: str | None = None  # the live run writing it, while ``state`` is "running"

    @property
    def as_published(self) -> bool:
        """True when the parts present are exactly those the manifest describes."""
        return not self.unlisted and not self.replaced


def read_status(output: str, storage_options: dict[str, Any] | None = None) -> OutputStatus:
    """Progress of an output directory, from its manifest and the parts present; with it, any
    part file the manifest does not list and any listed part whose footer carries another write
    id than the manifest records (a part some other writer put there)."""
    directory = OutputDir(output, storage_options)
    try:
        manifest = directory.read_manifest()
        success = directory.has_success()
        parts = set(directory.part_names())
    except OSError as err:
        raise StorageError(f"cannot read {output}: {err}") from None
    if manifest is None:
        return OutputStatus(output, "no manifest", 0, len(parts), 0, success)
    shards = [s for s in manifest.get("shards", []) if isinstance(s, dict)]
    done = [s for s in shards if part_name(s["shard_id"]) in parts]
    rows = sum(s.get("num_rows", 0) for s in done)
    unlisted = sorted(parts - {part_name(s["shard_id"]) for s in shards} - {manifest.get("empty_part")})
    replaced = []
    for entry in done:
        if entry.get("write_id"):
            name = part_name(entry["shard_id"])
            try:
                found = directory.part_lineage(name).get("part_write_id")
            except FileNotFoundError:
                continue  # removed since the listing: counted as not done next time
            except OSError as err:
                raise StorageError(f"cannot read {directory.uri_of(name)}: {err}") from None
            except Exception:  # noqa: BLE001 - unreadable footer: not the part that was published
                found = None
            if found != entry["write_id"]:
                replaced.append(name)
    state, holder = manifest.get("status", "unknown"), None
    if state == "running":
        state, holder = _running_or_interrupted(directory)
    return OutputStatus(
        output,
        state,
        len(shards),
        len(done),
        rows,
        success,
        tuple(unlisted),
        tuple(replaced),
        holder,
    )


def _running_or_interrupted(directory: OutputDir) -> tuple[str, str | None]:
    """A manifest says "running" from a run's start until its end: "running" (and by whom) while
    a live run holds the lease, else "interrupted" (stopped by Ctrl-C, SIGTERM or a kill, or its
    lease not renewed for the default lease timeout)."""
    from shardwise.tasks.config.job import JobConfig

    holder = directory.read_lease()
    timeout_s = JobConfig.model_fields["lease_timeout_s"].default
    if holder is None or not holder.is_live(timeout_s):
        return "interrupted", None
    return "running", holder.describe()
