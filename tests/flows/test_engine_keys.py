"""Hashes and keys follow what the engine receives, so two runs are never mixed in one output:
the output schema in its property order, the chat prompt as rendered for the run's date, and a row
cache that never sits where a run reads its input or writes its output."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.flows.test_cli import assert_one_line_error

TEXTS = ["The kettle boils fast.", "Shoes fell apart after a week.", "Great value for money."]

STARS_FIRST = {
    "type": "object",
    "properties": {"stars": {"type": "integer"}, "sentiment": {"enum": ["positive", "negative"]}},
    "required": ["stars", "sentiment"],
}
SENTIMENT_FIRST = {**STARS_FIRST, "properties": dict(reversed(STARS_FIRST["properties"].items()))}


def _write(path, texts=TEXTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(len(texts))], "text": pa.array(texts, pa.string())}), path)


def _totals(output) -> dict:
    return json.loads((output / "_manifest.json").read_text())["totals"]


def _rows(output) -> list[dict]:
    return pa.concat_tables(pq.read_table(p) for p in sorted(output.glob("part-*.parquet"))).to_pylist()


@pytest.mark.slow
def test_reordered_schema_properties_are_another_config_and_another_cache_key(cli, tmp_path):
    _write(tmp_path / "in" / "a.parquet")
    out, cache = tmp_path / "out", tmp_path / "cache"
    job = ["--input", str(tmp_path / "in"), "--output", str(out), "--task", "generate", "--max-new-tokens", "4"]
    job += ["--cache", str(cache)]

    first = cli("run", *job, "--output-schema", json.dumps(STARS_FIRST))
    assert first.returncode == 0, first.stderr[-3000:]
    assert pq.read_schema(next(out.glob("part-*.parquet"))).field("generated").type.names == ["stars", "sentiment"]

    # The grammar follows property order: the same schema reversed is another config for the output...
    refused = cli("run", *job, "--output-schema", json.dumps(SENTIMENT_FIRST))
    assert_one_line_error(refused, 2, "different config", "generate.output_schema")

    # ...and another key for the cache: nothing is reused, every part has the new field order.
    rerun = cli("run", *job, "--output-schema", json.dumps(SENTIMENT_FIRST), "--overwrite")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (_totals(out)["rows_cached"], _totals(out)["rows_computed"]) == (0, 3)
    assert {tuple(pq.read_schema(p).field("generated").type.names) for p in out.glob("part-*.parquet")} == {
        ("sentiment", "stars")
    }


@pytest.mark.slow
def test_cache_reuses_generation_across_dates_when_the_prompt_is_the_same(cli, tmp_path):
    """SmolLM2's chat template prints no date: the prompt is the same on every night, so is the key."""
    for day in ("2026-11-01", "2026-11-02"):
        _write(tmp_path / "in" / f"dt={day}" / "a.parquet")
    cache = tmp_path / "cache"
    job = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--task", "generate"]
    job += ["--max-new-tokens", "4", "--cache", str(cache)]

    first = cli("run", *job, "--date", "2026-11-01")
    assert first.returncode == 0, first.stderr[-3000:]
    second = cli("run", *job, "--date", "2026-11-02")
    assert second.returncode == 0, second.stderr[-3000:]
    out1, out2 = tmp_path / "out" / "dt=2026-11-01", tmp_path / "out" / "dt=2026-11-02"
    assert (_totals(out2)["rows_cached"], _totals(out2)["rows_computed"]) == (3, 0)
    assert [r["generated_text"] for r in _rows(out2)] == [r["generated_text"] for r in _rows(out1)]


@pytest.fixture(scope="module")
def dated_model(tmp_path_factory):
    """A tiny random Llama whose chat template prints the date (as Llama-3.x's does)."""
    from transformers import AutoTokenizer

    from shardwise.gpu_runtime.dummy import llama_tokenizer_dir
    from tests.gpu_runtime.families import save_family

    tokenizer = AutoTokenizer.from_pretrained(llama_tokenizer_dir("the dated template test"))
    tokenizer.chat_template = (
        "<|im_start|>system\nToday Date: {{ date_string }}<|im_end|>\n"
        "{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
        "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
    )
    tokenizer_dir = tmp_path_factory.mktemp("dated-tokenizer")
    tokenizer.save_pretrained(tokenizer_dir)
    return save_family("llama", tmp_path_factory.mktemp("dated-llama"), str(tokenizer_dir))


