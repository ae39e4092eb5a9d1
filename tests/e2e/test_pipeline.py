"""The whole pipeline end to end: assessment, limits and alerts as real ``creditwatch serve``
processes on one PostgreSQL database (each with its own tables) and one set of prefixed
topics on a real Apache Kafka. Business events go in on the input topics; what comes out on
``credit.assessments``, ``credit.limits``, ``credit.exposure`` and ``credit.alerts`` (and the
HTTP APIs) is checked against the contract.

Each test works on customers of its own, so the tests share one running system. Where the
limits service consumes two topics (invoices and payments), a step waits for the previous
step's ``exposure.updated`` before publishing the next: topics are independent, so only that
makes the order of the figures deterministic.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import e2e as s
from harness.e2e import Publisher, Stack, Tap
from shared.policy import add_months, load_policy

pytestmark = pytest.mark.e2e

POLICY = load_policy(None)
ROOT = Path(__file__).resolve().parents[2]
CONTRACT_ASSESSMENT_FIELDS = {
    "assessment_id",
    "customer_id",
    "score",
    "grade",
    "risk_level",
    "previous_grade",
    "factors",
    "ratios",
    "override",
    "policy_version",
    "trigger",
    "next_review_date",
    "assessed_at",
}
CONTRACT_LIMIT_FIELDS = {
    "customer_id",
    "previous_limit",
    "limit",
    "currency",
    "reason",
    "grade",
    "request_id",
    "changed_by",
    "effective_at",
    "expires_at",
}
CONTRACT_EXPOSURE_FIELDS = {
    "customer_id",
    "currency",
    "open_receivables",
    "overdue_amount",
    "overdue_buckets",
    "max_days_overdue",
    "reserved",
    "exposure",
    "limit",
    "available",
    "utilization",
    "on_hold",
    "as_of",
}
CONTRACT_ALERT_FIELDS = {
    "alert_id",
    "customer_id",
    "rule",
    "severity",
    "status",
    "title",
    "message",
    "facts",
    "dedup_key",
    "raised_at",
    "resolved_at",
}


@dataclass
class System:
    stack: Stack
    pub: Publisher
    tap: Tap
    limits: httpx.AsyncClient
    alerts: httpx.AsyncClient
    assessment: httpx.AsyncClient

    # ---- waits on the output topics -------------------------------------------------------
    async def assessment_of(self, cid: str, trigger_id: str) -> dict[str, Any]:
        seen = await self.tap.wait_for(
            f"assessment.completed of {cid} for {trigger_id}",
            lambda: [
                r
                for r in self.tap.of("credit.assessments", cid)
                if r.data["trigger"]["event_id"] == trigger_id
            ],
            on_timeout=self.stack.logs,
        )
        assert len(seen) == 1, seen
        record = seen[0]
        assert record.event["source"] == "/creditwatch/assessment"
        assert record.event["subject"] == cid
        data: dict[str, Any] = record.data
        return data

    def limits_seen(self, cid: str) -> int:
        """How many ``limit.changed`` of ``cid`` have been seen (a mark for ``limit_is``)."""
        return len(self.tap.of("credit.limits", cid))

    async def limit_is(self, cid: str, amount: str, *, since: int = 0) -> dict[str, Any]:
        """Wait for ``limit.changed`` to ``amount`` (among the customer's records from the
        ``since``-th on); then the API must say the same."""
        seen = await self.tap.wait_for(
            f"limit.changed of {cid} to {amount}",
            lambda: [
                r for r in self.tap.of("credit.limits", cid)[since:] if r.data["limit"] == amount
            ],
            on_timeout=self.stack.logs,
        )
        body = (await self.limits.get(f"/v1/customers/{cid}/limit")).json()
        assert body["limit"] == amount, body
        data: dict[str, Any] = seen[-1].data
        return data

    async def exposure_is(
        self, cid: str, exposure: str, *, since: int = 0, **more: Any
    ) -> dict[str, Any]:
        """Wait for ``exposure.updated`` of ``cid`` at ``exposure`` (and ``more`` fields),
        among the customer's records from the ``since``-th on."""

        def match() -> list[s.Seen]:
            return [
                r
                for r in self.tap.of("credit.exposure", cid)[since:]
                if r.data["exposure"] == exposure
                and all(r.data.get(k) == v for k, v in more.items())
            ]

        seen = await self.tap.wait_for(
            f"exposure.updated of {cid} at {exposure} {more}", match, on_timeout=self.stack.logs
        )
        data: dict[str, Any] = seen[-1].data
        return data

    async def alerts_are(
        self, cid: str, rule: str, types: list[str], within: float = 60.0
    ) -> list[dict[str, Any]]:
        """Wait until (customer, rule) has seen at least ``types``; then exactly those."""
        await self.tap.wait_for(
            f"{types} for {cid}/{rule}",
            lambda: len(self.tap.alerts(cid, rule)) >= len(types),
            within=within,
            on_timeout=lambda: (
                f"seen: {[r.type for r in self.tap.alerts(cid, rule)]}\n" + self.stack.logs()
            ),
        )
        seen = self.tap.alerts(cid, rule)
        assert [r.type for r in seen] == types, [(r.type, r.data) for r in seen]
        for r in seen:
            assert r.data.keys() >= CONTRACT_ALERT_FIELDS
            assert r.key == cid and r.event["subject"] == cid
            assert r.event["source"] == "/creditwatch/alerts"
            assert r.data["dedup_key"] == f"{cid}:{rule}"
        # One problem, one alert: every change of it carries the same alert id.
        assert len({r.data["alert_id"] for r in seen}) == 1
        return [r.data for r in seen]

    async def send_then(
        self, event: dict[str, Any], cid: str, exposure: str, **more: Any
    ) -> dict[str, Any]:
        """Publish ``event``, then wait for the exposure it leads to."""
        since = len(self.tap.of("credit.exposure", cid))
        await self.pub.send(event)
        return await self.exposure_is(cid, exposure, since=since, **more)

    def rules_seen(self, cid: str) -> set[str]:
        return {r.data["rule"] for r in self.tap.of("credit.alerts", cid)}

    async def registered(
        self, cid: str, limit: str, *, industry: str = "G", at: Any = None
    ) -> None:
        await self.pub.send(s.registered(cid, industry=industry, at=at))
        await self.limit_is(cid, limit)


