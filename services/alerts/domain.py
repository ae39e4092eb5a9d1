"""Alerts domain: each customer's latest facts, the early-warning rules and the alert lifecycle.

``step(state, event, policy)`` folds one event: ``apply`` records the facts it carries,
``evaluate_rules`` judges the rules that kind of event can affect, ``apply_changes`` keeps
the resulting raise / update / resolve. Pure: no I/O and no clock; the time of a change is
the business time of the event that caused it, so a replay reproduces every alert.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any, Final, Literal

from pydantic import BaseModel

from services.alerts.events import AcknowledgeRequested, ReviewOverdueDetected
from shared.events import (
    AssessmentCompleted,
    CreditReportReceived,
    ExposureUpdated,
    InvoiceOverdue,
    LimitChanged,
    PaymentReceived,
    PaymentReversed,
)
from shared.ledger import bucket_of
from shared.money import is_currency, quantize
from shared.policy import Policy, add_months

Severity = Literal["info", "warning", "critical"]
Status = Literal["open", "acknowledged", "resolved"]
ChangeKind = Literal["raised", "updated", "resolved"]
HistoryType = Literal["raised", "updated", "resolved", "acknowledged"]

LIMIT_BREACH: Final = "limit_breach"
UTILIZATION_HIGH: Final = "utilization_high"
OVERDUE: Final = "overdue"
GRADE_DOWNGRADE: Final = "grade_downgrade"
FINANCIAL_DETERIORATION: Final = "financial_deterioration"
NEGATIVE_CREDIT_REPORT: Final = "negative_credit_report"
PAYMENT_REVERSED: Final = "payment_reversed"
REVIEW_OVERDUE: Final = "review_overdue"
RULES: Final[tuple[str, ...]] = (
    LIMIT_BREACH,
    UTILIZATION_HIGH,
    OVERDUE,
    GRADE_DOWNGRADE,
    FINANCIAL_DETERIORATION,
    NEGATIVE_CREDIT_REPORT,
    PAYMENT_REVERSED,
    REVIEW_OVERDUE,
)
SEVERITIES: Final[tuple[Severity, ...]] = ("info", "warning", "critical")
_RANK: Final[dict[str, int]] = {name: rank for rank, name in enumerate(SEVERITIES)}

# Materiality: how far a figure must move from what the alert last published before an
# `alert.updated` is worth sending (severity changes are always material).
UTILIZATION_STEP: Final = Decimal("0.05")  # 5 points of utilisation
AMOUNT_STEP: Final = Decimal("0.10")  # a tenth of the amount last published
# Payments remembered to know a reversed payment's amount; older reversals are settled by
# any later payment.
PAYMENT_MEMORY_DAYS: Final = 400
PAYMENT_MEMORY_COUNT: Final = 500

ZERO: Final = Decimal(0)


# ---- facts ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExposureFacts:
    """The latest ``exposure.updated`` figures."""

    currency: str
    exposure: Decimal
    limit: Decimal
    utilization: Decimal | None
    overdue_amount: Decimal
    max_days_overdue: int
    on_hold: bool
    as_of: datetime


@dataclass(frozen=True, slots=True)
class Dunning:
    """An ``invoice.overdue`` record not (yet) reflected in an exposure.updated."""

    invoice_id: str
    days_overdue: int
    amount_overdue: Decimal
    currency: str
    as_of: date
    time: datetime


@dataclass(frozen=True, slots=True)
class AssessmentFacts:
    assessment_id: str
    grade: str
    previous_grade: str | None  # the grade before this assessment
    score: int
    risk_level: str
    ratios: Mapping[str, Decimal]
    next_review_date: date | None
    assessed_at: datetime


@dataclass(frozen=True, slots=True)
class LimitFacts:
    limit: Decimal
    currency: str
    reason: str
    effective_at: datetime


@dataclass(frozen=True, slots=True)
class ReportFacts:
    """The latest report of one bureau."""

    report_id: str
    bureau: str
    reported_at: datetime
    legal_events: tuple[tuple[str, date | None], ...]
    defaults: int | None


@dataclass(frozen=True, slots=True)
class PaymentFacts:
    amount: Decimal
    currency: str
    received_date: date


@dataclass(frozen=True, slots=True)
class Reversal:
    """A reversed payment not yet made good by a later payment."""

    payment_id: str
    reason: str | None
    amount: Decimal | None  # None: the payment itself was never seen
    currency: str | None
    at: datetime


@dataclass(frozen=True, slots=True)
class Alert:
    alert_id: str
    customer_id: str
    rule: str
    severity: Severity
    status: Status
    title: str
    message: str
    facts: Mapping[str, Any]  # JSON values only (str, int, bool, None, lists, dicts)
    dedup_key: str
    raised_at: datetime
    updated_at: datetime
    resolved_at: datetime | None = None
    version: int = 1
    acknowledged_by: str | None = None
    acknowledged_at: datetime | None = None
    acknowledgement_note: str | None = None
    policy_version: str | None = None

    @property
    def active(self) -> bool:
        return self.status != "resolved"


@dataclass(frozen=True, slots=True)
class CustomerState:
    customer_id: str
    exposure: ExposureFacts | None = None
    dunning: Mapping[str, Dunning] = field(default_factory=dict)
    assessment: AssessmentFacts | None = None
    limit: LimitFacts | None = None
    reports: Mapping[str, ReportFacts] = field(default_factory=dict)
    payments: Mapping[str, PaymentFacts] = field(default_factory=dict)
    reversals: Mapping[str, Reversal] = field(default_factory=dict)
    review_detected_for: date | None = None
    # The latest alert of each rule (open, acknowledged or resolved): at most one is active.
    alerts: Mapping[str, Alert] = field(default_factory=dict)
    last_time: datetime | None = None

    def active_alert(self, rule: str) -> Alert | None:
        alert = self.alerts.get(rule)
        return alert if alert is not None and alert.active else None

    def alert_by_id(self, alert_id: str) -> Alert | None:
        return next((a for a in self.alerts.values() if a.alert_id == alert_id), None)


def new_customer(customer_id: str) -> CustomerState:
    return CustomerState(customer_id=customer_id)


@dataclass(frozen=True, slots=True)
class Event:
    """What the domain needs of one event: type, a unique key, business time, data."""

    type: str
    key: str  # unique per event (source and id); the raising event names its alert
    time: datetime
    data: BaseModel


@dataclass(frozen=True, slots=True)
class AlertChange:
    kind: ChangeKind  # published as alert.<kind>
    history: HistoryType  # recorded in the alert's history ("acknowledged" for an ack)
    alert: Alert  # the whole alert after the change

    @property
    def event_type(self) -> str:
        return f"alert.{self.kind}"


# ---- the fold: facts ------------------------------------------------------------------------


def evolve(state: CustomerState, event: Event, policy: Policy) -> CustomerState:
    """Record the facts ``event`` carries (alerts are changed by ``apply_changes`` only)."""
    handler = _FACT_HANDLERS.get(event.type)
    new = handler(state, event, policy) if handler is not None else state
    last = event.time if new.last_time is None or event.time > new.last_time else new.last_time
    return replace(new, last_time=last)


def _exposure(state: CustomerState, event: Event, _p: Policy) -> CustomerState:
    d = event.data
    assert isinstance(d, ExposureUpdated)
    if state.exposure is not None and d.as_of < state.exposure.as_of:
        return state  # an older picture arriving late does not replace a newer one
    facts = ExposureFacts(
        currency=d.currency,
        exposure=d.exposure,
        limit=d.limit,
        utilization=d.utilization,
        overdue_amount=d.overdue_amount,
        max_days_overdue=d.max_days_overdue,
        on_hold=d.on_hold,
        as_of=d.as_of,
    )
    # Dunning records the limits service had already folded are in these figures now.
    dunning = {k: v for k, v in state.dunning.items() if v.time > d.as_of}
    return replace(state, exposure=facts, dunning=dunning)


def _invoice_overdue(state: CustomerState, event: Event, _p: Policy) -> CustomerState:
    d = event.data
    assert isinstance(d, InvoiceOverdue)
    if state.exposure is not None and event.time <= state.exposure.as_of:
        return state  # the exposure figures already reflect it
    known = state.dunning.get(d.invoice_id)
    if known is not None and known.as_of > d.as_of:
        return state  # an older dunning run arriving late
    dun = Dunning(d.invoice_id, d.days_overdue, d.amount_overdue, d.currency, d.as_of, event.time)
    return replace(state, dunning={**state.dunning, d.invoice_id: dun})


def _assessment(state: CustomerState, event: Event, _p: Policy) -> CustomerState:
    d = event.data
    assert isinstance(d, AssessmentCompleted)
    before = state.assessment
    if before is not None and d.assessed_at < before.assessed_at:
        return state
    previous = before.grade if before is not None else d.previous_grade
    facts = AssessmentFacts(
        assessment_id=d.assessment_id,
        grade=d.grade,
        previous_grade=previous,
        score=d.score,
        risk_level=d.risk_level,
        ratios=dict(d.ratios),
        next_review_date=d.next_review_date,
        assessed_at=d.assessed_at,
    )
    return replace(state, assessment=facts)


def _limit_changed(state: CustomerState, event: Event, _p: Policy) -> CustomerState:
    d = event.data
    assert isinstance(d, LimitChanged)
    if state.limit is not None and d.effective_at < state.limit.effective_at:
        return state
    return replace(state, limit=LimitFacts(d.limit, d.currency, d.reason, d.effective_at))


def _credit_report(state: CustomerState, event: Event, _p: Policy) -> CustomerState:
    d = event.data
    assert isinstance(d, CreditReportReceived)
    known = state.reports.get(d.bureau)
    if known is not None and d.reported_at < known.reported_at:
        return state
    report = ReportFacts(
        report_id=d.report_id,
        bureau=d.bureau,
        reported_at=d.reported_at,
        legal_events=tuple((e.type, e.date) for e in d.legal_events),
        defaults=d.defaults,
    )
    return replace(state, reports={**state.reports, d.bureau: report})


def _payment_received(state: CustomerState, event: Event, policy: Policy) -> CustomerState:
    d = event.data
    assert isinstance(d, PaymentReceived)
    if d.payment_id in state.payments:
        return state
    horizon = d.received_date - timedelta(days=PAYMENT_MEMORY_DAYS)
    kept = [(k, v) for k, v in state.payments.items() if v.received_date >= horizon]
    kept.append((d.payment_id, PaymentFacts(d.amount, d.currency, d.received_date)))
    kept.sort(key=lambda item: (item[1].received_date, item[0]))
    payments = dict(kept[-PAYMENT_MEMORY_COUNT:])
    return replace(state, payments=payments, reversals=_settle(state.reversals, d, policy))


def _settle(
    reversals: Mapping[str, Reversal], payment: PaymentReceived, policy: Policy
) -> dict[str, Reversal]:
    """A later payment makes good the oldest reversals its amount covers, in order."""
    left = payment.amount
    outstanding = dict(reversals)
    for rev in sorted(reversals.values(), key=lambda r: (r.at, r.payment_id)):
        if rev.payment_id == payment.payment_id or payment.received_date < rev.at.date():
            continue
        if rev.amount is None or rev.currency is None:
            del outstanding[rev.payment_id]  # amount unknown: any later payment settles it
            continue
        needed = policy.convert(rev.amount, rev.currency, payment.currency)
        if needed is None:
            needed = ZERO  # no rate to compare: the payment is taken as making it good
        if needed > left:
            break
        left -= needed
        del outstanding[rev.payment_id]
    return outstanding


def _payment_reversed(state: CustomerState, event: Event, _p: Policy) -> CustomerState:
    d = event.data
    assert isinstance(d, PaymentReversed)
    if d.payment_id in state.reversals:
        return state
    paid = state.payments.get(d.payment_id)
    rev = Reversal(
        d.payment_id,
        d.reason,
        paid.amount if paid else None,
        paid.currency if paid else None,
        event.time,
    )
    payments = {k: v for k, v in state.payments.items() if k != d.payment_id}
    return replace(state, payments=payments, reversals={**state.reversals, d.payment_id: rev})


def _review_detected(state: CustomerState, event: Event, _p: Policy) -> CustomerState:
    d = event.data
    assert isinstance(d, ReviewOverdueDetected)
    return replace(state, review_detected_for=d.next_review_date)


_FACT_HANDLERS: dict[str, Callable[[CustomerState, Event, Policy], CustomerState]] = {
    ExposureUpdated.TYPE: _exposure,
    InvoiceOverdue.TYPE: _invoice_overdue,
    AssessmentCompleted.TYPE: _assessment,
    LimitChanged.TYPE: _limit_changed,
    CreditReportReceived.TYPE: _credit_report,
    PaymentReceived.TYPE: _payment_received,
    PaymentReversed.TYPE: _payment_reversed,
    ReviewOverdueDetected.TYPE: _review_detected,
}


# ---- the fold: alerts -----------------------------------------------------------------------


def apply_changes(state: CustomerState, changes: list[AlertChange]) -> CustomerState:
    if not changes:
        return state
    alerts = dict(state.alerts)
    for change in changes:
        alerts[change.alert.rule] = change.alert
    return replace(state, alerts=alerts)


def decide_alerts(state: CustomerState, event: Event, policy: Policy) -> list[AlertChange]:
    """The alerts ``event`` raises, updates or resolves, judged on the state with its facts
    (``evolve`` first)."""
    return evaluate_rules(state, event, policy, event.time)


def step(
    state: CustomerState, event: Event, policy: Policy
) -> tuple[CustomerState, list[AlertChange]]:
    """Fold one event: ``evolve`` (its facts), ``decide_alerts``, then ``apply_changes``."""
    facts = evolve(state, event, policy)
    changes = decide_alerts(facts, event, policy)
    return apply_changes(facts, changes), changes


# ---- rules ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    """The rule's condition holds."""

    severity: Severity
    title: str
    message: str
    facts: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Clear:
    """The condition has cleared: an active alert resolves, saying why."""

    message: str
    facts: dict[str, Any] | None = None


