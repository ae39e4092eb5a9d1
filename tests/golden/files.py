"""The golden files: writing them, reading them, and saying how a run differs from them.

Layout, per seed: ``data/<seed>/manifest.json`` (the stream's fingerprint, its counts and
which customers carry which hard case) and one gzipped, pretty, key-sorted JSON file per
output (``events/<service>.json.gz``, ``calls.json.gz``, ``api/*.json.gz``). Every file is a
JSON object whose top-level keys are customers (a query or a call label where the file is
not about customers), so that a difference names its file, its customer and its path.

``allowed_differences.yaml`` lists the differences a reviewed change may make, each with its
reason: ``seed`` (a number or ``"*"``), ``file`` (e.g. ``events/limits.json``), ``customer``
(the top-level key) and ``path`` (e.g. ``[12].data.open_receivables``) are patterns where
``*`` is any text and ``?`` one character (brackets are themselves: ``[*].data.limit`` is
any item's limit); ``why`` is required.
"""

from __future__ import annotations

import difflib
import gzip
import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).parent
DATA = HERE / "data"
ALLOWED = HERE / "allowed_differences.yaml"
ABSENT = "<absent>"


def dumps(value: Any) -> bytes:
    return (json.dumps(value, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode()


def gz(data: bytes) -> bytes:
    """Gzip with no name and no time in the header: the same content, the same bytes."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as f:
        f.write(data)
    return buffer.getvalue()


def write(folder: Path, files: dict[str, Any], manifest: dict[str, Any]) -> int:
    """Replace the golden files of one seed; returns the bytes written."""
    if folder.exists():
        for old in sorted(folder.rglob("*"), reverse=True):
            if old.is_file():
                old.unlink()
            else:
                old.rmdir()
    total = 0
    for name, value in sorted({**files, "manifest.json": manifest}.items()):
        path = folder / (name if name == "manifest.json" else f"{name}.gz")
        path.parent.mkdir(parents=True, exist_ok=True)
        data = dumps(value) if name == "manifest.json" else gz(dumps(value))
        path.write_bytes(data)
        total += len(data)
    return total


def read(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(files, manifest) of one seed."""
    if not folder.is_dir():
        raise FileNotFoundError(f"no golden files in {folder}: run scripts/golden")
    manifest = json.loads((folder / "manifest.json").read_text())
    files = {}
    for path in sorted(folder.rglob("*.json.gz")):
        name = str(path.relative_to(folder))[: -len(".gz")]
        files[name] = json.loads(gzip.decompress(path.read_bytes()))
    return files, manifest


# ---- differences -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    seed: int
    file: str
    customer: str
    path: str
    expected: Any
    actual: Any

    def __str__(self) -> str:
        return (
            f"{self.file} {self.customer} {self.path or '(whole)'}: "
            f"expected {_short(self.expected)}, got {_short(self.actual)}"
        )


def _short(value: Any, limit: int = 160) -> str:
    text = value if value == ABSENT else json.dumps(value, sort_keys=True, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _walk(expected: Any, actual: Any, path: str, out: list[tuple[str, Any, Any]]) -> None:
    if isinstance(expected, dict) and isinstance(actual, dict):
        for key in sorted(expected.keys() | actual.keys(), key=str):
            sub = f"{path}.{key}"
            if key not in actual:
                out.append((sub, expected[key], ABSENT))
            elif key not in expected:
                out.append((sub, ABSENT, actual[key]))
            else:
                _walk(expected[key], actual[key], sub, out)
        return
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) == len(actual):
            for n, (e, a) in enumerate(zip(expected, actual, strict=True)):
                _walk(e, a, f"{path}[{n}]", out)
            return
        # Items inserted or dropped: match the rest up, so that one extra event is one
        # difference and not a shift of every event after it.
        left, right = [_canon(e) for e in expected], [_canon(a) for a in actual]
        matcher = difflib.SequenceMatcher(a=left, b=right, autojunk=False)
        for tag, i1, i2, j1, j2 in matcher.get_opcodes():
            if tag == "equal":
                continue
            for i, j in _align(left[i1:i2], right[j1:j2]):
                if i is not None and j is not None:
                    _walk(expected[i1 + i], actual[j1 + j], f"{path}[{i1 + i}]", out)
                elif i is not None:
                    out.append((f"{path}[{i1 + i}]", expected[i1 + i], ABSENT))
                elif j is not None:
                    out.append((f"{path}[+{j1 + j}]", ABSENT, actual[j1 + j]))
        return
    if expected != actual or type(expected) is not type(actual):
        out.append((path, expected, actual))


_GAP = 0.35  # the cost of an item only one side has; a changed item costs 1 − similarity


def _align(left: list[str], right: list[str]) -> list[tuple[int | None, int | None]]:
    """Pair up the items of a changed stretch (changed items with their nearest match, the
    rest inserted or dropped): one event more reads as one event more, and an event whose
    figures moved as that event, changed."""
    n, m = len(left), len(right)
    if n == m or n * m > 40_000:
        pairs: list[tuple[int | None, int | None]] = [(k, k) for k in range(min(n, m))]
        pairs += [(k, None) for k in range(m, n)] + [(None, k) for k in range(n, m)]
        return pairs
    cost = [[0.0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        cost[i][0] = i * _GAP
    for j in range(1, m + 1):
        cost[0][j] = j * _GAP
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            similar = difflib.SequenceMatcher(None, left[i - 1], right[j - 1]).ratio()
            cost[i][j] = min(
                cost[i - 1][j - 1] + 1 - similar,
                cost[i - 1][j] + _GAP,
                cost[i][j - 1] + _GAP,
            )
    out: list[tuple[int | None, int | None]] = []
    i, j = n, m
    while i or j:
        if i and j:
            similar = difflib.SequenceMatcher(None, left[i - 1], right[j - 1]).ratio()
            if abs(cost[i][j] - (cost[i - 1][j - 1] + 1 - similar)) < 1e-9:
                out.append((i - 1, j - 1))
                i, j = i - 1, j - 1
                continue
        if i and abs(cost[i][j] - (cost[i - 1][j] + _GAP)) < 1e-9:
            out.append((i - 1, None))
            i -= 1
        else:
            out.append((None, j - 1))
            j -= 1
    return out[::-1]


def differences(seed: int, expected: dict[str, Any], actual: dict[str, Any]) -> list[Difference]:
    """Every difference between two sets of golden files, by file, customer and path."""
    out: list[Difference] = []
    for name in sorted(expected.keys() | actual.keys()):
        if name not in actual or name not in expected:
            out.append(
                Difference(
                    seed, name, "*", "", expected.get(name, ABSENT), actual.get(name, ABSENT)
                )
            )
            continue
        exp, act = expected[name], actual[name]
        for customer in sorted(exp.keys() | act.keys()):
            found: list[tuple[str, Any, Any]] = []
            _walk(exp.get(customer, ABSENT), act.get(customer, ABSENT), "", found)
            out += [Difference(seed, name, customer, p.lstrip("."), e, a) for p, e, a in found]
    return out


# ---- what may differ ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Allowed:
    seed: str
    file: str
    customer: str
    path: str
    why: str

    def matches(self, d: Difference) -> bool:
        return (
            _like(str(d.seed), self.seed)
            and _like(d.file, self.file)
            and _like(d.customer, self.customer)
            and _like(d.path, self.path)
        )


def _like(text: str, pattern: str) -> bool:
    """``*`` is any text, ``?`` one character; everything else, brackets too, is itself."""
    parts = (re.escape(c) if c not in "*?" else (".*" if c == "*" else ".") for c in pattern)
    return re.fullmatch("".join(parts), text, flags=re.DOTALL) is not None


def load_allowed(path: Path = ALLOWED) -> list[Allowed]:
    """The allow-list; a malformed entry is an error naming it (never silently ignored)."""
    document = yaml.safe_load(path.read_text()) or {}
    entries = document.get("allowed") or []
    if not isinstance(entries, list):
        raise ValueError(f"{path}: 'allowed' must be a list")
    out = []
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: allowed[{n}] must be a mapping")
        missing = [k for k in ("seed", "file", "customer", "path", "why") if k not in entry]
        if missing:
            raise ValueError(f"{path}: allowed[{n}] lacks {', '.join(missing)}")
        if not str(entry["why"]).strip():
            raise ValueError(f"{path}: allowed[{n}].why must say why")
        unknown = set(entry) - {"seed", "file", "customer", "path", "why"}
        if unknown:
            raise ValueError(f"{path}: allowed[{n}] has unknown keys {sorted(unknown)}")
        out.append(
            Allowed(
                str(entry["seed"]),
                str(entry["file"]),
                str(entry["customer"]),
                str(entry["path"]),
                str(entry["why"]).strip(),
            )
        )
    return out


def split(
    found: Iterable[Difference], allowed: Sequence[Allowed]
) -> tuple[list[Difference], list[tuple[Difference, Allowed]]]:
    """(not allowed, allowed with the entry that allows each)."""
    bad: list[Difference] = []
    ok: list[tuple[Difference, Allowed]] = []
    for d in found:
        entry = next((a for a in allowed if a.matches(d)), None)
        if entry is None:
            bad.append(d)
        else:
            ok.append((d, entry))
    return bad, ok


def report(found: Sequence[Difference], *, first: int = 12) -> str:
    """A readable account: per file, per customer, the first differences and how many more."""
    if not found:
        return "no differences"
    lines: list[str] = [f"{len(found)} differences"]
    by_file: dict[str, list[Difference]] = {}
    for d in found:
        by_file.setdefault(d.file, []).append(d)
    for name, items in by_file.items():
        customers: dict[str, list[Difference]] = {}
        for d in items:
            customers.setdefault(d.customer, []).append(d)
        lines.append(f"seed {items[0].seed} · {name}: {len(items)} in {len(customers)} key(s)")
        for customer, own in list(customers.items())[:first]:
            lines.append(f"  {customer}: {len(own)}")
            for d in own[:first]:
                lines.append(
                    f"    {d.path or '(whole)'}: expected {_short(d.expected)}"
                    f"\n    {' ' * len(d.path or '(whole)')}       got {_short(d.actual)}"
                )
            if len(own) > first:
                lines.append(f"    … and {len(own) - first} more for {customer}")
        if len(customers) > first:
            lines.append(f"  … and {len(customers) - first} more keys")
    return "\n".join(lines)
