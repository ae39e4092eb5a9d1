"""The OpenAPI document of a service, and its documentation pages.

What every service's document shares: the `Problem` every error answers with (RFC 9457,
``application/problem+json``, documented for each status a route can answer, in place of
FastAPI's own 422 that the services never send), the types of response fields (money as
decimal strings, currency codes, timestamps), the parameter rules (no control characters in
text), and `install`, which builds the document with them and serves ``/docs`` (Swagger UI)
and ``/redoc`` (ReDoc) from the files vendored in ``shared/static`` (scripts/vendor-docs-ui):
neither page loads anything from elsewhere.

The response models describe what the routes send; the routes still send their own
dictionaries (``response_model=None``), so that nothing the services answer changes and the
credit check's fast path, which answers without FastAPI, sends the same document.
"""

from __future__ import annotations

import copy
import html
import json
from collections.abc import Callable, Mapping
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema
from starlette.requests import Request
from starlette.responses import HTMLResponse

from shared.money import CODES_WITHOUT_MINOR_UNITS, CURRENCY_MINOR_UNITS
from shared.problems import PROBLEM_BASE, PROBLEM_CONTENT_TYPE, RETRY_AFTER_S

__all__ = [
    "AMOUNT_PATTERN",
    "BODY_TEXT",
    "CURRENCY_CODES",
    "CURRENCY_PATTERN",
    "MONEY_PATTERN",
    "TEXT_PATTERN",
    "Currency",
    "Day",
    "Money",
    "Problem",
    "Timestamp",
    "install",
    "ok",
    "problems",
    "tag",
]

STATIC = Path(__file__).parent / "static"
STATIC_URL = "/static/docs"
_REF = "#/components/schemas/"

# Text without C0/C1 control characters (shared.http's rule for parameters and the bodies'
# NUL rule), in the ECMA-262 syntax JSON Schema uses.
TEXT_PATTERN = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"
# An amount as the services write it: a plain decimal, no exponent, the currency's places.
MONEY_PATTERN = "^-?[0-9]+(\\.[0-9]+)?$"
# An amount a request may carry: positive, plain, within 10^15 and at most 4 decimals (no
# currency has more minor units); the currency's own minor units are checked on top.
# (Leading and trailing zeros are fine: "0010.500" EUR is 10.50.)
AMOUNT_PATTERN = "^(?=[0-9.]*[1-9])0*[0-9]{1,15}(\\.[0-9]{1,4}0*)?$"
# A limit may be zero.
LIMIT_PATTERN = "^0*[0-9]{1,15}(\\.[0-9]{1,4}0*)?$"
CURRENCY_PATTERN = "^[A-Z]{3}$"
# Every active ISO 4217 code: an order may be in any; one without minor units (XAU) or
# without a rate in the policy is decided (currency_mismatch), not refused.
CURRENCY_CODES: tuple[str, ...] = tuple(sorted({*CURRENCY_MINOR_UNITS, *CODES_WITHOUT_MINOR_UNITS}))
CURRENCY_SCHEMA: dict[str, Any] = {
    "type": "string",
    "pattern": CURRENCY_PATTERN,
    "enum": list(CURRENCY_CODES),
    "description": "An active ISO 4217 code",
    "examples": ["EUR"],
}

# The rule on a body's text: no U+0000 (shared.body.loads_exact refuses it; PostgreSQL's text
# cannot store it). Other control characters are data in a body.
BODY_TEXT: dict[str, Any] = {"pattern": "^[^\\u0000]*$"}
Money = Annotated[
    str,
    Field(
        pattern=MONEY_PATTERN,
        description='An exact decimal amount in the currency\'s minor units, e.g. "1250.00"',
        examples=["1250.00"],
    ),
]
Currency = Annotated[
    str, Field(pattern=CURRENCY_PATTERN, description="ISO 4217 code", examples=["EUR"])
]
Timestamp = Annotated[datetime, Field(description="RFC 3339, in UTC")]
Day = Annotated[date, Field(description="ISO 8601 date")]


class FieldProblem(BaseModel):
    model_config = ConfigDict(title="FieldProblem")

    field: str = Field(
        description="The input at fault: a body field by its path (lines.0.amount), a "
        "parameter or header by its name, or body"
    )
    message: str


class Problem(BaseModel):
    """An error (RFC 9457). ``type`` names the kind; ``field`` and ``errors`` say which input
    is at fault; other members are the extensions a kind carries."""

    model_config = ConfigDict(title="Problem", extra="allow")

    type: str = Field(
        json_schema_extra={"format": "uri"},
        examples=[PROBLEM_BASE + "validation-failed"],
    )
    title: str
    status: int = Field(ge=400, le=599)
    detail: str
    instance: str | SkipJsonSchema[None] = Field(default=None, description="The request path")
    field: str | SkipJsonSchema[None] = None
    errors: list[FieldProblem] | SkipJsonSchema[None] = None
    required_scope: str | SkipJsonSchema[None] = Field(
        default=None, description="403: the scope the call needs"
    )
    dependency: Literal["database", "broker"] | SkipJsonSchema[None] = Field(
        default=None, description="503: what is unavailable"
    )
    checks: dict[str, bool] | SkipJsonSchema[None] = Field(
        default=None, description="/readyz: every readiness check and its state"
    )
    failing: list[str] | SkipJsonSchema[None] = Field(
        default=None, description="/readyz: the checks that fail"
    )
    reason: Literal["other_request", "in_flight"] | SkipJsonSchema[None] = Field(
        default=None,
        description="409 for an Idempotency-Key: used for another request, or its request "
        "still runs",
    )
    error_id: str | SkipJsonSchema[None] = Field(
        default=None, description="500: quote it to the operators; the log line has it"
    )


