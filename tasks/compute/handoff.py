"""How a flow run gets its job's private parts without them becoming flow parameters.

Prefect stores flow parameters and shows them in its UI, so the ``job`` parameter of the ``enrich``
flow is the public config (:meth:`JobConfig.public_dict`: no ``storage_options``, URIs redacted).
The full config stays in the process that starts the flow: :func:`flow_parameters` remembers it
under its public form and :func:`job_from_parameters`, in the flow, gets it back. That process is
the one the flow runs in: ``shardwise run``, or a deployment's ``enrich-partition`` run, which read
the job file (storage options included) itself. Shard tasks receive the full config as a task
argument, pickled to worker processes and Ray workers; Prefect does not store task arguments.

The shard plan that process made (``shardwise run`` plans before it forecasts) travels the same
way, so the flow does not plan again: :func:`plan_from_parameters` hands it over once. Its input
URIs may carry credentials, which is one more reason it is no flow parameter.
"""

from __future__ import annotations

import json
from typing import Any

from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.config.loading import validate_config
from shardwise.tasks.errors import ConfigError
from shardwise.tasks.planning.shards import ShardPlan
from shardwise.tasks.redaction import REDACTED
from shardwise.tasks.storage.fs import runtime_storage_options

_full_configs: dict[str, JobConfig] = {}
_plans: dict[str, ShardPlan] = {}


def _key(public: dict[str, Any]) -> str:
    return json.dumps(public, sort_keys=True, default=str)


def flow_parameters(cfg: JobConfig, plan: ShardPlan | None = None) -> dict[str, Any]:
    """The ``job`` parameter for ``cfg``'s flow run; the full ``cfg`` (and ``plan``, the shard plan
    already made for this run, if any) stays in this process."""
    public = cfg.public_dict()
    key = _key(public)
    _full_configs[key] = cfg
    if plan is None:
        _plans.pop(key, None)  # a plan left by an earlier run of the same job may be stale
    else:
        _plans[key] = plan
    return public


def plan_from_parameters(job: dict[str, Any]) -> ShardPlan | None:
    """The shard plan handed over with ``job`` by :func:`flow_parameters`, else None. Taken once:
    a later run of the same job in this process plans again, as its input may have changed."""
    return _plans.pop(_key(job), None)


def job_from_parameters(job: dict[str, Any]) -> JobConfig:
    """The full config of a flow run started here, else ``job`` itself (a dict given to a
    deployment or the flow directly) with storage options from the environment."""
    full = _full_configs.get(_key(job))
    if full is not None:
        return full
    hidden = [name for name in ("input", "output") if REDACTED in str(job.get(name, ""))]
    if hidden:
        raise ConfigError(
            f"the job's {' and '.join(hidden)} had credentials, and flow parameters never carry them: "
            "run it with `shardwise run`, or from a job file (see the deployments in prefect.yaml)"
        )
    return validate_config({**job, "storage_options": runtime_storage_options()})
