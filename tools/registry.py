"""The three services by name: how to build each, migrate its database, create its topics."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.auth import TokenRegistry
from shared.db import make_engine
from shared.policy import Policy, load_policy
from shared.runtime import Clock, EventCore, utcnow
from shared.service import ServiceHost
from shared.settings import Settings

SERVICES = ("assessment", "limits", "alerts")
SERVICE_CLASSES = {
    "assessment": ("services.assessment.handlers", "AssessmentService"),
    "limits": ("services.limits.handlers", "LimitsService"),
    "alerts": ("services.alerts.handlers", "AlertsService"),
}


def build(
    name: str,
    settings: Settings,
    *,
    tokens: TokenRegistry,
    policy: Policy | None = None,
    consume: bool = True,
    relay: bool = True,
    clock: Clock = utcnow,
) -> tuple[FastAPI, ServiceHost]:
    module = importlib.import_module(f"services.{name}.app")
    built: tuple[FastAPI, ServiceHost] = module.build(
        settings, tokens=tokens, policy=policy, consume=consume, relay=relay, clock=clock
    )
    return built


def service_for(name: str, settings: Settings, policy: Policy | None = None) -> Any:
    module_name, cls = SERVICE_CLASSES[name]
    module = importlib.import_module(module_name)
    return getattr(module, cls)(settings, policy or load_policy(settings.policy))


def core_for(
    name: str, settings: Settings, policy: Policy | None = None
) -> tuple[EventCore, AsyncEngine]:
    """An event core on the service's database, without loops (replay, verify, tools)."""
    engine = make_engine(settings.database_url_for(name))
    core = EventCore(
        service_for(name, settings, policy),
        engine,
        dlq_topic=settings.topic_dlq,
        topic_of_type=settings.topic_of_type(),
        # A parallel replay's workers build the same service in their own processes.
        service_factory=functools.partial(service_for, name, settings, policy),
    )
    return core, engine


def upgrade(
    settings: Settings,
    names: list[str],
    progress: Callable[[str, int, int], None] | None = None,
    jobs: int = 1,
) -> list[str]:
    """Migrate each service's database; where a migration changed the layout of its
    projections, rebuild them from its event store (a replay, folded by ``jobs`` processes
    on PostgreSQL). Returns what was done."""
    from services.schema import upgrade_url
    from shared.settings import redact_url

    done: list[str] = []
    for name in names:
        url = settings.database_url_for(name)
        rebuild = upgrade_url(url, name)
        done.append(f"{name}: {redact_url(url)}")
        if rebuild:
            count = asyncio.run(_rebuild(name, settings, progress, jobs))
            done.append(f"{name}: projections rebuilt from {count} stored events")
    return done


async def _rebuild(
    name: str,
    settings: Settings,
    progress: Callable[[str, int, int], None] | None,
    jobs: int = 1,
) -> int:
    core, engine = core_for(name, settings)
    try:
        step = None if progress is None else functools.partial(progress, name)
        return await core.replay(step, jobs=jobs)
    finally:
        await engine.dispose()


def all_topics(settings: Settings) -> list[str]:
    s = settings
    return [
        s.topic_customers,
        s.topic_invoices,
        s.topic_payments,
        s.topic_overdue,
        s.topic_financials,
        s.topic_credit_reports,
        s.topic_assessments,
        s.topic_limits,
        s.topic_exposure,
        s.topic_alerts,
        s.topic_dlq,
    ]


async def create_topics(settings: Settings, partitions: int | None = None) -> None:
    """Create every topic the services read or write (existing ones are left alone)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, **settings.kafka_client_kwargs()
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [t for t in all_topics(settings) if t not in existing]
        if wanted:
            count = partitions or settings.topic_partitions
            # Another process may create them at the same moment; that is fine.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics([NewTopic(t, count, 1) for t in wanted])
    finally:
        await admin.close()
