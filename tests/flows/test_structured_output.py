"""generate.output_schema through the CLI: constrained answers become typed columns analysts query."""

from __future__ import annotations

import json
import re

import duckdb
import pyarrow.parquet as pq
import pytest

from tasks.demo_data import write_reviews_dataset
from tests.flows.test_cli import assert_one_line_error, shardwise

REVIEW_SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"enum": ["positive", "negative", "mixed"]},
        "topic": {"type": "string"},
        "would_recommend": {"type": "boolean"},
        "stars": {"type": "integer"},
    },
    "required": ["sentiment", "topic", "would_recommend", "stars"],
}
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
    proc = shardwise("run", "--input", str(reviews_dir), "--output", str(tmp_path / "out"), "--task", "generate",
                     "--output-schema", schema)
    assert_one_line_error(proc, 2, "generate.output_schema", needle)
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def _run(tmp_path, name: str, *extra: str) -> list[dict]:
    input_dir = tmp_path / "reviews"
    if not input_dir.exists():
        write_reviews_dataset(str(input_dir), files=2, rows_per_file=12, rows_per_group=4)
    out = tmp_path / name
    proc = shardwise("run", "--input", str(input_dir), "--output", str(out), "--task", "generate",
                     "--id-column", "review_id", "--keep-columns", "id", "--prompt-template", PROMPT,
                     "--rows-per-shard", "24", *extra, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return pq.read_table(str(out)).to_pylist(), proc.stdout, out


@pytest.mark.slow
def test_schema_gives_typed_rows_and_the_constraint_is_real(tmp_path):
    schema_file = tmp_path / "review.json"
    schema_file.write_text(json.dumps(REVIEW_SCHEMA))
    rows, stdout, out = _run(tmp_path, "constrained", "--output-schema", str(schema_file), "--max-new-tokens", "60")
    assert len(rows) == 24
    valid = [r for r in rows if r["generated"] is not None]
    assert len(valid) >= 22, [r["error"] for r in rows]
    assert {r["generated"]["sentiment"] for r in valid} <= {"positive", "negative", "mixed"}
    assert all(isinstance(r["generated"]["stars"], int) and isinstance(r["generated"]["would_recommend"], bool)
               for r in valid)
    assert all(json.loads(r["generated_text"])["topic"] == r["generated"]["topic"] for r in valid)
    assert re.search(rf"schema valid\s+{len(valid)}/24 rows", stdout), stdout
    counts = duckdb.sql(
        f"SELECT generated.sentiment, count(*) FROM read_parquet('{out}/part-*.parquet') GROUP BY 1"
    ).fetchall()
    assert sum(n for _, n in counts) == 24

    # The same prompt without the constraint: the model's free answers rarely parse into the schema.
    # No --output-schema, so validity is judged here with the same parser the run uses.
    from tasks.output_schema import parse_generated

    free, _, _ = _run(tmp_path, "free", "--max-new-tokens", "60")
    free_valid = sum(parse_generated(r["generated_text"], REVIEW_SCHEMA)[0] is not None for r in free)
    assert free_valid <= len(valid) - 12, (free_valid, len(valid))


@pytest.mark.slow
def test_too_few_new_tokens_give_row_errors_not_a_crash(tmp_path):
    rows, stdout, _ = _run(tmp_path, "short", "--output-schema", json.dumps(REVIEW_SCHEMA), "--max-new-tokens", "6")
    assert len(rows) == 24
    assert all(r["generated"] is None and r["error"].startswith("output does not match schema: not JSON")
               for r in rows)
    assert all(r["generated_text"].startswith('{"') for r in rows), [r["generated_text"] for r in rows]
    assert re.search(r"schema valid\s+0/24 rows \(0\.0%\)", stdout), stdout
