"""The quality gate: a profile of every output, compared with a baseline before it is published.

Batch LLM outputs regress silently (an engine upgrade, a new model revision, a prompt edit), so
every run measures what it wrote and compares it with the last published output of the same job:

- each shard measures its own rows while it writes them (:func:`shard_profile`; kept in the
  ``ShardResult``, the manifest and the part's footer, so a resumed part keeps its figures) and the
  commit merges them (:func:`merge_profiles`): no second pass over the data;
- canary rows (``quality.canaries``), a fixed file run greedily with every job, whose answers must
  not change from one night to the next;
- the baseline (:func:`find_baseline`): ``quality.baseline``, else for a dated run the latest
  earlier partition of the job that was published (``_SUCCESS``) with a profile;
- checks (:func:`run_checks`) with the thresholds of ``quality:``; with ``gate: hold`` a failed
  check withholds ``_SUCCESS`` and writes ``_QUALITY_HOLD`` instead, until
  :func:`release_output` publishes it after a person has looked.
"""

from __future__ import annotations

import datetime as dt
import getpass
import math
import re
import socket
import time
from typing import TYPE_CHECKING, Any

from prefect import task

from shardwise.tasks.config.output_columns import collision_message
from shardwise.tasks.config.quality import QualityConfig
from shardwise.tasks.errors import ConfigError, StorageError
from shardwise.tasks.output.verdict import CheckResult, QualityVerdict
from shardwise.tasks.records.profile import merge_profiles
from shardwise.tasks.storage.output_dir import HOLD_NAME, MANIFEST_NAME, QUALITY_NAME, SUCCESS_NAME, OutputDir

if TYPE_CHECKING:
    import pyarrow as pa

    from shardwise.tasks.config.job import JobConfig
    from shardwise.tasks.records.results import ShardResult

PROFILE_FORMAT = "shardwise-quality/1"
# Canary prompts print this date where a chat template prints one, so their answers do not
# change with the calendar.
CANARY_CHAT_DATE = "2026-01-01"
CANARY_COSINE_TOLERANCE = 1e-4  # embeddings of the same text on the same weights agree far closer
_PARTITION_DIR = re.compile(r"dt=(\d{4}-\d{2}-\d{2})")
_MAX_TEMPLATE_DAYS_BACK = 92  # a {date} output is probed day by day, this far back at most


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---- the profile ------------------------------------------------------------------------------


def run_context(cfg: JobConfig, results: list[ShardResult]) -> dict[str, Any]:
    """What produced the output (settings, weights, prompt, engine): shown next to a failed check,
    so a person can tell a change made on purpose from one that was not."""
    from shardwise.tasks.tracking.runs import prompt_hash

    engines = {}
    for r in results:
        for role, info in r.models.items():
            if info.get("engine"):
                engines[role] = f"{info['engine']} {info.get('engine_version') or ''}".strip()
    context: dict[str, Any] = {"settings_fingerprint": cfg.settings_fingerprint(), "models": cfg.model_identities()}
    if cfg.runs_generation:
        context["prompt_hash"] = prompt_hash(cfg)
    if engines:
        context["engines"] = engines
    return context


# ---- canaries -------------------------------------------------------------------------------


def read_canaries(cfg: JobConfig) -> pa.Table:
    """The canary rows; a missing file or column is a config error naming it."""
    import pyarrow.parquet as pq

    from shardwise.tasks.storage.fs import filesystem

    uri = cfg.quality.canaries
    assert uri is not None
    fs, path = filesystem(uri, cfg.storage_options)
    try:
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle)
    except FileNotFoundError:
        raise ConfigError(f"quality.canaries: {uri} not found") from None
    except OSError as err:
        raise StorageError(f"cannot read {uri}: {err}") from None
    except Exception as err:  # noqa: BLE001 - anything pyarrow says about the bytes
        raise ConfigError(f"quality.canaries: {uri} is not a readable Parquet file: {err}") from None
    needed = [cfg.id_column, cfg.text_column]
    if cfg.runs_generation:
        from shardwise.gpu_runtime import template_fields

        needed += template_fields(cfg.template)
    missing = [c for c in dict.fromkeys(needed) if c not in table.column_names]
    if missing:
        raise ConfigError(
            f"quality.canaries: {uri} has no column {missing[0]!r} (it has {', '.join(table.column_names)})"
        )
    collision = collision_message(cfg, table.column_names)
    if collision:
        raise ConfigError(f"quality.canaries: {uri}: {collision}")
    return table


