"""How two storage locations lie towards each other, so a run never writes into (or cleans) the
data it reads. Paths are compared literally after normalising: a name like ``out[1]`` means that
directory and no other, and a glob input stands for its fixed directory."""

from __future__ import annotations

import os
import posixpath
import re
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from shardwise.tasks.errors import ConfigError
from shardwise.tasks.storage.fs import filesystem


def _normalised(uri: str, storage_options: dict[str, Any] | None) -> tuple[tuple[str, ...], str]:
    fs, path = filesystem(uri, storage_options)
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if isinstance(fs, LocalFileSystem):
        path = os.path.normpath(os.path.abspath(path))
    else:
        path = posixpath.normpath("/" + path.strip("/")).lstrip("/")
    return protocol, path.rstrip("/") or "/"


def _literal_root(uri: str) -> str:
    """A glob input's fixed directory (``in/2024-*/x.parquet`` -> ``in``); other URIs as they are."""
    head = re.split(r"[*?\[]", uri, maxsplit=1)[0]
    return head if head == uri else head.rsplit("/", 1)[0] or "/"


def check_separate(
    input_uri: str, output_uri: str, storage_options: dict[str, Any] | None = None, input_is_pattern: bool = False
) -> None:
    """Refuse an output that is the input, lies inside it, or contains it: a run must never
    write into (or clean) the data it reads. Paths are compared literally after normalising."""
    source = _literal_root(input_uri) if input_is_pattern else input_uri
    in_proto, in_path = _normalised(source, storage_options)
    out_proto, out_path = _normalised(output_uri, storage_options)
    if set(in_proto).isdisjoint(out_proto):
        return

    def inside(child: str, parent: str) -> bool:
        return child == parent or child.startswith(parent.rstrip("/") + "/")

    if inside(out_path, in_path) or inside(in_path, out_path):
        relation = (
            "is the input"
            if in_path == out_path
            else "is inside the input"
            if inside(out_path, in_path)
            else "contains the input"
        )
        raise ConfigError(f"output {output_uri} {relation} {input_uri}: choose an output outside the input")


def location_relation(
    uri: str, other_uri: str, storage_options: dict[str, Any] | None = None, other_is_pattern: bool = False
) -> str | None:
    """How location ``uri`` lies towards ``other_uri``: ``"is"``, ``"is inside"``, ``"contains"``,
    or None when they do not overlap (another store, or apart). Compared as :func:`check_separate`
    compares: literally after normalising, a glob by its fixed directory."""
    other = _literal_root(other_uri) if other_is_pattern else other_uri
    proto, path = _normalised(uri, storage_options)
    other_proto, other_path = _normalised(other, storage_options)
    if set(proto).isdisjoint(other_proto):
        return None

    def inside(child: str, parent: str) -> bool:
        return child == parent or child.startswith(parent.rstrip("/") + "/")

    if path == other_path:
        return "is"
    if inside(path, other_path):
        return "is inside"
    if inside(other_path, path):
        return "contains"
    return None


__all__ = ["check_separate", "location_relation"]
