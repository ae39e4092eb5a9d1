"""``StateCodec`` (msgspec) writes the bytes pydantic's ``TypeAdapter`` writes and reads
back the same values, for the kinds of value the state dataclasses hold. The services' real
documents are checked the same way after every golden stream (``tests/golden/codec.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import msgspec
import pytest
from pydantic import TypeAdapter

from shared.projection import StateCodec


@dataclass(frozen=True, slots=True)
class Item:
    amount: Decimal
    due: date
    original: tuple[Decimal, str]
    note: str | None = None


@dataclass(frozen=True)
class State:
    customer_id: str
    items: dict[str, Item] = field(default_factory=dict)
    days: dict[date, int] = field(default_factory=dict)
    seen: frozenset[str] = frozenset()
    at: datetime | None = None
    ratios: list[Decimal | None] = field(default_factory=list)
    flag: bool = False
    count: int = 0


VALUES = [
    State("C-1"),
    State(
        "C-2 客户",
        items={
            "I-1": Item(Decimal("1234.50"), date(2026, 1, 31), (Decimal("1E+2"), "USD"), "é"),
            "I-2": Item(Decimal("-0.00"), date(2026, 2, 28), (Decimal("0.000001"), "JPY")),
        },
        days={date(2026, 3, 1): 4, date(2025, 12, 31): -2},
        seen=frozenset({"a"}),
        at=datetime(2026, 3, 1, 8, 30, 0, 123456, tzinfo=UTC),
        ratios=[Decimal("1.23456789012345678901234567"), None, Decimal("-7E-10")],
        flag=True,
        count=2**40,
    ),
    State("C-3", at=datetime(2026, 3, 1, 8, 0, tzinfo=timezone(timedelta(hours=8)))),
    State("C-4", at=datetime(2026, 3, 1, 8, 0, 0, 500000, tzinfo=UTC)),
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: v.customer_id)
def test_given_a_state_when_written_and_read_then_the_bytes_and_the_value_are_pydantics(
    value: State,
) -> None:
    codec: StateCodec[State] = StateCodec(State)
    adapter: TypeAdapter[State] = TypeAdapter(State)
    written = codec.dump(value)
    assert written == adapter.dump_json(value).decode()
    assert codec.load(written) == value == adapter.validate_json(written)
    assert type(codec.load(written).seen) is frozenset


def test_given_a_document_of_another_layout_when_read_then_it_fails_naming_the_path() -> None:
    codec: StateCodec[State] = StateCodec(State)
    with pytest.raises(msgspec.ValidationError, match=r"\$\.items"):
        codec.load('{"customer_id":"C-1","items":{"I-1":{"amount":"1"}}}')
    with pytest.raises(msgspec.DecodeError):
        codec.load('{"customer_id":')


@dataclass(frozen=True)
class Strict:
    __pydantic_config__ = {"extra": "forbid"}  # noqa: RUF012 - as the services declare it

    customer_id: str
    count: int = 0


def test_given_a_type_that_forbids_unknown_keys_when_a_document_has_one_then_it_is_refused() -> (
    None
):
    codec: StateCodec[Strict] = StateCodec(Strict)
    assert codec.load('{"customer_id":"C-1","count":2}') == Strict("C-1", 2)
    with pytest.raises(msgspec.ValidationError, match="unknown field `invoices`"):
        codec.load('{"customer_id":"C-1","invoices":{},"count":2}')
    # A type that does not forbid them (pydantic's default) ignores them, as pydantic does.
    assert StateCodec(Item).load(
        '{"amount":"1","due":"2026-01-01","original":["1","EUR"],"x":1}'
    ) == TypeAdapter(Item).validate_json(
        '{"amount":"1","due":"2026-01-01","original":["1","EUR"],"x":1}'
    )
