"""Services as real OS processes (``creditwatch serve``), for tests that kill them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from harness.servers import free_port

CHECK = "tok-order-entry"
READ = "tok-reader"
WRITE = "tok-analyst"
APPROVE = "tok-approver"
ALL = "tok-admin"
TOKENS = {
    CHECK: {"principal": "order-entry", "scopes": ["credit:check"]},
    READ: {"principal": "reader", "scopes": ["credit:read"]},
    WRITE: {"principal": "analyst", "scopes": ["credit:read", "credit:write"]},
    APPROVE: {"principal": "approver", "scopes": ["credit:read", "credit:approve"]},
    ALL: {
        "principal": "admin",
        "scopes": ["credit:check", "credit:read", "credit:write", "credit:approve", "alerts:write"],
    },
}


def service_env(*, database_url: str, bootstrap: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDITWATCH_")}
    env.update(
        {
            "CREDITWATCH_DATABASE_URL": database_url,
            "CREDITWATCH_KAFKA_BOOTSTRAP": bootstrap,
            "CREDITWATCH_API_TOKENS": json.dumps(TOKENS),
            "CREDITWATCH_CONSUMER_SESSION_TIMEOUT_MS": "6000",
            "CREDITWATCH_CONSUMER_HEARTBEAT_INTERVAL_MS": "500",
            "CREDITWATCH_SCHEDULER_INTERVAL_S": "0.5",
            "CREDITWATCH_LOG_LEVEL": "INFO",
        }
    )
    env.update(extra)
    return env


class ServiceProcess:
    """``creditwatch serve <service>`` in its own process group."""

    def __init__(
        self, service: str, env: dict[str, str], log_dir: Path, *args: str, port: int | None = None
    ) -> None:
        self.service = service
        self.env = env
        self.args = args
        self.port = port or free_port()
        self.log_path = log_dir / f"{service}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServiceProcess:
        self.starts += 1
        log = self.log_path.open("ab")
        log.write(f"\n---- start #{self.starts} ----\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tools.cli",
                "serve",
                self.service,
                "--port",
                str(self.port),
                *self.args,
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.service} exited with {self.proc.returncode}:\n{self.tail()}"
                )
            try:
                last = httpx.get(f"{self.url}/readyz", timeout=2)
                if last.status_code == 200:
                    return
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.1)
        raise TimeoutError(f"{self.service} not ready after {timeout}s ({last}):\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL: no cleanup, no commit, no leaving the group — a crash."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
