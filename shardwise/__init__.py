"""shardwise: batch enrichment of Parquet data with language models, orchestrated by Prefect.

Installed, everything lives under this one package: :mod:`shardwise.flows` (the Prefect flows and
the command line), :mod:`shardwise.tasks` (the steps) and :mod:`shardwise.gpu_runtime` (the
engines). In the repository they are the top-level folders ``flows/``, ``tasks/`` and
``gpu_runtime/``, mapped here by the build (``pyproject.toml``). Importing this package imports
nothing else: ``shardwise.gpu_runtime`` stays usable where Prefect, MLflow and pydantic are not
installed.
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

# A source checkout used without installing it (the repository's files on a GPU machine, with the
# checkout on PYTHONPATH): the folders beside this package are its subpackages there too.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "gpu_runtime" / "__init__.py").is_file():
    if str(_checkout) not in __path__:
        __path__.append(str(_checkout))
