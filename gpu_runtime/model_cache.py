"""shardwise's on-disk model cache: one directory of entries that are built once and then reused.

Entries are whatever is slow to make and safe to keep: a GGUF dequantized into safetensors
(:mod:`shardwise.gpu_runtime.gguf_cache`), a tokenizer read out of a GGUF, a dummy shape's checkpoint
(:mod:`shardwise.gpu_runtime.dummy`), and remembered sha256 digests of weight files. An entry is a directory
that is complete once it holds :data:`ENTRY_META`; it is built in a temp dir and renamed into place
under an inter-process lock, so a crashed or concurrent worker never leaves or sees half an entry.
The cache is shared by a team's workers, so what it writes is world-readable.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import EngineError, ModelNotFoundError

__all__ = ["CACHE_ENV", "ENTRY_META", "file_sha256", "model_cache_dir", "populate_cache_dir"]

CACHE_ENV = "SHARDWISE_MODEL_CACHE"
ENTRY_META = "shardwise_cache.json"  # written last: its presence marks a complete entry


def model_cache_dir() -> Path:
    """Root of shardwise's on-disk model cache: ``$SHARDWISE_MODEL_CACHE`` or ``~/.cache/shardwise/models``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "shardwise" / "models"


def populate_cache_dir(target: Path, build: Callable[[Path], dict[str, object]], what: str) -> Path:
    """Fill cache directory ``target`` once: ``build(tmp)`` writes into a temp dir and returns
    metadata; the dir is then renamed into place, under an inter-process lock.

    ``ModelNotFoundError`` and ``EngineError`` from ``build`` pass through; anything else becomes
    an ``EngineError`` naming ``what`` and ``target``.
    """
    if (target / ENTRY_META).exists():
        return target
    with _interprocess_lock(target.with_name(target.name + ".lock")) as exclusive:
        if (target / ENTRY_META).exists():  # another worker may have finished meanwhile
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        if exclusive:  # we hold the lock: other temp dirs are leftovers of killed workers
            for stale in target.parent.glob(f".{target.name}.*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
        try:
            meta = build(tmp)
            (tmp / ENTRY_META).write_text(json.dumps(meta, indent=2))
            _make_shareable(tmp)
            if target.exists():  # a stale, incomplete dir (no ENTRY_META): replace it
                shutil.rmtree(target)
            os.replace(tmp, target)
        except (ModelNotFoundError, EngineError):
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise EngineError(f"could not build {what} in {target}: {exc}") from exc
    return target


def file_sha256(path: Path) -> str:
    """sha256 of a (large) file, remembered in the cache dir by (path, size, mtime, ctime, inode):
    replaced weights with a preserved mtime (``cp -p``, ``tar``) still get a new ctime or inode."""
    stat = path.stat()
    resolved_path = str(path.resolve())
    identity = {
        "path": resolved_path,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "ctime_ns": stat.st_ctime_ns,
        "inode": stat.st_ino,
    }
    record = model_cache_dir() / "sha256" / (hashlib.sha256(resolved_path.encode()).hexdigest()[:32] + ".json")
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


def _make_shareable(directory: Path) -> None:
    """mkdtemp/mkstemp create owner-only entries; a cache shared by a team must be readable."""
    os.chmod(directory, 0o755)
    for child in directory.iterdir():
        os.chmod(child, 0o755 if child.is_dir() else 0o644)


@contextlib.contextmanager
def _interprocess_lock(lock_path: Path) -> Iterator[bool]:
    """Stop several workers on one machine from building the same entry at once.

    Yields whether the lock is real (POSIX flock); elsewhere the temp dir + ``os.replace`` still
    keeps the cache consistent, at the price of possibly building twice.
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
