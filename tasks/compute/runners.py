"""Where shard tasks run, as rules over the job config: how many workers, the devices each owns,
how many shards one holds at once, what each asks Ray for, and which process ran a shard.

The job config decides (``workers``, ``runner``, ``ray``), so the CLI and the deployments build the
same runner (:mod:`shardwise.tasks.orchestration.task_runners` builds it from these rules). Each
worker keeps ``gpu_runtime``'s per-process model cache, so it loads a model once however many
shards it takes; shards are handed out from the executor's queue as workers free up, never split
up front, so a slow worker does not hold the run back.
"""

from __future__ import annotations

import os
import queue
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.errors import ConfigError

# Shards one in-process worker holds at once where its compute runs on a GPU (see shards_in_flight).
SHARDS_IN_FLIGHT = 2

# Set in each worker process by ``start_worker``; read into every ShardResult.
WORKER_LABEL: str | None = None


def _pins_gpus(cfg: JobConfig) -> bool:
    """Workers get a GPU each unless the job names one device (``cuda:N`` or ``cpu``) for all."""
    return cfg.device in ("auto", "cuda")


def visible_gpus(cfg: JobConfig) -> int:
    if cfg.device == "cpu":
        return 0
    from shardwise.gpu_runtime import visible_gpu_count

    return visible_gpu_count()


def shards_in_flight(cfg: JobConfig) -> int:
    """Shards an in-process worker holds at once: ``shards_in_flight`` from the job, else two where
    compute runs on a GPU, so that one shard's read and another's write run on the CPU meanwhile,
    or where the job only generates with vLLM, whose scheduler decodes the rows of both shards in
    one batch (the tail of one shard's longest answers no longer runs alone); else one. Other
    engines compute one shard at a time (the device turn, see device_turns.py). On 2 CPU cores a
    second shard in flight hid the writes but saved about 1% of an embedding run, within the
    machine's noise (docs/benchmarks.md, 2026-12-02)."""
    if cfg.shards_in_flight is not None:
        return cfg.shards_in_flight
    if cfg.task == "generate" and cfg.generation_engine() == "vllm":
        return SHARDS_IN_FLIGHT
    return SHARDS_IN_FLIGHT if cfg.device != "cpu" and visible_gpus(cfg) > 0 else 1


def gpus_per_worker(cfg: JobConfig) -> int:
    """GPUs one worker owns: the vLLM engine's tensor-parallel size, else 1."""
    if cfg.runs_generation and cfg.generation_engine() == "vllm":
        return cfg.generate.tensor_parallel_size
    return 1


def pinned_gpus(cfg: JobConfig) -> int:
    """GPUs the worker processes share out among themselves: none when the job names one device for all."""
    return visible_gpus(cfg) if _pins_gpus(cfg) else 0


