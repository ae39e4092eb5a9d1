"""The event contract: decoding records, parsing each event type, dead letters."""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from shared import events
from shared.events import (
    MAX_RECORD_BYTES,
    MAX_STRING_CHARS,
    MODEL_OF_TYPE,
    TOPIC_OF_TYPE,
    AlertRaised,
    AlertUpdated,
    AssessmentCompleted,
    CreditReportReceived,
    CustomerRegistered,
    CustomerUpdated,
    DeadLetter,
    Envelope,
    EventDeadLettered,
    ExposureUpdated,
    FinancialStatementPublished,
    InvoiceIssued,
    LimitChanged,
    PaymentReceived,
    dead_letter_record,
    decode,
    new_event,
    parse,
)
from shared.money import CURRENCY_MINOR_UNITS, MAX_AMOUNT

D = Decimal
UTC = dt.UTC
T0 = dt.datetime(2026, 3, 1, 9, 30, tzinfo=UTC)

# -- builders -------------------------------------------------------------------------------


_NUMBER_MARK = "\u2063number:"


def _as_json_number(value: object) -> str:
    if isinstance(value, Decimal):
        return f"{_NUMBER_MARK}{value}"
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    raise TypeError(type(value).__name__)


def record(event_type: str = "invoice.issued", data: Any = None, **envelope: Any) -> bytes:
    """A record value as a producer would send it; envelope=... overrides, None drops.

    A Decimal anywhere becomes a JSON number (exactly as written), never a float.
    """
    document: dict[str, Any] = {
        "specversion": "1.0",
        "id": "inv-2026-000123-issued",
        "source": "/erp/billing",
        "type": event_type,
        "subject": "C-1001",
        "time": "2026-03-01T09:30:00Z",
        "datacontenttype": "application/json",
        "data": invoice() if data is None else data,
    }
    document.update(envelope)
    document = {key: value for key, value in document.items() if value is not None}
    text = json.dumps(document, default=_as_json_number)
    return re.sub(r'"\\u2063number:([^"]*)"', r"\1", text).encode()


def without(data: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {key: value for key, value in data.items() if key not in keys}


def invoice(**overrides: Any) -> dict[str, Any]:
    return {
        "invoice_id": "INV-2026-000123",
        "customer_id": "C-1001",
        "amount": "1250.00",
        "currency": "EUR",
        "issue_date": "2026-03-01",
        "due_date": "2026-03-31",
        "order_id": "SO-77812",
    } | overrides


def customer(**overrides: Any) -> dict[str, Any]:
    return {
        "customer_id": "C-1001",
        "name": "Müller Maschinenbau GmbH",
        "country": "DE",
        "industry": "C28",
        "currency": "EUR",
        "parent_id": "C-1000",
    } | overrides


def payment(**overrides: Any) -> dict[str, Any]:
    return {
        "payment_id": "PAY-9",
        "customer_id": "C-1001",
        "amount": "1500.00",
        "currency": "EUR",
        "received_date": "2026-03-05",
        "allocations": [
            {"invoice_id": "INV-1", "amount": "1000.00"},
            {"invoice_id": "INV-2", "amount": "500.00"},
        ],
    } | overrides


def statement(**overrides: Any) -> dict[str, Any]:
    return {
        "statement_id": "FS-2025",
        "customer_id": "C-1001",
        "period_end": "2025-12-31",
        "period_months": 12,
        "currency": "EUR",
        "audited": True,
        "balance_sheet": {
            "cash": "120000.00",
            "receivables": "340000.00",
            "inventory": "210000.00",
            "current_assets": "700000.00",
            "total_assets": "2100000.00",
            "current_liabilities": "520000.00",
            "total_liabilities": "1300000.00",
            "equity": "800000.00",
            "retained_earnings": "450000.00",
        },
        "income_statement": {
            "revenue": "4200000.00",
            "ebit": "310000.00",
            "interest_expense": "42000.00",
            "net_income": "190000.00",
        },
        "cash_flow": {"operating_cash_flow": "260000.00"},
    } | overrides


def credit_report(**overrides: Any) -> dict[str, Any]:
    return {
        "report_id": "CR-1",
        "customer_id": "C-1001",
        "bureau": "creditreform",
        "score": 240,
        "score_min": 100,
        "score_max": 600,
        "delinquencies_12m": 1,
        "defaults": 0,
        "legal_events": [{"type": "lien", "date": "2025-11-02"}],
        "reported_at": "2026-02-28T06:00:00Z",
    } | overrides


def dead_letter_of(raw: bytes | None, **parse_options: Any) -> DeadLetter:
    with pytest.raises(DeadLetter) as caught:
        parse(decode(raw), **parse_options)
    assert caught.value.reason in events.REASONS
    return caught.value


def parsed(raw: bytes) -> Any:
    return parse(decode(raw))


# -- decode: the envelope -------------------------------------------------------------------


def test_a_well_formed_record_decodes_into_its_envelope() -> None:
    envelope = decode(record())
    assert envelope.specversion == "1.0"
    assert envelope.id == "inv-2026-000123-issued"
    assert envelope.source == "/erp/billing"
    assert envelope.type == "invoice.issued"
    assert envelope.subject == "C-1001"
    assert envelope.time == T0
    assert envelope.datacontenttype == "application/json"
    assert envelope.data["amount"] == "1250.00"
    assert envelope.key == b"C-1001"


def test_the_envelope_is_immutable() -> None:
    envelope = decode(record())
    with pytest.raises(ValidationError):
        envelope.subject = "C-2"  # type: ignore[misc]


def test_extension_attributes_and_a_missing_content_type_are_fine() -> None:
    raw = record(datacontenttype=None, traceparent="00-abc-def-01", partitionkey="C-1001")
    envelope = decode(raw)
    assert envelope.datacontenttype == "application/json"


@pytest.mark.parametrize(
    "time",
    [
        "2026-03-01T10:30:00+01:00",
        "2026-03-01T09:30:00.000Z",
        "2026-03-01T09:30:00.000000000Z",
        "2026-03-01t09:30:00z",
        "2026-03-01 09:30:00Z",
    ],
)
def test_any_rfc_3339_time_is_accepted(time: str) -> None:
    assert decode(record(time=time)).time == T0


def test_to_json_writes_utf8_json_with_z_times_and_decimal_strings() -> None:
    # Given an envelope whose data holds an exact JSON number
    raw = record(data=invoice(amount=D("1250.10"), name="Ærø ApS"))
    assert b'"amount": 1250.10' in raw
    envelope = decode(raw)
    # When it is written back
    written = envelope.to_json()
    # Then the number is a string, the time ends in Z, and the text is UTF-8, not escaped
    document = json.loads(written)
    assert document["data"]["amount"] == "1250.10"
    assert document["time"] == "2026-03-01T09:30:00Z"
    assert "Ærø".encode() in written
    assert decode(written) == decode(record(data=invoice(amount="1250.10", name="Ærø ApS")))


@pytest.mark.parametrize("raw", [None, b""])
def test_an_empty_record_is_invalid_json(raw: bytes | None) -> None:
    assert dead_letter_of(raw).reason == "invalid_json"


def test_a_record_over_one_mebibyte_is_oversize() -> None:
    raw = record(data=invoice(padding=["x" * 500] * 4200))  # ~2 MiB
    assert len(raw) > 2 * 1024 * 1024 - 100_000
    error = dead_letter_of(raw)
    assert error.reason == "oversize"
    assert str(MAX_RECORD_BYTES) in error.error


def test_a_record_of_exactly_one_mebibyte_is_accepted() -> None:
    base = record()
    raw = base[:-1] + b" " * (MAX_RECORD_BYTES - len(base)) + b"}"
    assert len(raw) == MAX_RECORD_BYTES
    assert isinstance(parsed(raw), InvoiceIssued)


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfe{}",
        record() + b"\x80",
        record(data=invoice(order_id="Caf\u00e9")).replace(b"\\u00e9", b"\xe9"),  # latin-1
        b'{"a": "\xed\xa0\x80"}',  # an encoded surrogate is not UTF-8
    ],
)
def test_bytes_that_are_not_utf8_are_rejected(raw: bytes) -> None:
    assert dead_letter_of(raw).reason == "not_utf8"


