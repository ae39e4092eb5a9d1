"""Each service's API conforms to its OpenAPI document (issue 21): schemathesis (every check:
status codes, content types, headers and bodies against the documented schemas, valid data
accepted, invalid data refused, methods, authentication, resources) runs against each service
as a process (`creditwatch serve`) on the real PostgreSQL, seeded with customers, checks,
requests, assessments and alerts so that the GETs find real rows, and must find nothing.

The number of examples is bounded (`EXAMPLES` per operation) so the three runs together take a
couple of minutes on this machine; the seed is fixed so a failure can be replayed. The only
test-side help is in `schemathesis_hooks`: it keeps valid requests valid where the document
cannot say what valid is (an amount's decimals depend on its currency, expires_at must be in
the future, a cursor is only what the API returned) — see that module.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import processes, servers
from harness.factories import cloudevent, records
from shared.auth import Principal, TokenRegistry
from shared.settings import Settings
from tests.databases import reset

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("CREDITWATCH_SCHEMATHESIS_EXAMPLES", "100"))
SEED = 2121
# The harness's principals (processes.TOKENS), for the seeding done in this process too.
TOKENS = TokenRegistry(
    {
        token: Principal(str(entry["principal"]), frozenset(entry["scopes"]))
        for token, entry in processes.TOKENS.items()
    }
)
# A path parameter (or operation id and parameter) -> an id that exists.
Seeded = dict[str, str]


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _seed_limits(url: str) -> Seeded:
    from services.limits.app import build

    app, host = build(Settings(database_url=url), tokens=TOKENS, consume=False, relay=False)
    await reset(host.engine, "limits")
    assessed = [
        cloudevent(
            "assessment.completed",
            cid,
            {
                "assessment_id": f"as-{cid}",
                "customer_id": cid,
                "score": 60,
                "grade": "BBB",
                "risk_level": "medium",
                "policy_version": "2026.1",
                "assessed_at": "2026-01-02T00:00:00Z",
            },
            id=f"as-{cid}",
            source="/test/assessment",
        )
        for cid in ("C-1", "C-2", "C-3")
    ]
    from harness.factories import customer, invoice

    await host.core.process_records(
        records(
            [
                customer("C-1"),
                customer("C-2"),
                customer("C-3", parent="C-2"),
                customer("C-4", currency="USD"),
                *assessed,
                invoice("C-1", "I-1", "2500.00", order_id="SO-0"),
                invoice("C-3", "I-2", "900.00"),
            ]
        )
    )
    ids: Seeded = {"customer_id": "C-1", "order_id": "SO-1"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://limits") as client:
        check = await client.post(
            "/v1/credit-checks",
            headers=_auth(processes.CHECK),
            json={"order_id": "SO-1", "customer_id": "C-1", "amount": "100.00", "currency": "EUR"},
        )
        assert check.status_code == 200, check.text
        ids["check_id"] = check.json()["check_id"]
        for limit in ("250000.00", "1000.00"):  # an increase (pending), a decrease (applied)
            made = await client.post(
                "/v1/customers/C-1/limit-requests",
                headers=_auth(processes.WRITE),
                json={"requested_limit": limit, "reason": "seed"},
            )
            assert made.status_code == 201, made.text
            ids.setdefault("request_id", made.json()["request_id"])
        held = await client.post(
            "/v1/customers/C-4/hold", headers=_auth(processes.ALL), json={"reason": "seed"}
        )
        assert held.status_code == 200, held.text
    await host.close()
    return ids


async def _seed_assessment(url: str) -> Seeded:
    from services.assessment.app import build

    app, host = build(Settings(database_url=url), tokens=TOKENS, consume=False, relay=False)
    await reset(host.engine, "assessment")
    statement = {
        "statement_id": "FY2025",
        "customer_id": "C-1",
        "period_end": "2025-12-31",
        "period_months": 12,
        "currency": "EUR",
        "balance_sheet": {
            "current_assets": "500.00",
            "total_assets": "1000.00",
            "current_liabilities": "250.00",
            "total_liabilities": "600.00",
            "equity": "400.00",
            "retained_earnings": "200.00",
        },
        "income_statement": {
            "revenue": "1200.00",
            "ebit": "100.00",
            "interest_expense": "20.00",
            "net_income": "60.00",
        },
    }
    from harness.factories import customer

    await host.core.process_records(
        records(
            [
                customer("C-1"),
                customer("C-2"),
                cloudevent(
                    "financial_statement.published",
                    "C-1",
                    statement,
                    id="fs-C-1",
                    source="/test/erp",
                ),
            ]
        )
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://assessment") as client:
        made = await client.post(
            "/v1/customers/C-2/assessment/override",
            headers=_auth(processes.WRITE),
            json={"grade": "BB", "reason": "seed"},
        )
        assert made.status_code == 201, made.text
    await host.close()
    return {"customer_id": "C-1"}


async def _seed_alerts(url: str) -> Seeded:
    from services.alerts.app import build

    _, host = build(Settings(database_url=url), tokens=TOKENS, consume=False, relay=False)
    await reset(host.engine, "alerts")
    exposures: list[dict[str, Any] | bytes] = []
    for n, (cid, exposure) in enumerate((("C-1", "120000.00"), ("C-2", "95000.00"))):
        available = format(100000 - float(exposure), ".2f")
        exposures.append(
            cloudevent(
                "exposure.updated",
                cid,
                {
                    "customer_id": cid,
                    "currency": "EUR",
                    "open_receivables": exposure,
                    "overdue_amount": "0.00",
                    "overdue_buckets": {},
                    "max_days_overdue": 0,
                    "reserved": "0.00",
                    "exposure": exposure,
                    "limit": "100000.00",
                    "available": available,
                    "utilization": "1.2000" if cid == "C-1" else "0.9500",
                    "on_hold": False,
                    "as_of": "2026-03-01T09:00:00Z",
                },
                id=f"exposure-{cid}-{n}",
                source="/creditwatch/limits",
            )
        )
    await host.core.process_records(records(exposures))
    async with host.engine.connect() as conn:
        from services.alerts import store

        rows = await store.list_alerts(conn, limit=10)
    await host.close()
    assert rows, "the seed raised no alert"
    return {"customer_id": "C-1", "alert_id": rows[0].alert_id}


SEEDERS: dict[str, Callable[[str], Coroutine[Any, Any, Seeded]]] = {
    "assessment": _seed_assessment,
    "limits": _seed_limits,
    "alerts": _seed_alerts,
}


def _strict(document: dict[str, Any]) -> dict[str, Any]:
    """The document with every documented response object closed (no member it does not
    name): the published one leaves them open, as a contract that may add fields does, but
    here a member a route sends and its model does not describe is a failure."""
    for schema in document["components"]["schemas"].values():
        if "properties" in schema and schema.get("additionalProperties", True) is True:
            schema["additionalProperties"] = False
    return document


def _with_examples(document: dict[str, Any], ids: Seeded) -> dict[str, Any]:
    """The document with the seeded ids as its path parameters' examples: schemathesis's
    examples phase then reads real rows (the generated ids find none)."""
    for item in document["paths"].values():
        for operation in item.values():
            for parameter in operation.get("parameters", []):
                if parameter["in"] != "path":
                    continue
                name = parameter["name"]
                value = ids.get(f"{operation['operationId']}.{name}", ids.get(name))
                if value is not None:
                    parameter["example"] = value
    return document


@pytest.mark.parametrize("service", ["assessment", "limits", "alerts"])
def test_given_a_seeded_service_when_schemathesis_runs_every_check_then_nothing_fails(
    service: str, postgres_server_url: str, tmp_path: Path
) -> None:
    # Given the service seeded with real rows, served as a process on the real PostgreSQL
    url = servers.create_database(postgres_server_url)
    ids = asyncio.run(SEEDERS[service](url))
    env = processes.service_env(database_url=url, bootstrap="127.0.0.1:9")
    proc = processes.ServiceProcess(
        service, env, tmp_path, "--no-consume", "--no-relay", "--no-migrate"
    ).start()
    try:
        proc.wait_ready()
        document = httpx.get(f"{proc.url}/openapi.json", timeout=10).json()
        schema = tmp_path / "openapi.json"
        schema.write_text(json.dumps(_strict(_with_examples(document, ids))))
        # When schemathesis runs every check against it
        started = time.monotonic()
        run = subprocess.run(
            [
                str(Path(sys.executable).with_name("schemathesis")),
                "run",
                str(schema),
                "--url",
                proc.url,
                "--checks",
                "all",
                "--max-examples",
                str(EXAMPLES),
                "--seed",
                str(SEED),
                "--workers",
                "1",
                "--header",
                f"Authorization: Bearer {processes.ALL}",
                "--request-timeout",
                "20",
                "--no-color",
                "--generation-database",
                "none",
            ],
            env={
                **os.environ,
                "SCHEMATHESIS_HOOKS": "tests.integration.schemathesis_hooks",
                "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
            },
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
        took = time.monotonic() - started
    finally:
        proc.stop()
    report = run.stdout + run.stderr[-3000:]
    print(f"{service}: schemathesis took {took:.0f}s\n{report}")
    if os.environ.get("CREDITWATCH_SCHEMATHESIS_REPORT"):
        Path(os.environ["CREDITWATCH_SCHEMATHESIS_REPORT"], f"{service}.txt").write_text(report)
    # Then it finds no failure and no error
    assert run.returncode == 0, f"{service}:\n{report}\n---- service log ----\n{proc.tail(80)}"
