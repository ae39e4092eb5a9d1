"""Prometheus metrics of contract §3 (all ``creditwatch_*``, never a customer id as a label).

Everything lives in the default registry: in dev mode the three services share a process,
which is why most metrics carry a ``service`` label. Metrics are declared here once; code
elsewhere only calls ``.labels(...).inc()/observe()/set()``.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, Info
from prometheus_client import generate_latest as _generate_latest
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "ALERTS_OPEN",
    "ALERTS_RAISED",
    "BATCHES",
    "BUILD",
    "CONSUMER_LAG",
    "CREDIT_CHECKS",
    "CREDIT_CHECK_BATCH",
    "CREDIT_CHECK_READ_SKIPPED",
    "CREDIT_CHECK_REDECIDED",
    "CREDIT_CHECK_SECONDS",
    "CUSTOMERS",
    "CUSTOMERS_OVER_LIMIT",
    "DEPENDENCY_UP",
    "EVENTS_CONSUMED",
    "EVENTS_DEAD_LETTERED",
    "EVENTS_SKIPPED",
    "EVENT_LAG_SECONDS",
    "EVENT_PROCESSING_SECONDS",
    "HTTP_REQUESTS",
    "HTTP_REQUEST_SECONDS",
    "LOOP_RUNNING",
    "OUTBOX_OLDEST_SECONDS",
    "OUTBOX_PENDING",
    "OUTBOX_PUBLISHED",
    "POLICY",
    "PORTFOLIO_EXPOSURE",
    "PORTFOLIO_LIMIT",
    "RELAY_FAILURES",
    "HttpMetrics",
    "metrics_response",
]

_MINUTE = 60.0
_HOUR = 60 * _MINUTE
_DAY = 24 * _HOUR

# --- event processing ----------------------------------------------------------------------

EVENTS_CONSUMED = Counter(
    "creditwatch_events_consumed_total",
    "Events consumed and processed, by event type.",
    ["service", "topic", "type"],
)
EVENTS_DEAD_LETTERED = Counter(
    "creditwatch_events_dead_lettered_total",
    "Records written to the dead-letter topic, by reason code.",
    ["service", "topic", "reason"],
)
EVENTS_SKIPPED = Counter(
    "creditwatch_events_skipped_total",
    "Records skipped without effect: reason unknown_type or duplicate.",
    ["service", "topic", "reason"],
)
EVENT_PROCESSING_SECONDS = Histogram(
    "creditwatch_event_processing_seconds",
    "Time to process one consumed batch (decode, store, fold, outbox, offsets: one "
    "transaction), not one event; divide by creditwatch_batches_total for batch counts.",
    ["service"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
EVENT_LAG_SECONDS = Histogram(
    "creditwatch_event_lag_seconds",
    "Now minus the event's business time (CloudEvents 'time') when processed; business time "
    "can be days old (backfills, replays), hence buckets up to 30 days.",
    ["service"],
    buckets=(
        0.05,
        0.25,
        1.0,
        5.0,
        15.0,
        _MINUTE,
        5 * _MINUTE,
        15 * _MINUTE,
        _HOUR,
        6 * _HOUR,
        _DAY,
        3 * _DAY,
        7 * _DAY,
        30 * _DAY,
    ),
)
CONSUMER_LAG = Gauge(
    "creditwatch_consumer_lag",
    "Records between the consumer's position and the partition's high watermark.",
    ["service", "topic", "partition"],
)
BATCHES = Counter(
    "creditwatch_batches_total",
    "Consumed batches committed (one database transaction each).",
    ["service"],
)
OUTBOX_PENDING = Gauge(
    "creditwatch_outbox_pending",
    "Outbox rows not yet published to Kafka.",
    ["service"],
)
OUTBOX_PUBLISHED = Counter(
    "creditwatch_outbox_published_total",
    "Outbox rows published to Kafka.",
    ["service", "topic"],
)
BUILD = Info(
    "creditwatch_build",
    "The running release: creditwatch's version and Python's.",
)
POLICY = Gauge(
    "creditwatch_policy_info",
    "The credit policy a service decides with (1 for its version).",
    ["service", "version"],
)
OUTBOX_OLDEST_SECONDS = Gauge(
    "creditwatch_outbox_oldest_seconds",
    "Age of the oldest outbox row not yet published (0: none waiting). Grows while the "
    "relay cannot publish, whatever the reason.",
    ["service"],
)
RELAY_FAILURES = Counter(
    "creditwatch_outbox_publish_failures_total",
    "Relay cycles that failed (database or broker unreachable); retried with back-off.",
    ["service"],
)
DEPENDENCY_UP = Gauge(
    "creditwatch_dependency_up",
    "1 while the process reaches a dependency (database, broker), 0 while it does not.",
    ["service", "dependency"],
)
LOOP_RUNNING = Gauge(
    "creditwatch_loop_running",
    "1 while a background loop (consumer, relay, scheduler) runs; 0 once it has ended for "
    "good (the process is then not alive: /healthz fails).",
    ["service", "loop"],
)

# --- credit checks and portfolio (limits) ---------------------------------------------------

CREDIT_CHECKS = Counter(
    "creditwatch_credit_checks_total",
    "Credit checks answered, by decision (approved, rejected, review).",
    ["decision"],
)
CREDIT_CHECK_BATCH = Histogram(
    "creditwatch_credit_check_batch_size",
    "Credit checks decided together in one database transaction (PostgreSQL).",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
CREDIT_CHECK_READ_SKIPPED = Counter(
    "creditwatch_credit_check_batches_read_skipped_total",
    "Batches of credit checks decided on what this process already held, without reading "
    "first (their write still checks it under the row locks).",
)
CREDIT_CHECK_REDECIDED = Counter(
    "creditwatch_credit_check_batches_redecided_total",
    "Batches of credit checks decided again under row locks, because something they had read "
    "changed before they were written (another replica, the consumer, a release).",
)
CREDIT_CHECK_SECONDS = Histogram(
    "creditwatch_credit_check_seconds",
    "Time to decide one credit check, including its database transaction.",
    buckets=(
        0.0005,
        0.001,
        0.0025,
        0.005,
        0.0075,
        0.01,
        0.025,
        0.05,
        0.075,
        0.1,
        0.25,
        0.5,
        1.0,
    ),
)
PORTFOLIO_EXPOSURE = Gauge(
    "creditwatch_portfolio_exposure",
    "Summed exposure of all customers, per credit currency.",
    ["currency"],
)
PORTFOLIO_LIMIT = Gauge(
    "creditwatch_portfolio_limit",
    "Summed credit limits of all customers, per credit currency.",
    ["currency"],
)
CUSTOMERS_OVER_LIMIT = Gauge(
    "creditwatch_customers_over_limit",
    "Customers whose exposure exceeds their limit.",
)

# --- assessment ----------------------------------------------------------------------------

CUSTOMERS = Gauge(
    "creditwatch_customers",
    "Customers by current grade ('unrated' before a first assessment).",
    ["grade"],
)

# --- alerts --------------------------------------------------------------------------------

ALERTS_RAISED = Counter(
    "creditwatch_alerts_raised_total",
    "Alerts raised, by rule and severity.",
    ["rule", "severity"],
)
ALERTS_OPEN = Gauge(
    "creditwatch_alerts_open",
    "Alerts currently open or acknowledged, by rule and severity.",
    ["rule", "severity"],
)

# --- HTTP ----------------------------------------------------------------------------------

HTTP_REQUESTS = Counter(
    "creditwatch_http_requests_total",
    "HTTP requests by matched route template (never the raw path).",
    ["service", "route", "method", "status"],
)
HTTP_REQUEST_SECONDS = Histogram(
    "creditwatch_http_request_seconds",
    "HTTP request duration by matched route template.",
    ["service", "route"],
    buckets=(
        0.0005,
        0.001,
        0.0025,
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        0.5,
        1.0,
        2.5,
        5.0,
        10.0,
    ),
)

UNMATCHED_ROUTE = "unmatched"
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def metrics_response() -> Response:
    """The default registry in the Prometheus text format."""
    return Response(_generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


def route_template(scope: Scope) -> str:
    """The path template of the route that handled ``scope`` (``/v1/customers/{id}/limit``)."""
    route = scope.get("route")
    if route is None:
        return UNMATCHED_ROUTE
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    if not isinstance(template, str) or not template:
        return UNMATCHED_ROUTE
    return template


class HttpMetrics:
    """Pure-ASGI middleware counting and timing requests per route template.

    Hot-path cheap: the labelled children are cached per (route, method, status), so a
    request costs two dict lookups, a counter increment and a histogram observation.
    """

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service
        self._counters: dict[tuple[str, str, int], Counter] = {}
        self._histograms: dict[str, Histogram] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = time.perf_counter()
        status = 500  # what the client gets when the app raises before responding

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self._record(scope, status, time.perf_counter() - started)

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        route = route_template(scope)
        method = scope["method"]
        if method not in _KNOWN_METHODS:
            method = "OTHER"  # arbitrary methods must not mint new series
        key = (route, method, status)
        counter = self._counters.get(key)
        if counter is None:
            counter = HTTP_REQUESTS.labels(self.service, route, method, str(status))
            self._counters[key] = counter
        counter.inc()
        histogram = self._histograms.get(route)
        if histogram is None:
            histogram = HTTP_REQUEST_SECONDS.labels(self.service, route)
            self._histograms[route] = histogram
        histogram.observe(seconds)


def describe_build() -> None:
    """Set ``creditwatch_build_info`` (once per process)."""
    import platform
    from importlib import metadata

    try:
        version = metadata.version("creditwatch")
    except metadata.PackageNotFoundError:
        version = "unknown"
    BUILD.info({"version": version, "python": platform.python_version()})
