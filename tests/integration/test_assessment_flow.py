"""The assessment service end to end on the real Apache Kafka and PostgreSQL: events in on the
input topics, ``assessment.completed`` out on ``credit.assessments`` keyed by customer, bad
records on ``credit.dlq``, redeliveries without effect."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from harness.servers import create_topics_async
from services.assessment.app import build
from shared.auth import Principal, TokenRegistry
from shared.service import ServiceHost
from shared.settings import Settings
from tests.databases import reset

pytestmark = pytest.mark.integration

TOKENS = TokenRegistry({"t": Principal("ana", frozenset({"credit:read", "credit:write"}))})


@pytest.fixture
async def running(
    postgres_url: str, kafka_bootstrap: str
) -> AsyncIterator[tuple[ServiceHost, Settings]]:
    run = uuid.uuid4().hex[:8]
    # Topics of this run only, so that other tests' records never reach it.
    topics: dict[str, Any] = {
        f"topic_{name}": f"{topic}-{run}"
        for name, topic in (
            ("customers", "crm.customers"),
            ("financials", "crm.financials"),
            ("credit_reports", "crm.credit-reports"),
            ("invoices", "ar.invoices"),
            ("payments", "ar.payments"),
            ("overdue", "ar.overdue"),
            ("assessments", "credit.assessments"),
            ("dlq", "credit.dlq"),
        )
    }
    settings = Settings(database_url=postgres_url, kafka_bootstrap=kafka_bootstrap, **topics)
    await create_topics_async(
        kafka_bootstrap,
        [
            settings.topic_customers,
            settings.topic_financials,
            settings.topic_credit_reports,
            settings.topic_invoices,
            settings.topic_payments,
            settings.topic_overdue,
            settings.topic_assessments,
            settings.topic_dlq,
        ],
        partitions=2,
    )
    _app, host = build(settings, tokens=TOKENS)
    await reset(host.engine, "assessment")
    await host.start()
    try:
        assert host.consumer is not None
        async with asyncio.timeout(60):
            await host.consumer.assigned.wait()
        yield host, settings
    finally:
        await host.close()


def envelope(
    event_id: str, event_type: str, data: dict[str, Any], time: str = "2026-01-01T00:00:00Z"
) -> bytes:
    return json.dumps(
        {
            "specversion": "1.0",
            "id": event_id,
            "source": "/test",
            "type": event_type,
            "subject": data["customer_id"],
            "time": time,
            "data": data,
        }
    ).encode()


async def read(bootstrap: str, topic: str, count: int, linger: float = 0.0) -> list[Any]:
    """At least ``count`` records of ``topic``, and whatever more comes within ``linger``."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        group_id=f"reader-{uuid.uuid4().hex[:8]}",
    )
    await consumer.start()
    records: list[Any] = []
    try:
        async with asyncio.timeout(60):
            while len(records) < count:
                batch = await consumer.getmany(timeout_ms=500)
                records += [m for msgs in batch.values() for m in msgs]
            loop = asyncio.get_running_loop()
            until = loop.time() + linger
            while loop.time() < until:
                batch = await consumer.getmany(timeout_ms=250)
                records += [m for msgs in batch.values() for m in msgs]
    finally:
        await consumer.stop()
    return records


