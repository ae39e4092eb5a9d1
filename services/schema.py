"""Migrations per service (``creditwatch db upgrade``), with Alembic driven from code."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db import make_engine

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(service: str, url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", str(MIGRATIONS / "versions" / service))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.set_main_option("service", service)
    cfg.attributes["service"] = service
    return cfg


async def upgrade(engine: AsyncEngine, service: str, revision: str = "head") -> bool:
    """Bring the service's tables in this database to the newest schema (or ``revision``).

    Returns whether a migration applied now changed the layout of the projections
    (``REBUILD = True`` in its module): they must then be rebuilt from the event store
    (``creditwatch db upgrade`` replays them). One process migrates a database at a time
    (a PostgreSQL advisory lock): replicas that start together wait, then find nothing to
    do."""
    async with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(
                text("SELECT pg_advisory_lock(hashtext(:k))"),
                {"k": f"creditwatch-migrate-{service}"},
            )
        try:
            before = await conn.run_sync(lambda c: _current(c, service))
            await conn.commit()
            await _migrate(engine, service, command.upgrade, revision)
            async with engine.connect() as check:
                after = await check.run_sync(lambda c: _current(c, service))
        finally:
            if conn.dialect.name == "postgresql":
                await conn.execute(
                    text("SELECT pg_advisory_unlock(hashtext(:k))"),
                    {"k": f"creditwatch-migrate-{service}"},
                )
                await conn.commit()
    return before is not None and any(
        getattr(module, "REBUILD", False) for module in _applied(service, before, after)
    )


def _current(sync_conn: Connection, service: str) -> str | None:
    context = MigrationContext.configure(
        sync_conn, opts={"version_table": f"alembic_version_{service}"}
    )
    return context.get_current_revision()


def _applied(service: str, before: str | None, after: str | None) -> list[Any]:
    """The migration modules between ``before`` (excluded) and ``after``."""
    if after is None or before == after:
        return []
    scripts = ScriptDirectory.from_config(alembic_config(service, "sqlite://"))
    return [rev.module for rev in scripts.iterate_revisions(after, before)]


async def downgrade(engine: AsyncEngine, service: str, revision: str) -> None:
    """Take the service's tables back to ``revision``."""
    await _migrate(engine, service, command.downgrade, revision)


async def _migrate(engine: AsyncEngine, service: str, step: Any, revision: str) -> None:
    def _go(sync_conn: object) -> None:
        cfg = alembic_config(service, str(engine.url))
        cfg.attributes["connection"] = sync_conn
        step(cfg, revision)

    async with engine.begin() as conn:
        await conn.run_sync(_go)


def upgrade_url(url: str, service: str) -> bool:
    """``upgrade`` on a URL; returns whether the projections must be rebuilt."""

    async def _run() -> bool:
        engine = make_engine(url)
        try:
            return await upgrade(engine, service)
        finally:
            await engine.dispose()

    return asyncio.run(_run())


def revision(service: str, url: str, message: str) -> None:
    """Autogenerate a migration for one service (developers: scripts/new-migration)."""
    cfg = alembic_config(service, url)
    command.revision(cfg, message=message, autogenerate=True)


def pending(url: str, service: str) -> tuple[str | None, str]:
    """(the database's revision, the newest) for the service: equal when up to date."""

    async def _run() -> str | None:
        engine = make_engine(url)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(lambda c: _current(c, service))
        finally:
            await engine.dispose()

    head = ScriptDirectory.from_config(alembic_config(service, "sqlite://")).get_current_head()
    return asyncio.run(_run()), head or ""
