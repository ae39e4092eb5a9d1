"""REFERENCE ONLY — the assessment domain of the layout before assessment_0003 (issue 20), frozen
as it was (``git show d20291f:services/assessment/domain.py``): every invoice, payment, credit
note and dunning notice a customer ever had in its state, and its own allocation rule (credit
notes first, the oldest invoices paid from scratch at every assessment). Used only by
tests/unit/test_assessment_history.py, to fold the same streams both ways. Not maintained:
do not import it from the services.

The docstring of the module as it was follows.

Assessment domain: a customer's credit picture, its explainable score and risk grade.

``apply`` folds one event into a ``CustomerState``; ``ratios``, ``payment_behaviour`` and
``score_inputs`` derive the scorecard inputs from the facts; ``score`` and ``assess`` turn
them into the ``assessment.completed`` body; ``process`` is the whole step the service takes
for one event (fold, decide whether to reassess, record). No I/O and no clock: time always
comes in as an argument, so a replay gives the very same assessments.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Context, Decimal
from typing import Any, Final, Literal

from services.assessment.events import (
    OverrideExpired,
    OverrideRemoved,
    OverrideSet,
    RecomputeRequested,
)
from shared.events import (
    AssessmentCompleted,
    CreditNoteIssued,
    CreditReportReceived,
    CustomerData,
    DeadLetter,
    FinancialStatementPublished,
    InvoiceCancelled,
    InvoiceIssued,
    InvoiceOverdue,
    PaymentReceived,
    PaymentReversed,
)
from shared.policy import Policy, RiskLevel, add_months

ZERO: Final = Decimal(0)
NO_FX_RATE: Final = "no_fx_rate"

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


# ---- facts ----------------------------------------------------------------------------------


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


@dataclass(frozen=True, slots=True)
class Invoice:
    invoice_id: str
    amount: Decimal  # in the customer's credit currency
    issue_date: date
    due_date: date
    cancelled: bool = False


@dataclass(frozen=True, slots=True)
class Credit:
    """Money in the customer's favour: a payment or a credit note, with its allocations."""

    credit_id: str
    kind: Literal["payment", "credit_note"]
    amount: Decimal  # in the customer's credit currency
    on: date
    allocations: tuple[tuple[str, Decimal], ...] = ()
    reversed: bool = False


@dataclass(frozen=True, slots=True)
class Dunning:
    """The dunning system's latest word on one invoice (``invoice.overdue``)."""

    as_of: date
    days_overdue: int
    due_date: date


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
    customer_id: str
    currency: str
    registered: bool = False
    name: str | None = None
    country: str | None = None
    industry: str | None = None
    payment_terms_days: int = 30
    parent_id: str | None = None
    statements: Mapping[str, Statement] = field(default_factory=dict)
    report: CreditReport | None = None
    invoices: Mapping[str, Invoice] = field(default_factory=dict)
    credits: Mapping[str, Credit] = field(default_factory=dict)
    dunning: Mapping[str, Dunning] = field(default_factory=dict)
    override: Override | None = None
    last: LastAssessment | None = None
    last_time: datetime | None = None


def new_customer(customer_id: str, policy: Policy) -> CustomerState:
    """A customer nothing is known about yet; its credit currency defaults to the base one."""
    return CustomerState(customer_id=customer_id, currency=policy.base_currency)


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


def financial_ratios(state: CustomerState, policy: Policy) -> dict[str, Decimal]:
    latest = latest_statement(state)
    if latest is None:
        return {}
    return ratios(latest, prior_statement(state, latest), policy)


# ---- payment behaviour ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InvoiceOutcome:
    """How one invoice was paid, as known on the assessment date."""

    invoice_id: str
    issue_date: date
    due_date: date
    settled_on: date | None  # None: still open
    days_beyond_terms: int  # settled: late days at settlement; open: days overdue now


