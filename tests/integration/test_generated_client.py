"""A client generated from the committed limits OpenAPI document (issue 21) is typed: the
generator (openapi-python-client, locked in requirements/codegen.txt and installed in a venv
of its own) reads the whole document without a warning, and the generated client's credit
check against the running app answers a generated model class — decision, reasons and
evaluation time as enums and a datetime, not a dict."""

from __future__ import annotations

import hashlib
import importlib
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.factories import cloudevent, customer, invoice, records
from services.limits.app import build
from shared.auth import Principal, TokenRegistry
from shared.openapi_documents import path_of
from shared.service import ServiceHost
from shared.settings import Settings
from tests.databases import reset

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements" / "codegen.txt"
PACKAGE = "creditwatch_limits_client"
ORDERS = "orders-token"
NOW = datetime(2026, 3, 2, 12, tzinfo=UTC)  # the invoice is not overdue yet
TOKENS = TokenRegistry({ORDERS: Principal("order-entry", frozenset({"credit:check"}))})


def _run(*command: str | Path) -> None:
    done = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert done.returncode == 0, f"{command}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def generator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """openapi-python-client at the lock's versions (hash-checked), in a venv of its own:
    it needs an older typer than the creditwatch CLI (see requirements/codegen.in)."""
    digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()[:16]
    venv = tmp_path_factory.getbasetemp() / f"codegen-{digest}"
    uv = Path(sys.executable).with_name("uv")
    if not (venv / "bin" / "openapi-python-client").exists():
        _run(uv, "venv", "--quiet", "--python", sys.executable, venv)
        _run(uv, "pip", "install", "--quiet", "--python", venv / "bin" / "python",
             "--require-hashes", "-r", LOCK)  # fmt: skip
    return venv / "bin" / "openapi-python-client"


@pytest.fixture(scope="module")
def client_package(generator: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    # Given a client generated from the committed document, with no warning
    out = tmp_path_factory.mktemp("generated")
    config = out / "config.yaml"
    config.write_text("post_hooks: []\n")  # no formatter run on the generated code
    _run(
        generator,
        "generate",
        "--path",
        path_of("limits"),
        "--output-path",
        out / PACKAGE,
        "--meta",
        "none",
        "--config",
        config,
        "--fail-on-warning",
    )
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(out))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


@pytest.fixture
async def app_host(postgres_url: str) -> AsyncIterator[tuple[Any, ServiceHost]]:
    # And the limits app on the real PostgreSQL, with a customer rated BBB
    app, host = build(
        Settings(database_url=postgres_url), tokens=TOKENS, consume=False, clock=lambda: NOW
    )
    await reset(host.engine, "limits")
    assessed = cloudevent(
        "assessment.completed",
        "G-1",
        {
            "assessment_id": "as-G-1",
            "customer_id": "G-1",
            "score": 60,
            "grade": "BBB",
            "risk_level": "medium",
            "policy_version": "2026.1",
            "assessed_at": "2026-01-02T00:00:00Z",
        },
        id="as-G-1",
        source="/test/assessment",
    )
    await host.core.process_records(
        records([customer("G-1"), assessed, invoice("G-1", "I-1", "2500.00")])
    )
    yield app, host
    await host.close()


async def test_given_a_generated_client_when_it_checks_an_order_then_the_answer_is_a_typed_model(
    client_package: Any, app_host: tuple[Any, ServiceHost]
) -> None:
    app, _ = app_host
    models = importlib.import_module(f"{PACKAGE}.models")
    credit_check = importlib.import_module(f"{PACKAGE}.api.credit_checks.credit_check")
    get_check = importlib.import_module(f"{PACKAGE}.api.credit_checks.get_check")
    client = client_package.AuthenticatedClient(base_url="http://limits", token=ORDERS)
    client.set_async_httpx_client(
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://limits",
            headers={"Authorization": f"Bearer {ORDERS}"},
        )
    )
    body = models.CreditCheckCheckRequest(
        order_id="SO-1",
        customer_id="G-1",
        currency=models.CreditCheckCheckRequestCurrency.EUR,
        amount="1500.00",
    )
    # When it checks an order
    answer = await credit_check.asyncio(client=client, body=body)
    # Then the answer is the generated model, typed field by field
    assert isinstance(answer, models.CreditCheck), answer
    assert answer.decision == models.CreditCheckDecision.APPROVED
    assert answer.reasons == [models.CreditCheckReasonsItem.WITHIN_LIMIT]
    assert (answer.amount, answer.currency, answer.shortfall) == ("1500.00", "EUR", "0.00")
    assert isinstance(answer.evaluated_at, datetime) and answer.evaluated_at.tzinfo is not None
    assert isinstance(answer.reservation_expires_at, datetime)
    # And an error is the generated Problem (a check of nothing, refused as 422)
    detailed = await credit_check.asyncio_detailed(
        client=client,
        body=models.CreditCheckCheckRequest.from_dict({**body.to_dict(), "amount": "0"}),
    )
    assert detailed.status_code == 422
    assert isinstance(detailed.parsed, models.Problem)
    assert detailed.parsed.field == "amount"
    # And the token without credit:read is told so, in the same typed way
    refused = await get_check.asyncio_detailed(check_id=answer.check_id, client=client)
    assert refused.status_code == 403 and isinstance(refused.parsed, models.Problem)
    await client.get_async_httpx_client().aclose()
