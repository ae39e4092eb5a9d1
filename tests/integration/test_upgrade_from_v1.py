"""Upgrading stores written by layout v1 (before issue 20's redesign): the SQLite files and a
PostgreSQL database populated by golden stream 11 (tests/fixtures/layout_v1/) are restored,
migrated by ``creditwatch db upgrade``, rebuilt from their event stores as documented
(``creditwatch replay <service>`` for each), verified (``creditwatch verify <service>``
exits 0 for each), and then answer over the API what the golden files of that stream hold
(less what ``tests/golden/allowed_differences.yaml`` allows, with its reasons)."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from harness import servers
from tests.golden import files, runner
from tests.golden import streams as st

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "layout_v1"
IDS = json.loads((FIXTURES / "ids.json").read_text())


def creditwatch(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDITWATCH_")}
    env["CREDITWATCH_DATABASE_URL"] = url
    return subprocess.run(
        [sys.executable, "-m", "tools.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def upgrade_and_rebuild(url: str) -> None:
    """The documented upgrade path: migrate, rebuild each service, verify each."""
    done = creditwatch("db", "upgrade", url=url)
    assert done.returncode == 0, done.stdout + done.stderr
    for service in runner.ORDER:
        # Two processes on PostgreSQL (shared.parallel); SQLite folds in one.
        replayed = creditwatch("replay", service, "--jobs", "2", url=url)
        assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    for service in runner.ORDER:
        verified = creditwatch("verify", service, "--jobs", "2", url=url)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert "match a replay" in verified.stdout


async def answers_as_recorded(url: str, made: dict[str, Any]) -> None:
    seed = IDS["seed"]
    stream = st.generate(seed)
    assert st.fingerprint(stream) == IDS["fingerprint"], "the fixtures hold another stream"
    clock = runner.Clock(stream.end)
    async with runner.services(url, clock, migrate=False) as nodes:
        checks = [(cid, check_id) for cid, check_id in made["checks"]]
        api = await runner.read_api(stream, nodes, clock, checks)
    actual = runner.api_files(api, made["names"])
    expected, _ = files.read(files.DATA / str(seed))
    expected = {name: value for name, value in expected.items() if name.startswith("api/")}
    assert actual.keys() == expected.keys()
    bad, _allowed = files.split(files.differences(seed, expected, actual), files.load_allowed())
    assert not bad, files.report(bad)


async def test_given_sqlite_stores_of_layout_v1_when_upgraded_and_rebuilt_then_verify_passes_and_the_api_answers_as_recorded(
    tmp_path: Path,
) -> None:
    for service in runner.ORDER:
        packed = FIXTURES / "sqlite" / f"{service}.db.gz"
        (tmp_path / f"{service}.db").write_bytes(gzip.decompress(packed.read_bytes()))
    url = f"sqlite+aiosqlite:///{tmp_path}/{{service}}.db"

    await asyncio.to_thread(upgrade_and_rebuild, url)

    await answers_as_recorded(url, IDS["sqlite"])


def restore(dump_gz: Path, url: str, tmp_path: Path) -> None:
    """Load a plain-SQL dump into the (empty) database at ``url`` with psql."""
    target = make_url(url)
    bindir = servers.find_postgres_bindir()
    assert bindir is not None, "PostgreSQL's client programs are not installed"
    dump = tmp_path / "layout_v1.sql"
    dump.write_bytes(gzip.decompress(dump_gz.read_bytes()))
    restored = subprocess.run(
        [
            str(bindir / "psql"),
            "--no-psqlrc",
            "--quiet",
            "--set=ON_ERROR_STOP=1",
            "--host",
            str(target.host),
            "--port",
            str(target.port),
            "--username",
            str(target.username or "postgres"),
            "--dbname",
            str(target.database),
            "--file",
            str(dump),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert restored.returncode == 0, restored.stderr


async def test_given_a_postgresql_database_of_layout_v1_when_upgraded_and_rebuilt_then_verify_passes_and_the_api_answers_as_recorded(
    postgres_server_url: str, tmp_path: Path
) -> None:
    url = servers.create_database(postgres_server_url)
    await asyncio.to_thread(restore, FIXTURES / "postgresql.sql.gz", url, tmp_path)

    await asyncio.to_thread(upgrade_and_rebuild, url)

    await answers_as_recorded(url, IDS["postgresql"])