@pytest.fixture(scope="module")
async def system(
    tmp_path_factory: pytest.TempPathFactory, postgres_server_url: str, kafka_bootstrap: str
) -> AsyncIterator[System]:
    stack = Stack(tmp_path_factory.mktemp("pipeline"), postgres_server_url, kafka_bootstrap)
    await stack.start()
    pub = await Publisher(kafka_bootstrap, stack.prefix).start()
    tap = await Tap(kafka_bootstrap, stack.prefix).start()
    clients = [stack.client(n) for n in ("limits", "alerts", "assessment")]
    try:
        yield System(stack, pub, tap, *clients)
    finally:
        for c in clients:
            await c.aclose()
        await tap.stop()
        await pub.stop()
        await stack.stop()


def today() -> date:
    return s.utcnow().date()


def z2(ca: str, cl: str, ta: str, re: str, ebit: str, eq: str, tl: str) -> str:
    """Altman's Z'' as the contract defines it, to 4 places."""
    d = Decimal
    x1, x2 = (d(ca) - d(cl)) / d(ta), d(re) / d(ta)
    x3, x4 = d(ebit) / d(ta), d(eq) / d(tl)
    value = d("6.56") * x1 + d("3.26") * x2 + d("6.72") * x3 + d("1.05") * x4
    return str(value.quantize(d("0.0001")))


