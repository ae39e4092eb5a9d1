"""Ingestion through real Kafka into real PostgreSQL: 20,000 events for 500 customers with
exact duplicates and malformed records of every kind; then the same stream while the
consuming process is SIGKILLed at random points. Either way the projection must equal a pure
fold of the valid unique events, and every malformed record must be in the dead-letter topic
with its reason."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter
from dataclasses import fields, replace
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from sqlalchemy import func, select

from harness import servers
from harness.processes import ServiceProcess, service_env
from harness.streams import Item, ledger
from services.limits import domain, store
from services.limits import events as ev
from shared import eventstore as es
from shared.db import make_engine
from shared.events import decode
from shared.policy import load_policy

pytestmark = pytest.mark.integration
TOPICS = (
    "crm.customers",
    "ar.invoices",
    "ar.payments",
    "ar.overdue",
    "credit.assessments",
    "credit.exposure",
    "credit.limits",
    "credit.dlq",
)


def topic_env(prefix: str) -> dict[str, str]:
    names = {
        "crm.customers": "CUSTOMERS",
        "ar.invoices": "INVOICES",
        "ar.payments": "PAYMENTS",
        "ar.overdue": "OVERDUE",
        "credit.assessments": "ASSESSMENTS",
        "credit.exposure": "EXPOSURE",
        "credit.limits": "LIMITS",
        "credit.dlq": "DLQ",
    }
    env = {f"CREDITWATCH_TOPIC_{v}": f"{prefix}.{k}" for k, v in names.items()}
    env["CREDITWATCH_CONSUMER_GROUP_PREFIX"] = prefix
    return env


async def produce(bootstrap: str, prefix: str, items: list[Item]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_request_size=4 * 1024 * 1024
    )
    await producer.start()
    try:
        futures = [
            await producer.send(f"{prefix}.{it.topic}", value=it.value, key=it.key) for it in items
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def pure_fold(items: list[Item]) -> tuple[dict[str, domain.CustomerState], Counter[str]]:
    """What the projection must be: the domain fold of the valid unique events."""
    policy = load_policy(None)
    folds: dict[str, domain.Refold] = {}
    seen: set[tuple[str, str]] = set()
    rejected: Counter[str] = Counter()
    from shared.events import parse

    for it in items:
        if it.kind not in ("valid", "duplicate", "no_fx_rate"):
            continue
        env = decode(it.value)
        model = parse(env)
        assert model is not None
        if (env.source, env.id) in seen:
            continue
        seen.add((env.source, env.id))
        fold = folds.get(env.subject) or domain.Refold(
            domain.new_customer(env.subject, policy), policy
        )
        folds[env.subject] = fold
        fold.evolve(domain.Event(env.type, model, env.time))
    for fold in folds.values():
        rejected.update(dl.reason for dl in fold.rejected)
    return {cid: fold.state for cid, fold in folds.items()}, rejected


async def fold_of_store(url: str) -> dict[str, domain.CustomerState]:
    """The pure fold of the events the store holds, in its order (seq)."""
    policy = load_policy(None)
    folds: dict[str, domain.Refold] = {}
    engine = make_engine(url)
    async with engine.connect() as conn:
        async for page in es.read_events(conn, store.core):
            for stored in page:
                env = stored.envelope
                model = ev.parse_any(env)
                if model is None:
                    continue
                fold = folds.get(env.subject) or domain.Refold(
                    domain.new_customer(env.subject, policy), policy
                )
                folds[env.subject] = fold
                fold.evolve(domain.Event(env.type, model, env.time))
    await engine.dispose()
    return {cid: fold.state for cid, fold in folds.items()}


async def stored_states(url: str) -> dict[str, domain.CustomerState]:
    engine = make_engine(url)
    async with engine.connect() as conn:
        states = await store.read_states(
            conn, (await conn.execute(select(store.customers.c.customer_id))).scalars()
        )
    await engine.dispose()
    return states


def differences(
    actual: dict[str, domain.CustomerState],
    expected: dict[str, domain.CustomerState],
    ids: list[str],
) -> str:
    """Which fields differ, for a failure message that shows what went wrong."""
    lines = []
    for cid in ids:
        got, want = comparable(actual[cid]), comparable(expected[cid])
        for name in (f.name for f in fields(got)):
            if getattr(got, name) != getattr(want, name):
                lines.append(
                    f"{cid}.{name}: stored {getattr(got, name)!r}, fold {getattr(want, name)!r}"
                )
    return "\n".join(lines)


def comparable(st: domain.CustomerState) -> domain.CustomerState:
    # The scheduler ages ledgers to today; that moves only the ageing date, not the facts.
    return replace(st, as_of=None, last_time=None, step=None)


async def end_offsets(bootstrap: str, prefix: str) -> dict[tuple[str, int], int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        tps = [
            TopicPartition(f"{prefix}.{t}", p)
            for t in ("crm.customers", "ar.invoices", "ar.payments", "ar.overdue")
            for p in (
                consumer.partitions_for_topic(f"{prefix}.{t}")
                or await _partitions(consumer, f"{prefix}.{t}")
            )
        ]
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    return {(tp.topic, tp.partition): off for tp, off in ends.items() if off}


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    await consumer._client.force_metadata_update()
    return consumer.partitions_for_topic(topic) or set()


async def caught_up(url: str, ends: dict[tuple[str, int], int]) -> bool:
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            stored = await es.load_offsets(conn, store.core, ends.keys())
            pending = await es.count_outbox(conn, store.core)
    finally:
        await engine.dispose()
    return stored == ends and pending == 0


async def wait_caught_up(url: str, ends: dict, proc: ServiceProcess, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not await caught_up(url, ends):
        assert time.monotonic() < deadline, f"not caught up in {seconds}s:\n{proc.tail()}"
        await asyncio.sleep(0.25)


async def dead_letters(bootstrap: str, prefix: str) -> dict[str, dict]:
    """The dead-letter topic, read from the start, by event id (the relay is at-least-once)."""
    consumer = AIOKafkaConsumer(
        f"{prefix}.credit.dlq",
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        group_id=f"{prefix}-reader",
    )
    await consumer.start()
    out: dict[str, dict] = {}
    try:
        idle = 0
        while idle < 3:
            batch = await consumer.getmany(timeout_ms=1000)
            if not batch:
                idle += 1
            for msgs in batch.values():
                for m in msgs:
                    event = json.loads(m.value)
                    out[event["id"]] = event
    finally:
        await consumer.stop()
    return out


async def create(bootstrap: str, prefix: str) -> None:
    await servers.create_topics_async(bootstrap, [f"{prefix}.{t}" for t in TOPICS], 4)


def expected_dead(stream: list[Item], rejected: Counter[str]) -> Counter[str]:
    reasons = Counter(
        it.kind for it in stream if it.kind not in ("valid", "duplicate", "no_fx_rate")
    )
    return reasons + rejected


async def run_stream(
    tmp_path: Path, postgres_server_url: str, kafka_bootstrap: str, *, crash_points: int
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    url = servers.create_database(postgres_server_url)
    registrations, stream = ledger(customers=500, total=20_000, seed=len(prefix))
    await create(kafka_bootstrap, prefix)
    env = service_env(
        database_url=url,
        bootstrap=kafka_bootstrap,
        **topic_env(prefix),
        CREDITWATCH_CONSUMER_MAX_RECORDS="200" if crash_points else "500",
    )
    proc = ServiceProcess("limits", env, tmp_path)
    try:
        proc.start().wait_ready(90)
        await produce(kafka_bootstrap, prefix, registrations)
        await wait_caught_up(url, await end_offsets(kafka_bootstrap, prefix), proc, 120)
        await produce(kafka_bootstrap, prefix, stream)
        ends = await end_offsets(kafka_bootstrap, prefix)
        rng = random.Random(prefix)
        engine = make_engine(url)
        total = 500 + sum(1 for it in stream if it.kind == "valid")
        thresholds = sorted(rng.randint(total // 10, total * 9 // 10) for _ in range(crash_points))
        kills = 0
        for threshold in thresholds:
            # Kill the consumer the moment the store passes a random point of the stream.
            while True:
                async with engine.connect() as conn:
                    stored = await es.count_events(conn, store.core)
                if stored >= threshold or await caught_up(url, ends):
                    break
                await asyncio.sleep(0.02)
            proc.kill()
            kills += 1
            proc.start().wait_ready(90)
        await engine.dispose()
        await wait_caught_up(url, ends, proc, 300)
        assert kills == crash_points
    finally:
        proc.stop()

    # Then: the projection is the pure fold of the valid unique events, in the order the
    # store holds them (cash is applied as it arrives: which invoices a payment without
    # allocations pays depends on what had arrived; the store fixes that order)…
    in_stream_order, rejected = pure_fold(registrations + stream)
    expected = await fold_of_store(url)
    actual = await stored_states(url)
    assert set(actual) == set(expected) == set(in_stream_order)
    mismatched = [c for c in expected if comparable(actual[c]) != comparable(expected[c])]
    assert mismatched == [], differences(actual, expected, mismatched[:3])
    # …and what is owed does not depend on that order at all.
    assert {c: domain.open_receivables(s) for c, s in actual.items()} == {
        c: domain.open_receivables(s) for c, s in in_stream_order.items()
    }
    policy = load_policy(None)
    at = max(st.last_time for st in expected.values() if st.last_time)
    for cid in list(expected)[:50]:
        # Figures as of one business time, whatever date the scheduler has aged to.
        assert domain.figures(comparable(actual[cid]), policy, at) == domain.figures(
            comparable(expected[cid]), policy, at
        )
    # …applied once: the store holds each valid unique event exactly once…
    engine = make_engine(url)
    async with engine.connect() as conn:
        count = (
            await conn.execute(
                select(func.count())
                .select_from(store.core.events)
                .where(store.core.events.c.topic.is_not(None))
            )
        ).scalar_one()
    await engine.dispose()
    unique_valid = len(
        {
            (decode(it.value).source, decode(it.value).id)
            for it in registrations + stream
            if it.kind in ("valid", "duplicate")
        }
    )
    assert count == unique_valid
    # …and every malformed record is in the dead-letter topic with its reason.
    dlq = await dead_letters(kafka_bootstrap, prefix)
    assert Counter(e["data"]["reason"] for e in dlq.values()) == expected_dead(stream, rejected)
    assert all(
        e["data"]["service"] == "limits" and e["type"] == "event.dead_lettered"
        for e in dlq.values()
    )


async def test_twenty_thousand_events_equal_a_pure_fold_and_bad_ones_are_dead_lettered(
    tmp_path, postgres_server_url, kafka_bootstrap
):
    await run_stream(tmp_path, postgres_server_url, kafka_bootstrap, crash_points=0)


async def test_sigkill_at_five_random_points_converges_to_the_same_fold(
    tmp_path, postgres_server_url, kafka_bootstrap
):
    await run_stream(tmp_path, postgres_server_url, kafka_bootstrap, crash_points=5)
