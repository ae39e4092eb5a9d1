"""bench/alert_latency: how long from an invoice that pushes a customer over its limit to the
``limit_breach`` alert on ``credit.alerts``, under a steady input load — against a bare Kafka
round trip (produce → consume) on the same broker, in the same run.

    .venv/bin/python -m bench.alert_latency [--rate 2000] [--seconds 30] [--runs 3]

A real PostgreSQL and a real Apache Kafka (``harness``) and the limits and alerts
services as ``creditwatch serve`` processes on them. The path measured is the whole chain:
``ar.invoices`` → limits (fold, exposure, outbox) → ``credit.exposure`` → alerts (fold,
rules, outbox) → ``credit.alerts``.

Each run registers fresh customers with a BBB limit (100,000 EUR; the assessments are
published on ``credit.assessments`` as the assessment service would), waits until both
services have caught up, then publishes invoices at a steady ``--rate`` for ``--seconds``.
Every ``--trigger-every``-th invoice is a trigger: 150,000 EUR for a customer of its own,
which puts it over its limit; every other invoice is 10–50 EUR for one of the background
customers, which stay far below theirs. The latency of a trigger is the time from handing it
to the producer to the arrival of its customer's ``alert.raised`` (rule ``limit_breach``) at
a consumer in this process (one clock). The baseline sends records of the same size at the
same rate to a topic of its own and reads them back with the same consumer settings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench.common import Measure, save, table
from harness import e2e as s
from harness import servers
from harness.processes import ServiceProcess, service_env
from services.alerts import store as alerts_store
from services.limits import store as limits_store
from shared.db import make_engine
from shared.eventstore import CoreTables

LIMITS_IN = ("crm.customers", "ar.invoices", "ar.payments", "ar.overdue", "credit.assessments")
ALERTS_IN = (
    "credit.exposure",
    "credit.assessments",
    "credit.limits",
    "ar.overdue",
    "ar.payments",
    "crm.credit-reports",
)
PARTITIONS = 4


def pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


@dataclass
class RunResult:
    latencies_ms: list[float]
    baseline_ms: list[float]
    sent: int
    seconds: float
    triggers: int
    missing: int
    catch_up_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.sent / self.seconds

    @property
    def throughput(self) -> float:
        """Input events per second the chain got through: the stream, up to its last alert."""
        return self.sent / (self.seconds + self.catch_up_s)


def _registered(cid: str, at: datetime) -> bytes:
    return json.dumps(s.registered(cid, at=at)).encode()


def _assessed(cid: str, at: datetime) -> bytes:
    return json.dumps(
        s.cloudevent(
            "assessment.completed",
            cid,
            {
                "assessment_id": f"asm-{cid}",
                "customer_id": cid,
                "score": 60,
                "grade": "BBB",
                "risk_level": "medium",
                "previous_grade": None,
                "factors": [],
                "ratios": {},
                "override": None,
                "policy_version": "2026.1",
                "trigger": {"event_id": f"reg-{cid}", "type": "customer.registered"},
                "next_review_date": "2031-01-01",
                "assessed_at": s.iso(at),
            },
            id=f"asm-{cid}",
            time=at,
            source="/creditwatch/assessment",
        )
    ).encode()


def _invoice(cid: str, n: int, amount: str, at: datetime) -> bytes:
    day = at.date()
    return json.dumps(
        s.invoice(cid, f"B-{cid}-{n}", amount, issued=day, due=day + timedelta(days=30), at=at)
    ).encode()


async def _assigned_at_end(bootstrap: str, *topics: str) -> AIOKafkaConsumer:
    """A consumer on every partition of ``topics``, positioned at their end."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=100
    )
    await consumer.start()
    await consumer._client.force_metadata_update()
    parts = [
        TopicPartition(topic, p)
        for topic in topics
        for p in sorted(consumer.partitions_for_topic(topic) or ())
    ]
    assert len({tp.topic for tp in parts}) == len(topics), f"missing topics in {topics}"
    consumer.assign(parts)
    await consumer.seek_to_end(*parts)
    for tp in parts:
        await consumer.position(tp)  # resolve the end now, not at the first fetch
    return consumer


