"""Credentials out of everything shardwise shows or stores.

A URI can carry a secret: ``https://user:password@host/...``, ``sftp://user:password@host/...``, a
pre-signed query string (``X-Amz-Signature=``, ``X-Amz-Credential=``, ``sig=``, ``token=``), an
``MLFLOW_TRACKING_URI`` with ``user:password@``. Such a URI must still reach the code that opens it,
but every copy meant for people or for records (Prefect parameters, logs and artifacts; MLflow
params, tags and datasets; the manifest; part footers; CLI output) goes through :func:`redact_uri`
or :func:`redact_text` first. ``user:password@`` becomes ``REDACTED@`` and a sensitive query
parameter keeps its name but not its value.
"""

from __future__ import annotations

import logging
import re
from typing import Any

REDACTED = "REDACTED"

# Query parameter names that carry secrets: AWS (X-Amz-Signature, X-Amz-Credential,
# X-Amz-Security-Token), GCS (X-Goog-Signature, X-Goog-Credential), Azure SAS (sig), OAuth and
# ad hoc APIs (token, access_token, api_key, password, auth).
_SECRET_NAME = r"[\w.-]*(?:sig|signature|token|credential|secret|password|passwd|pwd|auth|key|session|security)[\w.-]*"
_QUERY_SECRET = re.compile(rf"(?i)(^|[?&;])({_SECRET_NAME})=([^&;#\s'\"<>]*)")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")


def _redact_query(query: str) -> str:
    return _QUERY_SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}={REDACTED}", query)


def redact_uri(uri: str) -> str:
    """``uri`` with its user info and secret query values replaced by ``REDACTED``; a plain path
    (no ``scheme://``) is returned unchanged, since ``?`` and ``@`` are ordinary characters there.
    Everything else is kept byte for byte (``sqlite:////abs/path`` stays as it is)."""
    if "://" not in uri:
        return uri
    scheme, rest = uri.split("://", 1)
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        authority = f"{REDACTED}@{authority.rsplit('@', 1)[1]}"
    path, question, query = tail.partition("?")
    if question:
        query, hash_sign, fragment = query.partition("#")
        tail = f"{path}?{_redact_query(query)}{hash_sign}{fragment}"
    return f"{scheme}://{authority}{tail}"


def redact_text(text: str) -> str:
    """Every URI inside free text (an error message, a log line) redacted, and any stray
    ``?signature=...`` style parameter outside a URI as well."""
    text = _URI.sub(lambda m: redact_uri(m.group(0)), text)
    return _QUERY_SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}={REDACTED}", text)


def redact_values(value: Any) -> Any:
    """A JSON-like structure with every string in it passed through :func:`redact_text`."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {key: redact_values(inner) for key, inner in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_values(inner) for inner in value]
    return value


class RedactingFilter(logging.Filter):
    """A handler filter: the formatted message and traceback of each record, redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        return True


def install_log_redaction() -> None:
    """Put :class:`RedactingFilter` on every logging handler of this process (Prefect's console
    and API handlers included). Idempotent; call it after Prefect has set up its logging."""
    handlers = list(logging.getLogger().handlers)
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            handlers += logger.handlers
    for handler in handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
