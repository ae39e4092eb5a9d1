"""REFERENCE ONLY — the limits domain of the previous layout (before limits_0007, issue 20),
frozen as it was (``git show d20291f:services/limits/domain.py``): every invoice, payment,
credit note and dunning notice a customer ever had in its state, the open items derived from
scratch with its own allocation (all explicit allocations first, then every credit's rest to
the oldest open invoices, whatever the order the facts came in), and the id-keyed caches of
derived figures. Used only by tests/unit/test_limits_domain.py, to fold the same streams both
ways. Not maintained: do not import it from the services.

The docstring of the module as it was follows.

Limits domain: a customer's exposure, limit and credit decisions as pure functions.

``apply(state, event, policy)`` folds one event into a ``CustomerState``; ``figures`` derives
exposure, ageing and reservations from the facts; ``decide_credit_check`` judges an order.
No I/O and no clock: time always comes in as an argument.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from shared.events import DeadLetter
from shared.money import convert, quantize
from shared.policy import Policy

ZERO = Decimal(0)
BUCKETS = ("1-30", "31-60", "61-90", "90+")
NO_FX_RATE = "no_fx_rate"
# An invoice, payment or credit note number seen before, under another event id, with other
# figures: a correction this service cannot tell from a mistake (the first one stands).
CONFLICTING_DUPLICATE = "conflicting_duplicate"

LimitSource = Literal["policy", "manual", "temporary", "unrated"]


# ---- facts ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Invoice:
    invoice_id: str
    amount: Decimal  # in the customer's credit currency
    issue_date: date
    due_date: date
    order_id: str | None = None
    cancelled: bool = False
    # As invoiced, so that a later change of credit currency converts it exactly once.
    original: tuple[Decimal, str] | None = None


@dataclass(frozen=True, slots=True)
class Credit:
    """Money in the customer's favour: a payment or a credit note, with its allocations."""

    credit_id: str
    kind: Literal["payment", "credit_note"]
    amount: Decimal
    on: date
    allocations: tuple[tuple[str, Decimal], ...] = ()
    reversed: bool = False
    # Amount, allocations and currency as received (see Invoice.original).
    original: tuple[Decimal, str] | None = None
    original_allocations: tuple[tuple[str, Decimal], ...] = ()


@dataclass(frozen=True, slots=True)
class Dunning:
    """The dunning system's view of one invoice (``invoice.overdue``)."""

    as_of: date
    days_overdue: int
    amount_overdue: Decimal
    due_date: date
    original: tuple[Decimal, str] | None = None


@dataclass(frozen=True, slots=True)
class Reservation:
    """A live reservation; one that is released or expires is gone from the state."""

    order_id: str
    check_id: str
    amount: Decimal  # in the customer's credit currency
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class ManualLimit:
    amount: Decimal
    request_id: str
    changed_by: str
    requested_by: str
    expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class LimitRequest:
    request_id: str
    requested_limit: Decimal
    reason: str
    requested_by: str
    submitted_at: datetime
    expires_at: datetime | None = None
    status: Literal["pending", "approved", "rejected"] = "pending"
    decided_by: str | None = None
    note: str | None = None


@dataclass(frozen=True, slots=True)
class Hold:
    reason: str
    by: str
    since: datetime


@dataclass(frozen=True, slots=True)
class CustomerState:
    customer_id: str
    currency: str
    name: str | None = None
    registered: bool = False
    payment_terms_days: int = 30
    parent_id: str | None = None
    invoices: Mapping[str, Invoice] = field(default_factory=dict)
    credits: Mapping[str, Credit] = field(default_factory=dict)
    dunning: Mapping[str, Dunning] = field(default_factory=dict)
    reservations: Mapping[str, Reservation] = field(default_factory=dict)
    requests: Mapping[str, LimitRequest] = field(default_factory=dict)
    grade: str | None = None
    # The grade the policy limit follows: the grade itself, unless the policy's
    # dynamic_adjustment is off, when it stays the first grade the customer had.
    limit_grade: str | None = None
    # The standing manual limit (approved without an end); a temporary limit overlays it
    # while it lasts, and when it ends what stood before stands again.
    manual: ManualLimit | None = None
    temporary: ManualLimit | None = None
    limit_lapsed: bool = False
    hold: Hold | None = None
    # Unresolved alerts about this customer (alert_id → rule), from credit.alerts.
    open_alerts: Mapping[str, str] = field(default_factory=dict)
    as_of: date | None = None
    last_time: datetime | None = None


def new_customer(customer_id: str, policy: Policy) -> CustomerState:
    return CustomerState(customer_id=customer_id, currency=policy.base_currency)


def known(state: CustomerState) -> bool:
    """Whether the service has heard of the customer from a business fact — registration,
    receivables, an assessment, a limit request, a hold — rather than only from credit
    checks (order entry asking about an id, perhaps mistyped) or alerts. An unknown customer
    gets no credit (``no_credit_limit``, whatever the policy grants the unrated), is not in
    the portfolio, and its exposure is not published."""
    return (
        state.registered
        or state.grade is not None
        or bool(state.invoices)
        or bool(state.credits)
        or bool(state.dunning)
        or bool(state.requests)
        or state.manual is not None
        or state.temporary is not None
        or state.hold is not None
    )