# None: nothing to judge from this event; an active alert stays as it is.
Outcome = Finding | Clear | None
RuleFn = Callable[[CustomerState, Event, Policy, "Alert | None"], Outcome]

RULES_BY_TYPE: Final[dict[str, tuple[str, ...]]] = {
    ExposureUpdated.TYPE: (LIMIT_BREACH, UTILIZATION_HIGH, OVERDUE),
    InvoiceOverdue.TYPE: (OVERDUE,),
    AssessmentCompleted.TYPE: (GRADE_DOWNGRADE, FINANCIAL_DETERIORATION, REVIEW_OVERDUE),
    CreditReportReceived.TYPE: (NEGATIVE_CREDIT_REPORT,),
    PaymentReversed.TYPE: (PAYMENT_REVERSED,),
    PaymentReceived.TYPE: (PAYMENT_REVERSED,),
    ReviewOverdueDetected.TYPE: (REVIEW_OVERDUE,),
}


def rule_enabled(policy: Policy, rule: str) -> bool:
    settings = getattr(policy.alerts, rule, None)
    return bool(getattr(settings, "enabled", False))


def evaluate_rules(
    state: CustomerState, event: Event, policy: Policy, now: datetime
) -> list[AlertChange]:
    """The alert changes ``event`` calls for, judged on ``state`` (its facts already applied).

    At most one active alert per rule: a condition that holds raises one (or updates it when
    severity or a material fact changed), a cleared condition resolves it, and a problem
    that comes back after resolving raises a new alert under the same dedup key.
    """
    if isinstance(event.data, AcknowledgeRequested):
        return _acknowledge(state, event.data, now)
    changes: list[AlertChange] = []
    for rule in RULES_BY_TYPE.get(event.type, ()):
        active = state.active_alert(rule)
        if not rule_enabled(policy, rule):
            if active is not None:
                changes.append(_resolve(active, Clear("The rule is disabled in the policy."), now))
            continue
        outcome = _RULE_FNS[rule](state, event, policy, active)
        if isinstance(outcome, Finding):
            if active is None:
                changes.append(_raise(state.customer_id, rule, outcome, event, policy, now))
            elif outcome.severity != active.severity or _MATERIAL[rule](active, outcome, policy):
                changes.append(_update(active, outcome, policy, now))
        elif isinstance(outcome, Clear) and active is not None:
            changes.append(_resolve(active, outcome, now))
    return changes


