"""The payment-behaviour window's settled days live in rows per month
(``assessment_paid_months``), not in the customer's state document: a customer that settles
dozens of invoices a day writes a document as small as a fresh customer's, and an event
rewrites only the month it settles in (assessment_0005)."""

from __future__ import annotations

from dataclasses import replace
from datetime import date, timedelta

import pytest

from services.assessment import domain, store
from shared.unitofwork import LayoutError
from tests.unit.test_assessment_history import (
    END,
    Fact,
    bureau_report,
    fold,
    invoice,
    payment,
    registration,
)


def dense(days: int, per_day: int, last: date) -> list[Fact]:
    """``per_day`` invoices issued each day for ``days`` days up to ``last``, each paid
    (allocated) 20 to 60 days after issue: many settlements a day, of many lateness values."""
    out: list[Fact] = []
    for d in range(days):
        issued = last - timedelta(days=days - 1 - d)
        for k in range(per_day):
            n = d * per_day + k
            out.append(invoice(f"I-{n}", issued))
            out.append(
                payment(f"P-{n}", issued + timedelta(days=20 + n % 41), allocate_to=f"I-{n}")
            )
    return out


def continued(
    folding: domain.Refold, facts: list[Fact]
) -> tuple[domain.CustomerState, domain.CustomerState]:
    """The state before ``facts``, and after them folded on (as the service goes on from
    the state it stored)."""
    before = folding.state
    for event_type, data, time_ in facts:
        folding.evolve(domain.Event(event_type, data, time_))
    return before, folding.state


def rows_of(cid: str, state: domain.CustomerState) -> dict[str, str]:
    rows, gone = store.month_rows(cid, None, state)
    assert gone == []
    return {r["month"]: r["days"] for r in rows}


def reload(document: str, months: dict[str, str]) -> domain.CustomerState:
    return store.load_state(document, store.days_of(months[m] for m in sorted(months)))


def test_given_a_customer_settling_many_invoices_a_day_then_its_document_is_a_fresh_ones_size() -> (
    None
):
    base = [registration(END - timedelta(days=900)), bureau_report(END)]
    fresh = fold(base)
    busy = fold(base, dense(400, 12, END - timedelta(days=70)))
    days = busy.state.paid.days
    assert len(days) >= 300 and sum(p.count for p in days.values()) >= 3000
    assert max(len(p.beyond) for p in days.values()) >= 8  # many lateness values a day
    fresh_doc, busy_doc = store.dump_state(fresh.state), store.dump_state(busy.state)
    # The document holds the window's sums, not its days: within a few hundred bytes
    assert len(busy_doc) < len(fresh_doc) + 600, (len(fresh_doc), len(busy_doc))
    months = rows_of("C-1", busy.state)
    assert 10 <= len(months) <= 13
    # Document and month rows give the state back exactly
    assert reload(busy_doc, months) == replace(busy.state, step=None)


def test_given_one_more_payment_then_only_its_settlement_month_is_rewritten() -> None:
    base = [registration(END - timedelta(days=900)), bureau_report(END)]
    history = dense(300, 5, END - timedelta(days=70))
    before, after = continued(
        fold(base, history),
        [
            invoice("X-1", END - timedelta(days=40)),
            payment("Y-1", END - timedelta(days=5), allocate_to="X-1"),
        ],
    )
    rows, gone = store.month_rows("C-1", before, after)
    settled_on = END - timedelta(days=5)
    assert [r["month"] for r in rows] == [f"{settled_on.year:04d}-{settled_on.month:02d}"]
    assert gone == []
    # Nothing changed: nothing written
    assert store.month_rows("C-1", after, after) == ([], [])


def test_given_the_window_moving_past_a_month_then_its_row_goes() -> None:
    base = [registration(END - timedelta(days=900)), bureau_report(END)]
    history = dense(60, 2, END - timedelta(days=330))
    before, later = continued(
        fold(base, history),
        [
            invoice("X-1", END + timedelta(days=100)),
            payment("Y-1", END + timedelta(days=130), allocate_to="X-1"),
        ],
    )
    rows, gone = store.month_rows("C-1", before, later)
    held_before = set(rows_of("C-1", before))
    held_after = set(rows_of("C-1", later))
    assert held_before - held_after, "the window moved past a month"
    assert {m for _, m in gone} == held_before - held_after
    assert {r["month"] for r in rows} == held_after - held_before  # the new month only


def test_a_document_that_still_holds_its_days_is_an_older_layout() -> None:
    base = [registration(END - timedelta(days=900)), bureau_report(END)]
    busy = fold(base, dense(30, 2, END - timedelta(days=40)))
    old_layout = store._STATE.dump(replace(busy.state, step=None))
    with pytest.raises(LayoutError, match="assessment_0005"):
        store.load_state(old_layout)
