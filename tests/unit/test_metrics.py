"""Prometheus metrics: the contract's names, and HTTP metrics labelled by route template."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY, generate_latest

from shared import metrics
from shared.metrics import HttpMetrics, metrics_response

CONTRACT_METRICS = {
    "creditwatch_events_consumed_total": ("counter", {"service", "topic", "type"}),
    "creditwatch_events_dead_lettered_total": ("counter", {"service", "topic", "reason"}),
    "creditwatch_event_processing_seconds": ("histogram", {"service"}),
    "creditwatch_event_lag_seconds": ("histogram", {"service"}),
    "creditwatch_consumer_lag": ("gauge", {"service", "topic", "partition"}),
    "creditwatch_credit_checks_total": ("counter", {"decision"}),
    "creditwatch_credit_check_seconds": ("histogram", set()),
    "creditwatch_alerts_raised_total": ("counter", {"rule", "severity"}),
    "creditwatch_alerts_open": ("gauge", {"rule", "severity"}),
    "creditwatch_portfolio_exposure": ("gauge", {"currency"}),
    "creditwatch_portfolio_limit": ("gauge", {"currency"}),
    "creditwatch_customers": ("gauge", {"grade"}),
    "creditwatch_customers_over_limit": ("gauge", set()),
    "creditwatch_http_requests_total": ("counter", {"service", "route", "method", "status"}),
    "creditwatch_http_request_seconds": ("histogram", {"service", "route"}),
}


def _declared() -> dict[str, tuple[str, set[str]]]:
    """Exposed sample name → (type, label names) of every creditwatch metric."""
    declared: dict[str, tuple[str, set[str]]] = {}
    for value in vars(metrics).values():
        describe = getattr(value, "describe", None)
        if describe is None or not hasattr(value, "_labelnames"):
            continue
        for family in describe():
            name = family.name + ("_total" if family.type == "counter" else "")
            declared[name] = (family.type, set(value._labelnames))
    return declared


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_every_contract_metric_exists_with_exactly_its_labels() -> None:
    declared = _declared()

    for name, (kind, labels) in CONTRACT_METRICS.items():
        assert declared.get(name) == (kind, labels), name


def test_every_metric_is_namespaced_and_none_is_labelled_by_customer() -> None:
    for name, (_, labels) in _declared().items():
        assert name.startswith("creditwatch_")
        assert not any("customer" in label for label in labels), name


def test_the_extra_operational_metrics_exist() -> None:
    declared = _declared()

    assert declared["creditwatch_events_skipped_total"] == (
        "counter",
        {"service", "topic", "reason"},
    )
    assert declared["creditwatch_outbox_pending"] == ("gauge", {"service"})
    assert declared["creditwatch_outbox_published_total"] == ("counter", {"service", "topic"})
    assert declared["creditwatch_batches_total"] == ("counter", {"service"})


def test_lag_buckets_reach_days_and_credit_check_buckets_start_below_a_millisecond() -> None:
    assert max(metrics.EVENT_LAG_SECONDS._upper_bounds[:-1]) >= 7 * 24 * 3600
    assert metrics.CREDIT_CHECK_SECONDS._upper_bounds[0] == 0.0005
    assert metrics.CREDIT_CHECK_SECONDS._upper_bounds[-2] == 1.0


def test_metrics_response_is_the_prometheus_text_format() -> None:
    metrics.CREDIT_CHECKS.labels("approved").inc()

    response = metrics_response()

    assert response.media_type is not None and response.media_type.startswith("text/plain")
    assert b"creditwatch_credit_checks_total" in bytes(response.body)


# --- HTTP middleware -------------------------------------------------------------------------


def _app(service: str) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/customers/{customer_id}/limit")
    async def get_limit(customer_id: str) -> dict[str, str]:
        return {"customer_id": customer_id}

    @app.get("/v1/fail")
    async def fail() -> dict[str, str]:
        raise RuntimeError("boom")

    app.add_middleware(HttpMetrics, service=service)
    return app


@pytest.fixture
async def client(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    # A service name of its own per test keeps the shared default registry's counts apart.
    transport = httpx.ASGITransport(app=_app(request.node.name), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


async def test_a_request_is_counted_and_timed_under_its_route_template(
    client: httpx.AsyncClient, request: pytest.FixtureRequest
) -> None:
    service = request.node.name

    # When two customers' limits are read
    await client.get("/v1/customers/C-1001/limit")
    await client.get("/v1/customers/C-2002/limit")

    # Then both count under the template, not the raw paths
    route = "/v1/customers/{customer_id}/limit"
    labels = {"service": service, "route": route, "method": "GET", "status": "200"}
    assert _sample("creditwatch_http_requests_total", labels) == 2
    assert (
        _sample("creditwatch_http_request_seconds_count", {"service": service, "route": route}) == 2
    )
    exposed = generate_latest(REGISTRY).decode()
    assert "C-1001" not in exposed and "C-2002" not in exposed


async def test_an_unknown_path_is_counted_as_unmatched(
    client: httpx.AsyncClient, request: pytest.FixtureRequest
) -> None:
    await client.get("/wp-admin/install.php")

    labels = {
        "service": request.node.name,
        "route": "unmatched",
        "method": "GET",
        "status": "404",
    }
    assert _sample("creditwatch_http_requests_total", labels) == 1


async def test_a_failing_handler_is_counted_as_500(
    client: httpx.AsyncClient, request: pytest.FixtureRequest
) -> None:
    response = await client.get("/v1/fail")

    assert response.status_code == 500
    labels = {"service": request.node.name, "route": "/v1/fail", "method": "GET", "status": "500"}
    assert _sample("creditwatch_http_requests_total", labels) == 1


async def test_an_arbitrary_method_does_not_mint_a_new_series(
    client: httpx.AsyncClient, request: pytest.FixtureRequest
) -> None:
    await client.request("BREW", "/v1/customers/C-1/limit")

    labels = {
        "service": request.node.name,
        "route": "/v1/customers/{customer_id}/limit",
        "method": "OTHER",
        "status": "405",
    }
    assert _sample("creditwatch_http_requests_total", labels) == 1


def test_the_build_info_names_the_release_and_python() -> None:
    import platform
    from importlib import metadata

    from prometheus_client import generate_latest

    from shared.metrics import describe_build

    describe_build()
    text = generate_latest().decode()
    line = next(x for x in text.splitlines() if x.startswith("creditwatch_build_info{"))
    assert f'version="{metadata.version("creditwatch")}"' in line
    assert f'python="{platform.python_version()}"' in line
