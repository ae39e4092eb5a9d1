"""Path and query parameters are validated like body fields (control characters, length),
an outage is a 503 with Retry-After where a bug stays a 500, and log lines never carry a
control character raw."""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
import pytest
from aiokafka.errors import KafkaConnectionError
from fastapi import APIRouter, Depends, Query
from sqlalchemy.exc import OperationalError

from shared.auth import Principal, TokenRegistry, require
from shared.http import (
    MAX_PARAM_CHARS,
    CursorParam,
    PathText,
    Printable,
    QueryText,
    create_app,
)
from shared.logs import JsonLines, PlainLines, escape_controls
from shared.problems import PROBLEM_BASE, PROBLEM_CONTENT_TYPE, RETRY_AFTER_S
from shared.settings import Settings

TOKEN = "reader-token-0123456789"
TOKENS = TokenRegistry({TOKEN: Principal("rita", frozenset({"credit:read"}))})
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _ready() -> dict[str, bool]:
    return {"database": True}


def _refused() -> OperationalError:
    # What SQLAlchemy raises when PostgreSQL refuses the connection (it wraps the driver's).
    try:
        raise ConnectionRefusedError(111, "Connect call failed ('10.0.0.7', 5432)")
    except ConnectionRefusedError as exc:
        return OperationalError("connect", {}, exc)


def _router() -> APIRouter:
    router = APIRouter(prefix="/v1")
    reader = Depends(require("credit:read"))

    @router.get("/customers/{customer_id}/limit")
    async def limit(
        customer_id: PathText,
        grade: QueryText = None,
        cursor: CursorParam = None,
        owner: Annotated[str | None, Query(max_length=255), Printable] = None,
        _p: Principal = reader,
    ) -> dict[str, Any]:
        return {"customer_id": customer_id, "grade": grade, "cursor": cursor, "owner": owner}

    @router.get("/down")
    async def down(_p: Principal = reader) -> None:
        raise _refused()

    @router.get("/down-wrapped")
    async def down_wrapped(_p: Principal = reader) -> None:
        try:
            raise _refused()
        except OperationalError as exc:
            raise RuntimeError("could not load the customer") from exc

    @router.get("/broker-down")
    async def broker_down(_p: Principal = reader) -> None:
        raise KafkaConnectionError("Unable to bootstrap from [('10.0.0.8', 9092)]")

    @router.get("/bug")
    async def bug(_p: Principal = reader) -> None:
        raise ValueError("a bug, not an outage")

    return router


@pytest.fixture
def service() -> str:
    # Each test its own name: the outage log's rate limit is kept per service.
    return f"unit-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def client(service: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(service, settings=Settings(), tokens=TOKENS, readiness=_ready)
    app.include_router(_router())
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as http:
        yield http


def _problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_CONTENT_TYPE
    body: dict[str, Any] = response.json()
    return body


# ---- parameters --------------------------------------------------------------------------------


