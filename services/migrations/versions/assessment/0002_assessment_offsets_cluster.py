"""assessment: each stored consumer offset records the Kafka cluster whose log it is in

Revision ID: assessment_0002
Revises: assessment_0001
Create Date: 2026-12-07 02:00:00

A restarted in-memory broker (`creditwatch dev`) or another cluster has a log of its own:
an offset from one means nothing in the other, and a consumer that seeks to it skips
records (finding 5 of issue 19). Offsets stored before this have no cluster (null): the
next batch records it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = 'assessment_0002'
down_revision: str | None = 'assessment_0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("assessment_offsets") as batch:
        batch.add_column(sa.Column("cluster_id", sa.String(200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("assessment_offsets") as batch:
        batch.drop_column("cluster_id")
