"""bench/http_floor: what HTTP alone costs on this machine, with no credit logic at all, as
ratios to the hello-world FastAPI endpoint that bench/credit_check measures against.

    .venv/bin/python -m bench.http_floor [--runs 3] [--seconds 8]

Four servers, each one uvicorn worker with the same settings as bench/credit_check's:
- ``hello``: the hello-world (FastAPI route, GET, no body);
- ``asgi``: a bare ASGI app that reads a credit check's JSON body, parses it and answers with
  a credit check's response (orjson), as the check server's fast path does for its part;
- ``asgi behind FastAPI``: the same answer from a pure ASGI middleware added to a FastAPI app,
  where the check server's fast path sits (ServerErrorMiddleware and FastAPI's own layers
  still in front of it);
- ``FastAPI route``: a plain FastAPI route with a pydantic body model, answering the same.

For each, requests/s under wrk (2 threads, 32 connections) and the server's CPU time per
request, then its CPU time per request at steady rates (vegeta). The credit check's figures
are bounded by these: a check costs its HTTP, then its own work, then the database's.
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import Measure, ratio, save, table
from bench.credit_check import WRK_SCRIPT, Cpu, ensure_tools, start_uvicorn, vegeta_run, wrk_run
from harness import servers

# A check's answer, for the servers here and bench/durable_floor's.
ANSWERING = """
import uuid

import orjson

ANSWER = {
    "check_id": "", "order_id": "", "customer_id": "", "decision": "approved", "reasons": [],
    "amount": "125.50", "amount_currency": "EUR", "limit": "50000.00",
    "exposure": "1000.00", "reserved": "125.50", "available": "48874.50",
    "shortfall": "0.00", "currency": "EUR", "grade": "AAA", "reserve": True,
    "reservation_expires_at": "2026-11-30T00:00:00Z", "group": None,
    "policy_version": "2026.1", "requested_by": "order-entry",
    "evaluated_at": "2026-11-29T00:00:00Z"}
HEADERS = [(b"content-type", b"application/json")]


def answer(order_id, customer_id):
    return {**ANSWER, "order_id": order_id, "customer_id": customer_id,
            "check_id": str(uuid.uuid4())}


async def read_json(receive):
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return orjson.loads(b"".join(chunks))


async def send_json(send, body):
    payload = orjson.dumps(body)
    await send({"type": "http.response.start", "status": 200,
                "headers": [*HEADERS, (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
"""

APPS = (
    ANSWERING
    + """
from decimal import Decimal

from fastapi import FastAPI
from pydantic import BaseModel, Field

hello = FastAPI()


@hello.get("/hello")
async def hello_world() -> dict[str, str]:
    return {"hello": "world"}


async def asgi(scope, receive, send):
    if scope["type"] != "http":
        return
    request = await read_json(receive)
    await send_json(send, answer(request["order_id"], request["customer_id"]))


class Fast:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/v1/credit-checks":
            await asgi(scope, receive, send)
        else:
            await self.app(scope, receive, send)


behind = FastAPI()
behind.add_middleware(Fast)


@behind.get("/hello")
async def behind_hello() -> dict[str, str]:
    return {"hello": "world"}


class CheckRequest(BaseModel):
    order_id: str = Field(min_length=1, max_length=100)
    customer_id: str = Field(min_length=1, max_length=100)
    amount: Decimal
    currency: str = Field(min_length=3, max_length=3)
    reserve: bool = True


route = FastAPI()


@route.post("/v1/credit-checks")
async def check(request: CheckRequest) -> dict:
    return answer(request.order_id, request.customer_id)


@route.get("/hello")
async def route_hello() -> dict[str, str]:
    return {"hello": "world"}
"""
)

SERVERS = {  # name: (app, method)
    "hello": ("floor_apps:hello", "GET"),
    "asgi": ("floor_apps:asgi", "POST"),
    "asgi behind FastAPI": ("floor_apps:behind", "POST"),
    "FastAPI route": ("floor_apps:route", "POST"),
}
RATES = (200, 500, 1000, 2000)


def main(runs: int, seconds: int) -> None:
    wrk, vegeta = ensure_tools()
    work = Path(tempfile.mkdtemp(prefix="cw-floor-"))
    (work / "floor_apps.py").write_text(APPS)
    script = work / "check.lua"
    script.write_text(WRK_SCRIPT % ("none", time.time_ns(), 999))
    body = base64.b64encode(
        json.dumps(
            {"order_id": "F-1", "customer_id": "B0001", "amount": "99.90", "currency": "EUR"}
        ).encode()
    )
    procs: dict[str, subprocess.Popen[bytes]] = {}
    urls: dict[str, str] = {}
    rps = {name: Measure(f"{name}: requests/s under wrk", "req/s") for name in SERVERS}
    cpu_full = {
        name: Measure(f"{name}: server CPU per request under wrk", "µs") for name in SERVERS
    }
    cpu_rate = {
        (name, rate): Measure(f"{name}: server CPU per request at {rate:,}/s", "µs")
        for name in SERVERS
        for rate in RATES
    }
    try:
        for name, (app, method) in SERVERS.items():
            port = servers.free_port()
            procs[name] = start_uvicorn(app, port, work, work / f"{name}.log")
            urls[name] = f"http://127.0.0.1:{port}" + ("/hello" if method == "GET" else "")
        for run in range(runs):
            for name, (_, method) in SERVERS.items():
                pid = procs[name].pid
                taken = Cpu(server=pid)
                rps[name].runs.append(
                    wrk_run(wrk, urls[name], seconds, script if method == "POST" else None)[0]
                )
                cpu_full[name].runs.append(taken.per_request_us()["server"])
                target = {
                    "method": method,
                    "url": urls[name] if method == "GET" else f"{urls[name]}/v1/credit-checks",
                    "header": {"Content-Type": ["application/json"]},
                }
                if method == "POST":
                    target["body"] = body.decode()
                targets = work / "targets"
                targets.write_text(json.dumps(target) + "\n")
                for rate in RATES:
                    taken = Cpu(server=pid)
                    vegeta_run(vegeta, targets, seconds, rate)
                    cpu_rate[name, rate].runs.append(taken.per_request_us()["server"])
            print(
                f"run {run + 1}: "
                + ", ".join(f"{name} {rps[name].runs[-1]:,.0f}/s" for name in SERVERS),
                flush=True,
            )
    finally:
        for proc in procs.values():
            proc.terminate()
    rows = [("measure", "median", "runs", "ratio to hello-world")]
    for group in (
        rps,
        cpu_full,
        *({name: cpu_rate[name, rate] for name in SERVERS} for rate in RATES),
    ):
        base = group["hello"]
        for m in group.values():
            rows.append(
                (
                    m.name,
                    f"{m.median:,.0f} {m.unit}",
                    ", ".join(f"{x:,.0f}" for x in m.runs),
                    f"{ratio(m, base):.2f}",
                )
            )
    print()
    print(table(rows))
    path = save(
        "http_floor",
        {
            "seconds": seconds,
            "rps": rps,
            "cpu_full_load_us": cpu_full,
            "cpu_at_rate_us": {f"{n}, {r}/s": m for (n, r), m in cpu_rate.items()},
        },
    )
    print(f"\nsaved {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    args = parser.parse_args()
    main(args.runs, args.seconds)
