"""Every 201 names what it created (issue 21): a limit request's Location is
``/v1/limit-requests/{request_id}``, which answers the request's record as submitted and as
decided; an override's Location is the customer's latest assessment, the one it made. On the
real PostgreSQL, through each app in-process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from harness.factories import cloudevent, customer, records
from services.assessment.app import build as build_assessment
from services.limits.app import build as build_limits
from shared.auth import Principal, TokenRegistry
from shared.settings import Settings
from tests.databases import reset

pytestmark = pytest.mark.integration

ANA = "ana-token"  # requests limits
BOB = "bob-token"  # decides them
TOKENS = TokenRegistry(
    {
        ANA: Principal("ana", frozenset({"credit:read", "credit:write"})),
        BOB: Principal("bob", frozenset({"credit:read", "credit:approve"})),
    }
)
NOW = datetime(2026, 3, 2, 12, tzinfo=UTC)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def limits(postgres_url: str) -> AsyncIterator[httpx.AsyncClient]:
    app, host = build_limits(
        Settings(database_url=postgres_url), tokens=TOKENS, consume=False, clock=lambda: NOW
    )
    await reset(host.engine, "limits")
    assessed = cloudevent(
        "assessment.completed",
        "L-1",
        {
            "assessment_id": "as-L-1",
            "customer_id": "L-1",
            "score": 60,
            "grade": "BBB",  # the policy's limit: 100,000.00
            "risk_level": "medium",
            "policy_version": "2026.1",
            "assessed_at": "2026-01-02T00:00:00Z",
        },
        id="as-L-1",
        source="/test/assessment",
    )
    await host.core.process_records(records([customer("L-1"), assessed]))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://limits") as client:
        yield client
    await host.close()


async def _request(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    return await client.post(
        "/v1/customers/L-1/limit-requests", headers=auth(ANA), json={"reason": "growth", **body}
    )


async def test_given_an_increase_requested_when_its_location_is_read_then_it_is_the_pending_request(
    limits: httpx.AsyncClient,
) -> None:
    # When an increase is requested
    made = await _request(limits, requested_limit="150000.00")
    assert made.status_code == 201, made.text
    request_id = made.json()["request_id"]
    # Then the answer says where the request is
    assert made.headers["Location"] == f"/v1/limit-requests/{request_id}"
    # And that is the request, pending
    record = await limits.get(made.headers["Location"], headers=auth(BOB))
    assert record.status_code == 200, record.text
    assert record.json() == {
        "request_id": request_id,
        "customer_id": "L-1",
        "status": "pending",
        "requested_limit": "150000.00",
        "currency": "EUR",
        "reason": "growth",
        "requested_by": "ana",
        "submitted_at": "2026-03-02T12:00:00Z",
        "expires_at": None,
        "decided_by": None,
        "decided_at": None,
        "note": None,
    }


async def test_given_a_request_approved_when_it_is_read_then_it_says_who_decided_when_and_why(
    limits: httpx.AsyncClient,
) -> None:
    made = await _request(
        limits,
        requested_limit="150000.00",
        expires_at=(NOW + timedelta(days=30)).isoformat(),
    )
    location = made.headers["Location"]
    # When another principal approves it
    decided = await limits.post(
        location + "/approve", headers=auth(BOB), json={"note": "seasonal peak"}
    )
    assert decided.status_code == 200, decided.text
    # Then its record says so
    record = (await limits.get(location, headers=auth(ANA))).json()
    assert record["status"] == "approved"
    assert (record["decided_by"], record["decided_at"], record["note"]) == (
        "bob",
        "2026-03-02T12:00:00Z",
        "seasonal peak",
    )
    assert record["expires_at"] == "2026-04-01T12:00:00Z"


async def test_given_a_decrease_when_it_is_read_then_it_was_applied_by_its_requester(
    limits: httpx.AsyncClient,
) -> None:
    made = await _request(limits, requested_limit="5000.00")
    assert made.json()["status"] == "approved"
    record = (await limits.get(made.headers["Location"], headers=auth(ANA))).json()
    assert (record["status"], record["decided_by"], record["decided_at"]) == (
        "approved",
        "ana",
        "2026-03-02T12:00:00Z",
    )


async def test_given_an_unknown_request_when_read_then_404_names_the_request(
    limits: httpx.AsyncClient,
) -> None:
    answer = await limits.get("/v1/limit-requests/no-such", headers=auth(ANA))
    assert answer.status_code == 404
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["field"] == "request_id"


async def test_given_an_override_when_its_location_is_read_then_it_is_the_assessment_it_made(
    postgres_url: str,
) -> None:
    app, host = build_assessment(
        Settings(database_url=postgres_url), tokens=TOKENS, consume=False, clock=lambda: NOW
    )
    await reset(host.engine, "assessment")
    await host.core.process_records(records([customer("A-1")]))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://assessment") as client:
        # When an override is set
        made = await client.post(
            "/v1/customers/A-1/assessment/override",
            headers=auth(ANA),
            json={"grade": "BB", "reason": "management change"},
        )
        assert made.status_code == 201, made.text
        # Then its Location answers the assessment it made
        assert made.headers["Location"] == "/v1/customers/A-1/assessment"
        latest = await client.get(made.headers["Location"], headers=auth(ANA))
        assert latest.json() == made.json()
        assert latest.json()["override"]["grade"] == "BB"
    await host.close()
