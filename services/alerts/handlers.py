"""Alerts handlers: a batch of events → per-customer folds → alert rows, history and
``credit.alerts`` events.

States of the customers a batch touches are loaded (and locked) once, folded in memory with
the pure domain, and written back once. A redelivered event never reaches here (the core
drops it by id) and the state lives in the database, so neither a redelivery nor a restart
can raise a second alert for the same problem.

A replay folds the stored events in store order (``seq``), so the live fold must fold each
customer's events in that order too. The number is drawn when an event is stored, before the
customer's row is locked; two transactions on one customer (a consumed batch and the
scheduler, or an acknowledgement) can therefore fold in the other order than they were
numbered. A transaction that finds a customer already folded past its own first event is
refused as a serialization failure and retried: stored again, its events are numbered after
what is committed (``FoldOrderConflict``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel
from sqlalchemy import MetaData, Table, event
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.alerts import domain, store
from services.alerts import events as ev
from shared import metrics
from shared.events import Envelope, new_event
from shared.policy import Policy
from shared.projection import CommittedStates
from shared.runtime import Incoming, Tx
from shared.settings import Settings

SOURCE = "/creditwatch/alerts"
CONTRACT_TYPES = frozenset(
    {
        "exposure.updated",
        "assessment.completed",
        "limit.changed",
        "invoice.overdue",
        "payment.received",
        "payment.reversed",
        "credit_report.received",
    }
)
STATES = "alerts.states"
RECENT_STATES = 50_000
# A batch's fold yields to the event loop after this many events / customer rows.
STEP_SLICE = 200
ROW_SLICE = 100
_RAISED_KEY = "creditwatch.alerts.raised"


@dataclass
class _Loaded:
    state: domain.CustomerState
    last_seq: int


class SerializationFailure(Exception):
    """What PostgreSQL calls a transaction that conflicts with a concurrent one."""

    sqlstate = "40001"


class FoldOrderConflict(OperationalError):
    """Events of these customers were numbered before events another transaction has folded
    (and committed) meanwhile: folded now, they would be folded after events a replay folds
    after them. Raised before anything is written, as a serialization failure: the consumer
    retries the batch (a transient failure, never a dead letter), and stored again its
    events are numbered after everything committed."""

    def __init__(self, customers: Sequence[str]) -> None:
        shown = ", ".join(customers[:5]) + (", …" if len(customers) > 5 else "")
        super().__init__(
            None,
            None,
            SerializationFailure(
                f"{len(customers)} customer(s) ({shown}) already folded past events this "
                "transaction numbered earlier; retry"
            ),
        )
        self.customers = list(customers)


class AlertsService:
    """The alerts service as the event core sees it."""

    name = "alerts"
    metadata: MetaData = store.metadata
    core = store.core
    projection_tables: Sequence[Table] = store.PROJECTIONS
    customers: Table = store.customers  # locked before a batch's events are numbered
    consumed_types = CONTRACT_TYPES

    def __init__(self, settings: Settings, policy: Policy) -> None:
        self.settings = settings
        self.policy = policy
        # States this process committed, by customer (bounded, least recently used out).
        self._recent: CommittedStates[_Loaded] = CommittedStates(RECENT_STATES)

    def input_topics(self) -> list[str]:
        s = self.settings
        return [
            s.topic_exposure,
            s.topic_assessments,
            s.topic_limits,
            s.topic_overdue,
            s.topic_payments,
            s.topic_credit_reports,
        ]

    def parse_stored(self, env: Envelope) -> BaseModel | None:
        return ev.parse_any(env)

    # ---- the fold -------------------------------------------------------------------------
    async def handle(self, tx: Tx, events: Sequence[Incoming]) -> None:
        cached: dict[str, _Loaded] = tx.scratch.setdefault(STATES, {})
        ids = {e.envelope.subject for e in events}
        if tx.replaying:
            self._recent.clear()
            await load_states(tx.conn, cached, ids)
        else:
            await self._load_recent(tx.conn, cached, ids)
            refuse_out_of_order(cached, events)
        touched: dict[str, int] = {}
        alert_rows: dict[str, dict[str, Any]] = {}
        history: list[dict[str, Any]] = []
        raised: list[tuple[str, str]] = []
        for n, inc in enumerate(events, start=1):
            if n % STEP_SLICE == 0:
                # Let the relay and the consumer's fetching run (they share this loop).
                await asyncio.sleep(0)
            env = inc.envelope
            cid = env.subject
            loaded = cached[cid]
            # In UTC, as the store gives it back to a replay: a producer's offset would
            # otherwise reach alert times and the state document ("+02:00" against "Z").
            at = env.time.astimezone(UTC)
            happened = domain.Event(env.type, f"{env.source}|{env.id}", at, inc.event)
            loaded.state, changes = domain.step(loaded.state, happened, self.policy)
            touched[cid] = inc.seq
            for change in changes:
                alert = change.alert
                alert_rows[alert.alert_id] = store.alert_row(alert)
                history.append(store.history_row(change))
                tx.emit(
                    self.settings.topic_alerts,
                    new_event(
                        change.event_type,
                        source=SOURCE,
                        subject=cid,
                        data=domain.alert_body(alert),
                        id=f"{alert.alert_id}-{alert.version}",
                        time=alert.updated_at,
                    ),
                )
                if change.kind == "raised":
                    raised.append((alert.rule, alert.severity))
        rows = []
        for n, (cid, seq) in enumerate(touched.items(), start=1):
            if n % ROW_SLICE == 0:
                await asyncio.sleep(0)
            loaded = cached[cid]
            loaded.last_seq = seq
            rows.append(store.customer_row(loaded.state, seq))
        await store.save_customers(tx.conn, rows)
        await store.save_alerts(tx.conn, list(alert_rows.values()))
        await store.record_history(tx.conn, history)
        if raised and not tx.replaying:
            note_raised(tx.conn, raised)
        if not tx.replaying:
            tx.after_commit.append(lambda: self._remember(cached, set(touched)))

    async def _load_recent(
        self, conn: AsyncConnection, cached: dict[str, _Loaded], ids: set[str]
    ) -> None:
        """Like ``load_states``, but reuse a state this process committed when the row's
        version (``last_seq``) says nobody has written it since: parsing the JSON document
        is the costliest part of loading, and a consumer owns its customers' partitions."""
        missing = ids - cached.keys()
        if not missing:
            return
        versions = await store.lock_versions(conn, missing)
        hits = {
            cid: hit
            for cid, last_seq in versions.items()
            if (hit := self._recent.current(cid, last_seq)) is not None
        }
        documents = await store.read_states(conn, versions.keys() - hits.keys())
        for cid in missing:
            if cid not in versions:
                cached[cid] = _Loaded(domain.new_customer(cid), 0)
            elif (hit := hits.get(cid)) is not None:
                cached[cid] = _Loaded(hit.state, hit.last_seq)
            else:
                cached[cid] = _Loaded(store.load_state(documents[cid]), versions[cid])

    def _remember(self, cached: dict[str, _Loaded], touched: set[str]) -> None:
        # Copies: the transaction's own entries change with its next events.
        self._recent.remember(
            (cid, _Loaded(cached[cid].state, cached[cid].last_seq)) for cid in touched
        )

    # ---- time-driven events ---------------------------------------------------------------
    async def due_events(self, conn: AsyncConnection, now: datetime) -> list[Envelope]:
        if not domain.rule_enabled(self.policy, domain.REVIEW_OVERDUE):
            return []
        today = now.date()
        grace = self.policy.alerts.review_overdue.grace_days
        due = await store.reviews_due(conn, today - timedelta(days=grace))
        # Locked before the events are stored (and numbered), as an acknowledgement locks its
        # customer first: then no batch can fold these customers between the numbering and
        # the fold, and the states judged are the ones the events will be folded into.
        locked = await store.lock_customers(conn, [row.customer_id for row in due])
        out: list[Envelope] = []
        for row in due:
            current = locked.get(row.customer_id)
            if current is None:
                continue  # gone meanwhile (a replay truncated the projections)
            env = review_event(store.load_state(current.state), self.policy, now)
            if env is not None:
                out.append(env)
        return out


