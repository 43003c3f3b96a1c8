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
