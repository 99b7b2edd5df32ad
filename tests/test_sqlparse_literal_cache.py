"""The classification cache keyed by a literal-insensitive form of the text (``_literal_key``).

A statement that differs from one already classified only in numeric literal values reuses that
classification. Whatever path a text takes, the answer must be exactly what a fresh, uncached
parse of that very text gives, text fields included.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidegate_proxy import sqlparse
from sidegate_proxy.sqlparse import Classified, _classify, _literal_key, classify
from test_guardrails import BOT, guard, sql_rule

HERE = Path(__file__).parent


def fresh() -> None:
    sqlparse._classify_cached.cache_clear()
    sqlparse._canonical.cache_clear()


def assert_same(got: Classified, sql: str) -> None:
    """``got`` is what an uncached parse of ``sql`` says, field by field."""
    want = _classify(sql)
    assert got.text == want.text == sql
    assert got.error == want.error
    assert len(got.statements) == len(want.statements)
    for g, w in zip(got.statements, want.statements, strict=True):
        assert g.text == w.text
        assert g.commands == w.commands
        assert g.groups == w.groups
        assert g.tables == w.tables
        assert g.functions == w.functions
        assert g.writes_without_where == w.writes_without_where
        assert g.columns == w.columns
        assert g.prepared_name == w.prepared_name
    assert got == want


# --------------------------------------------------------------------------- corpora


def _test_file_strings() -> Iterator[str]:
    """Every string literal of the SQL and guardrail tests: their smuggling and tricky cases."""
    for name in ("test_sqlparse.py", "test_guardrails.py"):
        tree = ast.parse((HERE / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) < 2000:
                yield node.value


SELECTS_WITH_NUMBERS = [
    "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;",
    "SELECT abalance FROM pgbench_accounts WHERE aid = 48213",
    "  \n\tSELECT abalance FROM pgbench_accounts WHERE aid = 1 ;  \n ",
    "select * from t where a=5",
    "SELECT * FROM t WHERE a IN (1, 2.5,3) AND b<=7 and c<>8 AND d != 9.25 OR e >= 10 OR f < 11 OR g > 12",
    "SELECT * FROM t WHERE a NOT IN (1,2,3)",
    "SELECT 1 = 1",
    "SELECT * FROM t WHERE a = 99999999999999999999999999",
    "SELECT * FROM t WHERE a = 007",
    "SELECT * FROM t WHERE a = 0.0001",
    "SELECT * FROM t WHERE a = 5 FOR UPDATE",
    "SELECT * INTO new_t FROM t WHERE a = 1",
    "SELECT * FROM t WHERE a = 5 UNION SELECT * FROM u WHERE b IN (1, 2)",
    "SELECT * FROM (WITH d AS (DELETE FROM t WHERE id = 5 RETURNING *) SELECT * FROM d) s WHERE x = 3",
    "SELECT * FROM (WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d) s WHERE x = 3",
    "SELECT * FROM t WHERE a = (SELECT max(b) FROM u WHERE c = 4)",
    "SELECT pg_read_file('/etc/passwd') WHERE 1 = 1",
    "SELECT lo_export(1234, '/tmp/x') WHERE 1 = 1",
    "SELECT dblink_exec('host=x', 'DELETE FROM t') WHERE 1 = 1",
    "SELECT * FROM dblink('host=x', 'SELECT 1') AS r(a int) WHERE a = 2",
    "SELECT f(x := 5)",
    "SELECT f(x => 5)",
    "SELECT * FROM t t1 JOIN u ON t1.a = 5 WHERE b >= 2.5 ORDER BY a = 3 LIMIT 10",
    "SELECT CASE WHEN a = 1 THEN 'x' ELSE 'y' END FROM t WHERE b <> 2",
    "SELECT * FROM t WHERE a = 5 AND b = 'it''s = 6'",
    "SELECT * FROM t WHERE a = 5 AND b = '; DELETE FROM t'",
    "SELECT * FROM t WHERE a = 5 AND b = '-- DELETE FROM t' AND c = '/* x */' AND d = '$$'",
    'SELECT "u"."id", "u"."name" FROM "app_user" "u" WHERE "u"."email" = \'bob@x\' AND "u"."id" IN (1, 2, 3)',
    'SELECT * FROM "t=1" WHERE "a"" = 5" = 6',
    "SELECT U&\"d!0061t\" UESCAPE '!' FROM t WHERE a = 5",
    "SELECT * FROM t WHERE a = E'x' AND b = 5",
    "SELECT * FROM t WHERE a = X'1F' AND b = B'0101' AND c = 7",
    "SELECT a-b FROM t WHERE a = 5",
    "SELECT * FROM t WHERE a = 5 AND b = -5 AND c = +5",
    "SELECT * FROM t WHERE a < = 5",
    "SELECT * FROM t WHERE a !== 5",
    "SELECT * FROM t WHERE a =5abc",
    "SELECT * FROM t WHERE a = 5 ORDER BY b USING < 5",
    "SELECT * FROM t WHERE a=1 AND b=2 AND c=3;",
    "SELECT a, b FROM t WHERE c = 5 GROUP BY a, b HAVING count(*) > 2",
    "SELECT row_to_json(t) FROM t WHERE id = 5",
    "SELECT * FROM t WHERE a IN (SELECT b FROM u WHERE c = 1)",
    "SELECT * FROM t WHERE (a, b) IN ((1, 2))",
    "SELECT * FROM t WHERE a = 5 WINDOW w AS (ROWS 5 PRECEDING)",
    "SELECT 1 WHERE a = 5;;",
    "SELECT 1 FROM",
    "SELECT * FROM t WHERE a = 5 AND",
    "SELECT * FROM t WHERE a = 5 AND b = ''",
    'SELECT * FROM t WHERE a = 5 AND "" = 1',
]

# Texts the literal path must not rewrite: each takes the exact path.
FALLBACKS = [
    "SELECT 'a = 1'",
    "SELECT * FROM t WHERE a = '5'",
    "EXPLAIN (ANALYZE 0) SELECT * FROM t WHERE a = 5",
    "EXPLAIN (ANALYZE 0) DELETE FROM t",
    "DELETE FROM t WHERE id = 5",
    "UPDATE t SET a = 1 WHERE id = 2",
    "SELECT 1abc",
    "SELECT * FROM t WHERE a = 5abc",
    "SELECT * FROM t WHERE a = 1e3",
    "SELECT * FROM t WHERE a = 1.5e3",
    "SELECT * FROM t WHERE a = 0x1F",
    "SELECT * FROM t WHERE a = 0b101",
    "SELECT * FROM t WHERE a = 1_000",
    "SELECT * FROM t WHERE a = 5.",
    "SELECT * FROM t WHERE a = .5",
    "SELECT * FROM t WHERE a = 1.5.3",
    "SELECT * FROM t WHERE a = -5",
    "SELECT * FROM t WHERE a = 5::int",
    "SELECT * FROM t WHERE a = 5 -- comment",
    "SELECT * FROM t WHERE a = 5 /* comment */",
    "SELECT * FROM t WHERE a = 5 /* ; DELETE FROM t */",
    "SELECT * FROM t WHERE a = 5; DELETE FROM t",
    "SELECT * FROM t WHERE a = 5; DELETE FROM t WHERE b = 6",
    "SELECT * FROM t WHERE a = '5'; DELETE FROM t WHERE b = 6",
    "SELECT * FROM t WHERE a = $1",
    "SELECT * FROM t WHERE a = 5 AND b = $1",
    "SELECT * FROM t WHERE a = 5 AND b = $$x$$",
    "SELECT * FROM t WHERE a = 5 AND b = $q$ = 6 $q$",
    "SELECT * FROM t WHERE a = E'\\' = 5'",
    "SELECT '\\'; DELETE FROM t WHERE a = 5; --'",
    "SELECT E'\\'; DELETE FROM t WHERE a = 5; --'",
    "SELECT U&'d\\0061t' FROM t WHERE a = 5",
    "SELECT * FROM t WHERE a = 5 AND b = 'unterminated = 6",
    'SELECT * FROM t WHERE a = 5 AND "unterminated = 6',
    "SELECT * FROM t WHERE a = 5\x00; DELETE FROM t",
    "SELECT * FROM t WHERE a =\x0b5",
    "SELECT * FROM t WHERE a = 5\x0b",
    "SELECT * FROM \u00fcn\u00efcode WHERE a = 5",
    "SELECT * FROM t WHERE a\u00a0= 5",
    "SELECT * FROM t WHERE a = 5\u00a0",
    "SELECT * FROM t WHERE a = \U0001d7d3",
    "SELECT * FROM t WHERE a = 0",  # already canonical: its own exact entry
    "SELECT * FROM t WHERE a => 5",
    "SELECT * FROM t WHERE a ^= 5",
    "SELECT min (5)",
    "SELECT * FROM t WHERE a = f(5)",
    "SELECT * FROM t LIMIT 5",
    "SELECT(1) WHERE a = 5",
    "WITH x AS (SELECT 1) SELECT * FROM x WHERE a = 5",
    "VALUES (1)",
    "(SELECT * FROM t WHERE a = 5)",
    "DO $$ BEGIN PERFORM 1 WHERE 1 = 5; END $$",
    "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1 WHERE 1 = 5'",
    "PREPARE p AS SELECT * FROM t WHERE a = 5",
    "SELECT * FROM t WHERE a = 5 AND b = a$1",
]


@pytest.mark.parametrize("sql", sorted(set(_test_file_strings())) + SELECTS_WITH_NUMBERS + FALLBACKS)
def test_corpus_classifies_as_a_fresh_parse(sql: str) -> None:
    fresh()
    assert_same(classify(sql), sql)
    assert_same(classify(sql), sql)  # the exact-text cache
    # and the literal path on its own, from a cold and from a warm canonical cache
    assert_same(sqlparse._classify_text(sql), sql)
    fresh()
    assert_same(sqlparse._classify_text(sql), sql)


def test_the_corpus_exercises_the_literal_path() -> None:
    keyed = [s for s in SELECTS_WITH_NUMBERS if _literal_key(s) is not None]
    assert len(keyed) >= 30
    fresh()
    used = [s for s in keyed if sqlparse._canonical(_literal_key(s) or "") is not None]
    assert len(used) >= 25


@pytest.mark.parametrize("sql", FALLBACKS)
def test_fallbacks_are_not_rewritten(sql: str) -> None:
    assert _literal_key(sql) is None


@pytest.mark.parametrize(
    ("sql", "key"),
    [
        ("SELECT abalance FROM pgbench_accounts WHERE aid = 48213;",
         "SELECT abalance FROM pgbench_accounts WHERE aid = 0;"),
        ("select * from t where a=5 and b in (1, 2.5 ,3)", "select * from t where a=0 and b in (0, 0.0 ,0)"),
        ("SELECT * FROM t WHERE a <> 1 AND b != 2 AND c <= 3 AND d >= 4.5 AND e < 6 AND f > 7",
         "SELECT * FROM t WHERE a <> 0 AND b != 0 AND c <= 0 AND d >= 0.0 AND e < 0 AND f > 0"),
        ("SELECT * FROM t WHERE a = '= 5' AND \"b = 6\" = 7", "SELECT * FROM t WHERE a = '= 5' AND \"b = 6\" = 0"),
        ("SELECT * FROM t WHERE a = 'it''s = 5' AND b = 6", "SELECT * FROM t WHERE a = 'it''s = 5' AND b = 0"),
        ("SELECT * FROM t WHERE a = 5 AND b = 1e3", "SELECT * FROM t WHERE a = 0 AND b = 1e3"),
        ("SELECT * FROM t WHERE a = 5 LIMIT 10", "SELECT * FROM t WHERE a = 0 LIMIT 10"),
        ("SELECT * FROM t WHERE a = 5 AND b IN (1, 'x')", "SELECT * FROM t WHERE a = 0 AND b IN (1, 'x')"),
        ("SELECT * FROM t JOIN (SELECT 1) s ON a = 5", "SELECT * FROM t JOIN (SELECT 1) s ON a = 0"),
    ],
)
def test_what_is_rewritten(sql: str, key: str) -> None:
    assert _literal_key(sql) == key


# --------------------------------------------------------------------------- hits


def test_a_hit_carries_the_current_text() -> None:
    fresh()
    first = classify("  SELECT abalance FROM pgbench_accounts WHERE aid = 1 ;\n")
    hits = sqlparse._canonical.cache_info().hits
    sql = "  SELECT abalance FROM pgbench_accounts WHERE aid = 48213 ;\n"
    second = classify(sql)
    assert sqlparse._canonical.cache_info().hits == hits + 1  # it did take the literal path
    assert second.text == sql
    assert [s.text for s in second.statements] == ["SELECT abalance FROM pgbench_accounts WHERE aid = 48213"]
    assert first.text == "  SELECT abalance FROM pgbench_accounts WHERE aid = 1 ;\n"
    assert [s.text for s in first.statements] == ["SELECT abalance FROM pgbench_accounts WHERE aid = 1"]
    assert second.commands == first.commands == {"select"}
    assert second.columns == first.columns == {"pgbench_accounts.abalance", "pgbench_accounts.aid"}
    assert classify(sql) is second  # then the exact-text cache
    assert_same(second, sql)


def test_with_text_is_replace() -> None:
    info = _classify("SELECT a FROM t WHERE b = 1").statements[0]
    copy = sqlparse._with_text(info, "SELECT a FROM t WHERE b = 2")
    assert copy == dataclasses.replace(info, text="SELECT a FROM t WHERE b = 2")
    assert type(copy) is type(info)
    assert info.text == "SELECT a FROM t WHERE b = 1"
    with pytest.raises(dataclasses.FrozenInstanceError):
        copy.text = "x"  # type: ignore[misc]


def test_a_canonical_text_that_does_not_classify_cleanly_is_not_used() -> None:
    fresh()
    for sql in ("SELECT * FROM t WHERE a = 5 AND", "SELECT * FROM t WHERE a < = 5",
                "SELECT dblink_exec('host=x', 'DELETE FROM t') WHERE 1 = 2"):
        key = _literal_key(sql)
        assert key is not None
        assert sqlparse._canonical(key) is None
        assert_same(classify(sql), sql)


def test_guard_decisions_are_unchanged() -> None:
    g = guard(
        sql_rule("no-secret", tables=["secret*"]),
        sql_rule("no-delete", statements=["delete"]),
        sql_rule("no-read-file", functions=["pg_read_file"]),
    )
    texts = [
        "SELECT * FROM secret_plans WHERE id = {}",
        "SELECT * FROM public_plans WHERE id = {}",
        "SELECT * FROM (WITH d AS (DELETE FROM t WHERE id = {} RETURNING *) SELECT * FROM d) s",
        "SELECT pg_read_file('/etc/passwd') WHERE 1 = {}",
        "SELECT * FROM t WHERE a = {} AND b = '; DELETE FROM t'",
    ]
    fresh()
    for template in texts:
        for n in (1, 2, 77777, 1.5):
            sql = template.format(n)
            verdict = g.check_sql(BOT, sql)
            want = [g.decide_statement(BOT, s) for s in _classify(sql).statements]
            assert [verdict.decision] == want, sql
            assert verdict.classified.text == sql


# --------------------------------------------------------------------------- properties

TEMPLATES = [
    "SELECT abalance FROM pgbench_accounts WHERE aid = {};",
    "SELECT * FROM t WHERE a = {} AND b IN ({}, {}) OR c <= {}",
    "select x from t where y >= {} and z <> {} and w != {} and v<{} and u>{}",
    "SELECT \"u\".\"id\" FROM \"users\" \"u\" WHERE \"u\".\"email\" = 'a = 1' AND \"u\".\"id\" = {}",
    "SELECT * FROM (WITH d AS (DELETE FROM t WHERE id = {} RETURNING *) SELECT * FROM d) s WHERE x = {}",
    "SELECT * INTO n FROM t WHERE a = {}",
    "SELECT CASE WHEN a = {} THEN 'x' END FROM t WHERE b < {} ORDER BY c > {}",
    "SELECT count(*) FROM t JOIN u ON t.id = u.id AND u.k = {} WHERE t.v IN ({})",
    "  SELECT 1 = {} ;  ",
    "SELECT pg_read_file('/x') FROM t WHERE a = {}",
    "SELECT * FROM t WHERE a = {} FOR UPDATE",
]

integers = st.one_of(
    st.integers(min_value=0, max_value=10**30).map(str),
    st.sampled_from(["0", "00", "007", "2147483647", "2147483648", "9223372036854775808"]),
)
decimals = st.one_of(
    st.tuples(st.integers(min_value=0, max_value=10**12), st.integers(min_value=0, max_value=10**6)).map(
        lambda p: f"{p[0]}.{p[1]}"
    ),
    st.sampled_from(["0.0", "1.0", "00.000", "99999999999999999999.5"]),
)
numbers = st.one_of(integers, decimals)
DECIMAL = re.compile(r"[0-9]+\.[0-9]+")


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(TEMPLATES), st.lists(numbers, min_size=5, max_size=5),
       st.lists(numbers, min_size=5, max_size=5))
def test_numbers_in_templates_classify_as_a_fresh_parse(template: str, xs: list[str], ys: list[str]) -> None:
    first, second = template.format(*xs), template.format(*ys)
    fresh()
    assert_same(classify(first), first)  # populates the canonical entry (unless already canonical)
    hits = sqlparse._canonical.cache_info().hits
    assert_same(classify(second), second)  # a hit on it
    assert_same(classify(first), first)
    same_kinds = ["." in x for x in xs] == ["." in y for y in ys]
    if same_kinds and _literal_key(first) is not None and _literal_key(second) is not None:
        assert _literal_key(first) == _literal_key(second)  # one shape, one canonical entry
        if first != second:
            assert sqlparse._canonical.cache_info().hits == hits + 1


ws = st.sampled_from(["", " ", "  ", "\n", "\t", "\r\n", "\f", "\x0b"])
number_tokens = st.one_of(
    integers, decimals, integers, st.sampled_from(["-5", "+5", "1e3", "0x1F", "5.", ".5", "1_000", "5abc", "$1"])
)
columns = st.sampled_from(["a", "t.b", '"c"', '"d = 5"', 'u."E"', "f(a)", "x.y.z"])
operators = st.sampled_from(["=", "<", ">", "<=", ">=", "<>", "!=", "=>", ":=", "^=", "<<", "!", "= -", "||"])
strings = st.sampled_from(["'x'", "'a = 1'", "'it''s = 2'", "'; DELETE FROM t'", "'--'", "'/*'", "E'x'", "''",
                           "'$$'", "'\\'", "'unterminated"])


@st.composite
def conditions(draw: st.DrawFn) -> str:
    col = draw(columns)
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return f"{col}{draw(ws)}{draw(operators)}{draw(ws)}{{}}"
    if kind == 1:
        items = draw(st.lists(st.one_of(st.just("{}"), strings), min_size=1, max_size=4))
        sep = draw(st.sampled_from([",", " , ", ", "]))
        return f"{col} {draw(st.sampled_from(['IN', 'in', 'NOT IN', 'JOIN']))}{draw(ws)}({sep.join(items)})"
    if kind == 2:
        return f"{col} {draw(operators)} {draw(strings)}"
    if kind == 3:
        return f"{col} IN (SELECT b FROM u WHERE c = {{}})"
    return "EXISTS (WITH d AS (DELETE FROM v WHERE k = {} RETURNING *) SELECT 1 FROM d)"


@st.composite
def select_templates(draw: st.DrawFn) -> str:
    """A SELECT with ``{}`` where number tokens go (some odd, most with something odd around)."""
    target = draw(st.sampled_from(["*", "a, b", "count(*)", "pg_read_file('/x')", "a = 1", "row_to_json(t)"]))
    source = draw(st.sampled_from(["t", "t JOIN u ON t.id = u.id", '"T"', "public.t AS s", "t, u"]))
    conds = draw(st.lists(conditions(), min_size=1, max_size=4))
    glue = draw(st.sampled_from([" AND ", " OR ", "\nAND "]))
    tail = draw(st.sampled_from(["", ";", " ;", "; ", ";;", " LIMIT 5", " FOR UPDATE", " -- x", " /* x */",
                                 "; DELETE FROM t", " UNION SELECT * FROM u WHERE a = 5"]))
    head = draw(st.sampled_from(["SELECT", "select", "  SELECT", "\nSeLeCt", "SELECT\t"]))
    return f"{head} {target} FROM {source} WHERE {glue.join(conds)}{tail}{draw(ws)}"


@settings(max_examples=1000, deadline=None)
@given(select_templates(), st.data())
def test_generated_selects_classify_as_a_fresh_parse(template: str, data: st.DataObject) -> None:
    xs = data.draw(st.lists(number_tokens, min_size=template.count("{}"), max_size=template.count("{}")))
    # the same tokens but other values for the plain numbers: one canonical form, if any
    ys = [data.draw(integers if x.isdigit() else decimals if DECIMAL.fullmatch(x) else st.just(x)) for x in xs]
    first, second = template.format(*xs), template.format(*ys)
    fresh()
    assert_same(classify(first), first)
    assert_same(classify(second), second)  # a hit when they have one canonical form
    assert_same(classify(first), first)
    for sql in (first, second):
        key = _literal_key(sql)
        if key is not None:
            assert_same(classify(key), key)


SOUP = ["*", "a", "t.b", "FROM", "t", "WHERE", "AND", "OR", "IN", "NOT", "(", ")", ",", "=", "<", ">", "<=",
        ">=", "<>", "!=", "!", "-", "+", "::", ";", "5", "48213", "1.5", "0", "1e3", "0x1F", ".", "'", "''",
        "'x = 1'", '"', '"c = 2"', "--", "/*", "*/", "$1", "$$", "\\", "E'\\''", "\n", "\x0b", "é", "LIMIT",
        "UNION", "SELECT", "DELETE", "WITH", "AS", "RETURNING", "pg_read_file('/x')", "dblink_exec('x')"]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(SOUP), max_size=25), st.lists(st.sampled_from(["", " "]), min_size=25,
                                                               max_size=25))
def test_select_soup_classifies_as_a_fresh_parse(tokens: list[str], seps: list[str]) -> None:
    sql = "SELECT " + "".join(tok + sep for tok, sep in zip(tokens, seps, strict=False))
    fresh()
    assert_same(classify(sql), sql)
    key = _literal_key(sql)
    if key is not None:
        assert_same(classify(key), key)
        assert_same(sqlparse._classify_text(sql), sql)  # from the warm canonical cache
