"""The limits service's HTTP API on the real PostgreSQL: credit checks with every reason,
retries, amendments and releases, exposure now and as of a time, limits with their history,
maker–checker limit requests, temporary limits expiring on the scheduler, holds, groups, the
portfolio, validation, authentication and metrics. Events come in through the event core
exactly as the consumer hands them over; the Kafka round trip is in test_limits_flow.py."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest

from services.limits import store
from services.limits.app import build, refresh_portfolio_gauges
from services.limits.checks import CheckOrder, PostgresChecks, Verdict
from services.limits.handlers import LimitsService
from shared import eventstore as es
from shared import metrics
from shared.auth import Principal, TokenRegistry
from shared.events import ExposureUpdated, LimitChanged
from shared.problems import Conflict
from shared.runtime import Record
from shared.service import ServiceHost
from shared.settings import Settings
from tests.databases import reset

pytestmark = pytest.mark.integration

ORDERS = "orders-token"  # order entry
READER = "reader-token"
ANALYST = "analyst-token"  # ana: may request limits and decide others' requests
APPROVER = "approver-token"  # bob
TOKENS = TokenRegistry(
    {
        ORDERS: Principal("order-entry", frozenset({"credit:check"})),
        READER: Principal("rita", frozenset({"credit:read"})),
        ANALYST: Principal(
            "ana", frozenset({"credit:read", "credit:write", "credit:approve", "credit:check"})
        ),
        APPROVER: Principal("bob", frozenset({"credit:read", "credit:approve"})),
    }
)
START = datetime(2026, 3, 1, 12, tzinfo=UTC)
D = Decimal


def auth(token: str = ANALYST) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Clock:
    now: datetime = START

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Service:
    host: ServiceHost
    client: httpx.AsyncClient
    clock: Clock
    offsets: dict[str, int] = field(default_factory=dict)

    async def consume(
        self,
        topic: str,
        event_type: str,
        data: dict[str, Any],
        *,
        time: str = "2026-03-01T09:00:00Z",
        event_id: str | None = None,
    ) -> Any:
        offset = self.offsets.get(topic, -1) + 1
        self.offsets[topic] = offset
        subject = data["customer_id"]
        envelope = {
            "specversion": "1.0",
            "id": event_id or f"{topic}-{offset}",
            "source": "/test",
            "type": event_type,
            "subject": subject,
            "time": time,
            "data": data,
        }
        return await self.host.core.process_records(
            [Record(topic, 0, offset, subject.encode(), json.dumps(envelope).encode())]
        )

    async def register(
        self, cid: str, *, currency: str = "EUR", parent: str | None = None, name: str | None = None
    ) -> None:
        data: dict[str, Any] = {
            "customer_id": cid,
            "name": name or f"Customer {cid}",
            "currency": currency,
        }
        if parent:
            data["parent_id"] = parent
        await self.consume(
            "crm.customers", "customer.registered", data, time="2026-01-01T00:00:00Z"
        )

    async def assess(self, cid: str, grade: str, *, time: str = "2026-01-02T00:00:00Z") -> None:
        await self.consume(
            "credit.assessments",
            "assessment.completed",
            {
                "assessment_id": f"as-{cid}-{grade}-{time}",
                "customer_id": cid,
                "score": 60,
                "grade": grade,
                "risk_level": "medium",
                "policy_version": "2026.1",
                "assessed_at": time,
            },
            time=time,
        )

    async def invoice(
        self,
        cid: str,
        invoice_id: str,
        amount: str,
        *,
        issued: str = "2026-02-20",
        due: str = "2026-03-20",
        currency: str = "EUR",
        order_id: str | None = None,
        time: str | None = None,
    ) -> None:
        data = {
            "invoice_id": invoice_id,
            "customer_id": cid,
            "amount": amount,
            "currency": currency,
            "issue_date": issued,
            "due_date": due,
        }
        if order_id:
            data["order_id"] = order_id
        await self.consume(
            "ar.invoices", "invoice.issued", data, time=time or f"{issued}T09:00:00Z"
        )

    async def customer(self, cid: str, grade: str | None = "BBB", **kw: Any) -> None:
        await self.register(cid, **kw)
        if grade:
            await self.assess(cid, grade)

    async def check(
        self,
        cid: str,
        order_id: str,
        amount: str,
        *,
        currency: str = "EUR",
        token: str = ORDERS,
        **extra: Any,
    ) -> httpx.Response:
        return await self.client.post(
            "/v1/credit-checks",
            headers=auth(token),
            json={
                "order_id": order_id,
                "customer_id": cid,
                "amount": amount,
                "currency": currency,
                **extra,
            },
        )

    async def decided(self, cid: str, order_id: str, amount: str, **kw: Any) -> dict[str, Any]:
        response = await self.check(cid, order_id, amount, **kw)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def exposure(self, cid: str, **params: str) -> dict[str, Any]:
        response = await self.client.get(
            f"/v1/customers/{cid}/exposure", params=params, headers=auth(READER)
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def limit(self, cid: str) -> dict[str, Any]:
        response = await self.client.get(f"/v1/customers/{cid}/limit", headers=auth(READER))
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def outbox(self, topic: str | None = None) -> list[dict[str, Any]]:
        async with self.host.engine.connect() as conn:
            rows = await es.pending_outbox(conn, store.core, 10_000)
        return [
            json.loads(r.value) | {"_key": r.key} for r in rows if topic is None or r.topic == topic
        ]

    async def temporary_request(self, cid: str, amount: str, ends: datetime) -> str:
        """A temporary limit requested by the analyst: its request id."""
        response = await self.client.post(
            f"/v1/customers/{cid}/limit-requests",
            headers=auth(),
            json={"requested_limit": amount, "reason": "season", "expires_at": ends.isoformat()},
        )
        assert response.status_code == 201, response.text
        request_id: str = response.json()["request_id"]
        return request_id

    async def limit_changes(self, cid: str) -> list[dict[str, Any]]:
        return [e["data"] for e in await self.outbox("credit.limits") if e["subject"] == cid]


@pytest.fixture
async def svc(postgres_url: str) -> AsyncIterator[Service]:
    clock = Clock()
    app, host = build(
        Settings(database_url=postgres_url), tokens=TOKENS, consume=False, clock=clock
    )
    await reset(host.engine, "limits")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://limits") as client:
        yield Service(host, client, clock)
    await host.close()


@pytest.fixture
async def bare(postgres_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The app alone, for calls refused before the database is touched (auth, validation)."""
    app, host = build(
        Settings(database_url=postgres_url), tokens=TOKENS, consume=False, clock=Clock()
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://limits") as client:
        yield client
    await host.close()


# ---- credit checks ------------------------------------------------------------------------------


async def test_given_room_when_an_order_is_checked_then_it_is_approved_and_reserved(
    svc: Service,
) -> None:
    await svc.customer("C-1", "BBB")  # limit 100,000.00
    await svc.invoice("C-1", "I-1", "20000.00")
    body = await svc.decided("C-1", "SO-1", "1500.00")
    assert body["decision"] == "approved" and body["reasons"] == ["within_limit"]
    assert {
        k: body[k]
        for k in (
            "order_id",
            "customer_id",
            "limit",
            "exposure",
            "reserved",
            "available",
            "shortfall",
            "currency",
            "grade",
        )
    } == {
        "order_id": "SO-1",
        "customer_id": "C-1",
        "limit": "100000.00",
        "exposure": "21500.00",
        "reserved": "1500.00",
        "available": "78500.00",
        "shortfall": "0.00",
        "currency": "EUR",
        "grade": "BBB",
    }
    assert body["evaluated_at"] == "2026-03-01T12:00:00Z"
    assert body["reservation_expires_at"] == "2026-03-04T12:00:00Z"  # policy TTL 72 h

    exposure = await svc.exposure("C-1")
    assert (exposure["reserved"], exposure["exposure"], exposure["available"]) == (
        "1500.00",
        "21500.00",
        "78500.00",
    )
    stored = await svc.client.get(f"/v1/credit-checks/{body['check_id']}", headers=auth(READER))
    assert stored.status_code == 200 and stored.json() == body
    published = (await svc.outbox("credit.exposure"))[-1]
    assert (published["_key"], published["data"]["reserved"]) == ("C-1", "1500.00")


async def test_given_a_retried_check_when_posted_again_then_same_decision_and_one_reservation(
    svc: Service,
) -> None:
    await svc.customer("C-1", "BBB")
    first = await svc.decided("C-1", "SO-1", "1000.00")
    svc.clock.now = START + timedelta(minutes=5)
    again = await svc.decided("C-1", "SO-1", "1000.00")
    assert again == first  # the same check_id, evaluated_at and figures
    assert (await svc.exposure("C-1"))["reserved"] == "1000.00"

    rejected = await svc.decided("C-2", "SO-2", "10.00")
    assert await svc.decided("C-2", "SO-2", "10.00") == rejected


async def test_given_an_order_checked_without_reserving_when_checked_to_reserve_then_reserved(
    svc: Service,
) -> None:
    # Quote, then confirm under the same order id: the second asks for what the first did
    # not, so it is judged (and reserved) anew rather than answered with the quote.
    await svc.customer("C-1", "BBB")
    quote = await svc.decided("C-1", "SO-1", "1000.00", reserve=False)
    assert (quote["decision"], quote["reserved"], quote["reserve"]) == ("approved", "0.00", False)
    assert await svc.decided("C-1", "SO-1", "1000.00", reserve=False) == quote
    firm = await svc.decided("C-1", "SO-1", "1000.00", reserve=True)
    assert firm["check_id"] != quote["check_id"]
    assert (firm["decision"], firm["reserved"], firm["reserve"]) == ("approved", "1000.00", True)
    assert await svc.decided("C-1", "SO-1", "1000.00") == firm  # now a plain retry
    assert (await svc.exposure("C-1"))["reserved"] == "1000.00"
    released = await svc.client.delete("/v1/credit-checks/SO-1", headers=auth(ORDERS))
    assert released.status_code == 204


async def test_given_an_approved_order_when_amended_then_judged_on_the_new_amount(
    svc: Service,
) -> None:
    await svc.customer("C-1", "CCC")  # limit 5,000.00
    await svc.invoice("C-1", "I-1", "1000.00")
    first = await svc.decided("C-1", "SO-1", "3000.00")
    assert first["decision"] == "approved" and first["available"] == "1000.00"

    # 4,000 fits because the order's own 3,000 does not count against it.
    bigger = await svc.decided("C-1", "SO-1", "4000.00")
    assert bigger["decision"] == "approved" and bigger["check_id"] != first["check_id"]
    assert (bigger["reserved"], bigger["available"]) == ("4000.00", "0.00")

    # Not approved: the earlier reservation stays as it was, and the figures say so.
    too_big = await svc.decided("C-1", "SO-1", "9000.00")
    assert (too_big["decision"], too_big["reasons"]) == ("rejected", ["exceeds_available"])
    assert (too_big["reserved"], too_big["exposure"], too_big["available"]) == (
        "4000.00",
        "5000.00",
        "0.00",
    )
    assert too_big["shortfall"] == "5000.00"  # 9,000 − the 4,000 the order could have
    assert (await svc.exposure("C-1"))["reserved"] == "4000.00"


async def test_given_a_reservation_when_released_then_204_then_404_and_judged_afresh(
    svc: Service,
) -> None:
    await svc.customer("C-1", "CCC")
    first = await svc.decided("C-1", "SO-1", "5000.00")
    assert first["decision"] == "approved"
    blocked = await svc.decided("C-1", "SO-2", "1000.00")
    assert blocked["decision"] == "rejected"

    released = await svc.client.delete("/v1/credit-checks/SO-1", headers=auth(ORDERS))
    assert released.status_code == 204 and released.content == b""
    again = await svc.client.delete("/v1/credit-checks/SO-1", headers=auth(ORDERS))
    assert again.status_code == 404
    assert again.headers["content-type"] == "application/problem+json"
    unknown = await svc.client.delete("/v1/credit-checks/SO-NONE", headers=auth(ORDERS))
    assert unknown.status_code == 404
    assert (await svc.exposure("C-1"))["reserved"] == "0.00"

    # The same order and amount after the release: a new decision with a new reservation.
    fresh = await svc.decided("C-1", "SO-1", "5000.00")
    assert fresh["decision"] == "approved" and fresh["check_id"] != first["check_id"]
    assert (await svc.exposure("C-1"))["reserved"] == "5000.00"


async def test_given_an_order_for_another_customer_when_checked_then_409(svc: Service) -> None:
    await svc.customer("C-1", "BBB")
    await svc.customer("C-2", "BBB")
    await svc.decided("C-1", "SO-1", "10.00")
    response = await svc.check("C-2", "SO-1", "10.00")
    assert response.status_code == 409 and response.json()["field"] == "order_id"


async def test_given_an_unknown_check_when_read_then_404(svc: Service) -> None:
    response = await svc.client.get("/v1/credit-checks/nope", headers=auth(READER))
    assert response.status_code == 404 and response.json()["field"] == "check_id"


async def test_given_the_limit_when_checked_around_it_then_exact_fit_approves_and_tolerance_reviews(
    svc: Service,
) -> None:
    await svc.customer("C-1", "BBB")
    await svc.invoice("C-1", "I-1", "60000.00")
    unreserved = await svc.decided("C-1", "SO-1", "40000.00", reserve=False)
    assert (unreserved["decision"], unreserved["reserved"], unreserved["available"]) == (
        "approved",
        "0.00",
        "40000.00",
    )  # reserve: false holds nothing back

    review = await svc.decided("C-1", "SO-2", "44999.99")
    assert (review["decision"], review["reasons"], review["shortfall"]) == (
        "review",
        ["exceeds_available"],
        "4999.99",
    )
    rejected = await svc.decided("C-1", "SO-3", "45000.00")  # by exactly the 5 % tolerance
    assert (rejected["decision"], rejected["shortfall"]) == ("rejected", "5000.00")
    assert (await svc.exposure("C-1"))["reserved"] == "0.00"  # neither reserved anything
    exact = await svc.decided("C-1", "SO-4", "40000.00")
    assert (exact["decision"], exact["exposure"], exact["available"]) == (
        "approved",
        "100000.00",
        "0.00",
    )


async def test_given_each_reason_when_checked_then_it_is_reported(svc: Service) -> None:
    # no_credit_limit: never heard of, and registered but not yet rated.
    unknown = await svc.decided("C-NEW", "SO-1", "10.00")
    assert (unknown["decision"], unknown["reasons"]) == ("rejected", ["no_credit_limit"])
    assert (unknown["limit"], unknown["shortfall"]) == ("0.00", "10.00")
    await svc.customer("C-UNRATED", None)
    assert (await svc.decided("C-UNRATED", "SO-2", "10.00"))["reasons"] == ["no_credit_limit"]

    # grade_not_eligible: the worst grade (whose policy limit is 0 as well).
    await svc.customer("C-D", "D")
    assert (await svc.decided("C-D", "SO-3", "10.00"))["reasons"] == [
        "grade_not_eligible",
        "no_credit_limit",
    ]

    # overdue_beyond_tolerance: 1,000 overdue for 45 days.
    await svc.customer("C-LATE", "BBB")
    await svc.invoice("C-LATE", "I-1", "1000.00", issued="2026-01-01", due="2026-01-15")
    late = await svc.decided("C-LATE", "SO-4", "10.00")
    assert (late["decision"], late["reasons"]) == ("rejected", ["overdue_beyond_tolerance"])

    # currency_mismatch: a valid currency the policy has no rate for; USD is converted.
    await svc.customer("C-FX", "BBB")
    brl = await svc.decided("C-FX", "SO-5", "10.00", currency="BRL")
    assert (brl["decision"], brl["reasons"]) == ("rejected", ["currency_mismatch"])
    # An ISO 4217 code no amount can be held in (gold) is a currency the policy cannot
    # rate: currency_mismatch, not a 422 (issue 19, finding 12).
    gold = await svc.decided("C-FX", "SO-5-XAU", "1.5", currency="XAU")
    assert (gold["decision"], gold["reasons"]) == ("rejected", ["currency_mismatch"])
    stored = await svc.client.get(f"/v1/credit-checks/{gold['check_id']}", headers=auth(READER))
    assert stored.status_code == 200, stored.text
    usd = await svc.decided("C-FX", "SO-6", "1000.00", currency="USD")
    assert (usd["decision"], usd["reserved"], usd["currency"]) == ("approved", "920.00", "EUR")
    assert (usd["amount"], usd["amount_currency"]) == ("1000.00", "USD")

    # exceeds_available, with every applicable reason listed next to another one.
    await svc.customer("C-BIG", "CCC")
    await svc.client.post("/v1/customers/C-BIG/hold", headers=auth(), json={"reason": "fraud"})
    both = await svc.decided("C-BIG", "SO-7", "9000.00")
    assert both["decision"] == "rejected"
    assert set(both["reasons"]) == {"credit_hold", "exceeds_available"}
    assert both["shortfall"] == "4000.00"


async def test_given_a_hold_when_placed_and_released_then_checks_follow_it(svc: Service) -> None:
    await svc.customer("C-1", "BBB")
    placed = await svc.client.post(
        "/v1/customers/C-1/hold", headers=auth(), json={"reason": "disputed invoices"}
    )
    assert placed.status_code == 200 and placed.json()["on_hold"] is True
    held = await svc.decided("C-1", "SO-1", "10.00")
    assert (held["decision"], held["reasons"]) == ("rejected", ["credit_hold"])
    limit = await svc.limit("C-1")
    assert (limit["on_hold"], limit["limit"]) == (True, "100000.00")
    assert (await svc.exposure("C-1"))["on_hold"] is True

    released = await svc.client.delete("/v1/customers/C-1/hold", headers=auth())
    assert released.status_code == 200 and released.json()["on_hold"] is False
    assert (await svc.decided("C-1", "SO-2", "10.00"))["decision"] == "approved"
    changes = await svc.limit_changes("C-1")
    assert [(c["reason"], c["changed_by"], c["on_hold"]) for c in changes[-2:]] == [
        ("hold", "ana", True),
        ("release", "ana", False),
    ]
    unknown = await svc.client.post(
        "/v1/customers/C-NONE/hold", headers=auth(), json={"reason": "x"}
    )
    assert unknown.status_code == 404


async def test_given_concurrent_checks_when_decided_then_they_never_jointly_exceed_the_limit(
    svc: Service,
) -> None:
    await svc.customer("C-1", "CCC")  # 5,000.00
    await svc.invoice("C-1", "I-1", "4000.00")
    responses = await asyncio.gather(*(svc.check("C-1", f"SO-{n}", "400.00") for n in range(6)))
    decisions = [r.json()["decision"] for r in responses]
    assert decisions.count("approved") == 2
    exposure = await svc.exposure("C-1")
    assert (exposure["reserved"], exposure["available"]) == ("800.00", "200.00")


# ---- groups -------------------------------------------------------------------------------------


async def test_given_a_group_when_checked_then_the_group_room_counts_for_child_and_parent(
    svc: Service,
) -> None:
    await svc.customer("G-PARENT", "BBB")  # 100,000.00 for the whole group
    await svc.customer("G-CHILD", None, parent="G-PARENT")  # no limit of its own
    await svc.invoice("G-PARENT", "I-1", "30000.00")
    await svc.invoice("G-CHILD", "I-2", "60000.00", issued="2026-02-25", due="2026-03-25")

    child = await svc.decided("G-CHILD", "SO-1", "20000.00")
    assert (child["decision"], child["reasons"]) == ("rejected", ["exceeds_group_available"])
    assert child["shortfall"] == "10000.00"

    fits = await svc.decided("G-CHILD", "SO-2", "4000.00")
    assert (fits["decision"], fits["limit"], fits["available"]) == (
        "approved",
        "100000.00",
        "6000.00",
    )
    assert fits["group"] == {"limit": "100000.00", "exposure": "94000.00", "available": "6000.00"}

    parent = await svc.decided("G-PARENT", "SO-3", "20000.00")
    assert (parent["decision"], parent["reasons"]) == ("rejected", ["exceeds_group_available"])
    assert parent["shortfall"] == "14000.00"  # 20,000 − min(70,000 own, 6,000 group)

    body = await svc.exposure("G-PARENT")
    assert (body["exposure"], body["available"]) == ("30000.00", "70000.00")
    assert body["group"] == {
        "members": 2,
        "limit": "100000.00",
        "exposure": "94000.00",
        "available": "6000.00",
    }
    assert "group" not in await svc.exposure("G-CHILD")
    then = await svc.exposure("G-PARENT", as_of="2026-02-22T00:00:00Z")  # before I-2
    assert then["group"] == {
        "members": 2,
        "limit": "100000.00",
        "exposure": "30000.00",
        "available": "70000.00",
    }


async def test_given_a_group_in_several_currencies_then_each_member_counts_converted(
    svc: Service,
) -> None:
    # An EUR parent (100,000.00) with a JPY child owing 5,000,000 JPY (= 30,500.00 EUR at
    # the policy's JPY/EUR 0.0061), not 5,000,000 EUR.
    await svc.customer("GE-PARENT", "BBB")
    await svc.customer("GE-CHILD", None, parent="GE-PARENT", currency="JPY")
    await svc.invoice("GE-CHILD", "I-1", "5000000", currency="JPY")
    parent = await svc.decided("GE-PARENT", "SO-1", "1000.00")
    assert (parent["decision"], parent["group"]) == (
        "approved",
        {"limit": "100000.00", "exposure": "31500.00", "available": "68500.00"},
    )
    assert (await svc.exposure("GE-PARENT"))["group"]["exposure"] == "31500.00"
    child = await svc.decided("GE-CHILD", "SO-2", "1000000", currency="JPY")
    assert (child["decision"], child["currency"], child["limit"]) == (
        "approved",
        "JPY",
        "16393443",
    )  # the parent's 100,000.00 EUR, in yen

    # The other way round: a JPY parent (16,393,443 JPY) whose EUR child owes 90,000.00 EUR
    # (14,754,098 JPY) has 1,639,345 JPY of room, not 16,303,443.
    await svc.customer("GJ-PARENT", "BBB", currency="JPY")
    await svc.customer("GJ-CHILD", None, parent="GJ-PARENT")
    await svc.invoice("GJ-CHILD", "I-2", "90000.00")
    over = await svc.decided("GJ-PARENT", "SO-3", "3000000", currency="JPY")
    assert (over["decision"], over["reasons"]) == ("rejected", ["exceeds_group_available"])
    assert over["group"] == {"limit": "16393443", "exposure": "14754098", "available": "1639345"}
    fits = await svc.decided("GJ-CHILD", "SO-4", "5000.00")
    assert (fits["decision"], fits["limit"], fits["available"]) == (
        "approved",
        "100000.00",
        "5000.00",
    )


# ---- exposure -----------------------------------------------------------------------------------


async def test_given_ar_events_when_exposure_is_read_now_and_as_of_then_both_are_right(
    svc: Service,
) -> None:
    await svc.customer("C-1", "BBB")
    await svc.invoice("C-1", "I-1", "1000.00", issued="2026-01-01", due="2026-01-31")
    await svc.invoice("C-1", "I-2", "500.00", issued="2026-02-10", due="2026-03-12")
    await svc.consume(
        "ar.payments",
        "payment.received",
        {
            "payment_id": "P-1",
            "customer_id": "C-1",
            "amount": "300.00",
            "currency": "EUR",
            "received_date": "2026-02-15",
        },
        time="2026-02-15T10:00:00Z",
    )

    now = await svc.exposure("C-1")
    ExposureUpdated.model_validate(now)
    assert {
        k: now[k]
        for k in (
            "open_receivables",
            "overdue_amount",
            "overdue_buckets",
            "max_days_overdue",
            "reserved",
            "exposure",
            "limit",
            "available",
            "utilization",
            "on_hold",
            "currency",
        )
    } == {
        "open_receivables": "1200.00",
        "overdue_amount": "700.00",
        "overdue_buckets": {"1-30": "700.00", "31-60": "0.00", "61-90": "0.00", "90+": "0.00"},
        "max_days_overdue": 29,
        "reserved": "0.00",
        "exposure": "1200.00",
        "limit": "100000.00",
        "available": "98800.00",
        "utilization": "0.0120",
        "on_hold": False,
        "currency": "EUR",
    }
    assert now["as_of"] == "2026-03-01T12:00:00Z"

    before_payment = await svc.exposure("C-1", as_of="2026-02-12T00:00:00Z")
    assert (before_payment["open_receivables"], before_payment["max_days_overdue"]) == (
        "1500.00",
        12,
    )
    assert before_payment["as_of"] == "2026-02-12T00:00:00Z"
    assert before_payment["overdue_buckets"]["1-30"] == "1000.00"
    # Before anything happened to a customer known now: nothing owed, nothing granted.
    early = await svc.exposure("C-1", as_of="2025-12-01T00:00:00Z")
    assert (early["open_receivables"], early["exposure"], early["limit"], early["as_of"]) == (
        "0.00",
        "0.00",
        "0.00",
        "2025-12-01T00:00:00Z",
    )
    for params in ({}, {"as_of": "2026-02-12T00:00:00Z"}):
        unknown = await svc.client.get(
            "/v1/customers/C-NONE/exposure", params=params, headers=auth(READER)
        )
        assert unknown.status_code == 404 and unknown.json()["field"] == "customer_id"
    for as_of in (
        "2026-02-12T00:00:00",  # naive
        "9999-12-31T23:59:59-01:00",
        "0001-01-01T00:00:00+01:00",
    ):  # past UTC's range
        bad = await svc.client.get(
            "/v1/customers/C-1/exposure", params={"as_of": as_of}, headers=auth(READER)
        )
        assert bad.status_code == 422 and bad.json()["field"] == "as_of", (as_of, bad.text)


async def test_given_an_invoice_for_the_order_when_consumed_then_it_consumes_the_reservation(
    svc: Service,
) -> None:
    await svc.customer("C-1", "BBB")
    await svc.decided("C-1", "SO-1", "1000.00")
    await svc.invoice(
        "C-1", "I-1", "400.00", order_id="SO-1", issued="2026-03-01", time="2026-03-01T13:00:00Z"
    )
    body = await svc.exposure("C-1")
    assert (body["open_receivables"], body["reserved"], body["exposure"]) == (
        "400.00",
        "600.00",
        "1000.00",
    )
    await svc.invoice(
        "C-1", "I-2", "700.00", order_id="SO-1", issued="2026-03-01", time="2026-03-01T14:00:00Z"
    )
    body = await svc.exposure("C-1")
    assert (body["open_receivables"], body["reserved"], body["exposure"]) == (
        "1100.00",
        "0.00",
        "1100.00",
    )
    # Fully invoiced: nothing left to release.
    assert (
        await svc.client.delete("/v1/credit-checks/SO-1", headers=auth(ORDERS))
    ).status_code == 404


async def test_given_a_reservation_when_its_ttl_passes_then_the_scheduler_frees_it(
    svc: Service,
) -> None:
    await svc.customer("C-1", "CCC")
    await svc.decided("C-1", "SO-1", "5000.00")
    assert await svc.host.core.run_due() == 0
    svc.clock.now = START + timedelta(hours=72)
    assert await svc.host.core.run_due() == 1
    assert await svc.host.core.run_due() == 0
    assert (await svc.exposure("C-1"))["reserved"] == "0.00"
    assert (await svc.outbox("credit.exposure"))[-1]["data"]["reserved"] == "0.00"
    fresh = await svc.decided("C-1", "SO-1", "5000.00")  # judged afresh after expiry
    assert fresh["decision"] == "approved" and fresh["reserved"] == "5000.00"


async def test_given_checks_then_each_live_reservation_is_a_row_and_the_document_stays(
    svc: Service,
) -> None:
    """A check writes its reservation as a row of its own and leaves the customer's state
    document as it was (it does not grow with the orders); a release or an expiry deletes
    the row; the stored projection still equals a replay."""
    await svc.customer("C-1", "CCC")
    await svc.decided("C-1", "SO-0", "1.00")  # today's first event moves the document's date

    async def stored() -> tuple[str, dict[str, str]]:
        async with svc.host.engine.connect() as conn:
            row = await store.lock_customers(conn, ["C-1"])
            held = await store.read_reservations(conn, ["C-1"])
        return row["C-1"].state, {r.order_id: str(r.amount) for r in held.get("C-1", [])}

    document, held = await stored()
    assert held == {"SO-0": "1.00"}
    assert "SO-0" not in document
    responses = await asyncio.gather(*(svc.check("C-1", f"SO-{n}", "100.00") for n in range(1, 11)))
    assert all(r.json()["decision"] == "approved" for r in responses)
    after, held = await stored()
    assert after == document
    assert held == {"SO-0": "1.00", **{f"SO-{n}": "100.00" for n in range(1, 11)}}

    released = await svc.client.delete("/v1/credit-checks/SO-3", headers=auth(ORDERS))
    assert released.status_code == 204
    svc.clock.now = START + timedelta(hours=1)
    await svc.decided("C-1", "SO-LATE", "50.00")
    svc.clock.now = START + timedelta(hours=72)  # all but SO-LATE expire now
    assert await svc.host.core.run_due() == 10
    _, held = await stored()
    assert held == {"SO-LATE": "50.00"}
    assert (await svc.exposure("C-1"))["reserved"] == "50.00"
    assert await svc.host.core.verify() == []


# ---- limits -------------------------------------------------------------------------------------


async def test_given_grade_changes_when_the_limit_is_read_then_it_and_its_history_follow(
    svc: Service,
) -> None:
    await svc.customer("C-1", "BBB")
    await svc.assess("C-1", "A", time="2026-02-01T00:00:00Z")
    await svc.assess("C-1", "BB", time="2026-02-15T00:00:00Z")
    limit = await svc.limit("C-1")
    assert {
        k: limit[k]
        for k in ("limit", "currency", "grade", "source", "expires_at", "on_hold", "policy_version")
    } == {
        "limit": "50000.00",
        "currency": "EUR",
        "grade": "BB",
        "source": "policy",
        "expires_at": None,
        "on_hold": False,
        "policy_version": "2026.1",
    }

    history = (await svc.client.get("/v1/customers/C-1/limit/history", headers=auth(READER))).json()
    assert [
        (h["previous_limit"], h["limit"], h["reason"], h["grade"]) for h in history["items"]
    ] == [
        ("250000.00", "50000.00", "policy", "BB"),
        ("100000.00", "250000.00", "policy", "A"),
        ("0.00", "100000.00", "policy", "BBB"),
    ]
    for item in history["items"]:
        LimitChanged.model_validate(item)
    assert history["next_cursor"] is None

    first = (
        await svc.client.get("/v1/customers/C-1/limit/history?limit=2", headers=auth(READER))
    ).json()
    assert [h["limit"] for h in first["items"]] == ["50000.00", "250000.00"]
    rest = (
        await svc.client.get(
            "/v1/customers/C-1/limit/history",
            params={"limit": 2, "cursor": first["next_cursor"]},
            headers=auth(READER),
        )
    ).json()
    assert [h["limit"] for h in rest["items"]] == ["100000.00"] and rest["next_cursor"] is None
    assert [c["limit"] for c in await svc.limit_changes("C-1")] == [
        "100000.00",
        "250000.00",
        "50000.00",
    ]
    bad = await svc.client.get("/v1/customers/C-1/limit/history?cursor=%%%", headers=auth(READER))
    assert bad.status_code == 422 and bad.json()["field"] == "cursor"


async def test_given_a_limit_decrease_when_requested_then_it_applies_at_once(
    svc: Service,
) -> None:
    await svc.customer("C-1", "BBB")
    response = await svc.client.post(
        "/v1/customers/C-1/limit-requests",
        headers=auth(),
        json={"requested_limit": "40000.00", "reason": "risk"},
    )
    assert response.status_code == 201
    assert (response.json()["status"], response.json()["requested_limit"]) == (
        "approved",
        "40000.00",
    )
    assert (await svc.limit("C-1"))[("limit")] == "40000.00"
    change = (await svc.limit_changes("C-1"))[-1]
    assert (change["previous_limit"], change["limit"], change["reason"]) == (
        "100000.00",
        "40000.00",
        "manual",
    )
    assert change["request_id"] == response.json()["request_id"]


async def test_given_a_limit_increase_when_another_principal_approves_then_it_applies(
    svc: Service,
) -> None:
    await svc.customer("C-1", "BBB")
    response = await svc.client.post(
        "/v1/customers/C-1/limit-requests",
        headers=auth(),
        json={"requested_limit": "150000.00", "reason": "growth"},
    )
    assert response.status_code == 201
    request_id = response.json()["request_id"]
    assert response.json()["status"] == "pending"
    assert (await svc.limit("C-1"))["limit"] == "100000.00"

    own = await svc.client.post(f"/v1/limit-requests/{request_id}/approve", headers=auth())
    assert own.status_code == 403 and own.headers["content-type"] == "application/problem+json"
    approved = await svc.client.post(
        f"/v1/limit-requests/{request_id}/approve", headers=auth(APPROVER), json={"note": "fine"}
    )
    assert approved.status_code == 200
    assert (approved.json()["status"], approved.json()["decided_by"]) == ("approved", "bob")
    limit = await svc.limit("C-1")
    assert (limit["limit"], limit["source"]) == ("150000.00", "manual")
    change = (await svc.limit_changes("C-1"))[-1]
    assert {
        k: change[k]
        for k in (
            "previous_limit",
            "limit",
            "reason",
            "request_id",
            "changed_by",
            "requested_by",
            "grade",
        )
    } == {
        "previous_limit": "100000.00",
        "limit": "150000.00",
        "reason": "manual",
        "request_id": request_id,
        "changed_by": "bob",
        "requested_by": "ana",
        "grade": "BBB",
    }
    twice = await svc.client.post(
        f"/v1/limit-requests/{request_id}/approve", headers=auth(APPROVER)
    )
    assert twice.status_code == 409

    # A later grade change does not override the approved manual limit.
    await svc.assess("C-1", "CCC", time="2026-02-20T00:00:00Z")
    assert ((await svc.limit("C-1"))["limit"], (await svc.limit("C-1"))["grade"]) == (
        "150000.00",
        "CCC",
    )


async def test_given_a_limit_increase_when_rejected_then_the_limit_stays(svc: Service) -> None:
    await svc.customer("C-1", "BBB")
    request_id = (
        await svc.client.post(
            "/v1/customers/C-1/limit-requests",
            headers=auth(),
            json={"requested_limit": "150000.00", "reason": "growth"},
        )
    ).json()["request_id"]
    rejected = await svc.client.post(
        f"/v1/limit-requests/{request_id}/reject", headers=auth(APPROVER), json={"note": "no"}
    )
    assert rejected.status_code == 200 and rejected.json()["status"] == "rejected"
    assert (await svc.limit("C-1"))["limit"] == "100000.00"
    assert len(await svc.limit_changes("C-1")) == 1  # only the policy limit of the grade
    unknown = await svc.client.post("/v1/limit-requests/nope/approve", headers=auth(APPROVER))
    assert unknown.status_code == 404


async def test_given_a_temporary_limit_when_it_expires_then_the_scheduler_restores_policy(
    svc: Service,
) -> None:
    await svc.customer("C-1", "BBB")
    ends = START + timedelta(days=10)
    request_id = await svc.temporary_request("C-1", "300000.00", ends)
    await svc.client.post(f"/v1/limit-requests/{request_id}/approve", headers=auth(APPROVER))
    limit = await svc.limit("C-1")
    assert (limit["limit"], limit["source"], limit["expires_at"]) == (
        "300000.00",
        "temporary",
        "2026-03-11T12:00:00Z",
    )
    assert (await svc.limit_changes("C-1"))[-1]["reason"] == "temporary"

    assert await svc.host.core.run_due() == 0
    svc.clock.now = ends + timedelta(minutes=1)
    assert await svc.host.core.run_due() == 1
    assert await svc.host.core.run_due() == 0
    limit = await svc.limit("C-1")
    assert (limit["limit"], limit["source"], limit["expires_at"]) == ("100000.00", "policy", None)
    change = (await svc.limit_changes("C-1"))[-1]
    assert (change["previous_limit"], change["limit"], change["reason"]) == (
        "300000.00",
        "100000.00",
        "expired",
    )
    assert change["effective_at"] == "2026-03-11T12:00:00Z"


async def test_given_a_standing_manual_limit_when_a_temporary_decrease_ends_then_the_manual_limit_stands_again(
    svc: Service,
) -> None:
    """Issue 19, finding 1: one credit:write principal must not raise credit by lowering it
    for a moment. A temporary limit overlays the standing one and gives it back at its end."""
    # Given grade A (policy 250,000) under a standing manual limit of 20,000 (a decrease:
    # it needs no approver)
    await svc.customer("C-1", "A")
    standing = await svc.client.post(
        "/v1/customers/C-1/limit-requests",
        headers=auth(),
        json={"requested_limit": "20000.00", "reason": "watch list"},
    )
    assert standing.status_code == 201 and standing.json()["status"] == "approved"
    assert (await svc.limit("C-1"))["limit"] == "20000.00"
    # When the same principal asks for a temporary 19,999 for 70 s (applied at once: lower)
    ends = START + timedelta(seconds=70)
    request_id = await svc.temporary_request("C-1", "19999.00", ends)
    limit = await svc.limit("C-1")
    assert (limit["limit"], limit["source"]) == ("19999.00", "temporary")
    # And it ends
    svc.clock.now = ends + timedelta(seconds=1)
    assert await svc.host.core.run_due() == 1
    # Then the standing manual limit stands again, not the policy's 250,000
    limit = await svc.limit("C-1")
    assert (limit["limit"], limit["source"], limit["expires_at"]) == ("20000.00", "manual", None)
    change = (await svc.limit_changes("C-1"))[-1]
    assert (change["previous_limit"], change["limit"], change["reason"]) == (
        "19999.00",
        "20000.00",
        "expired",
    )
    assert change["request_id"] == standing.json()["request_id"]
    assert request_id != change["request_id"]
    # And a 150,000 order is not approved
    order = await svc.decided("C-1", "SO-BIG", "150000.00")
    assert order["decision"] == "rejected" and "exceeds_available" in order["reasons"]
    # And a replay reproduces it (issue 19, finding 2: replay crashed on decided requests)
    assert await svc.host.core.verify() == []


async def test_given_a_temporary_increase_approved_over_a_manual_limit_when_it_ends_then_the_manual_limit_stands(
    svc: Service,
) -> None:
    await svc.customer("C-1", "A")
    await svc.client.post(
        "/v1/customers/C-1/limit-requests",
        headers=auth(),
        json={"requested_limit": "20000.00", "reason": "watch list"},
    )
    ends = START + timedelta(days=5)
    request_id = await svc.temporary_request("C-1", "60000.00", ends)
    assert (await svc.limit("C-1"))["limit"] == "20000.00"  # an increase waits for approval
    approved = await svc.client.post(
        f"/v1/limit-requests/{request_id}/approve", headers=auth(APPROVER)
    )
    assert approved.status_code == 200, approved.text
    assert (await svc.limit("C-1"))["limit"] == "60000.00"
    # A "decrease" to 50,000 that would outlast the temporary 60,000 is above the standing
    # 20,000 that follows it: it waits for approval like any increase
    longer = await svc.client.post(
        "/v1/customers/C-1/limit-requests",
        headers=auth(),
        json={
            "requested_limit": "50000.00",
            "reason": "season",
            "expires_at": (ends + timedelta(days=5)).isoformat(),
        },
    )
    assert longer.status_code == 201 and longer.json()["status"] == "pending"
    assert (await svc.limit("C-1"))["limit"] == "60000.00"
    svc.clock.now = ends + timedelta(minutes=1)
    await svc.host.core.run_due()
    limit = await svc.limit("C-1")
    assert (limit["limit"], limit["source"]) == ("20000.00", "manual")
    assert await svc.host.core.verify() == []


async def test_given_decided_limit_requests_when_replayed_and_verified_then_both_succeed(
    svc: Service,
) -> None:
    """Issue 19, finding 2: a replay page held a request's submission and its decision, and
    one upsert touched the same limits_requests row twice (PostgreSQL refuses that)."""
    # Given an increase approved by another principal and one rejected
    await svc.customer("C-1", "BBB")
    for amount, verb in (("150000.00", "approve"), ("170000.00", "reject")):
        request_id = (
            await svc.client.post(
                "/v1/customers/C-1/limit-requests",
                headers=auth(),
                json={"requested_limit": amount, "reason": "growth"},
            )
        ).json()["request_id"]
        decided = await svc.client.post(
            f"/v1/limit-requests/{request_id}/{verb}", headers=auth(APPROVER)
        )
        assert decided.status_code == 200, decided.text
    # When the projections are verified against a replay, and replayed
    # Then both run, and find nothing to differ
    assert await svc.host.core.verify() == []
    assert await svc.host.core.replay() > 0
    assert (await svc.limit("C-1"))["limit"] == "150000.00"
    assert await svc.host.core.verify() == []


async def test_given_a_temporary_request_already_ended_when_approved_then_409_nothing_changes(
    svc: Service,
) -> None:
    await svc.customer("C-1", "BBB")
    ends = START + timedelta(days=2)
    request_id = await svc.temporary_request("C-1", "300000.00", ends)
    svc.clock.now = ends + timedelta(hours=1)
    late = await svc.client.post(f"/v1/limit-requests/{request_id}/approve", headers=auth(APPROVER))
    assert late.status_code == 409, late.text
    assert late.json()["field"] == "request_id"
    limit = await svc.limit("C-1")
    assert (limit["limit"], limit["source"]) == ("100000.00", "policy")
    rejected = await svc.client.post(
        f"/v1/limit-requests/{request_id}/reject", headers=auth(APPROVER)
    )
    assert rejected.status_code == 200 and rejected.json()["status"] == "rejected"


async def test_given_a_lapsed_temporary_limit_and_no_policy_limit_then_limit_expired(
    svc: Service,
) -> None:
    await svc.customer("C-1", None)  # unrated: policy limit 0
    ends = START + timedelta(days=1)
    request_id = (
        await svc.client.post(
            "/v1/customers/C-1/limit-requests",
            headers=auth(),
            json={"requested_limit": "5000.00", "reason": "trial", "expires_at": ends.isoformat()},
        )
    ).json()["request_id"]
    await svc.client.post(f"/v1/limit-requests/{request_id}/approve", headers=auth(APPROVER))
    assert (await svc.decided("C-1", "SO-1", "100.00"))["decision"] == "approved"
    svc.clock.now = ends + timedelta(hours=1)
    await svc.host.core.run_due()
    late = await svc.decided("C-1", "SO-2", "100.00")
    assert (late["decision"], late["reasons"]) == ("rejected", ["limit_expired"])


# ---- portfolio ----------------------------------------------------------------------------------


async def test_given_a_portfolio_when_listed_then_filters_sort_pages_and_totals_work(
    svc: Service,
) -> None:
    await svc.customer("P-1", "BBB")  # 100,000: 50 % used
    await svc.invoice("P-1", "I-1", "50000.00")
    await svc.customer("P-2", "CCC")  # 5,000: over the limit
    await svc.invoice("P-2", "I-2", "6000.00")
    await svc.customer("P-3", "BBB")  # 100,000: 10 %, overdue
    await svc.invoice("P-3", "I-3", "10000.00", issued="2026-01-01", due="2026-01-31")
    await svc.customer("P-4", "A")  # 250,000: unused, on hold
    await svc.client.post("/v1/customers/P-4/hold", headers=auth(), json={"reason": "x"})
    await svc.customer("P-5", None)  # unrated: no limit, no utilisation
    await svc.host.core.run_due()  # the daily ageing, as the scheduler records it

    def ids(body: dict[str, Any]) -> list[str]:
        return [i["customer_id"] for i in body["items"]]

    async def page(**params: Any) -> dict[str, Any]:
        response = await svc.client.get("/v1/portfolio", params=params, headers=auth(READER))
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    everyone = await page()
    assert ids(everyone) == ["P-1", "P-2", "P-3", "P-4", "P-5"]
    assert everyone["totals"] | {"by_currency": None} == {
        "customers": 5,
        "limit": "455000.00",
        "exposure": "66000.00",
        "over_limit": 1,
        "currency": "EUR",
        "by_currency": None,
    }
    first = everyone["items"][0]
    assert {
        k: first[k]
        for k in (
            "customer_id",
            "name",
            "grade",
            "limit",
            "exposure",
            "available",
            "utilization",
            "overdue_amount",
            "on_hold",
        )
    } == {
        "customer_id": "P-1",
        "name": "Customer P-1",
        "grade": "BBB",
        "limit": "100000.00",
        "exposure": "50000.00",
        "available": "50000.00",
        "utilization": "0.5000",
        "overdue_amount": "0.00",
        "on_hold": False,
    }
    assert "open_alerts" in first

    assert ids(await page(grade="BBB")) == ["P-1", "P-3"]
    assert ids(await page(status="over_limit")) == ["P-2"]
    assert ids(await page(status="on_hold")) == ["P-4"]
    assert ids(await page(status="overdue")) == ["P-3"]
    assert (await page(grade="BBB"))["totals"]["customers"] == 2

    top = await page(sort="-utilization", limit=2)
    assert ids(top) == ["P-2", "P-1"]
    seen = ids(top)
    cursor = top["next_cursor"]
    while cursor:
        more = await page(sort="-utilization", limit=2, cursor=cursor)
        seen += ids(more)
        cursor = more["next_cursor"]
    assert seen == ["P-2", "P-1", "P-3", "P-4", "P-5"]  # no utilisation (no limit) last

    seen, cursor = [], None
    while True:
        more = await page(sort="utilization", limit=2, **({"cursor": cursor} if cursor else {}))
        seen += ids(more)
        cursor = more["next_cursor"]
        if not cursor:
            break
    assert seen == ["P-4", "P-3", "P-1", "P-2", "P-5"]

    # Cursors it did not issue for this list and sort: 422 naming cursor, never a 500 nor a
    # page of something else.
    def b64(value: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode()

    by_exposure = (await page(sort="-exposure", limit=2))["next_cursor"]
    by_utilization = top["next_cursor"]
    history = await svc.client.post("/v1/customers/P-1/hold", headers=auth(), json={"reason": "x"})
    assert history.status_code == 200, history.text
    history_cursor = (
        await svc.client.get("/v1/customers/P-1/limit/history?limit=1", headers=auth(READER))
    ).json()["next_cursor"]
    assert by_exposure and by_utilization and history_cursor
    for sort, cursor in [
        ("customer_id", history_cursor),
        ("customer_id", b64([1, 2, 3])),
        ("customer_id", b64(["0.5"])),
        ("customer_id", b64([[1], [2]])),
        ("-utilization", b64(["x", "y"])),
        ("-utilization", by_exposure),
        ("-exposure", by_utilization),
        ("-exposure", b64(["NaN", "P-1"])),
        ("-exposure", b64(["", "portfolio:-exposure"])),
        ("customer_id", "%%%"),
    ]:
        response = await svc.client.get(
            "/v1/portfolio", params={"sort": sort, "cursor": cursor}, headers=auth(READER)
        )
        assert response.status_code == 422, (sort, cursor, response.text)
        assert response.json()["field"] == "cursor"
    # Nor for another selection (it would page through another set of customers).
    other = await svc.client.get(
        "/v1/portfolio",
        headers=auth(READER),
        params={"sort": "-exposure", "status": "overdue", "cursor": by_exposure},
    )
    assert other.status_code == 422 and other.json()["field"] == "cursor"
    for cid, cursor in [
        ("P-1", by_exposure),
        ("P-1", b64(["x", "y"])),
        ("P-1", b64([None, "C-1"])),
        ("P-1", b64([True])),
        ("P-1", b64(["limit-history:P-1", "7"])),
        ("P-3", history_cursor),
    ]:  # another customer's history
        response = await svc.client.get(
            f"/v1/customers/{cid}/limit/history", params={"cursor": cursor}, headers=auth(READER)
        )
        assert response.status_code == 422, (cursor, response.text)
        assert response.json()["field"] == "cursor"

    bad = await svc.client.get("/v1/portfolio?status=broke", headers=auth(READER))
    assert bad.status_code == 422 and bad.json()["field"] == "status"
    too_many = await svc.client.get("/v1/portfolio?limit=501", headers=auth(READER))
    assert too_many.status_code == 422 and too_many.json()["field"] == "limit"


async def test_given_customers_in_several_currencies_then_the_totals_are_in_the_base_currency(
    svc: Service,
) -> None:
    await svc.customer("M-1", "BBB")  # 100,000.00 EUR
    await svc.invoice("M-1", "I-1", "1000.00")
    await svc.customer("M-2", "BBB", currency="USD")  # 108,695.65 USD (EUR 100,000 / 0.92)
    await svc.invoice("M-2", "I-2", "2000.00", currency="USD")
    response = await svc.client.get("/v1/portfolio", headers=auth(READER))
    assert response.status_code == 200, response.text
    totals = response.json()["totals"]
    assert totals["by_currency"] == {
        "EUR": {"limit": "100000.00", "exposure": "1000.00"},
        "USD": {"limit": "108695.65", "exposure": "2000.00"},
    }
    # USD/EUR 0.92: 108,695.65 → 100,000.00 and 2,000.00 → 1,840.00
    assert (totals["currency"], totals["limit"], totals["exposure"]) == (
        "EUR",
        "200000.00",
        "2840.00",
    )
    usd_only = (
        await svc.client.get("/v1/portfolio?grade=BBB&status=overdue", headers=auth(READER))
    ).json()["totals"]
    assert (usd_only["customers"], usd_only["currency"], usd_only["limit"]) == (0, "EUR", "0.00")


async def test_given_customers_in_several_currencies_then_money_sorts_compare_converted_amounts(
    svc: Service,
) -> None:
    """Sorted by exposure, 500,000 JPY (3,050.00 EUR) ranks below 19,500.00 EUR and 10,000.00
    USD (9,200.00 EUR), not above them as raw numbers; a currency with no rate to the base
    currency sorts last, as nulls do; the pages follow the same order."""
    await svc.customer("S-EUR", "BBB")
    await svc.invoice("S-EUR", "I-1", "19500.00")
    await svc.customer("S-JPY", "BBB", currency="JPY")
    await svc.invoice("S-JPY", "I-2", "500000", currency="JPY")
    await svc.customer("S-USD", "BBB", currency="USD")
    await svc.invoice("S-USD", "I-3", "10000.00", currency="USD")
    await svc.customer("S-NOK", None, currency="NOK")  # no NOK rate in the policy

    async def order(sort: str, size: int) -> list[str]:
        seen: list[str] = []
        cursor = None
        while True:
            params = {"sort": sort, "limit": size, **({"cursor": cursor} if cursor else {})}
            response = await svc.client.get("/v1/portfolio", params=params, headers=auth(READER))
            assert response.status_code == 200, response.text
            seen += [i["customer_id"] for i in response.json()["items"]]
            cursor = response.json()["next_cursor"]
            if not cursor:
                return seen

    for size in (1, 2, 10):
        assert await order("-exposure", size) == ["S-EUR", "S-USD", "S-JPY", "S-NOK"]
        assert await order("exposure", size) == ["S-JPY", "S-USD", "S-EUR", "S-NOK"]
    # Limits: BBB is 100,000.00 EUR in each currency, rounded to its minor units: 16,393,443
    # JPY is 100,000.0023 EUR, 108,695.65 USD is 99,999.998 EUR.
    assert await order("-limit", 1) == ["S-JPY", "S-EUR", "S-USD", "S-NOK"]


# ---- validation, size, auth -------------------------------------------------------------------

_CHECK = {"order_id": "SO-1", "customer_id": "C-1", "amount": "10.00", "currency": "EUR"}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"amount": "-10.00"}, "amount"),
        ({"amount": "0"}, "amount"),
        ({"amount": "0.00"}, "amount"),
        ({"amount": "1000000000000000.01"}, "amount"),
        ({"amount": 10**16}, "amount"),
        ({"amount": "10.001"}, "amount"),
        ({"amount": "10.5", "currency": "JPY"}, "amount"),
        ({"amount": "ten"}, "amount"),
        ({"amount": "1e3"}, "amount"),
        ({"amount": True}, "amount"),
        ({"amount": None}, "amount"),
        ({"currency": "XYZ"}, "currency"),
        ({"currency": "eur"}, "currency"),
        ({"amount": None, "_drop": "amount"}, "amount"),
        ({"_drop": "currency"}, "currency"),
        ({"_drop": "order_id"}, "order_id"),
        ({"_drop": "customer_id"}, "customer_id"),
        ({"order_id": ""}, "order_id"),
        ({"order_id": "SO-\u0000-1"}, "order_id"),
        ({"customer_id": "C-\u0000"}, "customer_id"),
        ({"reserve": "yes"}, "reserve"),
        ({"reserve": "false"}, "reserve"),
        ({"reserve": 0}, "reserve"),
        ({"reserve": 1}, "reserve"),
        ({"reserve": None}, "reserve"),
    ],
)
async def test_given_a_bad_check_when_posted_then_422_problem_names_the_field(
    bare: httpx.AsyncClient,
    changes: dict[str, Any],
    field: str,
) -> None:
    body = {**_CHECK, **changes}
    drop = body.pop("_drop", None)
    if drop:
        body.pop(drop)
    response = await bare.post("/v1/credit-checks", headers=auth(ORDERS), json=body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 422 and problem["field"] == field
    assert any(e["field"] == field for e in problem["errors"])


async def test_given_bad_checks_when_posted_then_nothing_is_recorded(svc: Service) -> None:
    await svc.customer("C-1", "BBB")
    recorded = await svc.outbox()
    for amount in ("-1.00", "0", "10.001", "1000000000000000.01", "x"):
        response = await svc.check("C-1", "SO-1", amount)
        assert response.status_code == 422
    bad_json = await svc.client.post(
        "/v1/credit-checks",
        headers=auth(ORDERS) | {"content-type": "application/json"},
        content=b"{not json",
    )
    assert bad_json.status_code == 422 and bad_json.json()["field"] == "body"
    assert await svc.outbox() == recorded
    assert (await svc.exposure("C-1"))["reserved"] == "0.00"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"requested_limit": "-1.00", "reason": "x"}, "requested_limit"),
        ({"requested_limit": "10.001", "reason": "x"}, "requested_limit"),
        ({"requested_limit": "abc", "reason": "x"}, "requested_limit"),
        ({"requested_limit": "1000000000000000.01", "reason": "x"}, "requested_limit"),
        ({"reason": "x"}, "requested_limit"),
        ({"requested_limit": "10.00"}, "reason"),
        (
            {"requested_limit": "10.00", "reason": "x", "expires_at": "2026-02-01T00:00:00Z"},
            "expires_at",
        ),
        (
            {"requested_limit": "10.00", "reason": "x", "expires_at": "2026-12-31T00:00:00Z"},
            "expires_at",
        ),
    ],
)
async def test_given_a_bad_limit_request_when_posted_then_422_names_the_field(
    svc: Service,
    body: dict[str, Any],
    field: str,
) -> None:
    await svc.customer("C-1", "BBB")
    response = await svc.client.post("/v1/customers/C-1/limit-requests", headers=auth(), json=body)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field


