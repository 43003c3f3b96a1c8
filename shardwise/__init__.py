"""shardwise: batch enrichment of Parquet data with language models, orchestrated by Prefect.

Installed, everything lives under this one package: :mod:`shardwise.flows` (the Prefect flows and
the command line), :mod:`shardwise.tasks` (the steps) and :mod:`shardwise.gpu_runtime` (the
engines). In the repository they are the top-level folders ``flows/``, ``tasks/`` and
``gpu_runtime/``, mapped here by the build (``pyproject.toml``). The public API (``run``, ``plan``,
``job_config``, ``JobConfig``, ``RunSummary``, the ``enrich`` flow) is imported on first use, so
importing this package imports nothing else: ``shardwise.gpu_runtime`` stays usable where Prefect,
MLflow and pydantic are not installed.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

# The public API (see :mod:`shardwise.flows.api`), imported on first use.
_API = {
    "JobConfig": "shardwise.flows.api",
    "RunSummary": "shardwise.flows.api",
    "job_config": "shardwise.flows.api",
    "plan": "shardwise.flows.api",
    "run": "shardwise.flows.api",
    "enrich": "shardwise.flows.enrich",
    "enrich_for": "shardwise.flows.enrich",
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'shardwise' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


# A source checkout used without installing it (the repository's files on a GPU machine, with the
# checkout on PYTHONPATH): the folders beside this package are its subpackages there too.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "gpu_runtime" / "__init__.py").is_file():
    if str(_checkout) not in __path__:
        __path__.append(str(_checkout))
