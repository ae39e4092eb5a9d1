"""Shared bits of the benchmarks: servers, medians, result files.

Every figure is reported as a ratio against a baseline measured in the same run on the same
machine, because absolute numbers on a shared two-core machine mean little.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Measure:
    name: str
    unit: str
    runs: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)


def ratio(candidate: Measure, baseline: Measure) -> float:
    return candidate.median / baseline.median


def save(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    payload = {
        "benchmark": name,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"python": platform.python_version(), "cpus": _cpus()},
        **payload,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=lambda o: asdict(o)))
    return path


def _cpus() -> int:
    return os.cpu_count() or 0


def tree_cpu(root: int) -> float:
    """CPU seconds (user and system) used so far by process ``root`` and its descendants,
    those still running and those already reaped (as their parents' children's time).
    For a server's own cost per request: PostgreSQL forks a process per connection and
    for autovacuum; a JVM's threads are its own process's time."""
    parents: dict[int, int] = {}
    times: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            # After the command's closing parenthesis: state, ppid, ... utime (12th),
            # stime, cutime, cstime.
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = sum(int(f) for f in fields[11:15])
    total = 0
    for pid, ticks in times.items():
        up = pid
        while up not in (0, root):
            up = parents.get(up, 0)
        if up == root:
            total += ticks
    return total / os.sysconf("SC_CLK_TCK")


def table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
