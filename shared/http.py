"""The FastAPI application every service starts from: errors, limits, metrics and probes.

`create_app` returns an app with ``/healthz``, ``/readyz`` and ``/metrics`` (no token needed),
problem+json errors (503 with ``Retry-After`` while a database or broker is away), the 64 KiB
body limit and HTTP metrics; services add their routers, whose path and query parameters are
typed with `PathText`, `QueryText` or `Printable` so that they are validated like body fields.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Path, Query
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import AfterValidator, BaseModel, Field
from starlette.responses import JSONResponse, Response

from shared import openapi
from shared.auth import TokenRegistry
from shared.metrics import HttpMetrics, metrics_response
from shared.openapi import TEXT_PATTERN
from shared.pagination import MAX_PAGE
from shared.policy import Policy
from shared.problems import (
    DEFAULT_MAX_BODY_BYTES,
    BodySizeLimit,
    ServiceUnavailable,
    Unavailable,
    ValidationFailed,
    install,
    problem_response,
)
from shared.settings import ConfigError, Settings

__all__ = [
    "MAX_CURSOR_CHARS",
    "MAX_ORDER_ID_CHARS",
    "MAX_PARAM_CHARS",
    "READINESS_TIMEOUT_S",
    "CursorParam",
    "OrderIdPath",
    "PageLimit",
    "PathText",
    "Printable",
    "QueryText",
    "Readiness",
    "check_grade",
    "create_app",
    "grade_query",
]

log = logging.getLogger(__name__)

Readiness = Callable[[], Awaitable[dict[str, bool]]]
Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[Any]]

# A probe that hangs is a failed probe; Kubernetes would otherwise pile up pending checks.
READINESS_TIMEOUT_S = 5.0


# The contract caps string fields at 1,000 characters; parameters are held to the same.
MAX_PARAM_CHARS = 1000
# A cursor carries a page's last sort key and the list's filters (ids and a grade of up to
# 1,000 characters each), base64-encoded: room for them, still bounded.
MAX_CURSOR_CHARS = 4096

# C0 controls, DEL and C1 controls (Unicode category Cc). PostgreSQL's text cannot store
# U+0000 (asyncpg raised, and the request was a 500); the others are never part of an id, a
# grade or a filter, and in a log line they forge lines or drive the terminal.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _printable(value: str | None) -> str | None:
    found = _CONTROL.search(value) if value is not None else None
    if found is None:
        return value
    code = ord(found.group())
    # Worded as for a body's text (shared.body.NulInText), whose field is named the same way.
    if code == 0:
        raise ValueError("NUL (U+0000) is not allowed in text")
    raise ValueError(f"control character U+{code:04X} is not allowed in text")


# Path and query parameters get the same treatment as a body's strings: FastAPI validates them
# after authentication, and a failure is a 422 problem naming the parameter, before anything
# reaches the database. `Printable` adds the control-character rule to a parameter with a
# constraint of its own: ``Annotated[str | None, Query(max_length=255), Printable]``.
Printable = AfterValidator(_printable)
# The rule in the OpenAPI document; the check itself is `Printable`'s, whose message names
# the character (a pattern's would only quote the pattern).
_TEXT = {"pattern": TEXT_PATTERN}
PathText = Annotated[
    str, Path(min_length=1, max_length=MAX_PARAM_CHARS, json_schema_extra=_TEXT), Printable
]
QueryText = Annotated[
    str | None, Query(max_length=MAX_PARAM_CHARS, json_schema_extra=_TEXT), Printable
]
# An order id is at most 255 characters wherever it is given (CheckRequest.order_id).
MAX_ORDER_ID_CHARS = 255
OrderIdPath = Annotated[
    str,
    Path(
        min_length=1,
        max_length=MAX_ORDER_ID_CHARS,
        description="The order id the credit check was made for",
        json_schema_extra=_TEXT,
    ),
    Printable,
]
CursorParam = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=MAX_CURSOR_CHARS,
        description="Opaque: the next_cursor of the previous page of the same list (same "
        "filters and sort); any other value is refused (422, field cursor)",
        json_schema_extra={"pattern": "^[A-Za-z0-9_=-]+$"},
    ),
    Printable,
]
PageLimit = Annotated[
    int, Query(ge=1, le=MAX_PAGE, description=f"Items per page, at most {MAX_PAGE}")
]


OPS = openapi.tag("operations", "Probes and metrics; no token needed")


class Alive(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]
    checks: dict[str, bool] = Field(description="Every readiness check (all true here)")


def grade_query(policy: Policy) -> Any:
    """The default of a ``grade`` query parameter, ``grade: str | None = grade_query(p)``:
    one of the policy's grades (`check_grade` checks it; the route's own annotation could not
    name a policy, which is the route builder's)."""
    names = [g.name for g in policy.grades]
    return Query(
        default=None,
        max_length=MAX_PARAM_CHARS,
        description=f"A grade of the policy ({', '.join(names)})",
        json_schema_extra={"enum": names},
    )


