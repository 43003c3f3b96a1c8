"""Credentials never leak: a canary secret in the storage options must appear nowhere we write."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from tasks.demo_data import write_reviews_dataset

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
    from tasks.storage import runtime_storage_options

    write_reviews_dataset(f"s3://{bucket}/in", files=1, rows_per_file=4, rows_per_group=2,
                          storage_options=runtime_storage_options())
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "name": "canary-job", "input": f"s3://{bucket}/in", "output": f"s3://{bucket}/out",
        "task": "embed", "id_column": "review_id",
        # moto accepts any key pair, so the canary is a working credential here.
        "storage_options": {"key": "canary-key-id", "secret": canary},
    }))
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    ok = subprocess.run([SHARDWISE, "run", "--config", str(config)], capture_output=True, text=True, env=env,
                        timeout=600)
    assert ok.returncode == 0, ok.stderr[-3000:]
    # A failing run too: errors are where secrets usually slip out.
    bad = subprocess.run([SHARDWISE, "run", "--config", str(config), "--set", f"output=s3://no-such-{bucket}/x"],
                         capture_output=True, text=True, env=env, timeout=600)
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
        runs = client.read_flow_runs()
    assert runs and all(canary not in repr(run.parameters) for run in runs)
    jobs = [run.parameters.get("job") for run in runs]  # other tests' deployment runs pass a YAML path
    assert any(isinstance(job, dict) and job.get("name") == "canary-job" for job in jobs)
