"""One vLLM engine fed by several callers at once: continuous batching across calls.

vLLM schedules every request it holds into each step. Two shards in flight therefore decode in
one batch: the tail of one shard's long answers runs beside the next shard's rows instead of
alone, as when one ``LLM.generate`` call takes every prompt. vLLM's ``LLMEngine`` is not
thread-safe, so one driver thread owns it: callers hand it their requests and wait for their own
outputs. The driver steps the engine only while it holds requests, and sleeps otherwise.

No vLLM import here: the feed drives the ``LLM`` object it is given (``enqueue``, and its
``llm_engine``'s ``step`` and ``abort_request``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import EngineError

__all__ = ["VllmFeed"]

# How often a waiting caller wakes up, so that an exception raised into its thread (how Prefect
# times out a task in a worker thread) gets through; as in compute_thread.py.
_WAIT_SLICE_S = 0.5


@dataclass(eq=False)
class _Call:
    """One caller's requests and, as they finish, their outputs in the caller's order."""

    prompts: list[Any]
    params: list[Any]
    outputs: list[Any] = field(default_factory=list)
    remaining: int = 0
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.outputs = [None] * len(self.prompts)
        self.remaining = len(self.prompts)

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()


def _given_id(request_id: Any) -> str:
    """The id an output carries for a request ``LLM.enqueue`` returned: enqueue gives the engine's
    internal id, which is the given one plus ``-`` and 8 random characters
    (``InputProcessor.assign_request_id``, unless VLLM_DISABLE_REQUEST_ID_RANDOMIZATION is set);
    the given ids are ``LLM``'s counter, digits only."""
    given, _, suffix = str(request_id).rpartition("-")
    return given if given and len(suffix) == 8 else str(request_id)


class VllmFeed:
    """Runs callers' requests on one ``LLM``, all of them in its scheduler together."""

    def __init__(self, llm: Any):
        self._llm = llm
        self._cond = threading.Condition()
        self._incoming: list[_Call] = []
        self._aborted: list[_Call] = []
        self._owners: dict[str, tuple[_Call, int]] = {}  # request id -> its call and position there
        self._thread: threading.Thread | None = None
        self._failure: str | None = None
        self._closed = False
        self.peak_requests = 0  # the most requests the engine held at once

    def run(self, prompts: Sequence[Any], params: Sequence[Any]) -> list[Any]:
        """vLLM's final ``RequestOutput`` for each prompt, in order; other callers' requests
        share the engine's batches meanwhile. If the caller is interrupted while it waits, its
        requests are aborted and the interruption propagates."""
        call = _Call(list(prompts), list(params))
        if not call.prompts:
            return []
        with self._cond:
            if self._failure is not None or self._closed:
                raise EngineError(self._failure or "the vLLM engine is closed")
            self._incoming.append(call)
            if self._thread is None:
                self._thread = threading.Thread(target=self._drive, name="shardwise-vllm-feed", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        try:
            while not call.done.wait(_WAIT_SLICE_S):
                pass
        except BaseException:
            with self._cond:
                self._aborted.append(call)
                self._cond.notify_all()
            raise
        if call.error is not None:
            raise call.error
        return call.outputs

    def close(self) -> None:
        """Stop the driver; calls still waiting fail. The engine itself is the caller's to shut down."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _drive(self) -> None:
        engine = self._llm.llm_engine
        while True:
            with self._cond:
                while not (self._incoming or self._aborted or self._owners or self._closed):
                    self._cond.wait()
                if self._closed:
                    self._fail_all(EngineError("the vLLM engine was closed while rows were generating"))
                    return
                incoming, self._incoming = self._incoming, []
                aborted, self._aborted = self._aborted, []
            try:
                self._abort(engine, aborted)
                for call in incoming:
                    if call not in aborted:
                        self._add(call)
                self.peak_requests = max(self.peak_requests, len(self._owners))
                if self._owners and not engine.has_unfinished_requests():
                    raise EngineError(f"{len(self._owners)} requests vanished from the engine without an output")
                if self._owners:
                    self._collect(engine.step())
            except Exception as error:  # the engine process died or refused: every caller hears of it
                with self._cond:
                    self._failure = f"vLLM's engine failed: {type(error).__name__}: {error}"
                    self._fail_all(EngineError(self._failure), incoming)
                return

    def _add(self, call: _Call) -> None:
        """Put a call's requests in the engine. Requests vLLM refuses (its checks of the prompt
        and the sampling settings, ``VLLMValidationError``) fail that call only, with vLLM's own
        error, as an ``LLM.generate`` call would; vLLM takes back the call's requests it had
        already added."""
        try:
            ids = self._llm.enqueue(call.prompts, call.params, use_tqdm=False)
        except Exception as error:  # noqa: BLE001 - the caller's to handle; a dead engine fails at the next step
            call.fail(error)
            return
        for position, request_id in enumerate(ids):
            self._owners[_given_id(request_id)] = (call, position)

    def _abort(self, engine: Any, aborted: list[_Call]) -> None:
        if not aborted:
            return
        ids = [request_id for request_id, (call, _) in self._owners.items() if call in aborted]
        for request_id in ids:
            del self._owners[request_id]
        if ids:
            engine.abort_request(ids)

    def _collect(self, outputs: list[Any]) -> None:
        for output in outputs:
            if not output.finished:
                continue
            owner = self._owners.pop(str(output.request_id), None)
            if owner is None:  # an aborted request's last output
                continue
            call, position = owner
            call.outputs[position] = output
            call.remaining -= 1
            if call.remaining == 0:
                call.done.set()

    def _fail_all(self, error: EngineError, also: Sequence[_Call] = ()) -> None:
        """Fail every call not yet answered (called with the condition held)."""
        calls = {id(c): c for c in (*self._incoming, *also, *(call for call, _ in self._owners.values()))}
        self._incoming.clear()
        self._owners.clear()
        for call in calls.values():
            if not call.done.is_set():
                call.fail(error)
