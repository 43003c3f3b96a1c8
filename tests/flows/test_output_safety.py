"""Nothing outside a run's own files is touched, on local disk and on a real S3 API.

Each test drives ``shardwise run`` against the session's Prefect server, with the bundled embedding
model: overlapping input/output, foreign files, glob characters in paths, all-or-nothing S3 uploads
(multipart included), and the output's lease. Runs that are killed, hang, raise at a crash point
(counted per process) or start worker processes are the real console script in a subprocess; the
others run the command in the test process (tests/cli.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardwise.tasks.records.demo_data import write_reviews_dataset
from tests.cli import Result
from tests.flows.test_integrity import SHARDWISE, Storage, shardwise

pytestmark = pytest.mark.slow

EMBED = ["--task", "embed", "--id-column", "review_id", "--rows-per-shard", "3"]
BLOCK_5MIB = 5 * 2**20  # s3fs's smallest block size: parts larger than two blocks go multipart


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, prefect_server):
    if request.param == "local":
        return Storage(str(tmp_path))
    fs, bucket = request.getfixturevalue("s3")
    return Storage(f"s3://{bucket}", fs)


def _options() -> dict:
    from shardwise.tasks.storage.fs import runtime_storage_options

    return runtime_storage_options()


def write_input(store: Storage, name: str, files: int = 2, rows: int = 6) -> None:
    write_reviews_dataset(
        store.path(name), files=files, rows_per_file=rows, rows_per_group=3, storage_options=_options()
    )


def put(store: Storage, name: str, data: bytes) -> None:
    if store.fs is None:
        path = Path(store.path(name))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    else:
        store.fs.pipe_file(store.path(name).removeprefix("s3://"), data)


def get(store: Storage, name: str) -> bytes:
    if store.fs is None:
        return Path(store.path(name)).read_bytes()
    store.fs.invalidate_cache()
    return store.fs.cat_file(store.path(name).removeprefix("s3://"))


def snapshot(store: Storage, directory: str) -> dict[str, str]:
    """name -> sha256 of every file directly under ``directory``."""
    return {n: hashlib.sha256(get(store, f"{directory}/{n}")).hexdigest() for n in store.listdir(directory)}


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def error_lines(proc: subprocess.CompletedProcess | Result) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("shardwise: error:")]


# ---- 1. overlapping input/output and foreign files -------------------------------------------


def test_an_output_overlapping_the_input_is_refused_and_nothing_is_written(store, cli):
    write_input(store, "data/in")
    put(store, "data/in/part-00000.parquet", get(store, "data/in/reviews-000.parquet"))
    before = snapshot(store, "data/in")
    cases = [("data/in", "data/in"), ("data/in", "data/in/out"), ("data/in", "data"), ("data/in/", "data/./in")]
    for source, output in cases:
        proc = cli("run", "--input", store.path(source), "--output", store.path(output), *EMBED)
        assert proc.returncode == 2, (source, output, proc.returncode, proc.stderr[-2000:])
        assert len(error_lines(proc)) == 1 and "input" in error_lines(proc)[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert snapshot(store, "data/in") == before, (source, output)
        assert store.listdir("data/in/out") == []


def test_foreign_files_in_the_output_are_refused_and_left_byte_for_byte(store, cli):
    write_input(store, "in")
    foreign = {
        "part-00000-1b2c-c000.snappy.parquet": parquet_bytes(pa.table({"x": [1, 2]})),  # Spark's naming
        "part-notmine-0000000000-abcdef0123.parquet": parquet_bytes(pa.table({"x": [3]})),  # ours, footer not
        "README.txt": b"hands off\n",
    }
    for name, data in foreign.items():
        put(store, f"out/{name}", data)
    before = snapshot(store, "out")
    for extra in ([], ["--overwrite"]):
        proc = cli("run", "--input", store.path("in"), "--output", store.path("out"), *EMBED, *extra)
        assert proc.returncode == 2, (extra, proc.returncode, proc.stderr[-2000:])
        assert "did not write" in error_lines(proc)[0] and "README.txt" in error_lines(proc)[0]
        assert snapshot(store, "out") == before


# ---- 2. glob characters in output paths ----------------------------------------------------


def test_glob_characters_in_an_output_name_mean_that_directory_only(store, cli):
    write_input(store, "in-a")
    write_input(store, "in-b", files=1)
    reference = cli("run", "--input", store.path("in-a"), "--output", store.path("out1"), *EMBED)
    assert reference.returncode == 0, reference.stderr[-3000:]
    for name in store.listdir("out1"):
        put(store, f"out2/{name}", get(store, f"out1/{name}"))
    put(store, "out1/.tmp-0123-part-x.parquet", b"debris of out1's own run")  # must survive too
    out1, out2 = snapshot(store, "out1"), snapshot(store, "out2")

    for output in ["out[1]", "out?"]:
        proc = cli(
            "run",
            "--input",
            store.path("in-b"),
            "--output",
            store.path(output),
            *EMBED,
            "--set",
            "embed.max_batch_size=7",
        )
        assert proc.returncode == 0, (output, proc.stderr[-3000:])
        assert "_SUCCESS" in store.listdir(output)
        assert snapshot(store, "out1") == out1, output
        assert snapshot(store, "out2") == out2, output
        status = cli("status", store.path(output))
        assert "2/2" in status.stdout, status.stdout


# ---- 3. S3 all-or-nothing, multipart included -----------------------------------------------


def big_input(store: Storage, name: str) -> None:
    """One file, one shard, ~11 MiB of incompressible bytes: its part needs a multipart upload."""
    rows = 11
    table = pa.table(
        {
            "review_id": [f"r-{i:06d}" for i in range(rows)],
            "text": [f"review number {i}" for i in range(rows)],
            "payload": [os.urandom(2**20) for _ in range(rows)],
        }
    )
    put(store, f"{name}/big.parquet", parquet_bytes(table))


def multipart_uploads(fs, bucket: str, prefix: str) -> list[str]:
    listing = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
    return [u["Key"] for u in listing.get("Uploads") or []]


def test_s3_parts_and_manifest_are_published_whole_or_not_at_all(cli, s3, tmp_path):
    fs, bucket = s3
    store = Storage(f"s3://{bucket}", fs)
    big_input(store, "in")
    env = {"SHARDWISE_STORAGE_OPTIONS": json.dumps({**_options(), "default_block_size": BLOCK_5MIB})}
    job = [
        "run",
        "--input",
        store.path("in"),
        "--output",
        store.path("out"),
        "--task",
        "embed",
        "--id-column",
        "review_id",
        "--rows-per-shard",
        "100",
        "--set",
        "shard_retries=0",
    ]

    # An exception half-way through the part's upload (a timeout raised into the worker thread). A
    # process of its own: crash points count their arrivals per process.
    raised = shardwise(*job, env={**env, "SHARDWISE_RAISE_AT": "part-write"})
    assert raised.returncode == 1, raised.stderr[-3000:]
    assert "injected fault at part-write" in raised.stdout
    assert not [n for n in store.listdir("out") if n.startswith("part-")], store.listdir("out")
    assert multipart_uploads(fs, bucket, "out/") == []  # discarded, not left to the next run

    # SIGKILL half-way: an unfinished multipart upload, never an object; the next run aborts it.
    killed = shardwise(*job, env={**env, "SHARDWISE_CRASH_AT": "part-write"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not [n for n in store.listdir("out") if n.startswith("part-")]
    assert len(multipart_uploads(fs, bucket, "out/")) == 1
    # A truncated manifest and a stale write probe, as older versions could leave behind.
    put(store, "out/_manifest.json", b'{"format": "shardwise-manif')
    put(store, "out/.shardwise-write-probe-0123", b"ok")

    rerun = cli(*job, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert multipart_uploads(fs, bucket, "out/") == []
    files = store.listdir("out")
    assert "_SUCCESS" in files and not [n for n in files if n.startswith(".")], files
    assert json.loads(get(store, "out/_manifest.json"))["status"] == "succeeded"
    part = next(n for n in files if n.startswith("part-"))
    table = pq.read_table(io.BytesIO(get(store, f"out/{part}")))
    assert table.num_rows == 11 and len(get(store, f"out/{part}")) > 2 * BLOCK_5MIB


# ---- 7. the lease (a late worker of a killed run: tests/flows/test_fencing.py) ---------------


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.returncode
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def test_a_second_run_on_a_leased_output_is_refused_naming_the_holder(store, cli, tmp_path):
    write_input(store, "in")
    release = tmp_path / "release-first"
    job = ["run", "--input", store.path("in"), "--output", store.path("out"), *EMBED]
    first = subprocess.Popen(
        [SHARDWISE, *job],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "SHARDWISE_HANG_AT": "before-manifest", "SHARDWISE_HANG_UNTIL": str(release)},
    )
    try:
        wait_for(Path(f"{release}.reached"), first)
        second = cli(*job, "--overwrite", "--set", "embed.max_batch_size=5")
        assert second.returncode == 2, second.stderr[-3000:]
        assert "in use by another run" in error_lines(second)[0]
        assert f"pid {first.pid}" in error_lines(second)[0]
        release.touch()
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr[-3000:]
    files = store.listdir("out")
    assert "_SUCCESS" in files and "_shardwise.lease" not in files, files  # released at the end


def test_verify_part_fails_loudly_on_a_storage_outage_instead_of_recomputing(s3, s3_server, reviews_dir):
    from shardwise.tasks.config.job import JobConfig
    from shardwise.tasks.errors import StorageError
    from shardwise.tasks.output.resume import verify_part
    from shardwise.tasks.planning.shards import plan_shards
    from shardwise.tasks.records.shard_io import read_shard, write_part

    fs, bucket = s3
    cfg = JobConfig(
        input=str(reviews_dir),
        output=f"s3://{bucket}/out",
        id_column="review_id",
        task="embed",
        storage_options=_options(),
    )
    shard = plan_shards(cfg).shards[0]
    table = read_shard(shard, None).append_column("error", pa.nulls(shard.num_rows, pa.string()))
    write_part(
        table,
        cfg.output,
        shard,
        {"shard_id": shard.shard_id, "config_fingerprint": cfg.output_fingerprint()},
        cfg.storage_options,
    )
    assert verify_part(cfg, shard).part.write_id
    s3_server.cut()
    try:
        started = time.monotonic()
        with pytest.raises(StorageError, match="cannot read"):
            verify_part(cfg, shard)
        assert time.monotonic() - started < 120
    finally:
        s3_server.restore()
    assert verify_part(cfg, shard).rows == shard.num_rows


def test_a_worker_killed_mid_part_fails_the_run_cleanly_and_a_rerun_completes(prefect_server, tmp_path):
    store = Storage(str(tmp_path))
    write_input(store, "in")
    job = [
        "run",
        "--input",
        store.path("in"),
        "--output",
        store.path("out"),
        *EMBED,
        "--workers",
        "2",
        "--set",
        "shard_retries=0",
    ]
    killed = shardwise(*job, env={"SHARDWISE_CRASH_AT": "part-write"})  # each worker dies in its first part
    assert killed.returncode == 1, (killed.returncode, killed.stderr[-3000:])
    files = store.listdir("out")
    assert "_SUCCESS" not in files and "_shardwise.lease" not in files, files  # the parent released it
    rerun = shardwise(*job)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    files = store.listdir("out")
    assert "_SUCCESS" in files and not [n for n in files if n.startswith(".")], files
    ids = sorted(
        i
        for n in files
        if n.startswith("part-")
        for i in pq.read_table(store.path(f"out/{n}")).column("review_id").to_pylist()
    )
    assert ids == [f"r-{i:06d}" for i in range(12)]
