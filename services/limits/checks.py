"""The database side of a credit check: read what the decision needs, decide (the domain's
rule), record the decision, reservation and exposure, with the customer's row locked.

Two implementations of one interface (``CreditChecks``), same effects, both over the
service's repository (its cache of committed states):
- ``CoreChecks`` (any database): one unit of work per check, the customer (and its group
  parent) locked and loaded through the repository first;
- ``PostgresChecks``: the checks that arrive while a batch is in flight wait and then go
  together, in arrival order, through two round trips — one statement reads every customer
  (and group parent), the orders' latest checks, the groups' figures and the event numbers;
  one statement locks the customers in id order, checks that none of that has changed, and
  only then writes everything. A batch whose read went stale (another replica, the
  consumer) is decided again in a transaction under the locks. A check's answer is sent only
  after its write committed. Under load this spreads the round trips over the batch; at low
  load a batch is a single check and nothing waits for company.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

import asyncpg
import orjson
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from services.limits import domain, store
from services.limits import events as ev
from services.limits.handlers import SOURCE, LimitsLoaded, LimitsService, money
from shared import eventstore as es
from shared import metrics
from shared.events import Envelope, trusted_event
from shared.problems import Conflict
from shared.projection import kept_unless_marked
from shared.runtime import EventCore, Incoming
from shared.transient import is_transient
from shared.unitofwork import UnitOfWork

Loaded = LimitsLoaded

log = logging.getLogger("creditwatch.limits")

# The most checks one transaction takes; more wait for the next one.
MAX_BATCH = 64
# Customers a batch may skip reading, kept (least recently used out).
CACHED_STATES = 20_000
# Orders whose latest check this process decided, kept for a retry (least recently used out;
# about 1 kB each). A retry of one no longer kept is still answered right: the write finds
# the order's check and the batch is decided again under the locks.
CACHED_ORDERS = 20_000
# Event numbers drawn at once for the batches that skip their read.
NUMBERS_AHEAD = 256
# The most reads a customer must be found untouched by before it is held again (see _doubt).
DOUBT_MAX = 64
# The longest a check waits for its batch (healthy: milliseconds). A database that stopped
# answering without closing the connection would otherwise hold every check for as long as
# TCP takes to give up; past this the caller gets a TimeoutError, answered 503 (transient).
# The batch may still commit later: a retry of the order gets the decision made for it.
CHECK_WAIT_S = 10.0


@dataclass(frozen=True, slots=True)
class CheckOrder:
    """A validated credit-check request."""

    order_id: str
    customer_id: str
    amount: Decimal
    currency: str
    reserve: bool
    requested_by: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer to a check: the response body, and whether it was decided just now."""

    body: dict[str, Any]
    decision: str
    check_id: str
    fresh: bool  # False: a retry answered with the stored decision
    event_id: str | None = None


@dataclass(frozen=True, slots=True)
class Prior:
    """The order's latest stored check."""

    check_id: str
    order_id: str
    customer_id: str
    amount: Decimal
    currency: str
    decision: str
    body: str


@dataclass
class CheckContext:
    """What a decision needs, read while the customer (and its group parent) is locked."""

    loaded: dict[str, Loaded]
    parent: str | None
    prior: Prior | None
    # Summed exposure of the customer's group without the customer, by the members' currency.
    others: dict[str, Decimal]
    members: int  # how many other members the group has

    def group(self, cid: str, policy: Any, now: datetime) -> domain.GroupView | None:
        """The group in the customer's currency: the parent's limit and the others'
        exposure converted with the policy's rates (members keep their own currencies)."""
        root = self.parent or cid
        if self.parent is None and self.members == 0:
            return None
        ccy = self.loaded[cid].state.currency
        root_state = self.loaded[root].state if root in self.loaded else None
        limit = Decimal(0)
        if root_state is not None:
            limit = domain.limit_in(
                domain.effective_limit(root_state, policy, now)[0], root_state.currency, ccy, policy
            )
        return domain.GroupView(root, limit, domain.in_currency(self.others, ccy, policy))


def _iso(t: datetime | None) -> str | None:
    return t.isoformat().replace("+00:00", "Z") if t is not None else None


def _still_standing(
    state: domain.CustomerState,
    prior: Prior,
    body: dict[str, Any],
    order: CheckOrder,
    now: datetime,
) -> bool:
    """A retry gets the earlier decision unless its reservation was released or expired, or
    it asks to reserve what an approval without reserving did not (a quote, then the
    order: judged anew)."""
    if prior.decision != "approved":
        return True
    if not body.get("reserve", True):
        return not order.reserve
    res = state.reservations.get(prior.order_id)
    return res is not None and res.check_id == prior.check_id and res.expires_at > now


@dataclass
class Decided:
    """A new decision: its answer, and the event that records it."""

    verdict: Verdict
    envelope: Envelope
    event: ev.CreditCheckDecided


