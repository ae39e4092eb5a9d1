"""bench/durable_floor: the most a credit check can reach on this machine when its answer waits
for its rows to be in PostgreSQL, with no credit logic at all, as ratios to the hello-world
FastAPI endpoint that bench/credit_check measures against.

    .venv/bin/python -m bench.durable_floor [--runs 3] [--seconds 10] [--warmup 30]

Four servers, each one uvicorn worker with the same settings as bench/credit_check's, and
one PostgreSQL (the test harness's, as bench/credit_check's) for the two that write:
- ``hello``: the hello-world (FastAPI route, GET, no body);
- ``1 row``: a pure ASGI middleware of a FastAPI app (where the check server's fast path
  sits) reads a check's JSON, queues it, and answers with a check's response once its row is
  stored. The requests that arrive while a batch is being written go together in the next
  one (at most 64), in one statement in autocommit, one round trip, through asyncpg: the
  check server's own way of writing, with the least a stored decision needs (one row);
- ``5 rows``: the same, writing what a reserving check writes: it moves the customer's row
  (exposure, version; the row lock), and inserts the event, the decision, the reservation
  and an outbox row, in one statement;
- ``5 rows, relayed``: the same, and a relay of its own process (as the limits service's
  worker publishes the API replicas' outbox) publishes every outbox row to Kafka (the test
  harness's broker, as bench/credit_check's), the least the contract's `exposure.updated`
  for a reservation asks: one statement per cycle deletes the rows the broker acknowledged
  and reads the next (up to 500), sent in one produce request, acks=all; a cycle that found
  less than a full read waits 25 ms.

There is no decision and no read: these bound what any design that stores a check before
answering it (and publishes its exposure) can reach here, in Python, with the database and
the broker on the same two cores. The relayed server's CPU per request includes its relay's
and the broker's. For each server: requests/s under wrk (2 threads, 32 connections), and the
server's and PostgreSQL's CPU time per request; then p50 / p99 and CPU at a steady 1,000/s
(vegeta).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from bench.common import Measure, ratio, save, table
from bench.credit_check import (
    LAST,
    WRK_SCRIPT,
    Cpu,
    ensure_tools,
    start_uvicorn,
    vegeta_run,
    wrk_run,
)
from bench.http_floor import ANSWERING
from harness import servers

CUSTOMERS = 1000

SCHEMA = f"""
CREATE TABLE floor_customers (customer_id text PRIMARY KEY, exposure numeric NOT NULL,
                              last_seq bigint NOT NULL, state text);
INSERT INTO floor_customers
    SELECT format('B%s', lpad(i::text, 4, '0')), 0, 0, repeat('x', 400)
    FROM generate_series(0, {CUSTOMERS - 1}) AS i;
CREATE TABLE floor_events (seq bigserial PRIMARY KEY, event_id text NOT NULL UNIQUE,
                           type text NOT NULL, subject text NOT NULL,
                           time timestamptz NOT NULL, event jsonb NOT NULL,
                           recorded_at timestamptz NOT NULL);
CREATE INDEX ON floor_events (subject, seq);
CREATE TABLE floor_checks (check_id uuid PRIMARY KEY, order_id text NOT NULL,
                           customer_id text NOT NULL, amount numeric NOT NULL,
                           currency text NOT NULL, decision text NOT NULL, body text NOT NULL,
                           seq bigint);
CREATE INDEX ON floor_checks (order_id, seq);
CREATE TABLE floor_reservations (customer_id text NOT NULL, order_id text NOT NULL,
                                 check_id uuid NOT NULL, amount numeric NOT NULL,
                                 expires_at timestamptz NOT NULL,
                                 PRIMARY KEY (customer_id, order_id));
CREATE TABLE floor_outbox (id bigserial PRIMARY KEY, event_id text NOT NULL,
                           topic text NOT NULL, key text NOT NULL, value text NOT NULL,
                           created_at timestamptz NOT NULL);
