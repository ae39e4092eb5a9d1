"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.databases import fresh_engine


@pytest.fixture(params=["sqlite", "postgresql"])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """A fresh limits database, once on SQLite and once on PostgreSQL."""
    pg = request.getfixturevalue("postgres_server_url") if request.param == "postgresql" else None
    eng = await fresh_engine(request.param, "limits", tmp_path=tmp_path, pg_server_url=pg)
    yield eng
    await eng.dispose()
