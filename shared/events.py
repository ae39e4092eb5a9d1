"""The event contract (contract.md §1): CloudEvents envelope, one frozen model per event
type's `data`, strict decoding of Kafka records, and dead-letter records.

`decode(raw)` -> `Envelope`, then `parse(envelope)` -> the typed `data` model (or None for
an unknown type). Both raise `DeadLetter` with a reason code for anything to be set aside.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
from collections.abc import Callable, Iterator, Mapping
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Final, Literal

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    Strict,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from shared.money import (
    MAX_MINOR_UNITS,
    MONEY_CONTEXT,
    AmountError,
    is_currency,
    is_iso_code,
    parse_amount,
    parse_decimal,
    quantize,
)

# -- dead letters -------------------------------------------------------------------------

INVALID_JSON: Final = "invalid_json"
NOT_UTF8: Final = "not_utf8"
MISSING_FIELD: Final = "missing_field"
INVALID_FIELD: Final = "invalid_field"
INVALID_AMOUNT: Final = "invalid_amount"
UNKNOWN_CURRENCY: Final = "unknown_currency"
DUE_BEFORE_ISSUE: Final = "due_before_issue"
OVERSIZE: Final = "oversize"
NO_FX_RATE: Final = "no_fx_rate"
INVALID_DATE: Final = "invalid_date"
WRONG_TOPIC: Final = "wrong_topic"

REASONS: Final = frozenset(
    {
        INVALID_JSON,
        NOT_UTF8,
        MISSING_FIELD,
        INVALID_FIELD,
        INVALID_AMOUNT,
        UNKNOWN_CURRENCY,
        DUE_BEFORE_ISSUE,
        OVERSIZE,
        NO_FX_RATE,
        INVALID_DATE,
        WRONG_TOPIC,
    }
)

MAX_RECORD_BYTES: Final = 1024 * 1024
MAX_STRING_CHARS: Final = 1000
# What a dead-letter record keeps of a value that is too big to carry whole, and the room
# a whole value may take in the dead-letter record (the rest is for the other fields).
DEAD_LETTER_VALUE_BYTES: Final = 64 * 1024
_DEAD_LETTER_VALUE_ROOM: Final = MAX_RECORD_BYTES - 16 * 1024


class DeadLetter(Exception):
    """A record to set aside on `credit.dlq`: `reason` is the code, `error` says why."""

    def __init__(self, reason: str, error: str, field: str | None = None) -> None:
        super().__init__(error)
        self.reason = reason
        self.error = error
        self.field = field

    def __repr__(self) -> str:
        return f"DeadLetter({self.reason!r}, {self.error!r}, field={self.field!r})"


# -- reusable field types -----------------------------------------------------------------


def _custom_error(reason: str, detail: str, field: str | None = None) -> PydanticCustomError:
    # The detail goes in as context so that braces in echoed input are never formatted.
    context: dict[str, Any] = {"detail": detail}
    if field is not None:
        context["field"] = field
    return PydanticCustomError(reason, "{detail}", context)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_ISO_DATE: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", re.ASCII)
_RFC3339: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?"
    r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})",
    re.ASCII,
)


def _iso_date(value: object) -> object:
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        return value
    if isinstance(value, str) and _ISO_DATE.fullmatch(value):
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            raise _custom_error(INVALID_DATE, f"not a calendar date: {value!r}") from None
    raise _custom_error(
        INVALID_DATE, f"expected an ISO 8601 date (YYYY-MM-DD), got {_short(value)}"
    )


def _in_utc(value: dt.datetime) -> dt.datetime:
    return (
        value
        if value.utcoffset() == dt.timedelta(0) and value.tzinfo is dt.UTC
        else (value.astimezone(dt.UTC))
    )


def _rfc3339_parser(reason: str, *, allow_date: bool = False) -> Callable[[object], object]:
    def parse(value: object) -> object:
        if isinstance(value, dt.datetime):
            return value  # a producer's own datetime; AwareDatetime still rejects naive ones
        if isinstance(value, str):
            if _RFC3339.fullmatch(value):
                # fromisoformat keeps microseconds (nanoseconds are cut) and wants "T"/"Z".
                try:
                    return dt.datetime.fromisoformat(value.upper())
                except ValueError:
                    pass
            elif allow_date and _ISO_DATE.fullmatch(value):
                try:
                    return dt.datetime.combine(dt.date.fromisoformat(value), dt.time(), dt.UTC)
                except ValueError:
                    pass
        raise _custom_error(
            reason, f"expected an RFC 3339 timestamp with a UTC offset, got {_short(value)}"
        )

    return parse


def _currency(value: object) -> object:
    if isinstance(value, str) and not is_currency(value):
        raise _custom_error(UNKNOWN_CURRENCY, f"unknown ISO 4217 currency code {_short(value)}")
    return value  # anything that is not a string fails the str schema: invalid_field


def _currency_in_scope(info: ValidationInfo) -> str | None:
    # `parse` passes the event's currency as context so that nested objects (the balance
    # sheet of a financial statement) are scaled by it too; a model validated directly
    # falls back on its own `currency` field, which is declared before its amounts.
    context = info.context
    if isinstance(context, dict):
        currency = context.get("currency")
        if is_currency(currency):
            return currency
    currency = info.data.get("currency")
    return currency if is_currency(currency) else None


def _amount_parser(
    *, allow_zero: bool, allow_negative: bool
) -> Callable[[object, ValidationInfo], Decimal]:
    def parse(value: object, info: ValidationInfo) -> Decimal:
        field = info.field_name or "amount"
        currency = _currency_in_scope(info)
        try:
            if currency is None:
                return parse_decimal(
                    value,
                    field=field,
                    places=MAX_MINOR_UNITS,
                    allow_zero=allow_zero,
                    allow_negative=allow_negative,
                )
            return parse_amount(
                value, currency, field=field, allow_zero=allow_zero, allow_negative=allow_negative
            )
        except AmountError as exc:
            raise _custom_error(exc.reason, exc.detail) from None

    return parse


def _json_int(value: object) -> object:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _custom_error(INVALID_FIELD, f"expected a whole number, got {_short(value)}")


def _plain_decimal(value: Decimal) -> str:
    return format(value, "f")


_AS_PLAIN_STRING: Final = PlainSerializer(_plain_decimal, return_type=str, when_used="json")

# What the published JSON Schemas say of the types below (tools/schemas.py): the
# validators accept more Python values than JSON can carry, so their own schemas are vague.
_MAX_AMOUNT_NUMBER: Final = 10**15


def _decimal_schema(
    pattern: str, *, minimum: int | None = None, exclusive: bool = False, maximum: bool = True
) -> tuple[WithJsonSchema, WithJsonSchema]:
    """Decimal fields: written as decimal strings; read from strings or exact JSON numbers."""
    written: dict[str, Any] = {"type": "string", "pattern": pattern}
    number: dict[str, Any] = {"type": "number"}
    if minimum is not None:
        number["exclusiveMinimum" if exclusive else "minimum"] = minimum
    if maximum:
        number["maximum"] = _MAX_AMOUNT_NUMBER
        if minimum is None:
            number["minimum"] = -_MAX_AMOUNT_NUMBER
    return (
        WithJsonSchema(written, mode="serialization"),
        WithJsonSchema({"anyOf": [written, number]}, mode="validation"),
    )


_POSITIVE_PATTERN: Final = r"^(?=.*[1-9])[0-9]{1,40}(\.[0-9]{1,40})?$"
_UNSIGNED_PATTERN: Final = r"^[0-9]{1,40}(\.[0-9]{1,40})?$"
_SIGNED_PATTERN: Final = r"^-?[0-9]{1,40}(\.[0-9]{1,40})?$"

NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]
StrictInt = Annotated[int, Strict()]
StrictBool = Annotated[bool, Strict()]
CurrencyCode = Annotated[
    str,
    BeforeValidator(_currency),
    WithJsonSchema({"type": "string", "pattern": "^[A-Z]{3}$", "description": "ISO 4217"}),
]
IsoDate = Annotated[dt.date, BeforeValidator(_iso_date)]
EventTimestamp = Annotated[AwareDatetime, BeforeValidator(_rfc3339_parser(INVALID_DATE))]
Amount = Annotated[
    Decimal,
    BeforeValidator(_amount_parser(allow_zero=False, allow_negative=False)),
    _AS_PLAIN_STRING,
    *_decimal_schema(_POSITIVE_PATTERN, minimum=0, exclusive=True),
]
"""A money amount > 0, exact, in the event's currency's minor units."""
NonNegativeAmount = Annotated[
    Decimal,
    BeforeValidator(_amount_parser(allow_zero=True, allow_negative=False)),
    _AS_PLAIN_STRING,
    *_decimal_schema(_UNSIGNED_PATTERN, minimum=0),
]
SignedAmount = Annotated[
    Decimal,
    BeforeValidator(_amount_parser(allow_zero=True, allow_negative=True)),
    _AS_PLAIN_STRING,
    *_decimal_schema(_SIGNED_PATTERN),
]

_PLAIN_DECIMAL: Final = re.compile(r"-?[0-9]{1,40}(?:\.[0-9]{1,40})?", re.ASCII)


def _exact_decimal(value: object) -> Decimal:
    if (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, str) and _PLAIN_DECIMAL.fullmatch(value)
    ):
        value = Decimal(value)
    # The bound is far beyond any amount or score; it keeps "1e999999" from being written
    # out as a million digits.
    if (
        isinstance(value, Decimal)
        and value.is_finite()
        and (value.is_zero() or value.adjusted() <= 30)
    ):
        return value
    raise _custom_error(INVALID_FIELD, f"expected an exact decimal number, got {_short(value)}")


ExactDecimal = Annotated[
    Decimal,
    BeforeValidator(_exact_decimal),
    _AS_PLAIN_STRING,
    *_decimal_schema(r"^-?[0-9]+(\.[0-9]+)?$", maximum=False),
]
"""Any finite decimal (int, Decimal or numeric string; never float): scores, ratios, and
the lenient figures of output events."""


# -- envelope -----------------------------------------------------------------------------


def _json_content_type(value: object) -> object:
    if isinstance(value, str):
        media_type = value.split(";", 1)[0].strip().lower()
        if media_type != "application/json" and not media_type.endswith("+json"):
            raise _custom_error(INVALID_FIELD, f"data must be JSON, not {_short(value)}")
    return value


# The CloudEvents Kafka protocol binding (structured content mode): the record's
# content-type header names the event format. A reader that follows the binding takes a
# record without it for binary mode, where the attributes are in ce_* headers: it would not
# find them and would read the whole event as its data.
STRUCTURED_CONTENT_TYPE: Final = "application/cloudevents+json; charset=UTF-8"
KAFKA_HEADERS: Final[list[tuple[str, bytes]]] = [
    ("content-type", STRUCTURED_CONTENT_TYPE.encode("ascii"))
]

# W3C Trace Context, as the CloudEvents distributed-tracing extension carries it.
TRACE_EXTENSIONS: Final = ("traceparent", "tracestate")
_TRACEPARENT: Final = re.compile(
    r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-[^\s]*)?", re.ASCII
)
_TRACESTATE: Final = re.compile(r"[\x20-\x7e]{1,512}", re.ASCII)


def valid_traceparent(value: object) -> bool:
    """A W3C ``traceparent`` a receiver may continue (Trace Context §3.2): lower-case hex,
    version not ff, trace id and parent id not all zeros, and version 00 exactly 55
    characters (a later version may carry more fields, behind a dash)."""
    if not isinstance(value, str):
        return False
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return False
    version, trace_id, parent_id, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return False
    return trace_id != "0" * 32 and parent_id != "0" * 16


def trace_context(extensions: Mapping[str, Any] | None) -> dict[str, str]:
    """The trace context an output event derived from an event with these extension
    attributes carries on: its ``traceparent`` (and ``tracestate``) as they came, or nothing
    when it has none or an invalid one (W3C: an invalid traceparent is ignored, and its
    tracestate with it). creditwatch records no spans of its own, so it passes the context on
    unchanged: what consumes the output joins the upstream producer's trace."""
    if not extensions:
        return {}
    parent = extensions.get("traceparent")
    if not valid_traceparent(parent):
        return {}
    assert isinstance(parent, str)
    out = {"traceparent": parent}
    state = extensions.get("tracestate")
    if isinstance(state, str) and _TRACESTATE.fullmatch(state):
        out["tracestate"] = state
    return out


