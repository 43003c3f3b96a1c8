"""Settings of a serving endpoint: an OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp, a
hosted API) that a job's generation or embedding runs on with ``engine: openai``, and the endpoints
``shardwise plan --compare`` prices the job on.

The API key is never a setting: ``api_key_env`` names the environment variable that holds it, so the
key stays out of the config, and so out of Prefect parameters, MLflow, manifests and footers.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Settings of the endpoint that change how requests are sent, never what comes back.
ENDPOINT_KNOBS = ("base_url", "api_key_env", "max_concurrency", "request_timeout_s", "max_retries")


def check_base_url(value: str | None) -> str | None:
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, got {value!r}")
    return value.rstrip("/")


def check_env_name(value: str | None) -> str | None:
    if value is not None and not _ENV_NAME.match(value):
        raise ValueError(
            f"api_key_env names an environment variable (e.g. OPENAI_API_KEY), not a key: got a value of "
            f"{len(value)} characters"
        )
    return value


class EndpointSettings(BaseModel):
    """How a job's section (``generate`` or ``embed``) reaches its endpoint with ``engine: openai``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str | None = Field(
        default=None, description="engine openai: the server's OpenAI API root, e.g. http://127.0.0.1:8000/v1"
    )
    served_model: str | None = Field(
        default=None,
        min_length=1,
        description="engine openai: the model's name on the server; null: model, if the server lists it, "
        "else the one model it serves",
    )
    api_key_env: str | None = Field(
        default=None, description="engine openai: the environment variable holding the API key (never the key)"
    )
    max_concurrency: int = Field(default=8, ge=1, le=1024, description="engine openai: requests in flight per worker")
    request_timeout_s: float = Field(default=120.0, gt=0, description="engine openai: one request's time limit")
    max_retries: int = Field(
        default=6,
        ge=0,
        le=100,
        description="engine openai: retries of one row on 429, 5xx, timeouts and dropped connections",
    )

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        return check_base_url(value)

    @field_validator("api_key_env")
    @classmethod
    def _api_key_env(cls, value: str | None) -> str | None:
        return check_env_name(value)


def endpoint_host(base_url: str) -> str:
    """``host:port`` of a base URL, without user info: what records may say of an endpoint."""
    parts = urlsplit(base_url)
    return parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else ""


class EndpointOffer(BaseModel):
    """An endpoint ``plan --compare`` prices this job on: its per-token prices and throughput."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    base_url: str | None = Field(default=None, description="where it is served (shown; also finds its past runs)")
    price_per_million_input_tokens: float = Field(ge=0)
    price_per_million_output_tokens: float = Field(ge=0)
    batch_discount: float = Field(default=0.0, ge=0.0, lt=1.0, description="share taken off the token prices")
    tokens_per_s: float | None = Field(
        default=None,
        gt=0,
        description="expected throughput (generated tok/s, or embedded tok/s for embed-only jobs); null: "
        "measured by earlier runs on it, else a guess",
    )

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        return check_base_url(value)


def token_cost(
    input_tokens: float, output_tokens: float, per_million_in: float, per_million_out: float, discount: float = 0.0
) -> float:
    """The price of tokens at per-million prices, less a batch discount."""
    return (input_tokens * per_million_in + output_tokens * per_million_out) / 1e6 * (1.0 - discount)
