"""Schemathesis hooks for test_schemathesis (loaded through SCHEMATHESIS_HOOKS).

They keep a request that schemathesis generates as valid (positive) valid where the OpenAPI
document cannot say what valid is, and nothing else: a case generated to be invalid is never
touched, so the refusals are all tested as generated.

- An amount may have at most as many decimals as its currency has minor units (JSON Schema
  cannot tie one field's pattern to another's value): it is cut to them.
- ``expires_at`` must be in the future (and a temporary limit at most the policy's days away):
  it is set to a day from now.
- A ``cursor`` is only what the API returned for the same list: a generated one is dropped.
- An ``Idempotency-Key`` is new for each request, as a client makes one: schemathesis would
  otherwise send one key with several requests, whose answers are then replays of the first
  (tests/integration/test_idempotency.py holds the replays to their contract).
- A body's members that no route reads are ignored but read: U+0000 in their text is refused
  (the document says so in words; its JSON Schema would be recursive, which client generators
  cannot read): removed from them.

And two failures are not ones. The contract has two templates of one URL (GET
``/v1/credit-checks/{check_id}``, DELETE ``/v1/credit-checks/{order_id}``; each error names
its own id, the golden answers too), which schemathesis reads as two resources: the ``Allow:
DELETE, GET`` that URL answers a 405 with is the truth. And after ``POST /v1/credit-checks`` schemathesis expects
``DELETE /v1/credit-checks/{order_id}`` to find what the POST "created". The POST records a
decision, which ``GET /v1/credit-checks/{check_id}`` reads; the DELETE releases the order's
reservation, which only an approved check that reserved made (contract: 404 if none); the
failure does not say what the POST decided, so every such pair is let through here, and
test_limits_api holds the release of a reservation to its contract.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import schemathesis

from shared.money import CURRENCY_MINOR_UNITS, MAX_MINOR_UNITS
from shared.openapi import IDEMPOTENCY_KEY_PATTERN


def _positive(case: Any) -> bool:
    meta = getattr(case, "meta", None)
    return meta is not None and meta.generation.mode.is_positive


def _to_minor_units(amount: Any, currency: Any) -> Any:
    places = CURRENCY_MINOR_UNITS.get(currency) if isinstance(currency, str) else None
    if places is None:
        places = MAX_MINOR_UNITS  # no minor units (XAU): judged on the number alone
    try:
        value = Decimal(str(amount))
    except InvalidOperation:
        return amount
    cut = value.quantize(Decimal(1).scaleb(-places), rounding="ROUND_DOWN")
    if cut <= 0:
        cut = Decimal(1).scaleb(-places)
    return format(cut, "f")


def _named_members(case: Any) -> set[str]:
    definition = getattr(case.operation, "definition", None)
    raw = getattr(definition, "raw", None) or {}
    content = raw.get("requestBody", {}).get("content", {}).get("application/json", {})
    return set(content.get("schema", {}).get("properties", {}))


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    return value


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    if not _positive(case):
        return case
    if isinstance(case.query, dict):
        case.query.pop("cursor", None)
    body = case.body
    if isinstance(body, dict):
        known = _named_members(case)
        for name in list(body):
            if name not in known:
                body[name] = _without_nul(body[name])
        if case.path == "/v1/credit-checks" and "amount" in body:
            body["amount"] = _to_minor_units(body["amount"], body.get("currency"))
        if case.path.endswith("/limit-requests") and "requested_limit" in body:
            # The seeded customers' credit currency is EUR (any other id is a 404 first).
            limit = _to_minor_units(body["requested_limit"], "EUR")
            body["requested_limit"] = (
                "0.00" if Decimal(str(body["requested_limit"])) == 0 else limit
            )
        if body.get("expires_at") is not None:
            body["expires_at"] = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    return case


@schemathesis.hook
def map_headers(context: Any, headers: dict[str, Any] | None) -> dict[str, Any] | None:
    # Any phase, stateful included; a key made invalid on purpose stays as it is.
    key = (headers or {}).get("Idempotency-Key")
    if isinstance(key, str) and re.fullmatch(IDEMPOTENCY_KEY_PATTERN, key):
        assert headers is not None
        headers["Idempotency-Key"] = uuid.uuid4().hex
    return headers


# The contract's two templates of one URL: GET /v1/credit-checks/{check_id} and DELETE
# /v1/credit-checks/{order_id} (each error names its own id: "check_id", "order_id").
_ONE_URL = {"/v1/credit-checks/{check_id}", "/v1/credit-checks/{order_id}"}


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    if type(failure).__name__ == "AllowHeaderMismatch":
        # Allow: DELETE, GET is the truth for that URL; schemathesis reads each template as
        # a resource of its own, which the other method's template is not part of.
        allow = response.headers.get("allow") or response.headers.get("Allow")
        if isinstance(allow, list):
            allow = ", ".join(allow)
        return not (case.path in _ONE_URL and allow == "DELETE, GET")
    if type(failure).__name__ != "EnsureResourceAvailability":
        return True
    return not (
        getattr(failure, "created_with", "") == "POST /v1/credit-checks"
        and getattr(failure, "not_available_with", "") == "DELETE /v1/credit-checks/{order_id}"
    )
