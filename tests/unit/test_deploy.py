"""The deployment files, checked without Docker or a cluster: docker-compose.yml, the
Dockerfile, the Kubernetes manifests, the Prometheus scrape config and alert rules, and the
Grafana dashboards agree with the code — the settings that exist, the CLI's real commands,
the ports, and the metric names shared/metrics.py registers."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml
from prometheus_client import REGISTRY

from shared import metrics
from shared.auth import parse_tokens
from shared.settings import Settings
from tools import cli, registry

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = DEPLOY / "k8s"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))

DEFAULTS = Settings.model_construct()  # the code's defaults, whatever the environment says
SETTINGS_ENV = frozenset(f"CREDITWATCH_{name.upper()}" for name in Settings.model_fields)
TOPICS = frozenset(registry.all_topics(DEFAULTS))
PORTS = {service: DEFAULTS.port_for(service) for service in registry.SERVICES}


# ---- helpers -------------------------------------------------------------------------------


def creditwatch_cli(args: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Parse ``creditwatch <args>`` exactly as the real command would, without running it.

    Returns the subcommand path (``["db", "upgrade"]``) and the parsed parameters; an unknown
    command or option fails the test.
    """
    command: Any = typer.main.get_command(cli.app)
    rest, path = list(args), list[str]()
    while hasattr(command, "commands"):
        assert rest, f"`creditwatch {' '.join(path)}` needs a subcommand"
        name = rest.pop(0)
        assert name in command.commands, (
            f"`creditwatch {' '.join([*path, name])}`: no such command "
            f"(known: {', '.join(sorted(command.commands))})"
        )
        path.append(name)
        command = command.commands[name]
    try:
        context = command.make_context(f"creditwatch {' '.join(path)}", rest)
    except Exception as exc:
        pytest.fail(f"`creditwatch {' '.join(args)}` does not parse: {exc}")
    return path, dict(context.params)


def exported_metric_names() -> frozenset[str]:
    """Every creditwatch_* series name /metrics can render: the default registry's families
    (registered by importing shared.metrics), with Prometheus's suffixes.

    A counter ``x`` is exported as ``x_total``, a histogram as ``x_bucket``, ``x_sum`` and
    ``x_count``, a gauge as ``x``.
    """
    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"),
        "info": ("_info",),
    }
    assert metrics.CREDIT_CHECKS  # imported for its registrations
    return frozenset(
        family.name + suffix
        for family in REGISTRY.collect()
        if family.name.startswith("creditwatch_")
        for suffix in suffixes[family.type]
    )


EXPORTED = exported_metric_names()
# Series Prometheus makes itself for every target; only the target-down rule uses one.
PROMETHEUS_SYNTHETIC = frozenset({"up"})

