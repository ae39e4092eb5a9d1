"""A customer's history must not slow it down (issue 20).

The assessment keeps what is open and rolling aggregates instead of every invoice, payment,
credit note and dunning notice ever received: its state document and the cost of its next
event do not grow with its history. And it assesses as before: folded both ways — the new
domain and the domain of the previous layout (tests/unit/assessment_reference_v1.py) — the
same streams give the same scores, grades, ratios and payment behaviour, except where the
one allocation rule of the shared ledger replaces the assessment's own (credit notes first,
the oldest invoices paid from scratch at every assessment), and there only in the payment
behaviour and what it scores.
"""

from __future__ import annotations

import gc
import json
import random
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from pydantic import BaseModel

from harness import streams
from services.assessment import domain, store
from services.assessment.domain import PAYMENT_BEHAVIOUR
from shared.events import (
    AssessmentCompleted,
    CreditReportReceived,
    CustomerRegistered,
    DeadLetter,
    Envelope,
    InvoiceIssued,
    PaymentReceived,
    decode,
    parse,
)
from shared.policy import load_policy
from shared.projection import StateCodec
from tests.unit import assessment_reference_v1 as v1
from tools import simulate

POLICY = load_policy()
CID = "C-1"
END = date(2026, 1, 1)

Fact = tuple[str, Any, datetime]


def at(day: date, hour: int = 9) -> datetime:
    return datetime(day.year, day.month, day.day, hour, tzinfo=UTC)


def invoice(invoice_id: str, issued: date, terms: int = 30, amount: str = "100.00") -> Fact:
    data = InvoiceIssued.model_validate(
        {
            "invoice_id": invoice_id,
            "customer_id": CID,
            "amount": amount,
            "currency": "EUR",
            "issue_date": issued.isoformat(),
            "due_date": (issued + timedelta(days=terms)).isoformat(),
        }
    )
    return data.TYPE, data, at(issued)


def payment(
    payment_id: str, received: date, amount: str = "100.00", allocate_to: str | None = None
) -> Fact:
    body: dict[str, Any] = {
        "payment_id": payment_id,
        "customer_id": CID,
        "amount": amount,
        "currency": "EUR",
        "received_date": received.isoformat(),
    }
    if allocate_to is not None:
        body["allocations"] = [{"invoice_id": allocate_to, "amount": amount}]
    data = PaymentReceived.model_validate(body)
    return data.TYPE, data, at(received, 15)


def registration(day: date) -> Fact:
    data = CustomerRegistered(customer_id=CID, name="Acme", currency="EUR", industry="J")
    return data.TYPE, data, at(day, 8)


def bureau_report(day: date) -> Fact:
    data = CreditReportReceived.model_validate(
        {
            "report_id": f"R-{day}",
            "customer_id": CID,
            "bureau": "b",
            "score": "700",
            "score_min": "300",
            "score_max": "850",
            "reported_at": at(day, 12).isoformat(),
        }
    )
    return data.TYPE, data, at(day, 12)


def settled(count: int, last_issued: date, first: int = 0) -> list[Fact]:
    """``count`` invoices, one a day up to ``last_issued``, each paid (allocated) 25 to 35
    days after its issue: settled ones, a settlement day each."""
    out: list[Fact] = []
    start = last_issued - timedelta(days=count - 1)
    for k in range(first, count):
        issued = start + timedelta(days=k)
        out.append(invoice(f"I-{k}", issued))
        out.append(payment(f"P-{k}", issued + timedelta(days=25 + k % 11), allocate_to=f"I-{k}"))
    return out


def fold(*facts: Iterator[Fact] | list[Fact]) -> domain.Refold:
    """The customer after these facts (in time order): registered and assessed first, the
    rest folded as the service folds them."""
    events = sorted((f for part in facts for f in part), key=lambda f: f[2])
    folding = domain.Refold(domain.new_customer(CID, POLICY), POLICY)
    for n, (event_type, data, time_) in enumerate(events):
        event = domain.Event(event_type, data, time_)
        if event_type == "customer.registered":
            folding.step(event, domain.Trigger(f"e-{n}", event_type, "/test"))
        else:
            folding.evolve(event)
    return folding


