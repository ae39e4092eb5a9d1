"""The alert rules and lifecycle, on the pure domain (Given / When / Then)."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from services.alerts import domain
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
from shared.policy import Policy, load_policy

POLICY = load_policy()
CID = "C-1001"
T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


@dataclass
class Customer:
    """One customer's alert state, fed event by event, remembering every change."""

    policy: Policy = POLICY
    state: domain.CustomerState = field(default_factory=lambda: domain.new_customer(CID))
    changes: list[domain.AlertChange] = field(default_factory=list)
    clock: datetime = T0
    counter: int = 0

    def feed(
        self, type_: str, data: BaseModel, *, at: datetime | None = None
    ) -> list[domain.AlertChange]:
        self.counter += 1
        self.clock = at or self.clock + timedelta(minutes=1)
        event = domain.Event(type_, f"/test|e-{self.counter}", self.clock, data)
        self.state, changes = domain.step(self.state, event, self.policy)
        self.changes += changes
        return changes

    # -- contract events ----------------------------------------------------------------
    def exposure(
        self,
        exposure: str,
        limit: str = "100000.00",
        *,
        days: int = 0,
        overdue: str = "0.00",
        at: datetime | None = None,
    ) -> list[domain.AlertChange]:
        self.clock = at or self.clock + timedelta(minutes=1)
        exp, lim = Decimal(exposure), Decimal(limit)
        data = ExposureUpdated.model_validate(
            {
                "customer_id": CID,
                "currency": "EUR",
                "open_receivables": exposure,
                "overdue_amount": overdue,
                "overdue_buckets": {},
                "max_days_overdue": days,
                "reserved": "0.00",
                "exposure": exposure,
                "limit": limit,
                "available": str(lim - exp),
                "utilization": str((exp / lim).quantize(Decimal("0.0001"))) if lim else None,
                "on_hold": False,
                "as_of": self.clock,
            }
        )
        return self.feed(ExposureUpdated.TYPE, data, at=self.clock)

    def utilization(self, value: str) -> list[domain.AlertChange]:
        return self.exposure(str(Decimal(value) * 100000), "100000.00")

    def overdue_days(self, days: int, amount: str = "5000.00") -> list[domain.AlertChange]:
        return self.exposure("10000.00", days=days, overdue=amount if days else "0.00")

    def dunning(self, invoice: str, days: int, amount: str = "2500.00") -> list[domain.AlertChange]:
        data = InvoiceOverdue.model_validate(
            {
                "invoice_id": invoice,
                "customer_id": CID,
                "currency": "EUR",
                "amount_overdue": amount,
                "due_date": "2026-01-01",
                "days_overdue": days,
                "as_of": (self.clock + timedelta(minutes=1)).date().isoformat(),
            }
        )
        return self.feed(InvoiceOverdue.TYPE, data)

    def assessed(
        self,
        grade: str,
        *,
        ratios: dict[str, str] | None = None,
        next_review: date | None = None,
        previous: str | None = None,
        aid: str | None = None,
    ) -> list[domain.AlertChange]:
        self.counter += 1
        data = AssessmentCompleted.model_validate(
            {
                "assessment_id": aid or f"as-{self.counter}",
                "customer_id": CID,
                "score": 50,
                "grade": grade,
                "risk_level": "medium",
                "previous_grade": previous,
                "ratios": ratios or {},
                "policy_version": POLICY.version,
                "next_review_date": next_review.isoformat() if next_review else None,
                "assessed_at": self.clock + timedelta(minutes=1),
            }
        )
        return self.feed(AssessmentCompleted.TYPE, data)

    def report(
        self,
        *,
        legal: list[tuple[str, str | None]] = (),  # type: ignore[assignment]
        defaults: int | None = None,
        bureau: str = "Creditreform",
        reported_at: datetime | None = None,
    ) -> list[domain.AlertChange]:
        self.counter += 1
        data = CreditReportReceived.model_validate(
            {
                "report_id": f"r-{self.counter}",
                "customer_id": CID,
                "bureau": bureau,
                "score": 500,
                "score_min": 0,
                "score_max": 1000,
                "defaults": defaults,
                "legal_events": [{"type": kind, "date": day} for kind, day in legal],
                "reported_at": reported_at or self.clock + timedelta(minutes=1),
            }
        )
        return self.feed(CreditReportReceived.TYPE, data)

    def paid(
        self, payment_id: str, amount: str, on: date | None = None
    ) -> list[domain.AlertChange]:
        data = PaymentReceived.model_validate(
            {
                "payment_id": payment_id,
                "customer_id": CID,
                "currency": "EUR",
                "amount": amount,
                "received_date": (on or (self.clock + timedelta(minutes=1)).date()).isoformat(),
            }
        )
        return self.feed(PaymentReceived.TYPE, data)

    def reversed(
        self, payment_id: str, reason: str = "insufficient funds"
    ) -> list[domain.AlertChange]:
        data = PaymentReversed(payment_id=payment_id, customer_id=CID, reason=reason)
        return self.feed(PaymentReversed.TYPE, data)

    def acknowledge(self, alert_id: str, by: str = "analyst") -> list[domain.AlertChange]:
        data = AcknowledgeRequested(customer_id=CID, alert_id=alert_id, by=by, note="on it")
        return self.feed(AcknowledgeRequested.TYPE, data)

    def review_detected(self, day: date, at: datetime) -> list[domain.AlertChange]:
        data = ReviewOverdueDetected(customer_id=CID, next_review_date=day)
        return self.feed(ReviewOverdueDetected.TYPE, data, at=at)

    # -- looking at the result ----------------------------------------------------------
    def active(self, rule: str) -> domain.Alert | None:
        return self.state.active_alert(rule)

    def kinds(self, rule: str) -> list[str]:
        return [c.history for c in self.changes if c.alert.rule == rule]