async def test_given_a_missing_hold_reason_when_posted_then_422(svc: Service) -> None:
    await svc.customer("C-1", "BBB")
    response = await svc.client.post("/v1/customers/C-1/hold", headers=auth(), json={})
    assert response.status_code == 422 and response.json()["field"] == "reason"


async def test_given_a_body_nested_thousands_deep_when_posted_then_422_names_the_body(
    bare: httpx.AsyncClient,
) -> None:
    # ≈ 10 kB, well under the size limit: the parser's recursion, not the size, refuses it.
    nested = "[" * 5000 + "]" * 5000
    raw = json.dumps(_CHECK)[:-1] + f', "x": {nested}}}'
    for path in ("/v1/credit-checks", "/v1/customers/C-1/hold"):
        response = await bare.post(
            path,
            headers=auth(ORDERS if "checks" in path else ANALYST)
            | {"content-type": "application/json"},
            content=raw,
        )
        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["field"] == "body"


async def test_given_a_body_over_64_kib_when_posted_then_413(bare: httpx.AsyncClient) -> None:
    body = {**_CHECK, "note": "x" * (64 * 1024)}
    response = await bare.post("/v1/credit-checks", headers=auth(ORDERS), json=body)
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["field"] == "body"


async def test_given_amounts_up_to_10_to_the_15_when_used_then_they_stay_exact(
    svc: Service,
) -> None:
    await svc.customer("C-1", "BBB")
    huge = "999999999999999.99"
    request_id = (
        await svc.client.post(
            "/v1/customers/C-1/limit-requests",
            headers=auth(),
            json={"requested_limit": huge, "reason": "whale"},
        )
    ).json()["request_id"]
    await svc.client.post(f"/v1/limit-requests/{request_id}/approve", headers=auth(APPROVER))
    assert (await svc.limit("C-1"))["limit"] == huge

    body = await svc.decided("C-1", "SO-1", "999999999999999.98")
    assert (body["decision"], body["amount"], body["reserved"], body["available"]) == (
        "approved",
        "999999999999999.98",
        "999999999999999.98",
        "0.01",
    )
    assert (await svc.exposure("C-1"))["exposure"] == "999999999999999.98"
    exact_number = await svc.client.post(
        "/v1/credit-checks",
        headers=auth(ORDERS) | {"content-type": "application/json"},
        content=b'{"order_id":"SO-2","customer_id":"C-1","amount":0.01,"currency":"EUR"}',
    )
    assert exact_number.json()["decision"] == "approved"  # a JSON number read exactly
    assert exact_number.json()["available"] == "0.00"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/credit-checks"),
        ("DELETE", "/v1/credit-checks/SO-NONE"),
        ("GET", "/v1/credit-checks/no-such-check"),
        ("GET", "/v1/customers/C-NONE/exposure"),
        ("GET", "/v1/customers/C-NONE/limit"),
        ("GET", "/v1/customers/C-NONE/limit/history"),
        ("POST", "/v1/customers/C-NONE/limit-requests"),
        ("POST", "/v1/limit-requests/nope/approve"),
        ("POST", "/v1/limit-requests/nope/reject"),
        ("POST", "/v1/customers/C-NONE/hold"),
        ("DELETE", "/v1/customers/C-NONE/hold"),
        ("GET", "/v1/portfolio"),
    ],
)
async def test_given_no_or_an_unknown_token_when_called_then_401_before_anything_else(
    bare: httpx.AsyncClient,
    method: str,
    path: str,
) -> None:
    for headers in ({}, auth("not-a-token"), {"Authorization": "Basic abc"}):
        response = await bare.request(method, path, headers=headers, json={})
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.json()["field"] == "authorization"  # what is wrong is named


