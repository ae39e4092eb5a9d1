"""Assessment domain: a customer's credit picture, its explainable score and risk grade.

``evolve(state, event, policy)`` folds one event into a ``CustomerState``; ``ratios``,
``payment_behaviour`` and ``score_inputs`` derive the scorecard inputs from it; ``score`` and
``assess`` turn them into the ``assessment.completed`` body; ``decide_assessment`` says
whether an event calls for a (new) assessment and gives its body, which ``remember`` keeps
for the next one to compare with. No I/O and no clock: time always comes in as an argument,
so a replay gives the very same assessments.

A customer's state is what is open plus compact rolling aggregates, so that the cost of its
next event does not grow with its history:

- the receivables ledger's open items (shared.ledger: one allocation rule for every
  service); settled invoices and applied payments are in the ledger's archive, read back
  only when an event names them (``Event.recall``);
- payment behaviour as aggregates of the invoices settled per day within the policy's
  window (``paid``) and the worst days overdue the dunning system reported per day
  (``dunned``), each with its sum over the days, updated from the ledger's steps and pruned
  as the window moves on;
- of the financial statements, only those the ratios can choose from (``_kept``);
- the latest credit report, the override and the last assessment.

A policy whose ``payment_behaviour.window_months`` grows sees the longer window only once
the projections are rebuilt (``creditwatch replay``): the aggregates keep the days of the
window they were folded under.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Context, Decimal
from itertools import islice
from typing import Any, ClassVar, Final, Literal

from services.assessment.events import (
    OverrideExpired,
    OverrideRemoved,
    OverrideSet,
    RecomputeRequested,
)
from shared import ledger as lg
from shared.events import (
    AssessmentCompleted,
    CreditReportReceived,
    CustomerData,
    DeadLetter,
    FinancialStatementPublished,
)
from shared.policy import Policy, RiskLevel, add_months

ZERO: Final = Decimal(0)
NO_FX_RATE: Final = "no_fx_rate"
# An invoice, payment or credit note number seen before, under another event id, with other
# figures: a correction the ledger cannot tell from a mistake (the first one stands).
CONFLICTING_DUPLICATE: Final = "conflicting_duplicate"

# Ratios are exact quotients to 34 significant digits, then rounded once, to 4 places, for
# both the published `ratios` and the scorecard, so a factor's value is the published one.
_DIVISION: Final = Context(prec=34, rounding=ROUND_HALF_EVEN)
RATIO_PLACES: Final = Decimal("0.0001")

FINANCIAL_RATIOS: Final = (
    "current_ratio",
    "quick_ratio",
    "debt_ratio",
    "debt_to_equity",
    "interest_coverage",
    "net_margin",
    "roa",
    "operating_cash_flow_ratio",
    "revenue_growth",
    "altman_z2",
)
PAYMENT_BEHAVIOUR: Final = (
    "avg_days_to_pay",
    "avg_days_beyond_terms",
    "late_payment_share_12m",
    "max_days_overdue_12m",
)
# Altman's Z'' for non-manufacturers (1995): 6.56·X1 + 3.26·X2 + 6.72·X3 + 1.05·X4.
Z2_COEFFICIENTS: Final = (Decimal("6.56"), Decimal("3.26"), Decimal("6.72"), Decimal("1.05"))


# ---- state ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Statement:
    """A financial statement, amounts in ``currency`` (the credit currency when it arrived)."""

    statement_id: str
    period_end: date
    period_months: int
    currency: str
    received_at: datetime
    current_assets: Decimal
    total_assets: Decimal
    current_liabilities: Decimal
    total_liabilities: Decimal
    equity: Decimal
    revenue: Decimal
    net_income: Decimal
    audited: bool | None = None
    cash: Decimal | None = None
    receivables: Decimal | None = None
    inventory: Decimal | None = None
    retained_earnings: Decimal | None = None
    ebit: Decimal | None = None
    interest_expense: Decimal | None = None
    operating_cash_flow: Decimal | None = None


@dataclass(frozen=True, slots=True)
class LegalEvent:
    type: str
    event_date: date | None = None


@dataclass(frozen=True, slots=True)
class CreditReport:
    report_id: str
    bureau: str
    score: Decimal
    score_min: Decimal
    score_max: Decimal
    reported_at: datetime
    delinquencies_12m: int | None = None
    defaults: int | None = None
    legal_events: tuple[LegalEvent, ...] = ()


# How many of something had each number of days: ((days, how many), …), by days.
Counts = tuple[tuple[int, int], ...]


def _counted(counts: Counts, changes: Iterable[tuple[int, int]]) -> Counts:
    out = dict(counts)
    for days, n in changes:
        out[days] = out.get(days, 0) + n
    return tuple(sorted((days, n) for days, n in out.items() if n))


@dataclass(frozen=True, slots=True)
class PaidOn:
    """Invoices payments settled (on one day, or over days): how many, their days to pay
    summed, and how many were how many days beyond terms. Counts per number of days rather
    than a sum and a maximum, so that an outcome taken back (a reversal, a cancellation)
    leaves the exact worst behind, and the policy's ``late_after_days`` applies when
    measured."""

    count: int = 0
    days_to_pay: int = 0
    beyond: Counts = ()

    def merged(self, other: PaidOn, sign: int = 1) -> PaidOn:
        return PaidOn(
            self.count + sign * other.count,
            self.days_to_pay + sign * other.days_to_pay,
            _counted(self.beyond, ((days, sign * n) for days, n in other.beyond)),
        )

    def holds(self, other: PaidOn) -> bool:
        mine = dict(self.beyond)
        return all(mine.get(days, 0) >= n for days, n in other.beyond)


def _paid_one(outcome: lg.Outcome) -> PaidOn:
    return PaidOn(1, outcome.days_to_pay, ((outcome.days_beyond_terms, 1),))


_NOTHING_PAID: Final = PaidOn()


@dataclass(frozen=True, slots=True)
class Settled:
    """The invoices payments settled within the payment-behaviour window: per settlement day
    (in day order), summed over the days held, and the first and last day held — so that
    neither measuring nor moving the window on walks the days (a window has up to 366)."""

    days: Mapping[date, PaidOn] = field(default_factory=dict)
    total: PaidOn = _NOTHING_PAID
    first: date | None = None
    last: date | None = None

    def changed(
        self, settled: Iterable[lg.Outcome], unsettled: Iterable[lg.Outcome], since: date
    ) -> Settled:
        """With outcomes taken back and added; days on or before ``since`` count no more
        (and were pruned already)."""
        days = dict(self.days)
        total = self.total
        in_order = True
        for outcome in unsettled:
            day, one = outcome.settled_on, _paid_one(outcome)
            held = days.get(day)
            if day <= since or held is None or not held.holds(one):
                continue
            total = total.merged(one, -1)
            if held.count <= 1:
                del days[day]
            else:
                days[day] = held.merged(one, -1)
        for outcome in settled:
            day, one = outcome.settled_on, _paid_one(outcome)
            if day <= since:
                continue
            held = days.get(day)
            if held is None and days and day < next(reversed(days)):
                in_order = False  # a payment dated before the latest settlement day
            days[day] = (held or _NOTHING_PAID).merged(one)
            total = total.merged(one)
        if not in_order:
            days = dict(sorted(days.items()))
        if not days:
            return Settled()
        return Settled(days, total, next(iter(days)), next(reversed(days)))

    def after(self, since: date) -> Settled:
        """Without the days on or before ``since`` (the first ones: they are in order)."""
        if self.first is None or self.first > since:
            return self
        total, cut = self.total, 0
        for day, paid in self.days.items():
            if day > since:
                break
            total, cut = total.merged(paid, -1), cut + 1
        kept = dict(islice(self.days.items(), cut, None))
        if not kept:
            return Settled()
        return Settled(kept, total, next(iter(kept)), self.last)

    def within(self, since: date, on: date) -> PaidOn:
        """What was settled on the days after ``since`` up to ``on``."""
        if self.first is None or self.last is None:
            return _NOTHING_PAID
        if self.first > since and self.last <= on:
            return self.total  # the usual case: every day held is in the window
        out = _NOTHING_PAID
        for day, paid in self.days.items():
            if since < day <= on:
                out = out.merged(paid)
        return out


@dataclass(frozen=True, slots=True)
class Dunned:
    """The worst days overdue the dunning system reported, per ``as_of`` day within the
    window (in day order; whether the invoice was paid since or not), and how many days had
    each worst, so that the window's worst needs no walk through the days."""

    days: Mapping[date, int] = field(default_factory=dict)
    worsts: Counts = ()
    first: date | None = None
    last: date | None = None

    def reported(self, on: date, days_overdue: int, since: date) -> Dunned:
        known = self.days.get(on)
        if on <= since or (known is not None and known >= days_overdue):
            return self
        change = [(days_overdue, 1)] if known is None else [(known, -1), (days_overdue, 1)]
        days = {**self.days, on: days_overdue}
        if known is None and self.last is not None and on < self.last:
            days = dict(sorted(days.items()))  # a run dated before the latest one
        first, last = next(iter(days)), next(reversed(days))
        return Dunned(days, _counted(self.worsts, change), first, last)

    def after(self, since: date) -> Dunned:
        """Without the days on or before ``since`` (the first ones: they are in order)."""
        if self.first is None or self.first > since:
            return self
        gone: list[tuple[int, int]] = []
        for day, worst in self.days.items():
            if day > since:
                break
            gone.append((worst, -1))
        kept = dict(islice(self.days.items(), len(gone), None))
        if not kept:
            return Dunned()
        return Dunned(kept, _counted(self.worsts, gone), next(iter(kept)), self.last)

    def worst(self, since: date, on: date) -> int | None:
        """The worst reported on the days after ``since`` up to ``on`` (None: none)."""
        if self.first is None or self.last is None:
            return None
        if self.first > since and self.last <= on:
            return self.worsts[-1][0] if self.worsts else None
        return max((d for day, d in self.days.items() if since < day <= on), default=None)


