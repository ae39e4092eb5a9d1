"""Fixtures of the fault suite: servers of a case's own (an outage must not hit the servers the
rest of the suite shares), and a report of how long each fault case took.

The suite runs under the README's test command (``bash scripts/test-all``); alone:
``.venv/bin/pytest -p no:cacheprovider -q tests/faults``; by marker: ``-m faults``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness import servers


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[servers.PostgresServer]:
    """A PostgreSQL server of this module's own, which a case may stop and start again
    (``stop_process()`` / ``start_process()``: same data, same port)."""
    try:
        server = servers.PostgresServer.start()
    except Exception as exc:  # a missing server fails the case, never skips it
        pytest.fail(f"could not start PostgreSQL: {type(exc).__name__}: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def own_kafka() -> Iterator[servers.KafkaServer]:
    """An Apache Kafka broker of this module's own, which a case may stop and start again
    (``stop_process()`` / ``start_process()``: same data, same port)."""
    try:
        broker = servers.KafkaServer.start()
    except Exception as exc:
        pytest.fail(f"could not start Kafka: {type(exc).__name__}: {exc}", pytrace=False)
    try:
        yield broker
    finally:
        broker.stop()


# nodeid -> (outcome, seconds of setup + call + teardown) of each fault case run.
_DURATIONS: dict[str, tuple[str, float]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "faults" not in report.keywords:
        return
    outcome, total = _DURATIONS.get(report.nodeid, ("passed", 0.0))
    if report.outcome != "passed":
        outcome = report.outcome
    _DURATIONS[report.nodeid] = (outcome, total + report.duration)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How long each fault case took, and all of them: the suite's cost stays in sight."""
    if not _DURATIONS:
        return
    terminalreporter.write_sep("-", "creditwatch fault suite (setup + call + teardown)")
    for nodeid, (outcome, took) in _DURATIONS.items():
        terminalreporter.write_line(f"{took:7.1f}s  {outcome:<7} {nodeid}")
    terminalreporter.write_line(f"{sum(t for _, t in _DURATIONS.values()):7.1f}s  total")
