"""The official CloudEvents Python SDK (``cloudevents``, its Kafka protocol binding) reads what
creditwatch publishes to the real Apache Kafka: the outbox relay's output events and dead
letters, published by an idempotent producer, and the records of ``creditwatch simulate`` and
``creditwatch import``. Each record carries ``content-type: application/cloudevents+json``:
the binding's readers take a record without it for binary mode, and misread it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from cloudevents.core.bindings import kafka as binding
from cloudevents.core.exceptions import CloudEventValidationError
from cloudevents.core.formats.json import JSONFormat

from harness.servers import create_topics_async
from services.limits.handlers import LimitsService
from shared.events import STRUCTURED_CONTENT_TYPE, new_event
from shared.policy import load_policy
from shared.runtime import EventCore, OutboxRelay, Record
from shared.settings import Settings
from tests.databases import fresh_engine
from tools import devbroker, importer, simulate

pytestmark = pytest.mark.integration

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
TOPICS = ("customers", "invoices", "payments", "overdue", "financials", "credit_reports")
OUTPUTS = ("assessments", "limits", "exposure", "alerts", "dlq")


def settings_for(bootstrap: str, **overrides: Any) -> Settings:
    """Settings outside dev mode (so producers are idempotent by default), with topics of
    this test's own."""
    run = uuid.uuid4().hex[:8]
    topics = {f"topic_{name}": f"t{run}.{name}" for name in (*TOPICS, *OUTPUTS)}
    return Settings(**{"kafka_bootstrap": bootstrap, "dev_mode": False, **topics, **overrides})


def all_topics(settings: Settings) -> list[str]:
    return [getattr(settings, f"topic_{name}") for name in (*TOPICS, *OUTPUTS)]


PARTITIONS = 2


async def read_all(bootstrap: str, topics: list[str], expected: int) -> list[Any]:
    """Every record of the topics (made with PARTITIONS partitions), from their beginning;
    waits for ``expected`` of them."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for topic in topics for p in range(PARTITIONS)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        records: list[Any] = []
        deadline = asyncio.get_running_loop().time() + 30
        while len(records) < expected and asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for messages in batch.values():
                records.extend(messages)
        # A moment more, so that a record published twice shows as one too many
        for messages in (await consumer.getmany(timeout_ms=300)).values():
            records.extend(messages)
        return records
    finally:
        await consumer.stop()


def kafka_message(record: Any, *, headers: bool = True) -> binding.KafkaMessage:
    """An aiokafka record as the SDK's binding takes it."""
    return binding.KafkaMessage(
        headers=dict(record.headers) if headers else {}, key=record.key, value=record.value
    )


def read_like_the_binding(message: binding.KafkaMessage) -> Any:
    """What a reader following the CloudEvents Kafka binding (§3) does: a content-type header
    that starts with application/cloudevents names structured mode, anything else (or none)
    means binary mode, whose attributes are ce_* headers. (The Python SDK's own ``from_kafka``
    looks for ce_* headers instead; the Java and Go SDKs decide by the content type.)"""
    content_type = message.headers.get("content-type", b"").decode()
    if content_type.startswith("application/cloudevents"):
        return binding.from_structured(message, JSONFormat())
    return binding.from_binary(message, JSONFormat())


def assert_structured_header(record: Any) -> None:
    assert dict(record.headers) == {"content-type": STRUCTURED_CONTENT_TYPE.encode()}, (
        record.topic,
        record.headers,
    )


