"""``creditwatch import open-items``: every row validated with the consumers' own rules, each
fault named by row and column, nothing published unless every row is good, stable ids, and
partly paid invoices carried as a payment allocated to them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from shared.events import decode, parse
from shared.policy import load_policy
from shared.settings import Settings
from tools import importer
from tools.cli import app
from tools.importer import ImportFileError, Message, plan_import, run_import

SETTINGS = Settings()
POLICY = load_policy()
HEADER = "customer_id,invoice_id,amount,currency,issue_date,due_date,order_id,open_amount"


class FakePublisher:
    def __init__(self) -> None:
        self.calls: list[list[Message]] = []

    async def publish(self, messages: Sequence[Message]) -> None:
        self.calls.append(list(messages))


def write(tmp_path: Path, text: str, name: str = "items.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def items(tmp_path: Path, *rows: str, header: str = HEADER) -> Path:
    return write(tmp_path, "\n".join([header, *rows]) + "\n")


def errors(tmp_path: Path, *rows: str, **kwargs: object) -> list[str]:
    plan = plan_import(items(tmp_path, *rows), settings=SETTINGS, **kwargs)
    assert not plan.messages, "nothing may be planned while a row is at fault"
    return [str(e) for e in plan.errors]


GOOD = "C-1,INV-1,1000.00,EUR,2026-01-10,2026-02-09,SO-1,"


# ---- valid files ----------------------------------------------------------------------------


def test_a_valid_file_becomes_one_invoice_event_per_row_keyed_by_customer(tmp_path: Path) -> None:
    plan = plan_import(
        items(tmp_path, GOOD, "C-2,INV-2,250,USD,2026-01-15,2026-01-15,,"), settings=SETTINGS
    )
    assert plan.ok and plan.rows == 2
    assert [(m.topic, m.key) for m in plan.messages] == [
        ("ar.invoices", b"C-1"),
        ("ar.invoices", b"C-2"),
    ]
    first = plan.messages[0].event
    assert first["id"] == "import-invoice-INV-1"
    assert first["source"] == "/import/ledger"
    assert first["type"] == "invoice.issued" and first["subject"] == "C-1"
    assert first["time"] == "2026-01-10T00:00:00Z"
    assert first["data"] == {
        "customer_id": "C-1",
        "invoice_id": "INV-1",
        "amount": "1000.00",
        "currency": "EUR",
        "issue_date": "2026-01-10",
        "due_date": "2026-02-09",
        "order_id": "SO-1",
    }
    assert "order_id" not in plan.messages[1].event["data"]  # an empty cell is absent
    assert plan.customers == {"C-1", "C-2"}
    assert plan.totals == {
        "EUR": [Decimal("1000.00"), Decimal("1000.00")],
        "USD": [Decimal("250"), Decimal("250")],
    }
    # What goes out passes the consumers' own decoding and validation.
    for message in plan.messages:
        assert parse(decode(message.value), topic=message.topic) is not None


def test_ids_are_stable_so_a_second_import_of_the_same_file_is_the_same_events(
    tmp_path: Path,
) -> None:
    path = items(tmp_path, GOOD, "C-1,INV-2,100.00,EUR,2026-01-10,2026-02-09,,40.00")
    first = plan_import(path, settings=SETTINGS)
    second = plan_import(path, settings=SETTINGS)
    assert first.messages == second.messages
    assert [m.event["id"] for m in first.messages] == [
        "import-invoice-INV-1",
        "import-invoice-INV-2",
        "import-payment-INV-2",
    ]


def test_columns_may_come_in_any_order_and_optional_ones_may_be_left_out(tmp_path: Path) -> None:
    path = items(
        tmp_path,
        "2026-02-01,C-1,EUR,10.5,I-9,2026-01-01",
        header="due_date,customer_id,currency,amount,invoice_id,issue_date",
    )
    plan = plan_import(path, settings=SETTINGS)
    assert plan.ok
    assert plan.messages[0].event["data"]["amount"] == "10.5"


def test_cells_are_stripped_and_a_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes(
        ("\ufeff" + HEADER + "\r\n C-1 , INV-1 ,1000.00, EUR ,2026-01-10,2026-02-09,,\r\n").encode()
    )
    plan = plan_import(path, settings=SETTINGS)
    assert plan.ok
    assert plan.messages[0].event["data"]["customer_id"] == "C-1"


def test_configured_topic_names_and_source_are_used(tmp_path: Path) -> None:
    settings = Settings(topic_invoices="x.invoices", topic_payments="x.payments")
    plan = plan_import(
        items(tmp_path, "C-1,INV-1,100.00,EUR,2026-01-10,2026-02-09,,60.00"),
        settings=settings,
        source="/erp/migration",
    )
    assert [m.topic for m in plan.messages] == ["x.invoices", "x.payments"]
    assert {m.event["source"] for m in plan.messages} == {"/erp/migration"}


# ---- partly paid invoices ---------------------------------------------------------------------


def test_a_partly_paid_invoice_carries_a_payment_allocated_to_it(tmp_path: Path) -> None:
    plan = plan_import(
        items(tmp_path, "C-1,INV-7,1000.00,EUR,2026-01-10,2026-02-09,,250.50"), settings=SETTINGS
    )
    assert plan.ok
    invoice, payment = (m.event for m in plan.messages)
    assert invoice["data"]["amount"] == "1000.00"
    assert plan.messages[1].topic == "ar.payments" and plan.messages[1].key == b"C-1"
    assert payment["id"] == "import-payment-INV-7"
    assert payment["type"] == "payment.received"
    assert payment["data"] == {
        "payment_id": "import-INV-7",
        "customer_id": "C-1",
        "amount": "749.50",
        "currency": "EUR",
        "received_date": "2026-01-10",
        "allocations": [{"invoice_id": "INV-7", "amount": "749.50"}],
    }
    assert plan.totals == {"EUR": [Decimal("1000.00"), Decimal("250.50")]}
    assert plan.events == {"invoice.issued": 1, "payment.received": 1}


def test_payments_follow_all_invoices_and_whole_open_amounts_need_no_payment(
    tmp_path: Path,
) -> None:
    plan = plan_import(
        items(
            tmp_path,
            "C-1,INV-1,100.00,EUR,2026-01-10,2026-02-09,,0",
            "C-1,INV-2,100.00,EUR,2026-01-10,2026-02-09,,100.00",
            "C-2,INV-3,100.00,EUR,2026-01-10,2026-02-09,,",
        ),
        settings=SETTINGS,
    )
    assert [m.event["type"] for m in plan.messages] == [
        "invoice.issued",
        "invoice.issued",
        "invoice.issued",
        "payment.received",
    ]
    assert plan.messages[-1].event["data"]["amount"] == "100.00"  # fully paid: all of it
    assert plan.totals["EUR"] == [Decimal("300.00"), Decimal("200.00")]


# ---- row faults -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            "C-1,INV-1,100.001,EUR,2026-01-10,2026-02-09,,",
            "row 1: amount: more decimals than EUR allows (2)",
        ),
        (
            "C-1,INV-1,100,JPY,2026-01-10,2026-02-09,,0.5",
            "row 1: open_amount: more decimals than JPY allows (0)",
        ),
        ("C-1,INV-1,-5.00,EUR,2026-01-10,2026-02-09,,", "row 1: amount: must not be negative"),
        ("C-1,INV-1,0,EUR,2026-01-10,2026-02-09,,", "row 1: amount: must not be zero"),
        (
            'C-1,INV-1,"1,000.00",EUR,2026-01-10,2026-02-09,,',
            "row 1: amount: not a plain decimal number: '1,000.00'",
        ),
        (
            "C-1,INV-1,100.00,XYZ,2026-01-10,2026-02-09,,",
            "row 1: currency: unknown ISO 4217 currency code 'XYZ'",
        ),
        (
            "C-1,INV-1,100.00,eur,2026-01-10,2026-02-09,,",
            "row 1: currency: unknown ISO 4217 currency code 'eur'",
        ),
        (
            "C-1,INV-1,100.00,EUR,2026-02-30,2026-03-09,,",
            "row 1: issue_date: not a calendar date: '2026-02-30'",
        ),
        (
            "C-1,INV-1,100.00,EUR,10/01/2026,2026-03-09,,",
            "row 1: issue_date: expected an ISO 8601 date (YYYY-MM-DD), got '10/01/2026'",
        ),
        (
            "C-1,INV-1,100.00,EUR,2026-01-10,2026-01-09,,",
            "row 1: due_date: due date 2026-01-09 is before issue date 2026-01-10",
        ),
        (
            "C-1,INV-1,100.00,EUR,2026-01-10,2026-02-09,,100.01",
            "row 1: open_amount: 100.01 is more than the invoice amount 100.00",
        ),
        (
            "C-1,INV-1,100.00,EUR,2026-01-10,2026-02-09,,-1",
            "row 1: open_amount: must not be negative",
        ),
        (
            ",INV-1,100.00,EUR,2026-01-10,2026-02-09,,",
            "row 1: customer_id: required field is missing",
        ),
        ("C-1,,100.00,EUR,2026-01-10,2026-02-09,,", "row 1: invoice_id: required field is missing"),
        (
            "C-1,INV-1,100.00,EUR,2026-01-10,2026-02-09,SO-1,,extra",
            "row 1: row: 1 value(s) beyond the header's columns (a comma inside an unquoted value?)",
        ),
        (
            "C-1,INV-1,100.00,EUR,2026-01-10,2026-02-09," + "o" * 1001 + ",",
            "row 1: order_id: 1001 characters; the limit is 1000",
        ),
    ],
)
def test_each_kind_of_bad_row_is_named_by_its_row_and_column(
    tmp_path: Path, row: str, expected: str
) -> None:
    assert errors(tmp_path, row) == [expected]


def test_every_fault_of_a_row_is_reported_not_just_the_first(tmp_path: Path) -> None:
    assert errors(tmp_path, "C-1,INV-1,1.001,XYZ,2026-13-01,,,") == [
        "row 1: currency: unknown ISO 4217 currency code 'XYZ'",
        "row 1: issue_date: not a calendar date: '2026-13-01'",
        "row 1: due_date: required field is missing",
    ]


def test_rows_are_numbered_from_one_after_the_header_and_all_rows_are_checked(
    tmp_path: Path,
) -> None:
    found = errors(
        tmp_path,
        GOOD,
        "C-1,INV-2,1.001,EUR,2026-01-10,2026-02-09,,",
        "",  # blank lines are skipped, not counted
        "C-2,INV-1,5.00,EUR,2026-01-10,2026-02-09,,",
        "C-3,INV-3,5.00,EUR,2026-01-10,2026-01-01,,",
    )
    assert found == [
        "row 2: amount: more decimals than EUR allows (2)",
        "row 3: invoice_id: duplicate of row 1",
        "row 4: due_date: due date 2026-01-01 is before issue date 2026-01-10",
    ]


async def test_nothing_is_published_when_any_row_fails(tmp_path: Path) -> None:
    publisher = FakePublisher()
    path = items(
        tmp_path,
        GOOD,
        "C-1,INV-2,100.00,EUR,2026-01-10,2026-02-09,,",
        "C-1,INV-3,1e3,EUR,2026-01-10,2026-02-09,,",
    )
    plan = await run_import(path, settings=SETTINGS, publisher=publisher)
    assert [str(e) for e in plan.errors] == ["row 3: amount: not a plain decimal number: '1e3'"]
    assert plan.messages == []
    assert publisher.calls == []


async def test_a_valid_file_is_published_whole_in_one_go(tmp_path: Path) -> None:
    publisher = FakePublisher()
    plan = await run_import(
        items(tmp_path, GOOD, "C-2,INV-2,10.00,EUR,2026-01-10,2026-02-09,,4.00"),
        settings=SETTINGS,
        publisher=publisher,
    )
    assert plan.ok
    assert publisher.calls == [plan.messages]
    assert len(plan.messages) == 3


async def test_a_dry_run_validates_and_publishes_nothing(tmp_path: Path) -> None:
    publisher = FakePublisher()
    plan = await run_import(
        items(tmp_path, GOOD), settings=SETTINGS, publisher=publisher, dry_run=True
    )
    assert plan.ok and len(plan.messages) == 1
    assert publisher.calls == []


# ---- customers file ---------------------------------------------------------------------------

CUSTOMERS = (
    "customer_id,name,currency,country,industry,payment_terms_days,parent_id\n"
    "C-1,Acme GmbH,EUR,DE,C,30,\n"
    "C-2,Beta SA,EUR,FR,G,45,C-1\n"
)


def test_a_customers_file_registers_them_first(tmp_path: Path) -> None:
    customers = write(tmp_path, CUSTOMERS, "customers.csv")
    plan = plan_import(
        items(tmp_path, GOOD, "C-3,INV-3,10.00,EUR,2026-01-10,2026-02-09,,"),
        settings=SETTINGS,
        customers_path=customers,
    )
    assert plan.ok
    first, second = (m.event for m in plan.messages[:2])
    assert [m.topic for m in plan.messages] == [
        "crm.customers",
        "crm.customers",
        "ar.invoices",
        "ar.invoices",
    ]
    assert first["id"] == "import-customer-C-1" and first["type"] == "customer.registered"
    assert first["data"] == {
        "customer_id": "C-1",
        "name": "Acme GmbH",
        "currency": "EUR",
        "country": "DE",
        "industry": "C",
        "payment_terms_days": 30,
    }
    assert second["data"]["parent_id"] == "C-1"
    assert plan.registered == {"C-1", "C-2"}
    assert plan.unregistered() == {"C-3"}


def test_bad_customer_rows_are_named_too(tmp_path: Path) -> None:
    customers = write(
        tmp_path,
        "customer_id,name,currency,country,payment_terms_days\n"
        "C-1,Acme,EUR,de,30\n"
        "C-2,,EUR,DE,thirty\n"
        "C-1,Acme again,EUR,DE,30\n",
        "customers.csv",
    )
    plan = plan_import(items(tmp_path, GOOD), settings=SETTINGS, customers_path=customers)
    assert [str(e) for e in plan.errors] == [
        "customers row 1: country: String should match pattern '^[A-Z]{2}$'",
        "customers row 2: name: required field is missing",
        "customers row 2: payment_terms_days: Input should be a valid integer",
        "customers row 3: customer_id: duplicate of row 1",
    ]
    assert plan.messages == []


def test_an_invoice_the_policy_cannot_convert_to_the_customers_currency_is_refused(
    tmp_path: Path,
) -> None:
    customers = write(tmp_path, CUSTOMERS, "customers.csv")
    found = errors(
        tmp_path,
        "C-1,INV-1,100.00,BRL,2026-01-10,2026-02-09,,",
        "C-1,INV-2,100.00,USD,2026-01-10,2026-02-09,,",
        customers_path=customers,
        policy=POLICY,
    )
    assert found == [
        "row 1: currency: no FX rate from BRL to EUR (the customer's credit "
        "currency) in policy 2026.1"
    ]


# ---- files that cannot be taken as a whole ----------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty (no header row)"),
        (b"\n\n", "empty (no header row)"),
        (HEADER.encode() + b"\n", "no data rows after the header"),
        (
            b"customer_id,invoice_id,amount\nC-1,I-1,1\n",
            "missing column(s): currency, issue_date, due_date",
        ),
        (HEADER.encode() + b",ammount\n", "unknown column(s): 'ammount'"),
        (
            b"customer_id,invoice_id,amount,currency,issue_date,due_date,amount\n",
            "column(s) named twice: amount",
        ),
        (HEADER.replace(",", ";").encode() + b"\n", "(the file must be comma-separated)"),
        (
            HEADER.encode() + b"\nC-1,INV-\xe9,1.00,EUR,2026-01-01,2026-01-02,,\n",
            "not UTF-8 (invalid byte at offset",
        ),
    ],
)
def test_a_file_that_cannot_be_read_as_a_whole_is_a_clear_error(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(ImportFileError) as caught:
        plan_import(path, settings=SETTINGS)
    assert message in str(caught.value)


# ---- the command ------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command's settings come from the environment: start from the defaults."""
    import os

    for name in list(os.environ):
        if name.startswith("CREDITWATCH_"):
            monkeypatch.delenv(name)


