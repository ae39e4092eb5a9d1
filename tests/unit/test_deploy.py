"""The deployment files, checked without Docker or a cluster: docker-compose.yml, the
Dockerfile, the Kubernetes manifests, the Prometheus scrape config and alert rules, and the
Grafana dashboards agree with the code — the settings that exist, the CLI's real commands,
the ports, and the metric names shared/metrics.py registers.

The Kubernetes checks run on what `kustomize build` renders for each overlay, and the rendered
manifests and docker-compose.yml go through schema validators (kubernetes-validate and
check-jsonschema, with the schemas those packages ship): harness/servers.py installs the
three tools into the cache when missing (scripts/test-infra fetch does it up front)."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import subprocess
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml
from prometheus_client import REGISTRY

from harness import servers
from shared import metrics
from shared.auth import parse_tokens
from shared.settings import Settings
from tools import cli, registry

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = DEPLOY / "k8s"
DEV_SECRETS = K8S / "overlays" / "dev" / "settings" / "dev-secrets"
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
    assert re.match(r"postgres:1[67](\.\d+)?@", compose_services()["postgres"]["image"])
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


def test_compose_pulls_every_image_by_digest() -> None:
    for name, svc in compose_services().items():
        if "build" in svc:
            continue  # creditwatch:local, built here from the pinned Dockerfile
        image = svc["image"]
        # The tag for the reader, the digest for what runs (a tag can be moved, a digest not).
        assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", image), f"{name}: {image}"


def test_compose_file_passes_the_compose_spec_schema(validators: Path) -> None:
    run_tool([validators / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", COMPOSE])


def test_the_compose_schema_check_rejects_an_unknown_key(validators: Path, tmp_path: Path) -> None:
    broken = dict(compose())
    broken["services"] = {**compose_services(), "postgres": {**compose_services()["postgres"]}}
    broken["services"]["postgres"]["helthcheck"] = broken["services"]["postgres"]["healthcheck"]
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    done = run_tool(
        [validators / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", path],
        check=False,
    )
    assert done.returncode != 0 and "helthcheck" in done.stdout, done.stdout


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
    assert re.match(r"python:3\.11(\.\d+)?-slim", runtime_base), runtime_base
    builder_base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], stages[0].split()[0])
    for base in (builder_base, runtime_base):
        assert DIGEST.search(base), f"the base image {base} is not pinned by digest"
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


# ---- Kubernetes: the kustomize builds --------------------------------------------------------
#
# What an operator applies is what kustomize renders, so the checks run on the rendered
# builds: each overlay's application and its migration Job (applied first), and the prod
# overlay with the optional ServiceMonitor component added as deploy/README.md says.

OVERLAYS = ("dev", "prod")
APP_BUILDS = {overlay: K8S / "overlays" / overlay for overlay in OVERLAYS}
MIGRATION_BUILDS = {
    f"{overlay}/migration": path / "migration" for overlay, path in APP_BUILDS.items()
}
WITH_SERVICE_MONITOR = "prod+service-monitor"
# The Secrets the operator creates (deploy/README.md); no build outside dev renders them.
OPERATOR_SECRETS = frozenset({"creditwatch-database", "creditwatch-api-tokens"})
# Where prod's creditwatch image stands until the operator pins theirs (overlays/prod/settings).
PROD_IMAGE_PLACEHOLDER = "registry.example.com/creditwatch"
# The oldest Kubernetes the manifests claim (deploy/README.md) and the newest schema shipped.
KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")

Docs = list[dict[str, Any]]


def tool_or_fail(install: Any) -> Path:
    """A validator from harness/servers.py (installed when missing): a machine that cannot
    have it fails the test, as a missing server does."""
    try:
        path: Path = install()
    except servers.InfraError as exc:
        pytest.fail(f"{exc} (scripts/test-infra fetch installs the validators)", pytrace=False)
    return path


def run_tool(argv: list[str | Path], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=300, check=False
    )
    if check:
        assert done.returncode == 0, (
            f"{' '.join(map(str, argv))} failed:\n{done.stdout}\n{done.stderr}"
        )
    return done


def kustomize_build(kustomize: Path, directory: Path) -> str:
    return run_tool([kustomize, "build", directory]).stdout


@pytest.fixture(scope="module")
def kustomize() -> Path:
    return tool_or_fail(servers.ensure_kustomize_installed)


@pytest.fixture(scope="module")
def validators() -> Path:
    return tool_or_fail(servers.ensure_manifest_validators_installed)


@pytest.fixture(scope="module")
def rendered(kustomize: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Every build's kustomize output (YAML text), by build name."""
    out = {
        name: kustomize_build(kustomize, path)
        for name, path in {**APP_BUILDS, **MIGRATION_BUILDS}.items()
    }
    # The optional ServiceMonitor, added to the prod overlay as deploy/README.md says.
    wrapper = tmp_path_factory.mktemp("service-monitor")
    up = Path(os.path.relpath(K8S, wrapper))
    (wrapper / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [str(up / "overlays" / "prod")],
                "components": [str(up / "components" / "service-monitor")],
            }
        )
    )
    out[WITH_SERVICE_MONITOR] = kustomize_build(kustomize, wrapper)
    return out


