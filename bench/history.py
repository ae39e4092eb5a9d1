"""bench/history: does a customer's history cost anything? Per-event cost, credit-check latency
and state size for customers with long settled histories, each as a ratio to a fresh customer
measured in the same run; a portfolio at scale; and credit checks against the durable floor.

    .venv/bin/python -m bench.history [--runs 3] [--settled 0,1000,10000,50000] [--open 5]
                                      [--per-customer 200] [--checks-per-customer 200]
                                      [--restarts 5] [--reserve] [--fsync on|off]
    .venv/bin/python -m bench.history --portfolio [--customers 20000] [--events 1000000]
                                      [--batch 500] [--runs 3] [--fsync on|off]
    .venv/bin/python -m bench.history --checks [--runs 3] [--seconds 10] [--warmup 30]
                                      [--fsync on|off]

PostgreSQL runs with fsync on, as deployed (``fsync``, ``synchronous_commit`` and
``full_page_writes`` on; the test harness's cluster has them off and this bench turns them on
with ALTER SYSTEM before anything is measured). ``--fsync off`` keeps the harness's setting,
and every figure of such a run is labelled so, in the output and in the results file.

History (the default mode). For each size n of ``--settled`` a customer H<n> is built
through the limits service's real event core (EventCore with LimitsService, on PostgreSQL,
fed in batches through the Pipeline as a consumer would): a registration, a grade
(``assessment.completed``, AAA), n invoices spread over three years of business dates each
paid in full by a payment allocated to it (so n settled invoices and n applied payments in
the archive), then the same few open invoices for every customer. Then, per run:

- per event: interleaving the customers round-robin, each gets ``--per-customer`` further
  events (an invoice, then a payment settling it, alternating), one record per batch as a
  quiet consumer sees them; each apply is timed (wall clock, and this process's CPU time);
- credit checks: ``--checks-per-customer`` checks each, one at a time, round-robin, through
  the service's PostgreSQL check engine (``PostgresChecks.check``, sharing the consumer's
  repository as one process does): quotes (``reserve`` false) unless ``--reserve``, every one
  a new order; p50 and p99;
- first check after a restart: ``--restarts`` times a new LimitsService and PostgresChecks
  (an empty cache of states), its connection opened by a check of a customer outside the
  measure, then one check per customer, in a rotating order: it reads and parses the state.

The same per-event measure runs for the assessment service (on a database of its own, built
from the same events) when it imports and runs; the output says when it was skipped. State
size: the customer row's ``state`` document (bytes; and as stored, compressed) and its
archive rows, after the build. Every figure is a median over the runs of each run's median,
and its ratio is the median of the runs' ratios to the fresh customer (H0) of the same run.
Targets: the heaviest customer ≤ 1.3× the fresh one, per event and per check.

Portfolio (``--portfolio``). ``harness.streams.ledger``'s stream (registrations, invoices,
payments with and without allocations, credit notes, cancellations, reversals, dunning; no
duplicates, nothing malformed, as bench.ingest) for ``--customers`` customers and ``--events``
events, written once to a file, then per run, each service in a process of its own (so that
each one's peak RSS, ``ru_maxrss``, is its own), each on a fresh database: a raw batched
SQLAlchemy Core insert of the same rows (the baseline, as bench.ingest's: rows built before
the clock runs); the limits and the assessment event cores (Pipeline, ``--batch`` records per
batch); the alerts event core fed what it consumes of the stream merged in time order with
the outbox rows limits and assessment wrote (its own raw-insert baseline of those rows); then
``EventCore.replay`` of each, in events/s. Targets: limits ingest ≥ 0.3× the raw insert;
replay ≥ 100,000 events/s.

Checks (``--checks``). bench.durable_floor and bench.credit_check back to back, each with its
own servers as those benches start them (PostgreSQL with this bench's ``--fsync``), then the
checks' throughput as a ratio to the floor's five-row relayed server (the least a reserving,
published check must do): at 49d248c this was about 0.35–0.5×; aim ≥ 0.6×. Needs wrk and
vegeta, which those benches install on first use.

Results: bench/results/history.json, one entry per mode (the last run of each mode kept).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import functools
import heapq
import json
import multiprocessing
import os
import random
import resource
import shutil
import statistics
import struct
import tempfile
import time
import traceback
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, BinaryIO

import asyncpg
import orjson
from sqlalchemy import MetaData, insert, text
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.common import RESULTS, Measure, save, table
from harness import factories as f
from harness import servers
from services.schema import upgrade
from shared import eventstore as es
from shared.db import make_engine
from shared.events import decode
from shared.policy import load_policy
from shared.runtime import BatchResult, EventCore, Pipeline, Record, tune_gc
from shared.settings import Settings

TARGET_HISTORY = 1.3  # the heaviest customer against a fresh one, per event and per check
TARGET_INGEST = 0.3  # limits ingest against the raw insert
TARGET_REPLAY = 100_000.0  # events/s
# bench.credit_check's checks/s against bench.durable_floor's relayed five-row server.
BEFORE_CHECKS = "0.35–0.5× at 49d248c, with the harness's fsync off"
TARGET_CHECKS = 0.6
FLOOR = "5 rows, relayed"

# The harness's cluster trades durability for speed; deployed PostgreSQL does not.
DURABLE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
HARNESS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}

WARM = "HWARM"  # opens a fresh check engine's connection; not measured
OPEN_AMOUNT = "1000.00"
PAIR_AMOUNT = "250.00"
CHECK_AMOUNT = Decimal("1.00")
YEARS = 3


def durability_label(durable: bool) -> str:
    if durable:
        return "PostgreSQL fsync on (as deployed)"
    return "PostgreSQL fsync OFF (the test harness's setting, not as deployed)"


async def set_durability(server_url: str, durable: bool) -> dict[str, str]:
    """Turn the cluster's durability settings on (or back to the harness's) and wait until
    a new session sees them; returns what it sees."""
    dsn = server_url.replace("postgresql+asyncpg://", "postgresql://")
    wanted = DURABLE if durable else HARNESS
    conn = await asyncpg.connect(dsn)
    try:
        for name, value in wanted.items():
            await conn.execute(f"ALTER SYSTEM SET {name} = {value}")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()
    shown: dict[str, str] = {}
    for _ in range(100):  # the postmaster signals its backends; a new session sees it soon
        check = await asyncpg.connect(dsn)
        try:
            shown = {name: str(await check.fetchval(f"SHOW {name}")) for name in wanted}
        finally:
            await check.close()
        if shown == wanted:
            return shown
        await asyncio.sleep(0.1)
    raise RuntimeError(f"PostgreSQL did not take {wanted}: it shows {shown}")


async def drop_database(server_url: str, url: str) -> None:
    """Drop a database of this run (the portfolio's take gigabytes)."""
    name = url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(server_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, -(-99 * len(ordered) // 100) - 1))]


def spread(values: Sequence[float]) -> str:
    """How far a baseline's runs lie apart: ± half their range, relative to their median."""
    if len(values) < 2:
        return "1 run"
    return f"±{(max(values) - min(values)) / statistics.median(values) / 2:.0%}"


def make_service(name: str, settings: Settings) -> Any:
    policy = load_policy(None)
    if name == "limits":
        from services.limits.handlers import LimitsService

        return LimitsService(settings, policy)
    if name == "assessment":
        from services.assessment.handlers import AssessmentService

        return AssessmentService(settings, policy)
    if name == "alerts":
        from services.alerts.handlers import AlertsService

        return AlertsService(settings, policy)
    raise ValueError(name)


def service_tables(name: str) -> tuple[str, str]:
    """The customers table and ledger archive table of limits or assessment."""
    if name == "limits":
        from services.limits import store as limits_store

        return limits_store.customers.name, limits_store.ledger_archive.name
    from services.assessment import store as assessment_store

    return assessment_store.customers.name, assessment_store.ledger_archive.name


def tally(total: BatchResult, part: BatchResult | None) -> None:
    if part is not None:
        total.applied += part.applied
        total.duplicates += part.duplicates
        total.dead_lettered += part.dead_lettered
        total.skipped += part.skipped


# ---- history mode: the events ------------------------------------------------------------------


class Feed:
    """Records at consecutive offsets per topic, as a broker numbers them."""

    def __init__(self) -> None:
        self.offsets: dict[str, int] = {}
        self.topics = Settings().topic_of_type()  # each type's topic, as configured

    def record(self, event: dict[str, Any]) -> Record:
        topic = self.topics[str(event["type"])]
        offset = self.offsets.get(topic, 0)
        self.offsets[topic] = offset + 1
        return Record(topic, 0, offset, str(event["subject"]).encode(), f.raw(event))


def at(day: date, hour: int) -> datetime:
    return datetime.combine(day, datetime.min.time(), UTC) + timedelta(hours=hour)


def graded(cid: str, when: datetime) -> dict[str, Any]:
    """The assessment service's AAA grade for ``cid`` (as bench.credit_check seeds it)."""
    stamp = when.isoformat().replace("+00:00", "Z")
    return f.cloudevent(
        "assessment.completed",
        cid,
        {
            "assessment_id": f"a-{cid}",
            "customer_id": cid,
            "score": 90,
            "grade": "AAA",
            "risk_level": "low",
            "previous_grade": None,
            "factors": [],
            "ratios": {},
            "override": None,
            "policy_version": "2026.1",
            "trigger": {"event_id": f"reg-{cid}", "type": "customer.registered"},
            "next_review_date": (when.date() + timedelta(days=365)).isoformat(),
            "assessed_at": stamp,
        },
        id=f"a-{cid}",
        time=when,
        source="/creditwatch/assessment",
    )


@dataclass(frozen=True)
class Calendar:
    """The business dates: the histories end two months before today, the open invoices are
    a month old and not due, the measured events fall in the last two weeks."""

    today: date

    @property
    def history_end(self) -> date:
        return self.today - timedelta(days=60)

    @property
    def history_start(self) -> date:
        return self.history_end - timedelta(days=365 * YEARS)


def build_events(sizes: dict[str, int], open_invoices: int, cal: Calendar) -> list[dict[str, Any]]:
    """Registrations and grades, then every customer's settled history merged in business
    date order across customers, then the open invoices."""
    rng = random.Random(20)
    start, end = cal.history_start, cal.history_end
    span = (end - start).days
    events: list[dict[str, Any]] = []
    for cid in [WARM, *sizes]:
        events.append(f.customer(cid, time=at(start - timedelta(days=2), 8)))
        events.append(graded(cid, at(start - timedelta(days=1), 9)))
    timed: list[tuple[date, int, str, int, dict[str, Any]]] = []
    for cid, n in sizes.items():
        for i in range(n):
            issued = start + timedelta(days=i * span // n)
            paid = min(issued + timedelta(days=rng.randint(5, 45)), end)
            amount = f"{rng.randint(100, 5000)}.{rng.randint(0, 99):02d}"
            inv = f"{cid}-H{i}"
            timed.append((issued, 0, cid, i, f.invoice(cid, inv, amount, issued=issued)))
            pay = f.payment(cid, f"{cid}-HP{i}", amount, received=paid, allocations=[(inv, amount)])
            timed.append((paid, 1, cid, i, pay))
    timed.sort(key=lambda t: t[:4])
    events += [t[4] for t in timed]
    for cid in [WARM, *sizes]:
        for j in range(open_invoices):
            issued = cal.today - timedelta(days=30 - j)
            events.append(f.invoice(cid, f"{cid}-O{j}", OPEN_AMOUNT, issued=issued, due_days=90))
    return events


def rotated(customers: Sequence[str], turn: int) -> list[str]:
    """The customers starting at another one every turn: whatever a position costs (the first
    after something else ran, a block of event numbers drawn) falls on each alike."""
    k = turn % len(customers)
    return [*customers[k:], *customers[:k]]


def round_events(
    customers: Sequence[str], count: int, run: int, cal: Calendar
) -> list[dict[str, Any]]:
    """``count`` events per customer, round-robin: invoice, payment settling it, …"""
    out: list[dict[str, Any]] = []
    for k in range(count):
        pair = k // 2
        day = cal.today - timedelta(days=14 - pair % 14)
        for cid in rotated(customers, pair):
            inv = f"{cid}-R{run}-I{pair}"
            if k % 2 == 0:
                out.append(f.invoice(cid, inv, PAIR_AMOUNT, issued=day))
            else:
                out.append(
                    f.payment(
                        cid,
                        f"{cid}-R{run}-P{pair}",
                        PAIR_AMOUNT,
                        received=day,
                        allocations=[(inv, PAIR_AMOUNT)],
                    )
                )
    return out


# ---- history mode: the stages ------------------------------------------------------------------


@dataclass
class Stage:
    """One service's event core on a database of its own."""

    name: str
    url: str
    engine: AsyncEngine
    service: Any
    core: EventCore
    feed: Feed = field(default_factory=Feed)


async def open_stage(name: str, server_url: str) -> Stage:
    url = servers.create_database(server_url)
    engine = make_engine(url)
    await upgrade(engine, name)
    settings = Settings()
    service = make_service(name, settings)
    core = EventCore(service, engine, topic_of_type=settings.topic_of_type())
    return Stage(name, url, engine, service, core)


async def build(
    stage: Stage, events: list[dict[str, Any]], batch: int
) -> tuple[float, BatchResult]:
    """Feed the events in batches through the Pipeline, as the consumer loop does."""
    records = [stage.feed.record(e) for e in events]
    pipeline = Pipeline(stage.core)
    total = BatchResult()
    started = time.perf_counter()
    for i in range(0, len(records), batch):
        tally(total, await pipeline.feed(records[i : i + batch]))
    tally(total, await pipeline.drain())
    elapsed = time.perf_counter() - started
    if total.dead_lettered or total.duplicates:
        raise RuntimeError(f"{stage.name}: building the histories set events aside: {total}")
    if total.applied + total.skipped != len(records):
        raise RuntimeError(f"{stage.name}: {len(records)} events fed, {total}")
    return len(records) / elapsed, total


async def apply_each(
    stage: Stage, events: list[dict[str, Any]]
) -> dict[str, tuple[list[float], list[float]]]:
    """Each event a batch of its own; per customer, the wall and CPU seconds of each."""
    records = [(str(e["subject"]), stage.feed.record(e)) for e in events]
    out: dict[str, tuple[list[float], list[float]]] = {}
    for cid, rec in records:
        cpu0 = time.process_time()
        wall0 = time.perf_counter()
        result = await stage.core.process_records([rec])
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
        if result.applied != 1:
            raise RuntimeError(f"{stage.name}: an event of {cid} was not applied: {result}")
        walls, cpus = out.setdefault(cid, ([], []))
        walls.append(wall)
        cpus.append(cpu)
    return out


# What state_sizes gives per customer, in order.
SIZE_FIELDS = ("bytes", "stored_bytes", "archive_rows", "month_rows", "month_bytes")


async def state_sizes(stage: Stage, ids: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Per customer: the state document's length in bytes, as stored (compressed), the
    number of its archive rows, and (assessment) its payment-behaviour month rows and their
    bytes (the window's settled days, assessment_paid_months)."""
    customers, archive = service_tables(stage.name)
    months = (
        "(SELECT count(*) FROM assessment_paid_months m WHERE m.customer_id = c.customer_id), "
        "(SELECT coalesce(sum(octet_length(m.days)), 0) FROM assessment_paid_months m "
        "WHERE m.customer_id = c.customer_id)"
        if stage.name == "assessment"
        else "0, 0"
    )
    async with stage.engine.connect() as conn:
        rows = await conn.execute(
            text(
                f"SELECT c.customer_id, octet_length(c.state), pg_column_size(c.state), "
                f"(SELECT count(*) FROM {archive} a WHERE a.customer_id = c.customer_id), "
                f"{months} FROM {customers} c WHERE c.customer_id = ANY(:ids)"
            ),
            {"ids": list(ids)},
        )
        return {r[0]: tuple(int(v) for v in r[1:]) for r in rows}


# ---- history mode: the checks ------------------------------------------------------------------


def check_order(cid: str, order_id: str, reserve: bool) -> Any:
    from services.limits.checks import CheckOrder

    return CheckOrder(
        order_id=order_id,
        customer_id=cid,
        amount=CHECK_AMOUNT,
        currency="EUR",
        reserve=reserve,
        requested_by="bench-history",
    )


async def timed_check(engine: Any, order: Any) -> float:
    started = time.perf_counter()
    verdict = await engine.check(order)
    elapsed = time.perf_counter() - started
    if not verdict.fresh or verdict.decision != "approved":
        raise RuntimeError(
            f"check {order.order_id} for {order.customer_id}: {verdict.decision} "
            f"(fresh {verdict.fresh}): {verdict.body.get('reasons')}"
        )
    return elapsed


async def steady_checks(
    checks: Any, customers: Sequence[str], count: int, run: int, tag: str, reserve: bool
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {cid: [] for cid in customers}
    for j in range(count):
        for cid in rotated(customers, j):
            order = check_order(cid, f"{tag}-S{run}-{cid}-{j}", reserve)
            out[cid].append(await timed_check(checks, order))
    return out


async def first_checks(
    stage: Stage, customers: Sequence[str], restarts: int, run: int, tag: str, reserve: bool
) -> dict[str, list[float]]:
    """A new service and check engine ``restarts`` times: each customer's first check."""
    from services.limits.checks import PostgresChecks

    out: dict[str, list[float]] = {cid: [] for cid in customers}
    settings = Settings()
    for i in range(restarts):
        service = make_service("limits", settings)
        core = EventCore(service, stage.engine, topic_of_type=settings.topic_of_type())
        checks = PostgresChecks(service, core)
        try:
            # The engine's own connection and prepared statements, on a customer not measured.
            await timed_check(checks, check_order(WARM, f"{tag}-W{run}-{i}", reserve))
            for cid in rotated(customers, i):
                order = check_order(cid, f"{tag}-F{run}-{i}-{cid}", reserve)
                out[cid].append(await timed_check(checks, order))
        finally:
            await checks.close()
    return out


# ---- history mode ------------------------------------------------------------------------------


@dataclass
class PerCustomer:
    """A measure for every customer: each run's median, and each run's ratio to the fresh
    customer of the same run."""

    name: str
    unit: str
    scale: float  # seconds → unit
    values: dict[str, Measure] = field(default_factory=dict)
    ratios: dict[str, Measure] = field(default_factory=dict)

    def add_run(self, per_customer: dict[str, float], fresh: str) -> None:
        for cid, value in per_customer.items():
            self.values.setdefault(cid, Measure(f"{self.name}: {cid}", self.unit)).runs.append(
                value * self.scale
            )
        base = per_customer[fresh]
        for cid, value in per_customer.items():
            self.ratios.setdefault(cid, Measure(f"{self.name}: {cid} / {fresh}", "×")).runs.append(
                value / base if base else float("nan")
            )


async def history_mode(args: argparse.Namespace) -> dict[str, Any]:
    sizes = {f"H{n:06d}": n for n in sorted(set(args.settled))}
    customers = list(sizes)
    fresh = customers[0]
    if sizes[fresh] != 0:
        raise SystemExit("--settled must include 0: the fresh customer is the baseline")
    cal = Calendar(datetime.now(UTC).date())
    tag = f"B{time.time_ns()}"
    tune_gc()  # as `creditwatch serve` does
    events = build_events(sizes, args.open, cal)
    built = ", ".join(f"{c} ({n:,} settled)" for c, n in sizes.items())
    print(
        f"{len(events):,} events to build {built} and {WARM}; {args.open} open invoices each",
        flush=True,
    )
    measures: dict[str, PerCustomer] = {
        "limits_event_wall": PerCustomer("limits: per event, wall, median", "ms", 1e3),
        "limits_event_cpu": PerCustomer("limits: per event, CPU of this process", "µs", 1e6),
        "assessment_event_wall": PerCustomer("assessment: per event, wall, median", "ms", 1e3),
        "assessment_event_cpu": PerCustomer(
            "assessment: per event, CPU of this process", "µs", 1e6
        ),
        "check_p50": PerCustomer("credit check p50 (sequential)", "ms", 1e3),
        "check_p99": PerCustomer("credit check p99 (sequential)", "ms", 1e3),
        "first_check": PerCustomer("first check after a restart, median", "ms", 1e3),
    }
    sizes_of: dict[str, dict[str, tuple[int, ...]]] = {}
    sizes_after: dict[str, dict[str, tuple[int, ...]]] = {}
    build_rate: dict[str, float] = {}
    skipped: str | None = None
    with servers.PostgresServer.start() as pg:
        shown = await set_durability(pg.url, args.fsync == "on")
        print(f"{durability_label(args.fsync == 'on')}: {shown}", flush=True)
        limits = await open_stage("limits", pg.url)
        build_rate["limits"], _ = await build(limits, events, args.batch)
        sizes_of["limits"] = await state_sizes(limits, customers)
        print(f"limits built: {build_rate['limits']:,.0f} events/s", flush=True)
        assessment: Stage | None = None
        try:
            assessment = await open_stage("assessment", pg.url)
            build_rate["assessment"], _ = await build(assessment, events, args.batch)
            sizes_of["assessment"] = await state_sizes(assessment, customers)
            print(f"assessment built: {build_rate['assessment']:,.0f} events/s", flush=True)
        except Exception as exc:
            skipped = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            print(f"assessment SKIPPED (building failed): {skipped}", flush=True)
            assessment = None
        from services.limits.checks import PostgresChecks

        checks = PostgresChecks(limits.service, limits.core)
        try:
            for run in range(args.runs):
                stream = round_events(customers, args.per_customer, run, cal)
                spent = await apply_each(limits, stream)
                measures["limits_event_wall"].add_run(
                    {c: statistics.median(w) for c, (w, _) in spent.items()}, fresh
                )
                measures["limits_event_cpu"].add_run(
                    {c: statistics.median(u) for c, (_, u) in spent.items()}, fresh
                )
                if assessment is not None:
                    try:
                        spent = await apply_each(assessment, stream)
                        measures["assessment_event_wall"].add_run(
                            {c: statistics.median(w) for c, (w, _) in spent.items()}, fresh
                        )
                        measures["assessment_event_cpu"].add_run(
                            {c: statistics.median(u) for c, (_, u) in spent.items()}, fresh
                        )
                    except Exception as exc:
                        skipped = f"run {run + 1}: {type(exc).__name__}: {exc}"
                        traceback.print_exc()
                        print(f"assessment SKIPPED from here on: {skipped}", flush=True)
                        assessment = None
                latencies = await steady_checks(
                    checks, customers, args.checks_per_customer, run, tag, args.reserve
                )
                measures["check_p50"].add_run(
                    {c: statistics.median(v) for c, v in latencies.items()}, fresh
                )
                measures["check_p99"].add_run({c: p99(v) for c, v in latencies.items()}, fresh)
                firsts = await first_checks(
                    limits, customers, args.restarts, run, tag, args.reserve
                )
                measures["first_check"].add_run(
                    {c: statistics.median(v) for c, v in firsts.items()}, fresh
                )
                print(f"run {run + 1}: " + run_line(measures, customers), flush=True)
        finally:
            await checks.close()
        sizes_after["limits"] = await state_sizes(limits, customers)
        if assessment is not None:
            try:
                sizes_after["assessment"] = await state_sizes(assessment, customers)
            except Exception as exc:
                print(f"assessment: its state after the runs not read ({exc})", flush=True)
        for stage in (limits, assessment):
            if stage is not None:
                await stage.engine.dispose()
    if skipped is None and not measures["assessment_event_wall"].values:
        skipped = "not run"
    findings = check_archive(sizes, sizes_of, sizes_after, args)
    print_history(customers, sizes, measures, sizes_of, args, skipped, findings)
    return {
        "durability": durability_label(args.fsync == "on"),
        "settled": sizes,
        "open_invoices": args.open,
        "per_customer": args.per_customer,
        "checks_per_customer": args.checks_per_customer,
        "restarts": args.restarts,
        "reserve": args.reserve,
        "runs": args.runs,
        "build_events_per_s": build_rate,
        "assessment_skipped": skipped,
        "measures": {
            key: {
                "name": m.name,
                "unit": m.unit,
                "values": m.values,
                "ratios": m.ratios,
                "ratio_median": {c: r.median for c, r in m.ratios.items()},
            }
            for key, m in measures.items()
            if m.values
        },
        "state_after_build": {
            svc: {c: dict(zip(SIZE_FIELDS, v, strict=True)) for c, v in found.items()}
            for svc, found in sizes_of.items()
        },
        "state_after_runs": {
            svc: {c: dict(zip(SIZE_FIELDS, v, strict=True)) for c, v in found.items()}
            for svc, found in sizes_after.items()
        },
        "findings": findings,
    }


def run_line(measures: dict[str, PerCustomer], customers: list[str]) -> str:
    """The heaviest customer's ratios to the fresh one in the run just done."""
    heavy = customers[-1]
    shown = []
    for key, label in (
        ("limits_event_wall", "limits per event"),
        ("assessment_event_wall", "assessment per event"),
        ("check_p50", "check p50"),
        ("check_p99", "check p99"),
        ("first_check", "first check after a restart"),
    ):
        ratios = measures[key].ratios.get(heavy)
        if ratios is not None and ratios.runs:
            shown.append(f"{label} {ratios.runs[-1]:.2f}×")
    return f"{heavy} / {customers[0]}: " + ", ".join(shown)


def check_archive(
    sizes: dict[str, int],
    before: dict[str, dict[str, tuple[int, ...]]],
    after: dict[str, dict[str, tuple[int, ...]]],
    args: argparse.Namespace,
) -> list[str]:
    """What the services should hold: every settled invoice and its payment archived (2 rows
    per pair), nothing else; the hot state no bigger after the runs' settled pairs."""
    out: list[str] = []
    pairs = args.runs * (args.per_customer // 2)
    for svc, found in before.items():
        for cid, n in sizes.items():
            got = found.get(cid)
            if got is None:
                out.append(f"{svc}: no row for {cid}")
                continue
            if got[2] != 2 * n:
                out.append(
                    f"{svc}: {cid} has {got[2]:,} archive rows after the build, not {2 * n:,}"
                )
            end = after.get(svc, {}).get(cid)
            if end is not None and end[2] != 2 * (n + pairs):
                out.append(
                    f"{svc}: {cid} has {end[2]:,} archive rows after the runs, not "
                    f"{2 * (n + pairs):,}"
                )
            if end is not None and end[0] > got[0] * 1.5 + 2048:
                out.append(
                    f"{svc}: {cid}'s state document grew from {got[0]:,} to {end[0]:,} bytes "
                    f"over the runs' {pairs} settled pairs"
                )
    return out


def _cell(m: PerCustomer, cid: str, fresh: str, digits: int) -> str:
    value = m.values.get(cid)
    if value is None:
        return "—"
    shown = f"{value.median:,.{digits}f}"
    if cid == fresh:
        return shown
    return f"{shown} ({m.ratios[cid].median:.2f}×)"


def print_history(
    customers: list[str],
    sizes: dict[str, int],
    measures: dict[str, PerCustomer],
    state: dict[str, dict[str, tuple[int, ...]]],
    args: argparse.Namespace,
    skipped: str | None,
    findings: list[str],
) -> None:
    fresh, heavy = customers[0], customers[-1]
    head: tuple[str, ...] = ("measure (median of runs; ratio to fresh)",)
    head += tuple(f"{c} ({sizes[c]:,} settled)" for c in customers)
    head += ("fresh: spread of runs", f"target {heavy}")
    rows: list[tuple[str, ...]] = [head]
    targeted = {"limits_event_wall", "assessment_event_wall", "check_p50", "check_p99"}
    for key, m in measures.items():
        if not m.values:
            continue
        digits = 0 if m.unit == "µs" else 2
        target = ""
        if key in targeted:
            met = m.ratios[heavy].median <= TARGET_HISTORY
            target = f"≤ {TARGET_HISTORY}×: {'met' if met else 'NOT met'}"
        rows.append(
            (
                f"{m.name} ({m.unit})",
                *(_cell(m, c, fresh, digits) for c in customers),
                spread(m.values[fresh].runs),
                target,
            )
        )
    for svc, found in state.items():
        base = found[fresh][0]
        rows.append(
            (
                f"{svc}: state document (bytes; stored)",
                *(
                    f"{found[c][0]:,}; {found[c][1]:,}"
                    + ("" if c == fresh else f" ({found[c][0] / base:.2f}×)")
                    for c in customers
                ),
                "",
                "",
            )
        )
        rows.append(
            (
                f"{svc}: archive rows",
                *(f"{found[c][2]:,}" for c in customers),
                "",
                "",
            )
        )
        if svc == "assessment":
            rows.append(
                (
                    "assessment: payment-behaviour month rows (rows; bytes)",
                    *(f"{found[c][3]:,}; {found[c][4]:,}" for c in customers),
                    "",
                    "",
                )
            )
    print()
    print(
        f"History ({durability_label(args.fsync == 'on')}; {args.runs} run(s); "
        f"{args.per_customer} events, {args.checks_per_customer} "
        f"{'reserving checks' if args.reserve else 'quotes'} and {args.restarts} restarts "
        "per customer per run)"
    )
    print(table(rows))
    if skipped:
        print(f"\nassessment: SKIPPED ({skipped})")
    for finding in findings:
        print(f"FINDING: {finding}")


# ---- portfolio mode: the stream file ------------------------------------------------------------

_HEAD = struct.Struct("<HHI")


def write_records(path: Path, items: Iterable[tuple[str, bytes | None, bytes]]) -> int:
    with path.open("wb") as out:
        return write_to(out, items)


def write_to(out: BinaryIO, items: Iterable[tuple[str, bytes | None, bytes]]) -> int:
    n = 0
    for topic, key, value in items:
        t = topic.encode()
        k = key or b""
        out.write(_HEAD.pack(len(t), len(k), len(value)))
        out.write(t)
        out.write(k)
        out.write(value)
        n += 1
    return n


def read_records(path: Path) -> Iterator[tuple[str, bytes, bytes]]:
    with path.open("rb") as src:
        while head := src.read(_HEAD.size):
            lt, lk, lv = _HEAD.unpack(head)
            yield src.read(lt).decode(), src.read(lk), src.read(lv)


def batches(path: Path, size: int, share: tuple[int, int] | None = None) -> Iterator[list[Record]]:
    """The file's records in batches, at consecutive offsets per topic. ``share=(i, n)``:
    only the records whose key falls in partition i of n (as Kafka's partitioner spreads a
    topic's keys), at that partition's offsets: what one of n consumers is handed."""
    offsets: dict[str, int] = {}
    batch: list[Record] = []
    partition = 0 if share is None else share[0]
    for topic, key, value in read_records(path):
        if share is not None and zlib.crc32(key or b"") % share[1] != share[0]:
            continue
        offset = offsets.get(topic, 0)
        offsets[topic] = offset + 1
        batch.append(Record(topic, partition, offset, key or None, value))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---- portfolio mode: what runs in a process of its own -----------------------------------------


def _child(work: Callable[..., Any], *args: Any) -> dict[str, Any]:
    """Run ``work`` (a function of this module) in a fresh interpreter: its peak RSS is its
    own, and nothing of one measure's caches or garbage is left for the next."""
    import bench.history  # by its name: run as ``-m``, this module is ``__main__``

    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        result: dict[str, Any] = pool.submit(getattr(bench.history, work.__name__), *args).result()
    return result


def gen_stream(path: str, customers: int, events: int) -> dict[str, Any]:
    from harness.streams import ledger

    registrations, stream = ledger(
        customers=customers, total=events, duplicate_share=0.0, malformed_share=0.0, seed=11
    )
    items = registrations + stream
    types = Counter(str(item.event["type"]) for item in items if item.event)
    topics = Settings().topic_of_type()  # each type's topic, as configured
    n = write_records(
        Path(path),
        ((topics[str(i.event["type"])] if i.event else i.topic, i.key, i.value) for i in items),
    )
    return {"records": n, "types": dict(types), "rss_mb": peak_rss_mb()}


def raw_insert(
    url: str, path: str, batch: int, share: tuple[int, int] | None = None
) -> dict[str, Any]:
    """bench.ingest's baseline: the same event rows, built before the clock runs for each
    batch, inserted with SQLAlchemy Core executemany, one transaction per batch (``share``:
    one of several writers side by side, its partition of the keys, tables made already)."""

    async def go() -> dict[str, Any]:
        engine = make_engine(url)
        metadata = MetaData()
        core = es.core_tables(metadata, "raw")
        async with engine.begin() as conn:
            await conn.run_sync(functools.partial(metadata.create_all, checkfirst=True))
        now = datetime.now(UTC)
        elapsed, n = 0.0, 0
        for records in batches(Path(path), batch, share):
            rows = [
                es.envelope_row(
                    decode(r.value),
                    topic=r.topic,
                    partition=r.partition,
                    offset=r.offset,
                    recorded_at=now,
                    raw=r.value,
                )
                for r in records
            ]
            started = time.perf_counter()
            async with engine.begin() as conn:
                await conn.execute(insert(core.events), rows)
            elapsed += time.perf_counter() - started
            n += len(rows)
        await engine.dispose()
        return {"rate": n / elapsed, "records": n, "seconds": elapsed}

    tune_gc()
    out = asyncio.run(go())
    out["rss_mb"] = peak_rss_mb()
    return out


def migrate(name: str, url: str) -> dict[str, Any]:
    """The service's tables on a fresh database (before consumers run side by side)."""

    async def go() -> None:
        engine = make_engine(url)
        await upgrade(engine, name)
        await engine.dispose()

    asyncio.run(go())
    return {}


def ingest(
    name: str, url: str, path: str, batch: int, share: tuple[int, int] | None = None
) -> dict[str, Any]:
    """The service's event core fed the file in batches through the Pipeline (``share``:
    one of several consumers, each its partition of the keys, on a migrated database)."""

    async def go() -> dict[str, Any]:
        engine = make_engine(url)
        if share is None:
            await upgrade(engine, name)
        settings = Settings()
        core = EventCore(
            make_service(name, settings), engine, topic_of_type=settings.topic_of_type()
        )
        pipeline = Pipeline(core)
        total = BatchResult()
        n = 0
        wall_started = time.time()
        started = time.perf_counter()
        for records in batches(Path(path), batch, share):
            n += len(records)
            tally(total, await pipeline.feed(records))
        tally(total, await pipeline.drain())
        elapsed = time.perf_counter() - started
        wall_ended = time.time()
        async with engine.connect() as conn:
            stored = (
                await conn.execute(text(f"SELECT count(*) FROM {core.service.core.events.name}"))
            ).scalar_one()
            outbox = (
                await conn.execute(text(f"SELECT count(*) FROM {core.service.core.outbox.name}"))
            ).scalar_one()
        await engine.dispose()
        return {
            "rate": n / elapsed,
            "records": n,
            "seconds": elapsed,
            "started": wall_started,
            "ended": wall_ended,
            "applied": total.applied,
            "skipped": total.skipped,
            "duplicates": total.duplicates,
            "dead_lettered": total.dead_lettered,
            "stored": int(stored),
            "outbox": int(outbox),
        }

    tune_gc()
    out = asyncio.run(go())
    out["rss_mb"] = peak_rss_mb()
    return out


def raw_tables(url: str) -> dict[str, Any]:
    """The raw insert's table on a fresh database (before writers run side by side)."""

    async def go() -> None:
        engine = make_engine(url)
        metadata = MetaData()
        es.core_tables(metadata, "raw")
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        await engine.dispose()

    asyncio.run(go())
    return {}


def raw_insert_side_by_side(url: str, path: str, batch: int, jobs: int) -> dict[str, Any]:
    """The raw insert by ``jobs`` writers side by side, a partition of the keys each: the
    baseline of as many consumers. Each writer's clock runs only while it inserts, as the
    single raw insert's does; the rate is all rows over the longest writer's time."""
    import bench.history  # by its name: run as ``-m``, this module is ``__main__``

    _child(raw_tables, url)
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=spawn) as pool:
        parts = [
            pool.submit(bench.history.raw_insert, url, path, batch, (i, jobs)) for i in range(jobs)
        ]
        results = [p.result() for p in parts]
    n = sum(r["records"] for r in results)
    seconds = max(r["seconds"] for r in results)
    return {"rate": n / seconds, "records": n, "seconds": seconds, "jobs": jobs}


def ingest_side_by_side(name: str, url: str, path: str, batch: int, jobs: int) -> dict[str, Any]:
    """``jobs`` consumers of one service, each its partition of the customers, side by side
    on one database (as replicas of a service share a topic's partitions); the rate is all
    records over the time from the first one's start to the last one's end."""
    import bench.history  # by its name: run as ``-m``, this module is ``__main__``

    _child(migrate, name, url)
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=spawn) as pool:
        parts = [
            pool.submit(bench.history.ingest, name, url, path, batch, (i, jobs))
            for i in range(jobs)
        ]
        results = [p.result() for p in parts]
    seconds = max(r["ended"] for r in results) - min(r["started"] for r in results)
    n = sum(r["records"] for r in results)
    out: dict[str, Any] = {"rate": n / seconds, "records": n, "seconds": seconds, "jobs": jobs}
    for key in ("applied", "skipped", "duplicates", "dead_lettered"):
        out[key] = sum(r[key] for r in results)
    out["rss_mb"] = max(r["rss_mb"] for r in results)
    return out


def replay(name: str, url: str, jobs: int = 1) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        engine = make_engine(url)
        settings = Settings()
        core = EventCore(
            make_service(name, settings),
            engine,
            topic_of_type=settings.topic_of_type(),
            service_factory=functools.partial(make_service, name, settings),
        )
        started = time.perf_counter()
        n = await core.replay(jobs=jobs)
        elapsed = time.perf_counter() - started
        await engine.dispose()
        return {"rate": n / elapsed, "events": n, "seconds": elapsed}

    tune_gc()
    out = asyncio.run(go())
    out["rss_mb"] = peak_rss_mb()
    # A parallel replay's largest worker (each holds its share's states).
    out["worker_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return out


def alerts_stream(source: str, outboxes: list[tuple[str, str]], out: str) -> dict[str, Any]:
    """What the alerts service consumes: the stream's events of its types, merged in time
    order with the outbox rows (``outboxes``: service, database) limits and assessment wrote,
    dead letters aside."""
    from services.alerts.handlers import CONTRACT_TYPES

    work = Path(out).parent

    async def dump(name: str, url: str, to: BinaryIO) -> None:
        # The outbox in the order the service wrote it, page by page.
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            last = 0
            while True:
                page = await conn.fetch(
                    f"SELECT seq, topic, key, value FROM {name}_outbox WHERE seq > $1 "
                    "AND topic <> 'credit.dlq' ORDER BY seq LIMIT 20000",
                    last,
                )
                if not page:
                    break
                last = page[-1]["seq"]
                write_to(to, ((r["topic"], r["key"].encode(), r["value"].encode()) for r in page))
        finally:
            await conn.close()

    files = []
    for name, url in outboxes:
        path = work / f"{name}_outbox.bin"
        with path.open("wb") as to:
            asyncio.run(dump(name, url, to))
        files.append(path)

    def timed(
        items: Iterator[tuple[str, bytes, bytes]], only: frozenset[str] | None
    ) -> Iterator[tuple[datetime, int, tuple[str, bytes, bytes]]]:
        for n, item in enumerate(items):
            event = orjson.loads(item[2])
            if only is None or event["type"] in only:
                yield datetime.fromisoformat(event["time"]), n, item

    sources = [timed(read_records(Path(source)), CONTRACT_TYPES)]
    sources += [timed(read_records(p), None) for p in files]
    topics: Counter[str] = Counter()

    def merged() -> Iterator[tuple[str, bytes, bytes]]:
        for _, _, item in heapq.merge(*sources, key=lambda t: (t[0], t[1])):
            topics[item[0]] += 1
            yield item

    n = write_records(Path(out), merged())
    for p in files:
        p.unlink()
    return {"records": n, "topics": dict(topics), "rss_mb": peak_rss_mb()}


# ---- portfolio mode ----------------------------------------------------------------------------


async def portfolio_mode(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="cw-history-"))
    source = work / "stream.bin"
    print(
        f"generating {args.events:,} events for {args.customers:,} customers "
        "(harness.streams.ledger) …",
        flush=True,
    )
    generated = _child(gen_stream, str(source), args.customers, args.events)
    print(
        f"{generated['records']:,} records ({source.stat().st_size / 2**20:,.0f} MiB); "
        f"types: {generated['types']}",
        flush=True,
    )
    raw = Measure("raw batched insert of the stream's rows (baseline)", "rows/s")
    raw_alerts = Measure("raw batched insert of the alerts input's rows (baseline)", "rows/s")
    rates = {
        name: Measure(f"{name} event core ingest", "events/s")
        for name in ("limits", "assessment", "alerts")
    }
    replays = {
        name: Measure(f"{name} replay (EventCore.replay)", "events/s")
        for name in ("limits", "assessment", "alerts")
    }
    jobs = args.jobs
    side_by_side = Measure(
        f"limits event core ingest, {jobs} consumers side by side (a partition each)", "events/s"
    )
    raw_side = Measure(f"raw batched insert, {jobs} writers side by side (baseline)", "rows/s")
    replays_par = {
        name: Measure(f"{name} replay, {jobs} processes (replay --jobs {jobs})", "events/s")
        for name in ("limits", "assessment", "alerts")
    }
    rss: dict[str, Measure] = {}
    skipped: dict[str, str] = {}
    details: list[dict[str, Any]] = []

    def keep_rss(label: str, result: dict[str, Any]) -> None:
        rss.setdefault(label, Measure(f"peak RSS: {label}", "MB")).runs.append(result["rss_mb"])

    with servers.PostgresServer.start() as pg:
        shown = await set_durability(pg.url, args.fsync == "on")
        print(f"{durability_label(args.fsync == 'on')}: {shown}", flush=True)
        made: list[str] = []  # this run's databases, dropped at its end

        def database() -> str:
            url = servers.create_database(pg.url)
            made.append(url)
            return url

        for run in range(args.runs):
            step: dict[str, Any] = {}
            step["raw"] = _child(raw_insert, database(), str(source), args.batch)
            raw.runs.append(step["raw"]["rate"])
            keep_rss("raw insert process (baseline)", step["raw"])
            urls: dict[str, str] = {}
            for name in ("limits", "assessment"):
                if name in skipped:
                    continue
                urls[name] = database()
                try:
                    step[name] = _child(ingest, name, urls[name], str(source), args.batch)
                except Exception as exc:
                    if name == "limits":
                        raise
                    skipped[name] = f"{type(exc).__name__}: {exc}"
                    print(f"{name} SKIPPED: {skipped[name]}", flush=True)
                    del urls[name]
                    continue
                rates[name].runs.append(step[name]["rate"])
                keep_rss(f"{name} ingest", step[name])
                if name == "limits" and jobs > 1:
                    step["raw_side_by_side"] = raw_insert_side_by_side(
                        database(), str(source), args.batch, jobs
                    )
                    raw_side.runs.append(step["raw_side_by_side"]["rate"])
                    step["limits_side_by_side"] = ingest_side_by_side(
                        name, database(), str(source), args.batch, jobs
                    )
                    side_by_side.runs.append(step["limits_side_by_side"]["rate"])
            alerts_input = work / "alerts.bin"
            step["alerts_stream"] = _child(
                alerts_stream,
                str(source),
                list(urls.items()),
                str(alerts_input),
            )
            step["raw_alerts"] = _child(raw_insert, database(), str(alerts_input), args.batch)
            raw_alerts.runs.append(step["raw_alerts"]["rate"])
            urls["alerts"] = database()
            step["alerts"] = _child(ingest, "alerts", urls["alerts"], str(alerts_input), args.batch)
            rates["alerts"].runs.append(step["alerts"]["rate"])
            keep_rss("alerts ingest", step["alerts"])
            for name, url in urls.items():
                try:
                    step[f"{name}_replay"] = _child(replay, name, url)
                except Exception as exc:
                    if name == "limits":
                        raise
                    skipped[f"{name} replay"] = f"{type(exc).__name__}: {exc}"
                    print(f"{name} replay SKIPPED: {skipped[f'{name} replay']}", flush=True)
                    continue
                replays[name].runs.append(step[f"{name}_replay"]["rate"])
                keep_rss(f"{name} replay", step[f"{name}_replay"])
                if jobs > 1:
                    par = step[f"{name}_replay_jobs"] = _child(replay, name, url, jobs)
                    replays_par[name].runs.append(par["rate"])
                    rss.setdefault(
                        f"{name} replay, {jobs} processes: the largest worker",
                        Measure(f"peak RSS: {name} replay, largest of {jobs} workers", "MB"),
                    ).runs.append(par["worker_rss_mb"])
            for url in made:
                await drop_database(pg.url, url)
            made.clear()
            alerts_input.unlink()
            details.append(step)
            print(
                f"run {run + 1}: raw {raw.runs[-1]:,.0f} rows/s; ingest "
                + ", ".join(
                    f"{n} {step[n]['rate']:,.0f}/s"
                    for n in ("limits", "assessment", "alerts")
                    if n in step
                )
                + f" (alerts input {step['alerts_stream']['records']:,} records, raw "
                f"{raw_alerts.runs[-1]:,.0f} rows/s); replay "
                + ", ".join(
                    f"{n} {step[n + '_replay']['rate']:,.0f}/s"
                    for n in ("limits", "assessment", "alerts")
                    if n + "_replay" in step
                )
                + (
                    f"; with {jobs} processes: limits ingest "
                    f"{step['limits_side_by_side']['rate']:,.0f}/s, replay "
                    + ", ".join(
                        f"{n} {step[n + '_replay_jobs']['rate']:,.0f}/s"
                        for n in ("limits", "assessment", "alerts")
                        if n + "_replay_jobs" in step
                    )
                    if jobs > 1 and "limits_side_by_side" in step
                    else ""
                ),
                flush=True,
            )
            for name in ("limits", "assessment", "alerts"):
                got = step.get(name)
                if got and (got["dead_lettered"] or got["duplicates"]):
                    print(
                        f"FINDING: {name} set events aside in run {run + 1}: "
                        f"{got['dead_lettered']} dead-lettered, {got['duplicates']} duplicates",
                        flush=True,
                    )
    shutil.rmtree(work, ignore_errors=True)  # the stream's file
    print_portfolio(
        args, raw, raw_alerts, rates, replays, rss, skipped, side_by_side, raw_side, replays_par
    )
    return {
        "durability": durability_label(args.fsync == "on"),
        "customers": args.customers,
        "events": args.events,
        "batch": args.batch,
        "runs": args.runs,
        "generated": generated,
        "baseline": raw,
        "baseline_alerts": raw_alerts,
        "ingest": rates,
        "ingest_ratio": {
            name: m.median / (raw_alerts if name == "alerts" else raw).median
            for name, m in rates.items()
            if m.runs
        },
        "replay": replays,
        "replay_ratio": {
            name: m.median / (raw_alerts if name == "alerts" else raw).median
            for name, m in replays.items()
            if m.runs
        },
        "jobs": jobs,
        "ingest_side_by_side": side_by_side,
        "baseline_side_by_side": raw_side,
        "ingest_side_by_side_ratio": (
            side_by_side.median / raw_side.median if side_by_side.runs else None
        ),
        "replay_jobs": replays_par,
        "replay_jobs_speedup": {
            name: m.median / replays[name].median
            for name, m in replays_par.items()
            if m.runs and replays[name].runs
        },
        "peak_rss_mb": rss,
        "skipped": skipped,
        "details": details,
    }


def print_portfolio(
    args: argparse.Namespace,
    raw: Measure,
    raw_alerts: Measure,
    rates: dict[str, Measure],
    replays: dict[str, Measure],
    rss: dict[str, Measure],
    skipped: dict[str, str],
    side_by_side: Measure | None = None,
    raw_side: Measure | None = None,
    replays_par: dict[str, Measure] | None = None,
) -> None:
    rows: list[tuple[str, ...]] = [("measure", "median", "runs", "ratio to baseline", "target")]

    def line(m: Measure, base: Measure | None, target: str = "", digits: int = 0) -> None:
        if not m.runs:
            rows.append((m.name, "skipped", "", "", target))
            return
        rows.append(
            (
                m.name,
                f"{m.median:,.{digits}f} {m.unit}",
                ", ".join(f"{x:,.{digits}f}" for x in m.runs),
                f"{m.median / base.median:.2f}" if base is not None and base.runs else "",
                target,
            )
        )

    line(raw, raw, f"noise: {spread(raw.runs)}")
    for name in ("limits", "assessment"):
        target = ""
        if name == "limits" and rates[name].runs:
            met = rates[name].median / raw.median >= TARGET_INGEST
            target = f"≥ {TARGET_INGEST}×: {'met' if met else 'NOT met'}"
        line(rates[name], raw, target)
        if name == "limits" and side_by_side and raw_side and side_by_side.runs and raw_side.runs:
            # Like for like: as many writers of the raw rows as consumers.
            line(raw_side, raw_side, f"{raw_side.median / raw.median:.2f}× one writer")
            met = side_by_side.median / raw_side.median >= TARGET_INGEST
            line(
                side_by_side,
                raw_side,
                f"{side_by_side.median / rates[name].median:.2f}× one consumer; "
                f"≥ {TARGET_INGEST}×: {'met' if met else 'NOT met'}",
            )
    line(raw_alerts, raw_alerts, f"noise: {spread(raw_alerts.runs)}")
    line(rates["alerts"], raw_alerts)
    for name, m in replays.items():
        target = ""
        if m.runs:
            met = m.median >= TARGET_REPLAY
            target = f"≥ {TARGET_REPLAY:,.0f}/s: {'met' if met else 'NOT met'}"
        line(m, raw_alerts if name == "alerts" else raw, target)
        par = (replays_par or {}).get(name)
        if par is not None and par.runs:
            met = par.median >= TARGET_REPLAY
            speedup = f"{par.median / m.median:.2f}× one process" if m.runs else ""
            line(par, None, f"{speedup}; ≥ {TARGET_REPLAY:,.0f}/s: {'met' if met else 'NOT met'}")
    base_rss = rss.get("raw insert process (baseline)")
    for m in rss.values():
        line(m, base_rss, digits=0)
    print()
    print(
        f"Portfolio ({durability_label(args.fsync == 'on')}; {args.customers:,} customers, "
        f"{args.events:,} events, batches of {args.batch}, {args.runs} run(s); each ratio "
        "against the raw insert of the same rows)"
    )
    print(table(rows))
    for what, why in skipped.items():
        print(f"{what}: SKIPPED ({why})")


# ---- checks mode -------------------------------------------------------------------------------


@contextlib.contextmanager
def durable_servers(durable: bool) -> Iterator[None]:
    """bench.durable_floor and bench.credit_check start their own PostgreSQL through the
    test harness; for the span of this block, each one started gets this bench's setting."""
    original = servers.PostgresServer.start

    def start(*args: Any, **kwargs: Any) -> servers.PostgresServer:
        pg = original(*args, **kwargs)
        try:
            shown = asyncio.run(set_durability(pg.url, durable))
        except BaseException:
            pg.stop()
            raise
        print(f"{durability_label(durable)}: {shown}", flush=True)
        return pg

    servers.PostgresServer.start = staticmethod(start)  # type: ignore[method-assign]
    try:
        yield
    finally:
        servers.PostgresServer.start = original  # type: ignore[method-assign]


def checks_mode(args: argparse.Namespace) -> dict[str, Any]:
    from bench import credit_check, durable_floor

    durable = args.fsync == "on"
    with durable_servers(durable):
        print("== bench.durable_floor ==", flush=True)
        durable_floor.main(args.runs, args.seconds, args.warmup)
        floor = json.loads((RESULTS / "durable_floor.json").read_text())
        print("\n== bench.credit_check ==", flush=True)
        # Its check that every check made was a new order counts the requests wrk made with a
        # script in this process: the floor's runs went through the same function.
        credit_check.SENT["checks"] = 0
        credit_check.main(args.runs, args.seconds, args.warmup)
        checks = json.loads((RESULTS / "credit_check.json").read_text())

    def measure(data: dict[str, Any], name: str) -> Measure:
        return Measure(name, data["unit"], list(data["runs"]))

    floor_rps = measure(floor["rps"][FLOOR], f"floor ({FLOOR}): requests/s under wrk")
    floor_hello = measure(floor["rps"]["hello"], "hello-world, in the floor's invocation")
    check_rps = measure(checks["check_rps"], "credit checks/s under wrk")
    check_hello = measure(checks["hello_rps"], "hello-world, in the checks' invocation")
    floor_p99 = measure(floor["p99_ms"][FLOOR], f"floor ({FLOOR}): p99 at 1,000/s")
    check_p99 = measure(checks["check_p99_ms"], "credit checks: p99 at 1,000/s")
    direct = check_rps.median / floor_rps.median
    normalised = (check_rps.median / check_hello.median) / (floor_rps.median / floor_hello.median)
    rows: list[tuple[str, ...]] = [("measure", "median", "runs", "ratio", "target")]
    for m, base in (
        (floor_rps, floor_rps),
        (check_rps, floor_rps),
        (floor_hello, floor_hello),
        (check_hello, floor_hello),
        (floor_p99, floor_p99),
        (check_p99, floor_p99),
    ):
        target = ""
        if m is check_rps:
            target = (
                f"≥ {TARGET_CHECKS}× (before: {BEFORE_CHECKS}): "
                f"{'met' if direct >= TARGET_CHECKS else 'NOT met'}"
            )
        elif m is floor_hello or m is check_hello:
            target = f"noise: {spread(m.runs)}"
        rows.append(
            (
                m.name,
                f"{m.median:,.1f} {m.unit}",
                ", ".join(f"{x:,.1f}" for x in m.runs),
                f"{m.median / base.median:.2f}",
                target,
            )
        )
    rows.append(
        (
            "checks' ratio to the floor, each against its own invocation's hello-world",
            "",
            "",
            f"{normalised:.2f}",
            "",
        )
    )
    print()
    print(
        f"Credit checks against the durable floor ({durability_label(durable)}; "
        f"{args.runs} run(s) of {args.seconds} s each, warm-up {args.warmup} s)"
    )
    print(table(rows))
    return {
        "durability": durability_label(durable),
        "runs": args.runs,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "floor_rps": floor_rps,
        "floor_hello_rps": floor_hello,
        "check_rps": check_rps,
        "check_hello_rps": check_hello,
        "floor_p99_ms": floor_p99,
        "check_p99_ms": check_p99,
        "ratio_to_floor": direct,
        "ratio_to_floor_via_hello": normalised,
    }


# ---- main --------------------------------------------------------------------------------------


def store_result(mode: str, result: dict[str, Any]) -> Path:
    """bench/results/history.json keeps the last result of each mode."""
    previous: dict[str, Any] = {}
    path = RESULTS / "history.json"
    if path.exists():
        with contextlib.suppress(ValueError):
            previous = json.loads(path.read_text()).get("modes", {})
    previous[mode] = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **result}
    # Measures and the like as plain JSON (save's own default only knows dataclasses).
    plain = json.loads(json.dumps(previous, default=lambda o: o.__dict__))
    return save("history", {"modes": plain})


def sizes_arg(value: str) -> list[int]:
    try:
        sizes = [int(v.replace("_", "")) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--settled: not a list of integers: {value!r}") from exc
    if not sizes or any(n < 0 for n in sizes):
        raise argparse.ArgumentTypeError("--settled: give non-negative counts, e.g. 0,1000")
    return sizes


def even(value: str) -> int:
    n = positive(value)
    if n % 2:
        raise argparse.ArgumentTypeError(f"must be even (invoice and payment pairs), not {n}")
    return n


def positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.history",
        description=(__doc__ or "").split("\n\n")[0],
        epilog="\n\n".join((__doc__ or "").split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--portfolio",
        action="store_true",
        help="portfolio mode: the ledger stream through assessment, limits and alerts; ingest "
        "against a raw insert, replay, peak RSS",
    )
    mode.add_argument(
        "--checks",
        action="store_true",
        help="checks mode: bench.durable_floor then bench.credit_check, the checks' "
        "throughput as a ratio to the floor's",
    )
    p.add_argument("--runs", type=positive, default=3, help="runs per mode (default: %(default)s)")
    p.add_argument(
        "--fsync",
        choices=("on", "off"),
        default="on",
        help="PostgreSQL durability: on as deployed (fsync, synchronous_commit, "
        "full_page_writes), off as the test harness has it; figures labelled either way "
        "(default: %(default)s)",
    )
    h = p.add_argument_group("history mode (the default)")
    h.add_argument(
        "--settled",
        type=sizes_arg,
        default=[0, 1000, 10_000, 50_000],
        metavar="N,N,…",
        help="settled invoices (each paid in full by a payment) of each customer; must "
        "include 0, the fresh customer every ratio is to (default: 0,1000,10000,50000)",
    )
    h.add_argument(
        "--open",
        type=int,
        default=5,
        help="open invoices every customer has, the same for all (default: %(default)s)",
    )
    h.add_argument(
        "--per-customer",
        type=even,
        default=200,
        help="events per customer per run for the per-event cost, invoice and payment "
        "alternating (so even), one record per batch (default: %(default)s)",
    )
    h.add_argument(
        "--checks-per-customer",
        type=positive,
        default=200,
        help="sequential credit checks per customer per run (default: %(default)s)",
    )
    h.add_argument(
        "--restarts",
        type=positive,
        default=5,
        help="fresh check engines per run for the first check after a restart "
        "(default: %(default)s)",
    )
    h.add_argument(
        "--reserve",
        action="store_true",
        help="reserving checks (each a new order, its reservation kept) instead of quotes "
        "(reserve false; the default: reservations would pile up in every state alike)",
    )
    pf = p.add_argument_group("portfolio mode (--portfolio)")
    pf.add_argument(
        "--customers", type=positive, default=20_000, help="customers (default: %(default)s)"
    )
    pf.add_argument(
        "--jobs",
        type=positive,
        default=2,
        help="besides one process: limits ingest by this many consumers side by side, and each "
        "replay by this many processes (1: neither; default: %(default)s)",
    )
    pf.add_argument(
        "--events",
        type=positive,
        default=1_000_000,
        help="events in the stream, registrations included (default: %(default)s)",
    )
    p.add_argument(
        "--batch",
        type=positive,
        default=500,
        help="records per batch when building histories and in the portfolio's ingest and "
        "raw insert (default: %(default)s)",
    )
    c = p.add_argument_group("checks mode (--checks)")
    c.add_argument(
        "--seconds",
        type=positive,
        default=10,
        help="seconds per wrk / vegeta run, both benches (default: %(default)s)",
    )
    c.add_argument(
        "--warmup",
        type=int,
        default=30,
        help="seconds of unmeasured load first, both benches (0: none; default: %(default)s)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    before = os.getloadavg()
    if args.portfolio:
        mode, result = "portfolio", asyncio.run(portfolio_mode(args))
    elif args.checks:
        mode, result = "checks", checks_mode(args)
    else:
        mode, result = "history", asyncio.run(history_mode(args))
    after = os.getloadavg()
    # What else ran on the machine meanwhile (2 cores): the spread of the baselines says
    # how much it moved the figures.
    result["load_average"] = {"start": before, "end": after, "cpus": os.cpu_count()}
    print(
        f"\nmachine: {os.cpu_count()} CPUs, load average (1, 5, 15 min) "
        f"{', '.join(f'{x:.1f}' for x in before)} at the start, "
        f"{', '.join(f'{x:.1f}' for x in after)} at the end"
    )
    print(f"saved {store_result(mode, result)}")


if __name__ == "__main__":
    main()