def evaluate(
    service: LimitsService, order: CheckOrder, ctx: CheckContext, now: datetime
) -> Verdict | Decided:
    """Decide ``order`` against the locked context: the stored decision for a retry that
    still stands, else a new decision and its event. Raises ``Conflict`` for an order id
    already checked for another customer."""
    policy = service.policy
    cid = order.customer_id
    prior = ctx.prior
    if prior is not None and prior.customer_id != cid:
        raise Conflict(
            f"order {order.order_id!r} was checked for another customer", field="order_id"
        )
    state = ctx.loaded[cid].state
    if prior is not None and prior.amount == order.amount and prior.currency == order.currency:
        stored: dict[str, Any] = json.loads(prior.body)
        if _still_standing(state, prior, stored, order, now):
            return Verdict(stored, stored["decision"], prior.check_id, fresh=False)
    outcome = domain.decide_credit_check(
        state,
        order_id=order.order_id,
        amount=order.amount,
        currency=order.currency,
        reserve=order.reserve,
        policy=policy,
        now=now,
        group=ctx.group(cid, policy, now),
    )
    check_id = str(uuid.uuid4())
    ccy = state.currency
    expires = None
    if outcome.decision == "approved" and order.reserve:
        expires = domain.reservation_expiry(now, policy)
    body = {
        "check_id": check_id,
        "order_id": order.order_id,
        "customer_id": cid,
        "decision": outcome.decision,
        "reasons": list(outcome.reasons),
        "amount": money(order.amount, order.currency),
        "amount_currency": order.currency,
        "limit": money(outcome.limit, ccy),
        "exposure": money(outcome.exposure, ccy),
        "reserved": money(outcome.reserved, ccy),
        "available": money(outcome.available, ccy),
        "shortfall": money(outcome.shortfall, ccy),
        "currency": ccy,
        "grade": outcome.grade,
        "reserve": order.reserve,
        "reservation_expires_at": _iso(expires),
        "group": ({k: money(v, ccy) for k, v in outcome.group.items()} if outcome.group else None),
        "policy_version": policy.version,
        "requested_by": order.requested_by,
        "evaluated_at": _iso(now),
    }
    # Built from a validated request and the domain's own figures: no validation again on
    # the hot path (a unit test pins it to what new_event would build).
    event = ev.CreditCheckDecided.model_construct(
        customer_id=cid,
        check_id=check_id,
        order_id=order.order_id,
        amount=order.amount,
        currency=order.currency,
        amount_in_credit_currency=outcome.amount,
        reserve=order.reserve,
        decision=outcome.decision,
        reasons=list(outcome.reasons),
        expires_at=expires,
        requested_by=order.requested_by,
        response=body,
    )
    # The event's JSON form, as ``model_dump(mode="json")`` writes it (same test).
    data = {
        "customer_id": cid,
        "check_id": check_id,
        "order_id": order.order_id,
        "amount": str(order.amount),
        "currency": order.currency,
        "amount_in_credit_currency": str(outcome.amount),
        "reserve": order.reserve,
        "decision": outcome.decision,
        "reasons": list(outcome.reasons),
        "expires_at": _iso(expires),
        "requested_by": order.requested_by,
        "response": body,
    }
    env = trusted_event(
        ev.CreditCheckDecided.TYPE,
        source=SOURCE + "/api",
        subject=cid,
        data=data,
        id=f"check-{check_id}",
        time=now,
    )
    return Decided(
        Verdict(body, outcome.decision, check_id, fresh=True, event_id=env.id), env, event
    )


async def lock_customer(
    service: LimitsService, uow: UnitOfWork, cid: str
) -> tuple[dict[str, Loaded], str | None]:
    """Lock the customer and its group's parent, in id order; load their states."""
    first = (
        await uow.conn.execute(
            select(store.customers.c.parent_id).where(store.customers.c.customer_id == cid)
        )
    ).first()
    parent = first.parent_id if first is not None else None
    repository = service.repository
    loaded = await repository.load(uow, [cid, parent] if parent else [cid])
    if loaded[cid].state.parent_id != parent:
        # Re-parented between the two reads: lock the new parent as well.
        parent = loaded[cid].state.parent_id
        if parent:
            loaded.update(await repository.load(uow, [parent]))
    return loaded, parent


class CreditChecks(Protocol):
    """What the API asks of a credit-check engine."""

    async def check(self, order: CheckOrder) -> Verdict: ...

    async def close(self) -> None: ...


class CoreChecks:
    """Portable: one unit of work per check, through the repository."""

    def __init__(self, service: LimitsService, core: EventCore) -> None:
        self.service = service
        self.core = core

    async def lock(self, uow: UnitOfWork, cid: str) -> tuple[dict[str, Loaded], str | None]:
        return await lock_customer(self.service, uow, cid)

    async def close(self) -> None:
        """Release what the checks hold beyond the engine's pool (nothing, here)."""

    async def check(self, order: CheckOrder) -> Verdict:
        async with self.core.transaction() as uow:
            loaded, parent = await self.lock(uow, order.customer_id)
            row = await store.latest_check(uow.conn, order.order_id)
            prior = (
                None
                if row is None
                else Prior(
                    row.check_id,
                    row.order_id,
                    row.customer_id,
                    row.amount,
                    row.currency,
                    row.decision,
                    row.body,
                )
            )
            others, members = await store.group_exposure(
                uow.conn, parent or order.customer_id, order.customer_id
            )
            result = evaluate(
                self.service,
                order,
                CheckContext(loaded, parent, prior, others, members),
                uow.now,
            )
            if isinstance(result, Verdict):
                return result
            await self.core.record(uow, [result.envelope])
        return result.verdict