def only(changes: list[domain.AlertChange]) -> domain.AlertChange:
    assert len(changes) == 1, changes
    return changes[0]


def with_alerts(**rules: dict[str, Any]) -> Policy:
    data = POLICY.model_dump()
    for rule, values in rules.items():
        data["alerts"][rule] = {**data["alerts"][rule], **values}
    return Policy.from_mapping(data)


# ---- limit_breach -------------------------------------------------------------------------


def test_exposure_above_the_limit_raises_a_critical_limit_breach() -> None:
    c = Customer()
    change = only([ch for ch in c.exposure("105000.00") if ch.alert.rule == "limit_breach"])
    assert change.kind == "raised"
    alert = change.alert
    assert (alert.severity, alert.status, alert.customer_id) == ("critical", "open", CID)
    assert alert.dedup_key == f"{CID}:limit_breach"
    assert alert.facts["excess"] == "5000.00"
    assert "105000.00 EUR" in alert.message and "100000.00 EUR" in alert.message
    assert alert.raised_at == c.clock


def test_exposure_exactly_on_the_limit_is_no_breach() -> None:
    c = Customer()
    c.exposure("100000.00")
    assert c.active("limit_breach") is None


def test_a_limit_breach_updates_only_when_the_excess_moves_materially() -> None:
    c = Customer()
    c.exposure("101000.00")
    c.exposure("102000.00")  # 1 point of the limit more: not material
    c.exposure("104500.00")  # 3.5 points above the published 101 %: not material
    assert c.kinds("limit_breach") == ["raised"]
    c.exposure("107000.00")  # 6 points above the published figure
    assert c.kinds("limit_breach") == ["raised", "updated"]
    c.exposure("107000.00", limit="105000.00")  # another limit, still breached: material
    assert c.kinds("limit_breach") == ["raised", "updated", "updated"]


def test_a_limit_breach_resolves_when_exposure_is_back_within_the_limit() -> None:
    c = Customer()
    raised = only([ch for ch in c.exposure("120000.00") if ch.alert.rule == "limit_breach"])
    resolved = only([ch for ch in c.exposure("90000.00") if ch.alert.rule == "limit_breach"])
    assert resolved.kind == "resolved"
    assert resolved.alert.alert_id == raised.alert.alert_id
    assert resolved.alert.status == "resolved" and resolved.alert.resolved_at == c.clock
    assert "back within" in resolved.alert.message


def test_a_zero_limit_with_positive_exposure_is_a_breach() -> None:
    c = Customer()
    c.exposure("1500.00", limit="0.00")
    alert = c.active("limit_breach")
    assert alert is not None and "no credit limit" in alert.message
    assert c.active("utilization_high") is None


def test_a_raised_limit_resolves_the_breach_on_the_next_exposure() -> None:
    c = Customer()
    c.exposure("107000.00")
    c.exposure("107000.00", limit="150000.00")
    assert c.kinds("limit_breach") == ["raised", "resolved"]


