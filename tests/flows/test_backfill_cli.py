"""``shardwise backfill --start --end [--plan]`` through the command line, on real partitions (the
command runs in the test process: tests/cli.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from shardwise.tasks.records.demo_data import write_reviews_dataset
from tests.cli import run_cli
from tests.flows.test_cli import assert_one_line_error

pytestmark = pytest.mark.slow

DATES = ["2026-11-01", "2026-11-02", "2026-11-03"]


def _job(tmp_path: Path) -> list[str]:
    """Partitions for the first two dates only: the third has not landed."""
    for i, date in enumerate(DATES[:2]):
        write_reviews_dataset(str(tmp_path / "raw" / f"dt={date}"), files=1, rows_per_file=6 + i, rows_per_group=3)
    return [
        "--input",
        str(tmp_path / "raw"),
        "--output",
        str(tmp_path / "enriched"),
        "--task",
        "embed",
        "--id-column",
        "review_id",
        "--rows-per-shard",
        "3",
        "--device",
        "cpu",
        "--set",
        "name=backfill-cli",
    ]


def test_backfill_plan_sums_the_partitions_and_max_cost_refuses(tmp_path):
    job = _job(tmp_path)
    out = tmp_path / "enriched"

    proc = run_cli("backfill", *job, "--start", DATES[0], "--end", DATES[-1], "--plan", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(proc.stdout)
    assert not out.exists()  # a plan writes nothing
    by_date = {p["date"]: p for p in plan["partitions"]}
    assert list(by_date) == DATES
    assert "not found" in by_date[DATES[2]]["error"]
    parts = [by_date[d]["forecast"] for d in DATES[:2]]
    assert [p["rows"] for p in parts] == [6, 7]
    assert (plan["rows"], plan["rows_to_compute"], plan["shards"]) == (13, 13, 5)
    for key in ("embedded_tokens", "device_seconds", "cost"):
        for end in ("low", "expected", "high"):
            assert plan[key][end] == pytest.approx(sum(p[key][end] for p in parts)), (key, end)
    assert plan["embedded_tokens"]["basis"].startswith("sum over 2 partition(s); each exact")

    human = run_cli("backfill", *job, "--start", DATES[0], "--end", DATES[-1], "--plan")
    assert human.returncode == 0, human.stderr[-3000:]
    assert "shardwise backfill plan, 3 dates" in human.stdout, human.stdout
    assert re.search(r"dt=2026-11-03\s+cannot run: .*not found", human.stdout), human.stdout

    refused = run_cli(
        "backfill", *job, "--start", DATES[0], "--end", DATES[1], "--max-cost", f"{plan['cost']['high'] / 2:.12f}"
    )
    assert_one_line_error(refused, 2, "exceeds max_cost")
    assert not out.exists()


def test_backfill_runs_the_partitions_once(cli, tmp_path):
    job = _job(tmp_path)
    out = tmp_path / "enriched"
    ran = cli("backfill", *job, "--start", DATES[0], "--end", DATES[1], "--max-cost", "1000")
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "2 ran, 0 skipped, 0 failed of 2 dates" in ran.stdout, ran.stdout
    assert all((out / f"dt={d}" / "_SUCCESS").exists() for d in DATES[:2])

    again = cli("backfill", *job, "--start", DATES[0], "--end", DATES[-1])
    assert again.returncode == 1  # the third date has no input
    assert "0 ran, 2 skipped, 1 failed of 3 dates" in again.stdout, again.stdout
    assert "not found" in again.stdout, again.stdout

    after = json.loads(cli("backfill", *job, "--start", DATES[0], "--end", DATES[1], "--plan", "--json").stdout)
    assert after["rows_to_compute"] == 0


def test_backfill_bad_dates_exit_2(tmp_path):
    proc = run_cli("backfill", *_job(tmp_path), "--start", DATES[1], "--end", DATES[0], "--plan")
    assert_one_line_error(proc, 2, "before start")


def test_a_partition_held_by_the_quality_gate_exits_4(cli, tmp_path):
    """Reviews on the first night, server logs on the second: the second partition's embeddings
    drift from the first's, so it is written but held; the backfill says so and exits 4."""
    from tests.flows.test_quality_gate import reviews_then_server_logs

    first, second = "2026-10-01", "2026-10-02"
    config = reviews_then_server_logs(tmp_path, first, second, "held-backfill")
    proc = cli("backfill", "--config", str(config), "--start", first, "--end", second)
    assert proc.returncode == 4, (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stdout + proc.stderr
    assert re.search(rf"dt={first}\s+ran\b", proc.stdout), proc.stdout
    assert re.search(rf"dt={second}\s+held\b.*centroid_drift", proc.stdout), proc.stdout
    held = tmp_path / "enriched" / f"dt={second}"
    assert (held / "_QUALITY_HOLD").is_file() and not (held / "_SUCCESS").exists()
    assert (tmp_path / "enriched" / f"dt={first}" / "_SUCCESS").is_file()
