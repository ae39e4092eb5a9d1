"""While PostgreSQL is down, every service's API answers 503 with ``Retry-After`` (never a 500
"internal error": order entry must know to retry), credit checks included, through the fast
path and through the full app alike, and none of them is left waiting; once PostgreSQL is
back, the same requests succeed without restarting anything.

The test runs a PostgreSQL of its own (the session's server is shared with other tests), and
stops and starts it with ``pg_ctl`` on the same data directory and port, so that the apps'
engines find it again where they left it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import servers
from services.limits import checks as limits_checks
from services.limits.checks import CheckOrder, PostgresChecks, Verdict
from services.limits.handlers import LimitsService
from services.schema import upgrade
from shared.auth import SCOPES, Principal, TokenRegistry
from shared.db import make_engine
from shared.policy import load_policy
from shared.problems import PROBLEM_CONTENT_TYPE
from shared.runtime import EventCore, Record
from shared.settings import Settings
from shared.transient import is_transient
from tools.registry import SERVICES, build

pytestmark = pytest.mark.integration

TOKEN = "all-scopes-token"
TOKENS = TokenRegistry({TOKEN: Principal("order-entry", frozenset(SCOPES))})
AUTH = ("Authorization", f"Bearer {TOKEN}")
ORDER = {"order_id": "SO-1", "customer_id": "C-1", "amount": "1500.00", "currency": "EUR"}
# Nothing a caller waits for may take long while the database is away: refused connections
# fail at once; this bounds the test should one hang instead.
PATIENCE_S = 15.0


class OwnPostgres:
    """A private PostgreSQL that the test can stop and start again in place."""

    def __init__(self) -> None:
        self.server = servers.PostgresServer.start()
        self.bindir = servers.ensure_postgres_installed()
        self.data_dir = self.server.base_dir / "data"
        owner = self.data_dir.stat()
        # PostgreSQL refuses to run as root: as root, act as the cluster's owner.
        self.run_as = (owner.st_uid, owner.st_gid) if os.geteuid() == 0 else None
        self.restarted = False

    def _pg_ctl(self, *args: str | Path) -> None:
        uid, gid = self.run_as if self.run_as is not None else (None, None)
        subprocess.run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-w", *map(str, args)],
            check=True,
            capture_output=True,
            timeout=60,
            user=uid,
            group=gid,
            extra_groups=[] if uid is not None else None,
        )

    def stop(self) -> None:
        self._pg_ctl("stop", "-m", "fast")

    def start(self) -> None:
        self.restarted = True
        log = self.server.base_dir / "restarted.log"
        self._pg_ctl("start", "-o", f"-p {self.server.port}", "-l", log)

    def close(self) -> None:
        if self.restarted:
            # Started by pg_ctl, it is no child of the server object: stopped here.
            with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
                self.stop()
        self.server.stop()


@pytest.fixture
def postgres() -> Iterator[OwnPostgres]:
    own = OwnPostgres()
    try:
        yield own
    finally:
        own.close()


@dataclass
class Running:
    clients: dict[str, httpx.AsyncClient]
    limits_core: EventCore


async def _consume(core: EventCore, offset: int, event_type: str, data: dict[str, Any]) -> None:
    topic = {"customer.registered": "crm.customers"}.get(event_type, "credit.assessments")
    envelope = {
        "specversion": "1.0",
        "id": f"evt-{offset}",
        "source": "/test",
        "type": event_type,
        "subject": data["customer_id"],
        "time": "2026-01-02T00:00:00Z",
        "data": data,
    }
    await core.process_records([Record(topic, 0, offset, b"C-1", json.dumps(envelope).encode())])


@pytest.fixture
async def running(postgres: OwnPostgres) -> AsyncIterator[Running]:
    """The three services in this process, started (their lifespans), on the private server;
    API replicas (no consumer, no relay): the database is the one dependency of their routes."""
    url = postgres.server.create_database()
    async with contextlib.AsyncExitStack() as stack:
        clients: dict[str, httpx.AsyncClient] = {}
        cores: dict[str, EventCore] = {}
        for service in SERVICES:
            app, host = build(
                service, Settings(database_url=url), tokens=TOKENS, consume=False, relay=False
            )
            await upgrade(host.engine, service)
            await stack.enter_async_context(app.router.lifespan_context(app))
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            clients[service] = await stack.enter_async_context(
                httpx.AsyncClient(transport=transport, base_url=f"http://{service}", timeout=30)
            )
            cores[service] = host.core
        yield Running(clients, cores["limits"])


GETS = {
    "limits": "/v1/customers/C-1/limit",
    "assessment": "/v1/reviews/due",
    "alerts": "/v1/alerts",
}


async def _check(limits: httpx.AsyncClient, *, fast: bool, order: dict[str, str] = ORDER) -> Any:
    # Two Authorization headers are the fast path's cue to leave the request to the full app
    # (which reads the first): the same check, through the framework's layers.
    headers = [AUTH] if fast else [AUTH, AUTH]
    return await limits.post("/v1/credit-checks", headers=headers, json=order)


def _assert_unavailable(response: httpx.Response, what: str) -> None:
    assert response.status_code == 503, (what, response.status_code, response.text)
    assert response.headers["content-type"].startswith(PROBLEM_CONTENT_TYPE), what
    assert 1 <= int(response.headers["retry-after"]) <= 5, what
    problem = response.json()
    assert problem["status"] == 503
    assert problem["type"].endswith("/temporarily-unavailable"), (what, problem)
    assert problem["title"] == "Service temporarily unavailable", (what, problem)
    assert problem["dependency"] == "database", (what, problem)


async def test_given_postgresql_down_when_the_apis_are_called_then_503_with_retry_after_and_200_once_it_is_back(
    postgres: OwnPostgres, running: Running
) -> None:
    limits = running.clients["limits"]
    # Given a customer with a limit, checked once while all is well (the pool and the checks'
    # kept connection are warm, as in production)
    await _consume(
        running.limits_core,
        0,
        "customer.registered",
        {"customer_id": "C-1", "name": "Customer C-1", "currency": "EUR"},
    )
    await _consume(
        running.limits_core,
        1,
        "assessment.completed",
        {
            "assessment_id": "as-1",
            "customer_id": "C-1",
            "score": 60,
            "grade": "BBB",
            "risk_level": "medium",
            "policy_version": "2026.1",
            "assessed_at": "2026-01-02T00:00:00Z",
        },
    )
    warm = await _check(limits, fast=True, order={**ORDER, "order_id": "SO-0"})
    assert warm.status_code == 200 and warm.json()["decision"] == "approved", warm.text

    # When PostgreSQL stops
    postgres.stop()

    # Then a credit check is a 503 with Retry-After, through the fast path and the full app
    async with asyncio.timeout(PATIENCE_S):
        _assert_unavailable(await _check(limits, fast=True), "fast path")
        _assert_unavailable(await _check(limits, fast=False), "full app")
        # ...and so are checks arriving together (batched): every one answered, none waits
        orders = [{**ORDER, "order_id": f"SO-B{i}"} for i in range(20)]
        together = await asyncio.gather(*(_check(limits, fast=True, order=o) for o in orders))
        for response in together:
            _assert_unavailable(response, "batched check")
        # ...and a read on each service
        for service, path in GETS.items():
            response = await running.clients[service].get(path, headers=[AUTH])
            _assert_unavailable(response, f"{service} GET {path}")
        # ...and readiness says so
        for service, client in running.clients.items():
            ready = await client.get("/readyz")
            assert ready.status_code == 503, (service, ready.text)
            assert ready.json()["checks"]["database"] is False, (service, ready.text)

    # When PostgreSQL is back (same data, same port; the apps are not restarted)
    postgres.start()

    # Then the same check succeeds, through the fast path and the full app (the same
    # decision: it is the same order and amount), and every read again answers
    first = await _check(limits, fast=True)
    assert first.status_code == 200, first.text
    assert first.json()["decision"] == "approved"
    again = await _check(limits, fast=False)
    assert again.status_code == 200, again.text
    assert again.json()["check_id"] == first.json()["check_id"]
    for service, path in GETS.items():
        response = await running.clients[service].get(path, headers=[AUTH])
        assert response.status_code == 200, (service, path, response.text)
    for service, client in running.clients.items():
        ready = await client.get("/readyz")
        assert ready.status_code == 200, (service, ready.text)


# ---- checks waiting for a batch that does not come back ------------------------------------------


@pytest.fixture
async def stuck_checks(postgres_url: str) -> AsyncIterator[PostgresChecks]:
    """Batched checks whose database takes every statement and never answers (a server that
    stopped without closing its connections, a network that drops everything)."""
    engine = make_engine(postgres_url)
    settings = Settings(database_url=postgres_url)
    core = EventCore(
        LimitsService(settings, load_policy(None)), engine, topic_of_type=settings.topic_of_type()
    )
    checks = PostgresChecks(core.service, core)  # type: ignore[arg-type]

    async def never_answers(_batch: Any) -> dict[int, Verdict | Exception]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    checks._run = never_answers  # type: ignore[method-assign]
    yield checks
    await checks.close()
    await engine.dispose()


def _order(i: int) -> CheckOrder:
    return CheckOrder(f"SO-{i}", "C-1", Decimal("10.00"), "EUR", True, "order-entry")


async def test_given_a_database_that_never_answers_when_a_check_waits_then_it_ends_as_an_outage(
    stuck_checks: PostgresChecks, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits_checks, "CHECK_WAIT_S", 0.2)
    # When a check waits for its batch longer than CHECK_WAIT_S
    with pytest.raises(TimeoutError) as raised:
        async with asyncio.timeout(PATIENCE_S):
            await stuck_checks.check(_order(1))
    # Then it ends with an error the API answers 503 (transient), not a hang
    assert is_transient(raised.value)


async def test_given_checks_waiting_when_the_checks_stop_then_every_one_is_told(
    stuck_checks: PostgresChecks,
) -> None:
    # Given one check in a batch that hangs and two more queued behind it
    waiting = [asyncio.create_task(stuck_checks.check(_order(i))) for i in range(3)]
    await asyncio.sleep(0.05)
    assert not any(task.done() for task in waiting)
    # When the checks stop (the service shutting down)
    await stuck_checks.close()
    # Then each waiting check ends at once, with an error the API answers 503
    async with asyncio.timeout(PATIENCE_S):
        outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(o, Exception) and is_transient(o) for o in outcomes), outcomes
