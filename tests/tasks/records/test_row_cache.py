"""The row cache's keys and store, without models: what changes a key, what does not, and that a
broken cache is a warning and a miss, never an error."""

from __future__ import annotations

import threading
import time

import pyarrow.parquet as pq
import pytest

from shardwise.tasks.config.loading import validate_config
from shardwise.tasks.records.row_cache import RowCache
from shardwise.tasks.records.row_cache_keys import embedding_context, generation_context, generation_keys, row_keys


def _cfg(**generate):
    return validate_config(
        {
            "input": "in",
            "output": "out",
            "task": "both",
            "device": "cpu",
            "cache": "c",
            "generate": {"max_new_tokens": 4, **generate},
        }
    )


def _entry(text: str) -> dict:
    return {
        "generated_text": text,
        "n_prompt_tokens": 3,
        "n_generated_tokens": 2,
        "finish_reason": "stop",
        "truncated": False,
    }


def _key(cfg, day: str = "2026-12-01", prompt: str = "a") -> str:
    from shardwise.tasks.records.engine_inputs import generation_params

    return generation_keys(generation_context(cfg), [prompt], generation_params(cfg, day), cfg.generate.model)[0]


def test_generation_key_changes_with_everything_that_changes_values():
    base = _key(_cfg())
    assert _key(_cfg()) == base  # stable
    for changed in (
        _key(_cfg(max_new_tokens=5)),
        _key(_cfg(system_prompt="Be brief.")),
        _key(_cfg(temperature=0.7, seed=1)),
        _key(_cfg(max_input_tokens=64)),
        _key(_cfg(ignore_eos=True)),
        _key(_cfg(output_schema={"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]})),
        _key(_cfg(model="dummy:llama-135m")),
    ):
        assert changed != base
    # batching and KV-cache knobs do not change values, so they do not change keys
    assert _key(_cfg(max_batch_size=3, token_budget=128, cache="static")) == base
    # SmolLM2's chat template prints no date: another day is the same prompt, so the same key
    assert _key(_cfg(), "2026-12-02") == base
    # the row's key is its prompt: a changed template changes the prompt, ids and files never enter
    context = generation_context(_cfg())
    assert row_keys(context, ["Summarise: a"]) != row_keys(context, ["Sum up: a"])
    assert row_keys(context, ["a", "b"]) == list(reversed(row_keys(context, ["b", "a"])))


def test_embedding_key_depends_on_model_and_prompt_name_not_on_generation():
    base = embedding_context(_cfg())
    assert embedding_context(_cfg(max_new_tokens=9, system_prompt="x")) == base
    other = validate_config(
        {"input": "in", "output": "out", "task": "embed", "device": "cpu", "embed": {"model": "dummy:bert-tiny"}}
    )
    assert embedding_context(other) != base


def test_entries_round_trip_and_concurrent_writers_are_safe(tmp_path):
    cache = RowCache(str(tmp_path / "cache"))
    keys = row_keys("ctx", [f"text {i}" for i in range(200)])

    def writer(part: int) -> None:
        RowCache(str(tmp_path / "cache")).add("generate", {k: _entry(k[:8]) for k in keys[part::4]})

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    found = cache.lookup("generate", keys + ["f" * 64])
    assert set(found) == set(keys)
    assert found[keys[7]] == _entry(keys[7][:8])
    assert not cache.warnings
    assert cache.stats()["kinds"]["generate"]["entries"] == 200


def test_a_corrupt_file_is_skipped_with_a_warning(tmp_path, caplog):
    cache = RowCache(str(tmp_path / "cache"))
    keys = row_keys("ctx", ["a", "b", "c", "d", "e"])
    cache.add("generate", {k: _entry("x") for k in keys})
    victim = next((tmp_path / "cache").rglob("*.parquet"))
    lost = set(pq.read_table(victim).column("key").to_pylist())
    victim.write_bytes(b"garbage")
    found = cache.lookup("generate", keys)
    assert set(found) == set(keys) - lost
    assert any("skipping unreadable cache file" in w for w in cache.warnings)
    assert "skipping unreadable cache file" in caplog.text


def test_an_unreachable_cache_is_a_warning_and_misses(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache directory should be")
    cache = RowCache(str(blocker / "cache"))
    assert cache.lookup("embed", row_keys("ctx", ["a"])) == {}
    assert cache.add("embed", {"k" * 64: {"embedding": [0.5], "n_tokens": 1, "truncated": False}}) == 0
    assert len(cache.warnings) == 2
    assert "computing the rows instead" in cache.warnings[0] and "will be computed again" in cache.warnings[1]


def test_prune_removes_only_old_files(tmp_path):
    cache = RowCache(str(tmp_path / "cache"))
    cache.add("generate", {k: _entry("x") for k in row_keys("ctx", ["a", "b"])})
    cache.record_run({"rows_cached": 0, "rows_computed": 2})
    assert cache.prune(older_than_days=1)["files"] == 0
    removed = cache.prune(older_than_days=1, now=time.time() + 2 * 86400)
    assert removed["entries"] == 2 and removed["files"] >= 2
    assert cache.stats()["entries"] == 0 and cache.stats()["recent_runs"] == []


@pytest.mark.parametrize("kind", ["generate", "embed"])
def test_lookup_of_an_empty_cache_finds_nothing_quietly(tmp_path, kind):
    cache = RowCache(str(tmp_path / "never-written"))
    assert cache.lookup(kind, row_keys("ctx", ["a"])) == {}
    assert cache.warnings == []


def test_compaction_merges_a_partitions_files_and_keeps_every_entry(tmp_path):
    cache = RowCache(str(tmp_path / "cache"))
    keys = row_keys("ctx", [f"text {i}" for i in range(300)])
    for start in range(0, 300, 10):  # 30 shards' worth of small files
        cache.add("generate", {k: _entry(k[:8]) for k in keys[start : start + 10]})
    files_before = cache.stats()["kinds"]["generate"]["files"]
    cache.add("generate", {keys[0]: _entry(keys[0][:8])})  # a duplicate entry: merged into one
    assert cache.compact("generate", at=4) > 0
    after = cache.stats()["kinds"]["generate"]
    assert after["files"] == 16 < files_before and after["entries"] == 300
    found = cache.lookup("generate", keys)
    assert len(found) == 300 and found[keys[42]] == _entry(keys[42][:8])
    assert not cache.warnings