# ---- derived figures ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Figures:
    currency: str
    open_receivables: Decimal
    overdue_amount: Decimal
    overdue_buckets: dict[str, Decimal]
    max_days_overdue: int
    reserved: Decimal
    limit: Decimal
    limit_source: LimitSource
    limit_expires_at: datetime | None
    on_hold: bool

    @property
    def exposure(self) -> Decimal:
        return self.open_receivables + self.reserved

    @property
    def available(self) -> Decimal:
        return self.limit - self.exposure

    @property
    def utilization(self) -> Decimal | None:
        if self.limit == 0:
            return None
        return (self.exposure / self.limit).quantize(Decimal("0.0001"))


def effective_limit(
    state: CustomerState, policy: Policy, at: datetime | None = None
) -> tuple[Decimal, LimitSource, datetime | None]:
    """Manual limit while it stands; else the policy's limit for the grade (or unrated)."""
    temporary = state.temporary
    if temporary is not None and (
        temporary.expires_at is None or at is None or temporary.expires_at > at
    ):
        return temporary.amount, "temporary", temporary.expires_at
    manual = state.manual
    if manual is not None and (manual.expires_at is None or at is None or manual.expires_at > at):
        return manual.amount, "manual", manual.expires_at
    if state.grade is None:
        amount = policy.limits.unrated_limit
        return _to_ccy(amount, policy.base_currency, state.currency, policy), "unrated", None
    grade = state.limit_grade if state.limit_grade is not None else state.grade
    amount = policy.limits.by_grade.get(grade, ZERO)
    return _to_ccy(amount, policy.base_currency, state.currency, policy), "policy", None


def limit_in(amount: Decimal, from_ccy: str, to_ccy: str, policy: Policy) -> Decimal:
    """A limit in another currency (a group parent's, for a member): no rate, no credit."""
    return _to_ccy(amount, from_ccy, to_ccy, policy)


def _to_ccy(amount: Decimal, from_ccy: str, to_ccy: str, policy: Policy) -> Decimal:
    converted = convert(amount, from_ccy, to_ccy, policy.fx_rates())
    # A policy without a rate to the customer's currency grants nothing rather than guessing.
    return converted if converted is not None else ZERO


def open_items(state: CustomerState) -> dict[str, Decimal]:
    """Open amount per active invoice after allocating credits deterministically.

    Explicit allocations first (in arrival order), then the rest of every credit to the
    oldest open invoices (due date, issue date, id). Cash allocated to an invoice that has
    not arrived yet waits for it; it still lowers exposure (as unapplied cash) meanwhile.

    The result is shared by every state with the same invoices and credits (a credit check
    changes neither): read it, never change it.
    """
    items = _kept_items(state)
    if items is not None:
        return items
    items = _walk_open_items(state)
    if _remembering:
        _LEDGER.put(state.invoices, (state.credits, items, _receivables(state)))
    return items


def open_receivables(state: CustomerState) -> Decimal:
    """Invoices − credit notes − payments (cancelled and reversed ones excluded)."""
    hit = _kept_ledger(state)
    return hit[2] if hit is not None else _receivables(state)


def _receivables(state: CustomerState) -> Decimal:
    invoiced = sum((i.amount for i in state.invoices.values() if not i.cancelled), ZERO)
    credited = sum((c.amount for c in state.credits.values() if not c.reversed), ZERO)
    return invoiced - credited


def _kept_ledger(state: CustomerState) -> tuple[Any, dict[str, Decimal], Decimal] | None:
    """(credits, open items, open receivables) kept for this state's ledger, if they are
    (see ``remembering``)."""
    hit: tuple[Any, dict[str, Decimal], Decimal] | None = _LEDGER.get(state.invoices)
    return hit if hit is not None and hit[0] is state.credits else None


def _kept_items(state: CustomerState) -> dict[str, Decimal] | None:
    """The open items kept for this state's ledger, if they are."""
    hit = _kept_ledger(state)
    return hit[1] if hit is not None else None


def _walk_open_items(state: CustomerState) -> dict[str, Decimal]:
    open_amount = {
        inv.invoice_id: inv.amount for inv in state.invoices.values() if not inv.cancelled
    }
    if not state.credits:
        return open_amount
    pool = ZERO
    for credit in state.credits.values():
        if credit.reversed:
            continue
        left = credit.amount
        for invoice_id, amount in credit.allocations:
            if invoice_id in open_amount:
                take = min(amount, open_amount[invoice_id], left)
                if take > 0:
                    open_amount[invoice_id] -= take
                    left -= take
            elif invoice_id not in state.invoices:
                # Cash for an invoice not here yet waits for it: it lowers the receivables
                # (see _receivables) but pays off, and so hides the ageing of, nothing else.
                left -= min(amount, left)
        pool += left
    if pool <= 0:
        return open_amount
    active = [inv for inv in state.invoices.values() if not inv.cancelled]
    for inv in sorted(active, key=lambda i: (i.due_date, i.issue_date, i.invoice_id)):
        if pool <= 0:
            break
        take = min(pool, open_amount[inv.invoice_id])
        if take > 0:
            open_amount[inv.invoice_id] -= take
            pool -= take
    return open_amount


def reserved_amounts(state: CustomerState, at: datetime | None) -> dict[str, Decimal]:
    """What each live reservation still holds: its amount less what was invoiced on it."""
    reservations = state.reservations
    if not reservations:
        return {}
    invoiced = invoiced_on_orders(state.invoices)
    if not invoiced:
        return {
            res.order_id: res.amount
            for res in reservations.values()
            if (at is None or res.expires_at > at) and res.amount > 0
        }
    out: dict[str, Decimal] = {}
    for res in reservations.values():
        if at is None or res.expires_at > at:
            left = res.amount - invoiced.get(res.order_id, ZERO)
            if left > 0:
                out[res.order_id] = left
    return out


