"""One customer's receivables ledger: what is open, and one rule for applying cash.

Used by every service that needs a customer's receivables (limits: exposure and ageing;
assessment: payment behaviour; alerts: ageing buckets), so that "how much is owed, how much
of it is overdue, and for how long" has one answer.

**Hot state is what is open.** An invoice stays here while something is owed on it; a
payment or credit note while part of it is not applied. An invoice paid in full, a credit
applied in full, a cancelled invoice or a reversed payment leaves the ledger as an
``Archived`` record, which the caller keeps outside the customer's state (a table keyed by
customer and item) and hands back (``recall``) only when a later event names that item: a
duplicate of a settled invoice, a cancellation of a paid one, the reversal of a payment
applied long ago. So the cost of a customer's next event does not grow with its history.

**The allocation rule** (the only one; see docs/design.md):

1. Cash is applied when it arrives, in the order facts arrive.
2. A credit's explicit allocations come first, each up to what is open on that invoice. An
   allocation to an invoice not seen yet is held for it (the cash lowers the receivables at
   once, but pays off no other invoice) and applied when the invoice arrives; what the
   invoice does not take goes on as in 3. An allocation to an invoice already settled or
   cancelled is not held: it goes on as in 3.
3. The rest pays the oldest open invoices first: by due date, then issue date, then id.
4. What is still left is unapplied cash (a credit balance); the next invoices that arrive
   take it, the oldest credit first.
5. Cancelling an invoice gives the cash applied to it back to the credits it came from,
   which apply it again by 3 and 4. Reversing a payment takes back everything it paid: those
   invoices are open again (the settled ones come back from the archive).
6. An invoice is *settled* on the day of the payment that clears it (never before its issue
   date); one cleared by a credit note is *credited*, which says nothing about paying.

Amounts are in the ledger's currency (the customer's credit currency); every fact also
keeps its amounts as received, so that a change of credit currency converts each exactly
once (``reexpress``). Pure functions over frozen values: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from typing import Any, Generic, Literal, TypeVar

ZERO = Decimal(0)
T = TypeVar("T")
S = TypeVar("S")


def replace(obj: T, /, **changes: Any) -> T:
    """``dataclasses.replace`` for the frozen, slotted values here (none has an __init__ or
    __post_init__ of its own), at half its cost: the fold makes several per fact."""
    cls = type(obj)
    new = object.__new__(cls)
    for name in cls.__slots__:  # type: ignore[attr-defined]
        object.__setattr__(new, name, changes[name] if name in changes else getattr(obj, name))
    return new


BUCKETS = ("1-30", "31-60", "61-90", "90+")

# One application of cash to an invoice: (the other side's key or id, amount in the ledger's
# currency, amount and currency as the credit was received).
Application = tuple[str, Decimal, Decimal, str]
CreditKind = Literal["payment", "credit_note"]


def bucket_of(days: int) -> str | None:
    """The ageing bucket of ``days`` overdue (None: not overdue)."""
    if days <= 0:
        return None
    if days <= 30:
        return "1-30"
    if days <= 60:
        return "31-60"
    if days <= 90:
        return "61-90"
    return "90+"


def invoice_key(invoice_id: str) -> str:
    return f"invoice:{invoice_id}"


def credit_key(kind: CreditKind, credit_id: str) -> str:
    return f"{kind}:{credit_id}"


class LedgerConflict(ValueError):
    """A fact's number seen again under another event id with other figures: the first
    stands (the caller dead-letters the second, ``conflicting_duplicate``)."""

    def __init__(self, what: str, field_name: str) -> None:
        super().__init__(f"{what} was already received with other figures; the first stands")
        self.field_name = field_name


class NeedRecall(LookupError):
    """The ledger needs archived items it was not given; fetch them and fold again."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.keys = frozenset(keys)
        super().__init__(", ".join(sorted(self.keys)))


# ---- facts --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dunning:
    """The dunning system's word on one invoice (``invoice.overdue``), as of its date."""

    as_of: date
    days_overdue: int
    amount_overdue: Decimal
    due_date: date
    original: tuple[Decimal, str]


@dataclass(frozen=True, slots=True)
class Invoice:
    invoice_id: str
    amount: Decimal
    issue_date: date
    due_date: date
    original: tuple[Decimal, str]
    order_id: str | None = None
    applied: tuple[Application, ...] = ()  # (credit key, amount, amount as the credit came)
    dunning: Dunning | None = None
    # The sum of ``applied`` (kept: the ledger asks for it on every fact and every ageing).
    paid: Decimal = ZERO

    @property
    def open(self) -> Decimal:
        return self.amount - self.paid

    def with_applied(self, applied: tuple[Application, ...]) -> Invoice:
        return replace(self, applied=applied, paid=sum((a[1] for a in applied), ZERO))

    def fifo_key(self) -> tuple[date, date, str]:
        return (self.due_date, self.issue_date, self.invoice_id)


