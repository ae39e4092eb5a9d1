"""The limits service on the real Apache Kafka and PostgreSQL: assessments on
``credit.assessments`` set policy limits (``limit.changed`` on ``credit.limits``), AR events
move exposure (``exposure.updated`` on ``credit.exposure``), invoices for an order consume
its reservation, and bad records end up on ``credit.dlq`` with their reason."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from harness.servers import create_topics_async
from services.limits.app import build
from shared.auth import Principal, TokenRegistry
from shared.db import make_engine
from shared.events import ExposureUpdated, LimitChanged
from shared.service import ServiceHost
from shared.settings import Settings
from tests.databases import reset

pytestmark = pytest.mark.integration

TOKENS = TokenRegistry(
    {
        "ana": Principal("ana", frozenset({"credit:read", "credit:write", "credit:check"})),
        "bob": Principal("bob", frozenset({"credit:read", "credit:approve"})),
    }
)
EXPOSURE_FIELDS = {
    "customer_id",
    "currency",
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
    "as_of",
}
LIMIT_FIELDS = {
    "customer_id",
    "previous_limit",
    "limit",
    "currency",
    "reason",
    "grade",
    "request_id",
    "changed_by",
    "effective_at",
    "expires_at",
}
WAIT_S = 60.0
# Business time of the commands (checks, approvals): shortly after the events below.
NOW = datetime(2026, 3, 3, 12, tzinfo=UTC)


@dataclass
class Outputs:
    """Everything published on the output topics, as it arrives."""

    consumer: AIOKafkaConsumer
    seen: list[dict[str, Any]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        async for message in self.consumer:
            self.seen.append(
                json.loads(message.value) | {"_topic": message.topic, "_key": message.key.decode()}
            )
            self.arrived.set()

    async def wait_for(self, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first published event that matches, waiting for it if need be."""
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while True:
            for event in self.seen:
                if match(event):
                    return event
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"nothing matching was published; seen: {self.seen[-10:]}")
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), timeout=remaining)

    def of(self, topic: str, cid: str) -> list[dict[str, Any]]:
        return [e for e in self.seen if e["_topic"] == topic and e["_key"] == cid]