@dataclass(frozen=True, slots=True)
class Override:
    override_id: str
    grade: str
    reason: str
    by: str
    set_at: datetime
    expires_at: datetime | None = None

    def active_at(self, at: datetime) -> bool:
        return self.expires_at is None or self.expires_at > at


@dataclass(frozen=True, slots=True)
class LastAssessment:
    """What the last published assessment said (the effective, published grade)."""

    assessment_id: str
    score: int
    grade: str
    risk_level: str
    computed_grade: str
    next_review_date: date
    assessed_at: datetime


@dataclass(frozen=True, slots=True)
class CustomerState:
    # A stored document must have exactly this layout: one of an older layout (the whole
    # history: invoices, credits, dunning) fails to load rather than reading as a customer
    # with nothing in it (see store.LayoutError).
    __pydantic_config__: ClassVar[dict[str, str]] = {"extra": "forbid"}

    customer_id: str
    currency: str
    registered: bool = False
    name: str | None = None
    country: str | None = None
    industry: str | None = None
    payment_terms_days: int = 30
    parent_id: str | None = None
    # The statements the ratios can choose from (see ``_kept``), by statement id.
    statements: Mapping[str, Statement] = field(default_factory=dict)
    report: CreditReport | None = None
    ledger: lg.Ledger = field(default_factory=lambda: lg.Ledger(""))
    # Invoices settled by payments within the payment-behaviour window, per settlement day.
    paid: Settled = field(default_factory=Settled)
    # The worst days overdue the dunning system reported within the window, per day.
    dunned: Dunned = field(default_factory=Dunned)
    override: Override | None = None
    last: LastAssessment | None = None
    last_time: datetime | None = None
    # What the last event did to the ledger (its archive moves): read by the caller after
    # ``evolve``, never stored.
    step: lg.Step | None = None