@dataclass(frozen=True, slots=True)
class Credit:
    """Money in the customer's favour: a payment or a credit note."""

    key: str
    kind: CreditKind
    amount: Decimal
    on: date
    original: tuple[Decimal, str]
    # Explicit allocations as received: (invoice id, amount, amount as received).
    allocations: tuple[Application, ...] = ()
    applied: tuple[Application, ...] = ()  # (invoice id, amount, amount as received)
    # Cash held for invoices not seen yet: (invoice id, amount, amount as received).
    held: tuple[Application, ...] = ()

    @property
    def applied_total(self) -> Decimal:
        return sum((a[1] for a in self.applied), ZERO)

    @property
    def remaining(self) -> Decimal:
        """Not applied to any invoice (held cash included)."""
        return self.amount - self.applied_total

    @property
    def free(self) -> Decimal:
        """Remaining and not held for an invoice to come."""
        return self.remaining - sum((h[1] for h in self.held), ZERO)

    def share(self, amount: Decimal) -> tuple[Decimal, str]:
        """``amount`` (ledger currency) as a share of the credit as received."""
        return self.original_of(amount), self.original[1]

    def original_of(self, amount: Decimal) -> Decimal:
        """``amount`` (ledger currency) as a share of the credit as received."""
        if amount == self.amount:
            return self.original[0]
        if self.amount == 0:
            return ZERO
        return self.original[0] * amount / self.amount


ArchivedStatus = Literal["settled", "credited", "cancelled", "applied", "reversed"]


@dataclass(frozen=True, slots=True)
class Archived:
    """An item that left the hot state, as it was when it left."""

    key: str
    status: ArchivedStatus
    invoice: Invoice | None = None
    credit: Credit | None = None
    settled_on: date | None = None  # a settled invoice: the day the payment cleared it
    # The ledger's currency when it left: a credit currency changed since converts it (from
    # its amounts as received) when it comes back.
    currency: str = ""

    @property
    def refs(self) -> tuple[str, ...]:
        """The keys of the items on the other side of its applications."""
        if self.invoice is not None:
            return tuple(a[0] for a in self.invoice.applied)
        if self.credit is not None:
            return tuple(invoice_key(a[0]) for a in self.credit.applied)
        return ()


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an invoice was paid: the payment-behaviour facts it leaves behind."""

    invoice_id: str
    issue_date: date
    due_date: date
    settled_on: date

    @property
    def days_to_pay(self) -> int:
        return (self.settled_on - self.issue_date).days

    @property
    def days_beyond_terms(self) -> int:
        return max((self.settled_on - self.due_date).days, 0)


@dataclass(frozen=True, slots=True)
class Ledger:
    currency: str
    invoices: Mapping[str, Invoice] = field(default_factory=dict)  # open: something owed
    credits: Mapping[str, Credit] = field(default_factory=dict)  # something not applied
    # Dunning for invoices never seen: counted, conservatively, as overdue.
    unseen_dunning: Mapping[str, Dunning] = field(default_factory=dict)
    # Cancellations and reversals that came before their invoice or payment.
    cancelled_early: frozenset[str] = frozenset()
    reversed_early: frozenset[str] = frozenset()

    @property
    def empty(self) -> bool:
        return not (
            self.invoices
            or self.credits
            or self.unseen_dunning
            or self.cancelled_early
            or self.reversed_early
        )


@dataclass(frozen=True, slots=True)
class Step:
    """What one fact did: the new ledger, and what changes outside it."""

    ledger: Ledger
    archived: tuple[Archived, ...] = ()  # left the hot state (write to the archive)
    restored: tuple[str, ...] = ()  # came back from the archive (delete it there)
    settled: tuple[Outcome, ...] = ()  # invoices a payment cleared
    unsettled: tuple[Outcome, ...] = ()  # outcomes undone (reversal, cancellation)
    # Invoices issued (+) or cancelled (−) that carry an order id, for reservations.
    ordered: tuple[tuple[str, Decimal], ...] = ()


Recall = Mapping[str, Archived | None]  # None: looked up, not in the archive
# An amount as received (amount, currency, what it is) in the ledger's currency.
Converter = Callable[[Decimal, str, str], Decimal]


def new_ledger(currency: str) -> Ledger:
    return Ledger(currency)


# ---- derived figures ------------------------------------------------------------------------


def open_receivables(ledger: Ledger) -> Decimal:
    """What is owed on open invoices less unapplied cash (negative: a credit balance)."""
    owed = sum((inv.open for inv in ledger.invoices.values()), ZERO)
    return owed - sum((c.remaining for c in ledger.credits.values()), ZERO)


def days_overdue(inv: Invoice, on: date) -> tuple[int, Decimal]:
    """Days overdue and the overdue amount of an open invoice as of business date ``on``.

    Due today is not overdue. A dunning record dated on or after the due date overrides
    the invoice's days and amount as of its own date and ages on from there."""
    dun = inv.dunning
    if dun is not None and dun.as_of >= inv.due_date:
        return dun.days_overdue + max((on - dun.as_of).days, 0), min(dun.amount_overdue, inv.open)
    return (on - inv.due_date).days, inv.open


