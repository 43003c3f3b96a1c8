"""model_identity: the weights a spec names now, cheap to ask again, never fooled by a kept mtime."""

from __future__ import annotations

import hashlib
import os
import time

from shardwise.gpu_runtime.model_identity import model_identity


def test_replaced_weights_with_a_preserved_mtime_get_a_new_identity(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDWISE_MODEL_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"weights, version 1")
    first = model_identity(str(weights.parent))
    assert first == "local:" + hashlib.sha256(b"weights, version 1").hexdigest()
    assert model_identity(str(weights.parent)) == first  # remembered: the second ask only stats

    stat = weights.stat()
    time.sleep(0.05)  # past the file system's timestamp granularity, as any real replacement is
    weights.write_bytes(b"weights, version 2")  # same size ...
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... and the old mtime, as `cp -p` keeps it
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    assert model_identity(str(weights.parent)) == "local:" + hashlib.sha256(b"weights, version 2").hexdigest()


def test_bundled_and_dummy_specs():
    assert model_identity("dummy:minilm") == "dummy:dummy-minilm-seed0"
    assert model_identity("bundled:all-minilm-l6-v2").startswith("bundled:")
