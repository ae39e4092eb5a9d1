"""Neither redelivery nor a crash raises a second alert for the same problem.

A few thousand events for a few hundred customers stream into the alerts service (a real
``creditwatch serve alerts`` process on PostgreSQL and Kafka); it is SIGKILLed at random
points mid-stream and restarted, and chunks of events it has already consumed are published
again. At the end ``credit.alerts`` must hold exactly what a clean single run produces — the
pure alerts domain folding each customer's events once, in order — and the database at most
one active alert per (customer, rule).

The stream is built so that one customer's rules never depend on the order in which the
service interleaves its input topics: exposure figures (limit_breach, utilization_high,
overdue), bureau reports (negative_credit_report), payments (payment_reversed) and
assessments (grade_downgrade, financial_deterioration) each drive rules of their own, and
every topic keeps one customer's events in order (they share the key). The reference fold is
therefore the same whatever the interleaving.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from harness import e2e as s
from harness.e2e import Publisher, Stack, Tap
from services.alerts import domain, store
from shared import eventstore as es
from shared.events import TOPIC_OF_TYPE, decode, parse
from shared.policy import load_policy

pytestmark = pytest.mark.e2e

POLICY = load_policy(None)
GRADES = [g.name for g in POLICY.grades]
RISK = {g.name: g.risk_level for g in POLICY.grades}
INPUTS = (
    "credit.exposure",
    "credit.assessments",
    "credit.limits",
    "ar.overdue",
    "ar.payments",
    "crm.credit-reports",
)
T0 = datetime(2026, 6, 1, 8, 0, tzinfo=UTC)
LIMIT = 100_000


def _money(value: float | int) -> str:
    return f"{value:.2f}"


def _exposure(cid: str, n: int, at: datetime, rng: random.Random) -> dict[str, Any]:
    util = rng.choice([0.5, 0.8, 0.87, 0.92, 0.97, 1.1, 1.3])
    days = rng.choice([0, 0, 0, 20, 45, 100])
    exposure = LIMIT * util
    overdue = exposure * 0.3 if days else 0.0
    buckets = dict.fromkeys(("1-30", "31-60", "61-90", "90+"), "0.00")
    if days:
        buckets[domain.overdue_bucket(days) or "1-30"] = _money(overdue)
    return s.cloudevent(
        "exposure.updated",
        cid,
        {
            "customer_id": cid,
            "currency": "EUR",
            "open_receivables": _money(exposure),
            "overdue_amount": _money(overdue),
            "overdue_buckets": buckets,
            "max_days_overdue": days,
            "reserved": "0.00",
            "exposure": _money(exposure),
            "limit": _money(LIMIT),
            "available": _money(LIMIT - exposure),
            "utilization": f"{util:.4f}",
            "on_hold": False,
            "as_of": s.iso(at),
        },
        id=f"exposure-{cid}-{n}",
        time=at,
        source="/e2e/limits",
    )


def _report(cid: str, n: int, at: datetime, rng: random.Random) -> dict[str, Any]:
    legal = rng.choice(
        [
            [],
            [],
            [("lawsuit", at.date() - timedelta(days=40))],
            [("bankruptcy", at.date() - timedelta(days=5))],
            [("lien", at.date() - timedelta(days=90))],
        ]
    )
    return s.credit_report(
        cid,
        f"R{n}",
        score=rng.randint(100, 800),
        legal=legal,
        defaults=rng.choice([0, 0, 0, 1]),
        at=at,
    )


def _assessment(
    cid: str, n: int, at: datetime, grade: str, previous: str | None, rng: random.Random
) -> dict[str, Any]:
    ratios = {
        "current_ratio": rng.choice(["0.8000", "1.6000", "2.1000"]),
        "altman_z2": rng.choice(["0.5000", "1.9000", "3.2000"]),
        "debt_to_equity": rng.choice(["0.6000", "-3.0000", "1.2000"]),
    }
    return s.cloudevent(
        "assessment.completed",
        cid,
        {
            "assessment_id": f"asm-{cid}-{n}",
            "customer_id": cid,
            "score": rng.randint(0, 100),
            "grade": grade,
            "risk_level": RISK[grade],
            "previous_grade": previous,
            "factors": [],
            "ratios": ratios,
            "override": None,
            "policy_version": POLICY.version,
            "trigger": {"event_id": f"e2e-{cid}-{n}", "type": "financial_statement.published"},
            "next_review_date": "2031-01-01",
            "assessed_at": s.iso(at),
        },
        id=f"asm-{cid}-{n}",
        time=at,
        source="/creditwatch/assessment",
    )


def stream(customers: int, seed: int) -> list[dict[str, Any]]:
    """Every customer's events (in its own order), customers interleaved at random."""
    rng = random.Random(seed)
    queues: list[list[dict[str, Any]]] = []
    for c in range(customers):
        cid = f"K{c:04d}"
        events: list[dict[str, Any]] = []
        at = T0 + timedelta(minutes=c)
        grade: str | None = None
        paid: list[str] = []
        for n in range(14):
            at += timedelta(hours=1)
            roll = rng.random()
            if roll < 0.45:
                events.append(_exposure(cid, n, at, rng))
            elif roll < 0.6:
                events.append(_report(cid, n, at, rng))
            elif roll < 0.75:
                nxt = (
                    GRADES[
                        min(
                            max(GRADES.index(grade) + rng.choice([-2, -1, 1, 2, 3]), 0),
                            len(GRADES) - 1,
                        )
                    ]
                    if grade
                    else rng.choice(GRADES[:4])
                )
                events.append(_assessment(cid, n, at, nxt, grade, rng))
                grade = nxt
            elif roll < 0.88 or not paid:
                pay = f"{cid}-P{n}"
                events.append(
                    s.payment(
                        cid, pay, _money(rng.choice([500, 1000, 3000])), received=at.date(), at=at
                    )
                )
                paid.append(pay)
            else:
                pay = paid.pop(rng.randrange(len(paid)))
                events.append(
                    s.cloudevent(
                        "payment.reversed",
                        cid,
                        {"payment_id": pay, "customer_id": cid, "reason": "chargeback"},
                        id=f"rev-{pay}",
                        time=at,
                        source="/e2e/bank",
                    )
                )
        queues.append(events)
    out: list[dict[str, Any]] = []
    while queues:
        q = rng.choice(queues)
        out.append(q.pop(0))
        if not q:
            queues.remove(q)
    return out


