"""The one redaction function: what it hides, and what it leaves alone."""

from __future__ import annotations

import logging

import pytest

from shardwise.tasks.errors import StorageError
from shardwise.tasks.redaction import RedactingFilter, redact_text, redact_uri, redact_values

SECRET = "s3cr3t-CANARY"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (f"https://user:{SECRET}@host.example/data/a.parquet", "https://REDACTED@host.example/data/a.parquet"),
        (f"sftp://user:{SECRET}@10.0.0.1:2222/in/", "sftp://REDACTED@10.0.0.1:2222/in/"),
        (f"http://{SECRET}@host/x", "http://REDACTED@host/x"),  # a token as the user name
        (
            "https://b.s3.amazonaws.com/k.parquet?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            f"&X-Amz-Credential=AKIA{SECRET}%2F20261201&X-Amz-Date=20261201T000000Z&X-Amz-Expires=3600"
            f"&X-Amz-SignedHeaders=host&X-Amz-Security-Token={SECRET}&X-Amz-Signature={SECRET}",
            "https://b.s3.amazonaws.com/k.parquet?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            "&X-Amz-Credential=REDACTED&X-Amz-Date=20261201T000000Z&X-Amz-Expires=3600"
            "&X-Amz-SignedHeaders=REDACTED&X-Amz-Security-Token=REDACTED&X-Amz-Signature=REDACTED",
        ),
        (
            f"https://acct.blob.core.windows.net/c/f.parquet?sv=2022&sp=r&sig={SECRET}",
            "https://acct.blob.core.windows.net/c/f.parquet?sv=2022&sp=r&sig=REDACTED",
        ),
        (f"https://api.example/f?token={SECRET}&page=2", "https://api.example/f?token=REDACTED&page=2"),
        (
            f"https://storage.googleapis.com/b/o?X-Goog-Signature={SECRET}",
            "https://storage.googleapis.com/b/o?X-Goog-Signature=REDACTED",
        ),
        ("s3://bucket/prefix/part.parquet", "s3://bucket/prefix/part.parquet"),
        ("sqlite:////var/lib/mlflow.db", "sqlite:////var/lib/mlflow.db"),
        (f"postgresql://mlflow:{SECRET}@db:5432/mlflow", "postgresql://REDACTED@db:5432/mlflow"),
        (f"http://u:{SECRET}@h?token={SECRET}#frag", "http://REDACTED@h?token=REDACTED#frag"),
        ("/data/odd?name@with-chars.parquet", "/data/odd?name@with-chars.parquet"),  # a path, not a URI
    ],
)
def test_redact_uri(uri, expected):
    assert redact_uri(uri) == expected
    assert SECRET not in redact_uri(uri)


def test_redact_text_finds_uris_inside_messages():
    message = (
        f"cannot open https://u:{SECRET}@h/a.parquet: 401, url='https://u:{SECRET}@h/a.parquet'; "
        f"retry with ?sig={SECRET}"
    )
    redacted = redact_text(message)
    assert SECRET not in redacted
    assert redacted.startswith("cannot open https://REDACTED@h/a.parquet: 401")


def test_redact_values_walks_nested_structures():
    data = {"input": f"https://u:{SECRET}@h/x", "n": 3, "files": [{"uri": f"sftp://a:{SECRET}@h/y"}]}
    redacted = redact_values(data)
    assert SECRET not in repr(redacted)
    assert redacted["n"] == 3 and redacted["files"][0]["uri"] == "sftp://REDACTED@h/y"


def test_shardwise_errors_never_carry_a_credential():
    err = StorageError(f"cannot open https://u:{SECRET}@h/a.parquet: refused")
    assert SECRET not in str(err) and "https://REDACTED@h/a.parquet" in str(err)


def test_log_filter_redacts_message_arguments_and_tracebacks():
    try:
        raise ValueError(f"boom at https://u:{SECRET}@h/a")
    except ValueError:
        record = logging.LogRecord(
            "x",
            logging.ERROR,
            __file__,
            1,
            "failed %s",
            (f"https://u:{SECRET}@h/b",),
            exc_info=__import__("sys").exc_info(),
        )
    RedactingFilter().filter(record)
    assert SECRET not in logging.Formatter().format(record)
