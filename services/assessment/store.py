"""Assessment projections: one row per customer (its state and the latest grade, score and
review date the API and the scheduler read), the history of published assessments, and the
ledger items that left the customers' states (settled invoices, applied payments)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import date, datetime
from typing import Any

import msgspec
from pydantic import TypeAdapter
from sqlalchemy import (
    Column,
    Date,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    func,
    select,
    tuple_,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from services.assessment.domain import CustomerState, PaidOn
from shared.db import BigId, UtcDateTime
from shared.eventstore import core_tables
from shared.idempotency import idempotency_table
from shared.projection import StateCodec, key_in, upsert
from shared.unitofwork import LayoutError, LedgerArchive, archive_table

metadata = MetaData()
core = core_tables(metadata, "assessment")

customers = Table(
    "assessment_customers",
    metadata,
    Column("customer_id", String(1000), primary_key=True),
    Column("name", String(1000)),
    Column("currency", String(3), nullable=False),
    # The published (effective) grade; NULL until a first assessment.
    Column("grade", String(20)),
    Column("computed_grade", String(20)),
    Column("score", Integer),
    Column("risk_level", String(20)),
    Column("next_review_date", Date),
    Column("override_grade", String(20)),
    Column("override_expires_at", UtcDateTime),
    Column("last_assessment_id", String(64)),
    Column("assessed_at", UtcDateTime),
    Column("last_seq", BigId, nullable=False),
    Column("state", Text, nullable=False),
)
Index("ix_assessment_customers_review", customers.c.next_review_date, customers.c.customer_id)
Index("ix_assessment_customers_override_expiry", customers.c.override_expires_at)
Index("ix_assessment_customers_grade", customers.c.grade)

assessments = Table(
    "assessment_assessments",
    metadata,
    Column("assessment_id", String(64), primary_key=True),
    Column("customer_id", String(1000), nullable=False),
    # The store position of the triggering event: orders a customer's history.
    Column("seq", BigId, nullable=False),
    Column("assessed_at", UtcDateTime, nullable=False),
    Column("grade", String(20), nullable=False),
    Column("score", Integer, nullable=False),
    Column("body", Text, nullable=False),
)
Index("ix_assessment_assessments_customer", assessments.c.customer_id, assessments.c.seq)

# The payment-behaviour window's settled days (``CustomerState.paid.days``), a row per
# customer and month: an event rewrites the month it settles in, not the whole window, so
# that a customer settling many invoices a day costs what a quiet one does (assessment_0005).
# The state document keeps the window's sums and first and last day.
paid_months = Table(
    "assessment_paid_months",
    metadata,
    Column("customer_id", String(1000), primary_key=True),
    Column("month", String(7), primary_key=True),  # YYYY-MM
    Column("days", Text, nullable=False),
)

# Ledger items that left a customer's hot state (settled invoices, applied payments).
ledger_archive = archive_table(metadata, "assessment")
archive = LedgerArchive(ledger_archive)

# Idempotency-Key answers of the API (shared.idempotency); no projection: kept by replays.
idempotency = idempotency_table(metadata, "assessment")

PROJECTIONS: Sequence[Table] = (customers, assessments, paid_months, ledger_archive)

_STATE = StateCodec(CustomerState)
_DAYS: TypeAdapter[dict[date, PaidOn]] = TypeAdapter(dict[date, PaidOn])


def dump_state(state: CustomerState) -> str:
    """The customer's state document (see ``customers.state``): the state without the
    settled days, which are rows of ``assessment_paid_months`` (``month_rows``)."""
    if state.step is not None or state.paid.days:
        state = replace(state, step=None, paid=replace(state.paid, days={}))
    return _STATE.dump(state)


def load_state(document: str, days: Mapping[date, PaidOn] | None = None) -> CustomerState:
    """A customer's state from its document and its settled days (``read_days``, in day
    order); ``LayoutError`` for a document of another layout (before assessment_0003 the
    whole history: invoices, credits, dunning; before assessment_0005 the days in it)."""
    try:
        state = _STATE.load(document)
    except msgspec.ValidationError as exc:
        raise LayoutError(
            "assessment: a customer's state document does not have this version's layout "
            "(documents written before assessment_0003 hold the whole history); rebuild the "
            f"projections: creditwatch db upgrade (first difference: {exc})"
        ) from exc
    if state.paid.days:
        raise LayoutError(
            "assessment: a customer's state document holds its settled days (written before "
            "assessment_0005); rebuild the projections: creditwatch db upgrade"
        )
    if state.paid.first is None:
        return state
    return replace(state, paid=replace(state.paid, days=dict(days or {})))


def _month(day: date) -> str:
    return f"{day.year:04d}-{day.month:02d}"


def month_rows(
    customer_id: str, stored: CustomerState | None, state: CustomerState
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """The months of the settled days that changed since ``stored`` (what the row holds):
    rows to write, and (customer, month) keys of months now empty. Days are immutable
    values that an event replaces, never mutates, so a day that is the same object is the
    same day: finding the changes walks the window (up to 366 days) without comparing."""
    new = state.paid.days
    old = stored.paid.days if stored is not None else {}
    if new is old:
        return [], []
    changed = {_month(day) for day, paid in new.items() if old.get(day) is not paid}
    changed.update(_month(day) for day in old if day not in new)
    if not changed:
        return [], []
    by_month: dict[str, dict[date, PaidOn]] = {m: {} for m in changed}
    for day, paid in new.items():
        held = by_month.get(_month(day))
        if held is not None:
            held[day] = paid
    rows = [
        {"customer_id": customer_id, "month": m, "days": _DAYS.dump_json(days).decode()}
        for m, days in sorted(by_month.items())
        if days
    ]
    gone = [(customer_id, m) for m, days in sorted(by_month.items()) if not days]
    return rows, gone


async def read_days(
    conn: AsyncConnection, customer_ids: Iterable[str]
) -> dict[str, dict[date, PaidOn]]:
    """The settled days of each customer (those with any), in day order."""
    ids = sorted(set(customer_ids))
    out: dict[str, list[str]] = {}
    c = paid_months.c
    for start in range(0, len(ids), 500):
        rows = await conn.execute(
            select(c.customer_id, c.days)
            .where(key_in(conn, c.customer_id, ids[start : start + 500]))
            .order_by(c.customer_id, c.month)
        )
        for row in rows:
            out.setdefault(row.customer_id, []).append(row.days)
    return {cid: days_of(months) for cid, months in out.items()}


def days_of(months: Iterable[str]) -> dict[date, PaidOn]:
    """The settled days that month rows (their ``days``) hold, in day order (as the state
    keeps them: Settled.after relies on it)."""
    days: dict[date, PaidOn] = {}
    for text in months:
        days.update(_DAYS.validate_json(text))
    return dict(sorted(days.items()))


def round_trip(state: CustomerState) -> CustomerState:
    """The state as a service reads it back after writing it (document and month rows)."""
    rows, _ = month_rows(state.customer_id, None, state)
    return load_state(dump_state(state), days_of(r["days"] for r in rows))


async def save_months(
    conn: AsyncConnection, rows: Sequence[dict[str, Any]], gone: Sequence[tuple[str, str]]
) -> None:
    if gone:
        c = paid_months.c
        for start in range(0, len(gone), 500):
            await conn.execute(
                delete(paid_months).where(
                    tuple_(c.customer_id, c.month).in_(gone[start : start + 500])
                )
            )
    await upsert(conn, paid_months, ["customer_id", "month"], rows)


def customer_row(state: CustomerState, last_seq: int) -> dict[str, Any]:
    last = state.last
    override = state.override
    return {
        "customer_id": state.customer_id,
        "name": state.name,
        "currency": state.currency,
        "grade": last.grade if last else None,
        "computed_grade": last.computed_grade if last else None,
        "score": last.score if last else None,
        "risk_level": last.risk_level if last else None,
        "next_review_date": last.next_review_date if last else None,
        "override_grade": override.grade if override else None,
        "override_expires_at": override.expires_at if override else None,
        "last_assessment_id": last.assessment_id if last else None,
        "assessed_at": last.assessed_at if last else None,
        "last_seq": last_seq,
        "state": dump_state(state),
    }


async def save_customers(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    await upsert(conn, customers, ["customer_id"], rows)


async def record_assessments(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    if rows:
        await conn.execute(assessments.insert(), list(rows))


async def customer(conn: AsyncConnection, customer_id: str) -> Any:
    stmt = select(customers).where(customers.c.customer_id == customer_id)
    return (await conn.execute(stmt)).first()


async def latest_assessment(conn: AsyncConnection, customer_id: str) -> dict[str, Any] | None:
    a = assessments
    stmt = select(a.c.body).where(a.c.customer_id == customer_id).order_by(a.c.seq.desc()).limit(1)
    row = (await conn.execute(stmt)).first()
    if row is None:
        return None
    body: dict[str, Any] = json.loads(row.body)
    return body


async def history(
    conn: AsyncConnection,
    customer_id: str,
    *,
    limit: int,
    before_seq: int | None = None,
    as_of: datetime | None = None,
) -> list[tuple[int, dict[str, Any]]]:
    """A customer's assessments, newest first: (seq, body), at most ``limit``."""
    a = assessments
    stmt = select(a.c.seq, a.c.body).where(a.c.customer_id == customer_id)
    if before_seq is not None:
        stmt = stmt.where(a.c.seq < before_seq)
    if as_of is not None:
        stmt = stmt.where(a.c.assessed_at <= as_of)
    rows = await conn.execute(stmt.order_by(a.c.seq.desc()).limit(limit))
    return [(r.seq, json.loads(r.body)) for r in rows]


