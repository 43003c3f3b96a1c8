"""Quality profiles merge exactly from per-shard figures, checks compare the right numbers, and the
output directory counts the gate's files as its own."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from shardwise.tasks.config.quality import QualityConfig
from shardwise.tasks.quality.baseline import find_baseline
from shardwise.tasks.quality.gate import run_checks
from shardwise.tasks.records.profile import merge_profiles, shard_profile
from shardwise.tasks.storage.output_dir import OutputDir


def enriched(
    texts: list[str | None], tokens: list[int | None], reasons: list[str | None], vectors: list[list[float]]
) -> pa.Table:
    return pa.table(
        {
            "id": [str(i) for i in range(len(texts))],
            "generated_text": pa.array(texts, pa.string()),
            "n_prompt_tokens": pa.array([10 if t is not None else None for t in texts], pa.int32()),
            "n_generated_tokens": pa.array(tokens, pa.int32()),
            "finish_reason": pa.array(reasons, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(sum(vectors, []), pa.float32()), 2),
            "error": pa.array([None if t is not None else "text is null" for t in texts], pa.string()),
        }
    )


def test_profile_of_shards_equals_profile_of_all_rows():
    patterns = ("I cannot",)
    a = enriched(["Fine.", "  ", None], [3, 1, None], ["stop", "stop", None], [[1, 0], [1, 0], [0, 0]])
    b = enriched(["i cannot help", "Long answer"], [5, 8], ["stop", "length"], [[0, 1], [0, 1]])
    merged = merge_profiles([shard_profile(a, patterns), shard_profile(b, patterns)])
    whole = merge_profiles([shard_profile(pa.concat_tables([a, b]), patterns)])
    assert {**merged, "shards_profiled": 1} == whole
    assert merged["rows"] == 5 and merged["error_rate"] == pytest.approx(0.2)
    assert merged["answered_rows"] == 4
    assert merged["empty_rate"] == merged["refusal_rate"] == merged["length_rate"] == pytest.approx(0.25)
    assert merged["generated_tokens"]["mean"] == pytest.approx(17 / 4)
    assert (merged["generated_tokens"]["p50"], merged["generated_tokens"]["p95"]) == (3.0, 8.0)
    assert merged["embedding"]["rows"] == 4  # the all-zero vector of the error row is left out
    assert merged["embedding"]["centroid"] == pytest.approx([0.5, 0.5])
    assert merge_profiles([shard_profile(a, patterns), None])["shards_without_profile"] == 1


def test_checks_compare_with_the_baseline_and_can_be_switched_off():
    base = {
        "rows": 100,
        "length_rate": 0.1,
        "generated_tokens": {"mean": 20.0},
        "embedding": {"centroid": [1.0, 0.0]},
        "canaries": {"answers": {"c1": "Same.", "c2": "Before."}},
    }
    now = {
        "rows": 100,
        "error_rate": 0.2,
        "length_rate": 0.9,
        "generated_tokens": {"mean": 3.0},
        "embedding": {"centroid": [0.0, 1.0]},
        "canaries": {"answers": {"c1": "Same.", "c2": "After."}},
    }
    checks = {c.name: c for c in run_checks(QualityConfig(max_error_rate=0.1), now, base)}
    assert not checks["error_rate"].passed
    assert checks["length_rate_increase"].value == pytest.approx(0.8) and not checks["length_rate_increase"].passed
    assert checks["generated_tokens_change"].value == pytest.approx(0.85)
    assert checks["centroid_drift"].value == pytest.approx(1.0) and not checks["centroid_drift"].passed
    assert checks["canaries_changed"].value == 1 and "c2" in checks["canaries_changed"].note
    assert run_checks(QualityConfig(max_error_rate=0.1), base | {"error_rate": 0.0}, base) and all(
        c.passed for c in run_checks(QualityConfig(max_error_rate=0.1), base | {"error_rate": 0.0}, base)
    )
    off = QualityConfig(
        max_length_rate_increase=None,
        max_generated_tokens_change=None,
        max_centroid_drift=None,
        max_canary_changes=None,
    )
    assert run_checks(off, now, base) == []  # ceilings are off by default, the rest switched off here
    assert {c.name for c in run_checks(QualityConfig(), now, None)} == set()  # no baseline: nothing to compare
    few = {c.name for c in run_checks(QualityConfig(), now | {"rows": 99}, base)}
    assert few == {"canaries_changed"}  # too few rows to compare figures; canaries compare row by row


def test_baseline_is_the_latest_earlier_published_partition(tmp_path):
    from shardwise.tasks.config.loading import validate_config
    from shardwise.tasks.schedule.partitions import dated

    cfg = validate_config({"input": str(tmp_path / "raw"), "output": str(tmp_path / "out"), "task": "embed"})
    for date, published in [("2026-11-01", True), ("2026-11-02", True), ("2026-11-03", False), ("2026-11-05", True)]:
        part = tmp_path / "out" / f"dt={date}"
        part.mkdir(parents=True)
        (part / "_quality.json").write_text(json.dumps({"rows": int(date[-1])}))
        if published:
            (part / "_SUCCESS").write_text("{}")
    uri, profile = find_baseline(dated(cfg, "2026-11-04"))
    assert uri == str(tmp_path / "out" / "dt=2026-11-02") and profile == {"rows": 2}  # 11-03 is held, 11-05 later
    assert find_baseline(dated(cfg, "2026-11-01")) == (None, None)
    assert find_baseline(cfg) == (None, None)  # an ad-hoc run without --baseline


def test_a_hold_names_what_changed_since_the_baseline():
    from shardwise.tasks.output.verdict import CheckResult, QualityVerdict

    before = {"context": {"settings_fingerprint": "a", "prompt_hash": "p1", "models": {"generate": "m"}}}
    now = {"context": {"settings_fingerprint": "b", "prompt_hash": "p2", "models": {"generate": "m"}}}
    verdict = QualityVerdict("held", now, [CheckResult("canaries_changed", 2.0, 0, 0.0, passed=False)], "base", before)
    hold = verdict.hold_document("out", {"mlflow_run_id": "r"})
    assert hold["changed_since_baseline"] == ["prompt_hash", "settings_fingerprint"]
    assert hold["failed_checks"][0]["check"] == "canaries_changed" and hold["baseline"] == "base"
    assert verdict.message().startswith("quality checks failed: canaries_changed 2 > 0 (baseline base)")


def test_the_gates_files_are_not_foreign(tmp_path):
    for name in ("_quality.json", "_QUALITY_HOLD", "notes.txt"):
        (tmp_path / name).write_text("{}")
    assert OutputDir(str(tmp_path)).foreign_files() == ["notes.txt"]


@pytest.mark.parametrize(
    "setting, needle",
    [
        ("quality.gate=maybe", "quality.gate"),
        ("quality.max_length_rate_increase=1.5", "quality.max_length_rate_increase"),
        ("quality.max_centroid_drift=-0.1", "quality.max_centroid_drift"),
        ("quality.max_canary_changes=some", "quality.max_canary_changes"),
        ("quality.refusal_patterns=['I cannot', ' ']", "quality.refusal_patterns"),
        ("quality.treshold=0.1", "quality.treshold"),
    ],
)
def test_bad_quality_settings_are_config_errors(setting, needle):
    from shardwise.tasks.config.loading import build_config
    from shardwise.tasks.errors import ConfigError

    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        build_config(None, {"input": "in", "output": "out"}, [setting])


def test_a_baseline_without_a_profile_is_a_config_error(tmp_path):
    from shardwise.tasks.config.loading import validate_config
    from shardwise.tasks.errors import ConfigError
    from shardwise.tasks.quality.gate import check_quality_settings

    cfg = validate_config({"input": "in", "output": "out", "quality": {"baseline": str(tmp_path)}})
    with pytest.raises(ConfigError, match="quality.baseline: .* has no _quality.json"):
        check_quality_settings(cfg)