async def test_given_events_on_kafka_when_consumed_then_assessments_and_dead_letters_come_out(
    running: tuple[ServiceHost, Settings],
    kafka_bootstrap: str,
) -> None:
    host, settings = running
    registered = envelope(
        "reg-1",
        "customer.registered",
        {"customer_id": "C-1", "name": "Acme", "currency": "EUR", "industry": "J"},
    )
    published = envelope(
        "fs-1",
        "financial_statement.published",
        {
            "statement_id": "FY2025",
            "customer_id": "C-1",
            "period_end": "2025-12-31",
            "period_months": 12,
            "currency": "USD",
            "balance_sheet": {
                "current_assets": "500.00",
                "total_assets": "1000.00",
                "current_liabilities": "250.00",
                "total_liabilities": "600.00",
                "equity": "400.00",
                "retained_earnings": "200.00",
            },
            "income_statement": {"revenue": "1200.00", "ebit": "100.00", "net_income": "60.00"},
        },
        time="2026-02-01T00:00:00Z",
    )
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(settings.topic_customers, registered, key=b"C-1")
        await producer.send_and_wait(settings.topic_customers, registered, key=b"C-1")  # again
        await producer.send_and_wait(settings.topic_financials, b"{not json", key=b"C-1")
        await producer.send_and_wait(settings.topic_financials, published, key=b"C-1")
    finally:
        await producer.stop()

    # The duplicate registration publishes nothing more
    assessments = await read(kafka_bootstrap, settings.topic_assessments, 2, linger=2.0)
    dead = await read(kafka_bootstrap, settings.topic_dlq, 1)

    assert [m.key for m in assessments] == [b"C-1", b"C-1"]
    bodies = [json.loads(m.value) for m in assessments]
    assert [b["type"] for b in bodies] == ["assessment.completed"] * 2
    assert [b["data"]["trigger"]["event_id"] for b in bodies] == ["reg-1", "fs-1"]
    assert bodies[1]["data"]["grade"] == "BBB"
    assert bodies[1]["data"]["previous_grade"] == "BB"
    assert bodies[1]["data"]["ratios"]["current_ratio"] == "2.0000"
    assert json.loads(dead[0].value)["data"]["reason"] == "invalid_json"
    checks = await host.readiness()
    assert all(checks.values()), checks
    assert await host.core.verify() == []


async def test_given_bad_statements_on_kafka_then_each_is_dead_lettered_with_its_reason(
    running: tuple[ServiceHost, Settings],
    kafka_bootstrap: str,
) -> None:
    # Given three statements no analyst could use
    host, settings = running

    def statement(statement_id: str, **changes: Any) -> bytes:
        data: dict[str, Any] = {
            "statement_id": statement_id,
            "customer_id": "C-9",
            "period_end": "2025-12-31",
            "period_months": 12,
            "currency": "EUR",
            "balance_sheet": {
                "current_assets": "500.00",
                "total_assets": "1000.00",
                "current_liabilities": "250.00",
                "total_liabilities": "600.00",
                "equity": "400.00",
            },
            "income_statement": {"revenue": "1200.00", "net_income": "60.00"},
        }
        for key, value in changes.items():
            part, _, name = key.partition("__")
            if name:
                data[part] = data[part] | {name: value}
            else:
                data[part] = value
        return envelope(f"fs-{statement_id}", "financial_statement.published", data)

    bad = [
        statement("NEG", balance_sheet__total_assets="-5.00"),
        statement("NAN", balance_sheet__total_liabilities="lots"),
        statement("PM5", period_months=5),
    ]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for value in bad:
            await producer.send_and_wait(settings.topic_financials, value, key=b"C-9")
    finally:
        await producer.stop()

    # When they are consumed, then each is in credit.dlq with its reason and field
    dead = [json.loads(m.value)["data"] for m in await read(kafka_bootstrap, settings.topic_dlq, 3)]
    assert sorted((d["reason"], d["error"].split(":")[0]) for d in dead) == [
        ("invalid_amount", "data.balance_sheet.total_assets"),
        ("invalid_amount", "data.balance_sheet.total_liabilities"),
        ("invalid_field", "data.period_months"),
    ]
    assert all(
        d["service"] == "assessment" and d["topic"] == settings.topic_financials for d in dead
    )
    # …and nothing was assessed from them
    async with host.engine.connect() as conn:
        from sqlalchemy import func, select

        from services.assessment import store

        stored = (
            await conn.execute(
                select(func.count())
                .select_from(store.assessments)
                .where(store.assessments.c.customer_id == "C-9")
            )
        ).scalar_one()
    assert stored == 0
