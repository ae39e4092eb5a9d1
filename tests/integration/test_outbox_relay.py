"""The outbox relay against a real database (SQLite and PostgreSQL), with a stand-in producer:
rows go out in order, at least once, and are deleted only once the broker acknowledged them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.limits import store
from services.limits.handlers import LimitsService
from shared import eventstore as es
from shared.events import new_event
from shared.policy import load_policy
from shared.runtime import EventCore, OutboxRelay
from shared.settings import Settings
from tests.databases import fresh_engine

pytestmark = pytest.mark.integration
T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def core(engine: AsyncEngine) -> EventCore:
    return EventCore(LimitsService(Settings(), load_policy(None)), engine)


class Producer:
    """Records what it is given; ``fail`` makes the broker refuse the next sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, str]] = []
        self.fail = False

    async def send(
        self, topic: str, value: bytes, key: bytes, headers: Any = None
    ) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.fail:
            future.set_exception(ConnectionError("broker away"))
        else:
            self.sent.append((topic, key.decode(), json.loads(value)["id"]))
            future.set_result(None)
        return future


class FakeKafka:
    """In place of AIOKafkaProducer where the relay's loop runs: sending is ``Producer``'s."""

    def __init__(self, **_kw: Any) -> None: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


async def queue(core: EventCore, *ids: str) -> None:
    items = [
        (
            "credit.exposure",
            new_event("relay.tested", source="/t", subject=f"C-{i}", data={"n": i}, id=i, time=T0),
        )
        for i in ids
    ]
    async with core.engine.begin() as conn:
        await es.enqueue(conn, store.core, items, T0)


async def pending(core: EventCore) -> list[str]:
    async with core.engine.connect() as conn:
        return [json.loads(r.value)["id"] for r in await es.pending_outbox(conn, store.core, 100)]


async def leader_of(relay: OutboxRelay) -> AsyncConnection | None:
    if relay.core.engine.dialect.name != "postgresql":
        return None
    leader = await relay._lead(None)
    assert leader is not None
    return leader


async def test_rows_go_out_in_order_and_are_deleted_once_acknowledged(core: EventCore) -> None:
    relay = OutboxRelay(core, bootstrap="unused", batch=2)
    producer = Producer()
    leader = await leader_of(relay)
    try:
        await queue(core, "e1", "e2", "e3")
        assert await relay.publish_pending(producer, leader) == 2
        # Acknowledged, and deleted by the relay's next read (which also finds the rest).
        assert await pending(core) == ["e1", "e2", "e3"]
        await queue(core, "e4")
        assert await relay.publish_pending(producer, leader) == 2
        assert await pending(core) == ["e3", "e4"]
        assert await relay.publish_pending(producer, leader) == 0
        assert await pending(core) == []
        assert [i for _, _, i in producer.sent] == ["e1", "e2", "e3", "e4"]
        assert producer.sent[0] == ("credit.exposure", "C-e1", "e1")
    finally:
        if leader is not None:
            await relay._resign(leader)


async def test_rows_the_broker_did_not_acknowledge_are_published_again(core: EventCore) -> None:
    relay = OutboxRelay(core, bootstrap="unused")
    producer = Producer()
    leader = await leader_of(relay)
    try:
        await queue(core, "e1", "e2")
        producer.fail = True
        with pytest.raises(ConnectionError):
            await relay.publish_pending(producer, leader)
        producer.fail = False
        assert await relay.publish_pending(producer, leader) == 2
        assert await relay.publish_pending(producer, leader) == 0
        assert [i for _, _, i in producer.sent] == ["e1", "e2"]
        assert await pending(core) == []
    finally:
        if leader is not None:
            await relay._resign(leader)


