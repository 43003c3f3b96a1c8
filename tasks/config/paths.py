"""Locations in a job config, as they are recorded."""

from __future__ import annotations

import os


def absolute_location(value: str | None) -> str | None:
    """A local path made absolute (``out`` -> ``/home/me/jobs/out``), so manifests, MLflow and
    Prefect record where the data is, whatever directory reads them; URIs are kept as given."""
    if not value or "://" in value or value == "-":
        return value
    return os.path.abspath(os.path.expanduser(value))
