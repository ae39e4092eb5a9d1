"""The event core's loops through real outages (issue 19): a PostgreSQL restart, a Kafka
outage, both servers gone at shutdown, and a broker whose log is not the one the stored
offsets are in. Each case runs the limits service's host (consumer, relay, scheduler,
probes) in-process against servers of its own, which it stops and starts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import date, timedelta
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from harness import e2e as e2e
from harness.servers import KafkaServer, PostgresServer, create_database
from services.limits import store
from shared import eventstore as es
from shared import metrics
from shared.auth import Principal, TokenRegistry
from shared.runtime import ConsumerLoop, EventCore, NewLogError
from shared.service import ServiceHost
from shared.settings import Settings
from tools import registry

pytestmark = pytest.mark.integration

TOKENS = TokenRegistry({"t": Principal("p", frozenset({"credit:read"}))})


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def own_kafka() -> Iterator[KafkaServer]:
    server = KafkaServer.start()
    try:
        yield server
    finally:
        server.stop()


def _settings(database_url: str, bootstrap: str, prefix: str, **extra: Any) -> Settings:
    env = e2e.topic_env(prefix)
    fields = {k.removeprefix("CREDITWATCH_").lower(): v for k, v in env.items()}
    return Settings(
        database_url=database_url,
        kafka_bootstrap=bootstrap,
        outbox_poll_interval_s=0.05,
        scheduler_interval_s=0.5,
        broker_probe_interval_s=0.5,
        consumer_session_timeout_ms=6000,
        **fields,
        **extra,
    )


async def _publish(bootstrap: str, topic: str, events: list[dict[str, Any]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for event in events:
            await producer.send_and_wait(
                topic, json.dumps(event).encode(), key=event["subject"].encode()
            )
    finally:
        await producer.stop()


async def _read_all(bootstrap: str, topic: str) -> list[Any]:
    """Every record on ``topic`` (all partitions), from the start."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        out: list[Any] = []
        for tp in tps:
            await consumer.seek_to_beginning(tp)
        deadline = time.monotonic() + 30
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            assert time.monotonic() < deadline, f"could not read {topic}"
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                out.extend(records)
        return out
    finally:
        await consumer.stop()


def _invoices(prefix: str, first: int, count: int) -> list[dict[str, Any]]:
    today = date.today()
    return [
        e2e.invoice(
            f"C-{n % 5}",
            f"{prefix}-I-{n}",
            "100.00",
            issued=today - timedelta(days=5),
            due=today + timedelta(days=25),
        )
        for n in range(first, first + count)
    ]


async def _eventually(what: str, check: Any, within: float = 60.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:.0f}s waiting for {what}")
        await asyncio.sleep(0.2)


async def _applied(host: ServiceHost) -> int:
    try:
        async with host.engine.connect() as conn:
            return await es.count_events(conn, store.core)
    except Exception:
        return -1


async def _outbox(host: ServiceHost) -> int:
    try:
        async with host.engine.connect() as conn:
            return await es.count_outbox(conn, store.core)
    except Exception:
        return -1


@pytest.fixture
async def running(
    request: pytest.FixtureRequest, own_postgres: PostgresServer, kafka_bootstrap: str
) -> AsyncIterator[tuple[ServiceHost, Settings, str]]:
    """The limits host on the module's own PostgreSQL and (unless the test asks for the
    module's own Kafka through ``pytest.mark.own_kafka``) the session's broker."""
    bootstrap = kafka_bootstrap
    if request.node.get_closest_marker("own_kafka") is not None:
        bootstrap = request.getfixturevalue("own_kafka").bootstrap
    prefix = f"rt{uuid.uuid4().hex[:8]}"
    await e2e.create_topics(bootstrap, prefix)
    settings = _settings(create_database(own_postgres.url), bootstrap, prefix)
    await asyncio.to_thread(registry.upgrade, settings, ["limits"])
    _app, host = registry.build("limits", settings, tokens=TOKENS)
    await host.start()
    try:
        yield host, settings, bootstrap
    finally:
        if not host._closing:
            await host.close()


