"""The limits service's own events: commands it recorded (checks, requests, holds) and
time-driven facts from its scheduler. They live only in its event store, so a replay
reproduces every decision's effect; they never arrive from Kafka."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from shared.events import Envelope, parse


class Internal(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    TYPE: ClassVar[str]
    customer_id: str


class CreditCheckDecided(Internal):
    TYPE: ClassVar[str] = "credit_check.decided"
    check_id: str
    order_id: str
    amount: Decimal
    currency: str
    amount_in_credit_currency: Decimal
    reserve: bool
    decision: str
    reasons: list[str]
    expires_at: datetime | None = None
    requested_by: str
    response: dict[str, Any]


class ReservationReleased(Internal):
    TYPE: ClassVar[str] = "reservation.released"
    order_id: str
    check_id: str
    by: str


class ReservationExpired(Internal):
    TYPE: ClassVar[str] = "reservation.expired"
    order_id: str
    check_id: str


class LimitRequestSubmitted(Internal):
    TYPE: ClassVar[str] = "limit_request.submitted"
    request_id: str
    requested_limit: Decimal
    currency: str
    reason: str
    expires_at: datetime | None = None
    requested_by: str


class LimitRequestApproved(Internal):
    TYPE: ClassVar[str] = "limit_request.approved"
    request_id: str
    by: str
    note: str | None = None


class LimitRequestRejected(Internal):
    TYPE: ClassVar[str] = "limit_request.rejected"
    request_id: str
    by: str
    note: str | None = None


class LimitExpired(Internal):
    TYPE: ClassVar[str] = "limit.expired"
    request_id: str


class HoldPlaced(Internal):
    TYPE: ClassVar[str] = "hold.placed"
    reason: str
    by: str


class HoldReleased(Internal):
    TYPE: ClassVar[str] = "hold.released"
    by: str


class LedgerAged(Internal):
    TYPE: ClassVar[str] = "ledger.aged"
    as_of: date


INTERNAL: dict[str, type[Internal]] = {
    m.TYPE: m
    for m in (
        CreditCheckDecided,
        ReservationReleased,
        ReservationExpired,
        LimitRequestSubmitted,
        LimitRequestApproved,
        LimitRequestRejected,
        LimitExpired,
        HoldPlaced,
        HoldReleased,
        LedgerAged,
    )
}


def parse_any(env: Envelope) -> BaseModel | None:
    """Stored events: the service's own types, else the contract's."""
    model = INTERNAL.get(env.type)
    if model is not None:
        return model.model_validate(env.data)
    return parse(env)
