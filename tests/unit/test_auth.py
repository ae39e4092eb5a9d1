"""Bearer tokens: configuration, dev tokens, and 401/403 decided before anything is looked up."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI

from shared.auth import SCOPES, ConfigError, Principal, TokenRegistry, dev_tokens, require
from shared.http import create_app
from shared.problems import NotFound
from shared.settings import Settings

ANALYST_TOKEN = "analyst-token-0123456789"
ORDER_ENTRY_TOKEN = "order-entry-token-0123456789"
TOKENS_JSON = json.dumps(
    {
        ANALYST_TOKEN: {"principal": "analyst", "scopes": ["credit:read", "credit:write"]},
        ORDER_ENTRY_TOKEN: {"principal": "erp", "scopes": ["credit:check"]},
    }
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("CREDITWATCH_"):
            monkeypatch.delenv(name)


async def _all_ready() -> dict[str, bool]:
    return {"database": True}


def _app() -> FastAPI:
    settings = Settings(api_tokens=TOKENS_JSON)
    app = create_app(
        "limits",
        settings=settings,
        tokens=TokenRegistry.from_settings(settings),
        readiness=_all_ready,
    )
    router = APIRouter()

    @router.get("/v1/customers/{customer_id}/limit")
    async def get_limit(
        customer_id: str, principal: Principal = Depends(require("credit:read"))
    ) -> dict[str, str]:
        if customer_id != "C-1":
            raise NotFound(f"No customer {customer_id}")
        return {"customer_id": customer_id, "principal": principal.name}

    app.include_router(router)
    return app


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://limits") as http:
        yield http


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- configuration ---------------------------------------------------------------------------


def test_tokens_from_the_environment_map_to_principals_with_scopes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given tokens in CREDITWATCH_API_TOKENS
    monkeypatch.setenv("CREDITWATCH_API_TOKENS", TOKENS_JSON)

    # When the registry is built
    registry = TokenRegistry.from_settings(Settings())

    # Then each token authenticates as its principal and nothing else does
    assert registry.authenticate(ANALYST_TOKEN) == Principal(
        "analyst", frozenset({"credit:read", "credit:write"})
    )
    assert registry.authenticate(ORDER_ENTRY_TOKEN) == Principal("erp", frozenset({"credit:check"}))
    assert registry.authenticate("not-a-token") is None
    assert registry.generated == {}
    assert len(registry) == 2


def test_tokens_can_come_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the tokens in a file named by CREDITWATCH_API_TOKENS_FILE
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(TOKENS_JSON, encoding="utf-8")
    monkeypatch.setenv("CREDITWATCH_API_TOKENS_FILE", str(tokens_file))

    # When the registry is built
    registry = TokenRegistry.from_settings(Settings())

    # Then the file's tokens authenticate
    principal = registry.authenticate(ORDER_ENTRY_TOKEN)
    assert principal is not None and principal.name == "erp"


def test_a_missing_tokens_file_is_a_config_error_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CREDITWATCH_API_TOKENS_FILE"):
        TokenRegistry.from_settings(Settings(api_tokens_file=tmp_path / "absent.json"))


def test_setting_both_the_variable_and_the_file_is_refused(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(TOKENS_JSON, encoding="utf-8")

    with pytest.raises(ConfigError, match="not both"):
        TokenRegistry.from_settings(Settings(api_tokens=TOKENS_JSON, api_tokens_file=tokens_file))


def test_an_unknown_scope_is_refused_naming_the_principal_and_scope_but_not_the_token() -> None:
    # Given a token with a misspelt scope
    config = json.dumps({"s3cret-token-abc": {"principal": "erp", "scopes": ["credit:chek"]}})

    # When the registry is built
    with pytest.raises(ConfigError) as raised:
        TokenRegistry.from_settings(Settings(api_tokens=config))

    # Then the error names the principal and the scope, never the token
    message = str(raised.value)
    assert "'erp'" in message and "'credit:chek'" in message
    assert "s3cret-token-abc" not in message


@pytest.mark.parametrize(
    "config",
    [
        '{"s3cret-token-abc": ',  # not JSON
        '["s3cret-token-abc"]',  # not an object
        '{"s3cret-token-abc": {"scopes": ["credit:read"]}}',  # no principal
        '{"s3cret-token-abc": {"principal": "erp", "scopes": "credit:read"}}',  # scopes not a list
    ],
)
def test_malformed_token_config_is_refused_without_echoing_the_token(config: str) -> None:
    with pytest.raises(ConfigError) as raised:
        TokenRegistry.from_settings(Settings(api_tokens=config))

    assert "CREDITWATCH_API_TOKENS" in str(raised.value)
    assert "s3cret-token-abc" not in str(raised.value)


def test_outside_dev_mode_a_service_refuses_to_start_without_tokens() -> None:
    # Given production settings with no tokens
    settings = Settings(dev_mode=False)

    # When the registry is built, or an app is created with an empty one
    # Then startup fails
    with pytest.raises(ConfigError, match="refuses to start"):
        TokenRegistry.from_settings(settings)
    with pytest.raises(ConfigError, match="refuses to start"):
        create_app("limits", settings=settings, tokens=TokenRegistry({}), readiness=_all_ready)


def test_in_dev_mode_without_tokens_a_dev_and_an_approver_token_are_generated() -> None:
    # Given dev mode and no configured tokens
    settings = Settings(dev_mode=True)

    # When the registry is built
    registry = TokenRegistry.from_settings(settings)

    # Then two random tokens with every scope exist, for "dev" and "dev-approver"
    names = sorted(principal.name for principal in registry.generated.values())
    assert names == ["dev", "dev-approver"]
    for token, principal in registry.generated.items():
        assert len(token) >= 32
        assert principal.scopes == SCOPES
        assert registry.authenticate(token) == principal
    # and every start makes new ones
    assert set(dev_tokens()).isdisjoint(registry.generated)


def test_in_dev_mode_configured_tokens_are_used_and_nothing_is_generated() -> None:
    registry = TokenRegistry.from_settings(Settings(dev_mode=True, api_tokens=TOKENS_JSON))

    assert registry.generated == {}
    assert registry.authenticate(ANALYST_TOKEN) is not None


def test_the_registry_repr_shows_principals_but_no_tokens() -> None:
    registry = TokenRegistry.from_settings(Settings(api_tokens=TOKENS_JSON))

    assert ANALYST_TOKEN not in repr(registry)
    assert "analyst" in repr(registry)


def test_requiring_an_unknown_scope_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown scope"):
        require("credit:everything")


# --- HTTP ------------------------------------------------------------------------------------


async def test_a_request_without_a_token_gets_401_with_a_bearer_challenge(
    client: httpx.AsyncClient,
) -> None:
    # When a protected route is called without Authorization
    response = await client.get("/v1/customers/C-1/limit")

    # Then 401 problem+json with WWW-Authenticate: Bearer
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["type"] == "https://creditwatch.dev/problems/unauthorized"


@pytest.mark.parametrize(
    "header",
    [f"Basic {ANALYST_TOKEN}", "Bearer", "Bearer    ", f"Bearer {ANALYST_TOKEN} extra", "junk"],
)
async def test_a_malformed_authorization_header_gets_401(
    client: httpx.AsyncClient, header: str
) -> None:
    response = await client.get("/v1/customers/C-1/limit", headers={"Authorization": header})

    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert ANALYST_TOKEN not in response.text


async def test_an_unknown_token_gets_401(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/customers/C-1/limit", headers=_bearer("guessed-token"))

    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


async def test_a_token_without_the_scope_gets_403(client: httpx.AsyncClient) -> None:
    # Given the order-entry token, which has only credit:check
    # When a credit:read route is called
    response = await client.get("/v1/customers/C-1/limit", headers=_bearer(ORDER_ENTRY_TOKEN))

    # Then 403 naming the missing scope
    assert response.status_code == 403
    body = response.json()
    assert body["type"] == "https://creditwatch.dev/problems/forbidden"
    assert body["required_scope"] == "credit:read"


async def test_a_token_with_the_scope_reaches_the_handler_as_its_principal(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/v1/customers/C-1/limit", headers=_bearer(ANALYST_TOKEN))

    assert response.status_code == 200
    assert response.json() == {"customer_id": "C-1", "principal": "analyst"}


async def test_auth_is_decided_before_existence(client: httpx.AsyncClient) -> None:
    # Given a customer that does not exist
    path = "/v1/customers/NO-SUCH-CUSTOMER/limit"

    # When it is asked for without a token, with the wrong scope, and properly
    anonymous = await client.get(path)
    wrong_scope = await client.get(path, headers=_bearer(ORDER_ENTRY_TOKEN))
    authorised = await client.get(path, headers=_bearer(ANALYST_TOKEN))

    # Then only the authorised caller learns that it does not exist
    assert (anonymous.status_code, wrong_scope.status_code, authorised.status_code) == (
        401,
        403,
        404,
    )


async def test_openapi_declares_the_bearer_scheme(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()

    assert schema["components"]["securitySchemes"]["bearer"]["scheme"].lower() == "bearer"
