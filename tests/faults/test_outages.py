"""The database or the broker goes away mid-stream and comes back: every service carries on by
itself (issue 19).

A simulated portfolio streams into assessment, limits and alerts (real ``creditwatch serve``
processes) while operators work them over HTTP. Mid-stream, PostgreSQL — or, in the other
case, Kafka — is stopped for several seconds and started again (same data, same port). No
service is restarted. Each must then consume and publish again on its own, answer ready,
and end with lag 0, empty outboxes, ``creditwatch verify`` clean and no output event lost.

Each case stops a server of its own (``own_postgres``, ``own_kafka``): the servers the rest
of the suite shares are never touched.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from harness.servers import KafkaServer, PostgresServer
from tests.faults.support import (
    SERVICES,
    FaultSystem,
    LogMark,
    Window,
    now_s,
    running_system,
    workload,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration]

OUTAGE_S = 8.0
BROKER_OUTAGE_S = 10.0
# Log lines a service may write while the broker is away for BROKER_OUTAGE_S: it should say
# so now and then, not once per reconnect attempt of every client.
MAX_OUTAGE_LOG_LINES = 300


def healthz_stayed_ok(system: FaultSystem) -> None:
    """Liveness: no service ever reported itself dead (or stopped answering) — an outage of
    a dependency is no reason to be restarted. That this 200 means something is checked at
    the end of every case: /healthz may never say alive while /readyz says a background loop
    has ended (``Monitor.alive_while_dead``), and a consumer stalled without ending keeps
    the lag from reaching 0 (the failure then names what /healthz said)."""
    for svc in SERVICES:
        bad = [p for p in system.monitor.of(svc, "/healthz") if p.status != 200]
        system.expect(
            not bad,
            f"{svc} /healthz was not 200 {len(bad)} times, e.g. {bad[:3]}",
        )
        system.expect(
            len(system.monitor.of(svc, "/healthz")) > 10, f"{svc} /healthz was hardly polled"
        )


def not_restarted(system: FaultSystem) -> None:
    starts = {svc: p.starts for svc, p in system.procs.items()}
    system.expect(starts == dict.fromkeys(SERVICES, 1), f"services were restarted: {starts}")


async def test_postgresql_stopped_mid_stream_every_service_consumes_and_publishes_again_without_a_restart(
    tmp_path: Path, own_postgres: PostgresServer, kafka_bootstrap: str
) -> None:
    # Given a portfolio streaming in over ~25 s while operators work the services, all on a
    # PostgreSQL server of this case's own
    work = workload(1911, customers=40, months=12)
    async with running_system(
        tmp_path, own_postgres.url, kafka_bootstrap, work, stream_seconds=25
    ) as system:
        await system.begin()

        # When PostgreSQL is stopped (a fast shutdown, as pg_ctl stop -m fast) a third of the way in, stays down
        # for OUTAGE_S while the stream and the HTTP traffic go on, and is started again
        await system.stream.reached(0.3)
        outage = Window("database", None, now_s())
        system.windows.append(outage)
        await asyncio.to_thread(own_postgres.stop_process)
        system.mark("PostgreSQL stopped")
        await asyncio.sleep(OUTAGE_S)
        down_until = now_s()
        await asyncio.to_thread(own_postgres.start_process)
        system.mark("PostgreSQL started again")
        await system.stack.engine.dispose()  # the test's own connections died with the server

        # Then every service is ready again by itself, without a restart
        ready = await system.all_ready_again(within=60)
        outage.end = now_s() + 2.0
        system.mark("every service ready again (or not: see the problems)")
        # ... while the database was away, the API answered 503 (never 500, never silence),
        # /readyz said the database was down, and /healthz stayed 200 throughout
        during = [a for a in system.operators.answers if outage.start <= a.at <= down_until]
        system.expect(
            any(a.status == 503 for a in during),
            f"no 503 while the database was down; answers then: "
            f"{sorted({(a.op, a.status) for a in during}, key=str)}",
        )
        for svc in SERVICES:
            readyz = system.monitor.of(svc, "/readyz", outage.start, down_until)
            system.expect(
                any(p.status == 503 and "database" in p.failing for p in readyz),
                f"{svc} /readyz never reported the database down: {readyz[-3:]}",
            )
        healthz_stayed_ok(system)
        not_restarted(system)
        system.give_up_unless(ready)

        # ... and each one publishes again
        await system.probe_every_service_publishes(work.probes[0])
        system.mark("every service published again")
        await system.finish_stream()
        system.mark("stream published")
        # ... and the system came through: lag 0, outboxes empty, ready, verify clean, no
        # output event lost, and no HTTP answer but 503 while the database was away
        await system.assert_came_through()


async def test_kafka_stopped_mid_stream_every_service_resumes_without_a_restart_or_a_log_flood(
    tmp_path: Path, postgres_server_url: str, own_kafka: KafkaServer
) -> None:
    # Given a portfolio streaming in over ~25 s while operators work the services, all on a
    # Kafka broker of this case's own
    work = workload(1912, customers=40, months=12)
    async with running_system(
        tmp_path, postgres_server_url, own_kafka.bootstrap, work, stream_seconds=25
    ) as system:
        await system.begin()

        # When the broker is stopped a third of the way in, stays down for BROKER_OUTAGE_S
        # while the HTTP traffic goes on (upstream producers retry), and is started again
        # on the same data and port
        await system.stream.reached(0.3)
        logs = LogMark(system.procs)
        stopped = now_s()
        await asyncio.to_thread(own_kafka.stop_process)
        system.mark("Kafka stopped")
        await asyncio.sleep(BROKER_OUTAGE_S)
        down_until = now_s()
        lines = logs.lines_since()
        await asyncio.to_thread(own_kafka.start_process)
        system.mark(f"Kafka started again; log lines during the outage: {lines}")

        # Then every service is ready again by itself, without a restart
        ready = await system.all_ready_again(within=90)
        system.mark("every service ready again (or not: see the problems)")
        # ... while the broker was away, /readyz said so, the logs did not flood, and
        # /healthz stayed 200 throughout
        for svc in SERVICES:
            readyz = system.monitor.of(svc, "/readyz", stopped, down_until)
            system.expect(
                any(p.status == 503 and "broker" in p.failing for p in readyz),
                f"{svc} /readyz never reported the broker down during the outage; it said "
                f"{sorted({(p.status, p.failing) for p in readyz}, key=str)}",
            )
            system.expect(
                lines[svc] < MAX_OUTAGE_LOG_LINES,
                f"{svc} wrote {lines[svc]} log lines in {down_until - stopped:.0f}s of broker "
                f"outage; the first:\n{logs.text_since(svc, 15)}",
            )
        healthz_stayed_ok(system)
        not_restarted(system)
        system.give_up_unless(ready)

        # ... and each one publishes again
        await system.probe_every_service_publishes(work.probes[0], within=90)
        system.mark("every service published again")
        await system.finish_stream()
        system.mark("stream published")
        # ... and the system came through: lag 0, outboxes empty, ready, verify clean, no
        # output event lost, every HTTP request answered as usual
        await system.assert_came_through()