GOOD = dict(
    ca="600000.00",
    ta="1000000.00",
    cl="200000.00",
    tl="350000.00",
    eq="650000.00",
    re="400000.00",
    rev="2000000.00",
    ebit="250000.00",
    ie="20000.00",
    ni="180000.00",
    ocf="150000.00",
)
WEAKER = dict(
    ca="450000.00",
    ta="1000000.00",
    cl="500000.00",
    tl="600000.00",
    eq="400000.00",
    re="250000.00",
    rev="1900000.00",
    ebit="120000.00",
    ie="30000.00",
    ni="70000.00",
    ocf="60000.00",
)
DISTRESSED = dict(
    ca="300000.00",
    ta="1000000.00",
    cl="400000.00",
    tl="1100000.00",
    eq="-100000.00",
    re="-200000.00",
    rev="1200000.00",
    ebit="-60000.00",
    ie="60000.00",
    ni="-90000.00",
    ocf="-50000.00",
)


async def test_statements_drive_assessment_limit_and_downgrade_alerts(system: System) -> None:
    cid = "P-STATEMENTS"
    # Registered (industry J, positive outlook) and a clean bureau report: rated BBB.
    await system.pub.send(s.registered(cid, industry="J"))
    await system.assessment_of(cid, f"reg-{cid}")
    await system.limit_is(cid, "50000.00")
    report = s.credit_report(cid, "R1", score=720)
    mark = system.limits_seen(cid)
    await system.pub.send(report)
    assert (await system.assessment_of(cid, report["id"]))["grade"] == "BBB"
    await system.limit_is(cid, "100000.00", since=mark)

    # A strong statement: assessment.completed with every contract field.
    fs1 = s.statement(cid, "FY2023", date(2023, 12, 31), **GOOD)
    mark = system.limits_seen(cid)
    await system.pub.send(fs1)
    a = await system.assessment_of(cid, fs1["id"])
    assert a.keys() >= CONTRACT_ASSESSMENT_FIELDS
    assert a["customer_id"] == cid
    assert isinstance(a["score"], int) and 0 <= a["score"] <= 100
    assert (a["grade"], a["risk_level"], a["previous_grade"]) == ("AA", "low", "BBB")
    assert a["policy_version"] == POLICY.version
    assert a["trigger"] == {"event_id": fs1["id"], "type": "financial_statement.published"}
    assert a["override"] is None
    assert date.fromisoformat(a["next_review_date"]) == add_months(today(), 12)  # AA: yearly
    factors = a["factors"]
    assert {f["factor"] for f in factors} == {f.factor for f in POLICY.scorecard}
    for f in factors:
        assert {"factor", "value", "points", "max_points", "reason"} <= f.keys()
        assert isinstance(f["reason"], str) and f["reason"].strip(), f
        assert Decimal(str(f["points"])) <= Decimal(str(f["max_points"]))
    assert sum(Decimal(str(f["points"])) for f in factors) == a["score"]
    ratios = a["ratios"]
    assert (
        ratios["altman_z2"]
        == z2(GOOD["ca"], GOOD["cl"], GOOD["ta"], GOOD["re"], GOOD["ebit"], GOOD["eq"], GOOD["tl"])
        == "7.5580"
    )
    assert ratios["current_ratio"] == "3.0000" and ratios["debt_ratio"] == "0.3500"
    api = (await system.assessment.get(f"/v1/customers/{cid}/assessment")).json()
    assert api["assessment_id"] == a["assessment_id"]

    # The limits service follows the policy for the grade, on the API and on credit.limits.
    changed = await system.limit_is(cid, "500000.00", since=mark)
    assert POLICY.limits.by_grade["AA"] == Decimal("500000.00")
    assert changed.keys() >= CONTRACT_LIMIT_FIELDS
    assert (
        changed["previous_limit"],
        changed["limit"],
        changed["reason"],
        changed["grade"],
        changed["currency"],
    ) == ("100000.00", "500000.00", "policy", "AA", "EUR")
    limit = (await system.limits.get(f"/v1/customers/{cid}/limit")).json()
    assert (limit["grade"], limit["source"], limit["policy_version"]) == (
        "AA",
        "policy",
        POLICY.version,
    )

    # A weaker statement: down two notches to BBB (critical), current ratio below 1.
    fs2 = s.statement(cid, "FY2024", date(2024, 12, 31), **WEAKER)
    mark = system.limits_seen(cid)
    await system.pub.send(fs2)
    a2 = await system.assessment_of(cid, fs2["id"])
    assert (a2["grade"], a2["previous_grade"]) == ("BBB", "AA")
    await system.limit_is(cid, "100000.00", since=mark)
    raised = await system.alerts_are(cid, "grade_downgrade", ["alert.raised"])
    assert (raised[0]["severity"], raised[0]["status"]) == ("critical", "open")
    assert raised[0]["facts"]["grade"] == "BBB" and raised[0]["facts"]["grade_before"] == "AA"
    fin = await system.alerts_are(cid, "financial_deterioration", ["alert.raised"])
    assert fin[0]["facts"]["signals"] == ["current_ratio_low"]

    # Worse again: distressed figures, B. The open alerts are updated, not raised again.
    fs3 = s.statement(cid, "FY2025", date(2025, 12, 31), **DISTRESSED)
    mark = system.limits_seen(cid)
    await system.pub.send(fs3)
    a3 = await system.assessment_of(cid, fs3["id"])
    assert a3["grade"] == "B" and a3["risk_level"] == "high"
    assert a3["ratios"]["altman_z2"] == z2(
        DISTRESSED["ca"],
        DISTRESSED["cl"],
        DISTRESSED["ta"],
        DISTRESSED["re"],
        DISTRESSED["ebit"],
        DISTRESSED["eq"],
        DISTRESSED["tl"],
    )
    await system.limit_is(cid, "20000.00", since=mark)
    down = await system.alerts_are(cid, "grade_downgrade", ["alert.raised", "alert.updated"])
    assert down[1]["facts"]["grade"] == "B" and down[1]["facts"]["grade_before"] == "AA"
    fin = await system.alerts_are(cid, "financial_deterioration", ["alert.raised", "alert.updated"])
    assert set(fin[1]["facts"]["signals"]) == {
        "altman_z2_distress",
        "current_ratio_low",
        "negative_equity",
        "negative_operating_cash_flow",
        "revenue_drop",
    }

    # Recovery: a strong newer statement brings AA back and resolves both.
    fs4 = s.statement(cid, "FY2026", date(2026, 6, 30), **GOOD)
    mark = system.limits_seen(cid)
    await system.pub.send(fs4)
    assert (await system.assessment_of(cid, fs4["id"]))["grade"] == "AA"
    await system.limit_is(cid, "500000.00", since=mark)
    done = await system.alerts_are(
        cid, "grade_downgrade", ["alert.raised", "alert.updated", "alert.resolved"]
    )
    assert done[-1]["status"] == "resolved" and done[-1]["resolved_at"]
    await system.alerts_are(
        cid, "financial_deterioration", ["alert.raised", "alert.updated", "alert.resolved"]
    )
    # Nothing else was ever alerted for this customer (no exposure, limits always set).
    assert system.rules_seen(cid) == {"grade_downgrade", "financial_deterioration"}
    history = (await system.limits.get(f"/v1/customers/{cid}/limit/history")).json()["items"]
    assert [h["limit"] for h in history] == [
        "500000.00",
        "20000.00",
        "100000.00",
        "500000.00",
        "100000.00",
        "50000.00",
    ]


