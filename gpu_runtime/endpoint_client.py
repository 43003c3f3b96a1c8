"""HTTP to one OpenAI-compatible serving endpoint: retries with jittered backoff, concurrency that
backs off when the server throttles, and the line between a row's fault and the server's.

- A 2xx answers the request.
- 429 (with or without ``Retry-After``), 408, 5xx, a timeout, a refused or dropped connection:
  tried again after a jittered, growing wait (``Retry-After`` when the server gives one), up to
  ``max_retries`` more times for that row. When a row's tries run out, the whole call fails
  (:class:`~shardwise.gpu_runtime.errors.EngineError`): a server that does not answer fails the
  shard, which is retried as a shard, and never becomes a shard full of error rows.
- 401 and 403 (the key), 404 (the path or the model): the call fails at once.
- Any other 4xx (e.g. 400: the prompt is too long for the server) is the row's own fault:
  :class:`RowRefused`, which the engine writes as that row's ``error``.

Requests in flight are bounded by ``max_concurrency`` and by an additive-increase,
multiplicative-decrease limit (:class:`AdaptiveLimit`) that halves on a 429 and grows back by one
per window of successes. httpx is imported here only; no credentials appear in messages (the
host alone names the server).
"""

from __future__ import annotations

import concurrent.futures
import email.utils
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from .errors import EngineError

__all__ = ["AdaptiveLimit", "EndpointClient", "EndpointOptions", "RowRefused"]

_T = TypeVar("_T")
_R = TypeVar("_R")
RETRY_BASE_S = 0.25  # the first wait before a retry; doubles per try, with full jitter
RETRY_CAP_S = 20.0  # the longest wait between two tries of a row
RETRY_AFTER_CAP_S = 120.0  # the longest Retry-After honoured
DECREASE_EVERY_S = 0.5  # 429s within this long of a decrease count as one signal


@dataclass(frozen=True)
class EndpointOptions:
    """Where a serving endpoint is and how to talk to it (the job's endpoint settings)."""

    base_url: str
    served_model: str | None = None
    api_key_env: str | None = None
    max_concurrency: int = 8
    request_timeout_s: float = 120.0
    max_retries: int = 6

    @property
    def host(self) -> str:
        """``host:port``, without user info: how messages and records name the server."""
        parts = urlsplit(self.base_url)
        return (parts.hostname or "?") + (f":{parts.port}" if parts.port else "")

    def api_key(self) -> str | None:
        """The key from the environment variable ``api_key_env`` names; None without one."""
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise EngineError(f"api_key_env: the environment variable {self.api_key_env} is not set")
        return key

    def cache_key(self) -> str:
        return f"{self.base_url}|{self.served_model}|{self.api_key_env}|{self.max_concurrency}|{self.request_timeout_s}|{self.max_retries}"


class RowRefused(Exception):
    """The server refused this row's request (a 4xx other than 401, 403, 404, 408 and 429)."""


@dataclass
class AdaptiveLimit:
    """Requests in flight: at most ``limit``, which halves on a throttle (429) and grows by one
    after ``limit`` successes in a row, between 1 and ``maximum``."""

    maximum: int
    limit: float = 0.0
    lowest: float = 0.0
    throttles: int = 0
    _in_flight: int = 0
    _successes: int = 0
    _last_decrease: float = -1e9
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        self.limit = self.lowest = float(self.maximum)

    def __enter__(self) -> AdaptiveLimit:
        with self._cond:
            self._cond.wait_for(lambda: self._in_flight < int(self.limit))
            self._in_flight += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()

    def succeeded(self) -> None:
        with self._cond:
            self._successes += 1
            if self._successes >= self.limit and self.limit < self.maximum:
                self.limit, self._successes = min(float(self.maximum), self.limit + 1), 0
                self._cond.notify_all()

    def throttled(self) -> None:
        with self._cond:
            self.throttles += 1
            now = time.monotonic()
            if now - self._last_decrease >= DECREASE_EVERY_S:
                self.limit, self._successes, self._last_decrease = max(1.0, self.limit / 2), 0, now
                self.lowest = min(self.lowest, self.limit)


# How often ``map`` wakes while it waits for its requests.
_WAIT_SLICE_S = 0.5


