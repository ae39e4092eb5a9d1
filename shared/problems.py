"""The `CreditwatchError` family and its one mapping to RFC 9457 ``application/problem+json``.

`install(app)` registers the handlers; `BodySizeLimit` is the ASGI guard for HTTP bodies over
64 KiB (contract §5); `Unavailable` answers 503 with ``Retry-After`` for a request that failed
because a database or broker is away (`shared.transient`'s rule), where a bug stays a 500.
Every error body has ``type``, ``title``, ``status``, ``detail`` and ``instance`` (the
request path); ``field`` and ``errors`` [{field, message}] are present when the error is
about particular input fields (a body's by their path in it, a path or query parameter by
its name).
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections.abc import Mapping, Sequence
from functools import cache
from http import HTTPStatus
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import iter_route_contexts
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.transient import is_transient

__all__ = [
    "PROBLEM_BASE",
    "PROBLEM_CONTENT_TYPE",
    "RETRY_AFTER_S",
    "BodySizeLimit",
    "Conflict",
    "CreditwatchError",
    "FieldError",
    "Forbidden",
    "NotFound",
    "PayloadTooLarge",
    "ServiceUnavailable",
    "TemporarilyUnavailable",
    "Unauthorized",
    "Unavailable",
    "ValidationFailed",
    "install",
    "outage_response",
    "problem_response",
]

log = logging.getLogger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_BASE = "https://creditwatch.dev/problems/"
DEFAULT_MAX_BODY_BYTES = 64 * 1024

FieldError = dict[str, str]  # {"field": "amount", "message": "..."}


class CreditwatchError(Exception):
    """An error with an HTTP meaning; raise it anywhere below a route and `install` renders it.

    ``extra`` keyword arguments become RFC 9457 extension members of the problem body, so
    they must be JSON-serialisable and must not carry secrets.
    """

    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal-error"
    default_title: ClassVar[str] = "Internal server error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        field: str | None = None,
        errors: Sequence[FieldError] | None = None,
        title: str | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        self.title = title or self.default_title
        self.detail = detail or self.title
        self.field = field
        if errors is None and field is not None:
            errors = [{"field": field, "message": _unprefixed(self.detail, field)}]
        self.errors: list[FieldError] | None = list(errors) if errors is not None else None
        self.headers: dict[str, str] = dict(headers or {})
        self.extra: dict[str, Any] = extra
        super().__init__(self.detail)

    @property
    def type(self) -> str:
        return PROBLEM_BASE + self.slug

    def to_problem(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance is not None:
            body["instance"] = instance
        if self.field is not None:
            body["field"] = self.field
        if self.errors is not None:
            body["errors"] = self.errors
        for key, value in self.extra.items():
            body.setdefault(key, value)
        return body

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.detail!r}, field={self.field!r})"


class NotFound(CreditwatchError):
    status = 404
    slug = "not-found"
    default_title = "Not found"


class Conflict(CreditwatchError):
    status = 409
    slug = "conflict"
    default_title = "Conflict"


class Unauthorized(CreditwatchError):
    """401; always carries ``WWW-Authenticate: Bearer …`` (RFC 6750)."""

    status = 401
    slug = "unauthorized"
    default_title = "Unauthorized"

    def __init__(
        self,
        detail: str | None = None,
        *,
        error: str | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        challenge = 'Bearer realm="creditwatch"'
        if error is not None:
            challenge += f', error="{error}"'
        merged = {"WWW-Authenticate": challenge, **(headers or {})}
        super().__init__(detail, headers=merged, **extra)


class Forbidden(CreditwatchError):
    status = 403
    slug = "forbidden"
    default_title = "Forbidden"


class ValidationFailed(CreditwatchError):
    """422 about one input field (``field``) or several (``errors``)."""

    status = 422
    slug = "validation-failed"
    default_title = "Validation failed"


class PayloadTooLarge(CreditwatchError):
    status = 413
    slug = "payload-too-large"
    default_title = "Payload too large"


class ServiceUnavailable(CreditwatchError):
    status = 503
    slug = "service-unavailable"
    default_title = "Service unavailable"


# How long a client is asked to wait before trying again while a dependency is away: about
# what a database restart or a fail-over takes; a client that retries sooner only adds load.
RETRY_AFTER_S = 2


class TemporarilyUnavailable(ServiceUnavailable):
    """503 with ``Retry-After``: a dependency (``database``, ``broker``) is away for a while;
    the same request can be sent again then (a credit check sent again gets the decision
    made for its order, if one was made)."""

    slug = "temporarily-unavailable"
    default_title = "Service temporarily unavailable"

    def __init__(
        self,
        detail: str | None = None,
        *,
        retry_after: int = RETRY_AFTER_S,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        merged = {"Retry-After": str(retry_after), **(headers or {})}
        super().__init__(detail, headers=merged, **extra)


# --------------------------------------------------------------------------------------------
# Rendering


def problem_response(
    body: Mapping[str, Any], *, headers: Mapping[str, str] | None = None
) -> Response:
    """A ``application/problem+json`` response whose status is ``body["status"]``."""
    return Response(
        content=json.dumps(body, ensure_ascii=False, separators=(",", ":"), default=str),
        status_code=int(body["status"]),
        headers=dict(headers or {}),
        media_type=PROBLEM_CONTENT_TYPE,
    )


def _status_problem(status: int, detail: str | None, instance: str) -> dict[str, Any]:
    """A problem for a bare status code (Starlette's 404/405, a stray HTTPException)."""
    known = _BY_STATUS.get(status)
    if known is not None:
        slug, title = known.slug, known.default_title
    else:
        try:
            title = HTTPStatus(status).phrase
        except ValueError:
            title = "Error"
        slug = title.lower().replace(" ", "-").replace("'", "")
    if status == 404 and (not detail or detail == HTTPStatus.NOT_FOUND.phrase):
        detail = f"No resource at {instance}"
    return {
        "type": PROBLEM_BASE + slug,
        "title": title,
        "status": status,
        "detail": detail or title,
        "instance": instance,
    }


_BY_STATUS: dict[int, type[CreditwatchError]] = {
    cls.status: cls
    for cls in (
        CreditwatchError,
        NotFound,
        Conflict,
        Unauthorized,
        Forbidden,
        ValidationFailed,
        PayloadTooLarge,
        ServiceUnavailable,
    )
}


_LOCATION_SOURCES = frozenset({"body", "query", "path", "header", "cookie"})


def _field_of(location: Sequence[Any], error_type: str) -> str:
    """``("body", "lines", 0, "amount")`` → ``"lines.0.amount"``; bad JSON → ``"body"``."""
    parts = list(location)
    if error_type == "json_invalid" or parts in ([], ["body"]):
        return "body"
    if parts and parts[0] in _LOCATION_SOURCES:
        parts = parts[1:]
    return ".".join(str(part) for part in parts) or "body"


def _message_of(error: Mapping[str, Any]) -> str:
    message = str(error.get("msg", "invalid value"))
    if error.get("type") == "json_invalid":
        reason = (error.get("ctx") or {}).get("error")
        return f"Invalid JSON: {reason}" if reason else "Invalid JSON"
    # Messages a validator raised with ValueError/AssertionError are passed on verbatim.
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            return message[len(prefix) :]
    return message


def _unprefixed(message: str, field: str) -> str:
    """A message without the field's name in front (the problem names it apart, and its
    ``detail`` puts it in front again)."""
    prefix = f"{field}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def validation_problem(exc: RequestValidationError, instance: str) -> dict[str, Any]:
    # Never echo the input: it is the caller's own data at best and a secret at worst.
    errors: list[FieldError] = [
        {"field": field, "message": _unprefixed(_message_of(err), field)}
        for err in exc.errors()
        for field in (_field_of(err.get("loc", ()), str(err.get("type", ""))),)
    ] or [{"field": "body", "message": "Invalid request"}]
    first = errors[0]
    detail = f"{first['field']}: {first['message']}"
    if len(errors) > 1:
        detail += f" (and {len(errors) - 1} more)"
    problem = ValidationFailed(detail, field=first["field"], errors=errors)
    return problem.to_problem(instance)


async def _handle_creditwatch_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, CreditwatchError)
    if exc.status >= 500:
        log.warning("%s on %s %s: %s", exc.type, request.method, request.url.path, exc.detail)
    return problem_response(exc.to_problem(request.url.path), headers=exc.headers)


