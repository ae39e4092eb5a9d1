"""A credit check's decision event, built on the hot path without validation, is exactly what
the validating constructors would build."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

import pytest

from services.limits import checks
from services.limits import events as ev
from services.limits.handlers import LimitsLoaded, LimitsService
from shared.events import new_event
from shared.settings import Settings
from tests.unit.test_limits_domain import CID, POLICY, T0, rated


@pytest.mark.parametrize(
    ("grade", "amount", "reserve", "decision"),
    [
        ("BBB", "125.50", True, "approved"),
        ("BBB", "1E+2", True, "approved"),
        ("BBB", "125.5", False, "approved"),
        ("BBB", "100000.01", True, "review"),
        ("BBB", "250000", True, "rejected"),
        (None, "1", True, "rejected"),
    ],
)
@pytest.mark.parametrize("now", [T0, T0 + timedelta(microseconds=120_005)])
def test_the_decision_event_is_what_validation_would_build(
    grade: str | None, amount: str, reserve: bool, decision: str, now: datetime
) -> None:
    state = rated(grade) if grade else checks.domain.new_customer(CID, POLICY)  # no limit
    service = LimitsService(Settings(), POLICY)
    context = checks.CheckContext(
        {CID: LimitsLoaded(state, 1, state, None)}, None, None, Decimal(0), 0
    )
    order = checks.CheckOrder("SO-1", CID, Decimal(amount), "EUR", reserve, "orders")

    result = checks.evaluate(service, order, context, now)

    assert isinstance(result, checks.Decided)
    assert result.verdict.decision == decision
    event = result.event
    assert event == ev.CreditCheckDecided.model_validate(event.model_dump())
    expected = new_event(
        ev.CreditCheckDecided.TYPE,
        source=result.envelope.source,
        subject=CID,
        data=event.model_dump(),
        id=result.envelope.id,
        time=now,
    )
    assert result.envelope == expected
    assert result.envelope.to_json() == expected.to_json()
    assert ev.parse_any(result.envelope) == event
