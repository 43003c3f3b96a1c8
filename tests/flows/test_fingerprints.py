"""What a rerun must notice: an edited input file, replaced model weights, ids that are not UTF-8.

Real flows on the session's Prefect server, real bundled models, real Parquet, on local disk and on
the S3 test server.
"""

from __future__ import annotations

import io
import json

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardwise.tasks.config.job import JobConfig

pytestmark = pytest.mark.slow


def run_flow(cfg: JobConfig):
    from shardwise.flows.enrich import enrich

    state = enrich(job=cfg.public_dict(), return_state=True)
    return state, state.result(raise_on_failure=False)


class Store:
    """A local directory or an S3 prefix, with the few reads and writes these tests need."""

    def __init__(self, root: str, fs=None) -> None:
        self.root, self.fs = root, fs

    def uri(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _key(self, name: str) -> str:
        return self.uri(name).removeprefix("s3://")

    def write(self, name: str, data: bytes) -> None:
        if self.fs is None:
            from pathlib import Path

            Path(self.uri(name)).parent.mkdir(parents=True, exist_ok=True)
            Path(self.uri(name)).write_bytes(data)
        else:
            self.fs.pipe_file(self._key(name), data)

    def edit_in_place(self, name: str, data: bytes) -> None:
        """Overwrite the bytes of an existing file (locally: same inode, new mtime)."""
        if self.fs is None:
            import time

            time.sleep(0.05)  # past the file system's timestamp granularity, as any real edit is
            with open(self.uri(name), "r+b") as handle:
                handle.write(data)
        else:
            self.fs.pipe_file(self._key(name), data)

    def parts(self, name: str) -> dict[str, bytes]:
        if self.fs is None:
            from pathlib import Path

            return {p.name: p.read_bytes() for p in Path(self.uri(name)).glob("part-*.parquet")}
        self.fs.invalidate_cache()
        return {p.rsplit("/", 1)[-1]: self.fs.cat_file(p) for p in self.fs.glob(f"{self._key(name)}/part-*.parquet")}

    def exists(self, name: str) -> bool:
        if self.fs is None:
            from pathlib import Path

            return Path(self.uri(name)).exists()
        self.fs.invalidate_cache()
        return self.fs.exists(self._key(name))


def read_parts(parts: dict[str, bytes]) -> pl.DataFrame:
    return pl.concat([pl.from_arrow(pq.read_table(io.BytesIO(data))) for data in parts.values()]).sort("review_id")


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, prefect_server):
    if request.param == "local":
        return Store(str(tmp_path))
    fs, bucket = request.getfixturevalue("s3")
    return Store(f"s3://{bucket}", fs)


def uncompressed_parquet(ids: list[str], texts: list[str]) -> bytes:
    """No compression, dictionary or statistics: a one-letter edit keeps the size and the footer."""
    buffer = io.BytesIO()
    pq.write_table(
        pa.table({"review_id": ids, "text": texts}),
        buffer,
        compression="none",
        use_dictionary=False,
        write_statistics=False,
        row_group_size=2,
    )
    return buffer.getvalue()


def test_a_same_size_edit_of_an_input_file_is_recomputed(store):
    original = uncompressed_parquet(["a0", "a1", "a2"], ["the cat sat", "on the mat", "all day"])
    other = uncompressed_parquet(["b0", "b1"], ["a dog ran", "in the park"])
    store.write("in/a.parquet", original)
    store.write("in/b.parquet", other)
    cfg = JobConfig(
        input=store.uri("in"), output=store.uri("out"), task="embed", id_column="review_id", rows_per_shard=2
    )
    state, first = run_flow(cfg)
    assert state.is_completed() and first["succeeded"], state.message
    before = store.parts("out")

    edited = original.replace(b"the cat sat", b"the cot sat")
    assert len(edited) == len(original) and edited[-200:] == original[-200:]  # same size, same footer
    store.edit_in_place("in/a.parquet", edited)
    state, second = run_flow(cfg)
    assert state.is_completed() and second["succeeded"], state.message
    after = store.parts("out")

    a_before = {n for n in before if n.startswith("part-a-")}
    a_after = {n for n in after if n.startswith("part-a-")}
    assert len(a_after) == 2 and a_after.isdisjoint(a_before)  # a.parquet's shards were recomputed
    b_parts = {n: d for n, d in before.items() if n.startswith("part-b-")}
    assert {n: after[n] for n in b_parts} == b_parts  # b.parquet's part was kept as it was
    assert set(after) == a_after | set(b_parts)  # the stale parts of a.parquet are gone
    texts = read_parts(after)["text"].to_list()
    assert texts == ["the cot sat", "on the mat", "all day", "a dog ran", "in the park"]
    assert store.exists("out/_SUCCESS")


