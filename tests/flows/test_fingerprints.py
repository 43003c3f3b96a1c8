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

from tasks.job_config import JobConfig

pytestmark = pytest.mark.slow


def run_flow(cfg: JobConfig):
    from flows.enrich import enrich

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
    pq.write_table(pa.table({"review_id": ids, "text": texts}), buffer, compression="none",
                   use_dictionary=False, write_statistics=False, row_group_size=2)
    return buffer.getvalue()


def test_a_same_size_edit_of_an_input_file_is_recomputed(store):
    original = uncompressed_parquet(["a0", "a1", "a2"], ["the cat sat", "on the mat", "all day"])
    other = uncompressed_parquet(["b0", "b1"], ["a dog ran", "in the park"])
    store.write("in/a.parquet", original)
    store.write("in/b.parquet", other)
    cfg = JobConfig(input=store.uri("in"), output=store.uri("out"), task="embed", id_column="review_id",
                    rows_per_shard=2)
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
