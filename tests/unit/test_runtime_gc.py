"""The collector's tuning: full collections on the service's schedule, not CPython's rule."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from shared import runtime


@pytest.fixture
def collector() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_tuned_the_oldest_generation_is_left_to_the_services_schedule(collector: None) -> None:
    runtime.tune_gc()
    assert gc.get_threshold() == (20_000, 50, runtime.FULL_COLLECTION_NEVER)


async def test_full_collections_run_every_interval_until_stopped(collector: None) -> None:
    runtime.tune_gc()
    stop = asyncio.Event()
    before = gc.get_stats()[2]["collections"]
    running = asyncio.create_task(runtime.full_collections(stop, interval=0.05))
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.wait_for(running, 1)
    assert gc.get_stats()[2]["collections"] - before >= 3
