"""The one rule for what is worth retrying (shared.transient): outages of a database or
broker are transient, bugs and bad values are not; wrapped causes count."""

from __future__ import annotations

import asyncpg
import pytest
from aiokafka import errors as kafka_errors
from sqlalchemy import exc as sa_exc

from shared.transient import is_conflict, is_transient


class _SqlState(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


def _wrapped(cause: BaseException) -> BaseException:
    try:
        try:
            raise cause
        except BaseException as inner:
            raise RuntimeError("while doing something") from inner
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(111, "refused"),
        TimeoutError(),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.InterfaceError("connection is closed"),
        # A connection lost mid-operation, used again (the relay's, as PostgreSQL stopped)
        asyncpg.exceptions._base.InternalClientError(
            "cannot switch to state 12; another operation (2) is in progress"
        ),
        sa_exc.OperationalError("SELECT 1", {}, Exception("server closed the connection")),
        sa_exc.PendingRollbackError("rolled back after a lost connection"),
        _SqlState("57P01"),  # admin shutdown
        _SqlState("08006"),  # connection failure
        kafka_errors.KafkaConnectionError(),
        kafka_errors.NodeNotReadyError(),
        kafka_errors.KafkaTimeoutError(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_an_outage_is_transient_alone_and_wrapped(error: BaseException) -> None:
    assert is_transient(error)
    assert is_transient(_wrapped(error))


@pytest.mark.parametrize(
    "error",
    [
        ValueError("a bad value"),
        KeyError("a bug"),
        asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
        asyncpg.exceptions._base.InternalClientError("something else entirely"),
        _SqlState("23505"),  # unique violation: a bug, not an outage
    ],
    ids=lambda e: f"{type(e).__name__}: {e}",
)
def test_a_bug_or_a_bad_value_is_not_transient(error: BaseException) -> None:
    assert not is_transient(error)


def test_a_lost_serialization_is_a_conflict_to_retry_at_once() -> None:
    assert is_conflict(_SqlState("40001")) and is_conflict(_wrapped(_SqlState("40P01")))
    assert is_transient(_SqlState("40001"))
    assert not is_conflict(ConnectionRefusedError())
