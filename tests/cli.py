"""The ``shardwise`` command run inside the test process, for tests of what a command does rather
than of the process that runs it.

A subprocess pays interpreter start, the imports of torch, transformers, Prefect and MLflow, and a
model load on every call; here those are paid once per test process (the engine cache keeps the
loaded models). :func:`run_cli` gives what the subprocess gave: the exit code, and everything the
command would have printed on stdout and stderr, Prefect's console log lines and warnings included.

What only a real process shows stays with subprocesses (tests/flows/test_cli.py, test_run_endings.py,
test_integrity.py): signals and Ctrl-C, crash points that kill the process, worker processes and
Ray, the console script's own exit codes, the temporary Prefect server of a command run without
``PREFECT_API_URL``, and settings read only at import time.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

# One command at a time: stdout, stderr, the log handlers' streams and os.environ are process-wide.
_LOCK = threading.Lock()


@dataclass
class Result:
    """What ``subprocess.run(..., capture_output=True, text=True)`` gives, for the same command."""

    returncode: int
    stdout: str
    stderr: str
    args: list[str] = field(default_factory=list)


class ProcessWouldEnd(RuntimeError):
    """The command ended its process (``os._exit``: interrupted or terminated); run it as a subprocess."""


def run_cli(*args: str, env: Mapping[str, str | None] | None = None) -> Result:
    """``shardwise ARGS`` in this process: ``shardwise.flows.cli.main`` with stdout, stderr, log handlers that
    write to them, and warnings captured; ``env`` set (None removes a variable) for the call only.

    The Prefect API is whatever this process reports to: with the ``cli`` fixture (tests/conftest.py)
    the session's server, so no temporary server is started per call (without a server, a command
    that reaches the flow starts one, as the console script would). After the call, os.environ,
    the signal handlers, the log handlers' streams and the warning filters are what they were
    before it."""
    from shardwise.flows import cli

    argv = [str(a) for a in args]
    with _LOCK, _environment(env or {}), _signal_handlers(), _captured() as (out, err):
        exit_abandoning_threads = cli._exit_abandoning_threads
        cli._exit_abandoning_threads = _refuse_exit
        try:
            code = cli.main(argv)
        except SystemExit as exit_:
            code = _exit_code(exit_.code)
        finally:
            cli._exit_abandoning_threads = exit_abandoning_threads
    return Result(code, out.getvalue(), err.getvalue(), argv)


def _refuse_exit(code: int):
    raise ProcessWouldEnd(f"the command would end the process with exit code {code}: run it as a subprocess")


def _exit_code(code: object) -> int:
    """As the interpreter turns ``SystemExit(code)`` into an exit status (a message is printed)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


@contextlib.contextmanager
def _environment(changes: Mapping[str, str | None]) -> Iterator[None]:
    """``changes`` applied to os.environ; afterwards os.environ is exactly what it was, whatever the
    command set (``main`` sets defaults a process keeps until it ends)."""
    before = dict(os.environ)
    for key, value in changes.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        yield
    finally:
        for key in set(os.environ) - set(before):
            del os.environ[key]
        for key, value in before.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


@contextlib.contextmanager
def _signal_handlers() -> Iterator[None]:
    """``main`` installs a SIGTERM handler (and Prefect its own while a flow runs): put back pytest's."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)


# Prefect's console and debug handlers (logging.yml: stream ext://sys.stderr, bound when Prefect
# configured logging, which may have been under another capture than this one).
_CONSOLE_HANDLERS = ("PrefectConsoleHandler", "_SafeStreamHandler")


# Loggers of servers the tests run inside this process (moto's S3 server, tests/conftest.py): a
# command in a process of its own never prints their lines.
_TEST_SERVER_LOGGERS = ("werkzeug", "moto")


def _not_a_test_server(record: logging.LogRecord) -> bool:
    return not record.name.startswith(_TEST_SERVER_LOGGERS)


def _stream_handlers() -> list[logging.StreamHandler]:
    """Every handler that writes to the console: stream handlers on any logger (Prefect's console
    and debug handlers among them) whose stream is a standard stream, or Prefect's own console
    handler whatever stream it was given. File handlers and pytest's capture handlers write
    elsewhere and are left alone."""
    standard = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) if s is not None}
    loggers = [logging.getLogger()] + [
        lg for lg in list(logging.Logger.manager.loggerDict.values()) if isinstance(lg, logging.Logger)
    ]
    found: dict[int, logging.StreamHandler] = {}
    for lg in loggers:
        for handler in list(lg.handlers):
            if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
                continue
            if isinstance(getattr(type(handler), "stream", None), property):
                continue  # logging's last resort: writes to whatever sys.stderr is, so to the capture
            if id(handler.stream) in standard or type(handler).__name__ in _CONSOLE_HANDLERS:
                found[id(handler)] = handler
    return list(found.values())


@contextlib.contextmanager
def _captured() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """stdout and stderr into two buffers, as two pipes would take them: print calls from any thread,
    the console log handlers (a flow's progress lines, library warnings; not the lines of test
    servers running in this process), and Python warnings, filtered as a fresh interpreter filters
    them."""
    out, err = io.StringIO(), io.StringIO()
    saved_stdout, saved_stderr = sys.stdout, sys.stderr
    to_stdout = {id(s) for s in (saved_stdout, sys.__stdout__) if s is not None}
    handlers = _stream_handlers()
    streams = []
    for handler in handlers:
        target = out if id(handler.stream) in to_stdout else err
        console = getattr(handler, "console", None)  # Prefect's handler prints through a rich Console
        streams.append((handler, handler.stream, console, getattr(console, "_file", None)))
        handler.setStream(target)
        handler.addFilter(_not_a_test_server)
        if console is not None:
            console._file = target
    sys.stdout, sys.stderr = out, err
    try:
        with warnings.catch_warnings():
            warnings.resetwarnings()  # a fresh interpreter's filters (python -W unset)
            warnings.simplefilter("default")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.showwarning = _print_warning
            yield out, err
    finally:
        sys.stdout, sys.stderr = saved_stdout, saved_stderr
        for handler, stream, console, console_file in streams:
            handler.removeFilter(_not_a_test_server)
            handler.setStream(stream)
            if console is not None:
                console._file = console_file


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """What the interpreter prints for a warning, on the command's stderr."""
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
