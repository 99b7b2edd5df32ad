"""canonical_json keeps its bytes: what old spools were hashed with is what they are verified with."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidegate_proxy.audit import canonical_json

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text()
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5), max_leaves=40
)


def reference(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


@given(values)
def test_same_bytes_as_json_dumps(obj: Any) -> None:
    assert canonical_json(obj) == reference(obj)


def test_edge_values() -> None:
    obj = {"é": "☃\u2028\x00\ud800", "b": [1e16, 1e-7, math.inf, -math.inf, 2**70, True, None], "a": {"z": 0.1}}
    assert canonical_json(obj) == reference(obj)
    assert canonical_json("x") == b'"x"'


def test_unencodable_fails() -> None:
    with pytest.raises(TypeError):
        canonical_json({"a": object()})
    with pytest.raises(TypeError):
        canonical_json({1: "int keys sort against str keys"} | {"a": 1})
