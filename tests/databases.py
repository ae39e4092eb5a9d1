"""Fresh databases for tests: a SQLite file or a new PostgreSQL database, migrated."""

from __future__ import annotations

from pathlib import Path

from services.schema import upgrade
from shared.db import make_engine
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.infra import servers


async def fresh_engine(kind: str, *, tmp_path: Path, pg_server_url: str | None) -> AsyncEngine:
    if kind == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'creditwatch.db'}"
    else:
        assert pg_server_url is not None
        url = servers.create_database(pg_server_url)
    engine = make_engine(url)
    await upgrade(engine)
    return engine


async def created_engine(kind: str, metadata: MetaData, *, tmp_path: Path,
                         pg_server_url: str | None) -> AsyncEngine:
    """Tables straight from the metadata (for core tests that need one service only)."""
    if kind == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'creditwatch.db'}"
    else:
        assert pg_server_url is not None
        url = servers.create_database(pg_server_url)
    engine = make_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    return engine