def invoice_outcomes(state: CustomerState, on: date) -> list[InvoiceOutcome]:
    """Settle the customer's invoices with its payments, as known on business date ``on``.

    Credit notes reduce what is owed first (an invoice credited in full says nothing about
    paying and is left out). Payments then settle invoices in date order: explicit
    allocations first, the rest to the oldest open invoices (due date, issue date, id). An
    invoice is settled on the date of the payment that clears it (never before its issue
    date). Reversed payments, cancelled invoices and anything dated after ``on`` are ignored.
    An open invoice's days overdue come from the dunning system when it has reported on it
    since the due date (aged on from its ``as_of``), else from the due date.
    """
    invoices = {
        i.invoice_id: i for i in state.invoices.values() if not i.cancelled and i.issue_date <= on
    }
    open_amount = {i: inv.amount for i, inv in invoices.items()}
    fifo = sorted(invoices.values(), key=lambda i: (i.due_date, i.issue_date, i.invoice_id))
    credits = sorted(
        (c for c in state.credits.values() if not c.reversed and c.on <= on),
        key=lambda c: (c.kind != "credit_note", c.on, c.credit_id),
    )
    settled_on: dict[str, date] = {}
    oldest = 0
    for credit in credits:
        left = credit.amount

        def take(invoice_id: str, most: Decimal, credit: Credit = credit) -> Decimal:
            amount = min(most, open_amount[invoice_id])
            if amount <= 0:
                return ZERO
            open_amount[invoice_id] -= amount
            if credit.kind == "payment" and open_amount[invoice_id] <= 0:
                settled_on[invoice_id] = max(credit.on, invoices[invoice_id].issue_date)
            return amount

        for invoice_id, amount in credit.allocations:
            if invoice_id in open_amount and left > 0:
                left -= take(invoice_id, min(amount, left))
        # Open amounts only ever fall, so everything before `oldest` stays settled: one pass
        # over the invoices for all credits together.
        while left > 0 and oldest < len(fifo):
            invoice_id = fifo[oldest].invoice_id
            left -= take(invoice_id, left)
            if open_amount[invoice_id] <= 0:
                oldest += 1

    outcomes: list[InvoiceOutcome] = []
    for inv in fifo:
        iid = inv.invoice_id
        if open_amount[iid] <= 0 and iid not in settled_on:
            continue  # credited in full
        settled = settled_on.get(iid)
        if settled is not None:
            days = max((settled - inv.due_date).days, 0)
        else:
            dun = state.dunning.get(iid)
            if dun is not None and inv.due_date <= dun.as_of <= on:
                days = dun.days_overdue + (on - dun.as_of).days
            else:
                days = max((on - inv.due_date).days, 0)
        outcomes.append(InvoiceOutcome(iid, inv.issue_date, inv.due_date, settled, days))
    return outcomes


def payment_behaviour(state: CustomerState, on: date, policy: Policy) -> dict[str, Decimal]:
    """The payment-behaviour keys over the policy's window ending on ``on``.

    The population is every invoice settled within the window plus every invoice open and
    past due on ``on``. ``avg_days_to_pay`` (issue → settlement) covers the settled ones;
    ``avg_days_beyond_terms`` and ``late_payment_share_12m`` (late: more than
    ``late_after_days`` beyond the due date) cover the whole population;
    ``max_days_overdue_12m`` is the worst of it and of what the dunning system reported
    within the window (0 when all were paid on time). Keys without data are absent: an
    invoice that is neither paid nor due yet says nothing about how the customer pays.
    """
    rules = policy.payment_behaviour
    window_start = add_months(on, -rules.window_months)
    outcomes = invoice_outcomes(state, on)
    settled = [
        o for o in outcomes if o.settled_on is not None and window_start < o.settled_on <= on
    ]
    overdue_open = [o for o in outcomes if o.settled_on is None and o.due_date < on]
    population = settled + overdue_open
    out: dict[str, Decimal] = {}
    if settled:
        to_pay = sum(((o.settled_on - o.issue_date).days for o in settled if o.settled_on), 0)
        out["avg_days_to_pay"] = _round(_DIVISION.divide(Decimal(to_pay), len(settled)))
    if population:
        beyond = sum(o.days_beyond_terms for o in population)
        late = sum(1 for o in population if o.days_beyond_terms > rules.late_after_days)
        out["avg_days_beyond_terms"] = _round(_DIVISION.divide(Decimal(beyond), len(population)))
        out["late_payment_share_12m"] = _round(_DIVISION.divide(Decimal(late), len(population)))
    dunned = [d.days_overdue for d in state.dunning.values() if window_start < d.as_of <= on]
    if population or dunned:
        worst = max([o.days_beyond_terms for o in population] + dunned)
        out["max_days_overdue_12m"] = Decimal(worst)
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


