"""Play a golden stream through the three services in-process and capture what they show.

Wiring as in production, in one fixed interleaving: the services are built by their own
``app.build`` (the same ``EventCore``, handlers, API and fast credit-check path), migrated by
Alembic as ``creditwatch db upgrade`` does, with a fixed clock and without their loops. A
batch of input records goes to each service that consumes its topics (``input_topics``), as
the consumer hands it over (``EventCore.process_records``). Then each service's outbox is
published by the service's own ``OutboxRelay.publish_pending`` into an in-memory log (one
partition per topic, offsets counted there), and what it published goes, as one batch per
topic set, to the services consuming those topics (assessment → limits and alerts; limits →
alerts; alerts → limits), round after round until every outbox is empty. API calls go
through ``httpx.ASGITransport`` with bearer tokens; a tick is ``core.run_due()`` on each
service (assessment, limits, alerts), each followed by the same draining.

Identifiers the product draws at random (credit check ids, limit request ids, override ids,
hold and recompute event ids: ``uuid.uuid4``) are made deterministic while a stream plays:
the n-th draw during a step is a hash of (seed, step label, n).

What is captured is only what the contract shows — every published event and the API's
answers — never the stores' internal documents, which a redesign changes on purpose. Ids
that carry internal numbers are normalised (see ``normalise``):

- ``exposure-<customer>-<seq>`` and ``limit-<customer>-<seq>`` (limits' output event ids):
  the number is dropped (``exposure-<customer>``) — a rank would shift for every later
  event after one event more or less, and the event's place in its customer's list says
  the rest;
- alert ids (``al-<hash of the triggering event's id>``, which reaches limits' numbers
  through ``exposure.updated`` ids): ``<dedup_key>#<n>``, n counting that key's alerts in
  the order they were raised; alert lists are kept as their items in one canonical order
  (ties in ``raised_at`` are ordered by the raw id there) with the number of pages;
- ids drawn at random (see above) and assessment ids derived from them: named after the
  step that drew them (``call-0042.1``, ``asm(override-call-0042.1)``), so an id drawn
  and never shown changes no name;
- the alert history's ``seq``: the entry's rank in its alert's history;
- ``next_cursor``: ``"<more>"`` or null (every page is followed and kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote

import httpx

from services.schema import upgrade
from shared.auth import Principal, TokenRegistry
from shared.policy import Policy, load_policy
from shared.runtime import OutboxRelay, Record
from shared.service import ServiceHost
from shared.settings import Settings
from tests.golden import streams as st
from tools import registry

ORDER = ("assessment", "limits", "alerts")  # the fixed order of every round
CONSUMED_BATCH_MAX = 500  # records per consumed batch (the consumer's default max_records)
PAGE = {"limit_history": 5, "assessments": 4, "portfolio": 7, "reviews": 5, "alerts": 10}


@dataclass
class Clock:
    now: datetime

    def __call__(self) -> datetime:
        return self.now


_RANDOM_UUID4 = uuid.uuid4
_playing: contextvars.ContextVar[StableIds | None] = contextvars.ContextVar(
    "golden_ids", default=None
)


def _uuid4() -> uuid.UUID:
    ids = _playing.get()
    return _RANDOM_UUID4() if ids is None else ids.draw()


class StableIds:
    """``uuid.uuid4`` while a stream plays (in this task and the tasks it starts): the n-th
    draw within a step is derived from (seed, step label, n), so the ids the product draws
    at random are the same every run. Streams played side by side each have their own."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.label = "setup"
        self.drawn = 0
        self.labels: dict[str, str] = {}  # every id drawn → the step it was drawn in

    def step(self, label: str) -> None:
        self.label, self.drawn = label, 0

    def draw(self) -> uuid.UUID:
        self.drawn += 1
        digest = hashlib.sha256(f"{self.seed}|{self.label}|{self.drawn}".encode()).digest()
        drawn = uuid.UUID(bytes=digest[:16], version=4)
        self.labels[str(drawn)] = self.label
        return drawn

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        uuid.uuid4 = _uuid4  # stays: without a stream playing it is uuid4 itself
        token = _playing.set(self)
        try:
            yield
        finally:
            _playing.reset(token)


