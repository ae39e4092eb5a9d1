"""limits: a customer's state is what is open; settled ledger items in an archive

Revision ID: limits_0007
Revises: limits_0006
Create Date: 2026-12-07 05:00:00

The state document held every invoice, payment, credit note and dunning notice a customer
ever had, so its next event cost more the older it was. It now holds the receivables
ledger's open items (shared.ledger), the live reservations' consumption and the pending
limit requests; items that leave (a settled invoice, an applied payment) are rows of
``limits_ledger_archive``, read back only when an event names them.

The documents of the old layout cannot be read by the new code: ``REBUILD`` makes
``creditwatch db upgrade`` rebuild the projections from the event store right after this
migration (a replay).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'limits_0007'
down_revision: str | None = 'limits_0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The projections' layout changed: rebuild them from the event store after migrating.
REBUILD = True


def upgrade() -> None:
    op.create_table(
        "limits_ledger_archive",
        sa.Column("customer_id", sa.String(1000), nullable=False),
        sa.Column("item_key", sa.String(1100), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("customer_id", "item_key"),
    )


def downgrade() -> None:
    op.drop_table("limits_ledger_archive")