# ---- PostgreSQL: checks in batches ------------------------------------------------------------

_SEQ = f"pg_get_serial_sequence('{store.core.events.name}', 'seq')"

# The customers ($1) and their group parents, in id order.
_WITH_PARENTS = f"""
SELECT DISTINCT id FROM (
    SELECT unnest($1::text[]) AS id
    UNION ALL
    SELECT p.parent_id FROM unnest($1::text[]) AS i(id) CROSS JOIN LATERAL (
        SELECT parent_id FROM {store.customers.name} WHERE customer_id = i.id OFFSET 0) AS p
    WHERE p.parent_id IS NOT NULL) AS ids
ORDER BY id"""


def _customer_rows(ids: str, lock: bool) -> str:
    """The rows of these customers (each looked up on its own, see _context_sql), locked in
    id order if ``lock``. A state this process already holds at the row's version
    (``last_seq``) is not sent again ($2, $3: ids, versions)."""
    return f"""
SELECT c.customer_id, c.parent_id, c.exposure, c.published, c.last_seq, c.as_of,
       CASE WHEN k.seq = c.last_seq THEN NULL ELSE c.state END AS state
FROM ({ids}) AS w(id) CROSS JOIN LATERAL (
    SELECT * FROM {store.customers.name} WHERE customer_id = w.id
    OFFSET 0{" FOR UPDATE" if lock else ""}) AS c
LEFT JOIN unnest($2::text[], $3::bigint[]) AS k(id, seq) ON k.id = c.customer_id
ORDER BY c.customer_id"""


LOCK_SQL = _customer_rows(_WITH_PARENTS, lock=True)
LOCK_MORE_SQL = _customer_rows("SELECT DISTINCT unnest($1::text[]) AS id ORDER BY id", lock=True)


# What a decision reads besides the customer rows, one row per fact, the columns by kind:
#   k  an order's latest check   key order, ref check, customer_id, amount, code currency,
#                                text decision, body
#   g  a group's figures         key group (the parent), code currency, total exposure and
#                                n members in that currency (members keep their own)
#   s  an event number           n
#   r  a live reservation        key order, ref check, customer_id, amount, at expiry
# Each order, group and customer is looked up on its own (LATERAL), so that the indexes are
# used whatever the planner believes of the tables: with a whole array against a table that
# grew since it was last analysed (or a plan kept from when it was empty), it chose
# sequential scans that took longer with every check. A plain lateral subquery is flattened
# into a join, which brings the same plans back (seen: the reservations of the customers
# whose state is read, hash-joined against a sequential scan of every reservation); the
# ORDER BY of the primary key and OFFSET 0 keep it a lookup per customer.
def _context_sql(orders: str, groups: str, count: str, reading: str) -> str:
    return f"""
SELECT 'k' AS kind, k.order_id AS key, k.check_id::text AS ref, k.customer_id::text,
       k.amount, k.currency::text AS code, k.decision::text AS text, k.body,
       NULL::numeric AS total, NULL::bigint AS n, NULL::timestamptz AS at
FROM {orders} CROSS JOIN LATERAL (
    SELECT order_id, check_id, customer_id, amount, currency, decision, body
    FROM {store.checks.name} WHERE order_id = o.id ORDER BY seq DESC LIMIT 1) AS k
UNION ALL
SELECT 'g', g.id, NULL, NULL, NULL, m.currency::text, NULL, NULL, m.total, m.n, NULL
FROM {groups} CROSS JOIN LATERAL (
    SELECT currency, sum(exposure) AS total, count(*) AS n
    FROM {store.customers.name} WHERE group_id = g.id GROUP BY currency) AS m
UNION ALL
SELECT 's', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, nextval({_SEQ}), NULL
FROM generate_series(1, {count})
UNION ALL
SELECT 'r', r.order_id, r.check_id, r.customer_id, r.amount, NULL, NULL, NULL, NULL, NULL,
       r.expires_at
FROM {reading} CROSS JOIN LATERAL (
    SELECT * FROM {store.reservations.name} WHERE customer_id = c.id
    ORDER BY order_id OFFSET 0) AS r"""


# Under the locks (see LOCK_SQL) and a statement of its own: one that waited for a lock sees
# rows committed meanwhile only from its next statement on, so a concurrent check of a
# sibling or a retry of the same order that committed while we waited is seen; the event
# numbers are drawn under the locks too, so they follow the order in which the states change.
CONTEXT_SQL = _context_sql(
    "unnest($1::text[]) AS o(id)",
    "unnest($2::text[]) AS g(id)",
    "$3::int",
    "unnest($4::text[]) AS c(id)",
)

