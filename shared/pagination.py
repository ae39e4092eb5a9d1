"""Opaque list cursors (contract §2: ``limit`` ≤ 500, ``cursor`` → ``next_cursor``).

A cursor is the sort key of the last item returned, base64-encoded JSON, headed by the name
of the list it was issued for (with its sort, filters or customer, as the list has them).
The API never trusts it beyond that: a cursor it did not issue for this very list —
another list's, another sort's or selection's, or anything made up — is a 422 naming
``cursor``, never an internal error nor a silently wrong page.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

from shared.problems import ValidationFailed

MAX_PAGE = 500


def bad_cursor() -> ValidationFailed:
    return ValidationFailed("cursor: not a cursor this API returned", field="cursor")


def encode_cursor(values: list[Any], scope: str = "") -> str:
    return base64.urlsafe_b64encode(json.dumps([scope, *values], default=str).encode()).decode()


def decode_cursor(
    cursor: str | None,
    length: int | None = None,
    *,
    scope: str = "",
    kinds: tuple[Callable[[Any], Any], ...] = (),
) -> list[Any] | None:
    """The values of a cursor this API returned for the list ``scope`` (``length`` of them,
    or as many as ``kinds``, each passed through its kind: a ``ValueError``, ``TypeError``
    or ``ArithmeticError`` there makes it a cursor this API did not return)."""
    if not cursor:
        return None
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (ValueError, TypeError, RecursionError):
        value = None
    if kinds:
        length = len(kinds)
    if (
        not isinstance(value, list)
        or not value
        or value[0] != scope
        or (length is not None and len(value) != length + 1)
    ):
        raise bad_cursor()
    values = value[1:]
    if not kinds:
        return values
    try:
        return [kind(v) for kind, v in zip(kinds, values, strict=True)]
    except (ValueError, TypeError, ArithmeticError):
        raise bad_cursor() from None


def integer(value: Any) -> int:
    """A cursor's whole number (JSON's, not a bool nor a text)."""
    if type(value) is not int:
        raise TypeError(value)
    return value


def text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(value)
    return value
