"""Start real PostgreSQL and Apache Kafka servers as throw-away child processes.

Why this exists: creditwatch's integration tests must run against the real PostgreSQL and
the real Apache Kafka 4.x (docs/architecture.md, "Brokers and databases"), yet developer
machines and CI have no Docker. So the harness runs the servers itself:

* PostgreSQL comes from Debian's packages (installed with apt when missing). Every start
  runs ``initdb`` into a fresh temporary directory with settings that trade durability for
  speed, and serves on a free loopback port with trust authentication. PostgreSQL refuses to
  run as root, so under root the server runs as the ``postgres`` OS user.
* Apache Kafka is not packaged by Debian, so its jars (and their runtime dependencies) are
  fetched from Maven Central with ``deploy/kafka/pom.xml`` into a cache folder and started
  with the machine's JDK as a single-node KRaft broker+controller.

Process hygiene matters more than usual because a leaked JVM or postmaster keeps a port, a
few hundred MB and a temp dir alive until someone notices. Every server therefore runs in
its own session/process group (so teardown can sweep children too), is stopped politely and
then killed after a timeout, is registered for an ``atexit`` backstop, and - unless it is
deliberately detached for ``scripts/test-infra`` - asks the kernel to SIGKILL it should the
Python process die without running ``atexit`` at all (``PR_SET_PDEATHSIG``).

Only the standard library is needed to import this module; ``asyncpg``, ``aiokafka`` and
``sqlalchemy`` (all in the project's virtualenv) are imported where they are used.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import ctypes
import ctypes.util
import fcntl
import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

__all__ = [
    "DATABASE_URL_ENV",
    "KAFKA_BOOTSTRAP_ENV",
    "KAFKA_POM",
    "InfraError",
    "KafkaServer",
    "PostgresServer",
    "cache_dir",
    "create_database",
    "create_topics",
    "create_topics_async",
    "drop_database",
    "ensure_kafka_jars",
    "ensure_postgres_installed",
    "free_port",
    "free_ports",
    "is_server_running",
    "kafka_version",
    "stop_detached",
    "wait_for_kafka",
]

#: Environment variables through which already-running servers are handed to the tests.
DATABASE_URL_ENV = "CREDITWATCH_TEST_DATABASE_URL"
KAFKA_BOOTSTRAP_ENV = "CREDITWATCH_TEST_KAFKA_BOOTSTRAP"

REPO_ROOT = Path(__file__).resolve().parents[2]
KAFKA_POM = REPO_ROOT / "deploy" / "kafka" / "pom.xml"

LOOPBACK = "127.0.0.1"
PG_SUPERUSER = "postgres"
PG_OS_USER = "postgres"
_PORT_ATTEMPTS = 3
_ADDRESS_IN_USE = "Address already in use"

_T = TypeVar("_T")


class InfraError(RuntimeError):
    """A test server could not be installed, fetched or started; the message says why."""


# --------------------------------------------------------------------------------------
# small utilities
# --------------------------------------------------------------------------------------


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """Return ``count`` distinct ports that were free on ``host`` a moment ago.

    All sockets are held open until every port is picked so the kernel cannot hand out the
    same port twice. Another process may still grab one before the server binds it; the
    servers below retry with fresh ports when that happens.
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port(host: str = LOOPBACK) -> int:
    """Return one port that was free on ``host`` a moment ago."""
    return free_ports(1, host)[0]


def cache_dir() -> Path:
    """Where downloads are kept between runs: ``$CREDITWATCH_CACHE`` or ~/.cache/creditwatch."""
    configured = os.environ.get("CREDITWATCH_CACHE")
    path = Path(configured) if configured else Path.home() / ".cache" / "creditwatch"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise slow one-time setup (jar download, apt) between concurrent test sessions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"<{path} not readable>"
    return "\n".join(text.splitlines()[-lines:]) or f"<{path} is empty>"


