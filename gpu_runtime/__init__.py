"""shardwise's compute layer: model resolution, batched generation and embedding.

Depends only on torch, transformers, accelerate, sentence-transformers, numpy and pyarrow, never on
the orchestration (Prefect) or tracking (MLflow) layers, so it can run in any worker.

torch and transformers are imported on first use of a name that needs them, so
``from shardwise.gpu_runtime import plan_batches`` stays cheap.

Modules import only downward (a test checks there is no circle):

- ``errors``, ``compute_thread``, ``batching``, ``prompts``, ``device``, ``sizing``, ``backoff``,
  ``prefetch``, ``kv_cache``, ``structured``, ``attention`` (grouped KV read in place on CPU),
  ``greedy`` (the decode loop that lets ended rows go): self-contained helpers;
- ``generation_params`` (a generation call's params and rows), ``sampling`` (decoding settings and
  where a row stops) and ``prefill`` (shared prefix, chunked prefill into one joined KV cache);
- ``model_cache`` (the on-disk cache) and ``dummy_shapes`` (the ``dummy:`` shape table);
- ``model_specs``: a spec -> :class:`ResolvedModel`, loading nothing;
- ``gguf_cache`` (GGUF dequantized once), then ``dummy`` (building dummy models);
- ``generation``, ``embedding``, then ``vllm_feed`` (calls from several threads in one vLLM
  scheduler) and ``vllm_engine``; ``token_count`` and ``model_identity``;
- ``embedding_output`` (what an embedding call returns), ``endpoint_client`` (HTTP to a serving
  endpoint), then ``openai_engine`` (generation and
  embeddings on one, with the engines' row contract);
- ``engine_cache``: one loaded engine per process and spec, the top.
"""

from __future__ import annotations

import importlib
from typing import Any

# The one list of public names: public name -> the module that defines it (imported on first use).
_LOCATION = {
    "ResolvedModel": "model_specs",
    "resolve_model_spec": "model_specs",
    "load_generation_engine": "engine_cache",
    "load_embedding_engine": "engine_cache",
    "model_load_counts": "engine_cache",
    "model_cache_dir": "model_cache",
    "GenerationParams": "generation_params",
    "Generation": "generation_params",
    "GenerationEngine": "generation",
    "EmbeddingEngine": "embedding",
    "EmbeddingOutput": "embedding_output",
    "plan_batches": "batching",
    "template_fields": "prompts",
    "render_prompt": "prompts",
    "select_device": "device",
    "default_dtype": "device",
    "device_lock": "device",
    "pin_worker": "device",
    "visible_gpu_count": "device",
    "on_compute_thread": "compute_thread",
    "choose_engine": "vllm_engine",
    "VllmOptions": "vllm_engine",
    "EndpointOptions": "endpoint_client",
    "ModelNotFoundError": "errors",
    "EngineError": "errors",
}

__all__ = list(_LOCATION)


def __getattr__(name: str) -> Any:
    module = _LOCATION.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
