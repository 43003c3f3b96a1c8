"""generate.output_schema: loading and checking a schema, its Arrow type, and parsing answers into it."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from shardwise.tasks.config.loading import build_config
from shardwise.tasks.config.output_schema import (
    SchemaError,
    arrow_type,
    load_output_schema,
    parse_generated,
    schema_hash,
)
from shardwise.tasks.errors import ConfigError
from shardwise.tasks.records.demo_data import REVIEW_OUTPUT_SCHEMA as REVIEW_SCHEMA


def test_every_supported_type_has_its_arrow_type():
    schema = {
        "type": "object",
        "$defs": {"price": {"type": "number"}},
        "properties": {
            **REVIEW_SCHEMA["properties"],
            "tags": {"type": "array", "items": {"type": "string"}},
            "seller": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "price": {"$ref": "#/$defs/price"}},
            },
        },
    }
    assert arrow_type(schema) == pa.struct(
        [
            ("sentiment", pa.string()),
            ("topic", pa.string()),
            ("would_recommend", pa.bool_()),
            ("stars", pa.int64()),
            ("tags", pa.list_(pa.string())),
            ("seller", pa.struct([("name", pa.string()), ("price", pa.float64())])),
        ]
    )


@pytest.mark.parametrize(
    ("schema", "needle"),
    [
        ({"type": "string"}, "top level must be an object"),
        ({"type": "object", "properties": {"a": {"type": "date"}}}, "schema.properties.a: unknown type 'date'"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "'#/$defs/missing' cannot be resolved"),
        ({"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}]}}}, "anyOf is not supported"),
        (
            {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]},
            "'b', which is not a property",
        ),
        (
            {
                "type": "object",
                "$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}},
                "properties": {"a": {"$ref": "#/$defs/n"}},
            },
            "recursive",
        ),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_unusable_schemas_are_named(schema, needle):
    with pytest.raises(SchemaError, match=None) as err:
        load_output_schema(schema)
    assert needle in str(err.value)


def test_schema_from_a_file_or_json_text(tmp_path):
    path = tmp_path / "review.json"
    path.write_text(json.dumps(REVIEW_SCHEMA))
    assert load_output_schema(str(path)) == REVIEW_SCHEMA
    assert load_output_schema(json.dumps(REVIEW_SCHEMA)) == REVIEW_SCHEMA
    path.write_text("sentiment: positive\n")
    with pytest.raises(SchemaError, match="not a JSON file"):
        load_output_schema(str(path))


def test_config_holds_the_schema_and_its_hash_changes_the_fingerprint(tmp_path):
    path = tmp_path / "review.json"
    path.write_text(json.dumps(REVIEW_SCHEMA))
    base = {"input": "in", "output": "out"}
    plain = build_config(None, base)
    constrained = build_config(None, {**base, "generate": {"output_schema": str(path)}})
    assert constrained.generate.output_schema == REVIEW_SCHEMA  # the schema, not its path
    assert constrained.public_dict()["generate"]["output_schema"] == REVIEW_SCHEMA
    assert constrained.output_schema_hash == schema_hash(REVIEW_SCHEMA)
    assert plain.output_schema_hash is None
    assert constrained.output_fingerprint() != plain.output_fingerprint()
    with pytest.raises(ConfigError, match=r"generate\.output_schema: .*unknown type 'date'"):
        build_config(
            None, {**base, "generate": {"output_schema": {"type": "object", "properties": {"d": {"type": "date"}}}}}
        )


def test_answers_parse_into_typed_values_or_say_why_not():
    good = '{"sentiment": "mixed", "topic": "battery", "would_recommend": true, "stars": 3}'
    assert parse_generated(good, REVIEW_SCHEMA) == (
        {"sentiment": "mixed", "topic": "battery", "would_recommend": True, "stars": 3},
        None,
    )
    for text, reason in [
        ('{"sentiment": "mixed", "topic": "bat', "not JSON"),
        ('{"sentiment": "great", "topic": "x", "would_recommend": true, "stars": 3}', '$.sentiment is "great"'),
        ('{"sentiment": "mixed", "topic": "x", "would_recommend": "yes", "stars": 3}', "expected boolean"),
        ('{"sentiment": "mixed", "topic": "x", "would_recommend": true}', "$.stars is missing"),
        ("The review is positive.", "not JSON"),
    ]:
        value, error = parse_generated(text, REVIEW_SCHEMA)
        assert value is None
        assert error.startswith("output does not match schema: ") and reason in error, error
