import re
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.errors import InputError
from shardwise.tasks.planning.shards import list_input_files, plan_shards


def job(input_uri, **kw) -> JobConfig:
    defaults = {"id_column": "review_id", "text_column": "text", "output": "unused"}
    return JobConfig(input=str(input_uri), **{**defaults, **kw})


def write(path: Path, rows: int, row_group: int, **columns) -> Path:
    data = {"review_id": [f"id-{path.stem}-{i}" for i in range(rows)], "text": [f"text {i}" for i in range(rows)]}
    data.update(columns)
    pq.write_table(pa.table(data), path, row_group_size=row_group)
    return path


def test_plan_covers_every_row_once_from_footers(reviews_dir):
    plan = plan_shards(job(reviews_dir, rows_per_shard=6))
    assert plan.total_rows == 30
    assert [s.name for s in plan.shards] == [f"shard-{i:05d}" for i in range(len(plan.shards))]
    for file in plan.files:
        ranges = sorted((s.first_row, s.first_row + s.num_rows) for s in plan.shards if s.source == file.uri)
        assert ranges[0][0] == 0 and ranges[-1][1] == file.num_rows
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, no overlap
    assert all(s.num_rows <= 6 for s in plan.shards)


def test_large_row_groups_are_split(tmp_path):
    write(tmp_path / "big.parquet", rows=25, row_group=25)
    plan = plan_shards(job(tmp_path, rows_per_shard=10))
    assert [(s.slice_start, s.num_rows) for s in plan.shards] == [(0, 10), (10, 10), (20, 5)]


def test_shard_ids_are_deterministic_and_follow_content(tmp_path):
    path = write(tmp_path / "a.parquet", rows=12, row_group=4)
    first = [s.shard_id for s in plan_shards(job(tmp_path, rows_per_shard=4)).shards]
    assert first == [s.shard_id for s in plan_shards(job(tmp_path, rows_per_shard=4)).shards]
    write(path, rows=12, row_group=4, extra=list(range(12)))  # same shape, different content
    assert first != [s.shard_id for s in plan_shards(job(tmp_path, rows_per_shard=4)).shards]


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="input not found"):
        plan_shards(job(tmp_path / "nope"))
    with pytest.raises(InputError, match="no file matches"):
        plan_shards(job(f"{tmp_path}/*.parquet"))


def test_missing_column_lists_existing_columns(tmp_path):
    write(tmp_path / "a.parquet", rows=3, row_group=3)
    with pytest.raises(InputError) as err:
        plan_shards(job(tmp_path, text_column="body"))
    message = str(err.value)
    assert "a.parquet" in message and "'body'" in message and "review_id, text" in message


def test_template_columns_must_exist(tmp_path):
    write(tmp_path / "a.parquet", rows=3, row_group=3)
    with pytest.raises(InputError, match="'title'"):
        plan_shards(job(tmp_path, generate={"prompt_template": "{title}: {text}"}))


def test_non_string_text_column(tmp_path):
    pq.write_table(pa.table({"review_id": ["a"], "text": [3]}), tmp_path / "a.parquet")
    with pytest.raises(InputError, match="expected a string column"):
        plan_shards(job(tmp_path))


def test_schema_drift_names_the_file(tmp_path):
    write(tmp_path / "a.parquet", rows=3, row_group=3, rating=[1, 2, 3])
    write(tmp_path / "b.parquet", rows=3, row_group=3, rating=["1", "2", "3"])
    with pytest.raises(InputError, match=r"schema drift: .*b\.parquet column 'rating'"):
        plan_shards(job(tmp_path))
    write(tmp_path / "b.parquet", rows=3, row_group=3)
    with pytest.raises(InputError, match=r"b\.parquet has no column 'rating'"):
        plan_shards(job(tmp_path))


def test_corrupt_file_is_named_and_the_others_still_planned(tmp_path):
    write(tmp_path / "a.parquet", rows=3, row_group=3)
    good = tmp_path / "c.parquet"
    write(good, rows=4, row_group=4)
    (tmp_path / "b.parquet").write_bytes(b"this is not parquet at all")
    plan = plan_shards(job(tmp_path))
    assert [u.uri.rsplit("/", 1)[-1] for u in plan.unreadable] == ["b.parquet"]
    assert "b.parquet: not a Parquet file" in plan.unreadable[0].reason
    assert plan.total_rows == 7
    truncated = good.read_bytes()[:-20]
    (tmp_path / "b.parquet").write_bytes(truncated)
    assert "truncated" in plan_shards(job(tmp_path)).unreadable[0].reason


def test_only_unreadable_files_is_an_input_error(tmp_path):
    (tmp_path / "b.parquet").write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(InputError, match=r"b\.parquet: not a Parquet file"):
        plan_shards(job(tmp_path))


def test_shard_ids_do_not_depend_on_other_files(tmp_path):
    write(tmp_path / "b.parquet", rows=8, row_group=4)
    alone = {s.shard_id for s in plan_shards(job(tmp_path, rows_per_shard=4)).shards}
    write(tmp_path / "a.parquet", rows=8, row_group=4)  # sorts first, shifts every index
    together = {s.shard_id for s in plan_shards(job(tmp_path, rows_per_shard=4)).shards}
    assert alone < together