async def reviews_due(
    conn: AsyncConnection, before: date, *, limit: int, after: tuple[date, str] | None = None
) -> list[Any]:
    """Customers whose next review date is before ``before``, oldest review first."""
    c = customers
    stmt = select(
        c.c.customer_id,
        c.c.name,
        c.c.grade,
        c.c.computed_grade,
        c.c.score,
        c.c.risk_level,
        c.c.next_review_date,
        c.c.assessed_at,
        c.c.last_assessment_id,
    ).where(c.c.next_review_date.is_not(None), c.c.next_review_date < before)
    if after is not None:
        day, cid = after
        stmt = stmt.where(
            (c.c.next_review_date > day) | ((c.c.next_review_date == day) & (c.c.customer_id > cid))
        )
    stmt = stmt.order_by(c.c.next_review_date, c.c.customer_id).limit(limit)
    return list(await conn.execute(stmt))


async def overrides_expiring(conn: AsyncConnection, now: datetime, limit: int = 1000) -> list[str]:
    """The customers whose override's expiry has come (no lock: the caller locks them)."""
    c = customers
    stmt = (
        select(c.c.customer_id)
        .where(c.c.override_expires_at.is_not(None), c.c.override_expires_at <= now)
        .order_by(c.c.override_expires_at, c.c.customer_id)
        .limit(limit)
    )
    return [row.customer_id for row in await conn.execute(stmt)]


async def customers_by_grade(conn: AsyncConnection) -> dict[str | None, int]:
    c = customers
    rows = await conn.execute(select(c.c.grade, func.count()).group_by(c.c.grade))
    return {r[0]: int(r[1]) for r in rows}
