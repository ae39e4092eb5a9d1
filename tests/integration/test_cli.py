"""The operator commands as an operator runs them: ``db upgrade``, ``replay``, ``verify``."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from harness import factories as f
from services.limits import store
from services.limits.handlers import LimitsService
from shared.db import make_engine
from shared.policy import load_policy
from shared.runtime import EventCore
from shared.settings import Settings

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def creditwatch(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDITWATCH_")}
    env["CREDITWATCH_DATABASE_URL"] = url
    return subprocess.run(
        [sys.executable, "-m", "tools.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def fill(url: str) -> None:
    engine = make_engine(url)
    settings = Settings()
    core = EventCore(
        LimitsService(settings, load_policy(None)), engine, topic_of_type=settings.topic_of_type()
    )
    await core.process_records(
        f.records(
            [
                f.customer("C1"),
                f.invoice("C1", "I1", "100.00"),
                f.payment("C1", "P1", "40.00"),
                f.customer("C2"),
                f.invoice("C2", "I2", "7.50"),
            ]
        )
    )
    await engine.dispose()


async def tamper(url: str) -> None:
    engine = make_engine(url)
    async with engine.begin() as conn:
        await conn.execute(
            update(store.customers)
            .where(store.customers.c.customer_id == "C1")
            .values(max_days_overdue=999)
        )
    await engine.dispose()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_upgrade_replay_and_verify_from_the_command_line(kind, tmp_path, request):
    if kind == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path}/{{service}}.db"
        limits_url = url.format(service="limits")
    else:
        from harness import servers

        url = limits_url = servers.create_database(request.getfixturevalue("postgres_server_url"))
    # Given a migrated database with some consumed events
    upgraded = creditwatch("db", "upgrade", url=url)
    assert upgraded.returncode == 0, upgraded.stderr
    assert "limits" in upgraded.stdout and "assessment" in upgraded.stdout
    asyncio.run(fill(limits_url))

    # Then the projections match a replay
    ok = creditwatch("verify", "limits", url=url)
    assert ok.returncode == 0, ok.stderr
    assert "match" in ok.stdout

    # When a projection drifts, verify says so and fails
    asyncio.run(tamper(limits_url))
    drift = creditwatch("verify", "limits", url=url)
    assert drift.returncode == 1
    assert "limits_customers" in drift.stdout

    # And replay repairs it from the event store
    replayed = creditwatch("replay", "limits", url=url)
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 5 events" in replayed.stdout
    assert creditwatch("verify", "limits", url=url).returncode == 0


def test_an_unknown_service_is_refused_with_the_choices(tmp_path):
    result = creditwatch("verify", "billing", url=f"sqlite+aiosqlite:///{tmp_path}/x.db")
    assert result.returncode == 2
    assert "assessment, limits, alerts" in result.stderr


def test_serve_stops_gracefully_on_sigterm_and_exits_zero(tmp_path, request):
    from harness import servers
    from harness.processes import ServiceProcess, service_env

    # Given a running limits service on real PostgreSQL and Kafka
    url = servers.create_database(request.getfixturevalue("postgres_server_url"))
    env = service_env(database_url=url, bootstrap=request.getfixturevalue("kafka_bootstrap"))
    proc = ServiceProcess("limits", env, tmp_path)
    proc.start().wait_ready(90)
    # When it is asked to stop, then it finishes cleanly with exit code 0
    assert proc.stop() == 0, proc.tail()
    assert "Application shutdown complete" in proc.tail()


def test_given_offsets_of_another_log_when_shown_and_reset_then_the_operator_sees_and_moves_them(
    postgres_server_url: str, kafka_bootstrap: str
) -> None:
    """The tool NewLogError names: see where a service's stored positions are against the
    broker's log, and move them (only with --yes)."""
    import uuid

    from harness import e2e as e2e
    from harness.servers import create_database
    from shared import eventstore as es

    url = create_database(postgres_server_url)
    assert creditwatch("db", "upgrade", url=url).returncode == 0
    prefix = f"off{uuid.uuid4().hex[:6]}"
    asyncio.run(e2e.create_topics(kafka_bootstrap, prefix, partitions=1))
    topic = f"{prefix}.ar.invoices"

    async def store_foreign() -> None:
        engine = make_engine(url)
        async with engine.begin() as conn:
            await es.store_offsets(conn, store.core, {(topic, 0): 7}, f.T0, "gone-cluster")
        await engine.dispose()

    asyncio.run(store_foreign())
    env = {**e2e.topic_env(prefix), "CREDITWATCH_KAFKA_BOOTSTRAP": kafka_bootstrap}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("CREDITWATCH_")}
        return subprocess.run(
            [sys.executable, "-m", "tools.cli", *args],
            env={**clean, **env, "CREDITWATCH_DATABASE_URL": url},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    shown = run("offsets", "show", "limits")
    assert shown.returncode == 0, shown.stderr
    assert f"{topic}/0: stored 7" in shown.stdout and "ANOTHER LOG" in shown.stdout
    dry = run("offsets", "reset", "limits", "--to", "beginning", "--topic", topic)
    assert dry.returncode == 0 and "nothing changed" in dry.stdout
    done = run("offsets", "reset", "limits", "--to", "beginning", "--topic", topic, "--yes")
    assert done.returncode == 0, done.stderr

    async def positions() -> Any:
        engine = make_engine(url)
        async with engine.connect() as conn:
            stored = await es.load_positions(conn, store.core, [(topic, 0)])
        await engine.dispose()
        return stored[(topic, 0)]

    after = asyncio.run(positions())
    assert after.next_offset == 0 and after.cluster_id not in (None, "gone-cluster")
    assert "ANOTHER LOG" not in run("offsets", "show", "limits").stdout
