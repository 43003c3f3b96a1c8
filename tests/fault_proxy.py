"""An HTTP proxy in front of a real OpenAI-compatible server that injects the faults a serving
endpoint shows under load, and records what reached the client.

Each request is forwarded to the upstream server unless its fault says otherwise. ``faults`` maps a
POST's number (0, 1, 2... in arrival order; GETs pass untouched) to a fault; a callable decides
instead when given:

- ``("status", 429, {"Retry-After": "1"})``, ``("status", 500, {})``: answered by the proxy, not
  forwarded;
- ``"drop"``: the connection is closed without an answer, before forwarding;
- ``"drop-after"``: forwarded (the server does the work), then closed without an answer;
- ``("slow", seconds)``: forwarded, and the answer held back that long (past the client's timeout);
- ``"refuse"`` for every request: see :meth:`FaultProxy.refuse_all`, where each connection is
  closed at once.

What the client received is in :attr:`FaultProxy.delivered`: the row text (the last chat message,
or the embedding input) of every 2xx answer passed on in full and in time.
"""

from __future__ import annotations

import collections
import http.client
import http.server
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

Fault = Any


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy: FaultProxy

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._handle(b"")

    def do_POST(self) -> None:
        self._handle(self.rfile.read(int(self.headers.get("content-length") or 0)))

    def _handle(self, body: bytes) -> None:
        proxy = self.proxy
        number, fault = proxy._next_fault(self.command, body)
        with proxy._lock:
            proxy._in_flight += 1
            proxy.max_in_flight = max(proxy.max_in_flight, proxy._in_flight)
        try:
            self._answer(body, number, fault)
        finally:
            with proxy._lock:
                proxy._in_flight -= 1

    def _answer(self, body: bytes, number: int, fault: Fault) -> None:
        proxy = self.proxy
        if fault in ("drop", "refuse"):
            self._drop()
            return
        if isinstance(fault, tuple) and fault[0] == "status":
            _, code, headers = fault
            self._send(code, {"content-type": "application/json", **headers}, b'{"error":{"message":"injected"}}')
            return
        status, headers, payload = proxy._forward(self.command, self.path, self.headers, body)
        if fault == "drop-after":
            self._drop()
            return
        if isinstance(fault, tuple) and fault[0] == "slow":
            time.sleep(fault[1])
            try:
                self._send(status, headers, payload)
            except OSError:
                pass
            return  # the client has given up on it: not counted as delivered
        self._send(status, headers, payload)
        if 200 <= status < 300 and self.command == "POST":
            with proxy._lock:
                proxy.delivered[_row_text(body)] += 1

    def _send(self, status: int, headers: dict[str, str], payload: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _row_text(body: bytes) -> str:
    data = json.loads(body or b"{}")
    if "messages" in data:
        return data["messages"][-1]["content"]
    return str(data.get("input"))


class FaultProxy:
    """A threaded HTTP proxy on loopback in front of ``upstream`` (a base URL such as
    ``http://127.0.0.1:8000/v1``); :attr:`base_url` is the same API through the proxy."""

    def __init__(self, upstream: str, faults: dict[int, Fault] | Callable[[int, str, bytes], Fault] | None = None):
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname, parts.port)
        self._faults = faults or {}
        self._lock = threading.Lock()
        self._count = 0
        self._in_flight = 0
        self._refusing = False
        self.max_in_flight = 0
        self.delivered: collections.Counter[str] = collections.Counter()
        self.requests: list[tuple[int, str, Fault]] = []  # (number, method, fault)
        handler = type("Handler", (_Handler,), {"proxy": self})
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}{parts.path}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def refuse_all(self, refusing: bool = True) -> None:
        """Close every connection at once without an answer (a server gone), or stop doing so."""
        self._refusing = refusing

    def faults_injected(self) -> collections.Counter[str]:
        return collections.Counter(_fault_name(f) for _, _, f in self.requests if f is not None)

    def _next_fault(self, method: str, body: bytes) -> tuple[int, Fault]:
        with self._lock:
            number = self._count if method == "POST" else -1
            self._count += method == "POST"
        if self._refusing:
            fault: Fault = "refuse"
        elif method != "POST":
            fault = None
        elif callable(self._faults):
            fault = self._faults(number, method, body)
        else:
            fault = self._faults.get(number)
        with self._lock:
            self.requests.append((number, method, fault))
        return number, fault

    def _forward(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection(*self._upstream, timeout=300)
        try:
            forwarded = {k: v for k, v in headers.items() if k.lower() not in ("host", "connection")}
            connection.request(method, path, body=body or None, headers=forwarded)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _fault_name(fault: Fault) -> str:
    if isinstance(fault, tuple):
        return f"{fault[0]} {fault[1]}" + (" retry-after" if fault[0] == "status" and fault[2] else "")
    return str(fault)