@pytest.mark.parametrize(
    ("method", "path", "token"),
    [
        ("POST", "/v1/credit-checks", READER),
        ("DELETE", "/v1/credit-checks/SO-NONE", READER),
        ("GET", "/v1/credit-checks/no-such-check", ORDERS),
        ("GET", "/v1/customers/C-NONE/exposure", ORDERS),
        ("POST", "/v1/customers/C-NONE/limit-requests", APPROVER),
        ("POST", "/v1/limit-requests/nope/approve", READER),
        ("POST", "/v1/customers/C-NONE/hold", ORDERS),
        ("GET", "/v1/portfolio", ORDERS),
    ],
)
async def test_given_a_token_without_the_scope_when_called_then_403_before_404(
    bare: httpx.AsyncClient,
    method: str,
    path: str,
    token: str,
) -> None:
    response = await bare.request(method, path, headers=auth(token), json=_CHECK)
    assert response.status_code == 403, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["field"] == "authorization"


async def test_the_ops_endpoints_need_no_token(bare: httpx.AsyncClient) -> None:
    assert (await bare.get("/healthz")).status_code == 200
    assert (await bare.get("/metrics")).status_code == 200
    assert (await bare.get("/openapi.json")).status_code == 200


# ---- metrics and replay -------------------------------------------------------------------------


