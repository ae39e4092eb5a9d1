"""The alerts projections equal a replay of the alerts event store, on the real PostgreSQL.

A replay folds the stored events in store order (``seq``). The live service must fold each
customer's events in that order too, whatever runs beside the consumer: the scheduler
records an overdue review in a transaction of its own. Every path locks its customers
before its events are numbered. And what a replay reads back from the store (times in UTC)
must be what the live fold saw.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.alerts import store
from services.alerts.handlers import AlertsService
from shared.events import new_event
from shared.policy import Policy, load_policy
from shared.runtime import EventCore, Incoming, Record, Tx
from shared.settings import Settings
from shared.transient import is_transient
from tests.databases import fresh_engine

pytestmark = pytest.mark.integration

POLICY = load_policy()
NOW = datetime(2026, 6, 1, 8, 0, tzinfo=UTC)
CID = "SIM-0021"


class HeldBatch(AlertsService):
    """The alerts service whose next consumed batch, once ``hold`` is set, stops after its
    events are stored (and numbered) and before its customers are locked, until released:
    the moment another transaction can slip in."""

    def __init__(self, settings: Settings, policy: Policy) -> None:
        super().__init__(settings, policy)
        self.hold = False
        self.held = asyncio.Event()
        self.release = asyncio.Event()

    async def handle(self, tx: Tx, events: Sequence[Incoming]) -> None:
        consumed = events[0].topic is not None  # the scheduler's events come from no topic
        if self.hold and consumed and not tx.replaying:
            self.hold = False
            self.held.set()
            await self.release.wait()
        await super().handle(tx, events)


@pytest.fixture
async def engine(tmp_path: Path, postgres_server_url: str) -> AsyncIterator[AsyncEngine]:
    eng = await fresh_engine(
        "postgresql", "alerts", tmp_path=tmp_path, pg_server_url=postgres_server_url
    )
    yield eng
    await eng.dispose()


def assessment(
    n: int,
    *,
    grade: str,
    previous: str | None,
    assessed_at: datetime,
    next_review: date,
    score: int = 70,
) -> Record:
    """An ``assessment.completed`` record as the assessment service publishes it."""
    risk = next(g.risk_level for g in POLICY.grades if g.name == grade)
    env = new_event(
        "assessment.completed",
        source="/creditwatch/assessment",
        subject=CID,
        data={
            "assessment_id": f"asm-{CID}-{n}",
            "customer_id": CID,
            "score": score,
            "grade": grade,
            "risk_level": risk,
            "previous_grade": previous,
            "policy_version": POLICY.version,
            "next_review_date": next_review,
            "assessed_at": assessed_at,
        },
        id=f"asm-{CID}-{n}",
        time=assessed_at,
    )
    return Record("credit.assessments", 0, n, CID.encode(), env.to_json())


async def consume(core: EventCore, records: list[Record]) -> None:
    """What the consumer loop does with a batch: apply it, and after a transient failure (an
    unreachable database, a serialization failure) apply the same batch again."""
    prepared = core.prepare(records)
    for _ in range(3):
        try:
            await core.apply(prepared)
            return
        except Exception as exc:
            if not is_transient(exc):
                raise
    raise AssertionError("the batch kept failing")


async def stored_types(engine: AsyncEngine) -> list[str]:
    ev = store.core.events
    async with engine.connect() as conn:
        rows = await conn.execute(select(ev.c.type).where(ev.c.subject == CID).order_by(ev.c.seq))
        return [r.type for r in rows]


async def test_given_a_batch_holding_its_customers_when_the_scheduler_comes_then_it_waits_and_a_replay_reproduces_the_projections(
    engine: AsyncEngine,
) -> None:
    """A batch numbers its events only once it holds its customers (EventCore.lock_subjects):
    a scheduler transaction on the same customer waits, and folds after it, as a replay does.
    (Before, the batch numbered first and locked later, and the scheduler could fold its
    later-numbered overdue review first: verify then found the projections off.)"""
    service = HeldBatch(Settings(), POLICY)
    core = EventCore(service, engine, clock=lambda: NOW)
    # Given a customer whose periodic review (15 January) has passed
    await consume(
        core,
        [
            assessment(
                0,
                grade="A",
                previous=None,
                assessed_at=datetime(2025, 1, 15, 9, 0, tzinfo=UTC),
                next_review=date(2026, 1, 15),
            )
        ],
    )
    # and a consumed batch with the review done (a new assessment) stored, not yet folded,
    service.hold = True
    batch = asyncio.create_task(
        consume(
            core,
            [
                assessment(
                    1,
                    grade="A",
                    previous="A",
                    assessed_at=datetime(2026, 5, 20, 9, 0, tzinfo=UTC),
                    next_review=date(2027, 5, 20),
                )
            ],
        )
    )
    await asyncio.wait_for(service.held.wait(), 30)

    # When the scheduler looks for overdue reviews meanwhile
    scheduler = asyncio.create_task(core.run_due())
    await asyncio.sleep(1.0)
    # Then it waits for the batch (it holds the customer)
    assert not scheduler.done()
    service.release.set()
    await asyncio.wait_for(batch, 30)
    # and, once the batch has folded the new review date, finds nothing overdue
    assert await asyncio.wait_for(scheduler, 30) == 0
    # And the projections are what a replay of the store makes of them
    assert await core.verify() == []
    assert await stored_types(engine) == ["assessment.completed", "assessment.completed"]


async def test_given_an_event_time_with_a_utc_offset_when_it_is_consumed_then_a_replay_reproduces_the_projections(
    engine: AsyncEngine,
) -> None:
    core = EventCore(AlertsService(Settings(), POLICY), engine, clock=lambda: NOW)
    plus_two = timezone(timedelta(hours=2))
    # Given a downgrade whose CloudEvent time says +02:00 (the store gives it back in UTC)
    record = assessment(
        0,
        grade="BB",
        previous="A",
        assessed_at=datetime(2026, 5, 20, 1, 30, tzinfo=plus_two),
        next_review=date(2027, 5, 20),
        score=50,
    )
    # (as a producer may write it; the envelope itself is kept in UTC)
    record.value = (record.value or b"").replace(
        b'"time":"2026-05-19T23:30:00Z"', b'"time":"2026-05-20T01:30:00+02:00"'
    )
    assert b'"time":"2026-05-20T01:30:00+02:00"' in record.value
    # When it is consumed
    await consume(core, [record])
    # Then the alert it raised is the replay's, to the letter
    assert await core.verify() == []
    async with engine.connect() as conn:
        raised = (await conn.execute(select(store.alerts.c.rule, store.alerts.c.body))).all()
    assert [r.rule for r in raised] == ["grade_downgrade"]
    assert '"raised_at":"2026-05-19T23:30:00Z"' in raised[0].body
