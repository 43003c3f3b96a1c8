from pathlib import Path

import pytest

from tasks.errors import ConfigError
from tasks.job_config import JobConfig, build_config, parse_set_options

REPO = Path(__file__).resolve().parents[2]


def test_yaml_then_flags_then_set_precedence(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input: a.parquet\noutput: out\ngenerate:\n  max_new_tokens: 10\n  temperature: 0.5\n")
    cfg = build_config(path, {"generate": {"max_new_tokens": 20}}, ["generate.max_new_tokens=30", "task=embed"])
    assert cfg.generate.max_new_tokens == 30
    assert cfg.generate.temperature == 0.5  # untouched keys survive the merge
    assert cfg.task == "embed"


def test_set_values_are_parsed_as_yaml():
    assert parse_set_options(["a.b=3", "c=true", "d=hello world", "e=[1, 2]"]) == {
        "a": {"b": 3}, "c": True, "d": "hello world", "e": [1, 2]
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


def test_output_fingerprint_tracks_values_not_batching():
    base = JobConfig(input="a", output="b")
    assert base.output_fingerprint() == JobConfig(input="other", output="b").output_fingerprint()
    batching = JobConfig(input="a", output="b", generate={"token_budget": 999, "max_batch_size": 3})
    assert batching.output_fingerprint() == base.output_fingerprint()
    prompt = JobConfig(input="a", output="b", generate={"prompt_template": "Summarise: {text}"})
    assert prompt.output_fingerprint() != base.output_fingerprint()
    model = JobConfig(input="a", output="b", embed={"model": "some/other-model"})
    assert model.output_fingerprint() != base.output_fingerprint()


def test_output_fingerprint_names_the_engine_that_runs():
    base = JobConfig(input="a", output="b", device="cpu")
    # On a CPU, auto is the hf engine: same fingerprint as hf, and as outputs written before engines.
    assert JobConfig(input="a", output="b", device="cpu", generate={"engine": "hf"}).output_fingerprint() \
        == base.output_fingerprint()
    vllm = JobConfig(input="a", output="b", device="cpu", generate={"engine": "vllm"})
    assert vllm.output_fingerprint() != base.output_fingerprint()
    # GPU placement does not change values; the context length does (it bounds truncation).
    placed = JobConfig(input="a", output="b", device="cpu",
                       generate={"engine": "vllm", "tensor_parallel_size": 4, "gpu_memory_utilization": 0.5})
    assert placed.output_fingerprint() == vllm.output_fingerprint()
    shorter = JobConfig(input="a", output="b", device="cpu", generate={"engine": "vllm", "max_model_len": 512})
    assert shorter.output_fingerprint() != vllm.output_fingerprint()
    # Embedding-only jobs do not depend on the generation engine.
    embed = {"input": "a", "output": "b", "task": "embed"}
    assert JobConfig(**embed, generate={"engine": "vllm"}).output_fingerprint() == JobConfig(**embed).output_fingerprint()


def test_default_template_is_the_text_column():
    assert JobConfig(input="a", output="b", text_column="body").template == "{body}"
