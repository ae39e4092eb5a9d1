"""Alerts handlers: a batch of events → per-customer folds → alert rows, history and
``credit.alerts`` events.

The customers a batch touches are loaded (and locked) once through the repository, folded
in memory with the pure domain (``evolve``, then ``decide_alerts``), and written back once.
A redelivered event never reaches here (the core drops it by id) and the state lives in the
database, so neither a redelivery nor a restart can raise a second alert for the same
problem.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel
from sqlalchemy import MetaData, Table
from sqlalchemy.ext.asyncio import AsyncConnection

from services.alerts import domain, store
from services.alerts import events as ev
from shared import metrics
from shared.events import Envelope, new_event
from shared.policy import Policy
from shared.runtime import Incoming
from shared.settings import Settings
from shared.unitofwork import Loaded, Repository, UnitOfWork

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
RECENT_STATES = 50_000
# A batch's fold yields to the event loop after this many events / customer rows.
STEP_SLICE = 200
ROW_SLICE = 100
AlertsLoaded = Loaded[domain.CustomerState]


class AlertsRepository(Repository[AlertsLoaded]):
    """The alerts service's customers: their state documents, by customer."""

    def __init__(self, capacity: int = RECENT_STATES) -> None:
        super().__init__(store.customers, capacity=capacity)

    def new(self, customer_id: str) -> AlertsLoaded:
        return Loaded(domain.new_customer(customer_id))

    async def read(self, conn: AsyncConnection, rows: Mapping[str, Any]) -> dict[str, AlertsLoaded]:
        out: dict[str, AlertsLoaded] = {}
        for cid, row in rows.items():
            state = store.load_state(row.state)
            out[cid] = Loaded(state, row.last_seq, state)
        return out


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
        self.repository = AlertsRepository()

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
    async def handle(self, uow: UnitOfWork, events: Sequence[Incoming]) -> None:
        await self.repository.load(uow, {e.envelope.subject for e in events})
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
            loaded: AlertsLoaded = uow.states[cid]
            happened = domain.Event(env.type, f"{env.source}|{env.id}", env.time, inc.event)
            facts = domain.evolve(loaded.state, happened, self.policy)
            changes = domain.decide_alerts(facts, happened, self.policy)
            loaded.state = domain.apply_changes(facts, changes)
            touched[cid] = inc.seq
            for change in changes:
                alert = change.alert
                alert_rows[alert.alert_id] = store.alert_row(alert)
                history.append(store.history_row(change))
                uow.emit(
                    self.settings.topic_alerts,
                    new_event(
                        change.event_type,
                        source=SOURCE,
                        subject=cid,
                        data=domain.alert_body(alert),
                        id=f"{alert.alert_id}-{alert.version}",
                        time=alert.updated_at,
                        extensions=env.trace,  # the triggering event's trace goes on
                    ),
                )
                if change.kind == "raised":
                    raised.append((alert.rule, alert.severity))
        uow.touched.update(touched)
        await store.save_alerts(uow.conn, list(alert_rows.values()))
        await store.record_history(uow.conn, history)
        if uow.replaying:
            return  # the customers' rows are written once, by ``flush``
        await self._save_customers(uow, touched)
        if raised:
            # Counted once committed: a rolled-back batch counts nothing.
            uow.after_commit.append(lambda: count_raised(raised))

    async def flush(self, uow: UnitOfWork) -> None:
        """A replay's customers folded since the last flush: their rows, once each."""
        await self._save_customers(uow, dict(uow.touched))
        uow.touched.clear()

    async def _save_customers(self, uow: UnitOfWork, touched: Mapping[str, int]) -> None:
        rows = []
        for n, (cid, seq) in enumerate(touched.items(), start=1):
            if n % ROW_SLICE == 0:
                await asyncio.sleep(0)
            loaded = uow.states[cid]
            loaded.last_seq = seq
            loaded.stored = loaded.state
            rows.append(store.customer_row(loaded.state, seq))
        await store.save_customers(uow.conn, rows)

    # ---- time-driven events ---------------------------------------------------------------
    async def due_events(self, uow: UnitOfWork) -> list[Envelope]:
        """Reviews passed and not recorded yet, judged on the customers' states under their
        locks (so that no batch folds them between the judgement and the record)."""
        if not domain.rule_enabled(self.policy, domain.REVIEW_OVERDUE):
            return []
        now = uow.now
        grace = self.policy.alerts.review_overdue.grace_days
        due = await store.reviews_due(uow.conn, now.date() - timedelta(days=grace))
        if not due:
            return []
        loaded = await self.repository.load(uow, [row.customer_id for row in due])
        out: list[Envelope] = []
        for row in due:
            entry = loaded[row.customer_id]
            if entry.last_seq == 0:
                continue  # gone meanwhile (a replay truncated the projections)
            env = review_event(entry.state, self.policy, now)
            if env is not None:
                out.append(env)
        return out


def count_raised(raised: list[tuple[str, str]]) -> None:
    for rule, severity in raised:
        metrics.ALERTS_RAISED.labels(rule, severity).inc()


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


__all__ = ["AlertsRepository", "AlertsService", "count_raised", "review_event"]
