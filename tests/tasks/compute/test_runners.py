"""Which task runner a job gets, and how many shards an in-process worker holds at once."""

from __future__ import annotations

from prefect.task_runners import ThreadPoolTaskRunner

import shardwise.tasks.compute.runners as runners
from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.orchestration.task_runners import shard_task_runner


def _job(**kw) -> JobConfig:
    return JobConfig(input="in/", output="out/", **kw)


def test_one_shard_at_a_time_on_cpu():
    for device in ("cpu", "auto"):  # this machine has no GPU: auto resolves to the CPU
        cfg = _job(device=device)
        assert runners.worker_count(cfg) == 1
        assert runners.shards_in_flight(cfg) == 1
        runner = shard_task_runner(cfg)
        assert isinstance(runner, ThreadPoolTaskRunner) and runner._max_workers == 1


def test_a_second_shard_in_flight_on_a_gpu(monkeypatch):
    # The rule only (no GPU here): where CUDA devices are visible the next shard's read overlaps.
    monkeypatch.setattr(runners, "visible_gpus", lambda cfg: 0 if cfg.device == "cpu" else 1)
    assert runners.shards_in_flight(_job(device="cuda:0")) == runners.SHARDS_IN_FLIGHT == 2
    assert runners.shards_in_flight(_job(device="auto")) == 2
    assert runners.shards_in_flight(_job(device="cpu")) == 1
    assert shard_task_runner(_job(device="cuda:0"))._max_workers == 2


def test_shards_in_flight_from_the_job_overrides_the_device_rule(monkeypatch):
    from shardwise.tasks.config.loading import build_config

    monkeypatch.setattr(runners, "visible_gpus", lambda cfg: 0 if cfg.device == "cpu" else 1)
    cfg = build_config(
        overrides={"input": "in/", "output": "out/", "device": "cpu"}, set_options=["shards_in_flight=2"]
    )
    assert runners.shards_in_flight(cfg) == 2 and shard_task_runner(cfg)._max_workers == 2
    assert runners.shards_in_flight(_job(device="cuda:0", shards_in_flight=1)) == 1
    assert shard_task_runner(_job(device="cuda:0", shards_in_flight=3))._max_workers == 3


def test_a_vllm_generation_job_holds_two_shards_on_cpu():
    """vLLM's scheduler decodes the rows of both shards in one batch, so a generate-only job on the
    vllm engine holds two even on a CPU; with embeddings in the same job (one shard at a time on
    the device) it holds one."""
    assert runners.shards_in_flight(_job(device="cpu", task="generate", generate={"engine": "vllm"})) == 2
    assert shard_task_runner(_job(device="cpu", task="generate", generate={"engine": "vllm"}))._max_workers == 2
    assert runners.shards_in_flight(_job(device="cpu", task="both", generate={"engine": "vllm"})) == 1
    assert runners.shards_in_flight(_job(device="cpu", task="generate", generate={"engine": "hf"})) == 1
