"""Wiring of the limits service: its domain plugged into the shared service host."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from services.limits import store
from services.limits.api import build_router
from services.limits.checks import CreditChecks, for_dialect
from services.limits.fastpath import FastCreditCheck
from services.limits.handlers import LimitsService
from shared import metrics
from shared.auth import TokenRegistry
from shared.policy import Policy, load_policy
from shared.problems import DEFAULT_MAX_BODY_BYTES
from shared.runtime import Clock, EventCore, utcnow
from shared.service import ServiceHost, build_service_app
from shared.settings import Settings

NAME = "limits"


def build(
    settings: Settings,
    *,
    tokens: TokenRegistry,
    policy: Policy | None = None,
    consume: bool = True,
    relay: bool = True,
    clock: Clock = utcnow,
) -> tuple[FastAPI, ServiceHost]:
    service = LimitsService(settings, policy or load_policy(settings.policy))
    made: list[CreditChecks] = []

    def router(core: EventCore) -> APIRouter:
        made.append(for_dialect(core.engine.dialect.name, service, core))
        return build_router(service, core, made[0])

    app, host = build_service_app(
        NAME,
        service,
        settings,
        tokens=tokens,
        consume=consume,
        relay=relay,
        clock=clock,
        router=router,
        gauges=[refresh_portfolio_gauges],
    )
    host.closers.append(made[0].close)
    # Outermost: the plain credit checks skip the framework's layers (see fastpath.py).
    app.add_middleware(
        FastCreditCheck,
        checks=made[0],
        tokens=tokens,
        service=NAME,
        max_body_bytes=DEFAULT_MAX_BODY_BYTES,
    )
    return app, host


async def refresh_portfolio_gauges(engine: AsyncEngine) -> None:
    """Portfolio exposure and limits per currency, and customers over their limit.

    Summed by the database: a few rows come back whatever the number of customers. (Read row
    by row and summed here, it took 5 ms of this process's event loop every few seconds with
    1,000 customers, and would take half a second with 100,000: the credit checks answered
    on the same loop would wait for it.)"""
    c = store.customers
    async with engine.connect() as conn:
        rows = list(
            await conn.execute(
                select(
                    c.c.currency,
                    func.sum(c.c.limit_amount).label("limits"),
                    func.sum(c.c.exposure).label("exposure"),
                ).group_by(c.c.currency)
            )
        )
        over = (
            await conn.execute(select(func.count()).select_from(c).where(c.c.over_limit.is_(True)))
        ).scalar_one()
    for r in rows:
        # Gauges are floats by nature; the exact figures are in the API.
        metrics.PORTFOLIO_EXPOSURE.labels(r.currency).set(float(r.exposure))
        metrics.PORTFOLIO_LIMIT.labels(r.currency).set(float(r.limits))
    metrics.CUSTOMERS_OVER_LIMIT.set(int(over))