_RETRY_AFTER = {
    "description": f"Seconds to wait before sending the request again (about {RETRY_AFTER_S})",
    "schema": {"type": "integer", "minimum": 0},
}
_WWW_AUTHENTICATE = {
    "description": 'Bearer challenge (RFC 6750), e.g. Bearer realm="creditwatch", '
    'error="invalid_token"',
    "schema": {"type": "string"},
}
_DEFAULT_DESCRIPTIONS: Mapping[int, str] = {
    401: "No token, or not a valid one",
    403: "The token lacks the scope this call needs",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "The body is over 64 KiB",
    422: "A parameter or body field is invalid (named in field and errors)",
    500: "An unexpected error; error_id ties it to the log",
    503: "A dependency (database or broker) is unavailable; try again after Retry-After",
}


def problem_response(status: int, description: str | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description or _DEFAULT_DESCRIPTIONS.get(status, "Error"),
        "content": {PROBLEM_CONTENT_TYPE: {"schema": {"$ref": _REF + "Problem"}}},
    }
    if status == 503:
        response["headers"] = {"Retry-After": _RETRY_AFTER}
    elif status in (401, 403):
        response["headers"] = {"WWW-Authenticate": _WWW_AUTHENTICATE}
    return response


def problems(described: Mapping[int, str]) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for the problems a route answers besides the ones `install`
    adds to every route (401 and 403 with a token, 422 with parameters or a body, 413 with a
    body, 500, 503), or to say more about one of those: ``{404: "No such customer"}`` (an
    empty description: the status's usual one)."""
    return {status: problem_response(status, text or None) for status, text in described.items()}


def ok(
    model: type[BaseModel] | None,
    description: str = "OK",
    *,
    status: int = 200,
    location: str | None = None,
    errors: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """The decorator arguments documenting a route: its success (``model``'s schema; the
    route still sends its own dictionary, unvalidated: ``response_model=None``), the
    ``Location`` header of a 201 (``location`` says what it names) and the `problems`
    ``errors`` it answers besides everyone's."""
    success: dict[str, Any] = {"description": description}
    if model is not None:
        success["model"] = model
    if location is not None:
        success["headers"] = {"Location": {"description": location, "schema": {"type": "string"}}}
    responses: dict[int | str, dict[str, Any]] = {status: success, **problems(errors or {})}
    return {"response_model": None, "status_code": status, "responses": responses}


# --------------------------------------------------------------------------------------------
# The document


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A parameter's ``anyOf: [X, null]`` as X: a query parameter is absent, never null."""
    branches = schema.get("anyOf")
    if not isinstance(branches, list):
        return schema
    rest = [b for b in branches if b != {"type": "null"}]
    if len(rest) != 1 or len(rest) == len(branches):
        return schema
    merged = {k: v for k, v in schema.items() if k != "anyOf"}
    merged.update(rest[0])
    if merged.get("default", 0) is None:
        del merged["default"]
    return merged


# shared.idempotency's header, on every POST (its middleware wraps every service's app).
IDEMPOTENCY_KEY = "Idempotency-Key"
IDEMPOTENT_REPLAYED = "Idempotent-Replayed"
# 1 to 255 printable ASCII characters, bare or as a Structured Field String ("...", with \"
# and \\ the only escapes); white space around it is no part of it.
IDEMPOTENCY_KEY_PATTERN = r'^[ \t]*(?:"(?:[ !#-\[\]-~]|\\["\\]){1,255}"|[!#-~][ -~]{0,254})[ \t]*$'


def _idempotent(operation: dict[str, Any]) -> None:
    """What ``Idempotency-Key`` adds to a POST: the header, its 409, the replay's mark."""
    operation.setdefault("parameters", []).append(
        {
            "name": IDEMPOTENCY_KEY,
            "in": "header",
            "required": False,
            "description": "Makes a retry safe: the same key (per principal and path) with the "
            "same body within 24 h gets the first answer again, marked Idempotent-Replayed; "
            "with another body, or while the first is still running, 409.",
            "schema": {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN},
        }
    )
    responses: dict[str, Any] = operation.setdefault("responses", {})
    conflict = "The Idempotency-Key was used for another body, or its request is still running"
    if "409" in responses:
        responses["409"]["description"] += "; or: " + conflict[0].lower() + conflict[1:]
    else:
        responses["409"] = problem_response(409, conflict)
    for code, response in responses.items():
        if code.startswith("2"):
            response.setdefault("headers", {})[IDEMPOTENT_REPLAYED] = {
                "description": "true on an answer replayed for a repeated Idempotency-Key",
                "schema": {"type": "string", "enum": ["true"]},
            }


def _finish_operation(operation: dict[str, Any], method: str) -> None:
    if method == "post":
        _idempotent(operation)
    responses: dict[str, Any] = operation.setdefault("responses", {})
    for parameter in operation.get("parameters", []):
        parameter["schema"] = _without_null(parameter.get("schema", {}))
        if "description" not in parameter and "description" in parameter["schema"]:
            parameter["description"] = parameter["schema"]["description"]
    standard = [500, 503]
    if operation.get("security"):
        standard[:0] = [401, 403]
    if operation.get("parameters") or operation.get("requestBody"):
        standard.append(422)
    if operation.get("requestBody"):
        standard.append(413)
    for code in standard:
        responses.setdefault(str(code), problem_response(code))
    # FastAPI's own 422 (HTTPValidationError, application/json) is never what is sent.
    for key, response in responses.items():
        content = response.get("content", {})
        schema = content.get("application/json", {}).get("schema", {})
        if schema.get("$ref", "").endswith("/HTTPValidationError"):
            responses[key] = problem_response(int(key))
    operation["responses"] = dict(sorted(responses.items()))


def _hoisted(model: type[BaseModel]) -> dict[str, dict[str, Any]]:
    schema = model.model_json_schema(ref_template=_REF + "{model}")
    found = schema.pop("$defs", {})
    return {**found, model.__name__: schema}


def finish(document: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's document with the services' error format and parameter rules."""
    for item in document.get("paths", {}).values():
        for method, operation in item.items():
            _finish_operation(operation, method)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas.update(_hoisted(Problem))
    document["components"]["schemas"] = dict(sorted(schemas.items()))
    return document


def _docs_page(title: str, body: str, static: str) -> HTMLResponse:
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n"
        f'<link rel="icon" type="image/png" href="{static}/swagger-ui/favicon-32x32.png">\n'
        f"{body}\n</html>\n"
    )
    # Nothing but this origin: the pages must work (and be seen to work) without a network.
    return HTMLResponse(
        page,
        headers={
            "Content-Security-Policy": (
                "default-src 'self'; script-src 'self' 'unsafe-inline'; "
                "style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                "font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'"
            )
        },
    )


def _swagger_ui(openapi_url: str, title: str, static: str) -> HTMLResponse:
    config = json.dumps(
        {
            "url": openapi_url,
            "dom_id": "#swagger-ui",
            "deepLinking": True,
            "layout": "BaseLayout",
            "validatorUrl": None,
            "persistAuthorization": True,
            "tryItOutEnabled": False,
        }
    )
    return _docs_page(
        f"{title} — Swagger UI",
        f'<link rel="stylesheet" href="{static}/swagger-ui/swagger-ui.css">\n</head>\n'
        '<body>\n<div id="swagger-ui"></div>\n'
        f'<script src="{static}/swagger-ui/swagger-ui-bundle.js"></script>\n'
        "<script>\n"
        f"const config = {config};\n"
        "config.presets = [SwaggerUIBundle.presets.apis];\n"
        "window.ui = SwaggerUIBundle(config);\n"
        "</script>\n</body>",
        static,
    )


def _redoc(openapi_url: str, title: str, static: str) -> HTMLResponse:
    return _docs_page(
        f"{title} — ReDoc",
        "<style>body { margin: 0; padding: 0; }</style>\n</head>\n<body>\n"
        f'<redoc spec-url="{html.escape(openapi_url)}"></redoc>\n'
        f'<script type="module" src="{static}/redoc/redoc.standalone.js"></script>\n'
        "</body>",
        static,
    )


_TAGS: dict[str, str] = {}


def tag(name: str, description: str) -> str:
    """A tag (one per resource) and what it groups, for every document that uses it."""
    _TAGS[name] = description
    return name


def _tags_of(document: Mapping[str, Any]) -> list[dict[str, str]]:
    names: dict[str, None] = {}
    for item in document.get("paths", {}).values():
        for operation in item.values():
            names.update(dict.fromkeys(operation.get("tags", [])))
    return [{"name": n, "description": _TAGS[n]} if n in _TAGS else {"name": n} for n in names]


def install(app: FastAPI) -> None:
    """The app's ``/openapi.json`` as `finish` makes it, ``/docs`` and ``/redoc`` served
    with the vendored assets (the app must be made with ``docs_url=None, redoc_url=None``)."""
    openapi_url = app.openapi_url or "/openapi.json"

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            document["tags"] = _tags_of(document)
            app.openapi_schema = finish(copy.deepcopy(document))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.mount(STATIC_URL, StaticFiles(directory=STATIC), name="docs-static")

    def page(render: Callable[[str, str, str], HTMLResponse]) -> Callable[[Request], Any]:
        async def serve(request: Request) -> HTMLResponse:
            root = request.scope.get("root_path", "").rstrip("/")
            return render(root + openapi_url, app.title, root + STATIC_URL)

        return serve

    app.add_route("/docs", page(_swagger_ui), include_in_schema=False)
    app.add_route("/redoc", page(_redoc), include_in_schema=False)
