"""A customer's history does not slow it down (issue 20), end to end: the limits service as a
real process on the real PostgreSQL and Kafka, a customer with a few thousand settled
invoices against a fresh one — the next events and the next credit checks cost the same.

(bench.history measures the same at 50,000 settled invoices; this test guards the shape.)
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from datetime import date, timedelta
from typing import Any

import pytest

from harness import e2e as s
from harness.e2e import Publisher, Stack

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

SETTLED = 3000
HEAVY, FRESH = "HIST-HEAVY", "HIST-FRESH"
START = date(2021, 1, 4)


@pytest.fixture(scope="module")
async def stack(
    tmp_path_factory: pytest.TempPathFactory, postgres_server_url: str, kafka_bootstrap: str
) -> AsyncIterator[tuple[Stack, Publisher]]:
    stack = Stack(
        tmp_path_factory.mktemp("history"),
        postgres_server_url,
        kafka_bootstrap,
        services=("limits",),
    )
    await stack.start()
    pub = await Publisher(kafka_bootstrap, stack.prefix).start()
    try:
        yield stack, pub
    finally:
        await pub.stop()
        await stack.stop()


def _settled_pair(cid: str, n: int) -> list[dict[str, Any]]:
    day = START + timedelta(days=n // 3)
    inv = f"{cid}-I{n}"
    return [
        s.invoice(cid, inv, "100.00", issued=day, due=day + timedelta(days=30)),
        s.payment(
            cid,
            f"{cid}-P{n}",
            "100.00",
            received=day + timedelta(days=20),
            allocations=[(inv, "100.00")],
        ),
    ]


async def _exposure(client: Any, cid: str) -> dict[str, Any]:
    response = await client.get(f"/v1/customers/{cid}/exposure")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def _wait_receivables(client: Any, cid: str, amount: str, within: float = 120) -> None:
    deadline = time.monotonic() + within
    while True:
        response = await client.get(f"/v1/customers/{cid}/exposure")
        if response.status_code == 200 and response.json()["open_receivables"] == amount:
            return
        assert time.monotonic() < deadline, f"{cid} never reached {amount}: {response.text}"
        await asyncio.sleep(0.05)


async def test_given_thousands_of_settled_invoices_then_events_and_checks_cost_what_a_fresh_customers_do(
    stack: tuple[Stack, Publisher],
) -> None:
    st, pub = stack
    # Given two customers, one with 3,000 invoices paid over the years, one new
    for cid in (HEAVY, FRESH):
        await pub.send(s.registered(cid))
    history = [e for n in range(SETTLED) for e in _settled_pair(HEAVY, n)]
    for start in range(0, len(history), 1000):
        await pub.send(*history[start : start + 1000])
    async with st.client("limits") as client:
        await _wait_receivables(client, HEAVY, "0.00", within=300)
        assert (await _exposure(client, FRESH))["open_receivables"] == "0.00"
        # The heavy customer's row holds what is open, not its history.
        async with st.engine.connect() as conn:
            docs = dict(
                (
                    await conn.exec_driver_sql(
                        "SELECT customer_id, length(state) FROM limits_customers "
                        "WHERE customer_id IN ($1, $2)",
                        (HEAVY, FRESH),
                    )
                ).all()
            )
        assert docs[HEAVY] < 2 * docs[FRESH] + 500, docs

        # When each gets new invoices, one at a time, and the time to see each applied is
        # measured (publish → exposure shows it), alternating between the two
        lag: dict[str, list[float]] = {HEAVY: [], FRESH: []}
        for n in range(12):
            for cid in (HEAVY, FRESH):
                day = date.today() - timedelta(days=1)
                started = time.monotonic()
                await pub.send(
                    s.invoice(cid, f"{cid}-NEW{n}", "10.00", issued=day, due=day + timedelta(30))
                )
                await _wait_receivables(client, cid, f"{10 * (n + 1)}.00")
                lag[cid].append(time.monotonic() - started)
        # And each is checked, alternating
        check: dict[str, list[float]] = {HEAVY: [], FRESH: []}
        async with st.client("limits", s.ALL) as orders:
            for n in range(40):
                for cid in (HEAVY, FRESH):
                    started = time.perf_counter()
                    response = await orders.post(
                        "/v1/credit-checks",
                        json={
                            "order_id": f"{cid}-SO-{n}",
                            "customer_id": cid,
                            "amount": "1.00",
                            "currency": "EUR",
                            "reserve": False,
                        },
                    )
                    check[cid].append(time.perf_counter() - started)
                    assert response.status_code == 200, response.text

    # Then the heavy customer costs what the fresh one does (medians; the machine is noisy)
    event_ratio = statistics.median(lag[HEAVY]) / statistics.median(lag[FRESH])
    check_ratio = statistics.median(check[HEAVY]) / statistics.median(check[FRESH])
    print(f"heavy/fresh: event {event_ratio:.2f}x, check {check_ratio:.2f}x, documents {docs}")
    assert event_ratio < 1.5, (lag, event_ratio)
    assert check_ratio < 1.5, (check, check_ratio)
