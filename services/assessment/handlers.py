"""Assessment handlers: a batch of events → per-customer folds → rows, history and
``assessment.completed`` events.

The customers a batch touches are loaded (and locked) once through the repository, folded
in memory with the pure domain, and written back once, so a batch costs a handful of
statements whatever its size. The archived ledger items the batch's events name are read
in one statement before the fold (and any other the ledger asks for on the way). The domain
decides the assessments; this module writes them down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import MetaData, Table
from sqlalchemy.ext.asyncio import AsyncConnection

from services.assessment import domain, store
from services.assessment import events as ev
from shared.events import DeadLetter, Envelope, new_event
from shared.ledger import EVENT_TYPES as LEDGER_TYPES
from shared.ledger import Archived
from shared.policy import Policy
from shared.projection import as_json
from shared.runtime import Incoming
from shared.settings import Settings
from shared.unitofwork import (
    Loaded,
    Repository,
    UnitOfWork,
    fold_with_archive,
    prefetch,
)

SOURCE = "/creditwatch/assessment"
RECENT_STATES = 50_000
# A batch's fold yields to the event loop after this many events: the relay and the
# consumer's fetching share the loop and would otherwise wait for the whole batch.
FOLD_SLICE_EVENTS = 200
CONTRACT_TYPES = LEDGER_TYPES | {
    "customer.registered",
    "customer.updated",
    "financial_statement.published",
    "credit_report.received",
}


@dataclass(eq=False)
class AssessmentLoaded(Loaded[domain.CustomerState]):
    """A customer in a unit of work, with the ``assessment.completed`` data this unit of
    work published for it last (an API command answers with it)."""

    published: dict[str, Any] | None = None

    def committed(self) -> AssessmentLoaded:
        return AssessmentLoaded(self.state, self.last_seq, self.state)


class AssessmentRepository(Repository[AssessmentLoaded]):
    def __init__(self, policy: Policy, capacity: int = RECENT_STATES) -> None:
        super().__init__(store.customers, capacity=capacity)
        self.policy = policy

    def new(self, customer_id: str) -> AssessmentLoaded:
        return AssessmentLoaded(domain.new_customer(customer_id, self.policy))

    async def read(
        self, conn: AsyncConnection, rows: Mapping[str, Any]
    ) -> dict[str, AssessmentLoaded]:
        out: dict[str, AssessmentLoaded] = {}
        days = await store.read_days(conn, rows) if rows else {}
        for cid, row in rows.items():
            state = store.load_state(row.state, days.get(cid))
            out[cid] = AssessmentLoaded(state, row.last_seq, state)
        return out


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
        self.repository = AssessmentRepository(policy)

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
        touched: dict[str, int] = {}
        history: list[dict[str, Any]] = []
        for start in range(0, len(events), FOLD_SLICE_EVENTS):
            for inc in events[start : start + FOLD_SLICE_EVENTS]:
                await self._apply(uow, inc, recall, touched, history)
            await asyncio.sleep(0)
        await store.record_assessments(uow.conn, history)
        await store.archive.flush(uow)
        uow.touched.update(touched)
        if uow.replaying:
            # The customers' rows and month rows are written once per window, by ``flush``:
            # a replay keeps its states across pages instead of reading back what it wrote.
            return
        await self._save(uow, touched)

    async def flush(self, uow: UnitOfWork) -> None:
        """A replay's customers folded since the last flush: their rows, once each."""
        await self._save(uow, uow.touched)
        uow.touched.clear()

    async def _save(self, uow: UnitOfWork, touched: Mapping[str, int]) -> None:
        """The touched customers' rows and the month rows that changed since they were
        last written."""
        rows = []
        months: list[dict[str, Any]] = []
        gone: list[tuple[str, str]] = []
        for cid, seq in touched.items():
            entry: AssessmentLoaded = uow.states[cid]
            rows.append(store.customer_row(entry.state, seq))
            written, emptied = store.month_rows(cid, entry.stored, entry.state)
            months += written
            gone += emptied
            entry.stored = entry.state
            entry.last_seq = seq
        await store.save_customers(uow.conn, rows)
        await store.save_months(uow.conn, months, gone)

    async def _apply(
        self,
        uow: UnitOfWork,
        inc: Incoming,
        recall: dict[str, dict[str, Archived | None]],
        touched: dict[str, int],
        history: list[dict[str, Any]],
    ) -> None:
        env = inc.envelope
        cid = env.subject
        entry: AssessmentLoaded = uow.states[cid]
        prev = entry.state

        def fold(items: Mapping[str, Archived | None]) -> domain.CustomerState:
            event = domain.Event(env.type, inc.event, env.time, items)
            return domain.evolve(prev, event, self.policy)

        try:
            nxt = await fold_with_archive(store.archive, uow, cid, recall, prev, fold)
        except DeadLetter as dl:
            uow.reject(inc, dl)
            return
        trigger = domain.Trigger(env.id, env.type, env.source)
        body = domain.decide_assessment(prev, nxt, env.type, trigger, self.policy)
        touched[cid] = inc.seq
        if body is None:
            entry.state = nxt
            return
        entry.state = domain.remember(nxt, body)
        out = new_event(
            body.TYPE,
            source=SOURCE,
            subject=cid,
            data=body,
            id=body.assessment_id,
            time=body.assessed_at,
            extensions=env.trace,  # the trace of the event that caused it goes on
        )
        uow.emit(self.settings.topic_assessments, out)
        entry.published = out.data
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

    # ---- time-driven events ---------------------------------------------------------------
    async def due_events(self, uow: UnitOfWork) -> list[Envelope]:
        """Overrides whose ``expires_at`` has come, judged on the customers' states under
        their locks. A review falling due changes no state (``GET /v1/reviews/due`` reads
        ``next_review_date``), so it records nothing."""
        ids = await store.overrides_expiring(uow.conn, uow.now)
        if not ids:
            return []
        loaded = await self.repository.load(uow, ids)
        out: list[Envelope] = []
        for _cid, entry in sorted(loaded.items()):
            out += due_for(entry.state, uow.now)
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


__all__ = [
    "SOURCE",
    "AssessmentLoaded",
    "AssessmentRepository",
    "AssessmentService",
    "due_for",
    "internal_event",
]
