"""Migrations per service (``creditwatch db upgrade``), with Alembic driven from code."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
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


async def upgrade(engine: AsyncEngine, service: str, revision: str = "head") -> None:
    """Bring the service's tables in this database to the newest schema (or ``revision``)."""
    await _migrate(engine, service, command.upgrade, revision)


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


def upgrade_url(url: str, service: str) -> None:
    async def _run() -> None:
        engine = make_engine(url)
        try:
            await upgrade(engine, service)
        finally:
            await engine.dispose()

    asyncio.run(_run())


def revision(service: str, url: str, message: str) -> None:
    """Autogenerate a migration for one service (developers: scripts/new-migration)."""
    cfg = alembic_config(service, url)
    command.revision(cfg, message=message, autogenerate=True)
