"""The consumer pipeline without a broker or a database: what arrives while a batch's
transaction is in flight goes into the next batch, which starts the moment the previous one
has committed; one transaction at a time, in order, nothing fetched left behind."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

from shared.events import DeadLetter
from shared.runtime import BatchResult, EventCore, Pipeline, Prepared, Record, in_time_order

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


def rec(offset: int, partition: int = 0, topic: str = "ar.invoices") -> Record:
    return Record(topic, partition, offset, b"C-1", b"{}")


class FakeCore:
    """Decoding as the core does it, minus the parsing: positions and one candidate each."""

    async def prepare_interleaved(self, records: Sequence[Record]) -> Prepared:
        prepared = Prepared(list(records), T0)
        for r in records:
            prepared.positions[(r.topic, r.partition)] = r.offset + 1
            prepared.candidates[("/test", f"{r.topic}-{r.partition}-{r.offset}")] = (
                r,
                cast(Any, None),
                cast(Any, None),
            )
        await asyncio.sleep(0)
        return prepared


class Transactions:
    """An ``apply`` that holds each transaction open until the test lets it commit."""

    def __init__(self) -> None:
        self.started: list[list[int]] = []
        self.committed: list[list[int]] = []
        self.open = 0
        self.most_open = 0
        self._gates: list[asyncio.Event] = []

    async def __call__(self, prepared: Prepared) -> BatchResult:
        offsets = [r.offset for r in prepared.records]
        gate = asyncio.Event()
        self._gates.append(gate)
        self.started.append(offsets)
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        await gate.wait()
        self.open -= 1
        self.committed.append(offsets)
        return BatchResult(applied=len(offsets))

    def commit_next(self) -> None:
        self._gates[len(self.committed)].set()


def pipeline() -> tuple[Pipeline, Transactions]:
    tx = Transactions()
    return Pipeline(cast(EventCore, FakeCore()), tx), tx


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_records_arriving_during_a_transaction_form_the_next_batch() -> None:
    p, tx = pipeline()
    await p.add([rec(0), rec(1)])
    assert p.advance() is None
    await settle()
    assert tx.started == [[0, 1]]
    # While the first transaction is open, two fetches arrive: one batch for both.
    await p.add([rec(2)])
    await p.add([rec(3), rec(4)])
    assert p.advance() is None  # still in flight: nothing else starts
    assert p.queued == 3
    tx.commit_next()
    await settle()
    assert p.inflight is not None and p.inflight.done()
    result = p.advance()
    assert result is not None and result.applied == 2
    await settle()
    assert tx.started == [[0, 1], [2, 3, 4]]
    tx.commit_next()
    assert (await p.drain()) is not None
    assert tx.committed == [[0, 1], [2, 3, 4]] and tx.most_open == 1


async def test_drain_commits_the_batch_in_flight_and_the_queued_one() -> None:
    p, tx = pipeline()
    await p.add([rec(0)])
    p.advance()
    await p.add([rec(1)])
    draining = asyncio.create_task(p.drain())
    await settle()
    tx.commit_next()
    await settle()
    assert tx.started == [[0], [1]]
    tx.commit_next()
    await draining
    assert tx.committed == [[0], [1]]
    assert p.inflight is None and p.queued == 0


async def test_drain_racing_the_loop_never_runs_two_transactions_at_once() -> None:
    """A rebalance drains from another task while the consumer loop advances."""
    p, tx = pipeline()
    await p.add([rec(0)])
    p.advance()
    await p.add([rec(1)])
    draining = asyncio.create_task(p.drain())
    await settle()
    tx.commit_next()
    await settle()
    p.advance()  # the loop saw the commit too; the queued batch is already in flight
    await p.add([rec(2)])
    tx.commit_next()
    await settle()
    p.advance()
    await settle()
    # Whoever started it, the batch added meanwhile runs once, after the one before it.
    assert tx.started == [[0], [1], [2]]
    tx.commit_next()
    await draining
    await p.drain()
    assert tx.committed == [[0], [1], [2]] and tx.most_open == 1


async def test_a_failed_transaction_is_raised_to_the_loop() -> None:
    async def failing(_prepared: Prepared) -> BatchResult:
        raise RuntimeError("bug")

    p = Pipeline(cast(EventCore, FakeCore()), failing)
    await p.add([rec(0)])
    p.advance()
    await settle()
    try:
        p.advance()
    except RuntimeError as exc:
        assert str(exc) == "bug"
    else:
        raise AssertionError("the failure was swallowed")


async def test_feed_still_prepares_the_next_batch_while_the_previous_commits() -> None:
    p, tx = pipeline()
    await p.feed([rec(0)])
    feeding = asyncio.create_task(p.feed([rec(1)]))
    await settle()
    assert tx.started == [[0]]  # the second waits for the first to commit
    tx.commit_next()
    await feeding
    await settle()
    tx.commit_next()
    await p.drain()
    assert tx.committed == [[0], [1]]


def test_extending_a_prepared_batch_keeps_order_positions_and_counts_duplicates() -> None:
    first = Prepared([rec(0), rec(1)], T0, positions={("ar.invoices", 0): 2})
    first.candidates[("/s", "a")] = (rec(0), cast(Any, None), cast(Any, None))
    first.dead.append((rec(1), DeadLetter("invalid_json", "x")))
    later = Prepared(
        [rec(2), rec(0, partition=1), rec(3)],
        T0,
        positions={("ar.invoices", 0): 4, ("ar.invoices", 1): 1},
    )
    later.candidates[("/s", "a")] = (rec(2), cast(Any, None), cast(Any, None))  # same event
    later.candidates[("/s", "b")] = (rec(3), cast(Any, None), cast(Any, None))
    later.skipped[("ar.invoices", "unknown_type")] += 1
    first.extend(later)
    assert [(r.partition, r.offset) for r in first.records] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 0),
        (0, 3),
    ]
    assert first.positions == {("ar.invoices", 0): 4, ("ar.invoices", 1): 1}
    assert list(first.candidates) == [("/s", "a"), ("/s", "b")]
    assert first.candidates[("/s", "a")][0].offset == 0  # the first occurrence is applied
    assert first.skipped_count("duplicate") == 1
    assert first.skipped_count("unknown_type") == 1
    assert len(first.dead) == 1


def test_one_fetch_is_merged_across_partitions_by_time_keeping_each_partitions_order() -> None:
    class M:
        def __init__(self, name: str, timestamp: int) -> None:
            self.name, self.timestamp = name, timestamp

    fetched = {
        "financials-0": [M("statement", 20)],
        "customers-1": [M("registration", 10), M("update", 30)],
        # A producer's own timestamps may go backwards: the partition's order still stands.
        "invoices-0": [M("i1", 25), M("i2", 5)],
    }
    assert [m.name for m in in_time_order(fetched)] == [
        "registration",
        "statement",
        "i1",
        "i2",
        "update",
    ]
    assert in_time_order({"a": [], "b": []}) == []
