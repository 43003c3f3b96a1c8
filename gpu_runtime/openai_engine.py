"""Serving endpoints as engines: generation through ``/v1/chat/completions`` and embeddings through
``/v1/embeddings`` of an OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp, a hosted API).

They keep the local engines' row contract: :meth:`OpenAIGenerationEngine.generate` takes the same
prompts and :class:`GenerationParams` and returns one :class:`Generation` per row, in order, with
the server's ``usage`` as token counts; :meth:`OpenAIEmbeddingEngine.embed` returns an
:class:`EmbeddingOutput`. Each row is one request (so a row's token counts and its refusal are its
own); requests run ``max_concurrency`` at a time (:mod:`shardwise.gpu_runtime.endpoint_client`).

The prompt is the same user text the local engines wrap in the model's chat template, sent as chat
messages (the system prompt, then the row's prompt) for the server to wrap in its own template;
``chat_template_kwargs`` go along as vLLM and SGLang read them. The server decides what a prompt
longer than its context is: vLLM answers 400, which becomes that row's ``error``. A schema
(``output_schema``) goes as ``response_format`` ``json_schema``; answers that ran out of
``max_new_tokens`` are repaired as in the local engines (:func:`repair_unfinished`).

A row answered once is not sent again when the call fails on another row and runs again (a shard
retried in this worker): answers are kept until a call returns them all.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .embedding_output import EmbeddingOutput
from .endpoint_client import EndpointClient, EndpointOptions, RowRefused
from .errors import EngineError
from .generation_params import Generation, GenerationParams
from .structured import repair_unfinished

__all__ = ["OpenAIEmbeddingEngine", "OpenAIGenerationEngine", "served_model"]

PROBE_TIMEOUT_S = 10.0  # the checks before any work wait this long at most


def served_model(client: EndpointClient, spec: str) -> tuple[str, str]:
    """(the model name to send, who serves it) for a job whose model is ``spec``: the configured
    ``served_model``; else ``spec`` when the server lists it; else the one model it serves."""
    listed = client.get("/models", timeout=min(PROBE_TIMEOUT_S, client.options.request_timeout_s))
    models = {m.get("id"): m for m in (listed.get("data") or []) if isinstance(m, dict)}
    wanted = client.options.served_model
    if wanted is None:
        if spec in models:
            wanted = spec
        elif len(models) == 1:
            wanted = next(iter(models))
        else:
            names = ", ".join(sorted(str(name) for name in models)) or "none"
            raise EngineError(f"{client.options.host} serves {names}, not {spec!r}: set served_model to one of them")
    elif models and wanted not in models:
        names = ", ".join(sorted(str(name) for name in models))
        raise EngineError(f"{client.options.host} does not serve served_model {wanted!r} (it serves {names})")
    return wanted, str((models.get(wanted) or {}).get("owned_by") or "unknown server")


def _info(spec: str, options: EndpointOptions, name: str, owner: str) -> dict[str, Any]:
    # source:revision is the model identity the job's fingerprint holds for an endpoint.
    return {
        "spec": spec,
        "source": "openai",
        "revision": options.served_model or spec,
        "served_model": name,
        "dtype": None,
        "device": f"endpoint:{options.host}",
        "endpoint": options.host,
        "engine": "openai",
        "engine_version": f"{owner} at {options.host}",
    }


class _Answers:
    """Answers of rows whose call has not returned yet, by request: a call run again after a
    failure sends only the rows that had none."""

    def __init__(self) -> None:
        self._kept: dict[str, Any] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(body: dict[str, Any]) -> str:
        return json.dumps(body, sort_keys=True)

    def once(self, key: str, ask: Callable[[], Any]) -> Any:
        """The answer kept for ``key``, else ``ask()``'s, kept (a refusal is an answer too)."""
        with self._lock:
            if key in self._kept:
                return self._kept[key]
        answer = ask()
        with self._lock:
            self._kept[key] = answer
        return answer

    def returned(self, keys: Sequence[str]) -> None:
        with self._lock:
            for key in keys:
                self._kept.pop(key, None)