async def test_given_a_postgresql_restart_mid_stream_then_consuming_and_publishing_resume(
    running: tuple[ServiceHost, Settings, str], own_postgres: PostgresServer
) -> None:
    """Findings 3 and 4: the relay kept retrying on its dead connection and published
    nothing until a process restart; a consumer took the outage's errors for poison."""
    host, settings, bootstrap = running
    prefix = settings.consumer_group_prefix
    # Given a stream being consumed and its exposure published
    await _publish(bootstrap, settings.topic_invoices, _invoices(prefix, 0, 20))
    await _eventually("the first 20 invoices applied", lambda: _applied_at_least(host, 20))
    await _eventually("the outbox drained", lambda: _outbox_is(host, 0))
    # When PostgreSQL stops for a while (events keep coming) and starts again
    own_postgres.stop_process()
    await _publish(bootstrap, settings.topic_invoices, _invoices(prefix, 20, 20))
    await asyncio.sleep(4)
    assert host.fatal() is None, host.fatal()
    assert (await host.readiness())["database"] is False
    own_postgres.start_process()
    # Then everything is applied and published, without a restart of the process
    await _eventually("all 40 invoices applied", lambda: _applied_at_least(host, 40))
    await _eventually("the outbox drained after the restart", lambda: _outbox_is(host, 0))
    assert await _latest_receivables(bootstrap, settings) == dict.fromkeys(
        [f"C-{n}" for n in range(5)], "800.00"
    )
    # And nothing was dead-lettered for the outage, and the process is alive and ready
    dead = await _read_all(bootstrap, settings.topic_dlq)
    assert dead == []
    assert host.fatal() is None
    await _eventually("ready again", lambda: _ready(host))


async def _latest_receivables(bootstrap: str, settings: Settings) -> dict[str, str]:
    """Each customer's open receivables in the last exposure.updated published for it."""
    latest: dict[str, tuple[int, str]] = {}
    for record in await _read_all(bootstrap, settings.topic_exposure):
        event = json.loads(record.value)
        seq = int(event["id"].rsplit("-", 1)[-1])
        cid = event["subject"]
        if cid not in latest or seq > latest[cid][0]:
            latest[cid] = (seq, event["data"]["open_receivables"])
    return {cid: receivables for cid, (_, receivables) in sorted(latest.items())}


async def _applied_at_least(host: ServiceHost, n: int) -> bool:
    return await _applied(host) >= n


async def _outbox_is(host: ServiceHost, n: int) -> bool:
    return await _outbox(host) == n


async def _ready(host: ServiceHost) -> bool:
    return all((await host.readiness()).values())


class _Counter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record)


@pytest.fixture
def log_lines() -> Iterator[_Counter]:
    """Every line the root logger's handlers would write (after their filters)."""
    counter = _Counter()
    root = logging.getLogger()
    before = root.level
    root.addHandler(counter)
    root.setLevel(logging.INFO)
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    try:
        yield counter
    finally:
        root.removeHandler(counter)
        root.setLevel(before)


@pytest.mark.own_kafka
async def test_given_a_kafka_outage_then_readiness_says_so_the_backlog_is_counted_and_logs_stay_quiet(
    log_lines: _Counter,
    running: tuple[ServiceHost, Settings, str],
    own_kafka: KafkaServer,
) -> None:
    """Findings 7 and 8 (and the outbox half of 3): /readyz said broker:true through a 56 s
    outage; limits logged 15,000 lines a second; creditwatch_outbox_pending read 0."""
    host, settings, bootstrap = running
    prefix = settings.consumer_group_prefix
    await _publish(bootstrap, settings.topic_invoices, _invoices(prefix, 0, 5))
    await _eventually("5 invoices applied", lambda: _applied_at_least(host, 5))
    await _eventually("ready", lambda: _ready(host))
    # When the broker goes away while the service keeps making output events
    own_kafka.stop_process()
    counted_from = len(log_lines.lines)
    for n in range(5, 15):
        await host.core.process_records(
            [_record(settings.topic_invoices, n, _invoices(prefix, n, 1)[0])]
        )
    # Then readiness says the broker is down, and the backlog is counted in the table
    checks = await _eventually("readiness to report the broker", lambda: _broker_down(host), 20)
    assert checks["broker"] is False
    gauge = metrics.OUTBOX_PENDING.labels("limits")
    await _eventually("the backlog gauge", lambda: _gauge_at_least(gauge, 10), 15)
    await asyncio.sleep(12)
    assert (await host.readiness()).get("outbox") is False  # the relay cannot publish
    assert metrics.OUTBOX_OLDEST_SECONDS.labels("limits")._value.get() > 5
    # And the outage is a few lines, not thousands
    during = log_lines.lines[counted_from:]
    assert len(during) < 60, [f"{r.name}: {r.getMessage()}" for r in during[:80]]
    assert host.fatal() is None
    # When it comes back, the backlog goes out (with the CloudEvents content-type)
    own_kafka.start_process()
    await _eventually("the backlog published", lambda: _outbox_is(host, 0), 90)
    await _eventually("ready again", lambda: _ready(host), 60)
    assert await _latest_receivables(bootstrap, settings) == dict.fromkeys(
        [f"C-{n}" for n in range(5)], "300.00"
    )
    published = await _read_all(bootstrap, settings.topic_exposure)
    assert all(
        dict(r.headers).get("content-type", b"").startswith(b"application/cloudevents+json")
        for r in published
    )


