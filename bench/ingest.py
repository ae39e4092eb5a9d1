"""bench/ingest: events/s through the event core into PostgreSQL, against a raw batched
SQLAlchemy Core insert of the same rows into the same database, in the same run.

    .venv/bin/python -m bench.ingest [--events 20000] [--runs 3] [--batch 500]

Three measures, each on a fresh database, alternated run by run:
- baseline: the same event rows, built before the clock starts, inserted with SQLAlchemy Core
  executemany, one transaction per batch;
- the core: decode and validate each record, append to the event store (duplicates skipped),
  store the offsets, one transaction per batch — with a projection that does nothing;
- the core with the limits projection: the same plus folding every customer's exposure,
  saving its row and queueing exposure.updated events in the outbox.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import MetaData, insert

from bench.common import Measure, ratio, save, table
from harness import servers
from harness.streams import ledger
from services.limits.handlers import LimitsService
from services.schema import upgrade
from shared import eventstore as es
from shared.db import make_engine
from shared.events import decode
from shared.policy import load_policy
from shared.runtime import EventCore, Incoming, Pipeline, Record, Tx, tune_gc
from shared.settings import Settings


def workload(events: int) -> list[Record]:
    registrations, stream = ledger(
        customers=max(events // 40, 10),
        total=events,
        duplicate_share=0.0,
        malformed_share=0.0,
        seed=11,
    )
    offsets: dict[str, int] = {}
    out = []
    for item in registrations + stream:
        off = offsets.get(item.topic, 0)
        offsets[item.topic] = off + 1
        out.append(Record(item.topic, 0, off, item.key, item.value))
    return out


class NoProjection(LimitsService):
    """The limits service's tables and topics, with a fold that does nothing."""

    async def handle(self, tx: Tx, events: Sequence[Incoming]) -> None:
        return None


async def run_core(url: str, records: list[Record], batch: int, *, fold: bool) -> float:
    engine = make_engine(url)
    await upgrade(engine, "limits")
    settings = Settings()
    kind = LimitsService if fold else NoProjection
    core = EventCore(
        kind(settings, load_policy(None)), engine, topic_of_type=settings.topic_of_type()
    )
    pipeline = Pipeline(core)  # as the consumer loop runs it
    started = time.perf_counter()
    for i in range(0, len(records), batch):
        await pipeline.feed(records[i : i + batch])
    await pipeline.drain()
    elapsed = time.perf_counter() - started
    await engine.dispose()
    return len(records) / elapsed


async def run_raw(url: str, records: list[Record], batch: int) -> float:
    """The same event rows, inserted with SQLAlchemy Core executemany, batch by batch."""
    engine = make_engine(url)
    metadata = MetaData()
    core = es.core_tables(metadata, "raw")
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    now = datetime.now(UTC)
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
    for i in range(0, len(rows), batch):
        async with engine.begin() as conn:
            await conn.execute(insert(core.events), rows[i : i + batch])
    elapsed = time.perf_counter() - started
    await engine.dispose()
    return len(records) / elapsed


async def main(events: int, runs: int, batch: int) -> None:
    records = workload(events)
    tune_gc()  # as `creditwatch serve` does; the baseline runs in this process too
    with servers.PostgresServer.start() as pg:
        raw = Measure("raw batched SQLAlchemy Core insert (baseline)", "rows/s")
        core = Measure("event core (validate, append, dedupe, offsets)", "events/s")
        folded = Measure("event core + limits projection (fold, rows, outbox)", "events/s")
        for n in range(runs):
            # Alternate, each on a fresh database, so drift on a noisy machine hits all.
            raw.runs.append(await run_raw(servers.create_database(pg.url), records, batch))
            core.runs.append(
                await run_core(servers.create_database(pg.url), records, batch, fold=False)
            )
            folded.runs.append(
                await run_core(servers.create_database(pg.url), records, batch, fold=True)
            )
            print(
                f"run {n + 1}: raw {raw.runs[-1]:,.0f} rows/s, core {core.runs[-1]:,.0f}, "
                f"core+limits {folded.runs[-1]:,.0f} events/s"
            )
    print()
    rows = [("measure", "median", "runs", "ratio to baseline")]
    for m in (raw, core, folded):
        rows.append(
            (
                m.name,
                f"{m.median:,.0f} {m.unit}",
                ", ".join(f"{x:,.0f}" for x in m.runs),
                f"{ratio(m, raw):.2f}",
            )
        )
    print(table(rows))
    path = save(
        "ingest",
        {
            "events": len(records),
            "batch": batch,
            "baseline": raw,
            "core": core,
            "core_with_limits": folded,
            "ratio_core": ratio(core, raw),
            "ratio_core_with_limits": ratio(folded, raw),
        },
    )
    print(f"\nsaved {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    asyncio.run(main(args.events, args.runs, args.batch))
