"""``SHARDWISE_DEBUG=1``: every error exit adds its traceback, and keeps its exit code and one-line message.

The command runs in the test process (tests/cli.py): the variable is read when an error is reported."""

from __future__ import annotations

from tests.cli import run_cli


def assert_error_with_traceback(proc, code: int, needle: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("shardwise: error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
    assert "Traceback (most recent call last)" in proc.stderr, proc.stderr[-2000:]


def test_debug_shows_the_traceback_of_a_config_error(tmp_path):
    proc = run_cli(
        "run",
        "--input",
        str(tmp_path / "missing"),
        "--output",
        str(tmp_path / "out"),
        env={"SHARDWISE_DEBUG": "1"},
    )
    assert_error_with_traceback(proc, 2, "missing")


def test_debug_shows_the_traceback_of_an_engine_error(reviews_dir, tmp_path):
    proc = run_cli(
        "run",
        "--input",
        str(reviews_dir),
        "--output",
        str(tmp_path / "out"),
        "--id-column",
        "review_id",
        "--gen-model",
        "bundled:nope",
        env={"SHARDWISE_DEBUG": "1"},
    )
    assert_error_with_traceback(proc, 2, "nope")


def test_without_debug_no_traceback(tmp_path):
    proc = run_cli(
        "run",
        "--input",
        str(tmp_path / "missing"),
        "--output",
        str(tmp_path / "out"),
        env={"SHARDWISE_DEBUG": ""},
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