class Envelope(BaseModel):
    """A CloudEvents 1.0 event in structured JSON mode.

    Extension attributes (any member besides the context attributes below and ``data``)
    are kept as they came, in ``extensions``, and written back by ``to_json``; the event
    store holds them with the event. Which of them output events carry on: ``trace_context``.
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    specversion: Literal["1.0"]
    id: NonEmptyStr
    source: NonEmptyStr
    type: NonEmptyStr
    subject: NonEmptyStr
    # In UTC, as the event store gives it back: a live fold and a replay see the same value
    # (an offset kept live showed in alert bodies as "+02:00" and on replay as "Z").
    time: Annotated[
        AwareDatetime,
        BeforeValidator(_rfc3339_parser(INVALID_FIELD)),
        AfterValidator(_in_utc),
    ]
    datacontenttype: Annotated[str, BeforeValidator(_json_content_type)] = "application/json"
    data: dict[str, Any]

    @property
    def extensions(self) -> dict[str, Any]:
        """The extension attributes, as they came (empty for most events)."""
        return dict(self.__pydantic_extra__ or {})

    @property
    def trace(self) -> dict[str, str]:
        """The W3C trace context that events derived from this one carry on."""
        return trace_context(self.__pydantic_extra__)

    def to_json(self) -> bytes:
        """UTF-8 JSON: Decimals as strings, datetimes RFC 3339 ("Z" for UTC), dates ISO.

        The bytes are pydantic's (``model_dump_json``). orjson writes the same bytes for the
        plain JSON the services build (strings, numbers, booleans, lists, dicts, datetimes)
        in about a third of the time; what it refuses (a Decimal, a lone surrogate, an int
        beyond 64 bits, a key that is not a string) goes through pydantic. A property test
        holds the two to the same bytes. Extension attributes follow ``data``, where pydantic
        writes them."""
        document = {
            "specversion": self.specversion,
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "subject": self.subject,
            "time": self.time,
            "datacontenttype": self.datacontenttype,
            "data": self.data,
        }
        extra = self.__pydantic_extra__
        if extra:
            document.update(extra)
        try:
            return orjson.dumps(document, option=orjson.OPT_UTC_Z)
        except TypeError:
            return self.model_dump_json().encode("utf-8")

    @property
    def key(self) -> bytes:
        """The Kafka key: the customer id."""
        return self.subject.encode("utf-8")


def trusted_event(
    type: str,
    *,
    source: str,
    subject: str,
    data: dict[str, Any],
    id: str,
    time: dt.datetime,
    extensions: Mapping[str, str] | None = None,
) -> Envelope:
    """An output event whose ``data`` the service built itself in JSON form (strings for
    money), skipping validation on the hot path. The shapes are pinned by unit tests that
    validate them against the contract models; use ``new_event`` everywhere else.
    ``extensions``: the extension attributes it carries (``trace_context`` of its cause)."""
    fields: dict[str, Any] = {
        "specversion": "1.0",
        "id": id,
        "source": source,
        "type": type,
        "subject": subject,
        "time": time,
        "datacontenttype": "application/json",
        "data": data,
        **_extensions(extensions),
    }
    return Envelope.model_construct(**fields)


_ENVELOPE_FIELDS: Final = frozenset(Envelope.model_fields)


def _extensions(extensions: Mapping[str, str] | None) -> dict[str, str]:
    if not extensions:
        return {}
    clash = _ENVELOPE_FIELDS.intersection(extensions)
    if clash:
        raise ValueError(f"not extension attributes: {sorted(clash)}")
    return dict(extensions)


def _reject_json_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


# JSON escapes for UTF-16 surrogates; only these can decode to text that is not Unicode.
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")


def _may_hold_long_string(text: str, limit: int) -> bool:
    # A decoded string is never longer than its raw form, and the raw form of a string
    # without escaped quotes lies between two quote marks; so unless some stretch between
    # quotes is long enough (or quotes are escaped), no string can be over the limit and
    # the walk over the parsed document is skipped. Short records skip even this.
    if len(text) <= limit:
        return False
    return '\\"' in text or max(map(len, text.split('"'))) > limit


def decode(raw: bytes | None, *, max_string_chars: int | None = MAX_STRING_CHARS) -> Envelope:
    """Decode one Kafka record value into an `Envelope`, or raise `DeadLetter`.

    `max_string_chars=None` lifts the per-string limit, for readers of `credit.dlq`, whose
    records carry whole original values.
    """
    if not raw:
        raise DeadLetter(INVALID_JSON, "record value is empty")
    if len(raw) > MAX_RECORD_BYTES:
        raise DeadLetter(
            OVERSIZE, f"record value is {len(raw)} bytes; the limit is {MAX_RECORD_BYTES}"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DeadLetter(NOT_UTF8, f"record value is not UTF-8 (byte {exc.start})") from None
    try:
        document = json.loads(text, parse_float=Decimal, parse_constant=_reject_json_constant)
    except (ValueError, RecursionError) as exc:
        raise DeadLetter(INVALID_JSON, f"record value is not valid JSON: {exc}") from None
    if type(document) is not dict:
        raise DeadLetter(INVALID_JSON, "record value is not a JSON object")
    if max_string_chars is not None and _may_hold_long_string(text, max_string_chars):
        _check_string_lengths(document, max_string_chars)
    if _SURROGATE_ESCAPE.search(text):
        _check_unicode(document)
    if "\\u0000" in text and (path := nul_path(document)) is not None:
        field = _dotted(path)
        raise DeadLetter(
            INVALID_FIELD, f"{field}: NUL (U+0000) cannot be stored as text", field=field
        )
    try:
        return Envelope.model_validate(document)
    except ValidationError as exc:
        raise _dead_letter_from(exc, prefix="") from None


JsonPath = tuple[str | int, ...]


def _texts(document: Any) -> Iterator[tuple[JsonPath, str, bool]]:
    """Every string of a parsed JSON document and every key, with where it is: a key's path
    ends with the key itself (the flag marks keys). Depth first, a dict's keys before what
    they hold."""
    stack: list[tuple[JsonPath, Any]] = [((), document)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, str):
            yield path, node, False
        elif isinstance(node, dict):
            for key, child in node.items():
                yield (*path, key), key, True
                stack.append(((*path, key), child))
        elif isinstance(node, list):
            stack.extend(((*path, index), child) for index, child in enumerate(node))


def _dotted(path: JsonPath) -> str:
    """``("data", "lines", 0, "amount")`` → ``"data.lines[0].amount"``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f"{'.' if out else ''}{part}"
    return out


