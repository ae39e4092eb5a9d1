"""Golden streams: deterministic histories of a small portfolio that work the ledger hard.

Each stream is a list of steps in one fixed order — batches of input records as a producer
sent them (topic, key, value), API calls made the way an order-entry system or an analyst
makes them, and scheduler ticks — each at a fixed clock time. ``tests/golden/runner.py``
plays one through the three services and captures what they publish and answer.

The stream is made here from a seeded ``random.Random`` and integer arithmetic only (amounts
are ``Decimal`` built from whole cents, never through float), and depends on no product
module: a change to the product (or to ``tools/simulate.py``) must never change the
stream it is judged on. ``fingerprint`` names a stream's exact content; the golden files
record it, so an edit here shows up as "the stream changed", not as a wrong output.

Besides a base ledger per customer (seasonal invoicing; good, lump-sum, late, deteriorating
and heavy payers), every stream carries each of the hard cases below on some customer
(``HARD_CASES`` names them; ``Stream.cases`` says who has which):

- invoices with and without order ids, in another currency than the customer's, and in a
  currency the policy has no rate for (dead letter ``no_fx_rate``)
- payments with explicit allocations, without (oldest first), partial, overpaying (a credit
  balance), arriving before their invoice, allocated to an invoice that never comes, mixed
  (explicit plus a remainder)
- reversals (recent ones, one of a payment that settled its invoice months ago, and one that
  arrives before its payment); cancellations (open, paid, and before the invoice arrives)
- credit notes with and without an invoice id (one on an order-linked invoice)
- dunning (``invoice.overdue``) of unpaid invoices (twice, the older run arriving late), of
  an invoice never seen and of a paid one
- financial statements (annual and quarterly periods, a restatement, one arriving out of
  order, one in distress), credit reports (an insolvency, a lawsuit, defaults)
- late registration (facts first, in the base currency meanwhile), a change of credit
  currency, a change of terms, group parents with members (one in another currency)
- redelivered records, a conflicting duplicate, malformed records, an unknown type, a wrong
  topic, a time with a UTC offset
- credit checks (reserving, quotes then firm, retries, amendments up and down, releases,
  orders never invoiced whose reservations expire, partial invoicing, an unknown customer,
  another currency, a group member, on hold), limit requests (increase approved, increase
  rejected, decrease applied at once, a temporary limit that expires, one that ended before
  it was decided, a requester deciding its own), holds, assessment overrides (one that
  expires, one withdrawn), recomputes, alert acknowledgements (twice, and of a resolved one)
- a scheduler tick every morning (reservation and temporary-limit expiry, daily ageing,
  override expiry, reviews falling due)
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

# Principals the calls are made as: token → (principal, scopes).
TOKENS: dict[str, tuple[str, tuple[str, ...]]] = {
    "golden-orders": ("order-entry", ("credit:check",)),
    "golden-reader": ("rita", ("credit:read",)),
    "golden-analyst": (
        "ana",
        ("credit:read", "credit:write", "credit:approve", "credit:check", "alerts:write"),
    ),
    "golden-approver": ("bob", ("credit:read", "credit:approve", "alerts:write")),
}
ORDERS, READER, ANALYST, APPROVER = TOKENS

# The input topics (the contract's default names) and who consumes what is wired in runner.py.
CUSTOMERS = "crm.customers"
INVOICES = "ar.invoices"
PAYMENTS = "ar.payments"
OVERDUE = "ar.overdue"
FINANCIALS = "crm.financials"
REPORTS = "crm.credit-reports"

# seed → (customers, months). Three portfolios of different shapes.
SEEDS: dict[int, tuple[int, int]] = {11: (16, 13), 22: (18, 12), 33: (15, 15)}
START = date(2025, 1, 6)
BATCH_MAX = 40  # records in one consumed batch at most
TICK_AT = time(6, 0)
# The scheduler runs on Mondays and Thursdays only: in production it runs every second, but
# the current layout's daily ageing costs a fold of each customer's whole history, and every
# morning would triple the test's time. What is due in between is recorded at the next tick.
TICK_DAYS = frozenset({0, 3})

HARD_CASES = (
    "payment_before_invoice",
    "payment_for_unseen_invoice",
    "overpayment_credit_balance",
    "partial_payments",
    "lump_sum_oldest_first",
    "mixed_allocation",
    "reversal_recent",
    "reversal_of_old_settling_payment",
    "reversal_before_payment",
    "cancel_open_invoice",
    "cancel_paid_invoice",
    "cancel_before_invoice",
    "credit_note_with_invoice",
    "credit_note_without_invoice",
    "credit_note_on_order_invoice",
    "dunning_unpaid_twice_older_late",
    "dunning_never_seen_invoice",
    "dunning_paid_invoice",
    "statements_quarterly",
    "statement_restated",
    "statement_out_of_order",
    "statement_distress",
    "report_insolvency",
    "report_lawsuit_defaults",
    "late_registration_usd",
    "currency_change",
    "terms_change",
    "group",
    "foreign_currency_invoice",
    "no_fx_rate_invoice",
    "redelivery_and_conflicting_duplicate",
    "malformed_records",
    "offset_time",
    "checks_reserve_and_invoice",
    "checks_quote_retry_amend_release",
    "checks_expire_and_partial_invoice",
    "checks_unknown_currency_group_hold",
    "limit_requests",
    "temporary_limit_expires",
    "hold",
    "overrides_and_recompute",
    "alert_acknowledgements",
)


# ---- steps ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One input record as the producer sent it."""

    topic: str
    key: str
    value: bytes


@dataclass(frozen=True)
class Batch:
    """Input records consumed together (each service gets those of its topics)."""

    at: datetime
    records: tuple[Record, ...]


@dataclass(frozen=True)
class Call:
    """An HTTP call. ``path`` may name earlier answers: ``{ref:LABEL:FIELD}`` is FIELD of the
    answer to call LABEL; ``{alert:CUSTOMER:RULE}`` is the customer's active alert of that
    rule, ``{resolved:CUSTOMER:RULE}`` its latest resolved one; ``*`` for any customer or
    rule: the newest such alert (the call is recorded as not made when there is none)."""

    at: datetime
    label: str
    service: str
    method: str
    path: str
    token: str
    body: dict[str, Any] | None = None


@dataclass(frozen=True)
class Tick:
    """``run_due()`` on every service, in a fixed order."""

    at: datetime


Step = Batch | Call | Tick


@dataclass(frozen=True)
class Stream:
    seed: int
    steps: tuple[Step, ...]
    customers: tuple[str, ...]  # every id the stream speaks of (some never known)
    end: datetime  # the clock for the answers read after the stream
    as_of: tuple[datetime, ...]  # exposure as of these business times
    review_cutoffs: tuple[date, ...]  # GET /v1/reviews/due?before=…
    cases: dict[str, tuple[str, ...]] = field(default_factory=dict)  # case → customers

    def counts(self) -> dict[str, int]:
        out = {"batches": 0, "records": 0, "calls": 0, "ticks": 0}
        for step in self.steps:
            if isinstance(step, Batch):
                out["batches"] += 1
                out["records"] += len(step.records)
            elif isinstance(step, Call):
                out["calls"] += 1
            else:
                out["ticks"] += 1
        return out