def run_canaries(cfg: JobConfig) -> dict[str, Any]:
    """``{id: answer}`` (and ``{id: embedding}``) of the canary rows, generated greedily."""
    from shardwise.tasks.compute.shard_work import load_engines
    from shardwise.tasks.records.enrichment import enrich_table

    table = read_canaries(cfg)
    greedy = cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"temperature": 0.0})})
    generator, embedder = load_engines(greedy)
    enriched, _ = enrich_table(table, greedy, generator, embedder, chat_date=CANARY_CHAT_DATE)
    ids = [str(i) for i in enriched.column(cfg.id_column).to_pylist()]
    canaries: dict[str, Any] = {}
    if cfg.runs_generation:
        canaries["answers"] = dict(zip(ids, enriched.column("generated_text").to_pylist()))
    if cfg.runs_embedding:
        canaries["embeddings"] = {
            i: [round(float(x), 6) for x in v] for i, v in zip(ids, enriched.column("embedding").to_pylist())
        }
    return canaries


@task(name="quality-canaries", retries=1, retry_delay_seconds=2)
def run_canaries_task(cfg: JobConfig) -> dict[str, Any]:
    return run_canaries(cfg)


def changed_canaries(now: dict[str, Any], before: dict[str, Any]) -> list[str]:
    """Ids of canary rows present in both whose answer differs, or whose embedding moved."""
    changed = [
        i
        for i, text in now.get("answers", {}).items()
        if i in before.get("answers", {}) and before["answers"][i] != text
    ]
    for i, vector in now.get("embeddings", {}).items():
        old = before.get("embeddings", {}).get(i)
        if old is not None and i not in changed and 1 - _cosine(vector, old) > CANARY_COSINE_TOLERANCE:
            changed.append(i)
    return sorted(changed)


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else (1.0 if not any(a) and not any(b) else 0.0)


# ---- the baseline ---------------------------------------------------------------------------


