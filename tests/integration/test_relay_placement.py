"""Where a service's outbox is published from: API replicas started ``--no-relay`` leave it to
the process that relays (the worker), on the real broker and database."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from harness import factories as f
from harness import servers
from harness.e2e import Tap, create_topics, new_prefix, topic_env
from harness.processes import CHECK, ServiceProcess, service_env
from services.limits import store
from shared.db import make_engine
from tests.integration.test_limits_concurrency import assessed, seed

pytestmark = pytest.mark.integration


async def pending(url: str) -> int:
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            return (
                await conn.execute(text(f"SELECT count(*) FROM {store.core.outbox.name}"))
            ).scalar_one()
    finally:
        await engine.dispose()


async def test_an_api_replica_without_relay_leaves_its_outbox_to_the_worker(
    tmp_path: Path, postgres_server_url: str, kafka_bootstrap: str
) -> None:
    # Given: a customer graded A, and an API replica started --no-consume --no-relay, alone
    url = servers.create_database(postgres_server_url)
    cid = "C-RELAY"
    await seed(
        url,
        [
            f.customer(cid),
            assessed(cid, "A"),
            f.invoice(cid, "I-1", "1000.00", issued=datetime.now(UTC).date()),
        ],
    )
    prefix = new_prefix()
    await create_topics(kafka_bootstrap, prefix)
    env = service_env(database_url=url, bootstrap=kafka_bootstrap, **topic_env(prefix))
    api = ServiceProcess("limits", env, tmp_path, "--no-consume", "--no-relay")
    worker = ServiceProcess("limits", env, tmp_path)
    tap = await Tap(kafka_bootstrap, prefix, topics=("credit.exposure",)).start()
    try:
        api.start().wait_ready(90)
        # Ready without a broker check: it neither consumes nor publishes.
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
            ready = (await client.get("/readyz")).json()
        assert ready["checks"] == {"database": True}
        # (the seeding queued exposure events too; nobody has published anything yet)
        queued = await pending(url)

        # When: an order is checked and reserved on the replica
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
            reply = await client.post(
                "/v1/credit-checks",
                json={
                    "order_id": "SO-1",
                    "customer_id": cid,
                    "amount": "500.00",
                    "currency": "EUR",
                },
                headers={"Authorization": f"Bearer {CHECK}"},
            )
        assert reply.status_code == 200, reply.text
        assert reply.json()["decision"] == "approved"

        # Then: its exposure event stays queued while no process relays…
        await asyncio.sleep(2.0)
        assert await pending(url) == queued + 1
        assert tap.of("credit.exposure", cid) == []

        # …and the worker, once it runs, publishes it (the reservation in its figures)
        worker.start().wait_ready(90)
        seen = await tap.wait_for(
            "the check's exposure event",
            lambda: [r for r in tap.of("credit.exposure", cid) if r.data["reserved"] == "500.00"],
            within=30,
        )
        assert seen[0].data["exposure"] == "1500.00"
        for _ in range(100):
            if await pending(url) == 0:
                break
            await asyncio.sleep(0.1)
        assert await pending(url) == 0
    finally:
        await tap.stop()
        api.stop()
        worker.stop()
