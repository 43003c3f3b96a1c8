"""``shardwise plan`` and ``--max-cost`` through the command line, checked against real runs (the
command runs in the test process: tests/cli.py)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.cli import run_cli
from tests.flows.test_cli import assert_one_line_error

TEXTS = [
    "The kettle boils fast and quietly, and the handle stays cool.",
    "Shoes fell apart after a week of light walking.",
    None,
    "Great battery life; the screen is hard to read in sunlight.",
    "Arrived late and the box was crushed, but the lamp works.",
    "Too small for my hands, otherwise a fine keyboard.",
]


def _input(tmp_path: Path) -> Path:
    source = tmp_path / "in"
    source.mkdir()
    table = pa.table({"id": [f"r{i}" for i in range(len(TEXTS))], "text": pa.array(TEXTS, pa.string())})
    pq.write_table(table, source / "a.parquet", row_group_size=2)
    return source


def _job(source: Path, output: Path, name: str, *extra: str) -> list[str]:
    return [
        "--input",
        str(source),
        "--output",
        str(output),
        "--task",
        "generate",
        "--rows-per-shard",
        "2",
        "--prompt-template",
        "In five words, what is this review about? {text}",
        "--max-new-tokens",
        "3",
        "--set",
        f"name={name}",
        *extra,
    ]


def _plan(*args: str) -> dict:
    proc = run_cli("plan", *args, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _mlflow_totals(stdout: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    from shardwise.tasks.storage.local_state import tracking_uri

    run_id = next(line.split()[2] for line in stdout.splitlines() if line.startswith("MLflow run"))
    return MlflowClient(tracking_uri()).get_run(run_id).data.metrics


@pytest.mark.slow
def test_plan_matches_the_run_and_max_cost_refuses(cli, tmp_path):
    source = _input(tmp_path)
    out = tmp_path / "out"
    job = _job(source, out, "forecast-e2e")

    plan = _plan(*job)
    assert not out.exists()  # plan never writes into the output
    assert (plan["rows"], plan["shards"], plan["files"], plan["rows_to_compute"]) == (6, 3, 1, 6)
    for key in ("prompt_tokens", "generated_tokens", "device_seconds", "cost"):
        assert set(plan[key]) >= {"low", "expected", "high", "basis"}, key
    assert plan["prompt_tokens"]["basis"].startswith("exact")
    assert plan["generated_tokens"]["basis"].startswith("upper bound")
    assert plan["device_seconds"]["basis"].startswith("unmeasured guess")
    human = cli("plan", *job)
    assert human.returncode == 0 and "prompt tokens" in human.stdout and "upper bound" in human.stdout

    refused = cli("run", *job, "--max-cost", f"{plan['cost']['high'] / 2:.12f}")
    assert_one_line_error(refused, 2, "exceeds max_cost")
    assert not out.exists()

    first = cli("run", *job)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = pl.read_parquet(out / "part-*.parquet")
    assert rows["n_prompt_tokens"].sum() == pytest.approx(plan["prompt_tokens"]["expected"], rel=0.02)
    generated = rows["n_generated_tokens"].sum()
    assert plan["generated_tokens"]["low"] <= generated <= plan["generated_tokens"]["high"]
    assert "forecast" in first.stdout and "ETA" in first.stderr and "forecast USD" in first.stderr
    metrics = _mlflow_totals(first.stdout)
    assert metrics["forecast_prompt_tokens_expected"] == plan["prompt_tokens"]["expected"]
    assert metrics["prompt_tokens"] == rows["n_prompt_tokens"].sum()

    # The same job into a new output: generated tokens and device time now come from that run.
    out2 = tmp_path / "out2"
    job2 = _job(source, out2, "forecast-e2e")
    plan2 = _plan(*job2)
    assert plan2["generated_tokens"]["basis"].startswith("history")
    assert plan2["device_seconds"]["basis"].startswith("history")
    assert plan2["generated_tokens"]["expected"] == generated
    second = cli("run", *job2)
    assert second.returncode == 0, second.stderr[-3000:]
    actual = _mlflow_totals(second.stdout)
    assert plan2["generated_tokens"]["low"] <= actual["generated_tokens"] <= plan2["generated_tokens"]["high"]
    assert plan2["cost"]["low"] <= actual["cost"] <= plan2["cost"]["high"], (plan2["cost"], actual["cost"])

    # Resuming a complete output leaves nothing to compute.
    assert _plan(*job2)["rows_to_compute"] == 0


def _optimistic_history(name: str, source: Path, output: Path) -> None:
    """An earlier run of the job whose figures claim a device 10,000x faster than this one: the
    forecast then lets a run through that the real spend stops mid-way."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from shardwise.flows.cli import build_parser
    from shardwise.flows.flags import config_from_args
    from shardwise.tasks.storage.local_state import tracking_uri
    from shardwise.tasks.tracking.runs import _flatten, prompt_hash

    cfg = config_from_args(build_parser().parse_args(["run", *_job(source, output, name)]))
    client = MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    run = client.create_run(experiment_id)
    params: dict[str, str] = {}
    _flatten("", cfg.public_dict(), params)
    params["generate.prompt_hash"] = prompt_hash(cfg)
    client.log_batch(
        run.info.run_id,
        params=[Param(k, v) for k, v in params.items()],
        metrics=[
            Metric(k, v, 0, 0)
            for k, v in {"computed_valid_rows": 1000.0, "generated_tokens": 3000.0, "device_seconds": 0.03}.items()
        ],
        tags=[RunTag("shardwise.device_type", "cpu")],
    )
    client.set_terminated(run.info.run_id)


