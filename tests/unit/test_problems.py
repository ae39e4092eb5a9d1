"""Errors as RFC 9457 problem+json, and the 64 KiB body limit."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from decimal import Decimal

import httpx
import pytest
from fastapi import FastAPI, Query
from pydantic import BaseModel, field_validator
from starlette.types import Message, Receive, Scope, Send

from shared.problems import (
    PROBLEM_CONTENT_TYPE,
    BodySizeLimit,
    Conflict,
    NotFound,
    ValidationFailed,
    install,
)

KIB = 1024


class Line(BaseModel):
    sku: str
    amount: Decimal


class CreditCheck(BaseModel):
    order_id: str
    amount: Decimal
    lines: list[Line] = []

    @field_validator("amount")
    @classmethod
    def _positive(cls, amount: Decimal) -> Decimal:
        if amount <= 0:
            raise ValueError("amount must be greater than zero")
        if amount > 10**15:
            raise ValueError("amount: more than 10^15")  # named, as shared.money's messages
        return amount


def _app() -> FastAPI:
    app = FastAPI()
    install(app)
    app.add_middleware(BodySizeLimit, max_bytes=64 * KIB)

    @app.post("/v1/credit-checks")
    async def credit_check(check: CreditCheck) -> dict[str, str]:
        return {"order_id": check.order_id}

    @app.get("/v1/alerts")
    async def alerts(limit: int = Query(default=50, le=500)) -> dict[str, int]:
        return {"limit": limit}

    @app.get("/v1/alerts/{alert_id}")
    async def alert(alert_id: str) -> dict[str, str]:
        raise NotFound(f"No alert {alert_id}")

    @app.post("/v1/limit-requests/{request_id}/approve")
    async def approve(request_id: str) -> dict[str, str]:
        raise Conflict("The request is already decided.", request_status="approved")

    @app.post("/v1/customers/{customer_id}/hold")
    async def hold(customer_id: str) -> dict[str, str]:
        raise ValidationFailed("reason must not be empty", field="reason")

    @app.get("/v1/alerts/{alert_id}/history")
    async def history(alert_id: str) -> dict[str, str]:
        raise ValidationFailed("cursor: not a cursor this API returned", field="cursor")

    @app.get("/v1/boom")
    async def boom() -> dict[str, str]:
        raise RuntimeError("password=db-pa55word in a connection string")

    return app


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    # raise_app_exceptions=False: like a real server, which logs the re-raised exception.
    transport = httpx.ASGITransport(app=_app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


def _assert_problem(response: httpx.Response, status: int, slug: str, instance: str) -> None:
    assert response.status_code == status
    assert response.headers["content-type"] == PROBLEM_CONTENT_TYPE
    body = response.json()
    assert body["type"] == f"https://creditwatch.dev/problems/{slug}"
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    assert body["instance"] == instance


# --- validation ------------------------------------------------------------------------------


async def test_an_invalid_body_field_is_a_422_problem_naming_the_field(
    client: httpx.AsyncClient,
) -> None:
    # When a credit check carries a negative amount
    response = await client.post("/v1/credit-checks", json={"order_id": "O-1", "amount": "-5"})

    # Then 422 problem+json naming "amount" with the validator's own message
    _assert_problem(response, 422, "validation-failed", "/v1/credit-checks")
    body = response.json()
    assert body["field"] == "amount"
    assert body["errors"] == [{"field": "amount", "message": "amount must be greater than zero"}]


async def test_every_invalid_field_is_listed_and_nested_fields_are_dotted(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        "/v1/credit-checks", json={"amount": "abc", "lines": [{"sku": "A", "amount": "x"}]}
    )

    assert response.status_code == 422
    fields = {error["field"] for error in response.json()["errors"]}
    assert fields == {"order_id", "amount", "lines.0.amount"}


async def test_a_body_that_is_not_json_is_a_422_problem_naming_the_body(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        "/v1/credit-checks",
        content=b'{"order_id": "O-1", "amount": ',
        headers={"content-type": "application/json"},
    )

    _assert_problem(response, 422, "validation-failed", "/v1/credit-checks")
    assert response.json()["field"] == "body"


async def test_a_missing_body_is_a_422_problem_naming_the_body(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/credit-checks")

    assert response.status_code == 422
    assert response.json()["field"] == "body"


async def test_an_invalid_query_parameter_is_named_without_its_location_prefix(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/v1/alerts", params={"limit": "501"})

    _assert_problem(response, 422, "validation-failed", "/v1/alerts")
    assert response.json()["field"] == "limit"


async def test_the_submitted_values_are_not_echoed_in_a_validation_problem(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        "/v1/credit-checks", json={"order_id": "O-1", "amount": "echo-me-not"}
    )

    assert response.status_code == 422
    assert "echo-me-not" not in response.text


# --- the error family ------------------------------------------------------------------------


async def test_a_not_found_error_is_a_404_problem(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/alerts/A-9")

    _assert_problem(response, 404, "not-found", "/v1/alerts/A-9")
    assert response.json()["detail"] == "No alert A-9"


async def test_extra_members_of_an_error_become_problem_members(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/v1/limit-requests/R-1/approve")

    _assert_problem(response, 409, "conflict", "/v1/limit-requests/R-1/approve")
    assert response.json()["request_status"] == "approved"


async def test_a_validation_failure_raised_by_a_handler_names_its_field(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/v1/customers/C-1/hold")

    _assert_problem(response, 422, "validation-failed", "/v1/customers/C-1/hold")
    assert response.json()["field"] == "reason"
    assert response.json()["errors"] == [{"field": "reason", "message": "reason must not be empty"}]


async def test_a_field_named_in_its_own_message_is_named_once(client: httpx.AsyncClient) -> None:
    raised = (await client.get("/v1/alerts/A-1/history")).json()
    assert raised["detail"] == "cursor: not a cursor this API returned"
    assert raised["errors"] == [{"field": "cursor", "message": "not a cursor this API returned"}]
    validated = (
        await client.post("/v1/credit-checks", json={"order_id": "SO-1", "amount": "1e16"})
    ).json()
    assert validated["detail"] == "amount: more than 10^15"
    assert validated["errors"] == [{"field": "amount", "message": "more than 10^15"}]


async def test_an_unknown_route_is_a_404_problem(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/nothing-here")

    _assert_problem(response, 404, "not-found", "/v1/nothing-here")


async def test_a_wrong_method_is_a_405_problem_with_allow(client: httpx.AsyncClient) -> None:
    response = await client.delete("/v1/credit-checks")

    _assert_problem(response, 405, "method-not-allowed", "/v1/credit-checks")
    assert response.headers["allow"] == "POST"


async def test_an_unexpected_exception_is_a_500_problem_that_hides_internals(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    # When a handler fails unexpectedly
    with caplog.at_level(logging.ERROR, logger="shared.problems"):
        response = await client.get("/v1/boom")

    # Then the client gets a bare 500 problem with an error id, and no internals
    _assert_problem(response, 500, "internal-error", "/v1/boom")
    body = response.json()
    assert "db-pa55word" not in response.text
    assert "RuntimeError" not in response.text
    assert "Traceback" not in response.text
    # and the log holds the traceback under the same error id
    assert body["error_id"] in caplog.text
    assert "RuntimeError" in caplog.text


async def test_after_a_500_a_keep_alive_client_goes_on_without_a_reset_connection() -> None:
    # Under a real uvicorn, an unexpected exception ends the connection after its 500; the
    # 500 says so (Connection: close), so that a client pooling connections does not send
    # its next request down one the server is closing (seen: "connection reset by peer").
    import socket

    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_app(), port=port, log_level="critical", lifespan="off"))
    serving = asyncio.create_task(server.serve())
    try:
        for _ in range(1000):  # up to 10 s
            if server.started:
                break
            await asyncio.sleep(0.01)
        assert server.started
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            for _ in range(3):
                boom = await http.get("/v1/boom")
                assert boom.status_code == 500
                assert boom.headers["connection"] == "close"
                after = await http.get("/v1/alerts")
                assert after.status_code == 200
    finally:
        server.should_exit = True
        await serving


# --- body size -------------------------------------------------------------------------------


async def test_a_65_kib_body_is_refused_with_413(client: httpx.AsyncClient) -> None:
    # Given a body of 65 KiB with its Content-Length
    body = b'{"order_id": "' + b"x" * (65 * KIB) + b'", "amount": "1"}'

    # When it is posted
    response = await client.post(
        "/v1/credit-checks", content=body, headers={"content-type": "application/json"}
    )

    # Then 413 problem+json
    _assert_problem(response, 413, "payload-too-large", "/v1/credit-checks")


async def test_a_chunked_body_growing_past_the_limit_is_refused_without_reading_it_all(
    client: httpx.AsyncClient,
) -> None:
    # Given a chunked body that would be 8 MiB (no Content-Length)
    chunks_sent = 0

    async def endless_body() -> AsyncIterator[bytes]:
        nonlocal chunks_sent
        for _ in range(1024):
            chunks_sent += 1
            yield b"x" * (8 * KIB)

    # When it is posted
    response = await client.post(
        "/v1/credit-checks", content=endless_body(), headers={"content-type": "application/json"}
    )

    # Then 413, and reading stopped just past the limit
    assert "content-length" not in response.request.headers
    _assert_problem(response, 413, "payload-too-large", "/v1/credit-checks")
    assert chunks_sent <= 64 // 8 + 2


async def test_a_chunked_body_within_the_limit_passes(client: httpx.AsyncClient) -> None:
    async def small_body() -> AsyncIterator[bytes]:
        yield b'{"order_id": "O-7", '
        yield b'"amount": "12.50"}'

    response = await client.post(
        "/v1/credit-checks", content=small_body(), headers={"content-type": "application/json"}
    )

    assert response.status_code == 200
    assert response.json() == {"order_id": "O-7"}


async def test_a_body_exactly_at_the_limit_passes() -> None:
    # Given a bare ASGI app that drains its body
    received: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        total = 0
        while True:
            message: Message = await receive()
            total += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        received.append(total)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    transport = httpx.ASGITransport(app=BodySizeLimit(app, max_bytes=1000))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        # When exactly max_bytes, then one byte more, are sent
        at_limit = await http.post("/", content=b"x" * 1000)
        over_limit = await http.post("/", content=b"x" * 1001)

    # Then the first passes and the second is refused before the app runs
    assert at_limit.status_code == 204
    assert over_limit.status_code == 413
    assert received == [1000]
