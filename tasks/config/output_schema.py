"""The JSON Schema a generation must follow (``generate.output_schema``) and what it turns into.

One module owns the schema's three uses outside the engine: loading and checking it before any
model loads (:func:`load_output_schema`, :func:`check_schema`), the Arrow struct type of the
``generated`` column (:func:`arrow_type`), and parsing each row's text into a typed value or the
reason it does not match (:func:`parse_generated`). The engine compiles the same schema into a
grammar (:mod:`shardwise.gpu_runtime.structured`).

Supported: ``object`` with ``properties`` and ``required``, ``string``, ``integer``, ``number``,
``boolean``, ``enum`` of strings, ``array`` with ``items``, nested objects and local ``$ref``
(``#/$defs/...``, ``#/definitions/...``). Not supported: ``anyOf``/``oneOf``/``allOf``/``not``,
a list of types or ``null``, recursive ``$ref``, remote ``$ref``, objects without properties.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa

__all__ = [
    "SchemaError",
    "arrow_type",
    "canonical_schema_text",
    "check_schema",
    "load_output_schema",
    "parse_generated",
    "schema_hash",
    "schema_text",
]

_UNSUPPORTED_KEYWORDS = ("anyOf", "oneOf", "allOf", "not", "patternProperties", "if")


class SchemaError(ValueError):
    """The schema cannot be used; the message names the place (``properties.stars.type``)."""


def load_output_schema(value: Any) -> dict[str, Any]:
    """A schema from a mapping, a JSON text or a path to a ``.json`` file, checked."""
    if isinstance(value, dict):
        schema = value
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith(("{", "[")):
            try:
                schema = json.loads(text)
            except json.JSONDecodeError as err:
                raise SchemaError(f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
        else:
            path = Path(text).expanduser()
            if not path.is_file():
                raise SchemaError(f"schema file not found: {path}")
            try:
                schema = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                reason = f"{err.msg} at line {err.lineno}" if isinstance(err, json.JSONDecodeError) else "not UTF-8"
                raise SchemaError(f"{path}: not a JSON file ({reason})") from None
    else:
        raise SchemaError(f"expected a mapping, a JSON text or a path to a .json file, got {type(value).__name__}")
    check_schema(schema)
    return schema


def schema_text(schema: dict[str, Any]) -> str:
    """The schema as JSON for the engine; properties keep their order, which the answers follow."""
    return json.dumps(schema, separators=(",", ":"))


def canonical_schema_text(schema: dict[str, Any]) -> str:
    """The schema in one spelling per grammar, for hashes and keys: the keywords of every schema
    object sorted (the grammar reads them by name), ``properties`` in their own order (the order
    the answers follow), ``$defs`` sorted by name, lists (``enum``, ``required``) as given.
    Two schemas that differ only in property order differ here, as their grammars do."""
    return json.dumps(_canonical(schema), separators=(",", ":"))


def _canonical(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    canonical: dict[str, Any] = {}
    for key in sorted(node):
        value = node[key]
        if key == "properties" and isinstance(value, dict):
            value = {name: _canonical(sub) for name, sub in value.items()}
        elif key in ("$defs", "definitions") and isinstance(value, dict):
            value = {name: _canonical(value[name]) for name in sorted(value)}
        elif key == "items":
            value = _canonical(value)
        canonical[key] = value
    return canonical


def schema_hash(schema: dict[str, Any]) -> str:
    """Short hash of :func:`canonical_schema_text`: property order counts."""
    return hashlib.sha256(canonical_schema_text(schema).encode()).hexdigest()[:16]


def check_schema(schema: Any) -> None:
    """Raise :class:`SchemaError` for anything :func:`arrow_type` and the grammar cannot carry."""
    if not isinstance(schema, dict):
        raise SchemaError(f"the schema must be a JSON object, got {type(schema).__name__}")
    resolved = _resolve(schema, schema, "schema", ())
    if resolved.get("type") != "object":
        raise SchemaError(f"the top level must be an object (type: object), got type {resolved.get('type')!r}")
    arrow_type(schema)


def arrow_type(schema: dict[str, Any]) -> pa.StructType:
    """The struct type of the ``generated`` column: one nullable field per property."""
    return _arrow(schema, schema, "schema", ())


def _resolve(node: Any, root: dict[str, Any], where: str, seen: tuple[str, ...]) -> dict[str, Any]:
    """``node`` with a local ``$ref`` followed (to its target)."""
    if not isinstance(node, dict):
        raise SchemaError(f"{where}: expected a schema object, got {json.dumps(node)}")
    ref = node.get("$ref")
    if ref is None:
        return node
    if not isinstance(ref, str) or not ref.startswith("#/"):
        raise SchemaError(f"{where}: $ref {ref!r} cannot be resolved (only local #/... references are supported)")
    if ref in seen:
        raise SchemaError(f"{where}: $ref {ref!r} is recursive, which is not supported")
    target: Any = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(target, dict) or part not in target:
            raise SchemaError(f"{where}: $ref {ref!r} cannot be resolved")
        target = target[part]
    return _resolve(target, root, where, (*seen, ref))


def _arrow(node: Any, root: dict[str, Any], where: str, seen: tuple[str, ...]) -> pa.DataType:
    if isinstance(node, dict) and "$ref" in node:
        if node["$ref"] in seen:
            raise SchemaError(f"{where}: $ref {node['$ref']!r} is recursive, which is not supported")
        seen = (*seen, str(node["$ref"]))
    node = _resolve(node, root, where, ())
    for keyword in _UNSUPPORTED_KEYWORDS:
        if keyword in node:
            raise SchemaError(f"{where}: {keyword} is not supported")
    kind = node.get("type")
    if "enum" in node:
        values = node["enum"]
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise SchemaError(f"{where}: enum must be a non-empty list of strings")
        if kind not in (None, "string"):
            raise SchemaError(f"{where}: enum needs type string (or no type), got {kind!r}")
        return pa.string()
    if isinstance(kind, list):
        raise SchemaError(f"{where}: a list of types {kind} is not supported")
    if kind == "string":
        return pa.string()
    if kind == "integer":
        return pa.int64()
    if kind == "number":
        return pa.float64()
    if kind == "boolean":
        return pa.bool_()
    if kind == "array":
        if "items" not in node:
            raise SchemaError(f"{where}: array needs items")
        return pa.list_(_arrow(node["items"], root, f"{where}.items", seen))
    if kind == "object":
        properties = node.get("properties")
        if not isinstance(properties, dict) or not properties:
            raise SchemaError(f"{where}: object needs properties (objects without them are not supported)")
        required = node.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise SchemaError(f"{where}: required must be a list of property names")
        if missing := [r for r in required if r not in properties]:
            raise SchemaError(f"{where}: required names {missing[0]!r}, which is not a property")
        return pa.struct(
            [pa.field(name, _arrow(sub, root, f"{where}.properties.{name}", seen)) for name, sub in properties.items()]
        )
    if kind is None:
        raise SchemaError(f"{where}: no type given")
    raise SchemaError(f"{where}: unknown type {kind!r}")


def parse_generated(text: str | None, schema: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """``(value, None)`` with the row's typed value, or ``(None, "output does not match schema: ...")``."""
    if text is None:
        return None, None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        return None, f"output does not match schema: not JSON ({err.msg} at column {err.colno})"
    try:
        return _typed(data, schema, schema, "$"), None
    except SchemaError as err:
        return None, f"output does not match schema: {err}"


