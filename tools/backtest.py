"""Back-testing a candidate credit policy: ``creditwatch backtest --policy FILE``.

What would have differed — grades, limits, holds, alerts, credit decisions — had the
candidate policy been in force? Each service's event store is read (read-only, one
snapshot per store) and folded twice, once under the current policy and once under the
candidate, by the service's own handlers into throw-away projections (an in-memory SQLite
database per fold, so the live databases are never written to nor locked). The resulting
projection rows are compared.

The services feed each other, so the folds are chained per policy:

1. **assessment** folds its store; the ``assessment.completed`` events it derives are this
   policy's grades.
2. **limits** folds its store with the stored ``assessment.completed`` events (graded under
   whatever policy was live back then) replaced by the ones derived in step 1, placed by
   business time. Every recorded credit check in the window is judged again
   (``decide_credit_check``) on the state just before it.
3. **alerts** folds its store with the stored ``assessment.completed``, ``exposure.updated``
   and ``limit.changed`` events replaced by those derived in steps 1 and 2; then the reviews
   this policy's cadence makes overdue by the end of the window are detected.

With the current policy the folds reproduce the live projections (grades, limits, open
alerts), so every difference reported is the candidate's doing.

Limitations: decisions are not fed back — a credit check the candidate would have rejected
still reserves (it did reserve in reality), and manual limits, holds and limit requests
stand as recorded. Time-driven events (ledger ageing, expiries) are replayed as the
scheduler recorded them. Limits publishes an exposure after every event here (as with the
smallest consumer batches), so alert counts within the window may exceed what the live
batches produced, for both policies alike. Alert acknowledgements apply only where the
alert has the same id under both folds; open and acknowledged both count as open. The
``alert.*`` events the limits service keeps (for the portfolio's open-alert count) are
replayed as recorded. Every event is held in memory; a fold costs about what a
``creditwatch replay`` of that service costs, twice.

Window: events up to ``--to`` (business time) are folded, later ones ignored; events before
``--from`` are folded too, to build the state, but only what happens in [from, to] is
counted (alerts raised, limit changes, credit checks). End states (grade, limit, hold, open
alerts) are compared as of the end of the window.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError
from sqlalchemy import event, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.pool import StaticPool

from services.alerts import store as alerts_store
from services.assessment import store as assessment_store
from services.limits import domain as limits_domain
from services.limits import events as limits_events
from services.limits import store as limits_store
from shared import eventstore as es
from shared.events import DeadLetter, Envelope
from shared.policy import Policy
from shared.runtime import PROCESSING_ERROR, Incoming, Tx
from shared.settings import Settings, redact_url
from tools import registry

ASSESSED = "assessment.completed"
EXPOSURE = "exposure.updated"
LIMIT_CHANGED = "limit.changed"
ACTIVE = ("open", "acknowledged")
PAGE = 2000
Progress = Callable[[str], None]
log = logging.getLogger("creditwatch.backtest")


class BacktestError(Exception):
    """The back-test cannot run (an event store that cannot be read, a bad window)."""


# ---- the window -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    """Business-time window [start, end]; None: open on that side."""

    start: datetime | None = None
    end: datetime | None = None

    def contains(self, at: datetime | None) -> bool:
        if at is None:
            return False
        return (self.start is None or at >= self.start) and (self.end is None or at <= self.end)

    def as_dict(self) -> dict[str, str | None]:
        return {"from": _iso(self.start), "to": _iso(self.end)}


def parse_bound(value: str, *, end: bool) -> datetime:
    """``YYYY-MM-DD`` (the start of that day, or with ``end`` its last instant, UTC) or an
    RFC 3339 timestamp with an offset."""
    text = value.strip()
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            if end:
                return datetime.combine(day + timedelta(days=1), time(0), tzinfo=UTC) - timedelta(
                    microseconds=1
                )
            return datetime.combine(day, time(0), tzinfo=UTC)
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BacktestError(
            f"not a date (YYYY-MM-DD) or an RFC 3339 timestamp: {value!r}"
        ) from None
    if stamp.tzinfo is None:
        raise BacktestError(f"a timestamp needs a UTC offset: {value!r}")
    return stamp.astimezone(UTC)


def make_window(start: str | None, end: str | None) -> Window:
    window = Window(
        parse_bound(start, end=False) if start else None,
        parse_bound(end, end=True) if end else None,
    )
    if window.start and window.end and window.start > window.end:
        raise BacktestError(f"--from {start} is after --to {end}")
    return window


# ---- reading the stores ------------------------------------------------------------------------

Item = tuple[Envelope, BaseModel]


@dataclass
class Store:
    """One service's stored events (up to the window's end), validated once."""

    name: str
    items: list[Item] = field(default_factory=list)
    subjects: set[str] = field(default_factory=set)
    unreadable: int = 0


def _require_sqlite_file(name: str, url: str) -> None:
    """A missing SQLite file would be created empty by connecting; say so instead."""
    if not url.startswith("sqlite"):
        return
    path = url.split("///", 1)[-1] if "///" in url else ""
    if path and path != ":memory:" and not path.startswith("file:") and not Path(path).exists():
        raise BacktestError(
            f"{name}: no database at {path} (nothing to back-test; run the "
            "services or 'creditwatch db upgrade' first)"
        )


async def read_store(
    settings: Settings, name: str, policy: Policy, until: datetime | None
) -> Store:
    """Every stored event of the service up to ``until``, in store order, from one
    read-only snapshot (REPEATABLE READ on PostgreSQL)."""
    url = settings.database_url_for(name)
    _require_sqlite_file(name, url)
    core, engine = registry.core_for(name, settings, policy)
    out = Store(name)
    try:
        async with engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                await conn.execution_options(isolation_level="REPEATABLE READ")
            async with conn.begin():
                if conn.dialect.name == "postgresql":
                    await conn.exec_driver_sql("SET TRANSACTION READ ONLY")
                async for page in es.read_events(conn, core.service.core, until=until):
                    for stored in page:
                        env = stored.envelope
                        try:
                            model = core.service.parse_stored(env)
                        except (DeadLetter, ValidationError):
                            out.unreadable += 1
                            continue
                        if model is not None:
                            out.items.append((env, model))
                            out.subjects.add(env.subject)
    except SQLAlchemyError as exc:
        raise BacktestError(
            f"{name}: cannot read the event store at "
            f"{redact_url(url)}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    finally:
        await engine.dispose()
    return out


# ---- folding into throw-away projections -------------------------------------------------------


@asynccontextmanager
async def scratch(service: Any) -> AsyncIterator[AsyncConnection]:
    """An empty in-memory database with the service's tables; gone when the block ends."""
    engine = create_async_engine("sqlite+aiosqlite://", poolclass=StaticPool)

    # The driver's own transaction handling gets in the way of savepoints; take it over.
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(sync_conn: Any) -> None:
        sync_conn.exec_driver_sql("BEGIN")

    try:
        async with engine.connect() as conn:
            await conn.run_sync(service.metadata.create_all)
            yield conn
    finally:
        await engine.dispose()


