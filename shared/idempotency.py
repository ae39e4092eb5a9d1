"""``Idempotency-Key`` on the POST routes (IETF draft "The Idempotency-Key HTTP Header Field").

A POST carrying ``Idempotency-Key: "<key>"`` runs at most once per (principal, method, path,
key) while the key is remembered (``CREDITWATCH_IDEMPOTENCY_TTL_H``, 24 h): a retry with the
same body gets the first answer again (status, headers, body) marked
``Idempotent-Replayed: true``; the same key with another body, or while the first request is
still running, is 409 problem+json naming ``Idempotency-Key``; a key that is empty, longer
than 255 characters or not printable ASCII is 422 naming it. A POST without the header is
not affected.

`Idempotency` is pure ASGI and wraps the whole application, the credit-check fast path
included (`install` puts it outermost whatever middleware is added later). It keeps the keys
in the service's own database, table ``<service>_idempotency`` (`idempotency_table`), which
every replica of the service shares:

1. before the route runs, the key is *reserved*: a row "in flight" is inserted (the primary
   key is a hash of principal, method, path and key, so of two concurrent requests exactly
   one inserts it; the other finds it and answers 409 or the stored response);
2. the route runs; its response is held back until
3. it is stored in the row (``status`` set) and then sent.

A 5xx answer, or a route that raised, is not stored: the row is deleted again and the client
may retry (a 503 means the command did not happen). 401/403 (the caller's credentials, not
the request), 408, 413 and 429 are not stored either; any other 4xx is, like a 2xx: the
same request gets the same answer.

The row is not written in the command's own transaction (that would reach into every
route). The window that leaves: a process that dies after the command committed but before
the row got its response leaves the row in flight, and a retry is answered 409 until the key
expires — never run a second time. A row that could not be completed or deleted because the
database went away meanwhile is retried from memory (`IdempotencyStore.retry_pending`, by
the service's background loop); expired rows are deleted by that loop, and an expired key
met by a request is replaced at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    delete,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared import metrics
from shared.auth import Principal, TokenRegistry, parse_bearer
from shared.body import loads_exact
from shared.db import UtcDateTime
from shared.problems import (
    Conflict,
    CreditwatchError,
    ValidationFailed,
    outage_response,
    problem_response,
)
from shared.projection import insert_for
from shared.transient import is_transient

__all__ = [
    "HEADER",
    "MAX_KEY_CHARS",
    "REPLAYED_HEADER",
    "Claim",
    "Idempotency",
    "IdempotencyStore",
    "Seen",
    "StoredResponse",
    "canonical_json",
    "fingerprint",
    "idempotency_table",
    "install_idempotency",
    "key_hash",
    "parse_key",
    "replayed",
    "stored_headers",
]

log = logging.getLogger("creditwatch.idempotency")

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_CHARS = 255
_HEADER_NAME = b"idempotency-key"

# Answers that are not the request's outcome but the moment's or the caller's: not stored,
# so that the same key can be tried again (with other credentials, later, smaller).
_NOT_STORED = frozenset({401, 403, 408, 413, 429})
# Framing and per-connection headers: the replay has its own (content-length recomputed).
_NOT_REPLAYED = frozenset(
    {
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "date",
        "server",
        "set-cookie",
        REPLAYED_HEADER.lower(),
    }
)
# Completions and releases that failed (the database away) and wait to be tried again; past
# this many the oldest are given up on (their keys stay in flight until they expire).
MAX_PENDING = 10_000
PURGE_BATCH = 1000


# ---- the table --------------------------------------------------------------------------------


def idempotency_table(metadata: MetaData, service: str) -> Table:
    """``<service>_idempotency``: one row per (principal, method, path, key) remembered."""
    table = Table(
        f"{service}_idempotency",
        metadata,
        # SHA-256 (hex) of principal, method, path and key: a fixed-size primary key however
        # long the principal's name and the path are.
        Column("key_hash", String(64), primary_key=True),
        Column("principal", Text, nullable=False),
        Column("method", String(16), nullable=False),
        Column("path", Text, nullable=False),
        Column("idempotency_key", String(MAX_KEY_CHARS), nullable=False),
        # SHA-256 (hex) of the request: query string and body (see `fingerprint`).
        Column("fingerprint", String(64), nullable=False),
        # Who reserved the row: only that request completes or releases it.
        Column("reservation", String(32), nullable=False),
        Column("created_at", UtcDateTime, nullable=False),
        Column("expires_at", UtcDateTime, nullable=False),
        # The response; status null: the request is still in flight (or its process died).
        Column("status", Integer),
        Column("headers", Text),
        Column("body", LargeBinary),
        Column("completed_at", UtcDateTime),
    )
    Index(f"ix_{service}_idempotency_expires", table.c.expires_at)
    return table


# ---- pure parts -------------------------------------------------------------------------------


def _invalid(message: str) -> ValidationFailed:
    return ValidationFailed(f"{HEADER}: {message}", field=HEADER)


def _printable_ascii(text: str) -> bool:
    return all(0x20 <= ord(c) <= 0x7E for c in text)


def _sf_string(raw: str) -> str:
    """The value of a Structured Field String (RFC 8941 §3.3.3): ``"..."`` with ``\\"`` and
    ``\\\\`` the only escapes."""
    out: list[str] = []
    i = 1
    while i < len(raw):
        c = raw[i]
        if c == "\\":
            if i + 1 >= len(raw) or raw[i + 1] not in '"\\':
                raise _invalid('in a quoted key, a backslash may only escape " or \\')
            out.append(raw[i + 1])
            i += 2
            continue
        if c == '"':
            if i != len(raw) - 1:
                raise _invalid("nothing may follow the closing quote")
            return "".join(out)
        if not 0x20 <= ord(c) <= 0x7E:
            raise _invalid("must be printable ASCII")
        out.append(c)
        i += 1
    raise _invalid("the quoted key has no closing quote")


def parse_key(values: Sequence[bytes]) -> str:
    """The key of the request's ``Idempotency-Key`` header lines: a Structured Field String as
    the draft says (``"abc"``), or the bare text (``abc``) as many clients send it; 1 to 255
    printable ASCII characters. Anything else is `ValidationFailed` naming the header."""
    if len(values) != 1:
        raise _invalid("give the header once")
    raw = values[0].decode("latin-1").strip(" \t")
    key = _sf_string(raw) if raw.startswith('"') else raw
    if not key:
        raise _invalid("must not be empty")
    if len(key) > MAX_KEY_CHARS:
        raise _invalid(f"must be at most {MAX_KEY_CHARS} characters (got {len(key)})")
    if not _printable_ascii(key):
        raise _invalid("must be printable ASCII")
    return key


def canonical_json(value: Any) -> str:
    """One text for equal JSON values: object keys sorted, no white space; numbers as written
    (``1.50`` and ``1.5`` stay apart: amounts carry their scale)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int | Decimal):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ",".join(canonical_json(v) for v in value) + "]"
    if isinstance(value, dict):
        items = sorted(value.items())
        return "{" + ",".join(f"{canonical_json(k)}:{canonical_json(v)}" for k, v in items) + "}"
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def fingerprint(body: bytes, query: bytes = b"") -> str:
    """SHA-256 (hex) of a request: its query string and its body — as canonical JSON when it
    is JSON (so key order and white space do not make another request), else its bytes."""
    try:
        payload = b"json:" + canonical_json(loads_exact(body)).encode("utf-8")
    except (ValueError, UnicodeDecodeError, RecursionError, TypeError):
        payload = b"raw:" + body
    digest = hashlib.sha256()
    digest.update(b"%d:" % len(query) + query)
    digest.update(payload)
    return digest.hexdigest()


