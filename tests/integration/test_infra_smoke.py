"""Smoke tests for the real-infrastructure harness (harness/).

They prove the session fixtures hand out a real PostgreSQL (reached through SQLAlchemy's
asyncpg driver, as the services do) and a real Apache Kafka (topics, keyed produce and a
consumer group), so a broken harness shows up here rather than as puzzling failures in
the product's integration tests.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from harness.servers import create_topics_async

pytestmark = pytest.mark.integration

MESSAGES = 100
KEYS = 10


async def test_postgres_is_real(postgres_url: str) -> None:
    engine = create_async_engine(postgres_url)
    try:
        async with engine.begin() as conn:
            version = (await conn.execute(text("select version()"))).scalar_one()
            database = (await conn.execute(text("select current_database()"))).scalar_one()
            await conn.execute(
                text("create table smoke (id integer primary key, note text not null)")
            )
            await conn.execute(
                text("insert into smoke (id, note) values (:id, :note)"),
                [{"id": i, "note": f"note-{i}"} for i in range(5)],
            )
        async with engine.connect() as conn:
            rows = (await conn.execute(text("select id, note from smoke order by id"))).all()
    finally:
        await engine.dispose()

    assert version.startswith("PostgreSQL ")
    assert database.startswith("creditwatch_test_")
    assert [tuple(row) for row in rows] == [(i, f"note-{i}") for i in range(5)]


async def test_kafka_keyed_round_trip_with_consumer_group(kafka_bootstrap: str) -> None:
    topic = f"smoke-{uuid.uuid4().hex[:8]}"
    await create_topics_async(kafka_bootstrap, [topic], partitions=4)
    await create_topics_async(kafka_bootstrap, [topic], partitions=4)  # idempotent

    sent: dict[str, list[int]] = defaultdict(list)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(MESSAGES):
            key = f"customer-{i % KEYS}"
            await producer.send(topic, key=key.encode(), value=str(i).encode())
            sent[key].append(i)
        await producer.flush()
    finally:
        await producer.stop()

    group = f"smoke-group-{uuid.uuid4().hex[:8]}"
    received: dict[str, list[int]] = defaultdict(list)
    partitions_seen: set[int] = set()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        async with asyncio.timeout(60):
            count = 0
            while count < MESSAGES:
                batches = await consumer.getmany(timeout_ms=1000)
                for tp, records in batches.items():
                    partitions_seen.add(tp.partition)
                    for record in records:
                        assert record.key is not None and record.value is not None
                        received[record.key.decode()].append(int(record.value))
                        count += 1
        await consumer.commit()
        committed = [
            await consumer.committed(TopicPartition(topic, p))
            for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
    finally:
        await consumer.stop()

    assert received == sent  # every message once, per-key order preserved
    assert len(partitions_seen) > 1  # keys really were spread over the partitions
    assert sum(offset or 0 for offset in committed) == MESSAGES
