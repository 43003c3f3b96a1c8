"""The endpoint settings of a job config: what they require, and what of them is in the fingerprint."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shardwise.tasks.config.job import JobConfig

ENDPOINT = {"engine": "openai", "base_url": "http://127.0.0.1:8000/v1"}


def job(**sections) -> JobConfig:
    return JobConfig(input="/in", output="/out", **sections)


def test_engine_openai_needs_a_base_url_and_api_key_env_names_a_variable():
    with pytest.raises(ValidationError, match="engine: openai needs base_url"):
        job(generate={"engine": "openai"})
    with pytest.raises(ValidationError, match="engine: openai needs base_url"):
        job(embed={"engine": "openai"})
    with pytest.raises(ValidationError, match="http\\(s\\) URL"):
        job(generate={**ENDPOINT, "base_url": "127.0.0.1:8000"})
    with pytest.raises(ValidationError, match="names an environment variable") as caught:
        job(generate={**ENDPOINT, "api_key_env": "sk-live-abc123"})
    assert "sk-live-abc123" not in str(caught.value).split("input_value")[0]
    with pytest.raises(ValidationError, match="prompt_name"):
        job(embed={**ENDPOINT, "prompt_name": "query"})


def test_the_fingerprint_holds_the_engine_and_served_model_not_how_requests_are_sent():
    base = job(generate=ENDPOINT)
    assert base.settings_fingerprint() != job().settings_fingerprint()
    assert base.model_identities()["generate"] == "openai:bundled:smollm2-135m-instruct"
    same = job(
        generate={
            **ENDPOINT,
            "base_url": "https://other-host:9000/v1",
            "api_key_env": "KEY",
            "max_concurrency": 64,
            "request_timeout_s": 5,
            "max_retries": 0,
        }
    )
    assert same.settings_fingerprint() == base.settings_fingerprint()
    other_model = job(generate={**ENDPOINT, "served_model": "qwen"})
    assert other_model.settings_fingerprint() != base.settings_fingerprint()
    assert other_model.model_identities()["generate"] == "openai:qwen"
    # Endpoint settings on a section that runs locally change nothing.
    assert (
        job(generate={"served_model": "x", "max_concurrency": 3}).settings_fingerprint() == job().settings_fingerprint()
    )
    assert job(embed=ENDPOINT).settings_fingerprint() != job().settings_fingerprint()


def test_endpoint_names_for_compare_differ():
    offer = {"name": "a", "price_per_million_input_tokens": 1, "price_per_million_output_tokens": 2}
    with pytest.raises(ValidationError, match="names must differ: a repeated"):
        job(endpoints=[offer, offer])
