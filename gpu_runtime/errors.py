"""Exceptions raised by gpu_runtime.

Hierarchy (callers in tasks/ decide retry vs fail-fast from the base class)::

    ValueError
    └── ModelNotFoundError   bad model spec: unknown bundled name, wheel not installed, missing path
    RuntimeError
    └── EngineError          the device or a model failed (CUDA missing, conversion failed, ...)

Bad *inputs* (an empty prompt, invalid GenerationParams) raise plain ValueError.
"""

from __future__ import annotations

__all__ = ["EngineError", "ModelNotFoundError"]


class ModelNotFoundError(ValueError):
    """A model spec cannot be resolved to weights on this machine (fixing the spec or installing
    the named wheel fixes it; retrying does not)."""


class EngineError(RuntimeError):
    """A model could not be loaded or run on the selected device."""
