"""The Prefect task runners shard tasks run on (threads, worker processes, Ray), the tags and Ray
resources attached to them, and the one temporary Prefect server that every worker reports to.

What they are built from (worker counts, devices, shards in flight) are plain rules over the job
config in :mod:`shardwise.tasks.compute.runners`.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from shardwise.tasks.compute.runners import (
    gpus_per_worker,
    pinned_gpus,
    ray_resources,
    shards_in_flight,
    start_worker,
    worker_count,
)
from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.errors import ConfigError
from shardwise.tasks.faults import fault_environment


class WorkerProcessPool(ProcessPoolTaskRunner):
    """Prefect's process pool, with worker logs and events forwarded to the flow's own API.

    The pool forwards what workers log from a plain thread, which sees Prefect's import-time
    settings rather than the settings the flow runs under (a test server, or the temporary server
    of ``shared_prefect_api``); without this it starts a stray temporary server of its own.
    """

    def __enter__(self):
        self._flow_context = contextvars.copy_context()
        return super().__enter__()

    def _forward_subprocess_messages(self) -> None:
        context = getattr(self, "_flow_context", None)
        forward = super()._forward_subprocess_messages
        return context.run(forward) if context is not None else forward()


class ShardThreadPool(ThreadPoolTaskRunner):
    """Prefect's thread pool, except that an interrupt (Ctrl-C, SIGTERM) does not wait for the
    shards in flight: they are abandoned (a part is published whole or not at all, so the rerun
    redoes them) and the command ends at once instead of when the longest shard finishes."""

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception) and self._executor is not None:
            for event in self._cancel_events.values():
                event.set()
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        super().__exit__(exc_type, exc_value, traceback)


def shard_task_runner(cfg: JobConfig) -> TaskRunner:
    """The task runner for this job's shard tasks."""
    if cfg.runner == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise ConfigError("runner: ray needs prefect-ray: pip install 'shardwise[ray]'") from None

        init_kwargs: dict[str, Any] = {"include_dashboard": False} if cfg.ray.address is None else {}
        faults = fault_environment()
        if faults:  # Ray workers do not inherit the driver's environment
            init_kwargs["runtime_env"] = {"env_vars": faults}
        return RayTaskRunner(address=cfg.ray.address, init_kwargs=init_kwargs)
    workers = worker_count(cfg)
    if workers == 1:
        # On a GPU one shard computes (under the device lock) while another reads or writes.
        return ShardThreadPool(max_workers=shards_in_flight(cfg))
    gpus = pinned_gpus(cfg)
    # Slots are claimed through files: the runner is pickled with each task, and a
    # multiprocessing queue or lock refuses that.
    slot_dir = tempfile.mkdtemp(prefix="shardwise-workers-")
    atexit.register(shutil.rmtree, slot_dir, True)
    return WorkerProcessPool(
        max_workers=workers, initializer=start_worker, initargs=(slot_dir, workers, gpus, gpus_per_worker(cfg))
    )


def shard_tags(cfg: JobConfig) -> list[str]:
    """The Prefect tags for shard tasks: ``concurrency_tag`` if a concurrency limit exists for it.

    Prefect asks its server for a slot on every tagged task, limit or not; against the local
    temporary server that request took about 2 s per shard (docs/benchmarks.md). So the tag is set
    only when there is a limit to obey, as checked when the run starts.
    """
    if not cfg.concurrency_tag:
        return []
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(f"tag:{cfg.concurrency_tag}")
        except ObjectNotFound:
            return []
    return [cfg.concurrency_tag]


@contextlib.contextmanager
def shard_placement(cfg: JobConfig) -> Iterator[dict[str, float]]:
    """Around the shard submissions: on Ray, attach each task's resource request, and retry a shard
    whose Ray worker died (killed, out of memory, node lost) ``shard_retries`` times, as one that
    raised is (Prefect's retries run inside the worker, so they cannot outlive it); elsewhere nothing."""
    if cfg.runner != "ray":
        yield {}
        return
    from prefect_ray.context import remote_options

    resources = ray_resources(cfg)
    with remote_options(**resources, max_retries=cfg.shard_retries):
        yield resources


# The temporary server :func:`prefect_api_starting` started, while it runs.
_starting: dict[str, _TemporaryServer] = {}


def _temporary_server_needed() -> bool:
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    return not PREFECT_API_URL.value() and bool(PREFECT_SERVER_EPHEMERAL_ENABLED.value())


class _TemporaryServer:
    """Prefect's temporary server process, started with the command and settings Prefect's own
    ``SubprocessASGIServer`` uses, but without importing Prefect's server code into this process
    (about 1.5 s here) and without waiting for it to answer (:meth:`wait_until_up`)."""

    def __init__(self) -> None:
        import socket

        import prefect
        from prefect.settings import get_current_settings

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            **get_current_settings().to_environment_variables(exclude_unset=True),
        }
        self.process: subprocess.Popen[bytes] | None = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(prefect.__module_path__.parent),
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],  # fmt: skip
            env=env,
        )
        atexit.register(self.stop)

    def wait_until_up(self) -> None:
        import httpx
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        assert self.process is not None
        deadline = time.monotonic() + PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        with httpx.Client() as client:
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        code = self.process.poll()
        raise RuntimeError(
            f"the temporary Prefect server did not answer at {self.api_url} in time"
            + (f" (it exited with code {code})" if code is not None else "")
        )

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


@contextlib.contextmanager
def prefect_api_starting() -> Iterator[None]:
    """Start the temporary Prefect server a run will need (none when ``PREFECT_API_URL`` is set)
    now, without waiting for it: its start-up (seconds of imports and database set-up) overlaps the
    run's checks, plan and forecast, and :func:`shared_prefect_api` waits for it when the flow
    starts. Stopped on leaving, also when the run is refused before its flow."""
    if not _temporary_server_needed() or _starting:
        yield
        return
    server = _TemporaryServer()
    _starting["server"] = server
    try:
        yield
    finally:
        del _starting["server"]
        server.stop()


@contextlib.contextmanager
def shared_prefect_api() -> Iterator[str | None]:
    """Make worker processes and Ray tasks report to the flow's Prefect API.

    With ``PREFECT_API_URL`` set, everything already shares that server. Without it, Prefect would
    start a temporary server per process, and each worker's task runs would land in a different
    one; so the temporary server is started here, once (or taken from
    :func:`prefect_api_starting`), and its URL handed down in the settings.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if not _temporary_server_needed():
        yield PREFECT_API_URL.value()
        return
    early = _starting.get("server")
    if early is not None:
        early.wait_until_up()
        server: Any = early
    else:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        server.start()
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        for service in (APILogWorker, EventsWorker):  # deliver what is queued while the server is up
            service.drain_all(timeout=10, at_exit=False)
        if server is not early:
            server.stop()