CREATE TABLE floor_outbox_relayed (LIKE floor_outbox INCLUDING ALL);
"""
TOPIC = "floor.exposure"

RELAY = '''
import asyncio
import os
import signal

import asyncpg
from aiokafka import AIOKafkaProducer

CYCLE = """
WITH gone AS (DELETE FROM floor_outbox_relayed WHERE id = ANY($1::bigint[]))
SELECT id, topic, key, value FROM floor_outbox_relayed WHERE id <> ALL($1::bigint[])
ORDER BY id LIMIT 500"""


async def main():
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    conn = await asyncpg.connect(os.environ["FLOOR_DSN"])
    producer = AIOKafkaProducer(bootstrap_servers=os.environ["FLOOR_BOOTSTRAP"], acks="all",
                                linger_ms=0, enable_idempotence=False)
    await producer.start()
    acked, published = [], 0
    while not stop.is_set():
        rows = await conn.fetch(CYCLE, acked)
        futures = [await producer.send(r["topic"], value=r["value"].encode(),
                                       key=r["key"].encode()) for r in rows]
        await asyncio.gather(*futures)
        acked = [r["id"] for r in rows]
        published += len(rows)
        if len(rows) < 500:
            await asyncio.sleep(0.025)
    await conn.execute("DELETE FROM floor_outbox_relayed WHERE id = ANY($1::bigint[])", acked)
    await producer.stop()
    print("published", published, flush=True)


asyncio.run(main())
'''

APPS = (
    ANSWERING
    + '''
import asyncio
import os

import asyncpg
from fastapi import FastAPI

NOW = "2026-11-29T00:00:00Z"
DSN = os.environ["FLOOR_DSN"]

ONE_ROW = """
INSERT INTO floor_checks (check_id, order_id, customer_id, amount, currency, decision, body)
SELECT check_id, order_id, customer_id, amount, currency, decision, body
FROM json_populate_recordset(NULL::floor_checks, $1::text::json)"""

FIVE_ROWS = """
WITH cu AS (
    UPDATE floor_customers AS c SET exposure = c.exposure + d.amount, last_seq = d.seq,
                                    state = d.state
    FROM (SELECT customer_id, sum(amount) AS amount, max(seq) AS seq, max(state) AS state
          FROM json_to_recordset($5::text::json)
               AS x(customer_id text, amount numeric, seq bigint, state text)
          GROUP BY customer_id) AS d
    WHERE c.customer_id = d.customer_id),
ev AS (INSERT INTO floor_events (seq, event_id, type, subject, time, event, recorded_at)
       SELECT seq, event_id, type, subject, time, event, recorded_at
       FROM json_populate_recordset(NULL::floor_events, $1::text::json)),
ck AS (INSERT INTO floor_checks (check_id, order_id, customer_id, amount, currency, decision,
                                 body, seq)
       SELECT check_id, order_id, customer_id, amount, currency, decision, body, seq
       FROM json_populate_recordset(NULL::floor_checks, $2::text::json)),
rs AS (INSERT INTO floor_reservations (customer_id, order_id, check_id, amount, expires_at)
       SELECT customer_id, order_id, check_id, amount, expires_at
       FROM json_populate_recordset(NULL::floor_reservations, $3::text::json)
       ON CONFLICT (customer_id, order_id) DO UPDATE SET check_id = EXCLUDED.check_id,
           amount = EXCLUDED.amount, expires_at = EXCLUDED.expires_at)
