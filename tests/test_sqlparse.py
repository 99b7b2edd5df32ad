"""SQL classification on PostgreSQL's real grammar: nested writes count, text tricks do not."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidegate_proxy.sqlparse import (
    COMMAND_GROUPS,
    GROUPS,
    SQLSyntaxError,
    classify,
    groups_of,
    normalize,
    resolve_execute,
)


def one(sql: str):  # type: ignore[no-untyped-def]
    classified = classify(sql)
    assert len(classified.statements) == 1, classified
    return classified.statements[0]


@pytest.mark.parametrize(
    ("sql", "commands", "groups"),
    [
        ("SELECT 1", {"select"}, {"read"}),
        ("VALUES (1)", {"select"}, {"read"}),
        ("INSERT INTO t VALUES (1)", {"insert"}, {"write"}),
        ("INSERT INTO t SELECT * FROM u", {"insert", "select"}, {"read", "write"}),
        ("INSERT INTO t VALUES (1) ON CONFLICT (a) DO UPDATE SET b = 1", {"insert", "update"}, {"write"}),
        ("UPDATE t SET a = 1 WHERE id = 2", {"update"}, {"write"}),
        ("DELETE FROM t WHERE id = 2", {"delete"}, {"write"}),
        ("MERGE INTO t USING u ON t.a = u.a WHEN MATCHED THEN DELETE", {"merge", "delete"}, {"write"}),
        ("TRUNCATE t", {"truncate"}, {"write"}),
        ("COPY t FROM STDIN", {"copy", "copy_from"}, {"write"}),
        ("COPY t TO STDOUT", {"copy", "copy_to"}, {"read"}),
        ("COPY t TO PROGRAM 'curl evil'", {"copy", "copy_to", "copy_program"}, {"read", "admin"}),
        ("COPY t FROM '/etc/passwd'", {"copy", "copy_from", "copy_file"}, {"write", "admin"}),
        ("DROP TABLE t", {"drop"}, {"ddl"}),
        ("CREATE TABLE t (a int)", {"create"}, {"ddl"}),
        ("ALTER TABLE t ADD COLUMN b int", {"alter"}, {"ddl"}),
        ("CREATE INDEX ON t (a)", {"create"}, {"ddl"}),
        ("COMMENT ON TABLE t IS 'x'", {"comment"}, {"ddl"}),
        ("GRANT SELECT ON t TO bob", {"grant"}, {"dcl"}),
        ("REVOKE ALL ON t FROM bob", {"revoke"}, {"dcl"}),
        ("CREATE ROLE r", {"create", "create_role"}, {"ddl", "dcl"}),
        ("ALTER ROLE r PASSWORD 'x'", {"alter", "alter_role"}, {"ddl", "dcl"}),
        ("SET ROLE admin", {"set", "set_role"}, {"session", "dcl"}),
        ("ALTER SYSTEM SET work_mem = '1GB'", {"alter", "alter_system"}, {"ddl", "admin"}),
        ("DROP DATABASE prod", {"drop", "drop_database"}, {"ddl", "admin"}),
        ("CREATE DATABASE x", {"create", "create_database"}, {"ddl", "admin"}),
        ("CREATE EXTENSION dblink", {"create", "create_extension"}, {"ddl", "admin"}),
        ("LOAD 'evil.so'", {"load"}, {"admin"}),
        ("VACUUM ANALYZE t", {"vacuum", "analyze"}, {"admin"}),
        ("ANALYZE t", {"analyze"}, {"admin"}),
        ("REINDEX TABLE t", {"reindex"}, {"admin"}),
        ("CLUSTER t", {"cluster"}, {"admin"}),
        ("CHECKPOINT", {"checkpoint"}, {"admin"}),
        ("LOCK TABLE t", {"lock"}, {"write"}),
        ("REFRESH MATERIALIZED VIEW mv", {"refresh"}, {"write"}),
        ("CALL proc(1)", {"call"}, {"write"}),
        ("BEGIN", {"begin"}, {"transaction"}),
        ("START TRANSACTION", {"start"}, {"transaction"}),
        ("COMMIT", {"commit"}, {"transaction"}),
        ("ROLLBACK", {"rollback"}, {"transaction"}),
        ("SAVEPOINT s", {"savepoint"}, {"transaction"}),
        ("SET search_path = public", {"set"}, {"session"}),
        ("SHOW work_mem", {"show"}, {"session"}),
        ("RESET ALL", {"reset"}, {"session"}),
        ("DISCARD ALL", {"discard"}, {"session"}),
        ("LISTEN ch", {"listen"}, {"session"}),
        ("NOTIFY ch", {"notify"}, {"session"}),
        ("DEALLOCATE ALL", {"deallocate"}, {"session"}),
        ("SECURITY LABEL ON TABLE t IS 'x'", {"security_label"}, {"ddl"}),
        ("SELECT * FROM t FOR UPDATE", {"select"}, {"read"}),
        ("EXPLAIN SELECT 1", {"explain"}, {"read"}),
    ],
)
def test_statement_classes(sql: str, commands: set[str], groups: set[str]) -> None:
    info = one(sql)
    assert info.commands == commands
    assert info.groups == groups


def test_every_command_has_known_groups() -> None:
    for command, groups in COMMAND_GROUPS.items():
        assert groups <= GROUPS, command
    assert groups_of(["no-such-command"]) == {"unknown"}


# --------------------------------------------------------------------------- nested statements


def test_delete_inside_cte() -> None:
    info = one("WITH d AS (DELETE FROM audit RETURNING *) SELECT count(*) FROM d")
    assert {"select", "delete"} <= info.commands
    assert "write" in info.groups
    assert info.writes_without_where == {"delete"}
    assert "audit" in info.tables


def test_explain_analyze_runs_the_inner_statement() -> None:
    info = one("EXPLAIN ANALYZE DELETE FROM t")
    assert info.commands == {"explain", "delete"}
    assert info.writes_without_where == {"delete"}
    info = one("EXPLAIN (ANALYZE true, BUFFERS) UPDATE t SET a = 1")
    assert "update" in info.commands


@pytest.mark.parametrize(
    "sql",
    [
        "EXPLAIN DELETE FROM t",
        "EXPLAIN (ANALYZE off) DELETE FROM t",
        "EXPLAIN (ANALYZE false) UPDATE t SET a = 1",
        "EXPLAIN (ANALYZE 0) DELETE FROM t",
    ],
)
def test_explain_without_analyze_does_not_execute(sql: str) -> None:
    info = one(sql)
    assert info.commands == {"explain"}
    assert info.groups == {"read"}
    assert info.writes_without_where == frozenset()


def test_prepare_of_a_write_counts_and_execute_is_unknown_until_resolved() -> None:
    prepare = one("PREPARE p (int) AS DELETE FROM t WHERE id = $1")
    assert prepare.commands == {"prepare", "delete"}
    assert prepare.prepared_name == "p"
    execute = one("EXECUTE p(1)")
    assert execute.commands == {"execute", "unknown"}
    assert execute.groups == {"unknown"}
    assert execute.prepared_name == "p"
    resolved = resolve_execute(execute, prepare.text)
    assert resolved.commands == {"execute", "delete"}
    assert resolved.groups == {"write"}
    assert "t" in resolved.tables
    assert one("DEALLOCATE p").prepared_name == "p"


def test_rule_actions_count() -> None:
    info = one("CREATE RULE r AS ON INSERT TO t DO INSTEAD DELETE FROM victims")
    assert {"create", "delete"} <= info.commands
    assert {"ddl", "write"} <= info.groups
    assert "victims" in info.tables


def test_trigger_is_ddl() -> None:
    info = one("CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION f()")
    assert info.commands == {"create"}


def test_do_block_is_unknown_and_its_static_sql_counts() -> None:
    info = one("DO $$ BEGIN DROP TABLE t; END $$")
    assert {"do", "unknown", "drop"} <= info.commands
    assert "unknown" in info.groups
    info = one("DO $body$ BEGIN EXECUTE 'DROP' || ' TABLE t'; END $body$")
    assert {"do", "unknown"} <= info.commands
    info = one("DO LANGUAGE plpython3u $$ import os $$")
    assert {"do", "unknown", "untrusted_language"} <= info.commands


def test_function_bodies_are_created_not_run() -> None:
    info = one("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ DELETE FROM t; SELECT 1 $$")
    assert info.commands == {"create"}
    assert "t" in info.tables
    info = one("CREATE FUNCTION f() RETURNS text LANGUAGE sql RETURN pg_read_file('/etc/passwd')")
    assert info.commands == {"create"}
    assert "pg_read_file" in info.functions
    info = one(
        "CREATE FUNCTION g() RETURNS text LANGUAGE plpgsql AS $$ BEGIN "
        "RETURN pg_catalog.pg_read_file('/etc/passwd'); END $$"
    )
    assert info.commands == {"create"}
    assert "pg_catalog.pg_read_file" in info.functions
    info = one("CREATE FUNCTION h() RETURNS int LANGUAGE c AS 'evil.so', 'h'")
    assert info.commands == {"create", "untrusted_language"}


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT query_to_xml('DELETE FROM t', true, true, '')",
        "SELECT * FROM dblink('host=evil', 'SELECT 1') AS x(a int)",
        "SELECT public.dblink_exec('DROP TABLE t')",
    ],
)
def test_dynamic_sql_functions_are_unknown(sql: str) -> None:
    info = one(sql)
    assert "unknown" in info.commands


def test_functions_are_collected_with_their_schema() -> None:
    info = one("SELECT pg_read_file('/etc/passwd'), PG_CATALOG.LO_IMPORT('/x'), \"Upper\"(1)")
    assert info.functions == {"pg_read_file", "pg_catalog.lo_import", "upper"}
    info = one("SELECT * FROM pg_ls_dir('.')")
    assert info.functions == {"pg_ls_dir"}


def test_tables_are_lower_case_and_qualified_as_written() -> None:
    info = one('SELECT * FROM Public."Customers" c JOIN orders o ON o.cid = c.id, db.s.t')
    assert info.tables == {"public.customers", "orders", "db.s.t"}
    assert one("DROP TABLE IF EXISTS s.a, b").tables == {"s.a", "b"}


def test_select_into_creates_and_writes() -> None:
    info = one("SELECT * INTO copy_of_t FROM t")
    assert {"select", "create", "select_into"} <= info.commands
    assert {"read", "write", "ddl"} <= info.groups
    info = one("CREATE TABLE x AS SELECT * FROM t")
    assert {"create", "create_table_as", "select"} <= info.commands


def test_writes_without_where() -> None:
    assert one("UPDATE t SET a = 1").writes_without_where == {"update"}
    assert one("DELETE FROM t").writes_without_where == {"delete"}
    assert one("DELETE FROM t WHERE true").writes_without_where == frozenset()
    assert one("TRUNCATE t").writes_without_where == {"truncate"}
    nested = one("WITH x AS (UPDATE t SET a = 1 WHERE id = 1 RETURNING id) DELETE FROM u")
    assert nested.writes_without_where == {"delete"}


# --------------------------------------------------------------------------- text tricks


def test_multiple_statements_are_split_with_their_own_text() -> None:
    classified = classify("SELECT 1; DROP TABLE x ;\n  delete from y")
    assert [s.text for s in classified.statements] == ["SELECT 1", "DROP TABLE x", "delete from y"]
    assert [s.commands for s in classified.statements] == [{"select"}, {"drop"}, {"delete"}]
    assert classified.commands == {"select", "drop", "delete"}


def test_comments_and_case_do_not_hide_statements() -> None:
    classified = classify("SeLeCt 1 /* ; */ -- harmless\n; dRoP/**/TaBlE x")
    assert [s.commands for s in classified.statements] == [{"select"}, {"drop"}]
    assert classify("/* DROP TABLE x */ SELECT 1 -- ; DROP TABLE y").commands == {"select"}
    assert classify("/* nested /* DROP TABLE x; */ */ SELECT 1").commands == {"select"}


def test_literals_and_quoted_identifiers_are_not_keywords() -> None:
    info = one("SELECT 'DROP TABLE x', $$DROP TABLE y$$, $q$; DELETE FROM z$q$, E'\\'; DROP TABLE w'")
    assert info.commands == {"select"}
    info = one('SELECT * FROM "DROP" WHERE "DELETE" = 1')
    assert info.commands == {"select"}
    assert info.tables == {"drop"}


def test_whitespace_tricks() -> None:
    classified = classify("\tSELECT\n1\x0b;\r\nDROP\fTABLE x")
    assert [s.commands for s in classified.statements] == [{"select"}, {"drop"}]
    # a no-break space is not whitespace to PostgreSQL: unparseable, hence unknown
    assert classify("DROP\u00a0TABLE x").commands == {"unknown"}


def test_unparseable_is_unknown() -> None:
    classified = classify("SELEKT * FROM t")
    assert classified.error and "syntax error" in classified.error
    assert classified.commands == {"unknown"}
    assert classified.groups == {"unknown"}
    # one bad statement poisons the whole string: nothing is half-parsed
    assert classify("SELECT 1; DROP TABLE x; SELEKT").commands == {"unknown"}


def test_nul_byte_cannot_truncate_the_text() -> None:
    classified = classify("SELECT 1\x00; DROP TABLE x")
    assert classified.commands == {"unknown"}
    assert classified.error is not None


def test_empty_text_has_no_statements() -> None:
    assert classify("").statements == ()
    assert classify("  -- nothing\n").statements == ()


def test_cache_returns_the_same_object() -> None:
    sql = "SELECT email FROM customers WHERE id = $1"
    assert classify(sql) is classify(sql)


def test_deep_nesting_fails_closed() -> None:
    sql = "SELECT " + "+".join(["1"] * 20000)
    assert classify(sql).commands in ({"select"}, {"unknown"})


def test_non_ascii_statement_offsets() -> None:
    classified = classify("SELECT 'żółw'; DELETE FROM ünïcode")
    assert [s.text for s in classified.statements] == ["SELECT 'żółw'", "DELETE FROM ünïcode"]


def test_normalize_redacts_literals() -> None:
    assert normalize("ALTER ROLE bob PASSWORD 'hunter2'") == "ALTER ROLE bob PASSWORD $1"
    assert "s3cret" not in normalize("CREATE USER u WITH PASSWORD 's3cret'")
    assert normalize("SELECT * FROM t WHERE a = 'x' AND b = 2") == "SELECT * FROM t WHERE a = $1 AND b = $2"
    with pytest.raises(SQLSyntaxError):
        normalize("SELEKT 'x'")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_classify_never_raises(text: str) -> None:
    classified = classify(text)
    for info in classified.statements:
        assert info.commands
        assert info.groups <= GROUPS
        assert isinstance(info.columns, frozenset)  # resolving column reads never raises either


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(["SELECT", "DROP", "TABLE", "x", "'", '"', "$$", "--", "/*", "*/", ";", "(", ")",
                         "DELETE", "FROM", "WITH", "AS", " ", "\n", "E'\\'", "$a$", "DO", "EXPLAIN"]),
        max_size=30,
    )
)
def test_classify_never_raises_on_sql_like_soup(tokens: list[str]) -> None:
    classified = classify(" ".join(tokens))
    assert all(info.commands for info in classified.statements)
    assert all(isinstance(info.columns, frozenset) for info in classified.statements)


# --------------------------------------------------------------------------- column reads


@pytest.mark.parametrize(
    ("sql", "columns"),
    [
        ("SELECT count(*) FROM customers", set()),
        ("SELECT 1", set()),
        ("SELECT id, salary + 1 FROM customers", {"customers.id", "customers.salary"}),
        ("SELECT lower(email) FROM customers", {"customers.email"}),
        ("SELECT email || '' AS e FROM customers", {"customers.email"}),
        ("SELECT id FROM customers UNION SELECT 1", {"customers.id"}),
        ("SELECT c.email FROM customers c", {"customers.email"}),
        ("SELECT C.Email FROM Customers C", {"customers.email"}),
        ('SELECT "Odd" FROM t', {"t.odd"}),
        ("SELECT s.t.col FROM s.t", {"s.t.col"}),
        ("SELECT c.* FROM customers c", {"customers.*"}),
        ("SELECT * FROM customers", {"customers.*"}),
        ("TABLE customers", {"customers.*"}),
        ("SELECT * FROM (SELECT id FROM customers) x", {"customers.id"}),
        # whole-row references read every column
        ("SELECT row_to_json(c) FROM customers c", {"customers.*", "customers.c"}),
        ("SELECT c::text FROM customers c", {"customers.*", "customers.c"}),
        ("SELECT customers FROM customers", {"customers.*", "customers.customers"}),
        ("SELECT (c).name FROM customers c", {"customers.*", "customers.c"}),
        # every clause counts
        ("SELECT o.id FROM customers c JOIN orders o ON o.customer_id = c.id WHERE c.email = 'x' "
         "GROUP BY o.id HAVING max(c.salary) > 1 ORDER BY min(c.name)",
         {"orders.id", "orders.customer_id", "customers.id", "customers.email", "customers.salary",
          "customers.name"}),
        ("SELECT count(*) FROM customers a JOIN customers b USING (email)", {"customers.email"}),
        ("SELECT 1 FROM a NATURAL JOIN b", {"a.*", "b.*"}),
        ("SELECT lower(x.e) FROM (SELECT email AS e FROM customers) x", {"customers.email"}),
        ("WITH w AS (SELECT email FROM customers) SELECT w.email FROM w", {"customers.email"}),
        ("SELECT id FROM customers WHERE id IN (SELECT customer_id FROM orders WHERE amount > 1)",
         {"customers.id", "orders.customer_id", "orders.amount", "customers.amount",
          "customers.customer_id"}),
        # a correlated name may be the outer level's: every visible relation
        ("SELECT (SELECT max(ref) FROM orders WHERE email = 'x') FROM customers",
         {"orders.ref", "customers.ref", "orders.email", "customers.email"}),
        ("SELECT coalesce(j.email, '') FROM (customers JOIN orders USING (id)) j",
         {"customers.email", "orders.email", "customers.id", "orders.id"}),
        # DML reads
        ("UPDATE customers c SET note = o.ref FROM orders o WHERE c.id = o.customer_id RETURNING c.email",
         {"orders.ref", "customers.id", "orders.customer_id", "customers.email"}),
        ("DELETE FROM customers WHERE email = 'x' RETURNING *", {"customers.email", "customers.*"}),
        ("COPY customers TO STDOUT", {"customers.*"}),
        ("COPY customers (id, email) TO STDOUT", {"customers.id", "customers.email"}),
        # what cannot be placed stays a bare name (every relation's) or everything
        ("SELECT excluded.x", {"x"}),
        ("EXECUTE p", {"*"}),
        ("SELEKT email", {"*"}),
    ],
)
def test_column_reads(sql: str, columns: set[str]) -> None:
    assert one(sql).columns == columns


def test_column_reads_of_execute_and_multiple_statements() -> None:
    resolved = resolve_execute(one("EXECUTE p(1)"), "PREPARE p AS SELECT email FROM customers WHERE id = $1")
    assert resolved.columns == {"customers.email", "customers.id"}
    classified = classify("SELECT id FROM a; SELECT b.* FROM b")
    assert classified.columns == {"a.id", "b.*"}
    assert classify("SELECT email FROM customers").columns == classify("SELECT email FROM customers").columns
