"""Generation cache keys are made from the prompt the engine receives (after the chat template,
with the run's date), not from the settings that may or may not change it."""

from __future__ import annotations

import pytest

from shardwise.tasks.config.loading import validate_config
from shardwise.tasks.records.engine_inputs import generation_params
from shardwise.tasks.records.row_cache_keys import generation_context, generation_keys

PROMPTS = ["The kettle boils fast.", "Shoes fell apart."]


def _cfg(**generate):
    return validate_config(
        {
            "input": "in",
            "output": "out",
            "task": "generate",
            "device": "cpu",
            "generate": {"max_new_tokens": 4, **generate},
        }
    )


def _keys(cfg, day: str, tokenizer=None) -> list[str]:
    params = generation_params(cfg, day)
    return generation_keys(generation_context(cfg), PROMPTS, params, cfg.generate.model, tokenizer)


@pytest.fixture(scope="module")
def dated_tokenizer():
    """The bundled SmolLM2 tokenizer with a template that prints the date (as Llama-3.x's does)."""
    from transformers import AutoTokenizer

    from shardwise.gpu_runtime.dummy import llama_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(llama_tokenizer_dir("the cache key tests"))
    tokenizer.chat_template = (
        "<|im_start|>system\nToday Date: {{ date_string }}<|im_end|>\n"
        "{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
        "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
    )
    return tokenizer


def test_a_date_the_template_does_not_print_leaves_the_keys_alone():
    cfg = _cfg()
    assert _keys(cfg, "2026-11-01") == _keys(cfg, "2026-11-02")
    # generate.chat_date is the same kind of setting: the same prompt, the same key
    assert _keys(_cfg(chat_date="2026-11-05"), "2026-11-01") == _keys(cfg, "2026-11-01")


def test_a_date_the_template_prints_changes_the_keys(dated_tokenizer):
    cfg = _cfg()
    first = _keys(cfg, "2026-11-01", dated_tokenizer)
    assert _keys(cfg, "2026-11-01", dated_tokenizer) == first
    assert set(_keys(cfg, "2026-11-02", dated_tokenizer)).isdisjoint(first)


def test_template_variables_count_only_where_the_template_reads_them(dated_tokenizer):
    cfg = _cfg()
    assert _keys(_cfg(chat_template_kwargs={"enable_thinking": False}), "2026-11-01") == _keys(cfg, "2026-11-01")
    template = dated_tokenizer.chat_template
    dated_tokenizer.chat_template += (
        "{%- if enable_thinking is defined and not enable_thinking %}<think></think>{%- endif %}"
    )
    try:
        thinking_off = _cfg(chat_template_kwargs={"enable_thinking": False})
        assert _keys(thinking_off, "2026-11-01", dated_tokenizer) != _keys(cfg, "2026-11-01", dated_tokenizer)
    finally:
        dated_tokenizer.chat_template = template


def test_the_system_prompt_is_keyed_through_the_rendered_prompt():
    assert _keys(_cfg(system_prompt="Be brief."), "2026-11-01") != _keys(_cfg(), "2026-11-01")
