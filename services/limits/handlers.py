"""Limits handlers: a batch of events → per-customer folds → rows, history and output events.

The customers a batch touches are loaded (and locked) once through the repository, folded
in memory with the pure domain, and written back once, so a batch costs a handful of
statements whatever its size. The domain decides the output events; this module writes
them down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from typing import Any

from pydantic import BaseModel
from sqlalchemy import MetaData, Table, and_, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from services.limits import domain, store
from services.limits import events as ev
from shared.events import DeadLetter, Envelope, new_event, trusted_event
from shared.ledger import EVENT_TYPES as LEDGER_TYPES
from shared.ledger import Archived
from shared.policy import Policy
from shared.projection import as_json, plain_json
from shared.runtime import Incoming
from shared.settings import Settings
from shared.unitofwork import (
    Loaded,
    Repository,
    UnitOfWork,
    fold_with_archive,
    prefetch,
)

SOURCE = "/creditwatch/limits"
RECENT_STATES = 50_000
# A batch's fold yields to the event loop after this many events / settled customers.
FOLD_SLICE_EVENTS = 200
FOLD_SLICE_CUSTOMERS = 40
CONTRACT_TYPES = LEDGER_TYPES | {
    "customer.registered",
    "customer.updated",
    "assessment.completed",
    "alert.raised",
    "alert.updated",
    "alert.resolved",
}
# Events that change a reservation (by its order id); a change of credit currency changes
# them all.
_RESERVATION_TYPES = frozenset(
    {"credit_check.decided", "reservation.released", "reservation.expired"}
)

money = domain.money
exposure_body = domain.exposure_body


@dataclass(eq=False)
class LimitsLoaded(Loaded[domain.CustomerState]):
    """A customer in a unit of work, with the key of the exposure body last published."""

    published: str | None = None
    # Orders whose reservation this unit of work changed (their rows to write).
    orders: set[str] = field(default_factory=set)

    def committed(self) -> LimitsLoaded:
        return LimitsLoaded(self.state, self.last_seq, self.state, self.published)


class LimitsRepository(Repository[LimitsLoaded]):
    version_columns = ("customer_id", "last_seq", "published")

    def __init__(self, policy: Policy, capacity: int = RECENT_STATES) -> None:
        super().__init__(store.customers, capacity=capacity)
        self.policy = policy

    def new(self, customer_id: str) -> LimitsLoaded:
        return LimitsLoaded(domain.new_customer(customer_id, self.policy))

    async def read(self, conn: AsyncConnection, rows: Mapping[str, Any]) -> dict[str, LimitsLoaded]:
        states = await store.load_states(conn, rows)
        return {
            cid: LimitsLoaded(states[cid], row.last_seq, states[cid], row.published)
            for cid, row in rows.items()
        }

    def from_cache(self, hit: LimitsLoaded, row: Any) -> LimitsLoaded:
        return LimitsLoaded(hit.state, hit.last_seq, hit.state, row.published)


@dataclass
class Writes:
    """The projection rows one fold produces."""

    customers: list[dict[str, Any]] = field(default_factory=list)
    reservations: list[dict[str, Any]] = field(default_factory=list)
    ended: list[tuple[str, str]] = field(default_factory=list)  # (customer, order) deleted
    checks: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)


class LimitsService:
    """The limits service as the event core sees it."""

    name = "limits"
    metadata: MetaData = store.metadata
    core = store.core
    projection_tables: Sequence[Table] = store.PROJECTIONS
    customers: Table = store.customers  # locked before a batch's events are numbered
    consumed_types = CONTRACT_TYPES

    def __init__(self, settings: Settings, policy: Policy) -> None:
        self.settings = settings
        self.policy = policy
        self.repository = LimitsRepository(policy)

    def input_topics(self) -> list[str]:
        s = self.settings
        return [
            s.topic_customers,
            s.topic_invoices,
            s.topic_payments,
            s.topic_overdue,
            s.topic_assessments,
            s.topic_alerts,
        ]

    def parse_stored(self, env: Envelope) -> BaseModel | None:
        return ev.parse_any(env)

    # ---- the fold -------------------------------------------------------------------------
    async def handle(self, uow: UnitOfWork, events: Sequence[Incoming]) -> None:
        loaded = await self.repository.load(uow, {e.envelope.subject for e in events})
        recall = await prefetch(
            store.archive,
            uow,
            (
                (
                    e.envelope.subject,
                    domain.recall_wanted(
                        loaded[e.envelope.subject].state, e.envelope.type, e.event
                    ),
                )
                for e in events
            ),
        )
        # The fold, in slices with a yield between them: the relay and the consumer's
        # fetching share this event loop and would otherwise wait for the whole batch.
        writes = Writes()
        touched: dict[str, int] = {}
        for start in range(0, len(events), FOLD_SLICE_EVENTS):
            for inc in events[start : start + FOLD_SLICE_EVENTS]:
                await self._apply(uow, inc, recall, touched, writes)
            await asyncio.sleep(0)
        uow.touched.update(touched)
        if uow.replaying:
            # The customers' rows are written once, by ``flush`` (their history rows now).
            await self.write(uow, writes)
            return
        # A customer's exposure.updated is named after the last event folded for it (its
        # seq), and carries that event's trace on.
        traces = {
            inc.envelope.subject: inc.envelope.trace
            for inc in events
            if touched.get(inc.envelope.subject) == inc.seq
        }
        items = list(touched.items())
        for start in range(0, len(items), FOLD_SLICE_CUSTOMERS):
            for cid, seq in items[start : start + FOLD_SLICE_CUSTOMERS]:
                self._settle(uow, cid, uow.states[cid], seq, writes, traces.get(cid))
            await asyncio.sleep(0)
        await self.write(uow, writes)

    async def flush(self, uow: UnitOfWork) -> None:
        """A replay's customers folded since the last flush: their rows, once each."""
        writes = Writes()
        for cid, seq in uow.touched.items():
            self._settle(uow, cid, uow.states[cid], seq, writes)
        uow.touched.clear()
        await self.write(uow, writes)

    async def _apply(
        self,
        uow: UnitOfWork,
        inc: Incoming,
        recall: dict[str, dict[str, Archived | None]],
        touched: dict[str, int],
        writes: Writes,
    ) -> None:
        env = inc.envelope
        cid = env.subject
        entry: LimitsLoaded = uow.states[cid]
        prev = entry.state

        def fold(items: Mapping[str, Archived | None]) -> domain.CustomerState:
            event = domain.Event(env.type, inc.event, env.time, items)
            return domain.evolve(prev, event, self.policy)

        try:
            nxt = await fold_with_archive(store.archive, uow, cid, recall, prev, fold)
        except DeadLetter as dl:
            uow.reject(inc, dl)
            return
        entry.state = nxt
        touched[cid] = inc.seq
        if env.type in _RESERVATION_TYPES:
            entry.orders.add(inc.event.order_id)  # type: ignore[attr-defined]
        elif prev.currency != nxt.currency:
            entry.orders.update(prev.reservations)
        self._record(uow, inc, prev, nxt, writes)

    def fold(self, uow: UnitOfWork, events: Sequence[Incoming]) -> Writes:
        """Apply events whose customers are loaded and whose ledger is untouched (credit
        checks) — CPU only: the rows to write and, through ``uow``, the output events."""
        writes = Writes()
        touched: dict[str, int] = {}
        for inc in events:
            env = inc.envelope
            cid = env.subject
            entry: LimitsLoaded = uow.states[cid]
            prev = entry.state
            nxt = domain.evolve(prev, domain.Event(env.type, inc.event, env.time), self.policy)
            entry.state = nxt
            touched[cid] = inc.seq
            if env.type in _RESERVATION_TYPES:
                entry.orders.add(inc.event.order_id)  # type: ignore[attr-defined]
            self._record(uow, inc, prev, nxt, writes)
        for cid, seq in touched.items():
            self._settle(uow, cid, uow.states[cid], seq, writes)
        uow.touched.update(touched)
        return writes

    def _settle(
        self,
        uow: UnitOfWork,
        cid: str,
        loaded: LimitsLoaded,
        seq: int,
        writes: Writes,
        trace: Mapping[str, str] | None = None,
    ) -> None:
        """A touched customer's figures: its row, and ``exposure.updated`` when they moved."""
        st = loaded.state
        fig = domain.figures(st, self.policy)
        body = domain.decide_exposure(st, fig, loaded.published)
        if body is not None:
            uow.emit(
                self.settings.topic_exposure,
                trusted_event(
                    "exposure.updated",
                    source=SOURCE,
                    subject=cid,
                    data=body,
                    id=f"exposure-{cid}-{seq}",
                    time=st.last_time or uow.now,
                    extensions=trace,
                ),
            )
            loaded.published = domain.exposure_key(body)
        stored = loaded.stored
        document = (
            store.UNCHANGED
            if stored is not None and store.same_document(stored, st)
            else store.dump_state(st)
        )
        held, ended = store.reservation_changes(
            cid, stored.reservations if stored is not None else {}, st.reservations, loaded.orders
        )
        loaded.orders.clear()
        writes.reservations += held
        writes.ended += ended
        writes.customers.append(
            store.customer_row(
                st,
                fig,
                seq,
                domain.next_ageing_date(st),
                domain.next_expiry(st),
                loaded.published,
                document,
            )
        )
        loaded.stored = st
        loaded.last_seq = seq

    async def write(self, uow: UnitOfWork, writes: Writes) -> None:
        conn = uow.conn
        await store.save_customers(conn, writes.customers)
        await store.save_reservations(conn, writes.reservations, writes.ended)
        await store.record_checks(conn, writes.checks)
        await store.record_limit_changes(conn, writes.history)
        await store.record_requests(conn, writes.requests)
        await store.archive.flush(uow)

    def _record(
        self,
        uow: UnitOfWork,
        inc: Incoming,
        prev: domain.CustomerState,
        nxt: domain.CustomerState,
        writes: Writes,
    ) -> None:
        """The side tables and output events one applied event calls for."""
        env, data = inc.envelope, inc.event
        if isinstance(data, ev.CreditCheckDecided):
            writes.checks.append(
                {
                    "check_id": data.check_id,
                    "order_id": data.order_id,
                    "customer_id": data.customer_id,
                    "seq": inc.seq,
                    "amount": data.amount,
                    "currency": data.currency,
                    "decision": data.decision,
                    "evaluated_at": env.time,
                    "body": plain_json(data.response),
                }
            )
            return
        outputs = domain.decide_outputs(
            prev, nxt, domain.Event(env.type, data, env.time), self.policy
        )
        if outputs.request is not None:
            writes.requests.append(
                {
                    "request_id": outputs.request.request_id,
                    "customer_id": nxt.customer_id,
                    "status": outputs.request.status,
                    "requested_by": outputs.request.requested_by,
                }
            )
        body = outputs.limit_changed
        if body is None:
            return
        writes.history.append(
            {
                "seq": inc.seq,
                "customer_id": nxt.customer_id,
                "effective_at": env.time,
                "body": as_json(body),
            }
        )
        uow.emit(
            self.settings.topic_limits,
            new_event(
                "limit.changed",
                source=SOURCE,
                subject=nxt.customer_id,
                data=body,
                id=f"limit-{nxt.customer_id}-{inc.seq}",
                time=env.time,
                extensions=env.trace,  # the trace of the event that changed it goes on
            ),
        )

    # ---- time-driven events ---------------------------------------------------------------
    async def due_events(self, uow: UnitOfWork) -> list[Envelope]:
        """Expiries and ageing due now, judged on the customers' states under their locks."""
        now = uow.now
        today = now.date()
        c = store.customers.c
        stmt = (
            select(c.customer_id, c.next_ageing_on)
            .where(
                or_(
                    and_(c.next_ageing_on.is_not(None), c.next_ageing_on <= today),
                    and_(c.next_expiry_at.is_not(None), c.next_expiry_at <= now),
                ),
            )
            .order_by(c.customer_id)
            .limit(1000)
        )
        rows = {row.customer_id: row for row in await uow.conn.execute(stmt)}
        if not rows:
            return []
        loaded = await self.repository.load(uow, rows)
        out: list[Envelope] = []
        for _cid, entry in sorted(loaded.items()):
            out += due_for(entry.state, now, domain.next_ageing_date(entry.state))
        return out