async def test_one_relay_leads_at_a_time(postgres_server_url: str, tmp_path: Path) -> None:
    # PostgreSQL only: the advisory lock is PostgreSQL's; SQLite serialises writers instead.
    engine = await fresh_engine(
        "postgresql", "limits", tmp_path=tmp_path, pg_server_url=postgres_server_url
    )
    core = EventCore(LimitsService(Settings(), load_policy(None)), engine)
    first, second = OutboxRelay(core, bootstrap="unused"), OutboxRelay(core, bootstrap="unused")
    leader = await first._lead(None)
    assert leader is not None
    assert await second._lead(None) is None
    await first._resign(leader)
    taken = await second._lead(None)
    assert taken is not None
    await second._resign(taken)
    await engine.dispose()


async def test_a_relay_that_does_not_lead_tries_again_at_its_own_pace_and_takes_over(
    postgres_server_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An API replica's relay while another process publishes: commits keep coming (they
    wake the leader), yet it tries to take the lock only every ``takeover`` seconds — it
    tried on every commit, a connection every few milliseconds — and takes over, publishing
    what is pending, once the leader is gone."""
    engine = await fresh_engine(
        "postgresql", "limits", tmp_path=tmp_path, pg_server_url=postgres_server_url
    )
    core = EventCore(LimitsService(Settings(), load_policy(None)), engine)
    other = OutboxRelay(core, bootstrap="unused")
    held = await other._lead(None)
    assert held is not None
    tries = 0
    try:
        async with relay_running(core, monkeypatch, linger=0.001, takeover=0.25) as (producer, _):
            relay = running_relays[-1]
            real = relay._lead

            async def lead(leader: Any) -> Any:
                nonlocal tries
                tries += leader is None
                return await real(leader)

            monkeypatch.setattr(relay, "_lead", lead)
            await queue(core, "e1")
            began = time.monotonic()
            for _ in range(500):  # commits for a second or so
                core.outbox_ready.set()
                await asyncio.sleep(0.002)
            elapsed = time.monotonic() - began
            assert producer.sent == []
            # One try per 0.25 s (and one in hand), not one per commit.
            assert tries <= elapsed / 0.25 + 2, (tries, elapsed)
            await other._resign(held)
            held = None
            assert await sent(producer, 1) == ["e1"]  # within the next try
    finally:
        if held is not None:
            await other._resign(held)
        await engine.dispose()


running_relays: list[OutboxRelay] = []


@contextlib.asynccontextmanager
async def relay_running(
    core: EventCore, monkeypatch: pytest.MonkeyPatch, **options: Any
) -> AsyncIterator[tuple[Producer, list[int]]]:
    """The relay's loop with the stand-in producer, idle (it looked and found nothing) when
    handed over; yields the producer and the sizes of the cycles that published anything."""
    relay = OutboxRelay(core, bootstrap="unused", **options)
    running_relays.append(relay)
    producer = Producer()
    cycles: list[int] = []
    real = relay.publish_pending

    async def publish(prod: Any, leader: Any = None) -> int:
        n = await real(producer, leader)
        if n:
            cycles.append(n)
        return n

    monkeypatch.setattr("aiokafka.AIOKafkaProducer", FakeKafka)
    monkeypatch.setattr(relay, "publish_pending", publish)
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop))
    try:
        await asyncio.sleep(0.3)
        yield producer, cycles
    finally:
        stop.set()
        core.outbox_ready.set()
        await asyncio.wait_for(running, 10)


async def sent(producer: Producer, count: int) -> list[str]:
    """The ids published, once ``count`` of them are (or after 5 s)."""
    for _ in range(100):
        if len(producer.sent) >= count:
            break
        await asyncio.sleep(0.05)
    return [i for _, _, i in producer.sent]


async def test_the_relay_is_woken_by_a_commit_and_not_only_by_its_poll(
    core: EventCore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``outbox_ready`` set after the relay looked and found nothing still wakes it."""
    async with relay_running(core, monkeypatch, poll_interval=30.0) as (producer, _):
        await queue(core, "e1")
        core.outbox_ready.set()
        assert await sent(producer, 1) == ["e1"]  # long before the 30 s poll
    assert await pending(core) == []  # deleted before the relay stopped