@pytest.fixture
async def limits_core(
    tmp_path: Path, postgres_server_url: str, kafka_bootstrap: str
) -> AsyncIterator[tuple[EventCore, Settings]]:
    settings = settings_for(kafka_bootstrap)
    await create_topics_async(kafka_bootstrap, all_topics(settings), partitions=PARTITIONS)
    engine = await fresh_engine(
        "postgresql", "limits", tmp_path=tmp_path, pg_server_url=postgres_server_url
    )
    service = LimitsService(settings, load_policy())
    core = EventCore(service, engine, dlq_topic=settings.topic_dlq, clock=lambda: T0)
    try:
        yield core, settings
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def running(relay: OutboxRelay) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        yield
        assert not task.done(), task.exception()
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def test_the_cloudevents_sdk_reads_what_an_idempotent_relay_published(
    limits_core: tuple[EventCore, Settings], kafka_bootstrap: str
) -> None:
    core, settings = limits_core
    # Given the limits service's outbox holding an exposure.updated derived from a traced
    # invoice, and a dead letter of a record it could not read
    customer = new_event(
        "customer.registered",
        source="/crm",
        subject="C-1",
        data={"customer_id": "C-1", "name": "C-1 GmbH", "currency": "EUR"},
        id="cust-1",
        time=T0,
    )
    invoice = new_event(
        "invoice.issued",
        source="/erp",
        subject="C-1",
        data={
            "invoice_id": "INV-1",
            "customer_id": "C-1",
            "amount": "1250.00",
            "currency": "EUR",
            "issue_date": "2026-03-01",
            "due_date": "2026-03-31",
        },
        id="inv-1",
        time=T0 + timedelta(minutes=1),
        extensions={"traceparent": TRACEPARENT},
    )
    await core.process_records(
        [
            Record(settings.topic_customers, 0, 0, b"C-1", customer.to_json()),
            Record(settings.topic_invoices, 0, 0, b"C-1", invoice.to_json()),
            Record(settings.topic_invoices, 0, 1, b"C-1", b'{"not": "a cloudevent"}'),
        ]
    )
    # When the relay publishes it with an idempotent producer (Apache Kafka offers one)
    relay = OutboxRelay(core, bootstrap=kafka_bootstrap, idempotent=True)
    async with running(relay):
        topics = [settings.topic_exposure, settings.topic_dlq]
        records = await read_all(kafka_bootstrap, topics, 2)
        assert relay.healthy
    # Then every record says it is a structured-mode CloudEvent
    # (one batch: one exposure.updated for the customer, named after its last event)
    assert sorted(r.topic for r in records) == sorted([settings.topic_exposure, settings.topic_dlq])
    for record in records:
        assert_structured_header(record)
    # And the SDK's Kafka binding reads each: attributes, extensions, data and key
    events = [binding.from_structured(kafka_message(r), JSONFormat()) for r in records]
    by_type: dict[str, list[Any]] = {}
    for event in events:
        by_type.setdefault(event.get_type(), []).append(event)
    (last,) = by_type["exposure.updated"]
    assert last.get_specversion() == "1.0"
    assert last.get_source() == "/creditwatch/limits"
    assert last.get_subject() == "C-1"
    assert last.get_id().startswith("exposure-C-1-")
    assert last.get_time() == T0 + timedelta(minutes=1)
    assert last.get_datacontenttype() == "application/json"
    assert last.get_extension("traceparent") == TRACEPARENT
    assert last.get_extension("partitionkey") == "C-1"  # the record's key
    data = last.get_data()
    assert data["open_receivables"] == "1250.00" and data["currency"] == "EUR"
    (letter,) = by_type["event.dead_lettered"]
    assert letter.get_source() == "/creditwatch/limits"
    assert letter.get_data()["reason"] == "missing_field"
    assert json.loads(letter.get_data()["value"]) == {"not": "a cloudevent"}
    # And the same record without its content-type header is, to a reader following the
    # binding, a binary-mode event without attributes: it cannot be read (the header matters)
    with pytest.raises(CloudEventValidationError, match="Missing required attribute: 'type'"):
        read_like_the_binding(kafka_message(records[0], headers=False))
    assert read_like_the_binding(kafka_message(records[0])).get_type() == records_type(records[0])


def records_type(record: Any) -> str:
    kind: str = json.loads(record.value)["type"]
    return kind


async def test_simulate_publishes_structured_cloudevents_with_an_idempotent_producer(
    kafka_bootstrap: str,
) -> None:
    # Given settings outside dev mode: the producer is idempotent
    settings = settings_for(kafka_bootstrap)
    assert settings.idempotent_producer
    inputs = [getattr(settings, f"topic_{name}") for name in TOPICS]
    await create_topics_async(kafka_bootstrap, inputs, partitions=PARTITIONS)
    # When the simulator publishes a small history
    count = await simulate.publish(settings, customers=2, months=2, seed=3)
    records = await read_all(kafka_bootstrap, inputs, count)
    # Then every record carries the header, and the SDK reads each as the event it is
    assert len(records) == count > 0
    for record in records:
        assert_structured_header(record)
        event = binding.from_structured(kafka_message(record), JSONFormat())
        assert event.get_subject() == record.key.decode()
        assert event.get_type() == json.loads(record.value)["type"]


