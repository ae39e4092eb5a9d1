"""A service SIGKILLed at any moment comes back and loses nothing (issue 19).

A simulated portfolio streams into assessment, limits and alerts (real ``creditwatch serve``
processes on PostgreSQL and Kafka) while operators check orders, request, approve and reject
limits, hold customers, override grades and acknowledge alerts. Each service is SIGKILLed
twice at seeded random points of the stream — mid-batch, mid-publish, mid-request — and
started again at once. In the end every service has applied everything (lag 0, outboxes
empty, ready), ``creditwatch verify`` is clean for all three, no output event is lost or
doubled, nothing is dead-lettered, and no HTTP request got anything but a proper answer
(a request the killed process never answered aside).
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from tests.faults.support import SERVICES, FaultSystem, running_system, workload

pytestmark = [pytest.mark.faults, pytest.mark.integration]

KILLS_PER_SERVICE = 2


def kill_plan(seed: int) -> list[tuple[float, float, str]]:
    """(fraction of the stream published, extra delay in seconds, service), in order."""
    rng = random.Random(seed)
    victims = [svc for svc in SERVICES for _ in range(KILLS_PER_SERVICE)]
    rng.shuffle(victims)
    points = sorted(rng.uniform(0.08, 0.9) for _ in victims)
    return [(p, rng.uniform(0.0, 0.4), svc) for p, svc in zip(points, victims, strict=True)]


async def kill_at_random_points(
    system: FaultSystem, plan: list[tuple[float, float, str]]
) -> list[float]:
    """Kill each planned victim when the stream reaches its point; start it again at once.
    Returns how far the stream was at each kill."""
    coming_back: dict[str, asyncio.Task[None]] = {}
    progress = []
    for fraction, delay, service in plan:
        await system.stream.reached(fraction)
        await asyncio.sleep(delay)
        if service in coming_back:  # killed before: only once it is up again
            await coming_back.pop(service)
        progress.append(system.stream.progress)
        window = await system.kill(service)
        coming_back[service] = asyncio.create_task(system.ready_again(service, window))
    await asyncio.gather(*coming_back.values())
    return progress


@pytest.mark.parametrize("seed", [1901, 1902])
async def test_services_sigkilled_at_random_points_mid_stream_come_back_with_nothing_lost(
    seed: int, tmp_path: Path, postgres_server_url: str, kafka_bootstrap: str
) -> None:
    # Given a portfolio of 50 customers (12 months, ~3,000 events) streaming in over ~25 s
    # while operators work the services
    work = workload(seed, customers=50, months=12)
    plan = kill_plan(seed)
    async with running_system(
        tmp_path, postgres_server_url, kafka_bootstrap, work, stream_seconds=25
    ) as system:
        await system.begin()

        # When each service is SIGKILLed twice at seeded random points and started again
        system.mark(f"streaming; kill plan {[(f'{f:.0%}', svc) for f, _, svc in plan]}")
        progress = await kill_at_random_points(system, plan)
        system.mark(f"killed at {[f'{p:.0%}' for p in progress]} of the stream; all ready again")
        await system.finish_stream()
        system.mark("stream published")

        # Then every kill landed mid-stream, and each service was started anew each time
        system.expect(all(p < 1.0 for p in progress), f"a kill came after the stream: {progress}")
        starts = {svc: p.starts for svc, p in system.procs.items()}
        system.expect(starts == dict.fromkeys(SERVICES, 1 + KILLS_PER_SERVICE), f"starts: {starts}")
        # ... and the system came through: lag 0, outboxes empty, ready, verify clean, no
        # output event lost, doubled or dead-lettered, every HTTP request properly answered
        # (but while its service was down)
        await system.assert_came_through()
