"""The per-process engine cache: one loaded engine per (model spec, device, options) in a process.

A worker that runs many shards loads each model once, and :func:`model_load_counts` lets tests and
workers check that. This is the top of the package: it resolves the spec
(:mod:`shardwise.gpu_runtime.model_specs`) and builds the engine (:mod:`shardwise.gpu_runtime.generation`,
:mod:`shardwise.gpu_runtime.vllm_engine`, :mod:`shardwise.gpu_runtime.embedding`) on the compute thread.

The engine modules import torch; they are imported inside the functions that load an engine, so
``from shardwise.gpu_runtime import load_generation_engine`` stays cheap for callers that only plan a run.
"""

from __future__ import annotations

import functools
import threading
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from .compute_thread import on_compute_thread
from .errors import EngineError, ModelNotFoundError
from .model_specs import ResolvedModel, resolve_model_spec

if TYPE_CHECKING:
    import torch

    from .embedding import EmbeddingEngine
    from .endpoint_client import EndpointOptions
    from .generation import GenerationEngine
    from .vllm_engine import VllmOptions

__all__ = ["load_embedding_engine", "load_generation_engine", "model_load_counts"]

_E = TypeVar("_E")
_engines: dict[tuple[str, str, str, str], object] = {}
_key_locks: dict[tuple[str, str, str, str], threading.Lock] = {}
_registry_lock = threading.Lock()
_load_counts: Counter[str] = Counter()


def model_load_counts() -> dict[str, int]:
    """How many times each spec was really loaded in this process (cache hits do not count)."""
    with _registry_lock:
        return dict(_load_counts)


def load_generation_engine(
    spec: str,
    device: str | None = "auto",
    attn_implementation: str | None = None,
    engine: str = "hf",
    vllm_options: VllmOptions | None = None,
    endpoint: EndpointOptions | None = None,
) -> GenerationEngine:
    """The process-wide :class:`GenerationEngine` for ``spec`` on ``device``, loading it on first use.

    ``attn_implementation`` None lets transformers choose the attention kernel for the architecture.
    ``engine``: ``hf`` (transformers), ``vllm`` (:mod:`shardwise.gpu_runtime.vllm_engine`, with
    ``vllm_options``), ``openai`` (the serving endpoint ``endpoint`` names, see
    :mod:`shardwise.gpu_runtime.openai_engine`) or ``auto`` (see
    :func:`~shardwise.gpu_runtime.vllm_engine.choose_engine`).
    """
    if engine == "openai":
        from .openai_engine import OpenAIGenerationEngine

        return _endpoint_engine("generation", spec, endpoint, OpenAIGenerationEngine.connect)  # type: ignore[return-value]
    from .vllm_engine import VllmGenerationEngine, VllmOptions, choose_engine  # imports torch: see above

    if choose_engine(engine, device) == "vllm":
        options = vllm_options or VllmOptions()
        return _cached_engine(
            f"generation-vllm-{options.cache_key()}", spec, device, VllmGenerationEngine.loader(options)
        )
    from .generation import GenerationEngine  # imports torch: see above

    build = functools.partial(GenerationEngine.from_resolved, attn_implementation=attn_implementation)
    variant = f"attn={attn_implementation}" if attn_implementation else ""
    return _cached_engine("generation", spec, device, build, variant)


def load_embedding_engine(
    spec: str, device: str | None = "auto", engine: str = "hf", endpoint: EndpointOptions | None = None
) -> EmbeddingEngine:
    """The process-wide :class:`EmbeddingEngine` for ``spec`` on ``device``, loading it on first use;
    ``engine="openai"``: the serving endpoint ``endpoint`` names."""
    if engine == "openai":
        from .openai_engine import OpenAIEmbeddingEngine

        return _endpoint_engine("embedding", spec, endpoint, OpenAIEmbeddingEngine.connect)  # type: ignore[return-value]
    from .embedding import EmbeddingEngine  # imports torch: see above

    return _cached_engine("embedding", spec, device, EmbeddingEngine.from_resolved)


def _endpoint_engine(
    kind: str, spec: str, endpoint: EndpointOptions | None, connect: Callable[[str, EndpointOptions], _E]
) -> _E:
    """The process-wide engine of a serving endpoint: one client (and its connections and
    concurrency limit) per endpoint, spec and settings; connecting checks the server and the model."""
    if endpoint is None:
        raise ValueError("engine openai needs the endpoint's options")
    key = (f"{kind}-openai", spec, f"endpoint:{endpoint.host}", endpoint.cache_key())
    return _load_once(key, spec, lambda: connect(spec, endpoint))


def _cached_engine(
    kind: str,
    spec: str,
    device: str | None,
    build: Callable[[ResolvedModel, torch.device], _E],
    variant: str = "",
) -> _E:
    from .device import select_device  # imports torch: see above

    torch_device = select_device(device)
    resolved = resolve_model_spec(spec)
    # "auto" and "cpu" are the same engine on a CPU machine: key by the device actually used.
    # ``variant`` names load options that give another engine (e.g. another attention kernel).
    # The weights' revision is in the key: a local directory whose weights were replaced (a model
    # retrained in a notebook) loads again instead of answering with the old weights.
    key = (kind + (f"[{variant}]" if variant else ""), spec, str(torch_device), resolved.revision)

    def load() -> _E:
        # On the compute thread, like every later call (see compute_thread.py: the thread that
        # first runs torch work keeps an OpenMP team).
        try:
            return on_compute_thread(build, resolved, torch_device)
        except (ModelNotFoundError, EngineError):
            raise
        except Exception as exc:
            raise EngineError(f"could not load {kind} model {spec!r} from {resolved.path}: {exc}") from exc

    return _load_once(key, spec, load)


def _load_once(key: tuple[str, str, str, str], spec: str, load: Callable[[], _E]) -> _E:
    """The engine under ``key``, made by ``load`` on first use. Loading happens outside the
    registry lock, so two threads asking for the same engine wait for a single load; an engine
    made replaces those of the same kind, spec and device under another last key part (older
    weights, other settings)."""
    with _registry_lock:
        engine = _engines.get(key)
        if engine is not None:
            return engine  # type: ignore[return-value]
        key_lock = _key_locks.setdefault(key, threading.Lock())
    with key_lock:
        with _registry_lock:
            engine = _engines.get(key)
        if engine is not None:
            return engine  # type: ignore[return-value]
        engine = load()
        with _registry_lock:
            for stale in [k for k in _engines if k[:3] == key[:3]]:
                del _engines[stale]
            _engines[key] = engine
            _load_counts[spec] += 1
        return engine  # type: ignore[return-value]
