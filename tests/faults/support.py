"""The fault suite's harness: a realistic portfolio streaming into the three services (real
``creditwatch serve`` processes on PostgreSQL and Kafka) while operators work them over
HTTP, faults injected on the way, and the checks that the system came through whole.

Why it exists: the pipeline tests prove the system right on a good day; these prove that it
survives real life (a process killed, the database or the broker gone for a while) without
losing, doubling or silently dropping anything. Every wait is bounded and says what it
waited for, so a hang fails the case with a reason and never blocks CI.

The parts, each usable on its own:

* ``Workload``: the simulator's history for a seed (``tools.simulate.history``), as the
  upstream systems publish it, and what each service must end up storing from it.
* ``Stream``: publishes that history paced over some seconds, as upstream producers do
  (retrying a chunk while the broker is away: ids are stable, so a repeat is harmless).
* ``Operators``: seeded HTTP traffic — credit checks (reserving, quotes, releases), limit
  requests by an analyst decided by an approver (approved and rejected, permanent and
  temporary), holds, grade overrides, alert acknowledgements — every answer recorded.
* ``Monitor``: polls every service's ``/healthz`` and ``/readyz`` throughout.
* ``FaultSystem``: all of the above around a ``harness.e2e.Stack``, with the end
  conditions: lag 0 on every input partition, every outbox empty, ``/readyz`` 200,
  ``creditwatch verify`` clean for each service, and no output event lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import random
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from sqlalchemy import func, select

from harness import e2e as e2e
from harness.e2e import Stack
from harness.processes import ALL, APPROVE, CHECK, READ, WRITE, ServiceProcess
from shared import eventstore as es
from shared.policy import load_policy
from tools import registry
from tools.simulate import history

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("assessment", "limits", "alerts")
PARTITIONS = 4
POLICY = load_policy(None)
GRADES = [g.name for g in POLICY.grades]
WORST_GRADE = GRADES[-1]

# What each service consumes (README, "What runs where"), by contract name.
INPUTS: dict[str, tuple[str, ...]] = {
    "assessment": (
        "crm.customers",
        "crm.financials",
        "crm.credit-reports",
        "ar.invoices",
        "ar.payments",
        "ar.overdue",
    ),
    "limits": (
        "crm.customers",
        "ar.invoices",
        "ar.payments",
        "ar.overdue",
        "credit.assessments",
        "credit.alerts",
    ),
    "alerts": (
        "credit.exposure",
        "credit.assessments",
        "credit.limits",
        "ar.overdue",
        "ar.payments",
        "crm.credit-reports",
    ),
}
OUTPUTS = ("credit.assessments", "credit.limits", "credit.exposure", "credit.alerts")
# The services' tuning for these cases: small batches (more commits, so more points a kill
# can land between), a quick scheduler (temporary limits and overrides expire mid-case).
SERVICE_ENV = {
    "CREDITWATCH_CONSUMER_MAX_RECORDS": "100",
    "CREDITWATCH_SCHEDULER_INTERVAL_S": "0.5",
}


def core_of(service: str) -> es.CoreTables:
    core: es.CoreTables = importlib.import_module(f"services.{service}.store").core
    return core


def now_s() -> float:
    return time.monotonic()


async def wait_until(
    what: str,
    check: Callable[[], Awaitable[Any]],
    *,
    within: float,
    every: float = 0.25,
    detail: Callable[[], str] | None = None,
) -> Any:
    """Poll ``check()`` until it returns something truthy (returned); errors count as "not
    yet" (a database or broker coming back). Fails naming ``what`` and the last state."""
    deadline = now_s() + within
    last: object = None
    while True:
        try:
            result = await check()
            if result:
                return result
            last = result
        except Exception as exc:
            last = f"{type(exc).__name__}: {exc}"
        if now_s() > deadline:
            extra = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(
                f"timed out after {within:.0f}s waiting for {what} (last: {last}){extra}"
            )
        await asyncio.sleep(every)