# Without locks, everything at once (one snapshot): the customers (c rows: key customer,
# ref parent, amount exposure, text published, body state or NULL, n last_seq, at as_of) and
# their context. What the decisions rely on is checked again under the locks when they are
# written (GUARDED_WRITE_SQL).
READ_SQL = f"""
WITH cust AS MATERIALIZED ({_customer_rows(_WITH_PARENTS, lock=False)}),
roots AS (SELECT DISTINCT coalesce(c.parent_id, i.id) AS id
          FROM unnest($1::text[]) AS i(id) LEFT JOIN cust c ON c.customer_id = i.id),
stale AS (SELECT customer_id AS id FROM cust WHERE state IS NOT NULL)
SELECT 'c' AS kind, customer_id::text AS key, parent_id::text AS ref, NULL AS customer_id,
       exposure AS amount, NULL AS code, published AS text, state AS body,
       NULL::numeric AS total, last_seq AS n, as_of AS at
FROM cust
UNION ALL {_context_sql("unnest($4::text[]) AS o(id)", "roots AS g", "$5::int", "stale AS c")}"""

_NUMBERS_SQL = f"SELECT nextval({_SEQ}) FROM generate_series(1, $1::int)"

_E = ["seq", "source", "event_id", "type", "subject", "time", "event", "recorded_at"]
_K = [c.name for c in store.checks.columns]
_O = ["event_id", "topic", "key", "value", "created_at"]
_R = [c.name for c in store.reservations.columns]
_C = [c.name for c in store.customers.columns]


# The tables a batch writes, in the order of WRITE_SQL's parameters: one JSON array of rows
# each ($1..$5). One text parameter per table costs the driver next to nothing; the same rows
# as an array per column (53 of them) cost it a tenth of the API process's CPU at 1,000/s.
_WRITTEN = (
    (store.core.events, _E),
    (store.checks, _K),
    (store.core.outbox, _O),
    (store.reservations, _R),
    (store.customers, _C),
)


def _write_sql(guarded: bool) -> str:
    parts = []
    for n, (table, names) in enumerate(_WRITTEN, start=1):
        columns = ", ".join(f'"{c}"' for c in names)
        rows = f"json_populate_recordset(NULL::{table.name}, ${n}::text::json)"
        parts.append((table.name, columns, rows))
    (
        (ev_t, ev_c, ev_r),
        (ck_t, ck_c, ck_r),
        (ob_t, ob_c, ob_r),
        (rs_t, rs_c, rs_r),
        (cu_t, cu_c, cu_r),
    ) = parts
    held = ", ".join(f'"{c}" = EXCLUDED."{c}"' for c in _R if c not in ("customer_id", "order_id"))
    sets = ", ".join(
        kept_unless_marked(cu_t, c, store.UNCHANGED) if c == "state" else f'"{c}" = EXCLUDED."{c}"'
        for c in _C
        if c != "customer_id"
    )
    # Guarded, limits_lock_and_verify (migration limits_0004) runs first: it locks the
    # customers and checks, under the locks, what the decisions relied on; every write waits
    # for its answer and writes nothing on a no.
    only_if = " WHERE (SELECT ok FROM ok)" if guarded else ""
    writes = ",\n".join(
        (
            f"ev AS (INSERT INTO {ev_t} ({ev_c}) SELECT {ev_c} FROM {ev_r}{only_if})",
            f"ck AS (INSERT INTO {ck_t} ({ck_c}) SELECT {ck_c} FROM {ck_r}{only_if})",
            f"ob AS (INSERT INTO {ob_t} ({ob_c}) SELECT {ob_c} FROM {ob_r}{only_if})",
            f"rs AS (INSERT INTO {rs_t} ({rs_c}) SELECT {rs_c} FROM {rs_r}{only_if}\n"
            f"       ON CONFLICT (customer_id, order_id) DO UPDATE SET {held})",
            f"cu AS (INSERT INTO {cu_t} ({cu_c}) SELECT {cu_c} FROM {cu_r}{only_if}\n"
            f"       ON CONFLICT (customer_id) DO UPDATE SET {sets})",
        )
    )
    if not guarded:
        return f"WITH {writes}\nSELECT true"
    first = len(_WRITTEN) + 1
    expect = ", ".join(
        f"${first + i}::{t}[]"
        for i, t in enumerate(("text", "bigint", "text", "numeric", "bigint", "text", "text"))
    )
    return (
        f"WITH ok AS MATERIALIZED (SELECT limits_lock_and_verify({expect}) AS ok),\n"
        f"{writes}\nSELECT ok FROM ok"
    )


def _plain(value: Any) -> str:
    """An amount as PostgreSQL reads it exactly (orjson writes dates and times itself)."""
    if isinstance(value, Decimal):
        return format(value, "f")
    raise TypeError(f"no JSON form for {type(value).__name__}")


def _rows_json(rows: list[dict[str, Any]]) -> str:
    return orjson.dumps(rows, default=_plain).decode()


# Under the transaction's locks (the fallback).
WRITE_SQL = _write_sql(guarded=False)
# Alone, in autocommit: writes only if nothing the decisions read has changed since.
GUARDED_WRITE_SQL = _write_sql(guarded=True)


# A connection that is no more (the driver's errors for it, and the server's on shutdown).
_LOST = (
    OSError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
)


