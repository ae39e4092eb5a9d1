"""CloudEvents extension attributes: kept with the event, and W3C trace context carried on
from an input event to the output events derived from it, through each service's event core
(SQLite, no broker) — so a trace continues through creditwatch."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.alerts.handlers import AlertsService
from services.assessment.handlers import AssessmentService
from services.limits.handlers import LimitsService
from services.schema import upgrade
from shared.db import make_engine
from shared.events import (
    Envelope,
    dead_letter_record,
    decode,
    new_event,
    trace_context,
    trusted_event,
    valid_traceparent,
)
from shared.policy import load_policy
from shared.runtime import EventCore, Record
from shared.settings import Settings

POLICY = load_policy()
SETTINGS = Settings(dev_mode=True)
T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
# The W3C specification's own example.
EXAMPLE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def traceparent(n: int) -> str:
    return f"00-{n:032x}-{n + 1:016x}-01"


def event(
    type_: str,
    cid: str,
    data: dict[str, Any],
    *,
    n: int,
    source: str = "/erp/test",
    **extensions: str,
) -> Envelope:
    return new_event(
        type_,
        source=source,
        subject=cid,
        data=data,
        id=f"e-{n}",
        time=T0 + timedelta(minutes=n),
        extensions=extensions,
    )


def customer(cid: str, *, n: int, **extensions: str) -> Envelope:
    data = {"customer_id": cid, "name": f"{cid} Ltd", "currency": "EUR", "country": "DE"}
    return event("customer.registered", cid, data, n=n, **extensions)


def invoice(cid: str, invoice_id: str, amount: str, *, n: int, **extensions: str) -> Envelope:
    issued = (T0 + timedelta(minutes=n)).date()
    data = {
        "invoice_id": invoice_id,
        "customer_id": cid,
        "amount": amount,
        "currency": "EUR",
        "issue_date": issued.isoformat(),
        "due_date": (issued + timedelta(days=30)).isoformat(),
    }
    return event("invoice.issued", cid, data, n=n, **extensions)


def statement(cid: str, *, n: int, **extensions: str) -> Envelope:
    data = {
        "statement_id": f"fs-{cid}-{n}",
        "customer_id": cid,
        "period_end": "2025-12-31",
        "period_months": 12,
        "currency": "EUR",
        "balance_sheet": {
            "current_assets": "500000.00",
            "total_assets": "1200000.00",
            "current_liabilities": "250000.00",
            "total_liabilities": "600000.00",
            "equity": "600000.00",
            "retained_earnings": "200000.00",
        },
        "income_statement": {
            "revenue": "2000000.00",
            "ebit": "150000.00",
            "net_income": "90000.00",
        },
    }
    return event("financial_statement.published", cid, data, n=n, **extensions)


def assessment(cid: str, grade: str, *, n: int, **extensions: str) -> Envelope:
    data = {
        "assessment_id": f"as-{n}",
        "customer_id": cid,
        "score": 70,
        "grade": grade,
        "risk_level": "low",
        "ratios": {},
        "policy_version": POLICY.version,
        "assessed_at": T0 + timedelta(minutes=n),
    }
    return event(
        "assessment.completed", cid, data, n=n, source="/creditwatch/assessment", **extensions
    )


def exposure(cid: str, exposure: str, limit: str, *, n: int, **extensions: str) -> Envelope:
    data = {
        "customer_id": cid,
        "currency": "EUR",
        "open_receivables": exposure,
        "overdue_amount": "0.00",
        "overdue_buckets": {},
        "max_days_overdue": 0,
        "reserved": "0.00",
        "exposure": exposure,
        "limit": limit,
        "available": f"{float(limit) - float(exposure):.2f}",
        "utilization": None,
        "on_hold": False,
        "as_of": T0 + timedelta(minutes=n),
    }
    return event("exposure.updated", cid, data, n=n, source="/creditwatch/limits", **extensions)


def invalid_invoice(**extensions: str) -> bytes:
    """An invoice record with a negative amount: a dead letter."""
    raw = invoice("C-1", "INV-1", "100.00", n=1, **extensions).to_json()
    return raw.replace(b'"100.00"', b'"-1.00"')


class Core:
    """One service's event core on a fresh SQLite file, fed records as if consumed."""

    def __init__(self, core: EventCore, engine: AsyncEngine) -> None:
        self.core = core
        self.engine = engine
        self.offset = 0

    async def consume(self, *events: Envelope | bytes, topic: str = "ar.invoices") -> None:
        records = []
        for item in events:
            self.offset += 1
            raw = item.to_json() if isinstance(item, Envelope) else item
            records.append(Record(topic, 0, self.offset, b"C-1", raw))
        await self.core.process_records(records)

    async def published(self) -> list[dict[str, Any]]:
        """What the relay would publish: the outbox rows' values, in order."""
        outbox = self.core.service.core.outbox
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(outbox.c.value).order_by(outbox.c.seq))
            return [json.loads(row.value) for row in rows]

    async def stored(self) -> list[dict[str, Any]]:
        events = self.core.service.core.events
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(events.c.event).order_by(events.c.seq))
            return [json.loads(row.event) for row in rows]


