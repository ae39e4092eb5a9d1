"""Limits projections: one row per customer (state + the figures the API and portfolio read),
stored credit decisions, limit history and limit requests."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields
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
    delete,
    select,
    true,
    tuple_,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from services.limits.domain import (
    CustomerState,
    Figures,
    Reservation,
    known,
)
from shared import ledger as lg
from shared.db import BigId, ExactDecimal, UtcDateTime
from shared.eventstore import core_tables
from shared.idempotency import idempotency_table
from shared.projection import StateCodec, key_in, lock_rows, upsert
from shared.unitofwork import LayoutError, LedgerArchive, archive_table

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
    # The state document: the state but for its live reservations (rows of their own, below)
    # and the time of its latest event (``as_of``).
    Column("state", Text, nullable=False),
    # The exposure.updated body last published, to publish only on change.
    Column("published", Text),
    # Heard of from a business fact, not only from credit checks or alerts (domain.known):
    # the others are no customers to list or answer for.
    Column("known", Boolean, nullable=False, server_default=true()),
)
Index("ix_limits_customers_group", customers.c.group_id)
Index("ix_limits_customers_ageing", customers.c.next_ageing_on)
Index("ix_limits_customers_expiry", customers.c.next_expiry_at)

# The live reservations, a row each: a credit check writes one small row instead of the whole
# state document again, so its cost does not grow with the customer's open orders. A
# reservation that ends (released, expired) is deleted.
reservations = Table(
    "limits_reservations",
    metadata,
    Column("customer_id", String(1000), primary_key=True),
    Column("order_id", String(1000), primary_key=True),
    Column("check_id", String(64), nullable=False),
    Column("amount", ExactDecimal, nullable=False),
    Column("expires_at", UtcDateTime, nullable=False),
)

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

# Ledger items that left a customer's hot state (settled invoices, applied payments).
ledger_archive = archive_table(metadata, "limits")
archive = LedgerArchive(ledger_archive)

# Idempotency-Key answers of the API (shared.idempotency); no projection: kept by replays.
idempotency = idempotency_table(metadata, "limits")

PROJECTIONS: Sequence[Table] = (
    customers,
    reservations,
    checks,
    limit_history,
    requests,
    ledger_archive,
)

_STATE = StateCodec(CustomerState)
# What the document holds: everything but the reservations and the latest event's time.
_DOCUMENT_FIELDS = tuple(
    f.name for f in fields(CustomerState) if f.name not in ("reservations", "last_time", "step")
)
# In a written row: the document did not change, keep the stored one.
UNCHANGED = ""


def dump_state(state: CustomerState) -> str:
    """The customer's state document (see ``customers.state``)."""
    return _STATE.dump(lg.replace(state, reservations={}, last_time=None, step=None))


def load_state(
    document: str, last_time: datetime | None, held: Iterable[Reservation] = ()
) -> CustomerState:
    """A customer's state from its document, its row's ``as_of`` and its reservations."""
    # The new layout's documents have "heard_of" among their first keys; the old had not.
    if '"heard_of":' not in document[:3000]:
        raise LayoutError(
            "limits: a state document of the layout before limits_0007 (whole history); "
            "rebuild the projections: creditwatch db upgrade"
        )
    state = _STATE.load(document)
    return lg.replace(state, reservations={r.order_id: r for r in held}, last_time=last_time)


def same_document(before: CustomerState, after: CustomerState) -> bool:
    """Whether ``after`` has the document of ``before``: states are immutable values and a
    fold replaces only what it changes, so the same objects mean the same document (a
    changed object with an equal value only costs a rewrite)."""
    return all(getattr(before, n) is getattr(after, n) for n in _DOCUMENT_FIELDS)


