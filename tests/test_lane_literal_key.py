"""The native lane's literal key (``_lane.literal_key``) against ``sqlparse._literal_key``.

The lane relays a simple query when its key matches one whose text Python allowed outright, so
the key may only ever merge texts that ``_literal_key``'s soundness argument merges: it must
accept exactly what that function accepts and rewrite exactly the same numbers (a text it does
not rewrite is its own key).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sidegate_proxy
from sidegate_proxy.sqlparse import _literal_key
from test_sqlparse_literal_cache import FALLBACKS, SELECTS_WITH_NUMBERS, SOUP, number_tokens, select_templates

pytestmark = pytest.mark.skipif(sidegate_proxy.LANE is None, reason="the native lane is not built")


def assert_agrees(sql: str) -> None:
    lane = sidegate_proxy.LANE
    assert lane is not None
    data = sql.encode("utf-8", "surrogateescape")
    got = lane.literal_key(data)
    want = _literal_key(sql)
    if want is not None:
        assert got == want.encode(), sql  # the same canonical form
    elif got is not None:
        assert got == data, sql  # nothing Python would rewrite: only the text itself
    if got is None:
        # given up: Python gives up too, or finds nothing to rewrite (then the exact text is
        # classified, and the lane would only ever see that very text again)
        assert want is None, sql


@pytest.mark.parametrize("sql", SELECTS_WITH_NUMBERS + FALLBACKS)
def test_corpus(sql: str) -> None:
    assert_agrees(sql)


def test_what_the_lane_may_merge() -> None:
    lane = sidegate_proxy.LANE
    assert lane is not None
    key = lane.literal_key
    assert key(b"SELECT abalance FROM pgbench_accounts WHERE aid = 48213;") == \
        key(b"SELECT abalance FROM pgbench_accounts WHERE aid = 7;")
    assert key(b"SELECT * FROM t WHERE a = 5; DELETE FROM t") is None
    assert key(b"SELECT * FROM t1 WHERE a = 5") != key(b"SELECT * FROM t2 WHERE a = 5")
    assert key(b"SELECT * FROM t WHERE a = 5 -- x") is None
    assert key(b"DELETE FROM t WHERE id = 5") is None
    assert key("SELECT * FROM t WHERE a = 'é' AND b = 5".encode()) is None
    assert key(b"SELECT * FROM t WHERE a = 1.5") != key(b"SELECT * FROM t WHERE a = 1")


@settings(max_examples=1500, deadline=None)
@given(select_templates(), st.data())
def test_generated_selects(template: str, data: st.DataObject) -> None:
    xs = data.draw(st.lists(number_tokens, min_size=template.count("{}"), max_size=template.count("{}")))
    assert_agrees(template.format(*xs))


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(SOUP), max_size=25),
       st.lists(st.sampled_from(["", " ", "\t", "\n"]), min_size=25, max_size=25))
def test_select_soup(tokens: list[str], seps: list[str]) -> None:
    assert_agrees("SELECT " + "".join(tok + sep for tok, sep in zip(tokens, seps, strict=False)))


@settings(max_examples=1000, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("SELECTselect INin()=<>!,;'\"$\\-/*.0123456789ab\t\n\x00é")),
               max_size=60))
def test_arbitrary_text(text: str) -> None:
    assert_agrees("SELECT " + text)
    assert_agrees(text)
