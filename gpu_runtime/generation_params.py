"""What a generation call takes and returns, the same for every engine (HF and vLLM).

:class:`GenerationParams` is validated when built, so an engine never sees a bad value;
:class:`Generation` is one row's answer with its token counts and why it ended.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any, Literal

from .prompts import RESERVED_TEMPLATE_KWARGS

__all__ = ["Generation", "GenerationParams"]


@dataclass
class GenerationParams:
    """How to generate. ``temperature=0`` means greedy (deterministic) decoding.

    ``max_input_tokens`` caps the chat-formatted prompt (longer user text is truncated);
    ``token_budget`` caps a batch's padded tokens, prompt plus ``max_new_tokens`` per row, which is
    what bounds memory; ``max_batch_size`` caps rows per batch. Left at None, both are sized by the
    engine: on CUDA from the free device memory and the model's KV bytes per token
    (:mod:`shardwise.gpu_runtime.sizing`), elsewhere 16384 tokens and 32 rows. Sampling uses ``temperature``
    and ``top_p`` only (no top-k); nothing in the model's generation_config but its bos, eos and
    pad ids is used, so the same params mean the same decoding for every model.

    ``chat_template_kwargs`` become variables of the chat template (``{"enable_thinking": False}``
    for Qwen3); ``chat_date`` is the date a template that prints today's date (Llama-3.1's,
    Mistral's) shows instead of the wall clock's (see :func:`shardwise.gpu_runtime.prompts.build_chat`).

    ``ignore_eos=True`` (like vLLM's ``ignore_eos``) makes every row generate exactly
    ``max_new_tokens`` tokens, with ``finish_reason="length"``: the eos tokens are masked out until
    then, so the text never ends early. Meant for throughput benchmarks (e.g. with ``dummy:``
    models, whose random weights rarely emit eos); the text then runs on past the natural answer.
    Dummy specs do not switch it on by themselves.

    ``cache="static"`` preallocates the KV cache, and ``compile=True`` lets transformers
    ``torch.compile`` the decode step for it (GPU only; every new batch shape compiles again).
    Both are off by default, to be switched on where a measurement shows a gain.

    ``output_schema`` (a JSON Schema as JSON text) constrains every row's answer to JSON that
    follows it: the schema is compiled once per engine into an xgrammar grammar that masks the
    tokens it does not allow at each step (:mod:`shardwise.gpu_runtime.structured`). It cannot be combined
    with ``ignore_eos``, which would forbid the end the grammar asks for.

    ``frequency_penalty`` lowers each token's logit by the penalty times the number of times the
    row's answer already holds it (OpenAI's and vLLM's ``frequency_penalty``; the prompt's tokens
    do not count). ``repair_frequency_penalty`` mends schema-constrained answers that loop: small
    models fall into repeating a few tokens inside a free string (``"topic": "nga-nga-nga-…``)
    until ``max_new_tokens`` cuts the JSON. A row whose answer under ``output_schema`` ends with
    ``finish_reason="length"`` is generated once more with this ``frequency_penalty``, and the new
    answer replaces it when it ends by itself (:func:`shardwise.gpu_runtime.structured.repair_unfinished`;
    with the bundled SmolLM2, greedy, 96 new tokens: 19 of 24 review answers valid without it, 24
    with it). 0 turns it off; without ``output_schema`` it does nothing. The replaced answer's
    tokens are not counted in the row's.

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
    token_budget: int | None = None
    max_batch_size: int | None = None
    ignore_eos: bool = False
    cache: Literal["dynamic", "static"] = "dynamic"
    compile: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_date: dt.date | None = None
    output_schema: str | None = None
    frequency_penalty: float = 0.0
    repair_frequency_penalty: float = 1.0

    def __post_init__(self) -> None:
        _require_positive_int("max_new_tokens", self.max_new_tokens)
        for name in ("token_budget", "max_batch_size"):
            if getattr(self, name) is not None:
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
        if self.chat_template_kwargs is not None:
            if not isinstance(self.chat_template_kwargs, dict) or not all(
                isinstance(k, str) for k in self.chat_template_kwargs
            ):
                raise ValueError(f"chat_template_kwargs must be a dict of names, got {self.chat_template_kwargs!r}")
            if reserved := sorted(RESERVED_TEMPLATE_KWARGS & self.chat_template_kwargs.keys()):
                raise ValueError(f"chat_template_kwargs may not set {', '.join(reserved)} (set by the engine)")
        if self.chat_date is not None and (
            not isinstance(self.chat_date, dt.date) or isinstance(self.chat_date, dt.datetime)
        ):
            raise ValueError(f"chat_date must be a datetime.date, got {self.chat_date!r}")
        for name, low in (("frequency_penalty", -2.0), ("repair_frequency_penalty", 0.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= 2.0:
                raise ValueError(f"{name} must be a number in [{low:g}, 2], got {value!r}")
        if self.output_schema is not None:
            if not isinstance(self.output_schema, str) or not self.output_schema.lstrip().startswith("{"):
                raise ValueError(f"output_schema must be a JSON Schema as JSON text, got {self.output_schema!r}")
            if self.ignore_eos:
                raise ValueError("output_schema cannot be combined with ignore_eos (the grammar must end the answer)")


def _require_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass
class Generation:
    """One row's output. ``finish_reason`` is ``"stop"`` when the model ended its answer and
    ``"length"`` when ``max_new_tokens`` cut it; ``truncated`` says the prompt was shortened.
    ``error`` says why a serving endpoint refused the row (then there is no answer)."""

    text: str
    n_prompt_tokens: int
    n_generated_tokens: int
    finish_reason: Literal["stop", "length"]
    truncated: bool
    error: str | None = None