@pytest.mark.parametrize(
    "raw",
    [
        b"{",
        b"not json",
        b"[]",
        b'"a string"',
        b"42",
        b"null",
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": -Infinity}',
        b"\xef\xbb\xbf{}",  # a byte-order mark
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a": ' + b"9" * 5000 + b"}",
        b'{"a": "\\ud800"}',  # a lone surrogate escape
        b'{"a": "x"} trailing',
    ],
)
def test_a_value_that_is_not_a_json_object_is_invalid_json(raw: bytes) -> None:
    assert dead_letter_of(raw).reason == "invalid_json"


@pytest.mark.parametrize(
    ("data", "path"),
    [
        (invoice(order_id="SO-\x00-1"), "data.order_id"),
        (invoice(customer_id="C-\x00"), "data.customer_id"),
    ],
)
def test_text_holding_nul_is_dead_lettered_naming_the_field(data: Any, path: str) -> None:
    raw = record(data=data)
    assert b"\\u0000" in raw
    dl = dead_letter_of(raw)
    assert (dl.reason, dl.field) == ("invalid_field", path)


def test_an_escaped_surrogate_pair_is_ordinary_text() -> None:
    raw = record(data=invoice(order_id="\U0001f600"))
    assert b"\\ud83d\\ude00" in raw
    assert parsed(raw).order_id == "\U0001f600"


def test_a_string_of_a_thousand_characters_is_accepted() -> None:
    assert parsed(record(data=invoice(order_id="x" * MAX_STRING_CHARS))) is not None


@pytest.mark.parametrize(
    ("data", "path"),
    [
        (invoice(order_id="x" * 1001), "data.order_id"),
        (invoice(order_id='"' * 1001), "data.order_id"),  # escapes make it 2002 raw chars
        (invoice(order_id='a"' * 501), "data.order_id"),
        (invoice(order_id="é" * 1001), "data.order_id"),
        (invoice(notes=[{"text": "x" * 5000}]), "data.notes[0].text"),
        (invoice(**{"k" * 1001: 1}), "data"),
    ],
)
def test_a_string_over_a_thousand_characters_anywhere_is_oversize(
    data: dict[str, Any], path: str
) -> None:
    error = dead_letter_of(record(data=data))
    assert error.reason == "oversize"
    assert error.field == path
    assert error.error.startswith(path)


def test_an_oversize_envelope_field_is_named() -> None:
    error = dead_letter_of(record(source="/" + "s" * 1001))
    assert (error.reason, error.field) == ("oversize", "source")


def test_an_unknown_type_is_not_an_error_yet_long_strings_still_are() -> None:
    assert parsed(record(type="invoice.archived", data={"anything": [1, 2]})) is None
    assert dead_letter_of(record(type="x", data={"a": "x" * 1001})).reason == "oversize"


@pytest.mark.parametrize("field", ["specversion", "id", "source", "type", "subject", "time"])
def test_a_missing_envelope_field_is_named(field: str) -> None:
    dropped: dict[str, Any] = {field: None}
    error = dead_letter_of(record(**dropped))
    assert error.reason == "missing_field"
    assert error.field == field
    assert error.error == f"{field}: required field is missing"