def reserved_total(state: CustomerState, at: datetime | None) -> Decimal:
    """``sum(reserved_amounts(state, at).values())``, without walking the reservations
    while none has lapsed by ``at`` and none is invoiced on (a credit check's case)."""
    reservations = state.reservations
    if not reservations:
        return ZERO
    held = _held(reservations)
    invoiced = invoiced_on_orders(state.invoices)
    if (at is None or (held.earliest is not None and held.earliest > at)) and (
        not invoiced or reservations.keys().isdisjoint(invoiced)
    ):
        return held.total
    return sum(reserved_amounts(state, at).values(), ZERO)


def reserved_for(state: CustomerState, order_id: str, at: datetime | None) -> Decimal:
    """What the order's live reservation still holds (0: none)."""
    res = state.reservations.get(order_id)
    if res is None or (at is not None and res.expires_at <= at):
        return ZERO
    left = res.amount - invoiced_on_orders(state.invoices).get(order_id, ZERO)
    return left if left > 0 else ZERO


def earliest_expiry(state: CustomerState) -> datetime | None:
    """When the first of the live reservations lapses."""
    return _held(state.reservations).earliest if state.reservations else None


class _Derived:
    """Values derived from the last few mappings of states. States are immutable and share
    a mapping until an event replaces it, so what is derived from one is reused by every
    state that has it. Entries hold their mapping, so its id is not reused meanwhile."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[int, tuple[Mapping[str, Any], Any]] = OrderedDict()

    def get(self, mapping: Mapping[str, Any]) -> Any:
        hit = self._items.get(id(mapping))
        return hit[1] if hit is not None and hit[0] is mapping else None

    def put(self, mapping: Mapping[str, Any], value: Any) -> None:
        self._items[id(mapping)] = (mapping, value)
        if len(self._items) > self.size:
            self._items.popitem(last=False)


@dataclass(frozen=True, slots=True)
class _Held:
    """The reservations' summed amounts and earliest expiry."""

    total: Decimal
    earliest: datetime | None


_INVOICED = _Derived(1024)  # invoices mapping → what is invoiced per order
# The ledger's figures are kept only where they are read again: by credit checks, which
# change no ledger mapping. A consumer's fold replaces the mapping with every ledger event,
# so keeping them there only cost time (12-18 % per event, measured) and memory.
_remembering = False


@contextmanager
def remembering() -> Iterator[None]:
    """Keep the ledger figures derived meanwhile (synchronous code only: no awaits inside,
    so that nothing else on the event loop runs with it)."""
    global _remembering
    before, _remembering = _remembering, True
    try:
        yield
    finally:
        _remembering = before


# invoices mapping → (credits, open items, open receivables)
_LEDGER = _Derived(4096)
# invoices mapping → (credits, dunning, business date, (overdue, buckets, worst days))
_AGED = _Derived(4096)
# invoices mapping → (credits, dunning, as_of, next ageing date)
_NEXT_AGEING = _Derived(4096)
_HELD = _Derived(4096)  # reservations mapping → _Held
_STEP = _Derived(4096)  # reservations mapping → (the mapping it was made from, order changed)


def changed_reservation(
    before: Mapping[str, Reservation], after: Mapping[str, Reservation]
) -> str | None:
    """The one order whose reservation differs, if ``after`` was made from ``before`` by one
    event here; None: not known (compare them)."""
    step: tuple[Mapping[str, Reservation], str] | None = _STEP.get(after)
    return step[1] if step is not None and step[0] is before else None


def invoiced_on_orders(invoices: Mapping[str, Invoice]) -> dict[str, Decimal]:
    """What is invoiced (not cancelled) per order id. Do not change the result."""
    if not invoices:
        return {}
    invoiced: dict[str, Decimal] | None = _INVOICED.get(invoices)
    if invoiced is None:
        invoiced = {}
        for inv in invoices.values():
            if inv.order_id and not inv.cancelled:
                invoiced[inv.order_id] = invoiced.get(inv.order_id, ZERO) + inv.amount
        _INVOICED.put(invoices, invoiced)
    return invoiced


def _held(reservations: Mapping[str, Reservation]) -> _Held:
    held: _Held | None = _HELD.get(reservations)
    if held is None:
        held = _Held(
            sum((r.amount for r in reservations.values()), ZERO),
            min((r.expires_at for r in reservations.values()), default=None),
        )
        _HELD.put(reservations, held)
    return held


def _with_reservations(
    state: CustomerState,
    reservations: dict[str, Reservation],
    added: Reservation | None,
    removed: Reservation | None,
) -> CustomerState:
    """``state`` with ``reservations`` (``added`` and/or ``removed`` against the state's):
    the summary follows from the state's own where that is known, without a walk."""
    known: _Held | None = _HELD.get(state.reservations)
    if known is not None and not (
        removed is not None and known.earliest is not None and removed.expires_at <= known.earliest
    ):
        total, earliest = known.total, known.earliest
        if removed is not None:
            total -= removed.amount
        if added is not None:
            total += added.amount
            earliest = added.expires_at if earliest is None else min(earliest, added.expires_at)
        _HELD.put(reservations, _Held(total, earliest))
    changed = added if added is not None else removed
    if changed is not None:
        _STEP.put(reservations, (state.reservations, changed.order_id))
    return replace(state, reservations=reservations)


