"""The ``shardwise`` command as a user runs it: its exit code and its output.

The console script itself runs as a subprocess where the process is what is checked: one error exit
(2), the storage exit (3) before any model loads, and the demo a fresh user runs with a temporary
Prefect server. The other commands run in the test process (tests/cli.py): the same ``main``, the
same exit codes and output, without an interpreter start and model load per call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardwise.gpu_runtime.device import TOKENIZERS_DEFAULTED
from tests.cli import Result, run_cli

SHARDWISE = str(Path(sys.executable).with_name("shardwise"))


def shardwise(*args: str, env_extra: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([SHARDWISE, *args], capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess | Result, code: int, *needles: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("shardwise: error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_missing_input(tmp_path):
    proc = shardwise("run", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "out"))
    assert_one_line_error(proc, 2, "input not found", "missing")


def test_missing_column_lists_the_columns(reviews_dir, tmp_path):
    proc = run_cli("run", "--input", str(reviews_dir), "--output", str(tmp_path / "out"), "--id-column", "uid")
    assert_one_line_error(proc, 2, "'uid' not found", "review_id", "created_at", "text")


def test_a_gpu_this_machine_lacks_is_a_config_error_before_any_work(reviews_dir, tmp_path):
    """``--device cuda`` without CUDA (or ``cuda:N`` past the last GPU): one line, exit 2, nothing
    written, no flow started."""
    from shardwise.gpu_runtime import visible_gpu_count

    missing = f"cuda:{visible_gpu_count()}"  # never there: CUDA absent, or one past the last GPU
    for device in [missing] + (["cuda"] if visible_gpu_count() == 0 else []):
        job = ["run", "--input", str(reviews_dir), "--output", str(tmp_path / "out"), "--id-column", "review_id"]
        proc = run_cli(*job, "--device", device)
        assert_one_line_error(proc, 2, f"device: device '{device}' requested but", "--device auto or cpu")
        assert "Flow run" not in proc.stderr
        assert not (tmp_path / "out").exists()


def test_a_missing_column_is_named_with_the_setting_that_asks_for_it(reviews_dir, tmp_path):
    out = str(tmp_path / "out")
    # No --id-column: the default 'id' is what is missing.
    proc = run_cli("run", "--input", str(reviews_dir), "--output", out, "--text-column", "text")
    assert_one_line_error(proc, 2, "column 'id' not found (the id column: --id-column, whose default is 'id')")
    proc = run_cli(
        "run",
        *("--input", str(reviews_dir), "--output", out, "--id-column", "review_id", "--task", "generate"),
        *("--prompt-template", "Review of {product} in {region}: {text}"),
    )
    assert_one_line_error(proc, 2, "column 'region' not found (the prompt template's field {region})", "rating")
    assert not (tmp_path / "out").exists()


def test_an_output_that_is_a_file_is_named_as_such(reviews_dir, tmp_path):
    blocker = tmp_path / "results.parquet"
    blocker.write_bytes(b"not a directory")
    proc = run_cli("run", "--input", str(reviews_dir), "--output", str(blocker), "--id-column", "review_id")
    assert_one_line_error(proc, 2, f"output {blocker} is a file: --output names a directory")
    assert blocker.read_bytes() == b"not a directory"


def test_categorical_and_large_string_text_columns_are_text(cli, tmp_path):
    """pandas writes a categorical column as dictionary<string>; both it and large_string are read
    as the strings they hold."""
    texts = ["The kettle boils fast and quietly.", "Shoes fell apart after a week.", "Great value."] * 2
    source = tmp_path / "in"
    source.mkdir()
    ids = pa.array([f"row-{i}" for i in range(6)])
    pq.write_table(pa.table({"id": ids, "text": pa.array(texts).dictionary_encode()}), source / "a.parquet")
    pq.write_table(pa.table({"id": ids, "text": pa.array(texts, pa.large_string())}), tmp_path / "large.parquet")
    assert pq.read_schema(source / "a.parquet").field("text").type == pa.dictionary(pa.int32(), pa.string())
    for data, out in ((source, tmp_path / "out-dict"), (tmp_path / "large.parquet", tmp_path / "out-large")):
        proc = cli("run", "--input", str(data), "--output", str(out), "--task", "embed")
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = pq.read_table(str(out)).sort_by("id").to_pylist()
        assert [r["text"] for r in rows] == [texts[int(r["id"][4:])] for r in rows]
        assert all(r["error"] is None and len(r["embedding"]) == 384 for r in rows)


def test_text_column_must_be_text(reviews_dir, tmp_path):
    proc = run_cli(
        "run",
        "--input",
        str(reviews_dir),
        "--output",
        str(tmp_path / "out"),
        "--id-column",
        "review_id",
        "--text-column",
        "rating",
    )
    assert_one_line_error(proc, 2, "'rating'", "expected a string column")


def test_invalid_flag_value_is_a_config_error(reviews_dir, tmp_path):
    proc = run_cli(
        "run", "--input", str(reviews_dir), "--output", str(tmp_path / "out"), "--set", "generate.max_new_tokens=-1"
    )
    assert_one_line_error(proc, 2, "generate.max_new_tokens")


def test_bad_partition_date_and_worker_count_are_config_errors(reviews_dir, tmp_path):
    proc = run_cli("run", "--input", str(reviews_dir), "--output", str(tmp_path / "out"), "--date", "yesterday")
    assert_one_line_error(proc, 2, "expected YYYY-MM-DD", "'yesterday'")
    proc = run_cli("run", "--input", str(reviews_dir), "--output", str(tmp_path / "out"), "--workers", "0")
    assert_one_line_error(proc, 2, "workers")
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_unwritable_output_fails_before_any_model_loads(reviews_dir, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    proc = shardwise("run", "--input", str(reviews_dir), "--output", str(blocker / "out"), "--id-column", "review_id")
    assert_one_line_error(proc, 3, "not writable")
    assert "Loading weights" not in proc.stderr


def test_unknown_bundled_model(reviews_dir, tmp_path):
    proc = run_cli(
        "run",
        "--input",
        str(reviews_dir),
        "--output",
        str(tmp_path / "out"),
        "--id-column",
        "review_id",
        "--gen-model",
        "bundled:nope",
    )
    assert_one_line_error(proc, 2, "nope")


def test_status_of_missing_output(tmp_path):
    proc = run_cli("status", str(tmp_path / "nothing"))
    assert_one_line_error(proc, 2, "no such output")


def test_status_of_a_directory_shardwise_did_not_write(tmp_path):
    """An empty directory, or another tool's parts, is not a run in progress: say so, exit 2."""
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli("status", str(empty))
    assert_one_line_error(proc, 2, "no shardwise output", "_manifest.json", str(empty))
    assert proc.stdout == ""

    spark = tmp_path / "spark"
    spark.mkdir()
    for i in range(3):
        pq.write_table(pa.table({"id": [i]}), spark / f"part-0000{i}-1b2c-c000.snappy.parquet")
    proc = run_cli("status", str(spark))
    assert_one_line_error(proc, 2, "no shardwise output", str(spark))
    assert "done" not in proc.stdout


