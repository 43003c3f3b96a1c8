"""The sections of a job config: ``generate``, ``embed`` and ``ray`` (see :mod:`shardwise.tasks.config.job`)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shardwise.tasks.config.endpoint import EndpointSettings

DEFAULT_GEN_MODEL = "bundled:smollm2-135m-instruct"
DEFAULT_EMBED_MODEL = "bundled:all-minilm-l6-v2"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GenerateConfig(EndpointSettings):
    """Text generation: an instruct model over a prompt template of row columns (the endpoint
    settings apply with ``engine: openai``)."""

    model: str = DEFAULT_GEN_MODEL
    prompt_template: str | None = Field(
        default=None, description="Python format string over row columns; default: the text column alone"
    )
    system_prompt: str | None = None
    max_new_tokens: int = Field(default=64, ge=1, le=32768)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    max_input_tokens: int | None = Field(default=None, ge=8)
    ignore_eos: bool = Field(default=False, description="always generate max_new_tokens (benchmarks)")
    token_budget: int | None = Field(
        default=None, ge=64, description="padded tokens per batch; null: sized from free GPU memory, 16384 on CPU"
    )
    max_batch_size: int | None = Field(default=None, ge=1, description="rows per batch; null: 256 on GPU, 64 on CPU")
    cache: Literal["dynamic", "static"] = Field(default="dynamic", description="KV cache: static preallocates")
    compile: bool = Field(default=False, description="torch.compile the decode step (needs cache: static; GPU)")
    attn_implementation: str | None = Field(
        default=None, min_length=1, description="sdpa, eager, flash_attention_2...; null: transformers' choice"
    )
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra chat template variables, e.g. {enable_thinking: false}"
    )
    chat_date: dt.date | None = Field(
        default=None, description="the date a chat template prints; null: the partition date, else the run's start"
    )
    engine: Literal["auto", "hf", "vllm", "openai"] = Field(
        default="auto",
        description="hf (transformers), vllm, or openai (an OpenAI-compatible server at base_url); "
        "auto: vllm when CUDA and a CUDA vLLM are there, else hf",
    )
    tensor_parallel_size: int = Field(default=1, ge=1, description="vllm: GPUs per model (and per worker)")
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0, description="vllm: share of GPU memory it takes")
    max_model_len: int | None = Field(default=None, ge=16, description="vllm: context length (prompt + answer)")
    enforce_eager: bool | None = Field(
        default=None,
        description="vllm: no torch.compile or CUDA graphs (starts far sooner, decodes a little slower); "
        "null: on CPU only",
    )
    output_schema: dict[str, Any] | None = Field(
        default=None,
        description="JSON Schema every answer follows (inline, or a path to a .json file); adds the typed column generated",
    )
    repair_frequency_penalty: float = Field(
        default=1.0,
        ge=0.0,
        le=2.0,
        description="with output_schema: a row whose answer max_new_tokens cut is generated once more with this "
        "frequency_penalty (breaks a small model's token loops); 0: off",
    )

    @field_validator("output_schema", mode="before")
    @classmethod
    def _load_output_schema(cls, value: Any) -> dict[str, Any] | None:
        # A path or JSON text is replaced by the schema itself, so the fingerprint, the manifest
        # and MLflow hold what constrained the run, not where it was read from.
        from shardwise.tasks.config.output_schema import load_output_schema

        return None if value is None else load_output_schema(value)

    @model_validator(mode="after")
    def _endpoint_needs_base_url(self) -> GenerateConfig:
        if self.engine == "openai" and self.base_url is None:
            raise ValueError("engine: openai needs base_url, the server's OpenAI API root (http://host:port/v1)")
        return self

    @model_validator(mode="after")
    def _compile_needs_static_cache(self) -> GenerateConfig:
        if self.compile and self.cache != "static":
            raise ValueError("compile: true needs cache: static (torch.compile wants fixed cache shapes)")
        return self

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs_are_not_reserved(cls, value: dict[str, Any]) -> dict[str, Any]:
        from shardwise.gpu_runtime.prompts import RESERVED_TEMPLATE_KWARGS

        if reserved := sorted(RESERVED_TEMPLATE_KWARGS & value.keys()):
            raise ValueError(f"{', '.join(reserved)} cannot be set here (the engine sets it)")
        return value


class EmbedConfig(EndpointSettings):
    """Embeddings of the text column (the endpoint settings apply with ``engine: openai``)."""

    model: str = DEFAULT_EMBED_MODEL
    engine: Literal["hf", "openai"] = Field(
        default="hf", description="hf (sentence-transformers), or openai (an OpenAI-compatible server at base_url)"
    )
    prompt_name: str | None = Field(
        default=None, min_length=1, description="a prompt of the model's (e.g. query); null: its default prompt, if any"
    )
    token_budget: int = Field(default=16384, ge=64)
    max_batch_size: int | None = Field(default=None, ge=1, description="rows per batch; null: 64 on GPU, 32 on CPU")

    @model_validator(mode="after")
    def _endpoint_settings(self) -> EmbedConfig:
        if self.engine == "openai" and self.base_url is None:
            raise ValueError("engine: openai needs base_url, the server's OpenAI API root (http://host:port/v1)")
        if self.engine == "openai" and self.prompt_name is not None:
            raise ValueError("prompt_name is a prompt of a local sentence-transformers model: not with engine: openai")
        return self


class RayConfig(_Strict):
    """Where shard tasks go with ``runner: ray``, and what each one asks Ray for."""

    address: str | None = Field(
        default=None, description="ray://host:10001 or host:6379 of a running cluster; none: a local cluster"
    )
    num_gpus: float | None = Field(default=None, ge=0, description="per shard; default: 1 if the cluster has GPUs")
    num_cpus: float | None = Field(default=None, ge=0, description="per shard; default: 1 when no GPU is asked for")
