"""``creditwatch dev`` when the ports it needs are taken, or the broker it is given is not
there: one line naming what to set, exit code 2, at once — never a banner followed by a
traceback, a silent wait, or a demo published into a broker nobody pointed it at.

Every port is a free one picked here and handed to dev through the environment
(``CREDITWATCH_*_PORT``, ``CREDITWATCH_DEV_BROKER_PORT``, ``CREDITWATCH_KAFKA_BOOTSTRAP``),
so these tests never touch the fixed defaults (8001-8003, 9092)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from harness.e2e import new_prefix, topic_env
from harness.servers import free_ports

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SERVICE_PORT_ENV = {
    "assessment": "CREDITWATCH_ASSESSMENT_PORT",
    "limits": "CREDITWATCH_LIMITS_PORT",
    "alerts": "CREDITWATCH_ALERTS_PORT",
}
FAST_S = 10.0
BANNER = "creditwatch dev is running"


def dev_env(*, embedded: bool = True, **extra: str) -> dict[str, str]:
    """The three service ports and (``embedded``) the embedded broker's port, all free."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDITWATCH_")}
    assessment, limits, alerts, broker = free_ports(4)
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
    if not embedded:
        del env["CREDITWATCH_DEV_BROKER_PORT"]
    env.update(extra)
    return env