def _check_string_lengths(document: dict[str, Any], limit: int) -> None:
    for path, text, is_key in _texts(document):
        if len(text) <= limit:
            continue
        if is_key:
            where = _dotted(path[:-1])
            raise DeadLetter(
                OVERSIZE,
                f"{where or '(document)'}: a key of {len(text)} characters; the limit is {limit}",
                field=where or None,
            )
        where = _dotted(path)
        raise DeadLetter(
            OVERSIZE, f"{where}: {len(text)} characters; the limit is {limit}", field=where
        )


def nul_path(document: Any) -> JsonPath | None:
    """Where a string (or key) of a parsed JSON document holds U+0000, if anywhere: valid
    JSON and valid Unicode, but PostgreSQL's text cannot store it."""
    return next((path for path, text, _ in _texts(document) if "\x00" in text), None)


def _check_unicode(document: dict[str, Any]) -> None:
    # JSON escapes can spell lone surrogates ("\ud800"), which no UTF-8 encoder accepts;
    # catching them here keeps them from failing later in a producer or a database.
    try:
        json.dumps(document, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError:
        raise DeadLetter(
            INVALID_JSON, "record value escapes a lone surrogate, which is not Unicode text"
        ) from None


# -- mapping validation errors to reasons ---------------------------------------------------

_CUSTOM_REASONS: Final = frozenset(
    {INVALID_AMOUNT, UNKNOWN_CURRENCY, DUE_BEFORE_ISSUE, INVALID_DATE, INVALID_FIELD}
)
# When one record has several faults, the most fundamental one names it.
_PRECEDENCE: Final = {
    reason: rank
    for rank, reason in enumerate(
        (
            UNKNOWN_CURRENCY,
            MISSING_FIELD,
            INVALID_FIELD,
            INVALID_DATE,
            INVALID_AMOUNT,
            DUE_BEFORE_ISSUE,
        )
    )
}


def _reason_of(error_type: str) -> str:
    if error_type == "missing":
        return MISSING_FIELD
    if error_type in _CUSTOM_REASONS:
        return error_type
    return INVALID_FIELD


def _location(loc: tuple[int | str, ...], prefix: str) -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path = f"{path}.{part}" if path else part
    return path


def _dead_letter_from(exc: ValidationError, *, prefix: str) -> DeadLetter:
    errors = exc.errors(include_url=False, include_input=False)
    error = min(errors, key=lambda e: _PRECEDENCE[_reason_of(e["type"])])
    reason = _reason_of(error["type"])
    loc = tuple(error["loc"])
    named = (error.get("ctx") or {}).get("field")
    if isinstance(named, str):
        loc += (named,)
    field = _location(loc, prefix) or prefix or None
    message = error["msg"]
    if error["type"] == "missing":
        message = "required field is missing"
    return DeadLetter(reason, f"{field}: {message}" if field else message, field=field)


# -- data models --------------------------------------------------------------------------


class EventData(BaseModel):
    """The `data` of one event type; `TYPE` is its wire name."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    TYPE: ClassVar[str]


class OutputEventData(EventData):
    """Data of events creditwatch publishes: typed, but open to added fields."""

    model_config = ConfigDict(frozen=True, extra="allow")


class CustomerData(EventData):
    customer_id: NonEmptyStr
    name: NonEmptyStr
    country: Annotated[str, StringConstraints(pattern=r"^[A-Z]{2}$")] | None = None
    industry: NonEmptyStr | None = None
    currency: CurrencyCode
    payment_terms_days: Annotated[int, Strict(), Field(ge=0, le=3650)] = 30
    parent_id: NonEmptyStr | None = None

    @model_validator(mode="after")
    def _not_its_own_parent(self) -> CustomerData:
        if self.parent_id == self.customer_id:
            raise _custom_error(INVALID_FIELD, "a customer cannot be its own parent", "parent_id")
        return self


class CustomerRegistered(CustomerData):
    TYPE: ClassVar[str] = "customer.registered"


class CustomerUpdated(CustomerData):
    TYPE: ClassVar[str] = "customer.updated"


class InvoiceIssued(EventData):
    TYPE: ClassVar[str] = "invoice.issued"

    invoice_id: NonEmptyStr
    customer_id: NonEmptyStr
    currency: CurrencyCode
    amount: Amount
    issue_date: IsoDate
    due_date: IsoDate
    order_id: NonEmptyStr | None = None

    @model_validator(mode="after")
    def _due_on_or_after_issue(self) -> InvoiceIssued:
        if self.due_date < self.issue_date:
            raise _custom_error(
                DUE_BEFORE_ISSUE,
                f"due date {self.due_date} is before issue date {self.issue_date}",
                "due_date",
            )
        return self


class InvoiceCancelled(EventData):
    TYPE: ClassVar[str] = "invoice.cancelled"

    invoice_id: NonEmptyStr
    customer_id: NonEmptyStr
    reason: str | None = None


class CreditNoteIssued(EventData):
    TYPE: ClassVar[str] = "credit_note.issued"

    credit_note_id: NonEmptyStr
    customer_id: NonEmptyStr
    currency: CurrencyCode
    amount: Amount
    issue_date: IsoDate
    invoice_id: NonEmptyStr | None = None


class Allocation(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    invoice_id: NonEmptyStr
    amount: Amount


class PaymentReceived(EventData):
    TYPE: ClassVar[str] = "payment.received"

    payment_id: NonEmptyStr
    customer_id: NonEmptyStr
    currency: CurrencyCode
    amount: Amount
    received_date: IsoDate
    allocations: tuple[Allocation, ...] | None = None
    """None (absent): apply to the oldest open invoices first."""

    @model_validator(mode="after")
    def _allocations_within_amount(self) -> PaymentReceived:
        if self.allocations:
            allocated = sum(
                (allocation.amount for allocation in self.allocations), start=Decimal(0)
            )
            if MONEY_CONTEXT.compare(allocated, self.amount) > 0:
                raise _custom_error(
                    INVALID_AMOUNT,
                    f"allocations total {allocated} exceeds the payment amount {self.amount}",
                    "allocations",
                )
        return self


class PaymentReversed(EventData):
    TYPE: ClassVar[str] = "payment.reversed"

    payment_id: NonEmptyStr
    customer_id: NonEmptyStr
    reason: str | None = None


class InvoiceOverdue(EventData):
    TYPE: ClassVar[str] = "invoice.overdue"

    invoice_id: NonEmptyStr
    customer_id: NonEmptyStr
    currency: CurrencyCode
    amount_overdue: Amount
    due_date: IsoDate
    days_overdue: Annotated[int, Strict(), Field(ge=0)]
    as_of: IsoDate


class BalanceSheet(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    cash: NonNegativeAmount | None = None
    receivables: NonNegativeAmount | None = None
    inventory: NonNegativeAmount | None = None
    current_assets: NonNegativeAmount
    total_assets: Amount
    current_liabilities: NonNegativeAmount
    total_liabilities: NonNegativeAmount
    equity: SignedAmount
    retained_earnings: SignedAmount | None = None


class IncomeStatement(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    revenue: NonNegativeAmount
    ebit: SignedAmount | None = None
    interest_expense: NonNegativeAmount | None = None
    net_income: SignedAmount


class CashFlow(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    operating_cash_flow: SignedAmount | None = None


class FinancialStatementPublished(EventData):
    TYPE: ClassVar[str] = "financial_statement.published"

    statement_id: NonEmptyStr
    customer_id: NonEmptyStr
    period_end: IsoDate
    period_months: Annotated[Literal[3, 6, 12], BeforeValidator(_json_int)]
    currency: CurrencyCode
    audited: StrictBool | None = None
    balance_sheet: BalanceSheet
    income_statement: IncomeStatement
    cash_flow: CashFlow | None = None


LegalEventType = Literal["bankruptcy", "insolvency", "lawsuit", "lien", "judgement"]


class LegalEvent(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    type: LegalEventType
    date: IsoDate | None = None


class CreditReportReceived(EventData):
    TYPE: ClassVar[str] = "credit_report.received"

    report_id: NonEmptyStr
    customer_id: NonEmptyStr
    bureau: NonEmptyStr
    score: ExactDecimal
    score_min: ExactDecimal
    score_max: ExactDecimal
    delinquencies_12m: Annotated[int, Strict(), Field(ge=0)] | None = None
    defaults: Annotated[int, Strict(), Field(ge=0)] | None = None
    legal_events: tuple[LegalEvent, ...] = ()
    reported_at: Annotated[
        AwareDatetime,
        BeforeValidator(_rfc3339_parser(INVALID_DATE, allow_date=True)),
        # A bare date is taken as its midnight UTC.
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "string", "format": "date-time"},
                    {"type": "string", "format": "date"},
                ]
            },
            mode="validation",
        ),
    ]

    @model_validator(mode="after")
    def _score_within_scale(self) -> CreditReportReceived:
        if self.score_min >= self.score_max:
            raise _custom_error(
                INVALID_FIELD,
                f"score_max {self.score_max} must be above score_min {self.score_min}",
                "score_max",
            )
        if not self.score_min <= self.score <= self.score_max:
            raise _custom_error(
                INVALID_FIELD,
                f"score {self.score} is outside [{self.score_min}, {self.score_max}]",
                "score",
            )
        return self


# Output events ----------------------------------------------------------------------------

Grade = NonEmptyStr
RiskLevel = Literal["low", "medium", "high", "unacceptable"]


class Factor(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    factor: NonEmptyStr
    # A number when it is one ("1.35" read back from the wire included), else text.
    value: ExactDecimal | str | None = Field(default=None, union_mode="left_to_right")
    points: ExactDecimal
    max_points: ExactDecimal
    reason: str | None = None


class Override(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    grade: Grade
    reason: NonEmptyStr
    by: NonEmptyStr
    expires_at: EventTimestamp | None = None


class Trigger(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    event_id: NonEmptyStr
    type: NonEmptyStr


class AssessmentCompleted(OutputEventData):
    TYPE: ClassVar[str] = "assessment.completed"

    assessment_id: NonEmptyStr
    customer_id: NonEmptyStr
    score: Annotated[int, Strict(), Field(ge=0, le=100)]
    grade: Grade
    risk_level: RiskLevel
    previous_grade: Grade | None = None
    factors: tuple[Factor, ...] = ()
    ratios: dict[str, ExactDecimal] = Field(default_factory=dict)
    override: Override | None = None
    policy_version: NonEmptyStr
    trigger: Trigger | None = None
    next_review_date: IsoDate | None = None
    assessed_at: EventTimestamp


LimitReason = Literal["policy", "manual", "temporary", "expired", "hold", "release"]


class LimitChanged(OutputEventData):
    TYPE: ClassVar[str] = "limit.changed"

    customer_id: NonEmptyStr
    currency: CurrencyCode
    previous_limit: ExactDecimal | None = None
    limit: ExactDecimal
    reason: LimitReason
    grade: Grade | None = None
    request_id: str | None = None
    requested_by: str | None = None
    changed_by: str | None = None
    effective_at: EventTimestamp
    expires_at: EventTimestamp | None = None


OVERDUE_BUCKETS: Final = ("1-30", "31-60", "61-90", "90+")


def _all_buckets(value: object, info: ValidationInfo) -> object:
    # The contract promises all four keys; a producer may leave the empty ones out.
    if isinstance(value, dict):
        currency = info.data.get("currency")
        zero = quantize(Decimal(0), currency) if is_currency(currency) else Decimal(0)
        return {bucket: value.get(bucket, zero) for bucket in OVERDUE_BUCKETS} | value
    return value


class ExposureUpdated(OutputEventData):
    TYPE: ClassVar[str] = "exposure.updated"

    customer_id: NonEmptyStr
    currency: CurrencyCode
    open_receivables: ExactDecimal
    overdue_amount: ExactDecimal
    overdue_buckets: Annotated[dict[str, ExactDecimal], BeforeValidator(_all_buckets)]
    max_days_overdue: Annotated[int, Strict(), Field(ge=0)] = 0
    reserved: ExactDecimal
    exposure: ExactDecimal
    limit: ExactDecimal
    available: ExactDecimal
    utilization: ExactDecimal | None = None
    on_hold: StrictBool = False
    as_of: EventTimestamp
    group: dict[str, Any] | None = None


Severity = Literal["info", "warning", "critical"]
AlertStatus = Literal["open", "acknowledged", "resolved"]


class AlertData(OutputEventData):
    alert_id: NonEmptyStr
    customer_id: NonEmptyStr
    rule: NonEmptyStr
    severity: Severity
    status: AlertStatus
    title: str
    message: str
    facts: dict[str, Any] = Field(default_factory=dict)
    dedup_key: NonEmptyStr
    raised_at: EventTimestamp
    resolved_at: EventTimestamp | None = None


class AlertRaised(AlertData):
    TYPE: ClassVar[str] = "alert.raised"


class AlertUpdated(AlertData):
    TYPE: ClassVar[str] = "alert.updated"


class AlertResolved(AlertData):
    TYPE: ClassVar[str] = "alert.resolved"


class EventDeadLettered(OutputEventData):
    TYPE: ClassVar[str] = "event.dead_lettered"

    error: str
    reason: str
    service: NonEmptyStr
    topic: str
    partition: StrictInt
    offset: StrictInt
    key: str | None = None
    value: str | None = None
    failed_at: EventTimestamp


INPUT_MODELS: Final[tuple[type[EventData], ...]] = (
    CustomerRegistered,
    CustomerUpdated,
    InvoiceIssued,
    InvoiceCancelled,
    CreditNoteIssued,
    PaymentReceived,
    PaymentReversed,
    InvoiceOverdue,
    FinancialStatementPublished,
    CreditReportReceived,
)
OUTPUT_MODELS: Final[tuple[type[EventData], ...]] = (
    AssessmentCompleted,
    LimitChanged,
    ExposureUpdated,
    AlertRaised,
    AlertUpdated,
    AlertResolved,
    EventDeadLettered,
)
MODEL_OF_TYPE: Final[Mapping[str, type[EventData]]] = {
    model.TYPE: model for model in INPUT_MODELS + OUTPUT_MODELS
}

TOPIC_OF_TYPE: Final[dict[str, str]] = {
    "customer.registered": "crm.customers",
    "customer.updated": "crm.customers",
    "invoice.issued": "ar.invoices",
    "invoice.cancelled": "ar.invoices",
    "credit_note.issued": "ar.invoices",
    "payment.received": "ar.payments",
    "payment.reversed": "ar.payments",
    "invoice.overdue": "ar.overdue",
    "financial_statement.published": "crm.financials",
    "credit_report.received": "crm.credit-reports",
    "assessment.completed": "credit.assessments",
    "limit.changed": "credit.limits",
    "exposure.updated": "credit.exposure",
    "alert.raised": "credit.alerts",
    "alert.updated": "credit.alerts",
    "alert.resolved": "credit.alerts",
    "event.dead_lettered": "credit.dlq",
}


# -- parsing ------------------------------------------------------------------------------


def _validate_data(model: type[EventData], data: Mapping[str, Any]) -> EventData:
    currency = data.get("currency")
    context = {"currency": currency} if is_currency(currency) else None
    return model.model_validate(data, context=context)


def parse(
    envelope: Envelope,
    *,
    topic: str | None = None,
    topic_of_type: Mapping[str, str] | None = None,
) -> EventData | None:
    """Validate `envelope.data` against the model of its type; None for an unknown type.

    With `topic` (the topic the record came from), a known type on another topic than its
    own (`topic_of_type`, default `TOPIC_OF_TYPE`) is a `wrong_topic` dead letter.
    """
    model = MODEL_OF_TYPE.get(envelope.type)
    if model is None:
        return None
    if topic is not None:
        expected = (TOPIC_OF_TYPE if topic_of_type is None else topic_of_type).get(envelope.type)
        if expected is not None and expected != topic:
            raise DeadLetter(
                WRONG_TOPIC,
                f"type: {envelope.type} belongs on topic {expected}, not {topic}",
                field="type",
            )
    data = envelope.data
    customer_id = data.get("customer_id")
    if isinstance(customer_id, str) and customer_id != envelope.subject:
        raise DeadLetter(
            INVALID_FIELD,
            f"subject: {_short(envelope.subject)} does not match data.customer_id "
            f"{_short(customer_id)}",
            field="subject",
        )
    currency = data.get("currency")
    if isinstance(currency, str) and is_iso_code(currency) and not is_currency(currency):
        # A real ISO 4217 code (XAU, XDR) that no amount can be held in: the contract's
        # "converted with the rates of the policy, or set aside with no_fx_rate" — the
        # policy cannot rate it.
        raise DeadLetter(
            NO_FX_RATE,
            f"data.currency: {currency} is an ISO 4217 code without minor units; the policy "
            "has no rate for it",
            field="data.currency",
        )
    if isinstance(currency, str) and not is_currency(currency):
        raise DeadLetter(
            UNKNOWN_CURRENCY,
            f"data.currency: unknown ISO 4217 currency code {_short(currency)}",
            field="data.currency",
        )
    try:
        return _validate_data(model, data)
    except ValidationError as exc:
        raise _dead_letter_from(exc, prefix="data") from None


# -- producing ----------------------------------------------------------------------------

_JSON_OBJECT: Final = TypeAdapter(dict[str, Any])


def new_event(
    type: str,
    *,
    source: str,
    subject: str,
    data: BaseModel | Mapping[str, Any],
    id: str,
    time: dt.datetime,
    extensions: Mapping[str, str] | None = None,
) -> Envelope:
    """Build an output event (Decimals become strings, datetimes RFC 3339).

    Data of a known type is its model, or is validated by it: a dict, or another model
    with the same fields (an `AlertRaised` published as `alert.updated`). Raises
    pydantic's ValidationError for data that does not fit, and ValueError when the data's
    customer_id is not the subject: both are bugs in the producer, not dead letters.
    ``extensions``: the extension attributes it carries (``trace_context`` of its cause).
    """
    model = MODEL_OF_TYPE.get(type)
    if isinstance(data, BaseModel) and (model is None or isinstance(data, model)):
        payload = data.model_dump(mode="json", by_alias=True)
    elif model is not None:
        fields = data.model_dump() if isinstance(data, BaseModel) else data
        payload = _validate_data(model, fields).model_dump(mode="json", by_alias=True)
    else:
        payload = _JSON_OBJECT.dump_python(dict(data), mode="json")
    customer_id = payload.get("customer_id")
    if isinstance(customer_id, str) and customer_id != subject:
        raise ValueError(f"subject {subject!r} is not the data's customer_id {customer_id!r}")
    return Envelope(
        specversion="1.0",
        id=id,
        source=source,
        type=type,
        subject=subject,
        time=time,
        data=payload,
        **_extensions(extensions),
    )


def _as_text(raw: bytes, limit: int | None = None) -> tuple[str, bool]:
    """The record bytes as text: UTF-8 when they are, else base64. True when base64."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(raw[:limit]).decode("ascii"), True
    if limit is None:
        return text, False
    # Cutting valid UTF-8 may split a character at the very end; drop just that.
    return raw[:limit].decode("utf-8", errors="ignore"), False


def dead_letter_record(
    *,
    error: str,
    reason: str,
    service: str,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    failed_at: dt.datetime,
) -> Envelope:
    """The `event.dead_lettered` event for a record that could not be processed.

    Its id is stable per (service, topic, partition, offset), so a re-publish after a crash
    is the same event. A value over MAX_RECORD_BYTES keeps its first 64 KiB and is marked
    `value_truncated`; a value or key that is not UTF-8 is carried as base64 and marked
    `value_encoding` / `key_encoding` "base64". It carries the record's trace context on
    (``trace_context``) when the record is a JSON object with a valid ``traceparent``, so a
    trace shows where its event was set aside.
    """
    data: dict[str, Any] = {
        "error": error,
        "reason": reason,
        "service": service,
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "key": None,
        "value": None,
        "failed_at": failed_at,
    }
    subject = "unknown"
    if key is not None:
        key_text, key_is_base64 = _as_text(key)
        data["key"] = key_text
        if key_is_base64:
            data["key_encoding"] = "base64"
        elif key_text:
            subject = key_text
    if value is not None:
        value_text, value_is_base64 = _as_text(value)
        # Oversize records are dead-lettered too, and base64 or JSON escaping can push a
        # value just under the limit over what the broker takes; both keep a prefix.
        truncated = len(value) > MAX_RECORD_BYTES or (
            len(value) > DEAD_LETTER_VALUE_BYTES
            and len(json.dumps(value_text, ensure_ascii=False)) > _DEAD_LETTER_VALUE_ROOM
        )
        if truncated:
            value_text, value_is_base64 = _as_text(value, DEAD_LETTER_VALUE_BYTES)
        data["value"] = value_text
        if value_is_base64:
            data["value_encoding"] = "base64"
        if truncated:
            data["value_truncated"] = True
    return new_event(
        EventDeadLettered.TYPE,
        source=f"/creditwatch/{service}",
        subject=subject,
        data=data,
        id=f"dlq-{service}-{topic}-{partition}-{offset}",
        time=failed_at,
        extensions=_trace_of_record(value),
    )


def _trace_of_record(value: bytes | None) -> dict[str, str]:
    # Dead letters are rare, and most records carry no trace: parsed again only then.
    if not value or len(value) > MAX_RECORD_BYTES or b'"traceparent"' not in value:
        return {}
    try:
        document = json.loads(value, parse_float=Decimal, parse_constant=_reject_json_constant)
    except (ValueError, RecursionError):
        return {}
    return trace_context(document) if isinstance(document, dict) else {}