def _tail_text(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _run_coroutine(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion from synchronous code, even inside a running loop.

    The fixtures and the CLI are synchronous, but the clients (asyncpg, aiokafka) are not,
    and pytest-asyncio may already have an event loop on this thread. A short-lived thread
    with its own loop sidesteps both problems.
    """
    outcome: dict[str, Any] = {}

    def runner() -> None:
        try:
            outcome["value"] = asyncio.run(factory())
        except BaseException as exc:  # re-raised in the calling thread
            outcome["error"] = exc

    thread = threading.Thread(target=runner, name="creditwatch-infra-async", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    value: _T = outcome["value"]
    return value


@dataclass(frozen=True)
class _OsUser:
    name: str
    uid: int
    gid: int


def _child_env() -> dict[str, str]:
    """The environment for server processes: ours, minus libpq's PG* variables."""
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


def _run(
    argv: Sequence[str | Path],
    *,
    what: str,
    timeout: float,
    cwd: Path | None = None,
    run_as: _OsUser | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Run a command to completion; raise InfraError with its output if it fails."""
    args = [str(arg) for arg in argv]
    try:
        done = subprocess.run(
            args,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            user=run_as.uid if run_as else None,
            group=run_as.gid if run_as else None,
            extra_groups=[] if run_as else None,
            check=False,
        )
    except FileNotFoundError as exc:
        raise InfraError(f"{what}: command not found: {args[0]}") from exc
    except subprocess.TimeoutExpired as exc:
        output = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) else ""
        raise InfraError(
            f"{what} timed out after {timeout:.0f}s: {' '.join(args)}\n{_tail_text(output)}"
        ) from exc
    if done.returncode != 0:
        raise InfraError(
            f"{what} failed with exit code {done.returncode}: {' '.join(args)}\n"
            f"{_tail_text(done.stdout)}"
        )
    return done.stdout


# --------------------------------------------------------------------------------------
# process management
# --------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _parent_death_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` making the kernel SIGKILL the child when its parent thread dies.

    This is the backstop for the one case ``atexit`` cannot cover: the test process itself
    being SIGKILLed (OOM killer, CI timeout). Linux only; elsewhere it is a no-op. The signal
    fires when the *thread* that spawned the child exits, so start servers from a thread
    that lives as long as they should (pytest's main thread does).
    """
    if not sys.platform.startswith("linux"):
        return None
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    prctl = ctypes.CDLL(libc_name, use_errno=True).prctl  # resolved before fork, not after

    def set_parent_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)

    return set_parent_death_signal


def _spawn(
    argv: Sequence[str | Path],
    *,
    log_path: Path,
    cwd: Path,
    run_as: _OsUser | None,
    die_with_parent: bool,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a long-running server in a new session, its output going to ``log_path``.

    The log is truncated so that it only ever describes this attempt.
    """
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [str(arg) for arg in argv],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: teardown can sweep grandchildren
            preexec_fn=_parent_death_hook() if die_with_parent else None,
            user=run_as.uid if run_as else None,
            group=run_as.gid if run_as else None,
            extra_groups=[] if run_as else None,
        )


def _is_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie.

    Detached servers are reparented to PID 1, which in containers may be slow to reap, so
    "kill(pid, 0) succeeds" alone would mistake an exited server for a running one.
    """
    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc/self/stat").exists():
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state not in {"Z", "X"}
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_group(
    pid: int,
    *,
    first_signal: signal.Signals,
    timeout: float,
    popen: subprocess.Popen[bytes] | None = None,
) -> None:
    """Stop a server whose process group id is ``pid``: politely, then by force.

    ``first_signal`` goes to the group leader only (PostgreSQL and Kafka both shut their
    own helpers down cleanly); whatever is still alive after ``timeout`` - leader or
    stragglers in its group - gets SIGKILL. PostgreSQL's children move to process groups
    of their own, but they watch the postmaster and exit as soon as it is gone.
    """

    def leader_gone() -> bool:
        if popen is not None:
            return popen.poll() is not None
        return not _is_running(pid)

    if not leader_gone():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, first_signal)
    deadline = time.monotonic() + timeout
    while not leader_gone() and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    if popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=10)
    else:
        deadline = time.monotonic() + 10
        while _is_running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


_SERVER_PID_FILE = "server.pid"
_STALE_UNSTARTED_DIR_SECONDS = 3600.0


def _sweep_stale_dirs(prefix: str) -> None:
    """Delete temp dirs left behind by servers whose test run was SIGKILLed.

    The kernel then kills the servers (see ``_parent_death_hook``) but nobody removes their
    files. A dir survives while the pid in its ``server.pid`` is alive and still names it,
    or - without a pid file - while it is younger than an hour (a server being set up by a
    concurrent session right now).
    """
    for path in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        try:
            pid = int((path / _SERVER_PID_FILE).read_text())
        except (OSError, ValueError):
            try:
                if time.time() - path.stat().st_mtime < _STALE_UNSTARTED_DIR_SECONDS:
                    continue
            except OSError:
                continue
        else:
            if _is_running(pid) and str(path) in _cmdline(pid):
                continue
        _remove_tree(path)


class _TempServer:
    """Shared lifecycle of a server process that lives in a private temp directory."""

    _stop_signal: signal.Signals = signal.SIGTERM
    _stop_timeout: float = 15.0

    def __init__(self, *, process: subprocess.Popen[bytes], base_dir: Path, startup: float):
        (base_dir / _SERVER_PID_FILE).write_text(f"{process.pid}\n")
        self._process: subprocess.Popen[bytes] | None = process
        self.base_dir = base_dir
        #: Seconds from ``start()`` until the server answered its first real request.
        self.startup_seconds = startup
        _LIVE.add(self)

    @property
    def pid(self) -> int:
        if self._process is None:
            raise InfraError(f"{type(self).__name__} is not running")
        return self._process.pid

    def stop(self) -> None:
        """Stop the server (signal, then SIGKILL after a timeout) and delete its files."""
        _LIVE.discard(self)
        process, self._process = self._process, None
        if process is not None:
            _stop_group(
                process.pid,
                first_signal=self._stop_signal,
                timeout=self._stop_timeout,
                popen=process,
            )
        _remove_tree(self.base_dir)

    def detach(self) -> dict[str, Any]:
        """Leave the server running after this process exits; return what ``stop_detached`` needs.

        Only meaningful for servers started with ``die_with_parent=False``.
        """
        _LIVE.discard(self)
        process, self._process = self._process, None
        if process is None:
            raise InfraError(f"{type(self).__name__} is not running")
        return {
            "pid": process.pid,
            "base_dir": str(self.base_dir),
            "stop_signal": self._stop_signal.name,
            "stop_timeout": self._stop_timeout,
        }

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def is_server_running(state: dict[str, Any]) -> bool:
    """Whether the server described by ``_TempServer.detach()`` is still alive.

    The pid only counts while its command line still names the server's temp dir, so a
    stale state file can never make us signal an unrelated process that reused the pid.
    """
    pid = int(state["pid"])
    return _is_running(pid) and str(state["base_dir"]) in _cmdline(pid)


def stop_detached(state: dict[str, Any]) -> bool:
    """Stop a server described by ``_TempServer.detach()``; False if it was already gone."""
    stopped = False
    if is_server_running(state):
        _stop_group(
            int(state["pid"]),
            first_signal=signal.Signals[str(state["stop_signal"])],
            timeout=float(state["stop_timeout"]),
        )
        stopped = True
    _remove_tree(Path(state["base_dir"]))
    return stopped


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


_LIVE: set[_TempServer] = set()


@atexit.register
def _stop_all_servers() -> None:
    """Backstop: stop every server this process started and did not stop or detach."""
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop()


# --------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------

_PG_DIR_PREFIX = "creditwatch-pg-"
# --no-sync: nothing here has to survive a power cut, and skipping the fsyncs saves seconds.
_INITDB_OPTIONS = ["--username", PG_SUPERUSER, "--auth", "trust", "--encoding", "UTF8"]
_INITDB_OPTIONS += ["--locale", "C", "--no-sync"]

_PG_SETTINGS = """
# --- creditwatch test harness: disposable cluster, durability traded for speed ---
listen_addresses = '127.0.0.1'
unix_socket_directories = '{sockets}'
max_connections = 200
shared_buffers = 128MB
fsync = off
synchronous_commit = off
full_page_writes = off
jit = off
log_min_messages = warning
"""

_PG_HBA = """\
# creditwatch test harness: trust on the socket and on loopback only
local   all all              trust
host    all all 127.0.0.1/32 trust
"""


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.name)) or (0,)