def dedup_key(customer_id: str, rule: str) -> str:
    return f"{customer_id}:{rule}"


def alert_id_for(key: str, event_key: str) -> str:
    """Stable id: the same problem raised by the same event always gets the same id."""
    digest = hashlib.sha256(f"{key}\x00{event_key}".encode()).hexdigest()
    return f"al-{digest[:32]}"


def _later(a: datetime, b: datetime) -> datetime:
    return a if a >= b else b


def _raise(
    customer_id: str, rule: str, finding: Finding, event: Event, policy: Policy, now: datetime
) -> AlertChange:
    key = dedup_key(customer_id, rule)
    alert = Alert(
        alert_id=alert_id_for(key, event.key),
        customer_id=customer_id,
        rule=rule,
        severity=finding.severity,
        status="open",
        title=finding.title,
        message=finding.message,
        facts=finding.facts,
        dedup_key=key,
        raised_at=now,
        updated_at=now,
        policy_version=policy.version,
    )
    return AlertChange("raised", "raised", alert)


def _update(active: Alert, finding: Finding, policy: Policy, now: datetime) -> AlertChange:
    escalated = _RANK[finding.severity] > _RANK[active.severity]
    alert = replace(
        active,
        severity=finding.severity,
        title=finding.title,
        message=finding.message,
        facts=finding.facts,
        updated_at=_later(now, active.updated_at),
        version=active.version + 1,
        policy_version=policy.version,
    )
    if escalated and active.status == "acknowledged":
        # The acknowledgement was for a lesser problem: someone has to look again.
        alert = replace(
            alert,
            status="open",
            acknowledged_by=None,
            acknowledged_at=None,
            acknowledgement_note=None,
        )
    return AlertChange("updated", "updated", alert)