# ---- a changed model ---------------------------------------------------------------------------


def save_tiny_embedder(directory, seed: int) -> None:
    """A random-weight BERT of a few layers with MiniLM's tokenizer: a local model directory."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    from shardwise.gpu_runtime import resolve_model_spec

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertModel(config).save_pretrained(directory)
    minilm = __import__("pathlib").Path(resolve_model_spec("bundled:all-minilm-l6-v2").path)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm / name, directory / name)


def test_replaced_model_weights_are_refused_unless_overwrite(cli, tmp_path):
    from shardwise.tasks.records.demo_data import write_reviews_dataset

    model = tmp_path / "my-embedder"
    save_tiny_embedder(model, seed=0)
    write_reviews_dataset(str(tmp_path / "in"), files=1, rows_per_file=6, rows_per_group=3)
    output = tmp_path / "out"
    job = [
        "run",
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(output),
        "--task",
        "embed",
        "--id-column",
        "review_id",
        "--rows-per-shard",
        "3",
        "--embed-model",
        str(model),
    ]
    first = cli(*job)
    assert first.returncode == 0, first.stderr[-3000:]
    manifest = json.loads((output / "_manifest.json").read_text())
    identity = manifest["models"]["embed"]["identity"]
    assert identity.startswith("local:") and len(identity) > 40
    embeddings = pl.read_parquet(output / "part-*.parquet").sort("review_id")["embedding"].to_list()

    unchanged = cli(*job)
    assert unchanged.returncode == 0, unchanged.stderr[-3000:]
    assert "already published from this config and input: nothing to do" in unchanged.stderr

    weights = model / "model.safetensors"
    size = weights.stat().st_size
    save_tiny_embedder(model, seed=1)  # new weights of the same shape: the same file size
    assert weights.stat().st_size == size
    parts = {p.name: p.read_bytes() for p in output.glob("part-*.parquet")}
    refused = cli(*job)
    assert refused.returncode == 2, (refused.returncode, refused.stderr[-3000:])
    errors = [line for line in refused.stderr.splitlines() if line.startswith("shardwise: error:")]
    assert len(errors) == 1 and "embed.model" in errors[0] and str(model) in errors[0], refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr
    assert {p.name: p.read_bytes() for p in output.glob("part-*.parquet")} == parts  # nothing touched
    assert (output / "_SUCCESS").exists()

    # In this process too, whose engine cache holds the old weights under the same model path: the
    # cache is keyed by the weights' revision, so the new weights load (once).
    from shardwise.gpu_runtime import model_load_counts

    loads = model_load_counts().get(str(model), 0)
    replaced = cli(*job, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert model_load_counts()[str(model)] == loads + 1
    assert "resuming" not in replaced.stderr
    manifest = json.loads((output / "_manifest.json").read_text())
    assert manifest["models"]["embed"]["identity"] != identity
    again = pl.read_parquet(output / "part-*.parquet").sort("review_id")["embedding"].to_list()
    assert len(again) == 6 and all(a != b for a, b in zip(again, embeddings))


# ---- partitions that were incomplete when they ran -----------------------------------------------


def test_a_partition_that_was_empty_or_half_landed_is_run_again(prefect_server, tmp_path):
    from shardwise.flows.schedules import enrich_partition
    from shardwise.tasks.records.demo_data import write_reviews_dataset

    date = "2026-11-05"
    raw = tmp_path / "raw" / f"dt={date}"
    out = tmp_path / "enriched" / f"dt={date}"
    job = {
        "input": str(tmp_path / "raw"),
        "output": str(tmp_path / "enriched"),
        "task": "embed",
        "id_column": "review_id",
        "rows_per_shard": 3,
        "device": "cpu",
        "allow_empty": True,  # an empty night is published empty (refused by default)
    }

    def nightly() -> dict:
        from prefect.states import State

        state = enrich_partition(job=job, date=date, return_state=True)
        assert state.is_completed(), state.message
        result = state.result()
        return result.result() if isinstance(result, State) else result  # the enrich subflow's state

    raw.mkdir(parents=True)  # the nightly run came before the data
    assert nightly()["rows"] == 0 and (out / "_SUCCESS").exists()
    assert [p.name for p in out.glob("part-*.parquet")] == ["part-empty-0000000000-0000000000.parquet"]
    assert nightly()["skipped"]  # nothing landed since: left alone

    write_reviews_dataset(str(tmp_path / "landing"), files=2, rows_per_file=4, rows_per_group=2)
    (tmp_path / "landing" / "reviews-000.parquet").rename(raw / "reviews-000.parquet")  # half landed
    summary = nightly()
    assert summary.get("skipped") is None and summary["rows"] == 4
    first_parts = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}

    (tmp_path / "landing" / "reviews-001.parquet").rename(raw / "reviews-001.parquet")  # the rest
    summary = nightly()
    assert summary.get("skipped") is None and summary["rows"] == 8
    parts = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert {n: parts[n] for n in first_parts if "empty" not in n} == {
        n: t for n, t in first_parts.items() if "empty" not in n
    }  # what was done is resumed, not redone
    assert len(parts) == 4 and not [n for n in parts if "empty" in n]
    assert nightly()["skipped"]


# ---- ids that are not valid UTF-8 ----------------------------------------------------------------


def test_invalid_utf8_ids_are_never_rewritten(cli, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    raw_ids = [b"ok-0", b"ok-1", b"id-\xff", b"id-\xfe", b"ok-4", b"ok-5"]  # \xff and \xfe: both U+FFFD if "repaired"
    ids = pa.array(raw_ids, pa.binary()).view(pa.string())
    texts = ["fine", "also fine", "bad id here", "another bad id", "good again", "and again"]
    pq.write_table(pa.table({"review_id": ids, "text": texts}), source / "bad.parquet", row_group_size=2)
    pq.write_table(pa.table({"review_id": ["g-0", "g-1"], "text": ["good", "file"]}), source / "good.parquet")
    output = tmp_path / "out"
    job = [
        "run",
        "--input",
        str(source),
        "--output",
        str(output),
        "--task",
        "embed",
        "--id-column",
        "review_id",
        "--rows-per-shard",
        "2",
    ]
    for attempt in range(2):  # a rerun must not trust anything a failed attempt left behind
        proc = cli(*job)
        assert proc.returncode == 1, (attempt, proc.returncode, proc.stderr[-3000:])
        assert "Traceback" not in proc.stdout
        failures = [line for line in proc.stdout.splitlines() if line.startswith("failed")]
        assert len(failures) == 1, proc.stdout
        assert "bad.parquet" in failures[0] and "'review_id'" in failures[0] and "row 2" in failures[0]
        assert not (output / "_SUCCESS").exists()
        written = []
        for part in output.glob("part-*.parquet"):
            column = pq.read_table(part).column("review_id")
            column.validate(full=True)  # every id written is valid UTF-8 ...
            written += column.to_pylist()
        assert sorted(written) == ["g-0", "g-1", "ok-0", "ok-1", "ok-4", "ok-5"]  # ... and an input id, unaltered
