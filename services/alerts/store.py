"""Alerts projections: one row per customer (its facts and alerts as state), one row per
alert (the current body, with the columns the list filters use) and every alert's history."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    Column,
    Date,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    and_,
    func,
    or_,
    select,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from services.alerts.domain import Alert, AlertChange, CustomerState, alert_body, review_due_on
from shared.db import BigId, UtcDateTime
from shared.eventstore import core_tables
from shared.idempotency import idempotency_table
from shared.projection import StateCodec, as_json, lock_rows, read_values, upsert

metadata = MetaData()
core = core_tables(metadata, "alerts")

customers = Table(
    "alerts_customers",
    metadata,
    Column("customer_id", String(1000), primary_key=True),
    Column("next_review_date", Date),
    # First day the review counts as passed, until the scheduler has recorded it; the
    # policy's grace days are added when querying, so a policy change needs no rewrite.
    Column("review_due_on", Date),
    Column("open_alerts", Integer, nullable=False),
    Column("last_seq", BigId, nullable=False),
    Column("state", Text, nullable=False),
)
Index("ix_alerts_customers_review_due", customers.c.review_due_on)

alerts = Table(
    "alerts_alerts",
    metadata,
    Column("alert_id", String(64), primary_key=True),
    Column("customer_id", String(1000), nullable=False),
    Column("rule", String(64), nullable=False),
    Column("severity", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("dedup_key", String(330), nullable=False),
    Column("raised_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
    Column("resolved_at", UtcDateTime),
    Column("version", Integer, nullable=False),
    Column("body", Text, nullable=False),
)
# Newest first, optionally filtered: each filter column leads an index ending in the order.
Index("ix_alerts_alerts_raised", alerts.c.raised_at, alerts.c.alert_id)
Index("ix_alerts_alerts_status", alerts.c.status, alerts.c.raised_at, alerts.c.alert_id)
Index("ix_alerts_alerts_customer", alerts.c.customer_id, alerts.c.raised_at, alerts.c.alert_id)
Index("ix_alerts_alerts_rule", alerts.c.rule, alerts.c.raised_at, alerts.c.alert_id)
Index("ix_alerts_alerts_severity", alerts.c.severity, alerts.c.raised_at, alerts.c.alert_id)
Index("ix_alerts_alerts_dedup", alerts.c.dedup_key)

history = Table(
    "alerts_history",
    metadata,
    Column("alert_id", String(64), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("type", String(16), nullable=False),
    Column("at", UtcDateTime, nullable=False),
    Column("body", Text, nullable=False),
    PrimaryKeyConstraint("alert_id", "seq", name="pk_alerts_history"),
)

# Idempotency-Key answers of the API (shared.idempotency); no projection: kept by replays.
idempotency = idempotency_table(metadata, "alerts")

PROJECTIONS: Sequence[Table] = (customers, alerts, history)
ACTIVE = ("open", "acknowledged")

_STATE = StateCodec(CustomerState)
dump_state = _STATE.dump
load_state = _STATE.load


async def lock_customers(conn: AsyncConnection, ids: Iterable[str]) -> dict[str, Any]:
    """Load (and on PostgreSQL lock, in id order) the rows of these customers."""
    return await lock_rows(conn, customers, "customer_id", ids)


async def lock_versions(conn: AsyncConnection, ids: Iterable[str]) -> dict[str, int]:
    """Lock these customers' rows (PostgreSQL, id order) and read only their versions."""
    rows = await lock_rows(conn, customers, "customer_id", ids, columns=("customer_id", "last_seq"))
    return {cid: r.last_seq for cid, r in rows.items()}


async def read_states(conn: AsyncConnection, ids: Iterable[str]) -> dict[str, str]:
    return await read_values(conn, customers, "customer_id", "state", ids)


def customer_row(state: CustomerState, last_seq: int) -> dict[str, Any]:
    assessment = state.assessment
    return {
        "customer_id": state.customer_id,
        "next_review_date": assessment.next_review_date if assessment else None,
        "review_due_on": review_due_on(state),
        "open_alerts": sum(1 for a in state.alerts.values() if a.active),
        "last_seq": last_seq,
        "state": dump_state(state),
    }


async def save_customers(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    await upsert(conn, customers, ["customer_id"], rows)


def alert_row(alert: Alert) -> dict[str, Any]:
    return {
        "alert_id": alert.alert_id,
        "customer_id": alert.customer_id,
        "rule": alert.rule,
        "severity": alert.severity,
        "status": alert.status,
        "dedup_key": alert.dedup_key,
        "raised_at": alert.raised_at,
        "updated_at": alert.updated_at,
        "resolved_at": alert.resolved_at,
        "version": alert.version,
        "body": as_json(alert_body(alert)),
    }


def history_row(change: AlertChange) -> dict[str, Any]:
    alert = change.alert
    return {
        "alert_id": alert.alert_id,
        "seq": alert.version,
        "type": change.history,
        "at": alert.updated_at,
        "body": as_json(alert_body(alert)),
    }


async def save_alerts(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    await upsert(conn, alerts, ["alert_id"], rows)


async def record_history(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    if rows:
        await conn.execute(history.insert(), list(rows))


async def get_alert(conn: AsyncConnection, alert_id: str) -> Any:
    return (await conn.execute(select(alerts).where(alerts.c.alert_id == alert_id))).first()


async def get_history(conn: AsyncConnection, alert_id: str) -> list[Any]:
    stmt = select(history).where(history.c.alert_id == alert_id).order_by(history.c.seq)
    return list(await conn.execute(stmt))


async def list_alerts(
    conn: AsyncConnection,
    *,
    status: str | None = None,
    customer_id: str | None = None,
    rule: str | None = None,
    severity: str | None = None,
    after: tuple[datetime, str] | None = None,
    limit: int = 100,
) -> list[Any]:
    """Alerts newest first (raised_at, then alert_id, descending), after a cursor position."""
    a = alerts
    where: list[ColumnElement[bool]] = []
    if status == "active":
        where.append(a.c.status.in_(ACTIVE))
    elif status:
        where.append(a.c.status == status)
    if customer_id:
        where.append(a.c.customer_id == customer_id)
    if rule:
        where.append(a.c.rule == rule)
    if severity:
        where.append(a.c.severity == severity)
    if after is not None:
        at, alert_id = after
        where.append(or_(a.c.raised_at < at, and_(a.c.raised_at == at, a.c.alert_id < alert_id)))
    stmt = select(a).where(*where).order_by(a.c.raised_at.desc(), a.c.alert_id.desc()).limit(limit)
    return list(await conn.execute(stmt))


async def reviews_due(conn: AsyncConnection, cutoff: date, limit: int = 1000) -> list[Any]:
    """Customers whose review counts as passed on or before ``cutoff`` and is not recorded."""
    c = customers
    stmt = (
        select(c.c.customer_id, c.c.state)
        .where(c.c.review_due_on.is_not(None), c.c.review_due_on <= cutoff)
        .order_by(c.c.review_due_on, c.c.customer_id)
        .limit(limit)
    )
    return list(await conn.execute(stmt))


async def open_counts(conn: AsyncConnection) -> dict[tuple[str, str], int]:
    """Open or acknowledged alerts by (rule, severity)."""
    a = alerts
    stmt = (
        select(a.c.rule, a.c.severity, func.count())
        .where(a.c.status.in_(ACTIVE))
        .group_by(a.c.rule, a.c.severity)
    )
    return {(r[0], r[1]): int(r[2]) for r in await conn.execute(stmt)}