def test_missing_data_is_a_missing_field() -> None:
    raw = json.dumps({k: v for k, v in json.loads(record()).items() if k != "data"}).encode()
    assert dead_letter_of(raw).field == "data"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("specversion", "0.3"),
        ("specversion", 1.0),
        ("id", ""),
        ("id", 123),
        ("source", ""),
        ("subject", ""),
        ("subject", 1001),
        ("type", 7),
        ("type", ""),
        ("time", "2026-03-01T09:30:00"),  # naive: no offset
        ("time", "2026-03-01"),
        ("time", 1772357400),  # a Unix timestamp
        ("time", "1772357400"),
        ("time", "2026-02-30T09:30:00Z"),
        ("time", "01.03.2026 09:30"),
        ("datacontenttype", "text/plain"),
        ("data", "{}"),
        ("data", [1]),
    ],
)
def test_a_wrong_envelope_field_is_invalid(field: str, value: Any) -> None:
    error = dead_letter_of(record(**{field: value}))
    assert error.reason == "invalid_field"
    assert error.field == field


def test_a_naive_time_is_rejected_when_producing_too() -> None:
    with pytest.raises(ValidationError):
        new_event(
            "invoice.issued",
            source="/x",
            subject="C-1001",
            data=invoice(),
            id="1",
            time=dt.datetime(2026, 3, 1, 9, 30),
        )


# -- parse: every input type ----------------------------------------------------------------


def test_an_invoice_parses_into_its_model() -> None:
    model = parsed(record())
    assert model == InvoiceIssued(
        invoice_id="INV-2026-000123",
        customer_id="C-1001",
        amount=D("1250.00"),
        currency="EUR",
        issue_date=dt.date(2026, 3, 1),
        due_date=dt.date(2026, 3, 31),
        order_id="SO-77812",
    )
    assert InvoiceIssued.TYPE == "invoice.issued"
    with pytest.raises(ValidationError):
        model.amount = D("1")


def test_an_unknown_type_is_skipped_not_dead_lettered() -> None:
    assert parsed(record(type="invoice.disputed", data={"whatever": True})) is None


def test_an_invoice_due_on_its_issue_day_is_fine() -> None:
    assert parsed(record(data=invoice(due_date="2026-03-01"))).due_date == dt.date(2026, 3, 1)


def test_a_due_date_before_the_issue_date_is_rejected() -> None:
    error = dead_letter_of(record(data=invoice(due_date="2026-02-28")))
    assert error.reason == "due_before_issue"
    assert error.field == "data.due_date"
    assert "2026-02-28" in error.error


def test_a_field_unknown_to_the_contract_is_ignored() -> None:
    assert parsed(record(data=invoice(cost_center="DE-42"))) is not None


def test_subject_must_be_the_customer_in_data() -> None:
    error = dead_letter_of(record(data=invoice(customer_id="C-2002")))
    assert error.reason == "invalid_field"
    assert error.field == "subject"
    assert error.error.startswith("subject: ")
    assert "C-2002" in error.error


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        ("-5.00", "negative"),
        ("0", "zero"),
        ("0.00", "zero"),
        ("-0", "zero"),
        ("1000000000000000.01", "10^15"),
        ("10.001", "more decimals than EUR allows (2)"),
        ("12a", "not a plain decimal"),
        ("", "not a plain decimal"),
        ("NaN", "not a plain decimal"),
        ("1e400", "not a plain decimal"),
        (" 12.00", "not a plain decimal"),
        ("1,000.00", "not a plain decimal"),
        (True, "boolean"),
        ([], "list"),
    ],
)
def test_an_impossible_amount_is_rejected(amount: object, message: str) -> None:
    error = dead_letter_of(record(data=invoice(amount=amount)))
    assert error.reason == "invalid_amount"
    assert error.field == "data.amount"
    assert error.error.startswith("data.amount: ")
    assert message in error.error


@pytest.mark.parametrize(
    ("number", "reason"),
    [
        (b"1250.1", None),
        (b"1250", None),
        (b"0.30", None),
        (b"1.5e2", None),
        (b"1250.105", "invalid_amount"),
        (b"0.30000000000000004", "invalid_amount"),
        (b"1e400", "invalid_amount"),
        (b"-1250.10", "invalid_amount"),
        (b"0", "invalid_amount"),
        (b"1000000000000000.01", "invalid_amount"),
    ],
)
def test_a_json_number_amount_is_parsed_exactly(number: bytes, reason: str | None) -> None:
    raw = record().replace(b'"amount": "1250.00"', b'"amount": ' + number)
    assert number in raw
    if reason is None:
        assert parsed(raw).amount == D(number.decode()).quantize(D("0.01"))
    else:
        assert dead_letter_of(raw).reason == reason


@pytest.mark.parametrize("currency", ["XYZ", "eur", "Eur", "EURO", "", "BGN", "HRK"])
def test_an_unknown_currency_is_rejected_before_the_amount(currency: str) -> None:
    error = dead_letter_of(record(data=invoice(currency=currency, amount="-1.001")))
    assert error.reason == "unknown_currency"
    assert error.field == "data.currency"


def test_the_amount_is_scaled_by_the_events_own_currency() -> None:
    assert parsed(record(data=invoice(currency="KWD", amount="1.234"))).amount == D("1.234")
    assert parsed(record(data=invoice(currency="JPY", amount="125000"))).amount == D("125000")
    error = dead_letter_of(record(data=invoice(currency="JPY", amount="1250.50")))
    assert error.error == "data.amount: more decimals than JPY allows (0)"


@pytest.mark.parametrize("field", ["invoice_id", "customer_id", "amount", "currency", "due_date"])
def test_a_missing_required_field_is_named(field: str) -> None:
    error = dead_letter_of(record(data=without(invoice(), field)))
    assert error.reason == "missing_field"
    assert error.field == f"data.{field}"
    assert error.error == f"data.{field}: required field is missing"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("invoice_id", 123),
        ("invoice_id", ""),
        ("invoice_id", None),
        ("customer_id", 1001),
        ("currency", 978),
        ("order_id", ["SO-1"]),
    ],
)
def test_a_field_of_the_wrong_type_is_invalid(field: str, value: Any) -> None:
    data = invoice(**{field: value})
    error = dead_letter_of(record(data=data))
    assert error.reason == "invalid_field"
    assert error.field == f"data.{field}"


