"""After maker–checker traffic, ``creditwatch replay`` rebuilds every projection as it was and
``creditwatch verify`` finds nothing to complain about (issue 19, finding 2: the limits
replay crashed on PostgreSQL with "ON CONFLICT DO UPDATE command cannot affect row a second
time" once a request and its decision were folded in one batch).

A simulated portfolio streams in while an analyst requests limits — permanent and
temporary — and an approver approves or rejects them (the analyst may never decide its own;
a temporary request that has ended can only be rejected), alongside the usual checks, holds,
overrides and acknowledgements. Then each service is stopped, replayed and verified from
the command line, and started again: the limits it answers are those it answered before,
it carries on where it was, and the whole system still checks out.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.processes import APPROVE, READ, WRITE
from tests.faults.support import (
    MAKER_CHECKER_MIX,
    SERVICES,
    FaultSystem,
    cli,
    output_tail,
    read_topics,
    rfc3339,
    running_system,
    workload,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration]


@dataclass(frozen=True)
class Decided:
    customer: str
    request_id: str
    status: str  # as the approver's answer said
    limit: str


class Desk:
    """The analyst (maker) and the approver (checker) at the limits API."""

    def __init__(self, system: FaultSystem) -> None:
        self.system = system
        # No keep-alive: the service is stopped and started again mid-case.
        self.http = httpx.AsyncClient(
            base_url=system.stack.url("limits"),
            timeout=15,
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    async def close(self) -> None:
        await self.http.aclose()

    async def post(
        self, path: str, token: str, body: dict[str, Any] | None = None
    ) -> httpx.Response:
        return await self.http.post(path, json=body, headers={"Authorization": f"Bearer {token}"})

    async def get(self, path: str) -> dict[str, Any]:
        response = await self.http.get(path, headers={"Authorization": f"Bearer {READ}"})
        assert response.status_code == 200, (path, response.status_code, response.text)
        body: dict[str, Any] = response.json()
        return body

    async def limit(self, cid: str) -> Decimal:
        return Decimal((await self.get(f"/v1/customers/{cid}/limit"))["limit"])

    async def request(
        self, cid: str, limit: Decimal, *, lasts: float | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"requested_limit": f"{limit:.2f}", "reason": "fault suite: maker"}
        if lasts is not None:
            body["expires_at"] = rfc3339(datetime.now(UTC) + timedelta(seconds=lasts))
        response = await self.post(f"/v1/customers/{cid}/limit-requests", WRITE, body)
        assert response.status_code == 201, (response.status_code, response.text)
        answer: dict[str, Any] = response.json()
        return answer

    async def increase(self, cid: str, by: int, *, lasts: float | None = None) -> tuple[str, str]:
        """Ask for more than the customer has (an increase waits for a checker)."""
        wanted = await self.limit(cid) + by
        answer = await self.request(cid, wanted, lasts=lasts)
        assert answer["status"] == "pending", answer
        return answer["request_id"], f"{wanted:.2f}"

    async def decide(self, request_id: str, verdict: str, token: str = APPROVE) -> httpx.Response:
        return await self.post(
            f"/v1/limit-requests/{request_id}/{verdict}", token, {"note": f"fault suite: {verdict}"}
        )


async def maker_checker_round(
    system: FaultSystem, desk: Desk, customers: list[str]
) -> list[Decided]:
    """Every path of maker–checker once, on customers nobody else touches."""
    c1, c2, c3, c4, c5 = customers
    decided: list[Decided] = []

    # An increase: the maker may not approve it, the checker does, and only once.
    r1, l1 = await desk.increase(c1, 70000)
    own = await desk.decide(r1, "approve", token=WRITE)
    system.expect(own.status_code == 403, f"the maker approved its own request: {own.status_code}")
    first = await desk.decide(r1, "approve")
    again = await desk.decide(r1, "approve")
    system.expect(again.status_code == 409, f"approved twice: {again.status_code} {again.text}")
    decided.append(Decided(c1, r1, first.json().get("status", first.text), l1))

    # A decrease applies at once, no checker needed.
    half = (Decimal(l1) / 2).quantize(Decimal("0.01"))
    down = await desk.request(c1, half)
    decided.append(Decided(c1, down["request_id"], down["status"], f"{half:.2f}"))

    # An increase rejected.
    r2, l2 = await desk.increase(c2, 250000)
    second = await desk.decide(r2, "reject")
    decided.append(Decided(c2, r2, second.json().get("status", second.text), l2))

    # Temporary increases, one approved (it expires mid-case: the scheduler records that)
    # and one rejected.
    r3, l3 = await desk.increase(c3, 120000, lasts=10)
    third = await desk.decide(r3, "approve")
    decided.append(Decided(c3, r3, third.json().get("status", third.text), l3))
    r4, l4 = await desk.increase(c4, 95000, lasts=10)
    fourth = await desk.decide(r4, "reject")
    decided.append(Decided(c4, r4, fourth.json().get("status", fourth.text), l4))

    # A temporary request whose time ran out before anyone decided: it can only be rejected.
    r5, l5 = await desk.increase(c5, 80000, lasts=2)
    await asyncio.sleep(3)
    late = await desk.decide(r5, "approve")
    system.expect(late.status_code == 409, f"an ended request approved: {late.status_code}")
    fifth = await desk.decide(r5, "reject")
    decided.append(Decided(c5, r5, fifth.json().get("status", fifth.text), l5))

    system.operators.latest_expiry = max(
        system.operators.latest_expiry, datetime.now(UTC) + timedelta(seconds=10)
    )
    got = [d.status for d in decided]
    assert got == ["approved", "approved", "rejected", "approved", "rejected", "rejected"], got
    return decided


async def limits_as_answered(desk: Desk, customers: list[str]) -> dict[str, tuple[str, str]]:
    out = {}
    for cid in customers:
        body = await desk.get(f"/v1/customers/{cid}/limit")
        out[cid] = (body["limit"], body["source"])
    return out


async def test_replay_and_verify_after_maker_checker_traffic_rebuild_every_projection_as_it_was(
    tmp_path: Path, postgres_server_url: str, kafka_bootstrap: str
) -> None:
    # Given a portfolio of 30 customers streaming in while operators work the services, with
    # limit requests and decisions a good share of their traffic
    work = workload(1921, customers=30, months=6, probes=6)
    async with running_system(
        tmp_path,
        postgres_server_url,
        kafka_bootstrap,
        work,
        stream_seconds=8,
        mix=MAKER_CHECKER_MIX,
    ) as system:
        desk = Desk(system)
        try:
            await system.begin()

            # When the analyst requests limits and the approver decides them, every way
            decided = await maker_checker_round(system, desk, work.probes[1:6])
            system.mark(f"maker–checker round: {[(d.customer, d.status) for d in decided]}")
            await system.finish_stream()
            await system.settled()
            system.mark(f"settled; operators: {system.operators.summary()}")

            # Then the latest manual limit stands (the decrease after the approved increase),
            # each approved request's change is on credit.limits with its request id, the
            # rejected ones changed nothing, and the approved temporary limit has expired
            limits = await limits_as_answered(desk, work.worked + work.probes[1:6])
            c1, lowered = decided[1].customer, decided[1].limit
            system.expect(
                limits[c1] == (lowered, "manual"), f"{c1} after the decrease: {limits[c1]}"
            )
            changes = (
                await read_topics(system.bootstrap, [system.topic("credit.limits")], system.prefix)
            )["credit.limits"]
            published = {e["data"].get("request_id") for e in changes}
            for d in decided:
                system.expect(
                    (d.request_id in published) == (d.status == "approved"),
                    f"request {d.request_id} ({d.status}) on credit.limits: "
                    f"{d.request_id in published}",
                )
            expired = [
                e
                for e in changes
                if e["subject"] == decided[3].customer and e["data"]["reason"] == "expired"
            ]
            system.expect(expired, f"the temporary limit of {decided[3].customer} never expired")

            # When the services are stopped, each replayed and verified from the command
            # line, and started again
            codes = await asyncio.gather(
                *(asyncio.to_thread(system.procs[svc].stop) for svc in SERVICES)
            )
            system.expect(
                all(code == 0 for code in codes), f"not stopped cleanly: exit codes {codes}"
            )
            replays = await asyncio.gather(
                *(cli(system.stack.env, "replay", svc) for svc in SERVICES)
            )
            verifies = await asyncio.gather(
                *(cli(system.stack.env, "verify", svc) for svc in SERVICES)
            )
            for svc, replay, verify in zip(SERVICES, replays, verifies, strict=True):
                system.expect(
                    replay.returncode == 0,
                    f"replay {svc} exited {replay.returncode}:\n{output_tail(replay)}",
                )
                system.expect(
                    verify.returncode == 0,
                    f"verify {svc} after replay exited {verify.returncode}:\n{output_tail(verify)}",
                )
            system.mark(
                f"replayed {[r.returncode for r in replays]}, verified "
                f"{[v.returncode for v in verifies]} ({', '.join(SERVICES)})"
            )
            for proc in system.procs.values():
                proc.start()
            await asyncio.gather(
                *(asyncio.to_thread(p.wait_ready, 90) for p in system.procs.values())
            )

            # Then the limits answered are those answered before, and the system (which
            # carries on from where it was) still checks out
            again = await limits_as_answered(desk, list(limits))
            differ = {c: (limits[c], again[c]) for c in limits if limits[c] != again[c]}
            system.expect(not differ, f"limits changed by the replay: {differ}")
            await system.assert_came_through()
        finally:
            await desk.close()