INSERT INTO {outbox} (event_id, topic, key, value, created_at)
SELECT event_id, topic, key, value, created_at
FROM json_populate_recordset(NULL::floor_outbox, $4::text::json)"""


class Writer:
    """Queues checks; one statement per batch, answered once it is in."""

    def __init__(self, rows, outbox):
        self.rows = rows
        self.five = FIVE_ROWS.replace("{outbox}", outbox)
        self.queue = []
        self.busy = False
        self.conn = None
        # The event numbers of the two five-row writers (one table) apart.
        self.seq = 0 if outbox == "floor_outbox" else 10**12

    async def store(self, request):
        future = asyncio.get_running_loop().create_future()
        self.queue.append((request, future))
        if not self.busy:
            self.busy = True
            asyncio.create_task(self.drain())
        return await future

    async def drain(self):
        try:
            if self.conn is None:
                self.conn = await asyncpg.connect(DSN)
            while self.queue:
                batch, self.queue = self.queue[:64], self.queue[64:]
                answers = [answer(r["order_id"], r["customer_id"]) for r, _ in batch]
                try:
                    await self.write(batch, answers)
                except Exception as exc:
                    for _, future in batch:
                        future.set_exception(exc)
                    continue
                for (_, future), body in zip(batch, answers):
                    future.set_result(body)
        finally:
            self.busy = False

    async def write(self, batch, answers):
        checks = [{"check_id": a["check_id"], "order_id": a["order_id"],
                   "customer_id": a["customer_id"], "amount": r["amount"],
                   "currency": r["currency"], "decision": a["decision"],
                   "body": orjson.dumps(a).decode()} for (r, _), a in zip(batch, answers)]
        if self.rows == 1:
            await self.conn.execute(ONE_ROW, orjson.dumps(checks).decode())
            return
        events, reservations, outbox, customers = [], [], [], []
        for check, a in zip(checks, answers):
            self.seq += 1
            seq = check["seq"] = self.seq
            event = {"specversion": "1.0", "id": f"check-{a['check_id']}",
                     "type": "credit_check.decided", "source": "creditwatch/limits/api",
                     "subject": a["customer_id"], "time": NOW, "data": a}
            events.append({"seq": seq, "event_id": event["id"], "type": event["type"],
                           "subject": a["customer_id"], "time": NOW, "event": event,
                           "recorded_at": NOW})
            reservations.append({"customer_id": a["customer_id"], "order_id": a["order_id"],
                                 "check_id": a["check_id"], "amount": check["amount"],
                                 "expires_at": a["reservation_expires_at"]})
            outbox.append({"event_id": f"exposure-{seq}", "topic": "floor.exposure",
                           "key": a["customer_id"], "value": orjson.dumps(event).decode(),
                           "created_at": NOW})
            customers.append({"customer_id": a["customer_id"], "amount": check["amount"],
                              "seq": seq, "state": "y" * 400})
        await self.conn.execute(self.five, *(orjson.dumps(x).decode() for x in (
            events, checks, reservations, outbox, customers)))


class Durable:
    def __init__(self, app, rows, outbox):
        self.app = app
        self.writer = Writer(rows, outbox)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/credit-checks":
            await self.app(scope, receive, send)
            return
        await send_json(send, await self.writer.store(await read_json(receive)))


def app_writing(rows, outbox="floor_outbox"):
    app = FastAPI()
    app.add_middleware(Durable, rows=rows, outbox=outbox)

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    return app


hello = FastAPI()


@hello.get("/hello")
async def hello_world() -> dict[str, str]:
    return {"hello": "world"}


one_row = app_writing(1)
five_rows = app_writing(5)
five_rows_relayed = app_writing(5, "floor_outbox_relayed")
'''
)

SERVERS = {  # name: (app, method)
    "hello": ("durable_apps:hello", "GET"),
    "1 row": ("durable_apps:one_row", "POST"),
    "5 rows": ("durable_apps:five_rows", "POST"),
    "5 rows, relayed": ("durable_apps:five_rows_relayed", "POST"),
}
WRITERS = ("1 row", "5 rows", "5 rows, relayed")
RATE = 1000


async def prepare(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCHEMA)
    finally:
        await conn.close()


async def stored(dsn: str) -> dict[str, int]:
    """What the two writing servers stored: the 1-row server's checks have no event number."""
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow("""
            SELECT (SELECT count(*) FROM floor_checks WHERE seq IS NULL) AS one,
                   (SELECT count(*) FROM floor_checks WHERE seq IS NOT NULL) AS checks,
                   (SELECT count(*) FROM floor_events) AS events,
                   (SELECT count(*) FROM floor_reservations) AS reservations,
                   (SELECT count(*) FROM floor_outbox) AS outbox,
                   (SELECT count(*) FROM floor_outbox_relayed) AS unrelayed,
                   (SELECT sum(exposure) / 125.50 FROM floor_customers) AS moved""")
        return {key: int(value) for key, value in row.items()}
    finally:
        await conn.close()