async def _handle_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return problem_response(validation_problem(exc, request.url.path))


def _allowed_methods(request: Request) -> str | None:
    """Every method some route serves the request's path with (Starlette's 405 names only
    those of the first route that matched the path: POST, where DELETE is served too)."""
    methods: set[str] = set()
    path = request.scope.get("path", "")
    root = request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    for route in iter_route_contexts(request.app.routes):
        template = route.path_format
        if route.methods and template and compile_path(template)[0].fullmatch(path):
            methods |= route.methods
    return ", ".join(sorted(methods)) if methods else None


async def _handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else None
    body = _status_problem(exc.status_code, detail, request.url.path)
    if exc.status_code in (204, 304):
        return Response(status_code=exc.status_code, headers=exc.headers)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        allowed = _allowed_methods(request)
        if allowed is not None:
            headers["Allow"] = allowed
    return problem_response(body, headers=headers)


async def _handle_unexpected(request: Request, exc: Exception) -> Response:
    if is_transient(exc):
        # Only reached by an outage that got past `Unavailable` (it is innermost): still a 503.
        service = getattr(request.app.state, "service", "api")
        return outage_response(exc, service, request.method, request.url.path)
    # The id ties the client's report to the log line holding the traceback.
    error_id = secrets.token_hex(8)
    log.error(
        "unhandled %s on %s %s (error_id=%s)",
        type(exc).__name__,
        request.method,
        request.url.path,
        error_id,
        exc_info=exc,
    )
    body = _status_problem(500, "An unexpected error occurred.", request.url.path)
    body["error_id"] = error_id
    # Starlette re-raises the exception after this answer, and the server then ends the
    # connection: say so, so that a client does not send its next request down it.
    return problem_response(body, headers={"Connection": "close"})


