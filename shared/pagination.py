"""Opaque list cursors (contract §2: ``limit`` ≤ 500, ``cursor`` → ``next_cursor``).

A cursor is the sort key of the last item returned, base64-encoded JSON; the API never
trusts it beyond its shape, and a cursor it did not issue is a 422 naming ``cursor``.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from shared.problems import ValidationFailed

MAX_PAGE = 500


def encode_cursor(values: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(values, default=str).encode()).decode()


def decode_cursor(cursor: str | None, length: int | None = None) -> list[Any] | None:
    """The values of a cursor this API returned (``length`` of them, when given)."""
    if not cursor:
        return None
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (ValueError, TypeError):
        value = None
    if not isinstance(value, list) or (length is not None and len(value) != length):
        raise ValidationFailed("cursor: not a cursor this API returned", field="cursor")
    return value