def bucket_of(days: int) -> str | None:
    if days <= 0:
        return None
    if days <= 30:
        return "1-30"
    if days <= 60:
        return "31-60"
    if days <= 90:
        return "61-90"
    return "90+"


def ageing(
    state: CustomerState, on: date | None, items: dict[str, Decimal] | None = None
) -> tuple[Decimal, dict[str, Decimal], int]:
    """Overdue amount, buckets and worst days overdue as of business date ``on``.

    The service ages open invoices by due date (due today is not overdue); a dunning record
    overrides an invoice's days and amount as of its own date and ages on from there.
    """
    if on is None:
        return ZERO, dict.fromkeys(BUCKETS, ZERO), 0
    items = open_items(state) if items is None else items
    if items is _kept_items(state):
        # Derived once per invoices, credits, dunning and date (a check changes none).
        hit = _AGED.get(state.invoices)
        if hit is not None and hit[0] is state.credits and hit[1] is state.dunning and hit[2] == on:
            overdue, buckets, worst = hit[3]
            return overdue, dict(buckets), worst
        aged = _age(state, on, items)
        if _remembering:
            _AGED.put(state.invoices, (state.credits, state.dunning, on, aged))
        return aged[0], dict(aged[1]), aged[2]
    return _age(state, on, items)


def _age(
    state: CustomerState, on: date, items: dict[str, Decimal]
) -> tuple[Decimal, dict[str, Decimal], int]:
    buckets = dict.fromkeys(BUCKETS, ZERO)
    worst = 0
    invoices = state.invoices
    dunning = state.dunning
    for invoice_id, left in items.items():
        dun = dunning.get(invoice_id) if dunning else None
        if dun is not None and dun.as_of >= invoices[invoice_id].due_date:
            days = dun.days_overdue + max((on - dun.as_of).days, 0)
            amount = min(dun.amount_overdue, left)
        else:
            days = (on - invoices[invoice_id].due_date).days
            amount = left
        # Most open items are not due yet: nothing to add for them.
        if days > 0 and amount > 0:
            _add(buckets, days, amount)
            if days > worst:
                worst = days
    # Dunning for invoices we never saw: counted, conservatively, as overdue.
    for invoice_id, dun in dunning.items():
        if invoice_id in items or invoice_id in invoices:
            continue
        days = dun.days_overdue + max((on - dun.as_of).days, 0)
        _add(buckets, days, dun.amount_overdue)
        worst = max(worst, days)
    return sum(buckets.values(), ZERO), buckets, worst


def _add(buckets: dict[str, Decimal], days: int, amount: Decimal) -> None:
    name = bucket_of(days)
    if name is not None and amount > 0:
        buckets[name] += amount


def figures(
    state: CustomerState,
    policy: Policy,
    at: datetime | None = None,
    items: dict[str, Decimal] | None = None,
    reserved: Decimal | None = None,
    *,
    today: bool = False,
) -> Figures:
    """The exposure picture as of business time ``at`` (default: the last event's time),
    aged as of the later of its day and the latest business day the state has seen — or,
    with ``today``, as of ``at``'s own day (a credit check's "today": an event stamped in
    the future must not age the ledger ahead of it); ``items``/``reserved``:
    ``open_items(state)``/``reserved_total(state, at)`` if known."""
    at = at or state.last_time
    on = (at.astimezone(UTC) if at.utcoffset() else at).date() if at is not None else state.as_of
    if state.as_of is not None and (on is None or (state.as_of > on and not today)):
        on = state.as_of
    overdue, buckets, worst = ageing(state, on, items)
    limit, source, expires = effective_limit(state, policy, at)
    return Figures(
        currency=state.currency,
        open_receivables=open_receivables(state),
        overdue_amount=overdue,
        overdue_buckets=buckets,
        max_days_overdue=worst,
        reserved=reserved_total(state, at) if reserved is None else reserved,
        limit=limit,
        limit_source=source,
        limit_expires_at=expires,
        on_hold=state.hold is not None,
    )


def next_ageing_date(state: CustomerState, items: dict[str, Decimal] | None = None) -> date | None:
    """The next business date on which the ageing figures change (None: nothing open)."""
    items = open_items(state) if items is None else items
    if items is _kept_items(state):
        hit = _NEXT_AGEING.get(state.invoices)
        if (
            hit is not None
            and hit[0] is state.credits
            and hit[1] is state.dunning
            and hit[2] == state.as_of
        ):
            known: date | None = hit[3]
            return known
        first = _next_ageing_date(state, items)
        if _remembering:
            _NEXT_AGEING.put(state.invoices, (state.credits, state.dunning, state.as_of, first))
        return first
    return _next_ageing_date(state, items)


def _next_ageing_date(state: CustomerState, items: dict[str, Decimal]) -> date | None:
    invoices = state.invoices
    # Each open item and dunning record changes the figures the day after its date; only
    # the earliest of those days matters.
    first: date | None = None
    for invoice_id, left in items.items():
        if left > 0:
            due = invoices[invoice_id].due_date
            if first is None or due < first:
                first = due
    for invoice_id, dun in state.dunning.items():
        # Dunning ages only what is still open, or an invoice never seen (see _age); for an
        # invoice paid or cancelled since, it changes nothing: no day to age it on.
        if invoice_id in invoices and items.get(invoice_id, ZERO) <= 0:
            continue
        if first is None or dun.as_of < first:
            first = dun.as_of
    if first is None:
        return None
    earliest = first + timedelta(days=1)
    base = state.as_of if state.as_of is not None else earliest
    # While anything is overdue, days overdue move every day.
    if earliest <= base:
        return base + timedelta(days=1)
    return earliest


