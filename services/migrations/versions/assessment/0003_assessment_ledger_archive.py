"""assessment: the ledger archive; state documents of the new layout (rebuilt)

Revision ID: assessment_0003
Revises: assessment_0002
Create Date: 2026-12-14 10:00:00

A customer's state document no longer holds its whole history (issue 20): it holds what is
open in the shared receivables ledger plus rolling payment-behaviour aggregates, and the
ledger items that leave it (settled invoices, applied payments) go to
``assessment_ledger_archive``, read back only when an event names them. Documents of the
old layout cannot be converted in place (the aggregates and the archive come from folding
the events under the one allocation rule), so the projections are rebuilt from the event
store: ``REBUILD`` tells ``creditwatch db upgrade`` to replay the service after this
revision. Until then the service refuses an old document (``store.LayoutError``).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'assessment_0003'
down_revision: str | None = 'assessment_0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The state documents change layout: the projections must be rebuilt (replayed).
REBUILD = True


def upgrade() -> None:
    op.create_table(
        "assessment_ledger_archive",
        sa.Column("customer_id", sa.String(1000), nullable=False),
        sa.Column("item_key", sa.String(1100), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("customer_id", "item_key"),
    )


def downgrade() -> None:
    # The documents written since are of the new layout: the older code needs the
    # projections rebuilt as well (creditwatch replay assessment).
    op.drop_table("assessment_ledger_archive")
