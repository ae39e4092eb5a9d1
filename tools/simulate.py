"""A realistic synthetic credit history: seasonal invoicing, good and late payers, a few
companies that deteriorate, statements and bureau reports — for demos and load.

``history`` is pure (a seeded generator of CloudEvents); ``publish`` sends it to the input
topics; ``run_demo`` keeps a live trickle going and asks the limits service for credit
checks, so dashboards and alerts come alive in ``creditwatch dev --demo``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from shared import producing
from shared.settings import Settings

log = logging.getLogger("creditwatch.simulate")
INDUSTRIES = ("C", "F", "G", "H", "I", "J", "M", "Q")
PROFILES = (("good", 0.55), ("late", 0.25), ("deteriorating", 0.12), ("heavy", 0.08))


@dataclass(frozen=True)
class Sim:
    topic: str  # default topic name (crm.customers, ar.invoices, …)
    event: dict[str, Any]


@dataclass
class Company:
    customer_id: str
    profile: str
    size: Decimal  # typical invoice amount
    terms: int
    currency: str
    industry: str


def cloudevent(
    type_: str, subject: str, data: dict[str, Any], *, id: str, at: datetime, source: str
) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": id,
        "source": source,
        "type": type_,
        "subject": subject,
        "time": at.isoformat().replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": data,
    }


def _at(day: date, hour: int = 9) -> datetime:
    return datetime.combine(day, time(hour, 0), tzinfo=UTC)


def _money(value: float | Decimal) -> str:
    return str(Decimal(value).quantize(Decimal("0.01")))


def companies(count: int, rng: random.Random) -> list[Company]:
    out = []
    for n in range(count):
        roll, acc = rng.random(), 0.0
        profile = PROFILES[-1][0]
        for name, share in PROFILES:
            acc += share
            if roll < acc:
                profile = name
                break
        # Every demo has each kind of payer, whatever the count.
        if n < len(PROFILES):
            profile = PROFILES[n][0]
        size = Decimal(rng.choice([800, 1500, 3000, 6000, 12000]))
        if profile == "heavy":
            size *= 3
        out.append(
            Company(
                f"SIM-{n + 1:04d}",
                profile,
                size,
                rng.choice([14, 30, 30, 45, 60]),
                "EUR",
                rng.choice(INDUSTRIES),
            )
        )
    return out


def history(count: int, months: int, *, seed: int = 7, today: date | None = None) -> Iterator[Sim]:
    """The events of ``count`` customers over ``months`` months up to ``today``."""
    rng = random.Random(seed)
    today = today or datetime.now(UTC).date()
    start = today - timedelta(days=30 * months)
    for co in companies(count, rng):
        cid = co.customer_id
        yield Sim(
            "crm.customers",
            cloudevent(
                "customer.registered",
                cid,
                {
                    "customer_id": cid,
                    "name": f"{co.profile.title()} Trading {cid[-4:]}",
                    "country": rng.choice(["DE", "FR", "NL", "IT", "ES", "PL"]),
                    "industry": co.industry,
                    "currency": co.currency,
                    "payment_terms_days": co.terms,
                },
                id=f"sim-reg-{cid}",
                at=_at(start, 8),
                source="/sim/crm",
            ),
        )
        yield from _statements(co, start, today, months, rng)
        yield from _ledger(co, start, today, months, rng)
        yield from _bureau(co, start, today, rng)


def _statements(
    co: Company, start: date, today: date, months: int, rng: random.Random
) -> Iterator[Sim]:
    revenue = co.size * 40
    for k, back in enumerate(range(months, -1, -12)):
        period_end = today - timedelta(days=30 * back)
        if period_end < start:
            continue
        decline = co.profile == "deteriorating" and back < 12
        growth = Decimal("0.65") if decline else Decimal(str(rng.uniform(0.95, 1.15)))
        revenue = (revenue * growth).quantize(Decimal("0.01"))
        assets = revenue * Decimal("0.8")
        liabilities = assets * (
            Decimal("1.15") if decline else Decimal(str(rng.uniform(0.35, 0.7)))
        )
        equity = assets - liabilities
        ca = assets * Decimal("0.55")
        cl = liabilities * (Decimal("0.9") if decline else Decimal("0.45"))
        ebit = revenue * (Decimal("-0.04") if decline else Decimal(str(rng.uniform(0.04, 0.12))))
        yield Sim(
            "crm.financials",
            cloudevent(
                "financial_statement.published",
                co.customer_id,
                {
                    "statement_id": f"sim-fs-{co.customer_id}-{k}",
                    "customer_id": co.customer_id,
                    "period_end": period_end.isoformat(),
                    "period_months": 12,
                    "currency": co.currency,
                    "audited": True,
                    "balance_sheet": {
                        "cash": _money(ca * Decimal("0.2")),
                        "receivables": _money(ca * Decimal("0.5")),
                        "inventory": _money(ca * Decimal("0.3")),
                        "current_assets": _money(ca),
                        "total_assets": _money(assets),
                        "current_liabilities": _money(cl),
                        "total_liabilities": _money(liabilities),
                        "equity": _money(equity),
                        "retained_earnings": _money(equity * Decimal("0.4")),
                    },
                    "income_statement": {
                        "revenue": _money(revenue),
                        "ebit": _money(ebit),
                        "interest_expense": _money(abs(liabilities) * Decimal("0.04")),
                        "net_income": _money(ebit * Decimal("0.7")),
                    },
                    "cash_flow": {
                        "operating_cash_flow": _money(
                            ebit * (Decimal("2") if ebit < 0 else Decimal("1.1"))
                        )
                    },
                },
                id=f"sim-fs-{co.customer_id}-{k}",
                # Published 45 days after the period, but never after today: a history with
                # events from the future would age every ledger ahead of the demo's checks.
                at=_at(min(period_end + timedelta(days=45), today), 11),
                source="/sim/finance",
            ),
        )


def _ledger(
    co: Company, start: date, today: date, months: int, rng: random.Random
) -> Iterator[Sim]:
    cid = co.customer_id
    n = 0
    for m in range(months):
        season = 1 + 0.3 * math.sin(2 * math.pi * (m % 12) / 12)
        for _ in range(rng.randint(1, 4)):
            n += 1
            issued = start + timedelta(days=30 * m + rng.randint(0, 27))
            if issued > today:
                continue
            amount = co.size * Decimal(str(round(season * rng.uniform(0.5, 1.5), 2)))
            inv = f"SIM-INV-{cid[-4:]}-{n:04d}"
            due = issued + timedelta(days=co.terms)
            yield Sim(
                "ar.invoices",
                cloudevent(
                    "invoice.issued",
                    cid,
                    {
                        "invoice_id": inv,
                        "customer_id": cid,
                        "amount": _money(amount),
                        "currency": co.currency,
                        "issue_date": issued.isoformat(),
                        "due_date": due.isoformat(),
                        "order_id": f"SIM-ORD-{cid[-4:]}-{n:04d}",
                    },
                    id=f"sim-{inv}",
                    at=_at(issued),
                    source="/sim/billing",
                ),
            )
            late = _lateness(co, m, months, rng)
            if late is None:
                # Never paid: the dunning system reports it once it is well overdue.
                dun = due + timedelta(days=35)
                if dun <= today:
                    yield Sim(
                        "ar.overdue",
                        cloudevent(
                            "invoice.overdue",
                            cid,
                            {
                                "invoice_id": inv,
                                "customer_id": cid,
                                "amount_overdue": _money(amount),
                                "currency": co.currency,
                                "due_date": due.isoformat(),
                                "days_overdue": (dun - due).days,
                                "as_of": dun.isoformat(),
                            },
                            id=f"sim-dun-{inv}",
                            at=_at(dun, 7),
                            source="/sim/dunning",
                        ),
                    )
                continue
            paid = due + timedelta(days=late)
            if paid > today:
                continue
            pay = f"SIM-PAY-{cid[-4:]}-{n:04d}"
            yield Sim(
                "ar.payments",
                cloudevent(
                    "payment.received",
                    cid,
                    {
                        "payment_id": pay,
                        "customer_id": cid,
                        "amount": _money(amount),
                        "currency": co.currency,
                        "received_date": paid.isoformat(),
                        "allocations": [{"invoice_id": inv, "amount": _money(amount)}],
                    },
                    id=f"sim-{pay}",
                    at=_at(paid, 15),
                    source="/sim/bank",
                ),
            )
            if co.profile == "late" and rng.random() < 0.04:
                yield Sim(
                    "ar.payments",
                    cloudevent(
                        "payment.reversed",
                        cid,
                        {"payment_id": pay, "customer_id": cid, "reason": "returned direct debit"},
                        id=f"sim-rev-{pay}",
                        at=_at(min(paid + timedelta(days=3), today), 10),
                        source="/sim/bank",
                    ),
                )


def _lateness(co: Company, m: int, months: int, rng: random.Random) -> int | None:
    """Days after the due date a payment arrives; None: never (so far)."""
    if co.profile == "good":
        return rng.randint(-5, 3)
    if co.profile == "heavy":
        return rng.randint(-2, 10)
    if co.profile == "late":
        return rng.randint(10, 55)
    # Deteriorating: fine at first, later slower, the last months unpaid.
    if m < months - 5:
        return rng.randint(0, 15)
    if m < months - 2:
        return rng.randint(30, 80)
    return None


def _bureau(co: Company, start: date, today: date, rng: random.Random) -> Iterator[Sim]:
    cid = co.customer_id
    for k, day in enumerate((start + timedelta(days=20), today - timedelta(days=10))):
        worse = co.profile == "deteriorating" and k == 1
        legal: list[dict[str, str]] = []
        if worse:
            legal.append(
                {
                    "type": "insolvency" if rng.random() < 0.5 else "lawsuit",
                    "date": (day - timedelta(days=5)).isoformat(),
                }
            )
        yield Sim(
            "crm.credit-reports",
            cloudevent(
                "credit_report.received",
                cid,
                {
                    "report_id": f"sim-cr-{cid}-{k}",
                    "customer_id": cid,
                    "bureau": "SimBureau",
                    "score": rng.randint(150, 400) if worse else rng.randint(550, 950),
                    "score_min": 100,
                    "score_max": 1000,
                    "delinquencies_12m": 3 if worse else 0,
                    "defaults": 1 if worse else 0,
                    "legal_events": legal,
                    "reported_at": _at(day, 12).isoformat(),
                },
                id=f"sim-cr-{cid}-{k}",
                at=_at(day, 12),
                source="/sim/bureau",
            ),
        )


def topic_names(settings: Settings) -> dict[str, str]:
    return {
        "crm.customers": settings.topic_customers,
        "ar.invoices": settings.topic_invoices,
        "ar.payments": settings.topic_payments,
        "ar.overdue": settings.topic_overdue,
        "crm.financials": settings.topic_financials,
        "crm.credit-reports": settings.topic_credit_reports,
    }


async def _send_all(settings: Settings, sims: list[Sim]) -> int:
    names = topic_names(settings)
    records = [
        producing.Record(names[s.topic], s.event["subject"].encode(), json.dumps(s.event).encode())
        for s in sims
    ]
    try:
        return await producing.publish(settings, records)
    except producing.PublishError as exc:
        raise RuntimeError(f"publishing failed: {exc}") from exc


async def publish(settings: Settings, *, customers: int, months: int, seed: int = 7) -> int:
    """Publish the history in business-time order (master data first)."""
    sims = sorted(
        history(customers, months, seed=seed),
        key=lambda s: (s.topic != "crm.customers", s.event["time"]),
    )
    return await _send_all(settings, sims)


async def run_demo(
    settings: Settings,
    *,
    customers: int,
    token: str | None,
    stop: Callable[[], bool],
    months: int = 12,
    seed: int = 7,
) -> None:
    """History first, then a live trickle: new invoices, payments and credit checks."""
    try:
        import httpx
    except ImportError as exc:  # a runtime-only install, as in the production image
        raise ImportError(
            "the demo's HTTP client httpx is not installed: it comes with the dev extra "
            "(scripts/setup, or pip install 'creditwatch[dev]')"
        ) from exc

    await asyncio.sleep(2.0)  # let the services join their consumer groups
    count = await publish(settings, customers=customers, months=months, seed=seed)
    log.info("demo: published %d historical events for %d customers", count, customers)
    rng = random.Random(seed + 1)
    cos = companies(customers, random.Random(seed))
    base = f"http://{settings.host}:{settings.port_for('limits')}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    tick = 0
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=5) as client:
        while not stop():
            tick += 1
            co = rng.choice(cos)
            today = datetime.now(UTC)
            amount = co.size * Decimal(str(round(rng.uniform(0.3, 2.5), 2)))
            order = f"DEMO-ORD-{tick:06d}"
            try:
                reply = await client.post(
                    "/v1/credit-checks",
                    json={
                        "order_id": order,
                        "customer_id": co.customer_id,
                        "amount": _money(amount),
                        "currency": co.currency,
                    },
                )
                approved = reply.status_code == 200 and reply.json()["decision"] == "approved"
            except httpx.HTTPError as exc:
                log.debug("demo: credit check failed: %s", exc)
                approved = False
            live: list[Sim] = []
            if approved and rng.random() < 0.6:
                inv = f"DEMO-INV-{tick:06d}"
                day = today.date()
                live.append(
                    Sim(
                        "ar.invoices",
                        cloudevent(
                            "invoice.issued",
                            co.customer_id,
                            {
                                "invoice_id": inv,
                                "customer_id": co.customer_id,
                                "amount": _money(amount),
                                "currency": co.currency,
                                "issue_date": day.isoformat(),
                                "due_date": (day + timedelta(days=co.terms)).isoformat(),
                                "order_id": order,
                            },
                            id=f"demo-{inv}",
                            at=today,
                            source="/sim/billing",
                        ),
                    )
                )
            if live:
                await _send_all(settings, live)
            await asyncio.sleep(rng.uniform(0.3, 1.2))