def find_postgres_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` that has a server, if any."""
    candidates = [
        bindir
        for bindir in Path("/usr/lib/postgresql").glob("*/bin")
        if (bindir / "postgres").is_file() and (bindir / "initdb").is_file()
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda bindir: _version_key(bindir.parent))


def _apt_install(packages: Sequence[str]) -> None:
    if shutil.which("apt-get") is None:
        raise InfraError(
            f"{', '.join(packages)} missing and apt-get is not available: install it yourself"
        )
    prefix: list[str] = []
    if os.geteuid() != 0:
        sudo = shutil.which("sudo")
        if sudo is None or subprocess.run([sudo, "-n", "true"], check=False).returncode != 0:
            raise InfraError(
                f"{', '.join(packages)} is not installed and installing it needs root: run "
                f"`sudo apt-get install -y {' '.join(packages)}` (or `scripts/test-infra fetch` "
                "as root)"
            )
        prefix = [sudo, "-n", "env", "DEBIAN_FRONTEND=noninteractive"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Wait for a concurrent apt instead of failing; never stop at a config-file prompt.
    options = ["-o", "DPkg::Lock::Timeout=300"]
    options += ["-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold"]
    _run([*prefix, "apt-get", *options, "update"], what="apt-get update", timeout=600, env=env)
    _run(
        [*prefix, "apt-get", *options, "install", "-y", "--no-install-recommends", *packages],
        what=f"apt-get install {' '.join(packages)}",
        timeout=1200,
        env=env,
    )


def ensure_prometheus_installed() -> Path:
    """Return the directory of ``prometheus`` and ``promtool``, installing Debian's package
    if needed (only the binaries are used; the package's own service is never relied on)."""
    binary = shutil.which("prometheus")
    if binary is None or shutil.which("promtool") is None:
        _apt_install(["prometheus"])
        binary = shutil.which("prometheus")
    if binary is None:
        raise InfraError("prometheus is still missing after installing the Debian package")
    return Path(binary).parent


def ensure_postgres_installed() -> Path:
    """Return the PostgreSQL bin dir, installing Debian's ``postgresql`` package if needed."""
    bindir = find_postgres_bindir()
    if bindir is not None:
        return bindir
    with _file_lock(cache_dir() / "apt.lock"):
        if find_postgres_bindir() is None:
            _apt_install(["postgresql"])
    bindir = find_postgres_bindir()
    if bindir is None:
        raise InfraError("the postgresql package is installed but no server binaries were found")
    return bindir


def _postgres_os_user() -> _OsUser | None:
    """The account to run PostgreSQL as: ``postgres`` under root, else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(PG_OS_USER)
    except KeyError:
        useradd = ["useradd", "--system", "--user-group", "--no-create-home"]
        useradd += ["--home-dir", "/var/lib/postgresql", "--shell", "/usr/sbin/nologin"]
        _run(
            [*useradd, PG_OS_USER],
            what=f"creating the {PG_OS_USER} OS user",
            timeout=60,
        )
        entry = pwd.getpwnam(PG_OS_USER)
    return _OsUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _postmaster_ready(data_dir: Path) -> bool:
    """PostgreSQL >= 10 writes its state into line 8 of postmaster.pid; "ready" means serving."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
    except OSError:
        return False
    return len(lines) >= 8 and lines[7].strip() == "ready"


def _tcp_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class _PortTaken(Exception):
    """The port picked for a server was taken before the server could bind it."""


class PostgresServer(_TempServer):
    """A private PostgreSQL cluster in a temp dir; see the module docstring.

    ``url`` points at the ``postgres`` maintenance database; tests should work in a
    database of their own from ``create_database()``.
    """

    _stop_signal = signal.SIGINT  # "fast" shutdown: abort sessions, no waiting for clients
    _stop_timeout = 15.0

    def __init__(
        self,
        *,
        process: subprocess.Popen[bytes],
        base_dir: Path,
        startup: float,
        port: int,
        version: str,
    ):
        super().__init__(process=process, base_dir=base_dir, startup=startup)
        self.host = LOOPBACK
        self.port = port
        self.user = PG_SUPERUSER
        self.version = version

    @property
    def url(self) -> str:
        """SQLAlchemy async URL of the maintenance database."""
        return f"postgresql+asyncpg://{self.user}@{self.host}:{self.port}/postgres"

    @property
    def sync_dsn(self) -> str:
        """libpq DSN of the maintenance database (psql, psycopg)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/postgres"

    def create_database(self, name: str | None = None) -> str:
        """Create a fresh database and return its SQLAlchemy async URL."""
        return create_database(self.url, name)

    @classmethod
    def start(cls, *, timeout: float = 60.0, die_with_parent: bool = True) -> PostgresServer:
        """initdb a fresh cluster and start it on a free loopback port."""
        started = time.monotonic()
        bindir = ensure_postgres_installed()
        run_as = _postgres_os_user()
        _sweep_stale_dirs(_PG_DIR_PREFIX)
        base_dir = Path(tempfile.mkdtemp(prefix=_PG_DIR_PREFIX))
        process: subprocess.Popen[bytes] | None = None
        try:
            data_dir = base_dir / "data"
            sockets = base_dir / "sockets"
            sockets.mkdir()
            if run_as is not None:
                for path in (base_dir, sockets):
                    os.chown(path, run_as.uid, run_as.gid)
            env = _child_env()
            _run(
                [bindir / "initdb", "--pgdata", data_dir, *_INITDB_OPTIONS],
                what="initdb",
                timeout=120,
                cwd=base_dir,
                run_as=run_as,
                env=env,
            )
            (data_dir / "pg_hba.conf").write_text(_PG_HBA)
            with (data_dir / "postgresql.conf").open("a") as conf:
                conf.write(_PG_SETTINGS.format(sockets=sockets))

            log_path = base_dir / "postgres.log"
            deadline = started + timeout
            for _attempt in range(_PORT_ATTEMPTS):
                port = free_port()
                process = _spawn(
                    [bindir / "postgres", "-D", data_dir, "-p", str(port)],
                    log_path=log_path,
                    cwd=base_dir,
                    run_as=run_as,
                    die_with_parent=die_with_parent,
                    env=env,
                )
                try:
                    _wait_for_postgres(process, data_dir, port, log_path, deadline)
                except _PortTaken:
                    _stop_group(process.pid, first_signal=signal.SIGKILL, timeout=0, popen=process)
                    process = None
                    continue
                return cls(
                    process=process,
                    base_dir=base_dir,
                    startup=time.monotonic() - started,
                    port=port,
                    version=bindir.parent.name,
                )
            raise InfraError(
                f"PostgreSQL could not bind a free port in {_PORT_ATTEMPTS} attempts:\n"
                f"{_tail(log_path)}"
            )
        except BaseException:
            if process is not None:
                _stop_group(process.pid, first_signal=signal.SIGKILL, timeout=0, popen=process)
            _remove_tree(base_dir)
            raise


def _wait_for_postgres(
    process: subprocess.Popen[bytes], data_dir: Path, port: int, log_path: Path, deadline: float
) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log = _tail(log_path)
            if _ADDRESS_IN_USE in log:
                raise _PortTaken(port)
            raise InfraError(f"PostgreSQL exited with code {process.returncode}:\n{log}")
        if _postmaster_ready(data_dir) and _tcp_accepts(LOOPBACK, port):
            return
        time.sleep(0.05)
    raise InfraError(f"PostgreSQL did not become ready on port {port}:\n{_tail(log_path)}")


_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _admin_connect_args(server_url: str) -> dict[str, Any]:
    from sqlalchemy.engine import make_url

    url = make_url(server_url)
    return {
        "host": url.host or LOOPBACK,
        "port": url.port or 5432,
        "user": url.username or PG_SUPERUSER,
        "password": url.password,
        "database": url.database or "postgres",
    }


def create_database(server_url: str, name: str | None = None) -> str:
    """Create database ``name`` (default: a unique one) on the server behind ``server_url``.

    ``server_url`` is any SQLAlchemy URL of the server; the returned URL is the same with
    the database replaced, so credentials and driver carry over.
    """
    from sqlalchemy.engine import make_url

    name = name or f"creditwatch_test_{uuid.uuid4().hex[:12]}"
    if not _DB_NAME.match(name):
        raise ValueError(f"unsafe database name {name!r}")
    connect_args = _admin_connect_args(server_url)

    async def create() -> None:
        import asyncpg

        connection = await asyncpg.connect(**connect_args, timeout=10)
        try:
            await connection.execute(f'CREATE DATABASE "{name}"')
        finally:
            await connection.close()

    try:
        _run_coroutine(create)
    except Exception as exc:
        shown = make_url(server_url).render_as_string(hide_password=True)
        raise InfraError(f"could not create database {name!r} via {shown}: {exc}") from exc
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def drop_database(server_url: str, name: str) -> None:
    """Drop database ``name`` (disconnecting its sessions); no error if it is gone."""
    if not _DB_NAME.match(name):
        raise ValueError(f"unsafe database name {name!r}")
    connect_args = _admin_connect_args(server_url)

    async def drop() -> None:
        import asyncpg

        connection = await asyncpg.connect(**connect_args, timeout=10)
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await connection.close()

    _run_coroutine(drop)


# --------------------------------------------------------------------------------------
# Apache Kafka
# --------------------------------------------------------------------------------------

_KAFKA_DIR_PREFIX = "creditwatch-kafka-"
_POM_NS = "{http://maven.apache.org/POM/4.0.0}"
_KAFKA_MAIN = "kafka.Kafka"
_KAFKA_STORAGE_TOOL = "kafka.tools.StorageTool"
_KAFKA_NODE_ID = 1

_KAFKA_LOG4J2 = """\
<?xml version="1.0" encoding="UTF-8"?>
<!-- creditwatch test harness: broker log to one file, INFO for Kafka itself only. -->
<Configuration status="WARN">
  <Appenders>
    <File name="file" fileName="{log_file}" append="true">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Logger name="kafka" level="INFO"/>
    <Logger name="org.apache.kafka" level="INFO"/>
    <Logger name="org.apache.kafka.clients" level="WARN"/>
    <Logger name="org.apache.kafka.common.config" level="WARN"/>
    <Root level="WARN">
      <AppenderRef ref="file"/>
    </Root>
  </Loggers>
</Configuration>
"""


@dataclass(frozen=True)
class KafkaDistribution:
    """The fetched Kafka class path."""

    version: str
    libs: Path

    @property
    def classpath(self) -> str:
        return str(self.libs / "*")


def kafka_version(pom: Path = KAFKA_POM) -> str:
    """The ``kafka.version`` property of the pom: the single source of the Kafka version."""
    properties = ET.parse(pom).getroot().find(f"{_POM_NS}properties")
    if properties is not None:
        for element in properties:
            if element.tag == f"{_POM_NS}kafka.version" and element.text:
                return element.text.strip()
    raise InfraError(f"{pom} has no <kafka.version> property")


def ensure_kafka_jars(pom: Path = KAFKA_POM) -> KafkaDistribution:
    """Return the Kafka class path, fetching it with Maven into the cache on first use.

    The cache folder is ``<cache>/kafka-<version>/libs``; a ``.complete`` marker holding the
    pom's hash is written last, so an interrupted download or an edited pom refetches.
    """
    version = kafka_version(pom)
    home = cache_dir() / f"kafka-{version}"
    libs = home / "libs"
    marker = home / ".complete"
    pom_hash = hashlib.sha256(pom.read_bytes()).hexdigest()

    def complete() -> bool:
        try:
            return marker.read_text().strip() == pom_hash and libs.is_dir()
        except OSError:
            return False

    if complete():
        return KafkaDistribution(version, libs)
    with _file_lock(home.with_name(f"kafka-{version}.lock")):
        if complete():
            return KafkaDistribution(version, libs)
        mvn = shutil.which("mvn")
        if mvn is None:
            raise InfraError("Maven (mvn) is needed to fetch the Kafka jars: apt-get install maven")
        home.mkdir(parents=True, exist_ok=True)
        partial = home / f"libs.partial-{os.getpid()}"
        _remove_tree(partial)
        try:
            maven: list[str | Path] = [mvn, "-q", "-B", "-Dstyle.color=never", "-f", pom]
            _run(
                [*maven, "dependency:copy-dependencies", f"-DoutputDirectory={partial}"],
                what=f"fetching Kafka {version} jars with Maven",
                timeout=1800,
                cwd=pom.parent,
            )
            if not (partial / f"kafka_2.13-{version}.jar").is_file():
                raise InfraError(f"Maven finished but kafka_2.13-{version}.jar is not in {partial}")
            marker.unlink(missing_ok=True)
            _remove_tree(libs)
            partial.rename(libs)
            marker.write_text(pom_hash + "\n")
        finally:
            _remove_tree(partial)
    return KafkaDistribution(version, libs)


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise InfraError("a JDK (17 or newer) is needed to run Kafka: `java` is not on PATH")
    return java


def _new_cluster_id() -> str:
    """A random Kafka cluster id: a UUID in unpadded URL-safe base64, as Kafka expects.

    Like Kafka's own ``Uuid.randomUuid`` we avoid ids starting with '-', which command-line
    parsers would read as an option.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _broker_properties(*, port: int, controller_port: int, log_dirs: Path) -> str:
    """server.properties of a single-node KRaft broker+controller.

    The quorum is static (``controller.quorum.voters``), so storage is formatted once and a
    retry on a different port only needs a new properties file.
    """
    settings = {
        "process.roles": "broker,controller",
        "node.id": str(_KAFKA_NODE_ID),
        "controller.quorum.voters": f"{_KAFKA_NODE_ID}@{LOOPBACK}:{controller_port}",
        "listeners": f"PLAINTEXT://{LOOPBACK}:{port},CONTROLLER://{LOOPBACK}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{LOOPBACK}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(log_dirs),
        "num.partitions": "4",
        "auto.create.topics.enable": "true",
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        # Internal topics with Kafka's production partition counts (50) make the first
        # consumer group / transaction on a fresh broker noticeably slower on two cores.
        "offsets.topic.num.partitions": "4",
        "transaction.state.log.num.partitions": "4",
    }
    lines = ["# creditwatch test harness: single-node KRaft broker+controller"]
    lines += [f"{key}={value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def _logging_options(base_dir: Path) -> list[str]:
    return [
        f"-Dlog4j2.configurationFile={base_dir / 'log4j2.xml'}",
        f"-Dkafka.logs.dir={base_dir}",
    ]


_BROKER_JVM_OPTIONS = [
    "-Xmx512m",
    "-Xms256m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
]
# StorageTool runs for a second: skip the optimising JIT and use the cheapest collector.
_TOOL_JVM_OPTIONS = ["-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-Djava.awt.headless=true"]


async def _probe_kafka(bootstrap: str, timeout_s: float) -> None:
    """One metadata round-trip: the broker is up and a controller has been elected."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="creditwatch-harness",
        request_timeout_ms=int(timeout_s * 1000),
    )
    try:
        async with asyncio.timeout(timeout_s):
            await admin.start()
            cluster: dict[str, Any] = await admin.describe_cluster()
    finally:
        await admin.close()
    if not cluster.get("brokers") or int(cluster.get("controller_id", -1)) < 0:
        raise InfraError(f"Kafka at {bootstrap} has no live broker/controller yet: {cluster}")


def wait_for_kafka(bootstrap: str, timeout: float = 30.0) -> None:
    """Block until the broker at ``bootstrap`` answers a metadata request."""
    deadline = time.monotonic() + timeout
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    last_error: object = None
    while time.monotonic() < deadline:
        if not _tcp_accepts(host, int(port)):  # cheap, and spares us aiokafka's error logs
            last_error = f"nothing accepts connections on {host}:{port}"
            time.sleep(0.2)
            continue
        try:
            _run_coroutine(lambda: _probe_kafka(bootstrap, timeout_s=5.0))
            return
        except Exception as exc:
            last_error = exc
            time.sleep(0.2)
    raise InfraError(f"Kafka at {bootstrap} did not answer within {timeout:.0f}s: {last_error}")


class KafkaServer(_TempServer):
    """A single-node Apache Kafka 4.x KRaft cluster in a temp dir; see the module docstring."""

    _stop_signal = signal.SIGTERM  # runs the broker's shutdown hook: controlled shutdown
    _stop_timeout = 20.0

    def __init__(
        self,
        *,
        process: subprocess.Popen[bytes],
        base_dir: Path,
        startup: float,
        port: int,
        controller_port: int,
        version: str,
        cluster_id: str,
    ):
        super().__init__(process=process, base_dir=base_dir, startup=startup)
        self.port = port
        self.controller_port = controller_port
        self.version = version
        self.cluster_id = cluster_id

    @property
    def bootstrap(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.base_dir / "server.log"

    @classmethod
    def start(cls, *, timeout: float = 120.0, die_with_parent: bool = True) -> KafkaServer:
        """Format storage and start the broker; return once it serves metadata requests."""
        started = time.monotonic()
        distribution = ensure_kafka_jars()
        java = _java()
        _sweep_stale_dirs(_KAFKA_DIR_PREFIX)
        base_dir = Path(tempfile.mkdtemp(prefix=_KAFKA_DIR_PREFIX))
        process: subprocess.Popen[bytes] | None = None
        try:
            data_dir = base_dir / "data"
            properties = base_dir / "server.properties"
            (base_dir / "log4j2.xml").write_text(
                _KAFKA_LOG4J2.format(log_file=base_dir / "server.log")
            )
            cluster_id = _new_cluster_id()
            jvm_output = base_dir / "kafka.out"
            deadline = started + timeout
            formatted = False
            for _attempt in range(_PORT_ATTEMPTS):
                port, controller_port = free_ports(2)
                properties.write_text(
                    _broker_properties(
                        port=port, controller_port=controller_port, log_dirs=data_dir
                    )
                )
                (base_dir / "server.log").unlink(missing_ok=True)  # describe this attempt only
                if not formatted:
                    _run(
                        [
                            java,
                            *_TOOL_JVM_OPTIONS,
                            *_logging_options(base_dir),
                            "-cp",
                            distribution.classpath,
                            _KAFKA_STORAGE_TOOL,
                            "format",
                            "--cluster-id",
                            cluster_id,
                            "--config",
                            properties,
                        ],
                        what="formatting Kafka storage",
                        timeout=max(deadline - time.monotonic(), 10),
                        cwd=base_dir,
                    )
                    formatted = True
                process = _spawn(
                    [
                        java,
                        *_BROKER_JVM_OPTIONS,
                        *_logging_options(base_dir),
                        "-cp",
                        distribution.classpath,
                        _KAFKA_MAIN,
                        properties,
                    ],
                    log_path=jvm_output,
                    cwd=base_dir,
                    run_as=None,
                    die_with_parent=die_with_parent,
                )
                bootstrap = f"{LOOPBACK}:{port}"
                try:
                    _wait_for_broker(process, bootstrap, base_dir, deadline)
                except _PortTaken:
                    _stop_group(process.pid, first_signal=signal.SIGKILL, timeout=0, popen=process)
                    process = None
                    continue
                return cls(
                    process=process,
                    base_dir=base_dir,
                    startup=time.monotonic() - started,
                    port=port,
                    controller_port=controller_port,
                    version=distribution.version,
                    cluster_id=cluster_id,
                )
            raise InfraError(
                f"Kafka could not bind free ports in {_PORT_ATTEMPTS} attempts:\n"
                f"{_kafka_logs(base_dir)}"
            )
        except BaseException:
            if process is not None:
                _stop_group(process.pid, first_signal=signal.SIGKILL, timeout=0, popen=process)
            _remove_tree(base_dir)
            raise


def _kafka_logs(base_dir: Path) -> str:
    return (
        f"--- tail of {base_dir / 'server.log'} ---\n{_tail(base_dir / 'server.log')}\n"
        f"--- tail of {base_dir / 'kafka.out'} (JVM stdout/stderr) ---\n"
        f"{_tail(base_dir / 'kafka.out', 20)}"
    )


def _wait_for_broker(
    process: subprocess.Popen[bytes], bootstrap: str, base_dir: Path, deadline: float
) -> None:
    host, port = bootstrap.rsplit(":", 1)
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            logs = _kafka_logs(base_dir)
            if _ADDRESS_IN_USE in logs:
                raise _PortTaken(bootstrap)
            raise InfraError(f"Kafka exited with code {process.returncode}:\n{logs}")
        if _tcp_accepts(host, int(port)):
            try:
                _run_coroutine(lambda: _probe_kafka(bootstrap, timeout_s=5.0))
                return
            except Exception as exc:
                last_error = exc
        time.sleep(0.1)
    raise InfraError(
        f"Kafka did not become ready at {bootstrap} in time (last probe error: {last_error}):\n"
        f"{_kafka_logs(base_dir)}"
    )


async def create_topics_async(
    bootstrap: str, names: Iterable[str], partitions: int = 4, *, timeout_s: float = 30.0
) -> None:
    """Create the topics that do not exist yet, then wait until every partition has a leader.

    Idempotent: existing topics (whatever their partition count) are left alone.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import for_code

    wanted = list(dict.fromkeys(names))
    if not wanted:
        return
    topic_already_exists = 36
    deadline = time.monotonic() + timeout_s
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="creditwatch-harness")
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [name for name in wanted if name not in existing]
        if missing:
            response = await admin.create_topics(
                [NewTopic(name, partitions, 1) for name in missing],
                timeout_ms=int(timeout_s * 1000),
            )
            for topic, error_code, *rest in response.topic_errors:
                if error_code not in (0, topic_already_exists):
                    message = rest[0] if rest else ""
                    raise for_code(error_code)(f"could not create topic {topic}: {message}")
        while True:
            described = await admin.describe_topics(wanted)
            if all(
                topic["error_code"] == 0
                and topic["partitions"]
                and all(p["leader"] >= 0 for p in topic["partitions"])
                for topic in described
            ):
                return
            if time.monotonic() > deadline:
                raise InfraError(f"topics {wanted} have no leaders after {timeout_s:.0f}s")
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


def create_topics(
    bootstrap: str, names: Iterable[str], partitions: int = 4, *, timeout_s: float = 30.0
) -> None:
    """Synchronous ``create_topics_async`` (safe to call while an event loop is running)."""
    wanted = list(names)
    _run_coroutine(lambda: create_topics_async(bootstrap, wanted, partitions, timeout_s=timeout_s))
