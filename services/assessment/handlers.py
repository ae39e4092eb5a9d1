"""Assessment handlers: a batch of events → per-customer folds → rows, history and
``assessment.completed`` events.

States of the customers a batch touches are loaded (and locked) once, folded in memory with
the pure domain, and written back once, so a batch costs a handful of statements whatever
its size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import MetaData, Table
from sqlalchemy.ext.asyncio import AsyncConnection

from services.assessment import domain, store
from services.assessment import events as ev
from shared.events import DeadLetter, Envelope, new_event
from shared.policy import Policy
from shared.projection import as_json
from shared.runtime import Incoming, Tx
from shared.settings import Settings

SOURCE = "/creditwatch/assessment"
CONTRACT_TYPES = frozenset(
    {
        "customer.registered",
        "customer.updated",
        "financial_statement.published",
        "credit_report.received",
        "invoice.issued",
        "invoice.cancelled",
        "credit_note.issued",
        "payment.received",
        "payment.reversed",
        "invoice.overdue",
    }
)
STATES = "assessment.states"
PUBLISHED = "assessment.published"


@dataclass
class _Loaded:
    state: domain.CustomerState
    last_seq: int


class AssessmentService:
    """The assessment service as the event core sees it."""

    name = "assessment"
    metadata: MetaData = store.metadata
    core = store.core
    projection_tables: Sequence[Table] = store.PROJECTIONS
    customers: Table = store.customers  # locked before a batch's events are numbered
    consumed_types = CONTRACT_TYPES

    def __init__(self, settings: Settings, policy: Policy) -> None:
        self.settings = settings
        self.policy = policy

    def input_topics(self) -> list[str]:
        s = self.settings
        return [
            s.topic_customers,
            s.topic_financials,
            s.topic_credit_reports,
            s.topic_invoices,
            s.topic_payments,
            s.topic_overdue,
        ]

    def parse_stored(self, env: Envelope) -> BaseModel | None:
        return ev.parse_any(env)

    # ---- the fold -------------------------------------------------------------------------
    async def handle(self, tx: Tx, events: Sequence[Incoming]) -> None:
        cached: dict[str, _Loaded] = tx.scratch.setdefault(STATES, {})
        # The assessments this transaction published, by customer (the API returns them).
        published: dict[str, dict[str, Any]] = tx.scratch.setdefault(PUBLISHED, {})
        missing = {e.envelope.subject for e in events} - cached.keys()
        if missing:
            rows = await store.lock_customers(tx.conn, missing)
            for cid in missing:
                row = rows.get(cid)
                if row is None:
                    cached[cid] = _Loaded(domain.new_customer(cid, self.policy), 0)
                else:
                    cached[cid] = _Loaded(store.load_state(row.state), row.last_seq)
        touched: dict[str, int] = {}
        history: list[dict[str, Any]] = []
        for inc in events:
            env = inc.envelope
            cid = env.subject
            loaded = cached[cid]
            trigger = domain.Trigger(env.id, env.type, env.source)
            try:
                step = domain.process(
                    loaded.state, env.type, inc.event, trigger, env.time, self.policy
                )
            except DeadLetter as dl:
                tx.reject(inc, dl)
                continue
            loaded.state = step.state
            touched[cid] = inc.seq
            body = step.assessment
            if body is None:
                continue
            out = new_event(
                body.TYPE,
                source=SOURCE,
                subject=cid,
                data=body,
                id=body.assessment_id,
                time=body.assessed_at,
            )
            tx.emit(self.settings.topic_assessments, out)
            published[cid] = out.data
            history.append(
                {
                    "assessment_id": body.assessment_id,
                    "customer_id": cid,
                    "seq": inc.seq,
                    "assessed_at": body.assessed_at,
                    "grade": body.grade,
                    "score": body.score,
                    "body": as_json(out.data),
                }
            )

        saved = []
        for cid, seq in touched.items():
            loaded = cached[cid]
            loaded.last_seq = seq
            saved.append(store.customer_row(loaded.state, seq))
        await store.save_customers(tx.conn, saved)
        await store.record_assessments(tx.conn, history)

    # ---- time-driven events ---------------------------------------------------------------
    async def due_events(self, conn: AsyncConnection, now: datetime) -> list[Envelope]:
        """Overrides whose ``expires_at`` has come. A review falling due changes no state
        (``GET /v1/reviews/due`` reads ``next_review_date``), so it records nothing."""
        out: list[Envelope] = []
        for row in await store.overrides_expiring(conn, now):
            out += due_for(store.load_state(row.state), now)
        return out


def internal_event(
    model: ev.InternalEvent, *, id: str, time: datetime, subject: str, source: str = SOURCE
) -> Envelope:
    return new_event(model.TYPE, source=source, subject=subject, data=model, id=id, time=time)


def due_for(state: domain.CustomerState, now: datetime) -> list[Envelope]:
    """The expiry of the customer's override when it is due at ``now``. The id is stable, so
    recording it twice (two replicas, a retry) has no effect beyond the first; its time is
    the expiry itself, whenever the scheduler gets to it."""
    override = state.override
    if override is None or override.expires_at is None or override.expires_at > now:
        return []
    cid = state.customer_id
    return [
        internal_event(
            ev.OverrideExpired(customer_id=cid, override_id=override.override_id),
            id=f"override-expired-{override.override_id}",
            time=override.expires_at,
            subject=cid,
        )
    ]


__all__ = ["SOURCE", "AssessmentService", "due_for", "internal_event"]
