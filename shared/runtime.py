"""The event-processing core shared by all services.

One consumed batch = one database transaction: append the decoded events (duplicates
skipped), let the service fold them into its projections, queue derived events and dead
letters in the outbox, store the consumer offsets. On partition assignment the consumer
seeks to the offsets stored in the database, so a crash anywhere replays at most one batch,
with no effect beyond the first application.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import logging
import math
import resource
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic import BaseModel
from sqlalchemy import MetaData, Table, delete, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared import eventstore as es
from shared import metrics
from shared.events import (
    KAFKA_HEADERS,
    DeadLetter,
    Envelope,
    dead_letter_record,
    decode,
    parse,
)
from shared.projection import lock_rows
from shared.transient import Backoff, OutageLog, is_conflict, is_transient
from shared.unitofwork import LayoutError, UnitOfWork

log = logging.getLogger("creditwatch.runtime")

Clock = Callable[[], datetime]
PROCESSING_ERROR = "processing_error"


def utcnow() -> datetime:
    return datetime.now(UTC)


def tune_gc() -> None:
    """Collect garbage less often than CPython's default (700 allocations).

    Decoding a batch allocates thousands of short-lived containers (envelopes, models,
    dicts), and the default threshold runs a collection every few records, each of which
    also walks the live states a service keeps. Moving what exists at startup out of the
    collector's sight (``gc.freeze``) and raising the first threshold cuts that overhead by
    about a fifth of decoding time, at the cost of a little more memory between collections.

    The older generations are left to ``collect_garbage`` (a service's background job)
    instead of CPython's own rules. A full collection walks every live object: with the
    states and reservations a limits process holds it stopped the event loop for 40–60 ms
    (seen in a credit-check benchmark, again and again while they grew), and the checks
    waited.
    """
    gc.freeze()
    gc.set_threshold(20_000, 50, FULL_COLLECTION_NEVER)


# Gen-1 collections before CPython would run a full one by itself: in effect never.
FULL_COLLECTION_NEVER = 1_000_000_000
# How often what survived so far is moved out of the young collections' sight.
FREEZE_INTERVAL_S = 0.1
# The full collection comes when the process's peak memory has grown beyond twice what it was
# after the last one, plus this much (kB): generous, so that a process filling its caches to
# their caps (a limits process: states, orders) does not stop for one on the way.
FULL_COLLECTION_SLACK_KB = 256 * 1024


def _peak_memory_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux


async def collect_garbage(stop: asyncio.Event, *, freeze_every: float = FREEZE_INTERVAL_S) -> None:
    """Keep every collection short, and still free garbage in reference cycles in time.

    A young collection walks every object created since the last one that is still alive.
    In a limits process a credit check leaves a dozen lasting objects behind (its state,
    reservation, decision) while it frees as many older ones, and CPython counts the freed
    against the new, so the young generation grew to 60,000 objects before it was collected:
    a collection then stopped the event loop for 20–55 ms (seen in the credit-check
    benchmark, while the checks waited). So every ``freeze_every`` seconds what is alive is
    moved out of the collector's sight (``gc.freeze``, a constant-time splice of lists);
    objects still die by their reference counts as before, and the young collections walk
    only the last moments' objects.

    Garbage in a reference cycle that was alive when frozen waits for the full collection,
    which brings every object back into sight first. That one walks everything the process
    holds: with the states and the hundreds of thousands of open reservations of a limits
    process under load it stopped the event loop for 0.7 s (benchmark, while 1,000 checks/s
    waited; it ran every 5 minutes then). And it found little to free: 465 objects after
    four minutes under load. So it comes only when the process's peak memory has more than
    doubled since the last one (plus ``FULL_COLLECTION_SLACK_KB``): such garbage cannot pile
    up, and the pause is paid only when memory says it is needed. (Counting the frozen objects
    instead walks all of them: 5–10 ms each time in a limits process.)"""
    global _collector
    me = object()
    kept = _peak_memory_kb()
    try:
        while not await wait_or_stop(stop, freeze_every):
            # One job per process does the work (`creditwatch dev` hosts three services);
            # another takes over when it stops.
            if _collector is None:
                _collector = me
            if _collector is not me:
                continue
            if _peak_memory_kb() > 2 * kept + FULL_COLLECTION_SLACK_KB:
                gc.unfreeze()
                gc.collect()
                kept = _peak_memory_kb()
            gc.freeze()
    finally:
        if _collector is me:
            _collector = None
            # Stopped: everything frozen meanwhile is back in the collector's sight, and its
            # garbage freed in time (a job still running takes over and freezes anew).
            gc.unfreeze()


_collector: object | None = None  # the collect_garbage job doing the work in this process


@dataclass(slots=True)
class Incoming:
    """An event about to be folded: stored position, envelope and its validated data."""

    seq: int
    envelope: Envelope
    event: BaseModel
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None


# What a service's handler works in: one transaction (see shared.unitofwork).
Tx = UnitOfWork


class Service(Protocol):
    """What a service plugs into the core: its tables, topics and handlers."""

    name: str
    metadata: MetaData
    core: es.CoreTables
    projection_tables: Sequence[Table]
    consumed_types: frozenset[str]

    def input_topics(self) -> list[str]: ...

    # Optional: ``customers`` (a Table keyed by ``customer_id``): the rows locked, in id
    # order, before a transaction's events are numbered (see ``EventCore.lock_subjects``).

    def parse_stored(self, env: Envelope) -> BaseModel | None:
        """Validate a stored or locally made event: the service's own types and the contract's."""
        ...

    async def handle(self, tx: UnitOfWork, events: Sequence[Incoming]) -> None:
        """Fold new (never before seen) events into the projections, in order."""

    # Optional: ``repository`` (a shared.unitofwork.Repository): after every commit the
    # core tells it which customers' states the unit of work committed.

    async def due_events(self, uow: UnitOfWork) -> list[Envelope]:
        """Time-driven events that are due at ``uow.now`` (expiries, ageing, reviews), judged
        on the customers' states under their locks (loaded through the unit of work)."""
        ...


@dataclass(slots=True)
class Record:
    """The parts of a Kafka record the core needs (aiokafka's ConsumerRecord has them)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(slots=True)
class Prepared:
    """A decoded batch, ready for its transaction."""

    records: Sequence[Record]
    now: datetime
    positions: dict[tuple[str, int], int] = field(default_factory=dict)
    dead: list[tuple[Record, DeadLetter]] = field(default_factory=list)
    candidates: dict[tuple[str, str], tuple[Record, Envelope, BaseModel]] = field(
        default_factory=dict
    )
    skipped: Counter[tuple[str, str]] = field(default_factory=Counter)

    def skipped_count(self, reason: str) -> int:
        return sum(n for (_, r), n in self.skipped.items() if r == reason)

    def extend(self, later: Prepared) -> None:
        """Append a batch decoded after this one (its records come later on every
        partition): one transaction will apply both, in order."""
        self.records = [*self.records, *later.records]
        self.positions.update(later.positions)
        self.dead.extend(later.dead)
        for key, candidate in later.candidates.items():
            if key in self.candidates:
                self.skipped[(candidate[0].topic, "duplicate")] += 1
            else:
                self.candidates[key] = candidate
        self.skipped.update(later.skipped)


@dataclass(slots=True)
class BatchResult:
    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    skipped: int = 0


# Events a replay folds between two writes of the customers' rows (see EventCore._refold).
REPLAY_WINDOW = 100_000
# …and the customers whose states it holds at most meanwhile: a replay's memory is that of
# its window's states (about 20 KB of Python objects a customer with a dozen open items), so
# a large portfolio is written out before it would hold more of them.
REPLAY_CUSTOMERS = 25_000


class EventCore:
    """Applies batches of records or local events to one service's store, atomically."""

    def __init__(
        self,
        service: Service,
        engine: AsyncEngine,
        *,
        dlq_topic: str = "credit.dlq",
        clock: Clock = utcnow,
        topic_of_type: Mapping[str, str] | None = None,
        service_factory: Callable[[], Service] | None = None,
    ) -> None:
        self.service = service
        # Builds the same service in another process (picklable): a parallel replay's workers.
        self.service_factory = service_factory
        self.engine = engine
        self.dlq_topic = dlq_topic
        self.clock = clock
        self.outbox_ready = asyncio.Event()
        # The Kafka cluster the consumed records come from (stored with their offsets).
        self.cluster_id: str | None = None
        self.topic_of_type = topic_of_type
        self._svc = service.name

    async def lock_subjects(self, conn: AsyncConnection, subjects: Iterable[str]) -> None:
        """Lock the customers' rows (in id order) before their events are stored.

        A replay folds the stored events in store order (``seq``), so the live fold must
        fold each customer's events in that order too. Numbers are drawn when the events are
        stored; a transaction that numbered its events before locking the customer (a
        consumed batch) could fold them after another one's (the API, the scheduler, credit
        checks) that numbered later but locked first — and a replay then disagrees (issue
        19, finding 6). Every path locks first: the API and the checks lock the rows they
        load, and this is the consumer's and the scheduler's. SQLite has one writer at a
        time (``BEGIN IMMEDIATE``): nothing to do."""
        table = getattr(self.service, "customers", None)
        if table is None or conn.dialect.name != "postgresql":
            return
        await lock_rows(conn, table, "customer_id", subjects, ["customer_id"])

    # ---- consumed records -------------------------------------------------------------
    def prepare(self, records: Sequence[Record], poison: BaseException | None = None) -> Prepared:
        """Decode and validate a batch (CPU only, no I/O): what to append, what to set aside."""
        prepared = Prepared(records, self.clock())
        self._prepare_into(prepared, records, poison)
        return prepared

    async def prepare_interleaved(self, records: Sequence[Record], chunk: int = 50) -> Prepared:
        """``prepare``, yielding to the event loop every ``chunk`` records, so that a batch
        whose transaction is in flight can send its next statement meanwhile: the database
        works while this process decodes."""
        prepared = Prepared(records, self.clock())
        for start in range(0, len(records), chunk):
            self._prepare_into(prepared, records[start : start + chunk], None)
            await asyncio.sleep(0)
        return prepared

    def _prepare_into(
        self, prepared: Prepared, records: Sequence[Record], poison: BaseException | None
    ) -> None:
        for rec in records:
            prepared.positions[(rec.topic, rec.partition)] = rec.offset + 1
            if poison is not None:
                prepared.dead.append((rec, DeadLetter(PROCESSING_ERROR, _describe(poison))))
                continue
            try:
                env = decode(rec.value)
                # Without a configured topic map there is nothing to check the topic against.
                topic = rec.topic if self.topic_of_type is not None else None
                model = parse(env, topic=topic, topic_of_type=self.topic_of_type)
            except DeadLetter as dl:
                prepared.dead.append((rec, dl))
                continue
            if model is None or env.type not in self.service.consumed_types:
                prepared.skipped[(rec.topic, "unknown_type")] += 1
                continue
            key = (env.source, env.id)
            if key in prepared.candidates:
                prepared.skipped[(rec.topic, "duplicate")] += 1
                continue
            prepared.candidates[key] = (rec, env, model)

    async def process_records(self, records: Sequence[Record]) -> BatchResult:
        """Apply one consumed batch in one transaction; poison events are isolated."""
        return await self.apply(self.prepare(records))

    async def apply(self, prepared: Prepared) -> BatchResult:
        """One transaction for a prepared batch; a batch that fails for a reason other than
        an unreachable database is retried record by record, dead-lettering only the poison."""
        started = time.perf_counter()
        records = prepared.records
        try:
            result = await self._apply(prepared)
        except Exception as exc:
            if is_transient(exc) or isinstance(exc, LayoutError):
                raise
            if len(records) == 1:
                log.exception("event could not be processed; dead-lettering it")
                result = await self._apply(self.prepare(records, poison=exc))
            else:
                # A bug or an unexpected value in one event must not stop the stream.
                log.warning("batch failed (%s); isolating records", exc)
                result = BatchResult()
                for rec in records:
                    part = await self.process_records([rec])
                    result.applied += part.applied
                    result.duplicates += part.duplicates
                    result.dead_lettered += part.dead_lettered
                    result.skipped += part.skipped
                return result
        metrics.EVENT_PROCESSING_SECONDS.labels(self._svc).observe(time.perf_counter() - started)
        metrics.BATCHES.labels(self._svc).inc()
        return result

    async def _apply(self, prepared: Prepared) -> BatchResult:
        now = prepared.now
        core = self.service.core
        result = BatchResult(
            duplicates=prepared.skipped_count("duplicate"),
            skipped=prepared.skipped_count("unknown_type"),
        )
        skipped = Counter(prepared.skipped)
        dead = list(prepared.dead)
        async with self.engine.begin() as conn:
            tx = UnitOfWork(conn, now)
            subjects = {env.subject for _, env, _ in prepared.candidates.values()}
            repository = getattr(self.service, "repository", None)
            if repository is not None:
                # Lock (id order) and load at once, before the events are numbered.
                await repository.load(tx, subjects)
            else:
                await self.lock_subjects(conn, subjects)
            rows = [
                es.envelope_row(
                    env,
                    topic=rec.topic,
                    partition=rec.partition,
                    offset=rec.offset,
                    recorded_at=now,
                    raw=rec.value,
                )
                for rec, env, _ in prepared.candidates.values()
            ]
            new = await es.append(conn, core, rows)
            fresh: list[Incoming] = []
            for key, (rec, env, model) in prepared.candidates.items():
                seq = new.get(key)
                if seq is None:
                    skipped[(rec.topic, "duplicate")] += 1
                    result.duplicates += 1
                    continue
                fresh.append(Incoming(seq, env, model, rec.topic, rec.partition, rec.offset))
            if fresh:
                await self.service.handle(tx, fresh)
            rejected = {inc.seq for inc, _ in tx.rejected}
            for inc, dl in tx.rejected:
                dead.append(
                    (
                        Record(
                            inc.topic or "",
                            inc.partition or 0,
                            inc.offset or 0,
                            inc.envelope.subject.encode(),
                            inc.envelope.to_json(),
                        ),
                        dl,
                    )
                )
            await es.forget(conn, core, rejected)
            letters = [self._dead(rec, dl, now) for rec, dl in dead]
            await es.enqueue(conn, core, [*tx.outbox, *letters], now)
            await es.store_offsets(conn, core, prepared.positions, now, self.cluster_id)
        self._committed(tx)

        # Counted once committed, so a retried batch is not counted twice.
        consumed: Counter[tuple[str, str]] = Counter()
        lag = metrics.EVENT_LAG_SECONDS.labels(self._svc)
        for inc in fresh:
            if inc.seq not in rejected:
                consumed[(inc.topic or "", inc.envelope.type)] += 1
                lag.observe(max((now - inc.envelope.time).total_seconds(), 0.0))
        for (topic, type_), n in consumed.items():
            metrics.EVENTS_CONSUMED.labels(self._svc, topic, type_).inc(n)
        for (topic, reason), n in skipped.items():
            metrics.EVENTS_SKIPPED.labels(self._svc, topic, reason).inc(n)
        for rec, dl in dead:
            metrics.EVENTS_DEAD_LETTERED.labels(self._svc, rec.topic, dl.reason).inc()
            log.warning(
                "dead letter %s/%s@%s: %s (%s)",
                rec.topic,
                rec.partition,
                rec.offset,
                dl.reason,
                dl.error,
                extra={
                    "service": self._svc,
                    "topic": rec.topic,
                    "partition": rec.partition,
                    "offset": rec.offset,
                    "reason": dl.reason,
                    "customer_id": rec.key.decode("utf-8", "replace") if rec.key else None,
                },
            )
        if log.isEnabledFor(logging.DEBUG):
            for inc in fresh:
                log.debug(
                    "applied %s",
                    inc.envelope.type,
                    extra={
                        "service": self._svc,
                        "event_id": inc.envelope.id,
                        "customer_id": inc.envelope.subject,
                        "topic": inc.topic,
                        "partition": inc.partition,
                        "offset": inc.offset,
                    },
                )
        result.applied = sum(consumed.values())
        result.dead_lettered = len(dead)
        if dead:
            self.outbox_ready.set()
        return result

    def _committed(self, uow: UnitOfWork) -> None:
        """Once a unit of work has committed (every path: batches, API commands, the
        scheduler): the repository learns the committed states, the hooks run, and the relay
        is woken for what was queued."""
        repository = getattr(self.service, "repository", None)
        if repository is not None and uow.touched:
            repository.remember(uow, uow.touched)
        for callback in uow.after_commit:
            callback()
        if uow.outbox:
            self.outbox_ready.set()

    def _dead(self, rec: Record, dl: DeadLetter, now: datetime) -> tuple[str, Envelope]:
        env = dead_letter_record(
            error=dl.error,
            reason=dl.reason,
            service=self._svc,
            topic=rec.topic,
            partition=rec.partition,
            offset=rec.offset,
            key=rec.key,
            value=rec.value,
            failed_at=now,
        )
        return self.dlq_topic, env

    # ---- local events (API commands, scheduler) ---------------------------------------
    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[UnitOfWork]:
        """One unit of work for a command of the service's own (API, scheduler, credit
        check): load customers with ``repository.load(uow, ids)``, record events with
        ``record``; on leaving, the outbox is queued and the transaction commits, then the
        committed states are remembered and the ``after_commit`` hooks run. An exception
        rolls everything back and runs no hook."""
        async with self.engine.begin() as conn:
            uow = UnitOfWork(conn, self.clock())
            yield uow
            await es.enqueue(conn, self.service.core, uow.outbox, uow.now)
        self._committed(uow)

    async def record(self, uow: UnitOfWork, envelopes: Sequence[Envelope]) -> list[Incoming]:
        """Record and apply events made inside the service, in the unit of work: the
        customers are locked before the events are numbered, then folded like consumed ones.
        Each must be valid: an invalid one is a programming error, not a dead letter.
        Returns the events that were new (a stable id seen before changes nothing)."""
        parsed: list[tuple[Envelope, BaseModel]] = []
        for env in envelopes:
            model = self.service.parse_stored(env)
            if model is None:
                raise ValueError(f"unknown event type {env.type!r}")
            parsed.append((env, model))
        subjects = {env.subject for env, _ in parsed}
        repository = getattr(self.service, "repository", None)
        if repository is not None:
            await repository.load(uow, subjects)  # locked (id order), before the numbering
        else:
            await self.lock_subjects(uow.conn, subjects)
        rows = [
            es.envelope_row(env, topic=None, partition=None, offset=None, recorded_at=uow.now)
            for env, _ in parsed
        ]
        new = await es.append(uow.conn, self.service.core, rows)
        fresh = [
            Incoming(new[(env.source, env.id)], env, model)
            for env, model in parsed
            if (env.source, env.id) in new
        ]
        if fresh:
            await self.service.handle(uow, fresh)
        for inc, dl in uow.rejected:
            raise ValueError(f"service rejected its own event {inc.envelope.id}: {dl.error}")
        return fresh

    async def run_due(self) -> int:
        """Record the time-driven events due now; returns how many were new."""
        async with self.transaction() as uow:
            due = await self.service.due_events(uow)
            if not due:
                return 0
            await self.record(uow, due)
        return len(due)

    # ---- replay and verify ------------------------------------------------------------
    async def _refold(
        self,
        conn: AsyncConnection,
        progress: Callable[[int, int], None] | None = None,
        *,
        share: tuple[int, int] | None = None,
        now: datetime | None = None,
    ) -> int:
        """Truncate the projections and fold the stored events into them (``share``: only
        the customers of that share, for a parallel replay's worker)."""
        for table in reversed(self.service.projection_tables):
            await conn.execute(delete(table))
        total = await es.count_events(conn, self.service.core) if share is None else 0
        done = 0
        now = self.clock() if now is None else now
        # A service with ``flush`` keeps its customers' states across pages and writes their
        # rows once per window (the fold, not the rows, is what a replay must repeat).
        flush = getattr(self.service, "flush", None)
        uow = UnitOfWork(conn, now, replaying=True)
        folded = 0
        async for page in es.read_events(conn, self.service.core, share=share):
            incoming: list[Incoming] = []
            for stored in page:
                model = self.service.parse_stored(stored.envelope)
                if model is not None:
                    incoming.append(
                        Incoming(
                            stored.seq,
                            stored.envelope,
                            model,
                            stored.topic,
                            stored.partition,
                            stored.offset,
                        )
                    )
            if flush is None:
                uow = UnitOfWork(conn, now, replaying=True)
            await self.service.handle(uow, incoming)
            folded += len(incoming)
            if flush is not None and (
                folded >= REPLAY_WINDOW or len(uow.states) >= REPLAY_CUSTOMERS
            ):
                await flush(uow)
                uow.states.clear()
                folded = 0
                _collect_window()
            done += len(page)
            if progress:
                progress(done, total)
        if flush is not None:
            await flush(uow)
        return done

    async def replay(
        self, progress: Callable[[int, int], None] | None = None, *, jobs: int = 1
    ) -> int:
        """Truncate the projections and refold every stored event, in one transaction.

        ``jobs`` > 1 on PostgreSQL folds the customers in that many processes, each its own
        share, into shadow tables that then replace the projections in one transaction
        (``shared.parallel``); it needs ``service_factory``."""
        if self._parallel(jobs):
            from shared import parallel

            return await parallel.replay(self, jobs, progress)
        async with self.engine.begin() as conn:
            return await self._refold(conn, progress)

    def _parallel(self, jobs: int) -> bool:
        return (
            jobs > 1
            and self.service_factory is not None
            and self.engine.dialect.name == "postgresql"
        )

    async def verify(self, *, jobs: int = 1) -> list[str]:
        """Compare the projections with a replay (rolled back); returns the differences.

        On PostgreSQL it reads one snapshot (REPEATABLE READ): a batch that commits while
        it runs is neither half in what it compares nor reported as a difference; if such a
        batch touches what the replay rewrites, the verification is retried. ``jobs`` > 1
        folds in parallel, as ``replay`` does, into shadow tables that are then dropped."""
        if self._parallel(jobs):
            from shared import parallel

            return await parallel.verify(self, jobs)
        for attempt in range(5):
            try:
                return await self._verify()
            except Exception as exc:
                if not is_conflict(exc) or attempt == 4:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _verify(self) -> list[str]:
        async with self.engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                await conn.execution_options(isolation_level="REPEATABLE READ")
            trans = await conn.begin()
            try:
                before = await dump_rows(conn, self.service.projection_tables)
                await self._refold(conn)
                after = await dump_rows(conn, self.service.projection_tables)
            finally:
                await trans.rollback()
        return differences(before, after)


def differences(before: Mapping[str, set[str]], after: Mapping[str, set[str]]) -> list[str]:
    """Every row of the projections (``before``) a replay (``after``) did not reproduce,
    and every row it made that is not stored."""
    diffs: list[str] = []
    for name in before:
        missing = before[name] - after[name]
        extra = after[name] - before[name]
        diffs += [f"{name}: stored row not reproduced by replay: {r}" for r in sorted(missing)]
        diffs += [f"{name}: replay produced a row not stored: {r}" for r in sorted(extra)]
    return diffs


def _collect_window() -> None:
    """A replay's window is written and its states dropped: one full collection frees
    whatever garbage in reference cycles the fold left. Under ``tune_gc`` (a service,
    `creditwatch replay`, `creditwatch verify`) CPython runs none by itself, and a replay has
    no ``collect_garbage`` job beside it. (Measured: a limits replay of 10,000 customers and
    500,000 events peaked at 620 MB with it and 626 MB without: the fold leaves little such
    garbage; the peak is the window's states.)"""
    gc.collect()


async def dump_rows(conn: AsyncConnection, tables: Sequence[Table]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for table in tables:
        rows = await conn.execute(select(table))
        out[table.name] = {repr(tuple(_canon(v) for v in row)) for row in rows}
    return out


def _canon(value: Any) -> Any:
    from decimal import Decimal

    if isinstance(value, Decimal):
        return format(value.normalize(), "f")
    return value


def _describe(exc: BaseException, limit: int = 500) -> str:
    text = f"{type(exc).__name__}: {exc}"
    # A cut text says so: a dead letter's reader must not take a prefix for the whole.
    return text if len(text) <= limit else text[: limit - 14] + " …[truncated]"


# ---- the loops ------------------------------------------------------------------------------


class Pipeline:
    """One batch transaction at a time, commits in order, with decoding overlapped.

    Two ways to drive it. ``feed`` prepares batch N+1 while batch N's transaction is in
    flight, then waits for N and starts N+1. The consumer loop instead ``add``s records as
    they arrive: everything fetched while a transaction is in flight is decoded into the next
    batch meanwhile, and ``advance`` starts that batch the moment the previous one has
    committed — a record waits for at most the transaction ahead of it, not for a fetch
    cycle on top of it.
    """

    def __init__(
        self,
        core: EventCore,
        apply: Callable[[Prepared], Coroutine[Any, Any, BatchResult]] | None = None,
    ) -> None:
        self.core = core
        self._apply = apply or core.apply
        self._inflight: asyncio.Task[BatchResult] | None = None
        self._next: Prepared | None = None

    @property
    def inflight(self) -> asyncio.Task[BatchResult] | None:
        """The batch whose transaction is running, if any."""
        return self._inflight

    @property
    def queued(self) -> int:
        """Records decoded and waiting for the transaction in flight."""
        return len(self._next.records) if self._next is not None else 0

    async def feed(self, records: Sequence[Record]) -> BatchResult | None:
        """Queue a batch; returns the result of the batch before it, once committed."""
        prepared = await self.core.prepare_interleaved(records)
        done = await self.drain()
        self._start(prepared)
        await asyncio.sleep(0)  # let it send its first statement before the caller goes on
        return done

    async def add(self, records: Sequence[Record]) -> None:
        """Decode records into the next batch (yielding to the event loop between chunks,
        so the transaction in flight progresses meanwhile); ``advance`` starts it."""
        prepared = await self.core.prepare_interleaved(records)
        if self._next is None:
            self._next = prepared
        else:
            self._next.extend(prepared)

    def advance(self) -> BatchResult | None:
        """If no transaction is in flight (any more), start the queued batch. Returns the
        result of a batch that has just committed; raises what its transaction raised."""
        task = self._inflight
        result = None
        if task is not None:
            if not task.done():
                return None
            self._inflight = None
            result = task.result()
        if self._next is not None:
            prepared, self._next = self._next, None
            self._start(prepared)
        return result

    async def drain(self) -> BatchResult | None:
        """Wait until the batch in flight and the queued one are committed."""
        result = None
        while self._inflight is not None or self._next is not None:
            if self._inflight is None and self._next is not None:
                prepared, self._next = self._next, None
                self._start(prepared)
            task = self._inflight
            assert task is not None
            result = await task
            if self._inflight is task:
                self._inflight = None
        return result

    def _start(self, prepared: Prepared) -> None:
        self._inflight = asyncio.create_task(self._apply(prepared))


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to ``seconds``; True when stopping was requested."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    return stop.is_set()


def in_time_order(batches: Mapping[Any, Sequence[Any]]) -> list[Any]:
    """One fetch's records, each partition's in their order, merged across partitions by
    their Kafka timestamps. A fetch returns its partitions in no particular order; merging
    by the time the records were produced keeps, say, a registration and a statement sent
    one after the other on two topics in that order when one fetch brings both."""
    parts = [msgs for msgs in batches.values() if msgs]
    if len(parts) == 1:
        return list(parts[0])
    return list(heapq.merge(*parts, key=lambda m: m.timestamp))


async def _bounded(awaitable: Coroutine[Any, Any, Any], seconds: float, what: str) -> None:
    """Await a clean-up step for at most ``seconds``: with the broker or the database gone,
    leaving a consumer group or flushing a producer would wait for their own timeouts
    (tens of seconds), past any container's stop grace period."""
    try:
        await asyncio.wait_for(awaitable, timeout=seconds)
    except TimeoutError:
        log.warning("%s did not finish within %.0fs; abandoned", what, seconds)
    except Exception as exc:
        log.debug("%s failed: %s", what, exc)


class Stopped(Exception):
    """Stopping was requested while a batch waited for the database: it is given up
    uncommitted (its offsets were not stored, so the next start reads it again)."""


class NewLogError(RuntimeError):
    """A stored offset is a position in another log than the broker's."""


# How the consumer fetches: the broker answers once it has FETCH_MIN_BYTES for us or after
# FETCH_MAX_WAIT_MS, whichever comes first. With Kafka's defaults (1 byte, 500 ms) a busy
# consumer sends a fetch for every few records (over a hundred a second at 2,000 events/s),
# which costs both this process and the broker CPU. 16 KiB is about a burst from an upstream
# relay (answered at once) or 20 ms of a steady 2,000 events/s of 400 bytes; a batch takes
# tens of milliseconds anyway, so the wait costs little latency. An idle topic is polled
# every 20 ms instead of every 500 ms.
FETCH_MAX_WAIT_MS = 20
FETCH_MIN_BYTES = 16 * 1024


class BrokerWatch:
    """Asks the broker for its metadata every ``interval`` seconds: whether it is reachable
    (readiness, ``creditwatch_dependency_up``) and its cluster id (whose log a stored offset
    belongs to). One small request per interval per process."""

    def __init__(
        self,
        service: str,
        *,
        bootstrap: str,
        client_kwargs: dict[str, Any] | None = None,
        interval: float = 2.0,
        timeout: float = 3.0,
        grace: float = 5.0,
    ) -> None:
        self.service = service
        self.bootstrap = bootstrap
        self.client_kwargs = client_kwargs or {}
        self.interval = interval
        self.timeout = timeout
        # Unreachable for this long before readiness says so (one lost probe is not an outage).
        self.grace = grace
        self.cluster_id: str | None = None
        self._ok_at: float | None = None
        self._failing_since: float | None = None
        self._probed = asyncio.Event()
        self._lock = asyncio.Lock()
        self._admin: Any = None
        self._outage = OutageLog(log, f"{service}: Kafka broker {bootstrap}")

    @property
    def reachable(self) -> bool:
        if self._ok_at is None:
            return False
        return self._failing_since is None or (time.monotonic() - self._failing_since < self.grace)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                await self.probe()
                if await wait_or_stop(stop, self.interval):
                    return
        finally:
            await self._close_admin()

    async def wait_for_cluster_id(self, stop: asyncio.Event) -> str | None:
        """The broker's cluster id, once a probe has answered (None when stopping)."""
        while self.cluster_id is None and not stop.is_set():
            self._probed.clear()
            waiter = asyncio.create_task(self._probed.wait())
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stopper.cancel()
        return self.cluster_id

    async def probe(self) -> bool:
        async with self._lock:  # one probe at a time: the loop's, or a consumer's first
            return await self._probe()

    async def _probe(self) -> bool:
        from aiokafka.admin import AIOKafkaAdminClient

        try:
            admin = self._admin
            if admin is None:
                admin = AIOKafkaAdminClient(
                    bootstrap_servers=self.bootstrap,
                    request_timeout_ms=int(self.timeout * 1000),
                    **self.client_kwargs,
                )
                self._admin = admin
                await asyncio.wait_for(admin.start(), self.timeout)
            described = await asyncio.wait_for(admin.describe_cluster(), self.timeout)
        except Exception as exc:
            if not is_transient(exc) and not isinstance(exc, TimeoutError):
                log.warning("%s: broker probe failed: %s", self.service, _describe(exc))
            self._outage.failed(exc)
            if self._failing_since is None:
                self._failing_since = time.monotonic()
            metrics.DEPENDENCY_UP.labels(self.service, "broker").set(0)
            await self._close_admin()
            self._probed.set()
            return False
        self.cluster_id = described.get("cluster_id") or self.cluster_id
        self._ok_at = time.monotonic()
        self._failing_since = None
        self._outage.recovered()
        metrics.DEPENDENCY_UP.labels(self.service, "broker").set(1)
        self._probed.set()
        return True

    async def _close_admin(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            await _bounded(admin.close(), 2.0, f"{self.service}: closing the broker probe")


class ConsumerLoop:
    """Kafka → EventCore, seeking to the offsets stored in the database on assignment.

    It never ends on an outage: a database that is away keeps the batch in hand and retries
    it with back-off; a broker that is away is waited for (aiokafka reconnects, the group
    rebalances when it is back). A failure of any other kind ends the loop, which makes the
    process not alive (``/healthz``) with one log line saying why.
    """

    def __init__(
        self,
        core: EventCore,
        *,
        bootstrap: str,
        topics: list[str],
        group_id: str,
        client_kwargs: dict[str, Any] | None = None,
        max_records: int = 500,
        poll_timeout_ms: int = 200,
        session_timeout_ms: int = 10000,
        heartbeat_interval_ms: int = 2000,
        fetch_max_wait_ms: int = FETCH_MAX_WAIT_MS,
        fetch_min_bytes: int = FETCH_MIN_BYTES,
        broker: BrokerWatch | None = None,
        on_new_log: str = "fail",
    ) -> None:
        self.core = core
        self.bootstrap = bootstrap
        self.topics = topics
        self.group_id = group_id
        self.client_kwargs = client_kwargs or {}
        self.max_records = max_records
        self.poll_timeout_ms = poll_timeout_ms
        self.session_timeout_ms = session_timeout_ms
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.fetch_min_bytes = fetch_min_bytes
        self.broker = broker or BrokerWatch(
            core.service.name, bootstrap=bootstrap, client_kwargs=client_kwargs
        )
        self._own_broker_watch = broker is None
        self.on_new_log = on_new_log
        self.assigned = asyncio.Event()
        self.healthy = False
        self._consumer: Any = None
        # Next offset per (topic, partition) of the batches this consumer committed.
        self._applied: dict[tuple[str, int], int] = {}
        # Partitions assigned but not yet positioned at their stored offsets (kept paused).
        self._to_seek: set[Any] = set()
        self._seek_failed: BaseException | None = None
        self._db_outage = OutageLog(log, f"{core.service.name}: database (consumer)")
        self._svc = core.service.name

    async def run(self, stop: asyncio.Event) -> None:
        from aiokafka import AIOKafkaConsumer  # local: the domain and unit tests never need it
        from aiokafka.abc import ConsumerRebalanceListener

        loop = self
        watch: asyncio.Task[None] | None = None
        if self._own_broker_watch:
            watch = asyncio.create_task(self.broker.run(stop))

        class SeekToStored(ConsumerRebalanceListener):  # type: ignore[misc]
            async def on_partitions_revoked(self, revoked: Any) -> None:
                loop._to_seek.difference_update(revoked)
                # Commit what is in flight before another member takes the partitions over.
                with contextlib.suppress(Stopped):
                    await pipeline.drain()
                loop._forget_lag(revoked)

            async def on_partitions_assigned(self, assigned: Any) -> None:
                # aiokafka starts fetching newly assigned partitions from the group's
                # committed offsets while this callback waits; paused, nothing of that reaches
                # getmany before the seek to the stored offsets (done by the loop, which can
                # wait for the database and report what it finds).
                partitions = list(assigned)
                if partitions:
                    loop._consumer.pause(*partitions)
                    loop._to_seek.update(partitions)
                else:
                    loop._mark_assigned()

        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.max_records,
            # Room for one oversize record (dead-lettered by the core) per partition fetch.
            max_partition_fetch_bytes=4 * 1024 * 1024,
            session_timeout_ms=self.session_timeout_ms,
            heartbeat_interval_ms=self.heartbeat_interval_ms,
            rebalance_timeout_ms=max(self.session_timeout_ms, 30000),
            fetch_max_wait_ms=self.fetch_max_wait_ms,
            fetch_min_bytes=self.fetch_min_bytes,
            **self.client_kwargs,
        )
        self._consumer = consumer
        pipeline = Pipeline(self.core, lambda prepared: self._apply_with_retry(prepared, stop))
        self._applied.clear()
        fetch: asyncio.Task[dict[Any, Any]] | None = None
        lag_commit: asyncio.Task[None] | None = None
        started = False
        try:
            backoff = Backoff(first=1.0, cap=10.0)
            while not stop.is_set():
                try:
                    await consumer.start()
                    started = True
                    break
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    self.broker._outage.failed(exc)
                    if await wait_or_stop(stop, backoff.next_delay()):
                        return
            if self.broker.cluster_id is None:
                await self.broker.probe()
            consumer.subscribe(self.topics, listener=SeekToStored())
            last_commit = 0.0
            seek_backoff = Backoff(first=0.5, cap=10.0)
            next_seek = 0.0
            # Fetching never waits for a transaction: while one is in flight, what arrives is
            # fetched and decoded into the next batch, which starts as soon as it commits.
            while not stop.is_set():
                if self._to_seek and time.monotonic() >= next_seek:
                    if await self._position(stop):
                        seek_backoff.reset()
                    else:
                        next_seek = time.monotonic() + seek_backoff.next_delay()
                room = self.max_records - pipeline.queued
                if fetch is None and room > 0:
                    fetch = asyncio.create_task(
                        consumer.getmany(timeout_ms=self.poll_timeout_ms, max_records=room)
                    )
                waiting = [t for t in (fetch, pipeline.inflight) if t is not None]
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if fetch is not None and fetch.done():
                    batches, fetch = fetch.result(), None
                    records = [
                        Record(m.topic, m.partition, m.offset, m.key, m.value)
                        for m in in_time_order(batches)
                    ]
                    if records:
                        await pipeline.add(records)
                        self._observe_lag(consumer, batches)
                        if time.monotonic() - last_commit > 1.0 and (
                            lag_commit is None or lag_commit.done()
                        ):
                            last_commit = time.monotonic()
                            lag_commit = asyncio.create_task(self._commit_for_lag_tools(consumer))
                try:
                    pipeline.advance()
                except Stopped:
                    break
            # Stopping: commit what was fetched and decoded (given up if the database is away).
            with contextlib.suppress(Stopped):
                await pipeline.drain()
        finally:
            self.healthy = False
            # A fetch still waiting has taken nothing (records leave aiokafka's buffer only
            # when it returns); then leave the group cleanly, or give up after a while.
            pending = [t for t in (fetch, lag_commit, pipeline.inflight) if t is not None]
            for task in pending:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if started:
                await _bounded(consumer.stop(), 5.0, f"{self._svc}: leaving the consumer group")
            if watch is not None:
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)

    def _mark_assigned(self) -> None:
        self.healthy = True
        self.assigned.set()

    async def _position(self, stop: asyncio.Event) -> bool:
        """Seek the partitions waiting for it to their stored offsets and resume them; False
        when the database or broker is away (the partitions stay paused; retried)."""
        partitions = list(self._to_seek)
        try:
            await self._seek(partitions, stop)
        except NewLogError:
            raise
        except Exception as exc:
            if not is_transient(exc):
                raise
            self._db_outage.failed(exc)
            self.healthy = False
            return False
        self._db_outage.recovered()
        self._to_seek.difference_update(partitions)
        assigned = self._consumer.assignment()
        self._consumer.resume(*[tp for tp in partitions if tp in assigned])
        if not self._to_seek:
            # The group answered and the positions are set: ready, before the first fetch
            # of the new assignment comes back (up to a poll timeout later).
            self._mark_assigned()
        return True

    async def _seek(self, partitions: list[Any], stop: asyncio.Event) -> None:
        consumer = self._consumer
        parts = [(tp.topic, tp.partition) for tp in partitions]
        async with self.core.engine.connect() as conn:
            stored = await es.load_positions(conn, self.core.service.core, parts)
        cluster = self.broker.cluster_id or await self.broker.wait_for_cluster_id(stop)
        ends = await consumer.end_offsets(partitions)
        begins = await consumer.beginning_offsets(partitions)
        new_log: dict[Any, str] = {}
        for tp in partitions:
            pos = stored.get((tp.topic, tp.partition))
            if pos is None:
                consumer.seek(tp, begins[tp])
                continue
            if pos.cluster_id is not None and cluster is not None and pos.cluster_id != cluster:
                new_log[tp] = (
                    f"stored offset {pos.next_offset} is in the log of cluster "
                    f"{pos.cluster_id!r}, the broker is cluster {cluster!r}"
                )
            elif pos.next_offset > ends[tp] and await self._past_end(tp, pos.next_offset):
                new_log[tp] = (
                    f"stored offset {pos.next_offset} is past the log's end {ends[tp]} "
                    "(the broker lost its data, or the topic was made again)"
                )
            elif pos.next_offset < begins[tp]:
                log.error(
                    "%s: %s/%s: records %d..%d were deleted (retention) before this service "
                    "consumed them; consuming on from %d",
                    self._svc,
                    tp.topic,
                    tp.partition,
                    pos.next_offset,
                    begins[tp] - 1,
                    begins[tp],
                )
                consumer.seek(tp, begins[tp])
            else:
                consumer.seek(tp, pos.next_offset)
        if not new_log:
            return
        named = "; ".join(f"{tp.topic}/{tp.partition}: {why}" for tp, why in new_log.items())
        if self.on_new_log != "restart":
            raise NewLogError(
                f"{self._svc}: the broker's log is not the one the stored offsets are in — "
                f"{named}. Nothing was consumed from these partitions. If the log is new on "
                "purpose, move the offsets with `creditwatch offsets reset "
                f"{self._svc} --to beginning`"
            )
        log.warning(
            "%s: NEW BROKER LOG — %s. Consuming these partitions again from their beginning; "
            "events already stored are recognised by id and not applied twice",
            self._svc,
            named,
        )
        async with self.core.engine.begin() as conn:
            await es.reset_offsets(
                conn,
                self.core.service.core,
                {(tp.topic, tp.partition): begins[tp] for tp in new_log},
                self.core.clock(),
                cluster,
            )
        for tp in new_log:
            consumer.seek(tp, begins[tp])

    async def _past_end(self, tp: Any, position: int) -> bool:
        """Whether the log has no record before ``position``: the end a broker reports is
        taken as a hint only, confirmed by fetching. (The dev broker, Tansu 0.6, reports
        the first offset of the last record batch plus one, not the log's end.)"""
        from aiokafka import AIOKafkaConsumer

        probe = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="none",
            **self.client_kwargs,
        )
        await probe.start()
        try:
            probe.assign([tp])
            probe.seek(tp, position - 1)
            try:
                fetched = await probe.getmany(tp, timeout_ms=2000)
            except Exception:  # out of range: nothing there
                return True
            return not any(m.offset >= position - 1 for m in fetched.get(tp, ()))
        finally:
            await _bounded(probe.stop(), 3.0, f"{self._svc}: the log-end probe")

    async def _apply_with_retry(self, prepared: Prepared, stop: asyncio.Event) -> BatchResult:
        backoff = Backoff(first=0.5, cap=10.0)
        while True:
            self.core.cluster_id = self.broker.cluster_id
            try:
                result = await self.core.apply(prepared)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if is_conflict(exc):
                    # Lost to a concurrent transaction: nothing is down; again, at once.
                    log.debug("%s: batch conflicted (%s); retrying", self._svc, exc)
                    if await wait_or_stop(stop, 0.05):
                        raise Stopped from exc
                    continue
                # The database is away: keep the batch and try again; nothing is lost.
                self.healthy = False
                self._db_outage.failed(exc)
                if await wait_or_stop(stop, backoff.next_delay()):
                    raise Stopped from exc
                continue
            if self._db_outage.down:
                self._db_outage.recovered()
                self.healthy = self.assigned.is_set()
            for key, position in prepared.positions.items():
                if position > self._applied.get(key, -1):
                    self._applied[key] = position
            return result

    def _observe_lag(self, consumer: Any, batches: dict[Any, Any]) -> None:
        for tp, msgs in batches.items():
            high = consumer.highwater(tp)
            if high is not None and msgs:
                gauge = metrics.CONSUMER_LAG.labels(self._svc, tp.topic, str(tp.partition))
                gauge.set(max(high - (msgs[-1].offset + 1), 0))

    def _forget_lag(self, revoked: Any) -> None:
        """A partition that moved to another member is no longer this process's to report:
        its last lag would otherwise stay, and alert, for good."""
        for tp in revoked:
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG.remove(self._svc, tp.topic, str(tp.partition))
            self._applied.pop((tp.topic, tp.partition), None)

    async def _commit_for_lag_tools(self, consumer: Any) -> None:
        """Mirror the positions the database has committed to Kafka, for lag tooling; the
        database stays authoritative. Never a record only fetched: aiokafka starts newly
        assigned partitions from these offsets until the seek to the stored ones, so an
        offset ahead of the database would let records be applied out of order."""
        from aiokafka.structs import OffsetAndMetadata, TopicPartition

        assigned = consumer.assignment()
        offsets = {
            tp: OffsetAndMetadata(position, "")
            for (topic, partition), position in self._applied.items()
            if (tp := TopicPartition(topic, partition)) in assigned
        }
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except Exception as exc:
            log.debug("informational offset commit failed: %s", exc)