def size(state: domain.CustomerState) -> int:
    return len(store.dump_state(state).encode())


# ---- (i) the state and the cost of an event do not grow with the history -----------------------


def test_given_5000_settled_invoices_when_the_state_is_dumped_then_it_is_about_as_small_as_with_none() -> (
    None
):
    # Given customers registered years ago, with a bureau report today
    since = END - timedelta(days=6000)
    base = [registration(since), bureau_report(END)]
    none = fold(base)
    # …one with 5,000 invoices paid, all more than a payment-behaviour window ago
    long_ago = fold(base, settled(5000, END - timedelta(days=500)))
    # …one with 5,000 paid up to today (a settlement every day of the window), and one with
    # only the last 400 of those
    recent = fold(base, settled(5000, END - timedelta(days=40)))
    last_year = fold(base, settled(5000, END - timedelta(days=40), first=4600))

    # Then the history beyond the window leaves nothing in the state; within it, a day of
    # aggregates per settlement day at most, whatever the history before
    sizes = {
        "none": size(none.state),
        "5000 settled, over a window ago": size(long_ago.state),
        "5000 settled, up to today": size(recent.state),
        "400 settled, up to today": size(last_year.state),
    }
    old = v1.new_customer(CID, POLICY)
    for event_type, data, time_ in sorted(
        [*base, *settled(5000, END - timedelta(days=40))], key=lambda f: f[2]
    ):
        old = v1.apply(old, event_type, data, time_, POLICY)
    sizes["5000 settled, up to today, previous layout"] = len(
        StateCodec(v1.CustomerState).dump(old).encode()
    )
    print(f"\nstate document bytes: {json.dumps(sizes, indent=1)}")
    print(f"settlement days held: {len(recent.state.paid.days)}")
    assert abs(sizes["5000 settled, over a window ago"] - sizes["none"]) <= 16
    assert long_ago.state.ledger.invoices == {} and long_ago.state.paid == domain.Settled()
    assert sizes["5000 settled, up to today"] == sizes["400 settled, up to today"]
    assert len(recent.state.paid.days) <= 366
    # …against the whole history in the document before
    assert (
        sizes["5000 settled, up to today"] * 20
        < sizes["5000 settled, up to today, previous layout"]
    )
    # What left the state is in the archive (a table in the service), read only when named
    assert len(recent.memory.items) == 10_000


