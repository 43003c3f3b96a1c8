"""The quality gate through the command line (run in the test process: tests/cli.py), and through
the deployments: a healthy night passes, answers cut short are held
(exit 4, no _SUCCESS, _QUALITY_HOLD naming the checks, MLflow tag ``held``), a person releases
them, changed canary answers are caught, and bad ``quality:`` settings are config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from shardwise.tasks.records.demo_data import write_reviews_dataset
from tests.cli import run_cli
from tests.flows.test_cli import assert_one_line_error

# The bundled model answers in about 20 tokens (some cut at 24); cut at 3 tokens, every answer is.
PROMPT = (
    "Product: {product} ({category}), rated {rating}/5.\nReview: {text}\n\n"
    "In at most ten words, what is the customer's main point?"
)


def reviews_then_server_logs(tmp_path: Path, first: str, second: str, name: str) -> Path:
    """Input partitions of 4 rows each: reviews on ``first``, server log lines on ``second`` (their
    embeddings drift far from the reviews'), and an embedding job over them (``min_rows: 1``)."""
    import pyarrow as pa

    write_reviews_dataset(str(tmp_path / "raw" / f"dt={first}"), files=1, rows_per_file=4, rows_per_group=2)
    logs = [f"GET /api/v2/orders/{i} 500 Internal Server Error in {i * 7} ms" for i in range(4)]
    (tmp_path / "raw" / f"dt={second}").mkdir(parents=True)
    pq.write_table(
        pa.table({"review_id": [f"log-{i}" for i in range(4)], "text": logs}),
        tmp_path / "raw" / f"dt={second}" / "logs.parquet",
    )
    job = tmp_path / "job.yaml"
    job.write_text(
        json.dumps(
            {
                "name": name,
                "input": str(tmp_path / "raw"),
                "output": str(tmp_path / "enriched"),
                "task": "embed",
                "id_column": "review_id",
                "device": "cpu",
                "quality": {"min_rows": 1},
            }
        )
    )
    return job


def nightly_job(tmp_path: Path, dates: list[str], rows: int = 4, **quality: object) -> Path:
    """A partitioned generation job over ``rows`` fresh reviews each night (another seed per date)."""
    for seed, date in enumerate(dates, start=11):
        write_reviews_dataset(
            str(tmp_path / "raw" / f"dt={date}"), files=1, rows_per_file=rows, rows_per_group=2, seed=seed
        )
    job = {
        "name": "quality-nightly",
        "input": str(tmp_path / "raw"),
        "output": str(tmp_path / "enriched"),
        "task": "generate",
        "id_column": "review_id",
        "keep_columns": "id",
        "rows_per_shard": max(rows, 4),
        "device": "cpu",
        "generate": {
            "system_prompt": "You are a concise analyst of customer reviews.",
            "prompt_template": PROMPT,
            "max_new_tokens": 24,
        },
        "quality": quality,
    }
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(job))
    return path


def mlflow_run(output: Path):
    from mlflow.tracking import MlflowClient

    from shardwise.tasks.storage.local_state import tracking_uri

    manifest = json.loads((output / "_manifest.json").read_text())
    return MlflowClient(tracking_uri()).get_run(manifest["mlflow_run_id"])


def test_bad_quality_settings_are_config_errors(reviews_dir, tmp_path):
    """Through the command line; every bad value is covered in tests/tasks/test_quality.py."""
    out = tmp_path / "out"
    base = ["run", "--input", str(reviews_dir), "--output", str(out), "--id-column", "review_id"]
    assert_one_line_error(
        run_cli(*base, "--set", "quality.max_generated_tokens_change=-1"), 2, "quality.max_generated_tokens_change"
    )
    assert_one_line_error(
        run_cli(*base, "--set", f"quality.canaries={tmp_path / 'nope.parquet'}"),
        2,
        "quality.canaries",
        "nope.parquet",
        "not found",
    )
    assert not out.exists()  # refused before anything was written
    assert_one_line_error(run_cli("release", str(reviews_dir)), 2, "not held")


