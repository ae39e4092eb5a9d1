"""One rule for what is worth retrying: a database or broker that is away for a while.

Every loop (consumer, outbox relay, scheduler) and every API route asks the same question
of an exception — "is a dependency down, or is this a bug or a bad value?" — and the
answer decides between waiting and retrying (never dead-lettering anything, never ending a
loop) and treating it as poison. The rule walks the exception's causes, because drivers
and SQLAlchemy wrap each other's errors, and because code that talks to asyncpg directly
(the relay's one-statement cycle) sees asyncpg's own exceptions unwrapped.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterator

from sqlalchemy import exc as sa_exc

# SQLSTATE classes and codes that mean "the server, not the statement": connection
# exceptions (08), insufficient resources (53), operator intervention (57P01 admin shutdown,
# 57P02 crash shutdown, 57P03 cannot connect now), and the two transaction rollbacks that a
# retry resolves (40001 serialization failure, 40P01 deadlock).
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "53", "57P")
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01"})


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)  # SQLAlchemy's DBAPIError wraps the driver's
        if isinstance(orig, BaseException) and id(orig) not in seen:
            yield from _causes(orig)
        current = current.__cause__ or current.__context__


def _one_is_transient(exc: BaseException) -> bool:
    if isinstance(exc, OSError | ConnectionError | TimeoutError | asyncio.TimeoutError):
        return True
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
        return True
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    # The session's transaction was lost with its connection; a new one will do.
    if isinstance(exc, sa_exc.PendingRollbackError):
        return True
    if isinstance(exc, sa_exc.TimeoutError):  # no connection free in the pool in time
        return True
    sqlstate = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    if isinstance(sqlstate, str) and (
        sqlstate in _TRANSIENT_SQLSTATES or sqlstate.startswith(_TRANSIENT_SQLSTATE_PREFIXES)
    ):
        return True
    module = type(exc).__module__
    if module.startswith("asyncpg"):
        import asyncpg

        if isinstance(
            exc,
            asyncpg.PostgresConnectionError
            | asyncpg.ConnectionDoesNotExistError
            | asyncpg.CannotConnectNowError
            | asyncpg.TooManyConnectionsError,
        ):
            return True
        # asyncpg raises its InterfaceError for a connection that was closed under it
        # ("connection is closed"); its other InterfaceErrors are misuse, i.e. bugs.
        if isinstance(exc, asyncpg.InterfaceError) and "closed" in str(exc):
            return True
        # A connection lost in the middle of an operation is left in that operation's state,
        # and its next use says "cannot switch to state …; another operation is in progress"
        # (seen on the relay's connection when PostgreSQL shut down): a dead connection too.
        if isinstance(exc, asyncpg.exceptions._base.InternalClientError) and (
            "another operation" in str(exc) and "in progress" in str(exc)
        ):
            return True
    if module.startswith("aiokafka"):
        from aiokafka import errors as kafka_errors

        if isinstance(exc, kafka_errors.KafkaError) and (
            exc.retriable
            or isinstance(
                exc,
                kafka_errors.KafkaTimeoutError
                | kafka_errors.KafkaConnectionError
                | kafka_errors.NodeNotReadyError
                | kafka_errors.NoBrokersAvailable,
            )
        ):
            return True
    return False


def is_conflict(exc: BaseException) -> bool:
    """True when a transaction lost to a concurrent one (serialization failure, deadlock):
    retry it at once; nothing is down."""
    for e in _causes(exc):
        sqlstate = getattr(e, "sqlstate", None) or getattr(e, "pgcode", None)
        if sqlstate in _TRANSIENT_SQLSTATES:
            return True
    return False


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` (or anything it wraps) says a database or broker is unreachable,
    restarting or overloaded: wait and retry, it is nobody's fault and nothing is lost."""
    return any(_one_is_transient(e) for e in _causes(exc))


class Backoff:
    """Exponential back-off with jitter between ``first`` and ``cap`` seconds; ``reset``
    after a success. Jitter keeps a fleet of replicas from reconnecting in lockstep."""

    def __init__(self, first: float = 0.5, cap: float = 10.0) -> None:
        self.first = first
        self.cap = cap
        self._next = first

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.cap)
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self._next = self.first


class OutageLog:
    """Log an outage as one line when it begins, at most one line per ``every`` seconds
    while it lasts (with how many failures were folded in), and one line when it ends.

    A broker or database that is away makes every retry fail; logging each failure wrote
    15,000 lines a second during a Kafka outage."""

    def __init__(self, logger: logging.Logger, what: str, every: float = 30.0) -> None:
        self.logger = logger
        self.what = what
        self.every = every
        self.since: float | None = None
        self._last = 0.0
        self._folded = 0

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        reason = f"{type(exc).__name__}: {exc}"[:300]
        if self.since is None:
            self.since = now
            self._last = now
            self._folded = 0
            self.logger.warning("%s unavailable (%s); retrying with back-off", self.what, reason)
        elif now - self._last >= self.every:
            self.logger.warning(
                "%s still unavailable after %.0fs (%d failed attempts since the last report; "
                "last: %s)",
                self.what,
                now - self.since,
                self._folded + 1,
                reason,
            )
            self._last = now
            self._folded = 0
        else:
            self._folded += 1

    def recovered(self) -> None:
        if self.since is not None:
            self.logger.warning(
                "%s available again after %.1fs", self.what, time.monotonic() - self.since
            )
        self.since = None
        self._folded = 0


class RepeatFilter(logging.Filter):
    """Lets a client library's message through once per ``every`` seconds per kind (logger
    and message template), then says how many of the kind it held back.

    aiokafka logs every failed attempt to reach a node at ERROR; while the broker is away
    that is every reconnect of every client, forever (784,000 lines in 56 s were seen)."""

    def __init__(self, prefixes: tuple[str, ...] = ("aiokafka",), every: float = 30.0) -> None:
        super().__init__()
        self.prefixes = prefixes
        self.every = every
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}
        self._last: tuple[logging.LogRecord, bool] | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        # One decision per record, whichever of the handlers sharing this filter asks.
        if self._last is not None and self._last[0] is record:
            return self._last[1]
        decision = self._decide(record)
        self._last = (record, decision)
        return decision

    def _decide(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefixes) or record.levelno >= logging.CRITICAL:
            return True
        key = (record.name, str(record.msg))
        now = time.monotonic()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.every:
            self._seen[key] = (last[0], last[1] + 1)
            return False
        held = last[1] if last is not None else 0
        self._seen[key] = (now, 0)
        if len(self._seen) > 1000:
            self._seen.clear()
        if held:
            record.msg = f"{record.msg} [and {held} more like it held back]"
        return True


def silence_repeated_client_logs(every: float = 30.0) -> None:
    """Install one ``RepeatFilter`` on all of the root logger's handlers (once each)."""
    global _shared_filter
    if _shared_filter is None:
        _shared_filter = RepeatFilter(every=every)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RepeatFilter) for f in handler.filters):
            handler.addFilter(_shared_filter)


_shared_filter: RepeatFilter | None = None
