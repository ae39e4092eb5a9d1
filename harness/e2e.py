"""Shared harness of the end-to-end tests: the services as real OS processes on one database
and one set of prefixed topics, a tap on their output topics, event builders and waits.

Everything here talks to the system from the outside, as another team would: CloudEvents on
Kafka, HTTP with bearer tokens, and (for convergence checks only) the services' own tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from sqlalchemy.ext.asyncio import AsyncEngine

from harness import servers
from harness.processes import ALL, ServiceProcess, service_env
from shared import eventstore as es
from shared.db import make_engine
from shared.events import TOPIC_OF_TYPE

# Contract topic → the settings' environment suffix (CREDITWATCH_TOPIC_<suffix>).
TOPIC_ENV = {
    "crm.customers": "CUSTOMERS",
    "ar.invoices": "INVOICES",
    "ar.payments": "PAYMENTS",
    "ar.overdue": "OVERDUE",
    "crm.financials": "FINANCIALS",
    "crm.credit-reports": "CREDIT_REPORTS",
    "credit.assessments": "ASSESSMENTS",
    "credit.limits": "LIMITS",
    "credit.exposure": "EXPOSURE",
    "credit.alerts": "ALERTS",
    "credit.dlq": "DLQ",
}
OUTPUT_TOPICS = (
    "credit.assessments",
    "credit.limits",
    "credit.exposure",
    "credit.alerts",
    "credit.dlq",
)
SERVICES = ("assessment", "limits", "alerts")


def topic_env(prefix: str) -> dict[str, str]:
    """Every topic of the contract under ``prefix.``, and consumer groups ``prefix-<service>``."""
    env = {f"CREDITWATCH_TOPIC_{suffix}": f"{prefix}.{name}" for name, suffix in TOPIC_ENV.items()}
    env["CREDITWATCH_CONSUMER_GROUP_PREFIX"] = prefix
    return env


def new_prefix() -> str:
    return f"e2e{uuid.uuid4().hex[:8]}"


# ---- time and events --------------------------------------------------------------------------


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def cloudevent(
    type_: str,
    subject: str,
    data: dict[str, Any],
    *,
    id: str,
    time: datetime | None = None,
    source: str = "/e2e/erp",
) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": id,
        "source": source,
        "type": type_,
        "subject": subject,
        "time": iso(time or utcnow()),
        "datacontenttype": "application/json",
        "data": data,
    }


def registered(
    cid: str, *, industry: str = "G", at: datetime | None = None, currency: str = "EUR"
) -> dict[str, Any]:
    return cloudevent(
        "customer.registered",
        cid,
        {
            "customer_id": cid,
            "name": f"Customer {cid}",
            "country": "DE",
            "industry": industry,
            "currency": currency,
            "payment_terms_days": 30,
        },
        id=f"reg-{cid}",
        time=at,
        source="/e2e/crm",
    )


def invoice(
    cid: str,
    inv: str,
    amount: str,
    *,
    issued: date,
    due: date,
    at: datetime | None = None,
    order_id: str | None = None,
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "invoice_id": inv,
        "customer_id": cid,
        "amount": amount,
        "currency": "EUR",
        "issue_date": issued.isoformat(),
        "due_date": due.isoformat(),
    }
    if order_id:
        data["order_id"] = order_id
    return cloudevent("invoice.issued", cid, data, id=f"inv-{inv}", time=at, source="/e2e/billing")


def payment(
    cid: str,
    pay: str,
    amount: str,
    *,
    received: date,
    allocations: list[tuple[str, str]] | None = None,
    at: datetime | None = None,
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "payment_id": pay,
        "customer_id": cid,
        "amount": amount,
        "currency": "EUR",
        "received_date": received.isoformat(),
    }
    if allocations:
        data["allocations"] = [{"invoice_id": i, "amount": a} for i, a in allocations]
    return cloudevent("payment.received", cid, data, id=f"pay-{pay}", time=at, source="/e2e/bank")


def reversed_payment(cid: str, pay: str, reason: str = "chargeback") -> dict[str, Any]:
    return cloudevent(
        "payment.reversed",
        cid,
        {"payment_id": pay, "customer_id": cid, "reason": reason},
        id=f"rev-{pay}",
        source="/e2e/bank",
    )


def dunning(
    cid: str, inv: str, amount: str, *, days: int, as_of: date, due: date, run: str
) -> dict[str, Any]:
    return cloudevent(
        "invoice.overdue",
        cid,
        {
            "invoice_id": inv,
            "customer_id": cid,
            "amount_overdue": amount,
            "currency": "EUR",
            "due_date": due.isoformat(),
            "days_overdue": days,
            "as_of": as_of.isoformat(),
        },
        id=f"dun-{inv}-{run}",
        source="/e2e/dunning",
    )


def statement(
    cid: str,
    sid: str,
    period_end: date,
    *,
    ca: str,
    ta: str,
    cl: str,
    tl: str,
    eq: str,
    re: str,
    rev: str,
    ebit: str,
    ie: str,
    ni: str,
    ocf: str,
    inventory: str = "0.00",
) -> dict[str, Any]:
    return cloudevent(
        "financial_statement.published",
        cid,
        {
            "statement_id": sid,
            "customer_id": cid,
            "period_end": period_end.isoformat(),
            "period_months": 12,
            "currency": "EUR",
            "audited": True,
            "balance_sheet": {
                "inventory": inventory,
                "current_assets": ca,
                "total_assets": ta,
                "current_liabilities": cl,
                "total_liabilities": tl,
                "equity": eq,
                "retained_earnings": re,
            },
            "income_statement": {
                "revenue": rev,
                "ebit": ebit,
                "interest_expense": ie,
                "net_income": ni,
            },
            "cash_flow": {"operating_cash_flow": ocf},
        },
        id=f"fs-{cid}-{sid}",
        source="/e2e/finance",
    )


def credit_report(
    cid: str,
    rid: str,
    *,
    score: int,
    legal: Iterable[tuple[str, date]] = (),
    defaults: int = 0,
    bureau: str = "CRIF",
    at: datetime | None = None,
) -> dict[str, Any]:
    when = at or utcnow()
    return cloudevent(
        "credit_report.received",
        cid,
        {
            "report_id": rid,
            "customer_id": cid,
            "bureau": bureau,
            "score": score,
            "score_min": 0,
            "score_max": 800,
            "delinquencies_12m": 0,
            "defaults": defaults,
            "legal_events": [{"type": t, "date": d.isoformat()} for t, d in legal],
            "reported_at": iso(when),
        },
        id=f"cr-{cid}-{rid}",
        time=when,
        source="/e2e/bureau",
    )


# ---- Kafka ----------------------------------------------------------------------------------


class Publisher:
    """Publishes contract events to the prefixed topic of their type, keyed by customer."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        self.prefix = prefix
        self.producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, acks="all", linger_ms=2, enable_idempotence=False
        )

    async def start(self) -> Publisher:
        await self.producer.start()
        return self

    async def stop(self) -> None:
        await self.producer.stop()

    def topic_of(self, event: dict[str, Any]) -> str:
        return f"{self.prefix}.{TOPIC_OF_TYPE[event['type']]}"

    async def send(self, *events: dict[str, Any]) -> None:
        """Send in order and wait for every acknowledgement."""
        futures = [
            await self.producer.send(
                self.topic_of(e), value=json.dumps(e).encode(), key=str(e["subject"]).encode()
            )
            for e in events
        ]
        await asyncio.gather(*futures)

    async def send_raw(self, items: Iterable[tuple[str, bytes, bytes]]) -> None:
        """(contract topic, key, value) records, in order."""
        futures = [
            await self.producer.send(f"{self.prefix}.{t}", value=v, key=k) for t, k, v in items
        ]
        await asyncio.gather(*futures)


