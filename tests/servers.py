"""Real services for tests, all on loopback: a Prefect server process, moto's S3 server, and a TCP
proxy in front of it that can be cut to simulate storage becoming unreachable mid-run."""

from __future__ import annotations

import base64
import http.client
import http.server
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_until_healthy(
    name: str, command: list[str], env: dict[str, str], directory: Path, health_url: str, timeout: float
) -> subprocess.Popen:
    """Starts ``command`` with its output in ``directory/server.log`` and waits until ``health_url``
    answers 200. Fails with the log's tail if the process exits, and kills it if ``timeout`` passes."""
    proc = start_logged(command, env, directory)
    return wait_until_healthy(name, proc, directory / "server.log", health_url, timeout)


def start_logged(command: list[str], env: dict[str, str], directory: Path) -> subprocess.Popen:
    """Starts ``command`` with its output in ``directory/server.log``."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "server.log", "wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_until_healthy(
    name: str, proc: subprocess.Popen, log_path: Path, health_url: str, timeout: float
) -> subprocess.Popen:
    """Waits until ``health_url`` answers 200. Fails with the log's tail if the process exits, and
    kills it if ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(health_url, timeout=2) as response:
                if response.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{name} did not become healthy in {timeout:.0f} s: {log_path.read_text()[-2000:]}")


def start_prefect_server(home: Path, timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """``prefect server start`` in its own PREFECT_HOME; returns the process and its API URL."""
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    prefect = str(Path(sys.executable).with_name("prefect"))
    url = f"http://127.0.0.1:{port}/api"
    proc = start_until_healthy(
        "prefect server",
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env,
        home,
        f"{url}/health",
        timeout,
    )
    return proc, url


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; ``cut()`` drops every connection and stops
    listening (clients see connection refused), ``restore()`` listens again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        if self._listener is not None:
            return
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self._sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _BasicAuthHandler(http.server.BaseHTTPRequestHandler):
    """Answers 401 unless the request carries the server's one user and password (HTTP basic auth)."""

    expected_auth = ""

    def log_message(self, format: str, *args: object) -> None:  # quiet: tests read their own output
        pass

    def authorised(self) -> bool:
        if self.headers.get("Authorization") == self.expected_auth:
            return True
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="test"')
        self.send_header("Content-Length", "0")
        self.end_headers()
        return False


class _FileHandler(_BasicAuthHandler):
    """Static files with HEAD and byte ranges, which fsspec's HTTPFileSystem needs for Parquet."""

    root = Path(".")

    def _file(self) -> Path | None:
        path = (self.root / self.path.split("?", 1)[0].lstrip("/")).resolve()
        if not path.is_file() or self.root.resolve() not in path.parents:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return path

    def do_HEAD(self) -> None:
        if self.authorised() and (path := self._file()) is not None:
            self.send_response(200)
            self.send_header("Content-Length", str(path.stat().st_size))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()

    def do_GET(self) -> None:
        if not self.authorised() or (path := self._file()) is None:
            return
        data = path.read_bytes()
        wanted = self.headers.get("Range")
        if wanted and wanted.startswith("bytes="):
            first, _, last = wanted[6:].partition("-")
            start = int(first) if first else max(0, len(data) - int(last))
            end = min(int(last), len(data) - 1) if first and last else len(data) - 1
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            data = data[start : end + 1]
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.write(data)


class _ProxyHandler(_BasicAuthHandler):
    """Forwards every authorised request to ``upstream`` (an HTTP server without auth of its own)."""

    upstream = ("127.0.0.1", 0)

    def _forward(self) -> None:
        if not self.authorised():
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("authorization", "host", "connection")}
        connection = http.client.HTTPConnection(*self.upstream, timeout=120)
        try:
            connection.request(self.command, self.path, body=body or None, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        finally:
            connection.close()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward


def _basic_auth_server(handler: type, user: str, password: str, **attributes: object):
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    handler_class = type("Handler", (handler,), {"expected_auth": f"Basic {token}", **attributes})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler_class)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def serve_files_with_basic_auth(root: Path, user: str, password: str):
    """A loopback HTTP server for the files under ``root``, behind basic auth; ``.server_port``."""
    return _basic_auth_server(_FileHandler, user, password, root=Path(root))