@dataclass(frozen=True, slots=True)
class Ageing:
    overdue: Decimal
    buckets: dict[str, Decimal]
    worst_days: int


def ageing(ledger: Ledger, on: date | None) -> Ageing:
    """Overdue amount, buckets and worst days overdue as of business date ``on``."""
    buckets = dict.fromkeys(BUCKETS, ZERO)
    if on is None:
        return Ageing(ZERO, buckets, 0)
    worst = 0
    for inv in ledger.invoices.values():
        days, amount = days_overdue(inv, on)
        name = bucket_of(days)
        if name is not None and amount > 0:
            buckets[name] += amount
            worst = max(worst, days)
    for dun in ledger.unseen_dunning.values():
        days = dun.days_overdue + max((on - dun.as_of).days, 0)
        name = bucket_of(days)
        if name is not None and dun.amount_overdue > 0:
            buckets[name] += dun.amount_overdue
            worst = max(worst, days)
    return Ageing(sum(buckets.values(), ZERO), buckets, worst)


def next_ageing_date(ledger: Ledger, as_of: date | None) -> date | None:
    """The next business date on which the ageing figures change (None: nothing open)."""
    first: date | None = None
    for inv in ledger.invoices.values():
        if inv.open <= 0:
            continue
        day = inv.due_date
        if inv.dunning is not None and inv.dunning.as_of >= inv.due_date:
            day = min(day, inv.dunning.as_of)
        first = day if first is None or day < first else first
    for dun in ledger.unseen_dunning.values():
        first = dun.as_of if first is None or dun.as_of < first else first
    if first is None:
        return None
    earliest = first + timedelta(days=1)
    base = as_of if as_of is not None else earliest
    # While anything is overdue, days overdue move every day.
    return base + timedelta(days=1) if earliest <= base else earliest


def invoiced_on_order(ledger: Ledger, order_id: str) -> Decimal:
    """What the open invoices carrying ``order_id`` amount to."""
    return sum((i.amount for i in ledger.invoices.values() if i.order_id == order_id), ZERO)


# ---- the fold -------------------------------------------------------------------------------