_PROMQL_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_PROMQL_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_PROMQL_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "nan",
    }
)
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, labels left out)."""
    text = _PROMQL_STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges, subqueries, $__rate_interval
    text = _PROMQL_GROUPING.sub(" ", text)  # by (le), on (service), ...
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables elsewhere
    names = set()
    for match in _IDENTIFIER.finditer(text):
        before = text[match.start() - 1] if match.start() else " "
        if before.isalnum() or before in "._":  # part of a number (1e3) or a duration (5m)
            continue
        if text[match.end() :].lstrip().startswith("("):  # a function or an aggregation
            continue
        if match.group().lower() in _PROMQL_KEYWORDS:
            continue
        names.add(match.group())
    return names


def assert_known_metrics(expr: str, where: str, extra: frozenset[str] = frozenset()) -> None:
    names = promql_metric_names(expr)
    assert names, f"{where}: no metric in {expr!r}"
    unknown = names - EXPORTED - extra
    assert not unknown, (
        f"{where}: {sorted(unknown)} are not exported by the services "
        f"(shared/metrics.py) in {expr!r}"
    )


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@cache
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml(COMPOSE)
    return loaded


def compose_services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = compose()["services"]
    return services


def creditwatch_containers() -> dict[str, dict[str, Any]]:
    """Compose services that run the creditwatch image (the ones built from the Dockerfile)."""
    return {name: svc for name, svc in compose_services().items() if "build" in svc}


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def healthcheck_text(service: dict[str, Any]) -> str:
    test = (service.get("healthcheck") or {}).get("test") or []
    return test if isinstance(test, str) else " ".join(test)


# ---- docker-compose.yml --------------------------------------------------------------------


def test_compose_has_the_whole_system() -> None:
    assert set(compose_services()) >= {
        "kafka",
        "kafka-init",
        "postgres",
        "migrate",
        "assessment",
        "limits",
        "alerts",
        "prometheus",
        "grafana",
    }
    assert compose_services()["postgres"]["image"].startswith("postgres:15")
    kafka = compose_services()["kafka"]
    assert kafka["image"].startswith("apache/kafka:4.")
    assert environment(kafka)["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft


def test_compose_dependencies_exist_and_wait_for_health_or_completion() -> None:
    services = compose_services()
    for name, svc in services.items():
        for dep, condition in depends_on(svc).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            if condition == "service_healthy":
                assert services[dep].get("healthcheck"), (
                    f"{name} waits for {dep}'s health, which has no healthcheck"
                )
            if condition == "service_completed_successfully":
                assert services[dep].get("restart", "no") == "no", (
                    f"{dep} is a one-shot for {name} and must not restart"
                )


@pytest.mark.parametrize("service", registry.SERVICES)
def test_compose_runs_each_service_after_migrations_on_its_port(service: str) -> None:
    svc = compose_services()[service]
    path, params = creditwatch_cli(svc["command"])
    assert path == ["serve"] and params["service"] == service
    port = PORTS[service]
    assert f"{port}:{port}" in [str(p) for p in svc["ports"]]
    deps = depends_on(svc)
    assert deps.get("migrate") == "service_completed_successfully"
    assert deps.get("kafka-init") == "service_completed_successfully"
    assert f"127.0.0.1:{port}/readyz" in healthcheck_text(svc)
    env = environment(svc)
    assert env["CREDITWATCH_DATABASE_URL"].startswith("postgresql+asyncpg://")
    assert env["CREDITWATCH_KAFKA_BOOTSTRAP"]
    assert env.get("CREDITWATCH_HOST") == "0.0.0.0"  # the code's default is loopback
    assert "CREDITWATCH_API_TOKENS" in env or "CREDITWATCH_API_TOKENS_FILE" in env


def test_compose_migration_is_the_real_db_upgrade_command() -> None:
    migrate = compose_services()["migrate"]
    assert creditwatch_cli(migrate["command"])[0] == ["db", "upgrade"]
    assert depends_on(migrate).get("postgres") == "service_healthy"
    for service in registry.SERVICES:
        # Migrated once up front; three services racing Alembic on one database is not wanted.
        assert creditwatch_cli(compose_services()[service]["command"])[1]["migrate"] is False


def test_compose_uses_only_settings_that_exist() -> None:
    for name, svc in compose_services().items():
        for key in environment(svc):
            if key.startswith("CREDITWATCH_"):
                assert key in SETTINGS_ENV, f"{name}: {key} is not a Settings field"


def test_compose_builds_the_one_image_from_the_dockerfile() -> None:
    images = set()
    for name, svc in creditwatch_containers().items():
        build = svc["build"]
        assert (REPO / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE, name
        images.add(svc["image"])
    assert len(images) == 1
    assert set(creditwatch_containers()) == {"migrate", *registry.SERVICES}


def test_compose_services_reach_postgres_and_kafka_as_configured() -> None:
    from sqlalchemy.engine import make_url

    services = compose_services()
    pg = environment(services["postgres"])
    kafka = environment(services["kafka"])
    # {"kafka:9092": "PLAINTEXT", ...}: the address each listener hands out to clients.
    advertised = {
        address: name
        for name, address in (
            listener.split("://", 1) for listener in kafka["KAFKA_ADVERTISED_LISTENERS"].split(",")
        )
    }
    for name, svc in creditwatch_containers().items():
        env = environment(svc)
        url = make_url(env["CREDITWATCH_DATABASE_URL"])
        assert (url.host, url.username, url.password, url.database) == (
            "postgres",
            pg["POSTGRES_USER"],
            pg["POSTGRES_PASSWORD"],
            pg["POSTGRES_DB"],
        ), name
        assert advertised.get(env["CREDITWATCH_KAFKA_BOOTSTRAP"]) == "PLAINTEXT", name


def test_compose_mounts_a_valid_token_file_for_the_services() -> None:
    configs = compose().get("configs", {})
    for name, svc in creditwatch_containers().items():
        path = environment(svc)["CREDITWATCH_API_TOKENS_FILE"]
        mounted = {c["target"]: c["source"] for c in svc.get("configs", [])}
        assert path in mounted, f"{name}: nothing is mounted at {path}"
        tokens = parse_tokens(configs[mounted[path]]["content"], source=name)
        scopes = set().union(*(p.scopes for p in tokens.values()))
        assert "credit:check" in scopes


def test_compose_creates_every_topic_of_the_contract() -> None:
    init = compose_services()["kafka-init"]
    assert depends_on(init).get("kafka") == "service_healthy"
    script = " ".join(init["command"] if isinstance(init["command"], list) else [init["command"]])
    loop = re.search(r"for topic in (.*?); do", script, re.S)
    assert loop, "kafka-init: no `for topic in ...; do` loop"
    assert set(shlex.split(loop.group(1).replace("\\\n", " "))) == TOPICS
    assert "--if-not-exists" in script
    partitions = int(environment(init)["CREDITWATCH_TOPIC_PARTITIONS"])
    assert partitions >= 1


def test_compose_prometheus_and_grafana_mount_the_provisioned_files() -> None:
    services = compose_services()
    mounts = {
        m.split(":")[1]: REPO / m.split(":")[0]
        for m in services["prometheus"]["volumes"]
        if m.startswith("./")
    }
    config = next(
        a.split("=", 1)[1]
        for a in services["prometheus"]["command"]
        if a.startswith("--config.file=")
    )
    folder, file = config.rsplit("/", 1)
    assert (mounts[folder] / file).resolve() == (PROMETHEUS / "prometheus.yml").resolve()

    mounts = {
        m.split(":")[1]: (REPO / m.split(":")[0]).resolve()
        for m in services["grafana"]["volumes"]
        if m.startswith("./")
    }
    assert mounts["/etc/grafana/provisioning"] == (GRAFANA / "provisioning").resolve()
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "dashboards.yml")
    path = provider["providers"][0]["options"]["path"]
    assert mounts[path] == (GRAFANA / "dashboards").resolve()


# ---- Dockerfile ----------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    text = re.sub(r"^\s*#.*\n", "", DOCKERFILE.read_text(), flags=re.M)
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        if line.strip():
            instruction, _, args = line.strip().partition(" ")
            out.append((instruction.upper(), args.strip()))
    return out


def test_dockerfile_is_multi_stage_and_installs_the_project() -> None:
    steps = dockerfile_instructions()
    stages = [args for ins, args in steps if ins == "FROM"]
    assert len(stages) >= 2
    args = dict(a.split("=", 1) for ins, a in steps if ins == "ARG" and "=" in a)
    runtime_base = stages[-1].split()[0]
    runtime_base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], runtime_base)
    assert runtime_base.startswith("python:3.11-slim")
    builder = stages[0].split()[-1]
    assert any(ins == "RUN" and re.search(r"pip install (\S+ )*\.(\s|$)", a) for ins, a in steps)
    assert any(ins == "COPY" and a.startswith(f"--from={builder} ") for ins, a in steps)
    # Everything the wheel packages is copied into the build.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    copied = {
        source
        for ins, a in steps
        if ins == "COPY" and not a.startswith("--")
        for source in a.split()[:-1]
    }
    for needed in ["pyproject.toml", "README.md", *packages]:
        assert needed in copied, f"the Dockerfile does not copy {needed}"
        assert (REPO / needed).exists()


def test_dockerfile_runs_creditwatch_as_a_non_root_user() -> None:
    steps = dockerfile_instructions()
    last_from = max(i for i, (ins, _) in enumerate(steps) if ins == "FROM")
    users = [a for ins, a in steps[last_from:] if ins == "USER"]
    assert users, "the runtime stage has no USER"
    args = dict(a.split("=", 1) for ins, a in steps if ins == "ARG" and "=" in a)
    user = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], users[-1]).split(":")[0]
    assert user not in ("root", "0")
    assert ("ENTRYPOINT", '["creditwatch"]') in steps
    assert any(ins == "HEALTHCHECK" and "/healthz" in a for ins, a in steps)
    exposed = {int(p) for ins, a in steps if ins == "EXPOSE" for p in a.split()}
    assert exposed >= set(PORTS.values())


# ---- Kubernetes ----------------------------------------------------------------------------


def k8s_documents() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                yield path.name, doc


def k8s_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in k8s_documents() if doc["kind"] == kind}


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def test_every_manifest_parses_and_is_namespaced() -> None:
    docs = list(k8s_documents())
    assert {doc["kind"] for _, doc in docs} >= {
        "Namespace",
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "Job",
        "HorizontalPodAutoscaler",
    }
    namespaces = set(k8s_kind("Namespace"))
    assert namespaces == {"creditwatch"}
    for file, doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), file
        assert doc.get("metadata", {}).get("name"), f"{file}: a {doc['kind']} without a name"
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") in namespaces, (
                f"{file}: {doc['kind']} {doc['metadata']['name']}"
            )


def test_deployments_probe_health_and_readiness_and_run_as_non_root() -> None:
    deployments = k8s_kind("Deployment")
    assert deployments
    for name, deployment in deployments.items():
        template_labels = deployment["spec"]["template"]["metadata"]["labels"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= template_labels.items(), f"{name}: selector misses its pods"
        spec = pod_spec(deployment)
        security = spec["securityContext"]
        assert security["runAsNonRoot"] is True and security.get("runAsUser", 1) != 0, name
        for container in spec["containers"]:
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                get = container[probe]["httpGet"]
                assert get["path"] == path, f"{name}: {probe} is not on {path}"
                assert get["port"] in ports or get["port"] in ports.values(), name
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert container["resources"]["requests"] and container["resources"]["limits"]


def test_deployments_run_real_commands_on_the_service_port() -> None:
    commands = {}
    for name, deployment in k8s_kind("Deployment").items():
        (container,) = pod_spec(deployment)["containers"]
        assert container["image"].split(":")[0].endswith("creditwatch"), name
        path, params = creditwatch_cli(container["args"])
        assert path == ["serve"], name
        assert [p["containerPort"] for p in container["ports"]] == [PORTS[params["service"]]]
        commands[name] = params
    assert {p["service"] for p in commands.values()} == set(registry.SERVICES)
    # The credit-check hot path scales on its own: an API-only limits Deployment.
    api_only = [n for n, p in commands.items() if p["service"] == "limits" and not p["consume"]]
    consumers = [n for n, p in commands.items() if p["consume"]]
    assert api_only and {commands[n]["service"] for n in consumers} == set(registry.SERVICES)


def test_migration_job_runs_db_upgrade() -> None:
    (job,) = k8s_kind("Job").values()
    (container,) = pod_spec(job)["containers"]
    assert creditwatch_cli(container["args"])[0] == ["db", "upgrade"]
    assert pod_spec(job)["securityContext"]["runAsNonRoot"] is True


def test_workloads_reference_existing_config_and_use_real_settings() -> None:
    config_maps, secrets = k8s_kind("ConfigMap"), k8s_kind("Secret")
    workloads = {**k8s_kind("Deployment"), **k8s_kind("Job")}
    for name, workload in workloads.items():
        spec = pod_spec(workload)
        env_keys: set[str] = set()
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    env_keys |= set(config_maps[source["configMapRef"]["name"]]["data"])
                else:
                    secret = secrets[source["secretRef"]["name"]]
                    env_keys |= set(secret.get("stringData") or secret.get("data") or {})
            env_keys |= {e["name"] for e in container.get("env", [])}
        unknown = {k for k in env_keys if k.startswith("CREDITWATCH_")} - SETTINGS_ENV
        assert not unknown, f"{name}: {sorted(unknown)} are not Settings fields"
        assert "CREDITWATCH_DATABASE_URL" in env_keys, name
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, name
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets, name


def test_policy_and_token_files_are_mounted_where_the_settings_point() -> None:
    config = k8s_kind("ConfigMap")["creditwatch-config"]["data"]
    policy_map = k8s_kind("ConfigMap")["creditwatch-policy"]["data"]
    assert policy_map["policy.yaml"] == (REPO / "shared" / "default_policy.yaml").read_text()
    tokens_secret = k8s_kind("Secret")["creditwatch-api-tokens"]["stringData"]
    for name, deployment in k8s_kind("Deployment").items():
        spec = pod_spec(deployment)
        volumes = {v["name"]: v for v in spec["volumes"]}
        files = {}
        for mount in spec["containers"][0]["volumeMounts"]:
            volume = volumes[mount["name"]]
            keys = (
                (volume.get("configMap") and policy_map)
                or (volume.get("secret") and tokens_secret)
                or {}
            )
            files.update({f"{mount['mountPath']}/{key}": value for key, value in keys.items()})
        assert config["CREDITWATCH_POLICY"] in files, name
        tokens = parse_tokens(files[config["CREDITWATCH_API_TOKENS_FILE"]], source=name)
        assert tokens


def test_services_select_existing_deployment_pods() -> None:
    deployments = k8s_kind("Deployment")
    for name, service in k8s_kind("Service").items():
        selector = service["spec"]["selector"]
        selected = [
            d
            for d in deployments.values()
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert selected, f"Service {name} selects no Deployment's pods"
        for deployment in selected:
            ports = {p["name"] for c in pod_spec(deployment)["containers"] for p in c["ports"]}
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in ports, f"Service {name}: no port {port['targetPort']}"


def test_autoscalers_target_existing_deployments_within_the_partition_count() -> None:
    deployments = k8s_kind("Deployment")
    hpas = k8s_kind("HorizontalPodAutoscaler")
    assert hpas
    partitions = int(environment(compose_services()["kafka-init"])["CREDITWATCH_TOPIC_PARTITIONS"])
    for name, hpa in hpas.items():
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment" and target["name"] in deployments, name
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"], name
        (container,) = pod_spec(deployments[target["name"]])["containers"]
        if creditwatch_cli(container["args"])[1]["consume"]:
            # Consumers beyond the partition count would sit idle.
            assert hpa["spec"]["maxReplicas"] <= partitions, name
    assert any(
        not creditwatch_cli(
            pod_spec(deployments[h["spec"]["scaleTargetRef"]["name"]])["containers"][0]["args"]
        )[1]["consume"]
        for h in hpas.values()
    ), "the API-only limits Deployment has no autoscaler"


# ---- Prometheus ----------------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    return [
        rule for group in load_yaml(PROMETHEUS / "rules.yml")["groups"] for rule in group["rules"]
    ]


def test_prometheus_scrapes_the_three_services_where_compose_runs_them() -> None:
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    targets = {
        target
        for job in config["scrape_configs"]
        for sc in job["static_configs"]
        for target in sc["targets"]
    }
    assert targets == {f"{service}:{port}" for service, port in PORTS.items()}
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for sc in job["static_configs"]:
            assert sc["labels"]["part_of"] == "creditwatch"  # what CreditwatchTargetDown uses
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS / rule_file).is_file()


def test_alert_rules_have_durations_severities_and_summaries() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), rule["alert"]
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_alert_rules_name_only_exported_metrics() -> None:
    for rule in alert_rules():
        assert_known_metrics(rule["expr"], f"rule {rule['alert']}", extra=PROMETHEUS_SYNTHETIC)


def test_alert_rules_cover_lag_dead_letters_errors_latency_and_silence() -> None:
    exprs = [" ".join(rule["expr"].split()) for rule in alert_rules()]

    def some(pattern: str) -> bool:
        return any(re.search(pattern, e) for e in exprs)

    assert some(r"creditwatch_consumer_lag")
    assert some(r"creditwatch_events_dead_lettered_total")
    assert some(r'creditwatch_http_requests_total\{[^}]*status=~"5\.\."')
    assert some(r"histogram_quantile\(0\.99, .*creditwatch_credit_check_seconds_bucket")
    assert some(r"rate\(creditwatch_events_consumed_total\[\w+\]\)\) == 0")


# ---- Grafana -------------------------------------------------------------------------------


def datasource_uid() -> str:
    (source,) = load_yaml(GRAFANA / "provisioning" / "datasources" / "datasource.yml")[
        "datasources"
    ]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    uid: str = source["uid"]
    return uid


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep theirs inside


def dashboard_exprs(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield f"{dashboard['uid']} / {panel['title']}", target["expr"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_is_valid_and_uses_the_provisioned_datasource(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    uid = datasource_uid()
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels(dashboard):
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys(), panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid, panel["title"]
            assert target["expr"].strip() and target["refId"]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == uid


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_queries_name_only_exported_metrics(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    for where, expr in dashboard_exprs(dashboard):
        assert_known_metrics(expr, where)
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable["type"] != "query":
            continue
        query = (
            variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        )
        match = re.fullmatch(r"label_values\((\w+)(?:\{[^}]*\})?,\s*\w+\)", query)
        assert match, f"variable {variable['name']}: unexpected query {query!r}"
        assert match.group(1) in EXPORTED


def test_dashboards_cover_portfolio_event_flow_decisions_and_alerts() -> None:
    used = {
        path.stem: set().union(
            *(
                promql_metric_names(expr)
                for _, expr in dashboard_exprs(json.loads(path.read_text()))
            )
        )
        for path in DASHBOARDS
    }
    assert used.keys() == {"portfolio", "event-flow", "credit-decisions", "alerts"}
    assert used["portfolio"] >= {
        "creditwatch_portfolio_exposure",
        "creditwatch_portfolio_limit",
        "creditwatch_customers",
        "creditwatch_customers_over_limit",
    }
    assert used["event-flow"] >= {
        "creditwatch_events_consumed_total",
        "creditwatch_consumer_lag",
        "creditwatch_events_dead_lettered_total",
        "creditwatch_event_processing_seconds_bucket",
        "creditwatch_event_lag_seconds_bucket",
    }
    assert used["credit-decisions"] >= {
        "creditwatch_credit_checks_total",
        "creditwatch_credit_check_seconds_bucket",
    }
    assert used["alerts"] >= {"creditwatch_alerts_raised_total", "creditwatch_alerts_open"}
    uids = [json.loads(path.read_text())["uid"] for path in DASHBOARDS]
    assert len(uids) == len(set(uids))


# ---- the checker itself --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'sum by (service, le) (rate(a_bucket{x=~"5..", le!="1"}[$__rate_interval]))',
            {"a_bucket"},
        ),
        ("histogram_quantile(0.99, sum by (le) (rate(b_bucket[5m]))) > 0.025", {"b_bucket"}),
        ("x / on (service) group_left (topic) y offset 5m > bool 1e3", {"x", "y"}),
        ('up{part_of="creditwatch"} == 0 and max(z) unless w', {"up", "z", "w"}),
        ('label_replace(m, "dst", "$1", "src", "(.*)")', {"m"}),
    ],
)
def test_promql_metric_names_finds_selectors_only(expr: str, names: set[str]) -> None:
    assert promql_metric_names(expr) == names


def test_exported_names_carry_the_prometheus_suffixes() -> None:
    assert {
        "creditwatch_credit_checks_total",
        "creditwatch_credit_check_seconds_bucket",
        "creditwatch_credit_check_seconds_count",
        "creditwatch_alerts_open",
        "creditwatch_consumer_lag",
    } <= EXPORTED
    assert "creditwatch_credit_check_seconds" not in EXPORTED  # a histogram has no bare series
    assert "creditwatch_credit_checks" not in EXPORTED
