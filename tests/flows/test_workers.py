"""Worker processes: two CPU workers give the same output as one, each shard once, a model load per worker."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from shardwise.tasks.config.job import JobConfig

pytestmark = pytest.mark.slow


def run_job(cfg: JobConfig) -> dict:
    from shardwise.flows.enrich import enrich_for

    state = enrich_for(cfg)(job=cfg.public_dict(), return_state=True)
    summary = state.result(raise_on_failure=False)
    assert state.is_completed(), state.message
    return summary


def read_output(output: Path) -> pl.DataFrame:
    return pl.read_parquet(str(output / "part-*.parquet")).sort("review_id")


def test_two_worker_processes_match_one(prefect_server, reviews_dir, tmp_path):
    common = dict(
        input=str(reviews_dir),
        task="both",
        id_column="review_id",
        rows_per_shard=4,
        device="cpu",
        generate={"prompt_template": "Review: {text}\nOne word:", "max_new_tokens": 3},
    )
    one = run_job(JobConfig(output=str(tmp_path / "one"), workers=1, **common))
    two = run_job(JobConfig(output=str(tmp_path / "two"), workers=2, **common))

    # Both workers took shards from the shared queue, and each loaded each model exactly once.
    assert two["worker_processes"] == 2, two["workers"]
    assert sum(w["shards"] for w in two["workers"].values()) == two["shards_total"] == 9
    pids = set()
    for label, use in two["workers"].items():
        assert use["shards"] >= 1, label
        assert use["model_loads"] == {"bundled:smollm2-135m-instruct": 1, "bundled:all-minilm-l6-v2": 1}, label
        assert "cpu x1" in label  # the two cores are split between the two workers
        pids.add(label.split("pid ")[1].split(",")[0])
    assert len(pids) == 2
    assert one["worker_processes"] == 1 and "in-process" in next(iter(one["workers"]))

    # Every shard was written exactly once, by the worker the manifest names.
    manifest = json.loads((tmp_path / "two" / "_manifest.json").read_text())
    parts = sorted(p.name for p in (tmp_path / "two").glob("part-*.parquet"))
    assert parts == sorted(s["part"] for s in manifest["shards"]) and len(parts) == 9
    assert {s["worker"] for s in manifest["shards"]} == set(two["workers"])

    # Same rows, same generated text, same embeddings (up to float summation order).
    a, b = read_output(tmp_path / "one"), read_output(tmp_path / "two")
    assert a["review_id"].to_list() == b["review_id"].to_list() and a.height == 30
    assert a["review_id"].n_unique() == 30
    assert a["generated_text"].to_list() == b["generated_text"].to_list()
    np.testing.assert_allclose(np.array(a["embedding"].to_list()), np.array(b["embedding"].to_list()), atol=1e-5)
