"""Alerts HTTP API: list and read alerts with their history, acknowledge, show the rules."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from services.alerts import domain, store
from services.alerts import events as ev
from services.alerts import responses as out
from services.alerts.handlers import SOURCE, AlertsService
from shared import openapi
from shared.auth import Principal, require
from shared.body import body_schema, json_body
from shared.events import new_event
from shared.http import MAX_PARAM_CHARS, CursorParam, PageLimit, PathText, Printable
from shared.openapi import BODY_TEXT, TEXT_PATTERN
from shared.pagination import decode_cursor, encode_cursor, text
from shared.problems import Conflict, NotFound, ValidationFailed
from shared.runtime import EventCore


class AcknowledgeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    note: str | None = Field(default=None, max_length=1000, json_schema_extra=BODY_TEXT)


ALERTS = openapi.tag("alerts", "Early warnings: list, read, acknowledge")
RULES = openapi.tag("rules", "The alert rules in force and their thresholds")
StatusFilter = Literal["open", "acknowledged", "resolved", "active"]
SeverityFilter = Literal["info", "warning", "critical"]


def encode_alert_cursor(raised_at: datetime, alert_id: str) -> str:
    return encode_cursor([raised_at.isoformat(), alert_id], scope="alerts")


def _aware(value: Any) -> datetime:
    moment = datetime.fromisoformat(text(value))
    if moment.tzinfo is None:
        raise ValueError(value)
    return moment


def decode_alert_cursor(cursor: str | None) -> tuple[datetime, str] | None:
    values = decode_cursor(cursor, scope="alerts", kinds=(_aware, text))
    return None if values is None else (values[0], values[1])


def _history_item(row: Any) -> dict[str, Any]:
    body = json.loads(row.body)
    item: dict[str, Any] = {
        "seq": row.seq,
        "type": row.type,
        "at": body.get("updated_at"),
        "severity": body.get("severity"),
        "status": body.get("status"),
        "message": body.get("message"),
        "facts": body.get("facts"),
    }
    if row.type == "acknowledged":
        item["by"] = body.get("acknowledged_by")
        item["note"] = body.get("acknowledgement_note")
    return item


def build_router(service: AlertsService, core: EventCore) -> APIRouter:
    router = APIRouter(prefix="/v1")
    engine = core.engine
    policy = service.policy

    @router.get(
        "/alerts",
        tags=[ALERTS],
        summary="Alerts",
        description="Alerts, newest first, filtered by status, customer, rule and severity.",
        **openapi.ok(out.AlertPage, "A page of alerts"),
    )
    async def list_alerts(
        status: Annotated[
            StatusFilter | None,
            Query(description="open, acknowledged, resolved, or active (open or acknowledged)"),
        ] = None,
        customer_id: Annotated[
            str | None,
            Query(max_length=255, json_schema_extra={"pattern": TEXT_PATTERN}),
            Printable,
        ] = None,
        rule: Annotated[
            str | None,
            Query(
                max_length=MAX_PARAM_CHARS,
                description="A rule's name",
                json_schema_extra={"enum": list(domain.RULES)},
            ),
        ] = None,
        severity: SeverityFilter | None = None,
        limit: PageLimit = 100,
        cursor: CursorParam = None,
        _p: Principal = Depends(require("credit:read")),
    ) -> dict[str, Any]:
        if rule is not None and rule not in domain.RULES:
            raise ValidationFailed(
                f"rule: unknown rule {rule[:64]!r}; rules are " + ", ".join(domain.RULES),
                field="rule",
            )
        after = decode_alert_cursor(cursor)
        async with engine.connect() as conn:
            rows = await store.list_alerts(
                conn,
                status=status,
                customer_id=customer_id,
                rule=rule,
                severity=severity,
                after=after,
                limit=limit + 1,
            )
        items = [json.loads(r.body) for r in rows[:limit]]
        nxt = None
        if len(rows) > limit:
            last = rows[limit - 1]
            nxt = encode_alert_cursor(last.raised_at, last.alert_id)
        return {"items": items, "next_cursor": nxt}

    @router.get(
        "/alerts/{alert_id}",
        tags=[ALERTS],
        summary="An alert",
        description="One alert with its history (raised, updated, acknowledged, resolved).",
        **openapi.ok(out.AlertWithHistory, "The alert", errors={404: "No such alert"}),
    )
    async def get_alert(
        alert_id: PathText, _p: Principal = Depends(require("credit:read"))
    ) -> dict[str, Any]:
        async with engine.connect() as conn:
            row = await store.get_alert(conn, alert_id)
            if row is None:
                raise NotFound(f"no alert {alert_id!r}", field="alert_id")
            past = await store.get_history(conn, alert_id)
        body: dict[str, Any] = json.loads(row.body)
        body["history"] = [_history_item(h) for h in past]
        return body

    @router.post(
        "/alerts/{alert_id}/acknowledge",
        tags=[ALERTS],
        openapi_extra=body_schema(AcknowledgeBody, required=False),
        summary="Acknowledge an alert",
        description="Take the alert in hand: status acknowledged (publishes alert.updated); "
        "acknowledging it again changes nothing.",
        **openapi.ok(
            out.Alert,
            "The acknowledged alert",
            errors={404: "No such alert", 409: "The alert is resolved"},
        ),
    )
    async def acknowledge(
        alert_id: PathText,
        request: Request,
        principal: Principal = Depends(require("alerts:write")),
    ) -> dict[str, Any]:
        note = (await json_body(request, AcknowledgeBody)).note if await request.body() else None
        async with core.transaction() as uow:
            now = uow.now
            row = await store.get_alert(uow.conn, alert_id)
            if row is None:
                raise NotFound(f"no alert {alert_id!r}", field="alert_id")
            loaded = await service.repository.load(uow, [row.customer_id])
            state = loaded[row.customer_id].state
            alert = state.alert_by_id(alert_id)
            if alert is None or alert.status == "resolved":
                raise Conflict(f"alert {alert_id!r} is already resolved", field="alert_id")
            if alert.status == "acknowledged":
                return domain.alert_body(alert)  # acknowledging twice changes nothing
            model = ev.AcknowledgeRequested(
                customer_id=row.customer_id, alert_id=alert_id, by=principal.name, note=note
            )
            env = new_event(
                model.TYPE,
                source=SOURCE + "/api",
                subject=row.customer_id,
                data=model,
                id=f"ack-{alert_id}-{alert.version}",
                time=now,
            )
            await core.record(uow, [env])
            after = loaded[row.customer_id].state.alert_by_id(alert_id)
        assert after is not None
        return domain.alert_body(after)

    @router.get(
        "/rules",
        tags=[RULES],
        summary="Alert rules",
        description="The rules in force, their severities and thresholds (from the policy).",
        **openapi.ok(out.Rules, "The rules"),
    )
    async def rules(_p: Principal = Depends(require("credit:read"))) -> dict[str, Any]:
        return {"policy_version": policy.version, "rules": domain.rules_overview(policy)}

    return router
