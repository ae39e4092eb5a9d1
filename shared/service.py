"""Hosting one service: its engine, event core and background loops behind a FastAPI app.

Every service's ``app.py`` builds a ``Service`` (tables, topics, handlers) and its routers;
this module runs the rest the same way for all three: consumer, outbox relay, scheduler,
readiness, graceful stop (finish the batch in hand, commit, leave the group).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, FastAPI
from sqlalchemy import Table, text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared import metrics
from shared.auth import TokenRegistry
from shared.db import make_engine
from shared.http import create_app
from shared.idempotency import IdempotencyStore, install_idempotency
from shared.problems import DEFAULT_MAX_BODY_BYTES
from shared.runtime import (
    BrokerWatch,
    Clock,
    ConsumerLoop,
    EventCore,
    OutboxRelay,
    Scheduler,
    Service,
    collect_garbage,
    report_outbox,
    run_all,
    utcnow,
    wait_or_stop,
)
from shared.settings import Settings
from shared.transient import is_transient, silence_repeated_client_logs

log = logging.getLogger("creditwatch.service")

# A gauge refresher: reads the service's tables and sets Prometheus gauges.
Refresh = Callable[[AsyncEngine], Awaitable[None]]
GAUGE_INTERVAL_S = 5.0
# A relay that has not managed a cycle for this long makes its process not ready.
RELAY_READY_GRACE_S = 10.0
# Expired idempotency keys are deleted this often; keys whose row could not be settled while
# the database was away are tried again every second.
IDEMPOTENCY_PURGE_INTERVAL_S = 60.0
IDEMPOTENCY_RETRY_INTERVAL_S = 1.0


@dataclass
class ServiceHost:
    """The running parts of one service, shared by its API routes and its loops."""

    service: Service
    settings: Settings
    engine: AsyncEngine
    core: EventCore
    consume: bool = True
    # False: another process of the service publishes this one's outbox (see OutboxRelay).
    publish: bool = True
    clock: Clock = utcnow
    consumer: ConsumerLoop | None = None
    relay: OutboxRelay | None = None
    scheduler: Scheduler | None = None
    broker: BrokerWatch | None = None
    gauges: Sequence[Refresh] = ()
    # The service's Idempotency-Key store (its table), kept tidy by a loop of its own.
    idempotency: IdempotencyStore | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    # Run on close, before the engine is disposed: whatever holds a connection of its own.
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _closing: bool = False

    def __post_init__(self) -> None:
        s = self.settings
        kwargs = s.kafka_client_kwargs()
        if self.consume or self.publish:
            self.broker = BrokerWatch(
                self.service.name,
                bootstrap=s.kafka_bootstrap,
                client_kwargs=kwargs,
                interval=s.broker_probe_interval_s,
            )
        if self.consume:
            self.consumer = ConsumerLoop(
                self.core,
                bootstrap=s.kafka_bootstrap,
                topics=self.service.input_topics(),
                group_id=f"{s.consumer_group_prefix}-{self.service.name}",
                client_kwargs=kwargs,
                max_records=s.consumer_max_records,
                poll_timeout_ms=s.consumer_poll_timeout_ms,
                session_timeout_ms=s.consumer_session_timeout_ms,
                heartbeat_interval_ms=s.consumer_heartbeat_interval_ms,
                broker=self.broker,
                on_new_log=s.on_new_log,
            )
            self.scheduler = Scheduler(self.core, interval=s.scheduler_interval_s)
        if self.publish:
            self.relay = OutboxRelay(
                self.core,
                bootstrap=s.kafka_bootstrap,
                client_kwargs=kwargs,
                poll_interval=s.outbox_poll_interval_s,
                linger=s.outbox_linger_ms / 1000,
                interval=s.outbox_interval_ms / 1000,
                takeover=s.outbox_takeover_s,
                idempotent=s.idempotent_producer,
            )

    async def start(self) -> None:
        silence_repeated_client_logs()
        metrics.describe_build()
        policy = getattr(self.service, "policy", None)
        if policy is not None:
            metrics.POLICY.labels(self.service.name, policy.version).set(1)
        jobs: list[Callable[[asyncio.Event], Any]] = []
        names: list[str] = []
        for name, loop in (
            ("broker-watch", self.broker),
            ("consumer", self.consumer),
            ("relay", self.relay),
            ("scheduler", self.scheduler),
        ):
            if loop is not None:
                jobs.append(loop.run)
                names.append(name)
        for n, refresh in enumerate(self.gauges):
            jobs.append(functools.partial(self._refresh_every, refresh))
            names.append(f"gauges-{n}")
        if self.idempotency is not None:
            jobs.append(functools.partial(self._tidy_idempotency, self.idempotency))
            names.append("idempotency")
        jobs.append(functools.partial(report_outbox, self.core))
        names.append("outbox-gauges")
        jobs.append(collect_garbage)
        names.append("gc")
        self._task = asyncio.create_task(
            run_all(self.stop, *jobs, names=names, service=self.service.name)
        )

    async def _refresh_every(self, refresh: Refresh, stop: asyncio.Event) -> None:
        """Gauges computed from the tables every few seconds, not on the hot paths."""
        while not stop.is_set():
            try:
                await refresh(self.engine)
            except Exception as exc:
                log.debug("%s: gauges not refreshed: %s", self.service.name, exc)
            if await wait_or_stop(stop, GAUGE_INTERVAL_S):
                return

    async def _tidy_idempotency(self, store: IdempotencyStore, stop: asyncio.Event) -> None:
        """Expired keys deleted, keys left unsettled by an outage settled; every replica does
        it (deleting what another already deleted costs nothing). Never ends on an error: a
        key table that is not tidied only grows, and the next round tries again."""
        next_purge = time.monotonic()
        while not stop.is_set():
            try:
                if store.pending:
                    await store.retry_pending(self.clock())
                if time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + IDEMPOTENCY_PURGE_INTERVAL_S
                    purged = await store.purge(self.clock())
                    if purged:
                        log.debug(
                            "%s: %d expired idempotency keys deleted", self.service.name, purged
                        )
            except Exception as exc:
                if is_transient(exc):
                    log.debug("%s: idempotency keys not tidied: %s", self.service.name, exc)
                else:
                    log.exception("%s: idempotency keys not tidied", self.service.name)
            if await wait_or_stop(stop, IDEMPOTENCY_RETRY_INTERVAL_S):
                return

    async def close(self) -> None:
        """Stop the loops (the batch in hand committed, the group left, the relay's last
        cycle), within ``shutdown_timeout_s`` even with the database and the broker
        unreachable: what is not done by then is cancelled (nothing uncommitted counts)."""
        self._closing = True
        self.stop.set()
        budget = self.settings.shutdown_timeout_s
        deadline = time.monotonic() + budget
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=budget)
            except TimeoutError:
                log.warning(
                    "%s: background loops did not stop within %.0fs; cancelled",
                    self.service.name,
                    budget,
                )
                self._task.cancel()
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(self._task, timeout=1.0)
            except Exception:
                pass  # already reported when the loop ended
        for close in self.closers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(close(), timeout=max(deadline - time.monotonic(), 0.5))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                self.engine.dispose(), timeout=max(deadline - time.monotonic(), 0.5)
            )

    def fatal(self) -> str | None:
        """Why the background loops stopped for good, or None while they run (liveness)."""
        task = self._task
        if task is None or not task.done() or self._closing:
            return None
        exc = task.exception() if not task.cancelled() else None
        return f"{type(exc).__name__}: {exc}" if exc is not None else "stopped"

    async def readiness(self) -> dict[str, bool]:
        checks = {"database": False}
        try:
            async with asyncio.timeout(3.0), self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            checks["database"] = True
        except Exception as exc:
            log.debug("readiness: database unreachable: %s", exc)
        if self.broker is not None:
            # The broker is this process's concern only if it consumes or publishes.
            checks["broker"] = self.broker.reachable
        if self.consumer is not None:
            checks["consumer_assigned"] = self.consumer.assigned.is_set() and self.consumer.healthy
        if self.relay is not None and self.relay.failing_for > RELAY_READY_GRACE_S:
            checks["outbox"] = False
        if self._task is not None and self._task.done():
            checks["loops"] = False
        return checks

    def lifespan(self) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
        @contextlib.asynccontextmanager
        async def _lifespan(_app: FastAPI) -> AsyncIterator[None]:
            await self.start()
            try:
                yield
            finally:
                await self.close()

        return _lifespan


def build_service_app(
    name: str,
    service: Service,
    settings: Settings,
    *,
    tokens: TokenRegistry,
    router: Callable[[EventCore], APIRouter],
    consume: bool = True,
    relay: bool = True,
    clock: Clock = utcnow,
    gauges: Sequence[Refresh] = (),
) -> tuple[FastAPI, ServiceHost]:
    """The same wiring for every service: engine, event core, loops, routes, gauges."""
    engine = make_engine(settings.database_url_for(name))
    core = EventCore(
        service,
        engine,
        dlq_topic=settings.topic_dlq,
        clock=clock,
        topic_of_type=settings.topic_of_type(),
    )
    keys = IdempotencyStore(
        engine,
        idempotency_table_of(service),
        ttl=timedelta(hours=settings.idempotency_ttl_h),
    )
    host = ServiceHost(
        service,
        settings,
        engine,
        core,
        consume=consume,
        publish=relay,
        clock=clock,
        gauges=gauges,
        idempotency=keys,
    )
    app = create_app(
        name,
        settings=settings,
        tokens=tokens,
        readiness=host.readiness,
        lifespan=host.lifespan(),
        liveness=host.fatal,
    )
    app.include_router(router(core))
    # Outermost, in front of what the service adds later (the credit-check fast path).
    install_idempotency(
        app,
        store=keys,
        tokens=tokens,
        service=name,
        clock=clock,
        max_body_bytes=DEFAULT_MAX_BODY_BYTES,
    )
    # A completion or release still waiting for the database gets one more try on the way out.
    host.closers.append(lambda: keys.retry_pending(clock()))
    app.state.host = host
    return app, host


def idempotency_table_of(service: Service) -> Table:
    """The service's ``<name>_idempotency`` table, declared in its store's metadata."""
    name = f"{service.name}_idempotency"
    table = service.metadata.tables.get(name)
    if table is None:
        raise RuntimeError(
            f"{service.name}: its metadata declares no {name} table "
            "(shared.idempotency.idempotency_table)"
        )
    return table