async def core_of(service: Any, tmp_path: Path) -> AsyncIterator[Core]:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / service.name}.db")
    await upgrade(engine, service.name)
    try:
        yield Core(EventCore(service, engine, clock=lambda: T0 + timedelta(days=1)), engine)
    finally:
        await engine.dispose()


@pytest.fixture
async def limits(tmp_path: Path) -> AsyncIterator[Core]:
    async for core in core_of(LimitsService(SETTINGS, POLICY), tmp_path):
        yield core


@pytest.fixture
async def assessment_core(tmp_path: Path) -> AsyncIterator[Core]:
    async for core in core_of(AssessmentService(SETTINGS, POLICY), tmp_path):
        yield core


@pytest.fixture
async def alerts(tmp_path: Path) -> AsyncIterator[Core]:
    async for core in core_of(AlertsService(SETTINGS, POLICY), tmp_path):
        yield core


def of_type(published: list[dict[str, Any]], type_: str) -> list[dict[str, Any]]:
    found = [e for e in published if e["type"] == type_]
    assert found, f"no {type_} among {[e['type'] for e in published]}"
    return found


# -- the rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        EXAMPLE,
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        "01-" + "a" * 32 + "-" + "b" * 16 + "-01-later",
    ],
)
def test_a_w3c_traceparent_is_valid(value: str) -> None:
    assert valid_traceparent(value)


@pytest.mark.parametrize(
    "value",
    [
        "00-abc-def-01",
        EXAMPLE.upper(),
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-" + "0" * 32 + "-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-" + "0" * 16 + "-01",
        EXAMPLE + "-more",  # version 00 has exactly four fields
        " " + EXAMPLE,
        42,
        None,
    ],
)
def test_an_invalid_traceparent_is_not_carried_on(value: object) -> None:
    # W3C Trace Context §3.2: a receiver ignores an invalid traceparent, and its tracestate
    assert not valid_traceparent(value)
    assert trace_context({"traceparent": value, "tracestate": "a=1"}) == {}


def test_the_trace_context_is_traceparent_and_a_valid_tracestate_only() -> None:
    extensions = {"traceparent": EXAMPLE, "tracestate": "congo=t61rcWkgMzE", "other": "x"}
    assert trace_context(extensions) == {"traceparent": EXAMPLE, "tracestate": "congo=t61rcWkgMzE"}
    # A tracestate that is not printable ASCII, or too long to pass on, is dropped alone.
    assert trace_context({"traceparent": EXAMPLE, "tracestate": "a=\n"}) == {"traceparent": EXAMPLE}
    assert trace_context({"traceparent": EXAMPLE, "tracestate": "a=" + "x" * 511}) == {
        "traceparent": EXAMPLE
    }
    assert trace_context(None) == {}


# -- the envelope keeps them ---------------------------------------------------------------------


def test_the_envelope_keeps_unknown_extension_attributes_and_writes_them_back() -> None:
    # Given a record with extension attributes of every JSON kind a CloudEvent may carry
    raw = customer("C-1", n=1).to_json()[:-1] + (
        b',"traceparent":"' + EXAMPLE.encode() + b'","comexampleflag":true,'
        b'"comexamplecount":7,"partitionkey":"C-1"}'
    )
    # When it is decoded and written back
    envelope = decode(raw)
    written = json.loads(envelope.to_json())
    # Then every extension attribute is kept, as it came, next to the context attributes
    assert envelope.extensions == {
        "traceparent": EXAMPLE,
        "comexampleflag": True,
        "comexamplecount": 7,
        "partitionkey": "C-1",
    }
    assert {k: written[k] for k in envelope.extensions} == envelope.extensions
    assert decode(envelope.to_json()) == envelope
    assert envelope.to_json() == envelope.model_dump_json().encode()


def test_an_output_event_may_not_pass_a_context_attribute_as_an_extension() -> None:
    with pytest.raises(ValueError, match="not extension attributes"):
        trusted_event(
            "x", source="s", subject="C-1", data={}, id="i", time=T0, extensions={"id": "y"}
        )


def test_a_dead_letter_carries_the_trace_of_the_record_it_sets_aside() -> None:
    # Given a record that will be dead-lettered, with a trace context, and one without
    bad = invalid_invoice(traceparent=EXAMPLE, tracestate="k=v")
    letters = [
        dead_letter_record(
            error="e",
            reason="invalid_amount",
            service="limits",
            topic="ar.invoices",
            partition=0,
            offset=offset,
            key=b"C-1",
            value=value,
            failed_at=T0,
        )
        for offset, value in enumerate([bad, b"{not json", invoice("C-1", "I", "1", n=2).to_json()])
    ]
    # Then the dead letter continues the record's trace, and the others carry none
    assert letters[0].extensions == {"traceparent": EXAMPLE, "tracestate": "k=v"}
    assert letters[1].extensions == {} and letters[2].extensions == {}


# -- through the event cores ---------------------------------------------------------------------


