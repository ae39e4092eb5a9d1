"""Exact money: ISO 4217 currencies, strict amount parsing, quantisation and FX conversion.

Amounts are `Decimal` end to end; nothing here ever goes through `float`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import (
    ROUND_HALF_EVEN,
    Context,
    Decimal,
    DivisionByZero,
    InvalidOperation,
    Overflow,
)
from types import MappingProxyType
from typing import Final, Literal, TypeGuard

import iso4217 as _iso4217

# ISO 4217 List One, from the `iso4217` package (kept current with SIX's publication): the
# active codes with their minor units. Codes whose minor unit is "N.A." (precious metals
# XAU/XAG/XPD/XPT, the bond-market units XBA-XBD, XDR, XSU, XUA, the testing code XTS and
# XXX "no currency") are real codes, but no amount can be held in them: an invoice or a
# credit limit in them has nothing to round to, and the policy cannot rate them. Withdrawn
# codes (BGN since the euro changeover on 2026-01-01, ANG -> XCG, HRK, CUC, ...) are not
# active and are therefore unknown here.
CURRENCY_MINOR_UNITS: Final[Mapping[str, int]] = MappingProxyType(
    {c.code: c.exponent for c in _iso4217.Currency if c.exponent is not None}
)
CODES_WITHOUT_MINOR_UNITS: Final[frozenset[str]] = frozenset(
    c.code for c in _iso4217.Currency if c.exponent is None
)

MAX_MINOR_UNITS: Final = max(CURRENCY_MINOR_UNITS.values())
MAX_AMOUNT: Final = Decimal(10) ** 15

# 15 integer digits + 4 decimals fit many times over; 50 digits keeps a cross-rate
# conversion (amount * rate * rate / rate) exact to far below any minor unit, so the final
# quantisation is the only rounding that matters.
MONEY_CONTEXT: Final = Context(
    prec=50,
    rounding=ROUND_HALF_EVEN,
    traps=[InvalidOperation, DivisionByZero, Overflow],
)

_QUANTUM: Final = {places: Decimal(1).scaleb(-places) for places in range(MAX_MINOR_UNITS + 1)}
# Plain decimal notation only: optional minus, ASCII digits, optional fraction. No
# exponent, sign "+", whitespace, thousands separators, ".5" or "5.". The length caps keep
# pathological inputs cheap; anything longer is outside MAX_AMOUNT or absurdly scaled.
_DECIMAL_STRING: Final = re.compile(r"-?[0-9]{1,40}(?:\.[0-9]{1,40})?", re.ASCII)

AmountErrorReason = Literal["invalid_amount", "unknown_currency"]


class AmountError(ValueError):
    """An amount or currency that cannot be accepted; `reason` is the dead-letter code."""

    def __init__(self, reason: AmountErrorReason, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.reason: AmountErrorReason = reason
        self.field = field
        self.detail = detail


def is_currency(code: object) -> TypeGuard[str]:
    """True for an active ISO 4217 code (upper case, as the standard writes it)."""
    return isinstance(code, str) and code in CURRENCY_MINOR_UNITS


def is_iso_code(code: object) -> TypeGuard[str]:
    """True for any active ISO 4217 code, also one that no amount can be held in (XAU)."""
    return is_currency(code) or (isinstance(code, str) and code in CODES_WITHOUT_MINOR_UNITS)


def minor_units(code: str) -> int:
    try:
        return CURRENCY_MINOR_UNITS[code]
    except (KeyError, TypeError):
        raise AmountError("unknown_currency", "currency", _unknown_currency(code)) from None


def _unknown_currency(code: object) -> str:
    return f"unknown ISO 4217 currency code {_short_repr(code)}"


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_decimal(
    value: object,
    *,
    field: str,
    places: int,
    allow_zero: bool = False,
    allow_negative: bool = False,
    scale_label: str | None = None,
) -> Decimal:
    """Parse an exact decimal with at most `places` decimals; see `parse_amount`."""
    if isinstance(value, bool):
        raise AmountError("invalid_amount", field, "must be a decimal number, not a boolean")
    if isinstance(value, str):
        if not _DECIMAL_STRING.fullmatch(value):
            raise AmountError(
                "invalid_amount", field, f"not a plain decimal number: {_short_repr(value)}"
            )
        amount = Decimal(value)
    elif isinstance(value, int):
        if abs(value) > MAX_AMOUNT:
            raise AmountError("invalid_amount", field, "exceeds the maximum amount of 10^15")
        amount = Decimal(value)
    elif isinstance(value, Decimal):
        if not value.is_finite():
            raise AmountError("invalid_amount", field, f"not a finite number: {value}")
        amount = value
    elif isinstance(value, float):
        raise AmountError(
            "invalid_amount", field, "binary floats are not exact; send a decimal string"
        )
    else:
        raise AmountError(
            "invalid_amount", field, f"must be a decimal string, not {type(value).__name__}"
        )

    if amount.copy_abs() > MAX_AMOUNT:
        raise AmountError("invalid_amount", field, "exceeds the maximum amount of 10^15")
    if amount.is_zero():
        if not allow_zero:
            raise AmountError("invalid_amount", field, "must not be zero")
    elif amount.is_signed() and not allow_negative:
        raise AmountError("invalid_amount", field, "must not be negative")

    quantized = amount.quantize(_QUANTUM[places], context=MONEY_CONTEXT)
    if quantized != amount:
        detail = (
            f"more decimals than {scale_label} allows ({places})"
            if scale_label
            else f"more than {places} decimals"
        )
        raise AmountError("invalid_amount", field, detail)
    # "-0.00" and "0.00" are the same amount; keep one spelling.
    return quantized.copy_abs() if quantized.is_zero() else quantized


def parse_amount(
    value: object,
    currency: str,
    *,
    field: str,
    allow_zero: bool = False,
    allow_negative: bool = False,
    currency_field: str = "currency",
) -> Decimal:
    """Parse an amount exactly and return it quantised to the currency's minor units.

    Accepts a plain decimal string ("1250.00", "1250", "-3.5") or an already exact JSON
    number (int or Decimal). Rejects floats, booleans, NaN/Infinity, exponent notation in
    strings, |amount| > 10^15, zero (unless allow_zero), negatives (unless allow_negative)
    and any value that is not representable in the currency's minor units. Trailing zeros
    are fine ("10.100" EUR is 10.10): what matters is that no value is lost.
    Raises AmountError with reason "unknown_currency" (checked first) or "invalid_amount".
    """
    places = CURRENCY_MINOR_UNITS.get(currency) if isinstance(currency, str) else None
    if places is None:
        raise AmountError("unknown_currency", currency_field, _unknown_currency(currency))
    return parse_decimal(
        value,
        field=field,
        places=places,
        allow_zero=allow_zero,
        allow_negative=allow_negative,
        scale_label=currency,
    )


def quantize(amount: Decimal, currency: str) -> Decimal:
    """Round to the currency's minor units, half to even (banker's rounding)."""
    return amount.quantize(_QUANTUM[minor_units(currency)], context=MONEY_CONTEXT)


@dataclass(frozen=True)
class Money:
    """An amount with its currency; arithmetic and ordering only within one currency."""

    amount: Decimal
    currency: str

    def __post_init__(self) -> None:
        if not isinstance(self.amount, Decimal) or not self.amount.is_finite():
            raise ValueError(f"Money amount must be a finite Decimal, got {self.amount!r}")
        if not is_currency(self.currency):
            raise AmountError("unknown_currency", "currency", _unknown_currency(self.currency))

    @classmethod
    def zero(cls, currency: str) -> Money:
        return cls(quantize(Decimal(0), currency), currency)

    def _same_currency(self, other: object, operation: str) -> Money:
        if not isinstance(other, Money):
            raise TypeError(f"cannot {operation} Money and {type(other).__name__}")
        if other.currency != self.currency:
            raise ValueError(f"cannot {operation} {self.currency} and {other.currency}")
        return other

    def __add__(self, other: Money) -> Money:
        other = self._same_currency(other, "add")
        return Money(MONEY_CONTEXT.add(self.amount, other.amount), self.currency)

    def __sub__(self, other: Money) -> Money:
        other = self._same_currency(other, "subtract")
        return Money(MONEY_CONTEXT.subtract(self.amount, other.amount), self.currency)

    def __neg__(self) -> Money:
        return Money(MONEY_CONTEXT.minus(self.amount), self.currency)

    def __lt__(self, other: Money) -> bool:
        return self.amount < self._same_currency(other, "compare").amount

    def __le__(self, other: Money) -> bool:
        return self.amount <= self._same_currency(other, "compare").amount

    def __gt__(self, other: Money) -> bool:
        return self.amount > self._same_currency(other, "compare").amount

    def __ge__(self, other: Money) -> bool:
        return self.amount >= self._same_currency(other, "compare").amount

    def __str__(self) -> str:
        return f"{self.amount:f} {self.currency}"


# A rate as an exact fraction (numerator, denominator), so that an inverse or a cross
# rate costs no rounding until the single division in `convert`.
_Fraction = tuple[Decimal, Decimal]


def _rate(from_ccy: str, to_ccy: str, rates: Mapping[str, Decimal]) -> _Fraction | None:
    direct = rates.get(f"{from_ccy}/{to_ccy}")
    if direct is not None:
        return (_checked_rate(f"{from_ccy}/{to_ccy}", direct), Decimal(1))
    reverse = rates.get(f"{to_ccy}/{from_ccy}")
    if reverse is not None:
        return (Decimal(1), _checked_rate(f"{to_ccy}/{from_ccy}", reverse))
    return None


def _checked_rate(pair: str, rate: Decimal) -> Decimal:
    if not isinstance(rate, Decimal) or not rate.is_finite() or rate <= 0:
        raise ValueError(f"fx rate {pair} must be a positive finite Decimal, got {rate!r}")
    return rate


def convert(
    amount: Decimal, from_ccy: str, to_ccy: str, rates: Mapping[str, Decimal]
) -> Decimal | None:
    """Convert with `rates` ("XXX/YYY" -> units of YYY per 1 XXX), quantised to `to_ccy`.

    Uses the direct rate, else the inverse of the reverse pair, else a cross through a
    currency that has a rate (either way) to both sides; the first such pivot in
    alphabetical order wins, so the answer is deterministic. None when there is no path
    or either currency is unknown. The same currency returns the amount unchanged.
    """
    if from_ccy == to_ccy:
        return amount
    fraction = rate_between(from_ccy, to_ccy, rates)
    if fraction is None:
        return None
    numerator, denominator = fraction
    converted = MONEY_CONTEXT.divide(MONEY_CONTEXT.multiply(amount, numerator), denominator)
    return quantize(converted, to_ccy)


def rate_between(
    from_ccy: str, to_ccy: str, rates: Mapping[str, Decimal]
) -> tuple[Decimal, Decimal] | None:
    """The rate `convert` uses, as an exact fraction (numerator, denominator): an amount in
    `from_ccy` times numerator / denominator is in `to_ccy` (before quantising). (1, 1) for
    the same currency; None when there is no path or either currency is unknown."""
    if from_ccy == to_ccy:
        return (Decimal(1), Decimal(1))
    if not (is_currency(from_ccy) and is_currency(to_ccy)):
        return None
    fraction = _rate(from_ccy, to_ccy, rates)
    if fraction is None:
        pivots = sorted({code for pair in rates for code in pair.split("/")} - {from_ccy, to_ccy})
        for pivot in pivots:
            if not is_currency(pivot):
                continue
            first = _rate(from_ccy, pivot, rates)
            second = _rate(pivot, to_ccy, rates) if first is not None else None
            if first is not None and second is not None:
                fraction = (
                    MONEY_CONTEXT.multiply(first[0], second[0]),
                    MONEY_CONTEXT.multiply(first[1], second[1]),
                )
                break
    return fraction
