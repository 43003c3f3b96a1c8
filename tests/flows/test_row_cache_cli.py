"""The row cache through the command line, on local disk and on the S3 test server: what a rerun
computes, that reused values are the ones computed the first time, sharing, corruption, stats/prune.

The commands run in the test process (tests/cli.py), but for the two runs at once that share one
cache: those are two console-script processes."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardwise.tasks.records.row_cache import RowCache
from tests.flows.test_cli import SHARDWISE


def _write(path, ids, texts) -> None:
    pq.write_table(pa.table({"id": ids, "text": pa.array(texts, pa.string())}), path)


def _totals(output) -> dict:
    return json.loads((output / "_manifest.json").read_text())["totals"]


def _rows(output) -> dict[str, dict]:
    """Output rows by id (parts in any order)."""
    table = pa.concat_tables(pq.read_table(p) for p in sorted(output.glob("part-*.parquet")))
    return {row["id"]: row for row in table.to_pylist()}


@pytest.mark.slow
def test_rerun_computes_only_edited_and_new_rows_locally(cli, tmp_path):
    source, cache = tmp_path / "in", tmp_path / "cache"
    source.mkdir()
    texts_a = ["The kettle boils fast.", "Shoes fell apart.", "Great value for money.", "Arrived late, box torn."]
    texts_b = ["Works as described.", "The lid does not fit.", "Battery lasts a week.", "Too loud at night."]
    _write(source / "a.parquet", [f"a{i}" for i in range(4)], texts_a)
    _write(source / "b.parquet", [f"b{i}" for i in range(4)], texts_b)
    job = ["--input", str(source), "--task", "generate", "--max-new-tokens", "2", "--cache", str(cache)]

    first = cli("run", *job, "--output", str(tmp_path / "out1"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert (_totals(tmp_path / "out1")["rows_computed"], _totals(tmp_path / "out1")["rows_cached"]) == (8, 0)

    # Nightly change: one row edited, rows reordered and one renamed id (content unchanged), a new file.
    _write(
        source / "a.parquet",
        ["a3", "a2", "a1-renamed", "a0"],
        [texts_a[3], texts_a[2], texts_a[1], "The kettle boils fast and loud."],
    )
    _write(source / "c.parquet", ["c0", "c1"], ["Smells of plastic.", "Fits my small kitchen."])
    plan = cli("plan", *job, "--output", str(tmp_path / "out2"), "--json")
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert (json.loads(plan.stdout)["rows_to_compute"], json.loads(plan.stdout)["rows_cached"]) == (3, 7)

    second = cli("run", *job, "--output", str(tmp_path / "out2"))
    assert second.returncode == 0, second.stderr[-3000:]
    totals = _totals(tmp_path / "out2")
    assert (totals["rows"], totals["rows_computed"], totals["rows_cached"]) == (10, 3, 7)
    assert "7 from the row cache" in second.stdout and "cost saved" in second.stdout
    # b.parquet's shard came whole from the cache: its progress line claims no generation speed.
    (cached_line,) = [line for line in second.stderr.splitlines() if "shard-00001 committed" in line]
    assert "4 rows in" in cached_line and ", 0.0 generated tok/s;" in cached_line, cached_line
    before, after = _rows(tmp_path / "out1"), _rows(tmp_path / "out2")
    reused = {"a1-renamed": "a1", "a2": "a2", "a3": "a3", **{f"b{i}": f"b{i}" for i in range(4)}}
    for now, then in reused.items():
        assert {**after[now], "id": then} == before[then]  # the values computed the first time, exactly
    assert totals["prompt_tokens_computed"] == sum(after[i]["n_prompt_tokens"] for i in ("a0", "c0", "c1"))

    # A new prompt or max_new_tokens changes every generated value: the plan (same keys as the run,
    # no weights loaded) finds nothing to reuse. (Other models: tests/tasks/test_row_cache.py.)
    for change in (["--max-new-tokens", "3"], ["--prompt-template", "Summarise: {text}"]):
        changed = cli("plan", *job, *change, "--output", str(tmp_path / "out3"), "--json")
        assert changed.returncode == 0, changed.stderr[-3000:]
        assert (json.loads(changed.stdout)["rows_to_compute"], json.loads(changed.stdout)["rows_cached"]) == (10, 0)

    stats = cli("cache", "stats", str(cache), "--json")
    assert stats.returncode == 0, stats.stderr
    figures = json.loads(stats.stdout)
    assert figures["kinds"]["generate"]["entries"] == 8 + 3
    assert [r["rows_cached"] for r in figures["recent_runs"]] == [0, 7]
    assert figures["hit_rate"] == pytest.approx(7 / 18)
    pruned = cli("cache", "prune", str(cache), "--older-than", "0")
    assert pruned.returncode == 0 and "11 entries" in pruned.stdout
    assert RowCache(str(cache)).stats()["entries"] == 0


@pytest.mark.slow
def test_shared_cache_on_s3_concurrent_runs_and_a_corrupt_file(cli, s3, tmp_path):
    fs, bucket = s3
    texts = [
        f"Review number {i}: {'good' if i % 2 else 'bad'} product, would {'' if i % 3 else 'not '}buy again."
        for i in range(12)
    ]
    for name, part in (("a", slice(0, 6)), ("b", slice(6, 12))):
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"id": [f"{name}{i}" for i in range(6)], "text": texts[part]}), sink)
        fs.pipe_file(f"{bucket}/in/{name}.parquet", sink.getvalue().to_pybytes())
    cache = f"s3://{bucket}/cache"
    job = ["--input", f"s3://{bucket}/in", "--task", "embed", "--embed-model", "dummy:bert-tiny", "--cache", cache]

    # two runs at once, one cache: each writes its own immutable files, both finish correct
    procs = [
        subprocess.Popen(
            [SHARDWISE, "run", *job, "--output", f"s3://{bucket}/out{n}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (1, 2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]

    def rows(output: str) -> dict[str, list[float]]:
        table = pa.concat_tables(
            pq.read_table(f"{bucket}/{output}/{p.rsplit('/', 1)[-1]}", filesystem=fs)
            for p in fs.glob(f"{bucket}/{output}/part-*.parquet")
        )
        return dict(zip(table.column("id").to_pylist(), table.column("embedding").to_pylist()))

    def same(a: dict[str, list[float]], b: dict[str, list[float]]) -> bool:
        """The same rows with the same vectors, to float32 rounding: a row computed in a batch of
        other rows (padded to another length) can differ in the last bits from a cache entry."""
        return a.keys() == b.keys() and all(np.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)

    assert same(rows("out1"), rows("out2")) and len(rows("out1")) == 12
    entries = fs.glob(f"{bucket}/cache/v1/embed/*/*.parquet")
    assert entries

    # A damaged entry file is skipped with a warning; its rows are computed, the rest reused.
    fs.pipe_file(entries[0], b"not parquet at all")
    third = cli("run", *job, "--output", f"s3://{bucket}/out3")
    assert third.returncode == 0, third.stderr[-3000:]
    assert "skipping unreadable cache file" in third.stderr
    manifest = json.loads(fs.cat_file(f"{bucket}/out3/_manifest.json"))
    assert manifest["totals"]["rows_cached"] + manifest["totals"]["rows_computed"] == 12
    assert manifest["totals"]["rows_cached"] > 0
    assert same(rows("out3"), rows("out1"))

    stats = cli("cache", "stats", cache)
    assert stats.returncode == 0, stats.stderr
    assert "embed" in stats.stdout and "hit rate" in stats.stdout
