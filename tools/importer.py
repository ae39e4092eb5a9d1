"""Initial load of an existing ledger: ``creditwatch import open-items FILE.csv``.

The open items of an accounts-receivable ledger become the events the services consume:
one ``invoice.issued`` per row and, for a partly paid invoice, one ``payment.received``
allocating the paid part to it; an optional customers file becomes ``customer.registered``
events. Every row is validated first, by building its CloudEvent and running it through
``shared.events.decode`` and ``parse`` — exactly what the consumers do — so a file either
goes out whole or not at all ("nothing half-imported"). Event ids are stable, so importing
the same file twice is harmless: the consumers drop ids they have already stored.

CSV format (UTF-8, comma-separated, a header row naming the columns in any order):

open items: ``customer_id,invoice_id,amount,currency,issue_date,due_date[,order_id]
[,open_amount]``
customers:  ``customer_id,name,currency[,country][,industry][,payment_terms_days]
[,parent_id]``
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from pydantic import BaseModel, ValidationError

from shared.events import (
    CustomerRegistered,
    DeadLetter,
    EventData,
    InvoiceIssued,
    PaymentReceived,
    decode,
    parse,
)
from shared.money import MAX_MINOR_UNITS, AmountError, is_currency, parse_amount, parse_decimal
from shared.policy import Policy
from shared.settings import Settings
from tools.simulate import cloudevent

DEFAULT_SOURCE = "/import/ledger"

ITEM_REQUIRED: tuple[str, ...] = (
    "customer_id",
    "invoice_id",
    "amount",
    "currency",
    "issue_date",
    "due_date",
)
ITEM_OPTIONAL: tuple[str, ...] = ("order_id", "open_amount")
CUSTOMER_REQUIRED: tuple[str, ...] = ("customer_id", "name", "currency")
CUSTOMER_OPTIONAL: tuple[str, ...] = ("country", "industry", "payment_terms_days", "parent_id")

# Which CSV column a fault in each event's envelope or data comes from.
_INVOICE_COLUMNS: Mapping[str, str] = {"id": "invoice_id", "subject": "customer_id"}
_PAYMENT_COLUMNS: Mapping[str, str] = {
    "id": "invoice_id",
    "subject": "customer_id",
    "payment_id": "invoice_id",
    "amount": "open_amount",
    "allocations": "open_amount",
    "received_date": "issue_date",
}
_CUSTOMER_COLUMNS: Mapping[str, str] = {"id": "customer_id", "subject": "customer_id"}


class ImportFileError(Exception):
    """The file as a whole cannot be read (not UTF-8, no header, missing columns, empty)."""


class RowError(NamedTuple):
    """One fault of one data row: ``row N: <column>: <message>`` (N counts data rows from 1,
    the header excluded)."""

    row: int
    column: str
    message: str
    file: str = "open items"

    def __str__(self) -> str:
        prefix = "" if self.file == "open items" else f"{self.file} "
        return f"{prefix}row {self.row}: {self.column}: {self.message}"


@dataclass(frozen=True, slots=True)
class Message:
    """One Kafka record to publish: topic, key (the customer id) and the CloudEvent."""

    topic: str
    key: bytes
    value: bytes

    @property
    def event(self) -> dict[str, Any]:
        event: dict[str, Any] = json.loads(self.value)
        return event


@dataclass
class Plan:
    """What an import would publish, or why it cannot."""

    rows: int = 0
    customer_rows: int = 0
    messages: list[Message] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)
    customers: set[str] = field(default_factory=set)
    registered: set[str] = field(default_factory=set)
    # currency → [invoiced, still open]
    totals: dict[str, list[Decimal]] = field(default_factory=dict)
    events: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.errors

    def unregistered(self) -> set[str]:
        """Customers of the open items that the customers file (if any) does not register."""
        return self.customers - self.registered


class Publisher(Protocol):
    async def publish(self, messages: Sequence[Message]) -> None: ...


class KafkaPublisher:
    """Publishes to the configured Kafka cluster: acks=all, in order per customer key."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def publish(self, messages: Sequence[Message]) -> None:
        from shared.producing import Record, publish

        await publish(self.settings, [Record(m.topic, m.key, m.value) for m in messages])


# ---- reading the files ------------------------------------------------------------------------