# ---- the fold -------------------------------------------------------------------------------


def _convert(
    amount: Decimal, ccy: str, state: CustomerState, policy: Policy, field_name: str
) -> Decimal:
    if ccy == state.currency:
        return amount
    converted = convert(amount, ccy, state.currency, policy.fx_rates())
    if converted is None:
        raise DeadLetter(
            NO_FX_RATE,
            f"data.{field_name}: no rate from {ccy} to {state.currency} in policy {policy.version}",
            field_name,
        )
    return converted


def apply(
    state: CustomerState, event_type: str, data: Any, time: datetime, policy: Policy
) -> CustomerState:
    """Fold one event into the customer's state. Raises ``DeadLetter`` when it cannot apply."""
    handler = _HANDLERS.get(event_type)
    if handler is None:
        return state
    if time.utcoffset():
        # Business days are UTC days, here as in the stored rows (UTC): an event stamped
        # 22:00-05:00 happened the next day, in memory and after a reload alike.
        time = time.astimezone(UTC)
    new: CustomerState = handler(state, data, time, policy)
    if event_type in ALERT_TYPES:
        return new  # our alerts service's view, not a business fact: it ages nothing
    stamp = time.date()
    if (
        new.as_of is not None
        and stamp <= new.as_of
        and new.last_time is not None
        and time <= new.last_time
    ):
        return new
    as_of = stamp if new.as_of is None or stamp > new.as_of else new.as_of
    last = time if new.last_time is None or time > new.last_time else new.last_time
    return replace(new, as_of=as_of, last_time=last)


def _customer(state: CustomerState, d: Any, _t: datetime, p: Policy) -> CustomerState:
    if d.currency != state.currency:
        state = _in_currency(state, d.currency, p)
    return replace(
        state,
        name=d.name,
        currency=d.currency,
        registered=True,
        payment_terms_days=d.payment_terms_days,
        parent_id=d.parent_id,
    )


def _in_currency(state: CustomerState, ccy: str, p: Policy) -> CustomerState:
    """The state re-expressed in a new credit currency.

    Facts from the ledger are converted from the amounts as received, so that an invoice
    folded before its customer's registration (in the base currency meanwhile) ends up
    exactly where it would have, had the registration come first. What the service decided
    itself (reservations, manual limits) was in the old credit currency and converts from it.
    """
    rates = p.fx_rates()

    def conv(amount: Decimal, original: tuple[Decimal, str] | None, what: str) -> Decimal:
        source, from_ccy = original if original is not None else (amount, state.currency)
        converted = convert(source, from_ccy, ccy, rates)
        if converted is None:
            raise DeadLetter(
                NO_FX_RATE,
                f"data.currency: {what} recorded in {from_ccy} cannot be converted "
                f"to {ccy} with the rates of policy {p.version}",
                "currency",
            )
        return converted

    invoices = {
        k: replace(i, amount=conv(i.amount, i.original, f"invoice {k}"))
        for k, i in state.invoices.items()
    }
    credits = {}
    for k, c in state.credits.items():
        if c.original is not None:
            alloc = tuple(
                (inv, conv(a, (a, c.original[1]), k)) for inv, a in c.original_allocations
            )
        else:
            alloc = tuple((inv, conv(a, None, k)) for inv, a in c.allocations)
        credits[k] = replace(c, amount=conv(c.amount, c.original, k), allocations=alloc)
    dunning = {
        k: replace(d, amount_overdue=conv(d.amount_overdue, d.original, f"dunning {k}"))
        for k, d in state.dunning.items()
    }
    reservations = {
        k: replace(r, amount=conv(r.amount, None, f"reservation {k}"))
        for k, r in state.reservations.items()
    }
    requests = {
        k: replace(r, requested_limit=conv(r.requested_limit, None, f"request {k}"))
        for k, r in state.requests.items()
    }
    manual = state.manual
    if manual is not None:
        manual = replace(manual, amount=conv(manual.amount, None, "the manual limit"))
    temporary = state.temporary
    if temporary is not None:
        temporary = replace(temporary, amount=conv(temporary.amount, None, "the temporary limit"))
    return replace(
        state,
        invoices=invoices,
        credits=credits,
        dunning=dunning,
        reservations=reservations,
        requests=requests,
        manual=manual,
        temporary=temporary,
    )


# A cancellation (reversal) that came before its invoice (payment) is kept as a cancelled
# (reversed) entry of amount zero, which the invoice (payment) takes the place of when it
# arrives, cancelled (reversed): whatever their order, the two leave the same state, and
# neither is lost. Real amounts are never zero (validated), so zero marks the stand-in.
def _stand_in(amount: Decimal, done: bool) -> bool:
    return done and amount == ZERO


def _same_or_conflict(
    kept: tuple[Any, ...] | None, again: tuple[Any, ...], what: str, field_name: str
) -> None:
    """A fact's number seen again under another event id: the same fact sent twice changes
    nothing; other figures under that number are set aside, not silently dropped."""
    if kept is not None and kept != again:
        raise DeadLetter(
            CONFLICTING_DUPLICATE,
            f"data.{field_name}: {what} was already received with other figures; the first stands",
            field_name,
        )


