"""One unit of work per transaction, and the per-customer repository every service uses.

Consumers, API commands, credit checks and the scheduler touch customers' states only
through a ``UnitOfWork`` (one database transaction) and their service's ``Repository``:

- ``Repository.load`` locks the customers' rows in id order (PostgreSQL ``FOR UPDATE``;
  SQLite has one writer at a time) and reads their states, reusing the states this
  process committed while the row's version (``last_seq``) says nobody wrote it since;
- the fold changes ``uow.states`` in memory; the service writes the rows once;
- ``uow.emit`` queues output events (the outbox, in the same transaction);
- after the commit — on every path — the committed states are remembered and the
  ``after_commit`` hooks run (never for a transaction that rolled back).

The ledger's archive (``LedgerArchive``) keeps the items that left a customer's hot state
(settled invoices, applied payments), read back by key only when an event names them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, Protocol, Self, TypeVar

from pydantic import TypeAdapter
from sqlalchemy import Column, MetaData, String, Table, Text, delete, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.ledger import Archived, NeedRecall, Step
from shared.projection import key_in, lock_rows, upsert

if TYPE_CHECKING:
    from shared.events import DeadLetter, Envelope

S = TypeVar("S")


class LayoutError(RuntimeError):
    """A state document of an older layout: the projections must be rebuilt from the event
    store (``creditwatch db upgrade`` does it). Never a reason to set an event aside: the
    loop that meets it stops, and the process says why."""


@dataclass(eq=False)
class Loaded(Generic[S]):
    """A customer's state in a unit of work: as the fold leaves it, the row's version, and
    the state as the row holds it (to write only what changed; None: no row yet)."""

    state: S
    last_seq: int = 0
    stored: S | None = None

    def committed(self) -> Self:
        """A copy for the cache, as the row now holds it."""
        return type(self)(**{**self.__dict__, "stored": self.state})


L = TypeVar("L", bound=Loaded[Any])


@dataclass(eq=False)
class UnitOfWork:
    """What one transaction does: the customers it loaded, the events it emits, the events
    it sets aside, and what runs once it has committed."""

    conn: AsyncConnection
    now: datetime
    replaying: bool = False
    states: dict[str, Any] = field(default_factory=dict)
    outbox: list[tuple[str, Envelope]] = field(default_factory=list)
    after_commit: list[Callable[[], None]] = field(default_factory=list)
    rejected: list[tuple[Any, DeadLetter]] = field(default_factory=list)
    # The ledger archive's changes in this transaction: (customer, key) → item (None: gone).
    archive: dict[tuple[str, str], Archived | None] = field(default_factory=dict)
    # Customer → the seq of the last event folded into it here (its row's new version).
    touched: dict[str, int] = field(default_factory=dict)

    def emit(self, topic: str, envelope: Envelope) -> None:
        """Queue a derived event; a replay rebuilds state but publishes nothing again."""
        if not self.replaying:
            self.outbox.append((topic, envelope))

    def reject(self, incoming: Any, error: DeadLetter) -> None:
        """Set an event aside (dead letter): the service could not apply it."""
        self.rejected.append((incoming, error))


class CommittedStates(Generic[L]):
    """States this process committed, by customer; past ``capacity`` the least recently used
    go. One is good for a transaction only while the customer's row still has its version
    (``last_seq``): then nobody — another replica, the consumer, the API — has written the
    customer since, and its document, the costliest part of loading, need not be read and
    parsed again. States are immutable values, so they are kept without copying."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, L] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> L | None:
        return self._items.get(key)

    def current(self, key: str, last_seq: int) -> L | None:
        hit = self._items.get(key)
        if hit is None or hit.last_seq != last_seq:
            return None
        self._items.move_to_end(key)
        return hit

    def remember(self, items: Iterable[tuple[str, L]]) -> None:
        for key, item in items:
            self._items[key] = item
            self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def forget(self, key: str) -> None:
        self._items.pop(key, None)

    def clear(self) -> None:
        self._items.clear()


