"""limits: live reservations as rows of their own; ended ones are gone

Revision ID: limits_0003
Revises: limits_0002
Create Date: 2026-11-28 15:10:00

Until now every reservation a customer ever had (released and expired ones too) lived in the
customer's state document, so every credit check rewrote a document that grew with each
order. Now the live reservations are rows of ``limits_reservations`` and the document holds
neither them nor the time of the latest event (the row's ``as_of`` has it): a credit check
writes one small row and leaves the document alone. Upgrading moves the live reservations
out of the documents and drops the ended ones; downgrading puts the live ones back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from alembic import op

import shared.db

revision: str = 'limits_0003'
down_revision: str | None = 'limits_0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PAGE = 500

customers = sa.table(
    "limits_customers",
    sa.column("customer_id", sa.String()),
    sa.column("as_of", shared.db.UtcDateTime(timezone=True)),
    sa.column("state", sa.Text()),
)
reservations = sa.table(
    "limits_reservations",
    sa.column("customer_id", sa.String()),
    sa.column("order_id", sa.String()),
    sa.column("check_id", sa.String()),
    sa.column("amount", shared.db.ExactDecimal()),
    sa.column("expires_at", shared.db.UtcDateTime(timezone=True)),
)


def _dump(document: dict[str, Any]) -> str:
    # As the service writes documents (compact, UTF-8, the fields in their order).
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"))


def _pages() -> Iterator[Sequence[Any]]:
    bind = op.get_bind()
    after = ""
    while True:
        rows = bind.execute(sa.select(customers.c.customer_id, customers.c.as_of,
                                      customers.c.state)
                            .where(customers.c.customer_id > after)
                            .order_by(customers.c.customer_id).limit(PAGE)).all()
        if not rows:
            return
        yield rows
        after = rows[-1].customer_id


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def upgrade() -> None:
    op.create_table(
        'limits_reservations',
        sa.Column('customer_id', sa.String(length=1000), nullable=False),
        sa.Column('order_id', sa.String(length=1000), nullable=False),
        sa.Column('check_id', sa.String(length=64), nullable=False),
        sa.Column('amount', shared.db.ExactDecimal(), nullable=False),
        sa.Column('expires_at', shared.db.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('customer_id', 'order_id'),
    )
    bind = op.get_bind()
    for rows in _pages():
        held: list[dict[str, Any]] = []
        documents: list[dict[str, Any]] = []
        for row in rows:
            document = json.loads(row.state)
            for order_id, res in (document.get("reservations") or {}).items():
                if res.get("status", "active") == "active":
                    held.append({"customer_id": row.customer_id, "order_id": order_id,
                                 "check_id": res["check_id"], "amount": Decimal(res["amount"]),
                                 "expires_at": _instant(res["expires_at"])})
            document["reservations"] = {}
            document["last_time"] = None
            documents.append({"id": row.customer_id, "document": _dump(document)})
        if held:
            bind.execute(reservations.insert(), held)
        bind.execute(customers.update().where(customers.c.customer_id == sa.bindparam("id"))
                     .values(state=sa.bindparam("document")), documents)


def downgrade() -> None:
    bind = op.get_bind()
    for rows in _pages():
        ids = [row.customer_id for row in rows]
        held: dict[str, dict[str, Any]] = {}
        for r in bind.execute(sa.select(reservations).where(
                reservations.c.customer_id.in_(ids)).order_by(reservations.c.order_id)):
            held.setdefault(r.customer_id, {})[r.order_id] = {
                "order_id": r.order_id, "check_id": r.check_id, "amount": str(r.amount),
                "expires_at": r.expires_at.isoformat().replace("+00:00", "Z"),
                "status": "active"}
        documents = []
        for row in rows:
            document = json.loads(row.state)
            document["reservations"] = held.get(row.customer_id, {})
            document["last_time"] = (row.as_of.isoformat().replace("+00:00", "Z")
                                     if row.as_of is not None else None)
            documents.append({"id": row.customer_id, "document": _dump(document)})
        bind.execute(customers.update().where(customers.c.customer_id == sa.bindparam("id"))
                     .values(state=sa.bindparam("document")), documents)
    op.drop_table('limits_reservations')