def _resolve(active: Alert, clear: Clear, now: datetime) -> AlertChange:
    at = _later(now, active.updated_at)
    facts = dict(active.facts) if clear.facts is None else clear.facts
    alert = replace(
        active,
        status="resolved",
        message=clear.message,
        facts=facts,
        resolved_at=at,
        updated_at=at,
        version=active.version + 1,
    )
    return AlertChange("resolved", "resolved", alert)


def _acknowledge(
    state: CustomerState, data: AcknowledgeRequested, now: datetime
) -> list[AlertChange]:
    alert = state.alert_by_id(data.alert_id)
    if alert is None or alert.status != "open":
        return []  # resolved, or already acknowledged: nothing changes
    at = _later(now, alert.updated_at)
    acked = replace(
        alert,
        status="acknowledged",
        acknowledged_by=data.by,
        acknowledged_at=at,
        acknowledgement_note=data.note,
        updated_at=at,
        version=alert.version + 1,
    )
    return [AlertChange("updated", "acknowledged", acked)]


# ---- formatting -----------------------------------------------------------------------------


def _money(amount: Decimal, currency: str) -> str:
    return format(quantize(amount, currency) if is_currency(currency) else amount, "f")


def _plain(number: Decimal) -> str:
    text = format(number.normalize(), "f")
    return "0" if text == "-0" else text


def _pct(ratio: Decimal) -> str:
    shown = format((ratio * 100).quantize(Decimal("0.1")), "f")
    return f"{'0.0' if shown == '-0.0' else shown} %"


def _dec(value: object) -> Decimal | None:
    if value is None:
        return None
    try:
        return Decimal(str(value))
    except ArithmeticError:
        return None


def _moved(old: Decimal | None, new: Decimal | None, step: Decimal) -> bool:
    if old is None or new is None:
        return old is not new
    return abs(new - old) >= step


def _moved_relative(old: Decimal | None, new: Decimal | None, share: Decimal) -> bool:
    if old is None or new is None:
        return old is not new
    if old == 0:
        return new != 0
    return abs(new - old) >= abs(old) * share


# ---- limit_breach ---------------------------------------------------------------------------


def _limit_breach(state: CustomerState, _e: Event, policy: Policy, _a: Alert | None) -> Outcome:
    exp = state.exposure
    if exp is None:
        return None
    ccy = exp.currency
    facts: dict[str, Any] = {
        "exposure": _money(exp.exposure, ccy),
        "limit": _money(exp.limit, ccy),
        "excess": _money(max(exp.exposure - exp.limit, ZERO), ccy),
        "currency": ccy,
        "utilization": _plain(exp.utilization) if exp.utilization is not None else None,
        "on_hold": exp.on_hold,
        "limit_reason": state.limit.reason if state.limit is not None else None,
        "as_of": exp.as_of.isoformat(),
    }
    if exp.exposure <= exp.limit:
        return Clear(
            f"Exposure of {_money(exp.exposure, ccy)} {ccy} is back within the "
            f"credit limit of {_money(exp.limit, ccy)} {ccy}.",
            facts,
        )
    if exp.limit > 0:
        message = (
            f"Exposure of {_money(exp.exposure, ccy)} {ccy} exceeds the credit limit of "
            f"{_money(exp.limit, ccy)} {ccy} by {facts['excess']} {ccy} "
            f"({_pct(exp.exposure / exp.limit)} of the limit)."
        )
    else:
        message = (
            f"Exposure of {_money(exp.exposure, ccy)} {ccy} with no credit limit (limit 0 {ccy})."
        )
    return Finding(policy.alerts.limit_breach.severity, "Credit limit exceeded", message, facts)


