"""The event core against a real database: the same suite on SQLite and on PostgreSQL.

The limits service is the projection under test (a real fold, not a toy), so these tests
also pin down that a batch is one transaction: events, projection, outbox and offsets.
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from harness import factories as f
from services.limits import store
from services.limits.events import HoldPlaced
from services.limits.handlers import LimitsService
from shared import eventstore as es
from shared.events import new_event
from shared.policy import load_policy
from shared.runtime import EventCore
from shared.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def core(engine: AsyncEngine) -> EventCore:
    settings = Settings()
    return EventCore(
        LimitsService(settings, load_policy(None)), engine, topic_of_type=settings.topic_of_type()
    )


async def exposure_of(engine: AsyncEngine, cid: str) -> str:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                select(store.customers.c.open_receivables).where(
                    store.customers.c.customer_id == cid
                )
            )
        ).one()
    return format(row.open_receivables, "f")


async def outbox(engine: AsyncEngine) -> list[dict]:
    async with engine.connect() as conn:
        rows = await es.pending_outbox(conn, store.core, 10_000)
    return [{"topic": r.topic, **json.loads(r.value)} for r in rows]


async def offsets(engine: AsyncEngine) -> dict:
    wanted = [(t, p) for t in ("crm.customers", "ar.invoices", "ar.payments") for p in (0, 1)]
    async with engine.connect() as conn:
        return await es.load_offsets(conn, store.core, wanted)


async def test_a_batch_applies_new_events_and_stores_the_next_offset(core, engine):
    batch = f.records(
        [f.customer("C1"), f.invoice("C1", "I1", "100.00"), f.invoice("C1", "I2", "50.25")]
    )
    result = await core.process_records(batch)
    assert result.applied == 3
    assert await exposure_of(engine, "C1") == "150.25"
    assert await offsets(engine) == {("crm.customers", 0): 1, ("ar.invoices", 0): 2}


async def test_a_redelivered_batch_changes_nothing(core, engine):
    batch = f.records([f.customer("C1"), f.invoice("C1", "I1", "100.00")])
    await core.process_records(batch)
    before = await outbox(engine)
    again = await core.process_records(batch)
    assert again.applied == 0 and again.duplicates == 2
    assert await exposure_of(engine, "C1") == "100.00"
    assert await outbox(engine) == before


async def test_an_exact_duplicate_inside_one_batch_is_applied_once(core, engine):
    inv = f.invoice("C1", "I1", "100.00")
    result = await core.process_records(f.records([f.customer("C1"), inv, inv]))
    assert (result.applied, result.duplicates) == (2, 1)
    assert await exposure_of(engine, "C1") == "100.00"


async def test_malformed_records_are_dead_lettered_with_their_reason_and_passed(core, engine):
    bad_amount = f.invoice("C1", "I9", "-5.00")
    batch = f.records(
        [f.customer("C1"), b"{not json", b"\xff\xfe", bad_amount, f.invoice("C1", "I1", "10.00")]
    )
    result = await core.process_records(batch)
    assert result.applied == 2 and result.dead_lettered == 3
    dlq = [e for e in await outbox(engine) if e["topic"] == "credit.dlq"]
    assert sorted(e["data"]["reason"] for e in dlq) == [
        "invalid_amount",
        "invalid_json",
        "not_utf8",
    ]
    assert all(e["type"] == "event.dead_lettered" and e["data"]["service"] == "limits" for e in dlq)
    assert await offsets(engine) == {("crm.customers", 0): 1, ("ar.invoices", 0): 4}
    assert await exposure_of(engine, "C1") == "10.00"


async def test_an_amount_without_an_fx_rate_is_dead_lettered_by_the_service(core, engine):
    await core.process_records(f.records([f.customer("C1")]))
    odd = f.invoice("C1", "I1", "100.00", currency="BRL")
    result = await core.process_records(f.records([odd]))
    assert result.dead_lettered == 1
    dlq = [e for e in await outbox(engine) if e["topic"] == "credit.dlq"]
    assert dlq[0]["data"]["reason"] == "no_fx_rate"
    async with engine.connect() as conn:
        assert await es.count_events(conn, store.core) == 1  # the rejected one is not kept


async def test_offsets_never_move_backwards(core, engine):
    await core.process_records(f.records([f.customer("C1")], start=10))
    await core.process_records(f.records([f.customer("C2")], start=3))
    assert await offsets(engine) == {("crm.customers", 0): 11}


async def test_a_failing_handler_leaves_nothing_behind_and_only_the_poison_is_dead_lettered(
    core, engine, monkeypatch
):
    original = LimitsService.handle

    async def flaky(self, tx, events):
        if any(e.envelope.id == "inv-BOOM" for e in events):
            raise RuntimeError("bug triggered by one event")
        await original(self, tx, events)

    monkeypatch.setattr(LimitsService, "handle", flaky)
    batch = f.records(
        [f.customer("C1"), f.invoice("C1", "BOOM", "1.00"), f.invoice("C1", "I2", "2.00")]
    )
    result = await core.process_records(batch)
    assert result.applied == 2 and result.dead_lettered == 1
    assert await exposure_of(engine, "C1") == "2.00"
    dlq = [e for e in await outbox(engine) if e["topic"] == "credit.dlq"]
    assert [e["data"]["reason"] for e in dlq] == ["processing_error"]
    assert await offsets(engine) == {("crm.customers", 0): 1, ("ar.invoices", 0): 2}


async def test_replay_rebuilds_the_projections_and_verify_finds_no_difference(core, engine):
    await core.process_records(
        f.records(
            [
                f.customer("C1"),
                f.invoice("C1", "I1", "100.00"),
                f.payment("C1", "P1", "30.00"),
                f.customer("C2"),
                f.invoice("C2", "I2", "7.00"),
            ]
        )
    )
    assert await core.verify() == []
    assert await core.replay() == 5
    assert await exposure_of(engine, "C1") == "70.00"
    assert await exposure_of(engine, "C2") == "7.00"
    assert await core.verify() == []


async def test_verify_reports_a_projection_that_drifted_from_the_events(core, engine):
    await core.process_records(f.records([f.customer("C1"), f.invoice("C1", "I1", "100.00")]))
    async with engine.begin() as conn:
        await conn.execute(update(store.customers).values(max_days_overdue=99))
    diffs = await core.verify()
    assert diffs and all("limits_customers" in d for d in diffs)
    async with engine.connect() as conn:  # verify rolled its replay back
        n = (
            await conn.execute(
                select(func.count())
                .select_from(store.customers)
                .where(store.customers.c.max_days_overdue == 99)
            )
        ).scalar_one()
    assert n == 1


async def test_two_partitions_in_one_batch_store_both_offsets(core, engine):
    batch = [
        *f.records([f.invoice("C1", "I0", "1.00")], partition=0),
        *f.records([f.invoice("C2", "I1", "5.00"), f.invoice("C2", "I2", "5.00")], partition=1),
    ]
    await core.process_records(batch)
    assert await offsets(engine) == {("ar.invoices", 0): 1, ("ar.invoices", 1): 2}


async def test_an_unknown_type_is_skipped_and_its_offset_stored(core, engine):
    odd = f.cloudevent("invoice.printed", "C1", {"x": 1}, id="odd-1")
    result = await core.process_records(f.records([odd]))
    assert result.skipped == 1 and result.dead_lettered == 0
    assert await offsets(engine) == {("ar.invoices", 0): 1}


async def test_a_known_type_on_another_topic_is_dead_lettered_as_wrong_topic(core, engine):
    result = await core.process_records(
        f.records([f.invoice("C1", "I1", "9.00")], topic="crm.customers")
    )
    assert result.dead_lettered == 1
    dlq = [e for e in await outbox(engine) if e["topic"] == "credit.dlq"]
    assert dlq[0]["data"]["reason"] == "wrong_topic"


async def test_a_batch_rolled_back_after_its_fold_leaves_no_trace_in_later_batches(
    core, engine, monkeypatch
):
    # Given a customer whose state the consumer has committed once
    await core.process_records(f.records([f.customer("C1"), f.invoice("C1", "I1", "100.00")]))
    # When a batch folds an invoice and then fails before its commit, so that the invoice is
    # dead-lettered (a lone record that fails is poison)…
    failures = iter([RuntimeError("offsets table unavailable")])
    original = es.store_offsets

    async def flaky(*args, **kwargs):
        error = next(failures, None)
        if error is not None:
            raise error
        return await original(*args, **kwargs)

    monkeypatch.setattr(es, "store_offsets", flaky)
    result = await core.process_records(f.records([f.invoice("C1", "I3", "5.00")], start=1))
    assert result.dead_lettered == 1
    # …and another writer (an API command) commits the customer's row, taking the event number
    # the rolled-back batch had used (SQLite hands out a rolled-back rowid again)…
    hold = new_event(
        "hold.placed",
        source="/creditwatch/limits/api",
        subject="C1",
        data=HoldPlaced(customer_id="C1", reason="dispute", by="analyst"),
        id="hold-1",
        time=f.T0,
    )
    async with core.transaction() as uow:
        await core.record(uow, [hold])
    # …then the consumer's next batch must not build on the rolled-back fold
    await core.process_records(f.records([f.payment("C1", "P1", "11.00")]))
    assert await exposure_of(engine, "C1") == "89.00"
    assert await core.verify() == []


async def test_an_event_is_stored_as_received_and_replays_with_exact_amounts(core, engine):
    # Given an invoice whose amount is a JSON number with more digits than a float keeps
    sent = f.raw(f.invoice("C1", "I1", "999999999999999.99")).replace(
        b'"amount": "999999999999999.99"', b'"amount": 999999999999999.99'
    )
    assert b'"amount": 999999999999999.99' in sent
    await core.process_records(f.records([f.customer("C1"), sent]))
    # Then the store holds the record byte for byte, and a replay reads the amount exactly
    async with engine.connect() as conn:
        stored = (
            await conn.execute(
                select(store.core.events.c.event).where(store.core.events.c.event_id == "inv-I1")
            )
        ).scalar_one()
    assert stored.encode() == sent
    assert await core.replay() == 2
    assert await exposure_of(engine, "C1") == "999999999999999.99"
    assert await core.verify() == []
