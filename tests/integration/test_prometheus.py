"""deploy/prometheus with the real Prometheus server (Debian's package, installed when
missing): promtool accepts the rules and the scrape config and the alert rules fire on the
series they are meant for; then Prometheus scrapes the three services, running as real
processes on the real PostgreSQL and Kafka, and its query API sees credit checks, consumed
events and open alerts move, every rule evaluate and every dashboard query run."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiokafka import AIOKafkaProducer

from harness import factories, servers
from harness.processes import CHECK, ServiceProcess, service_env
from shared.settings import Settings
from tools.registry import SERVICES, all_topics

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "rules.yml"
DASHBOARDS = sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json"))
DEFAULTS = Settings.model_construct()  # the code's defaults, whatever the environment says
TOPIC_ENV = {
    f"CREDITWATCH_{name.upper()}": getattr(DEFAULTS, name)
    for name in Settings.model_fields
    if name.startswith("topic_") and isinstance(getattr(DEFAULTS, name), str)
}


# ---- the Prometheus binaries -----------------------------------------------------------------


def _binaries() -> tuple[str, str] | None:
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    return (prometheus, promtool) if prometheus and promtool else None


@pytest.fixture(scope="module")
def prometheus_bins() -> tuple[str, str]:
    """``(prometheus, promtool)``, from Debian's ``prometheus`` package (installed if missing).

    Only the binaries are used; Debian's service is never started or relied on. Outside CI
    a machine that cannot install the package skips these tests; in CI that is a failure.
    """
    found = _binaries()
    if found is None:
        try:
            with servers._file_lock(servers.cache_dir() / "apt.lock"):
                if _binaries() is None:
                    servers._apt_install(["prometheus"])
        except Exception as exc:
            reason = f"the prometheus package is missing and could not be installed: {exc}"
            if os.environ.get("CI", "").lower() in ("true", "1"):
                pytest.fail(reason, pytrace=False)
            pytest.skip(reason)
        found = _binaries()
    if found is None:
        pytest.fail(
            "the prometheus package is installed but prometheus/promtool are not on PATH",
            pytrace=False,
        )
    return found


def promtool(bins: tuple[str, str], *args: str | Path) -> str:
    done = subprocess.run(
        [bins[1], *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(map(str, args))} failed:\n{output}"
    return output


# ---- promtool --------------------------------------------------------------------------------


def test_promtool_accepts_the_rules_and_the_scrape_config(
    prometheus_bins: tuple[str, str], tmp_path: Path
) -> None:
    assert "SUCCESS" in promtool(prometheus_bins, "check", "rules", RULES)
    # A copy, so that promtool resolves rule_files beside it exactly as Prometheus would.
    for file in PROMETHEUS_DIR.glob("*.yml"):
        shutil.copy(file, tmp_path / file.name)
    assert "SUCCESS" in promtool(prometheus_bins, "check", "config", tmp_path / "prometheus.yml")


def _alert(name: str, **labels: str) -> dict[str, Any]:
    return {"alertname": name, "exp_alerts": [{"exp_labels": labels}] if labels else []}


# (series, values) as promtool writes them: 'a+bxN' is a, a+b, ... N times (1m apart).
RULE_CASES: list[tuple[str, list[tuple[str, str]], list[tuple[str, dict[str, Any]]]]] = [
    (
        "a lagging consumer group",
        [
            (
                'creditwatch_consumer_lag{service="limits",topic="ar.invoices",partition="0"}',
                "800x40",
            ),
            (
                'creditwatch_consumer_lag{service="limits",topic="ar.invoices",partition="1"}',
                "700x40",
            ),
        ],
        [
            ("5m", _alert("CreditwatchConsumerLagHigh")),
            (
                "15m",
                _alert(
                    "CreditwatchConsumerLagHigh",
                    severity="warning",
                    service="limits",
                    topic="ar.invoices",
                ),
            ),
            ("15m", _alert("CreditwatchConsumerLagCritical")),
        ],
    ),
    (
        "dead letters",
        [
            (
                'creditwatch_events_dead_lettered_total{service="limits",topic="ar.invoices",'
                'reason="invalid_json"}',
                "0+10x30",
            ),
            (
                'creditwatch_events_consumed_total{service="limits",topic="ar.invoices",'
                'type="invoice.issued"}',
                "0+100x30",
            ),
        ],
        [
            (
                "5m",
                _alert(
                    "CreditwatchDeadLetters",
                    severity="warning",
                    service="limits",
                    topic="ar.invoices",
                    reason="invalid_json",
                ),
            ),
            ("20m", _alert("CreditwatchDeadLetterRateHigh", severity="critical", service="limits")),
        ],
    ),
    (
        "server errors, readiness 503s aside",
        [
            (
                'creditwatch_http_requests_total{service="limits",route="/v1/credit-checks",'
                'method="POST",status="200"}',
                "0+600x30",
            ),
            (
                'creditwatch_http_requests_total{service="limits",route="/v1/credit-checks",'
                'method="POST",status="500"}',
                "0+30x30",
            ),
            (
                'creditwatch_http_requests_total{service="alerts",route="/v1/alerts",'
                'method="GET",status="200"}',
                "0+600x30",
            ),
            (
                'creditwatch_http_requests_total{service="alerts",route="/readyz",'
                'method="GET",status="503"}',
                "0+600x30",
            ),
        ],
        [("15m", _alert("CreditwatchHttp5xxRate", severity="critical", service="limits"))],
    ),
    (
        "slow credit checks",
        [
            ('creditwatch_credit_check_seconds_bucket{le="0.01"}', "0+10x30"),
            ('creditwatch_credit_check_seconds_bucket{le="0.05"}', "0+100x30"),
            ('creditwatch_credit_check_seconds_bucket{le="+Inf"}', "0+100x30"),
        ],
        [
            ("15m", _alert("CreditwatchCreditCheckSlow", severity="warning")),
            ("15m", _alert("CreditwatchCreditCheckVerySlow")),
        ],
    ),
    (
        "fast credit checks",
        [
            ('creditwatch_credit_check_seconds_bucket{le="0.005"}', "0+100x30"),
            ('creditwatch_credit_check_seconds_bucket{le="+Inf"}', "0+100x30"),
        ],
        [("20m", _alert("CreditwatchCreditCheckSlow"))],
    ),
    (
        "a service that stopped consuming",
        [
            (
                'creditwatch_events_consumed_total{service="alerts",topic="credit.exposure",'
                'type="exposure.updated"}',
                "0+50x10 500x70",
            ),
            (
                'creditwatch_events_consumed_total{service="limits",topic="ar.invoices",'
                'type="invoice.issued"}',
                "0+50x80",
            ),
        ],
        [
            ("30m", _alert("CreditwatchNoEventsConsumed")),
            ("70m", _alert("CreditwatchNoEventsConsumed", severity="warning", service="alerts")),
        ],
    ),
    (
        # rate(...) == 0 needs a series: a consumer that never consumed exports none.
        "a consumer that never consumed anything",
        [
            (
                'creditwatch_events_consumed_total{service="limits",topic="ar.invoices",'
                'type="invoice.issued"}',
                "0+50x60",
            ),
            (
                'creditwatch_events_consumed_total{service="alerts",topic="credit.exposure",'
                'type="exposure.updated"}',
                "0+50x60",
            ),
        ],
        [
            ("30m", _alert("CreditwatchConsumerNeverConsumed")),
            (
                "50m",
                _alert(
                    "CreditwatchConsumerNeverConsumed", severity="warning", service="assessment"
                ),
            ),
            ("50m", _alert("CreditwatchNoEventsConsumed")),
        ],
    ),
    (
        "a target that is down",
        [
            (
                'up{job="creditwatch-limits",instance="limits:8002",part_of="creditwatch"}',
                "1x5 0x10",
            ),
            ('up{job="other",instance="x:1"}', "0x15"),
        ],
        [
            (
                "10m",
                _alert(
                    "CreditwatchTargetDown",
                    severity="critical",
                    job="creditwatch-limits",
                    instance="limits:8002",
                    part_of="creditwatch",
                ),
            )
        ],
    ),
]


def test_alert_rules_fire_on_what_they_are_meant_for(
    prometheus_bins: tuple[str, str], tmp_path: Path
) -> None:
    # promtool compares annotations too: test a copy without them (check rules covers their
    # templates).
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    tests = [
        {
            "name": name,
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in series],
            "alert_rule_test": [{"eval_time": at, **alert} for at, alert in checks],
        }
        for name, series, checks in RULE_CASES
    ]
    (tmp_path / "tests.yml").write_text(
        yaml.safe_dump({"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": tests})
    )
    assert "SUCCESS" in promtool(prometheus_bins, "test", "rules", tmp_path / "tests.yml")


# ---- Prometheus scraping the running services ------------------------------------------------


class Prometheus:
    """A Prometheus server as a child process, and its HTTP query API."""

    def __init__(self, binary: str, config: Path, workdir: Path) -> None:
        self.port = servers.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "prometheus.log"
        self.proc = servers._spawn(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            log_path=self.log,
            cwd=workdir,
            run_as=None,
            die_with_parent=True,
        )

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited:\n{self.tail()}"
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        pytest.fail(f"prometheus not ready after {timeout}s:\n{self.tail()}")

    def stop(self) -> None:
        servers._stop_group(self.proc.pid, first_signal=signal.SIGTERM, timeout=10, popen=self.proc)

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    def api(self, path: str, **params: str) -> Any:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = response.json()
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The value of a one-element instant vector, or None while it is empty."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None


def wait_for(
    prom: Prometheus,
    expr: str,
    ok: Callable[[float], bool],
    what: str,
    procs: dict[str, ServiceProcess],
    timeout: float = 45,
) -> float:
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = prom.value(expr)
        if value is not None and ok(value):
            return value
        time.sleep(0.5)
    logs = "\n".join(f"--- {name}\n{proc.tail(15)}" for name, proc in procs.items())
    pytest.fail(f"{what}: `{expr}` is {value} after {timeout}s\n{logs}")


def scrape_config(procs: dict[str, ServiceProcess], workdir: Path) -> Path:
    """deploy/prometheus/prometheus.yml, pointed at the test's processes, scraping every 1 s."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            service = static["targets"][0].split(":")[0]  # compose's host names
            static["targets"] = [f"127.0.0.1:{procs[service].port}"]
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


