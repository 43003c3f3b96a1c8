"""The identity of the weights a model spec names right now, for output fingerprints and resume.

A job config names a model by its spec, and one spec can name other weights tomorrow: a new commit
on the Hub, a local directory whose files were replaced, another GGUF under the same path. An output
written with the old weights must not be resumed with the new ones, so fingerprints hold this
identity instead of the spec alone. It comes from spec resolution (:mod:`shardwise.gpu_runtime.model_specs`):

- a Hub id: the commit of the snapshot ``from_pretrained`` loads (from the HF cache when offline);
- a local directory: the sha256 of its weight files;
- a GGUF file and the bundled models: the sha256 of the weights file;
- ``dummy:`` specs: the shape and the seed.

File hashes are computed once and remembered by (path, size, mtime, ctime, inode) in the model
cache, so asking again costs a ``stat`` per weights file.
"""

from __future__ import annotations

from .model_specs import resolve_model_spec

__all__ = ["model_identity"]


def model_identity(spec: str) -> str:
    """``<source>:<revision>`` of the weights ``spec`` resolves to, e.g. ``local:9f2c…`` or
    ``hub:<commit>``; raises :class:`~shardwise.gpu_runtime.errors.ModelNotFoundError` when it resolves to none."""
    resolved = resolve_model_spec(spec)
    return f"{resolved.source}:{resolved.revision}"