@pytest.fixture(scope="module")
def builds(rendered: dict[str, str]) -> dict[str, Docs]:
    return {
        name: [doc for doc in yaml.safe_load_all(text) if doc is not None]
        for name, text in rendered.items()
    }


def of_kind(docs: Docs, kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator = expression["key"], expression["operator"]
        if operator in ("In", "NotIn"):
            inside = labels.get(key) in expression["values"]
            if inside != (operator == "In"):
                return False
        elif (key in labels) != (operator == "Exists"):
            return False
    return True


def template_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def generated_name(name: str, available: dict[str, Any]) -> str | None:
    """The name kustomize gave a generated object, "<name>-<hash>", among those rendered."""
    if name in available:
        return name
    return next(
        (n for n in available if re.fullmatch(rf"{re.escape(name)}-[a-z0-9]{{10}}", n)), None
    )


def test_the_old_numbered_manifests_are_gone() -> None:
    # `kubectl apply -f deploy/k8s/` applied Secrets with CHANGE-ME values over real ones.
    assert not list(K8S.glob("*.yaml")), "deploy/k8s/ holds manifests outside the kustomize tree"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_build_passes_the_kubernetes_schemas(
    rendered: dict[str, str], validators: Path, tmp_path: Path, version: str
) -> None:
    files = []
    for name, text in rendered.items():
        files.append(tmp_path / f"{name.replace('/', '-')}.yaml")
        files[-1].write_text(text)
    done = run_tool([validators / "kubernetes-validate", "--strict", "-k", version, *files])
    passed = re.findall(r"^INFO .* passed for resource (\S+) ", done.stdout, re.M)
    skipped = re.findall(r"^WARN .* Couldn't find schema for kind (\w+)", done.stdout, re.M)
    total = sum(len([d for d in yaml.safe_load_all(t) if d]) for t in rendered.values())
    # Each object is checked, or is the optional ServiceMonitor (a CRD, no schema shipped).
    assert len(passed) + len(skipped) == total, done.stdout
    assert set(skipped) == {"ServiceMonitor"}, done.stdout


def test_the_schema_check_rejects_a_broken_manifest(validators: Path, tmp_path: Path) -> None:
    # The check above can fail: a field Kubernetes does not know is an error under --strict.
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "policy/v1",
                "kind": "PodDisruptionBudget",
                "metadata": {"name": "x"},
                "spec": {"maxUnavailabel": 1, "selector": {"matchLabels": {"a": "b"}}},
            }
        )
    )
    done = run_tool([validators / "kubernetes-validate", "--strict", broken], check=False)
    assert done.returncode != 0 and "maxUnavailabel" in done.stdout + done.stderr