def new_customer(customer_id: str, policy: Policy) -> CustomerState:
    """A customer nothing is known about yet; its credit currency defaults to the base one."""
    ccy = policy.base_currency
    return CustomerState(customer_id=customer_id, currency=ccy, ledger=lg.new_ledger(ccy))


# ---- financial ratios -----------------------------------------------------------------------


def _div(numerator: Decimal | None, denominator: Decimal | None) -> Decimal | None:
    if numerator is None or denominator is None or denominator.is_zero():
        return None
    return _DIVISION.divide(numerator, denominator)


def _round(value: Decimal) -> Decimal:
    rounded = value.quantize(RATIO_PLACES, rounding=ROUND_HALF_EVEN, context=_DIVISION)
    return rounded.copy_abs() if rounded.is_zero() else rounded  # never "-0.0000"


def altman_z2(statement: Statement) -> Decimal | None:
    """Altman's Z'' (unrounded); None when an input is missing or TA or TL is zero."""
    s = statement
    x1 = _div(s.current_assets - s.current_liabilities, s.total_assets)
    x2 = _div(s.retained_earnings, s.total_assets)
    x3 = _div(s.ebit, s.total_assets)
    x4 = _div(s.equity, s.total_liabilities)
    if x1 is None or x2 is None or x3 is None or x4 is None:
        return None
    c1, c2, c3, c4 = Z2_COEFFICIENTS
    return c1 * x1 + c2 * x2 + c3 * x3 + c4 * x4


def ratios(
    statement: Statement, prior: Statement | None = None, policy: Policy | None = None
) -> dict[str, Decimal]:
    """The contract's financial ratios of one statement, each rounded to 4 places.

    A key is absent when an input is missing or its denominator is zero. ``revenue_growth``
    compares with ``prior`` (the latest earlier statement of the same period length; see
    `prior_statement`); a prior in another currency is converted with ``policy``'s rates.
    """
    s = statement
    quick_assets = (s.current_assets - s.inventory) if s.inventory is not None else None
    operating_cash_flow = s.operating_cash_flow
    values: dict[str, Decimal | None] = {
        "current_ratio": _div(s.current_assets, s.current_liabilities),
        "quick_ratio": _div(quick_assets, s.current_liabilities),
        "debt_ratio": _div(s.total_liabilities, s.total_assets),
        "debt_to_equity": _div(s.total_liabilities, s.equity),
        "interest_coverage": _div(s.ebit, s.interest_expense),
        "net_margin": _div(s.net_income, s.revenue),
        "roa": _div(s.net_income, s.total_assets),
        "operating_cash_flow_ratio": _div(operating_cash_flow, s.current_liabilities),
        "revenue_growth": _growth(s, prior, policy),
        "altman_z2": altman_z2(s),
    }
    return {key: _round(value) for key, value in values.items() if value is not None}


def _growth(statement: Statement, prior: Statement | None, policy: Policy | None) -> Decimal | None:
    if prior is None or prior.period_months != statement.period_months:
        return None
    before: Decimal | None = prior.revenue
    if prior.currency != statement.currency:
        before = (
            policy.convert(prior.revenue, prior.currency, statement.currency)
            if policy is not None
            else None
        )
    if before is None:
        return None
    return _div(statement.revenue - before, before)