def test_file_names_cannot_escape_the_output_root(tmp_path):
    write(tmp_path / "we ird;$(x)..\\..parquet", rows=2, row_group=2)
    (shard,) = plan_shards(job(tmp_path)).shards
    assert re.fullmatch(r"part-[A-Za-z0-9_-]+\.parquet", shard.part_name), shard.part_name
    assert shard.part_name.startswith("part-we_ird___x_____-")


def test_an_empty_directory_is_refused_unless_allowed(tmp_path):
    with pytest.raises(InputError, match=r"has no rows \(no Parquet files\).*allow_empty"):
        plan_shards(job(tmp_path))
    plan = plan_shards(job(tmp_path, allow_empty=True))
    assert plan.shards == () and plan.total_rows == 0


def test_an_empty_file_is_refused_unless_allowed(tmp_path):
    pq.write_table(
        pa.table({"review_id": pa.array([], pa.string()), "text": pa.array([], pa.string())}),
        tmp_path / "empty.parquet",
    )
    with pytest.raises(InputError, match=r"has no rows \(1 file\(s\), 0 rows\)"):
        plan_shards(job(tmp_path))
    assert plan_shards(job(tmp_path, allow_empty=True)).shards == ()


def test_listing_skips_hidden_and_underscore_files(tmp_path):
    write(tmp_path / "a.parquet", rows=2, row_group=2)
    write(tmp_path / "_tmp.parquet", rows=2, row_group=2)
    (tmp_path / ".hidden").mkdir()
    write(tmp_path / ".hidden" / "c.parquet", rows=2, row_group=2)
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "b.parquet", rows=2, row_group=2)
    names = [Path(u).name for u in list_input_files(str(tmp_path))]
    assert names == ["a.parquet", "b.parquet"]


def test_an_input_root_under_a_hidden_directory_is_still_read(tmp_path):
    root = tmp_path / ".shardwise" / "_demo" / "input"
    root.mkdir(parents=True)
    write(root / "a.parquet", rows=2, row_group=2)
    write(root / "_partial.parquet", rows=2, row_group=2)
    assert [Path(u).name for u in list_input_files(str(root))] == ["a.parquet"]


def write_uncompressed(path: Path, texts: list[str]) -> bytes:
    """No compression, no dictionary, no statistics: a one-letter edit leaves size and footer alike."""
    table = pa.table({"review_id": [f"r{i}" for i in range(len(texts))], "text": texts})
    pq.write_table(table, path, compression="none", use_dictionary=False, write_statistics=False)
    return path.read_bytes()


def edit_one_letter(data: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new) and data.count(old) == 1
    edited = data.replace(old, new)
    footer_len = int.from_bytes(data[-8:-4], "little")
    assert edited[-8 - footer_len :] == data[-8 - footer_len :]  # the footer alone cannot tell
    return edited


def test_a_same_size_edit_changes_the_local_fingerprint_and_shard_ids(tmp_path):
    path = tmp_path / "a.parquet"
    data = write_uncompressed(path, ["the cat sat", "on the mat"])
    before = plan_shards(job(tmp_path))
    stat = path.stat()
    time.sleep(0.05)  # past the file system's timestamp granularity, as any real edit is
    with open(path, "r+b") as handle:  # edited in place: same inode, same size, new mtime
        handle.write(edit_one_letter(data, b"cat", b"cot"))
    assert (path.stat().st_ino, path.stat().st_mtime_ns) != (stat.st_ino, stat.st_mtime_ns)
    after = plan_shards(job(tmp_path))
    assert after.files[0].size == before.files[0].size
    assert after.files[0].fingerprint != before.files[0].fingerprint
    assert {s.shard_id for s in after.shards}.isdisjoint(s.shard_id for s in before.shards)
    assert plan_shards(job(tmp_path)).files[0].fingerprint == after.files[0].fingerprint  # stable when untouched


def test_a_same_size_edit_changes_the_s3_fingerprint(tmp_path, s3):
    fs, bucket = s3
    data = write_uncompressed(tmp_path / "a.parquet", ["the cat sat", "on the mat"])
    fs.pipe_file(f"{bucket}/in/a.parquet", data)
    before = plan_shards(job(f"s3://{bucket}/in"))
    fs.pipe_file(f"{bucket}/in/a.parquet", edit_one_letter(data, b"cat", b"cot"))
    after = plan_shards(job(f"s3://{bucket}/in"))
    assert after.files[0].size == before.files[0].size
    assert after.files[0].fingerprint != before.files[0].fingerprint
    fs.pipe_file(f"{bucket}/in/a.parquet", data)  # the very same bytes again: the same ETag
    assert plan_shards(job(f"s3://{bucket}/in")).files[0].fingerprint == before.files[0].fingerprint
    # Named directly (a HEAD) rather than found by listing the directory: the same fingerprint.
    assert plan_shards(job(f"s3://{bucket}/in/a.parquet")).files[0].fingerprint == before.files[0].fingerprint
