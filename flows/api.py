"""The Python API behind ``import shardwise``: the same jobs as the command line, from a notebook
or from a user's own code.

    import shardwise

    job = shardwise.job_config(input="s3://bucket/reviews/", output="s3://bucket/out/",
                               task="embed", id_column="review_id")
    forecast = shardwise.plan(job)          # reads footers, tokenizers and MLflow; writes nothing
    summary = shardwise.run(job)            # a RunSummary; raises on bad input, config or storage
    summary.status, summary.rows, summary.cost, summary.mlflow_run_id

``job`` is a :class:`JobConfig`, a mapping of its settings, or the path of a YAML job file; keyword
settings override it (``shardwise.run("conf/jobs/demo.yaml", max_cost=1.0)``). Errors are the
command line's, as exceptions: :class:`~shardwise.tasks.errors.ConfigError` and ``InputError``
(exit 2 there), ``StorageError`` (exit 3). A run whose shards failed or that the quality gate held
returns its summary (``status`` ``failed`` / ``held``) instead of raising. To run the ``enrich``
flow as a subflow of your own Prefect flow, call :func:`shardwise.flows.enrich.enrich_for` (see the
README, "Python API").
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shardwise.flows.run import RunSummary, execute_run, plan_run, prepare_run
from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.config.loading import build_config


def job_config(job: JobConfig | Mapping[str, Any] | str | Path | None = None, /, **settings: Any) -> JobConfig:
    """``job`` as a validated :class:`JobConfig`, with ``settings`` over it (nested sections as
    dicts, merged key by key). Storage options come from the job and ``$SHARDWISE_STORAGE_OPTIONS``."""
    if isinstance(job, JobConfig):
        if not settings:
            return job
        job = job.model_dump(mode="json")
    if isinstance(job, (str, Path)):
        return build_config(job, settings)
    return build_config(None, {**(dict(job) if job else {}), **settings})


def plan(job: JobConfig | Mapping[str, Any] | str | Path | None = None, /, **settings: Any) -> Any:
    """The forecast of running ``job`` (a :class:`~shardwise.tasks.forecasting.estimates.Forecast`):
    rows, shards, tokens, device-seconds and cost, low / expected / high. Writes nothing."""
    return plan_run(job_config(job, **settings))


def run(job: JobConfig | Mapping[str, Any] | str | Path | None = None, /, **settings: Any) -> RunSummary:
    """Run ``job`` to the end, as ``shardwise run`` does, and return its :class:`RunSummary`."""
    return execute_run(prepare_run(job_config(job, **settings)))


__all__ = ["JobConfig", "RunSummary", "job_config", "plan", "run"]
