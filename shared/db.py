"""Database kit: async engines for SQLite (dev) and PostgreSQL (prod/tests), exact column types.

SQLite stores ``Numeric`` as a float, so amounts go to SQLite as text and come back as
``Decimal``; timestamps are always stored in UTC and come back timezone-aware.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import BigInteger, DateTime, Integer, Numeric, String, event
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.types import TypeDecorator, TypeEngine

# Integer primary keys autoincrement on SQLite only when they are exactly INTEGER.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class ExactDecimal(TypeDecorator[Decimal]):
    """A Decimal column: NUMERIC on PostgreSQL, TEXT on SQLite (never a float)."""

    impl = Numeric()
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(64))
        # Unconstrained NUMERIC keeps the scale it was given ("1250.00" stays "1250.00").
        return dialect.type_descriptor(Numeric(asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if not isinstance(value, Decimal):
            raise TypeError(f"ExactDecimal needs a Decimal, got {type(value).__name__}")
        if dialect.name == "sqlite":
            return format(value, "f")
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        return value if isinstance(value, Decimal) else Decimal(str(value))


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware timestamps stored in UTC on every backend."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; give a timezone")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        stamp: datetime = value
        if stamp.tzinfo is None:
            return stamp.replace(tzinfo=UTC)
        return stamp.astimezone(UTC)


def is_postgres(target: AsyncEngine | AsyncConnection) -> bool:
    return target.dialect.name == "postgresql"


def make_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    """An engine tuned for creditwatch's access pattern (short write transactions)."""
    if url.startswith("sqlite"):
        _ensure_sqlite_dir(url)
        engine = create_async_engine(url, connect_args={"timeout": 30})
        _configure_sqlite(engine)
        return engine
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        # No pre-ping: it costs a round trip on every checkout of the credit-check hot path.
        # After a database restart the first use of a dead connection fails, and SQLAlchemy
        # then invalidates the whole pool; recycling bounds how stale a connection can get.
        pool_recycle=1800,
        # asyncpg caches prepared statements per connection; the hot path reuses them.
        connect_args={
            "server_settings": {"application_name": "creditwatch"},
            # A database that stops answering without closing its connections (a network
            # partition) must fail a statement, not hang it: then the loops retry with
            # back-off and the API answers 503 instead of holding requests forever.
            "timeout": 10,  # connecting
            "command_timeout": 60,  # any one statement
        },
        pool_timeout=10,  # waiting for a free connection
    )


def _ensure_sqlite_dir(url: str) -> None:
    path = url.split("///", 1)[-1] if "///" in url else ""
    if path and path != ":memory:" and not path.startswith("file:"):
        Path(os.path.dirname(os.path.abspath(path))).mkdir(parents=True, exist_ok=True)


def _configure_sqlite(engine: AsyncEngine) -> None:
    """WAL, a busy timeout, and BEGIN IMMEDIATE so writers serialise instead of deadlocking."""

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the driver so that we can say BEGIN IMMEDIATE.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