class _Work:
    """A step under way: the ledger's items as mutable dicts, and what leaves or returns."""

    def __init__(self, ledger: Ledger, recall: Recall, convert: Converter | None = None) -> None:
        self.ledger = ledger
        self.recall = recall
        self.convert = convert
        self.invoices = dict(ledger.invoices)
        self.credits = dict(ledger.credits)
        self.archived: dict[str, Archived] = {}
        self.restored: list[str] = []
        self.settled: list[Outcome] = []
        self.unsettled: list[Outcome] = []
        self.ordered: list[tuple[str, Decimal]] = []

    def archived_item(self, key: str) -> Archived | None:
        if key in self.archived:
            return self.archived[key]
        if key not in self.recall:
            raise NeedRecall([key])
        return self.recall[key]

    def need(self, keys: Iterable[str]) -> None:
        missing = [
            k
            for k in keys
            if k not in self.recall
            and k not in self.archived
            and k not in self.credits
            and not (k.startswith("invoice:") and k[8:] in self.invoices)
        ]
        if missing:
            raise NeedRecall(missing)

    def bring_back_invoice(self, record: Archived) -> Invoice:
        assert record.invoice is not None
        self.archived.pop(record.key, None)
        self.restored.append(record.key)
        inv = record.invoice
        if record.status == "settled" and record.settled_on is not None:
            self.unsettled.append(
                Outcome(inv.invoice_id, inv.issue_date, inv.due_date, record.settled_on)
            )
        if self._foreign(record):
            assert self.convert is not None
            inv = _invoice_in(inv, self.convert)
        return inv

    def bring_back_credit(self, record: Archived) -> Credit:
        assert record.credit is not None
        self.archived.pop(record.key, None)
        self.restored.append(record.key)
        if self._foreign(record):
            assert self.convert is not None
            return _credit_in(record.credit, self.convert)
        return record.credit

    def _foreign(self, record: Archived) -> bool:
        """Archived in another currency than the ledger's (its credit currency changed)."""
        if not record.currency or record.currency == self.ledger.currency:
            return False
        if self.convert is None:
            raise ValueError(
                f"{record.key} was archived in {record.currency}; the ledger is in "
                f"{self.ledger.currency} and no converter was given"
            )
        return True

    def archive(self, key: str, status: ArchivedStatus, **item: Any) -> None:
        self.archived[key] = Archived(key, status, currency=self.ledger.currency, **item)

    def apply(self, credit: Credit, inv: Invoice, amount: Decimal) -> tuple[Credit, Invoice]:
        if amount <= 0:
            return credit, inv
        original, ccy = credit.share(amount)
        # One application per (credit, invoice): a credit that pays an invoice in two steps
        # (its allocation, then the oldest-first rest) is one amount on it, converted once
        # if the credit currency changes.
        credit = replace(
            credit, applied=_merged(credit.applied, inv.invoice_id, amount, original, ccy)
        )
        inv = replace(
            inv,
            applied=_merged(inv.applied, credit.key, amount, original, ccy),
            paid=inv.paid + amount,
        )
        return credit, inv

    def fifo(self, credit: Credit) -> Credit:
        """Apply the credit's free cash to the oldest open invoices."""
        if credit.free <= 0:
            return credit
        for inv in sorted(self.invoices.values(), key=Invoice.fifo_key):
            left = credit.free
            if left <= 0:
                break
            take = min(left, inv.open)
            if take > 0:
                credit, inv = self.apply(credit, inv, take)
                self.invoices[inv.invoice_id] = inv
        return credit

    def close(self, last_credit: dict[str, Credit]) -> None:
        """Move what is no longer open out of the hot state."""
        for invoice_id, inv in list(self.invoices.items()):
            if inv.open > 0:
                continue
            del self.invoices[invoice_id]
            # The last application is the one that cleared it.
            closer = inv.applied[-1][0] if inv.applied else ""
            closing = self.credits.get(closer) or last_credit.get(closer)
            key = invoice_key(invoice_id)
            if closing is not None and closing.kind == "payment":
                settled_on = max(closing.on, inv.issue_date)
                self.archive(key, "settled", invoice=inv, settled_on=settled_on)
                self.settled.append(Outcome(invoice_id, inv.issue_date, inv.due_date, settled_on))
            else:
                self.archive(key, "credited", invoice=inv)
        for key, credit in list(self.credits.items()):
            if credit.remaining <= 0 and not credit.held:
                del self.credits[key]
                self.archive(key, "applied", credit=credit)

    def release_holds(self, invoice_id: str) -> dict[str, Credit]:
        """Cash held for an invoice that will never be open (it came, or comes, cancelled)
        goes on to the oldest open invoices."""
        released: dict[str, Credit] = {}
        for ckey, credit in list(self.credits.items()):
            if any(h[0] == invoice_id for h in credit.held):
                credit = replace(credit, held=tuple(h for h in credit.held if h[0] != invoice_id))
                released[ckey] = self.credits[ckey] = self.fifo(credit)
        return released

    def apply_free_cash(self) -> dict[str, Credit]:
        """Unapplied cash to the oldest open invoices, the oldest credit first."""
        touched: dict[str, Credit] = {}
        for ckey in sorted(self.credits, key=lambda k: (self.credits[k].on, k)):
            credit = self.credits[ckey]
            if credit.free > 0:
                touched[ckey] = self.credits[ckey] = self.fifo(credit)
        return touched

    def step(
        self,
        *,
        cancelled_early: frozenset[str] | None = None,
        reversed_early: frozenset[str] | None = None,
        unseen_dunning: Mapping[str, Dunning] | None = None,
    ) -> Step:
        base = self.ledger
        ledger = replace(
            base,
            invoices=self.invoices,
            credits=self.credits,
            cancelled_early=base.cancelled_early if cancelled_early is None else cancelled_early,
            reversed_early=base.reversed_early if reversed_early is None else reversed_early,
            unseen_dunning=base.unseen_dunning if unseen_dunning is None else unseen_dunning,
        )
        restored = tuple(k for k in dict.fromkeys(self.restored) if k not in self.archived)
        return Step(
            ledger,
            archived=tuple(self.archived.values()),
            restored=restored,
            settled=tuple(self.settled),
            unsettled=tuple(self.unsettled),
            ordered=tuple(self.ordered),
        )