async def _paced(
    producer: AIOKafkaProducer, rate: int, seconds: float, record: Any
) -> tuple[int, float]:
    """Call ``record(i)`` → (topic, key, value, on_send) for i = 0, 1, … at ``rate`` per
    second for ``seconds``; returns (records sent, seconds taken)."""
    total = int(rate * seconds)
    futures = []
    started = time.perf_counter()
    i = 0
    while i < total:
        due = int((time.perf_counter() - started) * rate) + 1
        while i < min(due, total):
            topic, key, value, on_send = record(i)
            if on_send is not None:
                on_send(time.perf_counter())
            futures.append(await producer.send(topic, value=value, key=key))
            i += 1
        await asyncio.sleep(0.002)
    took = time.perf_counter() - started
    await asyncio.gather(*futures)
    return total, took


async def _wait_caught_up(
    engine: Any, core: CoreTables, bootstrap: str, topics: list[str], limit_s: float
) -> float:
    started = time.perf_counter()
    ends = await s.end_offsets(bootstrap, topics)
    while not await s.caught_up(engine, core, ends):
        if time.perf_counter() - started > limit_s:
            raise TimeoutError(f"not caught up on {topics} within {limit_s:.0f}s")
        await asyncio.sleep(0.2)
    return time.perf_counter() - started