def _sample(text: str, name: str, labels: str = "") -> Decimal:
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return Decimal(line[len(prefix) :])
    return Decimal(0)


async def test_given_checks_and_customers_when_metrics_are_scraped_then_they_are_counted(
    svc: Service,
) -> None:
    before = (await svc.client.get("/metrics")).text
    await svc.customer("M-1", "CCC")  # 5,000
    await svc.invoice("M-1", "I-1", "6000.00")
    await svc.customer("M-2", "BBB", currency="USD")
    await svc.decided("M-2", "SO-1", "10.00", currency="USD")
    await svc.decided("M-2", "SO-1", "10.00", currency="USD")  # a retry: counted again
    await svc.decided("M-1", "SO-2", "10.00")
    await refresh_portfolio_gauges(svc.host.engine)
    after = (await svc.client.get("/metrics")).text

    def grew(name: str, labels: str = "") -> Decimal:
        return _sample(after, name, labels) - _sample(before, name, labels)

    assert grew("creditwatch_credit_checks_total", 'decision="approved"') == 2
    assert grew("creditwatch_credit_checks_total", 'decision="rejected"') == 1
    assert grew("creditwatch_credit_check_seconds_count") >= 2
    assert "# TYPE creditwatch_credit_check_seconds histogram" in after
    assert _sample(after, "creditwatch_portfolio_exposure", 'currency="EUR"') == 6000
    assert _sample(after, "creditwatch_portfolio_limit", 'currency="EUR"') == 5000
    assert _sample(after, "creditwatch_portfolio_limit", 'currency="USD"') == D("108695.65")
    assert _sample(after, "creditwatch_portfolio_exposure", 'currency="USD"') == 10
    assert _sample(after, "creditwatch_customers_over_limit") == 1
    assert "M-1" not in after and "M-2" not in after  # never a customer id as a label