class OpenAIGenerationEngine:
    """Generation on a serving endpoint, behind the local engines' contract."""

    max_context: int | None = None

    def __init__(self, client: EndpointClient, name: str, info: dict[str, Any]) -> None:
        self.client = client
        self.served_name = name
        self.info = info
        self._answers = _Answers()

    @classmethod
    def connect(cls, spec: str, options: EndpointOptions) -> OpenAIGenerationEngine:
        client = EndpointClient(options)
        name, owner = served_model(client, spec)
        return cls(client, name, _info(spec, options, name, owner))

    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[Generation]:
        """One answer per prompt, in order; a prompt the server refuses is a row with ``error``."""
        prompts = list(prompts)
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"prompt {i} must be a non-empty string, got {prompt!r}")
        return repair_unfinished(self._generate, prompts, params)

    def _generate(self, prompts: list[str], params: GenerationParams) -> list[Generation]:
        bodies = [self._body(prompt, params, i) for i, prompt in enumerate(prompts)]
        keys = [_Answers.key(body) for body in bodies]
        answers = self.client.map(self._answer, list(zip(keys, bodies)))
        self._answers.returned(keys)
        return answers

    def _body(self, prompt: str, params: GenerationParams, row: int) -> dict[str, Any]:
        messages = [{"role": "system", "content": params.system_prompt}] if params.system_prompt else []
        body: dict[str, Any] = {
            "model": self.served_name,
            "messages": [*messages, {"role": "user", "content": prompt}],
            "max_tokens": params.max_new_tokens,
            "temperature": float(params.temperature),
        }
        if params.temperature > 0:
            body["top_p"] = float(params.top_p)
        if params.seed is not None:
            body["seed"] = params.seed + row  # each row its own stream, as in the vLLM engine
        if params.frequency_penalty:
            body["frequency_penalty"] = float(params.frequency_penalty)
        if params.ignore_eos:
            body["ignore_eos"] = True
        if params.chat_template_kwargs:
            body["chat_template_kwargs"] = dict(params.chat_template_kwargs)
        if params.output_schema is not None:
            schema = json.loads(params.output_schema)
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": schema, "strict": True},
            }
        return body

    def _answer(self, keyed: tuple[str, dict[str, Any]]) -> Generation:
        key, body = keyed
        return self._answers.once(key, lambda: self._ask(body))

    def _ask(self, body: dict[str, Any]) -> Generation:
        try:
            data = self.client.post("/chat/completions", body)
        except RowRefused as refused:
            return Generation("", 0, 0, "stop", False, error=str(refused))
        try:
            choice = data["choices"][0]
            usage = data.get("usage") or {}
            text = (choice.get("message") or {}).get("content") or ""
            finish = "length" if choice.get("finish_reason") == "length" else "stop"
            return Generation(
                text, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), finish, False
            )
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise EngineError(f"{self.client.options.host} answered without a chat completion: {err!r}") from None

    def close(self) -> None:
        self.client.close()


class OpenAIEmbeddingEngine:
    """Embeddings from a serving endpoint, behind the local embedding engine's contract."""

    def __init__(self, client: EndpointClient, name: str, dim: int, info: dict[str, Any]) -> None:
        self.client = client
        self.served_name = name
        self.dim = dim
        self.info = {**info, "dim": dim}
        self._answers = _Answers()

    @classmethod
    def connect(cls, spec: str, options: EndpointOptions) -> OpenAIEmbeddingEngine:
        client = EndpointClient(options)
        name, owner = served_model(client, spec)
        probe = client.post("/embeddings", {"model": name, "input": "dimension"})
        try:
            dim = len(probe["data"][0]["embedding"])
        except (KeyError, IndexError, TypeError) as err:
            raise EngineError(f"{options.host} answered /embeddings without an embedding: {err!r}") from None
        return cls(client, name, dim, _info(spec, options, name, owner))

    def embed(
        self,
        texts: Sequence[str],
        *,
        token_budget: int = 16384,
        max_batch_size: int | None = None,
        prompt_name: str | None = None,
    ) -> EmbeddingOutput:
        """One vector per text, in order (``token_budget`` and ``max_batch_size`` are the local
        engine's and do not apply; ``prompt_name`` must be None). A text the server refuses gets
        a zero vector and its ``errors`` entry."""
        if prompt_name is not None:
            raise ValueError("prompt_name is a prompt of a local model; an endpoint has none")
        texts = list(texts)
        bodies = [{"model": self.served_name, "input": text} for text in texts]
        keys = [_Answers.key(body) for body in bodies]
        rows = self.client.map(self._vector, list(zip(keys, bodies)))
        self._answers.returned(keys)
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        errors: list[str | None] = []
        for i, (vector, _, error) in enumerate(rows):
            if vector is not None:
                vectors[i] = vector
            errors.append(error)
        return EmbeddingOutput(vectors, [n for _, n, _ in rows], [False] * len(texts), errors)

    def _vector(self, keyed: tuple[str, dict[str, Any]]) -> tuple[np.ndarray | None, int, str | None]:
        key, body = keyed
        return self._answers.once(key, lambda: self._ask(body))

    def _ask(self, body: dict[str, Any]) -> tuple[np.ndarray | None, int, str | None]:
        try:
            data = self.client.post("/embeddings", body)
        except RowRefused as refused:
            return None, 0, str(refused)
        try:
            vector = np.asarray(data["data"][0]["embedding"], dtype=np.float32)
            tokens = int((data.get("usage") or {}).get("prompt_tokens") or 0)
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise EngineError(f"{self.client.options.host} answered without an embedding: {err!r}") from None
        if vector.shape != (self.dim,):
            raise EngineError(f"{self.client.options.host} answered a {vector.shape} vector, not ({self.dim},)")
        return vector, tokens, None

    def close(self) -> None:
        self.client.close()
