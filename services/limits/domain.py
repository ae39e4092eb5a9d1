"""Limits domain: a customer's exposure, limit and credit decisions as pure functions.

``evolve(state, event, policy)`` folds one event into a ``CustomerState``; ``figures``
derives exposure, ageing and reservations from it; ``decide_outputs`` says which output
events an event calls for (``limit.changed``, the request's and check's records) and
``decide_exposure`` whether the figures moved enough to publish ``exposure.updated``;
``decide_credit_check`` judges an order. No I/O and no clock: time always comes in as an
argument.

A customer's state is what is open: the receivables ledger's open items (shared.ledger),
the live reservations, the pending limit requests, the limit in force, the hold. Settled
invoices and applied payments are in the ledger's archive, read back only when an event
names them (``Event.recall``): the cost of the next event or check does not grow with the
customer's history.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

import orjson

from shared import ledger as lg
from shared.events import DeadLetter
from shared.ledger import replace
from shared.money import MONEY_CONTEXT, convert, is_currency, quantize
from shared.policy import Policy

ZERO = Decimal(0)
BUCKETS = lg.BUCKETS
NO_FX_RATE = "no_fx_rate"
# An invoice, payment or credit note number seen before, under another event id, with other
# figures: a correction this service cannot tell from a mistake (the first one stands).
CONFLICTING_DUPLICATE = "conflicting_duplicate"

LimitSource = Literal["policy", "manual", "temporary", "unrated"]


# ---- state ----------------------------------------------------------------------------------


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
    """A pending request (a decided one leaves the state: its record is a row of its own)."""

    request_id: str
    requested_limit: Decimal
    reason: str
    requested_by: str
    submitted_at: datetime
    expires_at: datetime | None = None


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
    # Heard of from a business fact (see ``known``); it stays so.
    heard_of: bool = False
    ledger: lg.Ledger = field(default_factory=lambda: lg.Ledger(""))
    # Per order with a live reservation: its invoices that left the ledger paid since (invoice
    # id → amount). With its open invoices, what the reservation no longer holds.
    consumed: Mapping[str, Mapping[str, Decimal]] = field(default_factory=dict)
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
    # What the last event did to the ledger (its archive moves): read by the caller after
    # ``evolve``, never stored.
    step: lg.Step | None = None


def new_customer(customer_id: str, policy: Policy) -> CustomerState:
    ccy = policy.base_currency
    return CustomerState(customer_id=customer_id, currency=ccy, ledger=lg.new_ledger(ccy))


def known(state: CustomerState) -> bool:
    """Whether the service has heard of the customer from a business fact — registration,
    receivables, an assessment, a limit request or a hold — rather than only from credit
    checks (order entry asking about an id, perhaps mistyped) or alerts. An unknown customer
    gets no credit (``no_credit_limit``, whatever the policy grants the unrated), is not in
    the portfolio, and its exposure is not published."""
    return (
        state.heard_of
        or state.registered
        or state.grade is not None
        or not state.ledger.empty
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
    """The temporary limit while it lasts, else the standing manual limit, else the policy's
    limit for the grade (or for the unrated)."""
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


def open_receivables(state: CustomerState) -> Decimal:
    """Open invoices less unapplied cash (negative: a credit balance)."""
    return lg.open_receivables(state.ledger)


def invoiced_on(state: CustomerState, order_id: str) -> Decimal:
    """What the reservation of ``order_id`` no longer holds: its open invoices, and those
    settled while it was live."""
    settled = sum(state.consumed.get(order_id, {}).values(), ZERO)
    return lg.invoiced_on_order(state.ledger, order_id) + settled


def _invoiced_by_order(state: CustomerState) -> dict[str, Decimal]:
    out = {k: sum(v.values(), ZERO) for k, v in state.consumed.items()}
    for inv in state.ledger.invoices.values():
        if inv.order_id and inv.order_id in state.reservations:
            out[inv.order_id] = out.get(inv.order_id, ZERO) + inv.amount
    return out


def reserved_amounts(state: CustomerState, at: datetime | None) -> dict[str, Decimal]:
    """What each live reservation still holds: its amount less what was invoiced on it."""
    if not state.reservations:
        return {}
    invoiced = _invoiced_by_order(state)
    out: dict[str, Decimal] = {}
    for res in state.reservations.values():
        if at is None or res.expires_at > at:
            left = res.amount - invoiced.get(res.order_id, ZERO)
            if left > 0:
                out[res.order_id] = left
    return out


def reserved_total(state: CustomerState, at: datetime | None) -> Decimal:
    return sum(reserved_amounts(state, at).values(), ZERO)


def reserved_for(state: CustomerState, order_id: str, at: datetime | None) -> Decimal:
    """What the order's live reservation still holds (0: none)."""
    res = state.reservations.get(order_id)
    if res is None or (at is not None and res.expires_at <= at):
        return ZERO
    left = res.amount - invoiced_on(state, order_id)
    return left if left > 0 else ZERO