@pytest.mark.slow
def test_budget_reached_mid_run_keeps_committed_shards_and_a_rerun_finishes(cli, tmp_path):
    source = _input(tmp_path)
    out = tmp_path / "out"
    # 3600 USD per device-hour: one device-second costs one dollar.
    job = _job(source, out, "forecast-budget", "--set", "price_per_device_hour=3600")
    _optimistic_history("forecast-budget", source, out)
    plan = _plan(*job)
    assert plan["cost"]["high"] < 0.05, plan["cost"]

    stopped = cli("run", *job, "--max-cost", "0.1")
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    assert "budget reached" in stopped.stderr
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == 1  # the first shard cost more than the whole budget: no other started
    assert not (out / "_SUCCESS").exists()
    manifest = json.loads((out / "_manifest.json").read_text())
    assert [s["status"] for s in manifest["shards"]] == ["committed", "missing", "missing"]

    kept = parts[0].read_bytes()
    rerun = cli("run", *job, "--max-cost", "100000")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "1 of 3 shards already committed" in rerun.stderr
    assert parts[0].read_bytes() == kept  # resumed, not recomputed
    assert (out / "_SUCCESS").exists()
    assert pl.read_parquet(out / "part-*.parquet").height == len(TEXTS)


def test_a_deployment_run_over_budget_is_refused_before_writing(prefect_server, reviews_dir, tmp_path):
    """The enrich flow called directly, without a forecast (as a subflow of a user's flow): it makes its
    own and refuses the same way."""
    from shardwise.flows.enrich import enrich
    from shardwise.tasks.config.loading import build_config

    cfg = build_config(
        None,
        {
            "input": str(reviews_dir),
            "output": str(tmp_path / "out"),
            "id_column": "review_id",
            "task": "generate",
            "max_cost": 1e-12,
            "name": "forecast-deployment",
        },
    )
    state = enrich(job=cfg.public_dict(), return_state=True)
    assert state.is_failed()
    assert "exceeds max_cost" in state.message
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_calibration_measures_a_sample_when_there_is_no_history(cli, tmp_path):
    source = _input(tmp_path)
    out = tmp_path / "out"
    job = _job(source, out, "forecast-calibration", "--max-new-tokens", "8")

    plan = _plan(*job, "--calibrate", "4")
    assert not out.exists()  # the calibration answers are thrown away
    calibration = plan["calibration"]
    assert len(calibration["generated_per_row"]) == 4 and calibration["seconds"] > 0
    assert all(0 < n <= 8 for n in calibration["generated_per_row"])
    assert plan["generated_tokens"]["basis"].startswith("calibration: ")
    assert "over 4 sampled rows" in plan["generated_tokens"]["basis"]
    assert plan["device_seconds"]["basis"].startswith("calibration: ")
    assert _plan(*job)["calibration"] is None  # opt-in: without --calibrate no model is loaded

    run = cli("run", *job)
    assert run.returncode == 0, run.stderr[-3000:]
    generated = pl.read_parquet(out / "part-*.parquet")["n_generated_tokens"].sum()
    assert plan["generated_tokens"]["low"] <= generated <= plan["generated_tokens"]["high"], plan["generated_tokens"]