def read_profile(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """An output's ``_quality.json``, or None when it has none (or it cannot be parsed)."""
    _, profile = OutputDir(uri, storage_options).read_json(QUALITY_NAME)
    return profile if isinstance(profile, dict) else None


def _published_profile(uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    directory = OutputDir(uri, storage_options)
    names = directory.names()
    if SUCCESS_NAME not in names or QUALITY_NAME not in names:
        return None
    return read_profile(uri, storage_options)


def _earlier_partitions(cfg: JobConfig) -> list[str]:
    """Output URIs of the job's partitions before this one, latest first."""
    from shardwise.tasks.storage.fs import filesystem, join

    partition = cfg.quality.partition
    assert partition is not None
    if "{date}" in partition.output:
        days = (partition.date - dt.timedelta(days=n) for n in range(1, _MAX_TEMPLATE_DAYS_BACK + 1))
        return [partition.output.replace("{date}", d.isoformat()) for d in days]
    fs, root = filesystem(partition.output, cfg.storage_options)
    try:
        entries = fs.ls(root.rstrip("/") or "/", detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as err:
        raise StorageError(f"cannot list {partition.output}: {err}") from None
    dates = []
    for entry in entries:
        match = _PARTITION_DIR.fullmatch(entry["name"].rstrip("/").rsplit("/", 1)[-1])
        if entry.get("type") == "directory" and match and match[1] < partition.date.isoformat():
            dates.append(match[1])
    return [join(partition.output, f"dt={d}") for d in sorted(dates, reverse=True)]


def find_baseline(cfg: JobConfig) -> tuple[str | None, dict[str, Any] | None]:
    """``(uri, profile)`` of the output tonight is compared with, or ``(None, None)``."""
    if cfg.quality.baseline is not None:
        profile = read_profile(cfg.quality.baseline, cfg.storage_options)
        if profile is None:
            raise ConfigError(
                f"quality.baseline: {cfg.quality.baseline} has no {QUALITY_NAME} "
                "(choose an output written by a run with the quality gate)"
            )
        return cfg.quality.baseline, profile
    if cfg.quality.partition is None:
        return None, None
    for uri in _earlier_partitions(cfg):
        profile = _published_profile(uri, cfg.storage_options)
        if profile is not None:
            return uri, profile
    return None, None


def check_quality_settings(cfg: JobConfig) -> None:
    """Fail fast (exit 2) on a canary file or baseline that cannot be used, before any work."""
    if cfg.quality.canaries is not None:
        read_canaries(cfg)
    if cfg.quality.baseline is not None:
        find_baseline(cfg)


# ---- checks and the verdict -----------------------------------------------------------------


def _ceiling(name: str, value: float | None, threshold: float | None) -> CheckResult | None:
    if threshold is None or value is None:
        return None
    return CheckResult(name, value, threshold, passed=value <= threshold)


def run_checks(settings: QualityConfig, profile: dict[str, Any], baseline: dict[str, Any] | None) -> list[CheckResult]:
    """Every enabled check that applies to this output; comparisons only against a baseline."""
    checks = [
        _ceiling("error_rate", profile.get("error_rate"), settings.max_error_rate),
        _ceiling("empty_rate", profile.get("empty_rate"), settings.max_empty_rate),
        _ceiling("refusal_rate", profile.get("refusal_rate"), settings.max_refusal_rate),
    ]
    base = baseline or {}
    # Figures of a handful of rows are mostly noise; canaries are compared row by row whatever the size.
    comparable = bool(base) and min(profile.get("rows", 0), base.get("rows", 0)) >= settings.min_rows
    if not comparable:
        base = {k: v for k, v in base.items() if k == "canaries"}
    if settings.max_length_rate_increase is not None and "length_rate" in profile and "length_rate" in base:
        increase = profile["length_rate"] - base["length_rate"]
        checks.append(
            CheckResult(
                "length_rate_increase",
                increase,
                settings.max_length_rate_increase,
                base["length_rate"],
                increase <= settings.max_length_rate_increase,
            )
        )
    if (
        settings.max_generated_tokens_change is not None
        and "generated_tokens" in profile
        and "generated_tokens" in base
    ):
        before, now = base["generated_tokens"]["mean"], profile["generated_tokens"]["mean"]
        change = abs(now - before) / before if before else (0.0 if not now else math.inf)
        checks.append(
            CheckResult(
                "generated_tokens_change",
                change,
                settings.max_generated_tokens_change,
                before,
                change <= settings.max_generated_tokens_change,
            )
        )
    if settings.max_centroid_drift is not None and profile.get("embedding") and base.get("embedding"):
        now_c, before_c = profile["embedding"]["centroid"], base["embedding"]["centroid"]
        if len(now_c) == len(before_c) and now_c:
            drift = 1 - _cosine(now_c, before_c)
            checks.append(
                CheckResult(
                    "centroid_drift", drift, settings.max_centroid_drift, None, drift <= settings.max_centroid_drift
                )
            )
        else:
            checks.append(
                CheckResult(
                    "centroid_drift",
                    None,
                    settings.max_centroid_drift,
                    note="embedding dimensions differ from the baseline's",
                )
            )
    if settings.max_canary_changes is not None and profile.get("canaries") and base.get("canaries"):
        changed = changed_canaries(profile["canaries"], base["canaries"])
        checks.append(
            CheckResult(
                "canaries_changed",
                float(len(changed)),
                settings.max_canary_changes,
                0.0,
                len(changed) <= settings.max_canary_changes,
                note=f"changed: {', '.join(changed[:10])}" if changed else "",
            )
        )
    return [c for c in checks if c is not None]


def assess(cfg: JobConfig, results: list[ShardResult], canaries: dict[str, Any] | None) -> QualityVerdict:
    """Profile the committed results, find the baseline and run the checks."""
    profile = {
        "format": PROFILE_FORMAT,
        "created_at": _now(),
        "output": cfg.output,
        **merge_profiles([r.quality for r in results if r.status == "committed"]),
        "context": run_context(cfg, results),
    }
    if canaries:
        profile["canaries"] = canaries
    baseline_uri, baseline = find_baseline(cfg)
    profile["baseline"] = baseline_uri
    checks = run_checks(cfg.quality, profile, baseline)
    failed = any(not c.passed for c in checks)
    status = "passed" if not failed else ("held" if cfg.quality.gate == "hold" else "warned")
    return QualityVerdict(status, profile, checks, baseline_uri, baseline)


@task(name="quality-gate", retries=2, retry_delay_seconds=2)
def assess_task(cfg: JobConfig, results: list[ShardResult], canaries: dict[str, Any] | None) -> QualityVerdict:
    return assess(cfg, results, canaries)


# ---- reporting ------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def comparison_rows(verdict: QualityVerdict) -> list[tuple[str, Any, Any]]:
    """``(figure, tonight, baseline)`` for the figures both profiles may hold."""
    now, base = verdict.profile, verdict.baseline or {}
    rows = [
        (name, now.get(name), base.get(name) if verdict.baseline else None)
        for name in (
            "rows",
            "error_rate",
            "empty_rate",
            "refusal_rate",
            "length_rate",
            "schema_valid_rate",
            "prompt_tokens_mean",
        )
    ]
    for stat in ("mean", "p50", "p95"):
        rows.append(
            (
                f"generated_tokens_{stat}",
                (now.get("generated_tokens") or {}).get(stat),
                (base.get("generated_tokens") or {}).get(stat),
            )
        )
    rows.append(
        (
            "embedding_mean_norm",
            (now.get("embedding") or {}).get("mean_norm"),
            (base.get("embedding") or {}).get("mean_norm"),
        )
    )
    return [r for r in rows if r[1] is not None or r[2] is not None]


def markdown(verdict: QualityVerdict) -> str:
    from shardwise.tasks.redaction import redact_uri
    from shardwise.tasks.tracking.reporting import markdown_text as md

    lines = [
        f"# Quality gate: {verdict.status}",
        "",
        f"- baseline: {md(redact_uri(verdict.baseline_uri)) if verdict.baseline_uri else 'none (nothing earlier to compare with)'}",
    ]
    if verdict.failed:
        lines.append(f"- {md(verdict.message())}")
    lines += ["", "| figure | tonight | baseline |", "|---|---|---|"]
    lines += [f"| {name} | {_fmt(now)} | {_fmt(base)} |" for name, now, base in comparison_rows(verdict)]
    lines += ["", "| check | value | threshold | baseline | result |", "|---|---|---|---|---|"]
    for c in verdict.checks:
        result = "pass" if c.passed else "FAIL"
        lines.append(
            f"| {c.name} | {_fmt(c.value)} | {_fmt(c.threshold)} | {_fmt(c.baseline_value)} | "
            f"{result}{' (' + md(c.note) + ')' if c.note else ''} |"
        )
    return "\n".join(lines)


def log_verdict(run_id: str, verdict: QualityVerdict) -> None:
    """MLflow: a ``quality_*`` metric per check and profile figure, the ``shardwise.quality`` tag,
    the profile, and the generated-length figure tonight vs baseline; Prefect: a markdown artifact."""
    from mlflow.entities import Metric, RunTag
    from prefect.artifacts import create_markdown_artifact

    from shardwise.tasks.redaction import redact_uri, redact_values
    from shardwise.tasks.tracking.figures import generated_length_figure

    client = _mlflow()
    stamp = int(time.time() * 1000)
    metrics = {f"quality_{c.name}": c.value for c in verdict.checks if c.value is not None and math.isfinite(c.value)}
    metrics |= {
        f"quality_{name}": now
        for name, now, _ in comparison_rows(verdict)
        if isinstance(now, (int, float)) and name != "rows"
    }
    metrics["quality_failed_checks"] = len(verdict.failed)
    tags = [RunTag("shardwise.quality", verdict.status)]
    if verdict.baseline_uri:
        tags.append(RunTag("shardwise.quality.baseline", redact_uri(verdict.baseline_uri)))
    client.log_batch(run_id, metrics=[Metric(k, float(v), stamp, 0) for k, v in metrics.items()], tags=tags)
    client.log_dict(
        run_id, redact_values({**verdict.profile, "checks": [c.to_dict() for c in verdict.checks]}), "quality.json"
    )
    tonight = (verdict.profile.get("generated_tokens") or {}).get("histogram")
    if tonight:
        figure = generated_length_figure(
            tonight,
            ((verdict.baseline or {}).get("generated_tokens") or {}).get("histogram"),
            redact_uri(verdict.baseline_uri) if verdict.baseline_uri else None,
        )
        client.log_figure(run_id, figure, "generated_lengths.png")
    create_markdown_artifact(markdown(verdict), key="quality-gate", description="tonight vs baseline")


@task(name="quality-report", retries=2, retry_delay_seconds=2)
def log_verdict_task(run_id: str, verdict: QualityVerdict) -> None:
    log_verdict(run_id, verdict)


# ---- held outputs and their release -----------------------------------------------------------


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
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    from shardwise.tasks.redaction import redact_text, redact_uri
    from shardwise.tasks.storage.local_state import tracking_uri

    where = f"MLflow run {run_id} in the tracking store {redact_uri(tracking_uri())}"
    unpublished = "nothing was published; release again once it"
    try:
        client = _mlflow()
        run = client.get_run(run_id)
    except Exception as err:  # noqa: BLE001 - not there, or the store cannot be reached
        if isinstance(err, MlflowException) and err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise ConfigError(
                f"{where}: not found; nothing was published (set MLFLOW_TRACKING_URI to the store "
                "the run used, then release again)"
            ) from None
        raise StorageError(f"cannot read {where}: {_one_line(err)}; {unpublished} can be read") from None
    if run.info.lifecycle_stage == "deleted":
        raise ConfigError(f"{where} is deleted; nothing was published (restore it, then release again)")
    tags = [
        RunTag(f"shardwise.quality.{key}", redact_text(str(release[key])))
        for key in ("released_by", "released_at", "reason")
    ]
    try:
        client.log_batch(run_id, tags=tags)
    except Exception as err:  # noqa: BLE001 - MlflowException or a failure to reach the store
        raise StorageError(
            f"cannot record the release on {where}: {_one_line(err)}; {unpublished} can be written"
        ) from None


def _one_line(err: Exception) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def _mlflow() -> Any:
    import os

    from mlflow.tracking import MlflowClient

    from shardwise.tasks.storage.local_state import tracking_uri

    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # that URL may hold user:password@
    return MlflowClient(tracking_uri=tracking_uri())


__all__ = [
    "assess",
    "assess_task",
    "check_quality_settings",
    "find_baseline",
    "log_verdict",
    "log_verdict_task",
    "markdown",
    "read_hold",
    "read_profile",
    "release_output",
    "run_canaries",
    "run_canaries_task",
    "run_checks",
]