@dataclass
class Judgement:
    check_id: str
    order_id: str
    customer_id: str
    at: datetime
    amount: str
    currency: str
    recorded: str
    decision: str
    reasons: list[str]


@dataclass
class Fold:
    outputs: list[Envelope] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)
    judgements: dict[str, Judgement] = field(default_factory=dict)


class Judge(Protocol):
    """Judges recorded credit checks again, on the projections just before each."""

    def wants(self, env: Envelope) -> bool: ...

    async def judge(
        self, conn: AsyncConnection, env: Envelope, model: BaseModel
    ) -> Judgement | None: ...


async def fold(
    conn: AsyncConnection,
    service: Any,
    stream: Iterable[Item],
    *,
    now: datetime,
    collect: bool,
    one_per_customer: bool = False,
    judge: Judge | None = None,
    first_seq: int = 1,
) -> Fold:
    """Fold ``stream`` with the service's handler, as a replay does, into ``conn``.

    ``collect`` keeps the events the service derives (a replay drops them).
    ``one_per_customer`` hands the handler pages holding at most one event per customer, so
    a service that publishes per batch (limits: ``exposure.updated``) publishes after every
    event, as with the smallest consumer batches. ``judge`` is called for each credit check
    with the projections as they stand just before it.
    """
    result = Fold()
    page: list[Incoming] = []
    subjects: set[str] = set()
    # The handlers keep the states they loaded in the transaction's scratch space; the fold
    # is the only writer, so one scratch space for all its pages spares reloading them.
    cache: dict[str, Any] = {}

    async def handle(events: list[Incoming]) -> None:
        tx = Tx(conn, now, replaying=not collect, states=cache)
        async with conn.begin_nested():
            await service.handle(tx, events)
            flush = getattr(service, "flush", None)
            if tx.replaying and flush is not None:
                await flush(tx)  # its rows now: the judging reads them
        result.outputs += [env for _, env in tx.outbox]
        for _, dl in tx.rejected:
            result.rejected[dl.reason] += 1

    async def flush() -> None:
        if not page:
            return
        try:
            await handle(page)
        except Exception:
            # As the event core does: the page again event by event, setting aside only the
            # event the service cannot process (its states are reloaded after the rollback).
            cache.clear()
            for inc in page:
                try:
                    await handle([inc])
                except Exception as exc:
                    cache.clear()
                    result.rejected[PROCESSING_ERROR] += 1
                    log.warning(
                        "backtest: %s could not process %s %s: %s",
                        service.name,
                        inc.envelope.type,
                        inc.envelope.id,
                        exc,
                    )
        page.clear()
        subjects.clear()

    for seq, (env, model) in enumerate(stream, start=first_seq):
        if len(page) >= PAGE or (one_per_customer and env.subject in subjects):
            await flush()
        if judge is not None and judge.wants(env):
            await flush()
            judged = await judge.judge(conn, env, model)
            if judged is not None:
                result.judgements[judged.check_id] = judged
        page.append(Incoming(seq, env, model))
        subjects.add(env.subject)
    await flush()
    return result