def run_cli(*args: str) -> Result:
    return CliRunner().invoke(app, ["import", "open-items", *args])


@pytest.mark.usefixtures("clean_env")
def test_the_command_validates_and_summarises_a_dry_run(tmp_path: Path) -> None:
    path = items(tmp_path, GOOD, "C-1,INV-2,50.00,EUR,2026-01-10,2026-02-09,,20.00")
    result = run_cli(str(path), "--dry-run")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "rows: 2 open items" in out
    assert "events: 2 invoice.issued, 1 payment.received" in out
    assert "customers: 1" in out
    assert "EUR: invoiced 1,050.00, open 1,020.00" in out
    assert "nothing published" in out


@pytest.mark.usefixtures("clean_env")
def test_the_command_lists_every_fault_and_exits_1(tmp_path: Path) -> None:
    path = items(tmp_path, GOOD, "C-1,INV-1,5.00,EUR,2026-01-10,2026-02-09,,")
    result = run_cli(str(path))
    assert result.exit_code == 1
    assert "row 2: invoice_id: duplicate of row 1" in result.output
    assert "nothing was published" in result.output


@pytest.mark.usefixtures("clean_env")
def test_the_command_exits_2_for_a_file_it_cannot_read(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes(
        HEADER.encode() + "\nC-1,Müller,1.00,EUR,2026-01-01,2026-01-02,,\n".encode("latin-1")
    )
    result = run_cli(str(path))
    assert result.exit_code == 2
    assert "not UTF-8" in result.output
    empty = write(tmp_path, "", "empty.csv")
    assert run_cli(str(empty)).exit_code == 2


def test_the_summary_names_rows_events_customers_and_totals(tmp_path: Path) -> None:
    plan = plan_import(
        items(tmp_path, GOOD, "C-2,INV-2,10,JPY,2026-01-10,2026-02-09,,"), settings=SETTINGS
    )
    assert importer.summary(plan) == [
        "rows: 2 open items",
        "events: 2 invoice.issued",
        "customers: 2",
        "  EUR: invoiced 1,000.00, open 1,000.00",
        "  JPY: invoiced 10, open 10",
    ]
    assert json.loads(plan.messages[1].value)["data"]["currency"] == "JPY"
