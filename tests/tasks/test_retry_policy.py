"""Which failed task states Prefect retries: only failures another attempt can fix."""

from __future__ import annotations

import pytest
from prefect.states import Failed

from shardwise.gpu_runtime.errors import EngineError, ModelNotFoundError
from shardwise.tasks.errors import ConfigError, InputError, StorageError
from shardwise.tasks.retry_policy import retry_unless_bad_input


@pytest.mark.parametrize(
    "error", [ConfigError("bad flag"), InputError("bad row"), ModelNotFoundError("bundled:nope is not a bundled model")]
)
def test_failures_that_repeat_identically_are_not_retried(error):
    assert retry_unless_bad_input(None, None, Failed(data=error)) is False


@pytest.mark.parametrize(
    "error", [StorageError("s3 timed out"), EngineError("CUDA out of memory"), OSError("connection reset")]
)
def test_storage_and_engine_failures_are_retried(error):
    assert retry_unless_bad_input(None, None, Failed(data=error)) is True
