"""ISO 4217 codes as the kit knows them: from the `iso4217` package, the active codes with
minor units hold amounts; real codes without minor units (XAU) are not unknown, they are
codes no rate can reach (issue 19, finding 12)."""

from __future__ import annotations

import json

import pytest

from shared.events import NO_FX_RATE, UNKNOWN_CURRENCY, DeadLetter, decode, parse
from shared.money import CODES_WITHOUT_MINOR_UNITS, CURRENCY_MINOR_UNITS, is_currency, is_iso_code
from shared.runtime import _describe


def _invoice(currency: str) -> bytes:
    return json.dumps(
        {
            "specversion": "1.0",
            "id": "inv-1",
            "source": "/erp",
            "type": "invoice.issued",
            "subject": "C-1",
            "time": "2026-03-01T09:00:00Z",
            "data": {
                "invoice_id": "I-1",
                "customer_id": "C-1",
                "amount": "10.00",
                "currency": currency,
                "issue_date": "2026-03-01",
                "due_date": "2026-03-31",
            },
        }
    ).encode()


def _dead_letter(raw: bytes) -> DeadLetter:
    with pytest.raises(DeadLetter) as caught:
        parse(decode(raw))
    return caught.value


@pytest.mark.parametrize("code", ["XAU", "XAG", "XDR", "XTS"])
def test_given_an_iso_code_without_minor_units_when_an_invoice_uses_it_then_it_is_no_fx_rate(
    code: str,
) -> None:
    error = _dead_letter(_invoice(code))
    assert error.reason == NO_FX_RATE
    assert error.field == "data.currency" and code in error.error


@pytest.mark.parametrize("code", ["ZZZ", "BGN", "eur"])
def test_given_a_code_that_is_not_active_iso_4217_when_used_then_it_is_unknown_currency(
    code: str,
) -> None:
    assert _dead_letter(_invoice(code)).reason == UNKNOWN_CURRENCY


def test_the_table_has_the_standard_minor_units_and_keeps_the_na_codes_apart() -> None:
    assert (CURRENCY_MINOR_UNITS["EUR"], CURRENCY_MINOR_UNITS["JPY"]) == (2, 0)
    assert (CURRENCY_MINOR_UNITS["BHD"], CURRENCY_MINOR_UNITS["CLF"]) == (3, 4)
    assert "XAU" in CODES_WITHOUT_MINOR_UNITS and "XAU" not in CURRENCY_MINOR_UNITS
    assert is_iso_code("XAU") and not is_currency("XAU")
    assert not is_iso_code("BGN")  # withdrawn on 2026-01-01


def test_a_long_error_text_says_it_was_cut() -> None:
    text = _describe(ValueError("x" * 2000))
    assert len(text) <= 500 and text.endswith("…[truncated]")
    assert _describe(ValueError("short")) == "ValueError: short"