def basic_auth_proxy(upstream: tuple[str, int], user: str, password: str):
    """A loopback HTTP server in front of ``upstream`` that lets through only ``user:password``."""
    return _basic_auth_server(_ProxyHandler, user, password, upstream=upstream)


def start_mlflow_server(directory: Path, timeout: float = 300) -> tuple[subprocess.Popen, tuple[str, int]]:
    """``mlflow server`` on loopback over a sqlite database and artifact folder in ``directory``."""
    port = free_port()
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    command = [
        mlflow,
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{directory / 'mlflow.db'}",
        "--artifacts-destination",
        str(directory / "artifacts"),
    ]
    proc = start_until_healthy(
        "mlflow server",
        command,
        {**os.environ, "MLFLOW_TRACKING_URI": ""},
        directory,
        f"http://127.0.0.1:{port}/health",
        timeout,
    )
    return proc, ("127.0.0.1", port)


class RayClusters:
    """Local one-node Ray clusters (``ray start --head``, CPU only), as on a real head node; their
    workers inherit this process's environment plus what a test asks for.

    One at a time, because ``ray stop`` stops every Ray process on the machine. A running cluster is
    reused by the next test whose environment for it is the same (S3 credentials a test sets, say,
    start a new one): a cluster start and stop costs tens of seconds on two cores, and each
    ``shardwise run`` is its own Ray job with its own workers.
    """

    def __init__(self) -> None:
        self.address: str | None = None
        self._env: dict[str, str] = {}
        self._machine_lock: Any = None

    def _hold_the_machine(self) -> None:
        """Fail, rather than stop another test process's cluster, when one already runs Ray here
        (a second pytest-xdist worker: tests/conftest.py's SHARED_WORKER keeps Ray tests on one)."""
        if self._machine_lock is not None:
            return
        import fcntl

        lock = open(Path(tempfile.gettempdir()) / "shardwise-tests-ray.lock", "w")  # noqa: SIM115 - held for the session
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise RuntimeError(
                "another test process on this machine runs Ray clusters; `ray stop` would stop them: "
                "Ray tests belong to the 'ray' group of SHARED_WORKER in tests/conftest.py"
            ) from None
        self._machine_lock = lock

    def get(self, **extra_env: str) -> str:
        """The address of a running cluster whose workers see ``extra_env``, started if needed."""
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **extra_env}
        env.pop("PYTEST_CURRENT_TEST", None)  # changes with every test; nothing in a run reads it
        if self.address is not None and self._env == env:
            return self.address
        self._hold_the_machine()
        self.stop()
        port = free_port()
        ray = str(Path(sys.executable).with_name("ray"))
        start = [
            ray,
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ]
        proc = subprocess.run(start, env=env, capture_output=True, text=True, timeout=300)
        self.address, self._env = f"127.0.0.1:{port}", env
        if proc.returncode != 0:
            self.stop()  # whatever part of it did start
            raise RuntimeError(f"ray start failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return self.address

    def stop(self) -> None:
        if self.address is None:
            return
        ray = str(Path(sys.executable).with_name("ray"))
        subprocess.run([ray, "stop", "--force"], env=self._env, capture_output=True, timeout=300)
        self.address, self._env = None, {}


def start_vllm_openai_server(
    directory: Path, model_dir: str, served_name: str, api_key: str, *extra: str
) -> tuple[subprocess.Popen, str]:
    """vLLM's OpenAI-compatible server (the CPU build in the test environment) for ``model_dir`` on
    loopback, fp32 and eager as the in-process vLLM engine runs on CPU, answering only requests
    that carry ``api_key``. Returns at once with the process and its base URL; wait with
    :func:`wait_until_healthy` on ``<base>/../health``."""
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    env.pop("VLLM_API_KEY", None)
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model_dir, "--served-model-name", served_name,
        "--host", "127.0.0.1", "--port", str(port), "--api-key", api_key,
        "--dtype", "float32", "--enforce-eager", "--seed", "0", "--generation-config", "vllm",
        *extra,
    ]  # fmt: skip
    return start_logged(command, env, directory), f"http://127.0.0.1:{port}/v1"
