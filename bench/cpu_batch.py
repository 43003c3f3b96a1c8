"""Generation through the flow on CPU at two row caps per decode batch, against naive HF.

One process: a warm-up flow run, naive HF ``generate`` (batch 16, input order), then the flow at
each cap in turn, twice (A-B-A-B), then naive HF again; each flow's generated tok/s (wall clock of
the flow) is divided by the naive loop's mean. 128 review rows in 2 shards, 32 new tokens, greedy,
the bundled SmolLM2-135M. Usage: ``.venv/bin/python bench/cpu_batch.py [CAP ...]`` (default 64 32).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import polars as pl  # noqa: E402

import bench.run as bench  # noqa: E402
import shardwise.gpu_runtime.generation as generation  # noqa: E402
from shardwise.gpu_runtime import on_compute_thread, render_prompt  # noqa: E402
from shardwise.tasks.config.job import JobConfig  # noqa: E402
from shardwise.tasks.records.demo_data import write_reviews_dataset  # noqa: E402


def main() -> None:
    caps = [int(a) for a in sys.argv[1:]] or [64, 32]
    root = Path(tempfile.mkdtemp(prefix="shardwise-bench-"))
    write_reviews_dataset(str(root / "in"), files=2, rows_per_file=64, rows_per_group=16)
    source = pl.read_parquet(root / "in" / "*.parquet").sort("review_id")
    prompts = [render_prompt(bench.TEMPLATE, row) for row in source.iter_rows(named=True)]

    def flow(name: str, cap: int) -> float:
        generation.CPU_MAX_BATCH_SIZE = cap  # the engine's CPU default, read per call
        cfg = JobConfig(
            input=str(root / "in"),
            output=str(root / name),
            task="generate",
            id_column="review_id",
            keep_columns="id",
            rows_per_shard=64,
            device="cpu",
            generate={"prompt_template": bench.TEMPLATE, "max_new_tokens": 32},
        )
        seconds, summary = bench.run_flow(cfg)
        return summary["generated_tokens"] / seconds

    flow("warm-up", caps[0])
    naive = [on_compute_thread(bench.naive_generate, prompts, 32, None)]
    results: dict[int, list[float]] = {cap: [] for cap in caps}
    for round_ in range(2):
        for cap in caps:
            results[cap].append(flow(f"cap{cap}-{round_}", cap))
    naive.append(on_compute_thread(bench.naive_generate, prompts, 32, None))
    naive_tok_s = sum(tokens for _, tokens, _ in naive) / sum(seconds for _, _, seconds in naive)
    print(f"naive HF: {', '.join(f'{tokens / seconds:.1f}' for _, tokens, seconds in naive)} tok/s")
    for cap, rates in results.items():
        ratios = ", ".join(f"{rate / naive_tok_s:.2f}" for rate in rates)
        print(f"flow, {cap} rows per batch: {', '.join(f'{r:.1f}' for r in rates)} tok/s = {ratios}x naive")


if __name__ == "__main__":
    main()
