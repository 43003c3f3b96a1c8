"""The real flow on a real Prefect server, real models, real MLflow sqlite and real Parquet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.records.shard_io import read_part_lineage
from shardwise.tasks.storage.local_state import tracking_uri

pytestmark = pytest.mark.slow

INPUT_COLUMNS = ["review_id", "created_at", "category", "product", "rating", "text"]
GENERATION_COLUMNS = ["generated_text", "n_prompt_tokens", "n_generated_tokens", "finish_reason"]


def run_flow(cfg: JobConfig):
    from shardwise.flows.enrich import enrich

    state = enrich(job=cfg.public_dict(), return_state=True)
    return state, state.result(raise_on_failure=False)


def spoil_rows(path: Path) -> list[str]:
    """Make row 0 of a file null text and row 1 empty (after control-character cleaning)."""
    table = pq.read_table(path)
    texts = table.column("text").to_pylist()
    texts[0], texts[1] = None, " \x00\x07 "
    texts[2] = "Great\x00 product \x1b, works well."
    table = table.set_column(table.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))
    pq.write_table(table, path, row_group_size=4)
    ids = table.column("review_id").to_pylist()
    return ids[:2]


def test_both_tasks_end_to_end(prefect_server, reviews_dir, tmp_path, capsys):
    bad_ids = spoil_rows(reviews_dir / "reviews-001.parquet")
    output = tmp_path / "out"
    cfg = JobConfig(
        input=str(reviews_dir),
        output=str(output),
        task="both",
        id_column="review_id",
        rows_per_shard=8,
        generate={
            "prompt_template": "Product: {product}. Review: {text}\nSummarise in five words.",
            "max_new_tokens": 4,
            "max_batch_size": 8,
        },
    )
    state, summary = run_flow(cfg)
    assert state.is_completed(), state.message
    assert summary["succeeded"] and summary["rows"] == 30 and summary["error_rows"] == 2

    # Every planned shard has one part; _SUCCESS and the manifest agree.
    manifest = json.loads((output / "_manifest.json").read_text())
    parts = sorted(p.name for p in output.glob("part-*.parquet"))
    assert parts == sorted(f"part-{s['shard_id']}.parquet" for s in manifest["shards"])
    assert manifest["status"] == "succeeded" and all(s["status"] == "committed" for s in manifest["shards"])
    assert (output / "_SUCCESS").exists()
    assert manifest["totals"]["rows"] == 30 and manifest["totals"]["duplicate_ids"] == 0

    df = pl.read_parquet(output / "part-*.parquet")
    assert df.columns == INPUT_COLUMNS + GENERATION_COLUMNS + ["embedding", "truncated", "error"]
    source = pl.read_parquet(reviews_dir / "*.parquet")
    assert sorted(df["review_id"]) == sorted(source["review_id"])  # one output row per input row
    assert df["review_id"].n_unique() == 30
    joined = source.join(df.select("review_id", "rating"), on="review_id", suffix="_out")
    assert (joined["rating"] == joined["rating_out"]).all()  # kept columns are the input's values

    bad = df.filter(pl.col("review_id").is_in(bad_ids))
    assert bad["error"].to_list() == ["text is null", "text is empty"]
    assert bad["generated_text"].is_null().all()
    assert (np.stack(bad["embedding"].to_numpy()) == 0).all()  # zeros, not null: see enrichment.py

    good = df.filter(pl.col("error").is_null())
    assert good.height == 28
    assert (good["generated_text"].str.len_chars() > 0).all()
    assert good["n_generated_tokens"].is_between(1, 4).all()
    assert (good["n_prompt_tokens"] > 10).all()
    assert set(good["finish_reason"]) <= {"stop", "length"}
    assert "length" in set(good["finish_reason"])  # 4 new tokens rarely finish a sentence
    vectors = np.stack(good["embedding"].to_numpy())
    assert vectors.shape == (28, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    for part in parts:  # pyarrow itself reads every part back, error rows included
        table = pq.read_table(output / part)
        assert table.schema.field("embedding").type == pa.list_(pa.float32(), 384)

    # MLflow: one run, params, per-shard metrics stepped by shard index, totals, flow-run tag.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri())
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["generate.model"] == "bundled:smollm2-135m-instruct"
    assert run.data.params["embed.model"] == "bundled:all-minilm-l6-v2"
    assert run.data.params["rows_per_shard"] == "8"
    assert run.data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
    history = client.get_metric_history(run.info.run_id, "shard_rows")
    assert sorted(m.step for m in history) == list(range(len(manifest["shards"])))
    assert sum(m.value for m in history) == 30
    assert run.data.metrics["rows"] == 30
    assert run.data.metrics["generated_tok_per_s"] > 0 and run.data.metrics["cost"] > 0

    # MLflow lineage: input files with their exact digests, the output, models, code version.
    contexts = {}
    for dataset_input in run.inputs.dataset_inputs:
        context = {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"]
        contexts.setdefault(context, []).append(dataset_input.dataset)
    assert sorted(d.name for d in contexts["input"]) == [f"reviews-00{i}.parquet" for i in range(3)]
    digests = {f["uri"].rsplit("/", 1)[-1]: f["fingerprint"][:32] for f in manifest["input"]}
    assert {d.name: d.digest for d in contexts["input"]} == digests
    assert [json.loads(d.source)["uri"] for d in contexts["output"]] == [str(output)]
    assert run.data.params["model.generate.revision"] == manifest["models"]["generate"]["revision"]
    assert len(run.data.params["model.generate.revision"]) == 64  # the GGUF file's sha256
    assert run.data.params["model.embed.device"] == "cpu" and run.data.params["model.embed.dtype"] == "float32"
    assert run.data.params["generate.prompt_hash"] and "{product}" in run.data.params["generate.prompt_template"]
    assert run.data.tags["shardwise.version"] == "0.1.0" and run.data.tags["shardwise.git_commit"]
    assert run.data.tags["prefect.flow_run_url"].endswith(str(state.state_details.flow_run_id))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"job_config.json", "manifest.json", "throughput.png"} <= artifacts
    for metric in (
        "cost_per_1k_rows",
        "cost_per_1m_generated_tokens",
        "prompt_tok_per_s",
        "device_seconds",
        "seconds_read",
        "seconds_compute",
        "seconds_write",
    ):
        assert run.data.metrics[metric] > 0, metric
    for metric in (
        "shard_seconds_read",
        "shard_seconds_compute",
        "shard_seconds_write",
        "shard_cost",
        "shard_cost_per_1k_rows",
        "shard_cost_per_1m_generated_tokens",
        "shard_rows_per_s",
        "shard_prompt_tok_per_s",
        "shard_generated_tok_per_s",
    ):
        assert len(client.get_metric_history(run.info.run_id, metric)) == len(manifest["shards"]), metric

    # Lineage travels with the data: every part's footer names its run, models, prompt and rows.
    for part in parts:
        lineage = read_part_lineage(str(output / part))
        assert lineage["mlflow_run_id"] == summary["mlflow_run_id"]
        assert lineage["prefect_flow_run_id"] == str(state.state_details.flow_run_id)
        assert lineage["generate_model_revision"] == run.data.params["model.generate.revision"]
        assert lineage["prompt_hash"] == run.data.params["generate.prompt_hash"]
        assert lineage["source"].endswith(".parquet") and ":" in lineage["source_rows"]

    # Prefect: one task run per shard, named after it; progress, table and summary artifacts.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )

    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as prefect:
        task_runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        flow_run = prefect.read_flow_run(flow_run_id)
        artifacts = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    assert flow_run.state.is_completed()
    shard_runs = sorted(t.name for t in task_runs if t.name.startswith("shard-"))
    assert shard_runs == [f"shard-{i:05d}" for i in range(len(manifest["shards"]))]
    by_type = {a.type: a for a in artifacts}
    assert by_type["progress"].data == 100.0
    table = json.loads(by_type["table"].data) if isinstance(by_type["table"].data, str) else by_type["table"].data
    assert sorted(row["shard"] for row in table) == shard_runs
    assert all(row["status"] == "committed" and row["rows"] > 0 for row in table)
    by_key = {a.key: a for a in artifacts if a.key}  # two markdown artifacts: the summary and the quality gate
    assert str(output) in by_key["run-summary"].data and "succeeded" in by_key["run-summary"].data
    assert by_key["quality-gate"].type == "markdown" and "passed" in by_key["quality-gate"].data

    # `shardwise lineage` answers for a row by id.
    from shardwise.flows.cli import main

    assert main(["lineage", str(output), "--id", "r-000013"]) == 0
    printed = capsys.readouterr().out
    assert "reviews-001.parquet row 3" in printed and summary["mlflow_run_id"] in printed

    # Analysts' tools read the output as is.
    import duckdb

    count = duckdb.connect().execute(f"select count(*) from read_parquet('{output}/part-*.parquet')").fetchall()[0][0]
    assert count == 30


def test_embed_only_keeping_just_the_id(prefect_server, reviews_dir, tmp_path):
    output = tmp_path / "out"
    cfg = JobConfig(
        input=str(reviews_dir),
        output=str(output),
        task="embed",
        id_column="review_id",
        keep_columns="id",
        rows_per_shard=16,
    )
    state, summary = run_flow(cfg)
    assert state.is_completed() and summary["rows"] == 30
    df = pl.read_parquet(output / "part-*.parquet")
    assert df.columns == ["review_id", "embedding", "truncated", "error"]
    assert df["error"].is_null().all() and df.height == 30


def test_an_empty_dataset_fails_the_flow_unless_allowed(prefect_server, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    empty = pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())})
    pq.write_table(empty, source / "empty.parquet")
    output = tmp_path / "out"
    state, _ = run_flow(JobConfig(input=str(source), output=str(output)))
    assert state.is_failed() and "has no rows (1 file(s), 0 rows)" in state.message, state.message
    assert not (output / "_SUCCESS").exists()

    state, summary = run_flow(JobConfig(input=str(source), output=str(output), allow_empty=True))
    assert state.is_completed() and summary["succeeded"] and summary["rows"] == 0
    manifest = json.loads((output / "_manifest.json").read_text())
    assert manifest["shards"] == [] and manifest["totals"]["rows"] == 0
    assert (output / "_SUCCESS").exists()
    (part,) = output.glob("part-*.parquet")
    assert pq.read_table(part).num_rows == 0 and "generated_text" in pq.read_schema(part).names


def test_rerun_resumes_only_missing_or_damaged_shards(prefect_server, reviews_dir, tmp_path):
    output = tmp_path / "out"
    cfg = JobConfig(input=str(reviews_dir), output=str(output), task="embed", id_column="review_id", rows_per_shard=4)
    state, first = run_flow(cfg)
    assert state.is_completed() and first["shards_total"] == 9
    reference = pl.read_parquet(output / "part-*.parquet").sort("review_id")

    parts = sorted(output.glob("part-*.parquet"))
    parts[0].unlink()  # a shard that never got written
    parts[4].write_bytes(parts[4].read_bytes()[:100])  # a damaged part
    (output / "_SUCCESS").unlink()

    state, second = run_flow(cfg)
    assert state.is_completed() and second["succeeded"]
    assert second["rows"] == 30 and second["shards_committed"] == 9

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as prefect:
        runs = prefect.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    assert sorted(t.name for t in runs if t.name.startswith("shard-")) == ["shard-00000", "shard-00004"]
    again = pl.read_parquet(output / "part-*.parquet").sort("review_id")
    assert again.equals(reference)
    assert (output / "_SUCCESS").exists()


def test_rerun_with_another_config_refuses_unless_overwrite(prefect_server, reviews_dir, tmp_path):
    from shardwise.tasks.errors import ConfigError

    output = tmp_path / "out"
    base = {
        "input": str(reviews_dir),
        "output": str(output),
        "task": "embed",
        "id_column": "review_id",
        "rows_per_shard": 16,
    }
    state, _ = run_flow(JobConfig(**base))
    assert state.is_completed()
    changed = JobConfig(**{**base, "keep_columns": "id"})
    state, result = run_flow(changed)
    assert state.is_failed()
    assert isinstance(result, ConfigError) and "keep_columns changed" in str(result)
    assert (output / "_SUCCESS").exists()  # the earlier complete output is untouched

    state, summary = run_flow(JobConfig(**{**base, "keep_columns": "id", "overwrite": True}))
    assert state.is_completed() and summary["rows"] == 30
    assert pl.read_parquet(output / "part-*.parquet").columns == ["review_id", "embedding", "truncated", "error"]


def test_a_timeout_during_model_work_stops_the_shard_and_frees_the_model(prefect_server, reviews_dir, tmp_path):
    # The model runs on the compute thread; the timed-out task stops waiting for it, and the model
    # call stops at its next batch instead of running through the shard (thirty one-row batches
    # of 48 forced tokens here, far longer than the timeout).
    import time

    from shardwise.gpu_runtime import GenerationParams, load_generation_engine, on_compute_thread

    spec = "dummy:llama-135m"
    engine = load_generation_engine(spec, device="cpu")  # loading is not what the timeout should catch
    # One batch of the shards below, timed now: how long stopping "at the next batch" may take
    # depends on how busy the machine is (other test workers); running through the shards takes
    # 90 of them.
    began = time.monotonic()
    engine.generate(["a review"], GenerationParams(max_new_tokens=48, ignore_eos=True, max_batch_size=1))
    one_batch = time.monotonic() - began
    cfg = JobConfig(
        input=str(reviews_dir),
        output=str(tmp_path / "out"),
        task="generate",
        id_column="review_id",
        rows_per_shard=30,
        shard_timeout_s=2,
        shard_retries=0,
        device="cpu",
        generate={
            "model": spec,
            "prompt_template": "{text}",
            "max_new_tokens": 48,
            "ignore_eos": True,
            "max_batch_size": 1,
        },
    )
    started = time.monotonic()
    state, summary = run_flow(cfg)
    assert not state.is_completed() and state.message == "3 of 3 shards failed"
    assert summary["shards_committed"] == 0
    waited = time.monotonic()
    assert on_compute_thread(lambda: "free") == "free"
    freed_after = time.monotonic() - waited
    assert freed_after < max(10, 8 * one_batch), (
        f"the timed-out model call kept the compute thread busy {freed_after:.1f}s"
    )
    assert time.monotonic() - started < max(60, 30 * one_batch)


def test_shard_tasks_carry_the_concurrency_tag_while_a_limit_exists(prefect_server, reviews_dir, tmp_path):
    # Without a limit the tag is left off: Prefect would ask the server for a slot on every shard.
    from uuid import uuid4

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    tag = f"test-gpu-{uuid4().hex[:8]}"

    def shard_tags_of_a_run(output: Path) -> set[tuple[str, ...]]:
        cfg = JobConfig(
            input=str(reviews_dir),
            output=str(output),
            task="embed",
            id_column="review_id",
            rows_per_shard=15,
            concurrency_tag=tag,
            embed={"model": "dummy:bert-tiny"},
        )
        state, summary = run_flow(cfg)
        assert state.is_completed() and summary["rows"] == 30
        with get_client(sync_client=True) as prefect:
            runs = prefect.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            )
        tags = [tuple(sorted(t.tags)) for t in runs if t.name.startswith("shard-")]
        assert len(tags) == 3  # one per input file
        return set(tags)

    assert shard_tags_of_a_run(tmp_path / "no-limit") == {()}
    with get_client(sync_client=True) as prefect:
        prefect.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=f"tag:{tag}", limit=1))
    assert shard_tags_of_a_run(tmp_path / "limited") == {(tag,)}


def test_a_hung_shard_times_out_and_is_retried(prefect_server, reviews_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDWISE_HANG_AT", "shard-compute:2")  # the 2nd shard attempt hangs for an hour
    output = tmp_path / "out"
    cfg = JobConfig(
        input=str(reviews_dir),
        output=str(output),
        task="embed",
        id_column="review_id",
        rows_per_shard=10,
        shard_timeout_s=3,
    )
    started = __import__("time").monotonic()
    state, summary = run_flow(cfg)
    assert state.is_completed() and summary["rows"] == 30
    assert __import__("time").monotonic() - started < 120

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as prefect:
        runs = prefect.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    retried = [t for t in runs if t.name.startswith("shard-") and t.run_count > 1]
    assert len(retried) == 1
