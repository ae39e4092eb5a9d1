"""The pure parts of shared.idempotency: reading the ``Idempotency-Key`` header, the request's
fingerprint, the key's scope, and which responses and headers are kept."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from shared.idempotency import (
    MAX_KEY_CHARS,
    StoredResponse,
    _Captured,
    canonical_json,
    fingerprint,
    key_hash,
    parse_key,
    replayed,
    stored_headers,
)
from shared.problems import ValidationFailed

# ---- the header ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (b'"8e03978e-40d5-43e8-bc93-6894a57f9324"', "8e03978e-40d5-43e8-bc93-6894a57f9324"),
        (b"8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324"),
        (b'  "padded"\t', "padded"),
        (b'"with \\"quotes\\" and \\\\"', 'with "quotes" and \\'),
        (b'"inner space"', "inner space"),
        (b"x" * MAX_KEY_CHARS, "x" * MAX_KEY_CHARS),
    ],
)
def test_given_a_key_as_the_draft_or_bare_when_parsed_then_its_text(raw: bytes, key: str) -> None:
    assert parse_key([raw]) == key


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([b""], "must not be empty"),
        ([b"   "], "must not be empty"),
        ([b'""'], "must not be empty"),
        ([b"x" * (MAX_KEY_CHARS + 1)], "at most 255 characters (got 256)"),
        ([b'"' + b"x" * (MAX_KEY_CHARS + 1) + b'"'], "at most 255 characters"),
        ([b'"open'], "no closing quote"),
        ([b'"a"b'], "nothing may follow the closing quote"),
        ([b'"a";p=1'], "nothing may follow the closing quote"),
        ([b'"a\\nb"'], 'may only escape " or \\'),
        (["caf\u00e9".encode("latin-1")], "printable ASCII"),
        ([b'"tab\there"'], "printable ASCII"),
        ([b"a", b"b"], "give the header once"),
    ],
)
def test_given_a_bad_key_when_parsed_then_a_422_naming_the_header(
    values: list[bytes], message: str
) -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse_key(values)
    problem = caught.value.to_problem("/v1/x")
    assert problem["status"] == 422 and problem["field"] == "Idempotency-Key"
    assert message in problem["detail"] and problem["detail"].startswith("Idempotency-Key: ")
    assert problem["errors"] == [
        {"field": "Idempotency-Key", "message": problem["detail"].removeprefix("Idempotency-Key: ")}
    ]


# ---- the fingerprint ----------------------------------------------------------------------------


def test_given_json_bodies_differing_in_key_order_and_space_when_fingerprinted_then_equal() -> None:
    a = b'{"requested_limit":"150000.00","reason":"growth","x":{"b":1,"a":[1,2]}}'
    b = b'{ "x": {"a": [1, 2], "b": 1},\n "reason": "growth", "requested_limit": "150000.00" }'
    assert fingerprint(a) == fingerprint(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (b'{"amount":"1.50"}', b'{"amount":"1.5"}'),  # amounts keep their scale
        (b'{"amount":1.50}', b'{"amount":1.5}'),
        (b'{"amount":1.5}', b'{"amount":"1.5"}'),  # a number is not its text
        (b'{"a":1}', b'{"a":1.0}'),
        (b'{"a":null}', b"{}"),
        (b'{"a":[1,2]}', b'{"a":[2,1]}'),
        (b"", b"{}"),
        (b"not json", b"not  json"),
        (b'{"a":true}', b'{"a":1}'),
    ],
)
def test_given_bodies_that_differ_in_value_when_fingerprinted_then_different(
    a: bytes, b: bytes
) -> None:
    assert fingerprint(a) != fingerprint(b)


def test_given_one_body_with_another_query_when_fingerprinted_then_different() -> None:
    assert fingerprint(b"{}", b"a=1") != fingerprint(b"{}", b"a=2")
    assert fingerprint(b"{}", b"") != fingerprint(b"{}", b"x")
    # The query's length is part of it: no query and body can pass for another split.
    assert fingerprint(b"raw:x", b"") != fingerprint(b"x", b"raw:")


def test_given_a_body_nested_too_deep_for_json_when_fingerprinted_then_its_bytes_count() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    assert fingerprint(deep) == fingerprint(deep) != fingerprint(deep + b" ")


def test_given_json_values_when_made_canonical_then_one_text_each() -> None:
    value = {"b": [Decimal("1.50"), 2, None, True, False], "a": 'ü"', "c": {}}
    assert canonical_json(value) == '{"a":"ü\\"","b":[1.50,2,null,true,false],"c":{}}'
    with pytest.raises(TypeError):
        canonical_json(1.5)


# ---- the scope ----------------------------------------------------------------------------------


def test_given_principal_method_path_and_key_when_hashed_then_each_part_counts() -> None:
    base = key_hash("ana", "POST", "/v1/a", "k")
    assert base == key_hash("ana", "POST", "/v1/a", "k") and len(base) == 64
    others = {
        key_hash("bob", "POST", "/v1/a", "k"),
        key_hash("ana", "PUT", "/v1/a", "k"),
        key_hash("ana", "POST", "/v1/b", "k"),
        key_hash("ana", "POST", "/v1/a", "k2"),
        # No concatenation passes for another split of the same characters.
        key_hash("an", "POST", "/v1/a", "ak"),
        key_hash("ana", "POST", "/v1/ak", ""),
    }
    assert base not in others and len(others) == 6


# ---- what is kept -------------------------------------------------------------------------------


def _captured(status: int, *, complete: bool = True) -> _Captured:
    captured = _Captured()

    async def feed() -> None:
        await captured(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"location", b"/v1/limit-requests/r-1"),
                    (b"content-length", b"7"),
                    (b"date", b"Sun, 01 Mar 2026 12:00:00 GMT"),
                    (b"connection", b"close"),
                    (b"retry-after", b"2"),
                ],
            }
        )
        await captured({"type": "http.response.body", "body": b"{", "more_body": True})
        await captured({"type": "http.response.body", "body": b'"a":1}', "more_body": not complete})

    asyncio.run(feed())
    return captured


@pytest.mark.parametrize("status", [200, 201, 204, 400, 404, 409, 422])
def test_given_an_answer_for_good_when_captured_then_it_is_kept(status: int) -> None:
    kept = _captured(status).stored()
    assert kept == StoredResponse(
        status,
        [
            ("content-type", "application/json"),
            ("location", "/v1/limit-requests/r-1"),
            ("retry-after", "2"),
        ],
        b'{"a":1}',
    )


@pytest.mark.parametrize("status", [500, 502, 503, 504, 401, 403, 408, 413, 429])
def test_given_an_answer_of_the_moment_or_the_credentials_when_captured_then_not_kept(
    status: int,
) -> None:
    assert _captured(status).stored() is None


def test_given_an_unfinished_answer_when_captured_then_not_kept() -> None:
    assert _captured(201, complete=False).stored() is None


def test_given_a_kept_answer_when_replayed_then_its_headers_and_body_marked_replayed() -> None:
    response = replayed(
        StoredResponse(201, [("content-type", "application/json"), ("location", "/x")], b"{}")
    )
    assert response.status_code == 201 and response.body == b"{}"
    assert response.raw_headers == [
        (b"content-length", b"2"),
        (b"content-type", b"application/json"),
        (b"location", b"/x"),
        (b"idempotent-replayed", b"true"),
    ]


def test_given_response_headers_when_kept_then_framing_and_connection_ones_are_not() -> None:
    raw = [
        (b"Content-Type", b"application/problem+json"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Server", b"uvicorn"),
        (b"Set-Cookie", b"a=b"),
        (b"Idempotent-Replayed", b"true"),
        (b"WWW-Authenticate", b"Bearer"),
    ]
    assert stored_headers(raw) == [
        ("content-type", "application/problem+json"),
        ("www-authenticate", "Bearer"),
    ]