def worker_count(cfg: JobConfig) -> int:
    """``workers`` from the job, else one per ``gpus_per_worker`` visible GPUs, else 1."""
    if cfg.workers:
        return cfg.workers
    return max(1, visible_gpus(cfg) // gpus_per_worker(cfg)) if _pins_gpus(cfg) else 1


def check_device(cfg: JobConfig) -> None:
    """A ``device`` this machine does not have (``cuda`` without CUDA, ``cuda:N`` past the last
    GPU) as a ConfigError (exit 2) before any work, when shards run here; on Ray the cluster's
    workers, not this process, have the devices."""
    if cfg.runner != "local" or cfg.device in ("auto", "cpu"):
        return
    from shardwise.gpu_runtime import EngineError, select_device

    try:
        select_device(cfg.device)
    except EngineError as err:
        raise ConfigError(f"device: {err} on this machine (use --device auto or cpu)") from None


def check_endpoints(cfg: JobConfig) -> None:
    """Each section that runs on a serving endpoint (``engine: openai``): its key variable set,
    the server reachable and the model served there, as a ConfigError (exit 2) before any work."""
    sections = cfg.endpoint_sections()
    if not sections:
        return
    from shardwise.gpu_runtime import EngineError
    from shardwise.gpu_runtime.endpoint_client import EndpointClient
    from shardwise.gpu_runtime.openai_engine import served_model

    for role, section in sections.items():
        options = cfg.endpoint_options(role)
        try:
            client = EndpointClient(options)
            try:
                served_model(client, section.model)
            finally:
                client.close()
        except EngineError as err:
            where = "" if str(err).startswith("api_key_env") else "base_url: "
            raise ConfigError(f"{role}.{where}{err}") from None


def check_engine_settings(cfg: JobConfig) -> None:
    """Settings the generation engine cannot honour on this machine, as a ConfigError (exit 2),
    before any model loads: a device that is not there, vllm not installed or built for the
    other device, a tensor-parallel size larger than the visible GPUs (or than a worker's share
    of them)."""
    check_device(cfg)
    check_endpoints(cfg)
    if not cfg.runs_generation or cfg.generate.engine == "openai":
        return
    g = cfg.generate
    from shardwise.gpu_runtime import EngineError, choose_engine
    from shardwise.gpu_runtime.vllm_engine import vllm_build

    try:
        engine = choose_engine(g.engine, cfg.device)
    except EngineError as err:
        raise ConfigError(str(err)) from None
    tp = g.tensor_parallel_size
    if engine == "hf":
        if tp > 1:
            chosen = "" if g.engine == "hf" else " (engine auto chose hf: no CUDA build of vLLM or no GPU here)"
            raise ConfigError(f"generate.tensor_parallel_size={tp} needs generate.engine: vllm{chosen}")
        return
    dist, version, platform = vllm_build() or ("vllm", "?", "cuda")
    if cfg.device.startswith("cuda:"):
        raise ConfigError(
            f"device {cfg.device}: the vllm engine takes its GPUs from CUDA_VISIBLE_DEVICES "
            "(and workers); use device: auto or cuda"
        )
    wanted = "cpu" if cfg.device == "cpu" else ("cuda" if cfg.device == "cuda" else platform)
    if wanted != platform:
        raise ConfigError(f"device {cfg.device}: the installed vLLM ({dist} {version}) runs on {platform} only")
    if platform == "cpu":
        if tp > 1:
            raise ConfigError(f"generate.tensor_parallel_size={tp}: the CPU build of vLLM runs one model per worker")
        return
    gpus = visible_gpus(cfg)
    if tp > gpus:
        raise ConfigError(f"generate.tensor_parallel_size={tp} but {gpus} GPU(s) are visible")
    if cfg.runner == "local" and worker_count(cfg) * tp > gpus:
        raise ConfigError(
            f"workers={worker_count(cfg)} x generate.tensor_parallel_size={tp} needs "
            f"{worker_count(cfg) * tp} GPUs, {gpus} are visible"
        )


def claim_slot(slot_dir: str, workers: int) -> int:
    """The lowest free worker slot, claimed with an exclusive create (the slots outlive no run)."""
    for slot in range(workers):
        try:
            os.close(os.open(os.path.join(slot_dir, f"slot-{slot}"), os.O_CREAT | os.O_EXCL))
            return slot
        except FileExistsError:
            continue
    return os.getpid() % workers  # a replacement process after a crash: share round-robin


def start_worker(slot_dir: str, workers: int, gpus: int, per_worker: int = 1) -> None:
    """Process-pool initializer: claim a slot, then pin this process to its device(s)."""
    global WORKER_LABEL
    slot = claim_slot(slot_dir, workers)
    from shardwise.gpu_runtime import pin_worker

    label = pin_worker(slot, workers, gpus, gpus_per_worker=per_worker)
    WORKER_LABEL = f"worker {slot} (pid {os.getpid()}, {label})"


def finished_in_turn(futures: list[Any], poll_seconds: float = 0.5) -> Iterator[Any]:
    """The futures, each as it finishes. Unlike Prefect's ``as_completed``, the flow's thread never
    blocks for good: a Ctrl-C or SIGTERM that the kernel hands to another thread is acted on only
    when the main thread next runs Python, which otherwise waits for the next shard to finish."""
    finished: queue.Queue[Any] = queue.Queue()
    for future in futures:
        future.add_done_callback(finished.put)
    for _ in range(len(futures)):
        while True:
            try:
                yield finished.get(timeout=poll_seconds)
                break
            except queue.Empty:
                continue


Future = TypeVar("Future")  # a task runner's future for one shard: anything with ``add_done_callback``
Item = TypeVar("Item")


def completions_while(
    submit: Callable[[Item], Future],
    items: list[Item],
    may_start: Callable[[Item], bool],
    capacity: int,
) -> Iterator[tuple[Future, Item]]:
    """Submit up to ``capacity`` items at a time, in order, while ``may_start`` allows; yield each
    (future, item) as it finishes. Once ``may_start`` refuses an item, no further item starts: the
    run stops starting shards (a budget reached, storage gone) and lets those in flight finish.

    The caller updates whatever ``may_start`` reads from each yielded result before asking for the
    next, so the next decision sees every shard finished so far."""
    waiting = list(items)
    running: dict[Any, Item] = {}
    stopped = False

    def fill() -> None:
        nonlocal stopped
        while waiting and len(running) < capacity and not stopped:
            if not may_start(waiting[0]):
                stopped = True
                return
            item = waiting.pop(0)
            running[submit(item)] = item

    fill()
    while running:
        finished = finished_in_turn(list(running))
        future = next(finished)
        finished.close()
        yield future, running.pop(future)
        fill()


def worker_label() -> str:
    """Which process ran a shard: a pool worker, a Ray worker, or the flow's own process."""
    if WORKER_LABEL:
        return WORKER_LABEL
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
        return f"ray worker (pid {os.getpid()}, node {ray.util.get_node_ip_address()})"
    return f"in-process (pid {os.getpid()})"


def ray_resources(cfg: JobConfig) -> dict[str, float]:
    """What each shard task asks Ray for: the job's numbers, else one GPU on a GPU cluster, else one CPU."""
    import ray

    wanted = {k: v for k, v in (("num_gpus", cfg.ray.num_gpus), ("num_cpus", cfg.ray.num_cpus)) if v is not None}
    if "num_gpus" not in wanted and cfg.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0:
        wanted["num_gpus"] = gpus_per_worker(cfg)
    if not wanted.get("num_gpus"):
        wanted.setdefault("num_cpus", 1)
    return wanted
