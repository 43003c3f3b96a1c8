"""Worker pinning: each worker process gets its own GPU, or its share of the CPU cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json, os, sys, torch
from shardwise.gpu_runtime import pin_worker
label = pin_worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), cpus=int(sys.argv[4]),
                   gpus_per_worker=int(sys.argv[5]))
print(json.dumps({"label": label, "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                  "omp": os.environ.get("OMP_NUM_THREADS"), "threads": torch.get_num_threads()}))
"""


def pin_in_fresh_process(
    slot: int, workers: int, gpus: int, cpus: int, visible: str | None = None, per_worker: int = 1
) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(slot), str(workers), str(gpus), str(cpus), str(per_worker)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cpu_workers_split_the_cores():
    first = pin_in_fresh_process(0, 2, 0, cpus=8)
    assert first["threads"] == 4 and first["omp"] == "4" and first["label"] == "cpu x4"
    assert first["cuda_visible"] is None
    many = pin_in_fresh_process(5, 16, 0, cpus=8)
    assert many["threads"] == 1  # never zero threads


def test_gpu_workers_each_narrow_to_one_of_the_parents_devices():
    # The parent may already be restricted (a scheduler gave it GPUs 3 and 5): slots map onto those.
    assert pin_in_fresh_process(0, 2, 2, cpus=8, visible="3,5")["cuda_visible"] == "3"
    assert pin_in_fresh_process(1, 2, 2, cpus=8, visible="3,5")["cuda_visible"] == "5"
    # No restriction: devices 0..N-1; more workers than GPUs share them round-robin.
    assert pin_in_fresh_process(1, 2, 2, cpus=8)["cuda_visible"] == "1"
    third = pin_in_fresh_process(2, 3, 2, cpus=8)
    assert third["cuda_visible"] == "0" and third["label"] == "gpu 0"


def test_tensor_parallel_workers_each_own_their_own_gpus():
    assert pin_in_fresh_process(0, 2, 4, cpus=8, per_worker=2)["cuda_visible"] == "0,1"
    second = pin_in_fresh_process(1, 2, 4, cpus=8, per_worker=2, visible="2,3,5,7")
    assert second["cuda_visible"] == "5,7" and second["label"] == "gpu 5,7"


def test_tokenizers_use_all_cores_only_beside_a_gpu(monkeypatch):
    """A GPU engine turns the tokenizers' thread pool on unless the user chose otherwise; on the
    CPU the setting is left as it is (the cores belong to the model)."""
    import torch

    from shardwise.gpu_runtime.device import TOKENIZERS_DEFAULTED, tokenize_on_all_cores

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv(TOKENIZERS_DEFAULTED, "1")  # shardwise's own default
    tokenize_on_all_cores(torch.device("cpu"))
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    tokenize_on_all_cores(torch.device("cuda", 0))
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # the user's own choice
    monkeypatch.delenv(TOKENIZERS_DEFAULTED)
    tokenize_on_all_cores(torch.device("cuda", 0))
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"

    monkeypatch.delenv("TOKENIZERS_PARALLELISM")  # nobody's choice
    tokenize_on_all_cores(torch.device("cuda", 0))
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