async def one_run(
    n: int,
    *,
    bootstrap: str,
    prefix: str,
    engine: Any,
    rate: int,
    seconds: float,
    trigger_every: int,
    background: int,
    baseline_seconds: float,
) -> RunResult:
    rng = random.Random(n)
    now = datetime.now(UTC)
    total = int(rate * seconds)
    triggers = [f"R{n}-T{k:04d}" for k in range(total // trigger_every)]
    pool = [f"R{n}-B{k:04d}" for k in range(background)]
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=1, enable_idempotence=False
    )
    await producer.start()
    try:
        # Master data and BBB ratings for everyone, then wait for both services.
        setup = [
            await producer.send(f"{prefix}.crm.customers", _registered(c, now), key=c.encode())
            for c in triggers + pool
        ]
        setup += [
            await producer.send(f"{prefix}.credit.assessments", _assessed(c, now), key=c.encode())
            for c in triggers + pool
        ]
        await asyncio.gather(*setup)
        await _wait_caught_up(
            engine, limits_store.core, bootstrap, [f"{prefix}.{t}" for t in LIMITS_IN], 180
        )
        await _wait_caught_up(
            engine, alerts_store.core, bootstrap, [f"{prefix}.{t}" for t in ALERTS_IN], 180
        )

        # The measured phase: a steady stream with a trigger every `trigger_every` records.
        alerts_topic = f"{prefix}.credit.alerts"
        consumer = await _assigned_at_end(bootstrap, alerts_topic, f"{prefix}.credit.exposure")
        sent_at: dict[str, float] = {}
        sent_wall: dict[str, float] = {}  # the same moment on the wall clock (Kafka's)
        arrived: dict[str, float] = {}
        # When the relays produced the trigger's exposure.updated and its alert (the
        # records' CreateTime, ms): where along the chain the time goes.
        exposure_ts: dict[str, float] = {}
        alert_ts: dict[str, float] = {}
        done = asyncio.Event()

        def on_trigger(cid: str, t: float) -> None:
            sent_at[cid] = t
            sent_wall[cid] = time.time()

        async def collect() -> None:
            while not done.is_set() or len(arrived) < len(triggers):
                batch = await consumer.getmany(timeout_ms=100)
                at = time.perf_counter()
                for tp, msgs in batch.items():
                    for m in msgs:
                        cid = m.key.decode() if m.key else ""
                        if cid not in sent_at:
                            continue
                        event = json.loads(m.value)
                        data = event["data"]
                        if tp.topic != alerts_topic:
                            if data["limit"] and float(data["exposure"]) > float(data["limit"]):
                                exposure_ts.setdefault(cid, m.timestamp / 1000)
                        elif event["type"] == "alert.raised" and data["rule"] == "limit_breach":
                            arrived.setdefault(cid, at)
                            alert_ts.setdefault(cid, m.timestamp / 1000)
                if done.is_set() and len(arrived) >= len(triggers):
                    return

        collector = asyncio.create_task(collect())
        t0 = datetime.now(UTC)
        offset = trigger_every // 2

        def record(i: int) -> tuple[str, bytes, bytes, Any]:
            at = t0 + timedelta(microseconds=i * 1_000_000 // rate)
            if i % trigger_every == offset and i // trigger_every < len(triggers):
                cid = triggers[i // trigger_every]
                return (
                    f"{prefix}.ar.invoices",
                    cid.encode(),
                    _invoice(cid, i, "150000.00", at),
                    lambda t, cid=cid: on_trigger(cid, t),
                )
            cid = rng.choice(pool)
            amount = f"{rng.randint(10, 50)}.{rng.randint(0, 99):02d}"
            return f"{prefix}.ar.invoices", cid.encode(), _invoice(cid, i, amount, at), None

        sent, took = await _paced(producer, rate, seconds, record)
        done.set()
        drained = time.perf_counter()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(collector, timeout=120)
        await consumer.stop()
        catch_up = time.perf_counter() - drained
        latencies = [(arrived[c] - sent_at[c]) * 1000 for c in sent_at if c in arrived]
        missing = len(sent_at) - len(latencies)
        hops = {
            "limits_ms": [(exposure_ts[c] - sent_wall[c]) * 1000 for c in exposure_ts],
            "alerts_ms": [
                (alert_ts[c] - exposure_ts[c]) * 1000 for c in alert_ts if c in exposure_ts
            ],
        }
        # Let both services finish the backlog before the baseline (and the next run).
        await _wait_caught_up(
            engine, limits_store.core, bootstrap, [f"{prefix}.{t}" for t in LIMITS_IN], 300
        )
        await _wait_caught_up(
            engine, alerts_store.core, bootstrap, [f"{prefix}.{t}" for t in ALERTS_IN], 300
        )

        # Baseline: the same rate, records of the same size, straight through Kafka.
        topic = f"{prefix}.bench.roundtrip.{n}"
        await servers.create_topics_async(bootstrap, [topic], PARTITIONS)
        reader = await _assigned_at_end(bootstrap, topic)
        sent_rt: dict[int, float] = {}
        got_rt: dict[int, float] = {}
        expected = int(rate * baseline_seconds)
        sample = _invoice("R-BASE", 0, "12.34", t0)

        async def read_back() -> None:
            while len(got_rt) < expected:
                batch = await reader.getmany(timeout_ms=100)
                at = time.perf_counter()
                for msgs in batch.values():
                    for m in msgs:
                        got_rt.setdefault(int(m.key.split(b"-")[1]), at)

        reading = asyncio.create_task(read_back())

        def probe(i: int) -> tuple[str, bytes, bytes, Any]:
            return (topic, f"k-{i}".encode(), sample, lambda t, i=i: sent_rt.__setitem__(i, t))

        await _paced(producer, rate, baseline_seconds, probe)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reading, timeout=60)
        await reader.stop()
        baseline = [(got_rt[i] - sent_rt[i]) * 1000 for i in sent_rt if i in got_rt]
    finally:
        await producer.stop()
    return RunResult(
        latencies,
        baseline,
        sent,
        took,
        len(sent_at),
        missing,
        catch_up,
        {
            "hop_p50_ms": {k: pct(v, 0.5) for k, v in hops.items() if v},
            "hop_p99_ms": {k: pct(v, 0.99) for k, v in hops.items() if v},
        },
    )


def _fmt(hops: dict[str, float]) -> str:
    return " ".join(f"{k.removesuffix('_ms')} {v:,.0f} ms" for k, v in hops.items())


async def main(
    rate: int,
    seconds: float,
    runs: int,
    trigger_every: int,
    background: int,
    baseline_seconds: float,
    max_records: int | None = None,
) -> None:
    started = time.perf_counter()
    prefix = s.new_prefix().replace("e2e", "bench")
    with (
        servers.PostgresServer.start() as pg,
        servers.KafkaServer.start() as kafka,
        tempfile.TemporaryDirectory(prefix="alert-latency-") as logs,
    ):
        bootstrap = kafka.bootstrap
        url = servers.create_database(pg.url)
        await s.create_topics(bootstrap, prefix, PARTITIONS)
        tuning = {"CREDITWATCH_CONSUMER_MAX_RECORDS": str(max_records)} if max_records else {}
        env = service_env(
            database_url=url,
            bootstrap=bootstrap,
            **s.topic_env(prefix),
            CREDITWATCH_LOG_LEVEL="WARNING",
            **tuning,
        )
        procs = [ServiceProcess(name, env, Path(logs)) for name in ("limits", "alerts")]
        engine = make_engine(url)
        results: list[RunResult] = []
        try:
            for p in procs:
                p.start()
            for p in procs:
                await asyncio.to_thread(p.wait_ready, 90)
            for n in range(1, runs + 1):
                r = await one_run(
                    n,
                    bootstrap=bootstrap,
                    prefix=prefix,
                    engine=engine,
                    rate=rate,
                    seconds=seconds,
                    trigger_every=trigger_every,
                    background=background,
                    baseline_seconds=baseline_seconds,
                )
                results.append(r)
                print(
                    f"run {n}: sent {r.sent} at {r.rate:,.0f}/s; alerts {len(r.latencies_ms)}"
                    f"/{r.triggers} (missing {r.missing}) p50 {pct(r.latencies_ms, 0.5):,.0f}"
                    f" ms p99 {pct(r.latencies_ms, 0.99):,.0f} ms; kafka round trip p50 "
                    f"{pct(r.baseline_ms, 0.5):,.1f} ms p99 {pct(r.baseline_ms, 0.99):,.1f} ms; "
                    f"hops p50 {_fmt(r.extra['hop_p50_ms'])} p99 {_fmt(r.extra['hop_p99_ms'])}",
                    flush=True,
                )
        finally:
            for p in procs:
                p.stop()
            await engine.dispose()
            failed = [
                p for p in procs if p.proc is not None and p.proc.returncode not in (0, -15, None)
            ]
            for p in failed:
                print(p.tail())

    p50 = Measure(
        "alert p50 (invoice → limits → alerts → credit.alerts)",
        "ms",
        [pct(r.latencies_ms, 0.5) for r in results],
    )
    p99 = Measure("alert p99", "ms", [pct(r.latencies_ms, 0.99) for r in results])
    b50 = Measure(
        "bare Kafka round trip p50 (baseline)", "ms", [pct(r.baseline_ms, 0.5) for r in results]
    )
    b99 = Measure(
        "bare Kafka round trip p99 (baseline)", "ms", [pct(r.baseline_ms, 0.99) for r in results]
    )
    rows: list[tuple[str, ...]] = [("measure", "median", "runs", "ratio to baseline")]
    for m, base in ((p50, b50), (p99, b99), (b50, b50), (b99, b99)):
        rows.append(
            (
                m.name,
                f"{m.median:,.1f} {m.unit}",
                ", ".join(f"{x:,.1f}" for x in m.runs),
                f"{m.median / base.median:,.1f}",
            )
        )
    print()
    print(table(rows))
    target = p99.median <= 500
    print(
        f"\nrate {statistics.median(r.rate for r in results):,.0f} events/s for {seconds:.0f}s "
        f"(the chain got through {statistics.median(r.throughput for r in results):,.0f}/s),"
        f" {sum(r.triggers for r in results)} alerts measured "
        f"({sum(r.missing for r in results)} missing); target p99 <= 500 ms: "
        f"{'met' if target else 'NOT met'}; total {time.perf_counter() - started:.0f}s"
    )
    path = save(
        "alert_latency",
        {
            "rate": rate,
            "seconds": seconds,
            "runs": runs,
            "trigger_every": trigger_every,
            "background_customers": background,
            "baseline_seconds": baseline_seconds,
            "alert_p50": p50,
            "alert_p99": p99,
            "baseline_p50": b50,
            "baseline_p99": b99,
            "ratio_p50": p50.median / b50.median,
            "ratio_p99": p99.median / b99.median,
            "target_p99_ms": 500,
            "target_met": target,
            "per_run": [
                {
                    "sent": r.sent,
                    "rate": r.rate,
                    "alerts": len(r.latencies_ms),
                    "missing": r.missing,
                    "max_ms": max(r.latencies_ms, default=None),
                    "drain_after_stream_s": r.catch_up_s,
                    "throughput": r.throughput,
                    **r.extra,
                }
                for r in results
            ],
        },
    )
    print(f"saved {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=2000, help="input events per second")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--trigger-every",
        type=int,
        default=100,
        help="one invoice in this many pushes a customer over its limit",
    )
    parser.add_argument(
        "--background",
        type=int,
        default=2000,
        help="customers receiving the small background invoices",
    )
    parser.add_argument("--baseline-seconds", type=float, default=5.0)
    parser.add_argument(
        "--max-records",
        type=int,
        default=None,
        help="the services' consumer batch size (default: the setting's)",
    )
    args = parser.parse_args()
    asyncio.run(
        main(
            args.rate,
            args.seconds,
            args.runs,
            args.trigger_every,
            args.background,
            args.baseline_seconds,
            args.max_records,
        )
    )