async def test_limit_breach_is_raised_updated_and_resolved_by_payments(system: System) -> None:
    cid = "L-BREACH"
    # A wholesaler (stable outlook) known by its registration only scores 43: grade B.
    await system.registered(cid, "20000.00")
    day = today()
    due = day + timedelta(days=30)
    exp = await system.send_then(
        s.invoice(cid, "L-1", "15000.00", issued=day, due=due), cid, "15000.00"
    )
    assert exp.keys() >= CONTRACT_EXPOSURE_FIELDS
    assert (exp["limit"], exp["available"], exp["utilization"]) == ("20000.00", "5000.00", "0.7500")

    await system.send_then(s.invoice(cid, "L-2", "8000.00", issued=day, due=due), cid, "23000.00")
    raised = await system.alerts_are(cid, "limit_breach", ["alert.raised"])
    assert (raised[0]["severity"], raised[0]["facts"]["excess"]) == ("critical", "3000.00")
    over = (await system.limits.get("/v1/portfolio", params={"status": "over_limit"})).json()
    assert cid in {i["customer_id"] for i in over["items"]}
    check = (
        await system.limits.post(
            "/v1/credit-checks",
            json={
                "order_id": "L-ORDER-1",
                "customer_id": cid,
                "amount": "100.00",
                "currency": "EUR",
            },
        )
    ).json()
    assert check["decision"] == "rejected" and "exceeds_available" in check["reasons"], check

    # Materially worse (10 points more): updated, still one alert.
    await system.send_then(s.invoice(cid, "L-3", "2000.00", issued=day, due=due), cid, "25000.00")
    updated = await system.alerts_are(cid, "limit_breach", ["alert.raised", "alert.updated"])
    assert updated[1]["facts"]["excess"] == "5000.00"

    # Payments: exactly on the limit is within it.
    await system.send_then(s.payment(cid, "L-P1", "5000.00", received=day), cid, "20000.00")
    resolved = await system.alerts_are(
        cid, "limit_breach", ["alert.raised", "alert.updated", "alert.resolved"]
    )
    assert resolved[-1]["facts"]["exposure"] == "20000.00"
    await system.send_then(s.payment(cid, "L-P2", "4000.00", received=day), cid, "16000.00")
    # utilization_high rode along: raised at 115 %, updated at 125 % and 100 %, resolved at 80 %.
    util = await system.alerts_are(
        cid,
        "utilization_high",
        ["alert.raised", "alert.updated", "alert.updated", "alert.resolved"],
    )
    assert [u["facts"]["utilization"] for u in util] == ["1.15", "1.25", "1", "0.8"]
    assert system.rules_seen(cid) == {"limit_breach", "utilization_high"}