def fingerprint(stream: Stream) -> str:
    """sha256 of the stream's steps, in order (what the golden files were made from)."""
    digest = hashlib.sha256()
    for step in stream.steps:
        if isinstance(step, Batch):
            digest.update(f"B|{step.at.isoformat()}\n".encode())
            for r in step.records:
                digest.update(f"{r.topic}|{r.key}|".encode() + r.value + b"\n")
        elif isinstance(step, Call):
            body = json.dumps(step.body, sort_keys=True)
            digest.update(
                f"C|{step.at.isoformat()}|{step.label}|{step.service}|{step.method}|"
                f"{step.path}|{step.token}|{body}\n".encode()
            )
        else:
            digest.update(f"T|{step.at.isoformat()}\n".encode())
    return digest.hexdigest()


# ---- helpers ----------------------------------------------------------------------------------

D = Decimal
CENT = D("0.01")
SEASON = [D(x) for x in ("1.00", "1.15", "1.26", "1.30", "1.26", "1.15")] + [
    D(x) for x in ("1.00", "0.85", "0.74", "0.70", "0.74", "0.85")
]


def _at(day: date, hour: int = 9, minute: int = 0) -> datetime:
    return datetime.combine(day, time(hour, minute), tzinfo=UTC)


def _iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def _m(amount: Decimal) -> str:
    return format(amount.quantize(CENT), "f")


def _envelope(
    type_: str, subject: str, data: dict[str, Any], *, id: str, at: datetime | str, source: str
) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": id,
        "source": source,
        "type": type_,
        "subject": subject,
        "time": at if isinstance(at, str) else _iso(at),
        "datacontenttype": "application/json",
        "data": data,
    }


@dataclass
class Company:
    cid: str
    profile: str  # good, lump, late, deteriorating, heavy
    size: Decimal
    terms: int
    currency: str
    industry: str
    country: str


@dataclass
class Inv:
    invoice_id: str
    cid: str
    amount: Decimal
    issue: date
    due: date
    order_id: str | None
    paid_on: date | None = None
    payment_id: str | None = None


@dataclass
class Pay:
    payment_id: str
    cid: str
    amount: Decimal
    received: date
    invoice_id: str | None


@dataclass(order=True)
class _Item:
    at: datetime
    rank: int  # ticks, then records, then calls at the same time
    n: int  # insertion order
    step: Any = field(compare=False)