@pytest.mark.slow
def test_cache_does_not_reuse_across_dates_when_the_template_prints_the_date(cli, tmp_path, dated_model):
    for day in ("2026-11-01", "2026-11-02"):
        _write(tmp_path / "in" / f"dt={day}" / "a.parquet")
    job = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--task", "generate"]
    job += ["--max-new-tokens", "4", "--gen-model", str(dated_model), "--cache", str(tmp_path / "cache")]

    first = cli("run", *job, "--date", "2026-11-01")
    assert first.returncode == 0, first.stderr[-3000:]
    second = cli("run", *job, "--date", "2026-11-02")
    assert second.returncode == 0, second.stderr[-3000:]
    totals = _totals(tmp_path / "out" / "dt=2026-11-02")
    assert (totals["rows_cached"], totals["rows_computed"]) == (0, 3)
    # the same date again is the same prompt: all from the cache
    again = cli("run", *job, "--date", "2026-11-01", "--output", str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert _totals(tmp_path / "again" / "dt=2026-11-01")["rows_cached"] == 3


@pytest.mark.slow
def test_a_run_whose_template_prints_today_is_not_resumed_on_another_day(cli, tmp_path, dated_model, monkeypatch):
    """Without ``generate.chat_date`` the prompts carry the day the run started: a resume on a later
    day would put answers to two different prompts in one output, so it is another config."""
    import datetime as dt

    from shardwise.tasks.config import job as job_module

    _write(tmp_path / "in" / "a.parquet")
    _write(tmp_path / "in" / "b.parquet")
    good = (tmp_path / "in" / "b.parquet").read_bytes()
    (tmp_path / "in" / "b.parquet").write_bytes(good[: len(good) // 2])  # fails its shard on day 1
    out = tmp_path / "out"
    job = ["run", "--input", str(tmp_path / "in"), "--output", str(out), "--task", "generate"]
    job += ["--max-new-tokens", "4", "--gen-model", str(dated_model)]

    monkeypatch.setattr(job_module, "today_utc", lambda: dt.date(2026, 11, 1))
    first = cli(*job)
    assert first.returncode == 1, first.stderr[-3000:]
    committed = {p.name: p.read_bytes() for p in out.glob("part-*.parquet")}
    assert len(committed) == 1
    (tmp_path / "in" / "b.parquet").write_bytes(good)

    monkeypatch.setattr(job_module, "today_utc", lambda: dt.date(2026, 11, 2))
    refused = cli(*job)
    assert_one_line_error(refused, 2, "different config", "chat template prints (2026-11-01 -> 2026-11-02)")
    assert {p.name: p.read_bytes() for p in out.glob("part-*.parquet")} == committed

    # On the day it started, the run resumes: every part carries that one date.
    monkeypatch.setattr(job_module, "today_utc", lambda: dt.date(2026, 11, 1))
    resumed = cli(*job)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "_manifest.json").read_text())["chat_date"] == "2026-11-01"
    assert _totals(out)["rows_reused"] == 3 and len(_rows(out)) == 6


@pytest.mark.parametrize(
    ("cache", "needle"),
    [
        ("in/cache", "is inside the input"),
        ("in", "is the input"),
        (".", "contains the input"),
        ("out/cache", "is inside the output"),
    ],
)
def test_a_cache_overlapping_the_input_or_output_is_refused_before_any_work(cli, tmp_path, cache, needle):
    _write(tmp_path / "in" / "a.parquet")
    cache_uri = str((tmp_path / cache).resolve())
    proc = cli(
        "run",
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "out"),
        "--task",
        "embed",
        "--embed-model",
        "dummy:bert-tiny",
        "--cache",
        cache_uri,
    )
    assert_one_line_error(proc, 2, "--cache", cache_uri, needle)
    assert not (tmp_path / "out").exists()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["in", "in/a.parquet"]
