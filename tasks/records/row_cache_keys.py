"""The row cache's keys: a row's key hashes everything that produced its value and nothing else
(not its id, file or position).

For generation that is the prompt the engine receives (the row's prompt wrapped by the model's
chat template with the system prompt, the template variables and the run's date, as
:func:`shardwise.gpu_runtime.prompts.build_chat` renders it), the model's weights identity, the engine and
device/dtype, the output schema in its property order, and every decoding setting that changes
values; for embeddings the cleaned text, the model's weights identity, device/dtype and the prompt
name. Settings that only may change the prompt (a date a template does not print) are not keyed on
themselves: the rendered prompt shows whether they did. See :func:`generation_keys` and
:func:`embedding_context`.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shardwise.gpu_runtime import GenerationParams
    from shardwise.tasks.config.job import JobConfig

LAYOUT = "v1"  # the cache's layout version: hashed into every key, and the top folder of its files


def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _device_and_dtype(cfg: JobConfig, section: Any) -> str:
    """Where values are computed changes them (fp32 on CPU, bf16 on CUDA); a serving endpoint's
    device is its own affair, and its served model name is in the model identity."""
    if section.engine == "openai":
        return "endpoint"
    from shardwise.gpu_runtime import default_dtype, select_device

    device = select_device(cfg.device)
    return f"{device.type}/{default_dtype(device)}"


def generation_context(cfg: JobConfig) -> str:
    """Hash of every generation input shared by a job's rows besides the prompt, which each row's
    key adds as the engine receives it (:func:`generation_keys`). The system prompt, the chat
    template, its variables and the date are in that prompt, so they are not here."""
    from shardwise.tasks.config.output_schema import canonical_schema_text

    g = cfg.generate
    structured = {} if g.output_schema is None else {"repair_frequency_penalty": g.repair_frequency_penalty}
    return _sha(
        {
            **structured,
            "layout": LAYOUT,
            "model": cfg.model_identities()["generate"],
            "engine": cfg.generation_engine(),
            "device": _device_and_dtype(cfg, g),
            "max_new_tokens": g.max_new_tokens,
            "max_input_tokens": g.max_input_tokens,
            "temperature": g.temperature,
            "top_p": g.top_p,
            "seed": g.seed,
            "ignore_eos": g.ignore_eos,
            # as text: _sha sorts keys, and the answers follow the properties' order
            "output_schema": None if g.output_schema is None else canonical_schema_text(g.output_schema),
        }
    )


def engine_prompts(tokenizer: Any, prompts: list[str], params: GenerationParams) -> list[str]:
    """Each row's prompt as the generation engine receives it: wrapped by the chat template with
    the system prompt, the template variables and the date of ``params`` (before tokenizing and
    truncating, which ``max_input_tokens`` and the model decide)."""
    from shardwise.gpu_runtime.prompts import build_chat

    return [
        build_chat(
            tokenizer,
            prompt,
            params.system_prompt,
            template_kwargs=params.chat_template_kwargs,
            date=params.chat_date,
        )
        for prompt in prompts
    ]


def generation_keys(
    context: str, prompts: list[str], params: GenerationParams, spec: str | None, tokenizer: Any = None
) -> list[str]:
    """One key per row prompt: the context (:func:`generation_context`) and the prompt as the
    engine receives it, rendered with ``spec``'s tokenizer unless ``tokenizer`` is given. A spec of
    None is a serving endpoint, which receives chat messages: those are keyed."""
    if spec is None and tokenizer is None:
        sent = [
            json.dumps([params.system_prompt, params.chat_template_kwargs, prompt], sort_keys=True)
            for prompt in prompts
        ]
        return row_keys(context, sent)
    if tokenizer is None:
        from shardwise.gpu_runtime.token_count import load_tokenizer  # loaded once per process

        tokenizer = load_tokenizer(spec)
    return row_keys(context, engine_prompts(tokenizer, prompts, params))


def embedding_context(cfg: JobConfig) -> str:
    """Hash of every embedding input shared by a job's rows; a row's key adds its cleaned text.
    Truncation length and normalisation belong to the model, so its weights identity covers them."""
    return _sha(
        {
            "layout": LAYOUT,
            "model": cfg.model_identities()["embed"],
            "device": _device_and_dtype(cfg, cfg.embed),
            "prompt_name": cfg.embed.prompt_name,
        }
    )


def row_keys(context: str, texts: list[str]) -> list[str]:
    """One key per text: sha256 of the context hash and the text."""
    prefix = context.encode() + b"\0"
    return [hashlib.sha256(prefix + text.encode("utf-8", "surrogatepass")).hexdigest() for text in texts]
