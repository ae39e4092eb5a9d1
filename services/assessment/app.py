"""Wiring of the assessment service: its domain plugged into the shared service host."""

from __future__ import annotations

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from services.assessment import store
from services.assessment.api import build_router
from services.assessment.handlers import AssessmentService
from shared import metrics
from shared.auth import TokenRegistry
from shared.policy import Policy, load_policy
from shared.runtime import Clock, utcnow
from shared.service import ServiceHost, build_service_app
from shared.settings import Settings

NAME = "assessment"
UNRATED = "unrated"


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
    service = AssessmentService(settings, policy)

    async def grades(engine: AsyncEngine) -> None:
        await refresh_grade_gauges(engine, policy)

    return build_service_app(
        NAME,
        service,
        settings,
        tokens=tokens,
        consume=consume,
        relay=relay,
        clock=clock,
        router=lambda core: build_router(service, core),
        gauges=[grades],
    )


async def refresh_grade_gauges(engine: AsyncEngine, policy: Policy) -> None:
    """``creditwatch_customers{grade}``; every grade of the policy is set, so a grade nobody
    holds any more reads 0 rather than its last value."""
    async with engine.connect() as conn:
        counts = await store.customers_by_grade(conn)
    by_label = {grade.name: 0 for grade in policy.grades} | {UNRATED: 0}
    for grade, count in counts.items():
        label = grade or UNRATED
        by_label[label] = by_label.get(label, 0) + count
    for label, count in by_label.items():
        metrics.CUSTOMERS.labels(label).set(count)