def _invoice_issued(state: CustomerState, d: Any, _t: datetime, p: Policy) -> CustomerState:
    known = state.invoices.get(d.invoice_id)
    if known is not None and not _stand_in(known.amount, known.cancelled):
        # The same invoice number twice under another event id: keep the first.
        _same_or_conflict(
            None
            if known.original is None
            else (known.original, known.issue_date, known.due_date, known.order_id),
            ((d.amount, d.currency), d.issue_date, d.due_date, d.order_id),
            f"invoice {d.invoice_id!r}",
            "invoice_id",
        )
        return state
    amount = _convert(d.amount, d.currency, state, p, "amount")
    inv = Invoice(
        d.invoice_id,
        amount,
        d.issue_date,
        d.due_date,
        d.order_id,
        cancelled=known is not None,
        original=(d.amount, d.currency),
    )
    return replace(state, invoices={**state.invoices, d.invoice_id: inv})


def _invoice_cancelled(state: CustomerState, d: Any, t: datetime, _p: Policy) -> CustomerState:
    inv = state.invoices.get(d.invoice_id)
    if inv is None:
        day = t.date()
        inv = Invoice(d.invoice_id, ZERO, day, day, cancelled=True)  # the invoice is to come
    elif inv.cancelled:
        return state
    return replace(state, invoices={**state.invoices, d.invoice_id: replace(inv, cancelled=True)})


def _credit_note(state: CustomerState, d: Any, _t: datetime, p: Policy) -> CustomerState:
    key = f"credit_note:{d.credit_note_id}"
    known = state.credits.get(key)
    if known is not None:
        _same_or_conflict(
            None
            if known.original is None
            else (known.original, known.on, known.original_allocations),
            (
                (d.amount, d.currency),
                d.issue_date,
                ((d.invoice_id, d.amount),) if d.invoice_id else (),
            ),
            f"credit note {d.credit_note_id!r}",
            "credit_note_id",
        )
        return state
    amount = _convert(d.amount, d.currency, state, p, "amount")
    alloc = ((d.invoice_id, amount),) if d.invoice_id else ()
    credit = Credit(
        key,
        "credit_note",
        amount,
        d.issue_date,
        alloc,
        original=(d.amount, d.currency),
        original_allocations=((d.invoice_id, d.amount),) if d.invoice_id else (),
    )
    return replace(state, credits={**state.credits, key: credit})


def _payment(state: CustomerState, d: Any, _t: datetime, p: Policy) -> CustomerState:
    key = f"payment:{d.payment_id}"
    known = state.credits.get(key)
    if known is not None and not _stand_in(known.amount, known.reversed):
        _same_or_conflict(
            None
            if known.original is None
            else (known.original, known.on, known.original_allocations),
            (
                (d.amount, d.currency),
                d.received_date,
                tuple((a.invoice_id, a.amount) for a in (d.allocations or ())),
            ),
            f"payment {d.payment_id!r}",
            "payment_id",
        )
        return state
    amount = _convert(d.amount, d.currency, state, p, "amount")
    alloc = tuple(
        (a.invoice_id, _convert(a.amount, d.currency, state, p, "allocations.amount"))
        for a in (d.allocations or ())
    )
    credit = Credit(
        key,
        "payment",
        amount,
        d.received_date,
        alloc,
        reversed=known is not None,
        original=(d.amount, d.currency),
        original_allocations=tuple((a.invoice_id, a.amount) for a in (d.allocations or ())),
    )
    return replace(state, credits={**state.credits, key: credit})


def _payment_reversed(state: CustomerState, d: Any, t: datetime, _p: Policy) -> CustomerState:
    key = f"payment:{d.payment_id}"
    credit = state.credits.get(key)
    if credit is None:
        credit = Credit(key, "payment", ZERO, t.date(), reversed=True)  # the payment to come
    elif credit.reversed:
        return state
    return replace(state, credits={**state.credits, key: replace(credit, reversed=True)})


def _overdue(state: CustomerState, d: Any, _t: datetime, p: Policy) -> CustomerState:
    known = state.dunning.get(d.invoice_id)
    if known is not None and known.as_of > d.as_of:
        return state  # an older dunning run arriving late does not override a newer one
    amount = _convert(d.amount_overdue, d.currency, state, p, "amount_overdue")
    dun = Dunning(
        d.as_of, d.days_overdue, amount, d.due_date, original=(d.amount_overdue, d.currency)
    )
    return replace(
        state,
        dunning={**state.dunning, d.invoice_id: dun},
        as_of=max(state.as_of, d.as_of) if state.as_of else d.as_of,
    )


def _assessed(state: CustomerState, d: Any, _t: datetime, p: Policy) -> CustomerState:
    # The grade always follows the assessments (eligibility, answers, the portfolio); with
    # dynamic_adjustment off, the policy limit stays that of the first grade.
    follows = state.grade is None or p.limits.dynamic_adjustment
    return replace(
        state, grade=d.grade, limit_grade=d.grade if follows else (state.limit_grade or state.grade)
    )


def _aged(state: CustomerState, d: Any, _t: datetime, _p: Policy) -> CustomerState:
    on: date = d.as_of
    return replace(state, as_of=on if state.as_of is None or on > state.as_of else state.as_of)


