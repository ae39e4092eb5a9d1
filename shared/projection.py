"""The projection kit every service's ``store`` uses: per-customer state documents, row
locks in a deadlock-free order, dialect-neutral upserts."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, Generic, TypeVar

from pydantic import TypeAdapter
from sqlalchemy import Table, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

S = TypeVar("S")


class StateCodec(Generic[S]):
    """A state dataclass to and from its JSON document (Decimals, dates and all)."""

    def __init__(self, state_type: type[S]) -> None:
        self._adapter: TypeAdapter[S] = TypeAdapter(state_type)

    def dump(self, state: S) -> str:
        return self._adapter.dump_json(state).decode()

    def load(self, text: str) -> S:
        return self._adapter.validate_json(text)


def as_json(body: dict[str, Any]) -> str:
    return json.dumps(body, default=str, separators=(",", ":"))


def insert_for(conn: AsyncConnection, table: Table) -> Any:
    """INSERT with ``on_conflict_*`` for the connection's dialect."""
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


async def upsert(conn: AsyncConnection, table: Table, keys: Sequence[str],
                 rows: Sequence[dict[str, Any]], update: Sequence[str] | None = None) -> None:
    """Insert rows, or update the named columns (default: all but the keys) where they exist."""
    if not rows:
        return
    ins = insert_for(conn, table)
    columns = update if update is not None else [c.name for c in table.columns
                                                 if c.name not in keys]
    stmt = ins.on_conflict_do_update(index_elements=list(keys),
                                     set_={c: ins.excluded[c] for c in columns})
    await conn.execute(stmt, list(rows))


async def lock_rows(conn: AsyncConnection, table: Table, key: str,
                    ids: Iterable[str]) -> dict[str, Any]:
    """Load the rows with these keys; on PostgreSQL lock them, always in key order, so two
    transactions locking overlapping sets cannot deadlock. (SQLite serialises writers with
    BEGIN IMMEDIATE instead.)"""
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    column = table.c[key]
    stmt = select(table).where(column.in_(wanted)).order_by(column)
    if conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    return {getattr(r, key): r for r in await conn.execute(stmt)}
