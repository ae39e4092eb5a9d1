"""Limits handlers: a batch of events → per-customer folds → rows, history and output events.

States of the customers a batch touches are loaded (and locked) once, folded in memory with
the pure domain, and written back once, so a batch costs a handful of statements whatever
its size.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from pydantic import BaseModel
from sqlalchemy import MetaData, Table, and_, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from services.limits import domain, store
from services.limits import events as ev
from shared.events import DeadLetter, Envelope, new_event, trusted_event
from shared.money import MONEY_CONTEXT, is_currency, quantize
from shared.policy import Policy
from shared.projection import CommittedStates, as_json, plain_json
from shared.runtime import Incoming, Tx
from shared.settings import Settings

SOURCE = "/creditwatch/limits"
RECENT_STATES = 50_000
# A batch's fold yields to the event loop after this many events / settled customers.
FOLD_SLICE_EVENTS = 200
FOLD_SLICE_CUSTOMERS = 40
CONTRACT_TYPES = frozenset(
    {
        "customer.registered",
        "customer.updated",
        "invoice.issued",
        "invoice.cancelled",
        "credit_note.issued",
        "payment.received",
        "payment.reversed",
        "invoice.overdue",
        "assessment.completed",
        "alert.raised",
        "alert.updated",
        "alert.resolved",
    }
)
LIMIT_REASON = {
    "assessment.completed": "policy",
    "customer.registered": "policy",
    "customer.updated": "policy",
    "limit.expired": "expired",
    "hold.placed": "hold",
    "hold.released": "release",
}


def money(amount: Decimal, currency: str) -> str:
    """An amount as the API and events show it: the currency's minor units, no exponent."""
    key = (amount, currency, amount.is_signed())  # equal amounts, one spelling ("-0.00")
    text = _SHOWN.get(key)
    if text is None and not is_currency(currency):
        # An ISO code without minor units (an order in XAU): shown as it was given.
        return format(amount, "f")
    if text is None:
        quantum = _QUANTA.get(currency)
        if quantum is None:
            quantum = _QUANTA[currency] = quantize(Decimal(1), currency)
        text = format(amount.quantize(quantum, context=MONEY_CONTEXT), "f")
        if len(_SHOWN) >= _SHOWN_MAX:
            _SHOWN.clear()
        _SHOWN[key] = text
    return text


_QUANTA: dict[str, Decimal] = {}
# The amounts shown lately: a credit check shows two dozen, most of them unchanged since the
# customer's last (the limit, the overdue buckets, zeros, the order's amount).
_SHOWN: dict[tuple[Decimal, str, bool], str] = {}
_SHOWN_MAX = 4096


def exposure_body(state: domain.CustomerState, fig: domain.Figures) -> dict[str, Any]:
    ccy = fig.currency
    util = fig.utilization
    return {
        "customer_id": state.customer_id,
        "currency": ccy,
        "open_receivables": money(fig.open_receivables, ccy),
        "overdue_amount": money(fig.overdue_amount, ccy),
        "overdue_buckets": {k: money(v, ccy) for k, v in fig.overdue_buckets.items()},
        "max_days_overdue": fig.max_days_overdue,
        "reserved": money(fig.reserved, ccy),
        "exposure": money(fig.exposure, ccy),
        "limit": money(fig.limit, ccy),
        "available": money(fig.available, ccy),
        "utilization": format(util, "f") if util is not None else None,
        "on_hold": fig.on_hold,
        "as_of": state.last_time.isoformat().replace("+00:00", "Z") if state.last_time else None,
    }


