"""Prompt templates: field discovery, rendering and chat wrapping."""

from __future__ import annotations

import pytest

from gpu_runtime import render_prompt, template_fields


def test_template_fields_in_order_without_duplicates():
    assert template_fields("Review of {title}: {text}. Again: {title}") == ["title", "text"]


def test_literal_braces_are_not_fields():
    template = 'Answer as JSON {{"sentiment": ...}} for: {text}'
    assert template_fields(template) == ["text"]
    assert render_prompt(template, {"text": "great"}) == 'Answer as JSON {"sentiment": ...} for: great'


def test_format_specs_and_attribute_access_report_the_column():
    assert template_fields("{score:.2f} {meta[lang]} {text!r}") == ["score", "meta", "text"]
    assert render_prompt("{score:.1f}", {"score": 0.25}) == "0.2"


def test_positional_fields_are_rejected():
    with pytest.raises(ValueError, match="positional"):
        template_fields("{} and {0}")


def test_render_uses_row_values_and_ignores_extra_columns():
    assert render_prompt("Summarize: {text}", {"text": "hello", "id": 3}) == "Summarize: hello"


def test_missing_column_names_it():
    with pytest.raises(KeyError, match="title"):
        render_prompt("{title}: {text}", {"text": "x"})


@pytest.mark.slow
def test_build_chat_uses_the_models_template(generation_engine):
    from gpu_runtime.prompts import build_chat

    tokenizer = generation_engine.tokenizer
    plain = build_chat(tokenizer, "Hi there", None)
    assert "Hi there" in plain and plain.rstrip().endswith("assistant")
    with_system = build_chat(tokenizer, "Hi there", "You answer in French.")
    assert "You answer in French." in with_system
    assert "You answer in French." not in plain


def test_build_chat_without_template_returns_plain_text():
    from gpu_runtime.prompts import build_chat

    class NoTemplate:
        chat_template = None

    assert build_chat(NoTemplate(), "just text", "ignored") == "just text"


# A Qwen3-style switch and a Llama-3.1-style date (date_string if given, else the wall clock), in one template.
DATED_THINKING_TEMPLATE = (
    "{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}{%- endif %}"
    "<|im_start|>system\nToday Date: {{ date_string }}<|im_end|>\n"
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{%- endif %}{%- endif %}"
)


@pytest.fixture(scope="module")
def dated_tokenizer(tmp_path_factory):
    """A copy of the bundled SmolLM2 tokenizer with the template above."""
    from transformers import AutoTokenizer

    from gpu_runtime.dummy import llama_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(llama_tokenizer_dir("the chat template tests"))
    tokenizer.chat_template = DATED_THINKING_TEMPLATE
    target = tmp_path_factory.mktemp("dated-tokenizer")
    tokenizer.save_pretrained(target)
    return AutoTokenizer.from_pretrained(target)


def test_chat_template_kwargs_reach_the_template(dated_tokenizer):
    from gpu_runtime.prompts import build_chat

    thinking = build_chat(dated_tokenizer, "Hi", None)
    quiet = build_chat(dated_tokenizer, "Hi", None, template_kwargs={"enable_thinking": False})
    assert "<think>" not in thinking
    assert quiet == thinking + "<think>\n\n</think>"


def test_the_date_a_template_prints_is_the_one_passed_in(dated_tokenizer):
    import datetime as dt

    from gpu_runtime.prompts import build_chat, encode_chat

    today = dt.datetime.now().strftime("%d %b %Y")
    assert f"Today Date: {today}" in build_chat(dated_tokenizer, "Hi", None)  # the wall clock by default
    fixed = dt.date(2024, 7, 26)
    prompt = build_chat(dated_tokenizer, "Hi", None, date=fixed)
    assert "Today Date: 26 Jul 2024" in prompt and today not in prompt
    ids, truncated = encode_chat(dated_tokenizer, "Hi", 10**6, date=fixed)
    assert dated_tokenizer.decode(ids) == prompt and not truncated


def test_truncation_keeps_the_template_variables(dated_tokenizer):
    import datetime as dt

    from gpu_runtime.prompts import encode_chat

    kwargs = {"template_kwargs": {"enable_thinking": False}, "date": dt.date(2025, 1, 2)}
    full, _ = encode_chat(dated_tokenizer, "word " * 200, 10**6, **kwargs)
    ids, truncated = encode_chat(dated_tokenizer, "word " * 200, 60, **kwargs)
    text = dated_tokenizer.decode(ids)
    assert truncated and len(ids) <= 60 < len(full)
    assert "Today Date: 02 Jan 2025" in text and text.endswith("<think>\n\n</think>")


def test_reserved_template_kwargs_are_refused():
    from gpu_runtime import GenerationParams

    with pytest.raises(ValueError, match="strftime_now"):
        GenerationParams(chat_template_kwargs={"strftime_now": "x"})
    with pytest.raises(ValueError, match="add_generation_prompt"):
        GenerationParams(chat_template_kwargs={"add_generation_prompt": False})
