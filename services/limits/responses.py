"""What the limits API answers, for its OpenAPI document: each model describes the JSON a
route sends (the routes send their own dictionaries; see shared.openapi)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.openapi import Currency, Money, Timestamp

Decision = Literal["approved", "review", "rejected"]
Reason = Literal[
    "within_limit",
    "exceeds_available",
    "exceeds_group_available",
    "credit_hold",
    "overdue_beyond_tolerance",
    "no_credit_limit",
    "limit_expired",
    "grade_not_eligible",
    "currency_mismatch",
]
LimitSource = Literal["policy", "manual", "temporary", "unrated"]
LimitChangeReason = Literal["policy", "manual", "temporary", "expired", "hold", "release"]
RequestStatus = Literal["pending", "approved", "rejected"]


class _Open(BaseModel):
    # Bodies may gain fields (contract: consumers ignore what they do not know).
    model_config = ConfigDict(extra="allow")


class GroupFigures(_Open):
    limit: Money
    exposure: Money
    available: Money


class CreditCheck(_Open):
    """A credit decision, as answered and as stored."""

    check_id: str
    order_id: str
    customer_id: str
    decision: Decision
    reasons: list[Reason] = Field(
        min_length=1, description="Every reason that applies; approved: [within_limit]"
    )
    amount: Money = Field(description="The order's amount, in amount_currency")
    amount_currency: Currency
    limit: Money
    exposure: Money = Field(description="Exposure after this decision")
    reserved: Money
    available: Money
    shortfall: Money = Field(description="How much prepayment would make the order fit")
    currency: Currency = Field(description="The customer's credit currency (the figures')")
    grade: str | None
    reserve: bool
    reservation_expires_at: Timestamp | None = Field(
        description="When the reservation made for the order lapses (approved with reserve)"
    )
    group: GroupFigures | None = Field(description="The group's figures, for a group member")
    policy_version: str
    requested_by: str
    evaluated_at: Timestamp


class OverdueBuckets(_Open):
    days_1_30: Money = Field(alias="1-30")
    days_31_60: Money = Field(alias="31-60")
    days_61_90: Money = Field(alias="61-90")
    days_over_90: Money = Field(alias="90+")


class GroupExposure(_Open):
    members: int = Field(ge=1, description="The parent and its members")
    limit: Money
    exposure: Money
    available: Money


class Exposure(_Open):
    """The ``exposure.updated`` body, now or rebuilt as of a business time."""

    customer_id: str
    currency: Currency
    open_receivables: Money
    overdue_amount: Money
    overdue_buckets: OverdueBuckets
    max_days_overdue: int = Field(ge=0)
    reserved: Money
    exposure: Money
    limit: Money
    available: Money
    utilization: str | None = Field(
        pattern=r"^-?[0-9]+(\.[0-9]+)?$", description="exposure / limit; null without a limit"
    )
    on_hold: bool
    as_of: Timestamp
    grade: str | None
    group: GroupExposure | None = Field(
        default=None, description="For a group's parent: the group's figures"
    )


class Limit(_Open):
    customer_id: str
    limit: Money
    currency: Currency
    grade: str | None
    source: LimitSource
    expires_at: Timestamp | None
    on_hold: bool
    hold_reason: str | None
    policy_version: str


class LimitChange(_Open):
    """A ``limit.changed`` body."""

    customer_id: str
    currency: Currency
    previous_limit: Money | None = None
    limit: Money
    reason: LimitChangeReason
    grade: str | None = None
    request_id: str | None = None
    changed_by: str | None = None
    requested_by: str | None = None
    effective_at: Timestamp
    expires_at: Timestamp | None = None
    source: LimitSource | None = None
    on_hold: bool | None = None
    policy_version: str | None = None


class LimitHistory(_Open):
    items: list[LimitChange] = Field(description="Newest first")
    next_cursor: str | None


class LimitRequestSubmitted(_Open):
    request_id: str
    status: Literal["pending", "approved"] = Field(
        description="A decrease is approved at once; an increase waits for an approver"
    )
    customer_id: str
    requested_limit: Money
    currency: Currency
    requested_by: str
    applied: bool


class LimitRequestDecided(_Open):
    request_id: str
    status: Literal["approved", "rejected"]
    customer_id: str
    decided_by: str
    note: str | None
    requested_by: str
    requested_limit: Money
    currency: Currency


class LimitRequest(_Open):
    """A limit request and what became of it."""

    request_id: str
    customer_id: str
    status: RequestStatus
    requested_limit: Money
    currency: Currency
    reason: str
    requested_by: str
    submitted_at: Timestamp
    expires_at: Timestamp | None = Field(
        description="The end of the temporary limit asked for; null: a standing limit"
    )
    decided_by: str | None = Field(
        description="Who approved or rejected it; a decrease: its requester (applied at once)"
    )
    decided_at: Timestamp | None
    note: str | None


class Hold(_Open):
    customer_id: str
    on_hold: bool
    reason: str | None


class PortfolioItem(_Open):
    customer_id: str
    name: str | None
    grade: str | None
    currency: Currency
    limit: Money
    exposure: Money
    available: Money
    utilization: str | None = Field(pattern=r"^-?[0-9]+(\.[0-9]+)?$")
    overdue_amount: Money
    max_days_overdue: int = Field(ge=0)
    on_hold: bool
    open_alerts: int = Field(ge=0)


class CurrencyTotals(_Open):
    limit: Money
    exposure: Money


class PortfolioTotals(_Open):
    customers: int = Field(ge=0)
    over_limit: int = Field(ge=0)
    currency: Currency | None = Field(
        description="The totals' currency; null when one currency has no rate to it"
    )
    limit: Money | None
    exposure: Money | None
    by_currency: dict[str, CurrencyTotals] = Field(
        description="The sums in each customer currency, keyed by ISO 4217 code"
    )


class Portfolio(_Open):
    items: list[PortfolioItem]
    totals: PortfolioTotals
    next_cursor: str | None
