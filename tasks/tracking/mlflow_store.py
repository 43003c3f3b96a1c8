"""The MLflow tracking store: every read and write of it goes through these functions.

Each call uses its own ``MlflowClient`` (MLflow caches the store behind it), never MLflow's
thread-local active run. The tracking URI is ``uri`` when given, else
:func:`~shardwise.tasks.storage.local_state.tracking_uri`. Values are written as given: callers
redact them. MLflow is imported on first use, so a command that tracks nothing does not load it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from shardwise.tasks.planning.shards import InputFile
from shardwise.tasks.redaction import redact_text, redact_uri
from shardwise.tasks.storage.local_state import tracking_uri

# A run's datasets are logged this many per request, so that huge inputs make no huge request.
_INPUTS_PER_REQUEST = 100

# The system-metrics monitor of each run that has one, until the run ends.
_monitors: dict[str, Any] = {}


@dataclass(frozen=True)
class RunRecord:
    """What the store holds about one run."""

    run_id: str
    experiment_id: str
    status: str
    lifecycle_stage: str
    metrics: dict[str, float]
    params: dict[str, str]
    tags: dict[str, str]


def _client(uri: str | None = None) -> Any:
    from mlflow.tracking import MlflowClient

    # Against a tracking server MLflow writes the run's URL, built from the tracking URI with any
    # user:password@ in it, straight to stdout; the run summary gives a redacted link instead.
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    return MlflowClient(tracking_uri=uri or tracking_uri())


def _record(run: Any) -> RunRecord:
    return RunRecord(
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        status=run.info.status,
        lifecycle_stage=run.info.lifecycle_stage,
        metrics=dict(run.data.metrics),
        params=dict(run.data.params),
        tags=dict(run.data.tags),
    )


# ---- runs -----------------------------------------------------------------------------------


def experiment_for(name: str, artifact_location: str | None = None, uri: str | None = None) -> str:
    """The id of the experiment ``name``; created, its artifacts under ``artifact_location`` (None:
    the store's default), when there is none."""
    client = _client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def create_run(experiment_id: str, tags: dict[str, str], uri: str | None = None) -> str:
    """A new RUNNING run with ``tags``; returns its id."""
    return _client(uri).create_run(experiment_id, tags=tags).info.run_id


def log_values(
    run_id: str,
    metrics: dict[str, float] | None = None,
    params: dict[str, str] | None = None,
    tags: dict[str, str] | None = None,
    step: int = 0,
    uri: str | None = None,
) -> None:
    """One request: ``metrics`` at ``step``, stamped now, then ``params`` and ``tags``."""
    from mlflow.entities import Metric, Param, RunTag

    stamp = int(time.time() * 1000)
    _client(uri).log_batch(
        run_id,
        metrics=[Metric(k, float(v), stamp, step) for k, v in (metrics or {}).items()],
        params=[Param(k, v) for k, v in (params or {}).items()],
        tags=[RunTag(k, v) for k, v in (tags or {}).items()],
    )


def log_dict(run_id: str, data: dict[str, Any], artifact_file: str, uri: str | None = None) -> None:
    _client(uri).log_dict(run_id, data, artifact_file)


def log_figure(run_id: str, figure: Any, artifact_file: str, uri: str | None = None) -> None:
    """A matplotlib figure as an image artifact."""
    _client(uri).log_figure(run_id, figure, artifact_file)


def end_run(run_id: str, status: str, uri: str | None = None) -> None:
    """Stop the run's system metrics and end it as ``status`` (FINISHED, FAILED, KILLED)."""
    stop_system_metrics(run_id)
    _client(uri).set_terminated(run_id, status=status)


def get_run(run_id: str, uri: str | None = None) -> RunRecord:
    """The run; raises what MLflow raises when it cannot be read."""
    return _record(_client(uri).get_run(run_id))


def find_run(run_id: str, uri: str | None = None) -> RunRecord | None:
    """The run, or None when the store has no run of that id; raises on any other failure."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    client = _client(uri)
    try:
        return _record(client.get_run(run_id))
    except MlflowException as err:
        if err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise


def run_status(run_id: str, uri: str | None = None) -> str | None:
    """The run's status (RUNNING, FINISHED, ...), or None when MLflow refuses to give it (no such
    run, another store's id). A store that cannot be reached raises."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        return client.get_run(run_id).info.status
    except MlflowException:
        return None


def search_runs(experiment_name: str, filter_string: str, max_results: int, uri: str | None = None) -> list[RunRecord]:
    """Runs of the experiment matching ``filter_string``, latest first; none when the experiment,
    or the default sqlite store, does not exist (a search creates neither)."""
    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return []
    client = _client(uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    runs = client.search_runs(
        [experiment.experiment_id], filter_string, max_results=max_results, order_by=["attributes.start_time DESC"]
    )
    return [_record(run) for run in runs]


# ---- datasets -------------------------------------------------------------------------------


# Every input file is a dataset input (context ``input``) with an exact digest (the file's footer
# fingerprint, not a sample of rows); the output directory is one with context ``output`` (digest:
# the manifest's hash). Source and name are the URI with credentials redacted.

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


def log_input_files(run_id: str, files: tuple[InputFile, ...], uri: str | None = None) -> None:
    """Every input file as a dataset input of the run (context ``input``)."""
    datasets = input_datasets(files)
    client = _client(uri)
    for start in range(0, len(datasets), _INPUTS_PER_REQUEST):
        client.log_inputs(run_id, datasets=datasets[start : start + _INPUTS_PER_REQUEST])


def log_output_dataset(run_id: str, output: str, manifest: dict[str, Any], uri: str | None = None) -> None:
    """The output directory as a dataset input of the run (context ``output``, digest of its manifest)."""
    _client(uri).log_inputs(run_id, datasets=[output_dataset(output, manifest)])


# ---- system metrics -------------------------------------------------------------------------


def start_system_metrics(run_id: str, uri: str | None = None, sampling_interval: float = 10) -> None:
    """GPU utilisation, memory and power as the run's ``system/*`` metrics, until :func:`end_run`."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=sampling_interval, tracking_uri=uri or tracking_uri())
    monitor.start()
    _monitors[run_id] = monitor


def stop_system_metrics(run_id: str) -> None:
    monitor = _monitors.pop(run_id, None)
    if monitor is not None:
        monitor.finish()
