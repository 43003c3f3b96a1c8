"""The output schema's hashes follow the grammar: property order counts, keyword order does not."""

from __future__ import annotations

from shardwise.tasks.config.loading import validate_config
from shardwise.tasks.config.output_schema import canonical_schema_text, schema_hash
from shardwise.tasks.records.row_cache_keys import generation_context

STARS_FIRST = {
    "type": "object",
    "properties": {"stars": {"type": "integer"}, "sentiment": {"enum": ["positive", "negative"]}},
    "required": ["stars", "sentiment"],
}
SENTIMENT_FIRST = {**STARS_FIRST, "properties": dict(reversed(STARS_FIRST["properties"].items()))}
# the same grammar as STARS_FIRST, its keywords spelled in another order
KEYWORDS_REORDERED = {
    "required": ["stars", "sentiment"],
    "properties": {"stars": {"type": "integer"}, "sentiment": {"enum": ["positive", "negative"]}},
    "type": "object",
}


def _cfg(schema):
    return validate_config(
        {
            "input": "in",
            "output": "out",
            "task": "generate",
            "device": "cpu",
            "generate": {"max_new_tokens": 4, "output_schema": schema},
        }
    )


def test_reversed_properties_are_another_schema_everywhere_it_is_hashed():
    a, b = _cfg(STARS_FIRST), _cfg(SENTIMENT_FIRST)
    assert a.output_schema_hash != b.output_schema_hash
    assert a.settings_fingerprint() != b.settings_fingerprint()
    assert a.output_fingerprint() != b.output_fingerprint()
    assert generation_context(a) != generation_context(b)


def test_keyword_order_is_not_a_different_schema():
    a, b = _cfg(STARS_FIRST), _cfg(KEYWORDS_REORDERED)
    assert canonical_schema_text(STARS_FIRST) == canonical_schema_text(KEYWORDS_REORDERED)
    assert a.output_schema_hash == b.output_schema_hash == schema_hash(STARS_FIRST)
    assert a.output_fingerprint() == b.output_fingerprint()
    assert generation_context(a) == generation_context(b)


def test_nested_and_referenced_properties_keep_their_order():
    def schema(inner: dict) -> dict:
        return {
            "type": "object",
            "properties": {"a": {"$ref": "#/$defs/pair"}, "b": {"type": "array", "items": inner}},
            "$defs": {"pair": inner},
        }

    xy = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}}
    yx = {"type": "object", "properties": {"y": {"type": "integer"}, "x": {"type": "integer"}}}
    assert schema_hash(schema(xy)) != schema_hash(schema(yx))
    assert schema_hash(schema(xy)) == schema_hash({**schema(xy), "$defs": {"pair": dict(reversed(xy.items()))}})