def _record(topic: str, offset: int, event: dict[str, Any]) -> Any:
    from shared.runtime import Record

    return Record(topic, 0, 10_000 + offset, event["subject"].encode(), json.dumps(event).encode())


async def _broker_down(host: ServiceHost) -> dict[str, bool] | None:
    checks = await host.readiness()
    return checks if checks.get("broker") is False else None


async def _gauge_at_least(gauge: Any, n: float) -> bool:
    return bool(gauge._value.get() >= n)


@pytest.mark.own_kafka
async def test_given_both_servers_unreachable_when_the_service_stops_then_it_stops_in_time(
    running: tuple[ServiceHost, Settings, str],
    own_kafka: KafkaServer,
    own_postgres: PostgresServer,
) -> None:
    """Finding 13: shutdown hung for over 60 s with Kafka and PostgreSQL unreachable."""
    host, settings, bootstrap = running
    prefix = settings.consumer_group_prefix
    await _publish(bootstrap, settings.topic_invoices, _invoices(prefix, 0, 3))
    await _eventually("ready", lambda: _ready(host))
    own_kafka.stop_process()
    own_postgres.stop_process()
    with contextlib.suppress(Exception):  # the database is away: a batch in the air
        await host.core.process_records([_record(settings.topic_invoices, 1, {})])
    started = time.monotonic()
    await host.close()
    took = time.monotonic() - started
    assert took < settings.shutdown_timeout_s + 3, f"stopping took {took:.1f}s"
    own_postgres.start_process()
    own_kafka.start_process()


async def test_given_stored_offsets_from_another_log_then_production_fails_naming_the_partition_and_dev_starts_again(
    own_postgres: PostgresServer, kafka_bootstrap: str
) -> None:
    """Finding 5 (runtime half): stored offsets past a new log's end were sought to, and new
    events were skipped silently while the service said it was ready."""
    prefix = f"rt{uuid.uuid4().hex[:8]}"
    await e2e.create_topics(kafka_bootstrap, prefix, partitions=1)
    settings = _settings(create_database(own_postgres.url), kafka_bootstrap, prefix)
    await asyncio.to_thread(registry.upgrade, settings, ["limits"])
    core, engine = registry.core_for("limits", settings)
    topic = settings.topic_invoices
    try:
        # Given offsets stored for a log of another cluster, past this log's end
        async with engine.begin() as conn:
            await es.store_offsets(conn, store.core, {(topic, 0): 50}, core.clock(), "old-one")
        await _publish(kafka_bootstrap, topic, _invoices(prefix, 0, 3))

        def loop(on_new_log: str) -> ConsumerLoop:
            return ConsumerLoop(
                core,
                bootstrap=kafka_bootstrap,
                topics=[topic],
                group_id=f"{prefix}-{on_new_log}",
                on_new_log=on_new_log,
                session_timeout_ms=6000,
            )

        # When a production consumer is assigned the partition
        # Then it stops with an error naming the partition, and consumed nothing
        with pytest.raises(NewLogError, match=rf"{topic}/0"):
            await asyncio.wait_for(loop("fail").run(asyncio.Event()), 60)
        assert await _count(core) == 0
        # When a dev consumer (restart) is assigned it
        stop = asyncio.Event()
        dev = asyncio.create_task(loop("restart").run(stop))
        try:
            # Then it consumes the new log from its start, and records it as this cluster's
            await _eventually("the new log consumed", lambda: _count_is(core, 3), 60)
        finally:
            stop.set()
            await asyncio.wait_for(dev, 30)
        async with engine.connect() as conn:
            stored = await es.load_positions(conn, store.core, [(topic, 0)])
        assert stored[(topic, 0)].next_offset == 3
        assert stored[(topic, 0)].cluster_id not in (None, "old-one")
    finally:
        await engine.dispose()


async def _count(core: EventCore) -> int:
    async with core.engine.connect() as conn:
        return await es.count_events(conn, store.core)


async def _count_is(core: EventCore, n: int) -> bool:
    return await _count(core) == n
