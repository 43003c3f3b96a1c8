"""Serving endpoints as engines (``engine: openai``), against real servers: vLLM's OpenAI-compatible
server (the CPU build in the test environment) serving the bundled SmolLM2 and MiniLM on loopback,
started once for this module, and a fault-injecting proxy in front of it (tests/fault_proxy.py).

The same job run on the local engines and on the endpoints writes the same rows; the proxy's 429s,
500s, dropped connections and slow answers lose and duplicate nothing; a server gone fails the
shard, never writes error rows, and the rerun sends only the rows not committed; a wrong base URL
or a missing key is exit 2 before any work; the key is stored nowhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from shardwise.tasks.records.demo_data import write_reviews_dataset
from tests.fault_proxy import FaultProxy
from tests.flows.test_cli import assert_one_line_error
from tests.flows.test_security import files_containing
from tests.flows.test_vllm_engine import needs_vllm
from tests.servers import start_vllm_openai_server, wait_until_healthy

pytestmark = [needs_vllm, pytest.mark.slow]

DEMO = Path(__file__).resolve().parents[2] / "conf" / "jobs" / "demo.yaml"
API_KEY = "sk-shardwise-test-7f3a9c1e5b"
KEY_ENV = "SHARDWISE_TEST_ENDPOINT_KEY"
GEN_FIELDS = ["generated_text", "n_prompt_tokens", "n_generated_tokens", "finish_reason", "truncated", "error"]


@pytest.fixture(scope="module")
def booting(tmp_path_factory):
    """Both servers starting (each takes tens of seconds), stopped after the module."""
    from shardwise.gpu_runtime import resolve_model_spec
    from shardwise.gpu_runtime.gguf_cache import weights_dir

    root = tmp_path_factory.mktemp("vllm-servers")
    gen_dir = weights_dir(resolve_model_spec("bundled:smollm2-135m-instruct"))
    embed_dir = str(resolve_model_spec("bundled:all-minilm-l6-v2").path)
    started = [
        start_vllm_openai_server(root / "gen", gen_dir, "smollm2", API_KEY, "--max-model-len", "2048"),
        start_vllm_openai_server(root / "embed", embed_dir, "minilm", API_KEY, "--runner", "pooling"),
    ]
    try:
        yield root, started
    finally:
        for proc, _ in started:
            proc.terminate()
        for proc, _ in started:
            try:
                proc.wait(timeout=60)
            except Exception:  # noqa: BLE001 - a server that will not stop is killed
                proc.kill()


@pytest.fixture(scope="module")
def servers(booting, local_rows):
    """(generation base URL, embedding base URL) of the running servers; the local engines' run
    (``local_rows``) goes first, while they start."""
    root, started = booting
    for (proc, url), name in zip(started, ("gen", "embed")):
        health = url.removesuffix("/v1") + "/health"
        wait_until_healthy(f"vLLM {name} server", proc, root / name / "server.log", health, timeout=300)
    return started[0][1], started[1][1]


@pytest.fixture(scope="module")
def reviews(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("endpoint-data") / "reviews"
    write_reviews_dataset(str(directory), files=2, rows_per_file=8, rows_per_group=4)
    return directory


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, API_KEY)


def job(reviews: Path, output: Path, *extra: str) -> list[str]:
    return [
        "run", "--config", str(DEMO), "--input", str(reviews), "--output", str(output),
        "--device", "cpu", "--max-new-tokens", "24", *extra,
    ]  # fmt: skip


def on_endpoints(gen_url: str, embed_url: str | None = None, **settings: object) -> list[str]:
    """Flags that put generation (and embedding, with ``embed_url``) on endpoints."""
    sets = [f"generate.api_key_env={KEY_ENV}"] + [f"generate.{k}={v}" for k, v in settings.items()]
    if embed_url is not None:
        sets += ["embed.engine=openai", f"embed.base_url={embed_url}", f"embed.api_key_env={KEY_ENV}"]
    return ["--engine", "openai", "--base-url", gen_url, *[a for s in sets for a in ("--set", s)]]


def rows(output: Path) -> dict[str, dict]:
    table = pq.read_table(sorted(output.glob("part-*.parquet")))
    return {row["review_id"]: row for row in table.to_pylist()}


@pytest.fixture(scope="module")
def local_rows(booting, reviews, tmp_path_factory, prefect_server):
    from tests.cli import run_cli

    output = tmp_path_factory.mktemp("local") / "out"
    done = run_cli(*job(reviews, output, "--engine", "hf"))
    assert done.returncode == 0, done.stderr[-3000:]
    return rows(output)


def test_a_job_on_endpoints_writes_what_the_local_engines_write(
    cli, servers, reviews, local_rows, tmp_path, key, session_dir
):
    gen_url, embed_url = servers
    output = tmp_path / "out"
    done = cli(*job(reviews, output, *on_endpoints(gen_url, embed_url)))
    assert done.returncode == 0, done.stderr[-3000:]

    remote = rows(output)
    assert remote.keys() == local_rows.keys() and len(remote) == 16
    for review_id, row in remote.items():
        local = local_rows[review_id]
        assert {f: row[f] for f in GEN_FIELDS} == {f: local[f] for f in GEN_FIELDS}, review_id
        assert np.allclose(row["embedding"], local["embedding"], atol=1e-5), review_id

    # The engine and the endpoint's host are recorded with every part and in the manifest; the
    # key nowhere: not in the output, the MLflow store, Prefect's database or what was printed.
    footer = pq.read_metadata(sorted(output.glob("part-*.parquet"))[0]).metadata
    host = gen_url.split("//")[1].split("/")[0]
    assert footer[b"shardwise.generate_engine"].decode().startswith("openai (vllm at ")
    assert footer[b"shardwise.generate_endpoint"].decode() == host
    models = json.loads((output / "_manifest.json").read_text())["models"]
    assert models["generate"]["engine"] == "openai" and models["generate"]["endpoint"] == host
    assert models["embed"]["engine"] == "openai" and models["embed"]["served_model"] == "minilm"
    assert files_containing(output, API_KEY.encode()) == []
    assert files_containing(session_dir, API_KEY.encode()) == []
    assert API_KEY not in done.stdout + done.stderr


def test_faults_of_the_server_lose_and_duplicate_nothing(cli, servers, reviews, local_rows, tmp_path, key):
    """429s with and without Retry-After, 500s, connections dropped before and after the server
    did the work and answers slower than the request timeout: every row is written once, equal to
    the local engine's, and no row's answer reaches the engine twice."""
    gen_url, _ = servers
    faults = {
        0: ("status", 429, {"Retry-After": "1"}),
        1: ("status", 429, {}),
        2: ("status", 429, {}),
        3: ("status", 500, {}),
        5: "drop",
        7: "drop-after",
        9: ("slow", 9.0),
        12: ("status", 503, {}),
        14: "drop-after",
        18: ("status", 429, {}),
    }
    proxy = FaultProxy(gen_url, faults)
    try:
        settings = {"max_concurrency": 4, "request_timeout_s": 6, "max_retries": 6}
        done = cli(*job(reviews, tmp_path / "out", "--task", "generate", *on_endpoints(proxy.base_url, **settings)))
    finally:
        proxy.close()
    assert done.returncode == 0, done.stderr[-3000:]
    assert sum(proxy.faults_injected().values()) == len(faults), proxy.requests
    written = rows(tmp_path / "out")
    assert written.keys() == local_rows.keys()
    for review_id, row in written.items():
        assert {f: row[f] for f in GEN_FIELDS} == {f: local_rows[review_id][f] for f in GEN_FIELDS}
    # One delivered answer per row: nothing answered was asked again.
    assert sorted(proxy.delivered.values()) == [1] * 16
    # At most max_concurrency requests in flight, and one more at the proxy: the slow answer the
    # client gave up on, which the proxy still holds.
    assert proxy.max_in_flight <= 4 + 1


def test_a_server_gone_fails_the_shard_and_the_rerun_sends_only_what_is_not_committed(
    cli, servers, reviews, local_rows, tmp_path, key
):
    """After the first shard's 8 rows, every connection is refused: the run fails with no part
    of error rows, and the rerun, with the server back, asks only for the other shards' rows."""
    gen_url, _ = servers
    proxy = FaultProxy(gen_url, lambda number, method, body: "refuse" if number >= 8 else None)
    output = tmp_path / "out"
    settings = {"max_concurrency": 1, "max_retries": 1}
    args = job(
        reviews, output, "--task", "generate", "--set", "shard_retries=0", *on_endpoints(proxy.base_url, **settings)
    )
    try:
        failed = cli(*args)
        assert failed.returncode == 1, failed.stderr[-3000:]
        assert "Server disconnected without sending a response" in failed.stderr, failed.stderr[-2000:]
        first = rows(output)
        assert len(first) == 8 and all(row["error"] is None for row in first.values())
        proxy.refuse_all(False)
        proxy._faults = {}
        asked_before = sum(proxy.delivered.values())
        done = cli(*args)
    finally:
        proxy.close()
    assert done.returncode == 0, done.stderr[-3000:]
    assert rows(output).keys() == local_rows.keys()
    assert asked_before == 8 and sum(proxy.delivered.values()) == 16
    assert max(proxy.delivered.values()) == 1


