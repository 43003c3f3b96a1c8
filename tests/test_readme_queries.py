"""The README's analyst queries, run exactly as written (extracted from README.md) on a real output."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"


def analyst_blocks(language: str) -> list[str]:
    text = README.read_text()
    section = text.split("## For analysts", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def analyst_dir(tmp_path_factory, prefect_server):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from shardwise.flows.enrich import enrich
    from shardwise.tasks.config.job import JobConfig
    from shardwise.tasks.records.demo_data import write_reviews_dataset

    root = tmp_path_factory.mktemp("analyst")
    write_reviews_dataset(str(root / "in"), files=2, rows_per_file=8, rows_per_group=4)
    cfg = JobConfig(
        input=str(root / "in"),
        output=str(root / "out"),
        id_column="review_id",
        rows_per_shard=8,
        generate={"max_new_tokens": 3},
    )
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        state = enrich(job=cfg.public_dict(), return_state=True)
    assert state.is_completed()
    return root


def test_readme_has_the_three_sql_queries_and_a_polars_block():
    assert len(analyst_blocks("sql")) == 3 and len(analyst_blocks("python")) == 1


def test_duckdb_queries_run_as_written(analyst_dir, monkeypatch):
    import duckdb

    monkeypatch.chdir(analyst_dir)
    rows, joined, neighbours = [duckdb.connect().execute(q).fetchall() for q in analyst_blocks("sql")]
    assert len(rows) == 16 and [r[0] for r in rows] == sorted(r[0] for r in rows)
    assert len(joined) == 16 and all(r[3] for r in joined)
    assert len(neighbours) == 5
    similarities = [r[1] for r in neighbours]
    assert similarities == sorted(similarities, reverse=True) and all(-1.0 <= s <= 1.0001 for s in similarities)
    assert "r-000003" not in [r[0] for r in neighbours]


def test_polars_block_runs_as_written(analyst_dir, monkeypatch, capsys):
    monkeypatch.chdir(analyst_dir)
    (block,) = analyst_blocks("python")
    exec(compile(block, "README.md", "exec"), {})  # noqa: S102 - the README's own example
    printed = capsys.readouterr().out
    assert "shape: (16," in printed and "finish_reason" in printed
    assert os.path.exists("out/_SUCCESS")


def structured_blocks(language: str) -> list[str]:
    section = README.read_text().split("## Structured output", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def structured_dir(tmp_path_factory, prefect_server):
    """A run with the README's own YAML example (its generate section) over eight reviews."""
    import yaml
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from shardwise.flows.enrich import enrich
    from shardwise.tasks.config.job import JobConfig
    from shardwise.tasks.records.demo_data import write_reviews_dataset

    (example,) = structured_blocks("yaml")
    root = tmp_path_factory.mktemp("structured")
    write_reviews_dataset(str(root / "in"), files=1, rows_per_file=8, rows_per_group=4)
    cfg = JobConfig(
        input=str(root / "in"),
        output=str(root / "out"),
        id_column="review_id",
        task="generate",
        keep_columns="id",
        rows_per_shard=8,
        generate=yaml.safe_load(example)["generate"],
    )
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        state = enrich(job=cfg.public_dict(), return_state=True)
    assert state.is_completed()
    return root


def test_structured_output_queries_run_as_written(structured_dir, monkeypatch, capsys):
    import duckdb

    monkeypatch.chdir(structured_dir)
    (sql,) = structured_blocks("sql")
    by_sentiment = duckdb.connect().execute(sql).fetchall()
    assert sum(n for _, n, _ in by_sentiment) >= 7  # at most one answer of eight cut short
    assert {s for s, _, _ in by_sentiment} <= {"positive", "negative", "mixed"}
    (block,) = structured_blocks("python")
    exec(compile(block, "README.md", "exec"), {})  # noqa: S102 - the README's own example
    printed = capsys.readouterr().out
    assert "would_recommend" in printed and "stars" in printed