@dataclass(frozen=True, slots=True)
class _Row:
    """A customer row as a batch reads it."""

    parent_id: str | None
    exposure: Decimal
    published: str | None
    last_seq: int
    as_of: datetime | None
    state: str | None  # None: the state this process holds, at last_seq

    @classmethod
    def locked(cls, r: Any) -> _Row:
        return cls(
            r["parent_id"], r["exposure"], r["published"], r["last_seq"], r["as_of"], r["state"]
        )


def _roots(rows: dict[str, _Row], ids: list[str]) -> list[str]:
    """The groups of these customers: each one's parent, or itself."""
    return sorted({(rows[cid].parent_id if cid in rows else None) or cid for cid in ids})


@dataclass
class _Read:
    """What a batch's decisions rely on, and (``expected``) how to check it again."""

    rows: dict[str, _Row]
    priors: dict[str, Prior] = field(default_factory=dict)
    # Each group's summed exposure by its members' currencies, and its member count.
    totals: dict[str, dict[str, Decimal]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    seqs: list[int] = field(default_factory=list)
    held: dict[str, list[domain.Reservation]] = field(default_factory=dict)
    # limits_lock_and_verify's arguments: customers and versions (None: no row), groups
    # with their exposure and member count, orders with their latest check (None: none).
    expected: tuple[list[Any], ...] = ()

    @classmethod
    def of(
        cls, records: Any, ids: list[str], orders: list[str], rows: dict[str, _Row] | None = None
    ) -> _Read:
        read = cls(rows if rows is not None else {})
        for r in records:
            kind, key = r["kind"], r["key"]
            if kind == "c":
                read.rows[key] = _Row(r["ref"], r["amount"], r["text"], r["n"], r["at"], r["body"])
            elif kind == "k":
                read.priors[key] = Prior(
                    r["ref"], key, r["customer_id"], r["amount"], r["code"], r["text"], r["body"]
                )
            elif kind == "g":
                read.totals.setdefault(key, {})[r["code"]] = r["total"]
                read.counts[key] = read.counts.get(key, 0) + r["n"]
            elif kind == "s":
                read.seqs.append(r["n"])
            else:
                read.held.setdefault(r["customer_id"], []).append(
                    domain.Reservation(key, r["ref"], r["amount"], r["at"])
                )
        read.seqs.sort()
        read.expect(ids, orders)
        return read

    def expect(self, ids: list[str], orders: list[str]) -> None:
        customers = sorted(self.rows.keys() | set(ids))
        groups = _roots(self.rows, ids)
        self.expected = (
            customers,
            [row.last_seq if (row := self.rows.get(c)) else None for c in customers],
            # limits_lock_and_verify compares the plain sum of the members' exposure: a
            # change in any of them changes it (whatever their currencies).
            groups,
            [sum(self.totals.get(g, {}).values(), Decimal(0)) for g in groups],
            [self.counts.get(g, 0) for g in groups],
            orders,
            [prior.check_id if (prior := self.priors.get(o)) else None for o in orders],
        )


@dataclass
class _Decided:
    results: dict[int, Verdict | Exception]
    loaded: dict[str, Loaded]
    tx: UnitOfWork
    params: tuple[str, ...] | None  # WRITE_SQL's; None: nothing to write
    exposure: dict[str, Decimal]  # each customer row's exposure after the batch
    priors: dict[str, Prior]  # each order's latest check after the batch


@dataclass
class _Pending:
    order: CheckOrder
    future: asyncio.Future[Verdict]


@dataclass
class _Batch:
    """One transaction's worth of decisions, folded in arrival order."""

    events: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    reservations: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)