@dataclass
class Writes:
    """The projection rows one fold produces."""

    customers: list[dict[str, Any]] = field(default_factory=list)
    reservations: list[dict[str, Any]] = field(default_factory=list)
    ended: list[tuple[str, str]] = field(default_factory=list)  # (customer, order) deleted
    checks: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Loaded:
    state: domain.CustomerState
    published: str | None  # the exposure.updated body last published (JSON)
    last_seq: int
    # The state as its row holds it (None: no row yet), to write only what changed.
    stored: domain.CustomerState | None = None

    @classmethod
    def committed(cls, state: domain.CustomerState, published: str | None, last_seq: int) -> Loaded:
        return cls(state, published, last_seq, state)


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
        # States this process committed, by customer (bounded, least recently used out).
        self._recent: CommittedStates[Loaded] = CommittedStates(RECENT_STATES)

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
    async def handle(self, tx: Tx, events: Sequence[Incoming]) -> None:
        cached: dict[str, Loaded] = tx.scratch.setdefault("limits.states", {})
        ids = {e.envelope.subject for e in events}
        if tx.replaying:
            self._recent.clear()
            await self.load(tx.conn, cached, ids)
        else:
            await self._load_recent(tx.conn, cached, ids)
        # The fold, in slices with a yield between them: the relay and the consumer's
        # fetching share this event loop and would otherwise wait for the whole batch.
        writes = Writes()
        touched: dict[str, int] = {}
        for start in range(0, len(events), FOLD_SLICE_EVENTS):
            self._apply_events(
                tx, cached, events[start : start + FOLD_SLICE_EVENTS], touched, writes
            )
            await asyncio.sleep(0)
        items = list(touched.items())
        for start in range(0, len(items), FOLD_SLICE_CUSTOMERS):
            for cid, seq in items[start : start + FOLD_SLICE_CUSTOMERS]:
                self._settle(tx, cid, cached[cid], seq, writes)
            await asyncio.sleep(0)
        await self.write(tx.conn, writes)
        if not tx.replaying:
            settled = set(touched)
            tx.after_commit.append(lambda: self._remember(cached, settled))

    async def _load_recent(
        self, conn: AsyncConnection, cached: dict[str, Loaded], ids: set[str]
    ) -> None:
        """Like ``load``, but reuse a state this process committed when the row's version
        (``last_seq``) says nobody has written it since: the JSON document is the costliest
        part of a batch, and a consumer owns its customers' partitions."""
        missing = ids - cached.keys()
        if not missing:
            return
        versions = await store.lock_versions(conn, missing)
        hits = {
            cid: hit
            for cid, row in versions.items()
            if (hit := self._recent.current(cid, row.last_seq)) is not None
        }
        states = await store.read_states(conn, versions.keys() - hits.keys())
        for cid in missing:
            row = versions.get(cid)
            if row is None:
                cached[cid] = Loaded(domain.new_customer(cid, self.policy), None, 0)
            elif (hit := hits.get(cid)) is not None:
                cached[cid] = Loaded.committed(hit.state, hit.published, hit.last_seq)
            else:
                cached[cid] = Loaded.committed(states[cid], row.published, row.last_seq)

    def _remember(self, cached: dict[str, Loaded], touched: set[str]) -> None:
        # Copies: the transaction's own entries change with its next events.
        self._recent.remember(
            (cid, Loaded.committed(cached[cid].state, cached[cid].published, cached[cid].last_seq))
            for cid in touched
        )

    async def load(self, conn: AsyncConnection, cached: dict[str, Loaded], ids: set[str]) -> None:
        """Lock and load the states not loaded yet (an API command may have them already)."""
        missing = ids - cached.keys()
        if not missing:
            return
        locked = await store.lock_customers(conn, missing)
        states = await store.load_states(conn, locked)
        for cid in missing:
            row = locked.get(cid)
            cached[cid] = (
                Loaded(domain.new_customer(cid, self.policy), None, 0)
                if row is None
                else Loaded.committed(states[cid], row.published, row.last_seq)
            )

    def fold(self, tx: Tx, cached: dict[str, Loaded], events: Sequence[Incoming]) -> Writes:
        """Apply the events to the loaded states (CPU only): the rows to write and, through
        ``tx``, the output events and the events that could not be applied."""
        writes = Writes()
        touched: dict[str, int] = {}
        self._apply_events(tx, cached, events, touched, writes)
        for cid, seq in touched.items():
            self._settle(tx, cid, cached[cid], seq, writes)
        return writes

    def _apply_events(
        self,
        tx: Tx,
        cached: dict[str, Loaded],
        events: Sequence[Incoming],
        touched: dict[str, int],
        writes: Writes,
    ) -> None:
        """Fold each event into its customer's state; ``touched``: customer → last seq."""
        for inc in events:
            env = inc.envelope
            cid = env.subject
            loaded = cached[cid]
            prev = loaded.state
            try:
                nxt = domain.apply(prev, env.type, inc.event, env.time, self.policy)
            except DeadLetter as dl:
                tx.reject(inc, dl)
                continue
            loaded.state = nxt
            touched[cid] = inc.seq
            self._record(tx, inc, prev, nxt, writes.checks, writes.history, writes.requests)

    def _settle(self, tx: Tx, cid: str, loaded: Loaded, seq: int, writes: Writes) -> None:
        """A touched customer's figures: its row, and ``exposure.updated`` when they moved."""
        st = loaded.state
        items = domain.open_items(st)
        fig = domain.figures(st, self.policy, items=items)
        body = exposure_body(st, fig)
        # as_of moves with every event; a change worth publishing is in the figures.
        text = plain_json({**body, "as_of": None})
        # Nothing is published for a customer only credit checks or alerts spoke of.
        if text != loaded.published and domain.known(st):
            tx.emit(
                self.settings.topic_exposure,
                trusted_event(
                    "exposure.updated",
                    source=SOURCE,
                    subject=cid,
                    data=body,
                    id=f"exposure-{cid}-{seq}",
                    time=st.last_time or tx.now,
                ),
            )
            loaded.published = text
        stored = loaded.stored
        document = (
            store.UNCHANGED
            if stored is not None and store.same_document(stored, st)
            else store.dump_state(st)
        )
        held, ended = store.reservation_changes(
            cid, stored.reservations if stored is not None else {}, st.reservations
        )
        writes.reservations += held
        writes.ended += ended
        writes.customers.append(
            store.customer_row(
                st,
                fig,
                seq,
                domain.next_ageing_date(st, items),
                _next_expiry(st),
                loaded.published,
                document,
            )
        )
        loaded.stored = st
        loaded.last_seq = seq

    @staticmethod
    async def write(conn: AsyncConnection, writes: Writes) -> None:
        await store.save_customers(conn, writes.customers)
        await store.save_reservations(conn, writes.reservations, writes.ended)
        await store.record_checks(conn, writes.checks)
        await store.record_limit_changes(conn, writes.history)
        await store.record_requests(conn, writes.requests)

    def _record(
        self,
        tx: Tx,
        inc: Incoming,
        prev: domain.CustomerState,
        nxt: domain.CustomerState,
        checks: list[dict[str, Any]],
        history: list[dict[str, Any]],
        reqs: list[dict[str, Any]],
    ) -> None:
        """The side tables and output events one applied event calls for."""
        env, data = inc.envelope, inc.event
        if isinstance(data, ev.CreditCheckDecided):
            checks.append(
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
        if isinstance(
            data, ev.LimitRequestSubmitted | ev.LimitRequestApproved | ev.LimitRequestRejected
        ):
            req = nxt.requests[data.request_id]
            reqs.append(
                {
                    "request_id": req.request_id,
                    "customer_id": nxt.customer_id,
                    "status": req.status,
                    "requested_by": req.requested_by,
                }
            )
        # A manual limit stands until its expiry is recorded: judged at the expiry time
        # itself it would already have lapsed, and the change would go unpublished.
        before = domain.effective_limit(
            prev, self.policy, None if isinstance(data, ev.LimitExpired) else env.time
        )
        after = domain.effective_limit(nxt, self.policy, env.time)
        hold_changed = (prev.hold is None) != (nxt.hold is None)
        if (
            before[0] == after[0]
            and before[1] == after[1]
            and not hold_changed
            and prev.currency == nxt.currency
        ):
            return
        reason = LIMIT_REASON.get(env.type) or (
            "temporary"
            if after[1] == "temporary"
            else "manual"
            if after[1] == "manual"
            else "policy"
        )
        request_id = changed_by = requested_by = None
        granted = {"manual": nxt.manual, "temporary": nxt.temporary}.get(after[1])
        if granted is not None:
            request_id = granted.request_id
            changed_by = granted.changed_by
            requested_by = granted.requested_by
        if isinstance(data, ev.HoldPlaced | ev.HoldReleased):
            changed_by = data.by
        ccy = nxt.currency
        body = {
            "customer_id": nxt.customer_id,
            "previous_limit": money(before[0], prev.currency),
            "limit": money(after[0], ccy),
            "currency": ccy,
            "reason": reason,
            "grade": nxt.grade,
            "request_id": request_id,
            "changed_by": changed_by or "policy",
            "requested_by": requested_by,
            "effective_at": env.time.isoformat().replace("+00:00", "Z"),
            "expires_at": (after[2].isoformat().replace("+00:00", "Z") if after[2] else None),
            "source": after[1],
            "on_hold": nxt.hold is not None,
            "policy_version": self.policy.version,
        }
        history.append(
            {
                "seq": inc.seq,
                "customer_id": nxt.customer_id,
                "effective_at": env.time,
                "body": as_json(body),
            }
        )
        tx.emit(
            self.settings.topic_limits,
            new_event(
                "limit.changed",
                source=SOURCE,
                subject=nxt.customer_id,
                data=body,
                id=f"limit-{nxt.customer_id}-{inc.seq}",
                time=env.time,
            ),
        )

    # ---- time-driven events ---------------------------------------------------------------
    async def due_events(self, conn: AsyncConnection, now: datetime) -> list[Envelope]:
        today = now.date()
        c = store.customers.c
        stmt = (
            select(c.customer_id, c.state, c.as_of, c.next_ageing_on, c.next_expiry_at)
            .where(
                or_(
                    and_(c.next_ageing_on.is_not(None), c.next_ageing_on <= today),
                    and_(c.next_expiry_at.is_not(None), c.next_expiry_at <= now),
                ),
            )
            .order_by(c.customer_id)
            .limit(1000)
        )
        rows = {row.customer_id: row for row in await conn.execute(stmt)}
        states = await store.load_states(conn, rows)
        out: list[Envelope] = []
        for cid, row in rows.items():
            out += due_for(states[cid], now, row.next_ageing_on)
        return out


def _next_expiry(st: domain.CustomerState) -> datetime | None:
    first = domain.earliest_expiry(st)
    times = [first] if first is not None else []
    if st.temporary is not None and st.temporary.expires_at is not None:
        times.append(st.temporary.expires_at)
    return min(times) if times else None


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


__all__ = ["LimitsService", "due_for", "exposure_body", "timedelta"]