class EndpointClient:
    """Requests to one endpoint, shared by the threads of one engine."""

    def __init__(self, options: EndpointOptions) -> None:
        import httpx

        self.options = options
        headers = {"Authorization": f"Bearer {key}"} if (key := options.api_key()) else {}
        self._http = httpx.Client(
            base_url=options.base_url,
            headers=headers,
            timeout=options.request_timeout_s,
            limits=httpx.Limits(
                max_connections=options.max_concurrency, max_keepalive_connections=options.max_concurrency
            ),
        )
        self.limit = AdaptiveLimit(options.max_concurrency)
        self._stop = threading.Event()

    def get(self, path: str, timeout: float | None = None) -> Any:
        """A GET answered once (no retries): for the checks made before any work."""
        import httpx

        try:
            response = self._http.get(path, timeout=timeout or self.options.request_timeout_s)
        except httpx.HTTPError as err:
            raise EngineError(f"cannot reach {self.options.host}: {_transport_reason(err)}") from None
        if response.status_code != 200:
            raise EngineError(f"{self.options.host} answered GET {path} with {_status_text(response)}")
        return response.json()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        """POST ``body`` and return the JSON answer, retrying as the module says."""
        import httpx

        tries = self.options.max_retries + 1
        reason = ""
        for attempt in range(tries):
            if self._stop.is_set():
                raise EngineError("stopped: another request of this call failed")
            wait = None
            with self.limit:
                try:
                    response = self._http.post(path, json=body)
                except httpx.HTTPError as err:
                    reason = _transport_reason(err)
                else:
                    status = response.status_code
                    if 200 <= status < 300:
                        self.limit.succeeded()
                        return response.json()
                    reason = _status_text(response)
                    if status == 429:
                        self.limit.throttled()
                        wait = _retry_after(response.headers.get("retry-after"))
                    elif status in (401, 403):
                        raise EngineError(f"{self.options.host} refused the API key ({reason}): check api_key_env")
                    elif status == 404:
                        raise EngineError(f"{self.options.host} has no {path} for this model ({reason})")
                    elif status != 408 and status < 500:
                        raise RowRefused(f"the endpoint refused this row: {reason}")
            if attempt + 1 < tries:
                backoff = random.uniform(0, min(RETRY_CAP_S, RETRY_BASE_S * 2**attempt))
                self._stop.wait(backoff if wait is None else wait + backoff / 4)
        raise EngineError(f"{self.options.host}: {reason}, {tries} tries of one request (max_retries={tries - 1})")

    def map(self, fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
        """``fn`` over ``items`` on ``max_concurrency`` threads, results in order; the first
        exception stops the other requests of the call and is raised."""
        if not items:
            return []
        self._stop.clear()
        workers = min(self.options.max_concurrency, len(items))
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="endpoint") as pool:
            futures = [pool.submit(fn, item) for item in items]
            try:
                # Whichever request fails first ends the call, not the first in order; waited in
                # slices so that an exception raised into this thread (a task timeout) gets through.
                pending = set(futures)
                while pending:
                    _, pending = concurrent.futures.wait(
                        pending, timeout=_WAIT_SLICE_S, return_when=concurrent.futures.FIRST_EXCEPTION
                    )
                    failed = next((f for f in futures if f.done() and f.exception() is not None), None)
                    if failed is not None:
                        failed.result()
                return [future.result() for future in futures]
            except BaseException:
                self._stop.set()
                for future in futures:
                    future.cancel()
                raise

    def close(self) -> None:
        self._http.close()


def _status_text(response: Any) -> str:
    """``HTTP 400: <the server's message>``, the message cut to one short line."""
    try:
        data = response.json()
        message = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(message, dict):
            message = message.get("message", message)
    except ValueError:
        message = response.text
    text = " ".join(str(message).split())[:300]
    return f"HTTP {response.status_code}" + (f": {text}" if text else "")


def _transport_reason(err: Exception) -> str:
    import httpx

    if isinstance(err, httpx.TimeoutException):
        return f"no answer within the request timeout ({type(err).__name__})"
    if isinstance(err, httpx.ConnectError):
        return f"connection refused or failed ({err})"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (a number or an HTTP date), capped."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), RETRY_AFTER_CAP_S)