def merge(
    stored: Iterable[Item], drop: Callable[[Envelope], bool], derived: Sequence[Item]
) -> Iterator[Item]:
    """The stored events without those ``drop`` selects, with ``derived`` slotted in by
    business time: each derived event goes before the first kept stored event that is
    strictly later (so it follows the events of its own instant, which caused it)."""
    queue = sorted(derived, key=lambda item: item[0].time)  # stable: keeps derivation order
    i = 0
    for env, model in stored:
        if drop(env):
            continue
        while i < len(queue) and queue[i][0].time < env.time:
            yield queue[i]
            i += 1
        yield env, model
    yield from queue[i:]


def _reparse(service: Any, envelopes: Iterable[Envelope], counter: Counter[str]) -> list[Item]:
    out: list[Item] = []
    for env in envelopes:
        try:
            model = service.parse_stored(env)
        except (DeadLetter, ValidationError):
            counter["derived_event_invalid"] += 1
            continue
        if model is not None:
            out.append((env, model))
    return out


@dataclass(frozen=True, slots=True)
class CheckJudge:
    """Judges the credit checks recorded in the window again under ``policy``, with the
    limits projections as they stand just before each check (the API's own inputs)."""

    policy: Policy
    window: Window

    def wants(self, env: Envelope) -> bool:
        return env.type == limits_events.CreditCheckDecided.TYPE and self.window.contains(env.time)

    async def judge(
        self, conn: AsyncConnection, env: Envelope, model: BaseModel
    ) -> Judgement | None:
        if not isinstance(model, limits_events.CreditCheckDecided):
            return None
        policy = self.policy
        cid = env.subject
        c = limits_store.customers
        row = (await conn.execute(select(c).where(c.c.customer_id == cid))).first()
        state = (
            (await limits_store.load_states(conn, {cid: row}))[cid]
            if row is not None
            else limits_domain.new_customer(cid, policy)
        )
        parent = row.parent_id if row is not None else None
        root = parent or cid
        others, members = await limits_store.group_exposure(conn, root, cid)
        group = None
        if parent is not None or members:
            root_row = (
                row
                if root == cid
                else (await conn.execute(select(c).where(c.c.customer_id == root))).first()
            )
            limit = Decimal(0)
            if root_row is not None:
                root_state = limits_store.load_state(root_row.state, root_row.as_of)
                limit = limits_domain.limit_in(
                    limits_domain.effective_limit(root_state, policy, env.time)[0],
                    root_state.currency,
                    state.currency,
                    policy,
                )
            # In the customer's currency, as the limits service judges it.
            group = limits_domain.GroupView(
                root, limit, limits_domain.in_currency(others, state.currency, policy)
            )
        outcome = limits_domain.decide_credit_check(
            state,
            order_id=model.order_id,
            amount=model.amount,
            currency=model.currency,
            reserve=model.reserve,
            policy=policy,
            now=env.time,
            group=group,
        )
        return Judgement(
            model.check_id,
            model.order_id,
            cid,
            env.time,
            format(model.amount, "f"),
            model.currency,
            model.decision,
            outcome.decision,
            list(outcome.reasons),
        )