@pytest.mark.parametrize(
    "value",
    ["2026-02-30", "2026-13-01", "01.03.2026", "2026/03/01", "20260301", "", 20260301, None],
)
def test_a_bad_date_is_invalid_date(value: Any) -> None:
    error = dead_letter_of(record(data=invoice(issue_date=value)))
    assert error.reason == "invalid_date"
    assert error.field == "data.issue_date"


def test_the_most_fundamental_fault_names_a_record_with_several() -> None:
    data = without(invoice(amount="-1", issue_date="2026-02-30"), "invoice_id")
    assert dead_letter_of(record(data=data)).reason == "missing_field"


# customers


def test_a_registered_customer_parses_with_default_terms() -> None:
    model = parsed(record("customer.registered", customer()))
    assert isinstance(model, CustomerRegistered)
    assert model.payment_terms_days == 30
    assert model.name == "Müller Maschinenbau GmbH"


def test_an_updated_customer_has_its_own_type() -> None:
    model = parsed(record("customer.updated", customer(payment_terms_days=60, parent_id=None)))
    assert isinstance(model, CustomerUpdated)
    assert model.payment_terms_days == 60
    assert model.parent_id is None
    assert CustomerUpdated.TYPE == "customer.updated" != CustomerRegistered.TYPE


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"country": "de"}, "data.country"),
        ({"country": "DEU"}, "data.country"),
        ({"payment_terms_days": -1}, "data.payment_terms_days"),
        ({"payment_terms_days": 3651}, "data.payment_terms_days"),
        ({"payment_terms_days": "30"}, "data.payment_terms_days"),
        ({"payment_terms_days": True}, "data.payment_terms_days"),
        ({"parent_id": "C-1001"}, "data.parent_id"),
        ({"name": ""}, "data.name"),
    ],
)
def test_an_invalid_customer_field_is_named(overrides: dict[str, Any], field: str) -> None:
    error = dead_letter_of(record("customer.registered", customer(**overrides)))
    assert (error.reason, error.field) == ("invalid_field", field)


def test_a_customer_without_a_name_is_missing_a_field() -> None:
    error = dead_letter_of(record("customer.registered", without(customer(), "name")))
    assert (error.reason, error.field) == ("missing_field", "data.name")


# cancellations, credit notes, reversals, overdue


def test_the_small_input_events_parse() -> None:
    cancelled = parsed(record("invoice.cancelled", {"invoice_id": "I-1", "customer_id": "C-1001"}))
    assert cancelled.reason is None
    credit = parsed(
        record(
            "credit_note.issued",
            {
                "credit_note_id": "CN-1",
                "customer_id": "C-1001",
                "amount": "100.00",
                "currency": "EUR",
                "issue_date": "2026-03-02",
                "invoice_id": "I-1",
            },
        )
    )
    assert credit.amount == D("100.00")
    reversed_ = parsed(
        record(
            "payment.reversed",
            {"payment_id": "P-1", "customer_id": "C-1001", "reason": "chargeback"},
        )
    )
    assert reversed_.reason == "chargeback"
    overdue = parsed(
        record(
            "invoice.overdue",
            {
                "invoice_id": "I-1",
                "customer_id": "C-1001",
                "amount_overdue": "400.00",
                "currency": "EUR",
                "due_date": "2026-01-31",
                "days_overdue": 29,
                "as_of": "2026-03-01",
            },
        )
    )
    assert (overdue.amount_overdue, overdue.days_overdue) == (D("400.00"), 29)


def test_a_negative_credit_note_is_rejected() -> None:
    data = {
        "credit_note_id": "CN-1",
        "customer_id": "C-1001",
        "amount": "-100.00",
        "currency": "EUR",
        "issue_date": "2026-03-02",
    }
    assert dead_letter_of(record("credit_note.issued", data)).reason == "invalid_amount"


def test_negative_days_overdue_is_invalid() -> None:
    data = {
        "invoice_id": "I-1",
        "customer_id": "C-1001",
        "amount_overdue": "400.00",
        "currency": "EUR",
        "due_date": "2026-01-31",
        "days_overdue": -1,
        "as_of": "2026-03-01",
    }
    error = dead_letter_of(record("invoice.overdue", data))
    assert (error.reason, error.field) == ("invalid_field", "data.days_overdue")


# payments


def test_a_payment_with_allocations_parses() -> None:
    model = parsed(record("payment.received", payment()))
    assert isinstance(model, PaymentReceived)
    assert [(a.invoice_id, a.amount) for a in model.allocations or ()] == [
        ("INV-1", D("1000.00")),
        ("INV-2", D("500.00")),
    ]


def test_a_payment_without_allocations_leaves_them_to_the_oldest_invoices() -> None:
    model = parsed(record("payment.received", without(payment(), "allocations")))
    assert model.allocations is None


def test_allocations_may_leave_part_of_a_payment_unapplied() -> None:
    allocations = [{"invoice_id": "INV-1", "amount": "1000.00"}]
    assert parsed(record("payment.received", payment(allocations=allocations))) is not None


def test_allocations_above_the_payment_amount_are_rejected() -> None:
    allocations = [
        {"invoice_id": "INV-1", "amount": "1000.00"},
        {"invoice_id": "INV-2", "amount": "500.01"},
    ]
    error = dead_letter_of(record("payment.received", payment(allocations=allocations)))
    assert error.reason == "invalid_amount"
    assert error.field == "data.allocations"


@pytest.mark.parametrize(
    ("allocation", "reason", "field"),
    [
        (
            {"invoice_id": "INV-1", "amount": "10.001"},
            "invalid_amount",
            "data.allocations[0].amount",
        ),
        ({"invoice_id": "INV-1", "amount": "0"}, "invalid_amount", "data.allocations[0].amount"),
        ({"invoice_id": "INV-1"}, "missing_field", "data.allocations[0].amount"),
        ({"amount": "1.00"}, "missing_field", "data.allocations[0].invoice_id"),
        ("INV-1", "invalid_field", "data.allocations[0]"),
    ],
)
def test_a_bad_allocation_is_named_by_its_position(
    allocation: Any, reason: str, field: str
) -> None:
    error = dead_letter_of(record("payment.received", payment(allocations=[allocation])))
    assert (error.reason, error.field) == (reason, field)