async def test_utilisation_oscillating_around_ninety_percent_never_flaps(system: System) -> None:
    cid = "U-OSCILLATE"
    await system.registered(cid, "20000.00")
    day = today()
    due = day + timedelta(days=30)
    # 0.91, 0.88, 0.92, 0.86, 0.91 of a 20,000 limit, by invoices and partial payments (the
    # first invoice is never settled, so the grade, and with it the limit, stays put).
    steps: list[tuple[dict[str, Any], str]] = [
        (s.invoice(cid, "U-1", "18200.00", issued=day, due=due), "18200.00"),
        (s.payment(cid, "U-P1", "600.00", received=day), "17600.00"),
        (s.invoice(cid, "U-2", "800.00", issued=day, due=due), "18400.00"),
        (s.payment(cid, "U-P2", "1200.00", received=day), "17200.00"),
        (s.invoice(cid, "U-3", "1000.00", issued=day, due=due), "18200.00"),
    ]
    for event, exposure in steps:
        await system.send_then(event, cid, exposure)
    assert [
        r.data["utilization"]
        for r in system.tap.of("credit.exposure", cid)
        if r.data["exposure"] != "0.00"
    ] == ["0.9100", "0.8800", "0.9200", "0.8600", "0.9100"]
    # Below 85 %: now, and only now, it resolves.
    await system.send_then(s.payment(cid, "U-P3", "2000.00", received=day), cid, "16200.00")
    seen = await system.alerts_are(cid, "utilization_high", ["alert.raised", "alert.resolved"])
    assert seen[0]["facts"]["utilization"] == "0.91" and seen[0]["severity"] == "warning"
    assert seen[1]["facts"]["utilization"] == "0.81"
    assert system.rules_seen(cid) == {"utilization_high"}
    body = (await system.alerts.get(f"/v1/alerts/{seen[0]['alert_id']}")).json()
    assert [h["type"] for h in body["history"]] == ["raised", "resolved"]


