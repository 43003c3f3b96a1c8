"""``--runner ray`` on a local Ray cluster (``ray start --head``, CPU only; the ``ray_clusters`` fixture):
same output as the local runner, every shard run by a Ray worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from shardwise.tasks.config.job import JobConfig

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


@pytest.fixture
def ray_cluster(ray_clusters):
    """A healthy local Ray cluster (shared with other tests that need one)."""
    return ray_clusters.get()


def test_a_ray_worker_killed_mid_part_fails_the_run_cleanly_and_a_rerun_completes(ray_clusters, reviews_dir, tmp_path):
    """Every Ray worker SIGKILLs itself while writing its first part (with shard_retries=0 Ray does
    not retry the task in a new worker either): no partial part, no _SUCCESS, the lease released,
    and a rerun completes the output."""
    out = tmp_path / "out"
    job = [
        str(BIN / "shardwise"),
        "run",
        "--input",
        str(reviews_dir),
        "--output",
        str(out),
        "--task",
        "embed",
        "--embed-model",
        "dummy:bert-tiny",
        "--id-column",
        "review_id",
        "--rows-per-shard",
        "10",
        "--device",
        "cpu",
        "--runner",
        "ray",
        "--set",
        "shard_retries=0",
    ]
    address = ray_clusters.get()  # the driver hands SHARDWISE_CRASH_AT to its Ray workers (runtime_env)
    killed = subprocess.run(
        [*job, "--ray-address", address],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "SHARDWISE_CRASH_AT": "part-write"},
    )
    assert killed.returncode == 1, (killed.returncode, killed.stderr[-3000:])
    files = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert not [n for n in files if n.startswith("part-") or n in ("_SUCCESS", "_shardwise.lease")], files

    rerun = subprocess.run([*job, "--ray-address", address], capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert "_SUCCESS" in files and not [n for n in files if n.startswith(".")], files
    ids = pl.read_parquet(str(out / "part-*.parquet"))["review_id"].sort().to_list()
    assert ids == sorted(pl.read_parquet(str(reviews_dir / "*.parquet")).get_column("review_id").to_list())


def test_ray_runner_matches_local_runner(ray_cluster, reviews_dir, tmp_path):
    from shardwise.flows.enrich import enrich_for

    common = dict(
        input=str(reviews_dir),
        task="both",
        id_column="review_id",
        rows_per_shard=5,
        device="cpu",
        generate={"prompt_template": "Review: {text}\nOne word:", "max_new_tokens": 3},
    )
    local = JobConfig(output=str(tmp_path / "local"), **common)
    state = enrich_for(local)(job=local.public_dict(), return_state=True)
    assert state.is_completed(), state.message

    config = tmp_path / "job.yaml"
    config.write_text(json.dumps({**common, "output": str(tmp_path / "ray")}))
    proc = subprocess.run(
        [str(BIN / "shardwise"), "run", "--config", str(config), "--runner", "ray", "--ray-address", ray_cluster],
        capture_output=True,
        text=True,
        timeout=900,
        env=os.environ,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "each shard asks Ray for {'num_cpus': 1}" in proc.stderr

    # Every shard ran in a Ray worker process, not in the driver.
    manifest = json.loads((tmp_path / "ray" / "_manifest.json").read_text())
    local_manifest = json.loads((tmp_path / "local" / "_manifest.json").read_text())
    assert manifest["status"] == "succeeded" and len(manifest["shards"]) == len(local_manifest["shards"]) == 9
    assert all(s["worker"].startswith("ray worker") for s in manifest["shards"]), manifest["shards"]
    assert sorted(p.name for p in (tmp_path / "ray").glob("part-*.parquet")) == sorted(
        s["part"] for s in manifest["shards"]
    )

    a = pl.read_parquet(str(tmp_path / "local" / "part-*.parquet")).sort("review_id")
    b = pl.read_parquet(str(tmp_path / "ray" / "part-*.parquet")).sort("review_id")
    assert a.height == b.height == 30
    assert a["review_id"].to_list() == b["review_id"].to_list()
    assert a["generated_text"].to_list() == b["generated_text"].to_list()
    np.testing.assert_allclose(np.array(a["embedding"].to_list()), np.array(b["embedding"].to_list()), atol=1e-5)
