"""The shared receivables ledger: the one allocation rule, what leaves the hot state, and the
accounting identities that hold whatever the order of the facts (hypothesis)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import ledger as lg

D = Decimal
DAY0 = date(2026, 1, 1)


@dataclass
class Book:
    """A ledger with its archive, driven the way a service's unit of work drives it: what a
    step archives is stored, what it restores is deleted, and a step that needs archived
    items it was not given is folded again with them."""

    ledger: lg.Ledger = field(default_factory=lambda: lg.new_ledger("EUR"))
    archive: dict[str, lg.Archived] = field(default_factory=dict)
    settled: list[lg.Outcome] = field(default_factory=list)
    recalls: int = 0

    def do(self, operation: Callable[..., lg.Step], **kw: Any) -> lg.Step:
        recall: dict[str, lg.Archived | None] = {}
        while True:
            try:
                step = operation(self.ledger, recall, **kw)
                break
            except lg.NeedRecall as need:
                self.recalls += 1
                for key in need.keys:
                    recall[key] = self.archive.get(key)
        for key in step.restored:
            self.archive.pop(key, None)
        for item in step.archived:
            self.archive[item.key] = item
        for outcome in step.unsettled:
            self.settled.remove(outcome)
        self.settled.extend(step.settled)
        self.ledger = step.ledger
        return step

    def invoice(self, iid: str, amount: str, due: int = 30, issued: int = 0, **kw: Any) -> lg.Step:
        return self.do(
            lg.issue_invoice,
            invoice_id=iid,
            amount=D(amount),
            issue_date=DAY0 + timedelta(days=issued),
            due_date=DAY0 + timedelta(days=issued + due),
            original=(D(amount), "EUR"),
            **kw,
        )

    def pay(
        self, pid: str, amount: str, on: int = 10, to: tuple[tuple[str, str], ...] = ()
    ) -> lg.Step:
        return self.do(
            lg.receive_credit,
            kind="payment",
            credit_id=pid,
            amount=D(amount),
            on=DAY0 + timedelta(days=on),
            original=(D(amount), "EUR"),
            allocations=tuple((i, D(a), D(a), "EUR") for i, a in to),
        )

    def credit_note(
        self, cid: str, amount: str, on: int = 5, invoice: str | None = None
    ) -> lg.Step:
        return self.do(
            lg.receive_credit,
            kind="credit_note",
            credit_id=cid,
            amount=D(amount),
            on=DAY0 + timedelta(days=on),
            original=(D(amount), "EUR"),
            allocations=((invoice, D(amount), D(amount), "EUR"),) if invoice else (),
        )

    def cancel(self, iid: str) -> lg.Step:
        return self.do(lg.cancel_invoice, invoice_id=iid)

    def reverse(self, pid: str) -> lg.Step:
        return self.do(lg.reverse_payment, payment_id=pid)

    def open(self) -> dict[str, Decimal]:
        return {i: inv.open for i, inv in self.ledger.invoices.items()}

    @property
    def receivables(self) -> Decimal:
        return lg.open_receivables(self.ledger)


def test_a_payment_without_allocations_pays_the_oldest_due_invoices_first() -> None:
    book = Book()
    book.invoice("I-LATE", "100.00", due=60)
    book.invoice("I-EARLY", "100.00", due=30)
    book.pay("P1", "150.00")
    assert book.open() == {"I-LATE": D("50.00")}
    assert "invoice:I-EARLY" in book.archive and book.archive["invoice:I-EARLY"].status == "settled"
    assert book.receivables == D("50.00")


def test_an_invoice_paid_in_full_and_a_payment_applied_in_full_leave_the_hot_state() -> None:
    book = Book()
    book.invoice("I1", "100.00")
    book.pay("P1", "100.00", on=40)
    assert book.ledger.invoices == {} and book.ledger.credits == {}
    assert book.ledger.empty
    (outcome,) = book.settled
    assert (outcome.days_to_pay, outcome.days_beyond_terms) == (40, 10)


def test_cash_for_an_invoice_not_seen_yet_waits_for_it_and_pays_nothing_else() -> None:
    book = Book()
    book.invoice("I-OLD", "100.00")
    book.pay("P1", "80.00", to=(("I-NEW", "80.00"),))
    # lowers the receivables at once, but the old invoice stays open (its ageing shows)
    assert book.receivables == D("20.00")
    assert book.open() == {"I-OLD": D("100.00")}
    book.invoice("I-NEW", "80.00", issued=1)
    assert book.open() == {"I-OLD": D("100.00")}
    assert book.ledger.credits == {}
    assert book.receivables == D("100.00")


def test_held_cash_the_invoice_does_not_take_goes_on_to_the_oldest_open_invoice() -> None:
    book = Book()
    book.invoice("I-OLD", "100.00")
    book.pay("P1", "80.00", to=(("I-NEW", "80.00"),))
    book.invoice("I-NEW", "50.00", issued=1)
    assert book.open() == {"I-OLD": D("70.00")}


def test_an_overpayment_is_a_credit_balance_that_the_next_invoice_takes() -> None:
    book = Book()
    book.invoice("I1", "100.00")
    book.pay("P1", "150.00")
    assert book.receivables == D("-50.00")
    book.invoice("I2", "80.00", issued=20)
    assert book.open() == {"I2": D("30.00")}
    assert book.ledger.credits == {}


def test_cancelling_a_paid_invoice_gives_the_cash_back_to_the_oldest_open_invoice() -> None:
    book = Book()
    book.invoice("I1", "100.00", due=10)
    book.invoice("I2", "100.00", due=20)
    book.pay("P1", "100.00")
    assert book.open() == {"I2": D("100.00")}
    # long after, I1 (settled, archived) is cancelled
    step = book.cancel("I1")
    assert "invoice:I1" not in step.restored  # it is archived again, as cancelled
    assert book.archive["invoice:I1"].status == "cancelled"
    assert book.open() == {}
    assert book.receivables == D("0.00")
    assert [o.invoice_id for o in book.settled] == ["I2"]


def test_reversing_a_payment_applied_long_ago_reopens_the_invoices_it_settled() -> None:
    book = Book()
    book.invoice("I1", "100.00")
    book.pay("P1", "100.00")
    for n in range(20):  # history in between
        book.invoice(f"X{n}", "10.00", issued=n)
        book.pay(f"PX{n}", "10.00", on=n + 1)
    assert book.ledger.empty and len(book.settled) == 21
    book.reverse("P1")
    assert book.open() == {"I1": D("100.00")}
    assert [o.invoice_id for o in book.settled if o.invoice_id == "I1"] == []
    assert book.archive["payment:P1"].status == "reversed"
    # and the reversal again changes nothing
    book.reverse("P1")
    assert book.open() == {"I1": D("100.00")}


def test_a_cancellation_or_reversal_before_its_fact_is_applied_when_the_fact_comes() -> None:
    book = Book()
    book.cancel("I1")
    book.invoice("I1", "100.00")
    assert book.open() == {} and book.receivables == 0
    book.reverse("P1")
    book.pay("P1", "40.00")
    assert book.receivables == 0 and book.ledger.empty


def test_the_same_fact_twice_changes_nothing_and_other_figures_conflict() -> None:
    book = Book()
    book.invoice("I1", "100.00")
    book.pay("P1", "100.00")
    # both settled and archived: still recognised
    before = book.ledger
    book.invoice("I1", "100.00")
    book.pay("P1", "100.00")
    assert book.ledger == before
    with pytest.raises(lg.LedgerConflict):
        book.invoice("I1", "120.00")
    with pytest.raises(lg.LedgerConflict):
        book.pay("P1", "90.00")


def test_a_credit_note_that_clears_an_invoice_credits_it_without_a_payment_outcome() -> None:
    book = Book()
    book.invoice("I1", "100.00")
    book.credit_note("CN1", "100.00", invoice="I1")
    assert book.archive["invoice:I1"].status == "credited"
    assert book.settled == []


def test_ageing_counts_open_amounts_by_days_past_due_and_dunning_overrides() -> None:
    book = Book()
    book.invoice("I1", "100.00", due=30)  # due 31 Jan
    book.invoice("I2", "50.00", due=0)  # due 1 Jan
    book.pay("P1", "20.00")  # pays I2 first (oldest due)
    aged = lg.ageing(book.ledger, DAY0 + timedelta(days=45))
    assert aged.buckets == {"1-30": D("100.00"), "31-60": D("30.00"), "61-90": 0, "90+": 0}
    assert aged.worst_days == 45
    dun = lg.Dunning(DAY0 + timedelta(days=40), 70, D("100.00"), DAY0, (D("100.00"), "EUR"))
    book.do(lg.record_dunning, invoice_id="I1", dunning=dun)
    aged = lg.ageing(book.ledger, DAY0 + timedelta(days=45))
    assert aged.buckets["61-90"] == D("100.00") and aged.worst_days == 75


def test_dunning_for_an_invoice_never_seen_counts_and_for_a_paid_one_not() -> None:
    book = Book()
    book.invoice("I1", "100.00")
    book.pay("P1", "100.00")
    dun = lg.Dunning(DAY0 + timedelta(days=40), 10, D("60.00"), DAY0, (D("60.00"), "EUR"))
    book.do(lg.record_dunning, invoice_id="I1", dunning=dun)
    book.do(lg.record_dunning, invoice_id="GHOST", dunning=dun)
    aged = lg.ageing(book.ledger, DAY0 + timedelta(days=40))
    assert aged.overdue == D("60.00") and list(book.ledger.unseen_dunning) == ["GHOST"]


def test_a_change_of_currency_converts_each_amount_once_from_what_was_received() -> None:
    book = Book()
    book.invoice("I1", "100.00")
    book.pay("P1", "30.00")
    rate = {"EUR": D("2")}
    moved = lg.reexpress(book.ledger, "XXX", lambda amount, ccy, _what: amount * rate[ccy])
    assert lg.open_receivables(moved) == D("140.00")
    assert moved.invoices["I1"].open == D("140.00")


# ---- properties ---------------------------------------------------------------------------

INVOICES = [f"I{n}" for n in range(6)]
PAYMENTS = [f"P{n}" for n in range(4)]

fact = st.one_of(
    st.tuples(
        st.just("invoice"),
        st.sampled_from(INVOICES),
        st.integers(1, 300),
        st.integers(0, 60),
        st.integers(0, 40),
    ),
    st.tuples(
        st.just("pay"),
        st.sampled_from(PAYMENTS),
        st.integers(1, 400),
        st.lists(st.tuples(st.sampled_from(INVOICES), st.integers(1, 200)), max_size=2),
        st.integers(0, 90),
    ),
    st.tuples(st.just("note"), st.sampled_from(["N1", "N2"]), st.integers(1, 100)),
    st.tuples(st.just("cancel"), st.sampled_from(INVOICES)),
    st.tuples(st.just("reverse"), st.sampled_from(PAYMENTS)),
)

# The figures of each fact are fixed by its id, so that a repeated id is the same fact.
AMOUNT = {i: n * 37 % 250 + 20 for n, i in enumerate(INVOICES + PAYMENTS)}
ALLOCATIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "P0": (),
    "P1": (("I1", "50.00"),),
    "P2": (("I5", "30.00"), ("I0", "20.00")),
    "P3": (("I3", "400.00"),),
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(fact, max_size=30))
def test_whatever_the_order_the_ledger_keeps_the_accounting_identities(facts: list[Any]) -> None:
    book = Book()
    invoiced: dict[str, Decimal] = {}
    credited: dict[str, Decimal] = {}
    cancelled: set[str] = set()
    reversed_: set[str] = set()
    for f in facts:
        kind = f[0]
        if kind == "invoice":
            iid = f[1]
            book.invoice(iid, f"{AMOUNT[iid]}.00", due=30, issued=INVOICES.index(iid) * 7)
            invoiced[iid] = D(AMOUNT[iid])
        elif kind == "pay":
            pid = f[1]
            book.pay(pid, f"{AMOUNT[pid]}.00", on=PAYMENTS.index(pid) * 11, to=ALLOCATIONS[pid])
            credited[f"payment:{pid}"] = D(AMOUNT[pid])
        elif kind == "note":
            book.credit_note(f[1], "15.00")
            credited[f"credit_note:{f[1]}"] = D(15)
        elif kind == "cancel":
            book.cancel(f[1])
            cancelled.add(f[1])
        else:
            book.reverse(f[1])
            reversed_.add(f"payment:{f[1]}")
        led = book.ledger
        # Receivables: what was invoiced less what was credited, whatever the order.
        owed = sum((a for i, a in invoiced.items() if i not in cancelled), D(0))
        paid = sum((a for k, a in credited.items() if k not in reversed_), D(0))
        assert lg.open_receivables(led) == owed - paid
        # The hot state holds only what is open.
        assert all(inv.open > 0 for inv in led.invoices.values())
        assert all(c.remaining > 0 or c.held for c in led.credits.values())
        # Unapplied, unheld cash means nothing is open that it could pay.
        if any(c.free > 0 for c in led.credits.values()):
            assert not led.invoices
        # Both sides of every application agree.
        for inv in led.invoices.values():
            assert D(0) <= inv.paid <= inv.amount
        # Nothing is both hot and archived.
        hot = {lg.invoice_key(i) for i in led.invoices} | set(led.credits)
        assert not hot & set(book.archive)
