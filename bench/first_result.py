"""Time to first result: a small embedding job through ``shardwise run``, as a whole process,
against a bare Python script that loads the same model, encodes the same rows and writes the same
Parquet, also as a whole process. Rounds alternate the two (A-B-A-B...); the median of each side
and its spread are reported, with the run's own phases (the summary's timings).

    .venv/bin/python bench/first_result.py [--rows 200] [--rounds 3]

Goal: ``shardwise run`` at most 2x the bare script's wall time. Both processes start cold in the
sense a user's do (a new interpreter, imports, model load); the page cache is warm for both.
``PREFECT_API_URL`` is unset, so the run starts its temporary Prefect server as a user's first run
would; MLflow writes to a fresh sqlite store.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARDWISE = str(Path(sys.executable).with_name("shardwise"))

BARE = """
import sys
import pyarrow as pa, pyarrow.parquet as pq
from sentence_transformers import SentenceTransformer
from shardwise.gpu_runtime import resolve_model_spec

table = pq.read_table(sys.argv[1])
model = SentenceTransformer(str(resolve_model_spec("bundled:all-minilm-l6-v2").path), device="cpu")
vectors = model.encode(table.column("text").to_pylist(), batch_size=64)
flat = pa.array(vectors.reshape(-1), pa.float32())
table = table.append_column("embedding", pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]))
pq.write_table(table, sys.argv[2])
"""


def timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{command[:3]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench/first_result.json")
    args = parser.parse_args()

    from shardwise.tasks.records.demo_data import write_reviews_dataset

    root = Path(tempfile.mkdtemp(prefix="shardwise-first-result-"))
    write_reviews_dataset(str(root / "in"), files=1, rows_per_file=args.rows, rows_per_group=args.rows)
    source = next((root / "in").glob("*.parquet"))
    (root / "bare.py").write_text(BARE)
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env |= {"HF_HUB_OFFLINE": "1", "PREFECT_HOME": str(root / "prefect"), "SHARDWISE_HOME": str(root / "state")}
    env |= {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false"}

    bare, flow, phases = [], [], []
    for i in range(args.rounds):
        bare.append(
            timed([sys.executable, str(root / "bare.py"), str(source), str(root / f"bare-{i}.parquet")], env)[0]
        )
        output = root / f"out-{i}"
        command = [SHARDWISE, "run", "--input", str(source), "--output", str(output), "--task", "embed"]
        seconds, printed = timed(command + ["--id-column", "review_id"], env)
        flow.append(seconds)
        phases.append(next((line.strip() for line in printed.splitlines() if "overhead" in line), ""))
    result = {
        "rows": args.rows,
        "bare_script_s": bare,
        "shardwise_run_s": flow,
        "bare_median_s": statistics.median(bare),
        "run_median_s": statistics.median(flow),
        "ratio_median": statistics.median(flow) / statistics.median(bare),
        "ratio_spread": [min(flow) / max(bare), max(flow) / min(bare)],
        "overhead_lines": phases,
        "goal": "ratio <= 2.0",
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