def _typed(value: Any, node: dict[str, Any], root: dict[str, Any], where: str) -> Any:
    node = _resolve(node, root, where, ())
    if "enum" in node:
        if value not in node["enum"]:
            raise SchemaError(f"{where} is {json.dumps(value)}, not one of {node['enum']}")
        return value
    kind = node.get("type")
    if kind == "string" and isinstance(value, str):
        return value
    if kind == "integer" and isinstance(value, int) and not isinstance(value, bool):
        if not -(2**63) <= value < 2**63:
            raise SchemaError(f"{where} is out of the int64 range")
        return value
    if kind == "integer" and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind == "boolean" and isinstance(value, bool):
        return value
    if kind == "array" and isinstance(value, list):
        return [_typed(item, node["items"], root, f"{where}[{k}]") for k, item in enumerate(value)]
    if kind == "object" and isinstance(value, dict):
        if missing := [r for r in node.get("required", []) if r not in value]:
            raise SchemaError(f"{where}.{missing[0]} is missing")
        return {
            name: None
            if value.get(name) is None and name not in node.get("required", [])
            else _typed(value.get(name), sub, root, f"{where}.{name}")
            for name, sub in node["properties"].items()
        }
    raise SchemaError(f"{where} is {json.dumps(value)[:40]}, expected {kind}")