def refuse_out_of_order(cached: dict[str, _Loaded], events: Sequence[Incoming]) -> None:
    """Raise ``FoldOrderConflict`` when a customer's locked row is already at a later event
    than this transaction's first for that customer (``last_seq`` only grows otherwise)."""
    first: dict[str, int] = {}
    for inc in events:
        first.setdefault(inc.envelope.subject, inc.seq)
    late = sorted(cid for cid, seq in first.items() if cached[cid].last_seq > seq)
    if late:
        raise FoldOrderConflict(late)


async def load_states(conn: AsyncConnection, cached: dict[str, _Loaded], ids: set[str]) -> None:
    """Load (and lock) the states of customers not loaded yet in this transaction."""
    missing = ids - cached.keys()
    if not missing:
        return
    rows = await store.lock_customers(conn, missing)
    for cid in missing:
        row = rows.get(cid)
        if row is None:
            cached[cid] = _Loaded(domain.new_customer(cid), 0)
        else:
            cached[cid] = _Loaded(store.load_state(row.state), row.last_seq)


def review_event(state: domain.CustomerState, policy: Policy, now: datetime) -> Envelope | None:
    """The ``review.overdue_detected`` event due for one customer, if any. Its id is stable
    per (customer, review date), so two replicas or a retry record it only once."""
    if not domain.review_overdue_due(state, policy, now.date()):
        return None
    assert state.assessment is not None and state.assessment.next_review_date is not None
    day = state.assessment.next_review_date
    model = ev.ReviewOverdueDetected(customer_id=state.customer_id, next_review_date=day)
    return new_event(
        model.TYPE,
        source=SOURCE,
        subject=state.customer_id,
        data=model,
        id=f"review-overdue-{state.customer_id}-{day.isoformat()}",
        time=now,
    )


# ---- creditwatch_alerts_raised_total: counted when the raise is committed -------------------


def note_raised(conn: AsyncConnection, raised: list[tuple[str, str]]) -> None:
    """Remember raises until the transaction commits (a rolled-back batch counts nothing)."""
    conn.info.setdefault(_RAISED_KEY, []).extend(raised)


def _on_commit(conn: Connection) -> None:
    for rule, severity in conn.info.pop(_RAISED_KEY, ()):
        metrics.ALERTS_RAISED.labels(rule, severity).inc()


def _on_rollback(conn: Connection) -> None:
    conn.info.pop(_RAISED_KEY, None)


def count_raises_on_commit(engine: AsyncEngine) -> None:
    """Install the commit/rollback hooks that turn noted raises into the counter."""
    target = engine.sync_engine
    if not event.contains(target, "commit", _on_commit):
        event.listen(target, "commit", _on_commit)
        event.listen(target, "rollback", _on_rollback)


__all__ = [
    "AlertsService",
    "FoldOrderConflict",
    "count_raises_on_commit",
    "load_states",
    "note_raised",
    "refuse_out_of_order",
    "review_event",
]
