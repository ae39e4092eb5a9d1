"""A reproducible AR event stream for the ingestion tests: valid events for many customers,
exact duplicates, and malformed records of every kind, each labelled with what it is."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

from harness import factories as f

MALFORMED_KINDS = (
    "invalid_json",
    "not_utf8",
    "missing_field",
    "invalid_amount",
    "unknown_currency",
    "due_before_issue",
    "oversize",
    "no_fx_rate",
    "invalid_date",
    "invalid_field",
)


@dataclass(frozen=True)
class Item:
    topic: str
    key: bytes
    value: bytes
    kind: str  # "valid", "duplicate" or the dead-letter reason expected
    event: dict[str, Any] | None = None


def _amount(rng: random.Random, low: int = 10, high: int = 20000) -> str:
    return f"{rng.randint(low, high)}.{rng.randint(0, 99):02d}"


def ledger(
    customers: int = 500,
    total: int = 20_000,
    *,
    duplicate_share: float = 0.05,
    malformed_share: float = 0.01,
    seed: int = 1,
) -> tuple[list[Item], list[Item]]:
    """(registrations, the rest): master data first, as upstream systems publish it."""
    rng = random.Random(seed)
    ids = [f"C{n:04d}" for n in range(customers)]
    registrations = [
        Item("crm.customers", c.encode(), f.raw(e), "valid", e)
        for c in ids
        for e in [f.customer(c, currency="USD" if c.endswith("7") else "EUR")]
    ]
    n_dup = int(total * duplicate_share)
    n_bad = int(total * malformed_share)
    n_valid = total - n_dup - n_bad - customers
    invoices: dict[str, list[str]] = {c: [] for c in ids}
    payments: dict[str, list[str]] = {c: [] for c in ids}
    valid: list[Item] = []
    start = date(2026, 1, 5)
    for i in range(n_valid):
        c = rng.choice(ids)
        day = start + timedelta(days=i * 300 // n_valid)
        roll = rng.random()
        if roll < 0.55 or not invoices[c]:
            inv = f"I{i:06d}"
            ccy = "USD" if rng.random() < 0.1 else ("USD" if c.endswith("7") else "EUR")
            e = f.invoice(
                c, inv, _amount(rng), issued=day, due_days=rng.choice([14, 30, 60]), currency=ccy
            )
            invoices[c].append(inv)
            topic = "ar.invoices"
        elif roll < 0.80:
            pay = f"P{i:06d}"
            alloc = None
            if rng.random() < 0.5:
                target = rng.choice(invoices[c])
                amount = _amount(rng, 10, 5000)
                alloc = [(target, amount)]
                e = f.payment(
                    c,
                    pay,
                    amount,
                    received=day,
                    allocations=alloc,
                    currency="USD" if c.endswith("7") else "EUR",
                )
            else:
                e = f.payment(
                    c,
                    pay,
                    _amount(rng, 10, 8000),
                    received=day,
                    currency="USD" if c.endswith("7") else "EUR",
                )
            payments[c].append(pay)
            topic = "ar.payments"
        elif roll < 0.86:
            ccy = "USD" if c.endswith("7") else "EUR"
            data = {
                "credit_note_id": f"N{i:06d}",
                "customer_id": c,
                "amount": _amount(rng, 5, 500),
                "currency": ccy,
                "issue_date": day.isoformat(),
            }
            if rng.random() < 0.5:
                data["invoice_id"] = rng.choice(invoices[c])
            e = f.cloudevent(
                "credit_note.issued",
                c,
                data,
                id=f"cn-{i}",
                time=f.T0.replace(year=day.year, month=day.month, day=day.day),
            )
            topic = "ar.invoices"
        elif roll < 0.89:
            e = f.cloudevent(
                "invoice.cancelled",
                c,
                {
                    "invoice_id": rng.choice(invoices[c]),
                    "customer_id": c,
                    "reason": "wrong address",
                },
                id=f"cancel-{i}",
                time=f.T0.replace(year=day.year, month=day.month, day=day.day),
            )
            topic = "ar.invoices"
        elif roll < 0.91 and payments[c]:
            e = f.cloudevent(
                "payment.reversed",
                c,
                {"payment_id": rng.choice(payments[c]), "customer_id": c, "reason": "chargeback"},
                id=f"rev-{i}",
                time=f.T0.replace(year=day.year, month=day.month, day=day.day),
            )
            topic = "ar.payments"
        else:
            inv = rng.choice(invoices[c])
            due = day - timedelta(days=rng.randint(1, 120))
            ccy = "USD" if c.endswith("7") else "EUR"
            e = f.cloudevent(
                "invoice.overdue",
                c,
                {
                    "invoice_id": inv,
                    "customer_id": c,
                    "amount_overdue": _amount(rng, 10, 3000),
                    "currency": ccy,
                    "due_date": due.isoformat(),
                    "days_overdue": (day - due).days,
                    "as_of": day.isoformat(),
                },
                id=f"dun-{i}",
                time=f.T0.replace(year=day.year, month=day.month, day=day.day),
            )
            topic = "ar.overdue"
        valid.append(Item(topic, c.encode(), f.raw(e), "valid", e))

    # Order by a position key: duplicates land after their original, malformed anywhere.
    placed: list[tuple[float, Item]] = [(float(i), item) for i, item in enumerate(valid)]
    for _ in range(n_dup):
        i = rng.randrange(len(valid))
        original = valid[i]
        # An exact duplicate, later in the same topic and key (a producer retry, a replay).
        placed.append(
            (
                i + rng.uniform(0.5, len(valid) - i),
                Item(original.topic, original.key, original.value, "duplicate", original.event),
            )
        )
    for k in range(n_bad):
        kind = MALFORMED_KINDS[k % len(MALFORMED_KINDS)]
        placed.append((rng.uniform(0, len(valid)), malformed(kind, rng.choice(ids), k, rng)))
    placed.sort(key=lambda pair: pair[0])
    stream = [item for _, item in placed]
    return registrations, stream


def malformed(kind: str, c: str, k: int, rng: random.Random) -> Item:
    good = f.invoice(c, f"BAD{k:05d}", "100.00")
    data = good["data"]
    if kind == "invalid_json":
        value = b'{"specversion": "1.0", "id": "x' + str(k).encode()
    elif kind == "not_utf8":
        value = f.raw(good).replace(b"Customer", b"\xff\xfe") + b"\xc3\x28"
        value = b"\xff" + value
    elif kind == "missing_field":
        del data["amount"]
        value = f.raw(good)
    elif kind == "invalid_amount":
        data["amount"] = rng.choice(
            ["-10.00", "0", "12.345", "abc", "1000000000000000.01", "1e5", ""]
        )
        value = f.raw(good)
    elif kind == "unknown_currency":
        data["currency"] = rng.choice(["XYZ", "eur", "EURO"])
        value = f.raw(good)
    elif kind == "due_before_issue":
        data["due_date"] = "2026-02-01"
        value = f.raw(good)
    elif kind == "oversize":
        data["order_id"] = "o" * 1001
        value = f.raw(good)
    elif kind == "no_fx_rate":
        data["currency"] = "BRL"
        value = f.raw(good)
    elif kind == "invalid_date":
        data["issue_date"] = "2026-02-30"
        value = f.raw(good)
    elif kind == "invalid_field":
        good["subject"] = "SOMEONE-ELSE"
        value = f.raw(good)
    else:
        raise ValueError(kind)
    return Item("ar.invoices", c.encode(), value, kind)


def expected_reasons(stream: list[Item]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in stream:
        if item.kind not in ("valid", "duplicate"):
            out[item.kind] = out.get(item.kind, 0) + 1
    return out


def decimal_of(value: str) -> Decimal:
    return Decimal(value)


def as_json(item: Item) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(item.value)
    return value