async def test_exposure_updated_carries_the_trace_of_the_invoice_that_moved_it(
    limits: Core,
) -> None:
    # Given a registered customer
    await limits.consume(customer("C-1", n=1, traceparent=traceparent(1)), topic="crm.customers")
    # When an invoice with a trace context is consumed
    await limits.consume(
        invoice("C-1", "INV-1", "1000.00", n=2, traceparent=EXAMPLE, tracestate="k=v")
    )
    # Then the exposure.updated it causes carries that context on, as it came
    published = await limits.published()
    last = of_type(published, "exposure.updated")[-1]
    assert last["data"]["open_receivables"] == "1000.00"
    assert last["traceparent"] == EXAMPLE and last["tracestate"] == "k=v"
    # And the event store holds the invoice with its extension attributes
    stored = [e for e in await limits.stored() if e["type"] == "invoice.issued"]
    assert stored[0]["traceparent"] == EXAMPLE and stored[0]["tracestate"] == "k=v"


async def test_a_batch_of_one_customers_events_carries_the_last_ones_trace(limits: Core) -> None:
    # Given one batch with a registration and two invoices, each with its own trace
    await limits.consume(
        customer("C-1", n=1, traceparent=traceparent(1)),
        invoice("C-1", "INV-1", "100.00", n=2, traceparent=traceparent(2)),
        invoice("C-1", "INV-2", "200.00", n=3, traceparent=traceparent(3)),
    )
    # Then its one exposure.updated is named after the last event and carries its trace
    (update,) = of_type(await limits.published(), "exposure.updated")
    assert update["data"]["open_receivables"] == "300.00"
    assert update["traceparent"] == traceparent(3)


async def test_an_event_without_a_trace_gives_outputs_without_one(limits: Core) -> None:
    # Given a traced registration, then an invoice without trace context (or an invalid one)
    await limits.consume(customer("C-1", n=1, traceparent=traceparent(1)))
    await limits.consume(invoice("C-1", "INV-1", "100.00", n=2))
    await limits.consume(invoice("C-1", "INV-2", "100.00", n=3, traceparent="00-abc-def-01"))
    # Then the exposure updates they cause carry no trace context at all (nothing invented)
    updates = of_type(await limits.published(), "exposure.updated")
    assert [u.get("traceparent") for u in updates] == [traceparent(1), None, None]
    assert all("tracestate" not in u for u in updates)


async def test_limit_changed_carries_the_trace_of_the_assessment_that_changed_it(
    limits: Core,
) -> None:
    # Given a registered customer
    await limits.consume(customer("C-1", n=1), topic="crm.customers")
    # When its assessment arrives with a trace context
    await limits.consume(
        assessment("C-1", "A", n=2, traceparent=EXAMPLE), topic="credit.assessments"
    )
    # Then the limit it sets, and the exposure that limit changes, carry that trace on
    published = await limits.published()
    (changed,) = of_type(published, "limit.changed")
    assert changed["data"]["reason"] == "policy"
    assert changed["traceparent"] == EXAMPLE
    assert of_type(published, "exposure.updated")[-1]["traceparent"] == EXAMPLE


async def test_an_assessment_carries_the_trace_of_its_trigger(assessment_core: Core) -> None:
    # Given a customer, then a financial statement, each with its own trace
    await assessment_core.consume(
        customer("C-1", n=1, traceparent=traceparent(1)), topic="crm.customers"
    )
    await assessment_core.consume(
        statement("C-1", n=2, traceparent=EXAMPLE, tracestate="k=v"), topic="crm.financials"
    )
    # Then each assessment.completed carries the trace of the event named as its trigger
    traces = {"e-1": (traceparent(1), None), "e-2": (EXAMPLE, "k=v")}
    assessments = of_type(await assessment_core.published(), "assessment.completed")
    assert any(a["data"]["trigger"]["event_id"] == "e-2" for a in assessments)
    for published in assessments:
        expected = traces[published["data"]["trigger"]["event_id"]]
        assert (published.get("traceparent"), published.get("tracestate")) == expected


async def test_an_alert_carries_the_trace_of_the_event_that_raised_it(alerts: Core) -> None:
    # When an exposure over the limit arrives with a trace context
    await alerts.consume(
        exposure("C-1", "120000.00", "100000.00", n=1, traceparent=EXAMPLE),
        topic="credit.exposure",
    )
    # Then the alert it raises carries the trace on
    (raised,) = [
        e
        for e in of_type(await alerts.published(), "alert.raised")
        if e["data"]["rule"] == "limit_breach"
    ]
    assert raised["traceparent"] == EXAMPLE


async def test_a_dead_letter_from_the_core_carries_the_records_trace(limits: Core) -> None:
    # When an invalid invoice with a trace context is consumed
    await limits.consume(invalid_invoice(traceparent=EXAMPLE))
    # Then its dead letter continues the trace
    (letter,) = of_type(await limits.published(), "event.dead_lettered")
    assert letter["data"]["reason"] == "invalid_amount"
    assert letter["traceparent"] == EXAMPLE
