"""A replay folded by several processes (``shared.parallel``), on the real PostgreSQL server.

The store is the PostgreSQL database golden stream 11 wrote in layout v1
(``tests/fixtures/layout_v1``), restored and upgraded as ``creditwatch db upgrade`` does: all
three services, with every hard ledger case of the golden streams. A parallel replay must
write exactly the rows a single process folds, and a replay that cannot finish (a worker
killed, events stored meanwhile) must say so and leave the projections as they were.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from harness import servers
from shared import eventstore as es
from shared import parallel
from shared.parallel import ReplayError
from shared.runtime import EventCore, Record, dump_rows
from shared.settings import Settings
from tests.integration.test_upgrade_from_v1 import FIXTURES, ROOT, restore
from tools import registry

pytestmark = pytest.mark.integration

SERVICES = ("limits", "assessment", "alerts")


@pytest.fixture
async def store(postgres_server_url: str, tmp_path: Path) -> str:
    url = servers.create_database(postgres_server_url)
    await asyncio.to_thread(restore, FIXTURES / "postgresql.sql.gz", url, tmp_path)
    settings = Settings(database_url=url)
    await asyncio.to_thread(registry.upgrade, settings, list(SERVICES))
    return url


@pytest.fixture
async def cores(store: str) -> AsyncIterator[dict[str, EventCore]]:
    settings = Settings(database_url=store)
    built = {name: registry.core_for(name, settings) for name in SERVICES}
    yield {name: core for name, (core, _) in built.items()}
    for _, engine in built.values():
        await engine.dispose()


async def projections(core: EventCore) -> dict[str, set[str]]:
    async with core.engine.connect() as conn:
        return await dump_rows(conn, core.service.projection_tables)


def note(seen: list[tuple[int, int]], done: int, total: int) -> None:
    seen.append((done, total))


async def first_worker() -> multiprocessing.process.BaseProcess:
    for _ in range(3000):
        children = multiprocessing.active_children()
        if children:
            return children[0]
        await asyncio.sleep(0.01)
    raise AssertionError("no replay worker started within 30 s")


async def leftover_schemas(core: EventCore) -> list[str]:
    async with core.engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'creditwatch_replay_%'")
        )
        return [r[0] for r in rows]


async def test_given_a_populated_store_when_replayed_by_three_workers_then_every_projection_is_what_one_process_folds(
    cores: dict[str, EventCore],
) -> None:
    for name, core in cores.items():
        ev = core.service.core.events
        async with core.engine.connect() as conn:
            total = await es.count_events(conn, core.service.core)
            shares = dict(
                list(
                    await conn.execute(
                        select(es.share_of(ev.c.subject, 3), func.count()).group_by(text("1"))
                    )
                )
            )
        # The shares split the customers three ways and cover every event.
        assert sorted(shares) == [0, 1, 2] and sum(shares.values()) == total > 100, (name, shares)

        assert await core.replay(jobs=1) == total
        single = await projections(core)
        assert sum(len(rows) for rows in single.values()) > 0, name
        seen: list[tuple[int, int]] = []
        assert await core.replay(functools.partial(note, seen), jobs=3) == total
        assert await projections(core) == single, name
        assert seen and seen[-1] == (total, total), name

        assert await core.verify(jobs=3) == [], name
        assert await core.verify() == [], name
        assert await leftover_schemas(core) == [], name


async def test_given_a_parallel_verify_when_a_projection_row_is_off_then_it_names_that_row(
    cores: dict[str, EventCore],
) -> None:
    core = cores["limits"]
    table = core.service.customers
    async with core.engine.begin() as conn:
        victim = (await conn.execute(select(table.c.customer_id).limit(1))).scalar_one()
        await conn.execute(table.delete().where(table.c.customer_id == victim))
    diffs = await core.verify(jobs=2)
    assert diffs and all(table.name in d and "not stored" in d for d in diffs), diffs
    assert any(victim in d for d in diffs)
    assert await core.verify() == diffs
    assert await leftover_schemas(core) == []


async def test_given_a_parallel_replay_when_a_worker_is_killed_then_it_fails_saying_so_and_the_projections_are_unchanged(
    cores: dict[str, EventCore],
) -> None:
    core = cores["assessment"]
    before = await projections(core)
    running = asyncio.create_task(core.replay(jobs=2))
    victim = await first_worker()
    os.kill(victim.pid or 0, signal.SIGKILL)
    with pytest.raises(ReplayError, match=r"died \(exit code -9\); the projections are unchanged"):
        await running
    assert await projections(core) == before
    assert await leftover_schemas(core) == []
    assert not multiprocessing.active_children()


async def test_given_a_parallel_replay_when_events_are_stored_while_it_runs_then_it_fails_saying_so_and_the_projections_are_unchanged(
    cores: dict[str, EventCore],
) -> None:
    core = cores["limits"]
    async with core.engine.connect() as conn:
        customer = (
            await conn.execute(select(core.service.core.events.c.subject).limit(1))
        ).scalar_one()
    running = asyncio.create_task(core.replay(jobs=2))
    await first_worker()
    # A live batch lands after the replay's snapshot: an invoice for a known customer.
    value = (
        '{"specversion":"1.0","id":"late-invoice","source":"erp","type":"invoice.issued",'
        f'"subject":"{customer}","time":"2026-06-01T00:00:00Z",'
        '"datacontenttype":"application/json","data":{"invoice_id":"INV-LATE",'
        f'"customer_id":"{customer}","amount":"125.00","currency":"EUR",'
        '"issue_date":"2026-06-01","due_date":"2026-07-01"}}'
    )
    result = await core.process_records(
        [Record("ar.invoices", 0, 10**9, customer.encode(), value.encode())]
    )
    assert result.applied == 1, result
    after_batch = await projections(core)
    with pytest.raises(ReplayError, match="1 events were stored while the replay ran"):
        await running
    assert await projections(core) == after_batch
    assert await leftover_schemas(core) == []
    # Run again, it converges: the late invoice is folded like any other.
    await core.replay(jobs=2)
    assert await core.verify() == []


async def replay_sessions(core: EventCore) -> int:
    async with core.engine.connect() as conn:
        return int(
            (
                await conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE application_name = 'creditwatch-replay'"
                    )
                )
            ).scalar_one()
        )


async def test_given_a_parallel_replay_when_its_coordinator_is_killed_then_its_workers_stop_nothing_is_swapped_in_and_the_next_replay_cleans_up(
    store: str, cores: dict[str, EventCore]
) -> None:
    core = cores["limits"]
    table = core.service.customers
    # A row the replay would bring back: still missing after the kill, nothing was swapped.
    async with core.engine.begin() as conn:
        victim = (await conn.execute(select(table.c.customer_id).limit(1))).scalar_one()
        await conn.execute(table.delete().where(table.c.customer_id == victim))
    before = await projections(core)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDITWATCH_")}
    env["CREDITWATCH_DATABASE_URL"] = store
    cli = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "tools.cli", "replay", "limits", "--jobs", "2"],
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        # Killed once a worker has connected (the lock and the snapshot are two sessions).
        for _ in range(3000):
            if await replay_sessions(core) >= 3 or cli.returncode is not None:
                break
            await asyncio.sleep(0.01)
        assert cli.returncode is None, await cli.stderr.read() if cli.stderr else ""
        cli.send_signal(signal.SIGKILL)
        await asyncio.wait_for(cli.wait(), 10)
    finally:
        if cli.returncode is None:
            cli.kill()
            await cli.wait()
    for _ in range(200):  # its workers see their coordinator gone and stop
        if await replay_sessions(core) == 0:
            break
        await asyncio.sleep(0.05)
    assert await replay_sessions(core) == 0
    assert await projections(core) == before
    assert len(await leftover_schemas(core)) == 1  # what the killed run made

    await core.replay(jobs=2)  # drops it, and brings the row back
    assert await leftover_schemas(core) == []
    assert await core.verify() == []


async def test_given_a_parallel_replay_running_when_another_starts_then_it_is_refused(
    cores: dict[str, EventCore], store: str
) -> None:
    core = cores["alerts"]
    other, engine = registry.core_for("alerts", Settings(database_url=store))
    try:
        first = asyncio.create_task(core.replay(jobs=2))
        await first_worker()
        with pytest.raises(ReplayError, match="another replay or verify of alerts is running"):
            await other.verify(jobs=2)
        await first
    finally:
        await engine.dispose()
    assert await core.verify(jobs=2) == []


def _never_built() -> None:
    time.sleep(120)  # a worker still starting when its coordinator dies


def _coordinator(pipe: Connection) -> None:
    """Start one worker, say its pid, and wait to be killed."""
    ctx = multiprocessing.get_context("spawn")
    counts, results = ctx.Array("q", 1, lock=False), ctx.Queue()  # held while it starts
    worker = ctx.Process(
        target=parallel._work,
        args=(
            parallel.Task(
                factory=_never_built,
                url="postgresql+asyncpg://nobody@127.0.0.1:1/none",
                schema="creditwatch_replay_x_0",
                live_schema="public",
                snapshot="snapshot",
                share=(0, 1),
                now=datetime.now(UTC),
            ),
            counts,
            results,
        ),
    )
    worker.start()
    pipe.send(worker.pid)
    time.sleep(120)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_given_a_replay_worker_when_its_coordinator_is_killed_then_it_stops_within_a_second() -> (
    None
):
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    coordinator = ctx.Process(target=_coordinator, args=(theirs,))
    coordinator.start()
    try:
        assert ours.poll(60), "the coordinator said nothing"
        worker = ours.recv()
        time.sleep(3)  # the worker has started and waits in its service's factory
        assert _running(worker)
    finally:
        os.kill(coordinator.pid or 0, signal.SIGKILL)
        coordinator.join(10)
    deadline = time.monotonic() + 5
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(worker), "an orphaned replay worker kept running"
