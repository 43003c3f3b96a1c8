"""The settings a resume compares are the ones the output fingerprint holds, from one list."""

from __future__ import annotations

import json

import pytest

from shardwise.tasks.config.job import JobConfig
from shardwise.tasks.errors import ConfigError
from shardwise.tasks.output.resume import check_output_compatible


def test_refusal_names_only_settings_that_change_output_values(tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    before = JobConfig(input=str(tmp_path / "in"), output=str(output), task="generate")
    (output / "_manifest.json").write_text(
        json.dumps(
            {
                "config": before.public_dict(),
                "config_fingerprint": before.output_fingerprint(),
                "models": before.models_section(),
            }
        )
    )
    # the KV cache's form and the compile switch change speed, not values: same fingerprint, no refusal
    faster = JobConfig(input=str(tmp_path / "in"), output=str(output), task="generate", generate={"cache": "static"})
    assert faster.output_fingerprint() == before.output_fingerprint()
    assert check_output_compatible(faster) is False
    changed = JobConfig(
        input=str(tmp_path / "in"),
        output=str(output),
        task="generate",
        generate={"cache": "static", "max_new_tokens": 9},
    )
    with pytest.raises(ConfigError) as refused:
        check_output_compatible(changed)
    assert "(generate.max_new_tokens changed)" in str(refused.value)
