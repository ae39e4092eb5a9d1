"""``creditwatch dev --demo`` as a user runs it: one command in a fresh working directory
(fresh ``.creditwatch/`` SQLite files), the embedded Tansu broker on a free port, the three
services on free ports. Within two minutes everything is ready, credit checks are answered,
the portfolio carries exposure and alerts of several rules are open; Ctrl-C (SIGINT) then
stops it all cleanly, broker included."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from harness.servers import free_ports

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
TOKEN_LINE = re.compile(r"^\s+dev\s+(\S+)\s*$", re.MULTILINE)


def _children(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_dev_demo_comes_alive_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    assessment, limits, alerts, broker = free_ports(4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDITWATCH_")}
    env.update(
        {
            "CREDITWATCH_ASSESSMENT_PORT": str(assessment),
            "CREDITWATCH_LIMITS_PORT": str(limits),
            "CREDITWATCH_ALERTS_PORT": str(alerts),
            "CREDITWATCH_DEV_BROKER_PORT": str(broker),
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
        }
    )
    log = tmp_path / "dev.log"
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.cli", "dev", "--demo"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        with log.open("w") as out:
            for raw in proc.stdout:
                text = raw.decode(errors="replace")
                lines.append(text)
                out.write(text)
                out.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    descendants: set[int] = set()
    try:
        deadline = started + 120

        def output() -> str:
            return "".join(lines)

        def wait(what: str, check: object) -> None:
            assert callable(check)
            while True:
                assert proc.poll() is None, f"dev exited with {proc.returncode}:\n{output()}"
                try:
                    if check():
                        return
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"no {what} within 2 minutes:\n{output()}"
                time.sleep(0.5)

        wait("dev token", lambda: TOKEN_LINE.search(output()))
        match = TOKEN_LINE.search(output())
        assert match is not None
        assert f"127.0.0.1:{broker}" in output() and "Tansu" in output()
        headers = {"Authorization": f"Bearer {match.group(1)}"}

        def base(port: int) -> str:
            return f"http://127.0.0.1:{port}"

        for port in (assessment, limits, alerts):
            wait(
                f"readiness on {port}",
                lambda port=port: httpx.get(f"{base(port)}/readyz", timeout=3).status_code == 200,
            )
        # The embedded broker runs as a child of the dev process.
        descendants = _children(proc.pid)
        assert any("tansu" in _cmdline(pid) for pid in descendants), descendants

        def checks_answered() -> bool:
            text = httpx.get(f"{base(limits)}/metrics", timeout=3).text
            counts = re.findall(
                r"^creditwatch_credit_checks_total\{[^}]*\} (\S+)$", text, re.MULTILINE
            )
            return sum(float(c) for c in counts) > 0

        wait("credit checks on limits /metrics", checks_answered)

        def portfolio_exposure() -> bool:
            body = httpx.get(
                f"{base(limits)}/v1/portfolio",
                headers=headers,
                params={"sort": "-exposure"},
                timeout=5,
            ).json()
            return float(body["totals"]["exposure"] or 0) > 0 and any(
                float(i["exposure"]) > 0 for i in body["items"]
            )

        wait("exposure in the portfolio", portfolio_exposure)

        rules: set[str] = set()

        def alert_rules() -> bool:
            cursor = None
            while True:
                params = {"limit": 500, **({"cursor": cursor} if cursor else {})}
                body = httpx.get(
                    f"{base(alerts)}/v1/alerts", headers=headers, params=params, timeout=5
                ).json()
                rules.update(a["rule"] for a in body["items"])
                cursor = body["next_cursor"]
                if not cursor:
                    return len(rules) >= 3

        wait("alerts of three rules", alert_rules)
        elapsed = time.monotonic() - started
        descendants |= _children(proc.pid)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)  # Ctrl-C
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            raise
        reader.join(5)
    assert code == 0, "".join(lines)[-3000:]
    assert "creditwatch dev stopped" in "".join(lines)
    # Nothing is left behind: no service, no broker.
    time.sleep(0.5)
    leftovers = {pid: _cmdline(pid) for pid in descendants if _alive(pid)}
    assert leftovers == {}, leftovers
    with socket.socket() as probe:  # and the broker's port is free again
        assert probe.connect_ex(("127.0.0.1", broker)) != 0
    print(f"ready, checks, exposure and alerts of {sorted(rules)} after {elapsed:.0f}s")