# ---- utilization_high ---------------------------------------------------------------------


def test_utilisation_at_ninety_percent_raises_a_warning() -> None:
    c = Customer()
    change = only(c.utilization("0.90"))
    assert (change.kind, change.alert.rule, change.alert.severity) == (
        "raised",
        "utilization_high",
        "warning",
    )
    assert change.alert.facts["utilization"] == "0.9"
    assert "90.0 %" in change.alert.message


def test_utilisation_oscillating_around_ninety_percent_raises_once_and_never_flaps() -> None:
    c = Customer()
    for value in ("0.89", "0.91", "0.88", "0.92", "0.86", "0.91", "0.85", "0.93", "0.87"):
        c.utilization(value)
    assert c.kinds("utilization_high") == ["raised"]
    c.utilization("0.8499")
    assert c.kinds("utilization_high") == ["raised", "resolved"]
    c.utilization("0.89")  # below raise_at again: the resolved alert stays resolved
    assert c.kinds("utilization_high") == ["raised", "resolved"]


def test_small_utilisation_moves_are_not_material() -> None:
    c = Customer()
    c.utilization("0.93")
    c.utilization("0.94")
    c.utilization("0.96")
    assert c.kinds("utilization_high") == ["raised"]
    c.utilization("0.98")  # five points above the 0.93 last published
    assert c.kinds("utilization_high") == ["raised", "updated"]
    alert = c.active("utilization_high")
    assert alert is not None and alert.facts["utilization"] == "0.98" and alert.version == 2


def test_a_utilisation_problem_that_returns_raises_a_new_alert_under_the_same_key() -> None:
    c = Customer()
    first = only(c.utilization("0.95")).alert
    c.utilization("0.50")
    second = only(c.utilization("0.92")).alert
    assert second.alert_id != first.alert_id
    assert second.dedup_key == first.dedup_key == f"{CID}:utilization_high"
    assert second.version == 1 and second.status == "open"


def test_with_the_limit_cut_to_zero_utilisation_resolves_and_the_breach_takes_over() -> None:
    c = Customer()
    c.utilization("0.95")
    changes = c.exposure("95000.00", limit="0.00")
    assert {(ch.alert.rule, ch.kind) for ch in changes} == {
        ("utilization_high", "resolved"),
        ("limit_breach", "raised"),
    }


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=12000), min_size=1, max_size=60))
def test_any_utilisation_sequence_keeps_one_alert_and_alternates_raise_and_resolve(
    basis_points: list[int],
) -> None:
    c = Customer()
    lifecycle: list[str] = []
    for bp in basis_points:
        util = Decimal(bp) / 10000
        for change in c.utilization(str(util)):
            if change.alert.rule != "utilization_high":
                continue
            lifecycle.append(change.kind)
            open_now = [
                a for a in c.state.alerts.values() if a.rule == "utilization_high" and a.active
            ]
            assert len(open_now) <= 1
            if change.kind == "raised":
                assert util >= POLICY.alerts.utilization_high.raise_at
            if change.kind == "resolved":
                assert util < POLICY.alerts.utilization_high.clear_below
    transitions = [k for k in lifecycle if k != "updated"]
    assert transitions == ["raised", "resolved"] * (len(transitions) // 2) + (
        ["raised"] if len(transitions) % 2 else []
    )
    active = c.active("utilization_high")
    assert (active is not None) == (bool(transitions) and transitions[-1] == "raised")


# ---- overdue ------------------------------------------------------------------------------


def test_overdue_beyond_thirty_days_warns_and_beyond_ninety_is_critical() -> None:
    c = Customer()
    assert not [ch for ch in c.overdue_days(30) if ch.alert.rule == "overdue"]
    raised = only([ch for ch in c.overdue_days(31) if ch.alert.rule == "overdue"])
    assert (raised.kind, raised.alert.severity) == ("raised", "warning")
    assert raised.alert.facts["bucket"] == "31-60"
    critical = only([ch for ch in c.overdue_days(91) if ch.alert.rule == "overdue"])
    assert (critical.kind, critical.alert.severity) == ("updated", "critical")
    assert critical.alert.alert_id == raised.alert.alert_id


def test_overdue_ageing_day_by_day_updates_only_when_the_bucket_changes() -> None:
    c = Customer()
    for days in range(31, 66):
        c.overdue_days(days)
    assert c.kinds("overdue") == ["raised", "updated"]  # 31-60, then 61-90
    alert = c.active("overdue")
    assert alert is not None and alert.facts["bucket"] == "61-90"


