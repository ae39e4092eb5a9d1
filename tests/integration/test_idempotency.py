"""``Idempotency-Key`` on the services' POST routes (shared.idempotency), on SQLite and the real
PostgreSQL: a retried limit request runs once and gets the first answer again, marked
replayed; the same key with another body is 409; keys are per principal, method and path;
concurrent requests with one key run once; keys expire; 5xx answers are not kept; the
credit-check fast path, several replicas on one database, and the other two services."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text

from services.limits import store
from services.limits.app import build
from services.schema import upgrade
from shared.auth import Principal, TokenRegistry
from shared.db import make_engine
from shared.idempotency import Claim, fingerprint
from shared.runtime import Record
from shared.service import ServiceHost
from shared.settings import Settings
from tests.databases import fresh_url

pytestmark = pytest.mark.integration

ANALYST = "analyst-token"  # ana
WRITER = "writer-token"  # walt, another principal who may request limits
APPROVER = "approver-token"  # bob
ORDERS = "orders-token"
TOKENS = TokenRegistry(
    {
        ANALYST: Principal("ana", frozenset({"credit:read", "credit:write", "credit:approve"})),
        WRITER: Principal("walt", frozenset({"credit:read", "credit:write"})),
        APPROVER: Principal("bob", frozenset({"credit:read", "credit:approve", "alerts:write"})),
        ORDERS: Principal("order-entry", frozenset({"credit:check"})),
    }
)
START = datetime(2026, 3, 1, 12, tzinfo=UTC)
REQUEST = {"requested_limit": "150000.00", "reason": "growth"}


def auth(token: str = ANALYST, key: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return headers


@dataclass
class Clock:
    now: datetime = START

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Limits:
    host: ServiceHost
    client: httpx.AsyncClient
    clock: Clock
    url: str
    kind: str
    offset: int = 0

    async def consume(self, topic: str, event_type: str, data: dict[str, Any], time: str) -> None:
        self.offset += 1
        envelope = {
            "specversion": "1.0",
            "id": f"{topic}-{self.offset}",
            "source": "/test",
            "type": event_type,
            "subject": data["customer_id"],
            "time": time,
            "data": data,
        }
        await self.host.core.process_records(
            [Record(topic, 0, self.offset, b"k", json.dumps(envelope).encode())]
        )

    async def customer(self, cid: str) -> None:
        """A registered customer graded BBB: a policy limit of 100,000.00 EUR."""
        await self.consume(
            "crm.customers",
            "customer.registered",
            {"customer_id": cid, "name": f"Customer {cid}", "currency": "EUR"},
            "2026-01-01T00:00:00Z",
        )
        await self.consume(
            "credit.assessments",
            "assessment.completed",
            {
                "assessment_id": f"as-{cid}",
                "customer_id": cid,
                "score": 60,
                "grade": "BBB",
                "risk_level": "medium",
                "policy_version": "2026.1",
                "assessed_at": "2026-01-02T00:00:00Z",
            },
            "2026-01-02T00:00:00Z",
        )

    async def request_limit(
        self, key: str | None, *, cid: str = "C-1", token: str = ANALYST, body: Any = None
    ) -> httpx.Response:
        return await self.client.post(
            f"/v1/customers/{cid}/limit-requests",
            headers=auth(token, key),
            json=REQUEST if body is None else body,
        )

    async def requests(self) -> list[Any]:
        async with self.host.engine.connect() as conn:
            return list(await conn.execute(select(store.requests)))

    async def keys(self) -> list[Any]:
        async with self.host.engine.connect() as conn:
            return list(await conn.execute(select(store.idempotency)))


async def _limits(
    url: str, kind: str, *, ttl_h: float = 24.0, clock: Clock | None = None
) -> tuple[ServiceHost, httpx.AsyncClient, Clock]:
    clock = clock or Clock()
    app, host = build(
        Settings(database_url=url, idempotency_ttl_h=ttl_h),
        tokens=TOKENS,
        consume=False,
        relay=False,
        clock=clock,
    )
    # A route that raises is answered 500 by the app; the transport must not raise it here.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return host, httpx.AsyncClient(transport=transport, base_url="http://limits"), clock


async def _url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    pg = request.getfixturevalue("postgres_server_url") if kind == "postgresql" else None
    url = fresh_url(kind, tmp_path=tmp_path, pg_server_url=pg, name="limits")
    engine = make_engine(url)
    try:
        await upgrade(engine, "limits")
    finally:
        await engine.dispose()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
async def svc(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Limits]:
    url = await _url(request.param, tmp_path, request)
    host, client, clock = await _limits(url, request.param)
    async with client:
        yield Limits(host, client, clock, url, request.param)
    await host.close()


def _same_answer(first: httpx.Response, again: httpx.Response) -> None:
    assert again.status_code == first.status_code
    assert again.content == first.content

    def headers(r: httpx.Response) -> dict[str, str]:
        return {k: v for k, v in r.headers.items() if k not in ("idempotent-replayed",)}

    assert headers(again) == headers(first)


# ---- retries ------------------------------------------------------------------------------------


async def test_given_a_limit_request_when_retried_with_its_key_then_one_request_and_the_same_answer_marked_replayed(
    svc: Limits,
) -> None:
    await svc.customer("C-1")
    first = await svc.request_limit("req-7f3a")
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers

    svc.clock.now = START + timedelta(minutes=3)
    again = await svc.request_limit("req-7f3a")
    # The same status, body and headers (Location, Content-Type) — and nothing new stored.
    _same_answer(first, again)
    assert again.headers["idempotent-replayed"] == "true"
    assert [r.request_id for r in await svc.requests()] == [first.json()["request_id"]]

    # A quoted key (the draft's Structured Field String) is the same key.
    quoted = await svc.request_limit('"req-7f3a"')
    assert quoted.headers["idempotent-replayed"] == "true" and quoted.content == first.content
    # White space and key order do not make another body.
    reordered = await svc.client.post(
        "/v1/customers/C-1/limit-requests",
        headers={**auth(key="req-7f3a"), "Content-Type": "application/json"},
        content=b'{ "reason": "growth",\n  "requested_limit": "150000.00" }',
    )
    assert reordered.status_code == 201 and reordered.headers["idempotent-replayed"] == "true"
    assert len(await svc.requests()) == 1


async def test_given_no_key_when_a_limit_request_is_posted_twice_then_two_requests_are_made(
    svc: Limits,
) -> None:
    # Without the header nothing changes: each POST is a request of its own.
    await svc.customer("C-1")
    assert (await svc.request_limit(None)).status_code == 201
    assert (await svc.request_limit(None)).status_code == 201
    assert len(await svc.requests()) == 2
    assert await svc.keys() == []


async def test_given_a_used_key_when_posted_with_another_body_then_409_naming_the_header(
    svc: Limits,
) -> None:
    await svc.customer("C-1")
    assert (await svc.request_limit("k-1")).status_code == 201
    other = await svc.request_limit("k-1", body={"requested_limit": "160000.00", "reason": "x"})
    assert other.status_code == 409
    assert other.headers["content-type"] == "application/problem+json"
    problem = other.json()
    assert (problem["field"], problem["reason"]) == ("Idempotency-Key", "other_request")
    assert problem["errors"][0]["field"] == "Idempotency-Key"
    assert problem["instance"] == "/v1/customers/C-1/limit-requests"
    assert len(await svc.requests()) == 1


async def test_given_one_key_when_used_by_another_principal_or_on_another_path_then_each_runs(
    svc: Limits,
) -> None:
    await svc.customer("C-1")
    await svc.customer("C-2")
    ana = await svc.request_limit("shared-key")
    walt = await svc.request_limit("shared-key", token=WRITER)
    elsewhere = await svc.request_limit("shared-key", cid="C-2")
    for response in (ana, walt, elsewhere):
        assert response.status_code == 201 and "idempotent-replayed" not in response.headers
    assert (walt.json()["requested_by"], ana.json()["requested_by"]) == ("walt", "ana")
    assert len({r.request_id for r in await svc.requests()}) == 3
    # Each still replays its own answer.
    again = await svc.request_limit("shared-key", token=WRITER)
    assert again.headers["idempotent-replayed"] == "true" and again.content == walt.content


async def test_given_concurrent_requests_with_one_key_when_they_race_then_exactly_one_runs(
    svc: Limits,
) -> None:
    await svc.customer("C-1")
    responses = await asyncio.gather(*(svc.request_limit("race") for _ in range(6)))
    ran = [r for r in responses if r.status_code == 201 and "idempotent-replayed" not in r.headers]
    assert len(ran) == 1
    for r in responses:
        if r is ran[0]:
            continue
        # Either it came after the first had finished (the answer replayed) or while it ran.
        if r.status_code == 201:
            assert r.headers["idempotent-replayed"] == "true" and r.content == ran[0].content
        else:
            assert r.status_code == 409 and r.json()["reason"] == "in_flight", r.text
    assert len(await svc.requests()) == 1


async def test_given_a_request_in_flight_when_its_key_is_sent_again_then_409_until_it_is_answered(
    postgres_server_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # The first request holds its key while it waits for the customer's row (locked here);
    # the retry meanwhile is refused, not run a second time.
    url = await _url("postgresql", tmp_path, request)
    host, client, clock = await _limits(url, "postgresql")
    svc = Limits(host, client, clock, url, "postgresql")
    async with client:
        await svc.customer("C-1")
        async with host.engine.connect() as lock:
            await lock.execute(
                text("SELECT 1 FROM limits_customers WHERE customer_id = 'C-1' FOR UPDATE")
            )
            first = asyncio.create_task(svc.request_limit("slow"))
            for _ in range(200):
                if await svc.keys():
                    break
                await asyncio.sleep(0.02)
            [row] = await svc.keys()
            assert row.status is None  # in flight
            retry = await svc.request_limit("slow")
            assert retry.status_code == 409, retry.text
            assert (retry.json()["reason"], retry.json()["field"]) == (
                "in_flight",
                "Idempotency-Key",
            )
            assert not first.done()
            await lock.rollback()
        answered = await first
        assert answered.status_code == 201
        later = await svc.request_limit("slow")
        assert later.headers["idempotent-replayed"] == "true"
        assert later.content == answered.content
        assert len(await svc.requests()) == 1
    await host.close()


async def test_given_a_key_left_in_flight_by_a_dead_process_when_retried_then_409_not_run_again(
    svc: Limits,
) -> None:
    # A process that died between its command's commit and storing the answer leaves the key
    # in flight: the retry must not make a second request.
    await svc.customer("C-1")
    body = json.dumps(REQUEST).encode()
    claim = Claim("ana", "POST", "/v1/customers/C-1/limit-requests", "orphan", fingerprint(body))
    assert svc.host.idempotency is not None
    assert await svc.host.idempotency.reserve(claim, START) is None
    retry = await svc.request_limit("orphan")
    assert retry.status_code == 409 and retry.json()["reason"] == "in_flight"
    assert await svc.requests() == []


# ---- what is kept, and for how long -----------------------------------------------------------


async def test_given_a_key_older_than_its_ttl_when_used_again_then_the_request_runs_anew(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = await _url("sqlite", tmp_path, request)
    host, client, clock = await _limits(url, "sqlite", ttl_h=2)
    svc = Limits(host, client, clock, url, "sqlite")
    async with client:
        await svc.customer("C-1")
        first = await svc.request_limit("k")
        clock.now = START + timedelta(hours=2) - timedelta(seconds=1)
        assert (await svc.request_limit("k")).headers["idempotent-replayed"] == "true"
        clock.now = START + timedelta(hours=2)
        # Expired: the key is free again, for another body too.
        other = await svc.request_limit("k", body={"requested_limit": "90000.00", "reason": "r"})
        assert other.status_code == 201 and "idempotent-replayed" not in other.headers
        assert other.json()["request_id"] != first.json()["request_id"]
        assert len(await svc.requests()) == 2
    await host.close()


async def test_given_expired_keys_when_purged_then_only_they_are_deleted(svc: Limits) -> None:
    await svc.customer("C-1")
    await svc.request_limit("old")
    svc.clock.now = START + timedelta(hours=12)
    await svc.request_limit("new", body={"requested_limit": "90000.00", "reason": "r"})
    store_ = svc.host.idempotency
    assert store_ is not None
    assert await store_.purge(START + timedelta(hours=23)) == 0
    assert await store_.purge(START + timedelta(hours=24)) == 1
    assert [r.idempotency_key for r in await svc.keys()] == ["new"]
    assert await store_.purge(START + timedelta(hours=36)) == 1
    assert await svc.keys() == []


async def test_given_a_4xx_answer_when_retried_then_it_is_replayed_even_after_the_facts_change(
    svc: Limits,
) -> None:
    # The same request gets the same answer: a 404 for a customer not yet known stays the
    # answer to that key (a new key asks again).
    missing = await svc.request_limit("early", cid="C-9")
    assert missing.status_code == 404
    await svc.customer("C-9")
    again = await svc.request_limit("early", cid="C-9")
    assert again.status_code == 404 and again.headers["idempotent-replayed"] == "true"
    assert (await svc.request_limit("later", cid="C-9")).status_code == 201


async def test_given_a_5xx_answer_when_retried_with_the_key_then_the_request_runs_again(
    svc: Limits, monkeypatch: pytest.MonkeyPatch
) -> None:
    await svc.customer("C-1")
    record = svc.host.core.record
    calls = 0

    async def failing_once(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in the command")
        return await record(*args, **kwargs)

    monkeypatch.setattr(svc.host.core, "record", failing_once)
    failed = await svc.request_limit("after-500")
    assert failed.status_code == 500
    assert await svc.keys() == []  # let go: the client may retry
    retried = await svc.request_limit("after-500")
    assert retried.status_code == 201 and "idempotent-replayed" not in retried.headers
    assert len(await svc.requests()) == 1


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("", "must not be empty"),
        ('""', "must not be empty"),
        ("x" * 256, "at most 255 characters"),
        ('"unterminated', "no closing quote"),
    ],
)
async def test_given_an_invalid_key_when_posted_then_422_naming_the_header_and_nothing_runs(
    svc: Limits, key: str, message: str
) -> None:
    await svc.customer("C-1")
    response = await svc.request_limit(key)
    assert response.status_code == 422
    problem = response.json()
    assert problem["field"] == "Idempotency-Key" and message in problem["detail"]
    assert await svc.requests() == [] and await svc.keys() == []
    assert (await svc.request_limit("x" * 255)).status_code == 201  # the longest allowed


async def test_given_a_key_without_a_valid_token_when_posted_then_401_and_nothing_is_kept(
    svc: Limits,
) -> None:
    response = await svc.request_limit("k", token="nobody")
    assert response.status_code == 401
    # A principal without the route's scope is refused before the route runs: not kept.
    orders = await svc.request_limit("k", token=ORDERS)
    assert orders.status_code == 403
    assert await svc.keys() == []


# ---- other routes, replicas, services -----------------------------------------------------------


async def test_given_an_approval_retried_with_its_key_when_posted_again_then_the_approval_is_replayed(
    svc: Limits,
) -> None:
    await svc.customer("C-1")
    request_id = (await svc.request_limit(None)).json()["request_id"]
    path = f"/v1/limit-requests/{request_id}/approve"
    approved = await svc.client.post(path, headers=auth(APPROVER, "ok-1"), json={"note": "fine"})
    assert approved.status_code == 200
    # Without the key a second approval is a conflict; with it, the first answer again.
    again = await svc.client.post(path, headers=auth(APPROVER, "ok-1"), json={"note": "fine"})
    _same_answer(approved, again)
    assert again.headers["idempotent-replayed"] == "true"
    assert (await svc.client.post(path, headers=auth(APPROVER))).status_code == 409


async def test_given_a_credit_check_with_a_key_when_the_fast_path_would_answer_then_the_key_rules(
    svc: Limits,
) -> None:
    # The plain credit check is answered by its fast path, in front of the app: the key is
    # honoured in front of that too.
    await svc.customer("C-1")
    order = {"order_id": "SO-1", "customer_id": "C-1", "amount": "1000.00", "currency": "EUR"}
    first = await svc.client.post("/v1/credit-checks", headers=auth(ORDERS, "chk"), json=order)
    assert first.status_code == 200 and first.json()["decision"] == "approved"
    svc.clock.now = START + timedelta(minutes=1)
    again = await svc.client.post("/v1/credit-checks", headers=auth(ORDERS, "chk"), json=order)
    _same_answer(first, again)
    assert again.headers["idempotent-replayed"] == "true"
    amended = {**order, "amount": "2000.00"}
    other = await svc.client.post("/v1/credit-checks", headers=auth(ORDERS, "chk"), json=amended)
    assert other.status_code == 409 and other.json()["field"] == "Idempotency-Key"
    exposure = await svc.client.get("/v1/customers/C-1/exposure", headers=auth())
    assert exposure.json()["reserved"] == "1000.00"


async def test_given_two_replicas_on_one_database_when_a_retry_reaches_the_other_then_it_is_replayed(
    svc: Limits,
) -> None:
    await svc.customer("C-1")
    host2, client2, _ = await _limits(svc.url, svc.kind, clock=svc.clock)
    async with client2:
        first = await svc.request_limit("across")
        again = await client2.post(
            "/v1/customers/C-1/limit-requests", headers=auth(key="across"), json=REQUEST
        )
        _same_answer(first, again)
        assert again.headers["idempotent-replayed"] == "true"
        both = await asyncio.gather(
            svc.request_limit("across-2"),
            client2.post(
                "/v1/customers/C-1/limit-requests", headers=auth(key="across-2"), json=REQUEST
            ),
        )
        assert sorted(r.status_code for r in both) in ([201, 201], [201, 409])
    await host2.close()
    assert len(await svc.requests()) == 2


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
@pytest.mark.parametrize(
    ("service", "path", "token"),
    [
        ("assessment", "/v1/customers/C-1/assessment/recompute", ANALYST),
        ("alerts", "/v1/alerts/A-1/acknowledge", APPROVER),
    ],
)
async def test_given_the_other_services_when_a_post_is_retried_with_its_key_then_it_is_replayed(
    kind: str,
    service: str,
    path: str,
    token: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    import importlib

    pg = request.getfixturevalue("postgres_server_url") if kind == "postgresql" else None
    url = fresh_url(kind, tmp_path=tmp_path, pg_server_url=pg, name=service)
    app, host = importlib.import_module(f"services.{service}.app").build(
        Settings(database_url=url), tokens=TOKENS, consume=False, relay=False, clock=Clock()
    )
    await upgrade(host.engine, service)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        first = await client.post(path, headers=auth(token, "k"), json={})
        again = await client.post(path, headers=auth(token, "k"), json={})
        assert first.status_code == 404  # nothing there: still an answer, kept
        _same_answer(first, again)
        assert again.headers["idempotent-replayed"] == "true"
        async with host.engine.connect() as conn:
            table = host.service.metadata.tables[f"{service}_idempotency"]
            count = (await conn.execute(select(func.count()).select_from(table))).scalar_one()
        assert count == 1
    await host.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_given_a_route_answering_in_chunks_with_location_when_replayed_then_all_of_it_again(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # The middleware alone in front of a bare ASGI route: what it keeps of a response does
    # not depend on what the services' routes happen to send today.
    from sqlalchemy import MetaData

    from shared.idempotency import Idempotency, IdempotencyStore, idempotency_table

    pg = request.getfixturevalue("postgres_server_url") if kind == "postgresql" else None
    engine = make_engine(fresh_url(kind, tmp_path=tmp_path, pg_server_url=pg, name="bare"))
    metadata = MetaData()
    table = idempotency_table(metadata, "bare")
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    runs = 0

    async def route(scope: Any, receive: Any, send: Any) -> None:
        nonlocal runs
        runs += 1
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send(
            {
                "type": "http.response.start",
                "status": 201,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"location", f"/v1/things/{runs}".encode()),
                    (b"date", f"run {runs}".encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b'{"run":', "more_body": True})
        await send({"type": "http.response.body", "body": str(runs).encode() + b"}"})

    app = Idempotency(
        route,
        store=IdempotencyStore(engine, table, ttl=timedelta(hours=1)),
        tokens=TOKENS,
        service="bare",
        clock=Clock(),
        max_body_bytes=1024,
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://bare"
    ) as client:
        first = await client.post("/v1/things", headers=auth(key="t"), json={"a": 1})
        again = await client.post("/v1/things", headers=auth(key="t"), json={"a": 1})
        # Over the size limit the body is not fingerprinted: the app answers (413 there).
        big = await client.post("/v1/things", headers=auth(key="big"), content=b"x" * 2000)
    assert (first.status_code, first.json(), first.headers["location"]) == (
        201,
        {"run": 1},
        "/v1/things/1",
    )
    assert (again.status_code, again.json(), again.headers["location"]) == (
        201,
        {"run": 1},
        "/v1/things/1",
    )
    assert again.headers["content-type"] == "application/json"
    assert again.headers["idempotent-replayed"] == "true" and "date" not in again.headers
    assert big.status_code == 201 and big.json() == {"run": 2} and runs == 2
    async with engine.connect() as conn:
        assert [r.idempotency_key for r in await conn.execute(select(table))] == ["t"]
    await engine.dispose()


async def test_given_a_key_on_a_path_the_database_cannot_hold_when_posted_then_the_route_refuses_it(
    svc: Limits,
) -> None:
    # PostgreSQL's text cannot hold U+0000: the key is not kept and the route answers as it
    # does without one (422 naming the parameter), not a 500 from storing the key.
    response = await svc.client.post(
        "/v1/customers/C%00-1/hold", headers=auth(key="k"), json={"reason": "r"}
    )
    assert response.status_code == 422 and response.json()["field"] == "customer_id"
    assert await svc.keys() == []
