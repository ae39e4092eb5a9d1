"""Assessment HTTP API: latest assessment and history, analyst overrides, recompute requests
and the periodic reviews that are due."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from sqlalchemy.ext.asyncio import AsyncConnection

from services.assessment import events as ev
from services.assessment import store
from services.assessment.handlers import (
    SOURCE,
    AssessmentLoaded,
    AssessmentService,
    internal_event,
)
from shared.auth import Principal, require
from shared.body import UtcTimestamp, body_schema, json_body
from shared.http import CursorParam, PathText
from shared.pagination import MAX_PAGE, decode_cursor, encode_cursor, integer, text
from shared.problems import NotFound, ValidationFailed
from shared.runtime import EventCore
from shared.unitofwork import UnitOfWork

API_SOURCE = SOURCE + "/api"


def _iso(t: datetime | None) -> str | None:
    return t.isoformat().replace("+00:00", "Z") if t is not None else None


class OverrideBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    grade: str = Field(min_length=1, max_length=20, description="A grade of the policy")
    reason: str = Field(min_length=1, max_length=1000)
    expires_at: AwareDatetime | None = Field(
        default=None, description="RFC 3339, in the future; absent: until withdrawn"
    )


def build_router(service: AssessmentService, core: EventCore) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["assessment"])
    engine = core.engine
    policy = service.policy
    clock = core.clock

    async def _known(conn: AsyncConnection, cid: str) -> Any:
        row = await store.customer(conn, cid)
        if row is None:
            raise NotFound(
                f"customer {cid!r} is not known to the assessment service", field="customer_id"
            )
        return row

    async def _locked(uow: UnitOfWork, cid: str) -> AssessmentLoaded:
        """Lock and load a customer the service knows (404 otherwise)."""
        loaded: AssessmentLoaded = (await service.repository.load(uow, [cid]))[cid]
        if loaded.last_seq == 0:  # no row: a state made up for the unknown
            raise NotFound(
                f"customer {cid!r} is not known to the assessment service", field="customer_id"
            )
        return loaded

    async def _command(
        uow: UnitOfWork,
        loaded: AssessmentLoaded,
        model: ev.InternalEvent,
        event_id: str,
    ) -> dict[str, Any]:
        cid = model.customer_id
        env = internal_event(model, id=event_id, time=uow.now, subject=cid, source=API_SOURCE)
        loaded.published = None
        await core.record(uow, [env])
        body = loaded.published
        if body is None:  # every command this API records publishes an assessment
            raise RuntimeError(f"{model.__class__.__name__} published no assessment")
        return body

    # ---- reading ----------------------------------------------------------------------------
    @router.get(
        "/customers/{customer_id}/assessment", summary="The latest assessment.completed body"
    )
    async def latest(
        customer_id: PathText, _p: Principal = Depends(require("credit:read"))
    ) -> dict[str, Any]:
        async with engine.connect() as conn:
            await _known(conn, customer_id)
            body = await store.latest_assessment(conn, customer_id)
        if body is None:
            raise NotFound(
                f"customer {customer_id!r} has not been assessed yet", field="customer_id"
            )
        return body

    @router.get(
        "/customers/{customer_id}/assessments",
        summary="Assessment history, newest first (as of a business time)",
    )
    async def assessments(
        customer_id: PathText,
        as_of: Annotated[
            UtcTimestamp | None,
            Query(description="RFC 3339: only assessments made at or before this business time"),
        ] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        cursor: CursorParam = None,
        _p: Principal = Depends(require("credit:read")),
    ) -> dict[str, Any]:
        after = decode_cursor(cursor, scope="assessments", kinds=(integer,))
        before_seq: int | None = after[0] if after else None
        async with engine.connect() as conn:
            await _known(conn, customer_id)
            rows = await store.history(
                conn, customer_id, limit=limit + 1, before_seq=before_seq, as_of=as_of
            )
        items = [body for _, body in rows[:limit]]
        nxt = (
            encode_cursor([rows[limit - 1][0]], scope="assessments") if len(rows) > limit else None
        )
        return {"items": items, "next_cursor": nxt}

    # ---- analyst commands ---------------------------------------------------------------------
    @router.post(
        "/customers/{customer_id}/assessment/override",
        status_code=201,
        openapi_extra=body_schema(OverrideBody),
        summary="Override the grade (expert judgement) with a reason and an expiry",
    )
    async def override(
        customer_id: PathText,
        request: Request,
        principal: Principal = Depends(require("credit:write")),
    ) -> dict[str, Any]:
        body = await json_body(request, OverrideBody)
        names = [g.name for g in policy.grades]
        if body.grade not in names:
            raise ValidationFailed(
                f"grade: {body.grade[:20]!r} is not a grade of policy {policy.version} "
                f"(grades are {', '.join(names)})",
                field="grade",
            )
        async with core.transaction() as uow:
            if body.expires_at is not None and body.expires_at <= uow.now:
                raise ValidationFailed("expires_at: must be in the future", field="expires_at")
            loaded = await _locked(uow, customer_id)
            override_id = str(uuid.uuid4())
            model = ev.OverrideSet(
                customer_id=customer_id,
                override_id=override_id,
                grade=body.grade,
                reason=body.reason,
                by=principal.name,
                expires_at=body.expires_at,
            )
            return await _command(uow, loaded, model, f"override-{override_id}")

    @router.delete(
        "/customers/{customer_id}/assessment/override",
        summary="Withdraw the override; the scorecard's grade applies again",
    )
    async def withdraw(
        customer_id: PathText, principal: Principal = Depends(require("credit:write"))
    ) -> dict[str, Any]:
        async with core.transaction() as uow:
            loaded = await _locked(uow, customer_id)
            current = loaded.state.override
            if current is None or not current.active_at(uow.now):
                raise NotFound(
                    f"customer {customer_id!r} has no override in force", field="customer_id"
                )
            model = ev.OverrideRemoved(
                customer_id=customer_id, override_id=current.override_id, by=principal.name
            )
            return await _command(uow, loaded, model, f"override-removed-{current.override_id}")

    @router.post(
        "/customers/{customer_id}/assessment/recompute",
        summary="Reassess now under the current policy (completes a periodic review)",
    )
    async def recompute(
        customer_id: PathText, principal: Principal = Depends(require("credit:write"))
    ) -> dict[str, Any]:
        async with core.transaction() as uow:
            loaded = await _locked(uow, customer_id)
            model = ev.RecomputeRequested(customer_id=customer_id, by=principal.name)
            return await _command(uow, loaded, model, f"recompute-{uuid.uuid4()}")

    # ---- periodic reviews ---------------------------------------------------------------------
    @router.get("/reviews/due", summary="Customers whose periodic review date has passed")
    async def reviews_due(
        before: Annotated[
            date | None,
            Query(description="ISO date; reviews dated before it are listed (default: today)"),
        ] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        cursor: CursorParam = None,
        _p: Principal = Depends(require("credit:read")),
    ) -> dict[str, Any]:
        today = clock().date()
        cutoff = before or today
        after_key: tuple[date, str] | None = None
        after = decode_cursor(
            cursor, scope="reviews-due", kinds=(lambda v: date.fromisoformat(text(v)), text)
        )
        if after:
            after_key = (after[0], after[1])
        async with engine.connect() as conn:
            rows = await store.reviews_due(conn, cutoff, limit=limit + 1, after=after_key)
        items = [
            {
                "customer_id": r.customer_id,
                "name": r.name,
                "grade": r.grade,
                "computed_grade": r.computed_grade,
                "score": r.score,
                "risk_level": r.risk_level,
                "next_review_date": r.next_review_date.isoformat(),
                "days_overdue": max((today - r.next_review_date).days, 0),
                "last_assessment_id": r.last_assessment_id,
                "assessed_at": _iso(r.assessed_at),
            }
            for r in rows[:limit]
        ]
        nxt = None
        if len(rows) > limit:
            last = rows[limit - 1]
            nxt = encode_cursor(
                [last.next_review_date.isoformat(), last.customer_id], scope="reviews-due"
            )
        return {"items": items, "before": cutoff.isoformat(), "next_cursor": nxt}

    return router
