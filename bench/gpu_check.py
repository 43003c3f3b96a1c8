"""GPU check: the engines on a CUDA device with dummy weights, against the memory-bandwidth floor.

Needs only torch, transformers, sentence-transformers and numpy (what a bare GPU image has), plus
the tokenizers exported by ``bench/gpu_check.sh --prepare``. Prints one table and writes JSON:

1. copy bandwidth of the device (GB/s, bytes read + written by a large on-device copy);
2. agreement: a dummy llama-135m and MiniLM in bf16 on the device vs the same weights in fp32 on
   the CPU (cosine of next-token logits, top-1 agreement; cosine of embeddings);
3. throughput per shape: generated tok/s (``ignore_eos``, a fixed batch) next to the floor the
   bandwidth sets (every decode step reads all weights once: batch x bandwidth / weight bytes),
   the smallest shape again with a static KV cache + ``torch.compile`` (the engine option to
   choose by measurement), and embedding rows/s;
4. the vLLM engine, when vllm (a CUDA build) is importable: generated tok/s of ``dummy:llama-1b`` and
   ``dummy:llama-8b`` (``load_format="dummy"``: vLLM's own random weights of those shapes) next to
   the HF engine and the bandwidth floor, and the agreement of vLLM on the device with HF fp32 on
   the CPU on the same saved dummy:llama-135m weights (top-1 of the next token; cosine of the
   top-20 log-probabilities), with a tolerance, not text equality. Each vLLM load costs tens of
   seconds (CUDA graphs, torch.compile); shapes that would overrun the time budget are skipped
   and reported as such. Without vllm it says so;
5. the enrich flow end to end on the device (``shardwise run`` with dummy models) when Prefect,
   MLflow and the rest are importable; otherwise it says so and why.

    bash bench/gpu_check.sh                       # on the GPU machine, from the repository root
    python bench/gpu_check.py --device cpu --quick  # the same code paths on a CPU, tiny sizes
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.monotonic()
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from shardwise.gpu_runtime import GenerationParams, resolve_model_spec  # noqa: E402
from shardwise.gpu_runtime.embedding import EmbeddingEngine  # noqa: E402
from shardwise.gpu_runtime.generation import GenerationEngine  # noqa: E402

PROMPTS = [
    "Summarise this review in one sentence: the blender is loud but crushes ice well.",
    "What is the capital of France?",
    "List three uses for a cast-iron skillet.",
    "Translate 'good morning' into German.",
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, mib: int) -> float:
    """GB/s moved (read + write) by copying a ``mib`` MiB buffer on ``device``."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    reps = 10
    started = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    seconds = time.perf_counter() - started
    return 2 * src.numel() * reps / seconds / 1e9


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def agreement(device: torch.device) -> dict:
    """The same random weights in fp32 on the CPU and in the device's dtype on the device."""
    cpu = GenerationEngine.from_resolved(resolve_model_spec("dummy:llama-135m"), torch.device("cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    on_device = copy.deepcopy(cpu.model).to(device=device, dtype=dtype)
    batch = cpu.tokenizer(
        [
            cpu.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in PROMPTS
        ],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    with torch.inference_mode():
        ref = cpu.model(**batch).logits[:, -1].float()
        got = on_device(**{k: v.to(device) for k, v in batch.items()}).logits[:, -1].float().cpu()
    logits_cos = torch.nn.functional.cosine_similarity(ref, got, dim=-1)
    top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()

    emb_cpu = EmbeddingEngine.from_resolved(resolve_model_spec("dummy:minilm"), torch.device("cpu"))
    emb_dev = EmbeddingEngine(copy.deepcopy(emb_cpu.model).to(device=device, dtype=dtype), dict(emb_cpu.info))
    a, b = emb_cpu.embed(PROMPTS).vectors, emb_dev.embed(PROMPTS).vectors
    emb_cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "logits_cosine_min": float(logits_cos.min()),
        "top1_agreement": top1,
        "embedding_cosine_min": float(emb_cos.min()),
        "ok": bool(logits_cos.min() > 0.99 and emb_cos.min() > 0.99),
    }


def generation_throughput(
    shape: str, device: torch.device, batch: int, new_tokens: int, bandwidth: float, decode: str = "dynamic"
) -> dict:
    """``decode``: ``dynamic`` (the default engine), or ``static+compile`` (static KV cache and
    torch.compile; its first full run compiles, so the second one is timed)."""
    engine = GenerationEngine.from_resolved(resolve_model_spec(f"dummy:{shape}"), device)
    options = {"cache": "static", "compile": device.type == "cuda"} if decode == "static+compile" else {}
    if options and not options["compile"]:
        decode = "static"  # transformers compiles only on accelerators
    params = GenerationParams(
        max_new_tokens=new_tokens,
        ignore_eos=True,
        max_batch_size=batch,
        token_budget=batch * (new_tokens + 256),
        **options,
    )
    prompts = (PROMPTS * (batch // len(PROMPTS) + 1))[:batch]
    if options:
        engine.generate(prompts, params)  # compiles for exactly this shape
    else:
        engine.generate(prompts[:2], GenerationParams(max_new_tokens=2, ignore_eos=True))  # warm-up
    sync(device)
    started = time.perf_counter()
    out = engine.generate(prompts, params)
    sync(device)
    seconds = time.perf_counter() - started
    tokens = sum(g.n_generated_tokens for g in out)
    size = weight_bytes(engine.model)
    floor_tok_s = batch * bandwidth * 1e9 / size  # every decode step reads every weight once
    result = {
        "shape": shape,
        "decode": decode,
        "params_m": sum(p.numel() for p in engine.model.parameters()) / 1e6,
        "weights_gb": size / 1e9,
        "batch": batch,
        "new_tokens": new_tokens,
        "generated_tokens": tokens,
        "seconds": seconds,
        "tok_per_s": tokens / seconds,
        "bandwidth_bound_tok_per_s": floor_tok_s,
        "fraction_of_bound": tokens / seconds / floor_tok_s,
    }
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def embedding_throughput(shape: str, device: torch.device, rows: int) -> dict:
    engine = EmbeddingEngine.from_resolved(resolve_model_spec(f"dummy:{shape}"), device)
    texts = [f"{p} (variant {i})" * (1 + i % 8) for i, p in enumerate(PROMPTS * (rows // len(PROMPTS) + 1))][:rows]
    engine.embed(texts[:64])
    sync(device)
    started = time.perf_counter()
    engine.embed(texts, max_batch_size=256, token_budget=65536)
    sync(device)
    seconds = time.perf_counter() - started
    return {"shape": shape, "rows": rows, "seconds": seconds, "rows_per_s": rows / seconds}


VLLM_BUDGET_S = 240  # of gpu_check.sh's 470 s; a vLLM load that would start later is skipped


def vllm_section(
    device: torch.device,
    shapes: list[str],
    hf_rows: list[dict],
    batch: int,
    new_tokens: int,
    bandwidth: float,
    deadline: float,
) -> dict:
    """The vLLM engine next to the HF engine: agreement with HF fp32 on the CPU, then throughput."""
    from shardwise.gpu_runtime.vllm_engine import vllm_build

    build = vllm_build()
    if build is None:
        return {"ran": False, "why": "vllm is not importable here (pip install vllm==0.32.0; see README)"}
    if build[2] != device.type:
        return {
            "ran": False,
            "why": f"the installed vLLM ({build[0]} {build[1]}) runs on {build[2]}, not {device.type}",
        }
    report: dict = {"ran": True, "version": f"{build[0]} {build[1]}", "generation": [], "skipped": []}
    report["agreement"] = vllm_agreement(device)
    for shape in shapes:
        if time.monotonic() > deadline:
            report["skipped"].append(f"dummy:{shape} (time budget)")
            continue
        hf = next((g for g in hf_rows if g["shape"] == shape and g["decode"] == "dynamic"), None)
        report["generation"].append(vllm_throughput(shape, device, batch, new_tokens, bandwidth, hf))
    return report


def vllm_agreement(device: torch.device) -> dict:
    """dummy:llama-135m's seeded weights, saved, loaded by vLLM on the device (its default dtype)
    and by HF in fp32 on the CPU: the next token after each prompt."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from shardwise.gpu_runtime import VllmOptions
    from shardwise.gpu_runtime.vllm_engine import VllmGenerationEngine

    cpu = GenerationEngine.from_resolved(resolve_model_spec("dummy:llama-135m"), torch.device("cpu"))
    with tempfile.TemporaryDirectory() as saved:
        cpu.model.save_pretrained(saved)
        cpu.tokenizer.save_pretrained(saved)
        engine = VllmGenerationEngine.from_resolved(
            resolve_model_spec(saved), device, VllmOptions(gpu_memory_utilization=0.3)
        )
        limit = engine._input_limit(GenerationParams(max_new_tokens=1))
        ids = [engine._encode(p, None, limit)[0] for p in PROMPTS]
        out = engine.llm.generate(
            [TokensPrompt(prompt_token_ids=i) for i in ids],
            SamplingParams(temperature=0.0, max_tokens=1, logprobs=20),
            use_tqdm=False,
        )
        engine.close()
    top1, cosines = [], []
    for prompt_ids, o in zip(ids, out):
        with torch.inference_mode():
            ref = torch.log_softmax(cpu.model(torch.tensor([prompt_ids])).logits[0, -1].float(), -1)
        got = o.outputs[0].logprobs[0]  # token id -> Logprob, the top 20 (and the chosen one)
        tokens = sorted(got)
        top1.append(o.outputs[0].token_ids[0] == int(ref.argmax()))
        a = torch.tensor([got[t].logprob for t in tokens])
        b = ref[tokens]
        cosines.append(float(torch.nn.functional.cosine_similarity(a, b, dim=0)))
    result = {
        "dtype": engine.info["dtype"],
        "top1_agreement": sum(top1) / len(top1),
        "logprob_cosine_min": min(cosines),
    }
    # bf16 on the device vs fp32: a near-tie may flip the top token; the distribution must agree.
    result["ok"] = result["top1_agreement"] >= 0.75 and result["logprob_cosine_min"] > 0.99
    return result


def vllm_throughput(
    shape: str, device: torch.device, batch: int, new_tokens: int, bandwidth: float, hf: dict | None
) -> dict:
    from shardwise.gpu_runtime.vllm_engine import VllmGenerationEngine

    started = time.perf_counter()
    engine = VllmGenerationEngine.from_resolved(resolve_model_spec(f"dummy:{shape}"), device)
    load_s = time.perf_counter() - started
    params = GenerationParams(max_new_tokens=new_tokens, ignore_eos=True)
    prompts = (PROMPTS * (batch // len(PROMPTS) + 1))[:batch]
    engine.generate(prompts[:2], GenerationParams(max_new_tokens=2, ignore_eos=True))  # warm-up
    started = time.perf_counter()
    out = engine.generate(prompts, params)
    seconds = time.perf_counter() - started
    engine.close()
    tokens = sum(g.n_generated_tokens for g in out)
    result = {
        "shape": shape,
        "batch": batch,
        "new_tokens": new_tokens,
        "load_s": load_s,
        "generated_tokens": tokens,
        "seconds": seconds,
        "tok_per_s": tokens / seconds,
    }
    if hf is not None:  # the same shape's weight bytes, as measured for the HF engine
        floor = batch * bandwidth * 1e9 / (hf["weights_gb"] * 1e9)
        result.update(
            hf_tok_per_s=hf["tok_per_s"],
            vs_hf=result["tok_per_s"] / hf["tok_per_s"],
            bandwidth_bound_tok_per_s=floor,
            fraction_of_bound=result["tok_per_s"] / floor,
        )
    return result


def flow_end_to_end(device: torch.device, rows: int, new_tokens: int) -> dict:
    missing = [m for m in ("prefect", "mlflow", "pydantic", "polars", "fsspec") if importlib.util.find_spec(m) is None]
    if missing:
        return {"ran": False, "why": f"not importable here: {', '.join(missing)} (carry their wheels to run the flow)"}
    from shardwise.tasks.records.demo_data import write_reviews_dataset

    with tempfile.TemporaryDirectory() as tmp:
        write_reviews_dataset(f"{tmp}/in", files=2, rows_per_file=rows // 2, rows_per_group=max(1, rows // 8))
        env = {
            **os.environ,
            "SHARDWISE_HOME": f"{tmp}/state",
            "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}",
        }
        cmd = [
            sys.executable,
            "-m",
            "shardwise.flows.cli",
            "run",
            "--input",
            f"{tmp}/in",
            "--output",
            f"{tmp}/out",
            "--task",
            "both",
            "--id-column",
            "review_id",
            "--gen-model",
            "dummy:llama-135m",
            "--embed-model",
            "dummy:minilm",
            "--device",
            str(device),
            "--max-new-tokens",
            str(new_tokens),
            "--rows-per-shard",
            str(max(1, rows // 4)),
            "--set",
            "generate.ignore_eos=true",
        ]
        started = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        seconds = time.perf_counter() - started
        manifest = Path(f"{tmp}/out/_manifest.json")
        status = json.loads(manifest.read_text())["status"] if manifest.exists() else None
    return {
        "ran": True,
        "exit_code": proc.returncode,
        "status": status,
        "rows": rows,
        "seconds": seconds,
        "rows_per_s_incl_startup": rows / seconds,
        "stderr_tail": proc.stderr[-1500:] if proc.returncode else "",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU dry run of the code paths)")
    parser.add_argument("--shapes", nargs="*", help="llama shapes (default: llama-135m llama-1b llama-8b)")
    parser.add_argument("--vllm-shapes", nargs="*", help="llama shapes for vLLM (default: llama-1b llama-8b)")
    parser.add_argument("--export-tokenizers", metavar="DIR", help="write the dummy shapes' tokenizers and exit")
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args()
    if args.export_tokenizers:
        from shardwise.gpu_runtime.dummy import export_tokenizers

        print(f"tokenizers written to {export_tokenizers(args.export_tokenizers)}")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (use --device cpu --quick for a dry run)", file=sys.stderr)
        return 2
    shapes = args.shapes or (["llama-135m"] if args.quick else ["llama-135m", "llama-1b", "llama-8b"])
    batch, new_tokens = (4, 8) if args.quick else (64, 128)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report: dict = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "quick": args.quick}
    report["copy_bandwidth_gb_s"] = copy_bandwidth(device, 64 if args.quick else 1024)
    report["agreement"] = agreement(device)
    bandwidth = report["copy_bandwidth_gb_s"]
    report["generation"] = [generation_throughput(s, device, batch, new_tokens, bandwidth) for s in shapes]
    # The engine option to choose by measurement: static KV cache + torch.compile, on the smallest shape.
    report["generation"].append(
        generation_throughput(shapes[0], device, batch, new_tokens, bandwidth, decode="static+compile")
    )
    report["embedding"] = [embedding_throughput(s, device, 256 if args.quick else 8192) for s in ("minilm",)]
    vllm_shapes = (
        args.vllm_shapes
        if args.vllm_shapes is not None
        else (["llama-135m"] if args.quick else ["llama-1b", "llama-8b"])
    )
    report["vllm"] = vllm_section(
        device, vllm_shapes, report["generation"], batch, new_tokens, bandwidth, deadline=STARTED + VLLM_BUDGET_S
    )
    report["flow"] = flow_end_to_end(device, 16 if args.quick else 256, 8 if args.quick else 64)
    Path(args.out).write_text(json.dumps(report, indent=2))

    a = report["agreement"]
    print(f"\nshardwise GPU check: {name}, torch {torch.__version__}, {report['date']}")
    print(f"copy bandwidth: {report['copy_bandwidth_gb_s']:.0f} GB/s")
    print(
        f"agreement {a['dtype']} on device vs fp32 CPU: logits cosine >= {a['logits_cosine_min']:.4f}, "
        f"top-1 {a['top1_agreement']:.0%}, embeddings cosine >= {a['embedding_cosine_min']:.4f} "
        f"-> {'ok' if a['ok'] else 'MISMATCH'}"
    )
    print("\n| shape | decode | params | weights GB | batch x new tokens | tok/s | bandwidth bound tok/s | of bound |")
    print("|---|---|---|---|---|---|---|---|")
    for g in report["generation"]:
        print(
            f"| dummy:{g['shape']} | {g['decode']} | {g['params_m']:.0f}M | {g['weights_gb']:.2f} | {g['batch']} x {g['new_tokens']} "
            f"| {g['tok_per_s']:.0f} | {g['bandwidth_bound_tok_per_s']:.0f} | {g['fraction_of_bound']:.0%} |"
        )
    for e in report["embedding"]:
        print(f"| dummy:{e['shape']} (embedding) | | | | {e['rows']} rows | {e['rows_per_s']:.0f} rows/s | | |")
    v = report["vllm"]
    if v["ran"]:
        va = v["agreement"]
        print(
            f"\nvLLM engine ({v['version']}): {va['dtype']} on device vs HF fp32 CPU: top-1 "
            f"{va['top1_agreement']:.0%}, top-20 log-prob cosine >= {va['logprob_cosine_min']:.4f} "
            f"-> {'ok' if va['ok'] else 'MISMATCH'}"
        )
        print("| shape | batch x new tokens | load s | vLLM tok/s | HF tok/s | vLLM / HF | of bound |")
        print("|---|---|---|---|---|---|---|")
        for g in v["generation"]:
            print(
                f"| dummy:{g['shape']} | {g['batch']} x {g['new_tokens']} | {g['load_s']:.0f} | {g['tok_per_s']:.0f} "
                f"| {g.get('hf_tok_per_s', float('nan')):.0f} | {g.get('vs_hf', float('nan')):.2f} "
                f"| {g.get('fraction_of_bound', float('nan')):.0%} |"
            )
        for skipped in v["skipped"]:
            print(f"| {skipped}: not run |")
    else:
        print(f"\nvLLM engine: not run: {v['why']}")
    f = report["flow"]
    if f["ran"]:
        print(
            f"\nflow end to end: exit {f['exit_code']}, manifest {f['status']}, {f['rows']} rows in {f['seconds']:.1f}s "
            f"(Prefect start-up included)"
        )
        if f["stderr_tail"]:
            print(f["stderr_tail"])
    else:
        print(f"\nflow end to end: not run: {f['why']}")
    print(f"\nwritten to {args.out}")
    vllm_ok = not v["ran"] or v["agreement"]["ok"]
    return 0 if a["ok"] and vllm_ok and (not f["ran"] or f["exit_code"] == 0) else 1


if __name__ == "__main__":
    sys.exit(main())