class Builder:
    """Collects timed records and calls; ``build`` orders and batches them."""

    def __init__(self, seed: int, customers: int, months: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.start = START
        self.months = months
        self.end_day = START + timedelta(days=30 * months)
        self.items: list[_Item] = []
        self.companies: list[Company] = []
        self.invoices: dict[str, list[Inv]] = {}
        self.payments: dict[str, list[Pay]] = {}
        self.cases: dict[str, list[str]] = {}
        self.calls = 0
        self.extra_ids: list[str] = []
        self._n = 0
        self._count = customers

    # -- adding ----------------------------------------------------------------------------
    def _add(self, at: datetime, rank: int, step: Any) -> None:
        self._n += 1
        self.items.append(_Item(at, rank, self._n, step))

    def event(
        self,
        topic: str,
        type_: str,
        cid: str,
        data: dict[str, Any],
        *,
        id: str,
        at: datetime,
        source: str,
        arrive: datetime | None = None,
        stamp: str | None = None,
    ) -> dict[str, Any]:
        env = _envelope(type_, cid, data, id=id, at=stamp or at, source=source)
        self.raw(topic, cid, json.dumps(env).encode(), arrive or at)
        return env

    def raw(self, topic: str, key: str, value: bytes, arrive: datetime) -> None:
        if arrive.date() > self.end_day:
            return
        self._add(arrive, 1, Record(topic, key, value))

    def call(
        self,
        at: datetime,
        service: str,
        method: str,
        path: str,
        token: str,
        body: dict[str, Any] | None = None,
        *,
        label: str | None = None,
    ) -> str:
        self.calls += 1
        name = label or f"call-{self.calls:04d}"
        if at.date() <= self.end_day:
            self._add(at, 2, Call(at, name, service, method, path, token, body))
        return name

    def case(self, name: str, cid: str) -> None:
        assert name in HARD_CASES, name
        who = self.cases.setdefault(name, [])
        if cid not in who:
            who.append(cid)

    # -- contract events -------------------------------------------------------------------
    def register(
        self,
        co: Company,
        at: datetime,
        *,
        parent: str | None = None,
        type_: str = "customer.registered",
        currency: str | None = None,
        terms: int | None = None,
        id: str | None = None,
        name: str | None = None,
    ) -> None:
        data: dict[str, Any] = {
            "customer_id": co.cid,
            "name": name or f"{co.profile.title()} Trading {co.cid[-3:]}",
            "country": co.country,
            "industry": co.industry,
            "currency": currency or co.currency,
            "payment_terms_days": co.terms if terms is None else terms,
        }
        if parent:
            data["parent_id"] = parent
        self.event(
            CUSTOMERS, type_, co.cid, data, id=id or f"reg-{co.cid}", at=at, source="/gold/crm"
        )

    def invoice(
        self,
        co: Company,
        invoice_id: str,
        amount: Decimal,
        issue: date,
        *,
        order_id: str | None = None,
        due: date | None = None,
        currency: str | None = None,
        arrive: datetime | None = None,
        record: bool = True,
    ) -> Inv:
        due = due or issue + timedelta(days=co.terms)
        data: dict[str, Any] = {
            "invoice_id": invoice_id,
            "customer_id": co.cid,
            "amount": _m(amount),
            "currency": currency or co.currency,
            "issue_date": issue.isoformat(),
            "due_date": due.isoformat(),
        }
        if order_id:
            data["order_id"] = order_id
        self.event(
            INVOICES,
            "invoice.issued",
            co.cid,
            data,
            id=f"ev-{invoice_id}",
            at=_at(issue, 9),
            arrive=arrive,
            source="/gold/billing",
        )
        inv = Inv(invoice_id, co.cid, amount, issue, due, order_id)
        if record:
            self.invoices.setdefault(co.cid, []).append(inv)
        return inv

    def payment(
        self,
        co: Company,
        payment_id: str,
        amount: Decimal,
        received: date,
        allocations: list[tuple[str, Decimal]] | None,
        *,
        arrive: datetime | None = None,
        currency: str | None = None,
    ) -> Pay:
        data: dict[str, Any] = {
            "payment_id": payment_id,
            "customer_id": co.cid,
            "amount": _m(amount),
            "currency": currency or co.currency,
            "received_date": received.isoformat(),
        }
        if allocations is not None:
            data["allocations"] = [{"invoice_id": i, "amount": _m(a)} for i, a in allocations]
        self.event(
            PAYMENTS,
            "payment.received",
            co.cid,
            data,
            id=f"ev-{payment_id}",
            at=_at(received, 15),
            arrive=arrive,
            source="/gold/bank",
        )
        pay = Pay(
            payment_id,
            co.cid,
            amount,
            received,
            allocations[0][0] if allocations and len(allocations) == 1 else None,
        )
        self.payments.setdefault(co.cid, []).append(pay)
        return pay

    def reverse(self, co: Company, payment_id: str, on: date, *, hour: int = 10) -> None:
        self.event(
            PAYMENTS,
            "payment.reversed",
            co.cid,
            {"payment_id": payment_id, "customer_id": co.cid, "reason": "returned direct debit"},
            id=f"ev-rev-{payment_id}",
            at=_at(on, hour),
            source="/gold/bank",
        )

    def cancel(self, co: Company, invoice_id: str, on: date, *, hour: int = 10) -> None:
        self.event(
            INVOICES,
            "invoice.cancelled",
            co.cid,
            {"invoice_id": invoice_id, "customer_id": co.cid, "reason": "issued in error"},
            id=f"ev-cancel-{invoice_id}",
            at=_at(on, hour),
            source="/gold/billing",
        )

    def credit_note(
        self, co: Company, note_id: str, amount: Decimal, on: date, invoice_id: str | None
    ) -> None:
        data: dict[str, Any] = {
            "credit_note_id": note_id,
            "customer_id": co.cid,
            "amount": _m(amount),
            "currency": co.currency,
            "issue_date": on.isoformat(),
        }
        if invoice_id:
            data["invoice_id"] = invoice_id
        self.event(
            INVOICES,
            "credit_note.issued",
            co.cid,
            data,
            id=f"ev-{note_id}",
            at=_at(on, 11),
            source="/gold/billing",
        )

    def dunning(
        self,
        co: Company,
        invoice_id: str,
        amount: Decimal,
        due: date,
        as_of: date,
        *,
        arrive: datetime | None = None,
        run: str = "",
    ) -> None:
        self.event(
            OVERDUE,
            "invoice.overdue",
            co.cid,
            {
                "invoice_id": invoice_id,
                "customer_id": co.cid,
                "amount_overdue": _m(amount),
                "currency": co.currency,
                "due_date": due.isoformat(),
                "days_overdue": max((as_of - due).days, 0),
                "as_of": as_of.isoformat(),
            },
            id=f"ev-dun-{invoice_id}-{as_of.isoformat()}{run}",
            at=_at(as_of, 7),
            arrive=arrive,
            source="/gold/dunning",
        )

    def statement(
        self,
        co: Company,
        statement_id: str,
        period_end: date,
        published: date,
        *,
        months: int = 12,
        revenue: Decimal,
        distress: bool = False,
        factor: Decimal = D("1"),
        arrive: datetime | None = None,
    ) -> None:
        rng = self.rng
        revenue = (revenue * factor * months / 12).quantize(CENT)
        assets = (revenue * D("0.8") * 12 / months).quantize(CENT)
        if distress:
            liabilities = (assets * D("1.15")).quantize(CENT)
        else:
            liabilities = (assets * D(rng.randint(35, 70)) / 100).quantize(CENT)
        equity = assets - liabilities
        ca = (assets * D("0.55")).quantize(CENT)
        cl = (liabilities * (D("0.9") if distress else D("0.45"))).quantize(CENT)
        margin = D("-0.04") if distress else D(rng.randint(4, 12)) / 100
        ebit = (revenue * margin).quantize(CENT)
        self.event(
            FINANCIALS,
            "financial_statement.published",
            co.cid,
            {
                "statement_id": statement_id,
                "customer_id": co.cid,
                "period_end": period_end.isoformat(),
                "period_months": months,
                "currency": co.currency,
                "audited": months == 12,
                "balance_sheet": {
                    "cash": _m(ca * D("0.2")),
                    "receivables": _m(ca * D("0.5")),
                    "inventory": _m(ca * D("0.3")),
                    "current_assets": _m(ca),
                    "total_assets": _m(assets),
                    "current_liabilities": _m(cl),
                    "total_liabilities": _m(liabilities),
                    "equity": _m(equity),
                    "retained_earnings": _m(equity * D("0.4")),
                },
                "income_statement": {
                    "revenue": _m(revenue),
                    "ebit": _m(ebit),
                    "interest_expense": _m(liabilities * D("0.04") * months / 12),
                    "net_income": _m(ebit * D("0.7")),
                },
                "cash_flow": {"operating_cash_flow": _m(ebit * (D("2") if ebit < 0 else D("1.1")))},
            },
            id=f"ev-{statement_id}",
            at=_at(published, 11),
            arrive=arrive,
            source="/gold/finance",
        )

    def report(
        self,
        co: Company,
        report_id: str,
        on: date,
        *,
        score: int,
        legal: list[dict[str, str]] | None = None,
        delinquencies: int = 0,
        defaults: int = 0,
    ) -> None:
        self.event(
            REPORTS,
            "credit_report.received",
            co.cid,
            {
                "report_id": report_id,
                "customer_id": co.cid,
                "bureau": "GoldBureau",
                "score": score,
                "score_min": 100,
                "score_max": 1000,
                "delinquencies_12m": delinquencies,
                "defaults": defaults,
                "legal_events": legal or [],
                "reported_at": _iso(_at(on, 12)),
            },
            id=f"ev-{report_id}",
            at=_at(on, 12),
            source="/gold/bureau",
        )

    # -- service-made commands -----------------------------------------------------------------
    def check(
        self,
        at: datetime,
        cid: str,
        order_id: str,
        amount: Decimal | str,
        *,
        currency: str = "EUR",
        reserve: bool | None = None,
        label: str | None = None,
    ) -> str:
        body: dict[str, Any] = {
            "order_id": order_id,
            "customer_id": cid,
            "amount": amount if isinstance(amount, str) else _m(amount),
            "currency": currency,
        }
        if reserve is not None:
            body["reserve"] = reserve
        return self.call(at, "limits", "POST", "/v1/credit-checks", ORDERS, body, label=label)

    def release(self, at: datetime, order_id: str) -> str:
        return self.call(at, "limits", "DELETE", f"/v1/credit-checks/{order_id}", ORDERS)

    # -- build ---------------------------------------------------------------------------------
    def build(self, as_of: tuple[datetime, ...], review_cutoffs: tuple[date, ...]) -> Stream:
        day = self.start
        while day <= self.end_day:
            if day.weekday() in TICK_DAYS:
                at = _at(day, TICK_AT.hour, TICK_AT.minute)
                self._add(at, 0, Tick(at))
            day += timedelta(days=1)
        steps: list[Step] = []
        pending: list[Record] = []
        last: datetime | None = None

        def flush() -> None:
            nonlocal pending
            if pending:
                assert last is not None
                steps.append(Batch(last, tuple(pending)))
                pending = []

        for item in sorted(self.items):
            if isinstance(item.step, Record):
                if pending and len(pending) >= BATCH_MAX:
                    flush()
                pending.append(item.step)
                last = item.at
            else:
                flush()
                steps.append(item.step)
        flush()
        ids = [co.cid for co in self.companies] + self.extra_ids
        return Stream(
            seed=self.seed,
            steps=tuple(steps),
            customers=tuple(dict.fromkeys(ids)),
            end=_at(self.end_day, 18),
            as_of=as_of,
            review_cutoffs=review_cutoffs,
            cases={k: tuple(v) for k, v in sorted(self.cases.items())},
        )


# ---- the portfolio ----------------------------------------------------------------------------

PROFILES = ("good", "lump", "late", "deteriorating", "heavy")
INDUSTRIES = ("C", "F", "G", "H", "I", "J", "M", "Q")
COUNTRIES = ("DE", "FR", "NL", "IT", "ES", "PL")


def _companies(b: Builder) -> list[Company]:
    rng = b.rng
    out = []
    for n in range(b._count):
        profile = PROFILES[n % len(PROFILES)] if n < 10 else rng.choice(PROFILES)
        size = D(rng.choice([800, 1500, 3000, 6000, 12000]))
        if profile == "heavy":
            size = D(rng.choice([15000, 20000, 25000]))
        out.append(
            Company(
                cid=f"CUS-{n + 1:03d}",
                profile=profile,
                size=size,
                terms=rng.choice([14, 30, 30, 45, 60]),
                currency="EUR",
                industry=rng.choice(INDUSTRIES),
                country=rng.choice(COUNTRIES),
            )
        )
    return out


def _amount(b: Builder, co: Company, month: int) -> Decimal:
    factor = D(b.rng.randint(50, 150)) / 100
    return (co.size * factor * SEASON[month % 12]).quantize(CENT)


def _ledger(b: Builder, co: Company, *, from_month: int = 0, orders: bool = True) -> None:
    """Seasonal invoicing and the profile's way of paying; credit checks before some orders."""
    rng = b.rng
    n = 0
    lump_due: list[Inv] = []
    for m in range(from_month, b.months):
        for _ in range(rng.randint(1, 3 if co.profile != "heavy" else 2)):
            n += 1
            issue = b.start + timedelta(days=30 * m + rng.randint(0, 27))
            if issue > b.end_day:
                continue
            amount = _amount(b, co, m)
            inv_id = f"INV-{co.cid[-3:]}-{n:03d}"
            order = f"ORD-{co.cid[-3:]}-{n:03d}" if orders and rng.random() < 0.6 else None
            if order and rng.random() < 0.5:
                # Order entry asks first; the invoice consumes the reservation.
                ask = _at(issue - timedelta(days=rng.randint(1, 2)), 11, rng.randint(0, 59))
                b.check(ask, co.cid, order, amount)
                b.case("checks_reserve_and_invoice", co.cid)
            inv = b.invoice(co, inv_id, amount, issue, order_id=order)
            late = _lateness(b, co, m)
            if co.profile == "lump":
                lump_due.append(inv)
                continue
            if late is None:
                continue
            paid = inv.due + timedelta(days=late)
            if paid > b.end_day:
                continue
            if co.profile == "late" and rng.random() < 0.3:
                # Two instalments, each allocated explicitly: partial payments.
                first = (amount * D(rng.randint(30, 70)) / 100).quantize(CENT)
                b.payment(co, f"PAY-{co.cid[-3:]}-{n:03d}a", first, paid, [(inv_id, first)])
                second_on = paid + timedelta(days=rng.randint(5, 20))
                if second_on <= b.end_day:
                    rest = amount - first
                    b.payment(co, f"PAY-{co.cid[-3:]}-{n:03d}b", rest, second_on, [(inv_id, rest)])
                    inv.paid_on, inv.payment_id = second_on, None
                b.case("partial_payments", co.cid)
                continue
            pay_id = f"PAY-{co.cid[-3:]}-{n:03d}"
            b.payment(co, pay_id, amount, paid, [(inv_id, amount)])
            inv.paid_on, inv.payment_id = paid, pay_id
        if co.profile == "lump":
            # Once a month, a transfer without allocations covering what fell due: the
            # ledger applies it to the oldest open invoices. Sometimes short, sometimes over.
            day = b.start + timedelta(days=30 * m + 25)
            due = [i for i in lump_due if i.due <= day + timedelta(days=10)]
            if due and day <= b.end_day:
                total = sum((i.amount for i in due), D(0))
                roll = rng.random()
                if roll < 0.2:
                    total = (total * D("0.7")).quantize(CENT)
                elif roll < 0.35:
                    total = (total * D("1.1")).quantize(CENT)
                b.payment(co, f"LUMP-{co.cid[-3:]}-{m:02d}", total, day, None)
                for i in due:
                    i.paid_on = day
                lump_due = [i for i in lump_due if i not in due]
                b.case("lump_sum_oldest_first", co.cid)


def _lateness(b: Builder, co: Company, m: int) -> int | None:
    rng = b.rng
    if co.profile in ("good", "lump"):
        return rng.randint(-5, 3)
    if co.profile == "heavy":
        return rng.randint(-2, 10)
    if co.profile == "late":
        return rng.randint(10, 55)
    if m < b.months - 6:
        return rng.randint(0, 15)
    if m < b.months - 3:
        return rng.randint(30, 80)
    return None  # deteriorating: the last months unpaid


def _dun_unpaid(b: Builder, co: Company) -> None:
    """The dunning system reports unpaid invoices at 35 and 65 days; for one invoice the
    older run arrives after the newer."""
    swapped = False
    for inv in b.invoices.get(co.cid, []):
        # A run reports what is unpaid on its day (paid later: reported all the same).
        runs = [
            day
            for day in (inv.due + timedelta(days=35), inv.due + timedelta(days=65))
            if day <= b.end_day and (inv.paid_on is None or day < inv.paid_on)
        ]
        if not swapped and len(runs) == 2 and inv.paid_on is None:
            b.dunning(co, inv.invoice_id, inv.amount, inv.due, runs[1])
            b.dunning(co, inv.invoice_id, inv.amount, inv.due, runs[0], arrive=_at(runs[1], 8))
            swapped = True
            b.case("dunning_unpaid_twice_older_late", co.cid)
            continue
        for day in runs:
            b.dunning(co, inv.invoice_id, inv.amount, inv.due, day)


def _yearly(b: Builder, co: Company, *, distress_from: int | None = None) -> None:
    """Annual statements (published 45 days after the period) and bureau reports."""
    rng = b.rng
    revenue = co.size * 40
    k = 0
    year_end = date(2024, 12, 31)
    while True:
        published = year_end + timedelta(days=45)
        if published > b.end_day:
            break
        distress = distress_from is not None and k >= distress_from
        factor = D("0.65") if distress else D(rng.randint(95, 115)) / 100
        b.statement(
            co,
            f"FS-{co.cid}-{year_end.year}",
            year_end,
            max(published, b.start + timedelta(days=3)),
            revenue=revenue,
            factor=factor,
            distress=distress,
        )
        revenue = revenue * factor
        k += 1
        year_end = date(year_end.year + 1, 12, 31)
    b.report(co, f"CR-{co.cid}-0", b.start + timedelta(days=12), score=rng.randint(550, 950))


def generate(seed: int) -> Stream:
    customers, months = SEEDS[seed]
    b = Builder(seed, customers, months)
    cos = _companies(b)
    b.companies = cos
    rng = b.rng
    by_profile: dict[str, list[Company]] = {}
    for co in cos:
        by_profile.setdefault(co.profile, []).append(co)

    # Roles: a few customers carry scripted stories besides their base ledger.
    plain = [co for co in cos]
    rng.shuffle(plain)
    good = [c for c in plain if c.profile in ("good", "lump")]
    late = [c for c in plain if c.profile == "late"]
    worse = [c for c in plain if c.profile == "deteriorating"]
    heavy = [c for c in plain if c.profile == "heavy"]
    parent = good[0]
    children = [good[1], late[0]]
    late_reg = good[2]  # registers late, in USD
    ccy_change = good[3] if len(good) > 3 else late[-1]
    special = {parent.cid, late_reg.cid, ccy_change.cid, *(c.cid for c in children)}

    # Registrations: members after their parent (one member before it), late_reg late.
    day0 = b.start
    for co in cos:
        if co is late_reg:
            continue
        parent_id = parent.cid if co in children else None
        # One member is registered before its parent.
        at = _at(day0, 7, 55) if co is children[0] else _at(day0, 8)
        if co is children[1]:
            co.currency = "USD"
        b.register(co, at, parent=parent_id)
    b.case("group", parent.cid)
    for child in children:
        b.case("group", child.cid)

    for co in cos:
        distress = 1 if co.profile == "deteriorating" else None
        _yearly(b, co, distress_from=distress)
        _ledger(b, co)

    # ---- late registration in USD: invoices and a payment first, in EUR meanwhile ----------
    late_reg.currency = "USD"
    reg_day = b.start + timedelta(days=40)
    b.register(late_reg, _at(reg_day, 16))
    b.case("late_registration_usd", late_reg.cid)

    # ---- change of credit currency (EUR → GBP) and of terms ---------------------------------
    change_day = b.start + timedelta(days=30 * (months // 2) + 3)
    b.register(
        ccy_change,
        _at(change_day, 8),
        type_="customer.updated",
        currency="GBP",
        id=f"upd-ccy-{ccy_change.cid}",
    )
    ccy_change.currency = "GBP"
    b.case("currency_change", ccy_change.cid)
    t_co = late[0] if late[0] is not children[1] else late[-1]
    b.register(
        t_co,
        _at(b.start + timedelta(days=75), 8),
        type_="customer.updated",
        terms=t_co.terms + 15,
        currency=t_co.currency,
        id=f"upd-terms-{t_co.cid}",
        parent=parent.cid if t_co in children else None,
    )
    b.case("terms_change", t_co.cid)

    # ---- the ledger's hard cases -------------------------------------------------------------
    pool = [c for c in plain if c.cid not in special] or plain

    def pick(k: int, *profiles: str) -> Company:
        fits = [c for c in pool if not profiles or c.profile in profiles] or pool
        return fits[k % len(fits)]

    s = b.start
    # Payment before its invoice: allocated to an invoice that arrives 9 days later (its
    # business date is after the payment), and one whose invoice event arrives late.
    co = pick(0)
    b.payment(
        co, f"PRE-{co.cid}", D("2500.00"), s + timedelta(days=95), [(f"X-{co.cid}-1", D("2500.00"))]
    )
    b.invoice(co, f"X-{co.cid}-1", D("2500.00"), s + timedelta(days=104))
    inv = b.invoice(
        co,
        f"X-{co.cid}-2",
        D("1800.00"),
        s + timedelta(days=130),
        arrive=_at(s + timedelta(days=152), 9),
    )
    b.payment(
        co,
        f"PRE-{co.cid}-2",
        D("1800.00"),
        s + timedelta(days=150),
        [(inv.invoice_id, D("1800.00"))],
    )
    b.case("payment_before_invoice", co.cid)
    # Allocated to an invoice that never comes.
    co = pick(1)
    b.payment(
        co,
        f"GHOST-{co.cid}",
        D("950.00"),
        s + timedelta(days=60),
        [(f"X-{co.cid}-NEVER", D("950.00"))],
    )
    b.case("payment_for_unseen_invoice", co.cid)
    # Overpaying: a credit balance that later invoices eat into.
    co = pick(2)
    b.invoice(co, f"X-{co.cid}-OP", D("1000.00"), s + timedelta(days=50))
    b.payment(
        co,
        f"OVER-{co.cid}",
        D("6000.00"),
        s + timedelta(days=55),
        [(f"X-{co.cid}-OP", D("1000.00"))],
    )
    b.case("overpayment_credit_balance", co.cid)
    # Mixed: explicit to one invoice, the rest to the oldest.
    co = pick(3)
    b.invoice(co, f"X-{co.cid}-M1", D("700.00"), s + timedelta(days=150))
    b.invoice(co, f"X-{co.cid}-M2", D("900.00"), s + timedelta(days=152))
    b.payment(
        co,
        f"MIX-{co.cid}",
        D("1300.00"),
        s + timedelta(days=170),
        [(f"X-{co.cid}-M2", D("900.00"))],
    )
    b.case("mixed_allocation", co.cid)
    # Reversals: a recent one, one of a payment that settled its invoice long ago, and one
    # that arrives before its payment.
    co = pick(4, "good", "late", "heavy")
    pays = [p for p in b.payments.get(co.cid, []) if p.invoice_id]
    if pays:
        old = pays[min(1, len(pays) - 1)]
        b.reverse(co, old.payment_id, old.received + timedelta(days=210))
        b.case("reversal_of_old_settling_payment", co.cid)
        recent = pays[len(pays) // 2]
        if recent is not old:
            b.reverse(co, recent.payment_id, recent.received + timedelta(days=3))
            b.case("reversal_recent", co.cid)
    co = pick(5)
    b.invoice(co, f"X-{co.cid}-RB", D("1200.00"), s + timedelta(days=200))
    b.reverse(co, f"RB-{co.cid}", s + timedelta(days=228), hour=9)
    b.payment(
        co,
        f"RB-{co.cid}",
        D("1200.00"),
        s + timedelta(days=225),
        [(f"X-{co.cid}-RB", D("1200.00"))],
        arrive=_at(s + timedelta(days=229), 9),
    )
    b.case("reversal_before_payment", co.cid)
    # Cancellations: an open invoice, a paid one, and one before its invoice arrives.
    co = pick(6)
    b.invoice(co, f"X-{co.cid}-C1", D("2200.00"), s + timedelta(days=80))
    b.cancel(co, f"X-{co.cid}-C1", s + timedelta(days=84))
    b.case("cancel_open_invoice", co.cid)
    b.invoice(co, f"X-{co.cid}-C2", D("1600.00"), s + timedelta(days=90))
    b.payment(
        co,
        f"PC2-{co.cid}",
        D("1600.00"),
        s + timedelta(days=100),
        [(f"X-{co.cid}-C2", D("1600.00"))],
    )
    b.cancel(co, f"X-{co.cid}-C2", s + timedelta(days=115))
    b.case("cancel_paid_invoice", co.cid)
    b.cancel(co, f"X-{co.cid}-C3", s + timedelta(days=140), hour=8)
    b.invoice(
        co,
        f"X-{co.cid}-C3",
        D("800.00"),
        s + timedelta(days=139),
        arrive=_at(s + timedelta(days=141), 9),
    )
    b.case("cancel_before_invoice", co.cid)
    # Credit notes: on an invoice, on none, on an order-linked invoice.
    co = pick(7)
    b.invoice(co, f"X-{co.cid}-CN", D("3000.00"), s + timedelta(days=60))
    b.credit_note(co, f"CN-{co.cid}-1", D("400.00"), s + timedelta(days=66), f"X-{co.cid}-CN")
    b.case("credit_note_with_invoice", co.cid)
    b.credit_note(co, f"CN-{co.cid}-2", D("250.00"), s + timedelta(days=120), None)
    b.case("credit_note_without_invoice", co.cid)
    b.check(_at(s + timedelta(days=179), 10), co.cid, f"ORD-CN-{co.cid}", D("1500.00"))
    b.invoice(
        co, f"X-{co.cid}-CNO", D("1500.00"), s + timedelta(days=180), order_id=f"ORD-CN-{co.cid}"
    )
    b.credit_note(co, f"CN-{co.cid}-3", D("500.00"), s + timedelta(days=181), f"X-{co.cid}-CNO")
    b.case("credit_note_on_order_invoice", co.cid)
    # Dunning of an invoice never seen, and of one already paid.
    co = pick(8)
    b.dunning(
        co, f"X-{co.cid}-UNSEEN", D("640.00"), s + timedelta(days=70), s + timedelta(days=110)
    )
    b.case("dunning_never_seen_invoice", co.cid)
    b.invoice(
        co, f"X-{co.cid}-PD", D("1400.00"), s + timedelta(days=100), due=s + timedelta(days=130)
    )
    b.payment(
        co,
        f"PPD-{co.cid}",
        D("1400.00"),
        s + timedelta(days=160),
        [(f"X-{co.cid}-PD", D("1400.00"))],
    )
    b.dunning(
        co,
        f"X-{co.cid}-PD",
        D("1400.00"),
        s + timedelta(days=130),
        s + timedelta(days=158),
        arrive=_at(s + timedelta(days=163), 7),
    )
    b.case("dunning_paid_invoice", co.cid)
    # Invoices in another currency (converted), and in one the policy has no rate for.
    co = pick(9)
    b.invoice(co, f"X-{co.cid}-USD", D("2000.00"), s + timedelta(days=45), currency="USD")
    b.case("foreign_currency_invoice", co.cid)
    b.invoice(
        co, f"X-{co.cid}-BRL", D("900.00"), s + timedelta(days=46), currency="BRL", record=False
    )
    b.case("no_fx_rate_invoice", co.cid)

    # Dunning of every customer's unpaid invoices (after the ledger is complete).
    for c in cos:
        _dun_unpaid(b, c)

    # ---- statements and reports -------------------------------------------------------------
    q = pick(10)
    revenue = q.size * 40
    for k, period_end in enumerate((date(2025, 3, 31), date(2025, 6, 30), date(2025, 9, 30))):
        published = period_end + timedelta(days=30)
        arrive = None
        if k == 1:
            # Q2 arrives after Q3.
            arrive = _at(period_end + timedelta(days=30 + 92 + 2), 11)
            b.case("statement_out_of_order", q.cid)
        b.statement(
            q, f"FSQ-{q.cid}-{k}", period_end, published, months=3, revenue=revenue, arrive=arrive
        )
    b.case("statements_quarterly", q.cid)
    r = pick(11)
    b.statement(
        r,
        f"FS-{r.cid}-2024-restated",
        date(2024, 12, 31),
        s + timedelta(days=90),
        revenue=r.size * 30,
        factor=D("0.8"),
    )
    b.case("statement_restated", r.cid)
    for w in worse:
        b.case("statement_distress", w.cid)
    if worse:
        w = worse[0]
        b.report(
            w,
            f"CR-{w.cid}-1",
            b.end_day - timedelta(days=40),
            score=rng.randint(150, 300),
            legal=[{"type": "insolvency", "date": (b.end_day - timedelta(days=45)).isoformat()}],
            delinquencies=3,
            defaults=1,
        )
        b.case("report_insolvency", w.cid)
    lw = late[-1]
    b.report(
        lw,
        f"CR-{lw.cid}-1",
        s + timedelta(days=200),
        score=rng.randint(400, 600),
        legal=[{"type": "lawsuit", "date": (s + timedelta(days=190)).isoformat()}],
        defaults=1,
    )
    b.case("report_lawsuit_defaults", lw.cid)
    for co in cos:
        if months >= 12:
            b.report(
                co,
                f"CR-{co.cid}-mid",
                s + timedelta(days=30 * (months // 2) + 7),
                score=rng.randint(500, 950),
            )

    # ---- redelivery, conflicting duplicate, malformed records, offsets ----------------------
    co = pick(12)
    env = b.event(
        INVOICES,
        "invoice.issued",
        co.cid,
        {
            "invoice_id": f"X-{co.cid}-DUP",
            "customer_id": co.cid,
            "amount": "450.00",
            "currency": co.currency,
            "issue_date": (s + timedelta(days=33)).isoformat(),
            "due_date": (s + timedelta(days=63)).isoformat(),
        },
        id=f"ev-X-{co.cid}-DUP",
        at=_at(s + timedelta(days=33), 9),
        source="/gold/billing",
    )
    b.raw(INVOICES, co.cid, json.dumps(env).encode(), _at(s + timedelta(days=34), 9))
    conflicting = dict(env, id=f"ev-X-{co.cid}-DUP-again", data=dict(env["data"], amount="540.00"))
    b.raw(INVOICES, co.cid, json.dumps(conflicting).encode(), _at(s + timedelta(days=35), 9))
    b.case("redelivery_and_conflicting_duplicate", co.cid)
    bad_day = _at(s + timedelta(days=36), 9, 30)
    b.raw(INVOICES, co.cid, b'{"specversion": "1.0", "id": "broken', bad_day)
    missing = _envelope(
        "invoice.issued",
        co.cid,
        {
            "invoice_id": "X-MISSING",
            "customer_id": co.cid,
            "amount": "10.00",
            "currency": "EUR",
            "issue_date": "2025-02-11",
        },
        id="ev-missing",
        at=bad_day,
        source="/gold/billing",
    )
    b.raw(INVOICES, co.cid, json.dumps(missing).encode(), bad_day)
    backwards = _envelope(
        "invoice.issued",
        co.cid,
        {
            "invoice_id": "X-BACK",
            "customer_id": co.cid,
            "amount": "10.00",
            "currency": "EUR",
            "issue_date": "2025-02-11",
            "due_date": "2025-02-01",
        },
        id="ev-back",
        at=bad_day,
        source="/gold/billing",
    )
    b.raw(INVOICES, co.cid, json.dumps(backwards).encode(), bad_day)
    unknown = _envelope(
        "invoice.disputed",
        co.cid,
        {"invoice_id": "X-1", "customer_id": co.cid},
        id="ev-disputed",
        at=bad_day,
        source="/gold/billing",
    )
    b.raw(INVOICES, co.cid, json.dumps(unknown).encode(), bad_day)
    wrong = _envelope(
        "payment.received",
        co.cid,
        {
            "payment_id": "P-WRONG",
            "customer_id": co.cid,
            "amount": "10.00",
            "currency": "EUR",
            "received_date": "2025-02-11",
        },
        id="ev-wrong-topic",
        at=bad_day,
        source="/gold/bank",
    )
    b.raw(INVOICES, co.cid, json.dumps(wrong).encode(), bad_day)
    b.case("malformed_records", co.cid)
    b.invoice(
        co,
        f"X-{co.cid}-TZ",
        D("333.33"),
        s + timedelta(days=88),
        arrive=_at(s + timedelta(days=89), 3),
    )
    b.event(
        PAYMENTS,
        "payment.received",
        co.cid,
        {
            "payment_id": f"TZ-{co.cid}",
            "customer_id": co.cid,
            "amount": "333.33",
            "currency": co.currency,
            "received_date": (s + timedelta(days=119)).isoformat(),
            "allocations": [{"invoice_id": f"X-{co.cid}-TZ", "amount": "333.33"}],
        },
        id=f"ev-TZ-{co.cid}",
        at=_at(s + timedelta(days=120), 3),
        stamp=f"{(s + timedelta(days=119)).isoformat()}T22:00:00-05:00",
        source="/gold/bank",
    )
    b.case("offset_time", co.cid)

    _commands(b, cos, parent, children, heavy, worse, late, good)
    as_of = (
        _at(s - timedelta(days=1), 12),
        _at(s + timedelta(days=30 * (months // 3)), 12),
        _at(s + timedelta(days=30 * (2 * months // 3) + 5), 20),
    )
    cutoffs = (s + timedelta(days=30 * (months // 2)), b.end_day + timedelta(days=60))
    return b.build(as_of, cutoffs)


def _commands(
    b: Builder,
    cos: list[Company],
    parent: Company,
    children: list[Company],
    heavy: list[Company],
    worse: list[Company],
    late: list[Company],
    good: list[Company],
) -> None:
    s = b.start
    months = b.months
    h = heavy[0]
    g = good[-1]

    # Quote, then firm; a retry; amendments up and down; a release.
    t = _at(s + timedelta(days=65), 10)
    b.check(t, g.cid, f"Q-{g.cid}", D("2000.00"), reserve=False)
    b.check(t + timedelta(minutes=5), g.cid, f"Q-{g.cid}", D("2000.00"), reserve=True)
    b.check(t + timedelta(minutes=6), g.cid, f"Q-{g.cid}", D("2000.00"))  # retry
    b.check(t + timedelta(minutes=30), g.cid, f"Q-{g.cid}", D("2600.00"))  # amended up
    b.check(t + timedelta(hours=2), g.cid, f"Q-{g.cid}", D("1900.00"))  # amended down
    b.release(t + timedelta(days=1), f"Q-{g.cid}")
    b.release(t + timedelta(days=1, minutes=1), f"Q-{g.cid}")  # nothing left: 404
    b.case("checks_quote_retry_amend_release", g.cid)
    # Orders never invoiced (their reservations expire on a tick), and one invoiced in part.
    t = _at(s + timedelta(days=140), 11)
    b.check(t, h.cid, f"EXP-{h.cid}", D("5000.00"))
    b.check(t, g.cid, f"PART-{g.cid}", D("3000.00"))
    b.invoice(g, f"X-{g.cid}-PART", D("1200.00"), s + timedelta(days=141), order_id=f"PART-{g.cid}")
    b.case("checks_expire_and_partial_invoice", h.cid)
    b.case("checks_expire_and_partial_invoice", g.cid)
    # An id nobody knows; an order in another currency; a group member; a big one.
    t = _at(s + timedelta(days=100), 12)
    b.check(t, "CUS-999", "ORD-NOBODY", D("100.00"))
    b.extra_ids.append("CUS-999")
    b.check(t, g.cid, f"USD-{g.cid}", D("1000.00"), currency="USD")
    b.check(t, g.cid, f"JPY-{g.cid}", "50000", currency="JPY", reserve=False)
    b.check(t, g.cid, f"XAU-{g.cid}", "1", currency="XAU", reserve=False)
    for child in children:
        b.check(t, child.cid, f"GRP-{child.cid}", D("4000.00"), currency=child.currency)
    b.check(t, parent.cid, f"GRP-{parent.cid}", D("9000.00"))
    b.check(t, h.cid, f"BIG-{h.cid}", D("95000.00"))
    b.case("checks_unknown_currency_group_hold", g.cid)

    # Limit requests (maker–checker).
    t = _at(s + timedelta(days=90), 14)
    up = b.call(
        t,
        "limits",
        "POST",
        f"/v1/customers/{h.cid}/limit-requests",
        ANALYST,
        {"requested_limit": "400000.00", "reason": "seasonal peak"},
    )
    b.call(
        t + timedelta(minutes=5),
        "limits",
        "POST",
        f"/v1/limit-requests/{{ref:{up}:request_id}}/approve",
        ANALYST,
        {"note": "self"},
    )  # 403
    b.call(
        t + timedelta(hours=20),
        "limits",
        "POST",
        f"/v1/limit-requests/{{ref:{up}:request_id}}/approve",
        APPROVER,
        {"note": "ok"},
    )
    b.call(
        t + timedelta(hours=21),
        "limits",
        "POST",
        f"/v1/limit-requests/{{ref:{up}:request_id}}/approve",
        APPROVER,
    )  # 409
    other = heavy[-1] if len(heavy) > 1 else good[0]
    rej = b.call(
        t + timedelta(days=2),
        "limits",
        "POST",
        f"/v1/customers/{other.cid}/limit-requests",
        ANALYST,
        {"requested_limit": "900000.00", "reason": "big project"},
    )
    b.call(
        t + timedelta(days=3),
        "limits",
        "POST",
        f"/v1/limit-requests/{{ref:{rej}:request_id}}/reject",
        APPROVER,
        {"note": "too much"},
    )
    w = worse[0] if worse else late[0]
    b.call(
        _at(s + timedelta(days=30 * (months - 4)), 14),
        "limits",
        "POST",
        f"/v1/customers/{w.cid}/limit-requests",
        ANALYST,
        {"requested_limit": "5000.00", "reason": "deteriorating payer"},
    )
    b.case("limit_requests", h.cid)
    b.case("limit_requests", other.cid)
    b.case("limit_requests", w.cid)
    # A temporary limit that expires on a tick, and one that ends before anyone decides.
    t = _at(s + timedelta(days=160), 9, 30)
    tmp = b.call(
        t,
        "limits",
        "POST",
        f"/v1/customers/{g.cid}/limit-requests",
        ANALYST,
        {
            "requested_limit": "300000.00",
            "reason": "trade fair",
            "expires_at": _iso(t + timedelta(days=20)),
        },
    )
    b.call(
        t + timedelta(hours=3),
        "limits",
        "POST",
        f"/v1/limit-requests/{{ref:{tmp}:request_id}}/approve",
        APPROVER,
    )
    lapsed = b.call(
        t + timedelta(days=1),
        "limits",
        "POST",
        f"/v1/customers/{h.cid}/limit-requests",
        ANALYST,
        {
            "requested_limit": "600000.00",
            "reason": "one week",
            "expires_at": _iso(t + timedelta(days=3)),
        },
    )
    b.call(
        t + timedelta(days=5),
        "limits",
        "POST",
        f"/v1/limit-requests/{{ref:{lapsed}:request_id}}/approve",
        APPROVER,
    )  # 409
    b.call(
        t + timedelta(days=5, minutes=1),
        "limits",
        "POST",
        f"/v1/limit-requests/{{ref:{lapsed}:request_id}}/reject",
        APPROVER,
        {"note": "ended"},
    )
    b.case("temporary_limit_expires", g.cid)
    b.check(t + timedelta(days=10), g.cid, f"TMP-{g.cid}", D("150000.00"))

    # A hold, checks during it, its release.
    hw = late[0]
    t = _at(s + timedelta(days=30 * (months - 3)), 9, 15)
    b.call(t, "limits", "POST", f"/v1/customers/{hw.cid}/hold", ANALYST, {"reason": "dispute"})
    b.check(t + timedelta(hours=2), hw.cid, f"HOLD-{hw.cid}", D("500.00"))
    b.call(t + timedelta(days=9), "limits", "DELETE", f"/v1/customers/{hw.cid}/hold", ANALYST)
    # The same order again: the stored rejection stands (a retry); a new order is judged.
    b.check(t + timedelta(days=9, hours=1), hw.cid, f"HOLD-{hw.cid}", D("500.00"))
    b.check(t + timedelta(days=9, hours=2), hw.cid, f"AFTER-HOLD-{hw.cid}", D("500.00"))
    b.case("hold", hw.cid)
    b.case("checks_unknown_currency_group_hold", hw.cid)

    # Overrides (one expires on a tick, one is withdrawn) and recomputes.
    o1 = cos[1]
    t = _at(s + timedelta(days=110), 13)
    b.call(
        t,
        "assessment",
        "POST",
        f"/v1/customers/{o1.cid}/assessment/override",
        ANALYST,
        {"grade": "B", "reason": "pending litigation", "expires_at": _iso(t + timedelta(days=25))},
    )
    o2 = cos[2]
    b.call(
        t,
        "assessment",
        "POST",
        f"/v1/customers/{o2.cid}/assessment/override",
        ANALYST,
        {"grade": "A", "reason": "parent guarantee"},
    )
    b.call(
        t + timedelta(days=40),
        "assessment",
        "DELETE",
        f"/v1/customers/{o2.cid}/assessment/override",
        ANALYST,
    )
    b.call(
        t + timedelta(days=41),
        "assessment",
        "DELETE",
        f"/v1/customers/{o2.cid}/assessment/override",
        ANALYST,
    )  # 404
    b.call(
        _at(s + timedelta(days=30 * (months - 1)), 13),
        "assessment",
        "POST",
        f"/v1/customers/{cos[3].cid}/assessment/recompute",
        ANALYST,
    )
    b.call(
        _at(s + timedelta(days=200), 13),
        "assessment",
        "POST",
        f"/v1/customers/{cos[4].cid}/assessment/recompute",
        ANALYST,
    )
    for co in (o1, o2, cos[3], cos[4]):
        b.case("overrides_and_recompute", co.cid)

    # Alert acknowledgements: the newest active alert of a customer or rule, where there is
    # one then; every other time twice (the second changes nothing).
    for k, month in enumerate(range(2, months, 2)):
        t = _at(s + timedelta(days=30 * month + 14), 14)
        for who, rule in (
            (w.cid, "overdue"),
            (h.cid, "*"),
            ("*", "limit_breach"),
            ("*", "utilization_high"),
            ("*", "review_overdue"),
            ("*", "grade_downgrade"),
            ("*", "*"),
        ):
            path = f"/v1/alerts/{{alert:{who}:{rule}}}/acknowledge"
            ack = b.call(t, "alerts", "POST", path, ANALYST, {"note": f"on it ({k})"})
            if k % 2 == 1:
                again = f"/v1/alerts/{{ref:{ack}:alert_id}}/acknowledge"
                b.call(t + timedelta(minutes=1), "alerts", "POST", again, APPROVER)
    b.case("alert_acknowledgements", w.cid)
    # Acknowledging an alert that has been resolved since (409), where one is.
    t = _at(s + timedelta(days=30 * (months - 1) + 20), 15)
    for who, rule in ((w.cid, "overdue"), ("*", "utilization_high"), ("*", "*")):
        b.call(t, "alerts", "POST", f"/v1/alerts/{{resolved:{who}:{rule}}}/acknowledge", ANALYST)
    # Everyone asks for credit now and then (approved, review, rejected as it falls).
    for k, co in enumerate(cos):
        t = _at(s + timedelta(days=30 * (months - 1) + k % 7), 10, 30)
        b.check(t, co.cid, f"LATE-{co.cid}", co.size * 3, currency=co.currency)


def streams() -> Iterator[Stream]:
    for seed in SEEDS:
        yield generate(seed)