def install(app: FastAPI) -> None:
    """Map every error the app can raise to problem+json.

    Unexpected exceptions are answered with a bare 500 by Starlette's
    ``ServerErrorMiddleware``, which then re-raises them to the server (uvicorn logs them;
    ``httpx.ASGITransport`` raises them unless ``raise_app_exceptions=False``).
    """
    app.add_exception_handler(CreditwatchError, _handle_creditwatch_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_exception)
    app.add_exception_handler(Exception, _handle_unexpected)


# --------------------------------------------------------------------------------------------
# Body size


class _BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """Pure-ASGI guard: 413 problem+json for request bodies over ``max_bytes``.

    A declared ``Content-Length`` over the limit is refused before the app runs. A body without
    one (chunked) is counted as it streams; once it passes the limit the app's ``receive``
    raises, whatever response the app then tries to send is dropped and the 413 is sent
    instead, so no more than ``max_bytes`` plus one chunk is ever held.
    """

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0  # the server rejects malformed lengths itself
                if declared > self.max_bytes:
                    await self._send_413(scope, send)
                    return
                break

        received = 0
        exceeded = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            if exceeded:
                raise _BodyTooLarge
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if exceeded and not response_started:
                return  # the app's answer to a body it never fully saw; ours replaces it
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded or response_started:
                raise
        if exceeded and not response_started:
            await self._send_413(scope, send)

    async def _send_413(self, scope: Scope, send: Send) -> None:
        problem = PayloadTooLarge(
            f"Request bodies are limited to {self.max_bytes} bytes.", field="body"
        )
        response = problem_response(problem.to_problem(scope.get("path", "")))
        await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


# --------------------------------------------------------------------------------------------
# Outages


def _dependency_of(exc: BaseException) -> str:
    """Which dependency an outage is of, for the client and the log: the broker if a Kafka
    client's error is among the causes, else the database."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__module__.startswith("aiokafka"):
            return "broker"
        current = current.__cause__ or current.__context__
    return "database"


class _OutageReport:
    """The log of one service's 503s: a line at the first, then at most one every
    ``every`` seconds with how many were answered since. While a database is away every
    request fails; a line for each would bury everything else."""

    def __init__(self, service: str, every: float = 30.0) -> None:
        self.service = service
        self.every = every
        self._last = -math.inf
        self._since_last = 0

    def failed(self, exc: BaseException, dependency: str, method: str, path: str) -> None:
        now = time.monotonic()
        if now - self._last < self.every:
            self._since_last += 1
            return
        more = f" ({self._since_last} more since the last report)" if self._since_last else ""
        log.warning(
            "%s: %s %s answered 503: the %s is unavailable (%s)%s",
            self.service,
            method,
            path,
            dependency,
            f"{type(exc).__name__}: {exc}"[:300],
            more,
        )
        self._last = now
        self._since_last = 0


@cache
def _outage_report(service: str) -> _OutageReport:
    # One per service, shared by the app and whatever answers in front of it (the fast path).
    return _OutageReport(service)


def outage_response(exc: BaseException, service: str, method: str, path: str) -> Response:
    """The 503 problem for a request that failed because a dependency is away (``exc`` is
    transient), reported in the log at a bounded rate. The exception's text stays in the log:
    it names hosts and ports, nothing a client can act on."""
    dependency = _dependency_of(exc)
    _outage_report(service).failed(exc, dependency, method, path)
    problem = TemporarilyUnavailable(
        f"The {dependency} is unavailable at the moment. Try again in {RETRY_AFTER_S} seconds.",
        dependency=dependency,
    )
    return problem_response(problem.to_problem(path), headers=problem.headers)


class Unavailable:
    """Pure-ASGI: a request that fails because its database or broker is away — down,
    restarting, refusing connections, out of pooled connections — is answered 503 with
    ``Retry-After`` instead of 500 (``shared.transient.is_transient`` tells an outage from
    a bug, which stays a 500). Placed inside the error middleware, so the exception never
    reaches it, the server logs no traceback per request, and the connection stays open."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response_started = False

        async def watched_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception as exc:
            if response_started or not is_transient(exc):
                raise
            response = outage_response(exc, self.service, scope["method"], scope["path"])
            await response(scope, _no_receive, send)
