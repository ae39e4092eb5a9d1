"""The database side of a credit check: read what the decision needs under the customer's
lock, then record the decision. The decision itself is the domain's.

Two ways to do it, same effects:
- ``CoreChecks`` (any database): SQLAlchemy statements and the event core's ``submit``;
- ``PostgresChecks``: the hot path in four round trips — lock + event number, context,
  one statement for every write, commit — with fixed SQL that asyncpg prepares once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from services.limits import domain, store
from services.limits import events as ev
from services.limits.handlers import LimitsService, Loaded
from shared import eventstore as es
from shared.events import Envelope
from shared.runtime import EventCore, Incoming, Tx


@dataclass
class CheckContext:
    """What a decision needs, read while the customer (and its group parent) is locked."""

    loaded: dict[str, Loaded]
    parent: str | None
    prior: Any  # the order's latest stored check (check_id, customer_id, amount, …) or None
    others: Decimal  # summed exposure of the customer's group, without the customer
    members: int  # how many other members the group has
    seq: int | None = None  # the decision event's number, when reserved up front

    def group(self, cid: str, policy: Any, now: datetime) -> domain.GroupView | None:
        root = self.parent or cid
        if self.parent is None and self.members == 0:
            return None
        root_state = self.loaded[root].state if root in self.loaded else None
        limit = domain.effective_limit(root_state, policy, now)[0] if root_state else Decimal(0)
        return domain.GroupView(root, limit, self.others)


class CoreChecks:
    """Portable: a handful of SQLAlchemy statements and the event core."""

    def __init__(self, service: LimitsService, core: EventCore) -> None:
        self.service = service
        self.core = core

    async def lock(self, conn: AsyncConnection, cid: str) -> tuple[dict[str, Loaded], Any]:
        """Lock the customer and its group's parent, in id order; load their states."""
        first = (await conn.execute(select(store.customers.c.parent_id).where(
            store.customers.c.customer_id == cid))).first()
        parent = first.parent_id if first is not None else None
        rows = await store.lock_customers(conn, [cid, parent] if parent else [cid])
        row = rows.get(cid)
        if row is not None and row.parent_id != parent:
            # Re-parented between the two reads: lock the new parent as well.
            parent = row.parent_id
            if parent:
                rows.update(await store.lock_customers(conn, [parent]))
        loaded = {key: Loaded(store.load_state(r.state), r.published, r.last_seq)
                  for key, r in rows.items()}
        if cid not in loaded:
            loaded[cid] = Loaded(domain.new_customer(cid, self.service.policy), None, 0)
        return loaded, parent

    async def read(self, conn: AsyncConnection, cid: str, order_id: str) -> CheckContext:
        loaded, parent = await self.lock(conn, cid)
        prior = await store.latest_check(conn, order_id)
        others, members = await store.group_exposure(conn, parent or cid, cid)
        return CheckContext(loaded, parent, prior, others, members)

    async def record(self, conn: AsyncConnection, env: Envelope,
                     decided: ev.CreditCheckDecided, ctx: CheckContext) -> None:
        await self.core.submit(conn, [env], scratch={"limits.states": ctx.loaded})


_CUSTOMER_COLUMNS = [c.name for c in store.customers.columns]

LOCK_SQL = f"""
SELECT c.*, nextval(pg_get_serial_sequence('{store.core.events.name}', 'seq')) AS next_seq
FROM {store.customers.name} c
WHERE c.customer_id = $1
   OR c.customer_id = (SELECT parent_id FROM {store.customers.name} WHERE customer_id = $1)
ORDER BY c.customer_id
FOR UPDATE OF c"""

NEXT_SEQ_SQL = f"SELECT nextval(pg_get_serial_sequence('{store.core.events.name}', 'seq'))"

# Read after the lock is held, so a concurrent check of a sibling or a retry of the same
# order that committed while we waited is seen.
CONTEXT_SQL = f"""
SELECT k.check_id, k.order_id, k.customer_id, k.amount, k.currency, k.decision, k.body,
       g.others, g.members
FROM (SELECT 1) AS one
LEFT JOIN LATERAL (
    SELECT check_id, order_id, customer_id, amount, currency, decision, body
    FROM {store.checks.name} WHERE order_id = $1 ORDER BY seq DESC LIMIT 1) AS k ON true
CROSS JOIN LATERAL (
    SELECT coalesce(sum(exposure), 0) AS others, count(*) AS members
    FROM {store.customers.name} WHERE group_id = $2 AND customer_id <> $3) AS g"""

