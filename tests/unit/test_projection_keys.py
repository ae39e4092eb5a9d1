"""``key_in``: the statement that locks a batch's customers has one text on PostgreSQL,
whatever the number of customers, so the driver prepares and the server plans it once."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from sqlalchemy import Column, MetaData, String, Table, and_, select
from sqlalchemy.dialects import postgresql, sqlite

from shared.projection import key_in

_TABLE = Table("customers", MetaData(), Column("customer_id", String(1000), primary_key=True))


def _sql(dialect_name: str, dialect: Any, ids: list[str]) -> str:
    conn: Any = SimpleNamespace(dialect=SimpleNamespace(name=dialect_name))
    column = _TABLE.c.customer_id
    stmt = select(column).where(key_in(conn, column, ids)).order_by(column)
    return str(stmt.compile(dialect=dialect, compile_kwargs={"render_postcompile": True}))


def test_given_batches_of_different_sizes_when_locked_on_postgresql_then_the_statement_text_is_the_same() -> (
    None
):
    texts = {
        _sql("postgresql", postgresql.dialect(), [f"C{i}" for i in range(n)]) for n in (1, 3, 500)
    }
    assert len(texts) == 1
    assert "= ANY (" in texts.pop()


def test_given_sqlite_when_keys_are_matched_then_an_in_list_is_used() -> None:
    text = _sql("sqlite", sqlite.dialect(), ["C1", "C2"])
    assert "IN (" in text


def test_given_two_key_lists_in_one_statement_then_each_keeps_its_own_parameter() -> None:
    conn: Any = SimpleNamespace(dialect=SimpleNamespace(name="postgresql"))
    column = _TABLE.c.customer_id
    stmt = select(column).where(and_(key_in(conn, column, ["A"]), key_in(conn, column, ["B"])))
    params = stmt.compile(dialect=postgresql.dialect()).params
    assert sorted(v for values in params.values() for v in values) == ["A", "B"]