def check_grade(policy: Policy, grade: str | None, field: str = "grade") -> None:
    """422 naming ``field`` unless ``grade`` is absent or one of the policy's grades."""
    names = [g.name for g in policy.grades]
    if grade is not None and grade not in names:
        raise ValidationFailed(
            f"{field}: {grade[:20]!r} is not a grade of policy {policy.version} "
            f"(grades are {', '.join(names)})",
            field=field,
        )


def _operation_id(route: APIRoute) -> str:
    return route.name


def _package_version() -> str:
    try:
        return version("creditwatch")
    except PackageNotFoundError:
        return "0.0.0+unknown"


def create_app(
    service: str,
    *,
    settings: Settings,
    tokens: TokenRegistry,
    readiness: Readiness,
    lifespan: Lifespan | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    liveness: Callable[[], str | None] | None = None,
) -> FastAPI:
    """The service's app; ``app.state`` carries ``service``, ``settings`` and ``tokens``.

    ``readiness()`` returns named checks (e.g. ``{"database": True, "broker": True,
    "consumer_assigned": False}``); ``/readyz`` answers 200 when all are true, else 503.
    """
    if not tokens and not settings.dev_mode:
        raise ConfigError(
            f"{service}: no API tokens configured; outside dev mode the service refuses to start"
        )

    app = FastAPI(
        title=f"creditwatch {service}",
        version=_package_version(),
        description=(
            f"The creditwatch {service} service. Calls under `/v1` need "
            "`Authorization: Bearer <token>`; errors are `application/problem+json` "
            "(RFC 9457). See docs/contract.md for the contract in words."
        ),
        openapi_url="/openapi.json",
        # Served by shared.openapi from vendored files, not from a CDN.
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        # Operation ids are the routes' function names (credit_check, portfolio, ...):
        # what a generated client calls them.
        generate_unique_id_function=_operation_id,
    )
    app.state.service = service
    app.state.settings = settings
    app.state.tokens = tokens

    install(app)
    openapi.install(app)
    # Innermost: a route that finds its database away answers 503, which metrics then count.
    app.add_middleware(Unavailable, service=service)
    # Added last = outermost: metrics also see the 413s the size limit answers.
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    app.add_middleware(HttpMetrics, service=service)

    @app.get(
        "/healthz",
        tags=[OPS],
        summary="Liveness",
        description="The process answers and its background loops (consumer, relay, "
        "scheduler) have not stopped for good; 503 once one has (restart the process).",
        **openapi.ok(Alive, "Alive", errors={503: "Not alive: a background loop stopped"}),
    )
    async def healthz() -> Response:
        fatal = liveness() if liveness is not None else None
        if fatal is None:
            return JSONResponse({"status": "ok"})
        problem = ServiceUnavailable(f"A background loop stopped: {fatal}", title="Not alive")
        return problem_response(problem.to_problem("/healthz"))

    @app.get(
        "/readyz",
        tags=[OPS],
        summary="Readiness",
        description="The database and the broker are reachable, the consumer has its "
        "partitions and the relay publishes; 503 with the failing checks (and Retry-After) "
        "otherwise.",
        **openapi.ok(Ready, "Ready", errors={503: "Not ready: checks and failing name why"}),
    )
    async def readyz() -> Response:
        try:
            async with asyncio.timeout(READINESS_TIMEOUT_S):
                checks = dict(await readiness())
        except TimeoutError:
            log.warning("%s: readiness checks timed out after %ss", service, READINESS_TIMEOUT_S)
            checks = {"readiness": False}
        except Exception:
            log.warning("%s: readiness checks failed", service, exc_info=True)
            checks = {"readiness": False}
        failing = sorted(name for name, ok in checks.items() if not ok)
        if not failing:
            return JSONResponse({"status": "ready", "checks": checks})
        problem = ServiceUnavailable(
            f"Not ready: {', '.join(failing)}.",
            title="Not ready",
            checks=checks,
            failing=failing,
        )
        return problem_response(problem.to_problem("/readyz"), headers={"Retry-After": "1"})

    @app.get(
        "/metrics",
        tags=[OPS],
        summary="Prometheus metrics",
        description="The service's metrics in the Prometheus text exposition format.",
        response_class=Response,
        responses={
            200: {
                "description": "The metrics",
                "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
            }
        },
    )
    def metrics() -> Response:
        # Sync on purpose: FastAPI runs it in the threadpool, so rendering many series does
        # not stall the event loop that serves the credit checks.
        return metrics_response()

    return app