def _limit_breach_material(old: Alert, new: Finding, _p: Policy) -> bool:
    old_limit, new_limit = _dec(old.facts.get("limit")), _dec(new.facts.get("limit"))
    if old_limit != new_limit or old.facts.get("currency") != new.facts.get("currency"):
        return True
    old_exp, new_exp = _dec(old.facts.get("exposure")), _dec(new.facts.get("exposure"))
    if new_limit is None or new_limit == 0:
        return _moved_relative(old_exp, new_exp, AMOUNT_STEP)
    if old_exp is None or new_exp is None:
        return old_exp != new_exp
    return _moved(old_exp / new_limit, new_exp / new_limit, UTILIZATION_STEP)


# ---- utilization_high -----------------------------------------------------------------------


def _utilization(exp: ExposureFacts) -> Decimal | None:
    if exp.limit <= 0:
        return None  # no limit: utilisation is undefined (limit_breach speaks for exposure)
    if exp.utilization is not None:
        return exp.utilization
    return (exp.exposure / exp.limit).quantize(Decimal("0.0001"))


def _utilization_high(
    state: CustomerState, _e: Event, policy: Policy, active: Alert | None
) -> Outcome:
    exp = state.exposure
    if exp is None:
        return None
    rule = policy.alerts.utilization_high
    util = _utilization(exp)
    ccy = exp.currency
    facts: dict[str, Any] = {
        "utilization": _plain(util) if util is not None else None,
        "exposure": _money(exp.exposure, ccy),
        "limit": _money(exp.limit, ccy),
        "currency": ccy,
        "raise_at": _plain(rule.raise_at),
        "clear_below": _plain(rule.clear_below),
        "as_of": exp.as_of.isoformat(),
    }
    if util is None:
        return Clear(f"The credit limit is 0 {ccy}: utilisation no longer applies.", facts)
    if rule.holds(util, alert_open=active is not None):
        message = (
            f"Credit utilisation is {_pct(util)}: exposure {facts['exposure']} {ccy} of a "
            f"{facts['limit']} {ccy} limit (raised at {_pct(rule.raise_at)}, clears "
            f"below {_pct(rule.clear_below)})."
        )
        return Finding(rule.severity, "High credit utilisation", message, facts)
    return Clear(
        f"Credit utilisation is back to {_pct(util)}, below {_pct(rule.clear_below)}.", facts
    )


def _utilization_material(old: Alert, new: Finding, policy: Policy) -> bool:
    # Movements within the hysteresis band count as the raise threshold itself, so
    # utilisation wandering between clear_below and raise_at never sends updates.
    floor = policy.alerts.utilization_high.raise_at
    before, after = _dec(old.facts.get("utilization")), _dec(new.facts.get("utilization"))
    if before is None or after is None:
        return before != after
    return _moved(max(before, floor), max(after, floor), UTILIZATION_STEP)


# ---- overdue --------------------------------------------------------------------------------


# The receivables ledger's buckets, the same for every service.
overdue_bucket = bucket_of


def _overdue(state: CustomerState, _e: Event, policy: Policy, _a: Alert | None) -> Outcome:
    exp = state.exposure
    if exp is None and not state.dunning:
        return None
    rule = policy.alerts.overdue
    days = exp.max_days_overdue if exp is not None else 0
    ccy = exp.currency if exp is not None else None
    amount = exp.overdue_amount if exp is not None else None
    source = "exposure"
    worst = max(state.dunning.values(), key=lambda d: (d.days_overdue, d.invoice_id), default=None)
    if worst is not None and worst.days_overdue > days:
        # The dunning system is ahead of the exposure figures: take its word meanwhile.
        days, source = worst.days_overdue, "dunning"
        converted = policy.convert(worst.amount_overdue, worst.currency, ccy) if ccy else None
        if converted is None:
            amount, ccy = worst.amount_overdue, worst.currency
        else:
            amount = max(amount or ZERO, converted)
    facts: dict[str, Any] = {
        "max_days_overdue": days,
        "bucket": overdue_bucket(days),
        "overdue_amount": _money(amount, ccy) if amount is not None and ccy else None,
        "currency": ccy,
        "warning_days": rule.warning_days,
        "critical_days": rule.critical_days,
        "source": source,
    }
    if source == "dunning" and worst is not None:
        facts["invoice_id"] = worst.invoice_id
    severity = rule.severity_for(days)
    if severity is None:
        return Clear(
            f"Nothing is overdue by more than {rule.warning_days} days any more "
            f"(worst: {days} days).",
            facts,
        )
    owed = f"; {facts['overdue_amount']} {ccy} overdue in total" if facts["overdue_amount"] else ""
    message = (
        f"Payments are {days} days overdue at worst (warning after {rule.warning_days}, "
        f"critical after {rule.critical_days} days){owed}."
    )
    return Finding(severity, "Payments overdue", message, facts)


def _overdue_material(old: Alert, new: Finding, _p: Policy) -> bool:
    if old.facts.get("bucket") != new.facts.get("bucket"):
        return True
    if old.facts.get("currency") != new.facts.get("currency"):
        return True
    return _moved_relative(
        _dec(old.facts.get("overdue_amount")), _dec(new.facts.get("overdue_amount")), AMOUNT_STEP
    )


# ---- grade_downgrade ------------------------------------------------------------------------


