"""The projection kit every service's ``store`` uses: per-customer state documents, row
locks in a deadlock-free order, dialect-neutral upserts."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any, Generic, Protocol, TypeVar

import msgspec
import orjson
from sqlalchemy import ColumnElement, Table, any_, bindparam, case, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.schema import Column

S = TypeVar("S")


class Versioned(Protocol):
    last_seq: int


V = TypeVar("V", bound=Versioned)


class StateCodec(Generic[S]):
    """A state dataclass to and from its JSON document (Decimals, dates and all).

    msgspec writes the bytes pydantic's ``TypeAdapter`` wrote for the same dataclasses
    (fields in order, Decimals and dates as strings, UTC as ``Z``), at about half the cost,
    and reads them back at less than half (a limits document of a dozen open items: 39 →
    19 µs written, 103 → 45 µs read); ``tests/unit/test_state_codec.py`` holds it to
    pydantic's bytes and values. A document that is not of the type raises
    ``msgspec.ValidationError`` (a ``ValueError``) naming the path, like
    ``msgspec.DecodeError`` for one that is not JSON."""

    def __init__(self, state_type: type[S]) -> None:
        self._encoder = msgspec.json.Encoder()
        self._decoder: msgspec.json.Decoder[S] = msgspec.json.Decoder(state_type)
        # A type that forbids unknown keys (pydantic's ``extra="forbid"``, by which a
        # document of an older layout fails to load): its top-level keys are checked too.
        config = getattr(state_type, "__pydantic_config__", None) or {}
        self._fields: frozenset[str] | None = (
            frozenset(f.name for f in dataclasses.fields(state_type))  # type: ignore[arg-type]
            if config.get("extra") == "forbid"
            else None
        )

    def dump(self, state: S) -> str:
        return self._encoder.encode(state).decode()

    def load(self, text: str) -> S:
        state = self._decoder.decode(text)
        if self._fields is not None:
            unknown = sorted(_TOP_LEVEL.decode(text).keys() - self._fields)
            if unknown:
                raise msgspec.ValidationError(f"Object contains unknown field `{unknown[0]}`")
        return state


# A document's top-level keys, its values left unparsed.
_TOP_LEVEL = msgspec.json.Decoder(dict[str, msgspec.Raw])


class CommittedStates(Generic[V]):
    """States this process committed, by customer; past ``capacity`` the least recently used
    go. One is good for a transaction only while the customer's row still has its version
    (``last_seq``): then nobody — another replica, the consumer, the API — has written the
    customer since, and its JSON document, the costliest part of loading, need not be read
    and parsed again. States are immutable values, so they are kept without copying."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, V] = OrderedDict()

    def get(self, key: str) -> V | None:
        """The state kept for ``key``, whatever its version."""
        return self._items.get(key)

    def current(self, key: str, last_seq: int) -> V | None:
        """The state kept for ``key`` if it is at version ``last_seq``."""
        hit = self._items.get(key)
        if hit is None or hit.last_seq != last_seq:
            return None
        self._items.move_to_end(key)
        return hit

    def remember(self, items: Iterable[tuple[str, V]]) -> None:
        for key, item in items:
            self._items[key] = item
            self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()


def as_json(body: dict[str, Any]) -> str:
    return json.dumps(body, default=str, separators=(",", ":"))


def plain_json(body: dict[str, Any]) -> str:
    """``as_json`` of a body holding only strings, ints, booleans, None, lists and dicts (as
    the bodies the services build themselves, money as strings): the same text, five times
    faster. Text beyond printable ASCII goes through ``as_json``, which escapes it (DEL as
    well) and writes what orjson refuses, such as a lone surrogate."""
    try:
        out = orjson.dumps(body)
    except orjson.JSONEncodeError:
        return as_json(body)
    return out.decode() if out.isascii() and b"\x7f" not in out else as_json(body)


def insert_for(conn: AsyncConnection, table: Table) -> Any:
    """INSERT with ``on_conflict_*`` for the connection's dialect."""
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


async def upsert(
    conn: AsyncConnection,
    table: Table,
    keys: Sequence[str],
    rows: Sequence[dict[str, Any]],
    update: Sequence[str] | None = None,
    keep_if: tuple[str, str] | None = None,
) -> None:
    """Insert rows, or update the named columns (default: all but the keys) where they exist.
    ``keep_if=(column, marker)``: where a row's ``column`` is ``marker``, the stored value
    stays (a large value that did not change is not sent again).

    Rows with the same key are one row, the later winning: one statement cannot touch a row
    twice (PostgreSQL: "ON CONFLICT DO UPDATE command cannot affect row a second time"), and
    a replay's page may hold, say, a limit request's submission and its decision."""
    if not rows:
        return
    rows = collapse_by_key(rows, keys, keep_if)
    columns = (
        update if update is not None else [c.name for c in table.columns if c.name not in keys]
    )
    if conn.dialect.name == "postgresql":
        await _upsert_unnest(conn, table, tuple(keys), tuple(columns), rows, keep_if)
        return
    ins = insert_for(conn, table)
    sets: dict[str, Any] = {c: ins.excluded[c] for c in columns}
    if keep_if is not None and keep_if[0] in sets:
        name, marker = keep_if
        sets[name] = case((ins.excluded[name] == marker, table.c[name]), else_=ins.excluded[name])
    stmt = ins.on_conflict_do_update(index_elements=list(keys), set_=sets)
    await conn.execute(stmt, list(rows))