def assess(
    state: CustomerState,
    policy: Policy,
    trigger: Trigger,
    now: datetime,
    *,
    review_from: date | None = None,
) -> AssessmentCompleted:
    """The ``assessment.completed`` body for the customer as it stands at ``now``.

    With an active override the published grade is the override's (with its risk level);
    ``computed_grade`` keeps the scorecard's. ``next_review_date`` is the policy cadence of
    the published grade from ``now``, or, with ``review_from`` (re-scores that are no review),
    the earlier of that and ``review_from``.
    """
    inputs = score_inputs(state, policy, now)
    total, factors = score(inputs, policy)
    computed, computed_risk = grade_for(total, policy)
    override = active_override(state, now)
    grade, risk_level = computed, computed_risk
    if override is not None:
        grade, risk_level = override.grade, policy.grade(override.grade).risk_level
    next_review = policy.next_review_date(grade, now.date())
    if review_from is not None:
        next_review = min(next_review, review_from)
    published = {
        key: value
        for key, value in inputs.items()
        if key in FINANCIAL_RATIOS or key in PAYMENT_BEHAVIOUR
    }
    return AssessmentCompleted.model_validate(
        {
            "assessment_id": assessment_id(state.customer_id, trigger),
            "customer_id": state.customer_id,
            "score": total,
            "grade": grade,
            "risk_level": risk_level,
            "previous_grade": state.last.grade if state.last is not None else None,
            "factors": factors,
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
            "computed_grade": computed,
            "computed_risk_level": computed_risk,
        }
    )


def record(state: CustomerState, body: AssessmentCompleted) -> CustomerState:
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


def _customer(state: CustomerState, d: CustomerData, _t: datetime, _p: Policy) -> CustomerState:
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


def _statement(
    state: CustomerState, d: FinancialStatementPublished, t: datetime, p: Policy
) -> CustomerState:
    # The same statement id again is a restatement: it replaces the earlier figures.
    statement = statement_from(d, state, p, t)
    return replace(state, statements={**state.statements, d.statement_id: statement})


