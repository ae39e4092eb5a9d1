"""Concurrent credit checks against two API processes on one PostgreSQL: the per-customer row
lock must serialise them, so exposure + reservations never pass the limit and exactly as many
orders are approved as fit."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from harness import factories as f
from harness import servers
from harness.processes import CHECK, READ, ServiceProcess, service_env
from services.limits.handlers import LimitsService
from services.schema import upgrade
from shared.db import make_engine
from shared.policy import load_policy
from shared.runtime import EventCore
from shared.settings import Settings

pytestmark = pytest.mark.integration


def assessed(cid: str, grade: str) -> dict:
    return f.cloudevent(
        "assessment.completed",
        cid,
        {
            "assessment_id": f"a-{cid}",
            "customer_id": cid,
            "score": 70,
            "grade": grade,
            "risk_level": "low",
            "previous_grade": None,
            "factors": [],
            "ratios": {},
            "override": None,
            "policy_version": "2026.1",
            "trigger": {"event_id": f"reg-{cid}", "type": "customer.registered"},
            "next_review_date": "2027-03-01",
            "assessed_at": "2026-03-01T09:00:00Z",
        },
        id=f"a-{cid}",
        source="/creditwatch/assessment",
    )


async def seed(url: str, ledger: list[dict]) -> None:
    """Build the customers' state with the real event core (no broker needed for that)."""
    engine = make_engine(url)
    await upgrade(engine, "limits")
    settings = Settings()
    core = EventCore(
        LimitsService(settings, load_policy(None)), engine, topic_of_type=settings.topic_of_type()
    )
    await core.process_records(f.records(ledger))
    await engine.dispose()


async def test_two_hundred_concurrent_checks_on_two_api_processes_never_overshoot(
    tmp_path: Path, postgres_server_url: str, kafka_bootstrap: str
) -> None:
    # Given: a customer graded A (policy limit 250,000.00 EUR) with 240,000.00 invoiced,
    # so exactly ten orders of 1,000.00 fit (the tenth lands exactly on the limit)
    url = servers.create_database(postgres_server_url)
    cid = "C-CONC"
    today = datetime.now(UTC).date()
    await seed(
        url, [f.customer(cid), assessed(cid, "A"), f.invoice(cid, "BIG", "240000.00", issued=today)]
    )
    prefix = f"c{uuid.uuid4().hex[:8]}"
    env = service_env(
        database_url=url,
        bootstrap=kafka_bootstrap,
        CREDITWATCH_CONSUMER_GROUP_PREFIX=prefix,
        CREDITWATCH_TOPIC_EXPOSURE=f"{prefix}.credit.exposure",
        CREDITWATCH_TOPIC_LIMITS=f"{prefix}.credit.limits",
    )
    apis = [ServiceProcess("limits", env, tmp_path, "--no-consume") for _ in range(2)]
    try:
        for api in apis:
            api.start()
        for api in apis:
            api.wait_ready(90)

        # When: 200 different orders are checked at once, alternating between the processes
        async def check(client: httpx.AsyncClient, n: int) -> dict:
            reply = await client.post(
                "/v1/credit-checks",
                json={
                    "order_id": f"SO-{n:03d}",
                    "customer_id": cid,
                    "amount": "1000.00",
                    "currency": "EUR",
                },
                headers={"Authorization": f"Bearer {CHECK}"},
            )
            assert reply.status_code == 200, reply.text
            return reply.json()

        clients = [httpx.AsyncClient(base_url=api.url, timeout=60) for api in apis]
        try:
            answers = await asyncio.gather(*(check(clients[n % 2], n) for n in range(200)))
            exposure = (
                await clients[0].get(
                    f"/v1/customers/{cid}/exposure", headers={"Authorization": f"Bearer {READ}"}
                )
            ).json()
        finally:
            for client in clients:
                await client.aclose()
    finally:
        for api in apis:
            api.stop()

    # Then: exactly ten approved, the rest not, and the limit is reached but never passed
    approved = [a for a in answers if a["decision"] == "approved"]
    assert len(approved) == 10
    assert all(a["decision"] in ("review", "rejected") for a in answers if a not in approved)
    assert all(Decimal(a["exposure"]) <= Decimal("250000.00") for a in answers)
    assert Decimal(exposure["reserved"]) == Decimal("10000.00")
    assert Decimal(exposure["exposure"]) == Decimal(exposure["limit"]) == Decimal("250000.00")
    assert Decimal(exposure["available"]) == 0
    # …and both processes did decide some of them (the lock, not luck, kept the count).
    assert {a["check_id"] for a in answers} and len({a["check_id"] for a in answers}) == 200
