"""Lineage: where each output row came from, recorded in MLflow and readable back from the parts.

MLflow gets every input file as a dataset input (context ``input``) with an exact digest (the
file's footer fingerprint, not a sample of rows), the output directory as a dataset with context
``output`` (digest: the manifest's hash), the models with their resolved revisions, the code
version and the Prefect flow run. Each part's Parquet footer carries the same facts for its rows.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import warnings
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shardwise.tasks.errors import InputError
from shardwise.tasks.planning.shards import InputFile, ShardPlan
from shardwise.tasks.records.shard_io import read_part_lineage
from shardwise.tasks.redaction import redact_text, redact_uri
from shardwise.tasks.storage.fs import filesystem

REPO_ROOT = Path(__file__).resolve().parents[2]

_MLFLOW_TYPES = {
    pa.string(): "string",
    pa.large_string(): "string",
    pa.bool_(): "boolean",
    pa.int8(): "integer",
    pa.int16(): "integer",
    pa.int32(): "integer",
    pa.int64(): "long",
    pa.float32(): "float",
    pa.float64(): "double",
    pa.binary(): "binary",
    pa.large_binary(): "binary",
}


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


def _mlflow_schema(schema: pa.Schema):
    from mlflow.types.schema import ColSpec, Schema

    columns = []
    for field in schema:
        if field.type in _MLFLOW_TYPES:
            columns.append(ColSpec(_MLFLOW_TYPES[field.type], field.name))
        elif pa.types.is_timestamp(field.type) or pa.types.is_date(field.type):
            columns.append(ColSpec("datetime", field.name))
    return Schema(columns) if columns else None


def _dataset_input(uri: str, name: str, digest: str, context: str, schema: pa.Schema | None = None):
    """An MLflow dataset input for ``uri``; its source and name are the URI with credentials redacted."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    uri, name = redact_uri(uri), redact_text(name)
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are the same class
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(uri)
    dataset = MetaDataset(
        source=source, name=name, digest=digest, schema=_mlflow_schema(schema) if schema is not None else None
    )
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])


def input_datasets(files: tuple[InputFile, ...]) -> list[Any]:
    return [
        _dataset_input(f.uri, redact_uri(f.uri).rsplit("/", 1)[-1], f.fingerprint[:32], "input", f.schema)
        for f in files
    ]


def output_dataset(output: str, manifest: dict[str, Any]) -> Any:
    digest = hashlib.sha256(json.dumps(manifest.get("shards", []), sort_keys=True).encode()).hexdigest()[:32]
    return _dataset_input(output, output.rstrip("/").rsplit("/", 1)[-1] or output, digest, "output")


def log_inputs(run_id: str, plan: ShardPlan, client: Any) -> None:
    datasets = input_datasets(plan.files)
    for start in range(0, len(datasets), 100):  # keep each request small for huge inputs
        client.log_inputs(run_id, datasets=datasets[start : start + 100])


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