def _is_current(state: CustomerState, event: Event) -> bool:
    """The event is the assessment the state now holds (not a stale one set aside)."""
    data = event.data
    return (
        isinstance(data, AssessmentCompleted)
        and state.assessment is not None
        and state.assessment.assessment_id == data.assessment_id
    )


def _grade_downgrade(
    state: CustomerState, event: Event, policy: Policy, active: Alert | None
) -> Outcome:
    a = state.assessment
    if a is None or not _is_current(state, event):
        return None
    baseline = str(active.facts.get("grade_before")) if active is not None else a.previous_grade
    if baseline is None:
        return None
    try:
        notches = policy.notches_between(baseline, a.grade)
        severity = policy.downgrade_severity(baseline, a.grade)
    except ValueError:
        return None  # a grade this policy does not know: nothing to compare
    facts: dict[str, Any] = {
        "grade": a.grade,
        "previous_grade": a.previous_grade,
        "grade_before": baseline,
        "notches": notches,
        "score": a.score,
        "risk_level": a.risk_level,
        "assessment_id": a.assessment_id,
    }
    if severity is None:
        return Clear(
            f"The grade is back to {a.grade} (it was {baseline} before the downgrade).", facts
        )
    moved = "notch" if notches == 1 else "notches"
    message = (
        f"The risk grade fell from {baseline} to {a.grade} ({notches} {moved}; "
        f"score {a.score}, risk {a.risk_level})."
    )
    return Finding(severity, "Risk grade downgraded", message, facts)


def _grade_material(old: Alert, new: Finding, _p: Policy) -> bool:
    return old.facts.get("grade") != new.facts.get("grade")


# ---- financial_deterioration ----------------------------------------------------------------

FINANCIAL_RATIOS: Final = (
    "altman_z2",
    "current_ratio",
    "debt_to_equity",
    "debt_ratio",
    "operating_cash_flow_ratio",
    "revenue_growth",
    "equity",
)

_SIGNAL_TEXT: Final = {
    "altman_z2_distress": "Altman Z'' {altman_z2} is in the distress zone (below {z2})",
    "current_ratio_low": "current ratio {current_ratio} is below {cr}",
    "negative_equity": "equity is negative",
    "negative_operating_cash_flow": "operating cash flow is negative",
    "revenue_drop": "revenue is down {drop} on the prior period",
}


def financial_signals(ratios: Mapping[str, Decimal], policy: Policy) -> list[str]:
    """Which warning signs of the financial_deterioration rule these ratios show."""
    rule = policy.alerts.financial_deterioration
    signals: list[str] = []
    z2 = ratios.get("altman_z2")
    if z2 is not None and rule.z2_zone(z2) == "distress":
        signals.append("altman_z2_distress")
    current = ratios.get("current_ratio")
    if current is not None and current < rule.current_ratio_below:
        signals.append("current_ratio_low")
    if rule.negative_equity and _equity_negative(ratios):
        signals.append("negative_equity")
    ocf = ratios.get("operating_cash_flow_ratio")
    if rule.negative_operating_cash_flow and ocf is not None and ocf < 0:
        signals.append("negative_operating_cash_flow")
    growth = ratios.get("revenue_growth")
    if growth is not None and growth <= -rule.revenue_drop:
        signals.append("revenue_drop")
    return signals


def _equity_negative(ratios: Mapping[str, Decimal]) -> bool:
    equity = ratios.get("equity")
    if equity is not None:
        return equity < 0
    leverage = ratios.get("debt_to_equity")  # TL / equity: negative only with equity < 0
    if leverage is not None and leverage < 0:
        return True
    debt_ratio = ratios.get("debt_ratio")  # TL / TA above 1: liabilities exceed assets
    return debt_ratio is not None and debt_ratio > 1


def _financial(state: CustomerState, event: Event, policy: Policy, _a: Alert | None) -> Outcome:
    a = state.assessment
    if a is None or not _is_current(state, event):
        return None
    if not any(name in a.ratios for name in FINANCIAL_RATIOS):
        return None  # no financial figures at all: nothing to judge, nothing clears
    rule = policy.alerts.financial_deterioration
    signals = financial_signals(a.ratios, policy)
    facts: dict[str, Any] = {"signals": signals, "assessment_id": a.assessment_id}
    for name in FINANCIAL_RATIOS:
        value = a.ratios.get(name)
        facts[name] = _plain(value) if value is not None else None
    if not signals:
        return Clear(
            "The latest assessment shows none of the warning signs of financial deterioration.",
            facts,
        )
    shown = {
        "altman_z2": facts["altman_z2"],
        "z2": _plain(rule.z2_distress),
        "current_ratio": facts["current_ratio"],
        "cr": _plain(rule.current_ratio_below),
        "drop": _pct(-a.ratios["revenue_growth"]) if "revenue_drop" in signals else "",
    }
    parts = [_SIGNAL_TEXT[s].format(**shown) for s in signals]
    message = "The latest financial figures show: " + "; ".join(parts) + "."
    return Finding(rule.severity, "Financial deterioration", message, facts)


def _financial_material(old: Alert, new: Finding, _p: Policy) -> bool:
    return list(old.facts.get("signals") or []) != list(new.facts.get("signals") or [])


# ---- negative_credit_report -----------------------------------------------------------------


