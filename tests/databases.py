"""Fresh databases for tests: a SQLite file or a new PostgreSQL database, migrated by Alembic
exactly as ``creditwatch db upgrade`` does."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from harness import servers
from services.schema import upgrade
from shared.db import make_engine


def fresh_url(kind: str, *, tmp_path: Path, pg_server_url: str | None, name: str = "cw") -> str:
    if kind == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / f'{name}.db'}"
    assert pg_server_url is not None, "PostgreSQL tests need the postgres_server_url fixture"
    return servers.create_database(pg_server_url)


async def fresh_engine(
    kind: str, service: str, *, tmp_path: Path, pg_server_url: str | None
) -> AsyncEngine:
    engine = make_engine(
        fresh_url(kind, tmp_path=tmp_path, pg_server_url=pg_server_url, name=service)
    )
    await upgrade(engine, service)
    return engine


async def reset(engine: AsyncEngine, service: str) -> None:
    """Drop a service's tables (and its migration record), then migrate from scratch."""
    import importlib

    from sqlalchemy import text

    metadata = importlib.import_module(f"services.{service}.store").metadata
    async with engine.begin() as conn:
        await conn.run_sync(metadata.drop_all)
        await conn.execute(text(f"DROP TABLE IF EXISTS alembic_version_{service}"))
    await upgrade(engine, service)
