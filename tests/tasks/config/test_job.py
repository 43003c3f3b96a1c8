import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.config.loading import build_config, parse_set_options
from shardwise.tasks.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]


def test_yaml_then_flags_then_set_precedence(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input: a.parquet\noutput: out\ngenerate:\n  max_new_tokens: 10\n  temperature: 0.5\n")
    cfg = build_config(path, {"generate": {"max_new_tokens": 20}}, ["generate.max_new_tokens=30", "task=embed"])
    assert cfg.generate.max_new_tokens == 30
    assert cfg.generate.temperature == 0.5  # untouched keys survive the merge
    assert cfg.task == "embed"


def test_set_values_are_parsed_as_yaml():
    assert parse_set_options(["a.b=3", "c=true", "d=hello world", "e=[1, 2]"]) == {
        "a": {"b": 3},
        "c": True,
        "d": "hello world",
        "e": [1, 2],
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_set_options(["nonsense"])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"input": "a", "output": "b", "task": "translate"}, "task"),
        ({"input": "a", "output": "b", "generate": {"max_new_tokens": 0}}, "generate.max_new_tokens"),
        ({"input": "a", "output": "b", "unknown_key": 1}, "unknown_key"),
        ({"input": "a", "output": "b", "generate": {"prompt_template": "no fields"}}, "prompt_template"),
        ({"output": "b"}, "input"),
        ({"input": "a", "output": "b", "generate": {"compile": True}}, "compile: true needs cache: static"),
        ({"input": "a", "output": "b", "generate": {"cache": "paged"}}, "generate.cache"),
        ({"input": "a", "output": "b", "runner": "spark"}, "runner"),
        ({"input": "a", "output": "b", "workers": 0}, "workers"),
        (
            {"input": "a", "output": "b", "generate": {"chat_template_kwargs": {"add_generation_prompt": False}}},
            "generate.chat_template_kwargs: add_generation_prompt cannot be set here",
        ),
        ({"input": "a", "output": "b", "generate": {"chat_date": "yesterday"}}, "generate.chat_date"),
        ({"input": "a", "output": "b", "embed": {"prompt_name": ""}}, "embed.prompt_name"),
    ],
)
def test_invalid_config_names_the_key(tmp_path, data, message):
    import yaml

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        build_config(path)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_shipped_job_configs_validate():
    for path in sorted((REPO / "conf" / "jobs").glob("*.yaml")):
        cfg = build_config(path, {"input": "x", "output": "y"})
        assert cfg.name


def test_public_dict_never_contains_storage_options():
    cfg = JobConfig(input="s3://a", output="s3://b", storage_options={"secret": "hunter2"})
    assert "storage_options" not in cfg.public_dict()
    assert "hunter2" not in str(cfg.public_dict())
    assert "hunter2" not in repr(cfg)


def test_settings_fingerprint_tracks_values_not_batching():
    base = JobConfig(input="a", output="b")
    assert base.settings_fingerprint() == JobConfig(input="other", output="b").settings_fingerprint()
    batching = JobConfig(input="a", output="b", generate={"token_budget": 999, "max_batch_size": 3})
    assert batching.settings_fingerprint() == base.settings_fingerprint()
    prompt = JobConfig(input="a", output="b", generate={"prompt_template": "Summarise: {text}"})
    assert prompt.settings_fingerprint() != base.settings_fingerprint()
    model = JobConfig(input="a", output="b", embed={"model": "some/other-model"})
    assert model.settings_fingerprint() != base.settings_fingerprint()
    assert batching.output_fingerprint() == base.output_fingerprint()
    assert prompt.output_fingerprint() != base.output_fingerprint()


def fake_checkpoint(directory, weights: bytes):
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text("{}")
    (directory / "model.safetensors").write_bytes(weights)
    return directory


def test_output_fingerprint_follows_the_weights_a_local_model_directory_holds(tmp_path):
    model = fake_checkpoint(tmp_path / "model", b"weights one")
    cfg = {"input": "a", "output": "b", "task": "embed", "embed": {"model": str(model)}}
    first = JobConfig(**cfg)
    fingerprint, identity = first.output_fingerprint(), first.model_identities()["embed"]
    assert identity.startswith("local:")
    assert JobConfig(**cfg).output_fingerprint() == fingerprint  # same weights, same fingerprint
    time.sleep(0.05)  # past the file system's timestamp granularity, as any real replacement is
    fake_checkpoint(model, b"weights two")  # same size, other bytes
    second = JobConfig(**cfg)
    assert second.output_fingerprint() != fingerprint
    assert second.settings_fingerprint() == first.settings_fingerprint()
    (change,) = second.model_changes(first.models_section())
    assert change.startswith(f"embed.model weights of {model} (local:")
    assert first.output_fingerprint() == fingerprint  # one config object resolves once
    (older,) = second.model_changes({"embed": {"spec": str(model)}})  # a manifest from before identities
    assert "(not recorded -> local:" in older
    assert second.model_changes(second.models_section()) == []


def test_dummy_and_bundled_specs_have_an_identity():
    cfg = JobConfig(input="a", output="b", generate={"model": "dummy:llama-135m"})
    identities = cfg.model_identities()
    assert identities["generate"].startswith("dummy:dummy-llama-135m")
    assert identities["embed"].startswith("bundled:") and len(identities["embed"]) == len("bundled:") + 64


