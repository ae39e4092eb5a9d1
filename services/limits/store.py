"""Limits projections: one row per customer (state + the figures the API and portfolio read),
stored credit decisions, limit history and limit requests."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Date,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    select,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from services.limits.domain import CustomerState, Figures
from shared.db import BigId, ExactDecimal, UtcDateTime
from shared.eventstore import core_tables
from shared.projection import StateCodec, lock_rows, read_values, upsert

metadata = MetaData()
core = core_tables(metadata, "limits")

customers = Table(
    "limits_customers",
    metadata,
    Column("customer_id", String(1000), primary_key=True),
    Column("group_id", String(1000), nullable=False),
    Column("parent_id", String(1000)),
    Column("name", String(1000)),
    Column("currency", String(3), nullable=False),
    Column("grade", String(20)),
    Column("limit_amount", ExactDecimal, nullable=False),
    Column("limit_source", String(20), nullable=False),
    Column("limit_expires_at", UtcDateTime),
    Column("on_hold", Boolean, nullable=False),
    Column("open_receivables", ExactDecimal, nullable=False),
    Column("overdue_amount", ExactDecimal, nullable=False),
    Column("max_days_overdue", Integer, nullable=False),
    Column("reserved", ExactDecimal, nullable=False),
    Column("exposure", ExactDecimal, nullable=False),
    Column("available", ExactDecimal, nullable=False),
    # Utilisation in millionths, for sorting and filtering only (SQLite has no exact NUMERIC).
    Column("utilization_ppm", BigId),
    Column("over_limit", Boolean, nullable=False),
    Column("open_alerts", Integer, nullable=False),
    Column("next_ageing_on", Date),
    Column("next_expiry_at", UtcDateTime),
    Column("as_of", UtcDateTime),
    Column("last_seq", BigId, nullable=False),
    Column("state", Text, nullable=False),
    # The exposure.updated body last published, to publish only on change.
    Column("published", Text),
)
Index("ix_limits_customers_group", customers.c.group_id)
Index("ix_limits_customers_ageing", customers.c.next_ageing_on)
Index("ix_limits_customers_expiry", customers.c.next_expiry_at)

checks = Table(
    "limits_checks",
    metadata,
    Column("check_id", String(64), primary_key=True),
    Column("order_id", String(1000), nullable=False),
    Column("customer_id", String(1000), nullable=False),
    Column("seq", BigId, nullable=False),
    Column("amount", ExactDecimal, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("decision", String(20), nullable=False),
    Column("evaluated_at", UtcDateTime, nullable=False),
    Column("body", Text, nullable=False),
)
Index("ix_limits_checks_order", checks.c.order_id, checks.c.seq)

limit_history = Table(
    "limits_limit_history",
    metadata,
    Column("seq", BigId, primary_key=True, autoincrement=False),
    Column("customer_id", String(1000), nullable=False),
    Column("effective_at", UtcDateTime, nullable=False),
    Column("body", Text, nullable=False),
)
Index("ix_limits_history_customer", limit_history.c.customer_id, limit_history.c.seq)

requests = Table(
    "limits_requests",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("customer_id", String(1000), nullable=False),
    Column("status", String(20), nullable=False),
    Column("requested_by", String(1000), nullable=False),
)

PROJECTIONS: Sequence[Table] = (customers, checks, limit_history, requests)

_STATE = StateCodec(CustomerState)
dump_state = _STATE.dump
load_state = _STATE.load


async def lock_customers(conn: AsyncConnection, ids: Iterable[str]) -> dict[str, Any]:
    """Load (and on PostgreSQL lock, in id order) the rows of these customers."""
    return await lock_rows(conn, customers, "customer_id", ids)


async def lock_versions(conn: AsyncConnection, ids: Iterable[str]) -> dict[str, Any]:
    """Lock these customers' rows (PostgreSQL, id order) and read only their versions."""
    return await lock_rows(conn, customers, "customer_id", ids,
                           columns=("customer_id", "last_seq", "published"))


async def read_states(conn: AsyncConnection, ids: Iterable[str]) -> dict[str, str]:
    return await read_values(conn, customers, "customer_id", "state", ids)


def customer_row(state: CustomerState, fig: Figures, last_seq: int,
                 next_ageing_on: date | None, next_expiry_at: datetime | None,
                 published: str | None) -> dict[str, Any]:
    util = fig.utilization
    return {
        "customer_id": state.customer_id,
        "group_id": state.parent_id or state.customer_id,
        "parent_id": state.parent_id,
        "name": state.name,
        "currency": state.currency,
        "grade": state.grade,
        "limit_amount": fig.limit,
        "limit_source": fig.limit_source,
        "limit_expires_at": fig.limit_expires_at,
        "on_hold": fig.on_hold,
        "open_receivables": fig.open_receivables,
        "overdue_amount": fig.overdue_amount,
        "max_days_overdue": fig.max_days_overdue,
        "reserved": fig.reserved,
        "exposure": fig.exposure,
        "available": fig.available,
        "utilization_ppm": int(util * 1_000_000) if util is not None else None,
        "over_limit": fig.exposure > fig.limit,
        "open_alerts": len(state.open_alerts),
        "next_ageing_on": next_ageing_on,
        "next_expiry_at": next_expiry_at,
        "as_of": state.last_time,
        "last_seq": last_seq,
        "state": dump_state(state),
        "published": published,
    }


async def save_customers(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    await upsert(conn, customers, ["customer_id"], rows)


async def group_exposure(conn: AsyncConnection, group_id: str,
                         without: str) -> tuple[Decimal, int]:
    """Summed exposure of the group's other members, and how many there are."""
    stmt = select(customers.c.exposure).where(
        customers.c.group_id == group_id, customers.c.customer_id != without)
    values = [r.exposure for r in await conn.execute(stmt)]
    return sum(values, Decimal(0)), len(values)


async def group_members(conn: AsyncConnection, group_id: str, without: str) -> list[str]:
    stmt = select(customers.c.customer_id).where(
        customers.c.group_id == group_id, customers.c.customer_id != without
    ).order_by(customers.c.customer_id)
    return [r.customer_id for r in await conn.execute(stmt)]


async def latest_check(conn: AsyncConnection, order_id: str) -> Any:
    stmt = (select(checks).where(checks.c.order_id == order_id)
            .order_by(checks.c.seq.desc()).limit(1))
    return (await conn.execute(stmt)).first()


async def record_checks(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    if rows:
        await conn.execute(checks.insert(), list(rows))


async def record_limit_changes(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    if rows:
        await conn.execute(limit_history.insert(), list(rows))


async def record_requests(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    await upsert(conn, requests, ["request_id"], rows, update=["status"])