def _check_decided(state: CustomerState, d: Any, _t: datetime, _p: Policy) -> CustomerState:
    if d.decision != "approved" or not d.reserve:
        return state
    res = Reservation(d.order_id, d.check_id, d.amount_in_credit_currency, d.expires_at)
    return _with_reservations(
        state, {**state.reservations, d.order_id: res}, res, state.reservations.get(d.order_id)
    )


def _reservation_ended(state: CustomerState, d: Any, _t: datetime, _p: Policy) -> CustomerState:
    """Released or expired: the reservation goes (one made since for the order stays)."""
    res = state.reservations.get(d.order_id)
    if res is None or res.check_id != d.check_id:
        return state
    return _with_reservations(
        state, {k: r for k, r in state.reservations.items() if k != d.order_id}, None, res
    )


def _request_submitted(state: CustomerState, d: Any, t: datetime, p: Policy) -> CustomerState:
    req = LimitRequest(d.request_id, d.requested_limit, d.reason, d.requested_by, t, d.expires_at)
    state = replace(state, requests={**state.requests, d.request_id: req})
    current, _, _ = effective_limit(state, p, t)
    temporary = state.temporary
    if (
        temporary is not None
        and temporary.expires_at is not None
        and temporary.expires_at > t
        and (d.expires_at is None or d.expires_at > temporary.expires_at)
    ):
        # It would outlast the temporary limit in force: it must be lower than what stands
        # after that (the standing manual limit, or the policy's), too, or a "decrease" from
        # a temporary high would make the high last with nobody's approval.
        current = min(current, effective_limit(replace(state, temporary=None), p, t)[0])
    if d.requested_limit < current:
        # A decrease needs nobody's approval: less credit is always the safe side.
        return _grant(state, req, d.requested_by, None, t)
    return state


def _request_decided(approved: bool) -> Any:
    def _decide(state: CustomerState, d: Any, t: datetime, _p: Policy) -> CustomerState:
        req = state.requests.get(d.request_id)
        if req is None or req.status != "pending":
            return state
        if approved:
            return _grant(state, req, d.by, d.note, t)
        decided = replace(req, status="rejected", decided_by=d.by, note=d.note)
        return replace(state, requests={**state.requests, req.request_id: decided})

    return _decide


def _grant(
    state: CustomerState, req: LimitRequest, by: str, note: str | None, _t: datetime
) -> CustomerState:
    """A temporary limit overlays what stands (which stands again when it ends); a standing
    one replaces the standing limit and ends any temporary overlay (the latest decision
    governs)."""
    granted = ManualLimit(req.requested_limit, req.request_id, by, req.requested_by, req.expires_at)
    decided = replace(req, status="approved", decided_by=by, note=note)
    requests = {**state.requests, req.request_id: decided}
    if req.expires_at is not None:
        return replace(state, temporary=granted, limit_lapsed=False, requests=requests)
    return replace(state, manual=granted, temporary=None, limit_lapsed=False, requests=requests)


def _manual_expired(state: CustomerState, d: Any, _t: datetime, _p: Policy) -> CustomerState:
    """A temporary limit ended: what stood before it stands again (the standing manual limit,
    or the policy's; ``limit_lapsed`` says the latter, for ``limit_expired``)."""
    if state.temporary is None or state.temporary.request_id != d.request_id:
        return state
    return replace(state, temporary=None, limit_lapsed=state.manual is None)


def _hold_placed(state: CustomerState, d: Any, t: datetime, _p: Policy) -> CustomerState:
    return replace(state, hold=Hold(d.reason, d.by, t))


def _hold_released(state: CustomerState, _d: Any, _t: datetime, _p: Policy) -> CustomerState:
    return replace(state, hold=None)


def _alert(state: CustomerState, d: Any, _t: datetime, _p: Policy) -> CustomerState:
    alerts = dict(state.open_alerts)
    if d.status == "resolved":
        alerts.pop(d.alert_id, None)
    else:
        alerts[d.alert_id] = d.rule
    return replace(state, open_alerts=alerts)


ALERT_TYPES = frozenset({"alert.raised", "alert.updated", "alert.resolved"})

_HANDLERS: dict[str, Any] = {
    "customer.registered": _customer,
    "customer.updated": _customer,
    "invoice.issued": _invoice_issued,
    "invoice.cancelled": _invoice_cancelled,
    "credit_note.issued": _credit_note,
    "payment.received": _payment,
    "payment.reversed": _payment_reversed,
    "invoice.overdue": _overdue,
    "assessment.completed": _assessed,
    "ledger.aged": _aged,
    "credit_check.decided": _check_decided,
    "reservation.released": _reservation_ended,
    "reservation.expired": _reservation_ended,
    "limit_request.submitted": _request_submitted,
    "limit_request.approved": _request_decided(True),
    "limit_request.rejected": _request_decided(False),
    "limit.expired": _manual_expired,
    "hold.placed": _hold_placed,
    "hold.released": _hold_released,
    **dict.fromkeys(ALERT_TYPES, _alert),
}
HANDLED_TYPES = frozenset(_HANDLERS)


# ---- credit checks --------------------------------------------------------------------------

Decision = Literal["approved", "rejected", "review"]


@dataclass(frozen=True, slots=True)
class GroupView:
    """The group a customer belongs to, as seen under the group's lock, in the customer's
    currency."""

    parent_id: str
    limit: Decimal  # the parent's effective limit; 0 = the group has no limit
    exposure_without_customer: Decimal  # summed exposure of the other members