def test_overdue_resolves_when_the_worst_days_fall_to_thirty() -> None:
    c = Customer()
    c.overdue_days(45)
    c.overdue_days(30)
    assert c.kinds("overdue") == ["raised", "resolved"]


def test_a_dunning_record_ahead_of_the_exposure_raises_overdue_early() -> None:
    c = Customer()
    c.overdue_days(0)
    raised = only(c.dunning("INV-7", 40))
    assert raised.alert.facts["source"] == "dunning"
    assert raised.alert.facts["invoice_id"] == "INV-7"
    # The limits service folds the same record; its exposure then carries the days.
    c.overdue_days(40, amount="2500.00")
    assert c.kinds("overdue") == ["raised"]
    # Paid: the exposure shows nothing overdue, and the dunning record is history.
    c.overdue_days(0)
    assert c.kinds("overdue") == ["raised", "resolved"]


def test_a_stale_exposure_does_not_resolve_what_dunning_reported_after_it() -> None:
    c = Customer()
    c.dunning("INV-8", 35)
    stale = c.clock - timedelta(minutes=5)
    c.exposure("10000.00", days=0, at=stale)
    assert c.kinds("overdue") == ["raised"]


# ---- grade_downgrade ----------------------------------------------------------------------


def test_a_one_notch_downgrade_warns_and_two_notches_are_critical() -> None:
    c = Customer()
    c.assessed("A")
    warn = only(c.assessed("BBB"))
    assert (warn.kind, warn.alert.severity, warn.alert.facts["grade_before"]) == (
        "raised",
        "warning",
        "A",
    )
    worse = only(c.assessed("BB"))
    assert (worse.kind, worse.alert.severity) == ("updated", "critical")
    assert worse.alert.facts["notches"] == 2


def test_a_downgrade_onto_the_worst_grade_is_critical() -> None:
    c = Customer()
    c.assessed("CCC")
    assert only(c.assessed("D")).alert.severity == "critical"


def test_a_downgrade_resolves_when_the_grade_returns_to_the_grade_before() -> None:
    c = Customer()
    c.assessed("A")
    c.assessed("BB")
    partial = only(c.assessed("BBB"))  # better, but still below A
    assert (partial.kind, partial.alert.severity) == ("updated", "warning")
    resolved = only(c.assessed("A"))
    assert resolved.kind == "resolved" and "back to A" in resolved.alert.message


def test_the_same_grade_again_changes_nothing() -> None:
    c = Customer()
    c.assessed("A")
    c.assessed("BBB")
    assert c.assessed("BBB") == []


def test_the_first_assessment_uses_the_grade_before_it_from_the_event() -> None:
    c = Customer()
    assert only(c.assessed("BB", previous="BBB")).alert.facts["grade_before"] == "BBB"


# ---- financial_deterioration --------------------------------------------------------------


def test_a_distressed_z_score_raises_financial_deterioration_listing_the_signal() -> None:
    c = Customer()
    change = only(c.assessed("BB", ratios={"altman_z2": "0.85", "current_ratio": "1.4"}))
    assert change.alert.rule == "financial_deterioration"
    assert change.alert.facts["signals"] == ["altman_z2_distress"]
    assert "0.85" in change.alert.message and "distress" in change.alert.message


def test_each_financial_warning_sign_is_listed() -> None:
    c = Customer()
    alert = only(
        c.assessed(
            "BB",
            ratios={
                "altman_z2": "0.5",
                "current_ratio": "0.8",
                "debt_to_equity": "-3",
                "operating_cash_flow_ratio": "-0.1",
                "revenue_growth": "-0.2",
            },
        )
    ).alert
    assert alert.facts["signals"] == [
        "altman_z2_distress",
        "current_ratio_low",
        "negative_equity",
        "negative_operating_cash_flow",
        "revenue_drop",
    ]


def test_financial_deterioration_updates_when_the_signals_change_and_resolves_when_none_hold() -> (
    None
):
    c = Customer()
    c.assessed("BB", ratios={"current_ratio": "0.9"})
    assert c.assessed("BB", ratios={"current_ratio": "0.95"}) == []  # same signal
    updated = only(c.assessed("BB", ratios={"current_ratio": "0.9", "revenue_growth": "-0.3"}))
    assert updated.kind == "updated"
    assert updated.alert.facts["signals"] == ["current_ratio_low", "revenue_drop"]
    resolved = only(c.assessed("BB", ratios={"current_ratio": "1.2", "revenue_growth": "0.1"}))
    assert resolved.kind == "resolved"


