"""Constrained decoding: a JSON Schema compiled into a grammar that masks every decode step.

xgrammar (the grammar engine vLLM uses too) is imported only here and only when a schema is set,
so engines without one never need it. A schema is compiled once per engine (the tokenizer's
vocabulary is part of the compiled grammar) and every ``generate`` call gets a fresh logits
processor holding one matcher per row: the matchers are stateful, so a batch retried after an
out-of-memory split must not reuse them. The vLLM engine gets the same grammar as EBNF text
(:func:`schema_ebnf`).

An answer the grammar still held open when ``max_new_tokens`` ran out is usually a loop inside a
free string; :func:`repair_unfinished`, which every engine's ``generate`` goes through, generates
those rows once more with a frequency penalty.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from .errors import EngineError
from .generation_params import Generation, GenerationParams

__all__ = ["SchemaGrammars", "repair_unfinished", "schema_ebnf"]

# No free whitespace: a small model otherwise pads its answer with newlines until max_new_tokens
# runs out. Every engine compiles a schema with these options (the HF engine below, vLLM through
# schema_ebnf), so both constrain answers to one grammar.
_JSON_SCHEMA_OPTIONS = {"any_whitespace": False}

logger = logging.getLogger(__name__)


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError:  # pragma: no cover - depends on the environment
        raise EngineError("generate.output_schema needs xgrammar: pip install 'xgrammar>=0.2,<0.3'") from None
    return xgrammar


class SchemaGrammars:
    """Compiled grammars of one tokenizer, by schema text (canonical JSON)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = sorted(stop_token_ids)
        self._compiler: Any = None
        self._compiled: dict[str, Any] = {}
        self._lock = threading.Lock()

    def compiled(self, schema_text: str) -> Any:
        with self._lock:
            if schema_text not in self._compiled:
                xgr = _xgrammar()
                if self._compiler is None:
                    info = xgr.TokenizerInfo.from_huggingface(
                        self._tokenizer, vocab_size=self._vocab_size, stop_token_ids=self._stop_token_ids
                    )
                    self._compiler = xgr.GrammarCompiler(info)
                try:
                    self._compiled[schema_text] = self._compiler.compile_json_schema(
                        json.loads(schema_text), **_JSON_SCHEMA_OPTIONS
                    )
                except (RuntimeError, ValueError) as err:
                    raise EngineError(f"output schema cannot be compiled into a grammar: {err}") from None
            return self._compiled[schema_text]

    def logits_processor(self, schema_text: str) -> Any:
        """A processor for one ``model.generate`` call (its matchers follow that call's rows)."""
        from xgrammar.contrib.hf import LogitsProcessor

        return LogitsProcessor(self.compiled(schema_text))


@functools.lru_cache(maxsize=16)
def schema_ebnf(schema_text: str) -> str:
    """The grammar of a JSON Schema as xgrammar's EBNF text, for an engine that takes a grammar
    (vLLM: its per-request JSON option leaves whitespace free; only an engine-wide setting, with
    other separators, removes it)."""
    try:
        return str(_xgrammar().Grammar.from_json_schema(schema_text, **_JSON_SCHEMA_OPTIONS))
    except (RuntimeError, ValueError) as err:
        raise EngineError(f"output schema cannot be compiled into a grammar: {err}") from None


def repair_unfinished(
    generate: Callable[[list[str], GenerationParams], list[Generation]], prompts: list[str], params: GenerationParams
) -> list[Generation]:
    """``generate(prompts, params)``, then the repair of its schema-constrained answers that
    ``max_new_tokens`` cut (see ``GenerationParams.repair_frequency_penalty``): those rows are
    generated once more with that frequency penalty, and an answer that now ends by itself
    replaces the cut one. Every engine's ``generate`` goes through here."""
    answers = generate(prompts, params)
    if params.output_schema is None or not params.repair_frequency_penalty:
        return answers
    cut = [i for i, answer in enumerate(answers) if answer.finish_reason == "length"]
    if not cut:
        return answers
    again = dataclasses.replace(params, frequency_penalty=params.repair_frequency_penalty, repair_frequency_penalty=0)
    repaired = 0
    for i, answer in zip(cut, generate([prompts[i] for i in cut], again), strict=True):
        if answer.finish_reason == "stop" and answer.error is None:
            answers[i] = answer
            repaired += 1
    logger.info(
        "%d of %d structured answers ran out of max_new_tokens=%d; %d repaired with frequency_penalty=%g",
        len(cut),
        len(answers),
        params.max_new_tokens,
        repaired,
        params.repair_frequency_penalty,
    )
    return answers
