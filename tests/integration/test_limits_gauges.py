"""The portfolio gauges, summed by the database (SQLite and PostgreSQL) per currency."""

from __future__ import annotations

from datetime import date

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.credit_check import assessed
from harness import factories as f
from services.limits.app import refresh_portfolio_gauges
from services.limits.handlers import LimitsService
from shared import metrics
from shared.policy import load_policy
from shared.runtime import EventCore
from shared.settings import Settings

pytestmark = pytest.mark.integration


def _gauge(gauge: object, *labels: str) -> float:
    return gauge.labels(*labels)._value.get() if labels else gauge._value.get()  # type: ignore[attr-defined]


async def test_portfolio_gauges_sum_every_customer_per_currency(engine: AsyncEngine) -> None:
    settings = Settings()
    core = EventCore(
        LimitsService(settings, load_policy(None)), engine, topic_of_type=settings.topic_of_type()
    )
    events = [
        f.customer("G-1"),
        assessed("G-1"),  # AAA: a limit
        f.customer("G-2"),
        f.invoice("G-2", "I-2", "1234.56", issued=date(2026, 3, 1)),
        f.customer("G-3", currency="USD"),
        f.invoice("G-3", "I-3", "0.10", currency="USD"),
        f.customer("G-4", currency="USD"),
        f.invoice("G-4", "I-4", "0.20", currency="USD"),
    ]
    await core.process_records(f.records(events))

    await refresh_portfolio_gauges(engine)

    assert _gauge(metrics.PORTFOLIO_EXPOSURE, "EUR") == 1234.56
    assert _gauge(metrics.PORTFOLIO_EXPOSURE, "USD") == pytest.approx(0.30)
    assert _gauge(metrics.PORTFOLIO_LIMIT, "EUR") > 0  # G-1's, from its grade
    assert _gauge(metrics.PORTFOLIO_LIMIT, "USD") == 0
    assert _gauge(metrics.CUSTOMERS_OVER_LIMIT) == 3  # G-2, G-3, G-4: exposure, no limit
