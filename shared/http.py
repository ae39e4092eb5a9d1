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
from typing import Annotated, Any

from fastapi import FastAPI, Path, Query
from pydantic import AfterValidator
from starlette.responses import JSONResponse, Response

from shared.auth import TokenRegistry
from shared.metrics import HttpMetrics, metrics_response
from shared.problems import (
    DEFAULT_MAX_BODY_BYTES,
    BodySizeLimit,
    ServiceUnavailable,
    Unavailable,
    install,
    problem_response,
)
from shared.settings import ConfigError, Settings

__all__ = [
    "MAX_CURSOR_CHARS",
    "MAX_PARAM_CHARS",
    "READINESS_TIMEOUT_S",
    "CursorParam",
    "PathText",
    "Printable",
    "QueryText",
    "Readiness",
    "create_app",
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
PathText = Annotated[str, Path(max_length=MAX_PARAM_CHARS), Printable]
QueryText = Annotated[str | None, Query(max_length=MAX_PARAM_CHARS), Printable]
CursorParam = Annotated[
    str | None,
    Query(max_length=MAX_CURSOR_CHARS, description="next_cursor of the previous page"),
    Printable,
]


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
            f"The creditwatch {service} service. Calls under /v1 need "
            "'Authorization: Bearer <token>'; errors are application/problem+json (RFC 9457)."
        ),
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.settings = settings
    app.state.tokens = tokens

    install(app)
    # Innermost: a route that finds its database away answers 503, which metrics then count.
    app.add_middleware(Unavailable, service=service)
    # Added last = outermost: metrics also see the 413s the size limit answers.
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    app.add_middleware(HttpMetrics, service=service)

    @app.get(
        "/healthz",
        tags=["ops"],
        summary="Liveness: the process answers and its background loops have not died",
        responses={503: {"description": "Restart me"}},
    )
    async def healthz() -> Response:
        fatal = liveness() if liveness is not None else None
        if fatal is None:
            return JSONResponse({"status": "ok"})
        problem = ServiceUnavailable(f"A background loop stopped: {fatal}", title="Not alive")
        return problem_response(problem.to_problem("/healthz"))

    @app.get(
        "/readyz",
        tags=["ops"],
        summary="Readiness: database and broker reachable, consumers assigned",
        responses={503: {"description": "Not ready; the failing checks are listed"}},
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

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=Response)
    def metrics() -> Response:
        # Sync on purpose: FastAPI runs it in the threadpool, so rendering many series does
        # not stall the event loop that serves the credit checks.
        return metrics_response()

    return app