def altman_zone(z2: Decimal, policy: Policy) -> Literal["distress", "grey", "safe"]:
    """> z2_safe (2.6) safe, < z2_distress (1.1) distress, grey in between (policy alerts)."""
    return policy.alerts.financial_deterioration.z2_zone(z2)


def _statement_key(s: Statement) -> tuple[date, int, bool, datetime]:
    # The newest period wins; on the same period end the longer period, then the audited one,
    # then the one received last (a restatement).
    return (s.period_end, s.period_months, s.audited is True, s.received_at)


def latest_statement(state: CustomerState) -> Statement | None:
    if not state.statements:
        return None
    return max(state.statements.values(), key=_statement_key)


def prior_statement(state: CustomerState, statement: Statement) -> Statement | None:
    """The latest statement of the same period length ending before ``statement``'s end."""
    earlier = [
        s
        for s in state.statements.values()
        if s.period_months == statement.period_months and s.period_end < statement.period_end
    ]
    return max(earlier, key=_statement_key) if earlier else None


def _kept(statements: Mapping[str, Statement]) -> dict[str, Statement]:
    """The statements ``latest_statement`` and ``prior_statement`` can ever choose: per period
    length, those of its two most recent period ends. The latest statement has the most recent
    period end of its length and its prior one the next, so an older one is never chosen
    again — unless a restatement moves a kept statement's period end back, when the one it
    would fall back on is gone (a correction of that kind is not expected)."""
    ends: dict[int, set[date]] = {}
    for s in statements.values():
        ends.setdefault(s.period_months, set()).add(s.period_end)
    recent = {months: sorted(days)[-2:] for months, days in ends.items()}
    return {k: s for k, s in statements.items() if s.period_end in recent[s.period_months]}


def financial_ratios(state: CustomerState, policy: Policy) -> dict[str, Decimal]:
    latest = latest_statement(state)
    if latest is None:
        return {}
    return ratios(latest, prior_statement(state, latest), policy)


# ---- payment behaviour ----------------------------------------------------------------------


def window_start(on: date, policy: Policy) -> date:
    """The payment-behaviour window ending on ``on`` is the days after this one."""
    return add_months(on, -policy.payment_behaviour.window_months)


def _since(state: CustomerState, policy: Policy) -> date:
    """The start of the window of the latest business day seen: nothing on or before it can
    count again, since assessments are made at the latest business time."""
    if state.last_time is None:
        return date.min
    return window_start(state.last_time.date(), policy)


def _pruned(state: CustomerState, policy: Policy) -> CustomerState:
    """The aggregates without the days the window has left behind."""
    since = _since(state, policy)
    paid, dunned = state.paid.after(since), state.dunned.after(since)
    if paid is state.paid and dunned is state.dunned:
        return state
    return replace(state, paid=paid, dunned=dunned)


def overdue_open(state: CustomerState, on: date) -> list[int]:
    """Days overdue on business date ``on`` of each open invoice past its due date: from the
    dunning system once it has reported on the invoice since the due date (aged on from its
    ``as_of``), else from the due date (``ledger.days_overdue``)."""
    return [
        max(lg.days_overdue(inv, on)[0], 0)
        for inv in state.ledger.invoices.values()
        if inv.due_date < on
    ]


def payment_behaviour(state: CustomerState, on: date, policy: Policy) -> dict[str, Decimal]:
    """The payment-behaviour keys over the policy's window ending on ``on``.

    The population is every invoice a payment settled within the window (the ``paid``
    aggregates; one credited in full says nothing about paying and is not there) plus every
    invoice open and past due on ``on`` (the ledger). ``avg_days_to_pay`` (issue →
    settlement) covers the settled ones; ``avg_days_beyond_terms`` and
    ``late_payment_share_12m`` (late: more than ``late_after_days`` beyond the due date)
    cover the whole population; ``max_days_overdue_12m`` is the worst of it and of what the
    dunning system reported within the window (0 when all were paid on time). Keys without
    data are absent: an invoice that is neither paid nor due yet says nothing about how the
    customer pays.
    """
    rules = policy.payment_behaviour
    since = window_start(on, policy)
    paid = state.paid.within(since, on)
    open_days = overdue_open(state, on)
    population = paid.count + len(open_days)
    beyond = sum(days * n for days, n in paid.beyond) + sum(open_days)
    late = sum(n for days, n in paid.beyond if days > rules.late_after_days)
    late += sum(1 for days in open_days if days > rules.late_after_days)
    out: dict[str, Decimal] = {}
    if paid.count:
        out["avg_days_to_pay"] = _round(_DIVISION.divide(Decimal(paid.days_to_pay), paid.count))
    if population:
        out["avg_days_beyond_terms"] = _round(_DIVISION.divide(Decimal(beyond), population))
        out["late_payment_share_12m"] = _round(_DIVISION.divide(Decimal(late), population))
    candidates = list(open_days)
    if paid.beyond:
        candidates.append(paid.beyond[-1][0])
    dunned = state.dunned.worst(since, on)
    if dunned is not None:
        candidates.append(dunned)
    if candidates:
        out["max_days_overdue_12m"] = Decimal(max(candidates))
    return out


