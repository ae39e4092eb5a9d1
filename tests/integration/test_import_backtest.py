"""``creditwatch import open-items`` and ``creditwatch backtest`` against the real PostgreSQL
and Apache Kafka, through the command line.

Import: a ledger CSV goes to the prefixed topics and the limits service (a real process)
shows the exposure; importing it again changes nothing; an invalid file publishes nothing.
Backtest: a simulated year is folded through the three services into a fresh database, a
credit check is made through the limits API, then the history is back-tested against a
stricter policy; the report must show exactly the grades, limits, alerts and decisions that
policy implies, and the stores must be untouched.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy import select

from harness import servers
from harness.processes import READ, ServiceProcess, service_env
from services.assessment import store as assessment_store
from services.limits import store as limits_store
from services.limits.app import build as build_limits
from services.schema import upgrade
from shared import eventstore as es
from shared.auth import Principal, TokenRegistry
from shared.db import make_engine
from shared.policy import Policy, load_policy, parse_policy
from shared.runtime import EventCore, Record
from shared.settings import Settings
from tools import registry
from tools import simulate as sim

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TOPIC_VARS = {
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
INPUTS = ("crm.customers", "ar.invoices", "ar.payments")


def cli(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tools.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# ---- import ------------------------------------------------------------------------------------


def topic_env(prefix: str) -> dict[str, str]:
    env = {f"CREDITWATCH_TOPIC_{var}": f"{prefix}.{topic}" for topic, var in TOPIC_VARS.items()}
    env["CREDITWATCH_CONSUMER_GROUP_PREFIX"] = prefix
    return env


async def end_offsets(bootstrap: str, topics: list[str]) -> dict[tuple[str, int], int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        tps = []
        for topic in topics:
            await consumer._client.force_metadata_update()
            tps += [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or set()]
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    return {(tp.topic, tp.partition): offset for tp, offset in ends.items()}


async def consumed_up_to(url: str, ends: dict[tuple[str, int], int]) -> bool:
    wanted = {k: v for k, v in ends.items() if v}
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            stored = await es.load_offsets(conn, limits_store.core, wanted.keys())
    finally:
        await engine.dispose()
    return stored == wanted


async def exposure(proc: ServiceProcess, cid: str) -> dict[str, Any] | None:
    async with httpx.AsyncClient(base_url=proc.url, timeout=5) as client:
        reply = await client.get(
            f"/v1/customers/{cid}/exposure", headers={"Authorization": f"Bearer {READ}"}
        )
    return reply.json() if reply.status_code == 200 else None


async def wait_for(what: str, check: Any, proc: ServiceProcess, seconds: float = 90) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        found = await check()
        if found:
            return found
        assert time.monotonic() < deadline, f"{what} not seen in {seconds}s:\n{proc.tail()}"
        await asyncio.sleep(0.25)


CUSTOMERS_CSV = """customer_id,name,currency,country,industry,payment_terms_days
C-A,Alpha Handels GmbH,EUR,DE,G,30
C-B,Beta SARL,EUR,FR,C,45
"""
ITEMS_CSV = """customer_id,invoice_id,amount,currency,issue_date,due_date,order_id,open_amount
C-A,INV-1,1000.00,EUR,2026-01-05,2026-02-04,SO-1,
C-A,INV-2,500.00,EUR,2026-01-20,2026-02-19,,200.00
C-B,INV-3,300.00,USD,2026-02-01,2026-03-18,,
"""


async def test_an_imported_ledger_reaches_the_limits_service_once_and_a_bad_file_publishes_nothing(
    tmp_path: Path, postgres_server_url: str, kafka_bootstrap: str
) -> None:
    prefix = f"imp{uuid.uuid4().hex[:8]}"
    url = servers.create_database(postgres_server_url)
    topics = [f"{prefix}.{t}" for t in TOPIC_VARS]
    await servers.create_topics_async(kafka_bootstrap, topics, 3)
    env = service_env(database_url=url, bootstrap=kafka_bootstrap, **topic_env(prefix))
    (tmp_path / "customers.csv").write_text(CUSTOMERS_CSV)
    (tmp_path / "items.csv").write_text(ITEMS_CSV)
    inputs = [f"{prefix}.{t}" for t in INPUTS]
    proc = ServiceProcess("limits", env, tmp_path)
    try:
        proc.start().wait_ready(90)

        done = cli(
            "import",
            "open-items",
            str(tmp_path / "items.csv"),
            "--customers",
            str(tmp_path / "customers.csv"),
            env=env,
        )
        assert done.returncode == 0, done.stderr
        assert "published 6 events" in done.stdout
        assert "EUR: invoiced 1,500.00, open 1,200.00" in done.stdout
        assert "USD: invoiced 300.00, open 300.00" in done.stdout

        async def alpha_exposed() -> dict[str, Any] | None:
            body = await exposure(proc, "C-A")
            return body if body and body["open_receivables"] == "1200.00" else None

        alpha = await wait_for("C-A's imported exposure", alpha_exposed, proc)
        assert alpha["currency"] == "EUR" and alpha["exposure"] == "1200.00"

        async def beta_exposed() -> dict[str, Any] | None:
            body = await exposure(proc, "C-B")
            # 300.00 USD at the default policy's 0.92, in C-B's credit currency.
            return body if body and body["open_receivables"] == "276.00" else None

        await wait_for("C-B's imported exposure", beta_exposed, proc)
        ends = await end_offsets(kafka_bootstrap, inputs)
        engine = make_engine(url)
        async with engine.connect() as conn:
            stored = await es.count_events(conn, limits_store.core)
        await engine.dispose()

        # The same file again: published again, dropped by the consumer as duplicates.
        again = cli(
            "import",
            "open-items",
            str(tmp_path / "items.csv"),
            "--customers",
            str(tmp_path / "customers.csv"),
            env=env,
        )
        assert again.returncode == 0, again.stderr
        later = await end_offsets(kafka_bootstrap, inputs)
        assert sum(later.values()) == sum(ends.values()) + 6

        async def caught_up() -> bool:
            return await consumed_up_to(url, later)

        await wait_for("the second import consumed", caught_up, proc)
        engine = make_engine(url)
        async with engine.connect() as conn:
            assert await es.count_events(conn, limits_store.core) == stored
        await engine.dispose()
        assert (await exposure(proc, "C-A") or {}).get("open_receivables") == "1200.00"

        # A file with one bad row among good ones: every fault named, nothing published.
        (tmp_path / "bad.csv").write_text(
            ITEMS_CSV.replace("INV-2,500.00", "INV-2,-500.00").replace(
                "2026-02-01,2026-03-18", "2026-02-01,2026-01-18"
            )
            + "C-A,INV-9,1.00,EUR,"
            "2026-01-05,2026-02-04,,\n"
        )
        bad = cli("import", "open-items", str(tmp_path / "bad.csv"), env=env)
        assert bad.returncode == 1
        assert "row 2: amount: must not be negative" in bad.stderr
        assert "row 3: due_date: due date 2026-01-18 is before issue date 2026-02-01" in bad.stderr
        assert "nothing was published" in bad.stderr
        (tmp_path / "latin1.csv").write_bytes(
            ITEMS_CSV.replace("Alpha", "Älpha").replace("SO-1", "SÖ-1").encode("latin-1")
        )
        unreadable = cli("import", "open-items", str(tmp_path / "latin1.csv"), env=env)
        assert unreadable.returncode == 2
        assert "not UTF-8" in unreadable.stderr
        assert await end_offsets(kafka_bootstrap, inputs) == later
    finally:
        proc.stop()


# ---- backtest ----------------------------------------------------------------------------------

TODAY = date(2026, 3, 1)
HORIZON = "2026-12-31"
CHECK_AT = datetime(2026, 3, 1, 18, 0, tzinfo=UTC)
CHECKER = TokenRegistry({"t": Principal("order-entry", frozenset({"credit:check"}))})


def strict_policy() -> tuple[str, Policy]:
    """The default policy with every grade band raised and a lower BBB limit."""
    text = (ROOT / "shared" / "default_policy.yaml").read_text()
    text = text.replace('version: "2026.1"', 'version: "2026.2-strict"')
    for name, old, new in (
        ("AAA", 85, 95),
        ("AA", 75, 88),
        ("A", 65, 80),
        ("BBB", 55, 70),
        ("BB", 45, 60),
        ("B", 35, 50),
        ("CCC", 20, 30),
    ):
        text = text.replace(
            f"{{name: {name}, min_score: {old},", f"{{name: {name}, min_score: {new},"
        )
    text = text.replace('BBB: "100000.00"', 'BBB: "60000.00"')
    return text, parse_policy(text)


def records(events: list[tuple[str, dict[str, Any]]]) -> list[Record]:
    def at(event: dict[str, Any]) -> datetime:
        return datetime.fromisoformat(event["time"].replace("Z", "+00:00"))

    offsets: Counter[str] = Counter()
    out = []
    for topic, event in sorted(events, key=lambda item: at(item[1])):
        out.append(
            Record(topic, 0, offsets[topic], event["subject"].encode(), json.dumps(event).encode())
        )
        offsets[topic] += 1
    return out


async def feed(core: EventCore, events: list[tuple[str, dict[str, Any]]]) -> None:
    wanted = set(core.service.input_topics())
    recs = records([(t, e) for t, e in events if t in wanted])
    for i in range(0, len(recs), 100):
        await core.process_records(recs[i : i + 100])


async def produced(core: EventCore, dlq: str) -> list[tuple[str, dict[str, Any]]]:
    async with core.engine.connect() as conn:
        rows = await es.pending_outbox(conn, core.service.core, 1_000_000)
    return [(r.topic, json.loads(r.value)) for r in rows if r.topic != dlq]


async def dump(url: str) -> dict[str, list[str]]:
    """Every row of every table of the three services."""
    import importlib

    engine = make_engine(url)
    out: dict[str, list[str]] = {}
    try:
        async with engine.connect() as conn:
            for name in registry.SERVICES:
                metadata = importlib.import_module(f"services.{name}.store").metadata
                for table in metadata.sorted_tables:
                    rows = await conn.execute(select(table))
                    out[table.name] = sorted(repr(tuple(r)) for r in rows)
    finally:
        await engine.dispose()
    return out


async def history(url: str) -> tuple[str, str]:
    """A simulated year through assessment → limits (+ one credit check) → alerts, the way
    the running services would fold it. Returns the checked customer and the check id."""
    settings = Settings(database_url=url)
    policy = load_policy()
    events = [
        (sim.topic_names(settings)[s.topic], s.event)
        for s in sim.history(12, 12, seed=11, today=TODAY)
    ]
    assessment, a_engine = registry.core_for("assessment", settings, policy)
    await upgrade(a_engine, "assessment")
    await feed(assessment, events)
    events += await produced(assessment, settings.topic_dlq)
    await a_engine.dispose()

    app, host = build_limits(
        settings, tokens=CHECKER, policy=policy, consume=False, clock=lambda: CHECK_AT
    )
    await upgrade(host.engine, "limits")
    await feed(host.core, events)
    checked = await _approved_check(app, url)
    events += await produced(host.core, settings.topic_dlq)
    await host.close()

    alerts, al_engine = registry.core_for("alerts", settings, policy)
    await upgrade(al_engine, "alerts")
    await feed(alerts, events)
    await al_engine.dispose()
    return checked


async def _approved_check(app: Any, url: str) -> tuple[str, str]:
    """An order that fills a customer's limit exactly: approved now, and far beyond the
    limit the strict policy would give that customer."""
    _, strict = strict_policy()
    engine = make_engine(url)
    async with engine.connect() as conn:
        scores = {
            r.customer_id: r.score
            for r in await conn.execute(
                select(assessment_store.customers.c.customer_id, assessment_store.customers.c.score)
            )
        }
        rows = list(
            await conn.execute(
                select(limits_store.customers).order_by(limits_store.customers.c.customer_id)
            )
        )
    await engine.dispose()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://limits") as client:
        for row in rows:
            strict_limit = strict.limits.by_grade[
                strict.grade_for_score(Decimal(scores[row.customer_id])).name
            ]
            room = row.limit_amount - row.exposure
            if room <= 0 or row.limit_amount <= strict_limit * Decimal("1.2"):
                continue
            reply = await client.post(
                "/v1/credit-checks",
                headers={"Authorization": "Bearer t"},
                json={
                    "order_id": f"SO-{row.customer_id}",
                    "customer_id": row.customer_id,
                    "amount": format(room, "f"),
                    "currency": "EUR",
                },
            )
            assert reply.status_code == 200, reply.text
            if reply.json()["decision"] == "approved":
                return row.customer_id, reply.json()["check_id"]
    raise AssertionError("no customer could take an order filling its limit")


async def test_a_backtest_reports_what_a_stricter_policy_implies_and_changes_nothing(
    tmp_path: Path, postgres_server_url: str
) -> None:
    url = servers.create_database(postgres_server_url)
    checked, check_id = await history(url)
    text, strict = strict_policy()
    (tmp_path / "strict.yaml").write_text(text)
    before = await dump(url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDITWATCH_")}
    env["CREDITWATCH_DATABASE_URL"] = url

    # Up to a fixed day after the whole simulated history (its last statement is published
    # after TODAY), so that nothing depends on the day the test runs.
    done = cli(
        "backtest",
        "--policy",
        str(tmp_path / "strict.yaml"),
        "--to",
        HORIZON,
        "--format",
        "json",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)

    # What the strict policy implies, from the live projections: same scores, new grade
    # bands, the candidate's limit for the new grade.
    engine = make_engine(url)
    async with engine.connect() as conn:
        graded = {
            r.customer_id: (r.grade, r.score)
            for r in await conn.execute(
                select(
                    assessment_store.customers.c.customer_id,
                    assessment_store.customers.c.grade,
                    assessment_store.customers.c.score,
                )
            )
        }
        figures = {r.customer_id: r for r in await conn.execute(select(limits_store.customers))}
    await engine.dispose()
    expected_grades = {
        cid: (grade, strict.grade_for_score(Decimal(score)).name)
        for cid, (grade, score) in graded.items()
    }
    expected_limits = {
        cid: strict.limits.by_grade[new] for cid, (_, new) in expected_grades.items()
    }
    by_id = {c["customer_id"]: c for c in report["customers"]}

    assert report["policies"]["candidate"]["version"] == "2026.2-strict"
    assert report["summary"]["customers"] == 12
    reported_grades = {
        cid: (c["grade"]["current"], c["grade"]["candidate"])
        for cid, c in by_id.items()
        if "grade" in c
    }
    assert reported_grades == {
        cid: pair for cid, pair in expected_grades.items() if pair[0] != pair[1]
    }
    assert reported_grades, "the stricter bands must move some grades"
    assert all(by_id[cid]["grade"]["move"] == "downgrade" for cid in reported_grades)
    assert report["summary"]["grades"]["distribution"]["current"] == dict(
        sorted(Counter(grade for grade, _ in graded.values()).items())
    )
    for cid, c in by_id.items():
        if "limit" in c:
            assert Decimal(c["limit"]["current"]) == figures[cid].limit_amount
            assert Decimal(c["limit"]["candidate"]) == expected_limits[cid]
    assert {cid for cid, c in by_id.items() if "limit" in c} == {
        cid for cid in expected_limits if expected_limits[cid] != figures[cid].limit_amount
    }

    over_now = {cid for cid, f in figures.items() if f.over_limit}
    over_strict = {cid for cid, f in figures.items() if f.exposure > expected_limits[cid]}
    assert report["summary"]["over_limit"] == {
        "current": len(over_now),
        "candidate": len(over_strict),
    }
    for cid in over_strict - over_now:
        assert by_id[cid]["over_limit"] == {"current": False, "candidate": True}
        opened = {a["rule"] for a in by_id[cid]["open_alerts"].get("would_open", [])}
        assert "limit_breach" in opened

    # The order that filled the customer's limit would have been rejected.
    checks = {c["check_id"]: c for c in by_id[checked]["credit_checks"]}
    assert checks[check_id]["recorded"] == "approved"
    assert checks[check_id]["decision"] == {"current": "approved", "candidate": "rejected"}
    assert "exceeds_available" in checks[check_id]["reasons"]["candidate"]
    cc = report["summary"]["credit_checks_in_window"]
    assert cc["decided_differently"] >= 1 and cc["recorded"].get("approved", 0) >= 1

    # The same policy as candidate: no differences at all (the folds are deterministic).
    same = cli(
        "backtest",
        "--policy",
        str(ROOT / "shared" / "default_policy.yaml"),
        "--to",
        HORIZON,
        "--format",
        "json",
        env=env,
    )
    assert same.returncode == 0, same.stderr
    assert json.loads(same.stdout)["customers"] == []

    # A window: history after --to is not folded; checks before --from are not judged.
    early = cli(
        "backtest",
        "--policy",
        str(tmp_path / "strict.yaml"),
        "--to",
        "2025-09-30",
        "--format",
        "json",
        env=env,
    )
    assert early.returncode == 0, early.stderr
    early_report = json.loads(early.stdout)
    assert early_report["window"]["to"] == "2025-09-30T23:59:59.999999Z"
    assert sum(early_report["events"].values()) < sum(report["events"].values())
    assert early_report["summary"]["credit_checks_in_window"]["judged"] == 0
    late = cli(
        "backtest", "--policy", str(tmp_path / "strict.yaml"), "--from", "2026-03-02", env=env
    )
    assert late.returncode == 0, late.stderr
    assert "credit checks in window: 0 judged again" in late.stdout
    assert "differences by customer (current → candidate):" in late.stdout

    # An invalid candidate: every faulty field listed, exit 2.
    (tmp_path / "bad.yaml").write_text(
        text.replace('review_tolerance: "0.05"', 'review_tolerance: "5"').replace(
            'CCC: "5000.00"', 'CCC: "-1"'
        )
    )
    bad = cli("backtest", "--policy", str(tmp_path / "bad.yaml"), env=env)
    assert bad.returncode == 2
    assert "limits.review_tolerance" in bad.stderr and "limits.by_grade.CCC" in bad.stderr

    # Nothing in any store changed.
    assert await dump(url) == before


def test_derived_events_are_slotted_in_after_the_events_of_their_instant() -> None:
    from shared.events import Envelope
    from tools.backtest import BacktestError, Window, make_window, merge, parse_bound

    def env(n: int, minute: int, type_: str = "invoice.issued") -> tuple[Envelope, Any]:
        return Envelope.model_construct(
            specversion="1.0",
            id=f"e{n}",
            source="/t",
            type=type_,
            subject="C",
            time=datetime(2026, 1, 1, 9, minute, tzinfo=UTC),
            datacontenttype="",
            data={},
        ), n

    stored = [env(1, 0), env(2, 5, "assessment.completed"), env(3, 5), env(4, 9)]
    derived = [
        env(10, 5, "assessment.completed"),
        env(11, 1, "assessment.completed"),
        env(12, 30, "assessment.completed"),
    ]
    merged = merge(stored, lambda e: e.type == "assessment.completed", derived)
    assert [n for _, n in merged] == [1, 11, 3, 10, 4, 12]

    assert parse_bound("2026-03-01", end=False) == datetime(2026, 3, 1, tzinfo=UTC)
    assert parse_bound("2026-03-01", end=True) == datetime(
        2026, 3, 1, 23, 59, 59, 999999, tzinfo=UTC
    )
    assert parse_bound("2026-03-01T10:00:00+01:00", end=True) == datetime(2026, 3, 1, 9, tzinfo=UTC)
    assert make_window(None, None) == Window()
    for bad in (("2026-03-02", "2026-03-01"), ("yesterday", None), ("2026-03-01T10:00", None)):
        with pytest.raises(BacktestError, match=r"after|not a date|UTC offset"):
            make_window(*bad)