class _Producer:
    """What the relay publishes to: records land in the runner's log."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, str]] = []

    async def send(self, topic: str, *, value: bytes, key: bytes, headers: Any = None) -> Any:
        self.sent.append((topic, key.decode(), value.decode()))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


@dataclass
class Node:
    name: str
    host: ServiceHost
    client: httpx.AsyncClient
    relay: OutboxRelay
    topics: frozenset[str]
    producer: _Producer = field(default_factory=_Producer)


@dataclass
class Captured:
    """Everything one run showed: published events in order, call answers, API answers."""

    published: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # service → events
    calls: dict[str, dict[str, Any]] = field(default_factory=dict)  # label → call and answer
    api: dict[str, Any] = field(default_factory=dict)  # file name → content
    drawn: dict[str, str] = field(default_factory=dict)  # id drawn at random → its step
    names: dict[str, str] = field(default_factory=dict)  # raw id → normalised (normalise)
    seconds: float = 0.0


def tokens() -> TokenRegistry:
    return TokenRegistry(
        {t: Principal(name, frozenset(scopes)) for t, (name, scopes) in st.TOKENS.items()}
    )


def settings_for(url: str) -> Settings:
    """The contract's topic names whatever the environment says (``CREDITWATCH_TOPIC_*``):
    the golden files name them."""
    fixed: dict[str, Any] = {
        name: info.default
        for name, info in Settings.model_fields.items()
        if name.startswith("topic_") and isinstance(info.default, str)
    }
    return Settings.model_validate({**fixed, "database_url": url})


# Alembic keeps its context in module state: streams played side by side migrate in turn.
_MIGRATING = asyncio.Lock()


@contextlib.asynccontextmanager
async def services(
    url: str, clock: Clock, *, migrate: bool = True, policy: Policy | None = None
) -> AsyncIterator[dict[str, Node]]:
    """The three services on ``url`` (``{service}`` is replaced by each name), without loops."""
    settings = settings_for(url)
    policy = policy or load_policy(None)
    registry_tokens = tokens()
    nodes: dict[str, Node] = {}
    async with contextlib.AsyncExitStack() as stack:
        for name in ORDER:
            app, host = registry.build(
                name,
                settings,
                tokens=registry_tokens,
                policy=policy,
                consume=False,
                relay=False,
                clock=clock,
            )
            stack.push_async_callback(host.close)
            if migrate:
                async with _MIGRATING:
                    await upgrade(host.engine, name)
            client = await stack.enter_async_context(
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=f"http://{name}")
            )
            relay = OutboxRelay(host.core, bootstrap="in-process", batch=1000)
            topics = frozenset(host.service.input_topics())
            nodes[name] = Node(name, host, client, relay, topics)
        yield nodes


class Player:
    """Plays one stream through the nodes and records what they publish and answer."""

    def __init__(self, stream: st.Stream, nodes: dict[str, Node], clock: Clock) -> None:
        self.stream = stream
        self.nodes = nodes
        self.clock = clock
        self.ids = StableIds(stream.seed)
        self.log: dict[str, int] = {}  # topic → next offset
        self.out = Captured(published={name: [] for name in ORDER})

    async def play(self) -> Captured:
        started = time.perf_counter()
        with self.ids.installed():
            for n, step in enumerate(self.stream.steps):
                self.clock.now = step.at
                if isinstance(step, st.Batch):
                    self.ids.step(f"batch-{n}")
                    await self._batch(step)
                elif isinstance(step, st.Call):
                    self.ids.step(step.label)
                    await self._call(step)
                else:
                    self.ids.step(f"tick-{n}")
                    await self._tick()
            await self._drain(everything=True)
        self.out.seconds = time.perf_counter() - started
        self.out.drawn = self.ids.labels
        return self.out

    # ---- the three kinds of step ---------------------------------------------------------
    async def _batch(self, batch: st.Batch) -> None:
        records = [self._append(r.topic, r.key, r.value) for r in batch.records]
        for name in ORDER:
            await self._consume(self.nodes[name], records)
        await self._drain()

    async def _tick(self) -> None:
        for name in ORDER:
            await self.nodes[name].host.core.run_due()
            await self._drain()
        await self._drain(everything=True)

    async def _call(self, call: st.Call) -> None:
        entry: dict[str, Any] = {
            "at": call.at.isoformat(),
            "service": call.service,
            "method": call.method,
            "token": call.token,
            "request": call.body,
        }
        path = await self._resolve(call.path)
        if path is None:
            entry.update(path=call.path, made=False)
        else:
            response = await self.nodes[call.service].client.request(
                call.method,
                path,
                json=call.body,
                headers={"Authorization": f"Bearer {call.token}"},
            )
            entry.update(path=path, made=True, status=response.status_code)
            entry["response"] = response.json() if response.content else None
        self.out.calls[call.label] = entry
        await self._drain()

    async def _resolve(self, path: str) -> str | None:
        """Fill ``{ref:…}``, ``{alert:…}`` and ``{resolved:…}`` (see ``streams.Call``)."""
        for match in re.finditer(r"\{(ref|alert|resolved):([^:}]+):([^}]+)\}", path):
            kind, first, second = match.groups()
            value: str | None
            if kind == "ref":
                answer = self.out.calls.get(first, {}).get("response")
                value = answer.get(second) if isinstance(answer, dict) else None
            else:
                params: dict[str, Any] = {
                    "status": "active" if kind == "alert" else "resolved",
                    "limit": 1,
                }
                if first != "*":
                    params["customer_id"] = first
                if second != "*":
                    params["rule"] = second
                listed = await self.nodes["alerts"].client.get(
                    "/v1/alerts", params=params, headers={"Authorization": f"Bearer {st.READER}"}
                )
                items = listed.json()["items"] if listed.status_code == 200 else []
                value = items[0]["alert_id"] if items else None
            if value is None:
                return None
            path = path.replace(match.group(0), quote(str(value), safe=""))
        return path

    # ---- the log, the consumers, the relays ------------------------------------------------
    def _append(self, topic: str, key: str, value: bytes) -> Record:
        offset = self.log.get(topic, 0)
        self.log[topic] = offset + 1
        return Record(topic, 0, offset, key.encode(), value)

    async def _consume(self, node: Node, records: Sequence[Record]) -> None:
        mine = [r for r in records if r.topic in node.topics]
        for start in range(0, len(mine), CONSUMED_BATCH_MAX):
            await node.host.core.process_records(mine[start : start + CONSUMED_BATCH_MAX])

    async def _drain(self, *, everything: bool = False) -> None:
        """Publish the outboxes and deliver what was published, until nothing moves.

        A service's outbox is read when its core says a commit queued something
        (``outbox_ready``, the relay's wake-up in production too); with ``everything``
        (after each tick, and at the end) every outbox is read whatever it says, so an
        event queued without the wake-up would still go out — a day late, which the golden
        files would show."""
        moved = True
        while moved:
            moved = False
            for name in ORDER:
                node = self.nodes[name]
                ready = node.host.core.outbox_ready
                if not (everything or ready.is_set()):
                    continue
                ready.clear()
                node.producer.sent.clear()
                while await node.relay.publish_pending(node.producer):
                    pass
                if not node.producer.sent:
                    continue
                moved = True
                records = []
                for topic, key, value in node.producer.sent:
                    envelope = json.loads(value)
                    self.out.published[name].append({"topic": topic, "key": key, **envelope})
                    records.append(self._append(topic, key, value.encode()))
                for consumer in ORDER:
                    if consumer != name:
                        await self._consume(self.nodes[consumer], records)


# ---- the API's answers after the stream ----------------------------------------------------------


async def _get(node: Node, path: str, **params: Any) -> dict[str, Any]:
    response = await node.client.get(
        path, params=params, headers={"Authorization": f"Bearer {st.READER}"}
    )
    body = response.json() if response.content else None
    if response.status_code != 200:
        return {"status": response.status_code, "problem": _problem(body)}
    assert isinstance(body, dict)
    return body


def _problem(body: Any) -> Any:
    # The problem's text and field; its instance/trace ids are per request.
    if not isinstance(body, dict):
        return body
    return {k: body.get(k) for k in ("title", "status", "detail", "field") if k in body}


async def _pages(node: Node, path: str, limit: int, **params: Any) -> list[dict[str, Any]]:
    """Every page of a list, following ``next_cursor``."""
    pages = []
    cursor: str | None = None
    for _ in range(1000):
        query = {**params, "limit": limit}
        if cursor:
            query["cursor"] = cursor
        page = await _get(node, path, **query)
        pages.append(page)
        cursor = page.get("next_cursor")
        if not cursor:
            return pages
    raise AssertionError(f"{path}: more than 1000 pages")


def _iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


async def read_api(
    stream: st.Stream, nodes: dict[str, Node], clock: Clock, check_ids: Sequence[tuple[str, str]]
) -> dict[str, Any]:
    """What the APIs answer after the stream, at ``stream.end``; ``check_ids``: (customer,
    check id) of every decision the calls were answered with."""
    clock.now = stream.end
    limits, assessment, alerts = nodes["limits"], nodes["assessment"], nodes["alerts"]
    out: dict[str, Any] = {}

    per_customer: dict[str, Any] = {}
    for cid in stream.customers:
        entry: dict[str, Any] = {
            "exposure": await _get(limits, f"/v1/customers/{cid}/exposure"),
            "exposure_as_of": {
                _iso(t): await _get(limits, f"/v1/customers/{cid}/exposure", as_of=_iso(t))
                for t in stream.as_of
            },
            "limit": await _get(limits, f"/v1/customers/{cid}/limit"),
            "limit_history": await _pages(
                limits, f"/v1/customers/{cid}/limit/history", PAGE["limit_history"]
            ),
            "checks": {},
        }
        per_customer[cid] = entry
    for cid, check_id in check_ids:
        body = await _get(limits, f"/v1/credit-checks/{check_id}")
        per_customer.setdefault(cid, {"checks": {}})["checks"][check_id] = body
    out["api/limits.json"] = per_customer

    portfolio: dict[str, Any] = {}
    for query in (
        {},
        {"sort": "-utilization"},
        {"sort": "exposure"},
        {"sort": "-overdue_amount"},
        {"sort": "-customer_id"},
        {"status": "overdue", "sort": "-exposure"},
        {"status": "over_limit"},
        {"status": "on_hold"},
        {"grade": "BBB", "sort": "available"},
    ):
        name = "&".join(f"{k}={v}" for k, v in query.items()) or "all"
        portfolio[name] = await _pages(limits, "/v1/portfolio", PAGE["portfolio"], **query)
    out["api/portfolio.json"] = portfolio

    assessed: dict[str, Any] = {}
    for cid in stream.customers:
        assessed[cid] = {
            "assessment": await _get(assessment, f"/v1/customers/{cid}/assessment"),
            "assessments": await _pages(
                assessment, f"/v1/customers/{cid}/assessments", PAGE["assessments"]
            ),
            "assessments_as_of": {
                _iso(t): await _pages(
                    assessment, f"/v1/customers/{cid}/assessments", 100, as_of=_iso(t)
                )
                for t in stream.as_of
            },
        }
    out["api/assessment.json"] = assessed
    reviews: dict[str, Any] = {
        "today": await _pages(assessment, "/v1/reviews/due", PAGE["reviews"])
    }
    for cutoff in stream.review_cutoffs:
        reviews[f"before={cutoff.isoformat()}"] = await _pages(
            assessment, "/v1/reviews/due", PAGE["reviews"], before=cutoff.isoformat()
        )
    out["api/reviews.json"] = reviews

    lists: dict[str, Any] = {}
    for query in (
        {},
        {"status": "open"},
        {"status": "acknowledged"},
        {"status": "resolved"},
        {"status": "active"},
        {"severity": "critical"},
        {"rule": "overdue"},
    ):
        name = "&".join(f"{k}={v}" for k, v in query.items()) or "all"
        lists[name] = await _pages(alerts, "/v1/alerts", PAGE["alerts"], **query)
    lists["rules"] = [await _get(alerts, "/v1/rules")]
    out["api/alerts-lists.json"] = lists
    by_customer: dict[str, Any] = {}
    for page in lists["all"]:
        for item in page.get("items", []):
            body = await _get(alerts, f"/v1/alerts/{item['alert_id']}")
            by_customer.setdefault(item["customer_id"], {})[item["alert_id"]] = body
    out["api/alerts.json"] = by_customer
    return out


def check_ids_of(calls: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """(customer, check id) of every decision the calls were answered with, in call order."""
    seen: dict[str, str] = {}
    for entry in calls.values():
        body = entry.get("response")
        if entry.get("made") and isinstance(body, dict) and "check_id" in body:
            seen.setdefault(body["check_id"], body["customer_id"])
    return [(cid, check_id) for check_id, cid in seen.items()]


# ---- normalising ----------------------------------------------------------------------------------

_UUID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_IDS = re.compile(rf"al-[0-9a-f]{{32}}|asm-{_UUID}|{_UUID}")
_LIMITS_ID = re.compile(r"^(exposure|limit)-(.+)-(\d+)$")


def alert_names(all_alerts: Sequence[dict[str, Any]]) -> dict[str, str]:
    """alert id → ``<dedup_key>#<n>``: each key's alerts in the order they were raised (one
    resolved before the next is raised, so (raised_at, resolved_at) orders them)."""
    by_key: dict[str, list[dict[str, Any]]] = {}
    for n, alert in enumerate(all_alerts):
        by_key.setdefault(alert["dedup_key"], []).append({**alert, "_n": n})
    names: dict[str, str] = {}
    for key, alerts in by_key.items():
        alerts.sort(
            key=lambda a: (
                a["raised_at"],
                a["resolved_at"] is None,
                a["resolved_at"] or "",
                a["_n"],
            )
        )
        for rank, alert in enumerate(alerts, start=1):
            names[alert["alert_id"]] = f"{key}#{rank}"
    return names


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)


def _dicts(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, list):
        for v in value:
            yield from _dicts(v)
    elif isinstance(value, dict):
        yield value
        for v in value.values():
            yield from _dicts(v)


def drawn_names(captured: Captured) -> dict[str, str]:
    """Ids the product drew at random → ``<step>.<n>``: n counts the ids drawn in that step
    in the order they are first shown (calls, then events, then API answers), so an id drawn
    and never shown (a check decided again on PostgreSQL) changes nobody's name. An
    assessment id derived from such an id (the assessment an override or recompute
    triggered) → ``asm(<its trigger's name>)``."""
    names: dict[str, str] = {}
    counts: dict[str, int] = {}
    shown = [captured.calls, *captured.published.values(), *captured.api.values()]
    for text in (t for part in shown for t in _strings(part)):
        for match in re.finditer(_UUID, text):
            raw = match.group(0)
            label = captured.drawn.get(raw)
            if label is not None and raw not in names:
                counts[label] = counts.get(label, 0) + 1
                names[raw] = f"{label}.{counts[label]}"
    for d in (d for part in shown for d in _dicts(part)):
        trigger = d.get("trigger")
        if "assessment_id" in d and isinstance(trigger, dict):
            source = str(trigger.get("event_id", ""))
            renamed = _IDS.sub(lambda m: names.get(m.group(0), m.group(0)), source)
            if renamed != source:
                names[d["assessment_id"]] = f"asm({renamed})"
    return names


def _replace_ids(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, str):
        return _IDS.sub(lambda m: names.get(m.group(0), m.group(0)), value)
    if isinstance(value, list):
        return [_replace_ids(v, names) for v in value]
    if isinstance(value, dict):
        return {_replace_ids(k, names): _replace_ids(v, names) for k, v in value.items()}
    return value


def _cursors(value: Any) -> Any:
    if isinstance(value, list):
        return [_cursors(v) for v in value]
    if isinstance(value, dict):
        return {
            k: ("<more>" if v else None) if k == "next_cursor" else _cursors(v)
            for k, v in value.items()
        }
    return value


def _history_ranks(alerts_file: dict[str, Any]) -> dict[str, Any]:
    for alerts in alerts_file.values():
        for body in alerts.values():
            for rank, item in enumerate(body.get("history", []), start=1):
                if "seq" in item:
                    item["seq"] = rank
    return alerts_file


def _alert_lists(lists: dict[str, Any]) -> dict[str, Any]:
    """Alert lists as how many pages and every item, newest first and, among alerts raised
    at the same time, by normalised id: the API breaks such ties by the raw id, a hash of
    internal numbers, so page by page the order is not the contract's to keep."""
    out: dict[str, Any] = {}
    for name, pages in lists.items():
        items = [item for page in pages for item in page.get("items", [])]
        if name == "rules" or not items:
            out[name] = pages
            continue
        order = [item["raised_at"] for item in items]
        items.sort(key=lambda i: (i["raised_at"], i["alert_id"]), reverse=True)
        out[name] = {
            "pages": len(pages),
            "newest_first": order == sorted(order, reverse=True),
            "items": items,
        }
    return out


def events_by_subject(
    published: Sequence[dict[str, Any]], names: dict[str, str]
) -> dict[str, list[dict[str, Any]]]:
    """One service's published events by subject (Kafka key), in publish order, with ids
    normalised; dead letters are under ``credit.dlq/<key>``."""
    out: dict[str, list[dict[str, Any]]] = {}
    for event in published:
        event = dict(event)
        match = _LIMITS_ID.match(event.get("id", ""))
        if match and match.group(2) == event.get("subject"):
            event["id"] = f"{match.group(1)}-{match.group(2)}"
        event = _replace_ids(event, names)
        key = event["key"] if event["topic"] != "credit.dlq" else f"credit.dlq/{event['key']}"
        out.setdefault(key, []).append(event)
    return out


def normalise(captured: Captured) -> dict[str, Any]:
    """The golden files' content: file name → JSON value (see the module docstring); the
    names given to raw ids are left in ``captured.names``."""
    everything = [
        item
        for page in captured.api["api/alerts-lists.json"]["all"]
        for item in page.get("items", [])
    ]
    names = {**drawn_names(captured), **captured.names, **alert_names(everything)}
    captured.names = names
    files: dict[str, Any] = {}
    for service, published in captured.published.items():
        files[f"events/{service}.json"] = events_by_subject(published, names)
    files["calls.json"] = _replace_ids(_cursors(captured.calls), names)
    for name, content in captured.api.items():
        value = _replace_ids(_cursors(content), names)
        if name == "api/alerts.json":
            value = _history_ranks(value)
        if name == "api/alerts-lists.json":
            value = _alert_lists(value)
        files[name] = value
    return files


def api_files(api: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """Only the API answers, normalised, with the names a run gave its drawn ids (for a
    store made by that run, which has no published events to show)."""
    captured = Captured(published={}, calls={}, api=api, names=dict(names))
    return {k: v for k, v in normalise(captured).items() if k.startswith("api/")}


# ---- one run --------------------------------------------------------------------------------------


async def run(stream: st.Stream, url: str) -> tuple[dict[str, Any], Captured]:
    """Play ``stream`` on fresh stores at ``url`` and read the APIs: (golden files, raw)."""
    clock = Clock(stream.steps[0].at)
    async with services(url, clock) as nodes:
        player = Player(stream, nodes, clock)
        captured = await player.play()
        with player.ids.installed():
            player.ids.step("read")
            captured.api = await read_api(stream, nodes, clock, check_ids_of(captured.calls))
    return normalise(captured), captured


def summary(captured: Captured) -> dict[str, Any]:
    """Counts for a report: events published per service and type, calls by status."""
    published: dict[str, dict[str, int]] = {}
    for service, events in captured.published.items():
        counts: dict[str, int] = {}
        for event in events:
            counts[event["type"]] = counts.get(event["type"], 0) + 1
        published[service] = dict(sorted(counts.items()))
    statuses: dict[str, int] = {}
    for entry in captured.calls.values():
        key = str(entry.get("status", "not made"))
        statuses[key] = statuses.get(key, 0) + 1
    return {"published": published, "calls": dict(sorted(statuses.items()))}


async def golden(stream: st.Stream, url: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(golden files, manifest) of one stream played on fresh stores at ``url``."""
    files, captured = await run(stream, url)
    manifest = {
        "seed": stream.seed,
        "fingerprint": st.fingerprint(stream),
        "steps": stream.counts(),
        "customers": list(stream.customers),
        "cases": {k: list(v) for k, v in stream.cases.items()},
        **summary(captured),
    }
    return files, manifest