@dataclass
class Flow:
    settings: Settings
    host: ServiceHost
    client: httpx.AsyncClient
    producer: AIOKafkaProducer
    outputs: Outputs

    async def send(
        self,
        topic: str,
        event_type: str,
        cid: str,
        data: dict[str, Any],
        *,
        time: str = "2026-03-01T09:00:00Z",
        event_id: str | None = None,
    ) -> None:
        envelope = {
            "specversion": "1.0",
            "id": event_id or f"{event_type}-{uuid.uuid4().hex}",
            "source": "/test/upstream",
            "type": event_type,
            "subject": cid,
            "time": time,
            "datacontenttype": "application/json",
            "data": data,
        }
        await self.send_raw(topic, cid, json.dumps(envelope).encode())

    async def send_raw(self, topic: str, cid: str, value: bytes) -> None:
        await self.producer.send_and_wait(topic, value=value, key=cid.encode())

    async def register(self, cid: str) -> None:
        await self.send(
            self.settings.topic_customers,
            "customer.registered",
            cid,
            {"customer_id": cid, "name": f"Customer {cid}", "currency": "EUR"},
            time="2026-01-01T00:00:00Z",
        )

    async def assess(self, cid: str, grade: str, time: str) -> None:
        await self.send(
            self.settings.topic_assessments,
            "assessment.completed",
            cid,
            {
                "assessment_id": f"as-{cid}-{time}",
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
        currency: str = "EUR",
        order_id: str | None = None,
        time: str = "2026-03-01T09:00:00Z",
    ) -> None:
        data = {
            "invoice_id": invoice_id,
            "customer_id": cid,
            "amount": amount,
            "currency": currency,
            "issue_date": "2026-02-25",
            "due_date": "2026-03-27",
        }
        if order_id:
            data["order_id"] = order_id
        await self.send(self.settings.topic_invoices, "invoice.issued", cid, data, time=time)

    def limit_changes(self, cid: str) -> list[dict[str, Any]]:
        return [e["data"] for e in self.outputs.of(self.settings.topic_limits, cid)]

    async def limit_change(self, cid: str, **expected: Any) -> dict[str, Any]:
        event = await self.outputs.wait_for(
            lambda e: (
                e["_topic"] == self.settings.topic_limits
                and e["_key"] == cid
                and expected.items() <= e["data"].items()
            )
        )
        return event

    async def exposure(self, cid: str, **expected: Any) -> dict[str, Any]:
        event = await self.outputs.wait_for(
            lambda e: (
                e["_topic"] == self.settings.topic_exposure
                and e["_key"] == cid
                and expected.items() <= e["data"].items()
            )
        )
        return event


@pytest.fixture(scope="module")
async def flow(postgres_url: str, kafka_bootstrap: str) -> AsyncIterator[Flow]:
    suffix = uuid.uuid4().hex[:8]
    topics: dict[str, Any] = {
        name: f"{default}.{suffix}"
        for name, default in (
            ("topic_customers", "crm.customers"),
            ("topic_invoices", "ar.invoices"),
            ("topic_payments", "ar.payments"),
            ("topic_overdue", "ar.overdue"),
            ("topic_assessments", "credit.assessments"),
            ("topic_limits", "credit.limits"),
            ("topic_exposure", "credit.exposure"),
            ("topic_dlq", "credit.dlq"),
        )
    }
    settings = Settings(
        database_url=postgres_url,
        kafka_bootstrap=kafka_bootstrap,
        consumer_group_prefix=f"limits-flow-{suffix}",
        **topics,
    )
    await create_topics_async(kafka_bootstrap, topics.values(), partitions=2)
    engine = make_engine(postgres_url)
    try:
        await reset(engine, "limits")
    finally:
        await engine.dispose()

    consumer = AIOKafkaConsumer(
        settings.topic_limits,
        settings.topic_exposure,
        settings.topic_dlq,
        bootstrap_servers=kafka_bootstrap,
        auto_offset_reset="earliest",
        group_id=f"probe-{suffix}",
    )
    await consumer.start()
    outputs = Outputs(consumer)
    reading = asyncio.create_task(outputs.run())
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    app, host = build(settings, tokens=TOKENS, consume=True, clock=lambda: NOW)
    await host.start()
    assert host.consumer is not None
    await asyncio.wait_for(host.consumer.assigned.wait(), timeout=WAIT_S)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://limits") as client:
            yield Flow(settings, host, client, producer, outputs)
    finally:
        await host.close()
        await producer.stop()
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        await consumer.stop()


async def _eventually(read: Callable[[], Any], want: Callable[[Any], bool]) -> Any:
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while True:
        value = await read()
        if want(value) or asyncio.get_running_loop().time() > deadline:
            return value
        await asyncio.sleep(0.1)


async def test_given_assessments_when_consumed_then_the_limit_follows_the_policy_for_the_grade(
    flow: Flow,
) -> None:
    ready = await flow.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["consumer_assigned"] is True
    cid = "FL-1"
    await flow.register(cid)
    await flow.assess(cid, "BBB", "2026-01-02T00:00:00Z")
    first = await flow.limit_change(cid, limit="100000.00")
    assert (first["type"], first["subject"], first["source"]) == (
        "limit.changed",
        cid,
        "/creditwatch/limits",
    )
    LimitChanged.model_validate(first["data"])
    assert first["data"].keys() >= LIMIT_FIELDS
    assert {
        k: first["data"][k] for k in ("previous_limit", "reason", "grade", "currency", "changed_by")
    } == {
        "previous_limit": "0.00",
        "reason": "policy",
        "grade": "BBB",
        "currency": "EUR",
        "changed_by": "policy",
    }

    # A grade change adjusts the policy limit.
    await flow.assess(cid, "A", "2026-02-01T00:00:00Z")
    upgraded = await flow.limit_change(cid, limit="250000.00")
    assert (
        upgraded["data"]["previous_limit"],
        upgraded["data"]["reason"],
        upgraded["data"]["grade"],
    ) == ("100000.00", "policy", "A")

    # An approved manual limit: changed_by is the approver, requested_by the requester.
    requested = await flow.client.post(
        f"/v1/customers/{cid}/limit-requests",
        headers={"Authorization": "Bearer ana"},
        json={"requested_limit": "300000.00", "reason": "large framework contract"},
    )
    assert requested.json()["status"] == "pending"
    request_id = requested.json()["request_id"]
    approved = await flow.client.post(
        f"/v1/limit-requests/{request_id}/approve", headers={"Authorization": "Bearer bob"}
    )
    assert approved.status_code == 200
    manual = await flow.limit_change(cid, limit="300000.00")
    assert {
        k: manual["data"][k]
        for k in ("previous_limit", "reason", "changed_by", "requested_by", "request_id")
    } == {
        "previous_limit": "250000.00",
        "reason": "manual",
        "changed_by": "bob",
        "requested_by": "ana",
        "request_id": request_id,
    }

    # A later downgrade is taken in, but does not override the manual limit.
    await flow.assess(cid, "B", "2026-02-15T00:00:00Z")

    async def limit() -> dict[str, Any]:
        body: dict[str, Any] = (
            await flow.client.get(
                f"/v1/customers/{cid}/limit", headers={"Authorization": "Bearer ana"}
            )
        ).json()
        return body

    body = await _eventually(limit, lambda b: b["grade"] == "B")
    assert (body["grade"], body["limit"], body["source"]) == ("B", "300000.00", "manual")
    # The downgrade is folded; whatever it published is queued before the exposure this
    # invoice publishes, so once that has arrived nothing else can be on its way.
    await flow.invoice(cid, "FL-1-I", "10.00")
    await flow.exposure(cid, open_receivables="10.00")
    assert [c["limit"] for c in flow.limit_changes(cid)] == ["100000.00", "250000.00", "300000.00"]


async def test_given_ar_events_when_consumed_then_exposure_is_published_and_reservations_consumed(
    flow: Flow,
) -> None:
    cid = "FL-2"
    await flow.register(cid)
    await flow.assess(cid, "BBB", "2026-01-02T00:00:00Z")
    await flow.limit_change(cid, limit="100000.00")
    await flow.invoice(cid, "FL-2-I1", "1000.00")
    first = await flow.exposure(cid, open_receivables="1000.00")
    assert (first["type"], first["subject"], first["source"]) == (
        "exposure.updated",
        cid,
        "/creditwatch/limits",
    )
    assert first["data"].keys() >= EXPOSURE_FIELDS
    ExposureUpdated.model_validate(first["data"])
    assert {k: first["data"][k] for k in EXPOSURE_FIELDS - {"as_of"}} == {
        "customer_id": cid,
        "currency": "EUR",
        "open_receivables": "1000.00",
        "overdue_amount": "0.00",
        "overdue_buckets": {"1-30": "0.00", "31-60": "0.00", "61-90": "0.00", "90+": "0.00"},
        "max_days_overdue": 0,
        "reserved": "0.00",
        "exposure": "1000.00",
        "limit": "100000.00",
        "available": "99000.00",
        "utilization": "0.0100",
        "on_hold": False,
    }

    await flow.send(
        flow.settings.topic_payments,
        "payment.received",
        cid,
        {
            "payment_id": "FL-2-P1",
            "customer_id": cid,
            "amount": "400.00",
            "currency": "EUR",
            "received_date": "2026-03-02",
        },
        time="2026-03-02T09:00:00Z",
    )
    await flow.exposure(cid, open_receivables="600.00", exposure="600.00")

    check = await flow.client.post(
        "/v1/credit-checks",
        headers={"Authorization": "Bearer ana"},
        json={"order_id": "FL-2-SO", "customer_id": cid, "amount": "2000.00", "currency": "EUR"},
    )
    assert check.json()["decision"] == "approved"
    await flow.exposure(cid, reserved="2000.00", exposure="2600.00")

    # The invoice for the order consumes its reservation: nothing is counted twice.
    await flow.invoice(cid, "FL-2-I2", "1500.00", order_id="FL-2-SO", time="2026-03-03T09:00:00Z")
    consumed = await flow.exposure(cid, open_receivables="2100.00")
    assert (
        consumed["data"]["reserved"],
        consumed["data"]["exposure"],
        consumed["data"]["available"],
    ) == ("500.00", "2600.00", "97400.00")
    assert consumed["id"] != first["id"]


async def test_given_bad_records_when_consumed_then_they_are_dead_lettered_with_reasons(
    flow: Flow,
) -> None:
    cid = "FL-3"
    topic = flow.settings.topic_invoices
    consumed = {"service": "limits", "topic": topic, "type": "invoice.issued"}
    consumed_before = (
        _sample(
            (await flow.client.get("/metrics")).text,
            "creditwatch_events_consumed_total",
            **consumed,
        )
        or 0
    )
    await flow.register(cid)
    good = {
        "invoice_id": "FL-3-I",
        "customer_id": cid,
        "amount": "100.00",
        "currency": "EUR",
        "issue_date": "2026-02-25",
        "due_date": "2026-03-27",
    }
    await flow.send_raw(topic, cid, b'{"specversion": "1.0", "id": "broken')
    await flow.send(topic, "invoice.issued", cid, {**good, "amount": "-5.00"})
    await flow.send(topic, "invoice.issued", cid, {**good, "currency": "BRL"})
    await flow.send(
        topic, "invoice.issued", cid, {k: v for k, v in good.items() if k != "due_date"}
    )
    await flow.send(topic, "invoice.issued", cid, {**good, "due_date": "2026-01-01"})
    await flow.send(topic, "invoice.issued", cid, {**good, "currency": "XYZ"})
    await flow.send(topic, "invoice.teleported", cid, good)  # unknown type: skipped
    await flow.send(topic, "invoice.issued", cid, good, event_id="FL-3-good")
    await flow.send(topic, "invoice.issued", cid, good, event_id="FL-3-good")  # duplicate
    await flow.send(topic, "invoice.issued", cid, good, event_id="FL-3-again")  # re-sent
    # The same invoice number with other figures: not silently dropped.
    await flow.send(
        topic, "invoice.issued", cid, {**good, "amount": "1000.00"}, event_id="FL-3-other"
    )
    # Last on the partition: once its dead letter is out, everything before is processed.
    await flow.send(topic, "invoice.issued", cid, {**good, "order_id": "o" * 1001})

    expected = [
        "invalid_json",
        "invalid_amount",
        "no_fx_rate",
        "missing_field",
        "due_before_issue",
        "unknown_currency",
        "conflicting_duplicate",
        "oversize",
    ]
    letters = []
    for reason in expected:
        letter = await flow.outputs.wait_for(
            lambda e, r=reason: (
                e["_topic"] == flow.settings.topic_dlq
                and e["_key"] == cid
                and e["data"]["reason"] == r
            )
        )
        letters.append(letter)
    for letter in letters:
        assert letter["type"] == "event.dead_lettered"
        assert (letter["data"]["service"], letter["data"]["topic"]) == ("limits", topic)
        assert letter["data"]["error"] and letter["data"]["value"]
    assert sorted(
        d["data"]["reason"] for d in flow.outputs.of(flow.settings.topic_dlq, cid)
    ) == sorted(expected)  # the unknown type and the duplicate are not errors
    fx = letters[expected.index("no_fx_rate")]["data"]
    assert json.loads(fx["value"])["data"]["currency"] == "BRL"

    exposures = [
        e["data"]["open_receivables"] for e in flow.outputs.of(flow.settings.topic_exposure, cid)
    ]
    assert exposures[-1] == "100.00" and exposures.count("100.00") == 1  # once, not twice
    metrics = (await flow.client.get("/metrics")).text
    assert (
        _sample(
            metrics,
            "creditwatch_events_dead_lettered_total",
            service="limits",
            topic=topic,
            reason="no_fx_rate",
        )
        == 1
    )
    consumed_after = _sample(metrics, "creditwatch_events_consumed_total", **consumed)
    # The good invoice once, and its re-send under another event id (with no effect).
    assert consumed_after == consumed_before + 2


def _sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None
