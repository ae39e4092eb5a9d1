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

Several harness runs share one machine (parallel pytest sessions, CI, a detached pair from
``scripts/test-infra``), and each start sweeps away the temp dirs that SIGKILLed runs left
behind. A run only ever removes what is provably nobody's: every temp dir carries its owner
(``owner.lock``, held by the owning harness process and inherited by its servers, and
``owner.json``, naming the run and the processes by pid *and* start time), and a dir goes
only when its lock is free and none of those processes lives - never because a server's pid
is dead, which it is after every restart. Servers can be stopped and started again on the
same port and data (``stop_process``, ``start_process``, ``restart``) for fault tests.

Only the standard library is needed to import this module; ``asyncpg``, ``aiokafka`` and
``sqlalchemy`` (all in the project's virtualenv) are imported where they are used.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import fcntl
import hashlib
import json
import os
import pwd
import queue
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
    "DirFacts",
    "InfraError",
    "KafkaServer",
    "OwnerRecord",
    "PostgresServer",
    "ProcessIdentity",
    "SweepDecision",
    "cache_dir",
    "create_database",
    "create_topics",
    "create_topics_async",
    "drop_database",
    "ensure_kafka_jars",
    "ensure_postgres_installed",
    "free_port",
    "free_ports",
    "is_alive",
    "is_server_running",
    "kafka_version",
    "process_identity",
    "run_id",
    "stop_detached",
    "sweep_decision",
    "wait_for_kafka",
]

#: Environment variables through which already-running servers are handed to the tests.
DATABASE_URL_ENV = "CREDITWATCH_TEST_DATABASE_URL"
KAFKA_BOOTSTRAP_ENV = "CREDITWATCH_TEST_KAFKA_BOOTSTRAP"

REPO_ROOT = Path(__file__).resolve().parents[1]
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


