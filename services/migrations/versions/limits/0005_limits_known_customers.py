"""limits: which customers the service has heard of from a business fact

Revision ID: limits_0005
Revises: limits_0004
Create Date: 2026-11-29 04:30:00

A credit check (or an alert) about an id the service never heard of otherwise — order entry
asking about a mistyped customer — used to leave a customer row like any other: listed in
the portfolio, counted in its totals, its exposure published, its endpoints answering 200.
``known`` marks the rows of customers heard of from a registration, receivables, an
assessment, a limit request or a hold; the others are not listed nor answered for. Rows
already there count as known (they are written again, and marked right, by their next
event).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'limits_0005'
down_revision: str | None = 'limits_0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("limits_customers") as batch:
        batch.add_column(sa.Column("known", sa.Boolean(), nullable=False,
                                   server_default=sa.true()))


def downgrade() -> None:
    with op.batch_alter_table("limits_customers") as batch:
        batch.drop_column("known")