def main(runs: int, seconds: int, warmup: int) -> None:
    wrk, vegeta = ensure_tools()
    work = Path(tempfile.mkdtemp(prefix="cw-durable-"))
    (work / "durable_apps.py").write_text(APPS)
    (work / "floor_relay.py").write_text(RELAY)
    script = work / "check.lua"
    procs: dict[str, subprocess.Popen[bytes]] = {}
    urls: dict[str, str] = {}
    rps = {name: Measure(f"{name}: requests/s under wrk", "req/s") for name in SERVERS}
    made = dict.fromkeys(SERVERS, 0)
    server_full = {
        name: Measure(f"{name}: server CPU per request under wrk", "µs") for name in SERVERS
    }
    pg_full = {
        name: Measure(f"{name}: PostgreSQL CPU per request under wrk", "µs") for name in SERVERS
    }
    p50 = {name: Measure(f"{name}: p50 at {RATE:,}/s", "ms") for name in SERVERS}
    p99 = {name: Measure(f"{name}: p99 at {RATE:,}/s", "ms") for name in SERVERS}
    server_rate = {
        name: Measure(f"{name}: server CPU per request at {RATE:,}/s", "µs") for name in SERVERS
    }
    pg_rate = {
        name: Measure(f"{name}: PostgreSQL CPU per request at {RATE:,}/s", "µs") for name in SERVERS
    }
    relay_full = Measure("5 rows, relayed: its relay's CPU per request under wrk", "µs")
    kafka_full = Measure("5 rows, relayed: Kafka's CPU per request under wrk", "µs")
    relay_rate = Measure(f"5 rows, relayed: its relay's CPU per request at {RATE:,}/s", "µs")
    kafka_rate = Measure(f"5 rows, relayed: Kafka's CPU per request at {RATE:,}/s", "µs")
    relay_out = work / "relay.log"
    with servers.PostgresServer.start() as pg, servers.KafkaServer.start() as kafka:
        url = servers.create_database(pg.url)
        dsn = url.replace("postgresql+asyncpg://", "postgresql://")
        asyncio.run(prepare(dsn))
        asyncio.run(servers.create_topics_async(kafka.bootstrap, [TOPIC], 4))
        env_dsn = {"FLOOR_DSN": dsn}
        relay = subprocess.Popen(
            [sys.executable, "floor_relay.py"],
            cwd=work,
            stdout=relay_out.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **env_dsn, "FLOOR_BOOTSTRAP": kafka.bootstrap},
        )
        try:
            for name, (app, method) in SERVERS.items():
                port = servers.free_port()
                procs[name] = start_uvicorn(app, port, work, work / f"{name}.log", env=env_dsn)
                urls[name] = f"http://127.0.0.1:{port}" + ("/hello" if method == "GET" else "")
            if warmup > 0:
                # Not measured: the fresh broker compiles its hot paths (see credit_check).
                script.write_text(WRK_SCRIPT % ("none", time.time_ns(), CUSTOMERS - 1))
                wrk_run(wrk, urls["5 rows, relayed"], warmup, script)
                made["5 rows, relayed"] += LAST["requests"]
            for run in range(runs):
                for name, (_, method) in SERVERS.items():
                    pid = procs[name].pid
                    tag = time.time_ns()
                    script.write_text(WRK_SCRIPT % ("none", tag, CUSTOMERS - 1))
                    others = (
                        {"relay": relay.pid, "kafka": kafka.pid}
                        if name == "5 rows, relayed"
                        else {}
                    )
                    taken = Cpu(server=pid, pg=pg.pid, **others)
                    rps[name].runs.append(
                        wrk_run(wrk, urls[name], seconds, script if method == "POST" else None)[0]
                    )
                    made[name] += LAST["requests"]
                    keep(
                        taken.per_request_us(),
                        server_full[name],
                        pg_full[name],
                        relay_full,
                        kafka_full,
                    )
                    targets = work / "targets"
                    write_targets(targets, name, method, urls[name], RATE * seconds, tag)
                    taken = Cpu(server=pid, pg=pg.pid, **others)
                    result = vegeta_run(vegeta, targets, seconds, RATE)
                    if result["success"] < 1:
                        raise RuntimeError(f"{name}: failed requests at {RATE}/s: {result}")
                    made[name] += LAST["requests"]
                    keep(
                        taken.per_request_us(),
                        server_rate[name],
                        pg_rate[name],
                        relay_rate,
                        kafka_rate,
                    )
                    p50[name].runs.append(result["p50_ms"])
                    p99[name].runs.append(result["p99_ms"])
                print(
                    f"run {run + 1}: "
                    + ", ".join(
                        f"{name} {rps[name].runs[-1]:,.0f}/s (p99 {p99[name].runs[-1]:.1f} ms)"
                        for name in SERVERS
                    ),
                    flush=True,
                )
        finally:
            for proc in procs.values():
                proc.terminate()
            relay.terminate()
            relay.wait(30)
        # Every answered check was stored, by the three writers, with all of its rows; and
        # every outbox row of the relayed one published.
        counts = asyncio.run(stored(dsn))
        found = re.search(r"published (\d+)", relay_out.read_text())
        published = int(found.group(1)) if found else 0
        print(
            f"stored: {counts}; published {published:,}; answered: "
            + ", ".join(f"{name} {made[name]:,}" for name in WRITERS)
        )
        five = made["5 rows"] + made["5 rows, relayed"]
        if (
            counts["one"] < made["1 row"]
            or any(counts[key] < five for key in ("checks", "events", "reservations", "moved"))
            or counts["outbox"] < made["5 rows"]
            or counts["unrelayed"]
            or published < made["5 rows, relayed"]
        ):
            raise RuntimeError("answered checks are missing rows or were not published")
    rows: list[tuple[str, ...]] = [("measure", "median", "runs", "ratio to hello-world")]
    # PostgreSQL's figures have no baseline: the hello-world does not use it (what it shows
    # there is autovacuum cleaning up after the writers' runs).
    for group, compared in (
        (rps, True),
        (server_full, True),
        (pg_full, False),
        ({"r": relay_full, "k": kafka_full}, False),
        (p50, True),
        (p99, True),
        (server_rate, True),
        (pg_rate, False),
        ({"r": relay_rate, "k": kafka_rate}, False),
    ):
        base = group.get("hello")
        for m in group.values():
            shown = f"{ratio(m, base):.2f}" if compared and base is not None else ""
            rows.append(
                (
                    m.name,
                    f"{m.median:,.1f} {m.unit}" if m.unit == "ms" else f"{m.median:,.0f} {m.unit}",
                    ", ".join(f"{x:,.1f}" if m.unit == "ms" else f"{x:,.0f}" for x in m.runs),
                    shown,
                )
            )
    print()
    print(table(rows))
    path = save(
        "durable_floor",
        {
            "seconds": seconds,
            "rate": RATE,
            "rps": rps,
            "server_cpu_full_load_us": server_full,
            "pg_cpu_full_load_us": pg_full,
            "p50_ms": p50,
            "p99_ms": p99,
            "server_cpu_at_rate_us": server_rate,
            "pg_cpu_at_rate_us": pg_rate,
            "relayed_relay_cpu_full_load_us": relay_full,
            "relayed_kafka_cpu_full_load_us": kafka_full,
            "relayed_relay_cpu_at_rate_us": relay_rate,
            "relayed_kafka_cpu_at_rate_us": kafka_rate,
        },
    )
    print(f"\nsaved {path}")


