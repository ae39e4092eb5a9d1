"""Limits HTTP API: credit checks for order entry, exposure, limits, holds and the portfolio."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)
from sqlalchemy import ColumnElement, Numeric, and_, case, func, literal, null, or_, select

from services.limits import domain, store
from services.limits import events as ev
from services.limits import responses as out
from services.limits.checks import CheckOrder, CreditChecks, Verdict, for_dialect, lock_customer
from services.limits.handlers import SOURCE, LimitsLoaded, LimitsService, exposure_body, money
from shared import eventstore as es
from shared import metrics, openapi
from shared.auth import Principal, require
from shared.body import Timestamp, UtcTimestamp, amount_schema, body_schema, json_body
from shared.events import new_event
from shared.http import (
    MAX_ORDER_ID_CHARS,
    CursorParam,
    OrderIdPath,
    PageLimit,
    PathText,
    Printable,
    check_grade,
    grade_query,
)
from shared.money import (
    MAX_MINOR_UNITS,
    AmountError,
    convert,
    is_currency,
    is_iso_code,
    parse_amount,
    parse_decimal,
    rate_between,
)
from shared.openapi import BODY_TEXT, CURRENCY_SCHEMA, TEXT_PATTERN
from shared.pagination import decode_cursor, encode_cursor, integer, text
from shared.problems import Conflict, Forbidden, NotFound, ValidationFailed
from shared.runtime import EventCore
from shared.unitofwork import UnitOfWork

log = logging.getLogger("creditwatch.limits")
_TEXT = BODY_TEXT
_ID: dict[str, Any] = {"pattern": TEXT_PATTERN}


def _iso(t: datetime | None) -> str | None:
    return t.isoformat().replace("+00:00", "Z") if t is not None else None


def _position(value: Any) -> int:
    position = integer(value)
    if position < 0:
        raise ValueError(value)
    return position


def _amount_key(value: Any) -> Decimal | None:
    """A portfolio cursor's amount: exact text, finite, or null (the customer had none)."""
    if value is None:
        return None
    amount = Decimal(text(value))
    if not amount.is_finite():
        raise ValueError(value)
    return amount


def _ppm_key(value: Any) -> int | None:
    return None if value is None else int(text(value))


# How a portfolio cursor's sort value reads back, by sort key (customer_id: text).
_SORT_VALUE: dict[str, Callable[[Any], Any]] = {
    "utilization": _ppm_key,
    "exposure": _amount_key,
    "available": _amount_key,
    "limit": _amount_key,
    "overdue_amount": _amount_key,
}


def _currency(value: object) -> str:
    # Any active ISO 4217 code is a currency an order may be in; one the policy cannot
    # rate (XAU, or one without a rate) is a decision (currency_mismatch), not a 422.
    if not is_iso_code(value):
        raise ValueError(f"unknown ISO 4217 currency code {str(value)[:20]!r}")
    return str(value)


class CheckRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    # Ids, as in the paths that name them again (DELETE /v1/credit-checks/{order_id}): no
    # control characters.
    order_id: Annotated[
        str,
        Field(min_length=1, max_length=MAX_ORDER_ID_CHARS, json_schema_extra=_ID),
        Printable,
    ]
    customer_id: Annotated[
        str, Field(min_length=1, max_length=255, json_schema_extra=_ID), Printable
    ]
    currency: Annotated[str, WithJsonSchema(CURRENCY_SCHEMA)]
    amount: Annotated[Decimal, WithJsonSchema(amount_schema("The order's amount"))]
    # A JSON true or false only: "no" or 0 read as false would silently reserve nothing.
    reserve: StrictBool = Field(
        default=True,
        description="Reserve the amount for the order when approved (false: a quote)",
    )

    @field_validator("currency", mode="before")
    @classmethod
    def _ccy(cls, value: object) -> str:
        return _currency(value)

    @field_validator("amount", mode="before")
    @classmethod
    def _amount(cls, value: object, info: ValidationInfo) -> Decimal:
        ccy = info.data.get("currency")
        try:
            if ccy is None or not is_currency(ccy):
                # The currency is wrong and reported on its own, or has no minor units to
                # judge the number by (XAU): judge the number alone.
                return parse_decimal(value, field="amount", places=MAX_MINOR_UNITS)
            return parse_amount(value, ccy, field="amount")
        except AmountError as exc:
            raise ValueError(exc.detail) from None


class LimitRequestBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    requested_limit: Annotated[
        Decimal,
        WithJsonSchema(
            amount_schema(
                "The limit asked for, in the customer's credit currency (its minor units)",
                zero=True,
            )
        ),
    ]
    reason: str = Field(min_length=1, max_length=1000, json_schema_extra=_TEXT)
    expires_at: Timestamp | None = Field(
        default=None,
        description="A temporary limit's end: in the future, within the policy's "
        "temporary_limit_max_days; absent: a standing limit",
    )

    @field_validator("requested_limit", mode="before")
    @classmethod
    def _limit(cls, value: object) -> Decimal:
        try:
            # Scale is checked against the customer's currency once it is known.
            return parse_decimal(
                value, field="requested_limit", places=MAX_MINOR_UNITS, allow_zero=True
            )
        except AmountError as exc:
            raise ValueError(exc.detail) from None


class DecisionNote(BaseModel):
    model_config = ConfigDict(extra="ignore")
    note: str | None = Field(default=None, max_length=1000, json_schema_extra=_TEXT)


class HoldBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    reason: str = Field(min_length=1, max_length=1000, json_schema_extra=_TEXT)


CHECKS = openapi.tag("credit checks", "Order entry: may this order go out on credit?")
EXPOSURE = openapi.tag("exposure and limits", "A customer's exposure, limit and its history")
REQUESTS = openapi.tag(
    "limit requests", "Maker–checker: a limit asked for by one principal, decided by another"
)
HOLDS = openapi.tag("holds", "A hold rejects every new credit check of the customer")
PORTFOLIO = openapi.tag("portfolio", "Every customer with its figures, filtered and sorted")
_UNKNOWN_CUSTOMER = "The customer is not known to the limits service"


def answered(verdict: Verdict, order: CheckOrder, started: float) -> None:
    """Metrics and the log line of an answered credit check."""
    metrics.CREDIT_CHECKS.labels(verdict.decision).inc()
    metrics.CREDIT_CHECK_SECONDS.observe(time.perf_counter() - started)
    if verdict.fresh:
        # Refusals are worth an operator's eye; approvals are the routine (stored either way).
        log.log(
            logging.DEBUG if verdict.decision == "approved" else logging.INFO,
            "credit check %s for order %s: %s %s",
            verdict.check_id,
            order.order_id,
            verdict.decision,
            ",".join(verdict.body["reasons"]),
            extra={
                "service": "limits",
                "check_id": verdict.check_id,
                "customer_id": order.customer_id,
                "event_id": verdict.event_id,
            },
        )


PortfolioStatus = Literal["over_limit", "on_hold", "overdue"]
PortfolioSort = Literal[
    "utilization",
    "-utilization",
    "exposure",
    "-exposure",
    "available",
    "-available",
    "limit",
    "-limit",
    "overdue_amount",
    "-overdue_amount",
    "customer_id",
    "-customer_id",
]
_DECISION_ERRORS = {
    403: "The requester may not decide its own request, or the token lacks credit:approve",
    404: "No such limit request",
    409: "The request is decided already, or (approving) its temporary limit has ended",
}


