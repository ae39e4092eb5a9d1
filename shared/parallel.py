"""A replay (and a verify) folded by several processes at once, on PostgreSQL.

A service's fold is per customer: no customer's state depends on another's. So the
customers are split into ``jobs`` disjoint shares by a hash of their id, and each share is
folded by a process of its own, all reading one snapshot of the event store:

1. Shadow tables, one per projection table, are made in a schema of their own
   (``CREATE UNLOGGED TABLE … (LIKE …)``: the same columns, keys and indexes).
2. One transaction (REPEATABLE READ) exports its snapshot and counts the events in it.
3. Each worker imports that snapshot, puts the shadow schema first on its ``search_path``
   (the service's own statements, unchanged, then write the shadow tables and still read
   the event store) and folds its share's events in store order, as ``replay`` does.
4. ``replay``: one transaction locks the event store against appends, checks it holds the
   same events as the snapshot, and replaces every projection table's rows with the shadow
   table's. ``verify``: the projections as of the snapshot are compared with the shadow
   tables. Either way the shadow schema is dropped.

The projections are untouched until step 4 commits: a worker that fails or is killed, or
events stored while it ran, leave them as they were, with an error that says so.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import MetaData, Table, delete, func, insert, select, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

if TYPE_CHECKING:
    from shared.runtime import EventCore


log = logging.getLogger("creditwatch.replay")


class ReplayError(RuntimeError):
    """A parallel replay did not complete; the projections are as they were."""


async def replay(
    core: EventCore, jobs: int, progress: Callable[[int, int], None] | None = None
) -> int:
    """Fold the event store in ``jobs`` processes and replace the projections with the
    result, in one transaction; returns the number of events folded."""
    async with _Run(core, jobs) as run:
        folded = await run.fold(progress)
        await run.swap()
        return folded


async def verify(core: EventCore, jobs: int) -> list[str]:
    """Compare the projections, as of one snapshot, with a parallel fold of that snapshot."""
    from shared.runtime import differences, dump_rows

    async with _Run(core, jobs) as run:
        await run.fold(None)
        assert run.snapshot_conn is not None
        before = await dump_rows(run.snapshot_conn, run.tables)
        async with run.engine.connect() as conn:
            after = await dump_rows(conn, run.shadows)  # the same names, in another schema
        return differences(before, after)


class _Run:
    """One parallel fold: its shadow schema, its snapshot and its workers."""

    def __init__(self, core: EventCore, jobs: int) -> None:
        if core.service_factory is None:
            raise ValueError("a parallel replay needs the service's factory")
        self.core = core
        self.jobs = jobs
        # Connections of its own, without the services' statement timeout: copying a large
        # store's rows into the projections is one statement that may take minutes.
        self.engine: AsyncEngine = _engine(core.engine.url)
        self.tables: Sequence[Table] = core.service.projection_tables
        # One service's shadow schemas are named alike: a run finds what a killed one left.
        self.prefix = f"creditwatch_replay_{core.service.name}_"
        self.schema = f"{self.prefix}{secrets.token_hex(6)}"
        self.lock_conn: AsyncConnection | None = None
        meta = MetaData()
        self.shadows = [t.to_metadata(meta, schema=self.schema) for t in self.tables]
        self.live_schema = ""
        self.snapshot_conn: AsyncConnection | None = None
        self.events = 0
        self.last_seq = 0

    async def __aenter__(self) -> _Run:
        # One parallel replay or verify of a service at a time: it holds a session lock.
        self.lock_conn = lock = await self.engine.connect()
        key = f"creditwatch-replay:{self.core.service.name}"
        got = (
            await lock.execute(text("SELECT pg_try_advisory_lock(hashtext(:k))"), {"k": key})
        ).scalar_one()
        await lock.commit()
        if not got:
            await self._release()
            raise ReplayError(
                f"another replay or verify of {self.core.service.name} is running on this "
                "database; the projections are unchanged"
            )
        try:
            await self._prepare(lock)
        except BaseException:
            await self._release()
            raise
        return self

    async def _prepare(self, lock: AsyncConnection) -> None:
        """Drop what a killed run left; make this run's shadow tables."""
        quote = self.engine.dialect.identifier_preparer.quote
        # Shadow tables a killed run left behind (its workers stop with it).
        left = [
            r[0]
            for r in await lock.execute(
                text("SELECT nspname FROM pg_namespace WHERE starts_with(nspname, :p)"),
                {"p": self.prefix},
            )
        ]
        for name in left:
            await lock.execute(text(f"DROP SCHEMA {quote(name)} CASCADE"))
            log.warning("dropped the shadow tables %s a replay that was stopped left", name)
        await lock.commit()
        async with self.engine.begin() as conn:
            self.live_schema = (await conn.execute(text("SELECT current_schema()"))).scalar_one()
            await conn.execute(text(f"CREATE SCHEMA {quote(self.schema)}"))
            for table in self.tables:
                await conn.execute(
                    text(
                        f"CREATE UNLOGGED TABLE {quote(self.schema)}.{quote(table.name)} "
                        f"(LIKE {quote(self.live_schema)}.{quote(table.name)} "
                        "INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING INDEXES)"
                    )
                )

    async def __aexit__(self, *exc: object) -> None:
        if self.snapshot_conn is not None:
            await self.snapshot_conn.close()
            self.snapshot_conn = None
        quote = self.engine.dialect.identifier_preparer.quote
        try:
            async with self.engine.begin() as conn:
                await conn.execute(text(f"DROP SCHEMA IF EXISTS {quote(self.schema)} CASCADE"))
        finally:
            await self._release()

    async def _release(self) -> None:
        if self.lock_conn is not None:
            await self.lock_conn.close()  # its session lock goes with it
            self.lock_conn = None
        await self.engine.dispose()

    async def fold(self, progress: Callable[[int, int], None] | None) -> int:
        """Export a snapshot, fold each share in a worker process; returns events folded."""
        ev = self.core.service.core.events
        conn = await self.engine.connect()
        self.snapshot_conn = conn
        await conn.execution_options(isolation_level="REPEATABLE READ")
        await conn.begin()
        snapshot = (await conn.execute(text("SELECT pg_export_snapshot()"))).scalar_one()
        count, last = (await conn.execute(select(func.count(), func.max(ev.c.seq)))).one()
        self.events, self.last_seq = int(count), int(last or 0)
        ctx = multiprocessing.get_context("spawn")
        counts = ctx.Array("q", self.jobs, lock=False)
        results: Any = ctx.Queue()
        assert self.core.service_factory is not None
        task = Task(
            factory=self.core.service_factory,
            url=self.engine.url.render_as_string(hide_password=False),
            schema=self.schema,
            live_schema=self.live_schema,
            snapshot=snapshot,
            share=(0, self.jobs),
            now=self.core.clock(),
        )
        workers = [
            ctx.Process(
                target=_work,
                args=(replace(task, share=(share, self.jobs)), counts, results),
                name=f"creditwatch-replay-{share}",
                daemon=True,
            )
            for share in range(self.jobs)
        ]
        for w in workers:
            w.start()
        done: dict[int, int] = {}
        try:
            while len(done) < self.jobs:
                try:
                    share, folded, error = results.get_nowait()
                except queue.Empty:
                    for i, w in enumerate(workers):
                        if i not in done and w.exitcode is not None:
                            await asyncio.sleep(0.5)  # its last words may be on their way
                            if results.empty():
                                raise ReplayError(
                                    f"replay worker {i + 1} of {self.jobs} died "
                                    f"(exit code {w.exitcode}); the projections are unchanged"
                                ) from None
                    if progress:
                        progress(sum(counts), self.events)
                    await asyncio.sleep(0.1)
                    continue
                if error is not None:
                    raise ReplayError(
                        f"replay worker {share + 1} of {self.jobs} failed: {error}; "
                        "the projections are unchanged"
                    )
                done[share] = folded
        finally:
            for w in workers:
                if w.is_alive():
                    w.terminate()
            for w in workers:
                w.join(10)
        if progress:
            progress(self.events, self.events)
        return sum(done.values())

    async def swap(self) -> None:
        """Replace the projections' rows with the shadow tables', in one transaction, if the
        event store still holds exactly the events the workers folded."""
        ev = self.core.service.core.events
        if self.snapshot_conn is not None:
            await self.snapshot_conn.close()
            self.snapshot_conn = None
        quote = self.engine.dialect.identifier_preparer.quote
        async with self.engine.begin() as conn:
            # Appends wait until this commits; reads and credit checks do not.
            await conn.execute(text(f"LOCK TABLE {quote(ev.name)} IN SHARE MODE"))
            count, last = (await conn.execute(select(func.count(), func.max(ev.c.seq)))).one()
            if (int(count), int(last or 0)) != (self.events, self.last_seq):
                raise ReplayError(
                    f"{int(count) - self.events} events were stored while the replay ran "
                    "(its consumers or API are running); the projections are unchanged. "
                    "Stop the service and run the replay again."
                )
            for table in reversed(self.tables):
                await conn.execute(delete(table))
            for table, shadow in zip(self.tables, self.shadows, strict=True):
                await conn.execute(insert(table).from_select(list(table.c), select(shadow)))


