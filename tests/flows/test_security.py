"""Credentials never leak: a canary secret in the storage options, in the input URI or in the MLflow
tracking URI must appear nowhere we write or show (output, MLflow, Prefect, stdout and stderr)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from shardwise.tasks.records.demo_data import write_reviews_dataset
from tests.flows.test_ray_runner import ray_cluster  # noqa: F401 - a fixture, for the Ray case
from tests.prefect_reads import read_all
from tests.servers import basic_auth_proxy, serve_files_with_basic_auth, start_mlflow_server

pytestmark = pytest.mark.slow

SHARDWISE = str(Path(sys.executable).with_name("shardwise"))


def files_containing(root: Path, needle: bytes) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and needle in path.read_bytes():
            hits.append(str(path))
    return hits


def test_canary_secret_appears_in_no_log_artifact_parameter_or_file(prefect_server, s3, session_dir, tmp_path):
    fs, bucket = s3
    canary = f"CANARY-{uuid.uuid4().hex}"
    from shardwise.tasks.storage.fs import runtime_storage_options

    write_reviews_dataset(
        f"s3://{bucket}/in", files=1, rows_per_file=4, rows_per_group=2, storage_options=runtime_storage_options()
    )
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "canary-job",
                "input": f"s3://{bucket}/in",
                "output": f"s3://{bucket}/out",
                "task": "embed",
                "id_column": "review_id",
                # moto accepts any key pair, so the canary is a working credential here.
                "storage_options": {"key": "canary-key-id", "secret": canary},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    ok = subprocess.run(
        [SHARDWISE, "run", "--config", str(config)], capture_output=True, text=True, env=env, timeout=600
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    # A failing run too: errors are where secrets usually slip out.
    bad = subprocess.run(
        [SHARDWISE, "run", "--config", str(config), "--set", f"output=s3://no-such-{bucket}/x"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert bad.returncode != 0
    for proc in (ok, bad):
        assert canary not in proc.stdout + proc.stderr

    # Everything in the output: parts (incl. Parquet key-value metadata), manifest, _SUCCESS.
    fs.invalidate_cache()
    written = fs.find(f"{bucket}/out")
    assert any(p.endswith("_SUCCESS") for p in written)
    for key in written:
        assert canary.encode() not in fs.cat_file(key), key

    # MLflow (database and artifacts) and the Prefect server's database, as bytes on disk.
    state = Path(os.environ["SHARDWISE_HOME"])
    assert (state / "mlflow.db").exists()
    assert files_containing(state, canary.encode()) == []
    assert files_containing(session_dir / "prefect-server", canary.encode()) == []

    # And through the Prefect API: the flow run's stored parameters.
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = read_all(client.read_flow_runs)
    assert runs and all(canary not in repr(run.parameters) for run in runs)
    jobs = [run.parameters.get("job") for run in runs]  # other tests' deployment runs pass a YAML path
    assert any(isinstance(job, dict) and job.get("name") == "canary-job" for job in jobs)


URI_CANARY = f"CANARY{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def mlflow_behind_basic_auth(tmp_path_factory):
    """``mlflow server`` reachable only through a basic-auth proxy whose password is the canary."""
    directory = tmp_path_factory.mktemp("mlflow-server")
    proc, upstream = start_mlflow_server(directory)
    proxy = basic_auth_proxy(upstream, "tracker", URI_CANARY)
    try:
        yield directory, f"http://tracker:{URI_CANARY}@127.0.0.1:{proxy.server_port}"
    finally:
        proxy.shutdown()
        proc.terminate()
        proc.wait(timeout=30)


def prefect_records(flow_run_id: str) -> str:
    """Everything the Prefect API holds about a flow run and its task runs, as one text."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        logs = read_all(client.read_logs, log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
        artifacts = read_all(
            client.read_artifacts,
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])),
        )
        task_runs = read_all(
            client.read_task_runs, flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        )
    assert logs and artifacts and task_runs
    return "\n".join(
        [repr(flow_run), *(repr(log) for log in logs), *(repr(a) for a in artifacts), *(repr(t) for t in task_runs)]
    )


def mlflow_records(tracking_uri: str, run_id: str) -> str:
    """The MLflow run as the API gives it: params, tags, dataset inputs and logged JSON artifacts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.inputs.dataset_inputs and run.data.params
    texts = [repr(run.data.params), repr(run.data.tags), repr(run.inputs), repr(run.info)]
    for artifact in ("job_config.json", "manifest.json"):
        texts.append(Path(client.download_artifacts(run_id, artifact)).read_text())
    return "\n".join(texts)


@pytest.mark.parametrize("runner", ["in-process", "worker processes", "ray"])
def test_canary_in_input_uri_and_tracking_uri_appears_nowhere(
    runner, request, prefect_server, session_dir, mlflow_behind_basic_auth, tmp_path
):
    mlflow_dir, tracking = mlflow_behind_basic_auth
    data = tmp_path / "served"
    write_reviews_dataset(str(data), files=1, rows_per_file=6, rows_per_group=2)
    files = serve_files_with_basic_auth(data, "reader", URI_CANARY)
    source = f"http://reader:{URI_CANARY}@127.0.0.1:{files.server_port}/reviews-000.parquet"
    output = tmp_path / "out"
    command = [
        SHARDWISE,
        "run",
        "--input",
        source,
        "--output",
        str(output),
        "--task",
        "embed",
        "--id-column",
        "review_id",
        "--rows-per-shard",
        "2",
        "--set",
        "name=uri-canary",
    ]
    if runner == "worker processes":
        command += ["--workers", "2"]
    if runner == "ray":
        command += ["--runner", "ray", "--ray-address", request.getfixturevalue("ray_cluster")]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking}
    try:
        ok = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        assert ok.returncode == 0, ok.stderr[-3000:]
        # A failing run too: a wrong password, and errors are where secrets usually slip out.
        wrong = source.replace(f"reader:{URI_CANARY}", f"reader:{URI_CANARY}-wrong")
        bad = subprocess.run([*command[:3], wrong, *command[4:]], capture_output=True, text=True, env=env, timeout=900)
    finally:
        files.shutdown()
    assert bad.returncode in (2, 3), bad.stderr[-3000:]
    for proc in (ok, bad):
        assert URI_CANARY not in proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr

    # The http input with credentials worked: every row is in the output.
    import polars as pl

    assert pl.read_parquet(output / "part-*.parquet")["review_id"].n_unique() == 6
    assert files_containing(output, URI_CANARY.encode()) == []  # parts' footers, manifest, _SUCCESS
    manifest = (output / "_manifest.json").read_text()
    assert "http://REDACTED@127.0.0.1" in manifest

    import json

    ids = json.loads(manifest)
    assert URI_CANARY not in prefect_records(ids["prefect_flow_run_id"])
    assert URI_CANARY not in mlflow_records(tracking, ids["mlflow_run_id"])
    # And as bytes on disk: the MLflow server's database and artifacts, the Prefect server's database.
    assert files_containing(mlflow_dir, URI_CANARY.encode()) == []
    assert files_containing(session_dir / "prefect-server", URI_CANARY.encode()) == []