async def test_given_ordinary_text_in_the_parameters_when_sent_then_it_reaches_the_route_unchanged(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get(
        "/v1/customers/Müller%20&%20Söhne-Ω/limit",
        params={"grade": "BBB", "owner": "x" * 255, "cursor": "eyJ9"},
        headers=AUTH,
    )

    assert response.status_code == 200, response.text
    assert response.json() == {
        "customer_id": "Müller & Söhne-Ω",
        "grade": "BBB",
        "cursor": "eyJ9",
        "owner": "x" * 255,
    }


async def test_given_a_nul_in_a_path_parameter_when_sent_then_422_names_it_like_a_body_field(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/v1/customers/C-1%00/limit", headers=AUTH)

    problem = _problem(response, 422)
    assert problem["type"] == PROBLEM_BASE + "validation-failed"
    assert problem["field"] == "customer_id"
    assert problem["errors"] == [
        {"field": "customer_id", "message": "NUL (U+0000) is not allowed in text"}
    ]
    assert problem["detail"] == "customer_id: NUL (U+0000) is not allowed in text"


@pytest.mark.parametrize(
    ("value", "code"), [("\x1b[2J", "U+001B"), ("a\nb", "U+000A"), ("\x7f", "U+007F")]
)
async def test_given_a_control_character_in_a_query_parameter_when_sent_then_422_names_it(
    client: httpx.AsyncClient, value: str, code: str
) -> None:
    response = await client.get("/v1/customers/C-1/limit", params={"grade": value}, headers=AUTH)

    problem = _problem(response, 422)
    assert problem["field"] == "grade"
    assert problem["errors"][0]["message"] == f"control character {code} is not allowed in text"


@pytest.mark.parametrize(
    ("param", "limit"), [("grade", MAX_PARAM_CHARS), ("owner", 255), ("cursor", 4096)]
)
async def test_given_a_query_parameter_over_its_length_when_sent_then_422_names_it(
    client: httpx.AsyncClient, param: str, limit: int
) -> None:
    at_limit = await client.get(
        "/v1/customers/C-1/limit", params={param: "y" * limit}, headers=AUTH
    )
    over = await client.get(
        "/v1/customers/C-1/limit", params={param: "y" * (limit + 1)}, headers=AUTH
    )

    assert at_limit.status_code == 200, at_limit.text
    problem = _problem(over, 422)
    assert problem["field"] == param
    assert "y" * 50 not in problem["detail"]  # the value is never quoted back


async def test_given_a_path_parameter_over_1000_characters_when_sent_then_422_names_it(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get(f"/v1/customers/{'x' * 1001}/limit", headers=AUTH)

    assert _problem(response, 422)["field"] == "customer_id"


async def test_given_no_token_and_a_nul_in_a_parameter_when_sent_then_401_is_decided_first(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/v1/customers/%00/limit")

    assert _problem(response, 401)["field"] == "authorization"


# ---- outages -----------------------------------------------------------------------------------


async def test_given_the_database_refuses_connections_when_a_route_needs_it_then_503_with_retry_after(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/v1/down", headers=AUTH)

    problem = _problem(response, 503)
    assert response.headers["retry-after"] == str(RETRY_AFTER_S)
    assert problem["type"] == PROBLEM_BASE + "temporarily-unavailable"
    assert problem["title"] == "Service temporarily unavailable"
    assert problem["dependency"] == "database"
    assert problem["instance"] == "/v1/down"
    assert "10.0.0.7" not in response.text  # where the database lives is for the log only
    # The connection stays usable: a 503 is an answer, not a crash
    assert "connection" not in response.headers


async def test_given_an_outage_wrapped_in_another_error_when_raised_then_it_is_still_a_503(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/v1/down-wrapped", headers=AUTH)

    assert _problem(response, 503)["dependency"] == "database"


async def test_given_the_broker_unreachable_when_a_route_needs_it_then_503_names_the_broker(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/v1/broker-down", headers=AUTH)

    assert _problem(response, 503)["dependency"] == "broker"
    assert "retry-after" in response.headers


async def test_given_a_bug_when_a_route_raises_then_it_stays_a_500(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/v1/bug", headers=AUTH)

    problem = _problem(response, 500)
    assert problem["type"] == PROBLEM_BASE + "internal-error"
    assert "retry-after" not in response.headers


async def test_given_an_outage_when_many_requests_fail_then_the_log_has_one_line_not_one_each(
    client: httpx.AsyncClient, service: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="shared.problems"):
        for _ in range(25):
            assert (await client.get("/v1/down", headers=AUTH)).status_code == 503

    lines = [r.getMessage() for r in caplog.records if r.name == "shared.problems"]
    assert len(lines) == 1, lines
    assert service in lines[0] and "database is unavailable" in lines[0]
    assert "ConnectionRefusedError" in lines[0] or "OperationalError" in lines[0]


# ---- logs --------------------------------------------------------------------------------------


def _log_line(formatter: logging.Formatter, message: str, *args: object) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    log = logging.getLogger(f"creditwatch.test.escape.{uuid.uuid4().hex}")
    log.propagate = False
    log.addHandler(handler)
    try:
        log.warning(message, *args)
    finally:
        log.removeHandler(handler)
    return stream.getvalue()


def test_given_a_path_with_control_characters_when_logged_plainly_then_they_are_escaped() -> None:
    line = _log_line(PlainLines("%(message)s"), "GET %s failed", "/v1/customers/\x00\n\x1b[2J/x")

    assert line == "GET /v1/customers/\\x00\\n\\x1b[2J/x failed\n"  # one line, nothing raw


def test_given_a_traceback_when_logged_plainly_then_its_own_line_breaks_are_kept() -> None:
    formatter = PlainLines("%(message)s")
    try:
        raise ValueError("bad \x00 value")
    except ValueError:
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(formatter)
        log = logging.getLogger("creditwatch.test.escape.traceback")
        log.propagate = False
        log.addHandler(handler)
        log.exception("failed on %s", "/v1/\x00")
        log.removeHandler(handler)
    text = stream.getvalue()

    assert "\x00" not in text
    assert text.startswith("failed on /v1/\\x00\nTraceback (most recent call last):\n")
    assert "ValueError: bad \\x00 value" in text


def test_given_control_characters_when_logged_as_json_then_the_line_holds_none_raw() -> None:
    line = _log_line(JsonLines(), "GET %s failed", "/v1/\x00\n\x9b")

    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in line.rstrip("\n"))
    assert json.loads(line)["message"] == "GET /v1/\x00\n\x9b failed"


def test_escape_controls_leaves_other_text_alone() -> None:
    assert escape_controls("Müller\tΩ\r\x85") == "Müller\\tΩ\\r\\x85"