def _credit_report_rule(
    state: CustomerState, _e: Event, policy: Policy, _a: Alert | None
) -> Outcome:
    if not state.reports:
        return None
    rule = policy.alerts.negative_credit_report
    lookback = policy.credit_reports.legal_event_lookback_months
    severity: Severity | None = None
    legal: list[dict[str, Any]] = []
    defaults: list[dict[str, Any]] = []
    for bureau in sorted(state.reports):
        report = state.reports[bureau]
        # Legal events older than the scorecard's look-back window are history, not news.
        cutoff = add_months(report.reported_at.date(), -lookback)
        for kind, day in report.legal_events:
            if day is not None and day < cutoff:
                continue
            found = rule.severity_for(kind)
            if found is None:
                continue
            legal.append(
                {
                    "bureau": bureau,
                    "type": kind,
                    "date": day.isoformat() if day else None,
                    "severity": found,
                }
            )
            severity = _worse(severity, found)
        if report.defaults:
            defaults.append({"bureau": bureau, "count": report.defaults})
            severity = _worse(severity, rule.defaults_severity)
    facts: dict[str, Any] = {
        "legal_events": legal,
        "defaults": defaults,
        "reports": [
            {"bureau": r.bureau, "report_id": r.report_id, "reported_at": r.reported_at.isoformat()}
            for _, r in sorted(state.reports.items())
        ],
    }
    if severity is None:
        return Clear("The latest credit reports show no legal events or defaults.", facts)
    parts = [
        f"{e['type']}" + (f" ({e['date']})" if e["date"] else "") + f" from {e['bureau']}"
        for e in legal
    ]
    parts += [
        f"{d['count']} default{'s' if d['count'] != 1 else ''} from {d['bureau']}" for d in defaults
    ]
    message = "Credit reports show " + "; ".join(parts) + "."
    return Finding(severity, "Negative credit report", message, facts)


def _worse(a: Severity | None, b: Severity) -> Severity:
    return b if a is None or _RANK[b] > _RANK[a] else a


def _report_material(old: Alert, new: Finding, _p: Policy) -> bool:
    return old.facts.get("legal_events") != new.facts.get("legal_events") or old.facts.get(
        "defaults"
    ) != new.facts.get("defaults")


# ---- payment_reversed -----------------------------------------------------------------------


def _payment_reversed_rule(
    state: CustomerState, event: Event, policy: Policy, _a: Alert | None
) -> Outcome:
    reversals = sorted(state.reversals.values(), key=lambda r: (r.at, r.payment_id))
    facts: dict[str, Any] = {
        "payments": [
            {
                "payment_id": r.payment_id,
                "amount": _money(r.amount, r.currency)
                if r.amount is not None and r.currency
                else None,
                "currency": r.currency,
                "reason": r.reason,
                "reversed_at": r.at.isoformat(),
            }
            for r in reversals
        ]
    }
    if not reversals:
        paid = event.data
        if isinstance(paid, PaymentReceived):
            return Clear(
                f"Payment {paid.payment_id} of {_money(paid.amount, paid.currency)} "
                f"{paid.currency} received on {paid.received_date.isoformat()} makes "
                "good the reversed payments.",
                facts,
            )
        return Clear("No reversed payment is outstanding.", facts)
    parts = []
    for r in reversals:
        amount = (
            f" of {_money(r.amount, r.currency)} {r.currency}"
            if r.amount is not None and r.currency
            else ""
        )
        reason = f" ({r.reason})" if r.reason else ""
        parts.append(f"payment {r.payment_id}{amount} was reversed{reason}")
    text = "; ".join(parts)
    message = f"{text[:1].upper()}{text[1:]}; not yet made good by a later payment."
    return Finding(policy.alerts.payment_reversed.severity, "Payment reversed", message, facts)


def _reversal_material(old: Alert, new: Finding, _p: Policy) -> bool:
    def ids(facts: Mapping[str, Any]) -> list[Any]:
        return [p.get("payment_id") for p in facts.get("payments") or []]

    return ids(old.facts) != ids(new.facts)


# ---- review_overdue -------------------------------------------------------------------------


def review_due_on(state: CustomerState) -> date | None:
    """The first day the periodic review counts as passed (the policy's grace days come on
    top); None when there is no review date or its passing is already recorded."""
    a = state.assessment
    if a is None or a.next_review_date is None:
        return None
    if state.review_detected_for == a.next_review_date:
        return None
    return a.next_review_date + timedelta(days=1)


def review_overdue_due(state: CustomerState, policy: Policy, today: date) -> bool:
    """True when the scheduler should record that the review is overdue on ``today``."""
    due = review_due_on(state)
    if due is None or not rule_enabled(policy, REVIEW_OVERDUE):
        return False
    return due + timedelta(days=policy.alerts.review_overdue.grace_days) <= today


def _review_overdue(
    state: CustomerState, event: Event, policy: Policy, active: Alert | None
) -> Outcome:
    a = state.assessment
    data = event.data
    if isinstance(data, AssessmentCompleted):
        if active is None or not _is_current(state, event) or a is None:
            return None
        if a.next_review_date is not None and a.next_review_date < event.time.date():
            return None  # a re-score that keeps the past review date is no review
        due = a.next_review_date.isoformat() if a.next_review_date else "not set"
        return Clear(
            f"A new assessment was completed (grade {a.grade}); the next review is due {due}.",
            {
                **dict(active.facts),
                "assessment_id": a.assessment_id,
                "next_review_date": a.next_review_date.isoformat() if a.next_review_date else None,
            },
        )
    if not isinstance(data, ReviewOverdueDetected) or a is None:
        return None
    if a.next_review_date != data.next_review_date:
        return None  # a newer assessment moved the date meanwhile
    rule = policy.alerts.review_overdue
    days = (event.time.date() - data.next_review_date).days
    if days <= rule.grace_days:
        return None
    facts: dict[str, Any] = {
        "next_review_date": data.next_review_date.isoformat(),
        "days_overdue": days,
        "grade": a.grade,
        "last_assessment_id": a.assessment_id,
        "last_assessed_at": a.assessed_at.isoformat(),
    }
    message = (
        f"The periodic credit review was due on {data.next_review_date.isoformat()} "
        f"(grade {a.grade}, last assessed {a.assessed_at.date().isoformat()}) and has "
        "not been done."
    )
    return Finding(rule.severity, "Credit review overdue", message, facts)