class Repository(Generic[L]):
    """A service's customers: rows of ``table`` keyed by ``customer_id``, versioned by
    ``last_seq``. A service says how a state is made (``new``) and read from a full row
    (``read``); loading, locking and the cache of committed states are the same for all."""

    # Read with the version when a row is locked: what ``from_cache`` may need besides it.
    version_columns: tuple[str, ...] = ("customer_id", "last_seq")

    def __init__(self, table: Table, *, capacity: int = 50_000) -> None:
        self.table = table
        self.cache: CommittedStates[L] = CommittedStates(capacity)

    # ---- what a service says --------------------------------------------------------------
    def new(self, customer_id: str) -> L:
        raise NotImplementedError

    async def read(self, conn: AsyncConnection, rows: Mapping[str, Any]) -> dict[str, L]:
        """The states of these full rows."""
        raise NotImplementedError

    def from_cache(self, hit: L, row: Any) -> L:
        """A unit of work's own copy of a committed state (the version row says it is it)."""
        return hit.committed()

    # ---- the same for all -----------------------------------------------------------------
    async def load(self, uow: UnitOfWork, ids: Iterable[str]) -> dict[str, L]:
        """Lock (id order) and load the customers the unit of work has not loaded yet;
        returns all of ``ids``. A customer without a row gets a new state (version 0)."""
        wanted = set(ids)
        missing = wanted - uow.states.keys()
        if missing:
            if uow.replaying:
                self.cache.clear()
                rows = await lock_rows(uow.conn, self.table, "customer_id", missing)
                found = await self.read(uow.conn, rows)
            else:
                found = await self._load_versioned(uow.conn, missing)
            for cid in missing:
                uow.states[cid] = found.get(cid) or self.new(cid)
        return {cid: uow.states[cid] for cid in wanted}

    async def _load_versioned(self, conn: AsyncConnection, ids: set[str]) -> dict[str, L]:
        versions = await lock_rows(conn, self.table, "customer_id", ids, self.version_columns)
        out: dict[str, L] = {}
        unread: dict[str, Any] = {}
        for cid, row in versions.items():
            hit = self.cache.current(cid, row.last_seq)
            if hit is not None:
                out[cid] = self.from_cache(hit, row)
            else:
                unread[cid] = row
        if unread:
            c = self.table.c
            rows = await conn.execute(
                select(self.table).where(key_in(conn, c.customer_id, sorted(unread)))
            )
            out.update(await self.read(conn, {r.customer_id: r for r in rows}))
        return out

    def remember(self, uow: UnitOfWork, ids: Iterable[str]) -> None:
        """After the commit: the unit of work's states of ``ids`` are what their rows hold."""
        self.cache.remember((cid, uow.states[cid].committed()) for cid in ids if cid in uow.states)


# ---- the ledger's archive ---------------------------------------------------------------------


def archive_table(metadata: MetaData, service: str) -> Table:
    """``<service>_ledger_archive``: ledger items that left their customer's hot state."""
    return Table(
        f"{service}_ledger_archive",
        metadata,
        Column("customer_id", String(1000), primary_key=True),
        Column("item_key", String(1100), primary_key=True),
        Column("status", String(20), nullable=False),
        Column("body", Text, nullable=False),
    )


_ARCHIVED = TypeAdapter(Archived)


