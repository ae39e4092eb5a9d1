"""Wiring of the alerts service: settings, engine, event core, loops, routes, gauges."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from services.alerts import domain, store
from services.alerts.api import build_router
from services.alerts.handlers import AlertsService, count_raises_on_commit
from shared import metrics
from shared.auth import TokenRegistry
from shared.db import make_engine
from shared.http import create_app
from shared.policy import Policy, load_policy
from shared.runtime import Clock, EventCore, utcnow, wait_or_stop
from shared.service import ServiceHost
from shared.settings import Settings

log = logging.getLogger("creditwatch.alerts")
NAME = "alerts"


def build(settings: Settings, *, tokens: TokenRegistry, policy: Policy | None = None,
          consume: bool = True, clock: Clock = utcnow) -> tuple[FastAPI, ServiceHost]:
    policy = policy or load_policy(settings.policy)
    engine = make_engine(settings.database_url_for(NAME))
    count_raises_on_commit(engine)
    service = AlertsService(settings, policy)
    core = EventCore(service, engine, dlq_topic=settings.topic_dlq, clock=clock,
                     topic_of_type=settings.topic_of_type())
    host = ServiceHost(service, settings, engine, core, consume=consume, clock=clock)
    gauges = OpenAlertGauges(host)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with host.lifespan()(app):
            task = asyncio.create_task(gauges.run())
            try:
                yield
            finally:
                host.stop.set()
                with contextlib.suppress(Exception):
                    await task

    app = create_app(NAME, settings=settings, tokens=tokens, readiness=host.readiness,
                     lifespan=lifespan)
    app.include_router(build_router(service, core))
    app.state.host = host
    return app, host


class OpenAlertGauges:
    """``creditwatch_alerts_open{rule,severity}``, refreshed every few seconds from the table."""

    def __init__(self, host: ServiceHost, interval: float = 5.0) -> None:
        self.host = host
        self.interval = interval

    async def refresh(self) -> None:
        async with self.host.engine.connect() as conn:
            counts = await store.open_counts(conn)
        # Every known series is set, so one that drops to zero shows 0 rather than its last
        # value.
        keys = {(r, s) for r in domain.RULES for s in domain.SEVERITIES} | counts.keys()
        for rule, severity in sorted(keys):
            metrics.ALERTS_OPEN.labels(rule, severity).set(counts.get((rule, severity), 0))

    async def run(self) -> None:
        while not self.host.stop.is_set():
            try:
                await self.refresh()
            except Exception as exc:
                log.debug("open-alert gauges not refreshed: %s", exc)
            if await wait_or_stop(self.host.stop, self.interval):
                return
