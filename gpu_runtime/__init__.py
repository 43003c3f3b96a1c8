"""shardwise's compute layer: model resolution, batched generation and embedding.

Depends only on torch, transformers, accelerate, sentence-transformers, numpy and pyarrow, never on
the orchestration (Prefect) or tracking (MLflow) layers, so it can run in any worker.

torch and transformers are imported on first use of a name that needs them, so
``from gpu_runtime import plan_batches`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "ResolvedModel",
    "resolve_model_spec",
    "load_generation_engine",
    "load_embedding_engine",
    "model_load_counts",
    "model_cache_dir",
    "GenerationParams",
    "Generation",
    "GenerationEngine",
    "EmbeddingEngine",
    "EmbeddingOutput",
    "plan_batches",
    "template_fields",
    "render_prompt",
    "select_device",
    "default_dtype",
    "device_lock",
    "pin_worker",
    "visible_gpu_count",
    "on_compute_thread",
    "choose_engine",
    "VllmOptions",
    "ModelNotFoundError",
    "EngineError",
]

# public name -> private module that defines it
_LOCATION = {
    "ResolvedModel": "models",
    "resolve_model_spec": "models",
    "load_generation_engine": "models",
    "load_embedding_engine": "models",
    "model_load_counts": "models",
    "model_cache_dir": "models",
    "GenerationParams": "generation",
    "Generation": "generation",
    "GenerationEngine": "generation",
    "EmbeddingEngine": "embedding",
    "EmbeddingOutput": "embedding",
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
    "ModelNotFoundError": "errors",
    "EngineError": "errors",
}

if TYPE_CHECKING:
    from .batching import plan_batches
    from .compute_thread import on_compute_thread
    from .device import default_dtype, device_lock, pin_worker, select_device, visible_gpu_count
    from .embedding import EmbeddingEngine, EmbeddingOutput
    from .errors import EngineError, ModelNotFoundError
    from .generation import Generation, GenerationEngine, GenerationParams
    from .models import (
        ResolvedModel,
        load_embedding_engine,
        load_generation_engine,
        model_cache_dir,
        model_load_counts,
        resolve_model_spec,
    )
    from .prompts import render_prompt, template_fields
    from .vllm_engine import VllmOptions, choose_engine


def __getattr__(name: str) -> Any:
    module = _LOCATION.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
