"""vLLM engine start-up and decode speed with and without torch.compile, on the bundled SmolLM2.

    python bench/vllm_start.py 1   # enforce_eager=True
    python bench/vllm_start.py 0   # enforce_eager=False (vLLM's default)

Prints the engine's start time, generated tok/s over 24 prompts x 32 greedy tokens (after a
2-prompt warm-up) and the first answer, so two runs can be compared (docs/benchmarks.md).
"""

from __future__ import annotations

import sys
import time


def main() -> None:
    eager = sys.argv[1:] == ["1"]
    from vllm import LLM, SamplingParams

    from shardwise.gpu_runtime import resolve_model_spec
    from shardwise.gpu_runtime.gguf_cache import weights_dir

    path = weights_dir(resolve_model_spec("bundled:smollm2-135m-instruct"))
    started = time.perf_counter()
    llm = LLM(
        model=path,
        tokenizer=path,
        dtype="float32",
        enable_prefix_caching=True,
        generation_config="vllm",
        seed=0,
        kv_cache_memory_bytes=1 << 30,
        enforce_eager=eager,
        max_model_len=2048,
    )
    print(f"enforce_eager={eager}: engine start {time.perf_counter() - started:.1f} s", flush=True)
    prompts = [f"Review {i}: the product was {'good' if i % 2 else 'bad'} because" for i in range(24)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    llm.generate(prompts[:2], params)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"enforce_eager={eager}: {tokens / (time.perf_counter() - started):.0f} generated tok/s", flush=True)
    print(f"first answer: {outputs[0].outputs[0].text!r}")


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which imports this module
    main()
