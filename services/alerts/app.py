"""Wiring of the alerts service: its domain plugged into the shared service host."""

from __future__ import annotations

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from services.alerts import domain, store
from services.alerts.api import build_router
from services.alerts.handlers import AlertsService
from shared import metrics
from shared.auth import TokenRegistry
from shared.policy import Policy, load_policy
from shared.runtime import Clock, utcnow
from shared.service import ServiceHost, build_service_app
from shared.settings import Settings

NAME = "alerts"


def build(
    settings: Settings,
    *,
    tokens: TokenRegistry,
    policy: Policy | None = None,
    consume: bool = True,
    relay: bool = True,
    clock: Clock = utcnow,
) -> tuple[FastAPI, ServiceHost]:
    policy = policy or load_policy(settings.policy)
    service = AlertsService(settings, policy)
    app, host = build_service_app(
        NAME,
        service,
        settings,
        tokens=tokens,
        consume=consume,
        relay=relay,
        clock=clock,
        router=lambda core: build_router(service, core),
        gauges=[refresh_open_alert_gauges],
    )
    return app, host


async def refresh_open_alert_gauges(engine: AsyncEngine) -> None:
    """``creditwatch_alerts_open{rule,severity}``; every known series is set, so one that
    drops to zero shows 0 rather than its last value."""
    async with engine.connect() as conn:
        counts = await store.open_counts(conn)
    keys = {(r, s) for r in domain.RULES for s in domain.SEVERITIES} | counts.keys()
    for rule, severity in sorted(keys):
        metrics.ALERTS_OPEN.labels(rule, severity).set(counts.get((rule, severity), 0))
