"""assessment: the payment-behaviour window's settled days as rows per month (rebuilt)

Revision ID: assessment_0005
Revises: assessment_0004
Create Date: 2026-12-28 10:00:00

Issue 20: a customer's state document held the window's settled days (up to 366, each with
how many invoices were how many days beyond terms), so a customer settling dozens of
invoices a day wrote tens of kilobytes with every event (50,000 settled invoices: 44 KB,
1.4x a fresh customer's cost per event). The days move to ``assessment_paid_months``, a row
per customer and month; an event rewrites the month it settles in. The document keeps the
window's sums and its first and last day. ``REBUILD`` tells ``creditwatch db upgrade`` to
replay the service after this revision; until then the service refuses a document that
still holds its days (``store.LayoutError``).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'assessment_0005'
down_revision: str | None = 'assessment_0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The state documents change layout: the projections must be rebuilt (replayed).
REBUILD = True


def upgrade() -> None:
    op.create_table(
        "assessment_paid_months",
        sa.Column("customer_id", sa.String(1000), nullable=False),
        sa.Column("month", sa.String(7), nullable=False),
        sa.Column("days", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("customer_id", "month"),
    )


def downgrade() -> None:
    # The documents written since lack their days: the older code needs the projections
    # rebuilt as well (creditwatch replay assessment).
    op.drop_table("assessment_paid_months")
