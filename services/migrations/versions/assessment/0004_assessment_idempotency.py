"""assessment: Idempotency-Key answers of the API (assessment_idempotency)

Revision ID: assessment_0004
Revises: assessment_0003
Create Date: 2026-12-21 10:00:00

Issue 21: a POST with an ``Idempotency-Key`` runs once per principal, method, path and key;
a retry gets the stored answer (shared.idempotency). The keys live in this table, shared by
the service's replicas, until they expire (``CREDITWATCH_IDEMPOTENCY_TTL_H``). No projection
changes: nothing is rebuilt.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from shared.db import UtcDateTime

revision: str = 'assessment_0004'
down_revision: str | None = 'assessment_0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "assessment_idempotency",
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("principal", sa.Text(), nullable=False),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("reservation", sa.String(32), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("expires_at", UtcDateTime(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("headers", sa.Text(), nullable=True),
        sa.Column("body", sa.LargeBinary(), nullable=True),
        sa.Column("completed_at", UtcDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("key_hash"),
    )
    op.create_index("ix_assessment_idempotency_expires", "assessment_idempotency", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_assessment_idempotency_expires", table_name="assessment_idempotency")
    op.drop_table("assessment_idempotency")