# ---- one policy, all three services -------------------------------------------------------------


@dataclass
class Snapshot:
    """What one policy yields: the projection rows compared, per customer."""

    assessment: dict[str, dict[str, Any]] = field(default_factory=dict)
    limits: dict[str, dict[str, Any]] = field(default_factory=dict)
    limit_changes: Counter[str] = field(default_factory=Counter)  # in the window
    open_alerts: dict[str, dict[str, str]] = field(default_factory=dict)  # cid → rule → sev
    raised: dict[str, Counter[str]] = field(default_factory=dict)  # in the window
    judgements: dict[str, Judgement] = field(default_factory=dict)
    rejected: dict[str, Counter[str]] = field(default_factory=dict)


async def simulate(
    settings: Settings,
    policy: Policy,
    stores: dict[str, Store],
    window: Window,
    progress: Progress | None = None,
) -> Snapshot:
    """Chain the three folds under ``policy``; see the module docstring."""
    say = progress or (lambda _m: None)
    now = window.end or datetime.now(UTC)
    snap = Snapshot()

    say(
        f"assessment: folding {len(stores['assessment'].items)} events "
        f"under policy {policy.version}"
    )
    a_svc = registry.service_for("assessment", settings, policy)
    async with scratch(a_svc) as conn:
        a_fold = await fold(conn, a_svc, stores["assessment"].items, now=now, collect=True)
        c = assessment_store.customers.c
        for ar in await conn.execute(
            select(
                c.customer_id, c.name, c.currency, c.grade, c.computed_grade, c.score, c.risk_level
            )
        ):
            snap.assessment[ar.customer_id] = dict(ar._mapping)
    snap.rejected["assessment"] = a_fold.rejected
    graded = [env for env in a_fold.outputs if env.type == ASSESSED]
    regraded = stores["assessment"].subjects

    say(f"limits: folding {len(stores['limits'].items)} events under policy {policy.version}")
    l_svc = registry.service_for("limits", settings, policy)
    l_derived = _reparse(l_svc, graded, a_fold.rejected)
    l_stream = merge(
        stores["limits"].items,
        lambda env: env.type == ASSESSED and env.subject in regraded,
        l_derived,
    )
    async with scratch(l_svc) as conn:
        l_fold = await fold(
            conn,
            l_svc,
            l_stream,
            now=now,
            collect=True,
            one_per_customer=True,
            judge=CheckJudge(policy, window),
        )
        c = limits_store.customers.c
        for lr in await conn.execute(
            select(
                c.customer_id,
                c.name,
                c.currency,
                c.grade,
                c.limit_amount,
                c.limit_source,
                c.on_hold,
                c.exposure,
                c.available,
                c.over_limit,
                c.overdue_amount,
            )
        ):
            snap.limits[lr.customer_id] = dict(lr._mapping)
        h = limits_store.limit_history.c
        for hr in await conn.execute(select(h.customer_id, h.effective_at)):
            if window.contains(hr.effective_at):
                snap.limit_changes[hr.customer_id] += 1
    snap.rejected["limits"] = l_fold.rejected
    snap.judgements = l_fold.judgements
    figures = [env for env in l_fold.outputs if env.type in (EXPOSURE, LIMIT_CHANGED)]
    refigured = stores["limits"].subjects

    say(f"alerts: folding {len(stores['alerts'].items)} events under policy {policy.version}")
    al_svc = registry.service_for("alerts", settings, policy)
    al_derived = _reparse(al_svc, [*graded, *figures], l_fold.rejected)

    def replaced(env: Envelope) -> bool:
        if env.type == ASSESSED:
            return env.subject in regraded
        return env.type in (EXPOSURE, LIMIT_CHANGED) and env.subject in refigured

    al_stream = list(merge(stores["alerts"].items, replaced, al_derived))
    async with scratch(al_svc) as conn:
        al_fold = await fold(conn, al_svc, al_stream, now=now, collect=False)
        # Reviews this policy's cadence makes overdue by the end of the window (recorded
        # detections are kept, but they only count where the review date is the same).
        seq = len(al_stream) + 1
        for _ in range(100):
            due = _reparse(al_svc, await al_svc.due_events(Tx(conn, now)), al_fold.rejected)
            if not due:
                break
            more = await fold(conn, al_svc, due, now=now, collect=False, first_seq=seq)
            al_fold.rejected.update(more.rejected)
            seq += len(due)
        a = alerts_store.alerts.c
        for r in await conn.execute(
            select(a.customer_id, a.rule, a.severity, a.status, a.raised_at)
        ):
            if r.status in ACTIVE:
                snap.open_alerts.setdefault(r.customer_id, {})[r.rule] = r.severity
            if window.contains(r.raised_at):
                snap.raised.setdefault(r.customer_id, Counter())[r.rule] += 1
    snap.rejected["alerts"] = al_fold.rejected
    return snap


