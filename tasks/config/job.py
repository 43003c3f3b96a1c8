"""The job config: one pydantic model, loaded from YAML (``conf/jobs/*.yaml``), CLI flags and ``--set``.

Precedence, lowest first: model defaults < YAML file < explicit CLI flags < ``--set key=value``.
``storage_options`` may carry credentials: it is excluded from :meth:`JobConfig.public_dict`, which
is what goes to Prefect parameters, MLflow and the manifest, with credentials in URIs redacted.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from shardwise.tasks.config.endpoint import ENDPOINT_KNOBS, EndpointOffer
from shardwise.tasks.config.paths import absolute_location
from shardwise.tasks.config.quality import QualityConfig
from shardwise.tasks.config.sections import (
    DEFAULT_EMBED_MODEL,
    DEFAULT_GEN_MODEL,
    EmbedConfig,
    GenerateConfig,
    RayConfig,
)

__all__ = ["DEFAULT_EMBED_MODEL", "DEFAULT_GEN_MODEL", "EmbedConfig", "GenerateConfig", "JobConfig", "RayConfig"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# What the output fingerprint covers: these top-level settings, less the execution knobs of the
# generate and embed sections (batching, the KV cache's form, GPU placement), which change speed
# and memory, never values. A resume's refusal names differences over the same lists.
FINGERPRINT_SETTINGS = ("task", "text_column", "id_column", "keep_columns", "generate", "embed")
EXECUTION_KNOBS = (
    "token_budget",
    "max_batch_size",
    "cache",
    "compile",
    "tensor_parallel_size",
    "gpu_memory_utilization",
    "enforce_eager",
)


class JobConfig(_Strict):
    """Everything one enrichment run needs; validated on construction."""

    name: str = Field(default="shardwise", min_length=1, description="MLflow experiment name")
    input: str = Field(min_length=1, description="Parquet file, directory, glob or any fsspec URI")
    output: str = Field(min_length=1, description="output directory URI")
    task: Literal["generate", "embed", "both"] = "both"
    text_column: str = "text"
    id_column: str = "id"
    keep_columns: Literal["all", "id"] = "all"
    rows_per_shard: int = Field(default=1024, ge=1)
    device: str = "auto"
    workers: int | None = Field(
        default=None, ge=1, description="worker processes, one per device; default: visible GPUs, 1 on CPU"
    )
    shards_in_flight: int | None = Field(
        default=None,
        ge=1,
        description="shards one in-process worker holds at once (one computes while another reads or writes); "
        "null: 2 where compute runs on a GPU or the job only generates with vLLM (one batch for both), else 1",
    )
    runner: Literal["local", "ray"] = Field(default="local", description="local processes, or a Ray cluster")
    ray: RayConfig = RayConfig()
    concurrency_tag: str | None = Field(
        default="gpu",
        description="Prefect tag on shard tasks, set while a concurrency limit for it exists (which then caps them across runs)",
    )
    shard_retries: int = Field(default=2, ge=0)
    shard_timeout_s: float | None = Field(
        default=3600, gt=0, description="a shard attempt running longer fails and is retried; null: no limit"
    )
    overwrite: bool = Field(default=False, description="replace an output written with another config")
    allow_empty: bool = Field(
        default=False,
        description="an input with no rows publishes an empty output (one zero-row part) instead of failing (exit 2)",
    )
    lease_timeout_s: float = Field(
        default=300, gt=0, description="a run's lease on its output, not renewed for this long, may be taken over"
    )
    device_type: str | None = Field(default=None, description="price-table key; default: detected")
    price_per_device_hour: float | None = Field(default=None, ge=0)
    price_per_million_input_tokens: float | None = Field(
        default=None, ge=0, description="engine openai: price of a million prompt (or embedded) tokens"
    )
    price_per_million_output_tokens: float | None = Field(
        default=None, ge=0, description="engine openai: price of a million generated tokens"
    )
    batch_discount: float = Field(default=0.0, ge=0.0, lt=1.0, description="engine openai: share off the token prices")
    endpoints: list[EndpointOffer] = Field(
        default_factory=list, description="endpoints `plan --compare` prices this job on, next to its own engine"
    )
    max_cost: float | None = Field(
        default=None, gt=0, description="refuse a run forecast to cost more; stop starting shards at it"
    )
    cache: str | None = Field(
        default=None,
        min_length=1,
        description="row cache URI (any fsspec URI, shareable): rows computed before with the same inputs are reused",
    )
    generate: GenerateConfig = GenerateConfig()
    embed: EmbedConfig = EmbedConfig()
    quality: QualityConfig = QualityConfig()
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)
    # spec -> identity of its weights, resolved once per config object (see model_identities)
    _identities: dict[str, str] = PrivateAttr(default_factory=dict)
    # the date chat templates print in this run and whether the template prints one (see run_chat_date)
    _run_date: dt.date | None = PrivateAttr(default=None)
    _prints_date: bool | None = PrivateAttr(default=None)

    @field_validator("input", "output", "cache")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        return absolute_location(value)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return value

    @model_validator(mode="after")
    def _shards_in_flight_in_process(self) -> JobConfig:
        # Worker processes and Ray workers each take one shard at a time: the setting would do nothing there.
        if (self.shards_in_flight or 1) > 1 and ((self.workers or 1) > 1 or self.runner == "ray"):
            raise ValueError("shards_in_flight applies to one in-process worker (workers: 1, runner: local)")
        return self

    @model_validator(mode="after")
    def _template_uses_columns(self) -> JobConfig:
        template = self.generate.prompt_template
        if self.runs_generation and template is not None:
            from shardwise.gpu_runtime.prompts import template_fields

            try:
                fields = template_fields(template)
            except ValueError as err:
                raise ValueError(f"prompt_template is not a valid format string: {err}") from None
            if not fields:
                raise ValueError("prompt_template uses no column: put e.g. {text} where the row text goes")
        return self

    @field_validator("endpoints")
    @classmethod
    def _endpoint_names_differ(cls, value: list[EndpointOffer]) -> list[EndpointOffer]:
        names = [offer.name for offer in value]
        if repeated := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"endpoint names must differ: {', '.join(repeated)} repeated")
        return value

    @property
    def runs_generation(self) -> bool:
        return self.task in ("generate", "both")

    @property
    def runs_embedding(self) -> bool:
        return self.task in ("embed", "both")

    def generation_engine(self) -> str:
        """The engine generation runs on: ``generate.engine``, with ``auto`` decided for this machine."""
        if self.generate.engine != "auto":
            return self.generate.engine  # whether it is installed (or reachable) is the preflight's question
        from shardwise.gpu_runtime import choose_engine

        return choose_engine("auto", self.device)

    def endpoint_sections(self) -> dict[str, GenerateConfig | EmbedConfig]:
        """The sections this job runs on a serving endpoint (``engine: openai``), by role."""
        sections: dict[str, GenerateConfig | EmbedConfig] = {}
        if self.runs_generation and self.generate.engine == "openai":
            sections["generate"] = self.generate
        if self.runs_embedding and self.embed.engine == "openai":
            sections["embed"] = self.embed
        return sections

    def endpoint_options(self, role: Literal["generate", "embed"]) -> Any:
        """The ``EndpointOptions`` of a section that runs on a serving endpoint."""
        from shardwise.gpu_runtime import EndpointOptions

        s = self.generate if role == "generate" else self.embed
        assert s.base_url is not None
        return EndpointOptions(
            s.base_url, s.served_model, s.api_key_env, s.max_concurrency, s.request_timeout_s, s.max_retries
        )

    def vllm_options(self) -> Any:
        from shardwise.gpu_runtime import VllmOptions

        g = self.generate
        return VllmOptions(g.tensor_parallel_size, g.gpu_memory_utilization, g.max_model_len, g.enforce_eager)

    @property
    def template(self) -> str:
        """The effective prompt template (the text column alone when none is configured)."""
        return self.generate.prompt_template or "{" + self.text_column + "}"

    @property
    def output_schema_hash(self) -> str | None:
        """Short hash of the output schema (None without one), for lineage next to the fingerprint."""
        from shardwise.tasks.config.output_schema import schema_hash

        schema = self.generate.output_schema if self.runs_generation else None
        return None if schema is None else schema_hash(schema)

    def public_dict(self) -> dict[str, Any]:
        """The config without ``storage_options`` and with URIs redacted (``user:password@``,
        signed query strings): safe for Prefect parameters, MLflow and manifests."""
        from shardwise.tasks.redaction import redact_values

        return redact_values(self.model_dump(mode="json", exclude={"storage_options"}))

    def output_fingerprint(self) -> str:
        """Hash of every setting that changes output values, of the weights each model spec
        resolves to (:meth:`model_identities`) and, when no ``generate.chat_date`` is set and the
        chat template prints the date, of the date this run's prompts carry
        (:meth:`printed_chat_date`); a resume must match it."""
        recorded: dict[str, Any] = {"settings": self.settings_fingerprint(), "models": self.model_identities()}
        printed = self.printed_chat_date()
        if printed is not None:
            recorded["printed_chat_date"] = printed
        blob = json.dumps(recorded, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def run_chat_date(self) -> dt.date:
        """The date chat templates print in this run: ``generate.chat_date``, else today in UTC,
        fixed at the first call on this config object so every check and shard of a run uses one."""
        if self.generate.chat_date is not None:
            return self.generate.chat_date
        if self._run_date is None:
            self._run_date = today_utc()
        return self._run_date

    def printed_chat_date(self) -> str | None:
        """The date (ISO) this run's prompts carry when it is not a setting: None when the job does
        not generate, ``generate.chat_date`` is set (the settings hold it) or the model's chat template
        renders the same prompt on every date. Otherwise the prompts, and so the answers, differ from
        day to day, and outputs and parts of another day are another config."""
        if not self.runs_generation or self.generate.chat_date is not None or self.generate.engine == "openai":
            return None  # an endpoint renders its chat template itself
        if self._prints_date is None:
            self._prints_date = chat_template_prints_date(
                self.generate.model, self.generate.system_prompt, dict(self.generate.chat_template_kwargs)
            )
        return self.run_chat_date().isoformat() if self._prints_date else None

    def model_identities(self) -> dict[str, str]:
        """``{"generate": ..., "embed": ...}``: the identity of the weights each configured model
        spec names now (a Hub commit, a hash of local weights; see ``shardwise.gpu_runtime.model_identity``).

        Resolved once per config object and spec, so checking thousands of parts costs one
        resolution; a run builds its config once, so a later run sees replaced weights.
        Raises ``ModelNotFoundError`` when a spec resolves to nothing."""
        from shardwise.gpu_runtime.model_identity import model_identity

        identities = {}
        for role, section, used in (
            ("generate", self.generate, self.runs_generation),
            ("embed", self.embed, self.runs_embedding),
        ):
            if used and section.engine == "openai":
                # The server's weights cannot be read from here: the name it serves them under stands for them.
                identities[role] = f"openai:{section.served_model or section.model}"
            elif used:
                if section.model not in self._identities:
                    self._identities[section.model] = model_identity(section.model)
                identities[role] = self._identities[section.model]
        return identities

    def models_section(self) -> dict[str, dict[str, str]]:
        """The manifest's ``models``: each role's spec and the identity of its weights."""
        specs = {"generate": self.generate.model, "embed": self.embed.model}
        return {role: {"spec": specs[role], "identity": identity} for role, identity in self.model_identities().items()}

    def model_changes(self, recorded: dict[str, Any] | None) -> list[str]:
        """What differs between a manifest's ``models`` and the weights this config's specs name
        now, for specs that stayed the same (a changed spec shows as a changed setting)."""
        changes = []
        for role, now in self.models_section().items():
            before = (recorded or {}).get(role) or {}
            if before.get("spec", now["spec"]) == now["spec"] and before.get("identity") != now["identity"]:
                # no identity: an output written before they were recorded, which nothing can vouch for
                was = f"{before['identity'][:22]}…" if before.get("identity") else "not recorded"
                changes.append(f"{role}.model weights of {now['spec']} ({was} -> {now['identity'][:22]}…)")
        return changes

    def settings_fingerprint(self) -> str:
        """Hash of every setting that changes output values, without resolving any model: the
        same config text gives the same value on any machine (idempotency keys use it)."""
        relevant = self.model_dump(mode="json", include=set(FINGERPRINT_SETTINGS))
        if not self.runs_generation:
            relevant.pop("generate")
        if not self.runs_embedding:
            relevant.pop("embed")
        for section in ("generate", "embed"):
            if section in relevant:
                for knob in EXECUTION_KNOBS + ENDPOINT_KNOBS:
                    relevant[section].pop(knob, None)
                if relevant[section]["engine"] != "openai":
                    relevant[section].pop("served_model")
        if "embed" in relevant and relevant["embed"]["engine"] == "hf":
            relevant["embed"].pop("engine")
        if "generate" in relevant:
            # The engine that runs, not the request: `auto` on another machine may be another engine.
            # hf leaves both out: neither the engine field nor vllm's max_model_len changes its values.
            engine = self.generation_engine()
            if engine == "hf":
                relevant["generate"].pop("engine")
                relevant["generate"].pop("max_model_len")
            else:
                relevant["generate"]["engine"] = engine
                if engine == "openai":
                    relevant["generate"].pop("max_model_len")
            if self.generate.output_schema is None:
                relevant["generate"].pop("repair_frequency_penalty")  # acts on structured answers only
            else:
                # As text: sorting its keys below would lose the property order the grammar follows.
                from shardwise.tasks.config.output_schema import canonical_schema_text

                relevant["generate"]["output_schema"] = canonical_schema_text(self.generate.output_schema)
        blob = json.dumps(relevant, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def today_utc() -> dt.date:
    """Today's date in UTC: the chat date of a run that sets none."""
    return dt.datetime.now(dt.UTC).date()


def chat_template_prints_date(spec: str, system_prompt: str | None, template_kwargs: dict[str, Any]) -> bool:
    """Whether ``spec``'s chat template renders a prompt differently on two dates (its tokenizer
    is read, not its weights)."""
    from shardwise.gpu_runtime.prompts import build_chat
    from shardwise.gpu_runtime.token_count import load_tokenizer

    tokenizer = load_tokenizer(spec)
    rendered = {
        build_chat(tokenizer, "-", system_prompt, template_kwargs=template_kwargs or None, date=day)
        for day in (dt.date(2001, 2, 3), dt.date(2002, 3, 4))
    }
    return len(rendered) > 1
