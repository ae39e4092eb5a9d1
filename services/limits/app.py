"""Wiring of the limits service: settings, engine, event core, loops, routes, gauges."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from decimal import Decimal

from fastapi import FastAPI
from sqlalchemy import func, select

from services.limits import store
from services.limits.api import build_router
from services.limits.handlers import LimitsService
from shared import metrics
from shared.auth import TokenRegistry
from shared.db import make_engine
from shared.http import create_app
from shared.policy import Policy, load_policy
from shared.runtime import Clock, EventCore, utcnow, wait_or_stop
from shared.service import ServiceHost
from shared.settings import Settings

log = logging.getLogger("creditwatch.limits")
NAME = "limits"


def build(settings: Settings, *, tokens: TokenRegistry, policy: Policy | None = None,
          consume: bool = True, clock: Clock = utcnow) -> tuple[FastAPI, ServiceHost]:
    policy = policy or load_policy(settings.policy)
    engine = make_engine(settings.database_url_for(NAME))
    service = LimitsService(settings, policy)
    core = EventCore(service, engine, dlq_topic=settings.topic_dlq, clock=clock,
                     topic_of_type=settings.topic_of_type())
    host = ServiceHost(service, settings, engine, core, consume=consume, clock=clock)
    gauges = PortfolioGauges(host)

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


class PortfolioGauges:
    """Portfolio totals for Prometheus, refreshed every few seconds (not per request)."""

    def __init__(self, host: ServiceHost, interval: float = 5.0) -> None:
        self.host = host
        self.interval = interval

    async def refresh(self) -> None:
        c = store.customers
        async with self.host.engine.connect() as conn:
            rows = list(await conn.execute(select(c.c.currency, c.c.limit_amount, c.c.exposure)))
            over = (await conn.execute(select(func.count()).select_from(c)
                                       .where(c.c.over_limit.is_(True)))).scalar_one()
        exposure: dict[str, Decimal] = {}
        limits: dict[str, Decimal] = {}
        for r in rows:
            exposure[r.currency] = exposure.get(r.currency, Decimal(0)) + r.exposure
            limits[r.currency] = limits.get(r.currency, Decimal(0)) + r.limit_amount
        for ccy, amount in exposure.items():
            metrics.PORTFOLIO_EXPOSURE.labels(ccy).set(float(amount))
            metrics.PORTFOLIO_LIMIT.labels(ccy).set(float(limits[ccy]))
        metrics.CUSTOMERS_OVER_LIMIT.set(int(over))

    async def run(self) -> None:
        while not self.host.stop.is_set():
            try:
                await self.refresh()
            except Exception as exc:
                log.debug("portfolio gauges not refreshed: %s", exc)
            if await wait_or_stop(self.host.stop, self.interval):
                return