class _LongLivedThread:
    """Runs calls in one daemon thread that lasts as long as the process.

    Servers that must die with this process are spawned from the main thread, or else from
    here: the parent-death signal fires when the spawning *thread* ends, and a fixture or a
    fault test may well restart a server from a worker thread that ends long before.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]]
        self._calls = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def call(self, function: Callable[[], _T]) -> _T:
        if threading.current_thread() is threading.main_thread():
            return function()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name="creditwatch-infra-spawner", daemon=True
                )
                self._thread.start()
        done: concurrent.futures.Future[_T] = concurrent.futures.Future()
        self._calls.put((function, done))
        return done.result()

    def forget(self) -> None:
        """After fork: the child has no spawner thread, whatever the parent had."""
        self._lock = threading.Lock()
        self._calls = queue.SimpleQueue()
        self._thread = None

    def _serve(self) -> None:
        while True:
            function, done = self._calls.get()
            if done.set_running_or_notify_cancel():
                try:
                    done.set_result(function())
                except BaseException as exc:  # handed to the calling thread
                    done.set_exception(exc)


_SPAWNER = _LongLivedThread()


def _spawn(
    argv: Sequence[str | Path],
    *,
    log_path: Path,
    cwd: Path,
    run_as: _OsUser | None,
    die_with_parent: bool,
    env: dict[str, str] | None = None,
    pass_fds: Sequence[int] = (),
) -> subprocess.Popen[bytes]:
    """Start a long-running server in a new session, its output going to ``log_path``.

    The log is truncated so that it only ever describes this attempt. ``pass_fds`` are
    inherited by the server (its temp dir's owner lock: see "ownership" below).
    """

    def spawn() -> subprocess.Popen[bytes]:
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
                pass_fds=tuple(pass_fds),
            )

    return _SPAWNER.call(spawn) if die_with_parent else spawn()


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


# --------------------------------------------------------------------------------------
# process identity: a pid alone names a process only until the kernel reuses it
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class ProcessIdentity:
    """One process for as long as it lives: its pid and its start time.

    ``start_ticks`` is field 22 of ``/proc/<pid>/stat`` (clock ticks since boot). The kernel
    hands a pid out again soon after its process is gone (``pid_max`` can be as low as
    32768, and test runs start thousands of processes), but never with the same start time
    within one boot, so the pair tells a live process from an impostor.
    """

    pid: int
    start_ticks: int

    def to_json(self) -> dict[str, int]:
        return {"pid": self.pid, "start_ticks": self.start_ticks}

    @classmethod
    def from_json(cls, data: Any) -> ProcessIdentity:
        if not isinstance(data, dict):
            raise ValueError(f"a process identity must be an object, not {data!r}")
        return cls(pid=int(data["pid"]), start_ticks=int(data["start_ticks"]))


@dataclass(frozen=True)
class _ProcStat:
    identity: ProcessIdentity
    state: str
    ppid: int
    pgrp: int


def _proc_stat(pid: int) -> _ProcStat | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        # The command name (field 2) may hold spaces and parentheses: split after its end.
        fields = text.rsplit(")", 1)[1].split()
        return _ProcStat(
            identity=ProcessIdentity(pid, int(fields[19])),
            state=fields[0],
            ppid=int(fields[1]),
            pgrp=int(fields[2]),
        )
    except (OSError, IndexError, ValueError):
        return None


def process_identity(pid: int) -> ProcessIdentity | None:
    """The identity of process ``pid`` if it is alive (a zombie is not), else None."""
    stat = _proc_stat(pid)
    if stat is None or stat.state in {"Z", "X"}:
        return None
    return stat.identity


def is_alive(identity: ProcessIdentity) -> bool:
    """Whether the very process ``identity`` names is still alive (not merely its pid)."""
    return process_identity(identity.pid) == identity


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _all_processes() -> list[_ProcStat]:
    table: list[_ProcStat] = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                stat = _proc_stat(int(entry.name))
                if stat is not None and stat.state not in {"Z", "X"}:
                    table.append(stat)
    return table


def _inside(path_text: str, directory: Path) -> bool:
    root = str(directory)
    return path_text == root or path_text.startswith(root + os.sep)


def _names_dir(cmdline: str, directory: Path) -> bool:
    """Whether a command line names ``directory`` itself or a path inside it.

    A bare substring test would also accept a longer sibling (``...-pg-ab`` in ``...-pg-abc``).
    """
    return re.search(re.escape(str(directory)) + r"(?=/|\s|$)", cmdline) is not None


def _executable(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def _related_processes(
    leader: ProcessIdentity | None, base_dir: Path | None, executable: str | None
) -> set[ProcessIdentity]:
    """The processes that belong to a server, found before it is stopped.

    Those are the leader's process group and descendants (only while the leader itself is
    alive: once it is gone its pid and group id may name strangers) and every process of
    the server's ``executable`` whose working directory lies inside the server's own temp
    dir (PostgreSQL's backends run in its data dir and outlive a SIGKILLed postmaster for a
    moment). The executable must match so that, say, a shell someone opened in the dir to
    look around is not taken for part of the server.
    """
    related: set[ProcessIdentity] = set()
    table = _all_processes()
    if leader is not None and is_alive(leader):
        children: dict[int, list[_ProcStat]] = {}
        for stat in table:
            children.setdefault(stat.ppid, []).append(stat)
            if stat.pgrp == leader.pid:
                related.add(stat.identity)
        pending = [leader.pid]
        while pending:
            for child in children.get(pending.pop(), []):
                if child.identity not in related:
                    related.add(child.identity)
                    pending.append(child.identity.pid)
    if base_dir is not None and executable is not None:
        for stat in table:
            with contextlib.suppress(OSError):
                cwd = os.readlink(f"/proc/{stat.identity.pid}/cwd")
                if _inside(cwd, base_dir) and _executable(stat.identity.pid) == executable:
                    related.add(stat.identity)
    return {
        identity
        for identity in related
        if identity.pid != os.getpid() and (leader is None or identity != leader)
    }


def _signal_identity(identity: ProcessIdentity, signum: signal.Signals) -> bool:
    """Send ``signum`` to exactly the process ``identity`` names; False if it is gone.

    A pidfd pins the process: whatever happens to the pid after the identity check, the
    signal can only reach the process that was checked.
    """
    try:
        pidfd = os.pidfd_open(identity.pid)
    except ProcessLookupError:
        return False
    except OSError:  # no pidfds (old kernel): the check-then-kill window is all we have
        if not is_alive(identity):
            return False
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(identity.pid, signum)
            return True
        return False
    try:
        if process_identity(identity.pid) != identity:
            return False
        signal.pidfd_send_signal(pidfd, signum)
        return True
    except (ProcessLookupError, PermissionError):
        return False
    finally:
        os.close(pidfd)


def _child_exited(popen: subprocess.Popen[bytes]) -> bool:
    """Whether our child has exited, without reaping it.

    While unreaped it stays a zombie, and a zombie's pid (and so its process group id) is
    never handed out again: the ``killpg`` that follows cannot hit a stranger's group.
    """
    if popen.returncode is not None:
        return True
    try:
        state = os.waitid(os.P_PID, popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return popen.poll() is not None
    return state is not None


def _stop_group(
    pid: int,
    *,
    first_signal: signal.Signals,
    timeout: float,
    popen: subprocess.Popen[bytes] | None = None,
    base_dir: Path | None = None,
    identity: ProcessIdentity | None = None,
) -> None:
    """Stop a server whose process group id is ``pid``: politely, then by force.

    ``first_signal`` goes to the group leader only (PostgreSQL and Kafka both shut their
    own helpers down cleanly); whatever is still alive after ``timeout`` - leader or
    stragglers in its group - gets SIGKILL. PostgreSQL's children move to sessions of their
    own and outlive a SIGKILLed postmaster for a moment, so the processes that belong to
    the server (see ``_related_processes``, with ``base_dir`` its temp dir) are noted before
    the first signal and killed, by identity, if they are still there after the leader.

    Nothing here signals a bare pid that might have been reused: our own child (``popen``)
    is waited for without being reaped, and any other leader - ``identity``, or whatever
    runs as ``pid`` now - is signalled through a pidfd.
    """
    leader = identity if identity is not None else process_identity(pid)
    if popen is not None and _child_exited(popen):
        leader = None
    executable = _executable(leader.pid) if leader is not None else None
    if popen is not None:
        argv = popen.args
        program = argv[0] if isinstance(argv, (list, tuple)) and argv else argv
        if isinstance(program, (str, bytes, os.PathLike)):
            executable = os.path.realpath(os.fsdecode(program))
    related = _related_processes(leader, base_dir, executable)

    def leader_gone() -> bool:
        if popen is not None:
            return _child_exited(popen)
        return leader is None or not is_alive(leader)

    if not leader_gone():
        if popen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, first_signal)  # unreaped child: the pid is still ours
        elif leader is not None:
            _signal_identity(leader, first_signal)
    deadline = time.monotonic() + timeout
    while not leader_gone() and time.monotonic() < deadline:
        time.sleep(0.05)
    if popen is not None and popen.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    elif leader is not None:
        _signal_identity(leader, signal.SIGKILL)
    related |= _related_processes(None, base_dir, executable)  # forked after the first look
    for straggler in related:
        _signal_identity(straggler, signal.SIGKILL)
    if popen is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        (popen is None and leader is not None and is_alive(leader))
        or any(is_alive(straggler) for straggler in related)
    ):
        time.sleep(0.05)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------
# ownership of the servers' temp dirs
# --------------------------------------------------------------------------------------
#
# Several harness runs share one machine (pytest sessions of several engineers, CI, a
# detached pair from scripts/test-infra), and each removes what an earlier run left behind
# when it was SIGKILLed. Whether a dir is such a leftover is decided from explicit ownership,
# never from the server's pid alone (a restarted server has a new one):
#
# * owner.lock - flock()ed by the harness process that made the dir, for as long as it
#   lives; every server process started from the dir inherits the locked descriptor, so a
#   server outliving its harness (a detached one, above all) keeps the lock held too;
# * owner.json - the run id, the boot, and the identities (pid + start time) of the owning
#   harness process and of the server process now running; rewritten on every start,
#   stop and restart of the server, and on detach (after which the server owns itself).

_OWNER_FILE = "owner.json"
_OWNER_LOCK = "owner.lock"
#: Kept current for older harness versions sweeping concurrently from other checkouts: they
#: keep a dir whose server.pid names a live process, and one touched within the hour. It
#: is removed before a server is stopped (touching the dir), never left naming a dead pid.
_SERVER_PID_FILE = "server.pid"
#: How long a dir without an owner record is left alone: being set up right now, or made by
#: an older harness version (those have no restart, so their server.pid is accurate).
_UNCLAIMED_DIR_GRACE_SECONDS = 3600.0


@dataclass(frozen=True)
class OwnerRecord:
    """Who owns a server temp dir: the content of its ``owner.json``."""

    run_id: str
    boot_id: str
    #: The harness process that made the dir; None once the server was detached.
    owner: ProcessIdentity | None
    #: The server process running from the dir now; empty while it is stopped.
    servers: tuple[ProcessIdentity, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "boot_id": self.boot_id,
            "owner": None if self.owner is None else self.owner.to_json(),
            "servers": [server.to_json() for server in self.servers],
        }

    @classmethod
    def from_json(cls, data: Any) -> OwnerRecord:
        if not isinstance(data, dict):
            raise ValueError(f"an owner record must be an object, not {data!r}")
        owner = data["owner"]
        return cls(
            run_id=str(data["run_id"]),
            boot_id=str(data["boot_id"]),
            owner=None if owner is None else ProcessIdentity.from_json(owner),
            servers=tuple(ProcessIdentity.from_json(server) for server in data["servers"]),
        )


@dataclass(frozen=True)
class DirFacts:
    """What a sweep found out about a dir and the processes its record names."""

    #: Someone holds the dir's owner.lock (the owning harness process or one of its servers).
    lock_held: bool
    #: This boot's id (/proc/sys/kernel/random/boot_id).
    boot_id: str
    #: Those of the record's processes that are alive with the recorded start time.
    living: frozenset[ProcessIdentity]
    #: Seconds since the dir or its owner record last changed.
    age_seconds: float
    #: server.pid names a live process whose command line names the dir.
    pid_file_server_alive: bool


@dataclass(frozen=True)
class SweepDecision:
    remove: bool
    reason: str


def sweep_decision(record: OwnerRecord | None, facts: DirFacts) -> SweepDecision:
    """Whether a sweep may delete a server temp dir: only when its owner is provably gone.

    Provably gone means: nobody holds the dir's lock, and no process the owner record
    names is alive with its recorded start time (or the record is from an earlier boot).
    A dir without a record is left alone for an hour. A server pid that is dead proves
    nothing on its own - a server that was restarted has a new one.
    """
    if facts.lock_held:
        return SweepDecision(False, "its owner.lock is held: the owning run or its server lives")
    if facts.pid_file_server_alive:
        return SweepDecision(False, "server.pid names a live server that runs from the dir")
    if record is None:
        if facts.age_seconds < _UNCLAIMED_DIR_GRACE_SECONDS:
            return SweepDecision(False, "no owner record yet, and the dir is recent")
        return SweepDecision(True, "no owner record and no live server for over an hour")
    if record.boot_id != facts.boot_id:
        return SweepDecision(True, f"run {record.run_id} was before the last reboot")
    if facts.living:
        pids = ", ".join(str(identity.pid) for identity in sorted(facts.living))
        return SweepDecision(False, f"run {record.run_id}'s process {pids} is alive")
    return SweepDecision(
        True, f"run {record.run_id}'s harness and servers are gone and its lock is free"
    )


_RUN_ID: str | None = None


def run_id() -> str:
    """The id of this harness run (this process), recorded in the dirs it owns."""
    global _RUN_ID
    if _RUN_ID is None:
        _RUN_ID = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    return _RUN_ID


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def _read_owner_record(base_dir: Path) -> OwnerRecord | None:
    try:
        return OwnerRecord.from_json(json.loads((base_dir / _OWNER_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class _DirClaim:
    """This process's ownership of one server temp dir: the held lock and the record."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.run_id = run_id()
        fd = os.open(base_dir / _OWNER_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            # Blocks only while a concurrent sweep looks at the brand-new dir (and keeps it).
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd: int | None = fd
        self._owner = process_identity(os.getpid())
        self._servers: tuple[ProcessIdentity, ...] = ()
        try:
            self._write()
        except BaseException:
            self.release()
            raise

    @property
    def lock_fd(self) -> int:
        """The locked descriptor, for server processes to inherit (``pass_fds``)."""
        if self._lock_fd is None:
            raise InfraError(f"{self.base_dir} is no longer claimed by this process")
        return self._lock_fd

    @property
    def record(self) -> OwnerRecord:
        return OwnerRecord(self.run_id, _boot_id(), self._owner, self._servers)

    def server_started(self, pid: int) -> ProcessIdentity:
        identity = process_identity(pid)
        if identity is None:
            raise InfraError(f"server process {pid} in {self.base_dir} exited just after start")
        self._servers = (identity,)
        self._write()
        _write_atomically(self.base_dir / _SERVER_PID_FILE, f"{pid}\n")
        return identity

    def server_stopping(self) -> None:
        (self.base_dir / _SERVER_PID_FILE).unlink(missing_ok=True)
        self._servers = ()
        self._write()

    def detach(self) -> None:
        """Hand the dir to its running server: it holds the inherited lock from now on."""
        self._owner = None
        self._write()
        self.release()

    def release(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    def _write(self) -> None:
        _write_atomically(self.base_dir / _OWNER_FILE, json.dumps(self.record.to_json()) + "\n")


@contextlib.contextmanager
def _probe_lock(base_dir: Path) -> Iterator[bool]:
    """Yield whether someone holds ``base_dir``'s owner.lock.

    When nobody does, the sweep holds it itself until the block ends, so the dir cannot be
    claimed while it is judged and removed. A lock that cannot even be opened (another
    user's dir) counts as held: what we cannot judge we leave alone.
    """
    try:
        fd = os.open(base_dir / _OWNER_LOCK, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        yield False
        return
    except OSError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            held = True
        else:
            held = False
        yield held
    finally:
        os.close(fd)


def _pid_file_server_alive(base_dir: Path) -> bool:
    try:
        pid = int((base_dir / _SERVER_PID_FILE).read_text())
    except (OSError, ValueError):
        return False
    return _is_running(pid) and _names_dir(_cmdline(pid), base_dir)


def _dir_facts(base_dir: Path, record: OwnerRecord | None, *, lock_held: bool) -> DirFacts:
    named: list[ProcessIdentity] = []
    if record is not None:
        named = [*([record.owner] if record.owner is not None else []), *record.servers]
    changed = 0.0
    for path in (base_dir, base_dir / _OWNER_FILE):
        with contextlib.suppress(OSError):
            changed = max(changed, path.stat().st_mtime)
    return DirFacts(
        lock_held=lock_held,
        boot_id=_boot_id(),
        living=frozenset(identity for identity in named if is_alive(identity)),
        age_seconds=time.time() - changed,
        pid_file_server_alive=_pid_file_server_alive(base_dir),
    )


def _sweep_stale_dirs(prefix: str, root: Path | None = None) -> list[Path]:
    """Delete the temp dirs of harness runs that are provably gone; return what was deleted.

    Such dirs are left when a run is SIGKILLed: the kernel then kills its servers (see
    ``_parent_death_hook``) but nobody removes their files. Which dirs qualify is
    ``sweep_decision``'s to say; dirs of live runs - running, restarting or detached
    servers alike - are never touched.
    """
    removed: list[Path] = []
    for path in sorted(Path(root or tempfile.gettempdir()).glob(f"{prefix}*")):
        if path.is_symlink() or not path.is_dir():
            continue
        with _probe_lock(path) as lock_held:
            record = _read_owner_record(path)
            if sweep_decision(record, _dir_facts(path, record, lock_held=lock_held)).remove:
                _remove_tree(path)
                removed.append(path)
    return removed


# --------------------------------------------------------------------------------------
# the servers' shared lifecycle
# --------------------------------------------------------------------------------------


class _TempServer:
    """Shared lifecycle of a server process that lives in a private temp directory.

    Restarts (for fault tests): ``stop_process()`` stops the server but keeps its temp dir,
    data and port; ``start_process()`` starts it again from them; ``restart()`` does both.
    The dir stays owned by this harness run throughout (see "ownership" above), so no
    concurrent run's sweep removes it while the server is down or after it came back with
    a new pid. ``stop()`` ends it all: process and files.

    Start and restart servers from a thread that lives as long as they should: the main
    thread (as pytest runs tests and fixtures). From any other thread the server is
    spawned by a helper thread that lives as long as the process, because the kernel's
    parent-death signal fires when the *thread* that spawned a server ends.
    """

    _stop_signal: signal.Signals = signal.SIGTERM
    _stop_timeout: float = 15.0
    _start_timeout: float = 60.0

    def __init__(
        self,
        *,
        process: subprocess.Popen[bytes],
        base_dir: Path,
        startup: float,
        claim: _DirClaim,
        die_with_parent: bool,
    ):
        self._process: subprocess.Popen[bytes] | None = process
        self.base_dir = base_dir
        #: Seconds from ``start()`` until the server answered its first real request.
        self.startup_seconds = startup
        self._claim = claim
        self._die_with_parent = die_with_parent
        self._detached = False
        self._closed = False
        self._owner_pid = os.getpid()
        claim.server_started(process.pid)
        _LIVE.add(self)

    @property
    def run_id(self) -> str:
        """The harness run that owns this server's temp dir."""
        return self._claim.run_id

    @property
    def pid(self) -> int:
        if self._process is None:
            raise InfraError(f"{type(self).__name__} is not running")
        return self._process.pid

    @property
    def running(self) -> bool:
        """Whether the server process is alive (it may have been stopped or have crashed)."""
        return self._process is not None and self._process.poll() is None

    def _launch(self, deadline: float) -> subprocess.Popen[bytes]:
        """Start the server process from the existing dir on the existing port(s)."""
        raise NotImplementedError

    def stop_process(self, *, kill: bool = False) -> None:
        """Stop the server process but keep its dir, data and port for ``start_process()``.

        ``kill=False`` shuts down cleanly (PostgreSQL "fast": sessions aborted, a checkpoint
        written; Kafka: controlled shutdown). ``kill=True`` is a crash: the server and every
        process it left get SIGKILL at once (PostgreSQL replays its WAL at the next start,
        Kafka recovers its logs). No-op when the process is not running.
        """
        process, self._process = self._process, None
        if process is None:
            return
        try:
            self._claim.server_stopping()
        finally:  # even with the dir gone (deleted under us), the process must be stopped
            _stop_group(
                process.pid,
                first_signal=signal.SIGKILL if kill else self._stop_signal,
                timeout=0 if kill else self._stop_timeout,
                popen=process,
                base_dir=self.base_dir,
            )

    def start_process(self, *, timeout: float | None = None) -> None:
        """Start the server again after ``stop_process()``: same port, same data.

        Returns once it serves. Its clients reconnect to the same address. Raises
        InfraError if it does not come up within ``timeout`` seconds, or if another
        process took its port meanwhile (the port cannot change: clients hold the URL).
        A server that crashed on its own is cleaned up and started the same way.
        """
        if self._detached or self._closed:
            raise InfraError(f"{type(self).__name__} in {self.base_dir} was stopped or detached")
        if self.running:
            raise InfraError(f"{type(self).__name__} in {self.base_dir} is already running")
        self.stop_process()  # a crashed process: reap it and its stragglers first
        deadline = time.monotonic() + (self._start_timeout if timeout is None else timeout)
        process = self._launch(deadline)
        self._process = process
        try:
            self._claim.server_started(process.pid)
        except BaseException:
            self.stop_process(kill=True)
            raise

    def restart(self, *, kill: bool = False, timeout: float | None = None) -> None:
        """``stop_process(kill=kill)`` then ``start_process(timeout=timeout)``."""
        self.stop_process(kill=kill)
        self.start_process(timeout=timeout)

    def stop(self) -> None:
        """Stop the server (signal, then SIGKILL after a timeout) and delete its files."""
        if self._detached:
            return
        _LIVE.discard(self)
        self._closed = True
        try:
            self.stop_process()  # raises only if the dir was deleted under us: worth knowing
        finally:
            _remove_tree(self.base_dir)
            self._claim.release()

    def detach(self) -> dict[str, Any]:
        """Leave the server running after this process exits; return what ``stop_detached`` needs.

        Only meaningful for servers started with ``die_with_parent=False``. The dir passes
        to the server itself: it keeps holding the inherited owner lock, and the record
        names it alone, so sweeps leave the dir be for as long as the server runs.
        """
        process = self._process
        if process is None or self._detached:
            raise InfraError(f"{type(self).__name__} is not running")
        server = self._claim.record.servers[0]
        _LIVE.discard(self)
        self._process = None
        self._detached = True
        self._claim.detach()
        return {
            "pid": process.pid,
            "start_ticks": server.start_ticks,
            "run_id": self._claim.run_id,
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

    The pid only counts while it is the very process that was detached (same start time)
    and its command line still names the server's temp dir, so a stale state file can never
    make us signal an unrelated process that reused the pid.
    """
    pid = int(state["pid"])
    started = state.get("start_ticks")
    if started is not None and process_identity(pid) != ProcessIdentity(pid, int(started)):
        return False
    return _is_running(pid) and _names_dir(_cmdline(pid), _server_dir(state))


def _server_dir(state: dict[str, Any]) -> Path:
    """The temp dir a state file names, if it can be one of ours.

    Its processes are killed and its files deleted, so a damaged state file must not be able
    to point that anywhere else ("/", a home folder).
    """
    base_dir = Path(str(state["base_dir"]))
    prefixes = (_PG_DIR_PREFIX, _KAFKA_DIR_PREFIX)
    if (
        not base_dir.is_absolute()
        or ".." in base_dir.parts
        or not base_dir.name.startswith(prefixes)
    ):
        raise InfraError(f"{base_dir} is not a test server dir: refusing to stop or delete it")
    return base_dir


def stop_detached(state: dict[str, Any]) -> bool:
    """Stop a server described by ``_TempServer.detach()``; False if it was already gone.

    Its temp dir is deleted only while it still belongs to the detached run (its owner
    record names the same run id), never a dir that someone else owns by now.
    """
    base_dir = _server_dir(state)
    pid = int(state["pid"])
    stopped = False
    # Taken before the check below, so that the process checked is the one signalled.
    identity = (
        ProcessIdentity(pid, int(state["start_ticks"]))
        if "start_ticks" in state
        else process_identity(pid)
    )
    if identity is not None and is_server_running(state):
        _stop_group(
            identity.pid,
            first_signal=signal.Signals[str(state["stop_signal"])],
            timeout=float(state["stop_timeout"]),
            base_dir=base_dir,
            identity=identity,
        )
        stopped = True
    record = _read_owner_record(base_dir)
    recorded_run = None if record is None else record.run_id
    if recorded_run == state.get("run_id"):
        _remove_tree(base_dir)
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
        if server._owner_pid != os.getpid():  # inherited through fork: not this process's
            continue
        with contextlib.suppress(Exception):
            server.stop()


def _forget_after_fork() -> None:
    """A forked child is not the harness run: it must neither stop nor sweep as one."""
    global _RUN_ID
    _LIVE.clear()
    _RUN_ID = None
    _SPAWNER.forget()


os.register_at_fork(after_in_child=_forget_after_fork)


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


# The static validators of deploy/ (tests/unit/test_deploy.py): kustomize renders the
# overlays; kubernetes-validate checks the rendered manifests against the Kubernetes schemas it
# ships (so no schema is downloaded at test time), and check-jsonschema checks
# docker-compose.yml against the compose-spec schema it ships.
KUSTOMIZE_MODULE = "sigs.k8s.io/kustomize/kustomize/v5"
KUSTOMIZE_VERSION = "v5.8.0"
MANIFEST_VALIDATORS = ("kubernetes-validate==1.37.0", "check-jsonschema==0.39.0")


def ensure_kustomize_installed() -> Path:
    """Return the ``kustomize`` binary, built by ``go install`` (Go module proxy) into the
    cache the first time."""
    target = cache_dir() / "tools" / f"kustomize-{KUSTOMIZE_VERSION}"
    binary = target / "kustomize"
    if binary.is_file():
        return binary
    go = shutil.which("go")
    if go is None:
        raise InfraError(f"kustomize {KUSTOMIZE_VERSION} is built with `go install`: go is missing")
    with _file_lock(cache_dir() / "tools.lock"):
        if not binary.is_file():
            # Built aside and renamed, so that an interrupted build never passes for a binary.
            staging = target.with_name(f"{target.name}.partial")
            _remove_tree(staging)
            _run(
                [go, "install", f"{KUSTOMIZE_MODULE}@{KUSTOMIZE_VERSION}"],
                what=f"go install {KUSTOMIZE_MODULE}@{KUSTOMIZE_VERSION}",
                timeout=900,
                cwd=cache_dir(),
                env={**os.environ, "GOBIN": str(staging)},
            )
            staging.rename(target)
    return binary


def ensure_manifest_validators_installed() -> Path:
    """Return the bin dir of a virtualenv of its own (in the cache) holding
    MANIFEST_VALIDATORS, installed from PyPI the first time."""
    key = hashlib.sha256("\n".join(MANIFEST_VALIDATORS).encode()).hexdigest()[:12]
    venv = cache_dir() / "tools" / f"validators-{key}"
    done = venv / "installed"  # written last: a venv without it is an interrupted install
    if done.is_file():
        return venv / "bin"
    with _file_lock(cache_dir() / "tools.lock"):
        if not done.is_file():
            _remove_tree(venv)
            _run(
                [sys.executable, "-m", "venv", venv],
                what="creating the validators' venv",
                timeout=300,
            )
            _run(
                [
                    venv / "bin" / "python",
                    "-m",
                    "pip",
                    "install",
                    "--no-input",
                    *MANIFEST_VALIDATORS,
                ],
                what=f"pip install {' '.join(MANIFEST_VALIDATORS)}",
                timeout=900,
            )
            done.write_text("\n".join(MANIFEST_VALIDATORS) + "\n")
    return venv / "bin"


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
    database of their own from ``create_database()``. ``stop_process()``,
    ``start_process()`` and ``restart()`` (see ``_TempServer``) stop and start the same
    cluster on the same port, as ``pg_ctl -m fast stop`` / ``start`` would; its databases
    survive, its client connections do not.
    """

    _stop_signal = signal.SIGINT  # "fast" shutdown: abort sessions, no waiting for clients
    _stop_timeout = 15.0

    def __init__(
        self,
        *,
        process: subprocess.Popen[bytes],
        base_dir: Path,
        startup: float,
        claim: _DirClaim,
        die_with_parent: bool,
        port: int,
        version: str,
        bindir: Path,
        run_as: _OsUser | None,
    ):
        super().__init__(
            process=process,
            base_dir=base_dir,
            startup=startup,
            claim=claim,
            die_with_parent=die_with_parent,
        )
        self.host = LOOPBACK
        self.port = port
        self.user = PG_SUPERUSER
        self.version = version
        self._bindir = bindir
        self._run_as = run_as

    @property
    def url(self) -> str:
        """SQLAlchemy async URL of the maintenance database."""
        return f"postgresql+asyncpg://{self.user}@{self.host}:{self.port}/postgres"

    @property
    def sync_dsn(self) -> str:
        """libpq DSN of the maintenance database (psql, psycopg)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/postgres"

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    def create_database(self, name: str | None = None) -> str:
        """Create a fresh database and return its SQLAlchemy async URL."""
        return create_database(self.url, name)

    def _launch(self, deadline: float) -> subprocess.Popen[bytes]:
        try:
            return _launch_postgres(
                bindir=self._bindir,
                base_dir=self.base_dir,
                port=self.port,
                run_as=self._run_as,
                die_with_parent=self._die_with_parent,
                lock_fd=self._claim.lock_fd,
                deadline=deadline,
            )
        except _PortTaken as exc:
            raise InfraError(
                f"PostgreSQL cannot start again: another process took its port {self.port}"
            ) from exc

    @classmethod
    def start(cls, *, timeout: float = 60.0, die_with_parent: bool = True) -> PostgresServer:
        """initdb a fresh cluster and start it on a free loopback port."""
        started = time.monotonic()
        bindir = ensure_postgres_installed()
        run_as = _postgres_os_user()
        _sweep_stale_dirs(_PG_DIR_PREFIX)
        base_dir = Path(tempfile.mkdtemp(prefix=_PG_DIR_PREFIX))
        claim: _DirClaim | None = None
        process: subprocess.Popen[bytes] | None = None
        try:
            claim = _DirClaim(base_dir)
            data_dir = base_dir / "data"
            sockets = base_dir / "sockets"
            sockets.mkdir()
            if run_as is not None:
                for path in (base_dir, sockets):
                    os.chown(path, run_as.uid, run_as.gid)
            _run(
                [bindir / "initdb", "--pgdata", data_dir, *_INITDB_OPTIONS],
                what="initdb",
                timeout=120,
                cwd=base_dir,
                run_as=run_as,
                env=_child_env(),
            )
            (data_dir / "pg_hba.conf").write_text(_PG_HBA)
            with (data_dir / "postgresql.conf").open("a") as conf:
                conf.write(_PG_SETTINGS.format(sockets=sockets))

            deadline = started + timeout
            for _attempt in range(_PORT_ATTEMPTS):
                port = free_port()
                try:
                    process = _launch_postgres(
                        bindir=bindir,
                        base_dir=base_dir,
                        port=port,
                        run_as=run_as,
                        die_with_parent=die_with_parent,
                        lock_fd=claim.lock_fd,
                        deadline=deadline,
                    )
                except _PortTaken:
                    continue
                return cls(
                    process=process,
                    base_dir=base_dir,
                    startup=time.monotonic() - started,
                    claim=claim,
                    die_with_parent=die_with_parent,
                    port=port,
                    version=bindir.parent.name,
                    bindir=bindir,
                    run_as=run_as,
                )
            raise InfraError(
                f"PostgreSQL could not bind a free port in {_PORT_ATTEMPTS} attempts:\n"
                f"{_tail(base_dir / 'postgres.log')}"
            )
        except BaseException:
            if process is not None:
                _stop_group(
                    process.pid,
                    first_signal=signal.SIGKILL,
                    timeout=0,
                    popen=process,
                    base_dir=base_dir,
                )
            _remove_tree(base_dir)
            if claim is not None:
                claim.release()
            raise


def _launch_postgres(
    *,
    bindir: Path,
    base_dir: Path,
    port: int,
    run_as: _OsUser | None,
    die_with_parent: bool,
    lock_fd: int,
    deadline: float,
) -> subprocess.Popen[bytes]:
    """Start the postmaster of the cluster in ``base_dir``; return once it serves.

    Raises ``_PortTaken`` when the port was taken, InfraError for any other failure; the
    process is gone in both cases.
    """
    data_dir = base_dir / "data"
    log_path = base_dir / "postgres.log"
    process = _spawn(
        [bindir / "postgres", "-D", data_dir, "-p", str(port)],
        log_path=log_path,
        cwd=base_dir,
        run_as=run_as,
        die_with_parent=die_with_parent,
        env=_child_env(),
        pass_fds=(lock_fd,),
    )
    try:
        _wait_for_postgres(process, data_dir, port, log_path, deadline)
    except BaseException:
        _stop_group(
            process.pid, first_signal=signal.SIGKILL, timeout=0, popen=process, base_dir=base_dir
        )
        raise
    return process


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

    The cache folder is ``<cache>/kafka-<version>/libs-<hash of the pom>``, complete once
    its ``.complete`` marker exists (written last, so an interrupted download refetches).
    A folder is never replaced or deleted: a broker of another run - another checkout with
    another pom - may be running from it, and would lose the jars it has not opened yet.
    The ``libs`` folder of older harness versions is still used while its ``.complete``
    marker holds the pom's hash.
    """
    version = kafka_version(pom)
    home = cache_dir() / f"kafka-{version}"
    pom_hash = hashlib.sha256(pom.read_bytes()).hexdigest()
    libs = home / f"libs-{pom_hash[:16]}"
    marker = home / f"libs-{pom_hash[:16]}.complete"

    def cached() -> Path | None:
        with contextlib.suppress(OSError):
            legacy = home / "libs"
            if (home / ".complete").read_text().strip() == pom_hash and legacy.is_dir():
                return legacy
        with contextlib.suppress(OSError):
            if marker.read_text().strip() == pom_hash and libs.is_dir():
                return libs
        return None

    found = cached()
    if found is not None:
        return KafkaDistribution(version, found)
    with _file_lock(home.with_name(f"kafka-{version}.lock")):
        found = cached()
        if found is not None:
            return KafkaDistribution(version, found)
        mvn = shutil.which("mvn")
        if mvn is None:
            raise InfraError("Maven (mvn) is needed to fetch the Kafka jars: apt-get install maven")
        home.mkdir(parents=True, exist_ok=True)
        # Under the lock: whoever left this (an interrupted fetch) is gone.
        partial = home / f"{libs.name}.partial"
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
            if libs.exists():  # complete but unmarked (interrupted after the rename): keep it
                _remove_tree(partial)
            else:
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
    """A single-node Apache Kafka 4.x KRaft cluster in a temp dir; see the module docstring.

    ``stop_process()``, ``start_process()`` and ``restart()`` (see ``_TempServer``) stop the
    broker (controlled shutdown, or a crash with ``kill=True``) and start it again with the
    same storage, cluster id and ports: its topics, committed offsets and transactions
    survive; clients reconnect to the same bootstrap address.
    """

    _stop_signal = signal.SIGTERM  # runs the broker's shutdown hook: controlled shutdown
    _stop_timeout = 20.0
    _start_timeout = 120.0

    def __init__(
        self,
        *,
        process: subprocess.Popen[bytes],
        base_dir: Path,
        startup: float,
        claim: _DirClaim,
        die_with_parent: bool,
        port: int,
        controller_port: int,
        version: str,
        cluster_id: str,
        java: str,
        classpath: str,
    ):
        super().__init__(
            process=process,
            base_dir=base_dir,
            startup=startup,
            claim=claim,
            die_with_parent=die_with_parent,
        )
        self.port = port
        self.controller_port = controller_port
        self.version = version
        self.cluster_id = cluster_id
        self._java = java
        self._classpath = classpath

    @property
    def bootstrap(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.base_dir / "server.log"

    def _launch(self, deadline: float) -> subprocess.Popen[bytes]:
        try:
            return _launch_kafka(
                java=self._java,
                classpath=self._classpath,
                base_dir=self.base_dir,
                bootstrap=self.bootstrap,
                die_with_parent=self._die_with_parent,
                lock_fd=self._claim.lock_fd,
                deadline=deadline,
            )
        except _PortTaken as exc:
            raise InfraError(
                f"Kafka cannot start again: another process took port {self.port} "
                f"or {self.controller_port}"
            ) from exc

    @classmethod
    def start(cls, *, timeout: float = 120.0, die_with_parent: bool = True) -> KafkaServer:
        """Format storage and start the broker; return once it serves metadata requests."""
        started = time.monotonic()
        distribution = ensure_kafka_jars()
        java = _java()
        _sweep_stale_dirs(_KAFKA_DIR_PREFIX)
        base_dir = Path(tempfile.mkdtemp(prefix=_KAFKA_DIR_PREFIX))
        claim: _DirClaim | None = None
        process: subprocess.Popen[bytes] | None = None
        try:
            claim = _DirClaim(base_dir)
            data_dir = base_dir / "data"
            properties = base_dir / "server.properties"
            (base_dir / "log4j2.xml").write_text(
                _KAFKA_LOG4J2.format(log_file=base_dir / "server.log")
            )
            cluster_id = _new_cluster_id()
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
                try:
                    process = _launch_kafka(
                        java=java,
                        classpath=distribution.classpath,
                        base_dir=base_dir,
                        bootstrap=f"{LOOPBACK}:{port}",
                        die_with_parent=die_with_parent,
                        lock_fd=claim.lock_fd,
                        deadline=deadline,
                    )
                except _PortTaken:
                    continue
                return cls(
                    process=process,
                    base_dir=base_dir,
                    startup=time.monotonic() - started,
                    claim=claim,
                    die_with_parent=die_with_parent,
                    port=port,
                    controller_port=controller_port,
                    version=distribution.version,
                    cluster_id=cluster_id,
                    java=java,
                    classpath=distribution.classpath,
                )
            raise InfraError(
                f"Kafka could not bind free ports in {_PORT_ATTEMPTS} attempts:\n"
                f"{_kafka_logs(base_dir)}"
            )
        except BaseException:
            if process is not None:
                _stop_group(
                    process.pid,
                    first_signal=signal.SIGKILL,
                    timeout=0,
                    popen=process,
                    base_dir=base_dir,
                )
            _remove_tree(base_dir)
            if claim is not None:
                claim.release()
            raise


def _launch_kafka(
    *,
    java: str,
    classpath: str,
    base_dir: Path,
    bootstrap: str,
    die_with_parent: bool,
    lock_fd: int,
    deadline: float,
) -> subprocess.Popen[bytes]:
    """Start the broker configured in ``base_dir``; return once it serves metadata requests.

    Raises ``_PortTaken`` when a port was taken, InfraError for any other failure; the
    process is gone in both cases.
    """
    process = _spawn(
        [
            java,
            *_BROKER_JVM_OPTIONS,
            *_logging_options(base_dir),
            "-cp",
            classpath,
            _KAFKA_MAIN,
            base_dir / "server.properties",
        ],
        log_path=base_dir / "kafka.out",
        cwd=base_dir,
        run_as=None,
        die_with_parent=die_with_parent,
        pass_fds=(lock_fd,),
    )
    try:
        _wait_for_broker(process, bootstrap, base_dir, deadline)
    except BaseException:
        _stop_group(
            process.pid, first_signal=signal.SIGKILL, timeout=0, popen=process, base_dir=base_dir
        )
        raise
    return process


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