def _report(
    state: CustomerState, d: CreditReportReceived, _t: datetime, _p: Policy
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


def _invoice_issued(
    state: CustomerState, d: InvoiceIssued, _t: datetime, p: Policy
) -> CustomerState:
    if d.invoice_id in state.invoices:
        return state  # the same invoice number twice under another event id: keep the first
    amount = _to_credit_currency(d.amount, d.currency, state, p, "amount")
    invoice = Invoice(d.invoice_id, amount, d.issue_date, d.due_date)
    return replace(state, invoices={**state.invoices, d.invoice_id: invoice})


def _invoice_cancelled(
    state: CustomerState, d: InvoiceCancelled, _t: datetime, _p: Policy
) -> CustomerState:
    invoice = state.invoices.get(d.invoice_id)
    if invoice is None or invoice.cancelled:
        return state
    return replace(
        state, invoices={**state.invoices, d.invoice_id: replace(invoice, cancelled=True)}
    )


def _credit_note(
    state: CustomerState, d: CreditNoteIssued, _t: datetime, p: Policy
) -> CustomerState:
    key = f"credit_note:{d.credit_note_id}"
    if key in state.credits:
        return state
    amount = _to_credit_currency(d.amount, d.currency, state, p, "amount")
    allocations = ((d.invoice_id, amount),) if d.invoice_id else ()
    credit = Credit(key, "credit_note", amount, d.issue_date, allocations)
    return replace(state, credits={**state.credits, key: credit})


def _payment(state: CustomerState, d: PaymentReceived, _t: datetime, p: Policy) -> CustomerState:
    key = f"payment:{d.payment_id}"
    if key in state.credits:
        return state
    amount = _to_credit_currency(d.amount, d.currency, state, p, "amount")
    allocations = tuple(
        (a.invoice_id, _to_credit_currency(a.amount, d.currency, state, p, "allocations.amount"))
        for a in (d.allocations or ())
    )
    credit = Credit(key, "payment", amount, d.received_date, allocations)
    return replace(state, credits={**state.credits, key: credit})


def _payment_reversed(
    state: CustomerState, d: PaymentReversed, _t: datetime, _p: Policy
) -> CustomerState:
    key = f"payment:{d.payment_id}"
    credit = state.credits.get(key)
    if credit is None or credit.reversed:
        return state
    return replace(state, credits={**state.credits, key: replace(credit, reversed=True)})


def _overdue(state: CustomerState, d: InvoiceOverdue, _t: datetime, _p: Policy) -> CustomerState:
    known = state.dunning.get(d.invoice_id)
    if known is not None and known.as_of > d.as_of:
        return state  # an older dunning run arriving late does not override a newer one
    dunning = Dunning(d.as_of, d.days_overdue, d.due_date)
    return replace(state, dunning={**state.dunning, d.invoice_id: dunning})


def _override_set(state: CustomerState, d: OverrideSet, t: datetime, p: Policy) -> CustomerState:
    if d.grade not in {grade.name for grade in p.grades}:
        # The API only takes the policy's grades; a replay under a policy without this grade
        # keeps the scorecard's grade rather than failing.
        return replace(state, override=None)
    override = Override(d.override_id, d.grade, d.reason, d.by, t, d.expires_at)
    return replace(state, override=override)


def _override_ended(
    state: CustomerState, d: OverrideExpired | OverrideRemoved, _t: datetime, _p: Policy
) -> CustomerState:
    if state.override is None or state.override.override_id != d.override_id:
        return state  # a stale expiry of an override replaced since
    return replace(state, override=None)


def _recompute(
    state: CustomerState, _d: RecomputeRequested, _t: datetime, _p: Policy
) -> CustomerState:
    return state


_Handler = Callable[[CustomerState, Any, datetime, Policy], CustomerState]
_HANDLERS: dict[str, _Handler] = {
    "customer.registered": _customer,
    "customer.updated": _customer,
    "financial_statement.published": _statement,
    "credit_report.received": _report,
    "invoice.issued": _invoice_issued,
    "invoice.cancelled": _invoice_cancelled,
    "credit_note.issued": _credit_note,
    "payment.received": _payment,
    "payment.reversed": _payment_reversed,
    "invoice.overdue": _overdue,
    OverrideSet.TYPE: _override_set,
    OverrideExpired.TYPE: _override_ended,
    OverrideRemoved.TYPE: _override_ended,
    RecomputeRequested.TYPE: _recompute,
}
HANDLED_TYPES: Final = frozenset(_HANDLERS)


def apply(
    state: CustomerState, event_type: str, data: Any, time: datetime, policy: Policy
) -> CustomerState:
    """Fold one event into the customer's state. Raises ``DeadLetter`` when it cannot apply
    (an amount in a currency the policy has no rate for)."""
    handler = _HANDLERS.get(event_type)
    if handler is None:
        return state
    new = handler(state, data, time, policy)
    last = time if new.last_time is None or time > new.last_time else new.last_time
    return replace(new, last_time=last)


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
RESCORE: Final = frozenset(
    {
        "customer.updated",
        "invoice.issued",
        "invoice.cancelled",
        "credit_note.issued",
        "payment.received",
        "payment.reversed",
        "invoice.overdue",
    }
)


@dataclass(frozen=True, slots=True)
class Step:
    """What one event did: the new state and the assessment it published, if any."""

    state: CustomerState
    assessment: AssessmentCompleted | None = None


def process(
    state: CustomerState,
    event_type: str,
    data: Any,
    trigger: Trigger,
    time: datetime,
    policy: Policy,
) -> Step:
    """Fold one event and, when it calls for it, assess and record the assessment.

    The assessment is made at the latest business time seen for the customer, so a late
    event never yields an assessment older than the one before it.
    """
    new = apply(state, event_type, data, time, policy)
    at = new.last_time or time
    if event_type in ALWAYS:
        if (
            event_type in (OverrideExpired.TYPE, OverrideRemoved.TYPE)
            and new.override == state.override
        ):
            return Step(new)
        body = assess(new, policy, trigger, at)
        return Step(record(new, body), body)
    if event_type not in RESCORE:
        return Step(new)
    last = new.last
    if last is None:
        if event_type != "customer.updated":
            return Step(new)  # payments alone do not rate a customer nobody registered
        body = assess(new, policy, trigger, at)
        return Step(record(new, body), body)
    body = assess(new, policy, trigger, at, review_from=last.next_review_date)
    if body.score == last.score and body.grade == last.grade:
        return Step(new)
    return Step(record(new, body), body)


def replay(
    events: Iterable[tuple[str, Any, Trigger, datetime]], customer_id: str, policy: Policy
) -> tuple[CustomerState, list[AssessmentCompleted]]:
    """Fold a customer's events from scratch: the state and every assessment published."""
    state = new_customer(customer_id, policy)
    published: list[AssessmentCompleted] = []
    for event_type, data, trigger, time in events:
        step = process(state, event_type, data, trigger, time, policy)
        state = step.state
        if step.assessment is not None:
            published.append(step.assessment)
    return state, published