def test_an_assessment_without_financial_figures_leaves_the_alert_as_it_is() -> None:
    c = Customer()
    c.assessed("BB", ratios={"current_ratio": "0.9"})
    assert c.assessed("BB", ratios={}) == []
    assert c.active("financial_deterioration") is not None


# ---- negative_credit_report ---------------------------------------------------------------


def test_a_bankruptcy_in_a_credit_report_is_critical() -> None:
    c = Customer()
    alert = only(c.report(legal=[("bankruptcy", "2026-02-01")])).alert
    assert (alert.rule, alert.severity) == ("negative_credit_report", "critical")
    assert "bankruptcy (2026-02-01) from Creditreform" in alert.message


def test_a_lawsuit_or_defaults_warn_and_a_later_clean_report_resolves() -> None:
    c = Customer()
    assert only(c.report(legal=[("lawsuit", "2026-01-15")])).alert.severity == "warning"
    updated = only(c.report(legal=[("lawsuit", "2026-01-15")], defaults=2))
    assert updated.kind == "updated" and updated.alert.facts["defaults"] == [
        {"bureau": "Creditreform", "count": 2}
    ]
    assert only(c.report()).kind == "resolved"


def test_legal_events_older_than_the_look_back_window_are_not_news() -> None:
    c = Customer()
    assert c.report(legal=[("judgement", "2019-05-01")]) == []


def test_an_older_report_arriving_late_does_not_resolve() -> None:
    c = Customer()
    c.report(legal=[("insolvency", "2026-02-01")])
    assert c.report(reported_at=T0 - timedelta(days=30)) == []
    assert c.active("negative_credit_report") is not None


# ---- payment_reversed ---------------------------------------------------------------------


def test_a_reversed_payment_warns_and_a_later_covering_payment_resolves() -> None:
    c = Customer()
    c.paid("P-1", "5000.00")
    alert = only(c.reversed("P-1")).alert
    assert (alert.rule, alert.severity) == ("payment_reversed", "warning")
    assert alert.facts["payments"][0]["amount"] == "5000.00"
    assert "insufficient funds" in alert.message
    assert c.paid("P-2", "1000.00") == []  # not enough to make good the 5000
    resolved = only(c.paid("P-3", "5000.00"))
    assert resolved.kind == "resolved" and "P-3" in resolved.alert.message


def test_a_second_reversal_is_a_material_update() -> None:
    c = Customer()
    c.paid("P-1", "100.00")
    c.paid("P-2", "200.00")
    c.reversed("P-1")
    updated = only(c.reversed("P-2"))
    assert updated.kind == "updated" and len(updated.alert.facts["payments"]) == 2


def test_a_reversal_of_a_payment_never_seen_is_settled_by_any_later_payment() -> None:
    c = Customer()
    c.reversed("P-unknown")
    assert only(c.paid("P-9", "1.00")).kind == "resolved"


# ---- review_overdue -----------------------------------------------------------------------


def test_a_passed_review_date_raises_an_info_alert_and_a_new_assessment_resolves_it() -> None:
    c = Customer()
    c.assessed("BBB", next_review=date(2026, 3, 10))
    assert domain.review_due_on(c.state) == date(2026, 3, 11)
    assert not domain.review_overdue_due(c.state, POLICY, date(2026, 3, 10))
    assert domain.review_overdue_due(c.state, POLICY, date(2026, 3, 11))
    alert = only(c.review_detected(date(2026, 3, 10), datetime(2026, 3, 11, 0, 5, tzinfo=UTC)))
    assert (alert.alert.rule, alert.alert.severity) == ("review_overdue", "info")
    assert domain.review_due_on(c.state) is None  # recorded: the scheduler moves on
    resolved = only(c.assessed("BBB", next_review=date(2026, 9, 11)))
    assert resolved.kind == "resolved"


def test_a_review_detection_made_stale_by_a_newer_assessment_raises_nothing() -> None:
    c = Customer()
    c.assessed("BBB", next_review=date(2026, 3, 10))
    c.assessed("BBB", next_review=date(2026, 9, 10))
    assert c.review_detected(date(2026, 3, 10), datetime(2026, 3, 12, tzinfo=UTC)) == []


