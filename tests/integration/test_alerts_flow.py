"""The alerts service on the real PostgreSQL and Apache Kafka: consumed events raise one
alert per problem on ``credit.alerts``; neither a redelivery nor a restart raises another."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from sqlalchemy import func, select

from harness.servers import create_topics_async
from services.alerts import store
from services.alerts.app import build
from shared.auth import Principal, TokenRegistry
from shared.db import make_engine
from shared.events import Envelope, new_event
from shared.policy import load_policy
from shared.service import ServiceHost
from shared.settings import Settings
from tests.databases import reset

pytestmark = pytest.mark.integration

POLICY = load_policy()
TOKENS = TokenRegistry({"t": Principal("ops", frozenset({"credit:read", "alerts:write"}))})


def _settings(postgres_url: str, kafka_bootstrap: str, suffix: str) -> Settings:
    topics: dict[str, Any] = {
        name: f"{default}.{suffix}"
        for name, default in (
            ("topic_exposure", "credit.exposure"),
            ("topic_assessments", "credit.assessments"),
            ("topic_limits", "credit.limits"),
            ("topic_overdue", "ar.overdue"),
            ("topic_payments", "ar.payments"),
            ("topic_credit_reports", "crm.credit-reports"),
            ("topic_alerts", "credit.alerts"),
            ("topic_dlq", "credit.dlq"),
        )
    }
    return Settings(
        database_url=postgres_url,
        kafka_bootstrap=kafka_bootstrap,
        dev_mode=True,
        scheduler_interval_s=0.2,
        **topics,
    )


def _exposure(cid: str, exposure: str, n: int) -> Envelope:
    exp, lim = Decimal(exposure), Decimal("100000.00")
    when = datetime(2026, 3, 1, 9, n, tzinfo=UTC)
    return new_event(
        "exposure.updated",
        source="/creditwatch/limits",
        subject=cid,
        data={
            "customer_id": cid,
            "currency": "EUR",
            "open_receivables": exposure,
            "overdue_amount": "0.00",
            "overdue_buckets": {},
            "max_days_overdue": 0,
            "reserved": "0.00",
            "exposure": exposure,
            "limit": "100000.00",
            "available": str(lim - exp),
            "utilization": str((exp / lim).quantize(Decimal("0.0001"))),
            "on_hold": False,
            "as_of": when,
        },
        id=f"exposure-{cid}-{n}",
        time=when,
    )


async def _start(settings: Settings) -> ServiceHost:
    _, host = build(settings, tokens=TOKENS, policy=POLICY, consume=True)
    await host.start()
    assert host.consumer is not None
    await asyncio.wait_for(host.consumer.assigned.wait(), timeout=60)
    return host


async def _alerts(bootstrap: str, topic: str, want: int, wait_s: float) -> list[dict[str, Any]]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        group_id=f"probe-{uuid.uuid4().hex[:8]}",
    )
    await consumer.start()
    seen: list[dict[str, Any]] = []
    try:
        deadline = asyncio.get_running_loop().time() + wait_s
        while asyncio.get_running_loop().time() < deadline and len(seen) < want:
            batch = await consumer.getmany(timeout_ms=500)
            for messages in batch.values():
                seen += [json.loads(m.value) | {"_key": m.key.decode()} for m in messages]
        if len(seen) >= want:
            # Give anything extra (a wrongly repeated alert) a moment to show up too.
            batch = await consumer.getmany(timeout_ms=2000)
            for messages in batch.values():
                seen += [json.loads(m.value) | {"_key": m.key.decode()} for m in messages]
    finally:
        await consumer.stop()
    return seen


@pytest.fixture
async def settings(postgres_url: str, kafka_bootstrap: str) -> AsyncIterator[Settings]:
    s = _settings(postgres_url, kafka_bootstrap, uuid.uuid4().hex[:8])
    await create_topics_async(
        kafka_bootstrap,
        [
            s.topic_exposure,
            s.topic_assessments,
            s.topic_limits,
            s.topic_overdue,
            s.topic_payments,
            s.topic_credit_reports,
            s.topic_alerts,
            s.topic_dlq,
        ],
        partitions=3,
    )
    engine = make_engine(postgres_url)
    try:
        await reset(engine, "alerts")
    finally:
        await engine.dispose()
    yield s


async def test_one_alert_per_problem_survives_redelivery_and_restart(
    settings: Settings, kafka_bootstrap: str
) -> None:
    cid = f"C-{uuid.uuid4().hex[:6]}"
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    host = await _start(settings)
    try:
        first = _exposure(cid, "95000.00", 1)
        await producer.send_and_wait(settings.topic_exposure, first.to_json(), key=first.key)
        raised = await _alerts(kafka_bootstrap, settings.topic_alerts, want=1, wait_s=60)
        assert [(e["type"], e["data"]["rule"], e["_key"]) for e in raised] == [
            ("alert.raised", "utilization_high", cid)
        ]

        # The same event again (a producer retry), then a restart of the service.
        await producer.send_and_wait(settings.topic_exposure, first.to_json(), key=first.key)
        await host.close()
        host = await _start(settings)
        await producer.send_and_wait(settings.topic_exposure, first.to_json(), key=first.key)
        cleared = _exposure(cid, "50000.00", 2)
        await producer.send_and_wait(settings.topic_exposure, cleared.to_json(), key=cleared.key)

        published = await _alerts(kafka_bootstrap, settings.topic_alerts, want=2, wait_s=60)
        assert [(e["type"], e["data"]["alert_id"]) for e in published] == [
            ("alert.raised", raised[0]["data"]["alert_id"]),
            ("alert.resolved", raised[0]["data"]["alert_id"]),
        ]
        async with host.engine.connect() as conn:
            count = (
                await conn.execute(
                    select(func.count())
                    .select_from(store.alerts)
                    .where(store.alerts.c.customer_id == cid)
                )
            ).scalar()
        assert count == 1
        assert await host.core.verify() == []
    finally:
        await producer.stop()
        await host.close()