def test_demo_rows_must_be_positive(tmp_path):
    proc = run_cli("demo", "--rows", "0", env={"SHARDWISE_HOME": str(tmp_path / "home")})
    assert_one_line_error(proc, 2, "--rows")


@pytest.mark.slow
def test_run_then_status(cli, tmp_path):
    """A complete run: progress on stderr, summary table on stdout. It reports to the session's
    Prefect server (a temporary server per run costs ~12 s; the demo test below runs the console
    script as a fresh user does, with one)."""
    source = tmp_path / "in"
    source.mkdir()
    texts = ["The kettle boils fast and quietly.", None, "Shoes fell apart after a week of light walking."] * 2
    table = pa.table({"id": [f"row-{i}" for i in range(6)], "text": pa.array(texts, pa.string())})
    pq.write_table(table, source / "a.parquet", row_group_size=2)
    output = tmp_path / "out"
    proc = cli(
        "run",
        "--input",
        str(source / "a.parquet"),
        "--output",
        str(output),
        "--task",
        "both",
        "--prompt-template",
        "Summarise: {text}",
        "--max-new-tokens",
        "3",
        "--rows-per-shard",
        "4",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "shard-00000 committed" in proc.stderr  # progress while it runs
    for label in ["rows", "shards", "generated tok/s", "rows/s", "seconds", "estimated cost", "output", "MLflow run"]:
        assert any(line.startswith(label) for line in proc.stdout.splitlines()), (label, proc.stdout)
    assert "6 (2 with errors" in proc.stdout
    assert "2/2 committed" in proc.stdout
    manifest = json.loads((output / "_manifest.json").read_text())
    assert manifest["totals"]["rows"] == 6 and manifest["totals"]["error_rows"] == 2

    status = cli("status", str(output))
    assert status.returncode == 0
    assert "2/2 done" in status.stdout and "_SUCCESS yes" in status.stdout


@pytest.mark.slow
def test_demo_from_a_fresh_directory(tmp_path, prefect_server, monkeypatch):
    """`shardwise demo` with default state dir (./.shardwise): real rows, readable by polars and DuckDB."""
    import duckdb
    import polars as pl

    # As on a fresh machine: default state dir, and no Prefect server (the run starts a temporary one).
    env = {k: v for k, v in os.environ.items() if k not in ("SHARDWISE_HOME", "PREFECT_API_URL")}
    # 8 rows over 3 files: 3 + 3 + 2, exactly what was asked for.
    proc = subprocess.run(
        [SHARDWISE, "demo", "--rows", "8", "--max-new-tokens", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 synthetic reviews" in proc.stderr
    assert "8 (0 with errors" in proc.stdout and "status           succeeded" in proc.stdout
    output = tmp_path / ".shardwise" / "demo" / "output"
    assert (output / "_SUCCESS").exists()
    df = pl.read_parquet(output / "part-*.parquet")
    assert df.height == 8 and df["generated_text"].str.len_chars().min() > 0
    assert df["review_id"].n_unique() == 8
    count = (
        duckdb.connect()
        .execute(f"select count(*), count(generated_text) from read_parquet('{output}/part-*.parquet')")
        .fetchall()
    )
    assert count == [(8, 8)]
    assert (tmp_path / ".shardwise" / "mlflow.db").exists()

    # A second, smaller demo replaces the first one's output, and says so (in this process).
    monkeypatch.chdir(tmp_path)
    again = run_cli("demo", "--rows", "6", "--max-new-tokens", "2", env={"SHARDWISE_HOME": None})
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"replacing the earlier demo output (8 rows) in {output}" in again.stderr
    assert pl.read_parquet(output / "part-*.parquet").height == 6


@pytest.mark.parametrize("user_setting", [None, "false", "true"])
def test_tokenizer_threads_default_is_marked_as_shardwises(user_setting):
    """The CLI's TOKENIZERS_PARALLELISM=false is marked as a default, which a GPU engine may turn
    on; a value the user set is neither marked nor changed."""
    env = {k: v for k, v in os.environ.items() if k not in ("TOKENIZERS_PARALLELISM", TOKENIZERS_DEFAULTED)}
    if user_setting is not None:
        env["TOKENIZERS_PARALLELISM"] = user_setting
    probe = (
        "import os, torch\n"
        "from shardwise.flows.cli import _environment_defaults\n"
        "from shardwise.gpu_runtime.device import tokenize_on_all_cores\n"
        "_environment_defaults()\n"
        "before = os.environ['TOKENIZERS_PARALLELISM']\n"
        "tokenize_on_all_cores(torch.device('cuda', 0))\n"
        "print(before, os.environ['TOKENIZERS_PARALLELISM'])\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    expected = {None: "false true", "false": "false false", "true": "true true"}[user_setting]
    assert out.stdout.split() == expected.split()


def test_output_piped_into_a_reader_that_stops_early_is_not_an_error(cli, reviews_dir, tmp_path):
    """``shardwise status OUT | head -1``: the reader goes away; the command ends as a Unix tool
    does on SIGPIPE (exit 141), silently. Its own process, since the pipe is what is tested."""
    out = tmp_path / "out"
    job = ["run", "--input", str(reviews_dir), "--output", str(out), "--task", "embed", "--id-column", "review_id"]
    assert cli(*job).returncode == 0
    for command in (["status", str(out)], ["lineage", str(out)]):
        proc = subprocess.Popen([SHARDWISE, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        proc.stdout.close()  # the reader is gone before the first line
        stderr = proc.stderr.read()
        assert proc.wait(timeout=120) == 141, (command, proc.returncode, stderr)
        assert stderr == "", stderr


def test_a_run_prints_its_progress_and_the_rest_only_with_verbose(cli, reviews_dir, tmp_path):
    """What a person reads: the forecast, the flow run's link, one line per shard, the summary.
    Prefect's task lines, the thread-timeout warning, MLflow's store set-up and weight-loading
    progress bars only with -v. The default run is a process of its own: its imports, its model
    loads and its logging set-up are what a user's terminal shows."""
    job = ["run", "--input", str(reviews_dir), "--id-column", "review_id", "--task", "embed"]
    quiet = subprocess.run([SHARDWISE, *job, "--output", str(tmp_path / "quiet")], capture_output=True, text=True)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    lines = quiet.stderr.splitlines()
    progress = [line for line in lines if " committed (" in line]
    assert len(progress) == len(json.loads((tmp_path / "quiet" / "_manifest.json").read_text())["shards"])
    assert lines[0].startswith("shardwise: forecast ") and any("View at http" in line for line in lines)
    assert len(lines) <= len(progress) + 4, quiet.stderr  # forecast, rows -> shards, link, shards
    for noise in ("Task run '", "Timeout of", "mlflow", "Loading weights", "it/s]", "Beginning flow run"):
        assert noise not in quiet.stderr, noise

    verbose = cli(*job, "--output", str(tmp_path / "verbose"), "-v")
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "Task run 'shard-00000' - Finished in state Completed()" in verbose.stderr
    assert "Beginning flow run" in verbose.stderr and " committed (" in verbose.stderr


def test_relative_paths_are_recorded_as_absolute_locations(cli, reviews_dir, tmp_path, monkeypatch):
    """Run from a project folder with relative paths: the manifest, the MLflow run and the summary
    say where the data is, whatever directory reads them later."""
    from mlflow.tracking import MlflowClient

    from shardwise.tasks.storage.local_state import tracking_uri

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(reviews_dir)
    proc = cli("run", "--input", "data", "--output", "out/q_json", "--task", "embed", "--id-column", "review_id")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "q_json" / "_manifest.json").read_text())
    assert manifest["config"]["input"] == str(tmp_path / "data")
    assert manifest["config"]["output"] == str(tmp_path / "out" / "q_json")
    run = MlflowClient(tracking_uri()).get_run(manifest["mlflow_run_id"]).data
    assert run.params["output"] == run.tags["shardwise.output"] == str(tmp_path / "out" / "q_json")
    assert run.params["input"] == run.tags["shardwise.input"] == str(tmp_path / "data")
    assert f"output           {tmp_path / 'out' / 'q_json'}" in proc.stdout


def test_an_input_with_no_rows_is_refused_unless_allowed_and_then_readers_can_open_it(cli, tmp_path):
    """An empty partition is usually an upstream failure: refused with one line (exit 2), whether
    the directory has no file or a file of no rows. With allow_empty the output is published with
    one zero-row part of the job's columns, which the next run with rows replaces."""
    import duckdb
    import polars as pl

    empty_dir, source, out = tmp_path / "landing", tmp_path / "in", tmp_path / "out"
    empty_dir.mkdir()
    job = ["--output", str(out), "--task", "both", "--max-new-tokens", "2"]
    refused = cli("run", "--input", str(empty_dir), *job)
    assert_one_line_error(refused, 2, f"input {empty_dir} has no rows (no Parquet files)", "allow_empty: true")
    planned = cli("plan", "--input", str(empty_dir), *job, "--text-column", "nosuchcol")
    assert_one_line_error(planned, 2, "has no rows")
    source.mkdir()
    schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("stars", pa.int8())])
    pq.write_table(schema.empty_table(), source / "a.parquet")
    assert_one_line_error(cli("run", "--input", str(source), *job), 2, "has no rows (1 file(s), 0 rows)")
    assert not out.exists()

    allowed = cli("run", "--input", str(source), *job, "--set", "allow_empty=true")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert (out / "_SUCCESS").exists()
    frame = pl.read_parquet(out / "part-*.parquet")
    assert frame.height == 0 and frame.columns[:3] == ["id", "text", "stars"]
    assert {"generated_text", "finish_reason", "embedding", "error"} <= set(frame.columns)
    assert frame.schema["embedding"] == pl.Array(pl.Float32, 384)
    assert duckdb.connect().execute(f"select count(*) from read_parquet('{out}/part-*.parquet')").fetchall() == [(0,)]
    status = cli("status", str(out))
    assert status.returncode == 0 and "_SUCCESS yes" in status.stdout, status.stdout

    table = pa.table({"id": ["r1", "r2"], "text": ["Good kettle.", "Bad lid."], "stars": pa.array([5, 1], pa.int8())})
    pq.write_table(table, source / "a.parquet")  # the rows land
    landed = cli("run", "--input", str(source), *job, "--set", "allow_empty=true")
    assert landed.returncode == 0, landed.stderr[-3000:]
    frame = pl.read_parquet(out / "part-*.parquet")
    assert sorted(frame["id"].to_list()) == ["r1", "r2"] and len(list(out.glob("part-*.parquet"))) == 1
