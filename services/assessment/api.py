"""Assessment HTTP API: latest assessment and history, analyst overrides, recompute requests
and the periodic reviews that are due."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.ext.asyncio import AsyncConnection

from services.assessment import events as ev
from services.assessment import responses as out
from services.assessment import store
from services.assessment.handlers import (
    SOURCE,
    AssessmentLoaded,
    AssessmentService,
    internal_event,
)
from shared import openapi
from shared.auth import Principal, require
from shared.body import Day, Timestamp, UtcTimestamp, body_schema, json_body
from shared.http import CursorParam, PageLimit, PathText, check_grade
from shared.openapi import BODY_TEXT
from shared.pagination import decode_cursor, encode_cursor, integer, text
from shared.policy import Policy
from shared.problems import NotFound, ValidationFailed
from shared.runtime import EventCore
from shared.unitofwork import UnitOfWork

API_SOURCE = SOURCE + "/api"


def _iso(t: datetime | None) -> str | None:
    return t.isoformat().replace("+00:00", "Z") if t is not None else None


class OverrideBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    grade: str = Field(min_length=1, max_length=20, description="A grade of the policy")
    reason: str = Field(min_length=1, max_length=1000, json_schema_extra=BODY_TEXT)
    expires_at: Timestamp | None = Field(
        default=None, description="RFC 3339, in the future; absent: until withdrawn"
    )


def override_schema(policy: Policy) -> dict[str, Any]:
    """The override body's schema, its grade one of ``policy``'s."""
    extra = body_schema(OverrideBody)
    schema = extra["requestBody"]["content"]["application/json"]["schema"]
    names = [g.name for g in policy.grades]
    schema["properties"]["grade"]["enum"] = names
    schema["properties"]["grade"]["description"] = f"A grade of the policy ({', '.join(names)})"
    return extra


ASSESSMENTS = openapi.tag("assessments", "A customer's assessments: the latest and its history")
OVERRIDES = openapi.tag(
    "overrides", "Analysts' commands: override the grade, withdraw it, reassess now"
)
REVIEWS = openapi.tag("reviews", "Periodic reviews that are due")
_UNKNOWN = "The customer is not known to the assessment service"


def build_router(service: AssessmentService, core: EventCore) -> APIRouter:
    router = APIRouter(prefix="/v1")
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
        "/customers/{customer_id}/assessment",
        tags=[ASSESSMENTS],
        summary="The latest assessment",
        description="The customer's latest assessment.completed body.",
        **openapi.ok(
            out.Assessment,
            "The assessment",
            errors={404: _UNKNOWN + ", or has not been assessed yet"},
        ),
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
        tags=[ASSESSMENTS],
        summary="Assessment history",
        description="The customer's assessments, newest first; with as_of, those made at or "
        "before that business time.",
        **openapi.ok(out.AssessmentHistory, "A page of assessments", errors={404: _UNKNOWN}),
    )
    async def assessments(
        customer_id: PathText,
        as_of: Annotated[
            UtcTimestamp | None,
            Query(description="RFC 3339: only assessments made at or before this business time"),
        ] = None,
        limit: PageLimit = 100,
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
        tags=[OVERRIDES],
        openapi_extra=override_schema(policy),
        summary="Override the grade",
        description="Expert judgement: the grade given replaces the scorecard's, with a "
        "reason, until withdrawn or until expires_at. Publishes a new assessment carrying "
        "the override, which is answered.",
        **openapi.ok(
            out.Assessment,
            "The assessment carrying the override",
            status=201,
            location="The customer's latest assessment, which this one is: "
            "/v1/customers/{customer_id}/assessment",
            errors={404: _UNKNOWN},
        ),
    )
    async def override(
        customer_id: PathText,
        request: Request,
        response: Response,
        principal: Principal = Depends(require("credit:write")),
    ) -> dict[str, Any]:
        body = await json_body(request, OverrideBody)
        check_grade(policy, body.grade)
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
            published = await _command(uow, loaded, model, f"override-{override_id}")
        root = request.scope.get("root_path", "").rstrip("/")
        response.headers["Location"] = (
            f"{root}/v1/customers/{quote(customer_id, safe='')}/assessment"
        )
        return published

    @router.delete(
        "/customers/{customer_id}/assessment/override",
        tags=[OVERRIDES],
        summary="Withdraw the override",
        description="The scorecard's grade applies again; publishes (and answers) a new "
        "assessment.",
        **openapi.ok(
            out.Assessment,
            "The assessment without the override",
            errors={404: _UNKNOWN + ", or has no override in force"},
        ),
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
        tags=[OVERRIDES],
        summary="Reassess now",
        description="Under the current policy; completes a periodic review. Publishes (and "
        "answers) a new assessment.",
        **openapi.ok(out.Assessment, "The new assessment", errors={404: _UNKNOWN}),
    )
    async def recompute(
        customer_id: PathText, principal: Principal = Depends(require("credit:write"))
    ) -> dict[str, Any]:
        async with core.transaction() as uow:
            loaded = await _locked(uow, customer_id)
            model = ev.RecomputeRequested(customer_id=customer_id, by=principal.name)
            return await _command(uow, loaded, model, f"recompute-{uuid.uuid4()}")

    # ---- periodic reviews ---------------------------------------------------------------------
    @router.get(
        "/reviews/due",
        tags=[REVIEWS],
        summary="Reviews due",
        description="Customers whose periodic review date has passed, the longest overdue first.",
        **openapi.ok(out.ReviewsDue, "A page of reviews"),
    )
    async def reviews_due(
        before: Annotated[
            Day | None,
            Query(description="ISO date; reviews dated before it are listed (default: today)"),
        ] = None,
        limit: PageLimit = 100,
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