# financial statements


def test_a_financial_statement_parses_with_its_nested_figures() -> None:
    model = parsed(record("financial_statement.published", statement()))
    assert isinstance(model, FinancialStatementPublished)
    assert model.balance_sheet.total_assets == D("2100000.00")
    assert model.income_statement.net_income == D("190000.00")
    assert model.cash_flow is not None
    assert model.cash_flow.operating_cash_flow == D("260000.00")


def test_a_loss_making_statement_with_negative_equity_is_possible() -> None:
    data = statement()
    data["balance_sheet"] |= {"equity": "-50000.00", "retained_earnings": "-900000.00"}
    data["income_statement"] |= {"ebit": "-120000.00", "net_income": "-160000.00"}
    data["cash_flow"] = {"operating_cash_flow": "-30000.00"}
    model = parsed(record("financial_statement.published", data))
    assert model.balance_sheet.equity == D("-50000.00")


def test_optional_statement_parts_may_be_absent() -> None:
    data = without(statement(), "cash_flow", "audited")
    data["balance_sheet"] = without(data["balance_sheet"], "cash", "inventory", "receivables")
    data["income_statement"] = without(data["income_statement"], "ebit", "interest_expense")
    model = parsed(record("financial_statement.published", data))
    assert model.cash_flow is None
    assert model.balance_sheet.inventory is None


@pytest.mark.parametrize(
    ("part", "field", "value", "reason"),
    [
        ("balance_sheet", "total_assets", "0.00", "invalid_amount"),
        ("balance_sheet", "total_assets", "-1.00", "invalid_amount"),
        ("balance_sheet", "current_assets", "-1.00", "invalid_amount"),
        ("balance_sheet", "cash", "-0.01", "invalid_amount"),
        ("balance_sheet", "total_liabilities", "-1.00", "invalid_amount"),
        ("income_statement", "revenue", "-1.00", "invalid_amount"),
        ("balance_sheet", "cash", "1.001", "invalid_amount"),
        ("balance_sheet", "equity", D("1.555"), "invalid_amount"),
        ("income_statement", "net_income", "NaN", "invalid_amount"),
    ],
)
def test_an_impossible_statement_figure_is_named(
    part: str, field: str, value: Any, reason: str
) -> None:
    data = statement()
    data[part] = data[part] | {field: value}
    error = dead_letter_of(record("financial_statement.published", data))
    assert (error.reason, error.field) == (reason, f"data.{part}.{field}")


def test_zero_is_a_possible_cash_or_revenue() -> None:
    data = statement()
    data["balance_sheet"] |= {"cash": "0.00"}
    data["income_statement"] |= {"revenue": "0"}
    assert parsed(record("financial_statement.published", data)).income_statement.revenue == 0


def test_nested_figures_are_scaled_by_the_statements_currency() -> None:
    # Given a statement in yen, whose whole-yen figures may be written "120000.00"
    data = statement(currency="JPY")
    assert parsed(record("financial_statement.published", data)).balance_sheet.cash == 120000
    # When a figure has a fraction of a yen
    data["balance_sheet"] = data["balance_sheet"] | {"cash": "120000.50"}
    # Then it is named, judged by the statement's currency
    error = dead_letter_of(record("financial_statement.published", data))
    assert error.error.startswith("data.balance_sheet.cash: more decimals than JPY allows")


@pytest.mark.parametrize("months", [9, 0, -12, "12", D("12.0"), True, None])
def test_a_period_other_than_3_6_or_12_months_is_invalid(months: Any) -> None:
    raw = record("financial_statement.published", statement(period_months=months))
    error = dead_letter_of(raw)
    assert (error.reason, error.field) == ("invalid_field", "data.period_months")


def test_a_statement_without_a_required_figure_is_missing_it() -> None:
    data = statement()
    data["balance_sheet"] = without(data["balance_sheet"], "total_assets")
    error = dead_letter_of(record("financial_statement.published", data))
    assert (error.reason, error.field) == ("missing_field", "data.balance_sheet.total_assets")


# credit reports


def test_a_credit_report_parses() -> None:
    model = parsed(record("credit_report.received", credit_report()))
    assert isinstance(model, CreditReportReceived)
    assert model.score == 240
    assert model.legal_events[0].type == "lien"
    assert model.legal_events[0].date == dt.date(2025, 11, 2)
    assert model.reported_at == dt.datetime(2026, 2, 28, 6, tzinfo=UTC)


def test_a_credit_report_score_may_be_a_decimal_and_reported_on_a_date() -> None:
    data = credit_report(score="2.35", score_min="1.0", score_max="6.0", reported_at="2026-02-28")
    model = parsed(record("credit_report.received", data))
    assert model.score == D("2.35")
    assert model.reported_at == dt.datetime(2026, 2, 28, tzinfo=UTC)


@pytest.mark.parametrize(
    ("overrides", "reason", "field"),
    [
        ({"score": 601}, "invalid_field", "data.score"),
        ({"score": 99}, "invalid_field", "data.score"),
        ({"score_min": 600}, "invalid_field", "data.score_max"),
        ({"score": "high"}, "invalid_field", "data.score"),
        ({"score": True}, "invalid_field", "data.score"),
        ({"defaults": -1}, "invalid_field", "data.defaults"),
        ({"delinquencies_12m": D("1.5")}, "invalid_field", "data.delinquencies_12m"),
        ({"score": D("240.5"), "score_max": D("1E+3")}, None, None),
        ({"score_max": D("1E+400")}, "invalid_field", "data.score_max"),
        ({"legal_events": [{"type": "fraud"}]}, "invalid_field", "data.legal_events[0].type"),
        ({"legal_events": [{"date": "2026-01-01"}]}, "missing_field", "data.legal_events[0].type"),
        (
            {"legal_events": [{"type": "lawsuit", "date": "2026-02-31"}]},
            "invalid_date",
            "data.legal_events[0].date",
        ),
        ({"reported_at": "yesterday"}, "invalid_date", "data.reported_at"),
        ({"reported_at": "2026-02-28T06:00:00"}, "invalid_date", "data.reported_at"),
    ],
)
def test_an_impossible_credit_report_is_named(
    overrides: dict[str, Any], reason: str | None, field: str | None
) -> None:
    raw = record("credit_report.received", credit_report(**overrides))
    if reason is None:
        assert parsed(raw) is not None
        return
    error = dead_letter_of(raw)
    assert (error.reason, error.field) == (reason, field)