# ---- credit report and industry ---------------------------------------------------------------


def bureau_inputs(report: CreditReport | None, on: date, policy: Policy) -> dict[str, Decimal]:
    """``bureau_score_normalised`` (score − min)/(max − min), the weighted ``legal_events``
    dated within the policy's lookback (undated ones count as current), ``defaults`` and
    ``delinquencies_12m`` of the latest report; empty without a report."""
    if report is None:
        return {}
    rules = policy.credit_reports
    since = add_months(on, -rules.legal_event_lookback_months)
    recent = [e.type for e in report.legal_events if e.event_date is None or e.event_date > since]
    out: dict[str, Decimal] = {
        "legal_events": rules.weighted_legal_events(recent),
    }
    normalised = _div(report.score - report.score_min, report.score_max - report.score_min)
    if normalised is not None:
        out["bureau_score_normalised"] = _round(normalised)
    if report.defaults is not None:
        out["defaults"] = Decimal(report.defaults)
    if report.delinquencies_12m is not None:
        out["delinquencies_12m"] = Decimal(report.delinquencies_12m)
    return out


def industry_input(state: CustomerState, policy: Policy) -> Decimal | None:
    """The outlook as a number (positive 1, stable 0, negative −1); None when the customer
    has no industry code (an unlisted code gets the policy's default outlook)."""
    if not state.industry:
        return None
    return policy.industry_outlook_value(state.industry)


def score_inputs(state: CustomerState, policy: Policy, at: datetime) -> dict[str, Decimal]:
    """Every scorecard input known for the customer at ``at``; an absent key is missing."""
    on = at.date()
    inputs: dict[str, Decimal] = {}
    inputs.update(financial_ratios(state, policy))
    inputs.update(payment_behaviour(state, on, policy))
    inputs.update(bureau_inputs(state.report, on, policy))
    outlook = industry_input(state, policy)
    if outlook is not None:
        inputs["industry_outlook"] = outlook
    return inputs


# ---- scoring --------------------------------------------------------------------------------


def score(inputs: Mapping[str, Decimal | None], policy: Policy) -> tuple[int, list[dict[str, Any]]]:
    """The scorecard total (0–100, rounded half up) and one explained line per factor.

    A missing input (absent or None) earns the factor's ``missing_points`` and its
    ``missing_reason`` says so; it is never silently zero.
    """
    factors: list[dict[str, Any]] = []
    total = ZERO
    for factor in policy.scorecard:
        value = inputs.get(factor.input)
        points, reason = policy.score_factor(factor, value)
        total += points
        factors.append(
            {
                "factor": factor.factor,
                "input": factor.input,
                "value": value,
                "points": points,
                "max_points": factor.max_points,
                "reason": reason,
            }
        )
    rounded = int(total.to_integral_value(rounding=ROUND_HALF_UP))
    return min(max(rounded, 0), 100), factors


def grade_for(total: int, policy: Policy) -> tuple[str, RiskLevel]:
    grade = policy.grade_for_score(Decimal(total))
    return grade.name, grade.risk_level


def active_override(state: CustomerState, at: datetime) -> Override | None:
    override = state.override
    return override if override is not None and override.active_at(at) else None


@dataclass(frozen=True, slots=True)
class Trigger:
    """The event an assessment answers: its id, type and source (ids are unique per source)."""

    event_id: str
    type: str
    source: str


def assessment_id(customer_id: str, trigger: Trigger) -> str:
    """Stable per (customer, triggering event): a re-publish is recognisably the same."""
    name = "\x1f".join((customer_id, trigger.source, trigger.event_id))
    return f"asm-{uuid.uuid5(uuid.NAMESPACE_URL, name)}"


@dataclass(frozen=True, slots=True)
class Scorecard:
    """The customer's scorecard at a time: its inputs, total, explained factors, the
    computed grade, and the published one (an active override's)."""

    inputs: dict[str, Decimal]
    total: int
    factors: list[dict[str, Any]]
    computed_grade: str
    computed_risk: RiskLevel
    grade: str
    risk_level: str
    override: Override | None


def scorecard(state: CustomerState, policy: Policy, now: datetime) -> Scorecard:
    """Score the customer as it stands at ``now``. With an active override the published
    grade is the override's (with its risk level); ``computed_grade`` keeps the scorecard's."""
    inputs = score_inputs(state, policy, now)
    total, factors = score(inputs, policy)
    computed, computed_risk = grade_for(total, policy)
    override = active_override(state, now)
    grade, risk_level = computed, computed_risk
    if override is not None:
        grade, risk_level = override.grade, policy.grade(override.grade).risk_level
    return Scorecard(inputs, total, factors, computed, computed_risk, grade, risk_level, override)


