"""Batched text generation with an instruct (chat) model.

Rows are chat-formatted, tokenized once, truncated when too long, grouped by length
(:func:`plan_batches`), left-padded and decoded in static batches. On a small CPU that beat
transformers' continuous batching (see notes/pitfalls.md); on a GPU it keeps shapes few.

A batch that runs out of memory is halved and retried, and later batches of the same call are
capped at the size that worked (:mod:`gpu_runtime.backoff`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from .backoff import BatchBackoff
from .batching import plan_batches
from .device import default_dtype, placement_kwargs
from .errors import EngineError
from .prompts import build_chat

if TYPE_CHECKING:
    from .models import ResolvedModel

__all__ = ["Generation", "GenerationEngine", "GenerationParams"]


@dataclass
class GenerationParams:
    """How to generate. ``temperature=0`` means greedy (deterministic) decoding.

    ``max_input_tokens`` caps the chat-formatted prompt (longer user text is truncated);
    ``token_budget`` caps a batch's padded tokens, prompt plus ``max_new_tokens`` per row, which is
    what bounds memory; ``max_batch_size`` caps rows per batch. Sampling uses ``temperature`` and
    ``top_p`` only (no top-k); sampling defaults in the model's generation_config are ignored, so
    the same params mean the same decoding for every model.

    ``ignore_eos=True`` (like vLLM's ``ignore_eos``) makes every row generate exactly
    ``max_new_tokens`` tokens, with ``finish_reason="length"``: the eos tokens are masked out until
    then, so the text never ends early. Meant for throughput benchmarks (e.g. with ``dummy:``
    models, whose random weights rarely emit eos); the text then runs on past the natural answer.
    Dummy specs do not switch it on by themselves.

    ``cache="static"`` preallocates the KV cache, and ``compile=True`` lets transformers
    ``torch.compile`` the decode step for it (GPU only; every new batch shape compiles again).
    Both are off by default, to be switched on where a measurement shows a gain.

    If a batch runs out of device memory it is split in half and retried (later batches of the
    call are capped at the size that worked). Greedy outputs do not depend on the split; sampled
    outputs of a call that had to split may differ from an un-split run's.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    system_prompt: str | None = None
    max_input_tokens: int | None = None
    token_budget: int = 16384
    max_batch_size: int = 32
    ignore_eos: bool = False
    cache: Literal["dynamic", "static"] = "dynamic"
    compile: bool = False

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "token_budget", "max_batch_size"):
            _require_positive_int(name, getattr(self, name))
        if self.max_input_tokens is not None:
            _require_positive_int("max_input_tokens", self.max_input_tokens)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise ValueError(f"temperature must be a number, got {self.temperature!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ValueError(f"system_prompt must be a string or None, got {self.system_prompt!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.cache not in ("dynamic", "static"):
            raise ValueError(f"cache must be 'dynamic' or 'static', got {self.cache!r}")
        if not isinstance(self.compile, bool) or (self.compile and self.cache != "static"):
            raise ValueError("compile=True needs cache='static' (torch.compile wants fixed cache shapes)")


def _require_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass
class Generation:
    """One row's output. ``finish_reason`` is ``"stop"`` when the model ended its answer and
    ``"length"`` when ``max_new_tokens`` cut it; ``truncated`` says the prompt was shortened."""

    text: str
    n_prompt_tokens: int
    n_generated_tokens: int
    finish_reason: Literal["stop", "length"]
    truncated: bool


class GenerationEngine:
    """A causal LM and its tokenizer, ready for batched chat generation.

    Obtain one with :func:`gpu_runtime.load_generation_engine` (cached per process). Calls to
    :meth:`generate` on one engine run one at a time: the device is the bottleneck anyway, and
    the fast tokenizer is not safe to share between threads.
    """

    def __init__(self, model: Any, tokenizer: Any, info: dict[str, Any]) -> None:
        self.model = model
        self.tokenizer = tokenizer
        # Decoder-only models continue from the last position: pad on the left.
        self.tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise EngineError(f"tokenizer of {info.get('spec')!r} has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        self._eos_ids = _eos_token_ids(model, tokenizer)
        self._has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.max_context: int | None = _max_context(model, tokenizer)
        self.info: dict[str, Any] = {**info, "max_context": self.max_context}
        self._lock = threading.Lock()

    @classmethod
    def from_resolved(cls, resolved: ResolvedModel, device: torch.device) -> GenerationEngine:
        """Load the weights of ``resolved`` (converting a GGUF once, see models.py) onto ``device``;
        a ``dummy:`` spec gets seeded random weights created on ``device`` (see dummy.py)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .models import weights_dir

        dtype = default_dtype(device)
        if resolved.source == "dummy":
            from .dummy import build_causal_lm

            model, tokenizer, _ = build_causal_lm(resolved.spec, device, dtype)
            path = resolved.path
        else:
            path = weights_dir(resolved)
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, attn_implementation="sdpa", **placement_kwargs(device)
            )
            if device.type != "cuda":
                model.to(device)
        model.eval()
        info = {**resolved.engine_info(dtype, device), "loaded_from": path}
        return cls(model, tokenizer, info)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[Generation]:
        """Generate one answer per prompt, returned in input order.

        Each prompt is the *user* text (it is wrapped in the model's chat template here) and must
        be a non-empty string: deciding what an empty or null cell means is the caller's job.
        Prompts longer than the input limit are truncated, never rejected.
        """
        prompts = list(prompts)
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"prompt {i} must be a non-empty string, got {prompt!r}")
        if not prompts:
            return []
        limit = self._input_limit(params)
        with self._lock:
            encoded = [self._encode(prompt, params.system_prompt, limit) for prompt in prompts]
            config = self._generation_config(params)
            if params.seed is not None:
                torch.manual_seed(params.seed)
            results: list[Generation | None] = [None] * len(prompts)
            batches = plan_batches(
                [len(ids) for ids, _ in encoded],
                token_budget=params.token_budget,
                max_batch_size=params.max_batch_size,
                extra_tokens_per_row=params.max_new_tokens,
            )
            backoff = BatchBackoff(self.device, what=f"generation with {self.info.get('spec')!r}")
            for batch in batches:
                outputs = backoff.run(
                    batch,
                    lambda rows: self._generate_batch([encoded[i][0] for i in rows], config, params.ignore_eos),
                    describe_row=lambda i: (
                        f"prompt {i}: {len(encoded[i][0])} tokens + max_new_tokens={params.max_new_tokens}"
                    ),
                )
                for i, (text, n_new, finish) in zip(batch, outputs, strict=True):
                    ids, truncated = encoded[i]
                    results[i] = Generation(text, len(ids), n_new, finish, truncated)
        return results  # type: ignore[return-value]

    def _input_limit(self, params: GenerationParams) -> int:
        """Longest chat prompt allowed: the caller's cap and room for max_new_tokens in the context."""
        limit = params.max_input_tokens or math.inf
        if self.max_context is not None:
            limit = min(limit, self.max_context - params.max_new_tokens)
        if limit < 1:
            raise ValueError(
                f"max_new_tokens={params.max_new_tokens} leaves no room for a prompt in the model's "
                f"{self.max_context}-token context"
            )
        return int(limit) if limit != math.inf else 2**62

    def _tokenize(self, text: str) -> list[int]:
        # A chat template already spells out its special tokens; plain text gets the usual ones.
        # verbose=False: over-long inputs are expected here and handled by the caller.
        return self.tokenizer(text, add_special_tokens=not self._has_chat_template, verbose=False)["input_ids"]

    def _encode(self, user_text: str, system_prompt: str | None, limit: int) -> tuple[list[int], bool]:
        """Token ids of the chat prompt, shortening the user text (not the template) to fit ``limit``."""
        ids = self._tokenize(build_chat(self.tokenizer, user_text, system_prompt))
        if len(ids) <= limit:
            return ids, False
        user_ids = self.tokenizer(user_text, add_special_tokens=False, verbose=False)["input_ids"]
        overhead = len(ids) - len(user_ids)
        keep = min(len(user_ids), limit - overhead)
        # Decoding then re-tokenizing can merge tokens differently at the cut: shrink until it fits.
        while keep > 0:
            shortened = self.tokenizer.decode(user_ids[:keep])
            ids = self._tokenize(build_chat(self.tokenizer, shortened, system_prompt))
            if len(ids) <= limit:
                return ids, True
            keep -= len(ids) - limit
        raise ValueError(
            f"the chat template and system prompt alone take about {overhead} tokens, more than the "
            f"input limit of {limit}; raise max_input_tokens or shorten the system prompt"
        )

    def _generation_config(self, params: GenerationParams) -> Any:
        from transformers import GenerationConfig

        sampling: dict[str, Any] = {"do_sample": False}
        if params.temperature > 0:
            # top_k=0 switches off transformers' default top-k=50: only the knobs we expose apply.
            sampling = {
                "do_sample": True,
                "temperature": float(params.temperature),
                "top_p": float(params.top_p),
                "top_k": 0,
            }
        if params.ignore_eos:
            # The eos ids are masked until max_new_tokens is reached: every row runs to the end.
            sampling["min_new_tokens"] = params.max_new_tokens
        if params.cache == "static":
            # A preallocated KV cache; transformers compiles the decode step for it on GPUs unless
            # told not to. Off by default: each new batch shape recompiles (see bench/gpu_check.sh).
            sampling["cache_implementation"] = "static"
            sampling["disable_compile"] = not params.compile
        return GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=sorted(self._eos_ids),
            **sampling,
        )

    def _generate_batch(
        self, batch_ids: list[list[int]], config: Any, ignore_eos: bool = False
    ) -> list[tuple[str, int, Literal["stop", "length"]]]:
        # pad_to_multiple_of=8 keeps the number of distinct shapes (and kernel choices) small.
        padded = self.tokenizer.pad(
            {"input_ids": batch_ids}, padding=True, pad_to_multiple_of=8, return_tensors="pt"
        )
        input_ids = padded["input_ids"].to(self.device)
        attention_mask = padded["attention_mask"].to(self.device)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=config
            )
        rows = []
        for new_tokens in output[:, input_ids.shape[1] :].tolist():
            # Rows that finish early are filled with pad (often == eos) up to the batch's longest:
            # count through the first eos only.
            # With ignore_eos every row runs to max_new_tokens and nothing is padding.
            stop_at = None if ignore_eos else next((k for k, tok in enumerate(new_tokens) if tok in self._eos_ids), None)
            n_new = len(new_tokens) if stop_at is None else stop_at + 1
            text = self.tokenizer.decode(new_tokens[:n_new], skip_special_tokens=True).strip()
            rows.append((text, n_new, "length" if stop_at is None else "stop"))
        return rows


def _eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every id that ends an answer: the tokenizer's eos plus the generation config's (may be a list)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if not ids:
        raise EngineError("model has no eos token: generation could never stop")
    return frozenset(ids)


def _max_context(model: Any, tokenizer: Any) -> int | None:
    for value in (
        getattr(model.config, "max_position_embeddings", None),
        getattr(tokenizer, "model_max_length", None),
    ):
        # model_max_length is a huge sentinel (1e30) when the tokenizer does not know it.
        if isinstance(value, int) and 0 < value < 10_000_000:
            return value
    return None
