"""What the assessment API answers, for its OpenAPI document: each model describes the JSON a
route sends (the routes send their own dictionaries; see shared.openapi)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.openapi import Day, Timestamp

RiskLevel = Literal["low", "medium", "high", "unacceptable"]
DECIMAL = r"^-?[0-9]+(\.[0-9]+)?$"


class _Open(BaseModel):
    # Bodies may gain fields (contract: consumers ignore what they do not know).
    model_config = ConfigDict(extra="allow")


class Factor(_Open):
    factor: str = Field(description="The scorecard factor")
    input: str | None = Field(default=None, description="The figure it scores")
    value: str | None = Field(description="The figure (a decimal string), null when unknown")
    points: str = Field(pattern=DECIMAL)
    max_points: str = Field(pattern=DECIMAL)
    reason: str | None = None


class Override(_Open):
    grade: str
    reason: str
    by: str
    expires_at: Timestamp | None = None


class Trigger(_Open):
    event_id: str
    type: str


class Assessment(_Open):
    """An ``assessment.completed`` body."""

    assessment_id: str
    customer_id: str
    score: int = Field(ge=0, le=100)
    grade: str = Field(description="The grade in force (an override's, if one is)")
    risk_level: RiskLevel
    previous_grade: str | None = None
    factors: list[Factor] = Field(default_factory=list)
    ratios: dict[str, str] = Field(
        default_factory=dict, description="The ratios the scorecard used, as decimal strings"
    )
    override: Override | None = None
    policy_version: str
    trigger: Trigger | None = None
    next_review_date: Day | None = None
    assessed_at: Timestamp
    computed_grade: str | None = Field(default=None, description="The scorecard's own grade")
    computed_risk_level: RiskLevel | None = None


class AssessmentHistory(_Open):
    items: list[Assessment] = Field(description="Newest first")
    next_cursor: str | None


class ReviewDue(_Open):
    customer_id: str
    name: str | None
    grade: str | None
    computed_grade: str | None
    score: int | None
    risk_level: RiskLevel | None
    next_review_date: Day
    days_overdue: int = Field(ge=0)
    last_assessment_id: str | None
    assessed_at: Timestamp | None


class ReviewsDue(_Open):
    items: list[ReviewDue]
    before: Day = Field(description="Reviews dated before this day are listed")
    next_cursor: str | None