async def test_given_a_history_of_commands_and_events_when_replayed_then_nothing_differs(
    svc: Service,
) -> None:
    await svc.customer("R-1", "BBB")
    await svc.customer("R-2", None, parent="R-1")
    await svc.invoice(
        "R-1", "I-1", "1000.00", order_id="SO-1", issued="2026-03-01", time="2026-03-01T13:00:00Z"
    )
    await svc.decided("R-1", "SO-1", "3000.00")
    await svc.decided("R-2", "SO-2", "500.00")
    await svc.client.post("/v1/customers/R-1/hold", headers=auth(), json={"reason": "x"})
    await svc.client.post(
        "/v1/customers/R-1/limit-requests",
        headers=auth(),
        json={"requested_limit": "1000.00", "reason": "x"},
    )
    svc.clock.now = START + timedelta(days=5)
    await svc.host.core.run_due()
    assert await svc.host.core.verify() == []


async def test_given_alerts_on_credit_alerts_then_the_portfolio_counts_the_unresolved_ones(
    svc: Service,
) -> None:
    # Given a customer with two alerts raised, one of them later resolved
    await svc.customer("AL-1", "BBB")
    await svc.customer("AL-2", "BBB")

    def alert(alert_id: str, rule: str, status: str) -> dict[str, Any]:
        return {
            "alert_id": alert_id,
            "customer_id": "AL-1",
            "rule": rule,
            "severity": "warning",
            "status": status,
            "title": "t",
            "message": "m",
            "facts": {},
            "dedup_key": f"AL-1:{rule}",
            "raised_at": "2026-03-01T09:00:00Z",
            "resolved_at": None,
        }

    await svc.consume("credit.alerts", "alert.raised", alert("a1", "overdue", "open"))
    await svc.consume("credit.alerts", "alert.raised", alert("a2", "utilization_high", "open"))
    await svc.consume(
        "credit.alerts", "alert.updated", alert("a2", "utilization_high", "acknowledged")
    )
    resolved = alert("a1", "overdue", "resolved") | {"resolved_at": "2026-03-02T09:00:00Z"}
    await svc.consume("credit.alerts", "alert.resolved", resolved)

    # When the portfolio is listed
    page = (
        await svc.client.get("/v1/portfolio", params={"limit": 10}, headers=auth(READER))
    ).json()

    # Then an acknowledged alert still counts as open; the resolved one does not
    counts = {i["customer_id"]: i["open_alerts"] for i in page["items"]}
    assert counts["AL-1"] == 1
    assert counts["AL-2"] == 0