@pytest.mark.parametrize("build", [*APP_BUILDS, *MIGRATION_BUILDS, WITH_SERVICE_MONITOR])
def test_every_object_is_in_the_creditwatch_namespace(builds: dict[str, Docs], build: str) -> None:
    docs = builds[build]
    assert set(of_kind(docs, "Namespace")) == {"creditwatch"}
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "creditwatch", (
                f"{doc['kind']} {doc['metadata']['name']}"
            )


def test_no_secret_value_is_rendered_outside_dev(
    builds: dict[str, Docs], rendered: dict[str, str]
) -> None:
    dev_values = [
        line.split("=", 1)[1]
        for line in (DEV_SECRETS / "database.env").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    ]
    dev_values += list(json.loads((DEV_SECRETS / "api-tokens.json").read_text()))
    for name, docs in builds.items():
        if name.startswith("dev"):
            continue
        assert not of_kind(docs, "Secret"), f"{name} renders a Secret"
        assert not [d for d in docs if "stringData" in d], name
        for value in dev_values:
            assert value not in rendered[name], f"{name} carries a dev secret value"
    # Nor is there a Secret manifest anywhere kustomize reads, but dev's generated ones.
    for path in K8S.rglob("*"):
        if (
            path.is_file()
            and path.suffix in (".yaml", ".yml")
            and DEV_SECRETS.parent not in path.parents
        ):
            for doc in yaml.safe_load_all(path.read_text()):
                assert not (doc or {}).get("secretGenerator"), f"{path} generates a Secret"
                assert (doc or {}).get("kind") != "Secret", f"{path} is a Secret manifest"


@pytest.mark.parametrize("build", ["dev", "dev/migration"])
def test_dev_generates_throwaway_secrets_from_obviously_dev_files(
    builds: dict[str, Docs], build: str
) -> None:
    secrets = of_kind(builds[build], "Secret")
    database = secrets[generated_name("creditwatch-database", secrets) or "?"]["data"]
    url = base64.b64decode(database["CREDITWATCH_DATABASE_URL"]).decode()
    assert url.startswith("postgresql+asyncpg://") and "dev-only" in url
    tokens_secret = secrets[generated_name("creditwatch-api-tokens", secrets) or "?"]["data"]
    tokens = parse_tokens(base64.b64decode(tokens_secret["api-tokens.json"]).decode(), source=build)
    assert tokens and all(token.startswith("dev-") for token in tokens)
    assert "DEV ONLY" in (DEV_SECRETS / "database.env").read_text()


@pytest.mark.parametrize("build", [*APP_BUILDS, *MIGRATION_BUILDS])
def test_workloads_reference_rendered_config_and_operator_secrets_only(
    builds: dict[str, Docs], build: str
) -> None:
    docs = builds[build]
    config_maps, secrets = of_kind(docs, "ConfigMap"), of_kind(docs, "Secret")
    workloads = {**of_kind(docs, "Deployment"), **of_kind(docs, "Job")}
    assert workloads
    secrets_named = set()
    for name, workload in workloads.items():
        env_keys: set[str] = set()
        for container in containers(workload):
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    env_keys |= set(config_maps[source["configMapRef"]["name"]]["data"])
                else:
                    secrets_named.add(source["secretRef"]["name"])
                    secret = secrets.get(source["secretRef"]["name"], {})
                    env_keys |= set(secret.get("data", {}))
            env_keys |= {e["name"] for e in container.get("env", [])}
        unknown = {k for k in env_keys if k.startswith("CREDITWATCH_")} - SETTINGS_ENV
        assert not unknown, f"{name}: {sorted(unknown)} are not Settings fields"
        for volume in pod_spec(workload).get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, name
            if "secret" in volume:
                secrets_named.add(volume["secret"]["secretName"])
    if build.startswith("dev"):
        # Generated in the build itself: the references carry the generated names.
        assert secrets_named <= set(secrets), sorted(secrets_named - set(secrets))
    else:
        # Nothing rendered: the names the operator's Secrets have (deploy/README.md).
        assert secrets_named <= OPERATOR_SECRETS, sorted(secrets_named - OPERATOR_SECRETS)
    bases = {re.sub(r"-[a-z0-9]{10}$", "", secret) for secret in secrets_named}
    assert "creditwatch-database" in bases and bases <= OPERATOR_SECRETS, sorted(bases)