def more_events(first: date, count: int = 200) -> list[Fact]:
    """``count`` events after the history: invoices and their payments (every third one
    unallocated, oldest first), in time order."""
    out: list[Fact] = []
    for k in range(count // 2):
        issued = first + timedelta(days=k)
        out.append(invoice(f"N-{k}", issued, terms=14))
        target = None if k % 3 == 0 else f"N-{k}"
        out.append(payment(f"Q-{k}", issued + timedelta(days=1 + k % 20), allocate_to=target))
    return sorted(out, key=lambda f: f[2])


def timed(base: domain.Refold, events: list[Fact]) -> float:
    """Seconds to fold ``events`` (and decide each one's assessment) from ``base``."""
    folding = domain.Refold(base.state, POLICY)
    folding.memory.items = dict(base.memory.items)
    triggers = [domain.Trigger(f"t-{n}", e[0], "/test") for n, e in enumerate(events)]
    steps = [domain.Event(e[0], e[1], e[2]) for e in events]
    gc.collect()
    gc.disable()  # as the service runs with its long-lived objects frozen (shared.runtime)
    try:
        started = time.perf_counter()
        for event, trigger in zip(steps, triggers, strict=True):
            folding.step(event, trigger)
        return time.perf_counter() - started
    finally:
        gc.enable()


def test_given_5000_settled_invoices_when_200_more_events_are_folded_then_they_cost_what_they_cost_with_10() -> (
    None
):
    # Given a customer with 10 settled invoices and one with 5,000 (a settlement on every day
    # of the window: the most the aggregates hold)
    base = [registration(END - timedelta(days=6000))]
    small = fold(base, settled(10, END - timedelta(days=40)))
    large = fold(base, settled(5000, END - timedelta(days=40)))
    assert small.state.last is not None and large.state.last is not None
    events = more_events(END)
    # When 200 more events are folded (and assessed), several times each, alternately
    small_runs: list[float] = []
    large_runs: list[float] = []
    for _ in range(7):
        small_runs.append(timed(small, events))
        large_runs.append(timed(large, events))
    # Then the median costs are about the same
    ratio = statistics.median(large_runs) / statistics.median(small_runs)
    print(
        f"\n200 folds: {statistics.median(small_runs) * 1000:.1f} ms at 10 settled invoices, "
        f"{statistics.median(large_runs) * 1000:.1f} ms at 5,000 (ratio {ratio:.2f})"
    )
    assert ratio < 1.5


# ---- (ii) folded both ways --------------------------------------------------------------------


@dataclass
class Folded:
    """What one event did, folded by the previous layout's domain and by the new one."""

    event: Envelope
    old_body: AssessmentCompleted | None
    new_body: AssessmentCompleted | None
    old_rejected: str | None
    new_rejected: str | None
    old_inputs: dict[str, Decimal] = field(default_factory=dict)
    new_inputs: dict[str, Decimal] = field(default_factory=dict)


def fold_both_ways(events: list[tuple[Envelope, BaseModel]]) -> list[Folded]:
    """One customer's events (in order) through both domains, and their score inputs at
    the latest business time after each."""
    cid = events[0][0].subject
    old = v1.new_customer(cid, POLICY)
    new = domain.Refold(domain.new_customer(cid, POLICY), POLICY)
    out: list[Folded] = []
    for env, model in events:
        old_body = new_body = None
        old_rejected = new_rejected = None
        try:
            step = v1.process(
                old, env.type, model, v1.Trigger(env.id, env.type, env.source), env.time, POLICY
            )
            old, old_body = step.state, step.assessment
        except DeadLetter as dl:
            old_rejected = dl.reason
        skipped = len(new.rejected)
        new_body = new.step(
            domain.Event(env.type, model, env.time), domain.Trigger(env.id, env.type, env.source)
        )
        if len(new.rejected) > skipped:
            new_rejected = new.rejected[-1].reason
        folded = Folded(env, old_body, new_body, old_rejected, new_rejected)
        if old.last_time is not None and new.state.last_time is not None:
            folded.old_inputs = v1.score_inputs(old, POLICY, old.last_time)
            folded.new_inputs = domain.score_inputs(new.state, POLICY, new.state.last_time)
        out.append(folded)
    return out


def by_customer(cloud_events: list[dict[str, Any]]) -> dict[str, list[tuple[Envelope, BaseModel]]]:
    """Each customer's events in time order (a stable sort: the order of the stream within
    the same time), validated as the service validates them."""
    out: dict[str, list[tuple[Envelope, BaseModel]]] = defaultdict(list)
    for raw in sorted(cloud_events, key=lambda e: e["time"]):
        env = decode(json.dumps(raw).encode())
        model = parse(env)
        assert model is not None
        out[env.subject].append((env, model))
    return out


def fifo_stream(customers: int, seed: int) -> list[dict[str, Any]]:
    """Invoices in order (the same terms, so due in issue order), unallocated payments that
    never pay more than is open (the oldest first, partly or wholly), dunning for invoices
    left open: no allocation-rule corner case."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for c in range(customers):
        cid = f"F-{c}"
        day = date(2024, 1, 1)
        out.append(
            simulate.cloudevent(
                "customer.registered",
                cid,
                {"customer_id": cid, "name": cid, "currency": "EUR", "industry": "G"},
                id=f"reg-{cid}",
                at=at(day, 8),
                source="/fifo",
            )
        )
        terms = rng.choice([14, 30, 60])
        open_cents: list[tuple[str, int, date]] = []
        dunned: set[str] = set()
        for n in range(rng.randint(40, 120)):
            day += timedelta(days=rng.randint(0, 6))
            roll = rng.random()
            if roll < 0.5 or not open_cents:
                cents = rng.randint(1_000, 500_000)
                iid = f"{cid}-I{n}"
                open_cents.append((iid, cents, day + timedelta(days=terms)))
                data: dict[str, Any] = {
                    "invoice_id": iid,
                    "customer_id": cid,
                    "amount": f"{cents / 100:.2f}",
                    "currency": "EUR",
                    "issue_date": day.isoformat(),
                    "due_date": (day + timedelta(days=terms)).isoformat(),
                }
                out.append(
                    simulate.cloudevent(
                        "invoice.issued", cid, data, id=f"i-{iid}", at=at(day), source="/fifo"
                    )
                )
            elif roll < 0.9:
                owed = sum(c for _, c, _ in open_cents)
                cents = rng.choice([owed, open_cents[0][1], rng.randint(1, owed)])
                data = {
                    "payment_id": f"{cid}-P{n}",
                    "customer_id": cid,
                    "amount": f"{cents / 100:.2f}",
                    "currency": "EUR",
                    "received_date": day.isoformat(),
                }
                out.append(
                    simulate.cloudevent(
                        "payment.received",
                        cid,
                        data,
                        id=f"p-{cid}-{n}",
                        at=at(day, 15),
                        source="/fifo",
                    )
                )
                left = cents
                while left > 0 and open_cents:
                    iid, owed_one, due = open_cents[0]
                    take = min(left, owed_one)
                    left -= take
                    if take == owed_one:
                        open_cents.pop(0)
                    else:
                        open_cents[0] = (iid, owed_one - take, due)
            else:
                iid, _, due = open_cents[0]
                if due < day and iid not in dunned:
                    dunned.add(iid)
                    data = {
                        "invoice_id": iid,
                        "customer_id": cid,
                        "amount_overdue": "1.00",
                        "currency": "EUR",
                        "due_date": due.isoformat(),
                        "days_overdue": (day - due).days,
                        "as_of": day.isoformat(),
                    }
                    out.append(
                        simulate.cloudevent(
                            "invoice.overdue",
                            cid,
                            data,
                            id=f"d-{iid}",
                            at=at(day, 7),
                            source="/fifo",
                        )
                    )
    return out


def test_given_streams_without_allocation_corner_cases_when_folded_both_ways_then_every_assessment_is_the_same() -> (
    None
):
    # Given the simulator's histories (payments allocated to their invoices, reversals,
    # dunning, statements, bureau reports) and oldest-first payments on in-order invoices
    simulated = [s.event for s in simulate.history(12, 30, seed=7, today=date(2026, 6, 30))]
    customers = {**by_customer(simulated), **by_customer(fifo_stream(8, seed=5))}
    published = compared = 0
    for cid, events in customers.items():
        # When each customer's events are folded by the previous layout's domain and the new
        for folded in fold_both_ways(events):
            where = f"{cid} {folded.event.type} {folded.event.id}"
            # Then the same events are set aside, the same assessments published…
            assert folded.new_rejected == folded.old_rejected, where
            old_body = folded.old_body.model_dump(mode="json") if folded.old_body else None
            new_body = folded.new_body.model_dump(mode="json") if folded.new_body else None
            assert new_body == old_body, where
            # …and the scorecard's inputs are the same after every event
            assert folded.new_inputs == folded.old_inputs, where
            published += old_body is not None
            compared += 1
    print(f"\n{len(customers)} customers, {compared} events, {published} assessments: the same")
    assert published > 100


# Of an assessment body, what the payment behaviour decides: its keys, its factors' lines,
# the score, the grades it leads to, and the review date that follows the grade.
_SCORED = {
    "score",
    "grade",
    "risk_level",
    "previous_grade",
    "next_review_date",
    "computed_grade",
    "computed_risk_level",
}
_PB_FACTORS = {f.factor for f in POLICY.scorecard if f.input in PAYMENT_BEHAVIOUR}


def _beside_payment_behaviour(body: AssessmentCompleted) -> dict[str, Any]:
    dumped = body.model_dump(mode="json")
    dumped["ratios"] = {k: v for k, v in dumped["ratios"].items() if k not in PAYMENT_BEHAVIOUR}
    dumped["factors"] = [f for f in dumped["factors"] if f["factor"] not in _PB_FACTORS]
    return {k: v for k, v in dumped.items() if k not in _SCORED}


def test_given_streams_with_allocation_corner_cases_when_folded_both_ways_then_they_differ_only_in_payment_behaviour() -> (
    None
):
    # Given AR streams with everything the one allocation rule decides differently: partial
    # and unallocated payments, allocations beyond what is open, credit notes, cancellations
    # and reversals of paid invoices, dunning runs that disagree with each other
    registrations, stream = streams.ledger(
        customers=30, total=2500, duplicate_share=0, malformed_share=0, seed=3
    )
    customers = by_customer([item.event for item in [*registrations, *stream] if item.event])
    keys: Counter[str] = Counter()
    scores = grades = publications = 0
    examples: dict[str, list[str]] = defaultdict(list)
    events = 0
    for cid, history in customers.items():
        # When each customer's events are folded both ways
        for folded in fold_both_ways(history):
            events += 1
            where = f"{cid} {folded.event.type} {folded.event.id}"
            # Then the same events are set aside
            assert folded.new_rejected == folded.old_rejected, where
            old, new = folded.old_inputs, folded.new_inputs
            differing = {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
            # …the inputs differ in payment-behaviour keys only…
            assert differing <= set(PAYMENT_BEHAVIOUR), where
            # …and the score differs by what those keys score, nothing else
            explained = {k: v for k, v in old.items() if k not in PAYMENT_BEHAVIOUR}
            explained.update({k: v for k, v in new.items() if k in PAYMENT_BEHAVIOUR})
            new_total = domain.score(new, POLICY)[0]
            assert domain.score(explained, POLICY)[0] == new_total, where
            # …as does what both published, beside the payment behaviour and what it scores
            if folded.old_body is not None and folded.new_body is not None:
                assert _beside_payment_behaviour(folded.new_body) == _beside_payment_behaviour(
                    folded.old_body
                ), where
            for key in sorted(differing):
                keys[key] += 1
                if len(examples[key]) < 3:
                    examples[key].append(f"{where}: {old.get(key)} → {new.get(key)}")
            old_total = v1.score(old, POLICY)[0]
            if differing and old_total != new_total:
                scores += 1
                if v1.grade_for(old_total, POLICY) != domain.grade_for(new_total, POLICY):
                    grades += 1
            if (folded.old_body is None) != (folded.new_body is None):
                # A re-score publishes when the score or grade moved: a fact that always
                # publishes (a registration, a statement, an analyst's act) did so both ways
                assert folded.event.type in domain.RESCORE, where
                publications += 1

    print(f"\n{len(customers)} customers, {events} events folded both ways; differences:")
    for key, count in keys.most_common():
        print(f"  {key}: after {count} events, e.g. {'; '.join(examples[key])}")
    print(f"  score: after {scores} events; grade: after {grades}")
    print(f"  published by one domain only: {publications} events")
    # The corner cases are there: without them this test would compare nothing
    assert keys and scores