# ---- lifecycle ----------------------------------------------------------------------------


def test_acknowledging_keeps_the_one_alert_and_it_still_updates_and_resolves() -> None:
    c = Customer()
    raised = only(c.overdue_days(40)).alert
    acked = only(c.acknowledge(raised.alert_id))
    assert (acked.kind, acked.history, acked.alert.status) == (
        "updated",
        "acknowledged",
        "acknowledged",
    )
    assert acked.alert.acknowledged_by == "analyst"
    assert c.acknowledge(raised.alert_id) == []  # twice: nothing more
    updated = only(c.overdue_days(70))  # 61-90: material, same severity
    assert updated.alert.status == "acknowledged"
    assert [a for a in c.state.alerts.values() if a.active] == [updated.alert]
    resolved = only(c.overdue_days(0))
    assert resolved.alert.alert_id == raised.alert_id and resolved.alert.status == "resolved"


def test_an_escalation_reopens_an_acknowledged_alert() -> None:
    c = Customer()
    raised = only(c.overdue_days(40)).alert
    c.acknowledge(raised.alert_id)
    escalated = only(c.overdue_days(95))
    assert (escalated.alert.severity, escalated.alert.status) == ("critical", "open")
    assert escalated.alert.acknowledged_by is None


def test_a_resolved_alert_cannot_be_acknowledged() -> None:
    c = Customer()
    raised = only(c.overdue_days(40)).alert
    c.overdue_days(0)
    assert c.acknowledge(raised.alert_id) == []


def test_a_disabled_rule_raises_nothing_and_resolves_what_it_had_raised() -> None:
    c = Customer()
    c.utilization("0.95")
    c.policy = with_alerts(utilization_high={"enabled": False})
    assert only(c.utilization("0.97")).kind == "resolved"
    assert c.utilization("0.99") == []


def test_alert_ids_are_stable_for_the_same_problem_and_raising_event() -> None:
    a, b = Customer(), Customer()
    first, second = only(a.utilization("0.95")).alert, only(b.utilization("0.95")).alert
    assert first.alert_id == second.alert_id
    assert first.alert_id.startswith("al-")


def test_limit_changes_are_recorded_but_judged_with_the_exposure_that_follows() -> None:
    c = Customer()
    data = LimitChanged.model_validate(
        {
            "customer_id": CID,
            "currency": "EUR",
            "previous_limit": "100000.00",
            "limit": "50000.00",
            "reason": "policy",
            "effective_at": T0,
        }
    )
    assert c.feed(LimitChanged.TYPE, data) == []
    assert c.state.limit is not None and c.state.limit.limit == Decimal("50000.00")


def test_alert_bodies_validate_as_contract_alert_events() -> None:
    from shared.events import AlertRaised

    c = Customer()
    alert = only(c.utilization("0.95")).alert
    body = domain.alert_body(alert)
    parsed = AlertRaised.model_validate(body)
    assert parsed.status == "open" and parsed.raised_at == alert.raised_at


@pytest.mark.parametrize("rule", domain.RULES)
def test_every_rule_is_described_with_its_thresholds(rule: str) -> None:
    overview = {r["rule"]: r for r in domain.rules_overview(POLICY)}
    assert overview[rule]["enabled"] is True
    assert overview["utilization_high"]["thresholds"] == {"raise_at": "0.90", "clear_below": "0.85"}


def test_the_domain_imports_no_infrastructure() -> None:
    source = Path(domain.__file__).read_text()
    imported = {
        (node.module or "") if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    banned = ("sqlalchemy", "fastapi", "aiokafka", "prometheus_client", "starlette")
    assert not [m for m in imported if m.split(".")[0] in banned]


def test_a_rescore_that_keeps_the_past_review_date_leaves_the_review_overdue_open() -> None:
    # Given an overdue review, raised
    c = Customer()
    c.assessed("BBB", next_review=date(2026, 3, 10))
    only(c.review_detected(date(2026, 3, 10), datetime(2026, 3, 11, 0, 5, tzinfo=UTC)))
    # When an AR-driven re-score publishes an assessment that keeps the past review date
    changes = c.assessed("BB", next_review=date(2026, 3, 10))
    # Then the review is still overdue: nothing is resolved
    assert [ch for ch in changes if ch.alert.rule == "review_overdue"] == []
    assert any(a.rule == "review_overdue" and a.active for a in c.state.alerts.values())