class PostgresChecks(CoreChecks):
    """The same effects as ``CoreChecks``, with the checks that queue up while a batch is
    in flight decided together in the next one."""

    def __init__(self, service: LimitsService, core: EventCore, max_batch: int = MAX_BATCH) -> None:
        super().__init__(service, core)
        self.max_batch = max_batch
        self._queue: list[_Pending] = []
        # One batch at a time (measured best: with more in flight, each one's round
        # trips wait for the others' CPU on the event loop).
        self._worker: asyncio.Task[None] | None = None
        # The states: the service's repository's cache of committed states.
        self._states = service.repository.cache
        # The batches' own connection, kept between them: one batch at a time needs one, and
        # taking it from the pool and giving it back cost as much as a round trip each time.
        # Dropped after any failure (the next batch connects afresh) and on close.
        self._conn: AsyncConnection | None = None
        self._raw: Any = None
        # What lets a batch skip its read (see _held_read): customers seen alone in their
        # group and written by nobody but this process since its last write, with their
        # row's version and exposure; the latest check of orders decided here; event numbers
        # drawn ahead.
        self._quiet: dict[str, tuple[int, Decimal]] = {}
        # Customers a held batch was found stale for: [reads that must still find the row
        # untouched before it is held again, how many were asked the last time] (doubling
        # with every stale batch, to DOUBT_MAX: a customer that two replicas write in turn
        # ends up read, not held and decided again).
        self._doubted: dict[str, list[int]] = {}
        self._orders: OrderedDict[str, Prior] = OrderedDict()
        self._numbers: list[int] = []

    async def close(self) -> None:
        worker = self._worker
        if worker is not None and not worker.done():
            worker.cancel()
            with contextlib.suppress(BaseException):
                await worker
        await self._drop_connection()

    async def _connection(self) -> tuple[AsyncConnection, Any]:
        if self._conn is None or self._raw is None or self._raw.is_closed():
            await self._drop_connection()
            conn = await self.core.engine.connect()
            try:
                raw: Any = (await conn.get_raw_connection()).driver_connection
                # One plan per statement, made once: PostgreSQL keeps to a prepared
                # statement's generic plan only if it judges it no worse than the custom
                # ones, and on small tables it judged otherwise and planned every execution
                # anew (the read: 615 µs a call against 286 with the plan kept). The
                # statements look every row up by its key whatever the values
                # (test_limits_check_plans checks the generic plans too). This connection only.
                await raw.execute("SET plan_cache_mode = force_generic_plan")
            except BaseException:
                await conn.close()
                raise
            self._conn, self._raw = conn, raw
        return self._conn, self._raw

    async def _drop_connection(self) -> None:
        conn, self._conn, self._raw = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.invalidate()  # whatever state it was left in, it is not reused
            with contextlib.suppress(Exception):
                await conn.close()

    async def check(self, order: CheckOrder) -> Verdict:
        future: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(order, future))
        # A worker that found the queue empty has returned and is done at once: start
        # another then, or this check would wait with nobody to take it.
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain(), name="limits-checks")
        async with asyncio.timeout(CHECK_WAIT_S):
            return await future

    async def _drain(self) -> None:
        batch: list[_Pending] = []
        try:
            while self._queue:
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
                await self._settle(batch, self._run)
        except BaseException as exc:
            # Stopped (close: 503, another replica answers) or broken (that error, a 500):
            # whoever still waits is told, not left hanging.
            if isinstance(exc, asyncio.CancelledError):
                exc = ConnectionAbortedError("the credit checks stopped before this one")
            waiting, self._queue = [*batch, *self._queue], []
            for pending in waiting:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            raise

    async def _settle(
        self,
        batch: list[_Pending],
        run: Callable[[list[_Pending]], Awaitable[dict[int, Verdict | Exception]]],
    ) -> None:
        try:
            results = await run(batch)
        except Exception as exc:  # the transaction failed: nothing of it was stored
            # A database that is away fails every check alike: all are told at once (503),
            # rather than each waiting for its own attempt to fail in turn.
            if len(batch) > 1 and not is_transient(exc):
                # Take them one by one, so one check's trouble is its own answer only.
                log.warning(
                    "a batch of %d credit checks failed (%s); retrying one by one",
                    len(batch),
                    type(exc).__name__,
                )
                for pending in batch:
                    await self._settle([pending], self._run)
                return
            results = dict.fromkeys(range(len(batch)), exc)
        for i, pending in enumerate(batch):
            if pending.future.done():  # the caller went away; its decision is stored anyway
                continue
            result = results[i]
            if isinstance(result, Exception):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)

    async def _run(self, batch: list[_Pending]) -> dict[int, Verdict | Exception]:
        """Decide the batch on what one statement reads, without locks, and write it with one
        statement that first locks the customers (and group parents) in id order and checks
        that nothing the decisions relied on has changed since: the customers' versions, the
        groups' figures, the orders' latest checks. Two round trips, no transaction to open
        and close. If something did change (another replica, the consumer, a release), the
        batch is decided again, the classic way, in a transaction under the locks."""
        metrics.CREDIT_CHECK_BATCH.observe(len(batch))
        while True:
            kept = self._conn is not None
            try:
                return await self._run_on(*await self._connection(), batch)
            except _LOST as exc:
                await self._drop_connection()
                if not kept:
                    raise
                # The kept connection was gone (a server restart, an idle timeout on the
                # way): once more on a new one (not kept, so only once). Safe whatever was
                # written: the orders are idempotent.
                log.info(
                    "credit checks: the kept database connection was lost (%s); "
                    "trying the batch again on a new one",
                    type(exc).__name__,
                )
            except BaseException:
                await self._drop_connection()
                raise

    async def _run_on(
        self, sa_conn: AsyncConnection, raw: Any, batch: list[_Pending]
    ) -> dict[int, Verdict | Exception]:
        # ``raw``, the bare driver connection: the hot path's round trips skip SQLAlchemy's
        # layers (asyncpg caches the prepared statements).
        core = self.core
        ids = sorted({p.order.customer_id for p in batch})
        orders = sorted({p.order.order_id for p in batch})
        hits = self._cached(ids)
        known = (list(hits), [hit.last_seq for hit in hits.values()])
        now = core.clock()
        read = await self._held_read(raw, ids, orders, hits, len(batch))
        held = read is not None
        if read is not None:
            decided = self._decide(sa_conn, batch, now, read, hits)
            if decided.params is None:
                # Nothing to write (retries answered with their stored decision, a
                # conflict), so nothing would check what the answers rest on: read.
                read, held = None, False
            else:
                metrics.CREDIT_CHECK_READ_SKIPPED.inc()
        if read is None:
            read = _Read.of(await raw.fetch(READ_SQL, ids, *known, orders, len(batch)), ids, orders)
            decided = self._decide(sa_conn, batch, now, read, hits)
        stale = decided.params is not None and not await raw.fetchval(
            GUARDED_WRITE_SQL, *decided.params, *read.expected
        )
        if stale:
            metrics.CREDIT_CHECK_REDECIDED.inc()
            now = core.clock()
            async with raw.transaction():
                read = await self._read_locked(raw, ids, orders, known, len(batch))
                decided = self._decide(sa_conn, batch, now, read, hits)
                if decided.params is not None:
                    await raw.execute(WRITE_SQL, *decided.params)
        self._remember(decided.loaded)
        self._note(ids, read, decided)
        if stale and held:
            self._doubt(ids)
        if decided.tx.outbox:
            core.outbox_ready.set()
        return decided.results

    async def _held_read(
        self, raw: Any, ids: list[str], orders: list[str], hits: dict[str, Loaded], count: int
    ) -> _Read | None:
        """What the batch's read would return, when this process holds all of it: every
        customer's state at its row's version, alone in its group, written by nobody else
        since this process last wrote it (else None: read). The orders are taken to have no
        check but those decided here, and the event numbers come from a block drawn ahead.
        The write checks all of it under the locks, as it checks a read; a batch it finds
        stale is decided again under them. The numbers stay above every version a decision
        rests on, so that each customer's events keep the order in which they were applied.
        A batch with nothing to write is not answered from it (nothing would check it)."""
        quiet = self._quiet
        versions = []
        for cid in ids:
            hit, held = hits.get(cid), quiet.get(cid)
            if hit is None or held is None or held[0] != hit.last_seq:
                return None
            versions.append(hit.last_seq)
        numbers = self._numbers
        if len(numbers) < count or numbers[0] <= max(versions):
            numbers[:] = sorted(r[0] for r in await raw.fetch(_NUMBERS_SQL, NUMBERS_AHEAD))
        read = _Read(
            {
                cid: _Row(None, quiet[cid][1], hits[cid].published, hits[cid].last_seq, None, None)
                for cid in ids
            },
            priors={o: prior for o in orders if (prior := self._orders.get(o)) is not None},
            totals={cid: {hits[cid].state.currency: quiet[cid][1]} for cid in ids},
            counts=dict.fromkeys(ids, 1),
            seqs=numbers[:count],
        )
        del numbers[:count]
        read.expect(ids, orders)
        return read

    def _note(self, ids: list[str], read: _Read, decided: _Decided) -> None:
        """After a batch committed: which of its customers the next batch may skip reading
        (see _held_read), and the orders' latest checks."""
        quiet, doubted = self._quiet, self._doubted
        for cid in ids:
            row = read.rows.get(cid)
            loaded = decided.loaded.get(cid)
            quiet.pop(cid, None)
            if (
                row is not None
                and loaded is not None
                and row.state is None
                and row.parent_id is None
                and read.counts.get(cid) == 1
            ):
                # The row was at the version this process held: nobody else wrote it.
                doubt = doubted.get(cid)
                if doubt is not None and doubt[0] > 0:
                    doubt[0] -= 1
                if doubt is None or doubt[0] == 0:
                    quiet[cid] = (loaded.last_seq, decided.exposure[cid])
        for kept in (quiet, doubted):
            while len(kept) > CACHED_STATES:  # the oldest first (as the states are kept)
                del kept[next(iter(kept))]
        orders = self._orders
        for order_id, prior in decided.priors.items():
            orders[order_id] = prior
            orders.move_to_end(order_id)
        while len(orders) > CACHED_ORDERS:
            orders.popitem(last=False)

    def _doubt(self, ids: list[str]) -> None:
        """A held batch of these customers was found stale: read them a while first."""
        for cid in ids:
            self._quiet.pop(cid, None)
            doubt = self._doubted.pop(cid, None) or [0, 1]
            after = min(doubt[1] * 2, DOUBT_MAX)
            self._doubted[cid] = [after, after]

    def _cached(self, ids: list[str]) -> dict[str, Loaded]:
        """The states this process holds for the customers and their known parents."""
        cache = self._states
        wanted = set(ids)
        wanted.update(
            p for cid in ids if (hit := cache.get(cid)) is not None and (p := hit.state.parent_id)
        )
        return {cid: hit for cid in wanted if (hit := cache.get(cid)) is not None}

    @staticmethod
    async def _read_locked(
        raw: Any, ids: list[str], orders: list[str], known: tuple[list[str], list[int]], count: int
    ) -> _Read:
        """Lock every customer and group parent in id order, then read the context."""
        rows = {r["customer_id"]: _Row.locked(r) for r in await raw.fetch(LOCK_SQL, ids, *known)}
        # A parent that appeared or changed after the lock's subquery ran (rare).
        late = sorted(
            {
                row.parent_id
                for cid in ids
                if (row := rows.get(cid)) is not None
                and row.parent_id
                and row.parent_id not in rows
            }
        )
        if late:
            rows.update(
                {
                    r["customer_id"]: _Row.locked(r)
                    for r in await raw.fetch(LOCK_MORE_SQL, late, *known)
                }
            )
        reading = [cid for cid, row in rows.items() if row.state is not None]
        context = await raw.fetch(CONTEXT_SQL, orders, _roots(rows, ids), count, reading)
        return _Read.of(context, ids, orders, rows)

    def _decide(
        self,
        sa_conn: AsyncConnection,
        batch: list[_Pending],
        now: datetime,
        read: _Read,
        hits: dict[str, Loaded],
    ) -> _Decided:
        """Every check of the batch in arrival order, each seeing the ones before it: the
        answers, the states after them, and the statement parameters of what to write."""
        service = self.service
        rows = read.rows
        priors = dict(read.priors)
        totals = {group: dict(sums) for group, sums in read.totals.items()}
        counts = dict(read.counts)
        seqs = list(read.seqs)
        loaded: dict[str, Loaded] = {}
        for cid, stored in rows.items():
            if stored.state is None:  # the one we hold, at this version
                loaded[cid] = hits[cid].committed()
            else:
                state = store.load_state(stored.state, stored.as_of, read.held.get(cid, ()))
                loaded[cid] = Loaded(state, stored.last_seq, state, stored.published)
        exposure = {cid: stored.exposure for cid, stored in rows.items()}
        results: dict[int, Verdict | Exception] = {}
        out = _Batch()
        # The fold only computes; it does not touch the connection.
        tx = UnitOfWork(sa_conn, now, states=loaded)
        for i, pending in enumerate(batch):
            order = pending.order
            cid = order.customer_id
            row = rows.get(cid)
            parent = row.parent_id if row is not None else None
            root = parent or cid
            if cid not in loaded:
                loaded[cid] = service.repository.new(cid)
            counted = cid in exposure  # has a row, so it is in its group's figures
            mine = exposure.get(cid, Decimal(0))  # in the customer's currency, as its row
            ccy = loaded[cid].state.currency
            sums = totals.setdefault(root, {})
            members = counts.get(root, 0) - counted
            others: dict[str, Decimal] = {}
            if parent is not None or members:  # in a group (see CheckContext.group)
                others = {**sums, ccy: sums.get(ccy, Decimal(0)) - mine}
            ctx = CheckContext(loaded, parent, priors.get(order.order_id), others, members)
            try:
                result = evaluate(service, order, ctx, now)
            except Conflict as exc:
                results[i] = exc
                continue
            if isinstance(result, Verdict):
                results[i] = result
                continue
            seq = seqs.pop(0)
            self._fold(tx, loaded, seq, result, out, now)
            after = out.customers[cid]["exposure"]
            sums[ccy] = sums.get(ccy, Decimal(0)) + after - mine
            counts[root] = counts.get(root, 0) + (not counted)
            exposure[cid] = after
            data = result.event
            priors[order.order_id] = Prior(
                data.check_id,
                order.order_id,
                cid,
                order.amount,
                order.currency,
                data.decision,
                out.checks[-1]["body"],
            )  # the stored body, as a retry reads it
            results[i] = result.verdict
        params = None
        if out.events:
            outbox = [
                {
                    "event_id": e.id,
                    "topic": topic,
                    "key": e.subject,
                    "value": e.to_json().decode(),
                    "created_at": now,
                }
                for topic, e in tx.outbox
            ]
            params = (
                _rows_json(out.events),
                _rows_json(out.checks),
                _rows_json(outbox),
                _rows_json(list(out.reservations.values())),
                _rows_json(list(out.customers.values())),
            )
        return _Decided(results, loaded, tx, params, exposure, priors)

    def _remember(self, loaded: dict[str, Loaded]) -> None:
        """Keep the states just committed (the unknown customers' made-up ones aside)."""
        self._states.remember(
            (cid, item.committed()) for cid, item in loaded.items() if item.last_seq
        )

    def _fold(
        self,
        tx: UnitOfWork,
        loaded: dict[str, Loaded],
        seq: int,
        decided: Decided,
        out: _Batch,
        now: datetime,
    ) -> None:
        writes = self.service.fold(tx, [Incoming(seq, decided.envelope, decided.event)])
        if (
            tx.rejected
            or writes.history
            or writes.requests
            or writes.ended
            or len(writes.customers) != 1
            or len(writes.checks) != 1
        ):
            raise RuntimeError(f"a credit check folded into unexpected writes: {writes}")
        event = es.envelope_row(
            decided.envelope, topic=None, partition=None, offset=None, recorded_at=now
        )
        event["seq"] = seq
        out.events.append(event)
        out.checks.extend(writes.checks)
        for held in writes.reservations:
            out.reservations[held["customer_id"], held["order_id"]] = held
        customer = writes.customers[0]
        cid = customer["customer_id"]
        earlier = out.customers.get(cid)
        if customer["state"] == store.UNCHANGED and earlier is not None:
            customer["state"] = earlier["state"]  # this batch's earlier document, if any
        out.customers[cid] = customer


def for_dialect(name: str, service: LimitsService, core: EventCore) -> CreditChecks:
    return PostgresChecks(service, core) if name == "postgresql" else CoreChecks(service, core)