def wanted(
    ledger: Ledger,
    *,
    invoice_ids: Iterable[str] = (),
    credit_keys: Iterable[str] = (),
) -> set[str]:
    """The archive keys a fact naming these items may need (those not in the hot state)."""
    keys = {invoice_key(i) for i in invoice_ids if i not in ledger.invoices}
    keys |= {k for k in credit_keys if k not in ledger.credits}
    for i in invoice_ids:
        inv = ledger.invoices.get(i)
        if inv is not None:
            keys |= {a[0] for a in inv.applied if a[0] not in ledger.credits}
    for k in credit_keys:
        credit = ledger.credits.get(k)
        if credit is not None:
            keys |= {invoice_key(a[0]) for a in credit.applied if a[0] not in ledger.invoices}
    return keys


def wanted_by(ledger: Ledger, event_type: str, data: Any) -> set[str]:
    """The archive keys a contract event (its type and validated data) may need, looked up
    before it is folded; the fold asks for any other with ``NeedRecall``."""
    if event_type in ("invoice.issued", "invoice.cancelled", "invoice.overdue"):
        return wanted(ledger, invoice_ids=[data.invoice_id])
    if event_type == "credit_note.issued":
        ids = [data.invoice_id] if data.invoice_id else []
        return wanted(
            ledger, invoice_ids=ids, credit_keys=[credit_key("credit_note", data.credit_note_id)]
        )
    if event_type == "payment.received":
        ids = [a.invoice_id for a in (data.allocations or ())]
        return wanted(ledger, invoice_ids=ids, credit_keys=[credit_key("payment", data.payment_id)])
    if event_type == "payment.reversed":
        return wanted(ledger, credit_keys=[credit_key("payment", data.payment_id)])
    return set()


def issue_invoice(
    ledger: Ledger,
    recall: Recall,
    *,
    invoice_id: str,
    amount: Decimal,
    issue_date: date,
    due_date: date,
    original: tuple[Decimal, str],
    order_id: str | None = None,
    convert: Converter | None = None,
) -> Step:
    """An invoice arrives: it takes the cash held for it, then unapplied cash (oldest first)."""
    work = _Work(ledger, recall, convert)
    key = invoice_key(invoice_id)
    figures = (original, issue_date, due_date, order_id)
    known = ledger.invoices.get(invoice_id)
    if known is None:
        record = work.archived_item(key)
        if record is not None and record.invoice is not None:
            known = record.invoice
    if known is not None:
        if (known.original, known.issue_date, known.due_date, known.order_id) != figures:
            raise LedgerConflict(f"invoice {invoice_id!r}", "invoice_id")
        return Step(ledger)  # the same invoice again
    dunning = ledger.unseen_dunning.get(invoice_id)
    unseen = ledger.unseen_dunning
    if dunning is not None:
        # Dunning that came before the invoice is the invoice's own now.
        unseen = {k: v for k, v in unseen.items() if k != invoice_id}
    inv = Invoice(invoice_id, amount, issue_date, due_date, original, order_id, dunning=dunning)
    if invoice_id in ledger.cancelled_early:
        # Its cancellation came first: it arrives cancelled.
        work.archive(key, "cancelled", invoice=inv)
        work.close(work.release_holds(invoice_id))
        return work.step(
            cancelled_early=ledger.cancelled_early - {invoice_id}, unseen_dunning=unseen
        )
    if order_id:
        work.ordered.append((order_id, amount))
    work.invoices[invoice_id] = inv
    touched: dict[str, Credit] = {}
    # Cash held for this very invoice first, in the order the credits came.
    for ckey, credit in list(work.credits.items()):
        hold = [h for h in credit.held if h[0] == invoice_id]
        if not hold:
            continue
        credit = replace(credit, held=tuple(h for h in credit.held if h[0] != invoice_id))
        for held in hold:
            take = min(held[1], work.invoices[invoice_id].open)
            credit, work.invoices[invoice_id] = work.apply(credit, work.invoices[invoice_id], take)
        work.credits[ckey] = credit
        touched[ckey] = credit
    # Then unapplied cash, oldest credit first.
    touched.update(work.apply_free_cash())
    work.close(touched)
    return work.step(unseen_dunning=unseen)


