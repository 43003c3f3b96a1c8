"""A storage failure while a shard is read is a storage failure: an HTTP 500 is retried like any
transient one and, when it persists, raised as :class:`StorageError`; only a real 404 means the
file "disappeared since planning" (an :class:`InputError`, never retried). Against real servers
on loopback: moto's S3 API behind a proxy that answers 500 on demand, and an HTTP file server."""

from __future__ import annotations

import http.client
import http.server
import threading
from pathlib import Path

import pytest

from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.errors import InputError, StorageError
from shardwise.tasks.planning.shards import plan_shards
from shardwise.tasks.records.demo_data import write_reviews_dataset
from shardwise.tasks.records.shard_io import read_shard
from tests.conftest import S3_OPTIONS_NO_RETRY_STORM
from tests.servers import _FileHandler, free_port


class Faults:
    """How many more requests for ``marker`` paths to answer with ``status`` (0: none)."""

    def __init__(self) -> None:
        self.left, self.status, self.marker, self.answered = 0, 500, "/in/", 0
        self.lock = threading.Lock()

    def take(self, path: str) -> int | None:
        with self.lock:
            if self.left > 0 and self.marker in path:
                self.left -= 1
                self.answered += 1
                return self.status
        return None


def _fail(handler: http.server.BaseHTTPRequestHandler, status: int) -> None:
    body = b"" if handler.command == "HEAD" else b"<Error><Code>InternalError</Code><Message>boom</Message></Error>"
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    if body:
        handler.wfile.write(body)


def _serve(handler: type) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def s3_fault_proxy(upstream: str, faults: Faults) -> http.server.ThreadingHTTPServer:
    """Forwards S3 requests to ``upstream`` (host:port) unless ``faults`` answers them first."""
    host, port = upstream.removeprefix("http://").split(":")

    class Proxy(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status = faults.take(self.path)
            if status is not None:
                _fail(self, status)
                return
            connection = http.client.HTTPConnection(host, int(port), timeout=60)
            try:
                connection.request(self.command, self.path, body=body or None, headers=dict(self.headers.items()))
                response = connection.getresponse()
                payload = response.read()
                self.send_response(response.status)
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", length or str(len(payload)))  # HEAD: the object's size
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
            finally:
                connection.close()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = forward

    return _serve(Proxy)


@pytest.fixture
def s3_input(s3, s3_server):
    """Two shards of one S3 file, read through a proxy that can answer 500."""
    fs, bucket = s3
    faults = Faults()
    proxy = s3_fault_proxy(s3_server.url, faults)
    options = {**S3_OPTIONS_NO_RETRY_STORM, "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{proxy.server_port}"}}
    write_reviews_dataset(f"s3://{bucket}/in", files=1, rows_per_file=6, rows_per_group=3, storage_options=options)
    cfg = JobConfig(
        input=f"s3://{bucket}/in",
        output=f"s3://{bucket}/out",
        id_column="review_id",
        rows_per_shard=3,
        storage_options=options,
    )
    plan = plan_shards(cfg)
    yield fs, plan, options, faults
    proxy.shutdown()


def _fresh_s3() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # as in a worker process: no listing cached from planning


def test_s3_500s_while_opening_are_retried(s3_input):
    _, plan, options, faults = s3_input
    _fresh_s3()
    faults.left = 3  # botocore tries twice per call: the first open fails, the retry's second try works
    table = read_shard(plan.shards[0], ["review_id"], options)
    assert table.column("review_id").to_pylist() == ["r-000000", "r-000001", "r-000002"]
    assert faults.answered == 3 and faults.left == 0


def test_s3_500s_while_reading_are_retried(s3_input):
    _, plan, options, faults = s3_input
    faults.left = 3  # the listing from planning is cached: the 500s hit the data reads
    table = read_shard(plan.shards[1], ["review_id"], options)
    assert table.column("review_id").to_pylist() == ["r-000003", "r-000004", "r-000005"]
    assert faults.answered == 3


def test_s3_lasting_500s_are_a_storage_error_and_only_a_404_disappeared(s3_input):
    fs, plan, options, faults = s3_input
    _fresh_s3()
    faults.left = 1000
    with pytest.raises(StorageError) as lasting:
        read_shard(plan.shards[0], None, options)
    assert "disappeared" not in str(lasting.value)
    faults.left = 0
    fs.rm(plan.shards[0].source.removeprefix("s3://"))
    _fresh_s3()
    with pytest.raises(InputError, match="file disappeared since planning"):
        read_shard(plan.shards[0], None, options)


@pytest.fixture
def http_input(tmp_path: Path):
    """One file served over HTTP (HEAD and byte ranges) by a server that can answer 500."""
    write_reviews_dataset(str(tmp_path / "files"), files=1, rows_per_file=6, rows_per_group=3)
    faults = Faults()
    faults.marker = "/reviews-000.parquet"

    class Files(_FileHandler):
        root = tmp_path / "files"

        def authorised(self) -> bool:
            status = faults.take(self.path)
            if status is not None:
                _fail(self, status)
                return False
            return True

    server = _serve(Files)
    source = f"http://127.0.0.1:{server.server_port}/reviews-000.parquet"
    plan = plan_shards(JobConfig(input=source, output=str(tmp_path / "out"), id_column="review_id"))
    yield plan, faults, tmp_path / "files" / "reviews-000.parquet"
    server.shutdown()


def test_http_500_is_a_storage_error_retried_not_a_disappeared_file(http_input):
    plan, faults, path = http_input
    faults.left = 2  # fsspec's HEAD, then its GET, both 500: the next try reads
    assert read_shard(plan.shards[0], ["review_id"]).num_rows == 6
    assert faults.answered == 2
    faults.left = 1000
    with pytest.raises(StorageError, match="cannot read .*500"):
        read_shard(plan.shards[0], None)
    faults.left = 0
    path.unlink()
    with pytest.raises(InputError, match="file disappeared since planning"):
        read_shard(plan.shards[0], None)
