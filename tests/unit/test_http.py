"""create_app: the probes, metrics and docs every service has, none of them behind a token."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI

from shared import http as shared_http
from shared.auth import Principal, TokenRegistry
from shared.http import create_app
from shared.settings import Settings

TOKENS = TokenRegistry({"ops-token-0123456789": Principal("ops", frozenset({"credit:read"}))})


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("CREDITWATCH_"):
            monkeypatch.delenv(name)


class FakeReadiness:
    """Readiness checks whose outcome the test sets."""

    def __init__(self, **checks: bool) -> None:
        self.checks = checks
        self.error: Exception | None = None
        self.delay_s = 0.0

    async def __call__(self) -> dict[str, bool]:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return dict(self.checks)


def _client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://svc")


@pytest.fixture
def readiness() -> FakeReadiness:
    return FakeReadiness(database=True, broker=True, consumer_assigned=True)


@pytest.fixture
async def client(readiness: FakeReadiness) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app("alerts", settings=Settings(), tokens=TOKENS, readiness=readiness)
    async with _client(app) as http:
        yield http


async def test_healthz_answers_ok_without_a_token(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_is_200_with_the_checks_when_all_pass(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")

    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "checks": {"database": True, "broker": True, "consumer_assigned": True},
    }


async def test_readyz_is_a_503_problem_listing_the_failing_checks(
    client: httpx.AsyncClient, readiness: FakeReadiness
) -> None:
    # Given the consumer has no partitions assigned yet
    readiness.checks["consumer_assigned"] = False

    # When readiness is probed
    response = await client.get("/readyz")

    # Then 503 problem+json naming the failing check
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == "https://creditwatch.dev/problems/service-unavailable"
    assert body["failing"] == ["consumer_assigned"]
    assert body["checks"]["database"] is True
    assert "consumer_assigned" in body["detail"]


async def test_readyz_is_503_when_the_checks_themselves_fail(
    client: httpx.AsyncClient, readiness: FakeReadiness
) -> None:
    readiness.error = ConnectionRefusedError("database at db:5432 refused")

    response = await client.get("/readyz")

    assert response.status_code == 503
    assert "db:5432" not in response.text


async def test_readyz_is_503_when_the_checks_hang(
    client: httpx.AsyncClient, readiness: FakeReadiness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared_http, "READINESS_TIMEOUT_S", 0.05)
    readiness.delay_s = 1.0

    response = await client.get("/readyz")

    assert response.status_code == 503


async def test_metrics_are_served_without_a_token_and_count_requests_by_route(
    client: httpx.AsyncClient,
) -> None:
    # Given a request has been served
    await client.get("/healthz")

    # When Prometheus scrapes
    response = await client.get("/metrics")

    # Then the text format carries the contract names, labelled by route and service
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert (
        'creditwatch_http_requests_total{method="GET",route="/healthz",service="alerts",'
        'status="200"}' in response.text
    )
    assert "creditwatch_http_request_seconds_bucket" in response.text


async def test_openapi_and_docs_are_published(client: httpx.AsyncClient) -> None:
    schema = await client.get("/openapi.json")
    docs = await client.get("/docs")

    assert schema.status_code == 200
    assert schema.json()["info"]["title"] == "creditwatch alerts"
    assert {"/healthz", "/readyz", "/metrics"} <= set(schema.json()["paths"])
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()


async def test_the_app_carries_its_tokens_settings_and_service_name() -> None:
    settings = Settings()

    app = create_app("limits", settings=settings, tokens=TOKENS, readiness=FakeReadiness())

    assert app.state.tokens is TOKENS
    assert app.state.settings is settings
    assert app.state.service == "limits"


async def test_an_oversized_body_is_refused_before_any_route(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/anything", content=b"x" * (65 * 1024))

    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"


async def test_the_services_lifespan_runs_around_serving() -> None:
    # Given a service lifespan that starts and stops its background work
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        events.append("started")
        yield
        events.append("stopped")

    app = create_app(
        "assessment",
        settings=Settings(),
        tokens=TOKENS,
        readiness=FakeReadiness(),
        lifespan=lifespan,
    )

    # When the app goes through its lifespan
    async with app.router.lifespan_context(app):
        assert events == ["started"]

    # Then it was started and stopped
    assert events == ["started", "stopped"]


async def test_dev_mode_allows_an_app_with_generated_tokens() -> None:
    settings = Settings(dev_mode=True)
    tokens = TokenRegistry.from_settings(settings)
    token = next(iter(tokens.generated))

    app = create_app("limits", settings=settings, tokens=tokens, readiness=FakeReadiness())

    assert app.state.tokens.authenticate(token) is not None


async def test_healthz_is_a_503_problem_once_a_background_loop_has_died(
    readiness: FakeReadiness,
) -> None:
    # Given a service whose consumer loop stopped for good
    app = create_app(
        "limits",
        settings=Settings(),
        tokens=TOKENS,
        readiness=readiness,
        liveness=lambda: "RuntimeError: consumer crashed",
    )
    async with _client(app) as http:
        # When liveness is probed, then it says so, so that the orchestrator restarts it
        response = await http.get("/healthz")
    assert response.status_code == 503
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "consumer crashed" in response.json()["detail"]


async def test_a_host_whose_loops_crashed_reports_why_and_one_stopped_on_purpose_does_not() -> None:
    import asyncio
    from types import SimpleNamespace

    from shared.service import ServiceHost

    async def crash() -> None:
        raise RuntimeError("boom")

    host = ServiceHost.__new__(ServiceHost)
    host.stop = asyncio.Event()
    host.service = SimpleNamespace(name="limits")  # type: ignore[assignment]
    host._task = asyncio.create_task(crash())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert host.fatal() == "RuntimeError: boom"
    host.stop.set()  # the loops stopping each other after one died: still a death
    assert host.fatal() == "RuntimeError: boom"
    host._closing = True  # a graceful stop is not a death
    assert host.fatal() is None