def key_hash(principal: str, method: str, path: str, key: str) -> str:
    scope = json.dumps([principal, method, path, key], ensure_ascii=False)
    return hashlib.sha256(scope.encode("utf-8")).hexdigest()


def stored_headers(raw: Sequence[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """A response's headers as they are replayed: all but framing and per-connection ones."""
    out: list[tuple[str, str]] = []
    for name, value in raw:
        text = name.decode("latin-1").lower()
        if text not in _NOT_REPLAYED:
            out.append((text, value.decode("latin-1")))
    return out


# ---- the store --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claim:
    """One request's key, in its scope, with the request's fingerprint."""

    principal: str
    method: str
    path: str
    key: str
    fingerprint: str
    reservation: str = field(default_factory=lambda: secrets.token_hex(16))

    @property
    def id(self) -> str:
        return key_hash(self.principal, self.method, self.path, self.key)


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


@dataclass(frozen=True, slots=True)
class Seen:
    """The key was there already: for which request, and its response (None: in flight)."""

    fingerprint: str
    created_at: datetime
    response: StoredResponse | None


class IdempotencyStore:
    """Reserves, completes, releases and purges one service's keys."""

    def __init__(self, engine: AsyncEngine, table: Table, *, ttl: timedelta) -> None:
        self.engine = engine
        self.table = table
        self.ttl = ttl
        # claim id → (claim, the response to store, or None: the row to delete)
        self._pending: dict[str, tuple[Claim, StoredResponse | None]] = {}

    async def reserve(self, claim: Claim, now: datetime) -> Seen | None:
        """Insert the key in flight for this request (None), or what is there already. An
        expired row is replaced. Concurrent requests with one key: one inserts, the other
        waits for its transaction (PostgreSQL's unique index; SQLite's one writer) and
        finds its row."""
        t = self.table
        for _ in range(3):
            async with self.engine.begin() as conn:
                await conn.execute(delete(t).where(t.c.key_hash == claim.id, t.c.expires_at <= now))
                inserted = (
                    await conn.execute(
                        insert_for(conn, t)
                        .values(
                            key_hash=claim.id,
                            principal=claim.principal,
                            method=claim.method,
                            path=claim.path,
                            idempotency_key=claim.key,
                            fingerprint=claim.fingerprint,
                            reservation=claim.reservation,
                            created_at=now,
                            expires_at=now + self.ttl,
                        )
                        .on_conflict_do_nothing(index_elements=[t.c.key_hash])
                        .returning(t.c.key_hash)
                    )
                ).first()
                if inserted is not None:
                    return None
                row = (
                    await conn.execute(
                        select(
                            t.c.fingerprint, t.c.created_at, t.c.status, t.c.headers, t.c.body
                        ).where(t.c.key_hash == claim.id)
                    )
                ).first()
            if row is not None:
                response = None
                if row.status is not None:
                    headers = [(str(n), str(v)) for n, v in json.loads(row.headers or "[]")]
                    response = StoredResponse(int(row.status), headers, bytes(row.body or b""))
                return Seen(row.fingerprint, row.created_at, response)
            # Deleted between the insert and the read (released, purged): try again.
        raise RuntimeError(f"{HEADER}: the key's row kept changing under this request")

    async def complete(self, claim: Claim, response: StoredResponse, now: datetime) -> None:
        t = self.table
        async with self.engine.begin() as conn:
            await conn.execute(
                update(t)
                .where(
                    t.c.key_hash == claim.id,
                    t.c.reservation == claim.reservation,
                    t.c.status.is_(None),
                )
                .values(
                    status=response.status,
                    headers=json.dumps(response.headers, ensure_ascii=False),
                    body=response.body,
                    completed_at=now,
                )
            )

    async def release(self, claim: Claim) -> None:
        """Forget the key: the request is not answered for good (5xx), it may be tried again."""
        t = self.table
        async with self.engine.begin() as conn:
            await conn.execute(
                delete(t).where(
                    t.c.key_hash == claim.id,
                    t.c.reservation == claim.reservation,
                    t.c.status.is_(None),
                )
            )

    async def purge(self, now: datetime) -> int:
        """Delete the expired keys (in batches, so that no statement holds many row locks)."""
        t = self.table
        total = 0
        while True:
            async with self.engine.begin() as conn:
                expired = (
                    select(t.c.key_hash).where(t.c.expires_at <= now).limit(PURGE_BATCH)
                ).scalar_subquery()
                result = await conn.execute(delete(t).where(t.c.key_hash.in_(expired)))
            deleted = int(result.rowcount or 0)
            total += deleted
            if deleted < PURGE_BATCH:
                return total

    # ---- what failed for a while -------------------------------------------------------
    def later(self, claim: Claim, response: StoredResponse | None) -> None:
        """Complete (``response``) or release (None) the claim when the database is back."""
        self._pending[claim.id] = (claim, response)
        while len(self._pending) > MAX_PENDING:
            dropped, _ = self._pending.pop(next(iter(self._pending)))
            log.error(
                "%s: too many keys wait to be stored; %s %s stays in flight until it expires",
                HEADER,
                dropped.method,
                dropped.path,
            )

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def retry_pending(self, now: datetime) -> None:
        """Try the waiting completions and releases again; what still fails waits on."""
        for cid, (claim, response) in list(self._pending.items()):
            try:
                if response is None:
                    await self.release(claim)
                else:
                    await self.complete(claim, response, now)
            except Exception as exc:
                if not is_transient(exc):
                    log.exception("%s: could not settle %s %s", HEADER, claim.method, claim.path)
                return  # the database is still away (or broken): the rest waits too
            if self._pending.get(cid, (None, None))[0] is claim:
                del self._pending[cid]


# ---- the middleware ---------------------------------------------------------------------------


@dataclass
class _Captured:
    """The route's response, held back until it is stored."""

    messages: list[Message] = field(default_factory=list)
    status: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    complete: bool = False

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            self.headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")
            if not message.get("more_body", False):
                self.complete = True

    def stored(self) -> StoredResponse | None:
        """The response to remember, or None: not complete, or not an answer for good."""
        if not self.complete or self.status is None:
            return None
        if self.status >= 500 or self.status in _NOT_STORED:
            return None
        return StoredResponse(self.status, stored_headers(self.headers), bytes(self.body))

    async def forward(self, send: Send) -> None:
        for message in self.messages:
            await send(message)


Clock = Callable[[], datetime]


class Idempotency:
    """Pure ASGI: the ``Idempotency-Key`` of POST requests, as the module says."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: IdempotencyStore,
        tokens: TokenRegistry,
        service: str,
        clock: Clock,
        max_body_bytes: int,
        router: Router | None = None,
    ) -> None:
        self.app = app
        self.store = store
        self.tokens = tokens
        self.service = service
        self.clock = clock
        self.max_body_bytes = max_body_bytes
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        values = [value for name, value in scope["headers"] if name == _HEADER_NAME]
        principal = self._principal(scope) if values else None
        path: str = scope["path"]
        if principal is None or not _storable(path):
            # No key, or no caller to scope it by: the app answers (a missing or bad token is
            # its 401 whatever the key). A path the database cannot hold (NUL, a lone
            # surrogate) names nothing that exists: the app refuses it (422/404).
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            key = parse_key(values)
        except ValidationFailed as exc:
            await self._answer(scope, send, problem_response(exc.to_problem(path)), started)
            return
        body, complete = await self._read(scope, receive)
        if not complete:
            # Over the size limit (or the client went away): the app answers 413 (or nothing)
            # and stores nothing; there is no request to remember.
            await self.app(scope, replay_receive(body, complete, receive), send)
            return
        claim = Claim(
            principal=principal.name,
            method="POST",
            path=path,
            key=key,
            fingerprint=fingerprint(body, scope.get("query_string", b"")),
        )
        try:
            seen = await self.store.reserve(claim, self.clock())
        except Exception as exc:
            await self._answer(scope, send, self._failure(exc, path), started)
            return
        if seen is not None:
            await self._answer(scope, send, _answer_seen(claim, seen, path), started)
            return
        await self._run(claim, scope, replay_receive(body, True, receive), send)

    async def _run(self, claim: Claim, scope: Scope, receive: Receive, send: Send) -> None:
        captured = _Captured()
        try:
            await self.app(scope, receive, captured)
        except asyncio.CancelledError:
            # Stopped mid-way (the server shutting down): whether the command committed is
            # not known, so the key is not let go; it stays in flight until it expires.
            log.warning(
                "%s: POST %s cancelled before its answer; its %s stays in flight until it expires",
                self.service,
                claim.path,
                HEADER,
            )
            raise
        except Exception:
            # Starlette's error middleware has answered 500 (not stored: the key is let go)
            # and raises on for the server to log.
            await self._settle(claim, captured.stored())
            await captured.forward(send)
            raise
        await self._settle(claim, captured.stored())
        await captured.forward(send)

    async def _settle(self, claim: Claim, response: StoredResponse | None) -> None:
        try:
            if response is None:
                await self.store.release(claim)
            else:
                await self.store.complete(claim, response, self.clock())
        except Exception as exc:
            # The answer is sent all the same (the command's outcome is what it says); until
            # the row is settled, a retry with the key is answered 409.
            log.warning(
                "%s: %s %s: the key could not be %s (%s); tried again later",
                self.service,
                claim.method,
                claim.path,
                "released" if response is None else "stored",
                f"{type(exc).__name__}: {exc}"[:300],
            )
            self.store.later(claim, response)

    def _failure(self, exc: Exception, path: str) -> Response:
        if is_transient(exc):
            return outage_response(exc, self.service, "POST", path)
        error_id = secrets.token_hex(8)
        log.error(
            "unhandled %s on POST %s reserving its %s (error_id=%s)",
            type(exc).__name__,
            path,
            HEADER,
            error_id,
            exc_info=exc,
        )
        body = CreditwatchError("An unexpected error occurred.").to_problem(path)
        body["error_id"] = error_id
        return problem_response(body)

    async def _answer(self, scope: Scope, send: Send, response: Response, started: float) -> None:
        await response(scope, no_receive, send)
        # Counted as the app counts what it answers (shared.metrics.HttpMetrics).
        route = self._route(scope)
        status = str(response.status_code)
        metrics.HTTP_REQUESTS.labels(self.service, route, "POST", status).inc()
        metrics.HTTP_REQUEST_SECONDS.labels(self.service, route).observe(
            time.perf_counter() - started
        )

    def _route(self, scope: Scope) -> str:
        if self.router is not None:
            for route in self.router.routes:
                match, _ = route.matches(scope)
                if match == Match.FULL:
                    template = getattr(route, "path_format", None)
                    if isinstance(template, str) and template:
                        return template
        return metrics.UNMATCHED_ROUTE

    def _principal(self, scope: Scope) -> Principal | None:
        header = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                if header is not None:
                    return None  # two of them: the app judges
                header = value
        if header is None:
            return None
        token = parse_bearer(header.decode("latin-1"))
        return self.tokens.authenticate(token) if token is not None else None

    async def _read(self, scope: Scope, receive: Receive) -> tuple[bytes, bool]:
        """The body, and whether it is all there within the limit (else part of it)."""
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                return b"", False
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


def _storable(path: str) -> bool:
    if "\x00" in path:
        return False  # PostgreSQL's text cannot hold U+0000
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _answer_seen(claim: Claim, seen: Seen, path: str) -> Response:
    if seen.fingerprint != claim.fingerprint:
        problem = Conflict(
            f"{HEADER}: this key was used for another request to {path} (another body); "
            "use a new key for a new request",
            field=HEADER,
            reason="other_request",
        )
        return problem_response(problem.to_problem(path))
    if seen.response is None:
        problem = Conflict(
            f"{HEADER}: a request with this key is still being processed (since "
            f"{seen.created_at.isoformat().replace('+00:00', 'Z')}); try again later",
            field=HEADER,
            reason="in_flight",
        )
        return problem_response(problem.to_problem(path))
    return replayed(seen.response)


def replayed(stored: StoredResponse) -> Response:
    """The stored response again, marked ``Idempotent-Replayed: true``."""
    response = Response(content=stored.body, status_code=stored.status)
    # Response() set content-length (and nothing else, without a media type); then the rest.
    raw = [(n, v) for n, v in response.raw_headers if n == b"content-length"]
    raw += [(n.encode("latin-1"), v.encode("latin-1")) for n, v in stored.headers]
    raw.append((REPLAYED_HEADER.lower().encode(), b"true"))
    response.raw_headers = raw
    return response


def replay_receive(body: bytes, complete: bool, receive: Receive) -> Receive:
    """``receive`` for an app behind a middleware that read the body first: what was read
    already, then the rest of the stream (also the limits service's check fast path)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": not complete}
        return await receive()

    return replay


async def no_receive() -> Message:
    """``receive`` for a response sent without reading the request."""
    return {"type": "http.disconnect"}


def install_idempotency(
    app: Starlette,
    *,
    store: IdempotencyStore,
    tokens: TokenRegistry,
    service: str,
    clock: Clock,
    max_body_bytes: int,
) -> None:
    """Wrap ``app`` (a Starlette/FastAPI app) in `Idempotency`, outermost: in front of the
    middleware added after this call too (the limits credit-check fast path answers requests
    itself, and a key must be honoured there as well), and of Starlette's error middleware,
    whose 500 it then sees like any other answer. ``app.build_middleware_stack`` is what
    Starlette calls once, at the first request, to assemble the stack."""
    build: Callable[[], ASGIApp] = app.build_middleware_stack

    def build_with_idempotency() -> ASGIApp:
        return Idempotency(
            build(),
            store=store,
            tokens=tokens,
            service=service,
            clock=clock,
            max_body_bytes=max_body_bytes,
            router=app.router,
        )

    app.build_middleware_stack = build_with_idempotency  # type: ignore[method-assign]