def cancel_invoice(
    ledger: Ledger, recall: Recall, *, invoice_id: str, convert: Converter | None = None
) -> Step:
    """An invoice is cancelled: the cash applied to it goes back to its credits, which
    apply it again (oldest invoices first, else unapplied)."""
    work = _Work(ledger, recall, convert)
    key = invoice_key(invoice_id)
    inv = work.invoices.pop(invoice_id, None)
    if inv is None:
        record = work.archived_item(key)
        if record is None:
            # The invoice is to come: it arrives cancelled; cash held for it goes on.
            work.close(work.release_holds(invoice_id))
            return work.step(cancelled_early=ledger.cancelled_early | {invoice_id})
        if record.status == "cancelled" or record.invoice is None:
            return Step(ledger)
        inv = work.bring_back_invoice(record)
    if inv.order_id:
        work.ordered.append((inv.order_id, -inv.amount))
    work.need(a[0] for a in inv.applied)
    freed: dict[str, Credit] = {}
    for ckey, amount, *_ in inv.applied:
        credit = work.credits.get(ckey) or freed.get(ckey)
        if credit is None:
            record = work.archived_item(ckey)
            assert record is not None and record.credit is not None
            credit = work.bring_back_credit(record)
        credit = replace(credit, applied=_without(credit.applied, invoice_id, amount))
        freed[ckey] = credit
        work.credits[ckey] = credit
    work.archive(key, "cancelled", invoice=inv.with_applied(()))
    for ckey in sorted(freed, key=lambda k: (freed[k].on, k)):
        freed[ckey] = work.credits[ckey] = work.fifo(work.credits[ckey])
    work.close(freed)
    return work.step()


def _merged(
    applications: tuple[Application, ...],
    other: str,
    amount: Decimal,
    original: Decimal,
    ccy: str,
) -> tuple[Application, ...]:
    for n, (key, have, have_original, have_ccy) in enumerate(applications):
        if key == other:
            merged = (key, have + amount, have_original + original, have_ccy)
            return (*applications[:n], merged, *applications[n + 1 :])
    return (*applications, (other, amount, original, ccy))


def _without(
    applications: tuple[Application, ...], other: str, amount: Decimal
) -> tuple[Application, ...]:
    """The applications but the one with ``other`` (one per pair: see ``_merged``)."""
    return tuple(a for a in applications if a[0] != other)


def receive_credit(
    ledger: Ledger,
    recall: Recall,
    *,
    kind: CreditKind,
    credit_id: str,
    amount: Decimal,
    on: date,
    original: tuple[Decimal, str],
    allocations: tuple[Application, ...] = (),
    convert: Converter | None = None,
) -> Step:
    """A payment or credit note arrives: explicit allocations first (held for invoices not
    seen yet), the rest to the oldest open invoices, what is left unapplied."""
    work = _Work(ledger, recall, convert)
    key = credit_key(kind, credit_id)
    figures = (original, on, tuple((a[0], a[2], a[3]) for a in allocations))
    known = ledger.credits.get(key)
    if known is None:
        record = work.archived_item(key)
        if record is not None and record.credit is not None:
            known = record.credit
    if known is not None:
        requested = tuple((a[0], a[2], a[3]) for a in known.allocations)
        if (known.original, known.on, requested) != figures:
            what = "payment" if kind == "payment" else "credit note"
            raise LedgerConflict(
                f"{what} {credit_id!r}", "payment_id" if kind == "payment" else "credit_note_id"
            )
        return Step(ledger)
    credit = Credit(key, kind, amount, on, original, allocations)
    if kind == "payment" and credit_id in ledger.reversed_early:
        # Its reversal came first: it arrives reversed.
        work.archive(key, "reversed", credit=credit)
        return work.step(reversed_early=ledger.reversed_early - {credit_id})
    work.need(invoice_key(a[0]) for a in allocations if a[0] not in ledger.cancelled_early)
    for invoice_id, wanted_amount, wanted_original, wanted_ccy in allocations:
        left = credit.free
        if left <= 0:
            break
        inv = work.invoices.get(invoice_id)
        if inv is not None:
            credit, inv = work.apply(credit, inv, min(wanted_amount, inv.open, left))
            work.invoices[invoice_id] = inv
        elif (
            invoice_id not in ledger.cancelled_early
            and work.archived_item(invoice_key(invoice_id)) is None
        ):
            # An invoice not seen yet: the cash waits for it.
            held = min(wanted_amount, left)
            share = (wanted_original, wanted_ccy) if held == wanted_amount else credit.share(held)
            credit = replace(credit, held=(*credit.held, (invoice_id, held, *share)))
        # Settled or cancelled already: the cash goes on to the oldest open invoices.
    credit = work.fifo(credit)
    work.credits[key] = credit
    work.close({key: credit})
    return work.step()