@contextlib.contextmanager
def listener(port: int, *, answer: bytes | None = None) -> Iterator[None]:
    """A plain TCP listener on 127.0.0.1:port — no Kafka. With ``answer``, every
    connection gets those bytes (as an HTTP server would) and is closed."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(16)
    server.settimeout(0.2)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if answer is None:
                held.append(conn)  # accept and say nothing
            else:
                with conn, contextlib.suppress(OSError):
                    conn.recv(1024)
                    conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(2)
        server.close()
        for conn in held:
            conn.close()


def run_dev(env: dict[str, str], cwd: Path) -> tuple[int, str, float]:
    """``creditwatch dev`` to its end: exit code, output (stdout and stderr), seconds."""
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tools.cli", "dev"],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=60,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace")
        raise AssertionError(f"dev did not exit within 60 s:\n{output[-3000:]}") from None
    return done.returncode, done.stdout.decode(errors="replace"), time.monotonic() - started


def assert_refused(code: int, output: str, elapsed: float, *expected: str) -> None:
    assert code == 2, f"exit code {code}:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    assert BANNER not in output and "dev tokens" not in output, output[-3000:]
    assert elapsed < FAST_S, f"took {elapsed:.1f}s:\n{output}"
    lines = [line for line in output.splitlines() if line.strip()]
    matching = [line for line in lines if all(part in line for part in expected)]
    assert matching, f"no line with {expected} in:\n{output}"


@pytest.mark.parametrize("service", ["assessment", "limits", "alerts"])
def test_a_busy_service_port_is_one_line_naming_its_variable_and_exit_2(
    service: str, tmp_path: Path
) -> None:
    # Given dev's ports are free except the one of this service, held by a plain listener
    env = dev_env()
    port = int(env[SERVICE_PORT_ENV[service]])
    with listener(port):
        # When dev starts
        code, output, elapsed = run_dev(env, tmp_path)
    # Then it refuses at once with one line naming the variable to set, before any banner
    assert_refused(
        code,
        output,
        elapsed,
        f"127.0.0.1:{port}",
        SERVICE_PORT_ENV[service],
        "CREDITWATCH_HOST",
    )
    assert sum(SERVICE_PORT_ENV[service] in line for line in output.splitlines()) == 1
    # and nothing was started or created: no stores
    assert not (tmp_path / ".creditwatch").exists()


def test_every_busy_service_port_gets_its_own_line(tmp_path: Path) -> None:
    # Given all three service ports are held
    env = dev_env()
    ports = {name: int(env[var]) for name, var in SERVICE_PORT_ENV.items()}
    with listener(ports["assessment"]), listener(ports["limits"]), listener(ports["alerts"]):
        # When dev starts
        code, output, elapsed = run_dev(env, tmp_path)
    # Then each is named on a line of its own
    for name, var in SERVICE_PORT_ENV.items():
        assert_refused(code, output, elapsed, f"127.0.0.1:{ports[name]}", var)


@pytest.mark.parametrize(
    "answer",
    [None, b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"],
    ids=["silent", "http"],
)
def test_something_not_kafka_on_the_broker_port_is_refused_at_once(
    answer: bytes | None, tmp_path: Path
) -> None:
    # Given something that is not Kafka listens where dev would run its broker
    env = dev_env()
    port = int(env["CREDITWATCH_DEV_BROKER_PORT"])
    with listener(port, answer=answer):
        # When dev starts
        code, output, elapsed = run_dev(env, tmp_path)
    # Then it says so in one line and names what to set — no 40 s wait, no traceback
    assert_refused(
        code,
        output,
        elapsed,
        f"127.0.0.1:{port} is in use by something that is not a Kafka broker",
        "CREDITWATCH_KAFKA_BOOTSTRAP",
    )


def test_a_named_bootstrap_that_is_not_kafka_is_refused_at_once(tmp_path: Path) -> None:
    # Given CREDITWATCH_KAFKA_BOOTSTRAP names an address where an HTTP server answers
    (port,) = free_ports(1)
    env = dev_env(embedded=False, CREDITWATCH_KAFKA_BOOTSTRAP=f"127.0.0.1:{port}")
    with listener(port, answer=b"HTTP/1.1 400 Bad Request\r\n\r\n"):
        # When dev starts
        code, output, elapsed = run_dev(env, tmp_path)
    # Then one line says the named address is not a Kafka broker
    assert_refused(
        code,
        output,
        elapsed,
        "CREDITWATCH_KAFKA_BOOTSTRAP",
        f"127.0.0.1:{port} is in use by something that is not a Kafka broker",
    )


def test_an_unreachable_named_bootstrap_is_one_line_within_seconds(tmp_path: Path) -> None:
    # Given CREDITWATCH_KAFKA_BOOTSTRAP names a port nothing listens on
    (port,) = free_ports(1)
    env = dev_env(embedded=False, CREDITWATCH_KAFKA_BOOTSTRAP=f"127.0.0.1:{port}")
    # When dev starts
    code, output, elapsed = run_dev(env, tmp_path)
    # Then it says nothing answers there, instead of waiting on it or starting a broker there
    assert_refused(
        code, output, elapsed, f"CREDITWATCH_KAFKA_BOOTSTRAP=127.0.0.1:{port}", "nothing answers"
    )
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0


async def _topics(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


def test_a_kafka_broker_on_the_broker_port_is_not_used_unless_named(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    # Given a real Kafka broker listens where dev would run its embedded broker
    host, _, port = kafka_bootstrap.rpartition(":")
    assert host == "127.0.0.1", kafka_bootstrap
    env = dev_env(CREDITWATCH_DEV_BROKER_PORT=port)
    before = asyncio.run(_topics(kafka_bootstrap))
    # When dev starts without being pointed at it
    code, output, elapsed = run_dev(env, tmp_path)
    # Then it refuses, saying how to opt in, and has created (or published) nothing there
    assert_refused(
        code,
        output,
        elapsed,
        f"a Kafka broker is already listening on {kafka_bootstrap}",
        f"CREDITWATCH_KAFKA_BOOTSTRAP={kafka_bootstrap}",
    )
    created = asyncio.run(_topics(kafka_bootstrap)) - before
    assert not created, created


def test_a_kafka_broker_named_by_the_bootstrap_variable_is_used(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    # Given a real Kafka broker named by CREDITWATCH_KAFKA_BOOTSTRAP (topics of their own)
    prefix = new_prefix()
    env = dev_env(embedded=False, CREDITWATCH_KAFKA_BOOTSTRAP=kafka_bootstrap, **topic_env(prefix))
    ports = [int(env[var]) for var in SERVICE_PORT_ENV.values()]
    # When dev starts
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.cli", "dev"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.append(raw.decode(errors="replace"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        # Then it runs on that broker: every service becomes ready, no embedded broker
        deadline = time.monotonic() + 120
        for port in ports:
            while True:
                assert proc.poll() is None, f"dev exited {proc.returncode}:\n{''.join(lines)}"
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=3).status_code == 200:
                        break
                assert time.monotonic() < deadline, f"not ready:\n{''.join(lines)[-3000:]}"
                time.sleep(0.5)
        output = "".join(lines)
        assert f"using the Kafka broker at {kafka_bootstrap}" in output, output[-3000:]
        assert "Tansu" not in output
        assert f"{prefix}.ar.invoices" in asyncio.run(_topics(kafka_bootstrap))
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            raise
        reader.join(5)
    assert code == 0, "".join(lines)[-3000:]
