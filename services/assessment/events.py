"""The assessment service's own events: analyst commands (overrides, recompute requests) and
time-driven facts from its scheduler (an override expiring). They live only in its event
store, so a replay reproduces every assessment they caused; they never arrive from Kafka."""

from __future__ import annotations

from typing import ClassVar

from pydantic import AwareDatetime, BaseModel, ConfigDict

from shared.events import Envelope, parse


class InternalEvent(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    TYPE: ClassVar[str]
    customer_id: str


class OverrideSet(InternalEvent):
    """An analyst's grade (expert judgement) that stands over the scorecard's until it expires."""

    TYPE: ClassVar[str] = "assessment.override_set"
    override_id: str
    grade: str
    reason: str
    by: str
    expires_at: AwareDatetime | None = None


class OverrideExpired(InternalEvent):
    """Recorded by the scheduler at the override's ``expires_at``."""

    TYPE: ClassVar[str] = "assessment.override_expired"
    override_id: str


class OverrideRemoved(InternalEvent):
    """An analyst withdrew the override before it expired."""

    TYPE: ClassVar[str] = "assessment.override_removed"
    override_id: str
    by: str


class RecomputeRequested(InternalEvent):
    """Reassess now under the current policy (also: a periodic review carried out)."""

    TYPE: ClassVar[str] = "assessment.recompute_requested"
    by: str


INTERNAL: dict[str, type[InternalEvent]] = {
    m.TYPE: m for m in (OverrideSet, OverrideExpired, OverrideRemoved, RecomputeRequested)
}


def parse_any(env: Envelope) -> BaseModel | None:
    """Stored events: the service's own types, else the contract's."""
    model = INTERNAL.get(env.type)
    if model is not None:
        return model.model_validate(env.data)
    return parse(env)
