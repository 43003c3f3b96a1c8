"""Fixtures for gpu_runtime tests: the two bundled models, loaded once per session on CPU.

The GGUF conversion cache is left at its environment default (``SHARDWISE_MODEL_CACHE`` or
``~/.cache/shardwise/models``) so CI can keep it between runs; the conversion itself is tested in
a fresh temporary cache by test_gpu_models.py.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# On a shared 2-core machine, OpenMP threads spinning at barriers while another process holds a
# core made batched generation 10-20x slower; passive waiting costs ~20% when the machine is idle.
# Only effective if torch has not started its thread pool yet (e.g. in the worker subprocesses).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

GENERATION_SPEC = "bundled:smollm2-135m-instruct"
EMBEDDING_SPEC = "bundled:all-minilm-l6-v2"
# CPU fp32: the correctness tests compare outputs exactly, which bf16 on a GPU would not allow.
TEST_DEVICE = "cpu"


@pytest.fixture(scope="session")
def generation_engine():
    from shardwise.gpu_runtime import load_generation_engine

    return load_generation_engine(GENERATION_SPEC, device=TEST_DEVICE)


@pytest.fixture(scope="session")
def embedding_engine():
    from shardwise.gpu_runtime import load_embedding_engine

    return load_embedding_engine(EMBEDDING_SPEC, device=TEST_DEVICE)