@pytest.mark.parametrize("kind", ["bankruptcy", "insolvency", "lawsuit", "lien", "judgement"])
def test_every_legal_event_type_of_the_contract_is_known(kind: str) -> None:
    data = credit_report(legal_events=[{"type": kind}])
    assert parsed(record("credit_report.received", data)).legal_events[0].type == kind


# -- topics ---------------------------------------------------------------------------------


def test_every_event_type_has_its_topic() -> None:
    assert set(TOPIC_OF_TYPE) == set(MODEL_OF_TYPE)
    assert {TOPIC_OF_TYPE[t] for t in MODEL_OF_TYPE} == {
        "crm.customers",
        "ar.invoices",
        "ar.payments",
        "ar.overdue",
        "crm.financials",
        "crm.credit-reports",
        "credit.assessments",
        "credit.limits",
        "credit.exposure",
        "credit.alerts",
        "credit.dlq",
    }
    for type_, model in MODEL_OF_TYPE.items():
        assert type_ == model.TYPE
        assert model.model_config.get("frozen") is True


def test_a_known_type_on_its_own_topic_parses() -> None:
    assert parse(decode(record()), topic="ar.invoices") is not None


def test_a_known_type_on_another_topic_is_wrong_topic() -> None:
    error = dead_letter_of(record(), topic="ar.payments")
    assert error.reason == "wrong_topic"
    assert "ar.invoices" in error.error


def test_wrong_topic_follows_the_configured_topic_names() -> None:
    configured = TOPIC_OF_TYPE | {"invoice.issued": "prod.ar.invoices"}
    assert parse(decode(record()), topic="prod.ar.invoices", topic_of_type=configured)
    error = dead_letter_of(record(), topic="ar.invoices", topic_of_type=configured)
    assert error.reason == "wrong_topic"


def test_an_unknown_type_is_skipped_on_any_topic() -> None:
    assert parse(decode(record(type="x.y")), topic="ar.invoices") is None


# -- producing ------------------------------------------------------------------------------


def exposure_data(**overrides: Any) -> dict[str, Any]:
    return {
        "customer_id": "C-1001",
        "currency": "EUR",
        "open_receivables": D("12500.00"),
        "overdue_amount": D("400.00"),
        "overdue_buckets": {"1-30": D("400.00")},
        "max_days_overdue": 12,
        "reserved": D("1000.00"),
        "exposure": D("13500.00"),
        "limit": D("50000.00"),
        "available": D("36500.00"),
        "utilization": D("0.27"),
        "on_hold": False,
        "as_of": T0,
    } | overrides


def test_an_output_event_writes_decimals_as_strings_and_reads_back_the_same() -> None:
    # Given an exposure computed by the limits service
    data = ExposureUpdated(**exposure_data())
    # When it is published and consumed again
    envelope = new_event(
        "exposure.updated",
        source="/creditwatch/limits",
        subject="C-1001",
        data=data,
        id="exp-C-1001-42",
        time=T0,
    )
    written = envelope.to_json()
    document = json.loads(written)
    # Then amounts are strings, all four buckets are there, and nothing is lost
    assert document["data"]["exposure"] == "13500.00"
    assert document["data"]["overdue_buckets"] == {
        "1-30": "400.00",
        "31-60": "0.00",
        "61-90": "0.00",
        "90+": "0.00",
    }
    assert document["data"]["as_of"] == "2026-03-01T09:30:00Z"
    assert document["source"] == "/creditwatch/limits"
    assert envelope.key == b"C-1001"
    assert parse(decode(written)) == data


def test_an_output_event_may_carry_added_fields() -> None:
    group = {"exposure": D("80000.00"), "members": ["C-1001", "C-1002"]}
    envelope = new_event(
        "exposure.updated",
        source="/creditwatch/limits",
        subject="C-1001",
        data=exposure_data(group=group, note="extra"),
        id="e-1",
        time=T0,
    )
    assert envelope.data["group"] == {"exposure": "80000.00", "members": ["C-1001", "C-1002"]}
    assert envelope.data["note"] == "extra"


def test_an_assessment_round_trips_through_the_wire() -> None:
    data = AssessmentCompleted(
        assessment_id="A-1",
        customer_id="C-1001",
        score=72,
        grade="B",
        risk_level="medium",
        previous_grade="A",
        factors=[
            {
                "factor": "current_ratio",
                "value": D("1.35"),
                "points": 8,
                "max_points": 10,
                "reason": "adequate liquidity",
            }
        ],
        ratios={"current_ratio": D("1.35"), "altman_z2": D("2.71")},
        override=None,
        policy_version="2026.1",
        trigger={"event_id": "fs-1", "type": "financial_statement.published"},
        next_review_date=dt.date(2027, 3, 1),
        assessed_at=T0,
    )
    envelope = new_event(
        AssessmentCompleted.TYPE,
        source="/creditwatch/assessment",
        subject="C-1001",
        data=data,
        id="A-1",
        time=T0,
    )
    assert json.loads(envelope.to_json())["data"]["ratios"]["altman_z2"] == "2.71"
    assert parse(decode(envelope.to_json())) == data