async def test_an_unreachable_database_is_retried_not_fatal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Leading needs the database; while it is away the relay keeps trying (the consumer
    does the same), instead of ending the service's loops."""
    from harness.servers import free_port
    from shared.db import make_engine

    monkeypatch.setattr("aiokafka.AIOKafkaProducer", FakeKafka)
    engine = make_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nothing")
    relay = OutboxRelay(
        EventCore(LimitsService(Settings(), load_policy(None)), engine), bootstrap="unused"
    )
    stop = asyncio.Event()
    running = asyncio.create_task(relay.run(stop))
    try:
        await asyncio.sleep(1.5)
        assert not running.done()
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)
        await engine.dispose()


async def test_one_statement_per_cycle_and_acknowledged_rows_deleted_when_cancelled(
    core: EventCore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a cycle that read less than a batch, the relay waits for the next commit (the
    acknowledged rows go with the next cycle's read, not a read of their own); cancelled
    meanwhile, it still deletes them, so they are not published again."""
    relay = OutboxRelay(core, bootstrap="unused", poll_interval=30.0)
    producer = Producer()
    cycles: list[int] = []
    real = relay.publish_pending

    async def publish(prod: Any, leader: Any = None) -> int:
        n = await real(producer, leader)
        cycles.append(n)
        return n

    monkeypatch.setattr("aiokafka.AIOKafkaProducer", FakeKafka)
    monkeypatch.setattr(relay, "publish_pending", publish)
    await queue(core, "e1", "e2")
    core.outbox_ready.set()
    running = asyncio.create_task(relay.run(asyncio.Event()))
    try:
        for _ in range(100):
            if producer.sent:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert cycles == [2]  # no second read just to delete
        assert await pending(core) == ["e1", "e2"]  # acknowledged, deleted by the next cycle
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    assert await pending(core) == []
    assert [i for _, _, i in producer.sent] == ["e1", "e2"]


@pytest.mark.parametrize(("linger", "expected"), [(0.6, [2]), (0.0, [1, 1])])
async def test_commits_close_behind_each_other_go_out_in_one_cycle_when_lingering(
    core: EventCore, monkeypatch: pytest.MonkeyPatch, linger: float, expected: list[int]
) -> None:
    """Woken by a commit, the relay waits ``linger`` for the next ones: two commits 0.1 s
    apart are read and published together; without lingering, each has a cycle of its own."""
    async with relay_running(core, monkeypatch, poll_interval=30.0, linger=linger) as (
        producer,
        cycles,
    ):
        await queue(core, "e1")
        core.outbox_ready.set()
        await asyncio.sleep(0.1)
        await queue(core, "e2")
        core.outbox_ready.set()
        assert await sent(producer, 2) == ["e1", "e2"]
    assert cycles == expected


@pytest.mark.parametrize(("interval", "expected"), [(0.8, [1, 2]), (0.0, [1, 1, 1])])
async def test_under_a_steady_flow_of_commits_cycles_keep_their_interval(
    core: EventCore, monkeypatch: pytest.MonkeyPatch, interval: float, expected: list[int]
) -> None:
    """A commit after a quiet spell goes out at once (no linger here), however long the
    interval; the commits that follow within ``interval`` of that cycle's start wait for it
    and go out together; without an interval, each has a cycle of its own."""
    loop = asyncio.get_running_loop()
    async with relay_running(core, monkeypatch, poll_interval=30.0, interval=interval) as (
        producer,
        cycles,
    ):
        await queue(core, "e1")
        core.outbox_ready.set()
        committed = loop.time()
        assert await sent(producer, 1) == ["e1"]
        assert loop.time() - committed < 0.4  # not held back by the interval
        for event_id in ("e2", "e3"):
            await asyncio.sleep(0.1)
            await queue(core, event_id)
            core.outbox_ready.set()
        assert await sent(producer, 3) == ["e1", "e2", "e3"]
    assert cycles == expected