def earliest_expiry(state: CustomerState) -> datetime | None:
    """When the first of the live reservations lapses."""
    return min((r.expires_at for r in state.reservations.values()), default=None)


def ageing_day(state: CustomerState, at: datetime | None, *, today: bool = False) -> date | None:
    """The business day figures are aged as of: ``at``'s UTC day, or the latest business day
    the state has seen if later (unless ``today``: a credit check's "today", which an event
    stamped in the future must not move ahead)."""
    at = at or state.last_time
    on = (at.astimezone(UTC) if at.utcoffset() else at).date() if at is not None else state.as_of
    if state.as_of is not None and (on is None or (state.as_of > on and not today)):
        on = state.as_of
    return on


def figures(
    state: CustomerState,
    policy: Policy,
    at: datetime | None = None,
    reserved: Decimal | None = None,
    *,
    today: bool = False,
) -> Figures:
    """The exposure picture as of business time ``at`` (default: the last event's time)."""
    at = at or state.last_time
    aged = lg.ageing(state.ledger, ageing_day(state, at, today=today))
    limit, source, expires = effective_limit(state, policy, at)
    return Figures(
        currency=state.currency,
        open_receivables=open_receivables(state),
        overdue_amount=aged.overdue,
        overdue_buckets=aged.buckets,
        max_days_overdue=aged.worst_days,
        reserved=reserved_total(state, at) if reserved is None else reserved,
        limit=limit,
        limit_source=source,
        limit_expires_at=expires,
        on_hold=state.hold is not None,
    )


def next_ageing_date(state: CustomerState) -> date | None:
    """The next business date on which the ageing figures change (None: nothing open)."""
    return lg.next_ageing_date(state.ledger, state.as_of)


def next_expiry(state: CustomerState) -> datetime | None:
    """When the scheduler next has something to record: a reservation or temporary limit
    ending."""
    times = [r.expires_at for r in state.reservations.values()]
    if state.temporary is not None and state.temporary.expires_at is not None:
        times.append(state.temporary.expires_at)
    return min(times) if times else None


# ---- the fold -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """One event as the fold sees it; ``recall``: the ledger items from the archive it names
    (the caller looks them up; the ledger raises ``NeedRecall`` for any it lacks)."""

    type: str
    data: Any
    time: datetime
    recall: lg.Recall = field(default_factory=dict)


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


def _converter(state: CustomerState, policy: Policy) -> lg.Converter:
    """Amounts as received into the customer's credit currency (for ledger items that come
    back from the archive after the credit currency changed)."""

    def convert(amount: Decimal, ccy: str, what: str) -> Decimal:
        return _convert(amount, ccy, state, policy, what)

    return convert


def evolve(state: CustomerState, event: Event, policy: Policy) -> CustomerState:
    """Fold one event into the customer's state. Raises ``DeadLetter`` when it cannot apply,
    ``ledger.NeedRecall`` when it needs archived ledger items it was not given. The new
    state's ``step`` is this event's ledger step if it is not the old state's one."""
    handler = _HANDLERS.get(event.type)
    if handler is None:
        return state
    time = event.time
    if time.utcoffset():
        # Business days are UTC days, here as in the stored rows (UTC).
        time = time.astimezone(UTC)
    try:
        new: CustomerState = handler(state, event.data, time, policy, event.recall)
    except lg.LedgerConflict as conflict:
        raise DeadLetter(
            CONFLICTING_DUPLICATE, f"data.{conflict.field_name}: {conflict}", conflict.field_name
        ) from None
    if event.type in ALERT_TYPES:
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


def _with_step(state: CustomerState, step: lg.Step) -> CustomerState:
    """The state after a ledger step. An invoice on an order with a live reservation that
    leaves the hot ledger paid (or credited) stays consumed from the reservation; one that
    comes back open, or is cancelled, no longer is."""
    consumed = state.consumed
    if step.archived or step.restored:
        changed = {k: dict(v) for k, v in consumed.items()}
        for item in step.archived:
            inv = item.invoice
            if inv is None or not inv.order_id:
                continue
            if item.status in ("settled", "credited") and inv.order_id in state.reservations:
                changed.setdefault(inv.order_id, {})[inv.invoice_id] = inv.amount
            elif item.status == "cancelled":
                changed.get(inv.order_id, {}).pop(inv.invoice_id, None)
        for key in step.restored:
            if key.startswith("invoice:"):
                for invoices in changed.values():
                    invoices.pop(key[len("invoice:") :], None)
        consumed = {k: v for k, v in changed.items() if v}
    return replace(state, ledger=step.ledger, consumed=consumed, heard_of=True, step=step)


