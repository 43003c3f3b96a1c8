"""Prompt templating: Parquet row -> user text -> the model's chat-formatted prompt -> token ids.

Every generation engine (HF, vLLM) builds its prompts here, so the chat template, its extra
variables (``chat_template_kwargs``), the date a template may insert, and the truncation of
over-long user text are the same whichever engine decodes.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import string
from collections.abc import Mapping
from typing import Any

__all__ = ["RESERVED_TEMPLATE_KWARGS", "build_chat", "encode_chat", "render_prompt", "template_fields"]

# Names apply_chat_template (or this module) sets itself: a job's chat_template_kwargs may not.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
        "processor_kwargs",
        "strftime_now",
        "date_string",
    }
)
# How Llama-3.x templates print the date they read from ``date_string`` ("26 Jul 2024").
DATE_STRING_FORMAT = "%d %b %Y"


def template_fields(template: str) -> list[str]:
    """Column names a ``str.format`` template uses, in first-use order, without duplicates.

    ``{{`` and ``}}`` are literal braces. Attribute/index access (``{row.x}``, ``{a[0]}``) reports
    the base name, which is the column that must exist. Positional fields (``{}``, ``{0}``) are
    rejected: a row only has named columns.
    """
    fields: list[str] = []
    for _literal, field, _spec, _conv in string.Formatter().parse(template):
        if field is None:
            continue
        base = field.split(".", 1)[0].split("[", 1)[0]
        if base == "" or base.isdigit():
            raise ValueError(f"template uses a positional field {{{field}}}; name a column instead")
        if base not in fields:
            fields.append(base)
    return fields


def render_prompt(template: str, row: Mapping[str, object]) -> str:
    """Fill ``template`` from ``row``; a missing column raises ``KeyError`` naming it."""
    return template.format_map(_StrictRow(row))


class _StrictRow:
    """format_map view whose KeyError says which column is missing and which ones exist."""

    __slots__ = ("_row",)

    def __init__(self, row: Mapping[str, object]) -> None:
        self._row = row

    def __getitem__(self, key: str) -> Any:
        try:
            return self._row[key]
        except KeyError:
            raise KeyError(f"template field {key!r} is not in the row (columns: {sorted(self._row)})") from None


def build_chat(
    tokenizer: Any,
    user_text: str,
    system_prompt: str | None,
    *,
    template_kwargs: Mapping[str, Any] | None = None,
    date: dt.date | None = None,
) -> str:
    """Render one user turn with the model's own chat template, ready for the assistant's reply.

    The system message is included only when ``system_prompt`` is given (some templates, e.g.
    SmolLM2's, then insert their default one). ``template_kwargs`` become template variables
    (e.g. ``enable_thinking=False`` for Qwen3). ``date`` replaces the wall clock: it is passed as
    ``date_string`` (the variable Llama-3.x templates print) and is what the template's
    ``strftime_now`` returns (midnight of that day; Mistral-style templates call it directly), so
    such a template renders the same prompt on every day of a run. A tokenizer without a chat
    template gets the plain text, so base (non-instruct) models still work.
    """
    if not getattr(tokenizer, "chat_template", None):
        return user_text
    messages = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": user_text})
    extra = dict(template_kwargs or {})
    if date is None:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    extra["date_string"] = date.strftime(DATE_STRING_FORMAT)
    _pin_template_clock()
    token = _PINNED_DAY.set(date)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    finally:
        _PINNED_DAY.reset(token)


def encode_chat(
    tokenizer: Any,
    user_text: str,
    limit: int,
    *,
    system_prompt: str | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
    date: dt.date | None = None,
) -> tuple[list[int], bool]:
    """Token ids of the chat prompt and whether it was truncated: the user text (never the
    template or the system prompt) is shortened until the prompt fits in ``limit`` tokens."""
    has_template = bool(getattr(tokenizer, "chat_template", None))

    def tokenize(text: str) -> list[int]:
        # A chat template already spells out its special tokens; plain text gets the usual ones.
        # verbose=False: over-long inputs are expected here and handled below.
        return tokenizer(text, add_special_tokens=not has_template, verbose=False)["input_ids"]

    def chat_ids(text: str) -> list[int]:
        return tokenize(build_chat(tokenizer, text, system_prompt, template_kwargs=template_kwargs, date=date))

    ids = chat_ids(user_text)
    if len(ids) <= limit:
        return ids, False
    user_ids = tokenizer(user_text, add_special_tokens=False, verbose=False)["input_ids"]
    overhead = len(ids) - len(user_ids)
    keep = min(len(user_ids), limit - overhead)
    # Decoding then re-tokenizing can merge tokens differently at the cut: shrink until it fits.
    while keep > 0:
        ids = chat_ids(tokenizer.decode(user_ids[:keep]))
        if len(ids) <= limit:
            return ids, True
        keep -= len(ids) - limit
    raise ValueError(
        f"the chat template and system prompt alone take about {overhead} tokens, more than the "
        f"input limit of {limit}; raise max_input_tokens or shorten the system prompt"
    )


# transformers hands templates plain data only (a callable passed as a variable arrives as an
# inert placeholder), so its ``strftime_now`` cannot be overridden per call. It reads
# ``datetime.now()`` from its module at call time: that name is pointed at a clock that returns
# the pinned day while build_chat renders with a date (per thread/task: a ContextVar) and the
# real time otherwise.
_PINNED_DAY: contextvars.ContextVar[dt.date | None] = contextvars.ContextVar("shardwise_chat_date", default=None)


class _PinnableClock(dt.datetime):
    @classmethod
    def now(cls, tz: dt.tzinfo | None = None) -> dt.datetime:  # type: ignore[override]
        day = _PINNED_DAY.get()
        if day is None:
            return dt.datetime.now(tz)
        return dt.datetime.combine(day, dt.time(), tzinfo=tz)


def _pin_template_clock() -> bool:
    """Route transformers' template clock through :class:`_PinnableClock`; False where its layout
    is not the expected one (then only ``date_string`` carries the date)."""
    try:
        from transformers.utils import chat_template_utils
    except ImportError:
        return False
    current = getattr(chat_template_utils, "datetime", None)
    if current is _PinnableClock:
        return True
    if current is not dt.datetime:
        return False
    chat_template_utils.datetime = _PinnableClock
    return True