async def test_overdue_from_the_dunning_system(system: System) -> None:
    cid = "O-DUNNING"
    await system.registered(cid, "20000.00")
    day = today()
    # Issued 35 days ago on 30-day terms: our own ageing says 5 days overdue — no alert.
    await system.send_then(
        s.invoice(
            cid, "O-1", "5000.00", issued=day - timedelta(days=35), due=day - timedelta(days=5)
        ),
        cid,
        "5000.00",
        max_days_overdue=5,
    )
    # The dunning system counts 40 days (and later 95): its word overrides our ageing.
    await system.pub.send(
        s.dunning(cid, "O-1", "5000.00", days=40, as_of=day, due=day - timedelta(days=40), run="1")
    )
    raised = await system.alerts_are(cid, "overdue", ["alert.raised"])
    assert raised[0]["severity"] == "warning"
    assert (raised[0]["facts"]["max_days_overdue"], raised[0]["facts"]["bucket"]) == (40, "31-60")
    await system.exposure_is(cid, "5000.00", max_days_overdue=40)
    await system.pub.send(
        s.dunning(cid, "O-1", "5000.00", days=95, as_of=day, due=day - timedelta(days=95), run="2")
    )
    critical = await system.alerts_are(cid, "overdue", ["alert.raised", "alert.updated"])
    assert (critical[1]["severity"], critical[1]["facts"]["bucket"]) == ("critical", "90+")
    await system.exposure_is(cid, "5000.00", max_days_overdue=95)
    await system.send_then(
        s.payment(cid, "O-P1", "5000.00", received=day), cid, "0.00", max_days_overdue=0
    )
    await system.alerts_are(cid, "overdue", ["alert.raised", "alert.updated", "alert.resolved"])


async def test_overdue_from_ageing_in_business_time(system: System) -> None:
    cid = "O-AGEING"
    day = today()
    start = s.utcnow() - timedelta(days=90)
    await system.registered(cid, "20000.00", at=start)
    # An invoice published at its business time, 74 days ago, due 44 days ago: not overdue
    # then. The limits scheduler ages the ledger to today — 44 days — and alerts react.
    issued, due = day - timedelta(days=74), day - timedelta(days=44)
    fresh = await system.send_then(
        s.invoice(cid, "OA-1", "3000.00", issued=issued, due=due, at=start + timedelta(days=16)),
        cid,
        "3000.00",
        max_days_overdue=0,
    )
    assert fresh["overdue_amount"] == "0.00"
    aged = await system.exposure_is(cid, "3000.00", max_days_overdue=44)
    assert aged["overdue_buckets"]["31-60"] == "3000.00"
    assert aged["as_of"].startswith(day.isoformat())
    raised = await system.alerts_are(cid, "overdue", ["alert.raised"])
    assert (raised[0]["severity"], raised[0]["facts"]["bucket"]) == ("warning", "31-60")
    assert raised[0]["facts"]["source"] == "exposure"
    await system.send_then(
        s.payment(cid, "OA-P1", "3000.00", received=day), cid, "0.00", max_days_overdue=0
    )
    await system.alerts_are(cid, "overdue", ["alert.raised", "alert.resolved"])