def test_a_prompt_too_long_for_the_server_is_that_rows_error(cli, servers, tmp_path, key):
    """The server's context is 2048 tokens: a longer row is refused (400), written with its
    error, and every other row is answered."""
    import pyarrow as pa

    texts = ["Short review: fine.", "word " * 3000, "Another short review: bad."]
    data = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": texts}), data)
    gen_url, _ = servers
    output = tmp_path / "out"
    done = cli(
        "run", "--input", str(data), "--output", str(output), "--task", "generate", "--max-new-tokens", "8",
        *on_endpoints(gen_url),
    )  # fmt: skip
    written = {row["id"]: row for row in pq.read_table(sorted(output.glob("part-*.parquet"))).to_pylist()}
    assert written["b"]["error"].startswith("the endpoint refused this row: HTTP 400")
    assert written["b"]["generated_text"] is None
    assert written["a"]["error"] is None and written["a"]["generated_text"]
    assert written["c"]["error"] is None and written["c"]["generated_text"]
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_wrong_base_url_or_key_is_a_config_error_before_any_work(cli, servers, reviews, tmp_path, monkeypatch):
    from tests.servers import free_port

    gen_url, _ = servers
    nothing_there = f"http://127.0.0.1:{free_port()}/v1"
    monkeypatch.setenv(KEY_ENV, API_KEY)
    refused = cli(*job(reviews, tmp_path / "a", "--task", "generate", *on_endpoints(nothing_there)))
    assert_one_line_error(refused, 2, "generate.base_url", "cannot reach 127.0.0.1")

    monkeypatch.delenv(KEY_ENV)
    missing = cli(*job(reviews, tmp_path / "b", "--task", "generate", *on_endpoints(gen_url)))
    assert_one_line_error(missing, 2, "generate.api_key_env", KEY_ENV, "not set")

    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    wrong = cli(*job(reviews, tmp_path / "c", "--task", "generate", *on_endpoints(gen_url)))
    assert_one_line_error(wrong, 2, "generate.base_url", "401")
    assert not any(p.exists() for p in (tmp_path / "a", tmp_path / "b", tmp_path / "c"))
    assert "sk-wrong" not in wrong.stderr + wrong.stdout and os.environ[KEY_ENV] == "sk-wrong"


def test_an_output_schema_goes_to_the_endpoint_as_its_response_format(cli, servers, reviews, tmp_path, key):
    """The server constrains the answers (vLLM's json_schema response format): they parse and
    follow the schema, as typed rows in `generated`."""
    gen_url, _ = servers
    schema = {
        "type": "object",
        "properties": {"sentiment": {"type": "string", "enum": ["positive", "negative", "mixed"]}},
        "required": ["sentiment"],
        "additionalProperties": False,
    }
    output = tmp_path / "out"
    done = cli(
        *job(reviews, output, "--task", "generate", "--output-schema", json.dumps(schema), *on_endpoints(gen_url))
    )
    assert done.returncode == 0, done.stderr[-3000:]
    written = rows(output)
    assert len(written) == 16
    for row in written.values():
        assert row["error"] is None, row
        assert json.loads(row["generated_text"]) == {"sentiment": row["generated"]["sentiment"]}
        assert row["generated"]["sentiment"] in ("positive", "negative", "mixed")