_E = ["seq", "source", "event_id", "type", "subject", "time", "event", "recorded_at"]
_K = ["check_id", "order_id", "customer_id", "seq", "amount", "currency", "decision",
      "evaluated_at", "body"]


def _params(start: int, count: int) -> str:
    return ", ".join(f"${i}" for i in range(start, start + count))


_O = 1 + len(_E) + len(_K)
_C = _O + 5
WRITE_SQL = f"""
WITH ev AS (
    INSERT INTO {store.core.events.name} ({", ".join(f'"{c}"' for c in _E)})
    VALUES ({_params(1, len(_E))})),
ck AS (
    INSERT INTO {store.checks.name} ({", ".join(_K)})
    VALUES ({_params(1 + len(_E), len(_K))})),
ob AS (
    INSERT INTO {store.core.outbox.name} (event_id, topic, key, value, created_at)
    SELECT * FROM unnest(${_O}::text[], ${_O + 1}::text[], ${_O + 2}::text[],
                         ${_O + 3}::text[], ${_O + 4}::timestamptz[]))
INSERT INTO {store.customers.name} ({", ".join(_CUSTOMER_COLUMNS)})
VALUES ({_params(_C, len(_CUSTOMER_COLUMNS))})
ON CONFLICT (customer_id) DO UPDATE SET
    {", ".join(f"{c} = EXCLUDED.{c}" for c in _CUSTOMER_COLUMNS if c != "customer_id")}"""


class PostgresChecks(CoreChecks):
    """The same effects as ``CoreChecks`` in four round trips."""

    async def read(self, conn: AsyncConnection, cid: str, order_id: str) -> CheckContext:
        rows = {r.customer_id: r for r in await conn.exec_driver_sql(LOCK_SQL, (cid,))}
        row = rows.get(cid)
        parent = row.parent_id if row is not None else None
        if row is not None and parent and parent not in rows:
            # The parent row appeared or changed after the lock's subquery ran.
            return await self._portable(conn, cid, order_id)
        seq = row.next_seq if row is not None else (
            await conn.exec_driver_sql(NEXT_SEQ_SQL)).scalar_one()
        loaded = {key: Loaded(store.load_state(r.state), r.published, r.last_seq)
                  for key, r in rows.items()}
        if cid not in loaded:
            loaded[cid] = Loaded(domain.new_customer(cid, self.service.policy), None, 0)
        ctx = (await conn.exec_driver_sql(CONTEXT_SQL, (order_id, parent or cid, cid))).one()
        prior = ctx if ctx.check_id is not None else None
        return CheckContext(loaded, parent, prior, ctx.others, ctx.members, seq)

    async def _portable(self, conn: AsyncConnection, cid: str, order_id: str) -> CheckContext:
        ctx = await super().read(conn, cid, order_id)
        ctx.seq = None
        return ctx

    async def record(self, conn: AsyncConnection, env: Envelope,
                     decided: ev.CreditCheckDecided, ctx: CheckContext) -> None:
        if ctx.seq is None:
            await super().record(conn, env, decided, ctx)
            return
        now = self.core.clock()
        tx = Tx(conn, now)
        writes = self.service.fold(tx, ctx.loaded, [Incoming(ctx.seq, env, decided)])
        if tx.rejected or writes.history or writes.requests or len(writes.customers) != 1 \
                or len(writes.checks) != 1:
            raise RuntimeError(f"a credit check folded into unexpected writes: {writes}")
        event = es.envelope_row(env, topic=None, partition=None, offset=None, recorded_at=now)
        event["seq"] = ctx.seq
        check = writes.checks[0]
        outbox = [(e.id, topic, e.subject, e.to_json().decode(), now) for topic, e in tx.outbox]
        customer = writes.customers[0]
        params = (
            *(event[c] for c in _E),
            *(check[c] for c in _K),
            *([o[i] for o in outbox] for i in range(5)),
            *(customer[c] for c in _CUSTOMER_COLUMNS),
        )
        await conn.exec_driver_sql(WRITE_SQL, params)
        if outbox:
            self.core.outbox_ready.set()


def for_dialect(name: str, service: LimitsService, core: EventCore) -> CoreChecks:
    return PostgresChecks(service, core) if name == "postgresql" else CoreChecks(service, core)