@pytest.mark.slow
def test_a_collapse_in_a_24_row_night_is_held_with_default_settings(cli, tmp_path):
    """Default quality settings, nights of 24 rows: two healthy nights pass, and a night whose
    answers collapsed (max_new_tokens 3: from about 22 generated tokens to 3) is held, because each
    comparison weighs its change against the noise of 24 rows instead of needing 100."""
    dates = ["2026-10-11", "2026-10-12", "2026-10-13"]
    job = nightly_job(tmp_path, dates, rows=24)
    for date in dates[:2]:
        healthy = cli("run", "--config", str(job), "--date", date)
        assert healthy.returncode == 0, healthy.stderr[-3000:]
        assert "quality          passed" in healthy.stdout, healthy.stdout
    checks = json.loads((tmp_path / "enriched" / f"dt={dates[1]}" / "_manifest.json").read_text())["quality"]["checks"]
    assert {c["check"] for c in checks} == {"length_rate_increase", "generated_tokens_change"}, checks
    assert all(c["passed"] and c["note"].startswith("p=") for c in checks), checks

    collapsed = cli("run", "--config", str(job), "--date", dates[2], "--max-new-tokens", "3")
    assert_one_line_error(collapsed, 4, "generated_tokens_change")
    hold = json.loads((tmp_path / "enriched" / f"dt={dates[2]}" / "_QUALITY_HOLD").read_text())
    (failed,) = [c for c in hold["failed_checks"] if c["check"] == "generated_tokens_change"]
    assert failed["value"] > 0.8 and failed["baseline_value"] > 15, failed


@pytest.mark.slow
@pytest.mark.timeout(1800)  # four CLI nights in one test
def test_nights_pass_cut_answers_are_held_released_and_canary_changes_caught(cli, tmp_path):
    dates = ["2026-11-01", "2026-11-02", "2026-11-03", "2026-11-04"]
    canaries = write_reviews_dataset(str(tmp_path / "canaries"), files=1, rows_per_file=2, rows_per_group=2, seed=7)
    job = nightly_job(tmp_path, dates, canaries=canaries[0], min_rows=1)
    night = {d: tmp_path / "enriched" / f"dt={d}" for d in dates}

    first = cli("run", "--config", str(job), "--date", dates[0])
    assert first.returncode == 0, first.stderr[-3000:]
    profile = json.loads((night[dates[0]] / "_quality.json").read_text())
    assert profile["baseline"] is None and profile["rows"] == 4 and profile["shards_profiled"] == 1
    assert len(profile["canaries"]["answers"]) == 2

    # A healthy second night over fresh rows of the same kind: compared with the first, no alarm.
    second = cli("run", "--config", str(job), "--date", dates[1])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "quality          passed" in second.stdout, second.stdout
    manifest = json.loads((night[dates[1]] / "_manifest.json").read_text())
    assert manifest["quality"]["baseline"] == str(night[dates[0]])
    assert {c["check"] for c in manifest["quality"]["checks"]} == {
        "length_rate_increase",
        "generated_tokens_change",
        "canaries_changed",
    }
    assert (night[dates[1]] / "_SUCCESS").is_file()
    assert mlflow_run(night[dates[1]]).data.tags["shardwise.quality"] == "passed"

    # Answers cut short: held, with everything written but _SUCCESS.
    cut = cli("run", "--config", str(job), "--date", dates[2], "--max-new-tokens", "3")
    assert_one_line_error(cut, 4, "generated_tokens_change", "shardwise release")
    held = night[dates[2]]
    assert not (held / "_SUCCESS").exists()
    assert pq.read_table(str(held)).num_rows == 4  # nothing is lost
    hold = json.loads((held / "_QUALITY_HOLD").read_text())
    failed = {c["check"]: c for c in hold["failed_checks"]}
    assert {"generated_tokens_change", "canaries_changed"} <= set(failed)
    assert hold["baseline"] == str(night[dates[1]]) and failed["generated_tokens_change"]["threshold"] == 0.3
    assert json.loads((held / "_manifest.json").read_text())["status"] == "held"
    run = mlflow_run(held)
    assert run.data.tags["shardwise.quality"] == "held" and run.data.metrics["quality_generated_tokens_change"] > 0.3
    assert "generated_lengths.png" in {a.path for a in _artifacts(run.info.run_id)}
    status = cli("status", str(held))
    assert status.returncode == 4 and "held" in status.stdout and "generated_tokens_change" in status.stdout

    released = cli("release", str(held), "--reason", "short answers were asked for")
    assert released.returncode == 0, released.stderr
    assert (held / "_SUCCESS").is_file() and not (held / "_QUALITY_HOLD").exists()
    release = json.loads((held / "_manifest.json").read_text())["quality"]["release"]
    assert release["reason"] == "short answers were asked for" and release["released_by"]
    assert mlflow_run(held).data.tags["shardwise.quality.reason"] == "short answers were asked for"
    assert cli("status", str(held)).returncode == 0

    # Rerunning a published night changes nothing: not compared again, not withdrawn, and its
    # manifest (verdict, release, models' provenance) and markers stay byte for byte; the rerun's
    # own MLflow run still names the models.
    published = {n: (held / n).read_bytes() for n in ("_manifest.json", "_SUCCESS", "_quality.json")}
    first_params = mlflow_run(held).data.params
    rerun = cli("run", "--config", str(job), "--date", dates[2], "--max-new-tokens", "3")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "nothing to do" in rerun.stderr and "computed         0 rows (4 reused" in rerun.stdout, rerun.stdout
    assert {n: (held / n).read_bytes() for n in published} == published
    assert not (held / "_QUALITY_HOLD").exists()
    rerun_id = next(line.split()[2] for line in rerun.stdout.splitlines() if line.startswith("MLflow run"))
    rerun_params = _client().get_run(rerun_id).data.params
    model_keys = {k for k in first_params if k.startswith("model.generate.")}
    assert {"model.generate.revision", "model.generate.dtype", "model.generate.engine"} <= model_keys
    assert {k: rerun_params.get(k) for k in model_keys} == {k: first_params[k] for k in model_keys}

    # A prompt edit, against an explicit baseline, with the length checks off: only the canaries tell.
    edited = cli(
        "run",
        "--config",
        str(job),
        "--date",
        dates[3],
        "--baseline",
        str(night[dates[1]]),
        "--set",
        "generate.system_prompt=You answer every question like a pirate.",
        "--set",
        "quality.max_length_rate_increase=null",
        "--set",
        "quality.max_generated_tokens_change=null",
    )
    assert_one_line_error(edited, 4, "canaries_changed")
    hold = json.loads((night[dates[3]] / "_QUALITY_HOLD").read_text())
    assert [c["check"] for c in hold["failed_checks"]] == ["canaries_changed"]
    assert "prompt_hash" in hold["changed_since_baseline"]  # the edit shows as what changed
    assert hold["baseline"] == str(night[dates[1]])