async def publish(bootstrap: str, events: list[tuple[str, dict[str, Any]]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for topic, event in events:
            await producer.send_and_wait(
                topic, factories.raw(event), key=str(event["subject"]).encode()
            )
    finally:
        await producer.stop()


def credit_checks(limits: ServiceProcess, prefix: str, start: int, count: int) -> None:
    headers = {"Authorization": f"Bearer {CHECK}"}
    for n in range(start, start + count):
        response = httpx.post(
            f"{limits.url}/v1/credit-checks",
            headers=headers,
            timeout=10,
            json={
                "order_id": f"{prefix}-SO-{n}",
                "customer_id": f"{prefix}-C{n % 3}",
                "amount": "1200.00",
                "currency": "EUR",
            },
        )
        assert response.status_code == 200, response.text


def grafana_exprs() -> Iterator[tuple[str, str]]:
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                expr = (
                    target["expr"]
                    .replace("$__rate_interval", "1m")
                    .replace("$__range", "5m")
                    .replace("$service", ".*")
                )
                yield f"{path.stem} / {panel['title']}", expr


Running = tuple[Prometheus, dict[str, ServiceProcess], dict[str, str]]


@pytest.fixture
def running(
    tmp_path: Path, postgres_server_url: str, kafka_bootstrap: str, prometheus_bins: tuple[str, str]
) -> Iterator[Running]:
    """The three services (as compose runs them: `db upgrade` once, then `serve --no-migrate`)
    on fresh topics and a fresh database, and Prometheus scraping them."""
    prefix = f"p{uuid.uuid4().hex[:8]}"
    topics = {env: f"{prefix}.{name}" for env, name in TOPIC_ENV.items()}
    assert set(TOPIC_ENV.values()) == set(all_topics(DEFAULTS))
    servers.create_topics(kafka_bootstrap, topics.values(), 2)
    env = service_env(
        database_url=servers.create_database(postgres_server_url),
        bootstrap=kafka_bootstrap,
        CREDITWATCH_CONSUMER_GROUP_PREFIX=prefix,
        **topics,
    )
    migrated = subprocess.run(
        [sys.executable, "-m", "tools.cli", "db", "upgrade"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    procs = {name: ServiceProcess(name, env, tmp_path, "--no-migrate") for name in SERVICES}
    prom: Prometheus | None = None
    try:
        for proc in procs.values():
            proc.start()
        config = scrape_config(procs, tmp_path)
        assert "SUCCESS" in promtool(prometheus_bins, "check", "config", config)
        prom = Prometheus(prometheus_bins[0], config, tmp_path)
        prom.wait_ready()
        for proc in procs.values():
            proc.wait_ready(60)
        yield prom, procs, topics
    finally:
        if prom is not None:
            prom.stop()
        for proc in procs.values():
            proc.stop()


def test_prometheus_sees_checks_events_and_alerts_move(
    running: Running, kafka_bootstrap: str
) -> None:
    prom, procs, topics = running
    customers = topics["CREDITWATCH_TOPIC_CUSTOMERS"]
    invoices = topics["CREDITWATCH_TOPIC_INVOICES"]
    prefix = customers.split(".")[0]
    wait_for(
        prom,
        'count(up{part_of="creditwatch"} == 1)',
        lambda v: v == len(SERVICES),
        "every service scraped",
        procs,
    )

    # Given: customers with invoices far beyond any limit (an alert per customer), and checks.
    asyncio.run(
        publish(
            kafka_bootstrap,
            [
                *[(customers, factories.customer(f"{prefix}-C{n}")) for n in range(3)],
                *[
                    (invoices, factories.invoice(f"{prefix}-C{n}", f"{prefix}-I{n}", "9000000.00"))
                    for n in range(3)
                ],
            ],
        )
    )
    credit_checks(procs["limits"], prefix, 0, 5)
    checks = wait_for(
        prom,
        "sum(creditwatch_credit_checks_total)",
        lambda v: v >= 5,
        "credit checks counted",
        procs,
    )
    consumed = wait_for(
        prom, "sum(creditwatch_events_consumed_total)", lambda v: v > 0, "events consumed", procs
    )
    assert prom.query("creditwatch_alerts_open"), "creditwatch_alerts_open is not exported"

    # When: more of both.
    asyncio.run(
        publish(
            kafka_bootstrap,
            [
                (invoices, factories.invoice(f"{prefix}-C{n}", f"{prefix}-J{n}", "10.00"))
                for n in range(3)
            ],
        )
    )
    credit_checks(procs["limits"], prefix, 5, 5)

    # Then: the counters move, and the alerts service has open alerts.
    wait_for(
        prom,
        "sum(creditwatch_credit_checks_total)",
        lambda v: v >= checks + 5,
        "more credit checks counted",
        procs,
    )
    wait_for(
        prom,
        "sum(creditwatch_events_consumed_total)",
        lambda v: v > consumed,
        "more events consumed",
        procs,
    )
    wait_for(prom, "sum(creditwatch_alerts_open)", lambda v: v > 0, "alerts open", procs)
    assert (prom.value("sum(creditwatch_alerts_raised_total)") or 0) > 0
    consumed_by = {
        r["metric"]["service"]
        for r in prom.query("sum by (service) (creditwatch_events_consumed_total) > 0")
    }
    assert consumed_by == set(SERVICES)

    # Every alert rule evaluates on the live server, and every dashboard query runs.
    groups = prom.api("rules")["groups"]
    loaded = {rule["name"] for group in groups for rule in group["rules"]}
    expected = yaml.safe_load(RULES.read_text())["groups"]
    assert loaded == {rule["alert"] for group in expected for rule in group["rules"]}
    deadline = time.monotonic() + 10
    while any(rule["health"] != "ok" for group in groups for rule in group["rules"]):
        broken = [
            (r["name"], r.get("lastError"))
            for g in groups
            for r in g["rules"]
            if r["health"] == "err"
        ]
        assert not broken, broken
        assert time.monotonic() < deadline, "rules not evaluated"
        time.sleep(0.5)
        groups = prom.api("rules")["groups"]
    for where, expr in grafana_exprs():
        try:
            prom.query(expr)
        except AssertionError as exc:
            pytest.fail(f"dashboard panel {where}: {exc}")
