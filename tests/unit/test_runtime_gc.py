"""The collector's tuning: young collections kept short, full ones only when memory grows."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref
from collections.abc import AsyncIterator, Iterator

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


class _Node:
    """An object that can sit in a reference cycle and be watched (weakref)."""

    def __init__(self) -> None:
        self.other: _Node | None = None


def _cycle() -> weakref.ref[_Node]:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@contextlib.asynccontextmanager
async def _running(**options: float) -> AsyncIterator[None]:
    stop = asyncio.Event()
    running = asyncio.create_task(runtime.collect_garbage(stop, **options))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(running, 1)


async def test_what_survives_a_while_is_moved_out_of_the_young_collections_sight(
    collector: None,
) -> None:
    runtime.tune_gc()
    async with _running(freeze_every=0.02):
        kept = [_Node() for _ in range(100)]
        watched = {id(node) for node in kept}
        assert any(id(o) in watched for o in gc.get_objects())
        await asyncio.sleep(0.1)
        # Still alive, in no generation any more: frozen.
        assert not any(id(o) in watched for o in gc.get_objects())
        assert all(gc.is_tracked(node) for node in kept)
    # Stopped: back in sight (a stopped service leaves nothing frozen behind).
    assert watched <= {id(o) for o in gc.get_objects()}


@pytest.fixture
def peak(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The process's peak memory as the collector job reads it (kB), set by the test."""
    value = [100_000]
    monkeypatch.setattr(runtime, "_peak_memory_kb", lambda: value[0])
    return value


def _grown(peak: list[int]) -> None:
    peak[0] = 2 * peak[0] + runtime.FULL_COLLECTION_SLACK_KB + 1


async def test_garbage_in_cycles_frozen_meanwhile_is_freed_by_the_full_collection(
    collector: None, peak: list[int]
) -> None:
    runtime.tune_gc()
    before = gc.get_stats()[2]["collections"]
    async with _running(freeze_every=0.02):
        watched = _cycle()
        await asyncio.sleep(0.1)  # frozen while alive; its last reference is the cycle's own
        gc.collect(0)
        gc.collect(1)
        assert watched() is not None  # out of the young collections' sight
        _grown(peak)
        for _ in range(50):
            if watched() is None:
                break
            await asyncio.sleep(0.02)
        assert watched() is None
    assert gc.get_stats()[2]["collections"] == before + 1


async def test_the_full_collection_comes_when_memory_doubles(
    collector: None, peak: list[int]
) -> None:
    """A full collection walks every object the process holds (0.7 s in a limits process
    under load): it is not run on a schedule, only when memory has grown."""
    runtime.tune_gc()
    before = gc.get_stats()[2]["collections"]
    async with _running(freeze_every=0.01):
        await asyncio.sleep(0.3)  # thirty rounds of the job
        assert gc.get_stats()[2]["collections"] == before  # memory has not grown
        peak[0] += runtime.FULL_COLLECTION_SLACK_KB  # grown, but not beyond twice plus slack
        await asyncio.sleep(0.05)
        assert gc.get_stats()[2]["collections"] == before
        _grown(peak)
        await asyncio.sleep(0.1)
        assert gc.get_stats()[2]["collections"] == before + 1  # grown: once, then measured anew


async def test_no_full_collection_comes_however_long_memory_stays_put(
    collector: None, peak: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not once a day, not once an hour: the job reads no clock to decide on one. (Here a
    day passes at every look at the loop's clock.)"""
    loop = asyncio.get_running_loop()

    class _Later:
        def __init__(self) -> None:
            self.days = 0

        def time(self) -> float:
            self.days += 1
            return loop.time() + 86_400 * self.days

        def __getattr__(self, name: str) -> object:
            return getattr(loop, name)

    later = _Later()
    runtime.tune_gc()
    before = gc.get_stats()[2]["collections"]
    monkeypatch.setattr(asyncio, "get_running_loop", lambda: later)
    try:
        async with _running(freeze_every=0.01):
            await asyncio.sleep(0.2)
    finally:
        monkeypatch.undo()
    assert gc.get_stats()[2]["collections"] == before


async def test_one_job_per_process_does_the_work_and_another_takes_over(
    collector: None, monkeypatch: pytest.MonkeyPatch, peak: list[int]
) -> None:
    """`creditwatch dev` hosts three services in one process, each with the job: memory that
    grows brings one full collection, not one per service."""
    runtime.tune_gc()
    full: list[float] = []
    monkeypatch.setattr(gc, "collect", lambda *args: full.append(0) or 0)
    async with (
        _running(freeze_every=0.01),
        _running(freeze_every=0.01),
        _running(freeze_every=0.01),
    ):
        await asyncio.sleep(0.05)
        _grown(peak)
        await asyncio.sleep(0.1)
    assert len(full) == 1  # each job on its own would make it 3
    monkeypatch.undo()
    # The one left takes over when the working one stops.
    async with _running(freeze_every=0.02):
        async with _running(freeze_every=0.02):
            await asyncio.sleep(0.05)
        kept = [_Node() for _ in range(10)]
        watched = {id(node) for node in kept}
        await asyncio.sleep(0.1)
        assert not any(id(o) in watched for o in gc.get_objects())