async def test_given_only_checks_and_alerts_for_an_id_then_it_is_no_customer_until_heard_of(
    svc: Service,
) -> None:
    await svc.customer("K-1", "BBB")
    # Order entry asks about an id nobody registered (a typo), and an alert names another.
    ghost = await svc.decided("GHOST-1", "SO-G1", "10.00")
    assert (ghost["decision"], ghost["reasons"]) == ("rejected", ["no_credit_limit"])
    stored = await svc.client.get(f"/v1/credit-checks/{ghost['check_id']}", headers=auth(READER))
    assert stored.status_code == 200  # the decision is stored all the same
    await svc.consume(
        "credit.alerts",
        "alert.raised",
        {
            "alert_id": "a-9",
            "customer_id": "GHOST-2",
            "rule": "overdue",
            "severity": "warning",
            "status": "open",
            "title": "t",
            "message": "m",
            "facts": {},
            "dedup_key": "GHOST-2:overdue",
            "raised_at": "2026-03-01T09:00:00Z",
            "resolved_at": None,
        },
    )

    for cid in ("GHOST-1", "GHOST-2"):
        for path in ("exposure", "exposure?as_of=2026-03-02T00:00:00Z", "limit", "limit/history"):
            response = await svc.client.get(f"/v1/customers/{cid}/{path}", headers=auth(READER))
            assert response.status_code == 404, (cid, path, response.text)
            assert response.json()["field"] == "customer_id"
        held = await svc.client.post(
            f"/v1/customers/{cid}/hold", headers=auth(), json={"reason": "x"}
        )
        asked = await svc.client.post(
            f"/v1/customers/{cid}/limit-requests",
            headers=auth(),
            json={"requested_limit": "100.00", "reason": "x"},
        )
        assert (held.status_code, asked.status_code) == (404, 404)
    page = (await svc.client.get("/v1/portfolio", headers=auth(READER))).json()
    assert [i["customer_id"] for i in page["items"]] == ["K-1"]
    assert page["totals"]["customers"] == 1
    assert not [
        e for e in await svc.outbox("credit.exposure") if e["subject"] in ("GHOST-1", "GHOST-2")
    ]

    # Once registered it is a customer like any other, its alert counted.
    await svc.register("GHOST-2")
    assert (await svc.exposure("GHOST-2"))["customer_id"] == "GHOST-2"
    page = (await svc.client.get("/v1/portfolio", headers=auth(READER))).json()
    assert {i["customer_id"]: i["open_alerts"] for i in page["items"]} == {"K-1": 0, "GHOST-2": 1}
    assert [
        e["data"]["as_of"] for e in await svc.outbox("credit.exposure") if e["subject"] == "GHOST-2"
    ] == ["2026-01-01T00:00:00Z"]