@dataclass(frozen=True)
class Task:
    """What one worker folds: its share of the customers, from the coordinator's snapshot
    into the shadow schema (picklable: it crosses to a spawned process)."""

    factory: Callable[[], Any]  # builds the service
    url: str
    schema: str  # the shadow tables'
    live_schema: str  # the event store's
    snapshot: str  # pg_export_snapshot()
    share: tuple[int, int]  # (i, n)
    now: datetime  # the replay's clock, one for all workers


def _work(task: Task, counts: Any, results: Any) -> None:
    """A worker process: fold one share into the shadow tables; report (share, n, error)."""
    from shared.runtime import tune_gc

    tune_gc()
    # A worker stops with its coordinator: killed, it reads no result and swaps nothing in.
    coordinator = os.getppid()

    def orphaned() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != coordinator:
                os._exit(70)

    threading.Thread(target=orphaned, name="replay-orphan-watch", daemon=True).start()
    try:
        folded = asyncio.run(_fold_share(task, counts))
    except BaseException as exc:  # reported to the coordinator, which says so and stops
        from shared.runtime import _describe

        results.put((task.share[0], 0, _describe(exc)))
        return
    results.put((task.share[0], folded, None))


async def _fold_share(task: Task, counts: Any) -> int:
    from shared.runtime import EventCore

    # The service's statements name its tables unqualified: the projections resolve to the
    # shadow tables, the event store to the live schema.
    engine = _engine(task.url, search_path=f'"{task.schema}", "{task.live_schema}"')
    try:
        core = EventCore(task.factory(), engine)
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="REPEATABLE READ")
            async with conn.begin():
                await conn.exec_driver_sql(f"SET TRANSACTION SNAPSHOT '{task.snapshot}'")

                def step(done: int, _total: int) -> None:
                    counts[task.share[0]] = done

                return await core._refold(conn, step, share=task.share, now=task.now)
    finally:
        await engine.dispose()


def default_jobs(cgroup: Path = Path("/sys/fs/cgroup"), most: int = 8) -> int:
    """The processes a replay uses by default: the cores this process may run on (its CPU
    affinity, and a container's CPU limit: the cgroup's quota, v2 or v1), at most ``most``.
    ``os.cpu_count()`` is the host's: a pod limited to one core on a 32-core node would
    start 8 workers, each with its own memory."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    quota = _cpu_quota(cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, int(quota)))
    return max(1, min(cpus, most))


def _cpu_quota(cgroup: Path) -> float | None:
    """Cores the cgroup's CPU quota allows (None: no quota, or none to read)."""
    try:
        v2 = cgroup / "cpu.max"
        if v2.exists():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = cgroup / "cpu"
        quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
        period_us = int((v1 / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def _engine(url: str | URL, search_path: str | None = None) -> AsyncEngine:
    settings = {"application_name": "creditwatch-replay"}
    if search_path is not None:
        settings["search_path"] = search_path
    return create_async_engine(
        url, poolclass=NullPool, connect_args={"server_settings": settings, "timeout": 10}
    )


__all__ = ["ReplayError", "default_jobs", "replay", "verify"]