async def test_negative_credit_report_escalates_reopens_and_resolves(system: System) -> None:
    cid = "N-BUREAU"
    await system.registered(cid, "20000.00")
    day = today()
    await system.pub.send(
        s.credit_report(cid, "N1", score=400, legal=[("lawsuit", day - timedelta(days=30))])
    )
    raised = await system.alerts_are(cid, "negative_credit_report", ["alert.raised"])
    assert raised[0]["severity"] == "warning"
    alert_id = raised[0]["alert_id"]
    ack = await system.alerts.post(
        f"/v1/alerts/{alert_id}/acknowledge", json={"note": "calling them"}
    )
    assert ack.status_code == 200 and ack.json()["status"] == "acknowledged", ack.text
    await system.pub.send(
        s.credit_report(
            cid,
            "N2",
            score=150,
            legal=[("lawsuit", day - timedelta(days=30)), ("bankruptcy", day - timedelta(days=2))],
        )
    )
    seen = await system.alerts_are(
        cid, "negative_credit_report", ["alert.raised", "alert.updated", "alert.updated"]
    )
    assert (seen[1]["status"], seen[1]["acknowledged_by"]) == ("acknowledged", "admin")
    # Escalated to critical: the acknowledgement was for a lesser problem, so it re-opens.
    assert (seen[2]["severity"], seen[2]["status"]) == ("critical", "open")
    assert {e["type"] for e in seen[2]["facts"]["legal_events"]} == {"lawsuit", "bankruptcy"}
    await system.pub.send(s.credit_report(cid, "N3", score=600))
    done = await system.alerts_are(
        cid,
        "negative_credit_report",
        ["alert.raised", "alert.updated", "alert.updated", "alert.resolved"],
    )
    assert done[-1]["resolved_at"]
    listed = (
        await system.alerts.get(
            "/v1/alerts", params={"customer_id": cid, "rule": "negative_credit_report"}
        )
    ).json()["items"]
    assert [(i["alert_id"], i["status"]) for i in listed] == [(alert_id, "resolved")]


async def test_payment_reversed_until_made_good(system: System) -> None:
    cid = "R-REVERSAL"
    await system.registered(cid, "20000.00")
    day = today()
    due = day + timedelta(days=30)
    await system.pub.send(
        s.invoice(cid, "R-1", "1000.00", issued=day, due=due),
        s.invoice(cid, "R-2", "1000.00", issued=day, due=due),
    )
    await system.exposure_is(cid, "2000.00")
    await system.pub.send(
        s.payment(cid, "R-P1", "1000.00", received=day, allocations=[("R-1", "1000.00")]),
        s.payment(cid, "R-P2", "1000.00", received=day, allocations=[("R-2", "1000.00")]),
        s.reversed_payment(cid, "R-P1"),
    )
    raised = await system.alerts_are(cid, "payment_reversed", ["alert.raised"])
    assert raised[0]["severity"] == "warning"
    assert [p["payment_id"] for p in raised[0]["facts"]["payments"]] == ["R-P1"]
    assert raised[0]["facts"]["payments"][0]["amount"] == "1000.00"
    await system.pub.send(s.reversed_payment(cid, "R-P2", reason="returned direct debit"))
    seen = await system.alerts_are(cid, "payment_reversed", ["alert.raised", "alert.updated"])
    assert [p["payment_id"] for p in seen[1]["facts"]["payments"]] == ["R-P1", "R-P2"]
    await system.pub.send(s.payment(cid, "R-P3", "2000.00", received=day))
    await system.alerts_are(
        cid, "payment_reversed", ["alert.raised", "alert.updated", "alert.resolved"]
    )


async def test_review_overdue_raised_by_the_scheduler_and_resolved_by_a_review(
    system: System,
) -> None:
    cid = "V-REVIEW"
    # Rated 200 days ago (business time): grade B is reviewed every 3 months, so the review
    # date is long past; the alerts scheduler notices it on its own.
    await system.registered(cid, "20000.00", at=s.utcnow() - timedelta(days=200))
    raised = await system.alerts_are(cid, "review_overdue", ["alert.raised"])
    due = add_months((s.utcnow() - timedelta(days=200)).date(), 3)
    assert (raised[0]["severity"], raised[0]["facts"]["next_review_date"]) == (
        "info",
        due.isoformat(),
    )
    reply = await system.assessment.post(f"/v1/customers/{cid}/assessment/recompute")
    assert reply.status_code in (200, 201), reply.text
    await system.alerts_are(cid, "review_overdue", ["alert.raised", "alert.resolved"])
    due_list = (await system.assessment.get("/v1/reviews/due")).json()["items"]
    assert cid not in {i["customer_id"] for i in due_list}


