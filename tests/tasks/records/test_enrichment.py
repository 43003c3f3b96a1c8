"""Row-level handling with the real bundled engines: bad rows flagged, good rows processed."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.records.enrichment import clean_text, enrich_table, repair_utf8


def invalid_utf8_column() -> pa.Array:
    data = b"fine\xff\xfebroken"
    offsets = pa.array([0, 4, 12], pa.int32()).buffers()[1]
    return pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(data)])


def test_clean_text_flags_null_and_empty_and_strips_control_characters():
    assert clean_text(None) == (None, "text is null")
    assert clean_text("  \t\n ") == (None, "text is empty")
    assert clean_text("\x00\x07") == (None, "text is empty")
    assert clean_text("a\x00b\x1bc\td\ne") == ("abc\td\ne", None)
    assert clean_text(b"caf\xc3\xa9") == ("café", None)


def test_repair_utf8_replaces_bad_bytes_and_leaves_good_columns(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": invalid_utf8_column()}), path)
    table = pq.read_table(path)
    with pytest.raises(UnicodeDecodeError):
        table.column("text").to_pylist()
    fixed = repair_utf8(table)
    assert fixed.column("text").to_pylist() == ["fine", "\ufffd\ufffdbroken"]
    assert fixed.column("id").to_pylist() == ["a", "b"]


@pytest.mark.slow
def test_enrich_table_with_real_engines(tmp_path):
    from shardwise.gpu_runtime import load_embedding_engine, load_generation_engine

    long_text = " ".join(["The blender is loud but it crushes ice well."] * 60)
    texts = ["Great kettle.", None, "", long_text, "bad \x00 bytes \x07 here"]
    table = pa.table({"id": [1, 2, 3, 4, 5], "text": pa.array(texts, pa.string()), "stars": [5, 1, 3, 4, 2]})
    cfg = JobConfig(
        input="x",
        output="y",
        generate={"prompt_template": "{stars} stars: {text}", "max_new_tokens": 3, "max_input_tokens": 64},
    )
    generator = load_generation_engine(cfg.generate.model, device="cpu")
    embedder = load_embedding_engine(cfg.embed.model, device="cpu")
    out, stats = enrich_table(table, cfg, generator, embedder)
    rows = out.to_pylist()
    assert [r["id"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["error"] for r in rows] == [None, "text is null", "text is empty", None, None]
    assert [r["truncated"] for r in rows] == [False, None, None, True, False]
    assert rows[3]["n_prompt_tokens"] <= 64
    for r in (rows[0], rows[3], rows[4]):
        assert r["generated_text"] and r["n_generated_tokens"] >= 1 and len(r["embedding"]) == 384
    assert stats.error_rows == 2 and stats.truncated_rows == 1 and stats.rows == 5

    invalid = pa.table({"id": [1, 2], "text": invalid_utf8_column(), "stars": [1, 2]})
    out, stats = enrich_table(invalid, cfg, generator, embedder)
    assert out.column("error").to_pylist() == [None, None]
    assert out.column("text").to_pylist()[1].startswith("\ufffd")


def test_ids_are_never_repaired_and_bad_ones_are_found():
    from shardwise.tasks.records.enrichment import invalid_utf8_rows

    ids = pa.array([b"ok", b"id-\xff", b"id-\xfe", None, b"fine"], pa.binary()).view(pa.string())
    table = pa.table({"id": ids, "text": invalid_utf8_column().take([0, 1, 0, 1, 0])})
    assert invalid_utf8_rows(table.column("id")) == [1, 2]
    assert invalid_utf8_rows(table.column("text")) == [1, 3]
    assert invalid_utf8_rows(pa.chunked_array([pa.array(["a"]), ids])) == [2, 3]
    assert invalid_utf8_rows(pa.array([b"\xff"], pa.binary())) == []  # bytes ids are bytes, not text
    fixed = repair_utf8(table, keep=["id"])
    assert fixed.column("text").to_pylist()[1].startswith("\ufffd")
    assert fixed.column("id").cast(pa.binary()).to_pylist() == [b"ok", b"id-\xff", b"id-\xfe", None, b"fine"]


def test_generation_params_carry_every_decoding_setting_of_the_config():
    import dataclasses
    import datetime as dt
    import json

    from shardwise.tasks.config.job import GenerateConfig
    from shardwise.tasks.records.engine_inputs import generation_params

    settings = {
        "max_new_tokens": 7,
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 3,
        "system_prompt": "Be brief.",
        "max_input_tokens": 99,
        "ignore_eos": True,
        "token_budget": 512,
        "max_batch_size": 5,
        "cache": "static",
        "compile": True,
        "chat_template_kwargs": {"enable_thinking": False},
        "repair_frequency_penalty": 0.5,
    }
    cfg = JobConfig(input="x", output="y", generate=settings)
    params = generation_params(cfg, "2026-03-04")
    assert {name: getattr(params, name) for name in settings} == settings
    assert params.chat_date == dt.date(2026, 3, 4) and params.output_schema is None
    # every field both sides name is carried; the rest of GenerationParams is filled in explicitly
    shared = {f.name for f in dataclasses.fields(params)} & set(GenerateConfig.model_fields)
    assert shared == set(settings) | {"chat_date", "output_schema"}

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    typed = JobConfig(
        input="x", output="y", generate={"chat_date": "2025-01-02", "output_schema": schema, "chat_template_kwargs": {}}
    )
    params = generation_params(typed, "2026-03-04")
    assert params.chat_date == dt.date(2025, 1, 2) and params.chat_template_kwargs is None
    assert params.output_schema is not None and json.loads(params.output_schema) == schema
