"""``shardwise plan --compare``: the job's forecast next to each endpoint its config lists, through
the command line (in the test process: tests/cli.py). No endpoint is contacted: the base URLs point
at a port nothing listens on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.cli import run_cli
from tests.flows.test_forecast import _input

BASE_URL = "http://127.0.0.1:9/v1"
ENDPOINTS = [
    # half off 0.1 / 0.4: an eighth of dear's prices
    {"name": "cheap", "base_url": BASE_URL, "price_per_million_input_tokens": 0.1,
     "price_per_million_output_tokens": 0.4, "batch_discount": 0.5},
    {"name": "dear", "price_per_million_input_tokens": 0.4, "price_per_million_output_tokens": 1.6,
     "tokens_per_s": 100},
]  # fmt: skip


def _config(tmp_path: Path, name: str, **extra) -> Path:
    job = {
        "name": name,
        "input": str(_input(tmp_path)),
        "output": str(tmp_path / "out"),
        "task": "generate",
        "rows_per_shard": 2,
        "device": "cpu",
        "generate": {"max_new_tokens": 3, "prompt_template": "In five words, what is this review about? {text}"},
        **extra,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _plan(*args: str):
    proc = run_cli("plan", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_compare_prices_the_jobs_tokens_on_each_endpoint(tmp_path):
    config = _config(tmp_path, "compare-two", endpoints=ENDPOINTS)
    data = json.loads(_plan("--config", str(config), "--compare", "--json").stdout)
    own, cheap, dear = data["comparison"]
    assert [r["name"] for r in data["comparison"]] == ["this job", "cheap", "dear"]
    assert (own["where"], cheap["where"]) == ("hf on cpu", "127.0.0.1:9")
    # the same token estimates on every row: prompts in, answers out
    assert own["input_tokens"]["expected"] == data["prompt_tokens"]["expected"] > 0
    assert own["output_tokens"]["expected"] == data["generated_tokens"]["expected"] > 0
    for row in (cheap, dear):
        assert (row["input_tokens"], row["output_tokens"]) == (own["input_tokens"], own["output_tokens"])
    assert own["cost"] == data["cost"]
    assert cheap["cost"]["expected"] == pytest.approx(dear["cost"]["expected"] / 8)
    assert dear["cost"]["expected"] == pytest.approx(
        (own["input_tokens"]["expected"] * 0.4 + own["output_tokens"]["expected"] * 1.6) / 1e6
    )
    assert cheap["wall_seconds"]["basis"].startswith("unmeasured guess for an endpoint")
    assert dear["wall_seconds"]["basis"].startswith("stated: tokens_per_s 100")
    assert dear["wall_seconds"]["expected"] == pytest.approx(own["output_tokens"]["expected"] / 100)

    table = _plan("--config", str(config), "--compare").stdout
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line.split()[:1] in (["cheap"], ["dear"])}
    assert rows["cheap"][1] == "127.0.0.1:9" and rows["dear"][1] == "(no" and "this job" in table
    assert float(rows["cheap"][-2]) == pytest.approx(float(rows["dear"][-2]) / 8, abs=1e-6)  # 6 decimals shown
    assert "no endpoints to compare with" not in table


def test_compare_without_endpoints_shows_the_endpoint_jobs_own_row_and_how_to_list_some(tmp_path):
    prices = {"price_per_million_input_tokens": 1.0, "price_per_million_output_tokens": 4.0}
    config = _config(tmp_path, "compare-none", **prices)
    args = ("--config", str(config), "--set", "generate.engine=openai", "--set", f"generate.base_url={BASE_URL}")
    data = json.loads(_plan(*args, "--compare", "--json").stdout)
    (own,) = data["comparison"]
    assert own["where"] == "openai on endpoint:127.0.0.1:9"
    assert data["price_per_device_hour"] == 0.0
    tokens = (own["input_tokens"]["expected"] * 1.0 + own["output_tokens"]["expected"] * 4.0) / 1e6
    assert own["cost"]["expected"] == data["cost"]["expected"] == pytest.approx(tokens)
    table = _plan(*args, "--compare").stdout
    assert "this job" in table and "no endpoints to compare with" in table
