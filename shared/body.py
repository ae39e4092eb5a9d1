"""Exact JSON request bodies: numbers parsed as ``Decimal``, never through float.

FastAPI's own body parsing goes through ``json.loads`` with floats, which cannot hold an
amount like 999999999999999.99; routes that take money read their body with ``json_body``.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Annotated, Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import AfterValidator, AwareDatetime, BaseModel, BeforeValidator, ValidationError

from shared.events import JsonPath, nul_path
from shared.openapi import AMOUNT_PATTERN, BODY_TEXT, LIMIT_PATTERN

M = TypeVar("M", bound=BaseModel)


def amount_schema(description: str, *, zero: bool = False) -> dict[str, Any]:
    """The JSON Schema of an amount a body carries: a plain decimal string (what the services
    write, and what a client should send) or an exact JSON number, read without float."""
    return {
        "description": description
        + ". At most as many decimals as the currency has minor units; up to 10^15.",
        "anyOf": [
            {"type": "string", "pattern": AMOUNT_PATTERN if not zero else LIMIT_PATTERN},
            {"type": "number", "minimum" if zero else "exclusiveMinimum": 0, "maximum": 10**15},
        ],
        "examples": ["1250.00"],
    }


def _in_utc(moment: datetime) -> datetime:
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise ValueError("out of the range of dates (in UTC)") from None


_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})",
    re.ASCII,
)


def _rfc3339(value: object) -> object:
    # Pydantic alone also takes a number of seconds since 1970 ("0.5", 1893456000) and a
    # date without a time: neither is the RFC 3339 date-time the contract documents.
    if isinstance(value, datetime) or (isinstance(value, str) and _RFC3339.fullmatch(value)):
        return value
    raise ValueError("expected an RFC 3339 date-time with its offset, e.g. 2026-03-01T09:00:00Z")


def _iso_day(value: object) -> object:
    # Pydantic alone also reads "0" or 1893456000 as a day (seconds since 1970).
    if isinstance(value, date) or (isinstance(value, str) and _DAY.fullmatch(value)):
        return value
    raise ValueError("expected an ISO 8601 date, e.g. 2026-03-01")


_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", re.ASCII)
# A day as ISO 8601 writes it.
Day = Annotated[date, BeforeValidator(_iso_day)]
# A date-time as RFC 3339 writes it, with its offset.
Timestamp = Annotated[AwareDatetime, BeforeValidator(_rfc3339)]
# The same in UTC: an offset that pushes it past year 9999 (or before year 1) is a 422
# naming the field, not an OverflowError's 500 where it is stored or read.
UtcTimestamp = Annotated[AwareDatetime, BeforeValidator(_rfc3339), AfterValidator(_in_utc)]


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


class NulInText(ValueError):
    """A body whose text holds U+0000, which PostgreSQL's text cannot store."""

    def __init__(self, path: JsonPath) -> None:
        super().__init__("NUL (U+0000) is not allowed in text")
        self.path = path


def loads_exact(raw: bytes) -> Any:
    """A JSON body with its numbers as ``Decimal``; NaN/Infinity refused (ValueError), and
    text holding U+0000 (``NulInText``, naming where)."""
    try:
        data = json.loads(raw or b"null", parse_float=Decimal, parse_constant=_no_constants)
        path = nul_path(data) if b"\\u0000" in (raw or b"") else None
    except RecursionError:
        # Arrays or objects nested thousands deep (a few kB suffice): refused like any other
        # body that is not JSON this service can read, never an internal error.
        raise ValueError("nested too deeply") from None
    if path is not None:
        raise NulInText(path)
    return data


async def json_body(request: Request, model: type[M]) -> M:
    raw = await request.body()
    try:
        data = loads_exact(raw)
    except NulInText as exc:
        raise RequestValidationError(
            [
                {
                    "type": "string_nul",
                    "loc": ("body", *exc.path),
                    "msg": str(exc),
                }
            ]
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestValidationError(
            [
                {
                    "type": "json_invalid",
                    "loc": ("body",),
                    "msg": "Invalid JSON",
                    "ctx": {"error": str(exc)[:200]},
                }
            ]
        ) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [
            {**e, "loc": ("body", *e["loc"])}
            for e in exc.errors(include_url=False, include_input=False)
        ]
        raise RequestValidationError(errors) from None


def body_schema(model: type[BaseModel], *, required: bool = True) -> dict[str, Any]:
    """``openapi_extra`` documenting a body read with ``json_body`` (``required=False``: a
    body the route reads only when one is sent)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    # Inline: the body's own definitions (enums, nested models) stay with it.
    definitions = schema.pop("$defs", {})
    if definitions:
        schema = _inlined(schema, definitions)
    # Other members are ignored, but read like the rest: no U+0000 anywhere (`loads_exact`).
    # Said in words: the JSON Schema of "any JSON without U+0000" is recursive, and client
    # generators (openapi-python-client) then drop every operation with a body.
    schema["propertyNames"] = dict(BODY_TEXT)
    schema["description"] = (
        (schema.get("description", "") + " ").lstrip()
        + "Members not named here are ignored, but the body is read whole: U+0000 is refused "
        "anywhere in it, in their text too."
    )
    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": {"schema": schema}},
        }
    }


def _inlined(node: Any, definitions: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            name = ref.rsplit("/", 1)[1]
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return {**_inlined(definitions[name], definitions), **rest}
        return {k: _inlined(v, definitions) for k, v in node.items()}
    if isinstance(node, list):
        return [_inlined(v, definitions) for v in node]
    return node
