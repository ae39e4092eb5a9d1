"""The Alembic history of each service builds exactly the tables its code declares."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from tests.databases import fresh_engine

pytestmark = pytest.mark.integration
SERVICES = ["assessment", "limits", "alerts"]


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
@pytest.mark.parametrize("service", SERVICES)
async def test_migrations_produce_the_declared_schema(kind, service, tmp_path: Path, request):
    pg = request.getfixturevalue("postgres_server_url") if kind == "postgresql" else None
    engine = await fresh_engine(kind, service, tmp_path=tmp_path, pg_server_url=pg)
    metadata = importlib.import_module(f"services.{service}.store").metadata

    def diff(sync_conn):
        ctx = MigrationContext.configure(sync_conn, opts={
            "compare_type": True,
            "include_name": lambda name, kind, _parent: not (
                kind == "table" and name.startswith("alembic_version")),
        })
        return compare_metadata(ctx, metadata)

    async with engine.connect() as conn:
        differences = await conn.run_sync(diff)
    await engine.dispose()
    assert differences == []
