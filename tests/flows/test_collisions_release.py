"""One output never mixes two things under one name or one state.

Input columns named like the columns shardwise writes are refused before any work (exit 2), for
every task; ``--keep-columns id`` avoids the collision unless the id column itself collides. And
``shardwise release`` is all-or-nothing: it records the release in MLflow first and publishes
(``_SUCCESS``, no ``_QUALITY_HOLD``) only after that worked; an output without its parts is never
published."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.cli import run_cli
from tests.flows.test_cli import assert_one_line_error
from tests.flows.test_quality_gate import mlflow_run

TEXTS = ["The kettle boils fast.", "Too loud for a blender.", "Arrived broken, refunded."]


def write_input(directory: Path, **extra: list) -> Path:
    directory.mkdir(parents=True)
    table = pa.table({"review_id": ["r1", "r2", "r3"], "text": TEXTS, **extra})
    pq.write_table(table, directory / "reviews.parquet")
    return directory


def run_args(input_dir: Path, output: Path, *flags: str) -> list[str]:
    return [
        "run",
        "--input",
        str(input_dir),
        "--output",
        str(output),
        "--id-column",
        "review_id",
        "--device",
        "cpu",
        "--max-new-tokens",
        "4",
        *flags,
    ]


def assert_refused_before_work(proc, output: Path, *needles: str) -> None:
    assert_one_line_error(proc, 2, *needles)
    assert "Loading weights" not in proc.stderr and " rows in " not in proc.stderr  # refused in the checks
    assert not output.exists() or not list(output.glob("part-*.parquet"))


# ---- input columns named like output columns -------------------------------------------------


def test_input_column_truncated_is_refused_for_embed_and_kept_out_with_keep_columns_id(cli, tmp_path):
    input_dir = write_input(tmp_path / "in", truncated=[False, True, False])
    out = tmp_path / "out"
    refused = cli(*run_args(input_dir, out, "--task", "embed"))
    assert_refused_before_work(refused, out, "'truncated'", "--keep-columns id", "rename")

    kept = cli(*run_args(input_dir, out, "--task", "embed", "--keep-columns", "id"))
    assert kept.returncode == 0, kept.stderr[-3000:]
    written = pq.read_table(out)
    assert written.column_names == ["review_id", "embedding", "truncated", "error"]
    assert written.num_rows == 3 and (out / "_SUCCESS").is_file()


def test_generation_columns_are_refused_for_both_and_a_colliding_id_even_with_keep_columns_id(cli, tmp_path):
    input_dir = write_input(
        tmp_path / "in", error=["x", "y", "z"], generated_text=["a", "b", "c"], finish_reason=["s", "s", "s"]
    )
    out = tmp_path / "out"
    refused = cli(*run_args(input_dir, out, "--task", "both"))
    assert_refused_before_work(refused, out, "'error'", "'generated_text'", "'finish_reason'", "--keep-columns id")

    colliding_id = cli(*run_args(input_dir, out, "--task", "embed", "--keep-columns", "id", "--id-column", "error"))
    assert_refused_before_work(colliding_id, out, "id column 'error'", "rename")


def test_output_columns_come_from_one_place_for_every_task_and_output_schema():
    """The check's column names are exactly what enrich_table adds, for each task, with and
    without an output schema (fake engines returning the engines' own result types: no model loads)."""
    import numpy as np

    from shardwise.gpu_runtime import EmbeddingOutput, Generation
    from shardwise.tasks.config.job import JobConfig
    from shardwise.tasks.config.output_columns import enrichment_column_names
    from shardwise.tasks.records.enrichment import enrich_table

    class Generator:
        def generate(self, prompts, params):
            return [Generation('{"ok": true}', 3, 2, "stop", False) for _ in prompts]

    class Embedder:
        dim = 2

        def embed(self, texts, **_):
            return EmbeddingOutput(np.array([[1.0, 0.0]] * len(texts)), [1] * len(texts), [False] * len(texts))

    table = pa.table({"id": ["a", "b"], "text": ["one", None]})
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    for task in ("generate", "embed", "both"):
        for output_schema in (None, schema):
            for engine in ("hf", "vllm"):
                generate = {"engine": engine, "output_schema": output_schema}
                cfg = JobConfig(input="x", output="y", task=task, generate=generate)
                out, _ = enrich_table(table, cfg, Generator(), Embedder())
                assert out.column_names[2:] == enrichment_column_names(cfg), (task, output_schema, engine)


# ---- release: all-or-nothing ----------------------------------------------------------------


@pytest.fixture(scope="module")
def held_once(prefect_server, tmp_path_factory) -> Path:
    """A complete output held by the gate (one row has no text, no error is allowed), made once;
    each test releases its own copy (the copies share the run's MLflow run)."""
    root = tmp_path_factory.mktemp("held")
    input_dir = root / "in"
    input_dir.mkdir()
    pq.write_table(
        pa.table({"review_id": ["r1", "r2", "r3", "r4"], "text": [*TEXTS, None]}), input_dir / "reviews.parquet"
    )
    out = root / "out"
    proc = run_cli(*run_args(input_dir, out, "--task", "embed", "--set", "quality.max_error_rate=0"))
    assert_one_line_error(proc, 4, "error_rate")
    assert (out / "_QUALITY_HOLD").is_file() and not (out / "_SUCCESS").exists()
    return out


@pytest.fixture
def held_output(held_once, tmp_path) -> Path:
    copy = tmp_path / "held"
    shutil.copytree(held_once, copy)
    return copy


def assert_still_held(out: Path) -> None:
    assert not (out / "_SUCCESS").exists()
    assert (out / "_QUALITY_HOLD").is_file()
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "held" and "release" not in manifest.get("quality", {})


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_release_records_in_mlflow_before_it_publishes_and_can_be_retried(cli, held_output, tmp_path):
    run_id = json.loads((held_output / "_manifest.json").read_text())["mlflow_run_id"]

    unreachable = f"http://shardwise:canary-secret@127.0.0.1:{closed_port()}"
    env = {"MLFLOW_TRACKING_URI": unreachable, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    proc = cli("release", str(held_output), "--reason", "looked at it", env=env)
    assert_one_line_error(proc, 3, run_id, "REDACTED", "nothing was published")
    assert "canary-secret" not in proc.stderr + proc.stdout
    assert_still_held(held_output)

    other_store = f"sqlite:///{tmp_path / 'other-mlflow.db'}"
    proc = cli("release", str(held_output), "--reason", "looked at it", env={"MLFLOW_TRACKING_URI": other_store})
    assert_one_line_error(proc, 2, run_id, "not found", other_store, "nothing was published")
    assert_still_held(held_output)
    assert cli("status", str(held_output)).returncode == 4

    released = cli("release", str(held_output), "--reason", "looked at it")
    assert released.returncode == 0, released.stderr
    assert (held_output / "_SUCCESS").is_file() and not (held_output / "_QUALITY_HOLD").exists()
    assert json.loads((held_output / "_manifest.json").read_text())["quality"]["release"]["reason"] == "looked at it"
    tags = mlflow_run(held_output).data.tags
    assert tags["shardwise.quality.reason"] == "looked at it" and tags["shardwise.quality.released_by"]


def test_release_refuses_a_held_output_without_its_parts(cli, held_output, tmp_path):
    tags_before = mlflow_run(held_output).data.tags
    missing = tmp_path / "missing-part"
    shutil.copytree(held_output, missing)
    (part,) = missing.glob("part-*.parquet")
    part.unlink()
    proc = cli("release", str(missing))
    assert_one_line_error(proc, 2, part.name, "missing", "nothing was published")
    assert_still_held(missing)
    assert mlflow_run(held_output).data.tags == tags_before  # nothing recorded either

    empty = tmp_path / "no-parts"
    shutil.copytree(held_output, empty)
    next(empty.glob("part-*.parquet")).unlink()
    manifest = json.loads((empty / "_manifest.json").read_text())
    (empty / "_manifest.json").write_text(json.dumps({**manifest, "shards": []}))
    proc = cli("release", str(empty))
    assert_one_line_error(proc, 2, "no committed parts", "nothing was published")
    assert not (empty / "_SUCCESS").exists() and (empty / "_QUALITY_HOLD").is_file()


def test_a_release_cut_short_after_the_manifest_is_finished_by_running_it_again(cli, held_output):
    manifest = json.loads((held_output / "_manifest.json").read_text())
    cut_short = {"released_by": "someone@host", "released_at": "2026-12-01T00:00:00Z", "reason": "first try"}
    quality = {**manifest["quality"], "release": cut_short}
    (held_output / "_manifest.json").write_text(json.dumps({**manifest, "status": "succeeded", "quality": quality}))
    released = cli("release", str(held_output), "--reason", "second try")
    assert released.returncode == 0, released.stderr
    assert (held_output / "_SUCCESS").is_file() and not (held_output / "_QUALITY_HOLD").exists()
    assert json.loads((held_output / "_manifest.json").read_text())["quality"]["release"]["reason"] == "second try"
