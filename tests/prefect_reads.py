"""Reads from the Prefect API that see every matching object.

The server answers an unlimited read with its default page (200 objects, sorted by id, which is a
random UUID): over a whole test session a read that is not narrowed by a filter misses objects at
random. Every read that can grow with the session goes through ``read_all``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PAGE = 200


def read_all(read: Callable[..., list[Any]], **filters: Any) -> list[Any]:
    """Every object ``read`` (a ``client.read_*`` method) matches with ``filters``, page by page."""
    found: list[Any] = []
    while True:
        page = read(**filters, limit=PAGE, offset=len(found))
        found.extend(page)
        if len(page) < PAGE:
            return found