def build_router(
    service: LimitsService, core: EventCore, checks: CreditChecks | None = None
) -> APIRouter:
    router = APIRouter(prefix="/v1")
    engine = core.engine
    policy = service.policy
    grade_filter = grade_query(policy)
    clock = core.clock

    async def _customer_row(conn: Any, cid: str) -> Any:
        row = (
            await conn.execute(select(store.customers).where(store.customers.c.customer_id == cid))
        ).first()
        if row is None or not row.known:
            raise NotFound(
                f"customer {cid!r} is not known to the limits service", field="customer_id"
            )
        return row

    if checks is None:
        checks = for_dialect(engine.dialect.name, service, core)
    _locked = functools.partial(lock_customer, service)

    async def _locked_known(uow: UnitOfWork, cid: str) -> dict[str, LimitsLoaded]:
        """Lock a customer the service knows (404 otherwise), in one read."""
        loaded, _ = await _locked(uow, cid)
        # Nothing stored (a state made up for the unknown), or only checks and alerts.
        if loaded[cid].last_seq == 0 or not domain.known(loaded[cid].state):
            raise NotFound(
                f"customer {cid!r} is not known to the limits service", field="customer_id"
            )
        return loaded

    # ---- credit checks --------------------------------------------------------------------
    @router.post(
        "/credit-checks",
        tags=[CHECKS],
        openapi_extra=body_schema(CheckRequest),
        summary="May this order go out on credit?",
        description="Decides the order against the customer's available credit (and its "
        "group's), every applicable reason listed; approved with reserve, the amount is "
        "reserved for the order until invoiced, released or expired. The same order_id and "
        "amount again get the same decision (nothing reserved twice); another amount is an "
        "amendment. An unknown customer or one without a limit is rejected "
        "(no_credit_limit), not a 404.",
        **openapi.ok(
            out.CreditCheck,
            "The decision",
            errors={409: "The order id was checked for another customer"},
        ),
    )
    async def credit_check(
        request: Request, principal: Principal = Depends(require("credit:check"))
    ) -> dict[str, Any]:
        # The plain cases rarely get here: FastCreditCheck answers them in front of the app.
        started = time.perf_counter()
        req = await json_body(request, CheckRequest)
        order = CheckOrder(
            order_id=req.order_id,
            customer_id=req.customer_id,
            amount=req.amount,
            currency=req.currency,
            reserve=req.reserve,
            requested_by=principal.name,
        )
        verdict = await checks.check(order)
        answered(verdict, order, started)
        return verdict.body

    @router.delete(
        "/credit-checks/{order_id}",
        tags=[CHECKS],
        summary="Release the order's reservation (order cancelled)",
        description="What the order still holds reserved is freed at once.",
        **openapi.ok(
            None,
            "Released",
            status=204,
            errors={404: "No open reservation for the order"},
        ),
    )
    async def release(
        order_id: OrderIdPath, principal: Principal = Depends(require("credit:check"))
    ) -> Response:
        async with core.transaction() as uow:
            now = uow.now
            prior = await store.latest_check(uow.conn, order_id)
            if prior is None:
                raise NotFound(f"no reservation for order {order_id!r}", field="order_id")
            loaded, _ = await _locked(uow, prior.customer_id)
            state = loaded[prior.customer_id].state
            res = state.reservations.get(order_id)
            if res is None or domain.reserved_for(state, order_id, now) <= 0:
                raise NotFound(f"no open reservation for order {order_id!r}", field="order_id")
            env = new_event(
                ev.ReservationReleased.TYPE,
                source=SOURCE + "/api",
                subject=prior.customer_id,
                data=ev.ReservationReleased(
                    customer_id=prior.customer_id,
                    order_id=order_id,
                    check_id=res.check_id,
                    by=principal.name,
                ),
                id=f"release-{res.check_id}",
                time=now,
            )
            await core.record(uow, [env])
        return Response(status_code=204)

    @router.get(
        "/credit-checks/{check_id}",
        tags=[CHECKS],
        summary="A stored credit decision",
        description="The decision as it was answered, with its inputs.",
        **openapi.ok(out.CreditCheck, "The decision", errors={404: "No such credit check"}),
    )
    async def get_check(
        check_id: PathText, _p: Principal = Depends(require("credit:read"))
    ) -> dict[str, Any]:
        async with engine.connect() as conn:
            row = (
                await conn.execute(select(store.checks).where(store.checks.c.check_id == check_id))
            ).first()
        if row is None:
            raise NotFound(f"no credit check {check_id!r}", field="check_id")
        body: dict[str, Any] = json.loads(row.body)
        return body

    # ---- exposure and limits --------------------------------------------------------------
    @router.get(
        "/customers/{customer_id}/exposure",
        tags=[EXPOSURE],
        summary="Exposure now or as of a time",
        description="The exposure.updated body now, or rebuilt from the stored events as of "
        "a business time; a group's parent also gets the group's figures.",
        **openapi.ok(out.Exposure, "The exposure", errors={404: _UNKNOWN_CUSTOMER}),
    )
    async def exposure(
        customer_id: PathText,
        as_of: Annotated[
            UtcTimestamp | None,
            Query(description="RFC 3339: the exposure as it stood at this business time"),
        ] = None,
        _p: Principal = Depends(require("credit:read")),
    ) -> dict[str, Any]:
        async with engine.connect() as conn:
            if as_of is None:
                row = await _customer_row(conn, customer_id)
                state = (await store.load_states(conn, {customer_id: row}))[customer_id]
                at = max(clock(), state.last_time) if state.last_time else clock()
            else:
                # A customer known now, asked about a time before its first event: nothing
                # was owed or reserved then (not a 404, which says the id is unknown).
                await _customer_row(conn, customer_id)
                state = await _fold_until(conn, customer_id, as_of, none_yet_is_empty=True)
                at = as_of
            fig = domain.figures(state, policy, at)
            body = exposure_body(state, fig)
            body["as_of"] = _iso(at)
            body["grade"] = state.grade
            children = (
                await conn.execute(
                    select(func.count())
                    .select_from(store.customers)
                    .where(store.customers.c.parent_id == customer_id)
                )
            ).scalar_one()
            if children:
                others, members = await store.group_exposure(conn, customer_id, customer_id)
                if as_of is not None:
                    # The group as it stood then, not the members' exposure now.
                    others = {}
                    for member in await store.group_members(conn, customer_id, customer_id):
                        with contextlib.suppress(NotFound):  # no events yet at that time
                            then = await _fold_until(conn, member, as_of)
                            others[then.currency] = (
                                others.get(then.currency, Decimal(0))
                                + domain.figures(then, policy, as_of).exposure
                            )
                ccy = state.currency
                # The members keep their own currencies: summed in the parent's.
                group_exposure = domain.in_currency(others, ccy, policy) + fig.exposure
                body["group"] = {
                    "members": members + 1,
                    "limit": money(fig.limit, ccy),
                    "exposure": money(group_exposure, ccy),
                    "available": money(fig.limit - group_exposure, ccy),
                }
        return body

    async def _fold_until(
        conn: Any, cid: str, as_of: datetime, none_yet_is_empty: bool = False
    ) -> domain.CustomerState:
        """The customer's state as of business time ``as_of``, folded from its stored events
        (its settled history too: an answer about the past may cost what the past holds);
        with no event up to then, a 404 or (``none_yet_is_empty``) a state with nothing."""
        folding = domain.Refold(domain.new_customer(cid, policy), policy)
        seen = False
        async for page in es.read_events(conn, store.core, subject=cid, until=as_of):
            for stored in page:
                seen = True
                model = ev.parse_any(stored.envelope)
                if model is not None:
                    e = stored.envelope
                    folding.evolve(domain.Event(e.type, model, e.time))
        if not seen and not none_yet_is_empty:
            raise NotFound(
                f"customer {cid!r} has no events up to {_iso(as_of)}", field="customer_id"
            )
        return folding.state

    @router.get(
        "/customers/{customer_id}/limit",
        tags=[EXPOSURE],
        summary="The customer's credit limit",
        description="The limit in force and where it comes from (the policy's for the "
        "grade, a manual or temporary one), and the hold if any.",
        **openapi.ok(out.Limit, "The limit", errors={404: _UNKNOWN_CUSTOMER}),
    )
    async def limit(
        customer_id: PathText, _p: Principal = Depends(require("credit:read"))
    ) -> dict[str, Any]:
        async with engine.connect() as conn:
            row = await _customer_row(conn, customer_id)
        state = store.load_state(row.state, row.as_of)  # its reservations aside
        amount, source, expires = domain.effective_limit(state, policy, clock())
        return {
            "customer_id": customer_id,
            "limit": money(amount, state.currency),
            "currency": state.currency,
            "grade": state.grade,
            "source": source,
            "expires_at": _iso(expires),
            "on_hold": state.hold is not None,
            "hold_reason": state.hold.reason if state.hold else None,
            "policy_version": policy.version,
        }

    @router.get(
        "/customers/{customer_id}/limit/history",
        tags=[EXPOSURE],
        summary="The limit's history",
        description="The customer's limit.changed bodies, newest first.",
        **openapi.ok(out.LimitHistory, "A page of changes", errors={404: _UNKNOWN_CUSTOMER}),
    )
    async def limit_history(
        customer_id: PathText,
        limit: PageLimit = 100,
        cursor: CursorParam = None,
        _p: Principal = Depends(require("credit:read")),
    ) -> dict[str, Any]:
        h = store.limit_history
        after = decode_cursor(cursor, scope=f"limit-history:{customer_id}", kinds=(integer,))
        async with engine.connect() as conn:
            await _customer_row(conn, customer_id)
            stmt = select(h.c.seq, h.c.body).where(h.c.customer_id == customer_id)
            if after:
                stmt = stmt.where(h.c.seq < after[0])
            rows = list(await conn.execute(stmt.order_by(h.c.seq.desc()).limit(limit + 1)))
        items = [json.loads(r.body) for r in rows[:limit]]
        nxt = (
            encode_cursor([rows[limit - 1].seq], scope=f"limit-history:{customer_id}")
            if len(rows) > limit
            else None
        )
        return {"items": items, "next_cursor": nxt}

    # ---- limit requests (maker–checker) ---------------------------------------------------
    @router.post(
        "/customers/{customer_id}/limit-requests",
        tags=[REQUESTS],
        openapi_extra=body_schema(LimitRequestBody),
        summary="Request a limit",
        description="An increase waits for another principal's approval (status pending); "
        "a decrease applies at once (status approved). With expires_at, a temporary limit.",
        **openapi.ok(
            out.LimitRequestSubmitted,
            "Submitted",
            status=201,
            location="The request: /v1/limit-requests/{request_id}",
            errors={404: _UNKNOWN_CUSTOMER},
        ),
    )
    async def request_limit(
        customer_id: PathText,
        request: Request,
        response: Response,
        principal: Principal = Depends(require("credit:write")),
    ) -> dict[str, Any]:
        body = await json_body(request, LimitRequestBody)
        async with core.transaction() as uow:
            now = uow.now
            loaded = await _locked_known(uow, customer_id)
            state = loaded[customer_id].state
            try:
                amount = parse_amount(
                    format(body.requested_limit, "f"),
                    state.currency,
                    field="requested_limit",
                    allow_zero=True,
                )
            except AmountError as exc:
                raise ValidationFailed(str(exc), field="requested_limit") from None
            if body.expires_at is not None:
                if body.expires_at <= now:
                    raise ValidationFailed("expires_at: must be in the future", field="expires_at")
                max_days = policy.limits.temporary_limit_max_days
                if body.expires_at > now + timedelta(days=max_days):
                    raise ValidationFailed(
                        f"expires_at: a temporary limit may last at most {max_days} days",
                        field="expires_at",
                    )
            request_id = str(uuid.uuid4())
            event = ev.LimitRequestSubmitted(
                customer_id=customer_id,
                request_id=request_id,
                requested_limit=amount,
                currency=state.currency,
                reason=body.reason,
                expires_at=body.expires_at,
                requested_by=principal.name,
            )
            env = new_event(
                event.TYPE,
                source=SOURCE + "/api",
                subject=customer_id,
                data=event,
                id=f"request-{request_id}",
                time=now,
            )
            await core.record(uow, [env])
            # A decrease is granted at once; an increase waits for an approver.
            pending = request_id in loaded[customer_id].state.requests
            status = "pending" if pending else "approved"
        root = request.scope.get("root_path", "").rstrip("/")
        response.headers["Location"] = f"{root}/v1/limit-requests/{quote(request_id, safe='')}"
        return {
            "request_id": request_id,
            "status": status,
            "customer_id": customer_id,
            "requested_limit": money(amount, state.currency),
            "currency": state.currency,
            "requested_by": principal.name,
            "applied": status == "approved",
        }

    @router.get(
        "/limit-requests/{request_id}",
        tags=[REQUESTS],
        summary="A limit request",
        description="The request as submitted and what became of it (pending, approved, "
        "rejected; by whom, when, with what note).",
        **openapi.ok(out.LimitRequest, "The request", errors={404: "No such limit request"}),
    )
    async def get_request(
        request_id: PathText, _p: Principal = Depends(require("credit:read"))
    ) -> dict[str, Any]:
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    select(store.requests).where(store.requests.c.request_id == request_id)
                )
            ).first()
            if row is None:
                raise NotFound(f"no limit request {request_id!r}", field="request_id")
            # The record's details are in the events the API recorded for it (their ids
            # are the request's), exactly as submitted and decided.
            events = store.core.events
            found = {
                r.event_id: (r.time, json.loads(r.event)["data"])
                for r in await conn.execute(
                    select(events.c.event_id, events.c.time, events.c.event).where(
                        events.c.source == SOURCE + "/api",
                        events.c.event_id.in_([f"request-{request_id}", f"decision-{request_id}"]),
                    )
                )
            }
        if f"request-{request_id}" not in found:
            raise RuntimeError(f"limit request {request_id!r} has a record but no event")
        submitted_at, submitted = found[f"request-{request_id}"]
        decided_at, decision = found.get(f"decision-{request_id}", (None, None))
        decided_by = decision["by"] if decision is not None else None
        if decision is None and row.status == "approved":
            # A decrease: granted at once, by its requester.
            decided_by, decided_at = submitted["requested_by"], submitted_at
        ccy = submitted["currency"]
        expires_at = submitted.get("expires_at")
        return {
            "request_id": request_id,
            "customer_id": row.customer_id,
            "status": row.status,
            "requested_limit": money(Decimal(str(submitted["requested_limit"])), ccy),
            "currency": ccy,
            "reason": submitted["reason"],
            "requested_by": submitted["requested_by"],
            "submitted_at": _iso(submitted_at),
            "expires_at": _iso(datetime.fromisoformat(expires_at)) if expires_at else None,
            "decided_by": decided_by,
            "decided_at": _iso(decided_at),
            "note": decision.get("note") if decision is not None else None,
        }

    async def _decide(
        request_id: str, request: Request, principal: Principal, approve: bool
    ) -> dict[str, Any]:
        note = (await json_body(request, DecisionNote)).note if await request.body() else None
        async with core.transaction() as uow:
            now = uow.now
            row = (
                await uow.conn.execute(
                    select(store.requests).where(store.requests.c.request_id == request_id)
                )
            ).first()
            if row is None:
                raise NotFound(f"no limit request {request_id!r}", field="request_id")
            if row.requested_by == principal.name:
                raise Forbidden("the requester may not decide its own request", field="request_id")
            loaded, _ = await _locked(uow, row.customer_id)
            req = loaded[row.customer_id].state.requests.get(request_id)
            if req is None:
                raise Conflict(
                    f"limit request {request_id!r} is already {row.status}", field="request_id"
                )
            if approve and req.expires_at is not None and req.expires_at <= now:
                # Approved now it would end before it began, replacing the limit in force.
                raise Conflict(
                    f"limit request {request_id!r} ended at "
                    f"{_iso(req.expires_at)}; it can only be rejected",
                    field="request_id",
                )
            model: ev.LimitRequestApproved | ev.LimitRequestRejected
            if approve:
                model = ev.LimitRequestApproved(
                    customer_id=row.customer_id, request_id=request_id, by=principal.name, note=note
                )
            else:
                model = ev.LimitRequestRejected(
                    customer_id=row.customer_id, request_id=request_id, by=principal.name, note=note
                )
            env = new_event(
                model.TYPE,
                source=SOURCE + "/api",
                subject=row.customer_id,
                data=model,
                id=f"decision-{request_id}",
                time=now,
            )
            await core.record(uow, [env])
            state = loaded[row.customer_id].state
        return {
            "request_id": request_id,
            "status": "approved" if approve else "rejected",
            "customer_id": row.customer_id,
            "decided_by": principal.name,
            "note": note,
            "requested_by": req.requested_by,
            "requested_limit": money(req.requested_limit, state.currency),
            "currency": state.currency,
        }

    @router.post(
        "/limit-requests/{request_id}/approve",
        tags=[REQUESTS],
        openapi_extra=body_schema(DecisionNote, required=False),
        summary="Approve a limit request",
        description="By another principal than the requester; the limit applies at once.",
        **openapi.ok(out.LimitRequestDecided, "Approved", errors=_DECISION_ERRORS),
    )
    async def approve(
        request_id: PathText,
        request: Request,
        principal: Principal = Depends(require("credit:approve")),
    ) -> dict[str, Any]:
        return await _decide(request_id, request, principal, True)

    @router.post(
        "/limit-requests/{request_id}/reject",
        tags=[REQUESTS],
        openapi_extra=body_schema(DecisionNote, required=False),
        summary="Reject a limit request",
        description="By another principal than the requester.",
        **openapi.ok(out.LimitRequestDecided, "Rejected", errors=_DECISION_ERRORS),
    )
    async def reject(
        request_id: PathText,
        request: Request,
        principal: Principal = Depends(require("credit:approve")),
    ) -> dict[str, Any]:
        return await _decide(request_id, request, principal, False)

    # ---- holds ------------------------------------------------------------------------------
    async def _hold(customer_id: str, model: ev.HoldPlaced | ev.HoldReleased) -> dict[str, Any]:
        async with core.transaction() as uow:
            now = uow.now
            loaded = await _locked_known(uow, customer_id)
            env = new_event(
                model.TYPE,
                source=SOURCE + "/api",
                subject=customer_id,
                data=model,
                id=f"{model.TYPE}-{uuid.uuid4()}",
                time=now,
            )
            await core.record(uow, [env])
            state = loaded[customer_id].state
        return {
            "customer_id": customer_id,
            "on_hold": state.hold is not None,
            "reason": state.hold.reason if state.hold else None,
        }

    @router.post(
        "/customers/{customer_id}/hold",
        tags=[HOLDS],
        openapi_extra=body_schema(HoldBody),
        summary="Put the customer on hold",
        description="Every new credit check of the customer is rejected (credit_hold) until "
        "the hold is released.",
        **openapi.ok(out.Hold, "On hold", errors={404: _UNKNOWN_CUSTOMER}),
    )
    async def hold(
        customer_id: PathText,
        request: Request,
        principal: Principal = Depends(require("credit:write")),
    ) -> dict[str, Any]:
        body = await json_body(request, HoldBody)
        return await _hold(
            customer_id,
            ev.HoldPlaced(customer_id=customer_id, reason=body.reason, by=principal.name),
        )

    @router.delete(
        "/customers/{customer_id}/hold",
        tags=[HOLDS],
        summary="Release the hold",
        description="Credit checks are judged on the figures again.",
        **openapi.ok(out.Hold, "Released", errors={404: _UNKNOWN_CUSTOMER}),
    )
    async def unhold(
        customer_id: PathText, principal: Principal = Depends(require("credit:write"))
    ) -> dict[str, Any]:
        return await _hold(customer_id, ev.HoldReleased(customer_id=customer_id, by=principal.name))

    # ---- portfolio --------------------------------------------------------------------------
    @router.get(
        "/portfolio",
        tags=[PORTFOLIO],
        summary="The portfolio",
        description="Every customer with its figures, filtered and sorted, with the totals "
        "of the selection (in one currency: the customers' own, or the policy's base "
        "currency at the policy's rates).",
        **openapi.ok(out.Portfolio, "A page of customers"),
    )
    async def portfolio(
        grade: str | None = grade_filter,
        status: Annotated[
            PortfolioStatus | None,
            Query(description="over_limit, on_hold, or overdue (days overdue > 0)"),
        ] = None,
        sort: Annotated[
            PortfolioSort,
            Query(description="The sort key; a leading - sorts descending"),
        ] = "customer_id",
        limit: PageLimit = 100,
        cursor: CursorParam = None,
        _p: Principal = Depends(require("credit:read")),
    ) -> dict[str, Any]:
        check_grade(policy, grade)
        c = store.customers
        where: list[ColumnElement[bool]] = [c.c.known.is_(True)]
        if grade:
            where.append(c.c.grade == grade)
        if status == "over_limit":
            where.append(c.c.over_limit.is_(True))
        elif status == "on_hold":
            where.append(c.c.on_hold.is_(True))
        elif status == "overdue":
            where.append(c.c.max_days_overdue > 0)
        desc = sort.startswith("-")
        key_name = sort.lstrip("-")
        column = {
            "utilization": c.c.utilization_ppm,
            "exposure": c.c.exposure,
            "available": c.c.available,
            "limit": c.c.limit_amount,
            "overdue_amount": c.c.overdue_amount,
            "customer_id": c.c.customer_id,
        }[key_name]
        key: ColumnElement[Any] = column
        async with engine.connect() as conn:
            totals_row = (
                await conn.execute(
                    select(func.count(), func.sum(c.c.over_limit.cast(type_=_int()))).where(*where)
                )
            ).first()
            amounts = list(
                await conn.execute(
                    select(c.c.currency, c.c.limit_amount, c.c.exposure).where(*where)
                )
            )
            # Amounts sort as they compare, converted into the base currency with the
            # policy's rates (each customer's amounts are in its own currency); a customer
            # whose currency has no rate to it sorts with the nulls, last.
            factors = {
                code: rate_between(code, policy.base_currency, policy.fx_rates())
                for code in sorted({r.currency for r in amounts})
            }
            value_of = _converted(column.name, factors)
            if key_name not in ("customer_id", "utilization") and factors:
                key = case(
                    *(
                        (
                            c.c.currency == code,
                            null()
                            if f is None
                            else key * literal(f[0], Numeric()) / literal(f[1], Numeric()),
                        )
                        for code, f in factors.items()
                    ),
                    else_=null(),
                )
            # A cursor holds where the page ended in this sort and selection, and only there.
            scope = f"portfolio:{sort}:{grade or ''}:{status or ''}"
            if conn.dialect.name == "sqlite" and key_name not in ("customer_id", "utilization"):
                # SQLite keeps amounts as text: sorted here on the exact values instead, and
                # the cursor is a position in that order.
                after = decode_cursor(cursor, scope=scope, kinds=(_position,))
                rows = list(await conn.execute(select(c).where(*where)))
                # Nulls last either way (as on PostgreSQL), ties by customer id.
                sign = -1 if desc else 1

                def rank(r: Any) -> tuple[bool, Decimal, str]:
                    value = value_of(r)
                    return value is None, (value or Decimal(0)) * sign, r.customer_id

                rows.sort(key=rank)
                start = after[0] if after else 0
                page = rows[start : start + limit]
                nxt = (
                    encode_cursor([start + limit], scope=scope)
                    if start + limit < len(rows)
                    else None
                )
            else:
                stmt = select(c, key.label("sort_value")).where(*where)
                after = decode_cursor(
                    cursor, scope=scope, kinds=(_SORT_VALUE.get(key_name, text), text)
                )
                if after:
                    value, cid = after
                    if key_name == "customer_id":
                        cond = c.c.customer_id < cid if desc else c.c.customer_id > cid
                    elif value is None:
                        cond = and_(key.is_(None), c.c.customer_id > cid)
                    elif desc:
                        cond = or_(
                            key < value, and_(key == value, c.c.customer_id > cid), key.is_(None)
                        )
                    else:
                        # NULLs sort last either way, so they follow any value.
                        cond = or_(
                            key > value, and_(key == value, c.c.customer_id > cid), key.is_(None)
                        )
                    stmt = stmt.where(cond)
                order = [
                    key.desc().nulls_last() if desc else key.asc().nulls_last(),
                    c.c.customer_id.desc()
                    if desc and key_name == "customer_id"
                    else c.c.customer_id.asc(),
                ]
                page = list(await conn.execute(stmt.order_by(*order).limit(limit + 1)))
                nxt = None
                if len(page) > limit:
                    last = page[limit - 1]
                    page = page[:limit]
                    value = last.sort_value
                    nxt = encode_cursor(
                        [None if value is None else str(value), last.customer_id], scope=scope
                    )
        items = []
        for r in page:
            util = r.utilization_ppm
            items.append(
                {
                    "customer_id": r.customer_id,
                    "name": r.name,
                    "grade": r.grade,
                    "currency": r.currency,
                    "limit": money(r.limit_amount, r.currency),
                    "exposure": money(r.exposure, r.currency),
                    "available": money(r.available, r.currency),
                    # Spelled like exposure.updated's utilization (four places).
                    "utilization": (
                        format(
                            (Decimal(util) / Decimal(1_000_000)).quantize(Decimal("0.0001")), "f"
                        )
                        if util is not None
                        else None
                    ),
                    "overdue_amount": money(r.overdue_amount, r.currency),
                    "max_days_overdue": r.max_days_overdue,
                    "on_hold": r.on_hold,
                    "open_alerts": r.open_alerts,
                }
            )
        limits_by: dict[str, Decimal] = {}
        exposure_by: dict[str, Decimal] = {}
        for r in amounts:
            limits_by[r.currency] = limits_by.get(r.currency, Decimal(0)) + r.limit_amount
            exposure_by[r.currency] = exposure_by.get(r.currency, Decimal(0)) + r.exposure
        # One currency: its sums as they are. Several: each currency's sums converted with
        # the policy's rates into its base currency (null only if one has no rate to it).
        ccy = next(iter(limits_by)) if len(limits_by) == 1 else policy.base_currency
        rates = policy.fx_rates()
        limit_total = _total(limits_by, ccy, rates)
        exposure_total = _total(exposure_by, ccy, rates)
        totals = {
            "customers": int(totals_row[0] or 0) if totals_row else 0,
            "over_limit": int(totals_row[1] or 0) if totals_row else 0,
            "currency": ccy if limit_total is not None and exposure_total is not None else None,
            "limit": None if limit_total is None else money(limit_total, ccy),
            "exposure": None if exposure_total is None else money(exposure_total, ccy),
            "by_currency": {
                k: {"limit": money(v, k), "exposure": money(exposure_by[k], k)}
                for k, v in sorted(limits_by.items())
            },
        }
        return {"items": items, "totals": totals, "next_cursor": nxt}

    return router


def _total(
    by_currency: dict[str, Decimal], ccy: str, rates: Mapping[str, Decimal]
) -> Decimal | None:
    """The sum of amounts by currency in ``ccy``; None when one of them has no rate to it."""
    total = Decimal(0)
    for code, amount in by_currency.items():
        converted = convert(amount, code, ccy, rates)
        if converted is None:
            return None
        total += converted
    return total


def _converted(
    column: str, factors: Mapping[str, tuple[Decimal, Decimal] | None]
) -> Callable[[Any], Decimal | None]:
    """A row's amount in ``column`` as the portfolio sorts it (see ``portfolio``)."""

    def value(row: Any) -> Decimal | None:
        f = factors.get(row.currency)
        return None if f is None else Decimal(getattr(row, column)) * f[0] / f[1]

    return value


def _int() -> Any:
    from sqlalchemy import Integer

    return Integer()