# ---- the workload ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """The simulator's history for ``seed``: master data first, then in business-time order,
    as ``creditwatch simulate`` publishes it."""

    seed: int
    items: list[tuple[str, bytes, bytes]]  # (contract topic, key, value)
    customers: list[str]
    # Left alone by the operators, so that a probe after a fault has a known effect.
    probes: list[str]
    # How many simulator events each service must hold in its event store, each once.
    expected_stored: dict[str, int]

    @property
    def worked(self) -> list[str]:
        """The customers the operators work on."""
        return [c for c in self.customers if c not in self.probes]


def workload(seed: int, *, customers: int, months: int, probes: int = 2) -> Workload:
    sims = sorted(
        history(customers, months, seed=seed, today=datetime.now(UTC).date()),
        key=lambda s: (s.topic != "crm.customers", s.event["time"]),
    )
    items = [(s.topic, s.event["subject"].encode(), json.dumps(s.event).encode()) for s in sims]
    ids = sorted({s.event["subject"] for s in sims})
    expected: dict[str, int] = {}
    for service in SERVICES:
        module_name, cls = registry.SERVICE_CLASSES[service]
        consumed = getattr(importlib.import_module(module_name), cls).consumed_types
        expected[service] = sum(
            1 for s in sims if s.topic in INPUTS[service] and s.event["type"] in consumed
        )
    # The first customer of the simulator is always a good payer (graded well above the
    # worst grade): overriding it to the worst grade makes every service publish.
    return Workload(seed, items, ids, ids[:probes], expected)


# ---- upstream: the stream ----------------------------------------------------------------------


class Stream:
    """Publishes a workload to the prefixed input topics, paced over ``seconds``.

    A chunk that cannot be acknowledged (the broker is away) is sent again until it is, with
    a fresh producer: an upstream producer retries, and the stable event ids make a repeat
    harmless (the services skip a duplicate ``(source, id)``)."""

    def __init__(
        self,
        bootstrap: str,
        prefix: str,
        items: list[tuple[str, bytes, bytes]],
        *,
        seconds: float,
        chunk: int = 50,
    ) -> None:
        self.bootstrap = bootstrap
        self.prefix = prefix
        self.items = items
        self.seconds = seconds
        self.chunk = chunk
        self.sent = 0  # records acknowledged so far
        self.retries: list[str] = []
        self._producer: AIOKafkaProducer | None = None

    @property
    def progress(self) -> float:
        return self.sent / len(self.items) if self.items else 1.0

    async def reached(self, fraction: float, within: float = 120.0) -> None:
        async def far_enough() -> bool:
            return self.progress >= fraction

        await wait_until(
            f"the stream to reach {fraction:.0%}",
            far_enough,
            within=within,
            every=0.05,
            detail=lambda: f"at {self.progress:.0%}; retries: {self.retries[-3:]}",
        )

    async def _start_producer(self) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",
            linger_ms=5,
            enable_idempotence=False,
            request_timeout_ms=8000,
        )
        try:
            async with asyncio.timeout(10):
                await producer.start()
        except BaseException:
            await self._drop(producer)
            raise
        return producer

    @staticmethod
    async def _drop(producer: AIOKafkaProducer | None) -> None:
        if producer is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await producer.stop()

    async def run(self, within: float = 300.0) -> None:
        deadline = now_s() + within
        chunks = [self.items[i : i + self.chunk] for i in range(0, len(self.items), self.chunk)]
        pace = self.seconds / max(len(chunks), 1)
        started = now_s()
        try:
            for k, part in enumerate(chunks):
                due = started + k * pace
                if due > now_s():
                    await asyncio.sleep(due - now_s())
                await self._send(part, deadline)
                self.sent += len(part)
        finally:
            await self._drop(self._producer)
            self._producer = None

    async def _send(self, part: list[tuple[str, bytes, bytes]], deadline: float) -> None:
        while True:
            try:
                if self._producer is None:
                    self._producer = await self._start_producer()
                async with asyncio.timeout(12):
                    futures = [
                        await self._producer.send(f"{self.prefix}.{topic}", value=value, key=key)
                        for topic, key, value in part
                    ]
                    await asyncio.gather(*futures)
                return
            except Exception as exc:
                self.retries.append(f"{type(exc).__name__}: {exc}"[:200])
                await self._drop(self._producer)
                self._producer = None
                if now_s() > deadline:
                    raise AssertionError(
                        f"the stream could not be published ({self.sent} of "
                        f"{len(self.items)} sent); last errors: {self.retries[-3:]}"
                    ) from exc
                await asyncio.sleep(1.0)


# ---- operators: the HTTP traffic ---------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    at: float  # monotonic time the request was sent
    done: float  # ... and answered (or failed)
    service: str
    op: str
    status: int | None  # None: no HTTP answer (connection refused or dropped, timeout)
    detail: str


# The answers each operation may get while nothing is wrong (404: a customer the service has
# not heard of yet, or a reservation or override already gone; 409: decided, resolved or
# ended meanwhile). Anything else — a 500 above all — is a finding.
EXPECTED: dict[str, frozenset[int]] = {
    "check": frozenset({200}),
    "quote": frozenset({200}),
    "release": frozenset({204, 404}),
    "request": frozenset({201, 404}),
    "approve": frozenset({200, 404, 409}),
    "reject": frozenset({200, 404, 409}),
    "self-approve": frozenset({403}),
    "hold": frozenset({200, 404}),
    "unhold": frozenset({200, 404}),
    "override": frozenset({201, 404}),
    "withdraw": frozenset({200, 404}),
    "alerts": frozenset({200}),
    "ack": frozenset({200, 404, 409}),
}
SERVICE_OF = {
    "check": "limits",
    "quote": "limits",
    "release": "limits",
    "request": "limits",
    "approve": "limits",
    "reject": "limits",
    "self-approve": "limits",
    "hold": "limits",
    "unhold": "limits",
    "override": "assessment",
    "withdraw": "assessment",
    "alerts": "alerts",
    "ack": "alerts",
}
DEFAULT_MIX = {
    "check": 28,
    "quote": 7,
    "release": 7,
    "request": 11,
    "decide": 11,
    "self-approve": 2,
    "hold": 4,
    "unhold": 4,
    "override": 5,
    "withdraw": 3,
    "ack": 8,
}
MAKER_CHECKER_MIX = {
    "check": 10,
    "quote": 2,
    "release": 3,
    "request": 30,
    "decide": 30,
    "self-approve": 4,
    "hold": 4,
    "unhold": 4,
    "override": 4,
    "withdraw": 2,
    "ack": 4,
}


def rfc3339(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


class Operators:
    """Order entry, an analyst, an approver and an alert desk at work, seeded.

    Which operation comes next, on which customer and with which figures is drawn from the
    seed; what the services answer steers only the follow-ups (an order approved can be
    released, a pending request decided)."""

    def __init__(
        self,
        urls: dict[str, str],
        customers: list[str],
        seed: int,
        *,
        mix: dict[str, int] | None = None,
        order_prefix: str = "FO",
    ) -> None:
        self.urls = urls
        self.customers = customers
        self.rng = random.Random(seed)
        mix = mix or DEFAULT_MIX
        self.ops = list(mix)
        self.weights = [mix[o] for o in self.ops]
        self.order_prefix = order_prefix
        self.answers: list[Answer] = []
        self.reserved: list[str] = []  # orders approved with a reservation
        self.pending: list[str] = []  # limit requests awaiting a decision
        self.latest_expiry = datetime.now(UTC)  # of a temporary limit or override asked
        self.orders = 0
        # No keep-alive: a connection to a process killed since would fail on reuse.
        self._client = httpx.AsyncClient(
            timeout=10, limits=httpx.Limits(max_keepalive_connections=0)
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def call(
        self, op: str, method: str, path: str, token: str, body: dict[str, Any] | None = None
    ) -> httpx.Response | None:
        service = SERVICE_OF[op]
        sent = now_s()
        try:
            response = await self._client.request(
                method,
                self.urls[service] + path,
                json=body,
                headers={"Authorization": f"Bearer {token}"},
            )
        except httpx.HTTPError as exc:
            failure = f"{type(exc).__name__}: {exc}"
            self.answers.append(Answer(sent, now_s(), service, op, None, failure))
            return None
        self.answers.append(
            Answer(sent, now_s(), service, op, response.status_code, response.text[:300])
        )
        return response

    async def run(self, stop: asyncio.Event, *, every: float = 0.06) -> None:
        while not stop.is_set():
            await self.step()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)

    async def step(self) -> None:
        op = self.rng.choices(self.ops, self.weights)[0]
        cid = self.rng.choice(self.customers)
        await getattr(self, "_" + op.replace("-", "_"))(cid)

    # ---- order entry -------------------------------------------------------------------------
    def _amount(self) -> str:
        whole = self.rng.choice([150, 400, 900, 2500, 6000, 15000, 40000])
        return f"{whole}.{self.rng.randint(0, 99):02d}"

    async def _check(self, cid: str, *, reserve: bool = True) -> None:
        self.orders += 1
        order = f"{self.order_prefix}-{self.orders:05d}"
        body = {
            "order_id": order,
            "customer_id": cid,
            "amount": self._amount(),
            "currency": "EUR",
            "reserve": reserve,
        }
        response = await self.call(
            "check" if reserve else "quote", "POST", "/v1/credit-checks", CHECK, body
        )
        if (
            reserve
            and response is not None
            and response.status_code == 200
            and response.json().get("decision") == "approved"
        ):
            self.reserved.append(order)

    async def _quote(self, cid: str) -> None:
        await self._check(cid, reserve=False)

    async def _release(self, cid: str) -> None:
        if not self.reserved:
            return await self._check(cid)
        order = self.reserved.pop(self.rng.randrange(len(self.reserved)))
        await self.call("release", "DELETE", f"/v1/credit-checks/{order}", CHECK)
        return None

    # ---- maker–checker ------------------------------------------------------------------------
    async def _request(self, cid: str) -> None:
        amount = self.rng.choice([5000, 12000, 25000, 40000, 60000, 90000, 150000])
        body: dict[str, Any] = {
            "requested_limit": f"{amount}.00",
            "reason": f"fault suite: limit for {cid}",
        }
        if self.rng.random() < 0.4:
            ends = datetime.now(UTC) + timedelta(seconds=self.rng.uniform(4, 12))
            body["expires_at"] = rfc3339(ends)
            self.latest_expiry = max(self.latest_expiry, ends)
        response = await self.call(
            "request", "POST", f"/v1/customers/{cid}/limit-requests", WRITE, body
        )
        # A decrease applies at once (201, approved): only an increase waits for a checker.
        if (
            response is not None
            and response.status_code == 201
            and response.json()["status"] == "pending"
        ):
            self.pending.append(response.json()["request_id"])

    async def _decide(self, cid: str) -> None:
        if not self.pending:
            return await self._request(cid)
        request_id = self.pending.pop(self.rng.randrange(len(self.pending)))
        verdict = "approve" if self.rng.random() < 0.7 else "reject"
        await self.call(
            verdict,
            "POST",
            f"/v1/limit-requests/{request_id}/{verdict}",
            APPROVE,
            {"note": f"fault suite: {verdict}d"},
        )
        return None

    async def _self_approve(self, cid: str) -> None:
        """The maker may not be the checker: the analyst approving its own request."""
        if not self.pending:
            return await self._request(cid)
        request_id = self.rng.choice(self.pending)
        await self.call("self-approve", "POST", f"/v1/limit-requests/{request_id}/approve", WRITE)
        return None

    # ---- holds and grades --------------------------------------------------------------------
    async def _hold(self, cid: str) -> None:
        await self.call(
            "hold", "POST", f"/v1/customers/{cid}/hold", WRITE, {"reason": "fault suite: hold"}
        )

    async def _unhold(self, cid: str) -> None:
        await self.call("unhold", "DELETE", f"/v1/customers/{cid}/hold", WRITE)

    async def _override(self, cid: str) -> None:
        body: dict[str, Any] = {
            "grade": self.rng.choice(GRADES),
            "reason": "fault suite: analyst's judgement",
        }
        if self.rng.random() < 0.5:
            ends = datetime.now(UTC) + timedelta(seconds=self.rng.uniform(4, 12))
            body["expires_at"] = rfc3339(ends)
            self.latest_expiry = max(self.latest_expiry, ends)
        await self.call("override", "POST", f"/v1/customers/{cid}/assessment/override", WRITE, body)

    async def _withdraw(self, cid: str) -> None:
        await self.call("withdraw", "DELETE", f"/v1/customers/{cid}/assessment/override", WRITE)

    # ---- the alert desk ----------------------------------------------------------------------
    async def _ack(self, _cid: str) -> None:
        response = await self.call("alerts", "GET", "/v1/alerts?status=open&limit=50", READ)
        if response is None or response.status_code != 200:
            return
        items = response.json()["items"]
        if items:
            alert = self.rng.choice(items)
            await self.call(
                "ack",
                "POST",
                f"/v1/alerts/{alert['alert_id']}/acknowledge",
                ALL,
                {"note": "fault suite: on it"},
            )

    # ---- what was seen ------------------------------------------------------------------------
    def summary(self) -> str:
        seen = Counter((a.op, a.status) for a in self.answers)
        return ", ".join(f"{op}:{status}×{n}" for (op, status), n in sorted(seen.items(), key=str))


@dataclass
class Window:
    """A stretch of time in which some answers are expected: ``down`` (no HTTP answer from
    ``service``: it was killed and is starting again) or ``database`` (503 from anyone)."""

    kind: str
    service: str | None
    start: float
    end: float = float("inf")

    def covers(self, answer: Answer) -> bool:
        # In flight at some moment of the window (a request sent just before a kill is
        # dropped by it).
        if answer.done < self.start or answer.at > self.end:
            return False
        if self.kind == "down":
            return answer.service == self.service and answer.status is None
        return answer.status == 503


def unexpected_answers(answers: Iterable[Answer], windows: Iterable[Window]) -> list[Answer]:
    spans = list(windows)
    return [
        a for a in answers if a.status not in EXPECTED[a.op] and not any(w.covers(a) for w in spans)
    ]


def describe(
    answers: list[Answer], windows: Iterable[Window] = (), *, since: float = 0.0, limit: int = 15
) -> str:
    """What went wrong, with times in seconds from ``since`` (and the windows, so a reader
    can tell "just after" from "nowhere near")."""
    kinds = Counter((a.service, a.op, a.status) for a in answers)
    lines = [f"  {n}× {svc} {op} -> {status}" for (svc, op, status), n in kinds.most_common()]
    lines += [
        f"  e.g. {a.op} sent at {a.at - since:.1f}s, answered at {a.done - since:.1f}s -> "
        f"{a.status}: {a.detail[:200]}"
        for a in answers[:limit]
    ]
    lines += [
        f"  window {w.kind} {w.service or ''}: {w.start - since:.1f}s to {w.end - since:.1f}s"
        for w in windows
    ]
    return "\n".join(lines)


# ---- liveness and readiness, throughout ---------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    at: float
    round: int  # the polling round: /healthz and /readyz of one round are asked together
    service: str
    path: str  # /healthz or /readyz
    status: int | None
    failing: tuple[str, ...]


class Monitor:
    """Polls every service's ``/healthz`` and ``/readyz`` twice a second."""

    def __init__(self, urls: dict[str, str]) -> None:
        self.urls = urls
        self.probes: list[Probe] = []
        self._client = httpx.AsyncClient(
            timeout=5, limits=httpx.Limits(max_keepalive_connections=0)
        )

    async def run(self, stop: asyncio.Event, every: float = 0.5) -> None:
        try:
            rounds = 0
            while not stop.is_set():
                rounds += 1
                await asyncio.gather(
                    *(
                        self._probe(rounds, svc, path)
                        for svc in self.urls
                        for path in ("/healthz", "/readyz")
                    )
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), every)
        finally:
            await self._client.aclose()

    async def _probe(self, rounds: int, service: str, path: str) -> None:
        at = now_s()
        try:
            response = await self._client.get(self.urls[service] + path)
        except httpx.HTTPError:
            self.probes.append(Probe(at, rounds, service, path, None, ()))
            return
        failing: tuple[str, ...] = ()
        if response.status_code != 200:
            with contextlib.suppress(Exception):
                failing = tuple(response.json().get("failing") or ())
        self.probes.append(Probe(at, rounds, service, path, response.status_code, failing))

    def alive_while_dead(self, service: str) -> list[int]:
        """Rounds in which /readyz said a background loop of ``service`` had ended while
        /healthz still said it was alive: a process whose consumer died must be restarted,
        and only a failing /healthz gets it restarted."""
        dead = {
            p.round
            for p in self.probes
            if p.service == service and p.path == "/readyz" and "loops" in p.failing
        }
        return sorted(
            p.round
            for p in self.probes
            if p.service == service and p.path == "/healthz" and p.status == 200 and p.round in dead
        )

    def latest(self, path: str) -> dict[str, int | None]:
        """What each service's ``path`` answered last (None: nothing answered)."""
        return {p.service: p.status for p in self.probes if p.path == path}

    def of(
        self, service: str, path: str, start: float = 0.0, end: float = float("inf")
    ) -> list[Probe]:
        return [
            p
            for p in self.probes
            if p.service == service and p.path == path and start <= p.at <= end
        ]