@dataclass
class Seen:
    """One record of an output topic as the tap saw it."""

    topic: str  # the contract name (prefix stripped)
    key: str | None
    event: dict[str, Any]
    at: float  # time.monotonic() on arrival

    @property
    def type(self) -> str:
        return str(self.event["type"])

    @property
    def data(self) -> dict[str, Any]:
        data: dict[str, Any] = self.event["data"]
        return data


@dataclass
class Tap:
    """Reads the output topics from the beginning in the background, keeping every record."""

    bootstrap: str
    prefix: str
    topics: tuple[str, ...] = OUTPUT_TOPICS
    records: list[Seen] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _consumer: AIOKafkaConsumer | None = None

    async def start(self) -> Tap:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await consumer.start()
        parts: list[TopicPartition] = []
        for topic in self.topics:
            name = f"{self.prefix}.{topic}"
            found = consumer.partitions_for_topic(name)
            if not found:
                await consumer._client.force_metadata_update()
                found = consumer.partitions_for_topic(name) or set()
            assert found, f"topic {name} does not exist"
            parts += [TopicPartition(name, p) for p in sorted(found)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        self._consumer = consumer
        self._task = asyncio.create_task(self._run(consumer))
        return self

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        cut = len(self.prefix) + 1
        while True:
            batch = await consumer.getmany(timeout_ms=200)
            now = time.monotonic()
            for tp, messages in batch.items():
                for m in messages:
                    self.records.append(
                        Seen(
                            tp.topic[cut:],
                            m.key.decode() if m.key else None,
                            json.loads(m.value),
                            now,
                        )
                    )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()

    def of(
        self,
        topic: str,
        customer: str | None = None,
        type_: str | None = None,
        rule: str | None = None,
    ) -> list[Seen]:
        """Records of one topic (and customer, type, alert rule) in arrival order; the same
        event id twice (an at-least-once re-publication) is kept once."""
        out: list[Seen] = []
        ids: set[str] = set()
        for r in list(self.records):
            if r.topic != topic or (customer is not None and r.key != customer):
                continue
            if type_ is not None and r.type != type_:
                continue
            if rule is not None and r.data.get("rule") != rule:
                continue
            if r.event["id"] in ids:
                continue
            ids.add(r.event["id"])
            out.append(r)
        return out

    def alerts(self, customer: str, rule: str) -> list[Seen]:
        return self.of("credit.alerts", customer, rule=rule)

    async def wait_for(
        self,
        what: str,
        found: Callable[[], Any],
        within: float = 60.0,
        on_timeout: Callable[[], str] | None = None,
    ) -> Any:
        """Poll ``found()`` until it returns something truthy (and return that)."""
        deadline = time.monotonic() + within
        while True:
            if self._task is not None and self._task.done():
                self._task.result()  # the tap itself died: say why
            result = found()
            if result:
                return result
            if time.monotonic() > deadline:
                extra = f"\n{on_timeout()}" if on_timeout is not None else ""
                raise AssertionError(f"timed out after {within:.0f}s waiting for {what}{extra}")
            await asyncio.sleep(0.1)


async def create_topics(bootstrap: str, prefix: str, partitions: int = 3) -> None:
    await servers.create_topics_async(bootstrap, [f"{prefix}.{t}" for t in TOPIC_ENV], partitions)


async def end_offsets(bootstrap: str, topics: Iterable[str]) -> dict[tuple[str, int], int]:
    """The end offset of every non-empty partition of these (full-name) topics."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        tps = [
            TopicPartition(t, p)
            for t in topics
            for p in sorted(consumer.partitions_for_topic(t) or ())
        ]
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    return {(tp.topic, tp.partition): off for tp, off in ends.items() if off}


async def caught_up(
    engine: AsyncEngine, core: es.CoreTables, ends: dict[tuple[str, int], int]
) -> bool:
    """The service stored every offset up to ``ends`` and its outbox is empty."""
    async with engine.connect() as conn:
        stored = await es.load_offsets(conn, core, ends.keys())
        pending = await es.count_outbox(conn, core)
    return all(stored.get(k, 0) >= v for k, v in ends.items()) and pending == 0


# ---- the running system ---------------------------------------------------------------------


class Stack:
    """Some or all of the services as ``creditwatch serve`` processes sharing ONE database
    (each service has its own tables there) and one topic prefix."""

    def __init__(
        self,
        log_dir: Path,
        server_url: str,
        bootstrap: str,
        services: Iterable[str] = SERVICES,
        **extra_env: str,
    ) -> None:
        self.prefix = new_prefix()
        self.bootstrap = bootstrap
        self.database_url = servers.create_database(server_url)
        self.env = service_env(
            database_url=self.database_url,
            bootstrap=bootstrap,
            **topic_env(self.prefix),
            **extra_env,
        )
        self.procs = {name: ServiceProcess(name, self.env, log_dir) for name in services}
        self.engine = make_engine(self.database_url)

    def topic(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def url(self, service: str) -> str:
        return self.procs[service].url

    async def start(self, within: float = 90.0) -> Stack:
        await create_topics(self.bootstrap, self.prefix)
        for proc in self.procs.values():
            proc.start()
        await asyncio.gather(
            *(asyncio.to_thread(p.wait_ready, within) for p in self.procs.values())
        )
        return self

    async def stop(self) -> dict[str, int | None]:
        codes = dict(
            zip(
                self.procs,
                await asyncio.gather(*(asyncio.to_thread(p.stop) for p in self.procs.values())),
                strict=True,
            )
        )
        await self.engine.dispose()
        return codes

    def logs(self, lines: int = 40) -> str:
        return "\n".join(f"==== {name} ====\n{p.tail(lines)}" for name, p in self.procs.items())

    def client(self, service: str, token: str = ALL) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url(service), timeout=15, headers={"Authorization": f"Bearer {token}"}
        )
