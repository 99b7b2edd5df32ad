"""Masking: strategies, exemptions, column globs, JSON paths, wire types, result-set plans."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidegate_proxy.config import MaskingPolicy, MaskingRule, parse_masking_policy
from sidegate_proxy.masking import (
    REDACTED,
    TEXT_LIKE_OIDS,
    ColumnOrigin,
    ColumnPlan,
    Masker,
    MaskingEngine,
    MaskingError,
    apply_strategy,
    compile_json_path,
    hash_value,
    partial,
)
from sidegate_proxy.policy import Caller

KEY = b"k" * 32
TEXT, VARCHAR, INT8, INT4, NUMERIC, JSON_, JSONB, TEXT_ARRAY, TIMESTAMPTZ = (
    25,
    1043,
    20,
    23,
    1700,
    114,
    3802,
    1009,
    1184,
)


def policy(name: str, rules: list[dict[str, Any]], exempt: dict[str, Any] | None = None) -> MaskingPolicy:
    return parse_masking_policy(
        {
            "metadata": {"name": name, "namespace": "payments"},
            "spec": {"connections": ["orders-db"], "rules": rules, "exempt": exempt or {}},
        }
    )


PII = policy(
    "pii",
    [
        {
            "name": "emails",
            "columns": ["customers.email", "*.email"],
            "fields": ["$.customer.email", "$..email"],
            "strategy": "redact",
        },
        {"name": "cards", "detectors": ["credit-card"], "strategy": "partial", "keepLast": 4},
        {"name": "internal-ids", "pattern": "ACME-[0-9]{8}", "strategy": "hash"},
        {"name": "salaries", "columns": ["public.customers.salary"], "strategy": "null"},
    ],
    exempt={"groups": ["auditors"]},
)
SECRETS = policy(
    "secrets", [{"name": "keys", "detectors": ["aws-access-key", "private-key"], "strategy": "null"}]
)


def caller(*groups: str, subject: str = "system:serviceaccount:ci:runner") -> Caller:
    return Caller(subject=subject, issuer="https://kubernetes.default.svc", groups=frozenset(groups))


@pytest.fixture
def masker() -> Masker:
    return MaskingEngine([PII, SECRETS], KEY).for_caller(caller("ci"))


def rule(name: str, strategy: str, **kw: Any) -> MaskingRule:
    return MaskingRule(name=name, strategy=strategy, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- strategies


def test_partial_keeps_last_alphanumerics_and_punctuation() -> None:
    assert partial("4111-1111-1111-1234", 4) == "****-****-****-1234"
    assert partial("alice@example.com", 3) == "*****@*******.com"
    assert partial("secret", 0) == "******"
    # Never reveal a value whole: with no more than keepLast characters everything is masked.
    assert partial("1234", 4) == "****"
    assert partial("", 4) == ""


@given(st.text(max_size=40), st.integers(0, 10))
def test_partial_reveals_at_most_keep_last(value: str, keep: int) -> None:
    out = partial(value, keep)
    assert len(out) == len(value)
    revealed = [a for a, b in zip(value, out, strict=True) if a == b and a.isalnum()]
    assert len(revealed) <= keep
    assert len(revealed) < max(1, sum(c.isalnum() for c in value)) or not value


def test_hash_is_stable_keyed_and_short() -> None:
    a = hash_value("alice@example.com", KEY)
    assert a == hash_value("alice@example.com", KEY)
    assert a != hash_value("alice@example.com", b"other-key-other-key")
    assert a != hash_value("bob@example.com", KEY)
    assert a.startswith("h:") and len(a) == 18 and int(a[2:], 16) >= 0


def test_apply_strategy() -> None:
    assert apply_strategy(rule("r", "redact"), "x", KEY) == REDACTED
    assert apply_strategy(rule("r", "null"), "x", KEY) is None
    assert apply_strategy(rule("r", "partial", keep_last=2), "abcd", KEY) == "**cd"
    assert apply_strategy(rule("r", "hash"), "x", KEY) == hash_value("x", KEY)


def test_hash_needs_a_real_key() -> None:
    with pytest.raises(MaskingError, match="internal-ids use strategy hash"):
        MaskingEngine([PII], b"")
    MaskingEngine([SECRETS], b"")  # no hash rule, no key needed


# --------------------------------------------------------------------------- who is masked


def test_exemption_is_per_policy() -> None:
    engine = MaskingEngine([PII, SECRETS], KEY)
    auditor = engine.for_caller(caller("auditors"))
    assert auditor.active
    assert {r.name for r in auditor.rules} == {"keys"}
    assert auditor.mask_text("a@b.io AKIAIOSFODNN7EXAMPLE")[0] == "a@b.io " + REDACTED
    runner = engine.for_caller(caller("ci"))
    assert {r.name for r in runner.rules} == {"emails", "cards", "internal-ids", "salaries", "keys"}
    assert engine.for_caller(caller("ci")) is runner  # compiled once per set of policies


def test_exempt_by_subject_and_no_policies_is_inactive() -> None:
    p = policy(
        "p", [{"name": "e", "detectors": ["email"]}], exempt={"subjects": ["system:serviceaccount:audit:*"]}
    )
    engine = MaskingEngine([p], KEY)
    m = engine.for_caller(caller(subject="system:serviceaccount:audit:reader"))
    assert not m.active
    assert m.mask_text("a@b.io") == ("a@b.io", {})
    plan = m.plan_columns([ColumnOrigin("e", 1, 1, TEXT, 0, "public", "t", "e")], query_reads_masked=True)
    assert not plan.active
    assert not MaskingEngine([], b"").for_caller(caller()).active


# --------------------------------------------------------------------------- column rules


def test_column_globs(masker: Masker) -> None:
    assert masker.column_rule("public", "customers", "email").name == "emails"  # type: ignore[union-attr]
    assert masker.column_rule("sales", "Leads", "EMAIL").name == "emails"  # type: ignore[union-attr]
    assert masker.column_rule("public", "customers", "salary").name == "salaries"  # type: ignore[union-attr]
    assert masker.column_rule("hr", "customers", "salary") is None  # schema.table.column
    assert masker.column_rule("public", "customers", "name") is None
    m = Masker([rule("all", "hash", columns=("audit.*",)), rule("bare", "partial", columns=("phone",))], KEY)
    assert m.column_rule(None, "audit", "anything").name == "all"  # type: ignore[union-attr]
    assert m.column_rule("x", "contacts", "phone").name == "bare"  # type: ignore[union-attr]


def test_strictest_rule_wins_on_a_column() -> None:
    m = Masker(
        [rule("loose", "partial", columns=("*.email",)), rule("tight", "null", columns=("users.email",))], KEY
    )
    assert m.column_rule("public", "users", "email").name == "tight"  # type: ignore[union-attr]


def test_bad_column_glob_fails_at_build() -> None:
    with pytest.raises(MaskingError, match=r"schema\.table\.column"):
        Masker([rule("r", "redact", columns=("a.b.c.d",))], KEY)


def test_touches_masked(masker: Masker) -> None:
    # "*.email" makes every table possibly masked when the columns are unknown: fail closed.
    assert masker.touches_masked(["orders"]).name == "emails"  # type: ignore[union-attr]
    assert masker.touches_masked(["orders"], ["id", "amount"]) is None
    assert masker.touches_masked(["public.customers"], ["salary"]).name == "salaries"  # type: ignore[union-attr]
    assert masker.touches_masked(["hr.customers"], ["salary"]) is None
    assert masker.touches_masked(["customers"], ["*"]).name == "salaries"  # type: ignore[union-attr]
    assert masker.touches_masked([]) is None


# --------------------------------------------------------------------------- text


def test_mask_text_counts_per_rule(masker: Masker) -> None:
    text = "paid with 4111 1111 1111 1111, ref ACME-00000042, order 1234567890123, mail a@b.io"
    out, counts = masker.mask_text(text)
    ref_hash = hash_value("ACME-00000042", KEY)
    # Emails are a column/field rule here, not a detector: text stays as it is.
    assert out == f"paid with **** **** **** 1111, ref {ref_hash}, order 1234567890123, mail a@b.io"
    assert counts == {"cards": 1, "internal-ids": 1}


def test_mask_text_one_megabyte(masker: Masker) -> None:
    line = "customer ACME-00000001 paid 4111 1111 1111 1111 on 2024-01-15, order 1234567890123. "
    text = line * (1_000_000 // len(line))
    out, counts = masker.mask_text(text)
    n = text.count(line)
    assert counts == {"cards": n, "internal-ids": n}
    assert "4111 1111" not in out and "ACME-" not in out


# --------------------------------------------------------------------------- JSON


def test_json_paths_nested_arrays_and_recursive_descent(masker: Masker) -> None:
    doc = {
        "customer": {"email": "a@b.io", "name": "Ann"},
        "contacts": [{"email": "c@d.io"}, {"deep": {"email": "e@f.io"}}],
        "Email": "case@sensitive.io",
        "total": 10,
    }
    out, counts = masker.mask_json(doc)
    assert out == {
        "customer": {"email": REDACTED, "name": "Ann"},
        "contacts": [{"email": REDACTED}, {"deep": {"email": REDACTED}}],
        "Email": "case@sensitive.io",
        "total": 10,
    }
    assert counts == {"emails": 3}
    assert doc["customer"]["email"] == "a@b.io"  # the input is not modified


def test_json_detectors_on_strings_numbers_and_keys(masker: Masker) -> None:
    doc = {
        "card": 4111111111111111,
        "note": "card 4111-1111-1111-1111",
        "id": 1234567890123,
        "keys": {"AKIAIOSFODNN7EXAMPLE": "AKIAIOSFODNN7EXAMPLE"},
        "ok": True,
        "none": None,
        "f": 1.5,
    }
    out, counts = masker.mask_json(doc)
    assert out == {
        "card": "************1111",
        "note": "card ****-****-****-1111",
        "id": 1234567890123,
        "keys": {REDACTED: None},
        "ok": True,
        "none": None,
        "f": 1.5,
    }
    assert counts == {"cards": 2, "keys": 2}


@pytest.mark.parametrize(
    ("path", "doc", "expected"),
    [
        ("$.items[0].x", {"items": [{"x": 1}, {"x": 2}]}, {"items": [{"x": "h"}, {"x": 2}]}),
        ("$.items[-1].x", {"items": [{"x": 1}, {"x": 2}]}, {"items": [{"x": 1}, {"x": "h"}]}),
        ("$.items[*].x", {"items": [{"x": 1}, {"x": 2}]}, {"items": [{"x": "h"}, {"x": "h"}]}),
        ("$.a.*", {"a": {"p": 1, "q": [2]}, "b": 3}, {"a": {"p": "h", "q": "h"}, "b": 3}),
        ("$['odd key'].v", {"odd key": {"v": 1}}, {"odd key": {"v": "h"}}),
        ("customer.id", {"customer": {"id": 7}}, {"customer": {"id": "h"}}),
        ("$..items[*].x", {"a": {"items": [{"x": 1}]}}, {"a": {"items": [{"x": "h"}]}}),
        ("$..secret", {"secret": {"secret": 1}}, {"secret": "h"}),
        ("$.missing.path", {"a": 1}, {"a": 1}),
    ],
)
def test_json_path_forms(path: str, doc: Any, expected: Any) -> None:
    m = Masker([rule("r", "hash", fields=(path,))], KEY)
    out, _ = m.mask_json(doc)

    def norm(v: Any) -> Any:  # every masked value is a hash string: compare its shape
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        if isinstance(v, list):
            return [norm(x) for x in v]
        return "h" if isinstance(v, str) and v.startswith("h:") else v

    assert norm(out) == expected


def test_json_whole_containers_and_null() -> None:
    m = Masker([rule("addr", "null", fields=("$.address",)), rule("tags", "redact", fields=("$.tags",))], KEY)
    out, counts = m.mask_json({"address": {"city": "X"}, "tags": ["a", "b"], "root": "$"})
    assert out == {"address": None, "tags": REDACTED, "root": "$"}
    assert counts == {"addr": 1, "tags": 1}
    whole = Masker([rule("all", "redact", fields=("$",))], KEY)
    assert whole.mask_json([1, 2]) == (REDACTED, {"all": 1})


def test_bad_json_paths() -> None:
    for bad in ("$.a[", "$.a[x]", "$..", "$.a..", "$a"):
        with pytest.raises(MaskingError, match="JSON path"):
            compile_json_path(bad)


# --------------------------------------------------------------------------- wire types


def test_binary_text_like_vs_other_types(masker: Masker) -> None:
    emails = masker.column_rule("public", "customers", "email")
    assert emails is not None
    assert masker.mask_binary(emails, TEXT, b"a@b.io") == REDACTED.encode()
    assert masker.mask_binary(emails, VARCHAR, "é@b.io".encode()) == REDACTED.encode()
    assert masker.mask_binary(emails, INT8, struct.pack("!q", 42)) is None  # cannot hold a mask
    assert masker.mask_binary(emails, 16500, b"citext@x.io") == REDACTED.encode()  # user type: text
    assert masker.mask_binary(emails, JSONB, b'\x01"a@b.io"') == b'\x01"' + REDACTED.encode() + b'"'
    assert masker.mask_binary(emails, JSON_, b'"a@b.io"') == json.dumps(REDACTED).encode()
    cards = rule("cards", "partial", keep_last=4)
    assert masker.mask_binary(cards, TEXT, b"4111111111111111") == b"************1111"
    assert masker.mask_column_value(cards, "4111111111111111") == "************1111"
    assert masker.mask_column_value(rule("n", "null"), "x") is None
    assert {25, 1043, 1042, 19, 114, 3802} <= TEXT_LIKE_OIDS


def text_array(*items: bytes | None) -> bytes:
    out = struct.pack("!iiIii", 1, int(any(i is None for i in items)), TEXT, len(items), 1)
    for i in items:
        out += struct.pack("!i", -1) if i is None else struct.pack("!i", len(i)) + i
    return out


def numeric(value: int) -> bytes:
    groups = []
    while value:
        value, g = divmod(value, 10000)
        groups.insert(0, g)
    return struct.pack(f"!hhHH{len(groups)}H", len(groups), len(groups) - 1, 0, 0, *groups)


_BATCH_COLUMNS = [
    ColumnOrigin("email", 16390, 3, TEXT, 0, "public", "customers", "email"),  # a column rule
    ColumnOrigin("name", 16390, 2, TEXT, 0, "public", "customers", "name"),  # detectors only
    ColumnOrigin("expr", 0, 0, TEXT, 0),  # no origin: detectors only
    ColumnOrigin("card8", 1, 2, INT8, 1, "public", "t", "card8"),  # binary int8: NULL on a hit
]
_cell = st.none() | st.sampled_from([b"", b"Ann", b"a@b.io", b"call 4111 1111 1111 1111", b"x" * 40]) | st.binary(
    max_size=12)
_batch_rows = st.lists(st.tuples(_cell, _cell, _cell, st.none() | st.sampled_from(
    [struct.pack("!q", 1), struct.pack("!q", 4111111111111111)])).map(list), max_size=40)


@given(_batch_rows)
def test_a_batch_of_rows_is_masked_as_each_row_alone(rows: list[list[bytes | None]]) -> None:
    """``apply_rows`` (one detector pass over a whole run of DataRows) gives every row what
    ``apply`` gives it alone, None for rows it leaves as they are, and the summed counts."""
    masker = MaskingEngine([PII, SECRETS], KEY).for_caller(caller("ci"))
    for reads_masked in (True, False):
        check_batch(masker.plan_columns(_BATCH_COLUMNS, reads_masked), rows)


def check_batch(plan: ColumnPlan, rows: list[list[bytes | None]]) -> None:
    batch, counts = plan.apply_rows(rows)
    expected: dict[str, int] = {}
    for row, masked in zip(rows, batch, strict=True):
        alone, alone_counts = plan.apply(row)
        assert (row if masked is None else masked) == alone
        for rule, n in alone_counts.items():
            expected[rule] = expected.get(rule, 0) + n
    assert dict(counts) == expected


def test_a_batch_leaves_unmasked_rows_alone(masker: Masker) -> None:
    plan = masker.plan_columns(_BATCH_COLUMNS, False)  # the expression reads nothing masked
    rows: list[list[bytes | None]] = [[None, b"Ann", b"plain", None], [b"a@b.io", b"Bo", b"x", None]]
    batch, counts = plan.apply_rows(rows)
    assert batch[0] is None and batch[1] is not None and batch[1][0] == REDACTED.encode()
    assert dict(counts) == {"emails": 1}


def test_plan_unknown_origin_fails_closed(masker: Masker) -> None:
    cols = [
        ColumnOrigin("email", 16390, 3, TEXT, 0, "public", "customers", "email"),
        ColumnOrigin("name", 16390, 2, TEXT, 0, "public", "customers", "name"),
        ColumnOrigin("lower", 0, 0, TEXT, 0),  # lower(email): no origin
        ColumnOrigin("n", 0, 0, INT8, 1),  # count(*)
        ColumnOrigin("salary", 16390, 5, NUMERIC, 1, "public", "customers", "salary"),
    ]
    row: list[bytes | None] = [b"a@b.io", b"Ann", b"a@b.io", struct.pack("!q", 1), numeric(50000)]
    touched = masker.touches_masked(["customers"], ["email", "name", "salary"])
    plan = masker.plan_columns(cols, touched)
    assert [r.name if r else None for r in plan.rules] == ["emails", None, "salaries", "salaries", "salaries"]
    assert plan.apply(row) == ([REDACTED.encode(), b"Ann", None, None, None], {"emails": 1, "salaries": 3})
    default = masker.plan_columns(cols, True)
    assert default.apply(row)[0][:4] == [REDACTED.encode(), b"Ann", REDACTED.encode(), None]
    assert masker.plan_columns(cols, False).apply(row)[0][:4] == [
        REDACTED.encode(),
        b"Ann",
        b"a@b.io",
        struct.pack("!q", 1),
    ]


def test_plan_detectors_per_type(masker: Masker) -> None:
    cols = [
        ColumnOrigin("note", 1, 1, TEXT, 0, "public", "t", "note"),
        ColumnOrigin("card8", 1, 2, INT8, 1, "public", "t", "card8"),
        ColumnOrigin("card8t", 1, 3, INT8, 0, "public", "t", "card8t"),
        ColumnOrigin("cardn", 1, 4, NUMERIC, 1, "public", "t", "cardn"),
        ColumnOrigin("doc", 1, 5, JSONB, 1, "public", "t", "doc"),
        ColumnOrigin("tags", 1, 6, TEXT_ARRAY, 1, "public", "t", "tags"),
        ColumnOrigin("at", 1, 7, TIMESTAMPTZ, 0, "public", "t", "at"),
        ColumnOrigin("key", 1, 8, TEXT, 1, "public", "t", "key"),
    ]
    plan = masker.plan_columns(cols)
    assert plan.active and plan.rules == (None,) * 8
    row: list[bytes | None] = [
        b"card 4111 1111 1111 1111",
        struct.pack("!q", 4111111111111111),
        b"4111111111111111",
        numeric(4111111111111111),
        b'\x01{"a": [{"pan": "4111111111111111"}], "n": 1234567890123}',
        text_array(b"ok", b"AKIAIOSFODNN7EXAMPLE", None, b"5500-0000-0000-0004"),
        b"2024-01-15 10:00:00+00",
        b"id AKIAIOSFODNN7EXAMPLE",
    ]
    out, counts = plan.apply(row)
    assert out[0] == b"card **** **** **** 1111"
    assert out[1] is None and out[2] is None and out[3] is None  # a card in a number: NULL
    assert out[4] == b'\x01{"a": [{"pan": "************1111"}], "n": 1234567890123}'
    assert out[5] == text_array(b"ok", None, None, b"****-****-****-0004")
    assert out[6] == row[6]
    assert out[7] is None  # null-strategy detector: the whole value
    assert counts == {"cards": 6, "keys": 2}
    clean = [
        b"nothing",
        struct.pack("!q", 7),
        b"7",
        numeric(7),
        b'\x01{"a": 1}',
        text_array(b"x"),
        b"t",
        b"k",
    ]
    assert plan.apply(clean) == (clean, {})


def test_plan_with_bind_formats(masker: Masker) -> None:
    cols = [ColumnOrigin("email", 1, 1, JSONB, 0, "public", "customers", "email")]
    plan = masker.plan_columns(cols)
    assert plan.apply([b'"a@b.io"'])[0] == [json.dumps(REDACTED).encode()]
    binary = plan.with_formats([1])
    assert binary.apply([b'\x01"a@b.io"'])[0] == [b"\x01" + json.dumps(REDACTED).encode()]
    assert plan.with_formats([]).apply([b'"a@b.io"'])[0] == [json.dumps(REDACTED).encode()]
    with pytest.raises(MaskingError, match="format codes"):
        plan.with_formats([0, 1, 0])
    with pytest.raises(MaskingError, match="DataRow has 2 values"):
        plan.apply([b"a", b"b"])


def test_plan_without_masking_is_inactive() -> None:
    m = Masker([rule("e", "redact", columns=("users.email",))], KEY)
    plan = m.plan_columns([ColumnOrigin("id", 5, 1, INT4, 1, "public", "orders", "id")])
    assert not plan.active
    assert plan.apply([b"\x00\x00\x00\x01"]) == ([b"\x00\x00\x00\x01"], {})


# --------------------------------------------------------------------------- against a real server


@pytest.fixture(scope="module")
def pg() -> Iterator[Any]:
    from sidegate_proxy.localpg import PostgresUnavailable, sample_database

    try:
        with sample_database() as db:
            db.sql(
                "CREATE TABLE docs (id int, body jsonb, tags text[], big bigint);"
                'INSERT INTO docs VALUES (1, \'{"email": "x@y.io", "pan": "4111111111111111"}\','
                " ARRAY['a@b.io', '5500-0000-0000-0004'], 4111111111111111);"
            )
            yield db
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))


def _origins(conn: Any, res: Any) -> list[ColumnOrigin]:
    """What the PG proxy does per RowDescription: (table OID, attnum) to names via the catalog."""
    cols = []
    for i in range(res.nfields):
        table_oid, attnum = res.ftable(i), res.ftablecol(i)
        schema = table = column = None
        if table_oid:
            schema, table, column = conn.execute(
                "SELECT n.nspname, c.relname, a.attname FROM pg_attribute a"
                " JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE a.attrelid = %s AND a.attnum = %s",
                (table_oid, attnum),
            ).fetchone()
        cols.append(
            ColumnOrigin(
                res.fname(i).decode(), table_oid, attnum, res.ftype(i), res.fformat(i), schema, table, column
            )
        )
    return cols


def _run(pg: Any, masker: Masker, sql: str, tables: Sequence[str]) -> list[list[Any]]:
    """Runs ``sql`` in binary format, masks the raw DataRows and decodes them with psycopg's own
    loaders: a masked value that is not valid for its wire type fails here."""
    import psycopg
    from psycopg.pq import Format

    with psycopg.connect(pg.address.dsn()) as conn:
        cur = conn.cursor(binary=True)
        cur.execute(sql)
        res = cur.pgresult
        assert res is not None
        plan = masker.plan_columns(_origins(conn, res), masker.touches_masked(tables))
        rows = []
        for r in range(res.ntuples):
            values, _ = plan.apply([res.get_value(r, c) for c in range(res.nfields)])
            loaders = [
                conn.adapters.get_loader(res.ftype(c), Format.BINARY)(res.ftype(c), conn)
                for c in range(res.nfields)
            ]
            rows.append([None if v is None else ld.load(v) for v, ld in zip(values, loaders, strict=True)])
        return rows


@pytest.mark.postgres
def test_real_postgres_binary_results_stay_decodable(pg: Any, masker: Masker) -> None:
    rows = _run(
        pg,
        masker,
        "SELECT id, name, email AS e, card, salary, note FROM customers ORDER BY id LIMIT 10",
        ["customers"],
    )
    assert rows[0][:3] == [1, "Customer 1", REDACTED]
    assert rows[0][3] == "****-****-****-0004"  # 5500-0000-0000-0004, found by the card detector
    assert rows[0][4] is None  # numeric salary, strategy null
    assert rows[9][5] == "call back at ops10@example.org"  # emails are column rules, not detectors

    rows = _run(pg, masker, "SELECT body, tags, big FROM docs", ["docs"])
    # JSON paths are for HTTP bodies; in a jsonb column only the detectors run.
    assert rows == [[{"email": "x@y.io", "pan": "************1111"}, ["a@b.io", "****-****-****-0004"], None]]


@pytest.mark.postgres
def test_real_postgres_unknown_origins_fail_closed(pg: Any, masker: Masker) -> None:
    # UNION and expressions report no origin: in a query reading a masked column they get the
    # strictest rule on the tables it reads (customers.salary: null).
    rows = _run(
        pg,
        masker,
        "SELECT email FROM customers WHERE id = 1 UNION SELECT lower(email) FROM customers WHERE id = 2",
        ["customers"],
    )
    assert rows == [[None], [None]]
    rows = _run(pg, masker, "SELECT s FROM (SELECT email AS s FROM customers) x LIMIT 1", ["customers"])
    assert rows == [[REDACTED]]  # subqueries keep the origin
    rows = _run(pg, masker, "SELECT count(*) AS n, max(salary) FROM customers", ["customers"])
    assert rows == [[None, None]]
    rows = _run(pg, masker, "SELECT ref, amount FROM orders ORDER BY id LIMIT 1", ["orders"])
    assert rows[0][0] == hash_value("ACME-00000001", KEY)


INT2 = 21


@pytest.mark.parametrize("fmt", [0, 1])
def test_small_integers_skip_the_detectors_unless_a_custom_pattern_could_match(fmt: int) -> None:
    """int2/int4 cannot hold what the built-in detectors look for, so a result of them is relayed
    untouched; int8 can (a card number), and so can any column under a custom pattern."""
    builtin = Masker([rule("pii", "redact", detectors=("email", "credit-card", "us-ssn", "phone"))], KEY)
    cols = [ColumnOrigin(n, 5, i + 1, oid, fmt, "public", "t", n) for i, (n, oid) in enumerate(
        [("a", INT2), ("b", INT4)])]
    assert not builtin.plan_columns(cols).active
    assert builtin.plan_columns([ColumnOrigin("c", 5, 3, INT8, fmt, "public", "t", "c")]).active

    custom = Masker([rule("ids", "redact", pattern=r"\d{6}")], KEY)
    plan = custom.plan_columns(cols)
    assert plan.active
    value = b"123456" if fmt == 0 else struct.pack("!i", 123456)
    masked, counts = plan.apply([None, value])
    assert counts == {"ids": 1} and masked[1] != value