async def test_a_rescore_that_is_no_review_leaves_the_overdue_review_open(system: System) -> None:
    cid = "V-RESCORE"
    await system.registered(cid, "20000.00", at=s.utcnow() - timedelta(days=200))
    raised = await system.alerts_are(cid, "review_overdue", ["alert.raised"])
    past_due = raised[0]["facts"]["next_review_date"]
    day = today()
    # An invoice paid on time improves payment behaviour: a re-score (no review) is
    # published with the same, past, review date.
    await system.send_then(
        s.invoice(cid, "VR-1", "1000.00", issued=day, due=day + timedelta(days=30)), cid, "1000.00"
    )
    pay = s.payment(cid, "VR-P1", "1000.00", received=day)
    await system.pub.send(pay)
    rescore = await system.assessment_of(cid, pay["id"])
    assert rescore["next_review_date"] == past_due  # still overdue
    await asyncio.sleep(3)  # the alerts service reacts within well under a second
    assert [r.type for r in system.tap.alerts(cid, "review_overdue")] == ["alert.raised"]


async def test_the_portfolio_counts_open_alerts(system: System) -> None:
    """limits learns of alerts from credit.alerts: the portfolio shows each customer's open
    alerts, and they go when the alerts resolve."""
    cid = "PF-OPEN-ALERTS"
    await system.registered(cid, "20000.00")
    day = today()
    await system.send_then(
        s.invoice(cid, "PF-1", "25000.00", issued=day, due=day + timedelta(days=30)),
        cid,
        "25000.00",
    )
    await system.alerts_are(cid, "limit_breach", ["alert.raised"])
    await system.alerts_are(cid, "utilization_high", ["alert.raised"])

    async def open_alerts(status: str | None) -> Any:
        params = {"status": status} if status else {}
        items = (await system.limits.get("/v1/portfolio", params={**params, "limit": 500})).json()[
            "items"
        ]
        return next((i["open_alerts"] for i in items if i["customer_id"] == cid), None)

    async def settles_on(status: str | None, want: int) -> None:
        deadline = asyncio.get_running_loop().time() + 30
        while (got := await open_alerts(status)) != want:
            assert asyncio.get_running_loop().time() < deadline, (status, got)
            await asyncio.sleep(0.2)

    await settles_on("over_limit", 2)
    await system.send_then(s.payment(cid, "PF-P1", "25000.00", received=day), cid, "0.00")
    await system.alerts_are(cid, "limit_breach", ["alert.raised", "alert.resolved"])
    await system.alerts_are(cid, "utilization_high", ["alert.raised", "alert.resolved"])
    await settles_on(None, 0)


async def test_rules_metrics_and_projections_match_a_replay(system: System) -> None:
    """Last: every rule was raised somewhere above, the metrics say so, and each service's
    projections equal a replay of its event store (``creditwatch verify``)."""
    raised = {r.data["rule"] for r in system.tap.of("credit.alerts", type_="alert.raised")}
    assert raised == {
        "limit_breach",
        "utilization_high",
        "overdue",
        "grade_downgrade",
        "financial_deterioration",
        "negative_credit_report",
        "payment_reversed",
        "review_overdue",
    }
    metrics = (await system.alerts.get("/metrics")).text
    assert 'creditwatch_alerts_raised_total{rule="limit_breach",severity="critical"}' in metrics
    checks = (await system.limits.get("/metrics")).text
    assert 'creditwatch_credit_checks_total{decision="rejected"}' in checks
    assert system.tap.of("credit.dlq") == []
    codes = await system.stack.stop()
    # uvicorn finishes the graceful shutdown, then re-raises the SIGTERM it caught.
    assert all(code in (0, -signal.SIGTERM) for code in codes.values()), codes
    for name, proc in system.stack.procs.items():
        assert "Application shutdown complete" in proc.tail(20), (name, proc.tail(20))
    for service in ("assessment", "limits", "alerts"):
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "tools.cli", "verify", service],
            env=system.stack.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"{service}: {done.stdout}\n{done.stderr}"