def assess(
    state: CustomerState,
    policy: Policy,
    trigger: Trigger,
    now: datetime,
    *,
    review_from: date | None = None,
    card: Scorecard | None = None,
) -> AssessmentCompleted:
    """The ``assessment.completed`` body for the customer as it stands at ``now`` (``card``:
    its scorecard at ``now``, if already made).

    ``next_review_date`` is the policy cadence of the published grade from ``now``, or, with
    ``review_from`` (re-scores that are no review), the earlier of that and ``review_from``.
    """
    card = card or scorecard(state, policy, now)
    override = card.override
    next_review = policy.next_review_date(card.grade, now.date())
    if review_from is not None:
        next_review = min(next_review, review_from)
    published = {
        key: value
        for key, value in card.inputs.items()
        if key in FINANCIAL_RATIOS or key in PAYMENT_BEHAVIOUR
    }
    return AssessmentCompleted.model_validate(
        {
            "assessment_id": assessment_id(state.customer_id, trigger),
            "customer_id": state.customer_id,
            "score": card.total,
            "grade": card.grade,
            "risk_level": card.risk_level,
            "previous_grade": state.last.grade if state.last is not None else None,
            "factors": card.factors,
            "ratios": published,
            "override": (
                {
                    "grade": override.grade,
                    "reason": override.reason,
                    "by": override.by,
                    "expires_at": override.expires_at,
                }
                if override is not None
                else None
            ),
            "policy_version": policy.version,
            "trigger": {"event_id": trigger.event_id, "type": trigger.type},
            "next_review_date": next_review,
            "assessed_at": now,
            # Added fields: the scorecard's own grade, which an override hides.
            "computed_grade": card.computed_grade,
            "computed_risk_level": card.computed_risk,
        }
    )


def remember(state: CustomerState, body: AssessmentCompleted) -> CustomerState:
    """Remember a published assessment: the next one compares with it."""
    assert body.next_review_date is not None
    extra = body.model_extra or {}
    last = LastAssessment(
        assessment_id=body.assessment_id,
        score=body.score,
        grade=body.grade,
        risk_level=body.risk_level,
        computed_grade=str(extra.get("computed_grade", body.grade)),
        next_review_date=body.next_review_date,
        assessed_at=body.assessed_at,
    )
    return replace(state, last=last)