def keep(
    spent: dict[str, float], server: Measure, pg: Measure, relay: Measure, kafka: Measure
) -> None:
    """One run's CPU per request, by process (the relay and the broker: if measured)."""
    server.runs.append(spent["server"])
    pg.runs.append(spent["pg"])
    if "relay" in spent:
        relay.runs.append(spent["relay"])
        kafka.runs.append(spent["kafka"])


def write_targets(path: Path, name: str, method: str, url: str, count: int, tag: int) -> None:
    """vegeta's targets: the hello-world's GET, or a new order per check."""
    with path.open("w") as out:
        if method == "GET":
            out.write(json.dumps({"method": "GET", "url": url}) + "\n")
            return
        for n in range(count):
            body = json.dumps(
                {
                    "order_id": f"V{tag}-{n}",
                    "customer_id": f"B{n % CUSTOMERS:04d}",
                    "amount": "125.50",
                    "currency": "EUR",
                }
            )
            out.write(
                json.dumps(
                    {
                        "method": "POST",
                        "url": f"{url}/v1/credit-checks",
                        "header": {"Content-Type": ["application/json"]},
                        "body": base64.b64encode(body.encode()).decode(),
                    }
                )
                + "\n"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument(
        "--warmup",
        type=int,
        default=30,
        help="seconds of unmeasured load on the relayed server first, while "
        "the fresh broker warms up (0: none)",
    )
    args = parser.parse_args()
    main(args.runs, args.seconds, args.warmup)
