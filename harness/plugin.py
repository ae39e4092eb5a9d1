"""pytest plugin giving integration tests a real PostgreSQL and a real Apache Kafka.

Why a plugin: the servers are expensive compared to a unit test, so they are session-scoped
and started lazily - a run that selects only unit tests never pays for them - and torn down
at session end. Enable it from tests/conftest.py with
``pytest_plugins = ["harness.plugin"]``.

Fixtures:

``postgres_url``
    SQLAlchemy async URL (``postgresql+asyncpg://...``) of a database created fresh for
    this session.
``postgres_server_url``
    URL of the server's maintenance database, for tests that want databases of their own
    (``servers.create_database(postgres_server_url)``).
``kafka_bootstrap``
    ``host:port`` of a Kafka 4.x broker.

To skip the start-up cost across many runs, point the suite at servers that are already
running (``eval "$(scripts/test-infra start)"`` prints exactly these):

``CREDITWATCH_TEST_DATABASE_URL``
    URL of an existing server; a fresh database is still created on it (and dropped at
    session end).
``CREDITWATCH_TEST_KAFKA_BOOTSTRAP``
    bootstrap address of an existing broker.

A server that cannot be provided makes the requesting tests *fail* with the reason, never
skip: a silently skipped integration suite looks exactly like a passing one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
from sqlalchemy.engine import make_url

from harness import servers
from harness.servers import DATABASE_URL_ENV, KAFKA_BOOTSTRAP_ENV

_T = TypeVar("_T")
_startup_notes = pytest.StashKey[list[str]]()


def _provide(what: str, factory: Callable[[], _T]) -> _T:
    """``factory()``, or fail the requesting test with the reason (never skip it)."""
    try:
        return factory()
    except Exception as exc:
        reason = f"{what}: {type(exc).__name__}: {exc}"
    # Outside the except block, so the report shows the reason, not a chained traceback.
    pytest.fail(reason, pytrace=False)


def _note(config: pytest.Config, message: str) -> None:
    config.stash.setdefault(_startup_notes, []).append(message)


@pytest.fixture(scope="session")
def postgres_server_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """URL of a PostgreSQL server's maintenance database (started here unless overridden)."""
    external = os.environ.get(DATABASE_URL_ENV)
    if external:
        yield external
        return
    server = _provide("could not start PostgreSQL", servers.PostgresServer.start)
    _note(
        request.config,
        f"PostgreSQL {server.version} started in {server.startup_seconds:.1f}s ({server.url})",
    )
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    """URL of a database created fresh for this test session."""
    url = _provide(
        "could not create the test database",
        lambda: servers.create_database(postgres_server_url),
    )
    yield url
    if os.environ.get(DATABASE_URL_ENV):
        # Our own server is deleted wholesale; on a shared one, clean up after ourselves.
        database = make_url(url).database
        if database:
            servers.drop_database(postgres_server_url, database)


@pytest.fixture(scope="session")
def kafka_bootstrap(request: pytest.FixtureRequest) -> Iterator[str]:
    """Bootstrap address of an Apache Kafka 4.x broker (started here unless overridden)."""
    external = os.environ.get(KAFKA_BOOTSTRAP_ENV)
    if external:
        _provide(
            f"Kafka from ${KAFKA_BOOTSTRAP_ENV}={external} is not usable",
            lambda: servers.wait_for_kafka(external, timeout=30),
        )
        yield external
        return
    server = _provide("could not start Kafka", servers.KafkaServer.start)
    _note(
        request.config,
        f"Kafka {server.version} started in {server.startup_seconds:.1f}s ({server.bootstrap})",
    )
    try:
        yield server.bootstrap
    finally:
        server.stop()


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    """Report how long the servers took to start, so slow infrastructure gets noticed."""
    notes = config.stash.get(_startup_notes, [])
    if notes:
        terminalreporter.write_sep("-", "creditwatch test infrastructure")
        for note in notes:
            terminalreporter.write_line(note)