def _review_material(old: Alert, new: Finding, _p: Policy) -> bool:
    return old.facts.get("next_review_date") != new.facts.get("next_review_date")


_RULE_FNS: Final[dict[str, RuleFn]] = {
    LIMIT_BREACH: _limit_breach,
    UTILIZATION_HIGH: _utilization_high,
    OVERDUE: _overdue,
    GRADE_DOWNGRADE: _grade_downgrade,
    FINANCIAL_DETERIORATION: _financial,
    NEGATIVE_CREDIT_REPORT: _credit_report_rule,
    PAYMENT_REVERSED: _payment_reversed_rule,
    REVIEW_OVERDUE: _review_overdue,
}
_MATERIAL: Final[dict[str, Callable[[Alert, Finding, Policy], bool]]] = {
    LIMIT_BREACH: _limit_breach_material,
    UTILIZATION_HIGH: _utilization_material,
    OVERDUE: _overdue_material,
    GRADE_DOWNGRADE: _grade_material,
    FINANCIAL_DETERIORATION: _financial_material,
    NEGATIVE_CREDIT_REPORT: _report_material,
    PAYMENT_REVERSED: _reversal_material,
    REVIEW_OVERDUE: _review_material,
}


# ---- views ----------------------------------------------------------------------------------


def _iso(t: datetime | None) -> str | None:
    return t.isoformat().replace("+00:00", "Z") if t is not None else None


def alert_body(alert: Alert) -> dict[str, Any]:
    """The ``credit.alerts`` data of an alert (contract fields first, then ours)."""
    return {
        "alert_id": alert.alert_id,
        "customer_id": alert.customer_id,
        "rule": alert.rule,
        "severity": alert.severity,
        "status": alert.status,
        "title": alert.title,
        "message": alert.message,
        "facts": dict(alert.facts),
        "dedup_key": alert.dedup_key,
        "raised_at": _iso(alert.raised_at),
        "resolved_at": _iso(alert.resolved_at),
        "updated_at": _iso(alert.updated_at),
        "version": alert.version,
        "acknowledged_by": alert.acknowledged_by,
        "acknowledged_at": _iso(alert.acknowledged_at),
        "acknowledgement_note": alert.acknowledgement_note,
        "policy_version": alert.policy_version,
    }


_DESCRIPTIONS: Final = {
    LIMIT_BREACH: (
        "exposure above the credit limit (a limit of 0 counts)",
        "exposure back at or below the limit",
    ),
    UTILIZATION_HIGH: (
        "exposure / limit at or above raise_at",
        "utilisation below clear_below (in between, the alert stays as it is)",
    ),
    OVERDUE: (
        "worst days overdue above warning_days (warning) or critical_days (critical)",
        "worst days overdue at or below warning_days",
    ),
    GRADE_DOWNGRADE: (
        "a worse grade; critical_notches or more (or onto the worst grade) is critical",
        "the grade back at or above the grade before the downgrade",
    ),
    FINANCIAL_DETERIORATION: (
        "Z'' below z2_distress, current ratio below current_ratio_below, "
        "negative equity, negative operating cash flow, or revenue down "
        "by revenue_drop or more",
        "a new assessment showing none of them",
    ),
    NEGATIVE_CREDIT_REPORT: (
        "legal events within the look-back window (critical_types "
        "critical, warning_types warning) or defaults",
        "every bureau's latest report clean",
    ),
    PAYMENT_REVERSED: ("a payment reversed", "later payments covering every reversed payment"),
    REVIEW_OVERDUE: (
        "the periodic review date passed by more than grace_days",
        "a newer assessment",
    ),
}


def rules_overview(policy: Policy) -> list[dict[str, Any]]:
    """The active rules and their thresholds, for ``GET /v1/rules``."""
    out: list[dict[str, Any]] = []
    for rule in RULES:
        settings = getattr(policy.alerts, rule)
        dumped: dict[str, Any] = settings.model_dump(mode="json")
        enabled = bool(dumped.pop("enabled", True))
        raises, resolves = _DESCRIPTIONS[rule]
        severity = dumped.pop("severity", None)
        entry: dict[str, Any] = {
            "rule": rule,
            "enabled": enabled,
            "severity": severity,
            "raises_on": raises,
            "resolves_on": resolves,
            "thresholds": dumped,
        }
        if rule == OVERDUE:
            entry["severity"] = None
            entry["severities"] = ["warning", "critical"]
        elif rule == NEGATIVE_CREDIT_REPORT:
            entry["severities"] = ["warning", "critical"]
        elif rule == GRADE_DOWNGRADE:
            entry["severities"] = [severity, "critical"]
        if rule == NEGATIVE_CREDIT_REPORT:
            entry["thresholds"]["legal_event_lookback_months"] = (
                policy.credit_reports.legal_event_lookback_months
            )
        out.append(entry)
    return out