def reverse_payment(
    ledger: Ledger, recall: Recall, *, payment_id: str, convert: Converter | None = None
) -> Step:
    """A payment is reversed: every invoice it paid is open again by that much."""
    work = _Work(ledger, recall, convert)
    key = credit_key("payment", payment_id)
    credit = work.credits.pop(key, None)
    if credit is None:
        record = work.archived_item(key)
        if record is None:
            # The payment is to come: it arrives reversed.
            return Step(replace(ledger, reversed_early=ledger.reversed_early | {payment_id}))
        if record.status == "reversed" or record.credit is None:
            return Step(ledger)
        credit = work.bring_back_credit(record)
    work.need(invoice_key(a[0]) for a in credit.applied)
    for invoice_id, amount, *_ in credit.applied:
        inv = work.invoices.get(invoice_id)
        if inv is None:
            record = work.archived_item(invoice_key(invoice_id))
            if record is None or record.invoice is None or record.status == "cancelled":
                continue
            inv = work.bring_back_invoice(record)
        inv = inv.with_applied(_without(inv.applied, key, amount))
        work.invoices[invoice_id] = inv
    work.archive(key, "reversed", credit=replace(credit, applied=(), held=()))
    # Invoices open again take what unapplied cash there is.
    work.close(work.apply_free_cash())
    return work.step()


def record_dunning(
    ledger: Ledger,
    recall: Recall,
    *,
    invoice_id: str,
    dunning: Dunning,
) -> Step:
    """The dunning system's word on an invoice; an older run arriving late is ignored. For
    an invoice paid or cancelled already it changes nothing; for one never seen it counts
    (conservatively) as overdue."""
    inv = ledger.invoices.get(invoice_id)
    if inv is not None:
        if inv.dunning is not None and inv.dunning.as_of > dunning.as_of:
            return Step(ledger)
        invoices = {**ledger.invoices, invoice_id: replace(inv, dunning=dunning)}
        return Step(replace(ledger, invoices=invoices))
    key = invoice_key(invoice_id)
    if key not in recall:
        raise NeedRecall([key])
    if recall[key] is not None:
        return Step(ledger)
    known = ledger.unseen_dunning.get(invoice_id)
    if known is not None and known.as_of > dunning.as_of:
        return Step(ledger)
    return Step(replace(ledger, unseen_dunning={**ledger.unseen_dunning, invoice_id: dunning}))


# ---- the contract's receivables events ------------------------------------------------------

# The events the ledger folds (contract §1: ar.invoices, ar.payments, ar.overdue).
EVENT_TYPES = frozenset(
    {
        "invoice.issued",
        "invoice.cancelled",
        "credit_note.issued",
        "payment.received",
        "payment.reversed",
        "invoice.overdue",
    }
)


def record(ledger: Ledger, recall: Recall, event_type: str, data: Any, convert: Converter) -> Step:
    """Fold one receivables event (its validated data) into the ledger. ``convert(amount,
    currency, field)`` turns an amount as received into the ledger's currency (and raises
    what the caller sets aside, e.g. a ``no_fx_rate`` dead letter); it also converts
    archived items that come back after a change of currency."""
    if event_type == "invoice.issued":
        return issue_invoice(
            ledger,
            recall,
            invoice_id=data.invoice_id,
            amount=convert(data.amount, data.currency, "amount"),
            issue_date=data.issue_date,
            due_date=data.due_date,
            original=(data.amount, data.currency),
            order_id=data.order_id,
            convert=convert,
        )
    if event_type == "invoice.cancelled":
        return cancel_invoice(ledger, recall, invoice_id=data.invoice_id, convert=convert)
    if event_type in ("credit_note.issued", "payment.received"):
        if event_type == "payment.received":
            kind: CreditKind = "payment"
            credit_id, on = data.payment_id, data.received_date
            wanted_allocations = [(a.invoice_id, a.amount) for a in (data.allocations or ())]
        else:
            kind = "credit_note"
            credit_id, on = data.credit_note_id, data.issue_date
            wanted_allocations = [(data.invoice_id, data.amount)] if data.invoice_id else []
        allocations = tuple(
            (
                invoice_id,
                convert(amount, data.currency, "allocations.amount"),
                amount,
                data.currency,
            )
            for invoice_id, amount in wanted_allocations
        )
        return receive_credit(
            ledger,
            recall,
            kind=kind,
            credit_id=credit_id,
            amount=convert(data.amount, data.currency, "amount"),
            on=on,
            original=(data.amount, data.currency),
            allocations=allocations,
            convert=convert,
        )
    if event_type == "payment.reversed":
        return reverse_payment(ledger, recall, payment_id=data.payment_id, convert=convert)
    if event_type == "invoice.overdue":
        dunning = Dunning(
            data.as_of,
            data.days_overdue,
            convert(data.amount_overdue, data.currency, "amount_overdue"),
            data.due_date,
            (data.amount_overdue, data.currency),
        )
        return record_dunning(ledger, recall, invoice_id=data.invoice_id, dunning=dunning)
    raise ValueError(f"not a receivables event: {event_type!r}")


