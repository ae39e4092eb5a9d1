"""``POST /v1/credit-checks`` without the framework's layers, for the requests that are plainly
fine: the order-entry hot path.

A pure-ASGI middleware in front of the app. It answers a check itself only when the caller's
token holds ``credit:check``, the body is within the size limit and valid for the same
``CheckRequest`` model, and the decision comes back without an error. Anything else — no or a
bad token, a missing scope, an oversize or malformed body, a conflict, a failure — goes on to
the full application with the body replayed, which answers exactly as it would have anyway
(401/403/413/422/409/500 problem+json; a check that failed stored nothing, so it is simply
tried again there). A check that failed because the database is away is answered here, 503
with ``Retry-After`` as the full app would: trying it again there would only double the
wait. Either way the same metrics move and the same log lines are written.
"""

from __future__ import annotations

import time

import orjson
from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from services.limits.api import CheckRequest, answered
from services.limits.checks import CheckOrder, CreditChecks, Verdict
from shared import metrics
from shared.auth import Principal, TokenRegistry, parse_bearer
from shared.body import loads_exact
from shared.idempotency import no_receive, replay_receive
from shared.problems import outage_response
from shared.transient import is_transient

PATH = "/v1/credit-checks"
SCOPE = "credit:check"
_JSON = [(b"content-type", b"application/json")]


class FastCreditCheck:
    def __init__(
        self,
        app: ASGIApp,
        *,
        checks: CreditChecks,
        tokens: TokenRegistry,
        service: str,
        max_body_bytes: int,
    ) -> None:
        self.app = app
        self.checks = checks
        self.tokens = tokens
        self.max_body_bytes = max_body_bytes
        self.service = service
        self._requests = metrics.HTTP_REQUESTS.labels(service, PATH, "POST", "200")
        self._unavailable_requests = metrics.HTTP_REQUESTS.labels(service, PATH, "POST", "503")
        self._seconds = metrics.HTTP_REQUEST_SECONDS.labels(service, PATH)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        principal = self._principal(scope)
        if principal is None:
            await self.app(scope, receive, send)
            return
        body, complete = await self._read(receive)
        order = self._order(body, principal) if complete else None
        verdict: Verdict | None = None
        if order is not None:
            try:
                verdict = await self.checks.check(order)
            except Exception as exc:
                if is_transient(exc):
                    await self._unavailable(exc, scope, send, started)
                    return
                verdict = None  # nothing was stored; the full app tries again and answers
        if order is None or verdict is None:
            await self.app(scope, replay_receive(body, complete, receive), send)
            return
        answered(verdict, order, started)
        payload = orjson.dumps(verdict.body)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [*_JSON, (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload})
        self._requests.inc()
        self._seconds.observe(time.perf_counter() - started)

    async def _unavailable(self, exc: Exception, scope: Scope, send: Send, started: float) -> None:
        response = outage_response(exc, self.service, "POST", PATH)
        await response(scope, no_receive, send)
        self._unavailable_requests.inc()
        self._seconds.observe(time.perf_counter() - started)

    def _principal(self, scope: Scope) -> Principal | None:
        header = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                if header is not None:
                    return None  # two of them: let the full app judge
                header = value
        if header is None:
            return None
        token = parse_bearer(header.decode("latin-1"))
        if token is None:
            return None
        principal = self.tokens.authenticate(token)
        return principal if principal is not None and principal.allows(SCOPE) else None

    async def _read(self, receive: Receive) -> tuple[bytes, bool]:
        """The body, and whether it is all there within the limit (else part of it)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks), False
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if size > self.max_body_bytes:
                return b"".join(chunks), False
            if not message.get("more_body", False):
                return b"".join(chunks), True

    def _order(self, body: bytes, principal: Principal) -> CheckOrder | None:
        try:
            req = CheckRequest.model_validate(loads_exact(body))
        except (ValueError, UnicodeDecodeError, ValidationError):
            return None
        return CheckOrder(
            order_id=req.order_id,
            customer_id=req.customer_id,
            amount=req.amount,
            currency=req.currency,
            reserve=req.reserve,
            requested_by=principal.name,
        )