def _client():
    from mlflow.tracking import MlflowClient

    from shardwise.tasks.storage.local_state import tracking_uri

    return MlflowClient(tracking_uri())


def _artifacts(run_id: str) -> list:
    return _client().list_artifacts(run_id)


@pytest.mark.slow
def test_held_nightly_partition_is_retried_by_the_next_backfill(worker, tmp_path):
    """Embeddings of another kind of text tonight: the nightly deployment run is held and ends
    Failed naming the check; the next backfill over that date reruns it instead of skipping it."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from tests.flows.test_deployments import partition_runs, read_deployment, trigger_backfill

    earlier, tonight = "2026-10-01", "2026-10-02"
    job = reviews_then_server_logs(tmp_path, earlier, tonight, "quality-backfill")
    assert trigger_backfill(job, earlier, earlier).state.is_completed()
    assert (tmp_path / "enriched" / f"dt={earlier}" / "_quality.json").is_file()

    nightly = run_deployment(
        "nightly-enrich/nightly-enrich",
        parameters={"job": str(job), "date": tonight},
        timeout=600,
        poll_interval=1,
        as_subflow=False,
    )
    assert nightly.state.is_failed(), nightly.state
    held = tmp_path / "enriched" / f"dt={tonight}"
    assert (held / "_QUALITY_HOLD").is_file() and not (held / "_SUCCESS").exists()
    assert "centroid_drift" in (nightly.state.message or ""), nightly.state.message
    with get_client(sync_client=True) as client:  # the enrich run itself ends Failed with that line
        enrich_run = client.read_flow_run(json.loads((held / "_manifest.json").read_text())["prefect_flow_run_id"])
    assert enrich_run.state.is_failed() and "centroid_drift" in enrich_run.state.message

    partition = read_deployment("enrich-partition/enrich-partition")
    before = [r for r in partition_runs(partition.id) if r.name == f"dt={tonight}"]
    again = trigger_backfill(job, earlier, tonight)
    assert again.state.is_failed(), again.state  # the partition is still held
    outcomes = {o["date"]: o for o in _backfill_outcomes(again)}
    assert outcomes[earlier]["status"] == "skipped"
    assert outcomes[tonight]["status"] != "skipped" and "centroid_drift" in outcomes[tonight]["message"]
    after = [r for r in partition_runs(partition.id) if r.name == f"dt={tonight}"]
    assert len(after) == len(before) + 1  # really rerun, not skipped as done


def _backfill_outcomes(run) -> list[dict]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        (table,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]), key=ArtifactFilterKey(any_=["backfill-partitions"])
            )
        )
    return json.loads(table.data) if isinstance(table.data, str) else table.data