# ---- the system under test -------------------------------------------------------------------


class FaultSystem:
    """The three services as processes on a database and a topic prefix of their own, the
    workload streaming in, operators at work, the monitor polling; and the end checks."""

    def __init__(
        self,
        log_dir: Path,
        server_url: str,
        bootstrap: str,
        work: Workload,
        *,
        stream_seconds: float,
        mix: dict[str, int] | None = None,
    ) -> None:
        self.work = work
        self.bootstrap = bootstrap
        self.stack = Stack(log_dir, server_url, bootstrap, **SERVICE_ENV)
        self.procs: dict[str, ServiceProcess] = self.stack.procs
        urls = {svc: self.stack.url(svc) for svc in SERVICES}
        self.stream = Stream(bootstrap, self.stack.prefix, work.items, seconds=stream_seconds)
        self.operators = Operators(urls, work.worked, work.seed, mix=mix)
        self.monitor = Monitor(urls)
        self.windows: list[Window] = []
        self.started = now_s()
        self.problems: list[str] = []
        self._stop_traffic = asyncio.Event()
        self._stop_monitor = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stream_task: asyncio.Task[None] | None = None

    @property
    def prefix(self) -> str:
        return self.stack.prefix

    def topic(self, name: str) -> str:
        return self.stack.topic(name)

    def logs(self, lines: int = 30) -> str:
        return self.stack.logs(lines)

    # ---- given -------------------------------------------------------------------------------
    async def start(self, within: float = 120.0) -> FaultSystem:
        await e2e.create_topics(self.bootstrap, self.prefix, PARTITIONS)
        await self.stack.start(within)
        self._tasks.append(asyncio.create_task(self.monitor.run(self._stop_monitor)))
        self.mark(f"services ready ({len(self.work.items)} events to stream)")
        return self

    async def begin(self) -> None:
        """Start streaming the history; the operators start once the customers are known."""
        self._stream_task = asyncio.create_task(self.stream.run())
        await self.customers_known()
        self._tasks.append(asyncio.create_task(self.operators.run(self._stop_traffic)))
        self.mark("customers registered; operators at work")

    async def customers_known(self, within: float = 90.0) -> None:
        """Registrations come first in the stream: wait until both services that answer
        for customers have consumed them."""
        want = len(self.work.customers)
        limits_customers = importlib.import_module("services.limits.store").customers
        assessment_customers = importlib.import_module("services.assessment.store").customers

        async def known() -> bool:
            async with self.stack.engine.connect() as conn:
                counts = [
                    (await conn.execute(select(func.count()).select_from(t))).scalar_one()
                    for t in (limits_customers, assessment_customers)
                ]
            return all(n >= want for n in counts)

        await wait_until("every customer to be registered", known, within=within, detail=self.logs)

    # ---- when --------------------------------------------------------------------------------
    async def finish_stream(self, within: float = 240.0) -> None:
        """Wait for the whole history to be published, then stop the operators."""
        assert self._stream_task is not None, "begin() first"
        try:
            async with asyncio.timeout(within):
                await self._stream_task
        except TimeoutError:
            raise AssertionError(
                f"the stream was not published within {within:.0f}s "
                f"({self.stream.sent} of {len(self.work.items)}; retries {self.stream.retries[-3:]})"
            ) from None
        await self.stop_traffic()

    async def stop_traffic(self) -> None:
        self._stop_traffic.set()
        await asyncio.sleep(0)

    async def kill(self, service: str) -> Window:
        """SIGKILL a service and start it again at once (not waiting until it is ready)."""
        proc = self.procs[service]
        window = Window("down", service, now_s())
        self.windows.append(window)
        await asyncio.to_thread(proc.kill)
        proc.start()
        return window

    async def ready_again(self, service: str, window: Window, within: float = 90.0) -> None:
        await asyncio.to_thread(self.procs[service].wait_ready, within)
        window.end = now_s() + 1.0

    # ---- then --------------------------------------------------------------------------------
    async def lag(self) -> dict[str, Any]:
        """What each service still has to do: partitions whose stored offset is not the
        topic's end offset, and rows waiting in its outbox (empty: all done)."""
        topics = {svc: [self.topic(t) for t in INPUTS[svc]] for svc in SERVICES}
        ends = await e2e.end_offsets(
            self.bootstrap, sorted({t for ts in topics.values() for t in ts})
        )
        behind: dict[str, Any] = {}
        async with self.stack.engine.connect() as conn:
            for svc in SERVICES:
                core = core_of(svc)
                mine = {k: v for k, v in ends.items() if k[0] in topics[svc]}
                stored = await es.load_offsets(conn, core, mine.keys())
                off = {
                    f"{t[len(self.prefix) + 1 :]}[{p}]": f"{stored.get((t, p), 0)}/{end}"
                    for (t, p), end in mine.items()
                    if stored.get((t, p), 0) != end
                }
                pending = await es.count_outbox(conn, core)
                if off or pending:
                    behind[svc] = {"partitions": off, "outbox": pending}
        return behind

    async def settled(self, within: float = 180.0) -> None:
        """Lag 0: every service applied everything on its input topics (its stored offsets
        are the end offsets), every outbox is empty — twice in a row, a second apart, so
        that nothing was still on its way between services — and every /readyz is 200."""
        for proc in self.procs.values():
            assert proc.proc is not None and proc.proc.poll() is None, (
                f"{proc.service} is not running:\n{proc.tail()}"
            )
        # Temporary limits and overrides asked for must have expired (the scheduler records
        # that), so nothing changes under verify.
        wait = (self.operators.latest_expiry - datetime.now(UTC)).total_seconds() + 1.5
        if wait > 0:
            await asyncio.sleep(wait)
        deadline = now_s() + within
        quiet = 0
        last: dict[str, Any] = {}
        while quiet < 2:
            try:
                last = await self.lag()
                quiet = quiet + 1 if not last else 0
            except Exception as exc:
                last = {"error": f"{type(exc).__name__}: {exc}"}
                quiet = 0
            if now_s() > deadline:
                # A service that stopped consuming must not pass for alive: say what its
                # /healthz said meanwhile.
                raise AssertionError(
                    f"lag did not reach 0 within {within:.0f}s; still to do: {last}; "
                    f"/healthz now: {self.monitor.latest('/healthz')}\n{self.logs()}"
                )
            await asyncio.sleep(1.0)
        for svc in SERVICES:
            await self.ready(svc, within=max(deadline - now_s(), 10))

    async def ready(self, service: str, within: float = 60.0) -> None:
        url = self.stack.url(service) + "/readyz"
        said: list[str] = []

        async def ok() -> bool:
            async with httpx.AsyncClient(timeout=5) as client:
                response = await client.get(url)
            said[:] = [f"{response.status_code} {response.text[:300]}"]
            return response.status_code == 200

        await wait_until(
            f"{service} /readyz 200",
            ok,
            within=within,
            detail=lambda: f"/readyz said: {said}\n{self.logs()}",
        )

    async def all_ready_again(self, within: float) -> bool:
        """Whether every service answers /readyz 200 again within ``within`` (all waited for
        at once); one that does not is noted as a problem."""
        outcomes = await asyncio.gather(
            *(self.ready(svc, within=within) for svc in SERVICES), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                self.problems.append(str(outcome))
        return not any(isinstance(outcome, BaseException) for outcome in outcomes)

    def give_up_unless(self, ok: bool) -> None:
        """Stop the case here, with every problem noted so far, unless ``ok`` (a service
        that never got ready again leaves nothing after this to judge)."""
        if not ok:
            self._note_dishonest_liveness()
            self._note_unexpected_answers()
            assert not self.problems, "\n\n".join(self.problems)

    def _note_dishonest_liveness(self) -> None:
        for svc in SERVICES:
            lied = self.monitor.alive_while_dead(svc)
            # One round may straddle the moment a loop ends; a dead loop stays dead.
            self.expect(
                len(lied) < 2,
                f"{svc} /healthz said alive in {len(lied)} polling rounds while /readyz said "
                f"its background loops had ended",
            )

    def _note_unexpected_answers(self) -> None:
        wrong = self.unexpected()
        self.expect(
            not wrong,
            f"unexpected HTTP answers:\n{describe(wrong, self.windows, since=self.started)}",
        )

    async def verify(self, service: str, within: float = 180.0) -> subprocess.CompletedProcess[str]:
        return await cli(self.stack.env, "verify", service, within=within)

    async def outputs(self) -> dict[str, list[dict[str, Any]]]:
        """Every record of the output topics and the dead-letter topic, in partition order."""
        return await read_topics(
            self.bootstrap, [self.topic(t) for t in (*OUTPUTS, "credit.dlq")], self.prefix
        )

    async def nothing_lost(self) -> None:
        """No output event was lost, doubled into two versions, or dead-lettered:

        * each service stored every simulator event it consumes, once;
        * every assessment it holds is on credit.assessments; every limit change limits
          recorded is on credit.limits; the last exposure.updated of each customer on
          credit.exposure is the one limits last published; every change of every alert is
          on credit.alerts; the topics hold nothing more;
        * an event id published twice (at least once) carries the same content both times;
        * nothing went to credit.dlq."""
        records = await self.outputs()
        problems: list[str] = []
        dead = records.pop("credit.dlq")
        if dead:
            reasons = Counter(
                (str(r.get("data", {}).get("service")), str(r.get("data", {}).get("reason")))
                for r in dead
            )
            problems.append(f"{len(dead)} dead letters: {dict(reasons)}; e.g. {dead[0]}")
        for topic, events in records.items():
            versions: dict[str, set[str]] = defaultdict(set)
            for e in events:
                versions[e["id"]].add(json.dumps(e, sort_keys=True))
            doubled = [i for i, v in versions.items() if len(v) > 1]
            if doubled:
                problems.append(
                    f"{topic}: {len(doubled)} ids published with different content, e.g. {doubled[:3]}"
                )
        ids = {t: {e["id"] for e in records[t]} for t in records}

        a_store = importlib.import_module("services.assessment.store")
        l_store = importlib.import_module("services.limits.store")
        al_store = importlib.import_module("services.alerts.store")
        async with self.stack.engine.connect() as conn:
            stored = {}
            for svc in SERVICES:
                ev_table = core_of(svc).events
                stored[svc] = (
                    await conn.execute(
                        select(func.count())
                        .select_from(ev_table)
                        .where(ev_table.c.source.like("/sim/%"))
                    )
                ).scalar_one()
            assessments = {
                r[0] for r in await conn.execute(select(a_store.assessments.c.assessment_id))
            }
            limit_changes = {
                f"limit-{r.customer_id}-{r.seq}"
                for r in await conn.execute(
                    select(l_store.limit_history.c.customer_id, l_store.limit_history.c.seq)
                )
            }
            published = {
                r.customer_id: json.loads(r.published)
                for r in await conn.execute(
                    select(l_store.customers.c.customer_id, l_store.customers.c.published)
                )
                if r.published is not None
            }
            alert_changes = {
                f"{r.alert_id}-{r.seq}"
                for r in await conn.execute(
                    select(al_store.history.c.alert_id, al_store.history.c.seq)
                )
            }
        for svc in SERVICES:
            if stored[svc] != self.work.expected_stored[svc]:
                problems.append(
                    f"{svc} stored {stored[svc]} simulator events, expected "
                    f"{self.work.expected_stored[svc]}"
                )
        problems += _compare("credit.assessments", assessments, ids["credit.assessments"])
        problems += _compare("credit.limits", limit_changes, ids["credit.limits"])
        problems += _compare("credit.alerts", alert_changes, ids["credit.alerts"])
        last: dict[str, dict[str, Any]] = {}
        for e in records["credit.exposure"]:
            last[e["subject"]] = e["data"]  # a customer's records share its partition: in order

        def strip(body: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in body.items() if k != "as_of"}  # as_of moves, figures not

        stale = sorted(c for c in published if strip(last.get(c, {})) != strip(published[c]))
        unknown = sorted(set(last) - set(published))
        if stale or unknown:
            problems.append(
                f"credit.exposure: last exposure.updated differs from limits' projection for "
                f"{stale[:5]} ({len(stale)} customers); on the topic, not in the projection: "
                f"{unknown[:5]}"
            )
        assert not problems, "output events lost or wrong:\n" + "\n".join(problems)

    def expect(self, ok: object, problem: str) -> None:
        """A check whose failure is reported with all the others at the end of the case (a
        case shows every way the system failed, not only the first)."""
        if not ok:
            self.problems.append(problem)

    def mark(self, what: str) -> None:
        """Note a moment of the case (printed, so a failing case shows its timeline)."""
        print(f"[faults {self.prefix}] {now_s() - self.started:6.1f}s {what}", flush=True)

    async def assert_came_through(self) -> None:
        """The end conditions of every case, checked together with what ``expect`` noted:
        lag 0, outboxes empty and every service ready (without that nothing else can be
        judged, so it fails at once), then ``creditwatch verify`` for each service, no output
        event lost, and every HTTP request answered as it should have been."""
        await self.settled()
        self.mark("settled: lag 0, outboxes empty, all ready")
        verified = await asyncio.gather(*(self.verify(svc) for svc in SERVICES))
        for svc, done in zip(SERVICES, verified, strict=True):
            self.expect(
                done.returncode == 0, f"verify {svc} exited {done.returncode}:\n{output_tail(done)}"
            )
        self.mark(f"verified: {dict(zip(SERVICES, [d.returncode for d in verified], strict=True))}")
        try:
            await self.nothing_lost()
        except AssertionError as exc:
            self.problems.append(str(exc))
        self._note_dishonest_liveness()
        self._note_unexpected_answers()
        self.mark(f"checked; operators: {self.operators.summary()}")
        assert not self.problems, "\n\n".join(self.problems)

    def unexpected(self) -> list[Answer]:
        return unexpected_answers(self.operators.answers, self.windows)

    async def probe_every_service_publishes(self, probe: str, within: float = 60.0) -> None:
        """An analyst overrides ``probe`` (a good payer the operators leave alone) to the
        worst grade: assessment publishes the assessment, limits the limit it leads to, and
        alerts the downgrade — each seen on its topic after this moment."""
        marks = await e2e.end_offsets(self.bootstrap, [self.topic(t) for t in OUTPUTS])
        async with httpx.AsyncClient(timeout=15) as client:
            response = await client.post(
                f"{self.stack.url('assessment')}/v1/customers/{probe}/assessment/override",
                json={"grade": WORST_GRADE, "reason": "fault suite: probe after the fault"},
                headers={"Authorization": f"Bearer {WRITE}"},
            )
        assert response.status_code == 201, (response.status_code, response.text)
        wanted = {
            "assessment": ("credit.assessments", None),
            "limits": ("credit.limits", None),
            "alerts": ("credit.alerts", "grade_downgrade"),
        }
        for svc, (topic, rule) in wanted.items():

            async def seen(topic: str = topic, rule: str | None = rule) -> bool:
                after = await read_topics(
                    self.bootstrap, [self.topic(topic)], self.prefix, since=marks
                )
                return any(
                    e["subject"] == probe and (rule is None or e["data"].get("rule") == rule)
                    for e in after[topic]
                )

            await wait_until(
                f"{svc} to publish on {topic} for {probe} after the fault",
                seen,
                within=within,
                every=0.5,
                detail=self.logs,
            )

    async def close(self) -> dict[str, int | None]:
        self._stop_traffic.set()
        self._stop_monitor.set()
        tasks = list(self._tasks)
        if self._stream_task is not None and not self._stream_task.done():
            self._stream_task.cancel()
            tasks.append(self._stream_task)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(20):
                await asyncio.gather(*tasks, return_exceptions=True)
        await self.operators.close()
        return await self.stack.stop()


def _compare(topic: str, stored: set[str], seen: set[str]) -> list[str]:
    missing, extra = sorted(stored - seen), sorted(seen - stored)
    out = []
    if missing:
        out.append(f"{topic}: {len(missing)} stored but never published, e.g. {missing[:5]}")
    if extra:
        out.append(f"{topic}: {len(extra)} published but not stored, e.g. {extra[:5]}")
    return out


@contextlib.asynccontextmanager
async def running_system(
    log_dir: Path,
    server_url: str,
    bootstrap: str,
    work: Workload,
    *,
    stream_seconds: float,
    mix: dict[str, int] | None = None,
) -> AsyncIterator[FaultSystem]:
    system = FaultSystem(
        log_dir, server_url, bootstrap, work, stream_seconds=stream_seconds, mix=mix
    )
    try:
        await system.start()
        yield system
    finally:
        await system.close()


# ---- the command line ----------------------------------------------------------------------------


async def cli(
    env: dict[str, str], *args: str, within: float = 180.0
) -> subprocess.CompletedProcess[str]:
    """``creditwatch <args>`` as a process with the case's environment."""
    argv = [sys.executable, "-m", "tools.cli", *args]
    try:
        return await asyncio.to_thread(
            subprocess.run,
            argv,
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=within,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(
            f"`creditwatch {' '.join(args)}` did not finish within {within:.0f}s"
        ) from exc


def output_tail(done: subprocess.CompletedProcess[str], lines: int = 25) -> str:
    """The last lines a command printed (stdout, then stderr)."""
    text = (done.stdout or "") + (done.stderr or "")
    return "\n".join(text.splitlines()[-lines:])


# ---- Kafka reading -----------------------------------------------------------------------------


async def read_topics(
    bootstrap: str,
    topics: list[str],
    prefix: str,
    *,
    since: dict[tuple[str, int], int] | None = None,
    within: float = 60.0,
) -> dict[str, list[dict[str, Any]]]:
    """Every record of ``topics`` (full names) from ``since`` (default: the beginning) up to
    their end offsets now, as decoded JSON, per contract topic name, in partition order."""
    cut = len(prefix) + 1
    out: dict[str, list[dict[str, Any]]] = {t[cut:]: [] for t in topics}
    ends = await e2e.end_offsets(bootstrap, topics)
    starts = since or {}
    todo = {tp: end for tp, end in ends.items() if end > starts.get(tp, 0)}
    if not todo:
        return out
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(t, p) for t, p in todo]
        consumer.assign(parts)
        for tp in parts:
            consumer.seek(tp, starts.get((tp.topic, tp.partition), 0))
        got: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
        position = {tp: starts.get(tp, 0) for tp in todo}
        deadline = now_s() + within
        while any(position[tp] < end for tp, end in todo.items()):
            if now_s() > deadline:
                raise AssertionError(f"could not read {topics} to their ends within {within:.0f}s")
            batch = await consumer.getmany(timeout_ms=500)
            for tp, messages in batch.items():
                key = (tp.topic, tp.partition)
                for m in messages:
                    if m.offset < todo[key]:
                        got[key].append(json.loads(m.value))
                    position[key] = m.offset + 1
    finally:
        await consumer.stop()
    for (topic, _p), events in sorted(got.items()):
        out[topic[cut:]] += events
    return out


# ---- log volume --------------------------------------------------------------------------------


class LogMark:
    """Where each service's log stood at a moment: ``lines_since`` counts what came after."""

    def __init__(self, procs: dict[str, ServiceProcess]) -> None:
        self.procs = procs
        self.offsets = {svc: _size(p.log_path) for svc, p in procs.items()}

    def lines_since(self) -> dict[str, int]:
        out = {}
        for svc, p in self.procs.items():
            with p.log_path.open("rb") as log:
                log.seek(self.offsets[svc])
                out[svc] = log.read().count(b"\n")
        return out

    def text_since(self, service: str, lines: int = 20) -> str:
        with self.procs[service].log_path.open("rb") as log:
            log.seek(self.offsets[service])
            text = log.read().decode(errors="replace")
        return "\n".join(text.splitlines()[:lines])


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


__all__ = [
    "DEFAULT_MIX",
    "EXPECTED",
    "GRADES",
    "INPUTS",
    "MAKER_CHECKER_MIX",
    "SERVICES",
    "Answer",
    "FaultSystem",
    "LogMark",
    "Monitor",
    "Operators",
    "Stream",
    "Window",
    "Workload",
    "cli",
    "describe",
    "now_s",
    "output_tail",
    "read_topics",
    "rfc3339",
    "running_system",
    "unexpected_answers",
    "wait_until",
    "workload",
]
