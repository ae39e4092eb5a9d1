"""limits: a function that locks a batch's customers and checks what its decisions read

Revision ID: limits_0004
Revises: limits_0003
Create Date: 2026-11-28 15:40:00

The API decides a batch of credit checks on what one statement read without locks, then
writes it with one statement that first calls ``limits_lock_and_verify``: it locks the
customers (and group parents) in id order and, each query with a snapshot taken after the
locks were granted, checks that every customer still has the version that was read (no row:
still none), every group the same exposure and member count, every order the same latest
check. Only then does the statement write; otherwise it writes nothing and the API decides
the batch again inside a transaction, under the locks. PostgreSQL only; SQLite decides one
check at a time under its writer lock.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = 'limits_0004'
down_revision: str | None = 'limits_0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Every lookup is per element (LATERAL) so that the primary keys and indexes are used
# whatever plan PL/pgSQL keeps for the session.
FUNCTION = """
CREATE OR REPLACE FUNCTION limits_lock_and_verify(
    customers text[], versions bigint[], groups text[], exposures numeric[], members bigint[],
    orders text[], latest text[]) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM 1 FROM unnest(customers) AS k(id) CROSS JOIN LATERAL (
        SELECT 1 FROM limits_customers WHERE customer_id = k.id FOR UPDATE) AS locked;
    IF EXISTS (
        SELECT 1 FROM unnest(customers, versions) AS k(id, version)
        LEFT JOIN LATERAL (SELECT last_seq FROM limits_customers
                           WHERE customer_id = k.id) AS c ON true
        WHERE c.last_seq IS DISTINCT FROM k.version) THEN
        RETURN false;
    END IF;
    IF EXISTS (
        SELECT 1 FROM unnest(groups, exposures, members) AS g(id, exposure, n)
        CROSS JOIN LATERAL (SELECT coalesce(sum(exposure), 0) AS exposure, count(*) AS n
                            FROM limits_customers WHERE group_id = g.id) AS cur
        WHERE cur.n <> g.n OR cur.exposure <> g.exposure) THEN
        RETURN false;
    END IF;
    IF EXISTS (
        SELECT 1 FROM unnest(orders, latest) AS o(id, check_id)
        LEFT JOIN LATERAL (SELECT check_id FROM limits_checks WHERE order_id = o.id
                           ORDER BY seq DESC LIMIT 1) AS l ON true
        WHERE l.check_id IS DISTINCT FROM o.check_id) THEN
        RETURN false;
    END IF;
    RETURN true;
END
$$"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS limits_lock_and_verify(text[], bigint[], text[], "
                   "numeric[], bigint[], text[], text[])")