def test_the_operator_secrets_carry_what_the_workloads_read() -> None:
    """deploy/README.md creates each Secret the prod build names, with the keys it reads."""
    readme = (DEPLOY / "README.md").read_text()
    created = dict(
        re.findall(
            r"kubectl -n creditwatch create secret generic (\S+) \\\n\s+(--from-[^\n]+)", readme
        )
    )
    assert set(created) == OPERATOR_SECRETS
    assert created["creditwatch-database"].startswith("--from-env-file=")
    assert "CREDITWATCH_DATABASE_URL=postgresql+asyncpg://" in readme
    assert created["creditwatch-api-tokens"].startswith("--from-file=api-tokens.json=")


@pytest.mark.parametrize("build", [*APP_BUILDS, *MIGRATION_BUILDS])
def test_policy_and_token_files_are_mounted_where_the_settings_point(
    builds: dict[str, Docs], build: str
) -> None:
    docs = builds[build]
    config_maps = of_kind(docs, "ConfigMap")
    config = config_maps[generated_name("creditwatch-config", config_maps) or "?"]["data"]
    policy = config_maps[generated_name("creditwatch-policy", config_maps) or "?"]["data"]
    assert policy == {"policy.yaml": (REPO / "shared" / "default_policy.yaml").read_text()}
    for name, workload in {**of_kind(docs, "Deployment"), **of_kind(docs, "Job")}.items():
        spec = pod_spec(workload)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        files = set()
        for mount in spec["containers"][0].get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "configMap" in volume:
                keys = set(config_maps[volume["configMap"]["name"]]["data"])
            elif "secret" in volume:
                # The operator's Secret holds api-tokens.json (deploy/README.md).
                keys = {"api-tokens.json"}
            else:
                keys = set()
            files |= {f"{mount['mountPath']}/{key}" for key in keys}
        assert config["CREDITWATCH_POLICY"] in files, name
        if workload["kind"] == "Deployment":  # serve needs tokens; db upgrade does not
            assert config["CREDITWATCH_API_TOKENS_FILE"] in files, name


@pytest.mark.parametrize("build", [*APP_BUILDS, *MIGRATION_BUILDS])
def test_only_the_migration_job_runs_db_upgrade(builds: dict[str, Docs], build: str) -> None:
    docs = builds[build]
    jobs, deployments = of_kind(docs, "Job"), of_kind(docs, "Deployment")
    if build in MIGRATION_BUILDS:
        assert not deployments
        (job,) = jobs.values()
        (container,) = containers(job)
        assert creditwatch_cli(container["args"])[0] == ["db", "upgrade"]
        assert pod_spec(job)["securityContext"]["runAsNonRoot"] is True
        return
    assert not jobs, f"{build}: the migration Job belongs to {build}/migration"
    assert deployments
    for name, deployment in deployments.items():
        for container in containers(deployment):
            path, params = creditwatch_cli(container["args"])
            # No replica migrates: serve refuses a database not at the newest revision.
            assert path == ["serve"] and params["migrate"] is False, f"{name}: {container['args']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_migration_job_runs_on_the_applications_image_and_config(
    builds: dict[str, Docs], overlay: str
) -> None:
    app, migration = builds[overlay], builds[f"{overlay}/migration"]
    (job,) = of_kind(migration, "Job").values()
    images = {c["image"] for d in of_kind(app, "Deployment").values() for c in containers(d)}
    assert {c["image"] for c in containers(job)} == images and len(images) == 1
    for kind in ("ConfigMap", "Secret", "Namespace"):
        # Same names (content hashes included) and data in both builds of the overlay.
        assert of_kind(migration, kind).items() <= of_kind(app, kind).items(), kind