def reservation_changes(
    cid: str,
    before: Mapping[str, Reservation],
    after: Mapping[str, Reservation],
    orders: Iterable[str],
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """The reservation rows to write and the (customer, order) keys to delete, among the
    orders whose reservation the fold may have changed (``before``: as the rows hold them)."""
    rows: list[dict[str, Any]] = []
    gone: list[tuple[str, str]] = []
    for order_id in orders:
        res = after.get(order_id)
        if res is None:
            if order_id in before:
                gone.append((cid, order_id))
        elif before.get(order_id) is not res:
            rows.append(reservation_row(cid, res))
    return rows, gone


def reservation_row(cid: str, res: Reservation) -> dict[str, Any]:
    return {
        "customer_id": cid,
        "order_id": res.order_id,
        "check_id": res.check_id,
        "amount": res.amount,
        "expires_at": res.expires_at,
    }


async def read_reservations(
    conn: AsyncConnection, ids: Iterable[str]
) -> dict[str, list[Reservation]]:
    wanted = sorted(set(ids))
    out: dict[str, list[Reservation]] = {}
    if not wanted:
        return out
    r = reservations.c
    stmt = (
        select(reservations)
        .where(key_in(conn, r.customer_id, wanted))
        .order_by(r.customer_id, r.order_id)
    )
    for row in await conn.execute(stmt):
        out.setdefault(row.customer_id, []).append(
            Reservation(row.order_id, row.check_id, row.amount, row.expires_at)
        )
    return out


async def load_states(conn: AsyncConnection, rows: Mapping[str, Any]) -> dict[str, CustomerState]:
    """The states of these customer rows (read with their ``state`` and ``as_of``)."""
    held = await read_reservations(conn, rows.keys())
    return {cid: load_state(row.state, row.as_of, held.get(cid, ())) for cid, row in rows.items()}


async def save_reservations(
    conn: AsyncConnection, rows: Sequence[dict[str, Any]], gone: Sequence[tuple[str, str]]
) -> None:
    if gone:
        r = reservations.c
        await conn.execute(
            delete(reservations).where(tuple_(r.customer_id, r.order_id).in_(list(gone)))
        )
    await upsert(conn, reservations, ["customer_id", "order_id"], rows)


async def lock_customers(conn: AsyncConnection, ids: Iterable[str]) -> dict[str, Any]:
    """Load (and on PostgreSQL lock, in id order) the rows of these customers."""
    return await lock_rows(conn, customers, "customer_id", ids)


async def lock_versions(conn: AsyncConnection, ids: Iterable[str]) -> dict[str, Any]:
    """Lock these customers' rows (PostgreSQL, id order) and read only their versions."""
    return await lock_rows(
        conn, customers, "customer_id", ids, columns=("customer_id", "last_seq", "published")
    )


async def read_states(conn: AsyncConnection, ids: Iterable[str]) -> dict[str, CustomerState]:
    """The states of these customers (no lock)."""
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    c = customers.c
    rows = await conn.execute(
        select(c.customer_id, c.state, c.as_of).where(key_in(conn, c.customer_id, wanted))
    )
    return await load_states(conn, {r.customer_id: r for r in rows})


def customer_row(
    state: CustomerState,
    fig: Figures,
    last_seq: int,
    next_ageing_on: date | None,
    next_expiry_at: datetime | None,
    published: str | None,
    document: str,
) -> dict[str, Any]:
    """The customer's row; ``document`` is its state document, or ``UNCHANGED``."""
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
        "state": document,
        "published": published,
        "known": known(state),
    }


async def save_customers(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    await upsert(conn, customers, ["customer_id"], rows, keep_if=("state", UNCHANGED))


async def group_exposure(
    conn: AsyncConnection, group_id: str, without: str
) -> tuple[dict[str, Decimal], int]:
    """Summed exposure of the group's other members by their currency, and how many there
    are (``domain.in_currency`` puts the sums in one currency)."""
    stmt = select(customers.c.currency, customers.c.exposure).where(
        customers.c.group_id == group_id, customers.c.customer_id != without
    )
    sums: dict[str, Decimal] = {}
    count = 0
    for r in await conn.execute(stmt):
        sums[r.currency] = sums.get(r.currency, Decimal(0)) + r.exposure
        count += 1
    return sums, count


async def group_members(conn: AsyncConnection, group_id: str, without: str) -> list[str]:
    stmt = (
        select(customers.c.customer_id)
        .where(customers.c.group_id == group_id, customers.c.customer_id != without)
        .order_by(customers.c.customer_id)
    )
    return [r.customer_id for r in await conn.execute(stmt)]


async def latest_check(conn: AsyncConnection, order_id: str) -> Any:
    stmt = (
        select(checks).where(checks.c.order_id == order_id).order_by(checks.c.seq.desc()).limit(1)
    )
    return (await conn.execute(stmt)).first()


async def record_checks(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    if rows:
        await conn.execute(checks.insert(), list(rows))


async def record_limit_changes(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    if rows:
        await conn.execute(limit_history.insert(), list(rows))


async def record_requests(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    await upsert(conn, requests, ["request_id"], rows, update=["status"])