# ---- checks decided together --------------------------------------------------------------------
# On PostgreSQL the checks that queue up while a transaction is in flight are decided together in
# the next one; each must come out as if they had been decided one after another.


def _batch_histogram() -> tuple[float, float]:
    """(checks, transactions) observed so far by creditwatch_credit_check_batch_size."""
    samples = {s.name: s.value for m in metrics.CREDIT_CHECK_BATCH.collect() for s in m.samples}
    return (
        samples["creditwatch_credit_check_batch_size_sum"],
        samples["creditwatch_credit_check_batch_size_count"],
    )


async def test_given_many_checks_at_once_when_batched_then_fewer_transactions_same_outcome(
    svc: Service,
) -> None:
    await svc.customer("C-1", "CCC")  # 5,000.00
    await svc.customer("C-2", "CCC")
    checks_before, tx_before = _batch_histogram()
    responses = await asyncio.gather(
        *(svc.check(f"C-{1 + n % 2}", f"SO-{n}", "400.00") for n in range(30))
    )
    checks_after, tx_after = _batch_histogram()
    assert checks_after - checks_before == 30
    assert tx_after - tx_before < 30  # some went together
    by_customer: dict[str, list[str]] = {"C-1": [], "C-2": []}
    for r in responses:
        assert r.status_code == 200, r.text
        by_customer[r.json()["customer_id"]].append(r.json()["decision"])
    # 12 × 400 fit in 5,000; each later one is 200 over, within the 5 % tolerance (250): review,
    # which reserves nothing.
    for cid, decisions in by_customer.items():
        assert decisions.count("approved") == 12, (cid, decisions)
        assert decisions.count("review") == 3, (cid, decisions)
        exposure = await svc.exposure(cid)
        assert (exposure["reserved"], exposure["available"]) == ("4800.00", "200.00")
    assert await svc.host.core.verify() == []  # the stored projection equals a replay


async def test_given_a_retry_in_the_same_batch_then_it_gets_the_first_decision(
    svc: Service,
) -> None:
    await svc.customer("C-1", "CCC")
    responses = await asyncio.gather(*(svc.check("C-1", "SO-1", "400.00") for _ in range(5)))
    bodies = [r.json() for r in responses]
    assert {b["check_id"] for b in bodies} == {bodies[0]["check_id"]}
    assert (await svc.exposure("C-1"))["reserved"] == "400.00"
    got = await svc.client.get(f"/v1/credit-checks/{bodies[0]['check_id']}", headers=auth(READER))
    assert got.json() == bodies[0]


async def test_given_one_order_for_two_customers_in_one_batch_then_one_409_the_rest_stand(
    svc: Service,
) -> None:
    await svc.customer("C-1", "CCC")
    await svc.customer("C-2", "CCC")
    responses = await asyncio.gather(
        svc.check("C-1", "SO-X", "100.00"),
        svc.check("C-2", "SO-X", "100.00"),
        svc.check("C-2", "SO-Y", "100.00"),
    )
    assert sorted(r.status_code for r in responses) == [200, 200, 409]
    conflict = next(r for r in responses if r.status_code == 409)
    assert conflict.headers["content-type"].startswith("application/problem+json")
    assert responses[2].json()["decision"] == "approved"
    assert await svc.host.core.verify() == []


async def test_given_group_members_in_one_batch_then_the_group_room_is_shared(
    svc: Service,
) -> None:
    await svc.customer("G-PARENT", "BBB")  # 100,000.00 for the whole group
    await svc.customer("G-A", None, parent="G-PARENT")
    await svc.customer("G-B", None, parent="G-PARENT")
    responses = await asyncio.gather(
        *(
            svc.check(cid, f"SO-{n}", "30000.00")
            for n, cid in enumerate(["G-A", "G-B", "G-PARENT", "G-A", "G-B"])
        )
    )
    decisions = [r.json()["decision"] for r in responses]
    assert decisions.count("approved") == 3, decisions  # 90,000 of 100,000
    assert decisions.count("rejected") == 2, decisions  # 20,000 over, beyond the tolerance
    group = (await svc.exposure("G-PARENT"))["group"]
    assert group == {
        "members": 3,
        "limit": "100000.00",
        "exposure": "90000.00",
        "available": "10000.00",
    }
    assert await svc.host.core.verify() == []