# ---- the fold -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """One event as the fold sees it; ``recall``: the ledger items from the archive it names
    (the caller looks them up; the ledger raises ``NeedRecall`` for any it lacks)."""

    type: str
    data: Any
    time: datetime
    recall: lg.Recall = field(default_factory=dict)


def _to_credit_currency(
    amount: Decimal, currency: str, state: CustomerState, policy: Policy, field_name: str
) -> Decimal:
    if currency == state.currency:
        return amount
    converted = policy.convert(amount, currency, state.currency)
    if converted is None:
        raise DeadLetter(
            NO_FX_RATE,
            f"data.{field_name}: no rate from {currency} to {state.currency} in "
            f"policy {policy.version}",
            field_name,
        )
    return converted


def _converter(state: CustomerState, policy: Policy) -> lg.Converter:
    """Amounts as received into the customer's credit currency (for ledger items that come
    back from the archive after the credit currency changed)."""

    def convert(amount: Decimal, ccy: str, what: str) -> Decimal:
        return _to_credit_currency(amount, ccy, state, policy, what)

    return convert


def statement_from(
    data: FinancialStatementPublished, state: CustomerState, policy: Policy, received_at: datetime
) -> Statement:
    """The statement in the customer's credit currency; ``DeadLetter(no_fx_rate)`` without
    a rate."""
    ccy = data.currency

    def conv(amount: Decimal, name: str) -> Decimal:
        return _to_credit_currency(amount, ccy, state, policy, name)

    def opt(amount: Decimal | None, name: str) -> Decimal | None:
        return None if amount is None else conv(amount, name)

    conv(Decimal(0), "currency")  # a missing rate is said once, about the currency
    bs, inc = data.balance_sheet, data.income_statement
    cf = data.cash_flow
    return Statement(
        statement_id=data.statement_id,
        period_end=data.period_end,
        period_months=int(data.period_months),
        currency=state.currency,
        received_at=received_at,
        audited=data.audited,
        cash=opt(bs.cash, "balance_sheet.cash"),
        receivables=opt(bs.receivables, "balance_sheet.receivables"),
        inventory=opt(bs.inventory, "balance_sheet.inventory"),
        current_assets=conv(bs.current_assets, "balance_sheet.current_assets"),
        total_assets=conv(bs.total_assets, "balance_sheet.total_assets"),
        current_liabilities=conv(bs.current_liabilities, "balance_sheet.current_liabilities"),
        total_liabilities=conv(bs.total_liabilities, "balance_sheet.total_liabilities"),
        equity=conv(bs.equity, "balance_sheet.equity"),
        retained_earnings=opt(bs.retained_earnings, "balance_sheet.retained_earnings"),
        revenue=conv(inc.revenue, "income_statement.revenue"),
        ebit=opt(inc.ebit, "income_statement.ebit"),
        interest_expense=opt(inc.interest_expense, "income_statement.interest_expense"),
        net_income=conv(inc.net_income, "income_statement.net_income"),
        operating_cash_flow=opt(
            cf.operating_cash_flow if cf is not None else None, "cash_flow.operating_cash_flow"
        ),
    )


def evolve(state: CustomerState, event: Event, policy: Policy) -> CustomerState:
    """Fold one event into the customer's state. Raises ``DeadLetter`` when it cannot apply
    (an amount in a currency the policy has no rate for, a fact's number again with other
    figures), ``ledger.NeedRecall`` when it needs archived ledger items it was not given."""
    handler = _HANDLERS.get(event.type)
    if handler is None:
        return state
    if state.step is not None:
        state = replace(state, step=None)
    time = event.time
    before = state.last_time
    if before is None or time > before:
        # First, so that the window the event is folded into is that of the latest day.
        state = replace(state, last_time=time)
    try:
        new = handler(state, event.data, time, policy, event.recall)
    except lg.LedgerConflict as conflict:
        raise DeadLetter(
            CONFLICTING_DUPLICATE, f"data.{conflict.field_name}: {conflict}", conflict.field_name
        ) from None
    if before is None or new.last_time is None or new.last_time.date() != before.date():
        new = _pruned(new, policy)
    return new


def _with_step(state: CustomerState, step: lg.Step, policy: Policy) -> CustomerState:
    """The state after a ledger step: what payments settled counts in the aggregates, what
    a reversal or cancellation reopened counts no more."""
    paid = state.paid
    if step.settled or step.unsettled:
        paid = paid.changed(step.settled, step.unsettled, _since(state, policy))
    return replace(state, ledger=step.ledger, paid=paid, step=step)


def _customer(
    state: CustomerState, d: CustomerData, _t: datetime, p: Policy, _r: lg.Recall
) -> CustomerState:
    if d.currency != state.currency:
        state = _in_currency(state, d.currency, p)
    return replace(
        state,
        registered=True,
        name=d.name,
        country=d.country,
        industry=d.industry,
        currency=d.currency,
        payment_terms_days=d.payment_terms_days,
        parent_id=d.parent_id,
    )


def _in_currency(state: CustomerState, ccy: str, p: Policy) -> CustomerState:
    """The ledger re-expressed in a new credit currency, each fact converted from its amount
    as received (so an invoice folded before its customer's registration ends up where it
    would have, had the registration come first). Statements keep the currency they were
    converted to; ``ratios`` converts a prior one when it differs."""

    def conv(amount: Decimal, from_ccy: str, what: str) -> Decimal:
        converted = p.convert(amount, from_ccy, ccy)
        if converted is None:
            raise DeadLetter(
                NO_FX_RATE,
                f"data.currency: {what} recorded in {from_ccy} cannot be converted "
                f"to {ccy} with the rates of policy {p.version}",
                "currency",
            )
        return converted

    ledger = lg.reexpress(replace(state.ledger, currency=state.currency), ccy, conv)
    return replace(state, ledger=ledger)


def _statement(
    state: CustomerState, d: FinancialStatementPublished, t: datetime, p: Policy, _r: lg.Recall
) -> CustomerState:
    # The same statement id again is a restatement: it replaces the earlier figures.
    statement = statement_from(d, state, p, t)
    others = {k: s for k, s in state.statements.items() if k != d.statement_id}
    return replace(state, statements=_kept({**others, d.statement_id: statement}))


def _report(
    state: CustomerState, d: CreditReportReceived, _t: datetime, _p: Policy, _r: lg.Recall
) -> CustomerState:
    report = CreditReport(
        report_id=d.report_id,
        bureau=d.bureau,
        score=d.score,
        score_min=d.score_min,
        score_max=d.score_max,
        reported_at=d.reported_at,
        delinquencies_12m=d.delinquencies_12m,
        defaults=d.defaults,
        legal_events=tuple(LegalEvent(e.type, e.date) for e in d.legal_events),
    )
    current = state.report
    if current is not None and current.reported_at > report.reported_at:
        return state  # an older report arriving late does not replace a newer one
    return replace(state, report=report)


def _receivables(event_type: str) -> Any:
    """A receivables event: the shared ledger folds it (``ledger.record``); dunning also
    counts in the window's worst days overdue, for paid invoices too."""

    def fold(
        state: CustomerState, d: Any, _t: datetime, p: Policy, recall: lg.Recall
    ) -> CustomerState:
        step = lg.record(state.ledger, recall, event_type, d, _converter(state, p))
        state = _with_step(state, step, p)
        if event_type != "invoice.overdue":
            return state
        dunned = state.dunned.reported(d.as_of, d.days_overdue, _since(state, p))
        return state if dunned is state.dunned else replace(state, dunned=dunned)

    return fold


def _override_set(
    state: CustomerState, d: OverrideSet, t: datetime, p: Policy, _r: lg.Recall
) -> CustomerState:
    if d.grade not in {grade.name for grade in p.grades}:
        # The API only takes the policy's grades; a replay under a policy without this grade
        # keeps the scorecard's grade rather than failing.
        return replace(state, override=None)
    override = Override(d.override_id, d.grade, d.reason, d.by, t, d.expires_at)
    return replace(state, override=override)


