"""Alembic environment. Each service has its own history (versions/<service>/) and its own
version table, so a service's database holds only its tables and migrates on its own."""

from __future__ import annotations

import asyncio
import importlib

from alembic import context
from sqlalchemy import MetaData
from sqlalchemy.engine import Connection

from shared.db import make_engine

config = context.config
service: str = config.attributes.get("service") or config.get_main_option("service") or ""
target: MetaData = importlib.import_module(f"services.{service}.store").metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target,
        version_table=f"alembic_version_{service}",
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _online() -> None:
    engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
    async with engine.connect() as conn:
        await conn.run_sync(_run)
        await conn.commit()
    await engine.dispose()


existing = config.attributes.get("connection")
if existing is not None:
    _run(existing)
elif context.is_offline_mode():
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target,
        version_table=f"alembic_version_{service}",
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_online())