@pytest.mark.parametrize("build", [*APP_BUILDS, WITH_SERVICE_MONITOR])
def test_no_deployment_under_an_autoscaler_sets_replicas(
    builds: dict[str, Docs], build: str
) -> None:
    deployments = of_kind(builds[build], "Deployment")
    hpas = of_kind(builds[build], "HorizontalPodAutoscaler")
    scaled = {hpa["spec"]["scaleTargetRef"]["name"] for hpa in hpas.values()}
    assert scaled == set(deployments), "every Deployment scales with an autoscaler"
    for name in scaled:
        # kubectl apply would reset the autoscaler's count to it every time.
        assert "replicas" not in deployments[name]["spec"], name


@pytest.mark.parametrize("build", [*APP_BUILDS, WITH_SERVICE_MONITOR])
def test_every_deployment_has_exactly_one_disruption_budget(
    builds: dict[str, Docs], build: str
) -> None:
    budgets = of_kind(builds[build], "PodDisruptionBudget")
    hpas = {
        h["spec"]["scaleTargetRef"]["name"]: h
        for h in of_kind(builds[build], "HorizontalPodAutoscaler").values()
    }
    deployments = of_kind(builds[build], "Deployment")
    for name, deployment in deployments.items():
        covering = [
            b
            for b in budgets.values()
            if selects(b["spec"]["selector"], template_labels(deployment))
        ]
        # A pod under two budgets cannot be evicted at all.
        assert len(covering) == 1, f"{name}: {[b['metadata']['name'] for b in covering]}"
        spec = covering[0]["spec"]
        # A drain must be able to proceed at the autoscaler's smallest count.
        if "minAvailable" in spec:
            assert spec["minAvailable"] < hpas[name]["spec"]["minReplicas"], name
        else:
            assert spec["maxUnavailable"] >= 1, name
    for name, budget in budgets.items():
        assert any(
            selects(budget["spec"]["selector"], template_labels(d)) for d in deployments.values()
        ), f"PodDisruptionBudget {name} selects no pods"


@pytest.mark.parametrize("build", [*APP_BUILDS, WITH_SERVICE_MONITOR])
def test_deployments_probe_health_and_readiness_and_run_as_non_root(
    builds: dict[str, Docs], build: str
) -> None:
    deployments = of_kind(builds[build], "Deployment")
    assert deployments
    for name, deployment in deployments.items():
        selector = deployment["spec"]["selector"]
        assert selects(selector, template_labels(deployment)), f"{name}: selector misses its pods"
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


@pytest.mark.parametrize("build", [*APP_BUILDS])
def test_deployments_run_real_commands_on_the_service_port(
    builds: dict[str, Docs], build: str
) -> None:
    commands = {}
    for name, deployment in of_kind(builds[build], "Deployment").items():
        (container,) = pod_spec(deployment)["containers"]
        path, params = creditwatch_cli(container["args"])
        assert path == ["serve"], name
        assert [p["containerPort"] for p in container["ports"]] == [PORTS[params["service"]]]
        commands[name] = params
    assert {p["service"] for p in commands.values()} == set(registry.SERVICES)
    # The credit-check hot path scales on its own: an API-only limits Deployment.
    api_only = [n for n, p in commands.items() if p["service"] == "limits" and not p["consume"]]
    consumers = [n for n, p in commands.items() if p["consume"]]
    assert api_only and {commands[n]["service"] for n in consumers} == set(registry.SERVICES)


@pytest.mark.parametrize("build", [*APP_BUILDS])
def test_services_select_existing_deployment_pods(builds: dict[str, Docs], build: str) -> None:
    deployments = of_kind(builds[build], "Deployment")
    for name, service in of_kind(builds[build], "Service").items():
        selected = [
            d
            for d in deployments.values()
            if selects({"matchLabels": service["spec"]["selector"]}, template_labels(d))
        ]
        assert selected, f"Service {name} selects no Deployment's pods"
        for deployment in selected:
            ports = {p["name"] for c in pod_spec(deployment)["containers"] for p in c["ports"]}
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in ports, f"Service {name}: no port {port['targetPort']}"


