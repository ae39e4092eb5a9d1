"""``plain_json`` writes exactly the text ``as_json`` writes, for the bodies it is made for."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.projection import as_json, plain_json

_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1), st.text()
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=500)
@given(st.dictionaries(st.text(), _VALUES, max_size=8))
def test_plain_json_is_as_json(body: dict[str, Any]) -> None:
    assert plain_json(body) == as_json(body)


def test_plain_json_of_ascii_control_characters_and_delete_is_as_json() -> None:
    body = {"a\x00\x1f": ['\t\n\r\b\f"\\/', "\x7f", "x\x01y"]}
    assert plain_json(body) == as_json(body)


def test_plain_json_of_control_characters_and_other_scripts_is_as_json() -> None:
    body = {
        "a\x00\x1f\x7f": ['\t\n\r\b\f"\\/', "Zürich", "東京", "\ud7ff", "😀", "\ud800"],
        "n": -1,
    }
    assert plain_json(body) == as_json(body)
