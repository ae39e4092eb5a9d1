"""``creditwatch dev`` stopped and started again without ``--reset``: the embedded broker
comes back empty (it keeps its log in memory) under a new cluster id, while the services'
SQLite stores keep offsets into the old log. Events published after the restart must be
applied all the same — none skipped because the new log is shorter than the stored
offsets, none of the old ones counted twice when they are published again — every
consumer catches up with the new log, and a replay of each store matches its projections.

The broker runs on a free port (``CREDITWATCH_DEV_BROKER_PORT``), the services on free
ports, the stores in a fresh working directory."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner
from sqlalchemy import select

from harness.e2e import invoice, registered
from harness.servers import free_ports
from shared import eventstore as es
from shared.events import TOPIC_OF_TYPE
from shared.settings import load_settings
from tools import registry

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
TOKEN_LINE = re.compile(r"^\s+dev\s+(\S+)\s*$", re.MULTILINE)
CLUSTER_LINE = re.compile(r"cluster id (creditwatch-dev-[0-9a-f]{32})")
NEW_LOG_NOTICE = (
    "the embedded broker keeps nothing across restarts: its log starts empty; the services' "
    "stores are kept (use --reset to start empty); consumers read the new log from its start"
)
SERVICES = ("assessment", "limits", "alerts")
SIM_CUSTOMERS = [f"SIM-{n:04d}" for n in range(1, 6)]
NEW_INVOICE = "1234.56"


class Dev:
    """One ``creditwatch dev`` process, its output collected as it comes."""

    def __init__(self, cwd: Path, env: dict[str, str], log: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tools.cli", "dev"],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._pump, args=(log,), daemon=True)
        self.reader.start()

    def _pump(self, log: Path) -> None:
        assert self.proc.stdout is not None
        with log.open("a") as out:
            for raw in self.proc.stdout:
                text = raw.decode(errors="replace")
                self.lines.append(text)
                out.write(text)
                out.flush()

    def output(self) -> str:
        return "".join(self.lines)

    def wait(
        self,
        what: str,
        check: Callable[[], Any],
        within: float = 120.0,
        detail: Callable[[], object] | None = None,
    ) -> Any:
        """Poll ``check()`` until it returns something truthy (and return that)."""
        deadline = time.monotonic() + within
        last: object = None
        while True:
            code = self.proc.poll()
            assert code is None, f"dev exited with {code}:\n{self.output()[-4000:]}"
            try:
                result = check()
                last = detail() if detail is not None else result
            except (httpx.HTTPError, OSError) as exc:
                result, last = None, exc
            if result:
                return result
            assert time.monotonic() < deadline, (
                f"no {what} within {within:.0f}s (last: {last}):\n{self.output()[-4000:]}"
            )
            time.sleep(0.5)

    def stop(self) -> int:
        """Ctrl-C, as a user stops it."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            raise
        self.reader.join(5)
        return code


async def _cluster_id(bootstrap: str) -> str:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_cluster()
    finally:
        await admin.close()
    return str(described["cluster_id"])


