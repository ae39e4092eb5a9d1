"""Wiring of the assessment service: settings, engine, event core, loops, routes, gauges."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from services.assessment import store
from services.assessment.api import build_router
from services.assessment.handlers import AssessmentService
from shared import metrics
from shared.auth import TokenRegistry
from shared.db import make_engine
from shared.http import create_app
from shared.policy import Policy, load_policy
from shared.runtime import Clock, EventCore, utcnow, wait_or_stop
from shared.service import ServiceHost
from shared.settings import Settings

log = logging.getLogger("creditwatch.assessment")
NAME = "assessment"
UNRATED = "unrated"


def build(settings: Settings, *, tokens: TokenRegistry, policy: Policy | None = None,
          consume: bool = True, clock: Clock = utcnow) -> tuple[FastAPI, ServiceHost]:
    policy = policy or load_policy(settings.policy)
    engine = make_engine(settings.database_url_for(NAME))
    service = AssessmentService(settings, policy)
    core = EventCore(service, engine, dlq_topic=settings.topic_dlq, clock=clock,
                     topic_of_type=settings.topic_of_type())
    host = ServiceHost(service, settings, engine, core, consume=consume, clock=clock)
    gauges = GradeGauges(host, policy)

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


class GradeGauges:
    """Customers per grade for Prometheus, refreshed every few seconds (not per event)."""

    def __init__(self, host: ServiceHost, policy: Policy, interval: float = 5.0) -> None:
        self.host = host
        self.policy = policy
        self.interval = interval

    async def refresh(self) -> None:
        async with self.host.engine.connect() as conn:
            counts = await store.customers_by_grade(conn)
        # Every grade of the policy is set, so a grade nobody holds any more reads 0.
        by_label = {grade.name: 0 for grade in self.policy.grades} | {UNRATED: 0}
        for grade, count in counts.items():
            label = grade or UNRATED
            by_label[label] = by_label.get(label, 0) + count
        for label, count in by_label.items():
            metrics.CUSTOMERS.labels(label).set(count)

    async def run(self) -> None:
        while not self.host.stop.is_set():
            try:
                await self.refresh()
            except Exception as exc:
                log.debug("grade gauges not refreshed: %s", exc)
            if await wait_or_stop(self.host.stop, self.interval):
                return