async def test_given_one_check_that_fails_in_a_batch_then_only_it_fails(
    svc: Service,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await svc.customer("C-1", "CCC")
    service: Any = svc.host.core.service
    fold = service.fold

    def failing_fold(uow: Any, events: Any) -> Any:
        if any(getattr(e.event, "order_id", None) == "SO-BAD" for e in events):
            raise RuntimeError("a fault in one check")
        return fold(uow, events)

    monkeypatch.setattr(service, "fold", failing_fold)
    tx_before = _batch_histogram()[1]
    # The failed check's 500 is the app's answer, not an exception out of the test client.
    svc.client._transport = httpx.ASGITransport(
        app=svc.client._transport.app,  # type: ignore[attr-defined]
        raise_app_exceptions=False,
    )
    responses = await asyncio.gather(
        *(svc.check("C-1", order, "100.00") for order in ["SO-1", "SO-BAD", "SO-2", "SO-3"])
    )
    assert [r.status_code for r in responses] == [200, 500, 200, 200]
    assert _batch_histogram()[1] - tx_before >= 2  # the batch, then one by one
    assert (await svc.exposure("C-1"))["reserved"] == "300.00"
    missing = await svc.client.get("/v1/credit-checks/SO-BAD", headers=auth(READER))
    assert missing.status_code == 404
    assert await svc.host.core.verify() == []


async def test_given_checks_one_after_another_when_each_is_awaited_then_none_is_left_waiting(
    svc: Service,
) -> None:
    # Each next check arrives right as the previous batch's worker returns; it must start a
    # new one rather than wait in the queue for a worker that is already gone.
    await svc.customer("C-1", "CCC")
    checks = PostgresChecks(svc.host.core.service, svc.host.core)  # type: ignore[arg-type]
    try:
        async with asyncio.timeout(10):  # in this task: no extra task in between, as in a loop
            for n in range(5):
                verdict = await checks.check(_order("C-1", f"SO-{n}", "10.00"))
                assert verdict.decision == "approved"
    finally:
        await checks.close()
    assert (await svc.exposure("C-1"))["reserved"] == "50.00"


def _order(cid: str, order_id: str, amount: str) -> CheckOrder:
    return CheckOrder(
        order_id=order_id,
        customer_id=cid,
        amount=D(amount),
        currency="EUR",
        reserve=True,
        requested_by="order-entry",
    )


@pytest.mark.parametrize("noticed", [True, False])
async def test_given_the_kept_connection_was_cut_then_the_next_check_is_answered_on_a_new_one(
    svc: Service,
    noticed: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The batches keep a connection between them. Cut by the server (a restart, an admin,
    an idle timeout on the way), it is replaced, and the check in hand is still answered:
    whether the driver noticed the loss while idle or only when the batch used it."""
    await svc.customer("C-1", "CCC")
    checks = PostgresChecks(svc.host.core.service, svc.host.core)  # type: ignore[arg-type]
    try:
        assert (await checks.check(_order("C-1", "SO-1", "10.00"))).decision == "approved"
        raw = checks._raw
        assert raw is not None
        pid = raw.get_server_pid()
        async with svc.host.engine.connect() as admin:
            assert (
                await admin.exec_driver_sql(f"SELECT pg_terminate_backend({pid}, 5000)")
            ).scalar_one()
        for _ in range(100):
            if raw.is_closed():
                break
            await asyncio.sleep(0.02)
        assert raw.is_closed()
        if not noticed:
            # As if the loss had not been seen yet: it shows only when the batch uses it.
            monkeypatch.setattr(asyncpg.Connection, "is_closed", lambda self: False)
        second = await checks.check(_order("C-1", "SO-2", "10.00"))
        assert second.decision == "approved"
        assert checks._raw is not None and checks._raw.get_server_pid() != pid
        assert (
            await checks.check(_order("C-1", "SO-2", "10.00"))
        ).check_id == second.check_id  # a retry, answered with the stored decision
    finally:
        await checks.close()
    assert checks._raw is None
    assert (await svc.exposure("C-1"))["reserved"] == "20.00"


# ---- decided without a read, on what the process holds ------------------------------------------


def _skipped() -> float:
    return sum(
        s.value
        for m in metrics.CREDIT_CHECK_READ_SKIPPED.collect()
        for s in m.samples
        if s.name.endswith("_total")
    )


def _replica(svc: Service) -> PostgresChecks:
    """The checks of another process: a service of its own (its own repository, so its own
    cache of committed states) on the same database."""
    own = LimitsService(Settings(), svc.host.core.service.policy)  # type: ignore[attr-defined]
    checks = PostgresChecks(own, svc.host.core)
    svc.host.closers.append(checks.close)
    return checks


async def _seq_order(svc: Service, cid: str) -> list[str]:
    async with svc.host.engine.connect() as conn:
        return list(
            (
                await conn.exec_driver_sql(
                    "SELECT order_id FROM limits_checks WHERE customer_id = $1 ORDER BY seq", (cid,)
                )
            ).scalars()
        )


async def test_given_a_customer_only_this_process_writes_then_its_checks_skip_the_read(
    svc: Service,
) -> None:
    """The first check reads the customer; the second finds the row at the version this
    process wrote; from the third on, nothing is read before the write (which still checks
    it all under the lock). A retry of a check decided here gets the stored decision, read
    first: with nothing to write, nothing would check what it held."""
    await svc.customer("C-1", "CCC")
    checks = _replica(svc)
    before = _skipped()
    verdicts = [await checks.check(_order("C-1", f"SO-{n}", "10.00")) for n in range(4)]
    assert [v.decision for v in verdicts] == ["approved"] * 4
    assert _skipped() - before == 2
    again = await checks.check(_order("C-1", "SO-3", "10.00"))
    assert (again.check_id, again.fresh) == (verdicts[-1].check_id, False)
    assert _skipped() - before == 2
    assert (await svc.exposure("C-1"))["reserved"] == "40.00"
    assert await _seq_order(svc, "C-1") == [f"SO-{n}" for n in range(4)]
    assert await svc.host.core.verify() == []


async def test_given_another_writer_between_checks_then_a_check_without_read_is_decided_again(
    svc: Service,
) -> None:
    """Another replica checks the customer between two of this one's: this one's next check,
    decided on what it held, is found stale by its write and decided again under the lock
    (and sees the other's reservation); the next one reads again. The event numbers drawn
    ahead are not used below the customer's version: its events stay in the order in
    which they were applied."""
    await svc.customer("C-1", "CCC")  # 5,000.00
    one, other = _replica(svc), _replica(svc)
    for n in range(3):
        assert (await one.check(_order("C-1", f"A{n}", "1000.00"))).decision == "approved"
    assert (await other.check(_order("C-1", "B", "1500.00"))).decision == "approved"
    skipped, redecided = _skipped(), _redecided()

    a3 = await one.check(_order("C-1", "A3", "2000.00"))  # 500.00 left
    assert (a3.decision, a3.body["reasons"]) == ("rejected", ["exceeds_available"])
    assert (_skipped() - skipped, _redecided() - redecided) == (1, 1)
    # Read twice (found untouched both times) before it is held again.
    for order_id in ("A4", "A5"):
        assert (await one.check(_order("C-1", order_id, "10.00"))).decision == "approved"
        assert _skipped() - skipped == 1
    assert (await one.check(_order("C-1", "A6", "10.00"))).decision == "approved"  # held
    assert _skipped() - skipped == 2

    assert await _seq_order(svc, "C-1") == ["A0", "A1", "A2", "B", "A3", "A4", "A5", "A6"]
    assert (await svc.exposure("C-1"))["reserved"] == "4530.00"


async def test_given_another_replica_writes_a_customer_now_and_then_then_it_is_held_ever_less(
    svc: Service,
) -> None:
    """One replica checks a customer three times, another once, over and over. Held after
    two untouched reads, the customer's first check of each round would be found stale by
    its write every round; the untouched reads asked before holding it again double with
    each stale batch, so it is held, and found stale, ever more rarely."""
    await svc.customer("C-1", "AAA")
    one, other = _replica(svc), _replica(svc)
    redecided = _redecided()
    for n in range(10):
        for k in range(3):
            assert (await one.check(_order("C-1", f"SO-{n}-{k}", "1.00"))).decision == "approved"
        assert (await other.check(_order("C-1", f"SO-{n}-x", "1.00"))).decision == "approved"
    assert _redecided() - redecided <= 4  # rounds 2, 5 and 10 or so; else about nine
    assert (await svc.exposure("C-1"))["reserved"] == "40.00"


async def test_given_the_order_was_checked_elsewhere_then_a_check_without_read_sees_it(
    svc: Service,
) -> None:
    """Decided on what it holds, a batch takes its orders to have no check but those decided
    here; its write finds the other replica's and the batch is decided again."""
    await svc.customer("C-1", "CCC")
    await svc.customer("C-2", "CCC")
    one, other = _replica(svc), _replica(svc)
    for n in range(2):
        await one.check(_order("C-1", f"SO-{n}", "10.00"))
    assert (await other.check(_order("C-2", "SO-X", "10.00"))).decision == "approved"
    skipped, redecided = _skipped(), _redecided()
    with pytest.raises(Conflict):
        await one.check(_order("C-1", "SO-X", "10.00"))
    assert (_skipped() - skipped, _redecided() - redecided) == (1, 1)
    assert (await svc.exposure("C-1"))["reserved"] == "20.00"


# ---- decided on a read, written under the locks if nothing changed ------------------------------


def _redecided() -> float:
    return sum(
        s.value
        for m in metrics.CREDIT_CHECK_REDECIDED.collect()
        for s in m.samples
        if s.name.endswith("_total")
    )


async def _until_waiting_for_locks(svc: Service, count: int) -> None:
    for _ in range(200):
        async with svc.host.engine.connect() as conn:
            waiting = (
                await conn.exec_driver_sql(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database()"
                )
            ).scalar_one()
        if waiting >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"fewer than {count} statements came to wait for a lock")


@pytest.mark.parametrize("change", ["same customer", "group sibling", "same order"])
async def test_given_a_change_between_a_batch_read_and_its_write_then_it_is_decided_again(
    svc: Service,
    change: str,
) -> None:
    """Two replicas decide on what they read without locks; the write locks and checks that
    nothing it relied on changed. The one whose read went stale writes nothing and decides
    again under the locks: never both approved beyond the room, never the order twice."""
    grouped = change == "group sibling"
    await svc.customer("P", "CCC")  # 5,000.00: the group's limit when grouped
    for cid in ("C-1", "C-2"):
        await svc.customer(cid, "AAA" if grouped else "CCC", parent="P" if grouped else None)
    core = svc.host.core
    one, other = PostgresChecks(core.service, core), PostgresChecks(core.service, core)
    svc.host.closers += [one.close, other.close]

    def order(cid: str, order_id: str) -> CheckOrder:
        return CheckOrder(order_id, cid, Decimal("3000.00"), "EUR", True, "orders")

    before = _redecided()
    async with svc.host.engine.connect() as holder:
        # Hold C-1's row, so that the first replica's write waits after its read.
        await holder.exec_driver_sql(
            "SELECT 1 FROM limits_customers WHERE customer_id = 'C-1' FOR UPDATE"
        )
        first = asyncio.create_task(one.check(order("C-1", "SO-A")))
        await _until_waiting_for_locks(svc, 1)
        if change == "same customer":
            # Read before the first one wrote; queued behind it for the lock.
            second = asyncio.create_task(other.check(order("C-1", "SO-B")))
            await _until_waiting_for_locks(svc, 2)
        else:
            # Another customer: written at once, under the first one's feet.
            second = asyncio.create_task(other.check(order("C-2", "SO-B" if grouped else "SO-A")))
            await second
        await holder.rollback()
    a, b = await asyncio.gather(first, second, return_exceptions=True)
    assert _redecided() - before == 1

    if change == "same customer":  # the first one wrote; the second saw its reservation
        assert isinstance(a, Verdict) and isinstance(b, Verdict)
        assert (a.decision, b.decision) == ("approved", "rejected")
        assert b.body["reasons"] == ["exceeds_available"]
        assert (await svc.exposure("C-1"))["reserved"] == "3000.00"
    elif grouped:  # the sibling wrote first; the first one saw the group's room shrink
        assert isinstance(a, Verdict) and isinstance(b, Verdict)
        assert (a.decision, b.decision) == ("rejected", "approved")
        assert "exceeds_group_available" in a.body["reasons"]
        assert (await svc.exposure("C-1"))["reserved"] == "0.00"
    else:  # the order went to C-2 first; checking it for C-1 is a conflict
        assert isinstance(b, Verdict) and b.decision == "approved"
        assert isinstance(a, Conflict)
        assert (await svc.exposure("C-1"))["reserved"] == "0.00"
    assert await svc.host.core.verify() == []
