"""The assessment service against a real database: consumed batches, the HTTP API, the
scheduler and replay. Every test runs on SQLite (dev) and on the harness's PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from services.assessment import store
from services.assessment.app import build, refresh_grade_gauges
from shared import eventstore as es
from shared import metrics
from shared.auth import Principal, TokenRegistry
from shared.policy import load_policy
from shared.runtime import Record
from shared.service import ServiceHost
from shared.settings import Settings
from tests.databases import reset

pytestmark = pytest.mark.integration

ANALYST = "analyst-token"
READER = "reader-token"
TOKENS = TokenRegistry(
    {
        ANALYST: Principal("ana", frozenset({"credit:read", "credit:write"})),
        READER: Principal("rita", frozenset({"credit:read"})),
    }
)
START = datetime(2026, 3, 1, 12, tzinfo=UTC)


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
    offset: int = 0

    async def consume(
        self,
        topic: str,
        event_type: str,
        data: dict[str, Any],
        *,
        time: str = "2026-01-01T00:00:00Z",
        event_id: str | None = None,
        subject: str = "C-1",
    ) -> None:
        self.offset += 1
        envelope = {
            "specversion": "1.0",
            "id": event_id or f"evt-{self.offset}",
            "source": "/test",
            "type": event_type,
            "subject": subject,
            "time": time,
            "data": data,
        }
        await self.host.core.process_records(
            [Record(topic, 0, self.offset, subject.encode(), json.dumps(envelope).encode())]
        )

    async def outbox(self) -> list[tuple[str, str, dict[str, Any]]]:
        async with self.host.engine.connect() as conn:
            rows = await es.pending_outbox(conn, store.core, 1000)
        return [(r.topic, r.key, json.loads(r.value)) for r in rows]


@pytest.fixture(params=["sqlite", "postgres"])
async def service(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Service]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path}/assessment.db"
    else:
        url = request.getfixturevalue("postgres_url")
    clock = Clock()
    app, host = build(Settings(database_url=url), tokens=TOKENS, consume=False, clock=clock)
    await reset(host.engine, "assessment")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://assessment") as client:
        yield Service(host, client, clock)
    await host.engine.dispose()


def customer(**changes: Any) -> dict[str, Any]:
    return {"customer_id": "C-1", "name": "Acme", "currency": "EUR", "industry": "J", **changes}


def statement(currency: str = "EUR", statement_id: str = "FY2025") -> dict[str, Any]:
    return {
        "statement_id": statement_id,
        "customer_id": "C-1",
        "period_end": "2025-12-31",
        "period_months": 12,
        "currency": currency,
        "balance_sheet": {
            "current_assets": "500.00",
            "total_assets": "1000.00",
            "current_liabilities": "250.00",
            "total_liabilities": "600.00",
            "equity": "400.00",
            "retained_earnings": "200.00",
        },
        "income_statement": {
            "revenue": "1200.00",
            "ebit": "100.00",
            "interest_expense": "20.00",
            "net_income": "60.00",
        },
    }


async def registered_and_rated(svc: Service) -> None:
    await svc.consume("crm.customers", "customer.registered", customer())
    await svc.consume(
        "crm.financials", "financial_statement.published", statement(), time="2026-02-01T00:00:00Z"
    )


# ---- consuming ----------------------------------------------------------------------------------


async def test_given_a_registration_and_a_statement_when_consumed_then_both_assessments_are_published(
    service: Service,
) -> None:
    await registered_and_rated(service)
    published = await service.outbox()
    assert [(topic, key) for topic, key, _ in published] == [("credit.assessments", "C-1")] * 2
    first, second = (value for _, _, value in published)
    assert first["type"] == "assessment.completed" and first["subject"] == "C-1"
    assert first["id"] == first["data"]["assessment_id"]
    assert (first["data"]["grade"], second["data"]["grade"]) == ("BB", "BBB")
    assert second["data"]["previous_grade"] == "BB"
    assert second["data"]["ratios"]["altman_z2"] == "3.6640"

    response = await service.client.get("/v1/customers/C-1/assessment", headers=auth(READER))
    assert response.status_code == 200
    assert response.json() == second["data"]


async def test_given_a_redelivered_event_when_consumed_again_then_nothing_more_is_published(
    service: Service,
) -> None:
    await service.consume("crm.customers", "customer.registered", customer(), event_id="reg-1")
    await service.consume("crm.customers", "customer.registered", customer(), event_id="reg-1")
    assert len(await service.outbox()) == 1


async def test_given_a_statement_without_fx_rate_when_consumed_then_it_is_dead_lettered(
    service: Service,
) -> None:
    await service.consume("crm.customers", "customer.registered", customer())
    await service.consume(
        "crm.financials", "financial_statement.published", statement(currency="KRW")
    )
    topics = [topic for topic, _, _ in await service.outbox()]
    assert topics == ["credit.assessments", "credit.dlq"]
    dead = (await service.outbox())[-1][2]["data"]
    assert (dead["reason"], dead["service"]) == ("no_fx_rate", "assessment")
    async with service.host.engine.connect() as conn:
        row = await store.customer(conn, "C-1")
    assert store.load_state(row.state).statements == {}


# ---- reading ------------------------------------------------------------------------------------


async def test_given_several_assessments_when_the_history_is_read_then_it_is_newest_first_and_paginated(
    service: Service,
) -> None:
    await registered_and_rated(service)
    await service.consume(
        "crm.financials",
        "financial_statement.published",
        statement(statement_id="FY2025b"),
        time="2026-02-10T00:00:00Z",
    )
    page = (
        await service.client.get("/v1/customers/C-1/assessments?limit=2", headers=auth())
    ).json()
    assert [i["assessed_at"] for i in page["items"]] == [
        "2026-02-10T00:00:00Z",
        "2026-02-01T00:00:00Z",
    ]
    rest = (
        await service.client.get(
            f"/v1/customers/C-1/assessments?limit=2&cursor={page['next_cursor']}", headers=auth()
        )
    ).json()
    assert [i["assessed_at"] for i in rest["items"]] == ["2026-01-01T00:00:00Z"]
    assert rest["next_cursor"] is None
    as_of = (
        await service.client.get(
            "/v1/customers/C-1/assessments",
            params={"as_of": "2026-02-05T00:00:00+00:00"},
            headers=auth(),
        )
    ).json()
    assert [i["grade"] for i in as_of["items"]] == ["BBB", "BB"]
    beyond = await service.client.get(  # past the range of dates once in UTC: 422, not 500
        "/v1/customers/C-1/assessments",
        params={"as_of": "9999-12-31T23:59:59-01:00"},
        headers=auth(),
    )
    assert beyond.status_code == 422 and beyond.json()["field"] == "as_of"


async def test_given_unknown_customers_when_read_then_404_but_only_after_auth(
    service: Service,
) -> None:
    assert (await service.client.get("/v1/customers/C-9/assessment")).status_code == 401
    response = await service.client.get("/v1/customers/C-9/assessment", headers=auth())
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert (
        await service.client.get("/v1/customers/C-9/assessments", headers=auth())
    ).status_code == 404
    forbidden = await service.client.post(
        "/v1/customers/C-9/assessment/recompute", headers=auth(READER)
    )
    assert forbidden.status_code == 403


# ---- analyst commands ---------------------------------------------------------------------------


async def test_given_an_override_when_posted_then_a_new_assessment_carries_it_until_it_expires(
    service: Service,
) -> None:
    await registered_and_rated(service)
    expires = START + timedelta(days=30)
    response = await service.client.post(
        "/v1/customers/C-1/assessment/override",
        headers=auth(),
        json={"grade": "CCC", "reason": "management turnover", "expires_at": expires.isoformat()},
    )
    assert response.status_code == 201
    body = response.json()
    assert (body["grade"], body["risk_level"], body["previous_grade"]) == ("CCC", "high", "BBB")
    assert body["override"] == {
        "grade": "CCC",
        "reason": "management turnover",
        "by": "ana",
        "expires_at": "2026-03-31T12:00:00Z",
    }
    assert body["trigger"]["type"] == "assessment.override_set"
    assert (await service.outbox())[-1][2]["data"] == body

    # Nothing is due before the expiry; at it, the scheduler records it once
    assert await service.host.core.run_due() == 0
    service.clock.now = expires + timedelta(minutes=1)
    assert await service.host.core.run_due() == 1
    assert await service.host.core.run_due() == 0
    latest = (await service.client.get("/v1/customers/C-1/assessment", headers=auth())).json()
    assert (latest["grade"], latest["override"], latest["previous_grade"]) == ("BBB", None, "CCC")
    assert latest["assessed_at"] == "2026-03-31T12:00:00Z"
    withdraw = await service.client.delete("/v1/customers/C-1/assessment/override", headers=auth())
    assert withdraw.status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"grade": "Z", "reason": "x"}, "grade"),
        ({"reason": "x"}, "grade"),
        ({"grade": "A"}, "reason"),
        ({"grade": "A", "reason": "x", "expires_at": "2026-01-01T00:00:00Z"}, "expires_at"),
        ({"grade": "A", "reason": "x", "expires_at": "2026-12-01T00:00:00"}, "expires_at"),
    ],
)
async def test_given_an_invalid_override_when_posted_then_422_names_the_field(
    service: Service, body: dict[str, Any], field: str
) -> None:
    await registered_and_rated(service)
    response = await service.client.post(
        "/v1/customers/C-1/assessment/override", headers=auth(), json=body
    )
    assert response.status_code == 422
    assert response.json()["field"] == field
    assert len(await service.outbox()) == 2  # nothing new published


async def test_given_a_withdrawn_override_when_deleted_then_the_computed_grade_is_published(
    service: Service,
) -> None:
    await registered_and_rated(service)
    await service.client.post(
        "/v1/customers/C-1/assessment/override",
        headers=auth(),
        json={"grade": "A", "reason": "strong parent"},
    )
    response = await service.client.delete("/v1/customers/C-1/assessment/override", headers=auth())
    assert response.status_code == 200
    assert (response.json()["grade"], response.json()["override"]) == ("BBB", None)


async def test_given_a_recompute_request_when_posted_then_the_customer_is_reassessed_now(
    service: Service,
) -> None:
    await registered_and_rated(service)
    response = await service.client.post("/v1/customers/C-1/assessment/recompute", headers=auth())
    assert response.status_code == 200
    body = response.json()
    assert body["trigger"]["type"] == "assessment.recompute_requested"
    assert body["assessed_at"] == "2026-03-01T12:00:00Z"
    assert body["next_review_date"] == "2026-09-01"
    assert len(await service.outbox()) == 3


# ---- reviews, gauges, replay -----------------------------------------------------------------


async def test_given_review_dates_when_listed_then_those_before_the_date_are_due(
    service: Service,
) -> None:
    for cid in ("C-1", "C-2", "C-3"):
        await service.consume(
            "crm.customers", "customer.registered", customer(customer_id=cid), subject=cid
        )  # BB: reviewed on 2026-07-01
    due = (await service.client.get("/v1/reviews/due", headers=auth(READER))).json()
    assert due["items"] == [] and due["before"] == "2026-03-01"
    first = (
        await service.client.get("/v1/reviews/due?before=2026-07-02&limit=2", headers=auth())
    ).json()
    assert [i["customer_id"] for i in first["items"]] == ["C-1", "C-2"]
    assert first["items"][0]["next_review_date"] == "2026-07-01"
    rest = (
        await service.client.get(
            f"/v1/reviews/due?before=2026-07-02&limit=2&cursor={first['next_cursor']}",
            headers=auth(),
        )
    ).json()
    assert [i["customer_id"] for i in rest["items"]] == ["C-3"]
    assert rest["next_cursor"] is None
    on_the_day = (
        await service.client.get("/v1/reviews/due?before=2026-07-01", headers=auth())
    ).json()
    assert on_the_day["items"] == []


async def test_given_graded_customers_when_the_gauges_refresh_then_they_count_by_grade(
    service: Service,
) -> None:
    await registered_and_rated(service)
    await service.consume(
        "ar.invoices",
        "invoice.issued",
        {
            "invoice_id": "I-1",
            "customer_id": "C-9",
            "amount": "10.00",
            "currency": "EUR",
            "issue_date": "2026-01-01",
            "due_date": "2026-01-31",
        },
        subject="C-9",
    )
    await refresh_grade_gauges(service.host.engine, load_policy())
    assert metrics.CUSTOMERS.labels("BBB")._value.get() == 1
    assert metrics.CUSTOMERS.labels("unrated")._value.get() == 1
    assert metrics.CUSTOMERS.labels("AAA")._value.get() == 0


def invoice(invoice_id: str, issue: str, due: str, amount: str = "100.00") -> dict[str, Any]:
    return {
        "invoice_id": invoice_id,
        "customer_id": "C-1",
        "amount": amount,
        "currency": "EUR",
        "issue_date": issue,
        "due_date": due,
    }


def payment(payment_id: str, received: str, amount: str = "100.00") -> dict[str, Any]:
    return {
        "payment_id": payment_id,
        "customer_id": "C-1",
        "amount": amount,
        "currency": "EUR",
        "received_date": received,
    }


async def archived(svc: Service) -> dict[str, str]:
    async with svc.host.engine.connect() as conn:
        a = store.ledger_archive.c
        rows = await conn.execute(
            select(a.item_key, a.status).where(a.customer_id == "C-1").order_by(a.item_key)
        )
        return {r.item_key: r.status for r in rows}


async def test_given_a_paid_invoice_when_its_payment_is_reversed_in_a_later_batch_then_it_comes_back_from_the_archive(
    service: Service,
) -> None:
    await service.consume("crm.customers", "customer.registered", customer())
    await service.consume(
        "ar.invoices", "invoice.issued", invoice("I-1", "2026-01-01", "2026-01-31")
    )
    await service.consume(
        "ar.payments", "payment.received", payment("P-1", "2026-01-25"), time="2026-01-25T00:00:00Z"
    )
    # Paid: both left the customer's state for the archive
    assert await archived(service) == {"invoice:I-1": "settled", "payment:P-1": "applied"}
    async with service.host.engine.connect() as conn:
        row = await store.customer(conn, "C-1")
    state = store.load_state(row.state)
    assert (dict(state.ledger.invoices), dict(state.ledger.credits)) == ({}, {})
    assert state.paid.total.count == 1

    # When the payment is reversed (a batch of its own: the items are read back by key)
    await service.consume(
        "ar.payments",
        "payment.reversed",
        {"payment_id": "P-1", "customer_id": "C-1", "reason": "chargeback"},
        time="2026-03-02T00:00:00Z",
    )

    # Then the invoice is open again, 30 days overdue, and its payment no longer counts
    assert await archived(service) == {"payment:P-1": "reversed"}
    async with service.host.engine.connect() as conn:
        row = await store.customer(conn, "C-1")
    state = store.load_state(row.state)
    assert list(state.ledger.invoices) == ["I-1"] and state.paid.total.count == 0
    latest = (await service.client.get("/v1/customers/C-1/assessment", headers=auth())).json()
    assert latest["trigger"]["type"] == "payment.reversed"
    assert latest["ratios"]["max_days_overdue_12m"] == "30"
    assert "avg_days_to_pay" not in latest["ratios"]
    # …and a replay reproduces the projections, the archive included
    assert await service.host.core.verify() == []


async def test_given_a_state_document_of_the_old_layout_when_its_customer_is_touched_then_nothing_is_dead_lettered_and_the_error_says_to_rebuild(
    service: Service,
) -> None:
    # Given a row written before assessment_0003 (its whole history in the document)
    await service.consume("crm.customers", "customer.registered", customer())
    old = (
        '{"customer_id":"C-1","currency":"EUR","registered":true,"statements":{},"report":null,'
        '"invoices":{},"credits":{},"dunning":{},"override":null,"last":null,"last_time":null}'
    )
    async with service.host.engine.begin() as conn:
        await conn.execute(store.customers.update().values(state=old, last_seq=99))
    # When a command or an event touches the customer, then it is refused, saying what to do
    # (never read as a customer with nothing in it)
    with pytest.raises(store.LayoutError, match="rebuild the projections: creditwatch db upgrade"):
        await service.client.post("/v1/customers/C-1/assessment/recompute", headers=auth())
    # and a consumed event is not set aside for it: the batch fails, the loop stops and says
    # why (a dead letter would lose the event)
    with pytest.raises(store.LayoutError, match="creditwatch db upgrade"):
        await service.consume("crm.customers", "customer.updated", customer(name="Acme II"))
    assert all(topic != "credit.dlq" for topic, _, _ in await service.outbox())
    async with service.host.engine.connect() as conn:
        assert (await store.customer(conn, "C-1")).state == old


async def test_given_a_history_when_replayed_then_the_projections_are_reproduced(
    service: Service,
) -> None:
    await registered_and_rated(service)
    await service.client.post(
        "/v1/customers/C-1/assessment/override", headers=auth(), json={"grade": "B", "reason": "x"}
    )
    await service.consume(
        "ar.invoices",
        "invoice.issued",
        {
            "invoice_id": "I-1",
            "customer_id": "C-1",
            "amount": "10.00",
            "currency": "EUR",
            "issue_date": "2026-01-01",
            "due_date": "2026-01-31",
        },
        time="2026-03-01T00:00:00Z",
    )
    await service.consume(
        "ar.payments",
        "payment.received",
        {
            "payment_id": "P-1",
            "customer_id": "C-1",
            "amount": "10.00",
            "currency": "EUR",
            "received_date": "2026-03-02",
        },
        time="2026-03-02T00:00:00Z",
    )
    assert await service.host.core.verify() == []
    async with service.host.engine.connect() as conn:
        before = list(
            await conn.execute(select(store.assessments.c.body).order_by(store.assessments.c.seq))
        )
    await service.host.core.replay()
    async with service.host.engine.connect() as conn:
        after = list(
            await conn.execute(select(store.assessments.c.body).order_by(store.assessments.c.seq))
        )
    assert before == after and len(after) == 4


@pytest.mark.parametrize("window", [100_000, 3])
async def test_given_a_replay_over_many_pages_then_states_are_kept_across_pages_and_rows_written_once_per_window(
    service: Service, monkeypatch: pytest.MonkeyPatch, window: int
) -> None:
    """A replay keeps its customers' states from page to page and writes their rows once per
    window (``flush``), instead of writing them with every page and reading them back."""
    from shared import runtime

    # Given a customer whose invoices, payments and statement span many replay pages
    await registered_and_rated(service)
    for n in range(1, 7):
        await service.consume(
            "ar.invoices",
            "invoice.issued",
            {
                "invoice_id": f"I-{n}",
                "customer_id": "C-1",
                "amount": "100.00",
                "currency": "EUR",
                "issue_date": f"2026-0{n}-01",
                "due_date": f"2026-0{n}-28",
            },
            time=f"2026-0{n}-01T00:00:00Z",
        )
        await service.consume(
            "ar.payments",
            "payment.received",
            {
                "payment_id": f"P-{n}",
                "customer_id": "C-1",
                "amount": "100.00",
                "currency": "EUR",
                "received_date": f"2026-0{n}-20",
                "allocations": [{"invoice_id": f"I-{n}", "amount": "100.00"}],
            },
            time=f"2026-0{n}-20T00:00:00Z",
        )
    paged = es.read_events

    def small_pages(*args: Any, **kwargs: Any) -> Any:
        return paged(*args, **{**kwargs, "batch": 2})

    monkeypatch.setattr(es, "read_events", small_pages)
    monkeypatch.setattr(runtime, "REPLAY_WINDOW", window)
    repository = service.host.core.service.repository
    read = repository.read
    reads: list[int] = []

    async def counted(conn: Any, rows: Any) -> Any:
        reads.append(len(rows))
        return await read(conn, rows)

    monkeypatch.setattr(repository, "read", counted)
    saved: list[int] = []
    save = store.save_customers

    async def counted_save(conn: Any, rows: Any) -> None:
        saved.append(len(rows))
        await save(conn, rows)

    monkeypatch.setattr(store, "save_customers", counted_save)
    # When the projections are rebuilt (7 pages of 2 events), and verified
    assert await service.host.core.replay() == 14
    # (a window also ends at REPLAY_CUSTOMERS customers: with one customer, at every page)
    monkeypatch.setattr(runtime, "REPLAY_CUSTOMERS", 1)
    reads.clear()
    saved.clear()
    assert await service.host.core.replay() == 14
    assert sum(reads) == 6 and [n for n in saved if n] == [1] * 7
    monkeypatch.setattr(runtime, "REPLAY_CUSTOMERS", 25_000)
    reads.clear()
    saved.clear()
    assert await service.host.core.replay() == 14
    # Then the customer's state is read back only after a window was flushed, and its row
    # is written once per window
    pages_per_window = -(-window // 2)  # a window is flushed at the end of a page
    windows = -(-7 // pages_per_window)
    assert sum(reads) == windows - 1
    assert [n for n in saved if n] == [1] * windows
    assert await service.host.core.verify() == []
