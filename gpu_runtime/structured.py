"""Constrained decoding: a JSON Schema compiled into a grammar that masks every decode step.

xgrammar (the grammar engine vLLM uses too) is imported only here and only when a schema is set,
so engines without one never need it. A schema is compiled once per engine (the tokenizer's
vocabulary is part of the compiled grammar) and every ``generate`` call gets a fresh logits
processor holding one matcher per row: the matchers are stateful, so a batch retried after an
out-of-memory split must not reuse them.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from typing import Any

from .errors import EngineError

__all__ = ["SchemaGrammars"]


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
                    # No free whitespace: a small model otherwise pads its answer with newlines
                    # until max_new_tokens runs out.
                    self._compiled[schema_text] = self._compiler.compile_json_schema(
                        json.loads(schema_text), any_whitespace=False
                    )
                except (RuntimeError, ValueError) as err:
                    raise EngineError(f"output schema cannot be compiled into a grammar: {err}") from None
            return self._compiled[schema_text]

    def logits_processor(self, schema_text: str) -> Any:
        """A processor for one ``model.generate`` call (its matchers follow that call's rows)."""
        from xgrammar.contrib.hf import LogitsProcessor

        return LogitsProcessor(self.compiled(schema_text))