async def _log_ends(bootstrap: str, topics: list[str]) -> dict[tuple[str, int], int]:
    """The end offset of every non-empty partition of ``topics``, as fetching sees it (the
    high watermark). Not ListOffsets: Tansu 0.6 answers that with the last record batch's
    base offset + 1, short of the end whenever that batch holds more than one record."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=50
    )
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        parts = [
            TopicPartition(t, p)
            for t in topics
            for p in sorted(consumer.partitions_for_topic(t) or ())
        ]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        deadline = time.monotonic() + 30
        while True:
            await consumer.getmany(timeout_ms=100, max_records=10_000)
            ends = {tp: consumer.highwater(tp) for tp in parts}
            positions = {tp: await consumer.position(tp) for tp in parts}
            if all(end is not None and positions[tp] >= end for tp, end in ends.items()):
                return {(tp.topic, tp.partition): end for tp, end in ends.items() if end}
            assert time.monotonic() < deadline, f"could not read to the end of {topics}"
    finally:
        await consumer.stop()


async def _lag(bootstrap: str, database_url: str) -> dict[str, Any]:
    """What each service has not applied of the log: every non-empty partition of its input
    topics whose stored offset is not the partition's end, and its outbox not yet
    published. Empty when everything is applied; end offsets read before and after the
    stores, so that output published meanwhile is not missed."""
    settings = load_settings(database_url=database_url, dev_mode=True)
    behind: dict[str, Any] = {}
    for name in SERVICES:
        core, engine = registry.core_for(name, settings)
        try:
            topics = core.service.input_topics()
            ends = await _log_ends(bootstrap, topics)
            async with engine.connect() as conn:
                stored = await es.load_offsets(conn, core.service.core, ends.keys())
                pending = await es.count_outbox(conn, core.service.core)
            if await _log_ends(bootstrap, topics) != ends:
                behind[name] = "the log grew while reading"
                continue
        finally:
            await engine.dispose()
        off = {f"{t}[{p}]": (stored.get((t, p)), end) for (t, p), end in ends.items()}
        off = {k: v for k, v in off.items() if v[0] != v[1]}
        if off or pending:
            behind[name] = {"stored vs end": off, "outbox": pending}
    return behind


async def _stored(database_url: str, name: str) -> dict[tuple[str, int], int]:
    """Every offset a service has stored."""
    settings = load_settings(database_url=database_url, dev_mode=True)
    core, engine = registry.core_for(name, settings)
    offsets = core.service.core.offsets
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                select(offsets.c.topic, offsets.c.partition, offsets.c.next_offset)
            )
            return {(r.topic, r.partition): r.next_offset for r in rows}
    finally:
        await engine.dispose()


async def _publish(bootstrap: str, events: list[dict[str, Any]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False)
    await producer.start()
    try:
        for event in events:
            await producer.send_and_wait(
                TOPIC_OF_TYPE[event["type"]],
                value=json.dumps(event).encode(),
                key=str(event["subject"]).encode(),
            )
    finally:
        await producer.stop()


def _simulate(env: dict[str, str], cwd: Path, bootstrap: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tools.cli", "simulate", "--customers", "5", "--months", "2"],
        cwd=cwd,
        env={**env, "CREDITWATCH_KAFKA_BOOTSTRAP": bootstrap},
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, (done.stdout + done.stderr).decode(errors="replace")[-3000:]


def test_events_published_after_a_restart_without_reset_are_all_applied(tmp_path: Path) -> None:
    assessment, limits, alerts, broker = free_ports(4)
    bootstrap = f"127.0.0.1:{broker}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDITWATCH_")}
    env.update(
        {
            "CREDITWATCH_ASSESSMENT_PORT": str(assessment),
            "CREDITWATCH_LIMITS_PORT": str(limits),
            "CREDITWATCH_ALERTS_PORT": str(alerts),
            "CREDITWATCH_DEV_BROKER_PORT": str(broker),
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
        }
    )
    database_url = f"sqlite+aiosqlite:///{tmp_path}/.creditwatch/{{service}}.db"
    log = tmp_path / "dev.log"

    def base(port: int) -> str:
        return f"http://127.0.0.1:{port}"

    def is_ready(port: int) -> bool:
        return httpx.get(f"{base(port)}/readyz", timeout=3).status_code == 200

    def ready(dev: Dev) -> dict[str, str]:
        match = dev.wait("dev token", lambda: TOKEN_LINE.search(dev.output()))
        for port in (assessment, limits, alerts):
            dev.wait(f"readiness on {port}", partial(is_ready, port))
        return {"Authorization": f"Bearer {match.group(1)}"}

    def caught_up(dev: Dev) -> None:
        behind: dict[str, Any] = {}

        def check() -> bool:
            behind.clear()
            behind.update(asyncio.run(_lag(bootstrap, database_url)))
            return not behind

        dev.wait("every consumer caught up with the log", check, detail=lambda: behind)

    def open_receivables(headers: dict[str, str], cid: str) -> Decimal | None:
        response = httpx.get(
            f"{base(limits)}/v1/customers/{cid}/exposure", headers=headers, timeout=5
        )
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return Decimal(response.json()["open_receivables"])

    def has_new_invoice(cid: str) -> bool:
        return open_receivables(headers, cid) == Decimal(NEW_INVOICE)

    def assessed_customer(cid: str) -> bool:
        url = f"{base(assessment)}/v1/customers/{cid}/assessments"
        return httpx.get(url, headers=headers, timeout=5).status_code == 200

    # Given dev ran once, with a simulated history applied by every service
    first = Dev(tmp_path, env, log)
    try:
        headers = ready(first)
        first_cluster = asyncio.run(_cluster_id(bootstrap))
        assert f"cluster id {first_cluster}" in first.output(), first.output()[-3000:]
        assert NEW_LOG_NOTICE not in first.output()  # nothing was kept: nothing to say
        _simulate(env, tmp_path, bootstrap)
        caught_up(first)
        before = {cid: open_receivables(headers, cid) for cid in SIM_CUSTOMERS}
        assert all(amount is not None for amount in before.values()), before
    finally:
        code = first.stop()
    assert code == 0, first.output()[-3000:]
    old = asyncio.run(_stored(database_url, "limits"))

    # When it is started again without --reset: a new, empty log under a new cluster id
    second = Dev(tmp_path, env, log)
    try:
        headers = ready(second)
        second_cluster = asyncio.run(_cluster_id(bootstrap))
        assert second_cluster != first_cluster
        assert CLUSTER_LINE.search(second.output()) is not None
        assert f"cluster id {second_cluster}" in second.output(), second.output()[-3000:]
        assert NEW_LOG_NOTICE in second.output(), second.output()[-3000:]

        # and new customers are published, each on an invoices partition whose stored
        # offset lies past where its events land in the new log
        partitions = sorted({p for (t, p) in old if t == "ar.invoices"})
        behind_new_end = [p for p in partitions if old.get(("ar.invoices", p), 0) >= 2]
        assert len(behind_new_end) >= 2, old
        partitioner = DefaultPartitioner()
        count = max(partitions) + 1
        suffix = os.urandom(4).hex()
        chosen: dict[int, str] = {}
        n = 0
        while len(chosen) < len(behind_new_end):
            cid = f"NEW-{suffix}-{n}"
            n += 1
            p = partitioner(cid.encode(), list(range(count)), list(range(count)))
            if p in behind_new_end:
                chosen.setdefault(p, cid)
        today = datetime.now(UTC).date()
        new_events: list[dict[str, Any]] = []
        for cid in chosen.values():
            new_events += [
                registered(cid),
                invoice(
                    cid,
                    f"{cid}-INV-1",
                    NEW_INVOICE,
                    issued=today,
                    due=today + timedelta(days=30),
                ),
            ]
        asyncio.run(_publish(bootstrap, new_events))
        # and the same simulated history is published again (the same event ids)
        _simulate(env, tmp_path, bootstrap)

        # Then every new customer's invoice is in its exposure, and assessment knows it
        for cid in chosen.values():
            second.wait(
                f"{cid}'s invoice in its exposure",
                partial(has_new_invoice, cid),
                detail=partial(open_receivables, headers, cid),
            )
            second.wait(f"{cid} known to assessment", partial(assessed_customer, cid))
        # and every consumer has caught up with the new log (lag 0, outboxes published)
        caught_up(second)
        # and nothing of the history published again was counted twice
        after = {cid: open_receivables(headers, cid) for cid in SIM_CUSTOMERS}
        assert after == before
    finally:
        code = second.stop()
    assert code == 0, second.output()[-3000:]

    # and each service's projections match a replay of its event store
    for name in SERVICES:
        done = subprocess.run(
            [sys.executable, "-m", "tools.cli", "verify", name],
            cwd=tmp_path,
            env={**env, "CREDITWATCH_DATABASE_URL": database_url},
            capture_output=True,
            timeout=300,
        )
        output = (done.stdout + done.stderr).decode(errors="replace")
        assert done.returncode == 0, f"verify {name}:\n{output[-3000:]}"
        assert "projections match a replay" in output, output[-3000:]
