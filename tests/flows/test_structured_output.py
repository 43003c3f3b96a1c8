"""generate.output_schema through the CLI (run in the test process: tests/cli.py): constrained
answers become typed columns analysts query."""

from __future__ import annotations

import json
import re
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from shardwise.tasks.records.demo_data import REVIEW_OUTPUT_SCHEMA as REVIEW_SCHEMA
from shardwise.tasks.records.demo_data import write_reviews_dataset
from tests.cli import run_cli
from tests.flows.test_cli import assert_one_line_error

PROMPT = (
    "Read the product review and answer with JSON only, with the keys sentiment (positive, negative or mixed), "
    "topic (a few words), would_recommend (true or false) and stars (1 to 5).\n\nReview: {text}"
)


@pytest.mark.parametrize(
    ("schema", "needle"),
    [
        ('{"type": "object", "properties": {"when": {"type": "date"}}}', "unknown type 'date'"),
        ('{"type": "array", "items": {"type": "string"}}', "top level must be an object"),
        ('{"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}', "cannot be resolved"),
        ("FILE", "not a JSON file"),
    ],
)
def test_bad_schemas_fail_before_anything_runs(reviews_dir, tmp_path, schema, needle):
    if schema == "FILE":
        schema = str(tmp_path / "schema.json")
        (tmp_path / "schema.json").write_text("type: object\n")
    proc = run_cli(
        "run",
        "--input",
        str(reviews_dir),
        "--output",
        str(tmp_path / "out"),
        "--task",
        "generate",
        "--output-schema",
        schema,
    )
    assert_one_line_error(proc, 2, "generate.output_schema", needle)
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def _run(cli, tmp_path, name: str, *extra: str, prompt: str = PROMPT) -> tuple[list[dict], str, Path]:
    input_dir = tmp_path / "reviews"
    if not input_dir.exists():
        write_reviews_dataset(str(input_dir), files=2, rows_per_file=12, rows_per_group=4)
    out = tmp_path / name
    proc = cli(
        "run",
        "--input",
        str(input_dir),
        "--output",
        str(out),
        "--task",
        "generate",
        "--id-column",
        "review_id",
        "--keep-columns",
        "id",
        "--prompt-template",
        prompt,
        "--rows-per-shard",
        "24",
        *extra,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return pq.read_table(str(out)).to_pylist(), proc.stdout, out


@pytest.mark.slow
def test_schema_gives_typed_rows_and_the_constraint_is_real(cli, tmp_path):
    schema_file = tmp_path / "review.json"
    schema_file.write_text(json.dumps(REVIEW_SCHEMA))
    rows, stdout, out = _run(
        cli, tmp_path, "constrained", "--output-schema", str(schema_file), "--max-new-tokens", "60"
    )
    assert len(rows) == 24
    valid = [r for r in rows if r["generated"] is not None]
    assert len(valid) >= 22, [r["error"] for r in rows]
    assert {r["generated"]["sentiment"] for r in valid} <= {"positive", "negative", "mixed"}
    assert all(
        isinstance(r["generated"]["stars"], int) and isinstance(r["generated"]["would_recommend"], bool) for r in valid
    )
    assert all(json.loads(r["generated_text"])["topic"] == r["generated"]["topic"] for r in valid)
    assert re.search(rf"schema valid\s+{len(valid)}/24 rows", stdout), stdout
    counts = duckdb.sql(
        f"SELECT generated.sentiment, count(*) FROM read_parquet('{out}/part-*.parquet') GROUP BY 1"
    ).fetchall()
    assert sum(n for _, n in counts) == 24

    # The same prompt without the constraint: the model's free answers rarely parse into the schema.
    # No --output-schema, so validity is judged here with the same parser the run uses.
    from shardwise.tasks.config.output_schema import parse_generated

    free, _, _ = _run(cli, tmp_path, "free", "--max-new-tokens", "60")
    free_valid = sum(parse_generated(r["generated_text"], REVIEW_SCHEMA)[0] is not None for r in free)
    assert free_valid <= len(valid) - 12, (free_valid, len(valid))


@pytest.mark.slow
def test_too_few_new_tokens_give_row_errors_not_a_crash(cli, tmp_path):
    rows, stdout, _ = _run(
        cli, tmp_path, "short", "--output-schema", json.dumps(REVIEW_SCHEMA), "--max-new-tokens", "6"
    )
    assert len(rows) == 24
    assert all(r["generated"] is None and r["error"].startswith("output does not match schema: not JSON") for r in rows)
    assert all(r["generated_text"].startswith('{"') for r in rows), [r["generated_text"] for r in rows]
    assert re.search(r"schema valid\s+0/24 rows \(0\.0%\)", stdout), stdout


@pytest.mark.slow
def test_schema_valid_line_counts_reused_parts_too(cli, tmp_path):
    """A rerun that reuses committed parts counts their valid answers as well as its own."""
    from shardwise.gpu_runtime.dummy import llama_tokenizer_dir
    from tests.gpu_runtime.families import save_family

    # A tiny random Llama: the grammar alone makes its answers parse, and it answers in seconds.
    model = save_family("llama", tmp_path / "tiny-llama", llama_tokenizer_dir("the schema resume test"))
    input_dir = tmp_path / "reviews"
    write_reviews_dataset(str(input_dir), files=1, rows_per_file=4, rows_per_group=2)
    out = tmp_path / "out"
    sentiment = {
        "type": "object",
        "properties": {"sentiment": REVIEW_SCHEMA["properties"]["sentiment"]},
        "required": ["sentiment"],
    }
    job = (
        "run",
        "--input",
        str(input_dir),
        "--output",
        str(out),
        "--task",
        "generate",
        "--id-column",
        "review_id",
        "--keep-columns",
        "id",
        "--prompt-template",
        PROMPT,
        "--rows-per-shard",
        "2",
        "--gen-model",
        str(model),
        "--output-schema",
        json.dumps(sentiment),
        "--max-new-tokens",
        "16",
    )
    first = cli(*job)
    assert first.returncode == 0, first.stderr[-3000:]
    valid = sum(r["generated"] is not None for r in pq.read_table(str(out)).to_pylist())
    assert valid > 0
    assert re.search(rf"schema valid\s+{valid}/4 rows", first.stdout), first.stdout
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == 2
    parts[0].unlink()  # one shard is recomputed, the other reused

    rerun = cli(*job)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert re.search(r"computed\s+2 rows \(2 reused", rerun.stdout), rerun.stdout
    valid_now = sum(r["generated"] is not None for r in pq.read_table(str(out)).to_pylist())
    assert re.search(rf"schema valid\s+{valid_now}/4 rows \({valid_now / 4:.1%}\)", rerun.stdout), rerun.stdout


@pytest.mark.slow
def test_answers_that_loop_until_max_new_tokens_are_repaired(cli, tmp_path):
    """With a bare prompt, greedy SmolLM2 falls into a loop inside the free string of several rows
    ("topic": "nga-nga-nga-…) until max_new_tokens cuts their JSON; the repair generates those rows
    again with a frequency penalty. Without it (repair_frequency_penalty=0) they stay invalid."""
    schema = ("--output-schema", json.dumps(REVIEW_SCHEMA), "--max-new-tokens", "96")
    bare = "Review: {text}\nDescribe this review as JSON."
    unrepaired, _, _ = _run(
        cli, tmp_path, "unrepaired", *schema, "--set", "generate.repair_frequency_penalty=0", prompt=bare
    )
    looped = [r for r in unrepaired if r["finish_reason"] == "length"]
    assert len(looped) >= 3, [r["generated_text"] for r in unrepaired]
    assert all(r["generated"] is None for r in looped)

    rows, stdout, _ = _run(cli, tmp_path, "repaired", *schema, prompt=bare)
    valid = [r for r in rows if r["generated"] is not None]
    assert len(rows) == 24 and len(valid) >= 22, [r["generated_text"] for r in rows]
    assert re.search(rf"schema valid\s+{len(valid)}/24 rows", stdout), stdout
    by_id = {r["review_id"]: r for r in rows}
    for row in looped:  # the rows that looped now end by themselves, within the budget
        assert by_id[row["review_id"]]["finish_reason"] == "stop"
        assert by_id[row["review_id"]]["n_generated_tokens"] < 96
    untouched = [r for r in unrepaired if r["finish_reason"] == "stop"]
    assert all(by_id[r["review_id"]]["generated_text"] == r["generated_text"] for r in untouched)
    print(
        f"valid without the repair: {sum(r['generated'] is not None for r in unrepaired)}/24, with it: {len(valid)}/24"
    )