async def test_import_publishes_structured_cloudevents_with_an_idempotent_producer(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    settings = settings_for(kafka_bootstrap)
    await create_topics_async(
        kafka_bootstrap,
        [settings.topic_customers, settings.topic_invoices, settings.topic_payments],
        partitions=PARTITIONS,
    )
    items = tmp_path / "items.csv"
    items.write_text(
        "customer_id,invoice_id,amount,currency,issue_date,due_date,open_amount\n"
        "C-1,INV-1,100.00,EUR,2026-01-10,2026-02-09,40.00\n"
    )
    customers = tmp_path / "customers.csv"
    customers.write_text("customer_id,name,currency\nC-1,C-1 GmbH,EUR\n")
    plan = importer.plan_import(items, settings=settings, customers_path=customers)
    assert plan.ok, plan.errors
    # When the import publishes it
    await importer.KafkaPublisher(settings).publish(plan.messages)
    topics = sorted({m.topic for m in plan.messages})
    records = await read_all(kafka_bootstrap, topics, len(plan.messages))
    # Then every record carries the header and the SDK reads it
    assert sorted(
        binding.from_structured(kafka_message(r), JSONFormat()).get_type() for r in records
    ) == [
        "customer.registered",
        "invoice.issued",
        "payment.received",
    ]
    for record in records:
        assert_structured_header(record)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_the_dev_broker_lacks_idempotence_so_dev_mode_produces_without_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The embedded broker (Tansu) answers InitProducerId with an unknown error. Idempotence
    asked for explicitly (CREDITWATCH_KAFKA_IDEMPOTENT=true) fails naming the setting; as the
    default outside dev mode it is dropped with a warning and the batch is published once
    (the idempotent attempt delivered nothing); in dev mode or with the setting false the
    producer never asks. Each publishes with the content-type header."""
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    with devbroker.embedded_broker(port, devbroker.new_cluster_id()):
        explicit = settings_for(bootstrap, kafka_idempotent=True)
        with pytest.raises(RuntimeError, match="CREDITWATCH_KAFKA_IDEMPOTENT=false"):
            asyncio.run(simulate.publish(explicit, customers=1, months=1))
        default = settings_for(bootstrap)
        inputs = [getattr(default, f"topic_{name}") for name in TOPICS]
        asyncio.run(create_topics_async(bootstrap, inputs, partitions=PARTITIONS))
        assert default.kafka_idempotent is None and default.idempotent_producer
        with caplog.at_level("WARNING", logger="creditwatch.producing"):
            count = asyncio.run(simulate.publish(default, customers=1, months=1))
        assert count > 0
        assert "refused an idempotent producer (UnknownError)" in caplog.text
        assert "CREDITWATCH_KAFKA_IDEMPOTENT" in caplog.text
        records = asyncio.run(read_all(bootstrap, inputs, count))
        # Published once: the refused attempt sent nothing
        assert len(records) == count
        assert len({json.loads(r.value)["id"] for r in records}) == count
        for record in records:
            assert_structured_header(record)
        for settings in (
            settings_for(bootstrap, dev_mode=True),
            settings_for(bootstrap, kafka_idempotent=False),
        ):
            assert not settings.idempotent_producer
            caplog.clear()
            with caplog.at_level("WARNING", logger="creditwatch.producing"):
                count = asyncio.run(simulate.publish(settings, customers=1, months=1))
            assert count > 0
            assert "refused" not in caplog.text


async def test_an_unreachable_broker_is_not_blamed_on_idempotence() -> None:
    settings = Settings(kafka_bootstrap=f"127.0.0.1:{free_port()}", dev_mode=False)
    with pytest.raises(Exception) as raised:
        await simulate.publish(settings, customers=1, months=1)
    assert "CREDITWATCH_KAFKA_IDEMPOTENT" not in str(raised.value)
