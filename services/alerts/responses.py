"""What the alerts API answers, for its OpenAPI document: each model describes the JSON a
route sends (the routes send their own dictionaries; see shared.openapi)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.openapi import Timestamp

Severity = Literal["info", "warning", "critical"]
Status = Literal["open", "acknowledged", "resolved"]


class _Open(BaseModel):
    # Bodies may gain fields (contract: consumers ignore what they do not know).
    model_config = ConfigDict(extra="allow")


class Alert(_Open):
    """An alert as ``credit.alerts`` publishes it (contract fields first, then ours)."""

    alert_id: str
    customer_id: str
    rule: str
    severity: Severity
    status: Status
    title: str
    message: str
    facts: dict[str, Any] = Field(description="The figures behind the alert, by rule")
    dedup_key: str = Field(description="One open alert per key (customer and rule)")
    raised_at: Timestamp
    resolved_at: Timestamp | None
    updated_at: Timestamp | None = None
    version: int | None = Field(default=None, ge=1)
    acknowledged_by: str | None = None
    acknowledged_at: Timestamp | None = None
    acknowledgement_note: str | None = None
    policy_version: str | None = None


class HistoryEntry(_Open):
    seq: int
    type: str = Field(description="raised, updated, acknowledged, resolved")
    at: Timestamp | None
    severity: Severity | None
    status: Status | None
    message: str | None
    facts: dict[str, Any] | None
    by: str | None = Field(default=None, description="acknowledged: who")
    note: str | None = Field(default=None, description="acknowledged: the note")


class AlertWithHistory(Alert):
    history: list[HistoryEntry] = Field(description="Oldest first")


class AlertPage(_Open):
    items: list[Alert] = Field(description="Newest first")
    next_cursor: str | None


class Rule(_Open):
    rule: str
    enabled: bool
    severity: Severity | None = Field(description="null: the severity depends on the case")
    severities: list[Severity] | None = Field(
        default=None, description="The severities the rule raises, when more than one"
    )
    raises_on: str
    resolves_on: str
    thresholds: dict[str, Any]


class Rules(_Open):
    policy_version: str
    rules: list[Rule]
