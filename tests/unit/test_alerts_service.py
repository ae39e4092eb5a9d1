"""The alerts service end to end on SQLite, without a broker: consumed records through the
event core, the projections, the outbox, replay/verify, the scheduler and the HTTP API."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from services.alerts import store
from services.alerts.app import build, refresh_open_alert_gauges
from services.alerts.handlers import AlertsService
from shared.auth import Principal, TokenRegistry
from shared.events import Envelope, new_event
from shared.policy import load_policy
from shared.runtime import EventCore, Record
from shared.service import ServiceHost
from shared.settings import Settings
from tests.databases import reset

POLICY = load_policy()
T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
READ = "token-read"
WRITE = "token-write"
TOKENS = TokenRegistry(
    {
        READ: Principal("reader", frozenset({"credit:read"})),
        WRITE: Principal("analyst", frozenset({"credit:read", "alerts:write"})),
    }
)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class World:
    """An alerts service on a fresh SQLite file, fed records as if consumed from Kafka."""

    def __init__(self, app: Any, host: ServiceHost, clock: Clock) -> None:
        self.app = app
        self.host = host
        self.core: EventCore = host.core
        self.clock = clock
        self.offset = 0

    def record(self, env: Envelope, topic: str) -> Record:
        self.offset += 1
        return Record(topic, 0, self.offset, env.key, env.to_json())

    async def consume(self, *records: Record) -> None:
        await self.core.process_records(list(records))

    async def outbox(self) -> list[dict[str, Any]]:
        ob = store.core.outbox
        async with self.core.engine.connect() as conn:
            rows = await conn.execute(select(ob.c.topic, ob.c.value).order_by(ob.c.seq))
            return [{"topic": r.topic, **json.loads(r.value)} for r in rows]

    def client(self, token: str | None = READ) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://alerts", headers=headers
        )


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path}/{{service}}.db", dev_mode=True
    )
    clock = Clock(T0)
    app, host = build(settings, tokens=TOKENS, policy=POLICY, consume=False, clock=clock)
    await reset(host.engine, "alerts")
    try:
        yield World(app, host, clock)
    finally:
        await host.engine.dispose()


def exposure_event(
    cid: str,
    exposure: str,
    limit: str = "100000.00",
    *,
    n: int,
    days: int = 0,
    at: datetime | None = None,
) -> Envelope:
    exp, lim = Decimal(exposure), Decimal(limit)
    when = at or T0 + timedelta(minutes=n)
    data: dict[str, Any] = {
        "customer_id": cid,
        "currency": "EUR",
        "open_receivables": exposure,
        "overdue_amount": "1000.00" if days else "0.00",
        "overdue_buckets": {},
        "max_days_overdue": days,
        "reserved": "0.00",
        "exposure": exposure,
        "limit": limit,
        "available": str(lim - exp),
        "utilization": str((exp / lim).quantize(Decimal("0.0001"))) if lim else None,
        "on_hold": False,
        "as_of": when,
    }
    return new_event(
        "exposure.updated",
        source="/creditwatch/limits",
        subject=cid,
        data=data,
        id=f"exposure-{cid}-{n}",
        time=when,
    )


def assessment_event(cid: str, grade: str, *, n: int, next_review: date | None = None) -> Envelope:
    when = T0 + timedelta(minutes=n)
    data = {
        "assessment_id": f"as-{n}",
        "customer_id": cid,
        "score": 60,
        "grade": grade,
        "risk_level": "medium",
        "ratios": {},
        "policy_version": POLICY.version,
        "next_review_date": next_review,
        "assessed_at": when,
    }
    return new_event(
        "assessment.completed",
        source="/creditwatch/assessment",
        subject=cid,
        data=data,
        id=f"assessment-{n}",
        time=when,
    )


def raised_total(rule: str, severity: str) -> float:
    value = REGISTRY.get_sample_value(
        "creditwatch_alerts_raised_total", {"rule": rule, "severity": severity}
    )
    return value or 0.0


# ---- consuming ----------------------------------------------------------------------------


async def test_a_consumed_exposure_over_the_limit_publishes_one_alert_per_rule(
    world: World,
) -> None:
    before = raised_total("limit_breach", "critical")
    await world.consume(world.record(exposure_event("C-1", "120000.00", n=1), "credit.exposure"))
    published = await world.outbox()
    assert sorted((e["type"], e["data"]["rule"]) for e in published) == [
        ("alert.raised", "limit_breach"),
        ("alert.raised", "utilization_high"),
    ]
    for event in published:
        assert event["topic"] == "credit.alerts"
        assert event["subject"] == "C-1" and event["source"] == "/creditwatch/alerts"
        assert event["id"] == f"{event['data']['alert_id']}-1"
    assert raised_total("limit_breach", "critical") == before + 1


async def test_a_redelivered_record_never_raises_a_second_alert(world: World) -> None:
    env = exposure_event("C-1", "95000.00", n=1)
    await world.consume(world.record(env, "credit.exposure"))
    await world.consume(world.record(env, "credit.exposure"))  # redelivery, new offset
    async with world.core.engine.connect() as conn:
        count = (await conn.execute(select(func.count()).select_from(store.alerts))).scalar()
    assert count == 1
    assert len(await world.outbox()) == 1


async def test_the_lifecycle_is_kept_in_the_alert_row_and_its_history(world: World) -> None:
    await world.consume(
        world.record(exposure_event("C-1", "95000.00", n=1), "credit.exposure"),
        world.record(exposure_event("C-1", "100000.00", n=2), "credit.exposure"),  # +5 pts
        world.record(exposure_event("C-1", "80000.00", n=3), "credit.exposure"),
    )
    types = [e["type"] for e in await world.outbox()]
    assert types == ["alert.raised", "alert.updated", "alert.resolved"]
    async with world.core.engine.connect() as conn:
        row = (await conn.execute(select(store.alerts))).one()
        past = await store.get_history(conn, row.alert_id)
    assert (row.status, row.version) == ("resolved", 3)
    assert [(h.seq, h.type) for h in past] == [(1, "raised"), (2, "updated"), (3, "resolved")]


async def test_replay_reproduces_the_projections_exactly(world: World) -> None:
    await world.consume(
        world.record(exposure_event("C-1", "95000.00", n=1), "credit.exposure"),
        world.record(exposure_event("C-2", "130000.00", n=2, days=45), "credit.exposure"),
        world.record(assessment_event("C-2", "A", n=3), "credit.assessments"),
        world.record(assessment_event("C-2", "BB", n=4), "credit.assessments"),
        world.record(exposure_event("C-1", "50000.00", n=5), "credit.exposure"),
    )
    assert await world.core.verify() == []
    published = len(await world.outbox())
    await world.core.replay()
    assert await world.core.verify() == []
    assert len(await world.outbox()) == published  # a replay publishes nothing again


async def test_an_event_of_an_unknown_type_is_skipped_and_garbage_is_dead_lettered(
    world: World,
) -> None:
    odd = new_event(
        "exposure.recomputed", source="/x", subject="C-1", data={"x": 1}, id="odd", time=T0
    )
    result = await world.core.process_records(
        [
            world.record(odd, "credit.exposure"),
            Record("credit.exposure", 0, 99, b"C-1", b"{not json"),
        ]
    )
    assert (result.skipped, result.dead_lettered) == (1, 1)
    assert [e["type"] for e in await world.outbox()] == ["event.dead_lettered"]


# ---- scheduler ----------------------------------------------------------------------------


async def test_the_scheduler_raises_review_overdue_once_when_the_date_has_passed(
    world: World,
) -> None:
    await world.consume(
        world.record(
            assessment_event("C-3", "BBB", n=1, next_review=date(2026, 3, 10)), "credit.assessments"
        )
    )
    world.clock.now = datetime(2026, 3, 10, 12, tzinfo=UTC)
    assert await world.core.run_due() == 0
    world.clock.now = datetime(2026, 3, 11, 0, 1, tzinfo=UTC)
    assert await world.core.run_due() == 1
    assert await world.core.run_due() == 0  # recorded: not again
    published = await world.outbox()
    assert [(e["type"], e["data"]["rule"], e["data"]["severity"]) for e in published] == [
        ("alert.raised", "review_overdue", "info")
    ]
    assert await world.core.verify() == []


# ---- HTTP ---------------------------------------------------------------------------------


async def test_alerts_are_listed_newest_first_filtered_and_paginated(world: World) -> None:
    for n in range(1, 6):
        await world.consume(
            world.record(exposure_event(f"C-{n}", "95000.00", n=n), "credit.exposure")
        )
    async with world.client() as http:
        first = (await http.get("/v1/alerts", params={"limit": 2})).json()
        assert [a["customer_id"] for a in first["items"]] == ["C-5", "C-4"]
        second = (
            await http.get("/v1/alerts", params={"limit": 2, "cursor": first["next_cursor"]})
        ).json()
        assert [a["customer_id"] for a in second["items"]] == ["C-3", "C-2"]
        third = (
            await http.get("/v1/alerts", params={"limit": 2, "cursor": second["next_cursor"]})
        ).json()
        assert [a["customer_id"] for a in third["items"]] == ["C-1"]
        assert third["next_cursor"] is None
        mine = (
            await http.get(
                "/v1/alerts",
                params={
                    "customer_id": "C-3",
                    "status": "open",
                    "rule": "utilization_high",
                    "severity": "warning",
                },
            )
        ).json()
        assert [a["customer_id"] for a in mine["items"]] == ["C-3"]
        assert (await http.get("/v1/alerts", params={"status": "resolved"})).json()["items"] == []
        too_many = await http.get("/v1/alerts", params={"limit": 501})
        assert too_many.status_code == 422
        assert too_many.headers["content-type"].startswith("application/problem+json")
        unknown = await http.get("/v1/alerts", params={"rule": "moon_phase"})
        assert unknown.status_code == 422 and unknown.json()["field"] == "rule"
        bad_cursor = await http.get("/v1/alerts", params={"cursor": "nope"})
        assert bad_cursor.status_code == 422


async def test_acknowledging_an_alert_publishes_an_update_and_records_who(world: World) -> None:
    await world.consume(world.record(exposure_event("C-1", "95000.00", n=1), "credit.exposure"))
    async with world.client() as http:
        alert_id = (await http.get("/v1/alerts")).json()["items"][0]["alert_id"]
    world.clock.now = T0 + timedelta(hours=1)
    async with world.client(WRITE) as http:
        response = await http.post(
            f"/v1/alerts/{alert_id}/acknowledge", json={"note": "calling them"}
        )
        assert response.status_code == 200
        body = response.json()
        assert (body["status"], body["acknowledged_by"], body["acknowledgement_note"]) == (
            "acknowledged",
            "analyst",
            "calling them",
        )
        again = await http.post(f"/v1/alerts/{alert_id}/acknowledge")
        assert again.status_code == 200 and again.json()["version"] == body["version"]
        detail = (await http.get(f"/v1/alerts/{alert_id}")).json()
    assert [(h["type"], h.get("by")) for h in detail["history"]] == [
        ("raised", None),
        ("acknowledged", "analyst"),
    ]
    published = await world.outbox()
    assert [e["type"] for e in published] == ["alert.raised", "alert.updated"]
    assert published[-1]["data"]["status"] == "acknowledged"
    assert await world.core.verify() == []


async def test_acknowledging_a_resolved_alert_is_a_conflict(world: World) -> None:
    await world.consume(
        world.record(exposure_event("C-1", "95000.00", n=1), "credit.exposure"),
        world.record(exposure_event("C-1", "10000.00", n=2), "credit.exposure"),
    )
    async with world.client() as http:
        alert_id = (await http.get("/v1/alerts")).json()["items"][0]["alert_id"]
    async with world.client(WRITE) as http:
        response = await http.post(f"/v1/alerts/{alert_id}/acknowledge", json={})
    assert response.status_code == 409
    assert response.headers["content-type"].startswith("application/problem+json")


async def test_auth_is_decided_before_existence(world: World) -> None:
    async with world.client(None) as http:
        assert (await http.get("/v1/alerts/al-nothing")).status_code == 401
    async with world.client(READ) as http:
        assert (await http.post("/v1/alerts/al-nothing/acknowledge")).status_code == 403
        assert (await http.get("/v1/alerts/al-nothing")).status_code == 404
    async with world.client(WRITE) as http:
        assert (await http.post("/v1/alerts/al-nothing/acknowledge")).status_code == 404


async def test_the_rules_endpoint_shows_the_policy_thresholds(world: World) -> None:
    async with world.client() as http:
        body = (await http.get("/v1/rules")).json()
    assert body["policy_version"] == POLICY.version
    rules = {r["rule"]: r for r in body["rules"]}
    assert rules["overdue"]["thresholds"] == {"warning_days": 30, "critical_days": 90}
    assert rules["limit_breach"]["severity"] == "critical"


async def test_the_open_alert_gauge_counts_open_and_acknowledged_alerts(world: World) -> None:
    await world.consume(
        world.record(exposure_event("C-1", "95000.00", n=1), "credit.exposure"),
        world.record(exposure_event("C-2", "96000.00", n=2), "credit.exposure"),
        world.record(exposure_event("C-2", "10000.00", n=3), "credit.exposure"),
    )
    await refresh_open_alert_gauges(world.host.engine)
    labels = {"rule": "utilization_high", "severity": "warning"}
    assert REGISTRY.get_sample_value("creditwatch_alerts_open", labels) == 1
    assert (
        REGISTRY.get_sample_value(
            "creditwatch_alerts_open", {"rule": "limit_breach", "severity": "critical"}
        )
        == 0
    )


def test_the_service_consumes_the_contract_topics() -> None:
    service = AlertsService(Settings(), POLICY)
    assert set(service.input_topics()) == {
        "credit.exposure",
        "credit.assessments",
        "credit.limits",
        "ar.overdue",
        "ar.payments",
        "crm.credit-reports",
    }


def test_a_customer_state_survives_its_json_round_trip_unchanged() -> None:
    from tests.unit.test_alerts_rules import Customer

    c = Customer()
    c.paid("P-1", "100.00")
    c.reversed("P-1")
    c.assessed("A", next_review=date(2026, 9, 1), ratios={"current_ratio": "0.8"})
    c.assessed("BBB", ratios={"altman_z2": "0.5"})
    c.report(legal=[("lawsuit", "2026-01-02"), ("lien", None)], defaults=1)
    c.dunning("INV-1", 45)
    c.utilization("0.97")
    assert store.load_state(store.dump_state(c.state)) == c.state


# ---- the consumer's cache of committed states -----------------------------------------------


async def stored_state(world: World, cid: str) -> Any:
    async with world.core.engine.connect() as conn:
        row = (
            await conn.execute(
                select(store.customers.c.state).where(store.customers.c.customer_id == cid)
            )
        ).one()
    return store.load_state(row.state)


async def test_the_consumer_reuses_the_states_it_committed_without_reading_them_again(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    read: list[list[str]] = []
    repository = world.core.service.repository  # type: ignore[attr-defined]
    real = repository.read

    async def counting(conn: Any, rows: Any) -> Any:
        read.append(sorted(rows))
        return await real(conn, rows)

    monkeypatch.setattr(repository, "read", counting)
    await world.consume(world.record(exposure_event("C-1", "95000.00", n=1), "credit.exposure"))
    await world.consume(world.record(exposure_event("C-1", "96000.00", n=2), "credit.exposure"))
    assert read == []  # new, then known and unchanged since: no document read
    assert await world.core.verify() == []


async def test_a_state_written_by_an_api_command_is_read_again_not_taken_from_the_cache(
    world: World,
) -> None:
    await world.consume(world.record(exposure_event("C-1", "95000.00", n=1), "credit.exposure"))
    async with world.client() as http:
        alert_id = (await http.get("/v1/alerts")).json()["items"][0]["alert_id"]
    async with world.client(WRITE) as http:
        assert (await http.post(f"/v1/alerts/{alert_id}/acknowledge")).status_code == 200
    # Not material (one point): with a stale cache the acknowledgement would be lost here.
    await world.consume(world.record(exposure_event("C-1", "96000.00", n=2), "credit.exposure"))
    state = await stored_state(world, "C-1")
    alert = state.alert_by_id(alert_id)
    assert alert is not None and alert.status == "acknowledged"
    assert await world.core.verify() == []


async def test_a_state_written_by_another_consumer_is_read_again_not_taken_from_the_cache(
    world: World,
) -> None:
    """After a rebalance another replica may have folded the customer meanwhile."""
    other = EventCore(AlertsService(Settings(), POLICY), world.core.engine, clock=world.clock)
    await world.consume(world.record(exposure_event("C-1", "50000.00", n=1), "credit.exposure"))
    await other.process_records(
        [world.record(exposure_event("C-1", "95000.00", n=2), "credit.exposure")]
    )
    await world.consume(world.record(exposure_event("C-1", "97000.00", n=3), "credit.exposure"))
    assert (await stored_state(world, "C-1")).exposure.exposure == Decimal("97000.00")
    types = [e["type"] for e in await world.outbox()]
    assert types == ["alert.raised"]  # raised by the other replica, not raised again
    assert await world.core.verify() == []
