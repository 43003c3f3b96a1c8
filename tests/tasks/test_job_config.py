import time
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


def test_default_template_is_the_text_column():
    assert JobConfig(input="a", output="b", text_column="body").template == "{body}"