def in_currency(by_currency: Mapping[str, Decimal], ccy: str, policy: Policy) -> Decimal:
    """Amounts summed by currency (a group's members keep their own), in ``ccy`` with the
    policy's rates; an amount with no rate to ``ccy`` counts as it is (never as nothing)."""
    total = ZERO
    rates = policy.fx_rates()
    for code, amount in by_currency.items():
        converted = amount if code == ccy else convert(amount, code, ccy, rates)
        total += amount if converted is None else converted
    return total


@dataclass(frozen=True, slots=True)
class CheckOutcome:
    decision: Decision
    reasons: tuple[str, ...]
    amount: Decimal  # in the customer's credit currency
    limit: Decimal
    exposure: Decimal
    reserved: Decimal
    available: Decimal
    shortfall: Decimal
    grade: str | None
    group: dict[str, Decimal] | None = None


def decide_credit_check(
    state: CustomerState,
    *,
    order_id: str,
    amount: Decimal,
    currency: str,
    reserve: bool,
    policy: Policy,
    now: datetime,
    group: GroupView | None = None,
) -> CheckOutcome:
    """May this order go out on credit? Every applicable reason is listed.

    The order's own earlier reservation never counts against it (amendments), nor does
    what is already invoiced on it count twice; exposure landing exactly on the limit is
    within it; a shortfall of less than the policy's tolerance goes to a person (``review``;
    the contract: "exceeding the limit by less than the policy's tolerance").
    """
    lp = policy.limits
    reasons: list[str] = []
    hard = False
    converted = (
        amount
        if currency == state.currency
        else convert(amount, currency, state.currency, policy.fx_rates())
    )
    if converted is None:
        reasons.append("currency_mismatch")
        hard = True
        converted = ZERO
    # What is already invoiced on the order is in the receivables; the reservation only
    # ever holds the rest (see reserved_amounts), so only the rest is judged.
    invoiced = invoiced_on_orders(state.invoices).get(order_id, ZERO)
    needed = max(ZERO, converted - invoiced)
    reserved = reserved_total(state, now)
    fig = figures(state, policy, now, reserved=reserved, today=True)
    earlier = reserved_for(state, order_id, now)  # this order's own reservation (amendment)
    others_reserved = reserved - earlier
    exposure = fig.open_receivables + others_reserved
    # "Unknown customer or no limit → rejected, reason no_credit_limit" (contract).
    limit = effective_limit(state, policy, now)[0] if known(state) else ZERO
    has_own_limit = limit > 0
    in_group = group is not None and group.limit > 0

    if state.hold is not None:
        reasons.append("credit_hold")
        hard = True
    if state.grade is not None and lp.eligible_grades and state.grade not in lp.eligible_grades:
        reasons.append("grade_not_eligible")
        hard = True
    tolerated = _to_ccy(lp.overdue_tolerance_amount, policy.base_currency, state.currency, policy)
    if fig.max_days_overdue > lp.overdue_tolerance_days and fig.overdue_amount > tolerated:
        reasons.append("overdue_beyond_tolerance")
        hard = True
    if not has_own_limit and not in_group:
        temporary = state.temporary
        lapsed = state.limit_lapsed or (
            temporary is not None
            and temporary.expires_at is not None
            and temporary.expires_at <= now
            and state.manual is None
        )
        reasons.append("limit_expired" if lapsed else "no_credit_limit")
        hard = True

    review = False
    available = limit - exposure
    room = available
    if has_own_limit:
        over = needed - available
        if over > 0:
            reasons.append("exceeds_available")
            if over < lp.review_tolerance * limit:
                review = True
            else:
                hard = True
    group_figs: dict[str, Decimal] | None = None
    if group is not None and in_group:
        group_exposure = group.exposure_without_customer + exposure
        group_available = group.limit - group_exposure
        room = group_available if not has_own_limit else min(available, group_available)
        over = needed - group_available
        if over > 0:
            reasons.append("exceeds_group_available")
            if over < lp.review_tolerance * group.limit:
                review = True
            else:
                hard = True
        group_figs = {
            "limit": group.limit,
            "exposure": group_exposure,
            "available": group_available,
        }

    decision: Decision = "rejected" if hard else ("review" if review else "approved")
    if decision == "approved":
        reasons = ["within_limit"]
    shortfall = max(ZERO, needed - room)
    # Only an approved reservation replaces the order's earlier one; otherwise that stands.
    reserved_after = others_reserved + (needed if decision == "approved" and reserve else earlier)
    exposure_after = fig.open_receivables + reserved_after
    delta = exposure_after - exposure
    if group_figs is not None:
        group_figs = {
            "limit": group_figs["limit"],
            "exposure": group_figs["exposure"] + delta,
            "available": group_figs["available"] - delta,
        }
    shown_limit = limit if has_own_limit or group_figs is None else group_figs["limit"]
    shown_available = (
        shown_limit - exposure_after
        if has_own_limit
        else (group_figs["available"] if group_figs is not None else limit - exposure_after)
    )
    if has_own_limit and group_figs is not None:
        shown_available = min(shown_available, group_figs["available"])
    return CheckOutcome(
        decision=decision,
        reasons=tuple(reasons),
        amount=converted,
        limit=shown_limit,
        exposure=exposure_after,
        reserved=reserved_after,
        available=shown_available,
        shortfall=quantize(shortfall, state.currency) if shortfall else ZERO,
        grade=state.grade,
        group=group_figs,
    )


def reservation_expiry(now: datetime, policy: Policy) -> datetime:
    return now + timedelta(hours=int(policy.limits.reservation_ttl_hours))