@pytest.mark.parametrize("build", [*APP_BUILDS])
def test_autoscalers_target_existing_deployments_within_the_partition_count(
    builds: dict[str, Docs], build: str
) -> None:
    deployments = of_kind(builds[build], "Deployment")
    hpas = of_kind(builds[build], "HorizontalPodAutoscaler")
    assert hpas
    partitions = int(environment(compose_services()["kafka-init"])["CREDITWATCH_TOPIC_PARTITIONS"])
    consume = {}
    for name, hpa in hpas.items():
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment" and target["name"] in deployments, name
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"], name
        (container,) = pod_spec(deployments[target["name"]])["containers"]
        consume[name] = creditwatch_cli(container["args"])[1]["consume"]
        if consume[name]:
            # Consumers beyond the partition count would sit idle.
            assert hpa["spec"]["maxReplicas"] <= partitions, name
    assert not all(consume.values()), "the API-only limits Deployment has no autoscaler"


@pytest.mark.parametrize("build", [*APP_BUILDS, *MIGRATION_BUILDS])
def test_images_are_the_one_creditwatch_image_and_prods_is_pinned_or_the_placeholder(
    builds: dict[str, Docs], build: str
) -> None:
    images = {
        c["image"]
        for kind in ("Deployment", "Job")
        for workload in of_kind(builds[build], kind).values()
        for c in containers(workload)
    }
    (image,) = images
    if build.startswith("dev"):
        assert image == "creditwatch:local"  # built from this checkout, loaded into the cluster
    else:
        # Pinned by digest by the operator (deploy/README.md "The image"); until then the
        # placeholder, which resolves nowhere, rather than a tag that could be moved.
        assert DIGEST.search(image) or image.startswith(f"{PROD_IMAGE_PLACEHOLDER}:"), image


def test_the_service_monitor_is_an_option_that_scrapes_each_pod_once(
    builds: dict[str, Docs],
) -> None:
    for name, docs in builds.items():
        if name != WITH_SERVICE_MONITOR:
            assert not of_kind(docs, "ServiceMonitor"), f"{name} carries a ServiceMonitor"
    docs = builds[WITH_SERVICE_MONITOR]
    (monitor,) = of_kind(docs, "ServiceMonitor").values()
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    scraped = [
        s
        for s in of_kind(docs, "Service").values()
        if selects(monitor["spec"]["selector"], s["metadata"].get("labels", {}))
    ]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert {"action": "replace", "targetLabel": "part_of", "replacement": "creditwatch"} in (
        endpoint["relabelings"]
    )  # what CreditwatchTargetDown selects
    for service in scraped:
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    for name, deployment in of_kind(docs, "Deployment").items():
        behind = [
            s["metadata"]["name"]
            for s in scraped
            if selects({"matchLabels": s["spec"]["selector"]}, template_labels(deployment))
        ]
        # Twice would double every counter in the dashboards and rules.
        assert len(behind) == 1, f"{name} is scraped through {behind}"


def test_readme_applies_the_builds_that_exist() -> None:
    readme = (DEPLOY / "README.md").read_text()
    applied = re.findall(r"kubectl apply -k (\S+)", readme)
    assert "deploy/k8s/overlays/prod" in applied
    assert "deploy/k8s/overlays/prod/migration" in applied
    assert applied.index("deploy/k8s/overlays/prod/migration") < applied.index(
        "deploy/k8s/overlays/prod"
    ), "the README applies the application before its migration"
    for path in applied:
        assert (REPO / path / "kustomization.yaml").is_file(), path
    assert "components/service-monitor" in readme


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


@pytest.mark.parametrize("service", registry.SERVICES)
def test_alert_rules_catch_a_consumer_that_never_exported_a_series(service: str) -> None:
    # `rate(...) == 0` is empty, not 0, for a series that does not exist, so it cannot fire
    # for a consumer that never consumed; absent() can, and names the service in its labels.
    exprs = [" ".join(rule["expr"].split()) for rule in alert_rules()]
    wanted = f'absent(creditwatch_events_consumed_total{{service="{service}"}})'
    assert any(wanted in expr for expr in exprs), wanted


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