class MemoryArchive:
    """A customer's ledger archive in a dict: for folds of stored events in memory (answers
    about the past, backtests, tests) — what a service keeps in its archive table."""

    def __init__(self) -> None:
        self.items: dict[str, Archived] = {}

    def fold(self, evolve: Callable[[Recall], T]) -> T:
        """``evolve(recall)``, with whatever archived items it asks for (``NeedRecall``)."""
        recall: dict[str, Archived | None] = {}
        while True:
            try:
                return evolve(recall)
            except NeedRecall as need:
                recall.update({k: self.items.get(k) for k in need.keys})

    def keep(self, step: Step) -> None:
        """What a step moved out of the hot state, and back into it."""
        for key in step.restored:
            self.items.pop(key, None)
        for item in step.archived:
            self.items[item.key] = item


class Refold(Generic[S]):
    """A customer's events folded in memory with an archive of its own (``MemoryArchive``):
    answers about the past, backtests, tests — what a service does with its tables. Events
    that raise ``skip`` (what the service dead-letters) are kept in ``rejected`` and change
    nothing."""

    def __init__(self, state: S) -> None:
        self.state = state
        self.memory = MemoryArchive()
        self.rejected: list[Exception] = []

    def apply(self, evolve: Callable[[S, Recall], S], skip: type[Exception]) -> S:
        """``evolve(state, recall)`` with the archived items it asks for; what its step
        moves is kept in the archive."""
        before = self.state
        try:
            nxt = self.memory.fold(lambda recall: evolve(before, recall))
        except skip as exc:
            self.rejected.append(exc)
            return before
        step = getattr(nxt, "step", None)
        if step is not None and step is not getattr(before, "step", None):
            self.memory.keep(step)
        self.state = nxt
        return nxt


# ---- a change of currency -------------------------------------------------------------------


def _conv_all(
    items: tuple[Application, ...], convert: Converter, what: str
) -> tuple[Application, ...]:
    return tuple((k, convert(o, ccy, what), o, ccy) for k, _, o, ccy in items)


def _dunning_in(d: Dunning, convert: Converter, what: str) -> Dunning:
    return replace(d, amount_overdue=convert(d.original[0], d.original[1], what))


def _invoice_in(inv: Invoice, convert: Converter) -> Invoice:
    """An invoice's amounts converted from what was received (itself and what paid it)."""
    what = f"invoice {inv.invoice_id}"
    return replace(
        inv,
        amount=convert(inv.original[0], inv.original[1], what),
        dunning=_dunning_in(inv.dunning, convert, what) if inv.dunning is not None else None,
    ).with_applied(_conv_all(inv.applied, convert, what))


def _credit_in(credit: Credit, convert: Converter) -> Credit:
    k = credit.key
    return replace(
        credit,
        amount=convert(credit.original[0], credit.original[1], k),
        allocations=_conv_all(credit.allocations, convert, k),
        applied=_conv_all(credit.applied, convert, k),
        held=_conv_all(credit.held, convert, k),
    )


def reexpress(ledger: Ledger, currency: str, convert: Converter) -> Ledger:
    """The ledger in another currency: every amount converted from the amount as received
    (``convert(amount, from_currency, what)``), so none is converted twice. Items in the
    archive are converted when they come back (``Archived.currency``; give the ledger's
    operations the converter). Each item is rounded on its own: totals may differ by a
    minor unit from converting sums."""
    if currency == ledger.currency:
        return ledger
    return replace(
        ledger,
        currency=currency,
        invoices={k: _invoice_in(inv, convert) for k, inv in ledger.invoices.items()},
        credits={k: _credit_in(c, convert) for k, c in ledger.credits.items()},
        unseen_dunning={
            k: _dunning_in(d, convert, f"dunning {k}") for k, d in ledger.unseen_dunning.items()
        },
    )


__all__ = [
    "BUCKETS",
    "EVENT_TYPES",
    "Ageing",
    "Archived",
    "Converter",
    "Credit",
    "Dunning",
    "Invoice",
    "Ledger",
    "LedgerConflict",
    "MemoryArchive",
    "NeedRecall",
    "Outcome",
    "Recall",
    "Refold",
    "Step",
    "ageing",
    "bucket_of",
    "cancel_invoice",
    "credit_key",
    "days_overdue",
    "invoice_key",
    "invoiced_on_order",
    "issue_invoice",
    "new_ledger",
    "next_ageing_date",
    "open_receivables",
    "receive_credit",
    "record",
    "record_dunning",
    "reexpress",
    "reverse_payment",
    "wanted",
    "wanted_by",
]
