"""Lineage: where each output row came from, readable back from the parts.

Each part's Parquet footer carries the run's facts for its rows: the input, the models with their
resolved revisions, the code version and the Prefect flow run. MLflow gets the same facts, and the
input files and the output as datasets (:mod:`shardwise.tasks.tracking.mlflow_store`).
"""

from __future__ import annotations

import subprocess
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shardwise.tasks.errors import InputError
from shardwise.tasks.records.shard_io import read_part_lineage
from shardwise.tasks.storage.fs import filesystem

REPO_ROOT = Path(__file__).resolve().parents[2]


def code_version() -> dict[str, str]:
    """The installed shardwise version and, from a checkout, its git commit."""
    info = {"shardwise.version": importlib_metadata.version("shardwise")}
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        info["shardwise.git_commit"] = commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def model_params(models: dict[str, dict[str, Any]]) -> dict[str, str]:
    """``model.generate.revision`` etc. for MLflow params."""
    params = {}
    for role, info in models.items():
        for key in ("spec", "source", "revision", "dtype", "device", "path", "engine", "engine_version"):
            if info.get(key) is not None:
                params[f"model.{role}.{key}"] = str(info[key])[:500]
    return params


# ---- reading lineage back ------------------------------------------------------------------


def part_lineage(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """:func:`shardwise.tasks.records.shard_io.read_part_lineage`, with unreadable parts as a one-line InputError."""
    try:
        return read_part_lineage(uri, storage_options)
    except FileNotFoundError:
        raise InputError(f"no such part: {uri}") from None
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"{uri}: not a readable Parquet part ({err})") from None


def list_parts(target: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    from shardwise.tasks.storage.output_dir import OutputDir

    fs, path = filesystem(target, storage_options)
    if fs.isdir(path):
        output = OutputDir(target, storage_options)
        return [output.uri_of(name) for name in output.part_names()]
    if fs.exists(path):
        return [target]
    raise InputError(f"no such output or part: {target}")


def find_row(target: str, id_value: str, storage_options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """The part holding the row whose id (compared as text) is ``id_value``, and that row."""
    for part in list_parts(target, storage_options):
        lineage = part_lineage(part, storage_options)
        id_column = lineage.get("id_column", "id")
        fs, path = filesystem(part, storage_options)
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle)
        ids = [str(v) for v in table.column(id_column).to_pylist()]
        if id_value in ids:
            position = ids.index(id_value)
            row = table.slice(position, 1).to_pylist()[0]
            row.pop("embedding", None)
            first = int(lineage.get("source_rows", "0:0").split(":")[0])
            row["_source_row"] = first + position
            return part, row
    raise InputError(f"no row with id {id_value!r} under {target}")