def _customer(
    state: CustomerState, d: Any, _t: datetime, p: Policy, _r: lg.Recall
) -> CustomerState:
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

    The ledger converts its facts from the amounts as received, so that an invoice folded
    before its customer's registration (in the base currency meanwhile) ends up exactly where
    it would have, had the registration come first. What the service decided itself
    (reservations, manual limits, requests) was in the old credit currency and converts
    from it."""
    rates = p.fx_rates()

    def conv(amount: Decimal, from_ccy: str, what: str) -> Decimal:
        converted = convert(amount, from_ccy, ccy, rates)
        if converted is None:
            raise DeadLetter(
                NO_FX_RATE,
                f"data.currency: {what} recorded in {from_ccy} cannot be converted "
                f"to {ccy} with the rates of policy {p.version}",
                "currency",
            )
        return converted

    old = state.currency
    ledger = lg.reexpress(replace(state.ledger, currency=old), ccy, conv)
    reservations = {
        k: replace(r, amount=conv(r.amount, old, f"reservation {k}"))
        for k, r in state.reservations.items()
    }
    requests = {
        k: replace(r, requested_limit=conv(r.requested_limit, old, f"request {k}"))
        for k, r in state.requests.items()
    }
    consumed = {
        k: {i: conv(a, old, f"order {k}") for i, a in v.items()} for k, v in state.consumed.items()
    }
    manual = state.manual
    if manual is not None:
        manual = replace(manual, amount=conv(manual.amount, old, "the manual limit"))
    temporary = state.temporary
    if temporary is not None:
        temporary = replace(temporary, amount=conv(temporary.amount, old, "the temporary limit"))
    return replace(
        state,
        ledger=ledger,
        reservations=reservations,
        requests=requests,
        consumed=consumed,
        manual=manual,
        temporary=temporary,
    )


def _receivables(event_type: str) -> Any:
    """A receivables event: the shared ledger folds it (``ledger.record``); dunning also
    moves the business day the figures are aged as of."""

    def fold(
        state: CustomerState, d: Any, _t: datetime, p: Policy, recall: lg.Recall
    ) -> CustomerState:
        state = _with_step(
            state, lg.record(state.ledger, recall, event_type, d, _converter(state, p))
        )
        if event_type != "invoice.overdue":
            return state
        return replace(state, as_of=max(state.as_of, d.as_of) if state.as_of else d.as_of)

    return fold


def _assessed(
    state: CustomerState, d: Any, _t: datetime, p: Policy, _r: lg.Recall
) -> CustomerState:
    # The grade always follows the assessments (eligibility, answers, the portfolio); with
    # dynamic_adjustment off, the policy limit stays that of the first grade.
    follows = state.grade is None or p.limits.dynamic_adjustment
    return replace(
        state,
        grade=d.grade,
        limit_grade=d.grade if follows else (state.limit_grade or state.grade),
    )


def _aged(state: CustomerState, d: Any, _t: datetime, _p: Policy, _r: lg.Recall) -> CustomerState:
    on: date = d.as_of
    return replace(state, as_of=on if state.as_of is None or on > state.as_of else state.as_of)


def _check_decided(
    state: CustomerState, d: Any, _t: datetime, _p: Policy, _r: lg.Recall
) -> CustomerState:
    if d.decision != "approved" or not d.reserve:
        return state
    res = Reservation(d.order_id, d.check_id, d.amount_in_credit_currency, d.expires_at)
    return replace(state, reservations={**state.reservations, d.order_id: res})


def _reservation_ended(
    state: CustomerState, d: Any, _t: datetime, _p: Policy, _r: lg.Recall
) -> CustomerState:
    """Released or expired: the reservation goes (one made since for the order stays)."""
    res = state.reservations.get(d.order_id)
    if res is None or res.check_id != d.check_id:
        return state
    return replace(
        state,
        reservations={k: r for k, r in state.reservations.items() if k != d.order_id},
        consumed={k: v for k, v in state.consumed.items() if k != d.order_id},
    )


def _request_submitted(
    state: CustomerState, d: Any, t: datetime, p: Policy, _r: lg.Recall
) -> CustomerState:
    req = LimitRequest(d.request_id, d.requested_limit, d.reason, d.requested_by, t, d.expires_at)
    state = replace(state, requests={**state.requests, d.request_id: req}, heard_of=True)
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
        return _grant(state, req, d.requested_by)
    return state


def _request_decided(approved: bool) -> Any:
    def _decide(
        state: CustomerState, d: Any, _t: datetime, _p: Policy, _r: lg.Recall
    ) -> CustomerState:
        req = state.requests.get(d.request_id)
        if req is None:
            return state
        if approved:
            return _grant(state, req, d.by)
        return replace(
            state, requests={k: v for k, v in state.requests.items() if k != req.request_id}
        )

    return _decide


def _grant(state: CustomerState, req: LimitRequest, by: str) -> CustomerState:
    """A temporary limit overlays what stands (which stands again when it ends); a standing
    one replaces the standing limit and ends any temporary overlay (the latest decision
    governs)."""
    granted = ManualLimit(req.requested_limit, req.request_id, by, req.requested_by, req.expires_at)
    requests = {k: v for k, v in state.requests.items() if k != req.request_id}
    if req.expires_at is not None:
        return replace(state, temporary=granted, limit_lapsed=False, requests=requests)
    return replace(state, manual=granted, temporary=None, limit_lapsed=False, requests=requests)


def _manual_expired(
    state: CustomerState, d: Any, _t: datetime, _p: Policy, _r: lg.Recall
) -> CustomerState:
    """A temporary limit ended: what stood before it stands again (the standing manual limit,
    or the policy's; ``limit_lapsed`` says the latter, for ``limit_expired``)."""
    if state.temporary is None or state.temporary.request_id != d.request_id:
        return state
    return replace(state, temporary=None, limit_lapsed=state.manual is None)


def _hold_placed(
    state: CustomerState, d: Any, t: datetime, _p: Policy, _r: lg.Recall
) -> CustomerState:
    return replace(state, hold=Hold(d.reason, d.by, t), heard_of=True)


def _hold_released(
    state: CustomerState, _d: Any, _t: datetime, _p: Policy, _r: lg.Recall
) -> CustomerState:
    return replace(state, hold=None)


def _alert(state: CustomerState, d: Any, _t: datetime, _p: Policy, _r: lg.Recall) -> CustomerState:
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
    **{t: _receivables(t) for t in lg.EVENT_TYPES},
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


def recall_wanted(state: CustomerState, event_type: str, data: Any) -> set[str]:
    """The ledger archive keys an event may need (shared.ledger.wanted_by)."""
    return lg.wanted_by(state.ledger, event_type, data)


class Refold(lg.Refold[CustomerState]):
    """A customer's events folded from the event store in memory, its ledger archive kept
    in a dict (``as_of`` answers, backtests): events that cannot apply are skipped, as the
    service dead-lettered them."""

    def __init__(self, state: CustomerState, policy: Policy) -> None:
        super().__init__(state)
        self.policy = policy

    def evolve(self, event: Event) -> CustomerState:
        """Fold one event's facts."""
        return self.apply(
            lambda state, recall: evolve(state, replace(event, recall=recall), self.policy),
            DeadLetter,
        )


# ---- output events --------------------------------------------------------------------------

LIMIT_REASON = {
    "assessment.completed": "policy",
    "customer.registered": "policy",
    "customer.updated": "policy",
    "limit.expired": "expired",
    "hold.placed": "hold",
    "hold.released": "release",
}


def money(amount: Decimal, currency: str) -> str:
    """An amount as the API and events show it: the currency's minor units, no exponent."""
    if not is_currency(currency):
        # An ISO code without minor units (an order in XAU): shown as it was given.
        return format(amount, "f")
    key = (amount, currency, amount.is_signed())  # equal amounts, one spelling ("-0.00")
    text = _SHOWN.get(key)
    if text is None:
        quantum = _QUANTA.get(currency)
        if quantum is None:
            quantum = _QUANTA[currency] = quantize(Decimal(1), currency)
        text = format(amount.quantize(quantum, context=MONEY_CONTEXT), "f")
        if len(_SHOWN) >= _SHOWN_MAX:
            _SHOWN.clear()
        _SHOWN[key] = text
    return text


_QUANTA: dict[str, Decimal] = {}
# The amounts shown lately (a pure memo of a pure function): a credit check shows two dozen,
# most of them unchanged since the customer's last.
_SHOWN: dict[tuple[Decimal, str, bool], str] = {}
_SHOWN_MAX = 4096


def _iso(t: datetime | None) -> str | None:
    return t.isoformat().replace("+00:00", "Z") if t is not None else None


def exposure_body(state: CustomerState, fig: Figures) -> dict[str, Any]:
    """The ``exposure.updated`` body (contract §1)."""
    ccy = fig.currency
    util = fig.utilization
    return {
        "customer_id": state.customer_id,
        "currency": ccy,
        "open_receivables": money(fig.open_receivables, ccy),
        "overdue_amount": money(fig.overdue_amount, ccy),
        "overdue_buckets": {k: money(v, ccy) for k, v in fig.overdue_buckets.items()},
        "max_days_overdue": fig.max_days_overdue,
        "reserved": money(fig.reserved, ccy),
        "exposure": money(fig.exposure, ccy),
        "limit": money(fig.limit, ccy),
        "available": money(fig.available, ccy),
        "utilization": format(util, "f") if util is not None else None,
        "on_hold": fig.on_hold,
        "as_of": _iso(state.last_time),
    }


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """A limit request's record (a row of its own): pending, approved or rejected."""

    request_id: str
    status: Literal["pending", "approved", "rejected"]
    requested_by: str


@dataclass(frozen=True, slots=True)
class Outputs:
    """What one event calls for besides the state: the ``limit.changed`` body, the limit
    request's record."""

    limit_changed: dict[str, Any] | None = None
    request: RequestRecord | None = None


def decide_outputs(
    prev: CustomerState, nxt: CustomerState, event: Event, policy: Policy
) -> Outputs:
    """The output an applied event calls for (pure: ``prev`` and ``nxt`` are the states
    before and after it)."""
    data = event.data
    request: RequestRecord | None = None
    if event.type in (
        "limit_request.submitted",
        "limit_request.approved",
        "limit_request.rejected",
    ):
        req = prev.requests.get(data.request_id)
        if event.type == "limit_request.submitted":
            status: Any = "pending" if data.request_id in nxt.requests else "approved"
            request = RequestRecord(data.request_id, status, data.requested_by)
        elif req is not None:
            status = "approved" if event.type == "limit_request.approved" else "rejected"
            request = RequestRecord(data.request_id, status, req.requested_by)
    # A temporary limit stands until its expiry is recorded: judged at the expiry time
    # itself it would already have lapsed, and the change would go unpublished.
    before = effective_limit(prev, policy, None if event.type == "limit.expired" else event.time)
    after = effective_limit(nxt, policy, event.time)
    hold_changed = (prev.hold is None) != (nxt.hold is None)
    if (
        before[0] == after[0]
        and before[1] == after[1]
        and not hold_changed
        and prev.currency == nxt.currency
    ):
        return Outputs(request=request)
    reason = LIMIT_REASON.get(event.type) or (
        "temporary" if after[1] == "temporary" else "manual" if after[1] == "manual" else "policy"
    )
    request_id = changed_by = requested_by = None
    granted = {"manual": nxt.manual, "temporary": nxt.temporary}.get(after[1])
    if granted is not None:
        request_id = granted.request_id
        changed_by = granted.changed_by
        requested_by = granted.requested_by
    if event.type in ("hold.placed", "hold.released"):
        changed_by = data.by
    ccy = nxt.currency
    body = {
        "customer_id": nxt.customer_id,
        "previous_limit": money(before[0], prev.currency),
        "limit": money(after[0], ccy),
        "currency": ccy,
        "reason": reason,
        "grade": nxt.grade,
        "request_id": request_id,
        "changed_by": changed_by or "policy",
        "requested_by": requested_by,
        "effective_at": _iso(event.time),
        "expires_at": _iso(after[2]),
        "source": after[1],
        "on_hold": nxt.hold is not None,
        "policy_version": policy.version,
    }
    return Outputs(limit_changed=body, request=request)


def decide_exposure(
    state: CustomerState, fig: Figures, published: str | None
) -> dict[str, Any] | None:
    """The ``exposure.updated`` body to publish, or None: nothing for a customer only credit
    checks or alerts spoke of, and nothing when only ``as_of`` moved (``published`` is the
    last body published, without it, as ``exposure_key`` makes it)."""
    if not known(state):
        return None
    body = exposure_body(state, fig)
    return body if exposure_key(body) != published else None


def exposure_key(body: Mapping[str, Any]) -> str:
    """The body but for ``as_of``, as text: what must change for a publication."""
    return orjson.dumps({**body, "as_of": None}, option=orjson.OPT_SORT_KEYS).decode()


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
    invoiced = invoiced_on(state, order_id)
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
