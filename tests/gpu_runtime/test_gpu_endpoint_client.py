"""The endpoint client's own rules: how concurrency backs off under throttling and grows back,
and how long a ``Retry-After`` asks to wait. Its behaviour against a real server, faults
included, is in tests/flows/test_endpoints.py."""

from __future__ import annotations

import email.utils
import threading
import time

import pytest

from shardwise.gpu_runtime.endpoint_client import (
    DECREASE_EVERY_S,
    RETRY_AFTER_CAP_S,
    AdaptiveLimit,
    EndpointOptions,
    _retry_after,
)
from shardwise.gpu_runtime.errors import EngineError


def test_throttling_halves_the_limit_once_per_burst_and_successes_grow_it_back():
    limit = AdaptiveLimit(8)
    for _ in range(5):  # one burst of 429s from requests in flight together: one signal
        limit.throttled()
    assert limit.limit == 4 and limit.throttles == 5
    time.sleep(DECREASE_EVERY_S)
    limit.throttled()
    assert limit.limit == 2 and limit.lowest == 2
    for _ in range(2):
        limit.succeeded()
    assert limit.limit == 3  # one more after a window of `limit` successes
    for _ in range(3 + 4 + 5 + 6 + 7):
        limit.succeeded()
    assert limit.limit == 8  # never past max_concurrency


def test_requests_in_flight_never_exceed_the_limit():
    limit = AdaptiveLimit(3)
    peak, now, guard = [0], [0], threading.Lock()

    def request():
        with limit:
            with guard:
                now[0] += 1
                peak[0] = max(peak[0], now[0])
            time.sleep(0.02)
            with guard:
                now[0] -= 1

    threads = [threading.Thread(target=request) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 3


def test_retry_after_in_seconds_or_as_a_date_is_honoured_and_capped():
    assert _retry_after("2") == 2.0
    assert _retry_after(None) is None and _retry_after("soon") is None
    assert _retry_after("100000") == RETRY_AFTER_CAP_S
    in_five = email.utils.formatdate(time.time() + 5, usegmt=True)
    assert 3.5 < _retry_after(in_five) <= 5.0


def test_the_key_comes_from_the_named_variable_and_messages_name_only_the_host(monkeypatch):
    options = EndpointOptions("http://user:secret@10.0.0.7:8000/v1", api_key_env="SHARDWISE_TEST_KEY")
    assert options.host == "10.0.0.7:8000"
    monkeypatch.delenv("SHARDWISE_TEST_KEY", raising=False)
    with pytest.raises(EngineError, match="SHARDWISE_TEST_KEY is not set"):
        options.api_key()
    monkeypatch.setenv("SHARDWISE_TEST_KEY", "sk-1")
    assert options.api_key() == "sk-1"


def test_the_first_failed_request_stops_the_call_before_slower_ones_end():
    """A call's requests run side by side; when one fails, the requests still waiting for a thread
    are not sent, even while an earlier one is still out (the first in order is the slow one)."""
    from shardwise.gpu_runtime.endpoint_client import EndpointClient

    client = EndpointClient(EndpointOptions(base_url="http://127.0.0.1:9", served_model="m", max_concurrency=2))
    sent: list[int] = []

    def request(item: int) -> int:
        sent.append(item)
        if item == 0:
            time.sleep(1.5)
        elif item == 1:
            time.sleep(0.1)
            raise EngineError("item 1 refused")
        else:
            time.sleep(0.05)
        return item

    try:
        with pytest.raises(EngineError, match="item 1 refused"):
            client.map(request, list(range(40)))
    finally:
        client.close()
    assert sent[:2] == [0, 1] and len(sent) <= 5, sent