def reference(events: list[dict[str, Any]]) -> list[domain.AlertChange]:
    """A clean single run: the domain folds every customer's events once, in order; the
    alert changes it makes (each is one event on ``credit.alerts``)."""
    states: dict[str, domain.CustomerState] = {}
    changes: list[domain.AlertChange] = []
    for e in events:
        env = decode(json.dumps(e).encode())
        model = parse(env)
        assert model is not None
        st = states.get(env.subject) or domain.new_customer(env.subject)
        states[env.subject], done = domain.step(
            st, domain.Event(env.type, f"{env.source}|{env.id}", env.time, model), POLICY
        )
        changes += done
    return changes


def items(events: list[dict[str, Any]]) -> list[tuple[str, bytes, bytes]]:
    """(contract topic, key, value) of each event, as an upstream producer sends it."""
    return [
        (TOPIC_OF_TYPE[e["type"]], e["subject"].encode(), json.dumps(e).encode()) for e in events
    ]


async def test_sigkill_and_redelivery_never_raise_a_second_alert(
    tmp_path: Path, postgres_server_url: str, kafka_bootstrap: str
) -> None:
    started = time.monotonic()
    events = stream(customers=240, seed=20261128)
    assert len(events) > 3000
    changes = reference(events)
    expected_raised: dict[tuple[str, str], set[str]] = defaultdict(set)
    for ch in changes:
        if ch.kind == "raised":
            expected_raised[(ch.alert.customer_id, ch.alert.rule)].add(ch.alert.alert_id)
    # The stream does what it is for: many customers, every stream-driven rule, re-raises.
    assert len({k[0] for k in expected_raised}) > 200
    assert {k[1] for k in expected_raised} == set(domain.RULES) - {"review_overdue"}
    assert sum(len(v) > 1 for v in expected_raised.values()) > 50
    expected_ids = {f"{ch.alert.alert_id}-{ch.alert.version}" for ch in changes}

    stack = Stack(
        tmp_path,
        postgres_server_url,
        kafka_bootstrap,
        services=("alerts",),
        CREDITWATCH_CONSUMER_MAX_RECORDS="40",
    )
    proc = stack.procs["alerts"]
    pub = await Publisher(kafka_bootstrap, stack.prefix).start()
    core = store.core
    input_topics = [stack.topic(t) for t in INPUTS]
    try:
        await stack.start()
        rng = random.Random(stack.prefix)
        await pub.send_raw(items(events))
        total = len(events)
        thresholds = sorted(rng.sample(range(total // 10, total * 8 // 10), 4))
        kills = 0
        for k, threshold in enumerate(thresholds):
            while True:  # kill the moment the store passes a random point of the stream
                async with stack.engine.connect() as conn:
                    stored = await es.count_events(conn, core)
                if stored >= threshold:
                    break
                assert proc.proc is not None and proc.proc.poll() is None, proc.tail()
                await asyncio.sleep(0.01)
            assert stored < total, "the stream was consumed before the kill"
            proc.kill()
            kills += 1
            if k == 1:
                # Redelivery mid-stream: records it has already consumed come again.
                await pub.send_raw(items(events[: threshold // 2]))
            proc.start()
            await asyncio.to_thread(proc.wait_ready, 90)
        assert kills == 4
        ends = await s.end_offsets(kafka_bootstrap, input_topics)
        deadline = time.monotonic() + 120
        while not await s.caught_up(stack.engine, core, ends):
            assert time.monotonic() < deadline, proc.tail()
            await asyncio.sleep(0.25)
        # Redelivery at the end: a random chunk once more, then wait again.
        chunk = rng.sample(events, 600)
        await pub.send_raw(items(chunk))
        ends = await s.end_offsets(kafka_bootstrap, input_topics)
        while not await s.caught_up(stack.engine, core, ends):
            assert time.monotonic() < deadline, proc.tail()
            await asyncio.sleep(0.25)

        # The event store holds every event once.
        async with stack.engine.connect() as conn:
            assert await es.count_events(conn, core) == total
            rows = list(
                await conn.execute(
                    select(
                        store.alerts.c.customer_id,
                        store.alerts.c.rule,
                        store.alerts.c.alert_id,
                        store.alerts.c.status,
                        store.alerts.c.severity,
                        store.alerts.c.version,
                    )
                )
            )
            active = list(
                await conn.execute(
                    select(store.alerts.c.customer_id, store.alerts.c.rule, func.count())
                    .where(store.alerts.c.status.in_(store.ACTIVE))
                    .group_by(store.alerts.c.customer_id, store.alerts.c.rule)
                )
            )
    finally:
        await pub.stop()
        await stack.stop()

    # At most one active alert per (customer, rule).
    assert active and max(n for _, _, n in active) == 1
    # Every alert the database holds, exactly as the clean run left it.
    last = {ch.alert.alert_id: ch.alert for ch in changes}  # each alert as it stood last
    want = {
        a.alert_id: (a.customer_id, a.rule, a.status, a.severity, a.version) for a in last.values()
    }
    have = {r.alert_id: (r.customer_id, r.rule, r.status, r.severity, r.version) for r in rows}
    assert have == want

    # credit.alerts: the same alert.raised ids per (customer, rule) as the clean run, and
    # the same set of events; a re-publication after a crash repeats an event id with the
    # very same content.
    tap = await Tap(kafka_bootstrap, stack.prefix, topics=("credit.alerts",)).start()
    try:
        alert_ends = await s.end_offsets(kafka_bootstrap, [stack.topic("credit.alerts")])
        await tap.wait_for(
            "the whole of credit.alerts", lambda: len(tap.records) >= sum(alert_ends.values())
        )
    finally:
        await tap.stop()
    by_id: dict[str, set[str]] = defaultdict(set)
    for r in tap.records:
        by_id[r.event["id"]].add(json.dumps(r.event, sort_keys=True))
    assert all(len(v) == 1 for v in by_id.values())
    assert set(by_id) == expected_ids
    raised: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in tap.records:
        if r.type == "alert.raised":
            raised[(r.data["customer_id"], r.data["rule"])].add(r.data["alert_id"])
    assert raised == expected_raised
    republished = Counter(r.event["id"] for r in tap.records)
    print(
        f"{total} events, {len(changes)} alert changes, {len(expected_ids)} distinct "
        f"alert events, {sum(republished.values()) - len(republished)} re-published after "
        f"crashes, {kills} kills, {time.monotonic() - started:.0f}s"
    )


def test_the_reference_does_not_depend_on_how_topics_interleave() -> None:
    """The premise above: folding the topics one after another gives the same alerts as
    the interleaved order (so any interleaving the service sees must give them too)."""
    events = stream(customers=60, seed=7)
    by_topic = sorted(events, key=lambda e: INPUTS.index(_topic(e)))
    a = {ch.alert.alert_id: ch.alert for ch in reference(events)}
    b = {ch.alert.alert_id: ch.alert for ch in reference(by_topic)}
    assert a.keys() == b.keys()
    assert all(
        (a[k].status, a[k].severity, a[k].version) == (b[k].status, b[k].severity, b[k].version)
        for k in a
    )


def _topic(event: dict[str, Any]) -> str:
    return TOPIC_OF_TYPE[event["type"]]
