"""Every path and query parameter of every route of the three services is validated like a
body field: NUL and other control characters, and values over the contract's 1,000
characters, are a 422 problem naming the parameter, on the real PostgreSQL, before anything
reaches the database (which cannot store U+0000 and answered 500).

The routes are taken from each app's OpenAPI document, so a route added later is covered
without touching this test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi import FastAPI

from harness import servers
from services.schema import upgrade
from shared.auth import SCOPES, Principal, TokenRegistry
from shared.problems import PROBLEM_CONTENT_TYPE
from shared.service import ServiceHost
from shared.settings import Settings
from tools.registry import SERVICES, build

pytestmark = pytest.mark.integration

TOKEN = "all-scopes-token"
TOKENS = TokenRegistry({TOKEN: Principal("admin", frozenset(SCOPES))})
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
BAD_VALUES = {
    "nul": "\x00",
    "nul-inside": "C-1\x00x",
    "escape": "C-\x1b[31m1",
    "newline": "C-1\nforged log line",
    "1001-chars": "x" * 1001,
}


@dataclass(frozen=True)
class Param:
    service: str
    method: str
    path: str  # the route's template, e.g. /v1/customers/{customer_id}/limit
    name: str
    where: str  # "path" or "query"

    def __str__(self) -> str:
        return f"{self.service} {self.method.upper()} {self.path} {self.where}.{self.name}"


def _operations(app: FastAPI) -> Iterator[tuple[str, str, list[dict[str, Any]]]]:
    for path, item in app.openapi()["paths"].items():
        for method, operation in item.items():
            yield path, method, operation.get("parameters", [])


def _params_of(service: str) -> list[Param]:
    # OpenAPI needs no database: the app is only built, never started.
    app, _host = build(
        service, Settings(database_url="sqlite+aiosqlite:///:memory:"), tokens=TOKENS
    )
    return [
        Param(service, method, path, p["name"], p["in"])
        for path, method, parameters in _operations(app)
        for p in parameters
        if p["in"] in ("path", "query")
    ]


PARAMS = [param for service in SERVICES for param in _params_of(service)]


def test_the_routes_enumerated_include_the_ones_of_the_report() -> None:
    # Guards the enumeration itself: an empty or partial list would make the test below vacuous.
    named = {str(p) for p in PARAMS}
    assert "limits GET /v1/customers/{customer_id}/limit path.customer_id" in named
    assert "limits GET /v1/portfolio query.grade" in named
    assert "alerts GET /v1/alerts query.customer_id" in named
    assert len(PARAMS) >= 20
    assert {p.service for p in PARAMS} == set(SERVICES)


@pytest.fixture(scope="module")
async def apps(postgres_server_url: str) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    """The three services on one fresh PostgreSQL database (each has its own tables)."""
    url = servers.create_database(postgres_server_url)
    clients: dict[str, httpx.AsyncClient] = {}
    hosts: list[ServiceHost] = []
    try:
        for service in SERVICES:
            app, host = build(service, Settings(database_url=url), tokens=TOKENS, consume=False)
            hosts.append(host)
            await upgrade(host.engine, service)
            clients[service] = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                base_url=f"http://{service}",
            )
        yield clients
    finally:
        for client in clients.values():
            await client.aclose()
        for host in hosts:
            await host.engine.dispose()


def _request(param: Param, value: str) -> tuple[str, dict[str, str]]:
    """The route's URL with ``value`` in the parameter (percent-encoded), every other path
    parameter a plain id, and no other query parameter."""
    path = param.path
    for segment in [s for s in path.split("/") if s.startswith("{")]:
        name = segment[1:-1]
        plain = quote(value, safe="") if (name, param.where) == (param.name, "path") else "C-1"
        path = path.replace(segment, plain)
    query = {param.name: value} if param.where == "query" else {}
    return path, query


@pytest.mark.parametrize("kind", list(BAD_VALUES))
@pytest.mark.parametrize("param", PARAMS, ids=str)
async def test_given_a_control_character_or_an_overlong_value_in_a_parameter_when_sent_then_422_names_the_parameter(
    apps: dict[str, httpx.AsyncClient], param: Param, kind: str
) -> None:
    # Given a route's parameter holding a control character or 1,001 characters
    path, query = _request(param, BAD_VALUES[kind])
    # When it is sent with a token holding every scope
    response = await apps[param.service].request(
        param.method,
        path,
        params=query,
        headers=HEADERS,
        json={} if param.method in ("post", "put", "patch") else None,
    )
    # Then it is a 422 problem naming the parameter, never a 500 or an answer from the data
    assert response.status_code == 422, (str(param), kind, response.status_code, response.text)
    assert response.headers["content-type"].startswith(PROBLEM_CONTENT_TYPE)
    problem = response.json()
    assert problem["status"] == 422
    assert problem["field"] == param.name, (str(param), problem)
    assert any(e["field"] == param.name for e in problem["errors"])
    # ...without quoting the value back (the instance is the request's path, as always)
    said = [problem["detail"], *(e["message"] for e in problem["errors"])]
    assert not any(BAD_VALUES[kind] in text for text in said), said
