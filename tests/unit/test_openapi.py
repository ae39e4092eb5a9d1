"""The OpenAPI documents (issue 21): the committed ones in docs/openapi/ are what the apps
generate; every operation says what it answers — a typed 2xx body, every problem as
application/problem+json with the one Problem schema (Retry-After on 503, WWW-Authenticate
on 401/403), never FastAPI's own 422 — and carries a summary, a description and a tag; the
parameter rules are in the schema; a 201 documents its Location; /docs and /redoc load
nothing from elsewhere."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from shared import openapi_documents
from shared.http import MAX_CURSOR_CHARS, MAX_ORDER_ID_CHARS
from shared.openapi import CURRENCY_CODES, MONEY_PATTERN, TEXT_PATTERN
from shared.pagination import MAX_PAGE
from shared.policy import load_policy

SERVICES = openapi_documents.SERVICES
GRADES = [g.name for g in load_policy(None).grades]
PROBLEM = "application/problem+json"
METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


@pytest.fixture(scope="module")
def documents() -> dict[str, dict[str, Any]]:
    return {service: openapi_documents.generate(service) for service in SERVICES}


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield method.upper(), path, operation


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    found: dict[str, Any] = document
    for part in ref.removeprefix("#/").split("/"):
        found = found[part]
    return found


@pytest.mark.parametrize("service", SERVICES)
def test_given_the_committed_document_when_the_app_generates_its_own_then_they_are_the_same(
    service: str, documents: dict[str, dict[str, Any]]
) -> None:
    # Given the document committed in docs/openapi/
    committed = openapi_documents.path_of(service).read_text(encoding="utf-8")
    # When the app generates its own
    generated = openapi_documents.render(documents[service])
    # Then they are the same (else: python -m shared.openapi_documents, and review the diff)
    assert committed == generated, (
        f"docs/openapi/{service}.json is not what the app generates: "
        "run `python -m shared.openapi_documents`"
    )


@pytest.mark.parametrize("service", SERVICES)
def test_given_a_document_when_read_then_every_operation_has_a_summary_description_tag_and_id(
    service: str, documents: dict[str, dict[str, Any]]
) -> None:
    document = documents[service]
    ids = []
    for method, path, operation in operations(document):
        label = f"{service} {method} {path}"
        assert operation.get("summary"), label
        assert operation.get("description"), label
        assert operation.get("tags"), label
        ids.append(operation["operationId"])
        assert re.fullmatch(r"[a-z_]+", operation["operationId"]), label
    assert len(ids) == len(set(ids))
    # And every tag used is described
    described = {t["name"]: t.get("description") for t in document["tags"]}
    used = {t for _, _, op in operations(document) for t in op["tags"]}
    assert used == set(described) and all(described.values())


@pytest.mark.parametrize("service", SERVICES)
def test_given_a_document_when_its_responses_are_read_then_every_success_is_typed_and_every_error_a_problem(
    service: str, documents: dict[str, dict[str, Any]]
) -> None:
    document = documents[service]
    problem = document["components"]["schemas"]["Problem"]
    assert {"type", "title", "status", "detail"} <= set(problem["required"])
    assert {"instance", "field", "errors", "checks", "failing", "dependency"} <= set(
        problem["properties"]
    )
    assert "HTTPValidationError" not in json.dumps(document)
    for method, path, operation in operations(document):
        label = f"{service} {method} {path}"
        responses = operation["responses"]
        successes = [code for code in responses if code.startswith("2")]
        assert len(successes) == 1, label
        (success,) = successes
        content = responses[success].get("content", {})
        if success == "204":
            assert not content, label
        elif path == "/metrics":
            assert next(iter(content)).startswith("text/plain"), label
        else:
            # A named model (a component), never a free-form object
            schema = content["application/json"]["schema"]
            assert "$ref" in schema, label
            assert resolve(document, schema).get("properties"), label
        if success == "201":
            assert "Location" in responses[success].get("headers", {}), label
        errors = {code: r for code, r in responses.items() if code[0] in "45"}
        expected = {"500", "503"}
        if operation.get("security"):
            expected |= {"401", "403"}
        if operation.get("parameters") or operation.get("requestBody"):
            expected.add("422")
        if operation.get("requestBody"):
            expected.add("413")
        assert expected <= set(errors), f"{label}: {sorted(errors)}"
        for code, response in errors.items():
            assert list(response["content"]) == [PROBLEM], f"{label} {code}"
            assert response["content"][PROBLEM]["schema"] == {
                "$ref": "#/components/schemas/Problem"
            }
        assert "Retry-After" in errors["503"]["headers"], label
        for code in ("401", "403"):
            if code in errors:
                assert "WWW-Authenticate" in errors[code]["headers"], label
    # And whatever can be missing is documented where it can be
    paths = document["paths"]
    for path, item in paths.items():
        if "{" in path:
            for operation in item.values():
                assert "404" in operation["responses"] or path.startswith("/v1/reviews"), path


@pytest.mark.parametrize("service", SERVICES)
def test_given_a_document_when_its_posts_are_read_then_each_documents_the_idempotency_key(
    service: str, documents: dict[str, dict[str, Any]]
) -> None:
    posts = [(p, op) for m, p, op in operations(documents[service]) if m == "POST"]
    assert posts
    for path, operation in posts:
        (header,) = [p for p in operation["parameters"] if p["in"] == "header"]
        assert (header["name"], header["required"]) == ("Idempotency-Key", False), path
        assert "409" in operation["responses"], path
        (success,) = [r for c, r in operation["responses"].items() if c.startswith("2")]
        assert "Idempotent-Replayed" in success["headers"], path


def test_given_the_limits_document_when_the_credit_check_is_read_then_it_is_typed_in_full(
    documents: dict[str, dict[str, Any]],
) -> None:
    document = documents["limits"]
    operation = document["paths"]["/v1/credit-checks"]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["currency"]["enum"] == list(CURRENCY_CODES)
    assert body["properties"]["currency"]["pattern"] == "^[A-Z]{3}$"
    assert body["properties"]["order_id"]["maxLength"] == MAX_ORDER_ID_CHARS
    amount = body["properties"]["amount"]["anyOf"]
    assert {branch["type"] for branch in amount} == {"string", "number"}
    answer = resolve(
        document, operation["responses"]["200"]["content"]["application/json"]["schema"]
    )
    properties = answer["properties"]
    assert properties["decision"]["enum"] == ["approved", "review", "rejected"]
    assert set(properties["reasons"]["items"]["enum"]) == {
        "within_limit",
        "exceeds_available",
        "exceeds_group_available",
        "credit_hold",
        "overdue_beyond_tolerance",
        "no_credit_limit",
        "limit_expired",
        "grade_not_eligible",
        "currency_mismatch",
    }
    for money in ("amount", "limit", "exposure", "reserved", "available", "shortfall"):
        assert properties[money]["pattern"] == MONEY_PATTERN, money
    assert properties["currency"]["pattern"] == "^[A-Z]{3}$"
    assert properties["evaluated_at"]["format"] == "date-time"
    assert set(answer["required"]) >= {"check_id", "decision", "reasons", "limit", "evaluated_at"}


def _parameters(document: dict[str, Any], name: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{method} {path}", parameter)
        for method, path, operation in operations(document)
        for parameter in operation.get("parameters", [])
        if parameter["name"] == name
    ]


def test_given_the_documents_when_their_parameters_are_read_then_the_rules_are_in_the_schema(
    documents: dict[str, dict[str, Any]],
) -> None:
    for service, document in documents.items():
        for method, path, operation in operations(document):
            for parameter in operation.get("parameters", []):
                schema = parameter["schema"]
                label = f"{service} {method} {path} {parameter['name']}"
                # A query parameter is absent or a value, never null
                assert "anyOf" not in schema, label
                if parameter["in"] == "path":
                    assert schema["pattern"] == TEXT_PATTERN, label
                    assert schema["minLength"] == 1 and schema["maxLength"] <= 1000, label
        for label, cursor in _parameters(document, "cursor"):
            assert cursor["schema"]["maxLength"] == MAX_CURSOR_CHARS, label
            assert cursor["schema"]["pattern"], label
        for label, limit in _parameters(document, "limit"):
            assert (limit["schema"]["minimum"], limit["schema"]["maximum"]) == (1, MAX_PAGE), label
        for label, as_of in _parameters(document, "as_of"):
            assert as_of["schema"]["format"] == "date-time", label
    limits = documents["limits"]
    ((_, grade),) = _parameters(limits, "grade")
    assert grade["schema"]["enum"] == GRADES
    ((_, sort),) = _parameters(limits, "sort")
    assert "-utilization" in sort["schema"]["enum"]
    ((_, status),) = _parameters(limits, "status")
    assert status["schema"]["enum"] == ["over_limit", "on_hold", "overdue"]
    ((_, order_id),) = _parameters(limits, "order_id")
    assert order_id["schema"]["maxLength"] == MAX_ORDER_ID_CHARS
    alerts = documents["alerts"]
    ((_, status),) = _parameters(alerts, "status")
    assert status["schema"]["enum"] == ["open", "acknowledged", "resolved", "active"]
    ((_, rule),) = _parameters(alerts, "rule")
    assert "limit_breach" in rule["schema"]["enum"]
    assessment = documents["assessment"]
    override = assessment["paths"]["/v1/customers/{customer_id}/assessment/override"]["post"]
    body = override["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["grade"]["enum"] == GRADES


# ---- the documentation pages ---------------------------------------------------------------


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_given_a_docs_page_when_served_then_every_asset_it_names_is_local_and_served(
    page: str,
) -> None:
    from services.limits.app import build
    from shared.auth import Principal, TokenRegistry
    from shared.settings import Settings

    app, _ = build(
        Settings(database_url="sqlite+aiosqlite:///:memory:"),
        tokens=TokenRegistry({"t": Principal("p", frozenset())}),
        consume=False,
        relay=False,
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://limits") as client:
        # When the page is served
        answer = await client.get(page)
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/html")
        # Then it may load nothing from elsewhere (the browser enforces it too)
        assert "default-src 'self'" in answer.headers["content-security-policy"]
        assert "connect-src 'self'" in answer.headers["content-security-policy"]
        html = answer.text
        assert not re.search(r"(?i)\b(?:https?:)?//", html.replace("http://www.w3.org", ""))
        assets = re.findall(r'(?:src|href|spec-url)="([^"]+)"', html)
        assert assets and all(url.startswith("/") for url in assets), assets
        # And every asset it names is served, whole
        for url in assets:
            asset = await client.get(url)
            assert asset.status_code == 200, url
            assert len(asset.content) > 0, url
        scripts = [u for u in assets if u.endswith(".js")]
        assert scripts, "the page loads its renderer"
