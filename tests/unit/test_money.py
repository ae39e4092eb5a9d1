"""Money: currency table, strict amount parsing, quantisation, Money and FX conversion."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.money import (
    CURRENCY_MINOR_UNITS,
    MAX_AMOUNT,
    AmountError,
    Money,
    convert,
    is_currency,
    minor_units,
    parse_amount,
    parse_decimal,
    quantize,
)

D = Decimal

# -- the currency table -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "places"),
    [
        ("EUR", 2),
        ("USD", 2),
        ("GBP", 2),
        ("CHF", 2),
        ("JPY", 0),
        ("KRW", 0),
        ("ISK", 0),
        ("XOF", 0),
        ("KWD", 3),
        ("BHD", 3),
        ("TND", 3),
        ("CLF", 4),
        ("UYW", 4),
        ("XCG", 2),
        ("ZWG", 2),
        ("SLE", 2),
        ("VED", 2),
    ],
)
def test_an_active_iso_4217_code_has_its_minor_units(code: str, places: int) -> None:
    assert is_currency(code)
    assert minor_units(code) == places


def test_the_table_holds_every_active_currency() -> None:
    # List One has 165 codes with numeric minor units as of 2026-01-01.
    assert len(CURRENCY_MINOR_UNITS) == 165
    assert all(len(code) == 3 and code.isupper() for code in CURRENCY_MINOR_UNITS)
    assert set(CURRENCY_MINOR_UNITS.values()) == {0, 2, 3, 4}


@pytest.mark.parametrize(
    "code",
    [
        "XYZ",
        "eur",
        "Eur",
        "EURO",
        "",
        " EUR",
        "HRK",  # withdrawn 2023 (euro)
        "BGN",  # withdrawn 2026 (euro)
        "ANG",  # replaced by XCG
        "XAU",  # gold: no minor unit, not a currency to invoice in
        "XXX",  # "no currency"
        "XTS",  # testing code
    ],
)
def test_a_code_that_is_not_an_active_currency_is_unknown(code: str) -> None:
    assert not is_currency(code)
    with pytest.raises(AmountError) as caught:
        minor_units(code)
    assert caught.value.reason == "unknown_currency"


@pytest.mark.parametrize("value", [None, 978, b"EUR"])
def test_a_non_string_is_never_a_currency(value: object) -> None:
    assert not is_currency(value)


# -- parse_amount: accepted -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "currency", "expected"),
    [
        ("1250.00", "EUR", "1250.00"),
        ("1250", "EUR", "1250.00"),
        ("10.1", "EUR", "10.10"),
        ("10.10", "EUR", "10.10"),
        ("10.100", "EUR", "10.10"),  # trailing zeros lose nothing
        ("0.01", "EUR", "0.01"),
        ("1000", "JPY", "1000"),
        ("1000.0", "JPY", "1000"),
        ("1.234", "KWD", "1.234"),
        ("0.0001", "CLF", "0.0001"),
        ("1000000000000000", "EUR", "1000000000000000.00"),  # exactly 10^15
        ("999999999999999.99", "EUR", "999999999999999.99"),
        (1250, "EUR", "1250.00"),
        (D("1250.5"), "EUR", "1250.50"),
        (D("1.25E+3"), "EUR", "1250.00"),  # a JSON number 1.25e3, parsed exactly
    ],
)
def test_a_valid_amount_is_returned_exact_and_quantized(
    value: object, currency: str, expected: str
) -> None:
    parsed = parse_amount(value, currency, field="amount")
    assert parsed == D(expected)
    assert str(parsed) == expected


def test_a_json_number_amount_is_exact_where_a_float_would_drift() -> None:
    # Given 0.1 + 0.2 as the JSON number 0.3, parsed with parse_float=Decimal
    # When it is parsed as EUR
    parsed = parse_amount(D("0.1") + D("0.2"), "EUR", field="amount")
    # Then it is exactly 0.30, not 0.30000000000000004
    assert parsed == D("0.30")
    assert parse_amount(D("1250.10"), "EUR", field="amount") == D("1250.10")


def test_a_negative_amount_is_accepted_only_when_allowed() -> None:
    assert parse_amount("-3.5", "EUR", field="equity", allow_negative=True) == D("-3.50")
    with pytest.raises(AmountError) as caught:
        parse_amount("-3.5", "EUR", field="equity")
    assert caught.value.reason == "invalid_amount"
    assert "negative" in str(caught.value)


def test_zero_is_accepted_only_when_allowed_and_has_no_sign() -> None:
    assert parse_amount("0", "EUR", field="cash", allow_zero=True) == D("0.00")
    negative_zero = parse_amount("-0.00", "EUR", field="cash", allow_zero=True)
    assert str(negative_zero) == "0.00"
    with pytest.raises(AmountError, match="zero"):
        parse_amount("0.00", "EUR", field="amount")
    with pytest.raises(AmountError, match="zero"):
        parse_amount("-0", "EUR", field="amount", allow_negative=True)


# -- parse_amount: rejected -----------------------------------------------------------------


def test_an_amount_with_more_decimals_than_the_currency_allows_is_rejected() -> None:
    with pytest.raises(AmountError) as caught:
        parse_amount("10.001", "EUR", field="amount")
    assert caught.value.reason == "invalid_amount"
    assert caught.value.field == "amount"
    assert str(caught.value) == "amount: more decimals than EUR allows (2)"


@pytest.mark.parametrize(
    ("value", "currency"),
    [
        ("100.5", "JPY"),
        (D("100.5"), "JPY"),
        ("1.2345", "KWD"),
        ("0.00001", "CLF"),
        (D("1250.105"), "EUR"),
        (D("1E-400"), "EUR"),
        ("0.000000000000000000000000000000000000001", "EUR"),
    ],
)
def test_a_badly_scaled_amount_is_rejected(value: object, currency: str) -> None:
    with pytest.raises(AmountError) as caught:
        parse_amount(value, currency, field="amount")
    assert caught.value.reason == "invalid_amount"


@pytest.mark.parametrize(
    "value",
    [
        "1000000000000000.01",
        "-1000000000000000.01",
        10**15 + 1,
        10**400,
        D("1E+400"),
        D("1e16"),
    ],
)
def test_an_amount_above_ten_to_the_fifteen_is_rejected(value: object) -> None:
    with pytest.raises(AmountError) as caught:
        parse_amount(value, "EUR", field="amount", allow_negative=True)
    assert caught.value.reason == "invalid_amount"
    assert "10^15" in caught.value.detail


@pytest.mark.parametrize(
    "value",
    [
        "12a",
        "",
        " 12",
        "12 ",
        "1,000.00",
        "1 000.00",
        "1e3",
        "1E400",
        "NaN",
        "nan",
        "Infinity",
        "-Infinity",
        "+5",
        ".5",
        "5.",
        "--5",
        "0x10",
        "1_000",
        "１２",  # full-width digits
        "٣",  # Arabic-Indic digit
        "1" * 41,
        True,
        False,
        1.5,
        0.0,
        None,
        [],
        {},
        b"12",
        D("NaN"),
        D("sNaN"),
        D("Infinity"),
        D("-Infinity"),
    ],
)
def test_a_value_that_is_not_an_exact_decimal_is_rejected(value: object) -> None:
    with pytest.raises(AmountError) as caught:
        parse_amount(value, "EUR", field="amount", allow_zero=True, allow_negative=True)
    assert caught.value.reason == "invalid_amount"
    assert str(caught.value).startswith("amount: ")


def test_a_float_is_rejected_even_when_it_looks_harmless() -> None:
    with pytest.raises(AmountError, match="float"):
        parse_amount(1250.0, "EUR", field="amount")


def test_the_currency_is_checked_before_the_amount() -> None:
    with pytest.raises(AmountError) as caught:
        parse_amount("not a number", "XYZ", field="amount")
    assert caught.value.reason == "unknown_currency"
    assert caught.value.field == "currency"
    assert "XYZ" in str(caught.value)


def test_the_currency_field_name_can_be_given() -> None:
    with pytest.raises(AmountError) as caught:
        parse_amount("1.00", "eur", field="amount", currency_field="data.currency")
    assert caught.value.field == "data.currency"
    assert str(caught.value).startswith("data.currency: ")


def test_a_decimal_can_be_parsed_by_scale_alone_before_its_currency_is_known() -> None:
    assert parse_decimal("12.3456", field="x", places=4) == D("12.3456")
    with pytest.raises(AmountError, match="more than 4 decimals"):
        parse_decimal("12.34567", field="x", places=4)


# -- quantize -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "currency", "expected"),
    [
        ("0.125", "EUR", "0.12"),  # half to even: down
        ("0.135", "EUR", "0.14"),  # half to even: up
        ("-0.125", "EUR", "-0.12"),
        ("2.5", "JPY", "2"),
        ("3.5", "JPY", "4"),
        ("1.23456", "KWD", "1.235"),
        ("7", "CLF", "7.0000"),
        ("999999999999999.995", "EUR", "1000000000000000.00"),
    ],
)
def test_quantize_rounds_half_to_even_to_the_minor_units(
    amount: str, currency: str, expected: str
) -> None:
    assert str(quantize(D(amount), currency)) == expected


def test_quantize_refuses_an_unknown_currency() -> None:
    with pytest.raises(AmountError):
        quantize(D("1"), "XYZ")


# -- Money ----------------------------------------------------------------------------------


def test_money_adds_and_subtracts_within_one_currency() -> None:
    a = Money(D("1250.00"), "EUR")
    b = Money(D("250.50"), "EUR")
    assert a + b == Money(D("1500.50"), "EUR")
    assert a - b == Money(D("999.50"), "EUR")
    assert -b == Money(D("-250.50"), "EUR")


def test_money_stays_exact_at_the_largest_amounts() -> None:
    # 10^15 with four decimals is 20 digits; the default context (28) would still do,
    # but sums of many such amounts must not round either.
    big = Money(D("999999999999999.9999"), "CLF")
    total = Money.zero("CLF")
    for _ in range(1000):
        total = total + big
    assert total.amount == D("999999999999999999.9000")


def test_money_in_different_currencies_cannot_be_combined_or_ordered() -> None:
    eur = Money(D("1.00"), "EUR")
    usd = Money(D("1.00"), "USD")
    with pytest.raises(ValueError, match="EUR and USD"):
        _ = eur + usd
    with pytest.raises(ValueError):
        _ = eur - usd
    with pytest.raises(ValueError):
        _ = eur < usd
    with pytest.raises(ValueError):
        _ = eur >= usd
    assert eur != usd  # equality is just "not the same money", never an error


def test_money_orders_within_one_currency() -> None:
    small, large = Money(D("1.00"), "EUR"), Money(D("2.00"), "EUR")
    assert small < large <= large
    assert large > small >= small
    assert max(small, large) is large


def test_money_zero_and_str_show_the_currencys_minor_units() -> None:
    assert Money.zero("EUR") == Money(D("0.00"), "EUR")
    assert str(Money.zero("EUR")) == "0.00 EUR"
    assert str(Money.zero("JPY")) == "0 JPY"
    assert str(Money(D("1250.00"), "EUR")) == "1250.00 EUR"
    assert str(Money(D("1E+3"), "JPY")) == "1000 JPY"


def test_money_rejects_an_unknown_currency_and_a_non_decimal_amount() -> None:
    with pytest.raises(AmountError):
        Money(D("1"), "XYZ")
    with pytest.raises(ValueError):
        Money(1.5, "EUR")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Money(D("NaN"), "EUR")


def test_money_is_immutable_and_hashable() -> None:
    money = Money(D("1.00"), "EUR")
    with pytest.raises(AttributeError):
        money.amount = D("2.00")  # type: ignore[misc]
    assert {money, Money(D("1.00"), "EUR")} == {money}


# -- convert --------------------------------------------------------------------------------

RATES = {"EUR/USD": D("1.0850"), "EUR/GBP": D("0.8600"), "USD/JPY": D("151.25")}


def test_converting_to_the_same_currency_leaves_the_amount_unchanged() -> None:
    assert convert(D("10.005"), "EUR", "EUR", {}) == D("10.005")


def test_a_direct_rate_converts_and_quantizes_to_the_target() -> None:
    assert convert(D("100.00"), "EUR", "USD", RATES) == D("108.50")
    assert convert(D("0.05"), "EUR", "USD", RATES) == D("0.05")  # 0.05425 -> 0.05


def test_the_reverse_pair_is_used_inverted() -> None:
    assert convert(D("108.50"), "USD", "EUR", RATES) == D("100.00")
    assert convert(D("86.00"), "GBP", "EUR", RATES) == D("100.00")


def test_a_cross_rate_goes_through_a_common_currency() -> None:
    # GBP -> EUR (inverse of EUR/GBP) -> USD (direct)
    assert convert(D("86.00"), "GBP", "USD", RATES) == D("108.50")
    # EUR -> USD -> JPY: 100 * 1.085 * 151.25 = 16410.625 -> 16411 (JPY has no decimals)
    assert convert(D("100.00"), "EUR", "JPY", RATES) == D("16411")
    # JPY -> USD -> EUR, both legs inverted: 16410.625... back to 100.00
    assert convert(D("16411"), "JPY", "EUR", RATES) == D("100.00")


def test_a_cross_rate_is_computed_exactly_before_the_one_rounding() -> None:
    # 1/3 twice would drift if each leg were rounded; as a fraction it is exact.
    rates = {"EUR/USD": D("3"), "EUR/CHF": D("3")}
    assert convert(D("1000000000000000.00"), "USD", "CHF", rates) == D("1000000000000000.00")


def test_there_is_no_conversion_without_a_rate_path() -> None:
    assert convert(D("1.00"), "EUR", "CHF", RATES) is None
    assert convert(D("1.00"), "EUR", "USD", {}) is None
    assert convert(D("1.00"), "EUR", "XYZ", {"EUR/XYZ": D("2")}) is None


def test_a_non_positive_rate_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="EUR/USD"):
        convert(D("1.00"), "EUR", "USD", {"EUR/USD": D("0")})
    with pytest.raises(ValueError):
        convert(D("1.00"), "USD", "EUR", {"EUR/USD": D("-1")})


# -- properties -----------------------------------------------------------------------------

_CURRENCIES = sorted(CURRENCY_MINOR_UNITS)


@st.composite
def quantized_amounts(draw: st.DrawFn) -> tuple[Decimal, str]:
    currency = draw(st.sampled_from(_CURRENCIES))
    places = CURRENCY_MINOR_UNITS[currency]
    bound = int(MAX_AMOUNT) * 10**places
    units = draw(st.integers(min_value=-bound, max_value=bound))
    return D(units).scaleb(-places), currency


@given(quantized_amounts())
def test_any_quantized_amount_in_range_parses_back_to_itself(case: tuple[Decimal, str]) -> None:
    amount, currency = case
    as_string = parse_amount(str(amount), currency, field="a", allow_zero=True, allow_negative=True)
    as_number = parse_amount(amount, currency, field="a", allow_zero=True, allow_negative=True)
    assert as_string == amount == as_number
    assert as_string.as_tuple().exponent == -CURRENCY_MINOR_UNITS[currency]


_PAIRS = [("EUR", "USD"), ("EUR", "JPY"), ("USD", "KWD"), ("GBP", "CHF"), ("CLF", "CLP")]


@st.composite
def round_trips(draw: st.DrawFn) -> tuple[Decimal, str, str, Decimal]:
    source, target = draw(st.sampled_from(_PAIRS + [(b, a) for a, b in _PAIRS]))
    unit_source = D(1).scaleb(-CURRENCY_MINOR_UNITS[source])
    unit_target = D(1).scaleb(-CURRENCY_MINOR_UNITS[target])
    # Going through the target loses at most half its minor unit, which is within half a
    # source unit once converted back when rate >= unit_target / unit_source.
    lowest = max(unit_target / unit_source, D("0.000001"))
    rate = draw(st.decimals(min_value=lowest, max_value=D(100000), places=6, allow_nan=False))
    places = CURRENCY_MINOR_UNITS[source]
    units = draw(st.integers(min_value=1, max_value=10**12 * 10**places))
    return D(units).scaleb(-places), source, target, rate


@given(round_trips(), st.booleans())
def test_convert_round_trips_within_one_minor_unit(
    case: tuple[Decimal, str, str, Decimal], quoted_the_other_way: bool
) -> None:
    amount, source, target, rate = case
    rates = (
        {f"{target}/{source}": 1 / rate} if quoted_the_other_way else {f"{source}/{target}": rate}
    )
    there = convert(amount, source, target, rates)
    assert there is not None
    back = convert(there, target, source, rates)
    assert back is not None
    unit = D(1).scaleb(-CURRENCY_MINOR_UNITS[source])
    assert abs(back - amount) <= unit