def test_a_limit_change_is_validated_when_given_as_a_dict() -> None:
    data = {
        "customer_id": "C-1001",
        "previous_limit": D("40000.00"),
        "limit": D("50000.00"),
        "currency": "EUR",
        "reason": "manual",
        "grade": "B",
        "request_id": "LR-1",
        "requested_by": "ana",
        "changed_by": "bob",
        "effective_at": T0,
    }
    envelope = new_event(
        "limit.changed", source="/creditwatch/limits", subject="C-1001", data=data, id="L", time=T0
    )
    assert envelope.data["limit"] == "50000.00"
    assert envelope.data["expires_at"] is None
    assert isinstance(parse(decode(envelope.to_json())), LimitChanged)
    with pytest.raises(ValidationError):
        new_event(
            "limit.changed",
            source="/creditwatch/limits",
            subject="C-1001",
            data=data | {"reason": "whim"},
            id="L",
            time=T0,
        )


def test_an_output_event_for_another_customer_than_its_subject_is_a_bug() -> None:
    with pytest.raises(ValueError, match="C-2"):
        new_event(
            "exposure.updated",
            source="/creditwatch/limits",
            subject="C-2",
            data=ExposureUpdated(**exposure_data()),
            id="e",
            time=T0,
        )


def test_an_alert_model_can_be_published_under_each_lifecycle_type() -> None:
    raised = AlertRaised(
        alert_id="AL-1",
        customer_id="C-1001",
        rule="utilization_high",
        severity="warning",
        status="open",
        title="Utilization above 90 %",
        message="Exposure is 92 % of the limit",
        facts={"utilization": D("0.92")},
        dedup_key="C-1001:utilization_high",
        raised_at=T0,
    )
    envelope = new_event(
        "alert.updated",
        source="/creditwatch/alerts",
        subject="C-1001",
        data=raised,
        id="AL-1-2",
        time=T0,
    )
    assert envelope.data["facts"] == {"utilization": "0.92"}
    assert isinstance(parse(decode(envelope.to_json())), AlertUpdated)


def test_an_output_event_with_the_wrong_model_is_a_bug() -> None:
    with pytest.raises(ValidationError):
        new_event(
            "limit.changed",
            source="/creditwatch/limits",
            subject="C-1001",
            data=ExposureUpdated(**exposure_data()),
            id="e",
            time=T0,
        )


def test_a_service_may_publish_its_own_types_too() -> None:
    class ReservationMade(BaseModel):
        order_id: str
        amount: Decimal

    envelope = new_event(
        "reservation.made",
        source="/creditwatch/limits",
        subject="C-1001",
        data=ReservationMade(order_id="SO-1", amount=D("10.00")),
        id="r",
        time=T0,
    )
    assert envelope.data == {"order_id": "SO-1", "amount": "10.00"}
    assert new_event(
        "x.y", source="/s", subject="C", data={"at": T0, "n": D("1.50")}, id="1", time=T0
    ).data == {"at": "2026-03-01T09:30:00Z", "n": "1.50"}


# -- dead-letter records --------------------------------------------------------------------


def dlq(**overrides: Any) -> Envelope:
    arguments: dict[str, Any] = {
        "error": "data.amount: must not be negative",
        "reason": "invalid_amount",
        "service": "limits",
        "topic": "ar.invoices",
        "partition": 3,
        "offset": 1234,
        "key": b"C-1001",
        "value": record(data=invoice(amount="-1.00")),
        "failed_at": T0,
    } | overrides
    return dead_letter_record(**arguments)


def test_a_dead_letter_record_carries_the_original_record_and_why() -> None:
    value = record(data=invoice(amount="-1.00"))
    envelope = dlq()
    assert envelope.type == "event.dead_lettered"
    assert envelope.source == "/creditwatch/limits"
    assert envelope.id == "dlq-limits-ar.invoices-3-1234"
    assert envelope.subject == "C-1001"
    assert envelope.key == b"C-1001"
    assert envelope.time == T0
    assert envelope.data == {
        "error": "data.amount: must not be negative",
        "reason": "invalid_amount",
        "service": "limits",
        "topic": "ar.invoices",
        "partition": 3,
        "offset": 1234,
        "key": "C-1001",
        "value": value.decode(),
        "failed_at": "2026-03-01T09:30:00Z",
    }


def test_a_dead_letter_record_has_a_stable_id() -> None:
    first = dlq(failed_at=T0)
    again = dlq(failed_at=T0 + dt.timedelta(minutes=5))
    assert first.id == again.id
    assert dlq(offset=1235).id != first.id


@pytest.mark.parametrize("key", [None, b""])
def test_a_dead_letter_without_a_key_has_an_unknown_subject(key: bytes | None) -> None:
    envelope = dlq(key=key)
    assert envelope.subject == "unknown"
    assert envelope.data["key"] == (None if key is None else "")


def test_a_value_that_is_not_utf8_is_kept_as_base64() -> None:
    value = b"\xff\xfe\x00garbage"
    envelope = dlq(value=value, reason="not_utf8", key=b"\xc3")
    assert envelope.data["value"] == base64.b64encode(value).decode()
    assert envelope.data["value_encoding"] == "base64"
    assert envelope.data["key"] == base64.b64encode(b"\xc3").decode()
    assert envelope.data["key_encoding"] == "base64"
    assert envelope.subject == "unknown"


def test_an_oversize_value_keeps_its_first_64_kib() -> None:
    value = b"x" * (2 * 1024 * 1024)
    envelope = dlq(value=value, reason="oversize")
    assert envelope.data["value"] == "x" * 65536
    assert envelope.data["value_truncated"] is True
    assert len(envelope.to_json()) < MAX_RECORD_BYTES


