"""Two runs of the test harness on one machine must never delete each other's servers.

Each harness run sweeps away the temp dirs that SIGKILLed runs left behind. The sweep once
judged a dir by the pid its server started with, so when a run restarted its PostgreSQL or
Kafka (as the fault tests do) a concurrent run deleted the live server's data. Here the
test process is run A with servers of its own; run B is a second harness in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness import servers

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
PG_PREFIX = "creditwatch-pg-"
KAFKA_PREFIX = "creditwatch-kafka-"

# Run B, "stop": start PostgreSQL and Kafka (each start sweeps the machine's stale dirs
# first), report their dirs, stop them and exit. "restart-then-wait": start PostgreSQL,
# restart it, report its dir and wait to be SIGKILLed.
RUN_B = """
import json, sys
from harness import servers
pg = servers.PostgresServer.start()
if sys.argv[1] == "stop":
    kafka = servers.KafkaServer.start()
    print(json.dumps({"pg": str(pg.base_dir), "kafka": str(kafka.base_dir)}), flush=True)
    pg.stop()
    kafka.stop()
else:
    pg.restart(kill=True)
    print(json.dumps({"pg": str(pg.base_dir)}), flush=True)
    sys.stdin.read()
"""

# A detached server, as `scripts/test-infra start` leaves one: its harness exits at once.
DETACHED = """
import json
from harness import servers
pg = servers.PostgresServer.start(die_with_parent=False)
print(json.dumps(pg.detach()), flush=True)
"""


@dataclass
class RunA:
    pg: servers.PostgresServer
    kafka: servers.KafkaServer


def _run_b(mode: str, *, stdin: int | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", RUN_B, mode],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )


def _first_line(process: subprocess.Popen[str]) -> dict[str, Any]:
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line, f"run B said nothing (exit code {process.poll()})"
    report: dict[str, Any] = json.loads(line)
    return report


def _sweep(run: RunA) -> list[Path]:
    """Run a sweep in this process, as run A's next server start would; return what went."""
    removed = servers._sweep_stale_dirs(PG_PREFIX) + servers._sweep_stale_dirs(KAFKA_PREFIX)
    assert run.pg.base_dir not in removed and run.kafka.base_dir not in removed
    return removed


def _assert_answers(run: RunA) -> None:
    for server in (run.pg, run.kafka):
        assert (server.base_dir / "data").is_dir(), f"{server.base_dir} lost its data dir"
        assert server.running, f"{type(server).__name__} of run A is down"
    name = f"concurrency_{uuid.uuid4().hex[:8]}"
    servers.create_database(run.pg.url, name)
    servers.drop_database(run.pg.url, name)
    servers.create_topics(run.kafka.bootstrap, [f"concurrency-{uuid.uuid4().hex[:8]}"], 1)


@pytest.fixture(scope="module")
def run_a() -> Iterator[RunA]:
    with servers.PostgresServer.start() as pg, servers.KafkaServer.start() as kafka:
        yield RunA(pg, kafka)


def test_given_run_a_restarted_its_servers_when_run_b_starts_and_stops_its_own_then_run_a_is_intact(
    run_a: RunA,
) -> None:
    first_pids = (run_a.pg.pid, run_a.kafka.pid)
    run_a.pg.restart(kill=True)
    run_a.kafka.restart()
    assert (run_a.pg.pid, run_a.kafka.pid) != first_pids

    run_b = _run_b("stop")
    dirs_b = _first_line(run_b)
    assert run_b.wait(timeout=60) == 0

    _assert_answers(run_a)
    assert not Path(dirs_b["pg"]).exists() and not Path(dirs_b["kafka"]).exists()


def test_given_run_b_killed_after_a_restart_when_run_a_sweeps_then_only_run_b_dirs_go(
    run_a: RunA,
) -> None:
    run_a.pg.restart()
    run_b = _run_b("restart-then-wait", stdin=subprocess.PIPE)
    try:
        dir_b = Path(_first_line(run_b)["pg"])
        assert dir_b.is_dir()
        # While run B lives, its dir is its own, restarted server and all.
        assert dir_b not in _sweep(run_a)
        assert dir_b.is_dir()
    finally:
        run_b.kill()  # a SIGKILLed harness: the kernel kills its servers, nobody cleans up
        run_b.wait(timeout=30)

    removed: list[Path] = []
    deadline = time.monotonic() + 20  # PostgreSQL's backends linger a moment after SIGKILL
    while dir_b not in removed and time.monotonic() < deadline:
        removed += _sweep(run_a)
        time.sleep(0.2)

    assert dir_b in removed
    assert not dir_b.exists()
    _assert_answers(run_a)


def test_given_a_bystander_process_in_the_server_dir_when_the_server_is_killed_then_it_lives(
    run_a: RunA,
) -> None:
    # Stragglers of a crashed PostgreSQL are found by their working dir; a shell someone
    # opened there to look around is no straggler.
    bystander = subprocess.Popen(["sleep", "120"], cwd=run_a.pg.data_dir)
    try:
        run_a.pg.restart(kill=True)

        assert bystander.poll() is None
        _assert_answers(run_a)
    finally:
        bystander.kill()
        bystander.wait(timeout=10)


def test_given_a_detached_server_when_another_run_sweeps_then_it_survives_until_stopped() -> None:
    done = subprocess.run(
        [sys.executable, "-c", DETACHED],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    state = json.loads(done.stdout)
    base_dir = Path(state["base_dir"])
    try:
        assert base_dir not in servers._sweep_stale_dirs(PG_PREFIX)
        assert (base_dir / "data").is_dir()
        assert servers.is_server_running(state)
    finally:
        assert servers.stop_detached(state)
    assert not base_dir.exists()
