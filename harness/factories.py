"""Building CloudEvents for tests: the same JSON an upstream producer would publish."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

from shared.events import TOPIC_OF_TYPE
from shared.runtime import Record

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


def cloudevent(
    type: str,
    subject: str,
    data: dict[str, Any],
    *,
    id: str,
    time: datetime = T0,
    source: str = "/test/erp",
) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": id,
        "source": source,
        "type": type,
        "subject": subject,
        "time": time.isoformat().replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": data,
    }


def raw(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


def customer(
    cid: str,
    *,
    currency: str = "EUR",
    parent: str | None = None,
    time: datetime = T0,
    name: str | None = None,
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "customer_id": cid,
        "name": name or f"Customer {cid}",
        "country": "DE",
        "industry": "G",
        "currency": currency,
        "payment_terms_days": 30,
    }
    if parent:
        data["parent_id"] = parent
    return cloudevent(
        "customer.registered", cid, data, id=f"reg-{cid}", time=time, source="/test/crm"
    )


def invoice(
    cid: str,
    inv: str,
    amount: str,
    *,
    issued: date = date(2026, 3, 1),
    due_days: int = 30,
    currency: str = "EUR",
    order_id: str | None = None,
    time: datetime | None = None,
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "invoice_id": inv,
        "customer_id": cid,
        "amount": amount,
        "currency": currency,
        "issue_date": issued.isoformat(),
        "due_date": (issued + timedelta(days=due_days)).isoformat(),
    }
    if order_id:
        data["order_id"] = order_id
    when = time or datetime.combine(issued, datetime.min.time(), UTC) + timedelta(hours=9)
    return cloudevent("invoice.issued", cid, data, id=f"inv-{inv}", time=when)


def payment(
    cid: str,
    pay: str,
    amount: str,
    *,
    received: date = date(2026, 3, 15),
    currency: str = "EUR",
    allocations: list[tuple[str, str]] | None = None,
    time: datetime | None = None,
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "payment_id": pay,
        "customer_id": cid,
        "amount": amount,
        "currency": currency,
        "received_date": received.isoformat(),
    }
    if allocations:
        data["allocations"] = [{"invoice_id": i, "amount": a} for i, a in allocations]
    when = time or datetime.combine(received, datetime.min.time(), UTC) + timedelta(hours=10)
    return cloudevent("payment.received", cid, data, id=f"pay-{pay}", time=when)


def records(
    events: Sequence[dict[str, Any] | bytes],
    topic: str | None = None,
    partition: int = 0,
    start: int = 0,
) -> list[Record]:
    """Records at consecutive offsets; each on its type's own topic unless one is given.

    Offsets count per topic, as Kafka numbers them.
    """
    out = []
    next_offset: dict[str, int] = {}
    for e in events:
        value = e if isinstance(e, bytes) else raw(e)
        key = None if isinstance(e, bytes) else str(e["subject"]).encode()
        where = topic or (
            "ar.invoices"
            if isinstance(e, bytes)
            else TOPIC_OF_TYPE.get(str(e["type"]), "ar.invoices")
        )
        offset = next_offset.get(where, start)
        next_offset[where] = offset + 1
        out.append(Record(where, partition, offset, key, value))
    return out