async def run_backtest(
    settings: Settings,
    current: Policy,
    candidate: Policy,
    *,
    window: Window = Window(),
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Read the three stores once, fold them under both policies, return the report."""
    stores = {}
    for name in registry.SERVICES:
        stores[name] = await read_store(settings, name, current, window.end)
    before = await simulate(settings, current, stores, window, progress)
    after = await simulate(settings, candidate, stores, window, progress)
    return compare(
        before, after, current=current, candidate=candidate, window=window, stores=stores
    )


# ---- comparing -------------------------------------------------------------------------------


def _iso(at: datetime | None) -> str | None:
    return at.isoformat().replace("+00:00", "Z") if at is not None else None


def _money(value: Decimal | None) -> str | None:
    return format(value, "f") if value is not None else None


def _direction(old: str | None, new: str | None, policies: Sequence[Policy]) -> int:
    """+1 upgrade, -1 downgrade, 0 unknown or same (by the first policy knowing both)."""
    if old is None or new is None or old == new:
        return 0
    for policy in policies:
        try:
            notches = policy.notches_between(old, new)
        except ValueError:
            continue
        return -1 if notches > 0 else 1
    return 0


def _pair(a: Any, b: Any) -> dict[str, Any]:
    return {"current": a, "candidate": b}


def compare(
    before: Snapshot,
    after: Snapshot,
    *,
    current: Policy,
    candidate: Policy,
    window: Window,
    stores: dict[str, Store],
) -> dict[str, Any]:
    """The report: per-customer differences and summary counts (JSON-ready)."""
    order = (candidate, current)
    ids = sorted(
        set(before.assessment)
        | set(after.assessment)
        | set(before.limits)
        | set(after.limits)
        | set(before.open_alerts)
        | set(after.open_alerts)
        | set(before.raised)
        | set(after.raised)
    )
    customers: list[dict[str, Any]] = []
    grades = Counter[str]()
    limits = Counter[str]()
    totals: dict[str, list[Decimal]] = {}
    for cid in ids:
        entry: dict[str, Any] = {"customer_id": cid}
        a0, a1 = before.assessment.get(cid, {}), after.assessment.get(cid, {})
        l0, l1 = before.limits.get(cid, {}), after.limits.get(cid, {})
        entry["name"] = a1.get("name") or l1.get("name")
        diffs = 0
        if a0.get("grade") != a1.get("grade"):
            direction = _direction(a0.get("grade"), a1.get("grade"), order)
            entry["grade"] = _pair(a0.get("grade"), a1.get("grade")) | {
                "move": {1: "upgrade", -1: "downgrade"}.get(direction, "change")
            }
            grades["changed"] += 1
            grades[{1: "upgraded", -1: "downgraded"}.get(direction, "other")] += 1
            diffs += 1
        if a0.get("score") != a1.get("score"):
            entry["score"] = _pair(a0.get("score"), a1.get("score"))
            diffs += 1
        if a0.get("risk_level") != a1.get("risk_level"):
            entry["risk_level"] = _pair(a0.get("risk_level"), a1.get("risk_level"))
        ccy = l1.get("currency") or l0.get("currency")
        for snapshot_row, slot in ((l0, 0), (l1, 1)):
            if snapshot_row:
                totals.setdefault(snapshot_row["currency"], [Decimal(0), Decimal(0)])[slot] += (
                    snapshot_row["limit_amount"]
                )
        if l0.get("limit_amount") != l1.get("limit_amount") or l0.get("limit_source") != l1.get(
            "limit_source"
        ):
            old, new = l0.get("limit_amount"), l1.get("limit_amount")
            entry["limit"] = _pair(_money(old), _money(new)) | {
                "currency": ccy,
                "source": _pair(l0.get("limit_source"), l1.get("limit_source")),
                "available": _pair(_money(l0.get("available")), _money(l1.get("available"))),
            }
            limits["changed"] += 1
            if old is not None and new is not None and old != new:
                limits["raised" if new > old else "lowered"] += 1
            diffs += 1
        if bool(l0.get("over_limit")) != bool(l1.get("over_limit")):
            entry["over_limit"] = _pair(bool(l0.get("over_limit")), bool(l1.get("over_limit")))
            diffs += 1
        if bool(l0.get("on_hold")) != bool(l1.get("on_hold")):
            entry["on_hold"] = _pair(bool(l0.get("on_hold")), bool(l1.get("on_hold")))
            diffs += 1
        open0, open1 = before.open_alerts.get(cid, {}), after.open_alerts.get(cid, {})
        alerts: dict[str, list[dict[str, str]]] = {}
        for rule in sorted(open0.keys() | open1.keys()):
            s0, s1 = open0.get(rule), open1.get(rule)
            if s0 == s1:
                continue
            if s0 is None:
                alerts.setdefault("would_open", []).append({"rule": rule, "severity": s1 or ""})
            elif s1 is None:
                alerts.setdefault("would_not_open", []).append({"rule": rule, "severity": s0})
            else:
                alerts.setdefault("severity_changed", []).append(
                    {"rule": rule, "current": s0, "candidate": s1}
                )
        if alerts:
            entry["open_alerts"] = alerts
            diffs += 1
        r0, r1 = before.raised.get(cid, Counter()), after.raised.get(cid, Counter())
        raised = {
            rule: _pair(r0[rule], r1[rule])
            for rule in sorted(r0.keys() | r1.keys())
            if r0[rule] != r1[rule]
        }
        if raised:
            entry["alerts_raised_in_window"] = raised
            diffs += 1
        if before.limit_changes[cid] != after.limit_changes[cid]:
            entry["limit_changes_in_window"] = _pair(
                before.limit_changes[cid], after.limit_changes[cid]
            )
            diffs += 1
        checks = []
        for check_id, j0 in before.judgements.items():
            j1 = after.judgements.get(check_id)
            if j0.customer_id != cid or j1 is None:
                continue
            if (j0.decision, j0.reasons) != (j1.decision, j1.reasons):
                checks.append(
                    {
                        "check_id": check_id,
                        "order_id": j0.order_id,
                        "at": _iso(j0.at),
                        "amount": j0.amount,
                        "currency": j0.currency,
                        "recorded": j0.recorded,
                        "decision": _pair(j0.decision, j1.decision),
                        "reasons": _pair(j0.reasons, j1.reasons),
                    }
                )
        if checks:
            entry["credit_checks"] = sorted(checks, key=lambda c: (c["at"], c["check_id"]))
            diffs += 1
        if diffs:
            customers.append(entry)

    def per_rule(rows: dict[str, dict[str, str]]) -> dict[str, int]:
        return dict(sorted(Counter(rule for d in rows.values() for rule in d).items()))

    def raised_per_rule(rows: dict[str, Counter[str]]) -> dict[str, int]:
        total: Counter[str] = Counter()
        for counts in rows.values():
            total.update(counts)
        return dict(sorted(total.items()))

    def distribution(rows: dict[str, dict[str, Any]]) -> dict[str, int]:
        return dict(sorted(Counter(str(r.get("grade")) for r in rows.values()).items()))

    j_changed = sum(
        1
        for k, j in before.judgements.items()
        if k in after.judgements
        and (j.decision, j.reasons) != (after.judgements[k].decision, after.judgements[k].reasons)
    )
    summary: dict[str, Any] = {
        "customers": len(ids),
        "customers_with_differences": len(customers),
        "grades": {
            "changed": grades["changed"],
            "upgraded": grades["upgraded"],
            "downgraded": grades["downgraded"],
            "distribution": _pair(distribution(before.assessment), distribution(after.assessment)),
        },
        "limits": {
            "changed": limits["changed"],
            "raised": limits["raised"],
            "lowered": limits["lowered"],
            "total": {ccy: _pair(_money(v[0]), _money(v[1])) for ccy, v in sorted(totals.items())},
        },
        "over_limit": _pair(
            sum(1 for r in before.limits.values() if r["over_limit"]),
            sum(1 for r in after.limits.values() if r["over_limit"]),
        ),
        "on_hold": _pair(
            sum(1 for r in before.limits.values() if r["on_hold"]),
            sum(1 for r in after.limits.values() if r["on_hold"]),
        ),
        "open_alerts": _pair(per_rule(before.open_alerts), per_rule(after.open_alerts)),
        "alerts_raised_in_window": _pair(
            raised_per_rule(before.raised), raised_per_rule(after.raised)
        ),
        "credit_checks_in_window": {
            "judged": len(before.judgements),
            "decided_differently": j_changed,
            "recorded": dict(
                sorted(Counter(j.recorded for j in before.judgements.values()).items())
            ),
            "decisions": _pair(
                dict(sorted(Counter(j.decision for j in before.judgements.values()).items())),
                dict(sorted(Counter(j.decision for j in after.judgements.values()).items())),
            ),
        },
        "set_aside": _pair(
            {k: dict(v) for k, v in before.rejected.items() if v},
            {k: dict(v) for k, v in after.rejected.items() if v},
        ),
    }
    return {
        "policies": _pair(
            {"version": current.version, "digest": current.digest},
            {"version": candidate.version, "digest": candidate.digest},
        ),
        "window": window.as_dict(),
        "events": {name: len(s.items) for name, s in stores.items()},
        "unreadable_events": {name: s.unreadable for name, s in stores.items() if s.unreadable},
        "summary": summary,
        "customers": customers,
    }


# ---- text rendering ------------------------------------------------------------------------------


def _arrow(pair: dict[str, Any]) -> str:
    return f"{pair['current']} → {pair['candidate']}"


def _counts(pair: dict[str, dict[str, int]]) -> str:
    keys = sorted(pair["current"].keys() | pair["candidate"].keys())
    if not keys:
        return "none"
    return ", ".join(
        f"{k} {pair['current'].get(k, 0)} → {pair['candidate'].get(k, 0)}" for k in keys
    )


def render_text(report: dict[str, Any], *, limit: int | None = None) -> str:
    """The report for people: a summary, then one block per customer that differs."""
    p, s = report["policies"], report["summary"]
    w = report["window"]
    lines = [
        f"backtest: candidate policy {p['candidate']['version']} "
        f"({p['candidate']['digest'][:12]}) against current {p['current']['version']} "
        f"({p['current']['digest'][:12]})",
        f"window: {w['from'] or 'first event'} .. {w['to'] or 'last event'}",
        "events: " + ", ".join(f"{k} {v}" for k, v in report["events"].items()),
        "",
        f"customers: {s['customers']}, {s['customers_with_differences']} with differences",
        f"grades: {s['grades']['changed']} changed ({s['grades']['upgraded']} up, "
        f"{s['grades']['downgraded']} down); "
        f"distribution {_counts(s['grades']['distribution'])}",
        f"limits: {s['limits']['changed']} changed ({s['limits']['raised']} raised, "
        f"{s['limits']['lowered']} lowered); totals "
        + (", ".join(f"{ccy} {_arrow(v)}" for ccy, v in s["limits"]["total"].items()) or "none"),
        f"over limit: {_arrow(s['over_limit'])}; on hold: {_arrow(s['on_hold'])}",
        f"open alerts: {_counts(s['open_alerts'])}",
        f"alerts raised in window: {_counts(s['alerts_raised_in_window'])}",
    ]
    cc = s["credit_checks_in_window"]
    lines.append(
        f"credit checks in window: {cc['judged']} judged again, "
        f"{cc['decided_differently']} decided differently "
        f"({_counts(cc['decisions'])})"
    )
    if s["set_aside"]["current"] or s["set_aside"]["candidate"]:
        lines.append(f"events set aside (dead letters): {json.dumps(s['set_aside'])}")
    if report["unreadable_events"]:
        lines.append(f"unreadable stored events skipped: {report['unreadable_events']}")
    shown = report["customers"] if limit is None else report["customers"][:limit]
    if shown:
        lines += ["", "differences by customer (current → candidate):"]
    for c in shown:
        parts = []
        if "grade" in c:
            parts.append(f"grade {_arrow(c['grade'])}")
        if "score" in c:
            parts.append(f"score {_arrow(c['score'])}")
        if "limit" in c:
            parts.append(f"limit {_arrow(c['limit'])} {c['limit']['currency']}")
        if "over_limit" in c:
            parts.append(f"over limit {_arrow(c['over_limit'])}")
        if "on_hold" in c:
            parts.append(f"on hold {_arrow(c['on_hold'])}")
        name = f" ({c['name']})" if c.get("name") else ""
        lines.append(f"  {c['customer_id']}{name}: " + ("; ".join(parts) or "same end state"))
        alerts = c.get("open_alerts", {})
        for a in alerts.get("would_open", []):
            lines.append(f"      would be open: {a['rule']} ({a['severity']})")
        for a in alerts.get("would_not_open", []):
            lines.append(f"      would not be open: {a['rule']} ({a['severity']})")
        for a in alerts.get("severity_changed", []):
            lines.append(f"      {a['rule']}: severity {a['current']} → {a['candidate']}")
        for rule, pair in c.get("alerts_raised_in_window", {}).items():
            lines.append(f"      {rule} alerts raised in window: {_arrow(pair)}")
        if "limit_changes_in_window" in c:
            lines.append(f"      limit changes in window: {_arrow(c['limit_changes_in_window'])}")
        for chk in c.get("credit_checks", []):
            lines.append(
                f"      credit check {chk['at']} order {chk['order_id']} {chk['amount']} "
                f"{chk['currency']}: {_arrow(chk['decision'])} "
                f"({', '.join(chk['reasons']['candidate'])})"
            )
    if limit is not None and len(report["customers"]) > limit:
        lines.append(f"  … {len(report['customers']) - limit} more (--format json lists all)")
    return "\n".join(lines)


__all__ = [
    "BacktestError",
    "Snapshot",
    "Store",
    "Window",
    "compare",
    "fold",
    "make_window",
    "merge",
    "parse_bound",
    "read_store",
    "render_text",
    "run_backtest",
    "simulate",
]
