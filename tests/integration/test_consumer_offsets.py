"""The offsets a service commits to Kafka (for lag tooling) never run ahead of the database.

aiokafka starts a newly assigned partition from the group's committed offset while the
service's own listener is still reading the offsets stored in the database. When the
committed offset was that of records only fetched, a restarted consumer could apply later
records first and the skipped ones after them, out of order (seen once in a while in the
SIGKILL test: invoices cancelled before they existed). Here a batch is held up by a row
lock while the consumer keeps fetching; the committed offsets must stay with the database.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from harness import factories as f
from harness import servers
from harness.processes import ServiceProcess, service_env
from harness.streams import Item
from services.limits import store
from shared import eventstore as es
from shared.db import make_engine
from tests.integration.test_ingestion import (
    create,
    end_offsets,
    produce,
    topic_env,
    wait_caught_up,
)

pytestmark = pytest.mark.integration


async def committed_offsets(
    bootstrap: str, group: str, partitions: list[tuple[str, int]]
) -> dict[tuple[str, int], int]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        out = {}
        for topic, partition in partitions:
            offset = await consumer.committed(TopicPartition(topic, partition))
            if offset is not None:
                out[(topic, partition)] = offset
        return out
    finally:
        await consumer.stop()


async def stored_offsets(url: str, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            return await es.load_offsets(conn, store.core, partitions)
    finally:
        await engine.dispose()


def item(event: dict, topic: str) -> Item:
    return Item(topic, event["subject"].encode(), f.raw(event), "valid", event)


async def test_while_a_batch_is_held_up_the_committed_offsets_stay_with_the_database(
    tmp_path: Path, postgres_server_url: str, kafka_bootstrap: str
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    url = servers.create_database(postgres_server_url)
    await create(kafka_bootstrap, prefix)
    env = service_env(database_url=url, bootstrap=kafka_bootstrap, **topic_env(prefix))
    proc = ServiceProcess("limits", env, tmp_path)
    customers = [f"C{n:03d}" for n in range(40)]
    try:
        proc.start().wait_ready(90)
        await produce(
            kafka_bootstrap, prefix, [item(f.customer(c), "crm.customers") for c in customers]
        )
        await wait_caught_up(url, await end_offsets(kafka_bootstrap, prefix), proc, 60)
        await asyncio.sleep(1.5)  # lag commits go at most once a second

        # Hold one customer's row: the batch with its invoice waits, the consumer fetches on.
        raw = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
        try:
            async with raw.transaction():
                await raw.execute(
                    f"SELECT 1 FROM {store.customers.name} WHERE customer_id = $1 FOR UPDATE",
                    customers[0],
                )
                invoices = [
                    item(f.invoice(c, f"I-{c}-{n}", "100.00"), "ar.invoices")
                    for n in range(5)
                    for c in customers
                ]
                await produce(kafka_bootstrap, prefix, invoices)
                ends = await end_offsets(kafka_bootstrap, prefix)
                partitions = [tp for tp in ends if tp[0].endswith("ar.invoices")]
                await asyncio.sleep(4)  # several lag commits (one a second while fetching)
                committed = await committed_offsets(kafka_bootstrap, f"{prefix}-limits", partitions)
                stored = await stored_offsets(url, partitions)
                ahead = {
                    tp: (offset, stored.get(tp))
                    for tp, offset in committed.items()
                    if offset > stored.get(tp, 0)
                }
                assert ahead == {}, f"committed ahead of the database: {ahead}"
        finally:
            await raw.close()
        await wait_caught_up(url, ends, proc, 60)
    finally:
        proc.stop()