def test_a_truncated_utf8_value_never_ends_in_half_a_character() -> None:
    value = b"a" + "é".encode() * (MAX_RECORD_BYTES // 2)
    envelope = dlq(value=value)
    assert envelope.data["value_truncated"] is True
    assert envelope.data["value"] == "a" + "é" * 32767
    assert "value_encoding" not in envelope.data


def test_a_value_that_would_not_fit_once_encoded_is_truncated_too() -> None:
    value = bytes(range(128, 256)) * (900 * 1024 // 128)  # under 1 MiB, base64 over it
    envelope = dlq(value=value)
    assert envelope.data["value_truncated"] is True
    assert len(envelope.to_json()) < MAX_RECORD_BYTES


def test_a_record_that_fits_is_never_truncated() -> None:
    value = b'{"a": "' + b"y" * 200_000 + b'"}'
    envelope = dlq(value=value, reason="oversize")
    assert envelope.data["value"] == value.decode()
    assert "value_truncated" not in envelope.data


def test_a_dead_letter_record_reads_back_from_the_dlq_topic() -> None:
    envelope = dlq(value=b"\xff" * 10)
    model = parse(decode(envelope.to_json(), max_string_chars=None))
    assert isinstance(model, EventDeadLettered)
    assert model.reason == "invalid_amount"
    assert model.model_extra == {"value_encoding": "base64"}


# -- the error type and its codes -----------------------------------------------------------


def test_every_reason_code_is_a_module_constant() -> None:
    constants = {
        events.INVALID_JSON,
        events.NOT_UTF8,
        events.MISSING_FIELD,
        events.INVALID_FIELD,
        events.INVALID_AMOUNT,
        events.UNKNOWN_CURRENCY,
        events.DUE_BEFORE_ISSUE,
        events.OVERSIZE,
        events.NO_FX_RATE,
        events.INVALID_DATE,
        events.WRONG_TOPIC,
    }
    wire_codes = {
        "invalid_json",
        "not_utf8",
        "missing_field",
        "invalid_field",
        "invalid_amount",
        "unknown_currency",
        "due_before_issue",
        "oversize",
        "no_fx_rate",
        "invalid_date",
        "wrong_topic",
    }
    assert constants == wire_codes == events.REASONS


def test_a_dead_letter_says_why_and_where() -> None:
    error = DeadLetter("no_fx_rate", "data.amount: no rate from USD to EUR", "data.amount")
    assert (error.reason, error.field) == ("no_fx_rate", "data.amount")
    assert str(error) == error.error == "data.amount: no rate from USD to EUR"


# -- properties -----------------------------------------------------------------------------

_CURRENCIES = sorted(CURRENCY_MINOR_UNITS)


@st.composite
def invoice_amounts(draw: st.DrawFn) -> tuple[str, Decimal]:
    currency = draw(st.sampled_from(_CURRENCIES))
    places = CURRENCY_MINOR_UNITS[currency]
    units = draw(st.integers(min_value=1, max_value=int(MAX_AMOUNT) * 10**places))
    return currency, D(units).scaleb(-places)


@given(invoice_amounts(), st.booleans())
def test_any_valid_amount_survives_the_wire_exactly(
    case: tuple[str, Decimal], as_json_number: bool
) -> None:
    currency, amount = case
    raw = record(data=invoice(currency=currency, amount=str(amount)))
    if as_json_number:
        raw = raw.replace(f'"amount": "{amount}"'.encode(), f'"amount": {amount}'.encode())
    model = parsed(raw)
    assert model.amount == amount
    assert str(model.amount) == str(amount)
    assert model.model_dump(mode="json")["amount"] == str(amount)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_decoded_or_dead_lettered_never_crash(raw: bytes) -> None:
    try:
        parse(decode(raw))
    except DeadLetter as error:
        assert error.reason in events.REASONS


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.text(max_size=12)
    | st.sampled_from(["EUR", "JPY", "2026-03-01", "1250.00", "-1", "0", "10.001"])
    | st.decimals(allow_nan=False, allow_infinity=False, places=3),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(sorted(MODEL_OF_TYPE)),
    st.dictionaries(
        st.sampled_from(
            [
                "customer_id",
                "amount",
                "currency",
                "issue_date",
                "due_date",
                "invoice_id",
                "allocations",
                "balance_sheet",
                "score",
                "name",
                "period_months",
            ]
        ),
        _json_values,
        max_size=6,
    ),
)
def test_arbitrary_data_of_any_type_is_parsed_or_dead_lettered(
    event_type: str, data: dict[str, Any]
) -> None:
    raw = record(event_type, data | {"customer_id": "C-1001"})
    try:
        parse(decode(raw))
    except DeadLetter as error:
        assert error.reason in events.REASONS
        assert error.field is None or error.error.startswith(error.field)


# Whatever may sit in an envelope's data: what the services build (JSON forms), and what a
# careless caller might pass (Decimals, big ints, non-string keys, lone surrogates, naive
# datetimes, other time zones), nested.
_ZONES = st.sampled_from(
    [
        dt.UTC,
        dt.timezone(dt.timedelta(0)),
        dt.timezone(dt.timedelta(hours=1)),
        dt.timezone(dt.timedelta(hours=-5, minutes=-30)),
        None,
    ]
)
_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | st.text()
    | st.decimals(allow_nan=False)
    | st.dates()
    | st.builds(lambda d, z: d.replace(tzinfo=z), st.datetimes(), _ZONES)
)
_DATA = st.recursive(
    _LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.dictionaries(st.text(max_size=8), _DATA, max_size=5),
    time=st.builds(
        lambda d, z: d.replace(tzinfo=z), st.datetimes(), _ZONES.filter(lambda z: z is not None)
    ),
    subject=st.text(min_size=1, max_size=20),
)
def test_an_envelopes_json_is_pydantics_whatever_its_data(
    data: dict[str, Any], time: dt.datetime, subject: str
) -> None:
    """``to_json`` takes a faster way for plain JSON; the bytes must be pydantic's all the same."""
    env = events.trusted_event(
        "any.thing", source="test", subject=subject, data=data, id="e-1", time=time
    )
    assert env.to_json() == env.model_dump_json().encode("utf-8")