class OutboxRelay:
    """Publishes queued derived events to Kafka, in order, at least once.

    Woken by the event core right after a commit that queued something (``outbox_ready``),
    and every ``poll_interval`` for what other processes queue. Woken by a commit, it lingers
    ``linger`` seconds first, so that the commits close behind it (a credit check's batches
    come every millisecond or two under load) go out in the same produce request: each cycle
    costs the broker, the database and this process about the same whatever its size. Under
    a steady flow of commits it also keeps ``interval`` seconds between the starts of two
    cycles, so that their number stays bounded however often commits come (a commit after a
    quiet spell still waits only ``linger``). On
    PostgreSQL the relay works on the connection that holds its advisory lock, in autocommit:
    one statement deletes the rows the broker has just acknowledged and reads the next
    pending ones, so a cycle costs one round trip to the database besides the publishing.
    A relay that does not hold the lock (another process of the service publishes) tries to
    take it every ``takeover`` seconds, whatever the commits: it takes over that long at most
    after the leader is gone, and costs next to nothing until then.

    An outage of either side never ends it: a cycle that fails for a transient reason
    (``shared.transient``) gives up its database connection — and with it the lock, which
    a connection that died has lost anyway — and tries again with back-off, on a new one.
    ``failing_for`` says for how long it has not been able to publish (readiness).
    """

    def __init__(
        self,
        core: EventCore,
        *,
        bootstrap: str,
        client_kwargs: dict[str, Any] | None = None,
        batch: int = 500,
        poll_interval: float = 0.05,
        linger: float = 0.0,
        interval: float = 0.0,
        takeover: float = 1.0,
        idempotent: bool = False,
    ) -> None:
        self.core = core
        self.bootstrap = bootstrap
        self.client_kwargs = client_kwargs or {}
        self.batch = batch
        self.poll_interval = poll_interval
        self.linger = linger
        self.interval = interval
        self.takeover = takeover
        self.idempotent = idempotent
        self.healthy = False
        self.leading = False
        self._failing_since: float | None = None
        self._cycle_since: float | None = None  # when the cycle in flight began
        # Published and acknowledged, not yet deleted (the next read deletes them).
        self._acked: list[int] = []
        self._svc = core.service.name
        self._outage = OutageLog(log, f"{self._svc}: outbox relay")

    @property
    def failing_for(self) -> float:
        """Seconds since the relay last managed a cycle, while it cannot (0: it can). A
        cycle still waiting for the broker counts too: the producer retries a send for up
        to its request timeout (40 s) before it gives up."""
        now = time.monotonic()
        stuck = now - self._cycle_since if self._cycle_since is not None else 0.0
        failing = now - self._failing_since if self._failing_since is not None else 0.0
        return max(stuck, failing)

    def _failed(self, exc: BaseException) -> None:
        if self._failing_since is None:
            self._failing_since = time.monotonic()
        metrics.RELAY_FAILURES.labels(self._svc).inc()
        self._outage.failed(exc)

    def _succeeded(self) -> None:
        self._failing_since = None
        self.healthy = True
        self._outage.recovered()

    async def run(self, stop: asyncio.Event) -> None:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(
            # No linger: a relay cycle appends all its records before the sender runs, so
            # they leave in one request anyway; lingering would only add latency.
            bootstrap_servers=self.bootstrap,
            acks="all",
            linger_ms=0,
            # On unless the broker lacks idempotent producers (the embedded dev broker;
            # CREDITWATCH_KAFKA_IDEMPOTENT): a send retried after a lost acknowledgement is
            # then written once. Output event ids are stable, so consumers would drop a
            # re-publication anyway; idempotence also keeps a partition's order on retries.
            enable_idempotence=self.idempotent,
            **self.client_kwargs,
        )
        backoff = Backoff(first=0.5, cap=10.0)
        started = False
        leader: AsyncConnection | None = None
        try:
            while not stop.is_set():
                try:
                    await producer.start()
                    started = True
                    break
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    self._failed(exc)
                    if await wait_or_stop(stop, backoff.next_delay()):
                        return
            backoff.reset()
            ready = self.core.outbox_ready
            clock = asyncio.get_running_loop().time
            began = started_at = -math.inf  # when the last cycle (that published) began
            while not stop.is_set():
                sent = 0
                try:
                    if self.core.engine.dialect.name == "postgresql":
                        leader = await self._lead(leader)
                        self.leading = leader is not None
                        if leader is None:
                            # Another process publishes. Not woken by commits: those are for
                            # the leader (retrying on each one cost a connection every few ms).
                            self._succeeded()
                            if await wait_or_stop(stop, self.takeover):
                                break
                            continue
                    # Cleared before reading: a commit after this point wakes the relay again.
                    ready.clear()
                    began = clock()
                    self._cycle_since = time.monotonic()
                    try:
                        sent = await self.publish_pending(producer, leader)
                    finally:
                        self._cycle_since = None
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    self._failed(exc)
                    if leader is not None:
                        # The lock may have gone with the connection: lead again, afresh.
                        await self._resign(leader)
                        leader = None
                        self.leading = False
                    if await wait_or_stop(stop, backoff.next_delay()):
                        break
                    continue
                self._succeeded()
                backoff.reset()
                # Only a cycle that published counts: after a quiet spell, a commit goes
                # out after ``linger`` alone.
                started_at = began if sent else -math.inf
                if sent >= self.batch:
                    continue  # a full read: more may be waiting
                # Anything queued since the read has set ``ready``; the rows just acknowledged
                # are deleted by the next cycle's statement (one round trip per cycle, not two).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ready.wait(), self.poll_interval)
                    pause = max(self.linger, self.interval - (clock() - started_at))
                    if pause > 0 and await wait_or_stop(stop, pause):
                        break
        finally:
            self.healthy = False
            await _bounded(self._forget_acked(leader), 2.0, f"{self._svc}: relay clean-up")
            if leader is not None:
                await self._resign(leader)
            if started:
                await _bounded(producer.stop(), 3.0, f"{self._svc}: stopping the producer")

    async def _lead(self, leader: AsyncConnection | None) -> AsyncConnection | None:
        """Only one relay per service publishes (a PostgreSQL advisory lock), keeping order."""
        if leader is not None:
            return leader
        conn = await self.core.engine.connect()
        try:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            got = (
                await conn.execute(
                    text("SELECT pg_try_advisory_lock(hashtext(:k))"),
                    {"k": f"creditwatch-relay-{self._svc}"},
                )
            ).scalar()
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.invalidate()
            with contextlib.suppress(Exception):
                await conn.close()
            raise
        if got:
            return conn
        await conn.close()
        return None

    async def _forget_acked(self, leader: AsyncConnection | None) -> None:
        """Delete the rows acknowledged since the last cycle (on the way out)."""
        if not self._acked:
            return
        core = self.core.service.core
        if leader is not None:
            await es.take_outbox(leader, core, self._acked, 0)
        else:
            async with self.core.engine.begin() as conn:
                await es.delete_outbox(conn, core, max(self._acked), self._acked)
        self._acked = []

    async def _resign(self, leader: AsyncConnection) -> None:
        # Rows acknowledged but not deleted are published again by whoever leads next.
        self._acked = []
        with contextlib.suppress(Exception):
            # Never back to the pool: closing the session is what releases the advisory
            # lock, and a connection that failed may be dead.
            await asyncio.wait_for(leader.invalidate(), 2.0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(leader.close(), 2.0)

    async def publish_pending(self, producer: Any, leader: AsyncConnection | None = None) -> int:
        """Publish the oldest pending rows, in order; returns how many."""
        core = self.core.service.core
        if leader is not None:
            rows = await es.take_outbox(leader, core, self._acked, self.batch)
            self._acked = []
        else:
            async with self.core.engine.begin() as conn:
                if self._acked:
                    await es.delete_outbox(conn, core, max(self._acked), self._acked)
                rows = await es.pending_outbox(conn, core, self.batch)
            self._acked = []
        if not rows:
            return 0
        futures = [
            await producer.send(topic, value=value.encode(), key=key.encode(), headers=HEADERS)
            for _seq, topic, key, value in rows
        ]
        await asyncio.gather(*futures)
        self._acked = [seq for seq, _topic, _key, _value in rows]
        published = Counter(topic for _seq, topic, _key, _value in rows)
        for topic, count in published.items():
            metrics.OUTBOX_PUBLISHED.labels(self._svc, topic).inc(count)
        return len(rows)


# The CloudEvents Kafka binding (structured mode): the record says what its value is. Every
# record the relay publishes carries it: output events and dead letters alike.
HEADERS = KAFKA_HEADERS


async def report_outbox(core: EventCore, stop: asyncio.Event, every: float = 5.0) -> None:
    """``creditwatch_outbox_pending`` and ``…_oldest_seconds``: what is actually waiting,
    counted in the table (a relay that cannot publish cannot be trusted to say so)."""
    svc = core.service.name
    while not stop.is_set():
        try:
            async with core.engine.connect() as conn:
                count, oldest = await es.outbox_backlog(conn, core.service.core)
            metrics.OUTBOX_PENDING.labels(svc).set(count)
            age = (core.clock() - oldest).total_seconds() if oldest is not None else 0.0
            metrics.OUTBOX_OLDEST_SECONDS.labels(svc).set(max(age, 0.0))
            metrics.DEPENDENCY_UP.labels(svc, "database").set(1)
        except Exception as exc:
            if not is_transient(exc):
                log.warning("%s: outbox not measured: %s", svc, _describe(exc))
            metrics.DEPENDENCY_UP.labels(svc, "database").set(0)
        if await wait_or_stop(stop, every):
            return


class Scheduler:
    """Records time-driven events (expiries, ageing, reviews) so that replays see them."""

    def __init__(self, core: EventCore, *, interval: float = 1.0) -> None:
        self.core = core
        self.interval = interval
        self._outage = OutageLog(log, f"{core.service.name}: database (scheduler)")

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff(first=self.interval, cap=max(self.interval, 10.0))
        while not stop.is_set():
            delay = self.interval
            try:
                await self.core.run_due()
                self._outage.recovered()
                backoff.reset()
            except Exception as exc:
                if is_transient(exc):
                    self._outage.failed(exc)
                    delay = backoff.next_delay()
                else:
                    # A bug in one tick: said loudly, and the next tick tries again.
                    log.exception("%s: scheduler tick failed", self.core.service.name)
            if await wait_or_stop(stop, delay):
                return


class LoopEnded(RuntimeError):
    """A background loop ended while nobody asked it to stop."""


async def run_all(
    stop: asyncio.Event,
    *jobs: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
    names: Sequence[str] | None = None,
    service: str = "",
) -> None:
    """Run background loops until ``stop``. A loop that ends on its own (an exception, or a
    return while nobody asked it to stop) stops the others and is raised: the process is then
    not alive, and says why in one log line."""
    labels = (
        list(names) if names is not None else [getattr(j, "__qualname__", "loop") for j in jobs]
    )
    tasks = {asyncio.create_task(job(stop)): label for job, label in zip(jobs, labels, strict=True)}
    for label in labels:
        metrics.LOOP_RUNNING.labels(service, label).set(1)
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            return
        for task in done:
            label = tasks[task]
            metrics.LOOP_RUNNING.labels(service, label).set(0)
            exc = task.exception() if not task.cancelled() else None
            reason = _describe(exc) if exc is not None else "returned"
            log.critical(
                "%s: the %s loop ended (%s); this process no longer does its work and reports "
                "itself not alive (/healthz 503)",
                service,
                label,
                reason,
                exc_info=exc,
            )
            raise LoopEnded(f"{label} loop ended: {reason}") from exc
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
