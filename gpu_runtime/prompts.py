"""Prompt templating: Parquet row -> user text -> the model's chat-formatted prompt."""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

__all__ = ["build_chat", "render_prompt", "template_fields"]


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
            raise KeyError(
                f"template field {key!r} is not in the row (columns: {sorted(self._row)})"
            ) from None


def build_chat(tokenizer: Any, user_text: str, system_prompt: str | None) -> str:
    """Render one user turn with the model's own chat template, ready for the assistant's reply.

    The system message is included only when ``system_prompt`` is given (some templates, e.g.
    SmolLM2's, then insert their default one). A tokenizer without a chat template gets the plain
    text, so base (non-instruct) models still work.
    """
    if not getattr(tokenizer, "chat_template", None):
        return user_text
    messages = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": user_text})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
