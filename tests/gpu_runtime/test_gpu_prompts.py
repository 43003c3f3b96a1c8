"""Prompt templates: field discovery, rendering and chat wrapping."""

from __future__ import annotations

import pytest

from shardwise.gpu_runtime import render_prompt, template_fields


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
    from shardwise.gpu_runtime.prompts import build_chat

    tokenizer = generation_engine.tokenizer
    plain = build_chat(tokenizer, "Hi there", None)
    assert "Hi there" in plain and plain.rstrip().endswith("assistant")
    with_system = build_chat(tokenizer, "Hi there", "You answer in French.")
    assert "You answer in French." in with_system
    assert "You answer in French." not in plain


def test_build_chat_without_template_returns_plain_text():
    from shardwise.gpu_runtime.prompts import build_chat

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

    from shardwise.gpu_runtime.dummy import llama_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(llama_tokenizer_dir("the chat template tests"))
    tokenizer.chat_template = DATED_THINKING_TEMPLATE
    target = tmp_path_factory.mktemp("dated-tokenizer")
    tokenizer.save_pretrained(target)
    return AutoTokenizer.from_pretrained(target)


def test_chat_template_kwargs_reach_the_template(dated_tokenizer):
    from shardwise.gpu_runtime.prompts import build_chat

    thinking = build_chat(dated_tokenizer, "Hi", None)
    quiet = build_chat(dated_tokenizer, "Hi", None, template_kwargs={"enable_thinking": False})
    assert "<think>" not in thinking
    assert quiet == thinking + "<think>\n\n</think>"


def test_the_date_a_template_prints_is_the_one_passed_in(dated_tokenizer):
    import datetime as dt

    from shardwise.gpu_runtime.prompts import build_chat, encode_chat

    today = dt.datetime.now().strftime("%d %b %Y")
    assert f"Today Date: {today}" in build_chat(dated_tokenizer, "Hi", None)  # the wall clock by default
    fixed = dt.date(2024, 7, 26)
    prompt = build_chat(dated_tokenizer, "Hi", None, date=fixed)
    assert "Today Date: 26 Jul 2024" in prompt and today not in prompt
    ids, truncated = encode_chat(dated_tokenizer, "Hi", 10**6, date=fixed)
    assert dated_tokenizer.decode(ids) == prompt and not truncated


def test_truncation_keeps_the_template_variables(dated_tokenizer):
    import datetime as dt

    from shardwise.gpu_runtime.prompts import encode_chat

    kwargs = {"template_kwargs": {"enable_thinking": False}, "date": dt.date(2025, 1, 2)}
    full, _ = encode_chat(dated_tokenizer, "word " * 200, 10**6, **kwargs)
    ids, truncated = encode_chat(dated_tokenizer, "word " * 200, 60, **kwargs)
    text = dated_tokenizer.decode(ids)
    assert truncated and len(ids) <= 60 < len(full)
    assert "Today Date: 02 Jan 2025" in text and text.endswith("<think>\n\n</think>")


def test_reserved_template_kwargs_are_refused():
    from shardwise.gpu_runtime import GenerationParams

    with pytest.raises(ValueError, match="strftime_now"):
        GenerationParams(chat_template_kwargs={"strftime_now": "x"})
    with pytest.raises(ValueError, match="add_generation_prompt"):
        GenerationParams(chat_template_kwargs={"add_generation_prompt": False})


@pytest.mark.slow
def test_the_job_configs_template_kwargs_and_run_date_reach_the_engine(generation_engine, dated_tokenizer, monkeypatch):
    """Through enrich_table: the config's chat_template_kwargs and the run's chat date (from the
    lineage) shape the prompt the engine decodes from; a configured chat_date wins."""
    import datetime as dt

    import pyarrow as pa

    from shardwise.gpu_runtime.prompts import encode_chat
    from shardwise.tasks.config.job import JobConfig
    from shardwise.tasks.records.enrichment import enrich_table

    monkeypatch.setattr(generation_engine.tokenizer, "chat_template", DATED_THINKING_TEMPLATE)
    table = pa.table({"id": [1, 2], "text": ["Hi", "How are you?"]})

    def prompt_tokens(cfg: JobConfig, run_date: str | None) -> list[int]:
        out, _ = enrich_table(table, cfg, generation_engine, None, chat_date=run_date)
        return out.column("n_prompt_tokens").to_pylist()

    def expected(kwargs, date) -> list[int]:
        return [
            len(encode_chat(dated_tokenizer, t, 10**6, template_kwargs=kwargs, date=date)[0])
            for t in ("Hi", "How are you?")
        ]

    quiet = JobConfig(
        input="x",
        output="y",
        task="generate",
        generate={"max_new_tokens": 1, "chat_template_kwargs": {"enable_thinking": False}},
    )
    assert prompt_tokens(quiet, "2024-07-26") == expected({"enable_thinking": False}, dt.date(2024, 7, 26))
    loud = JobConfig(input="x", output="y", task="generate", generate={"max_new_tokens": 1})
    assert prompt_tokens(loud, "2024-07-26") == expected(None, dt.date(2024, 7, 26))
    assert prompt_tokens(quiet, "2024-07-26") != prompt_tokens(loud, "2024-07-26")
    pinned = JobConfig(
        input="x", output="y", task="generate", generate={"max_new_tokens": 1, "chat_date": "2025-05-05"}
    )
    assert prompt_tokens(pinned, "2024-07-26") == expected(None, dt.date(2025, 5, 5))


def test_a_template_that_calls_strftime_now_itself_prints_the_date_passed_in(dated_tokenizer):
    """Mistral-style templates call strftime_now directly rather than reading date_string."""
    import datetime as dt

    from shardwise.gpu_runtime.prompts import build_chat

    class Direct:
        chat_template = "Today is {{ strftime_now('%Y-%m-%d') }}. {{ messages[-1].content }}"

        def apply_chat_template(self, *args, **kwargs):
            return dated_tokenizer.apply_chat_template(*args, chat_template=self.chat_template, **kwargs)

    today = dt.datetime.now().strftime("%Y-%m-%d")
    assert build_chat(Direct(), "Hi", None) == f"Today is {today}. Hi"
    assert build_chat(Direct(), "Hi", None, date=dt.date(2024, 7, 26)) == "Today is 2024-07-26. Hi"
    assert build_chat(Direct(), "Hi", None) == f"Today is {today}. Hi"  # the wall clock again afterwards