class LedgerArchive:
    """Reads and writes a service's ledger archive inside units of work."""

    def __init__(self, table: Table) -> None:
        self.table = table

    async def recall(
        self, uow: UnitOfWork, wanted: Mapping[str, Iterable[str]]
    ) -> dict[str, dict[str, Archived | None]]:
        """The archived items (None: not there) of these customers' keys: what this unit of
        work changed first, then the table — one statement for all."""
        out: dict[str, dict[str, Archived | None]] = {}
        lookup: list[tuple[str, str]] = []
        for cid, keys in wanted.items():
            mine = out.setdefault(cid, {})
            for key in keys:
                if (cid, key) in uow.archive:
                    mine[key] = uow.archive[(cid, key)]
                else:
                    mine[key] = None
                    lookup.append((cid, key))
        if lookup:
            for row in await self._read(uow.conn, lookup):
                out[row[0]][row[1]] = _ARCHIVED.validate_json(row[2])
        return out

    async def _read(self, conn: AsyncConnection, keys: list[tuple[str, str]]) -> list[Any]:
        if conn.dialect.name == "postgresql":
            # One index lookup per key (a row-value IN list is planned far worse).
            name = self.table.name
            result = await conn.exec_driver_sql(
                f"SELECT a.customer_id, a.item_key, a.body FROM unnest($1::text[], $2::text[]) "
                f'AS k(c, i) JOIN "{name}" a ON a.customer_id = k.c AND a.item_key = k.i',
                ([k[0] for k in keys], [k[1] for k in keys]),
            )
            return list(result)
        c = self.table.c
        out: list[Any] = []
        for start in range(0, len(keys), 500):
            rows = await conn.execute(
                select(c.customer_id, c.item_key, c.body).where(
                    tuple_(c.customer_id, c.item_key).in_(keys[start : start + 500])
                )
            )
            out.extend(rows)
        return out

    def note(self, uow: UnitOfWork, customer_id: str, step: Step) -> None:
        """What a ledger step moved out of the hot state, and back into it."""
        for key in step.restored:
            uow.archive[(customer_id, key)] = None
        for item in step.archived:
            uow.archive[(customer_id, item.key)] = item

    async def flush(self, uow: UnitOfWork) -> None:
        """Write this unit of work's archive changes (then forget them)."""
        if not uow.archive:
            return
        gone = [k for k, v in uow.archive.items() if v is None]
        kept = [
            {
                "customer_id": cid,
                "item_key": key,
                "status": item.status,
                "body": _ARCHIVED.dump_json(item).decode(),
            }
            for (cid, key), item in uow.archive.items()
            if item is not None
        ]
        conn = uow.conn
        if gone and conn.dialect.name == "postgresql":
            await conn.exec_driver_sql(
                f'DELETE FROM "{self.table.name}" a USING unnest($1::text[], $2::text[]) '
                "AS k(c, i) WHERE a.customer_id = k.c AND a.item_key = k.i",
                ([k[0] for k in gone], [k[1] for k in gone]),
            )
        elif gone:
            c = self.table.c
            for start in range(0, len(gone), 500):
                await conn.execute(
                    delete(self.table).where(
                        tuple_(c.customer_id, c.item_key).in_(gone[start : start + 500])
                    )
                )
        await upsert(conn, self.table, ["customer_id", "item_key"], kept)
        uow.archive.clear()


class Stepped(Protocol):
    """A state that says what its last event did to the ledger."""

    @property
    def step(self) -> Step | None: ...


St = TypeVar("St", bound=Stepped)


async def fold_with_archive(
    archive: LedgerArchive,
    uow: UnitOfWork,
    customer_id: str,
    recall: dict[str, dict[str, Archived | None]],
    before: Stepped,
    fold: Callable[[Mapping[str, Archived | None]], St],
) -> St:
    """Fold one event of a batch (``fold(recall)`` returns the new state): fetch what the
    ledger asks for, note what the event moved to or from the archive, and keep the batch's
    view of the archive current for its later events (``recall``, by customer)."""
    mine = recall.setdefault(customer_id, {})
    state: St = await with_recall(archive, uow, customer_id, mine, fold)
    step = state.step
    if step is not None and step is not before.step:
        archive.note(uow, customer_id, step)
        for item in step.archived:
            mine[item.key] = item
        for key in step.restored:
            mine[key] = None
    return state


async def prefetch(
    archive: LedgerArchive, uow: UnitOfWork, wanted: Iterable[tuple[str, set[str]]]
) -> dict[str, dict[str, Archived | None]]:
    """The archived items a batch's events name, in one statement: (customer, keys) pairs."""
    by_customer: dict[str, set[str]] = {}
    for customer_id, keys in wanted:
        if keys:
            by_customer.setdefault(customer_id, set()).update(keys)
    return await archive.recall(uow, by_customer) if by_customer else {}


async def with_recall(
    archive: LedgerArchive,
    uow: UnitOfWork,
    customer_id: str,
    recall: dict[str, Archived | None],
    fold: Callable[[Mapping[str, Archived | None]], Any],
) -> Any:
    """``fold(recall)``, fetching what the ledger asks for (``NeedRecall``) and folding
    again: the fold is pure, so folding twice is folding once."""
    for _ in range(8):
        try:
            return fold(recall)
        except NeedRecall as need:
            found = await archive.recall(uow, {customer_id: need.keys})
            recall.update(found[customer_id])
    return fold(recall)


__all__ = [
    "CommittedStates",
    "LayoutError",
    "LedgerArchive",
    "Loaded",
    "Repository",
    "UnitOfWork",
    "archive_table",
    "fold_with_archive",
    "prefetch",
    "with_recall",
]