def _override_ended(
    state: CustomerState,
    d: OverrideExpired | OverrideRemoved,
    _t: datetime,
    _p: Policy,
    _r: lg.Recall,
) -> CustomerState:
    if state.override is None or state.override.override_id != d.override_id:
        return state  # a stale expiry of an override replaced since
    return replace(state, override=None)


def _recompute(
    state: CustomerState, _d: RecomputeRequested, _t: datetime, _p: Policy, _r: lg.Recall
) -> CustomerState:
    return state


_Handler = Callable[[CustomerState, Any, datetime, Policy, lg.Recall], CustomerState]
_HANDLERS: dict[str, _Handler] = {
    "customer.registered": _customer,
    "customer.updated": _customer,
    "financial_statement.published": _statement,
    "credit_report.received": _report,
    **{t: _receivables(t) for t in lg.EVENT_TYPES},
    OverrideSet.TYPE: _override_set,
    OverrideExpired.TYPE: _override_ended,
    OverrideRemoved.TYPE: _override_ended,
    RecomputeRequested.TYPE: _recompute,
}
HANDLED_TYPES: Final = frozenset(_HANDLERS)


def recall_wanted(state: CustomerState, event_type: str, data: Any) -> set[str]:
    """The ledger archive keys an event may need (shared.ledger.wanted_by)."""
    return lg.wanted_by(state.ledger, event_type, data)


# ---- when to (re)assess ---------------------------------------------------------------------

# New information or an analyst's act: always a new assessment (and a new review date).
ALWAYS: Final = frozenset(
    {
        "customer.registered",
        "financial_statement.published",
        "credit_report.received",
        OverrideSet.TYPE,
        OverrideExpired.TYPE,
        OverrideRemoved.TYPE,
        RecomputeRequested.TYPE,
    }
)
# Re-scored, published only when the score or the grade moves (a registered customer's
# first assessment aside); such a re-score is no review, so it never pushes the review out.
RESCORE: Final = lg.EVENT_TYPES | {"customer.updated"}


def decide_assessment(
    prev: CustomerState, nxt: CustomerState, event_type: str, trigger: Trigger, policy: Policy
) -> AssessmentCompleted | None:
    """The assessment an applied event calls for, or None (pure: ``prev`` and ``nxt`` are
    the states before and after it; the caller ``remember``s what it publishes).

    The assessment is made at the latest business time seen for the customer, so a late
    event never yields an assessment older than the one before it.
    """
    at = nxt.last_time
    if at is None or event_type not in HANDLED_TYPES:
        return None
    if event_type in ALWAYS:
        if (
            event_type in (OverrideExpired.TYPE, OverrideRemoved.TYPE)
            and nxt.override == prev.override
        ):
            return None
        return assess(nxt, policy, trigger, at)
    if event_type not in RESCORE:
        return None
    last = nxt.last
    if last is None:
        if event_type != "customer.updated":
            return None  # payments alone do not rate a customer nobody registered
        return assess(nxt, policy, trigger, at)
    card = scorecard(nxt, policy, at)
    if card.total == last.score and card.grade == last.grade:
        return None
    return assess(nxt, policy, trigger, at, review_from=last.next_review_date, card=card)


class Refold(lg.Refold[CustomerState]):
    """A customer's events folded in memory, its ledger archive kept in a dict (replays of
    one customer, answers about the past, tests): what the service does with a database.
    Events that cannot apply are skipped, as the service dead-lettered them (``rejected``)."""

    def __init__(self, state: CustomerState, policy: Policy) -> None:
        super().__init__(state)
        self.policy = policy

    def evolve(self, event: Event) -> CustomerState:
        """Fold one event's facts."""
        return self.apply(
            lambda state, recall: evolve(state, replace(event, recall=recall), self.policy),
            DeadLetter,
        )

    def step(self, event: Event, trigger: Trigger) -> AssessmentCompleted | None:
        """Fold one event and, when it calls for it, assess and remember the assessment."""
        prev, skipped = self.state, len(self.rejected)
        nxt = self.evolve(event)
        if len(self.rejected) > skipped:
            return None
        body = decide_assessment(prev, nxt, event.type, trigger, self.policy)
        if body is not None:
            self.state = remember(nxt, body)
        return body


def replay(
    events: Iterable[tuple[str, Any, Trigger, datetime]], customer_id: str, policy: Policy
) -> tuple[CustomerState, list[AssessmentCompleted]]:
    """Fold a customer's events from scratch: the state and every assessment published
    (events that cannot apply are skipped, as the service dead-letters them)."""
    folding = Refold(new_customer(customer_id, policy), policy)
    published: list[AssessmentCompleted] = []
    for event_type, data, trigger, time in events:
        body = folding.step(Event(event_type, data, time), trigger)
        if body is not None:
            published.append(body)
    return folding.state, published