def collapse_by_key(
    rows: Sequence[dict[str, Any]],
    keys: Sequence[str],
    keep_if: tuple[str, str] | None = None,
) -> Sequence[dict[str, Any]]:
    """One row per key, in first-seen order, each the merge of that key's rows in order (a
    later value wins; a ``keep_if`` marker does not override an earlier real value)."""
    if len(rows) < 2:
        return rows
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        key = tuple(row[k] for k in keys)
        before = merged.get(key)
        if before is None:
            merged[key] = row
            continue
        combined = {**before, **row}
        if keep_if is not None:
            name, marker = keep_if
            if row.get(name) == marker and before.get(name, marker) != marker:
                combined[name] = before[name]
        merged[key] = combined
    return rows if len(merged) == len(rows) else list(merged.values())


def kept_unless_marked(table: str, column: str, marker: str) -> str:
    """PostgreSQL's SET for a ``keep_if`` column of an upsert."""
    value = marker.replace("'", "''")
    return (
        f'"{column}" = CASE WHEN EXCLUDED."{column}" = \'{value}\' '
        f'THEN "{table}"."{column}" ELSE EXCLUDED."{column}" END'
    )


@functools.cache
def _unnest_upsert_sql(
    table: Table,
    names: tuple[str, ...],
    keys: tuple[str, ...],
    update: tuple[str, ...],
    keep_if: tuple[str, str] | None,
) -> str:
    pg = postgresql.dialect()  # type: ignore[no-untyped-call]
    arrays = ", ".join(
        f"${i}::{table.c[n].type.compile(dialect=pg)}[]" for i, n in enumerate(names, start=1)
    )
    sets = ", ".join(
        kept_unless_marked(table.name, n, keep_if[1])
        if keep_if is not None and n == keep_if[0]
        else f'"{n}" = EXCLUDED."{n}"'
        for n in update
    )
    quoted = ", ".join(f'"{n}"' for n in names)
    return (
        f'INSERT INTO "{table.name}" ({quoted}) SELECT * FROM unnest({arrays}) '
        f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {sets}"
    )


async def _upsert_unnest(
    conn: AsyncConnection,
    table: Table,
    keys: tuple[str, ...],
    update: tuple[str, ...],
    rows: Sequence[dict[str, Any]],
    keep_if: tuple[str, str] | None,
) -> None:
    """One statement with one array per column, instead of an executemany of rows × columns
    parameters: the rows a batch writes cost several times less on the Python side. Values
    must already be what the driver takes (Decimal, aware datetime, …), as the stores build."""
    names = tuple(rows[0])  # every row of one call has the same columns
    sql = _unnest_upsert_sql(table, names, keys, tuple(c for c in update if c in names), keep_if)
    await conn.exec_driver_sql(sql, tuple([row[n] for row in rows] for n in names))


def key_in(conn: AsyncConnection, column: Column[Any], ids: Sequence[str]) -> ColumnElement[bool]:
    """``column IN ids``. On PostgreSQL as ``= ANY($1)`` with one array parameter: an IN list
    is one parameter per key, so each batch's number of customers made a statement text of
    its own, prepared and planned again (the cost of a batch's lock in `bench.ingest`)."""
    if conn.dialect.name == "postgresql":
        array = bindparam("keys", list(ids), type_=postgresql.ARRAY(column.type), unique=True)
        return column == any_(array)
    return column.in_(list(ids))


async def lock_rows(
    conn: AsyncConnection,
    table: Table,
    key: str,
    ids: Iterable[str],
    columns: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Load the rows with these keys (all columns, or ``columns``); on PostgreSQL lock them,
    always in key order, so two transactions locking overlapping sets cannot deadlock.
    (SQLite serialises writers with BEGIN IMMEDIATE instead.)"""
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    column = table.c[key]
    what = [table.c[c] for c in columns] if columns is not None else [table]
    stmt = select(*what).where(key_in(conn, column, wanted)).order_by(column)
    if conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    return {getattr(r, key): r for r in await conn.execute(stmt)}


async def read_values(
    conn: AsyncConnection, table: Table, key: str, column: str, ids: Iterable[str]
) -> dict[str, Any]:
    """``column`` of the rows with these keys, by key (no lock)."""
    wanted = list(ids)
    if not wanted:
        return {}
    k, c = table.c[key], table.c[column]
    return {r[0]: r[1] for r in await conn.execute(select(k, c).where(key_in(conn, k, wanted)))}