def read_rows(
    path: Path, required: Sequence[str], optional: Sequence[str], what: str = "open items"
) -> list[tuple[int, dict[str, str], int]]:
    """The data rows of a CSV file: (row number, {column: stripped value}, how many values
    the row has beyond the header's columns).

    Raises ImportFileError for a file that cannot be taken as a whole: unreadable, not
    UTF-8, no header, a header lacking a required column or naming an unknown one, or no
    data rows. Blank lines are skipped and not counted.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ImportFileError(f"{what} file {path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (Excel's "CSV UTF-8") is fine
    except UnicodeDecodeError as exc:
        raise ImportFileError(
            f"{what} file {path}: not UTF-8 (invalid byte at offset {exc.start}); "
            "save it as UTF-8 and try again"
        ) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next((r for r in reader if any(c.strip() for c in r)), None)
        if header is None:
            raise ImportFileError(f"{what} file {path}: empty (no header row)")
        columns = [c.strip() for c in header]
        _check_header(path, what, columns, required, optional)
        rows: list[tuple[int, dict[str, str], int]] = []
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue
            values = {col: cell.strip() for col, cell in zip(columns, cells, strict=False)}
            extra = sum(1 for c in cells[len(columns) :] if c.strip())
            rows.append((len(rows) + 1, {k: v for k, v in values.items() if v}, extra))
    except csv.Error as exc:
        raise ImportFileError(
            f"{what} file {path}: not valid CSV at line {reader.line_num}: {exc}"
        ) from None
    if not rows:
        raise ImportFileError(f"{what} file {path}: no data rows after the header")
    return rows


def _check_header(
    path: Path, what: str, columns: list[str], required: Sequence[str], optional: Sequence[str]
) -> None:
    expected = f"expected columns: {','.join(required)}" + "".join(f"[,{c}]" for c in optional)
    duplicated = sorted(c for c, n in Counter(columns).items() if n > 1)
    if duplicated:
        raise ImportFileError(
            f"{what} file {path}: column(s) named twice: {', '.join(duplicated)}; {expected}"
        )
    missing = [c for c in required if c not in columns]
    unknown = [c for c in columns if c not in required and c not in optional]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing column(s): {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown column(s): {', '.join(repr(c) for c in unknown)}")
        hint = ""
        if len(columns) == 1 and (";" in columns[0] or "\t" in columns[0]):
            hint = " (the file must be comma-separated)"
        raise ImportFileError(f"{what} file {path}: {'; '.join(parts)}{hint}; {expected}")


# ---- validation -------------------------------------------------------------------------------


def _midnight(value: object) -> datetime:
    """Business time of a dated fact: that day, 00:00 UTC (today for an unusable date; the
    row is rejected then anyway)."""
    try:
        day = date.fromisoformat(str(value))
    except ValueError:
        day = datetime.now(UTC).date()
    return datetime.combine(day, time(0, 0), tzinfo=UTC)


def _column(path: str | None, columns: Mapping[str, str]) -> str:
    """``data.allocations[0].amount`` → the CSV column it came from."""
    if not path:
        return "row"
    head = path.removeprefix("data.").split(".", 1)[0].split("[", 1)[0]
    return columns.get(head, head)


def _model_errors(
    model: type[EventData], data: Mapping[str, Any], columns: Mapping[str, str]
) -> list[tuple[str, str]]:
    """Every fault the event model finds in ``data`` (``parse`` reports only the first)."""
    currency = data.get("currency")
    context = {"currency": currency} if is_currency(currency) else None
    try:
        model.model_validate(data, context=context)
    except ValidationError as exc:
        out: list[tuple[str, str]] = []
        for error in exc.errors(include_url=False, include_input=False):
            loc = tuple(str(p) for p in error["loc"])
            named = (error.get("ctx") or {}).get("field")
            if isinstance(named, str):
                loc += (named,)
            message = "required field is missing" if error["type"] == "missing" else error["msg"]
            out.append((_column(".".join(loc), columns), message))
        return out
    return []


def check_event(
    event: dict[str, Any], topic: str, topic_of_type: Mapping[str, str], columns: Mapping[str, str]
) -> tuple[BaseModel | None, list[tuple[str, str]]]:
    """Validate one CloudEvent exactly as a consumer would: (its data model, faults)."""
    raw = json.dumps(event, ensure_ascii=False).encode("utf-8")
    try:
        model = parse(decode(raw), topic=topic, topic_of_type=topic_of_type)
    except DeadLetter as dl:
        first = (
            _column(dl.field, columns),
            dl.error.removeprefix(f"{dl.field}: ") if dl.field else dl.error,
        )
        found: list[tuple[str, str]] = []
        data_model = {m.TYPE: m for m in (InvoiceIssued, PaymentReceived, CustomerRegistered)}.get(
            event["type"]
        )
        if data_model is not None:
            found = _model_errors(data_model, event["data"], columns)
        if first[0] not in {c for c, _ in found}:
            found.insert(0, first)
        seen: set[str] = set()
        unique = []
        for column, message in found:
            if column not in seen:
                seen.add(column)
                unique.append((column, message))
        return None, unique
    return model, []


def _open_amount(value: str, currency: str | None) -> Decimal:
    if is_currency(currency):
        return parse_amount(value, currency, field="open_amount", allow_zero=True)
    return parse_decimal(value, field="open_amount", places=MAX_MINOR_UNITS, allow_zero=True)


def _int_or_text(value: str) -> int | str:
    """A whole number as an int (the model wants a JSON integer); anything else as given,
    for the model to reject."""
    return int(value) if value.isascii() and value.isdigit() else value


def plan_import(
    items_path: Path,
    *,
    settings: Settings,
    customers_path: Path | None = None,
    source: str = DEFAULT_SOURCE,
    policy: Policy | None = None,
) -> Plan:
    """Read and validate every row; the events to publish, or every fault found.

    With ``policy``, an invoice in another currency than its customer's credit currency
    (known from the customers file) must be convertible at the policy's rates, or the
    consumers would dead-letter it (``no_fx_rate``).
    Raises ImportFileError for a file that cannot be read as a whole.
    """
    if not source.strip():
        raise ImportFileError("--source must not be empty")
    topic_of_type = settings.topic_of_type()
    plan = Plan()
    customer_messages: list[Message] = []
    credit_currency: dict[str, str] = {}
    if customers_path is not None:
        customer_rows = read_rows(customers_path, CUSTOMER_REQUIRED, CUSTOMER_OPTIONAL, "customers")
        plan.customer_rows = len(customer_rows)
        first_row: dict[str, int] = {}
        for n, row, extra in customer_rows:
            errors = _row_shape(n, extra, "customers")
            cid = row.get("customer_id", "")
            if cid and cid in first_row:
                errors.append(
                    RowError(n, "customer_id", f"duplicate of row {first_row[cid]}", "customers")
                )
            elif cid:
                first_row[cid] = n
            data: dict[str, Any] = dict(row)
            if "payment_terms_days" in data:
                data["payment_terms_days"] = _int_or_text(data["payment_terms_days"])
            event = cloudevent(
                "customer.registered",
                cid or "-",
                data,
                id=f"import-customer-{cid}",
                at=datetime.now(UTC),
                source=source,
            )
            # Registration time is the moment of the import; the id stays stable.
            model, faults = check_event(
                event, settings.topic_customers, topic_of_type, _CUSTOMER_COLUMNS
            )
            errors += [RowError(n, c, m, "customers") for c, m in faults]
            if errors:
                plan.errors += errors
                continue
            assert isinstance(model, CustomerRegistered)
            credit_currency[model.customer_id] = model.currency
            plan.registered.add(model.customer_id)
            customer_messages.append(_message(settings.topic_customers, event))
            plan.events[event["type"]] += 1

    items = read_rows(items_path, ITEM_REQUIRED, ITEM_OPTIONAL)
    plan.rows = len(items)
    invoice_row: dict[str, int] = {}
    item_messages: list[Message] = []
    payment_messages: list[Message] = []
    for n, row, extra in items:
        errors = _row_shape(n, extra)
        cid = row.get("customer_id", "")
        inv = row.get("invoice_id", "")
        if inv and inv in invoice_row:
            errors.append(RowError(n, "invoice_id", f"duplicate of row {invoice_row[inv]}"))
        elif inv:
            invoice_row[inv] = n
        data = {k: v for k, v in row.items() if k != "open_amount"}
        at = _midnight(row.get("issue_date"))
        invoice = cloudevent(
            "invoice.issued", cid or "-", data, id=f"import-invoice-{inv}", at=at, source=source
        )
        model, faults = check_event(
            invoice, settings.topic_invoices, topic_of_type, _INVOICE_COLUMNS
        )
        errors += [RowError(n, c, m) for c, m in faults]
        open_amount: Decimal | None = None
        if "open_amount" in row:
            try:
                open_amount = _open_amount(row["open_amount"], row.get("currency"))
            except AmountError as exc:
                errors.append(RowError(n, "open_amount", exc.detail))
        payment: dict[str, Any] | None = None
        if isinstance(model, InvoiceIssued):
            fx_fault = _fx_fault(model, credit_currency.get(model.customer_id), policy)
            if fx_fault:
                errors.append(RowError(n, "currency", fx_fault))
            if open_amount is not None and open_amount > model.amount:
                errors.append(
                    RowError(
                        n,
                        "open_amount",
                        f"{open_amount} is more than the invoice amount {model.amount}",
                    )
                )
            elif open_amount is not None and open_amount < model.amount:
                paid = format(model.amount - open_amount, "f")
                payment = cloudevent(
                    "payment.received",
                    model.customer_id,
                    {
                        "payment_id": f"import-{model.invoice_id}",
                        "customer_id": model.customer_id,
                        "amount": paid,
                        "currency": model.currency,
                        "received_date": model.issue_date.isoformat(),
                        "allocations": [{"invoice_id": model.invoice_id, "amount": paid}],
                    },
                    id=f"import-payment-{model.invoice_id}",
                    at=at,
                    source=source,
                )
                _, pay_faults = check_event(
                    payment, settings.topic_payments, topic_of_type, _PAYMENT_COLUMNS
                )
                errors += [RowError(n, c, m) for c, m in pay_faults]
        if errors:
            plan.errors += errors
            continue
        assert isinstance(model, InvoiceIssued)
        plan.customers.add(model.customer_id)
        invoiced_open = plan.totals.setdefault(model.currency, [Decimal(0), Decimal(0)])
        invoiced_open[0] += model.amount
        invoiced_open[1] += model.amount if open_amount is None else open_amount
        item_messages.append(_message(settings.topic_invoices, invoice))
        plan.events[invoice["type"]] += 1
        if payment is not None:
            payment_messages.append(_message(settings.topic_payments, payment))
            plan.events[payment["type"]] += 1
    if not plan.errors:
        # Master data first, then the invoices, then the payments allocated to them.
        plan.messages = customer_messages + item_messages + payment_messages
    return plan


def _row_shape(n: int, extra: int, what: str = "open items") -> list[RowError]:
    if extra:
        return [
            RowError(
                n,
                "row",
                f"{extra} value(s) beyond the header's columns (a comma inside an unquoted value?)",
                what,
            )
        ]
    return []


def _fx_fault(
    invoice: InvoiceIssued, customer_currency: str | None, policy: Policy | None
) -> str | None:
    if policy is None or customer_currency is None or customer_currency == invoice.currency:
        return None
    if policy.convert(Decimal(1), invoice.currency, customer_currency) is None:
        return (
            f"no FX rate from {invoice.currency} to {customer_currency} (the customer's "
            f"credit currency) in policy {policy.version}"
        )
    return None


def _message(topic: str, event: dict[str, Any]) -> Message:
    return Message(
        topic,
        str(event["subject"]).encode("utf-8"),
        json.dumps(event, ensure_ascii=False).encode("utf-8"),
    )


# ---- the whole import -------------------------------------------------------------------------


async def run_import(
    items_path: Path,
    *,
    settings: Settings,
    publisher: Publisher | None,
    customers_path: Path | None = None,
    source: str = DEFAULT_SOURCE,
    policy: Policy | None = None,
    dry_run: bool = False,
) -> Plan:
    """Validate everything, then publish everything — or nothing when any row is at fault
    (or with ``dry_run``). Raises ImportFileError for a file that cannot be read at all."""
    plan = plan_import(
        items_path, settings=settings, customers_path=customers_path, source=source, policy=policy
    )
    if plan.ok and not dry_run and plan.messages:
        await (publisher or KafkaPublisher(settings)).publish(plan.messages)
    return plan


def summary(plan: Plan) -> list[str]:
    """Human-readable lines: rows, events, customers, totals per currency."""
    lines = [
        f"rows: {plan.rows} open items"
        + (f", {plan.customer_rows} customers" if plan.customer_rows else "")
    ]
    lines.append("events: " + ", ".join(f"{n} {t}" for t, n in sorted(plan.events.items())))
    customers = f"customers: {len(plan.customers)}"
    if plan.registered:
        customers += f" ({len(plan.registered)} registered by this import"
        missing = len(plan.unregistered())
        customers += f"; {missing} must already be registered on crm.customers)" if missing else ")"
    lines.append(customers)
    for ccy, (invoiced, still_open) in sorted(plan.totals.items()):
        lines.append(
            f"  {ccy}: invoiced {invoiced:,.{_places(invoiced)}f}, "
            f"open {still_open:,.{_places(still_open)}f}"
        )
    return lines


def _places(value: Decimal) -> int:
    exponent = value.as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0


__all__ = [
    "CUSTOMER_OPTIONAL",
    "CUSTOMER_REQUIRED",
    "DEFAULT_SOURCE",
    "ITEM_OPTIONAL",
    "ITEM_REQUIRED",
    "ImportFileError",
    "KafkaPublisher",
    "Message",
    "Plan",
    "Publisher",
    "RowError",
    "check_event",
    "plan_import",
    "read_rows",
    "run_import",
    "summary",
]
