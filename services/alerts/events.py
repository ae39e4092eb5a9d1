"""The alerts service's own events: what its API and scheduler recorded (an acknowledgement,
a review found overdue). They live only in its event store, so a replay reproduces every
alert exactly; they never arrive from Kafka."""

from __future__ import annotations

from datetime import date
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from shared.events import Envelope, parse


class _Internal(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    TYPE: ClassVar[str]
    customer_id: str


class AcknowledgeRequested(_Internal):
    """Someone took an alert in hand (``POST /v1/alerts/{id}/acknowledge``)."""

    TYPE: ClassVar[str] = "alert.acknowledge_requested"
    alert_id: str
    by: str
    note: str | None = Field(default=None, max_length=1000)


class ReviewOverdueDetected(_Internal):
    """The scheduler found the customer's periodic review date passed (plus grace days)."""

    TYPE: ClassVar[str] = "review.overdue_detected"
    next_review_date: date


INTERNAL: dict[str, type[_Internal]] = {
    m.TYPE: m for m in (AcknowledgeRequested, ReviewOverdueDetected)
}


def parse_any(env: Envelope) -> BaseModel | None:
    """Stored events: the service's own types, else the contract's."""
    model = INTERNAL.get(env.type)
    if model is not None:
        return model.model_validate(env.data)
    return parse(env)