def _internal(model: ev.Internal, *, id: str, time: datetime, subject: str) -> Envelope:
    return new_event(model.TYPE, source=SOURCE, subject=subject, data=model, id=id, time=time)


def due_for(st: domain.CustomerState, now: datetime, ageing_on: date | None) -> list[Envelope]:
    """Expiries and ageing due for one customer at ``now``; ids are stable, so recording
    the same fact twice (two replicas, a retry) has no effect beyond the first."""
    cid = st.customer_id
    out: list[Envelope] = []
    for res in st.reservations.values():
        if res.expires_at <= now:
            out.append(
                _internal(
                    ev.ReservationExpired(
                        customer_id=cid, order_id=res.order_id, check_id=res.check_id
                    ),
                    id=f"reservation-expired-{res.check_id}",
                    time=res.expires_at,
                    subject=cid,
                )
            )
    temporary = st.temporary
    if temporary is not None and temporary.expires_at is not None and temporary.expires_at <= now:
        out.append(
            _internal(
                ev.LimitExpired(customer_id=cid, request_id=temporary.request_id),
                id=f"limit-expired-{temporary.request_id}",
                time=temporary.expires_at,
                subject=cid,
            )
        )
    if ageing_on is not None and ageing_on <= now.date():
        today = now.date()
        at = datetime.combine(today, time(0, 0), tzinfo=UTC)
        out.append(
            _internal(
                ev.LedgerAged(customer_id=cid, as_of=today),
                id=f"aged-{cid}-{today.isoformat()}",
                time=at,
                subject=cid,
            )
        )
    return sorted(out, key=lambda e: e.time)


__all__ = ["LimitsLoaded", "LimitsRepository", "LimitsService", "due_for", "exposure_body", "money"]