def test_output_fingerprint_names_the_engine_that_runs():
    base = JobConfig(input="a", output="b", device="cpu")
    # On a CPU, auto is the hf engine: same fingerprint as hf, and as outputs written before engines.
    assert (
        JobConfig(input="a", output="b", device="cpu", generate={"engine": "hf"}).output_fingerprint()
        == base.output_fingerprint()
    )
    vllm = JobConfig(input="a", output="b", device="cpu", generate={"engine": "vllm"})
    assert vllm.output_fingerprint() != base.output_fingerprint()
    # GPU placement does not change values; the context length does (it bounds truncation).
    placed = JobConfig(
        input="a",
        output="b",
        device="cpu",
        generate={"engine": "vllm", "tensor_parallel_size": 4, "gpu_memory_utilization": 0.5},
    )
    assert placed.output_fingerprint() == vllm.output_fingerprint()
    for eager in (True, False):  # compiled or not, the same greedy values: an execution knob
        compiled = JobConfig(input="a", output="b", device="cpu", generate={"engine": "vllm", "enforce_eager": eager})
        assert compiled.output_fingerprint() == vllm.output_fingerprint()
    shorter = JobConfig(input="a", output="b", device="cpu", generate={"engine": "vllm", "max_model_len": 512})
    assert shorter.output_fingerprint() != vllm.output_fingerprint()
    # Embedding-only jobs do not depend on the generation engine.
    embed = {"input": "a", "output": "b", "task": "embed"}
    assert (
        JobConfig(**embed, generate={"engine": "vllm"}).output_fingerprint() == JobConfig(**embed).output_fingerprint()
    )


def test_default_template_is_the_text_column():
    assert JobConfig(input="a", output="b", text_column="body").template == "{body}"


def test_fingerprint_tracks_template_variables_date_attention_and_prompt_not_sizes():
    base = JobConfig(input="a", output="b")
    for changed in (
        {"generate": {"chat_template_kwargs": {"enable_thinking": False}}},
        {"generate": {"chat_date": "2026-11-30"}},
        {"generate": {"attn_implementation": "eager"}},
        {"embed": {"prompt_name": "query"}},
    ):
        assert JobConfig(input="a", output="b", **changed).output_fingerprint() != base.output_fingerprint(), changed
    sized = JobConfig(input="a", output="b", generate={"token_budget": 4096, "max_batch_size": 8})
    assert sized.output_fingerprint() == base.output_fingerprint()
    assert base.generate.token_budget is None and base.generate.max_batch_size is None  # sized by the engine


def test_a_partition_prints_its_own_date_in_chat_templates():
    import datetime as dt

    from shardwise.tasks.schedule.partitions import dated

    cfg = dated(JobConfig(input="in", output="out"), "2026-11-30")
    assert cfg.generate.chat_date == dt.date(2026, 11, 30)
    pinned = dated(JobConfig(input="in", output="out", generate={"chat_date": "2025-01-01"}), "2026-11-30")
    assert pinned.generate.chat_date == dt.date(2025, 1, 1)


@pytest.mark.parametrize(
    "settings, message",
    [
        (["shards_in_flight=0"], "shards_in_flight: Input should be greater than or equal to 1"),
        (["shards_in_flight=2", "workers=2"], "applies to one in-process worker"),
        (["shards_in_flight=2", "runner=ray"], "applies to one in-process worker"),
    ],
)
def test_shards_in_flight_is_checked(settings, message):
    with pytest.raises(ConfigError, match=message):
        build_config(overrides={"input": "in/", "output": "out/"}, set_options=settings)


def test_shards_in_flight_does_not_change_the_output_fingerprint():
    one, two = (
        JobConfig(input="in/", output="out/", task="embed", embed={"model": "dummy:bert-tiny"}, shards_in_flight=n)
        for n in (1, 2)
    )
    assert one.output_fingerprint() == two.output_fingerprint()
    assert (
        one.settings_fingerprint()
        == JobConfig(
            input="in/", output="out/", task="embed", embed={"model": "dummy:bert-tiny"}
        ).settings_fingerprint()
    )


def test_the_repair_penalty_counts_for_structured_jobs_only():
    """repair_frequency_penalty acts on schema-constrained answers alone: it is in the fingerprint
    and the row cache's keys of a structured job, and leaves every other job's unchanged."""
    from shardwise.tasks.records.row_cache_keys import generation_context

    schema = {"type": "object", "properties": {"topic": {"type": "string"}}, "required": ["topic"]}

    def job(penalty: float, **generate) -> JobConfig:
        return JobConfig(
            input="a", output="b", device="cpu", generate={"repair_frequency_penalty": penalty, **generate}
        )

    assert job(1.0).output_fingerprint() == job(0.0).output_fingerprint()
    assert generation_context(job(1.0)) == generation_context(job(0.0))
    assert job(1.0, output_schema=schema).output_fingerprint() != job(0.0, output_schema=schema).output_fingerprint()
    assert generation_context(job(1.0, output_schema=schema)) != generation_context(job(0.0, output_schema=schema))
    with pytest.raises(ValidationError, match="repair_frequency_penalty"):
        job(2.5)
