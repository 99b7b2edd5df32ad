"""The PostgreSQL proxy end to end: real PostgreSQL, real clients (asyncpg, psycopg 3, psql)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from pg_fixtures import MD5_PASSWORD, MD5_USER, PG, PW_PASSWORD, PW_USER, ProxyUnderTest, run_proxy
from sidegate_proxy.pgproxy import ProxySettings

pytestmark = pytest.mark.postgres

NO_DROP = {"name": "no-drop", "sql": {"statements": ["drop", "truncate"]}, "action": "block"}
BULK = {"name": "bulk-writes", "sql": {"statements": ["delete", "update"], "withoutWhere": True},
        "action": "requireApproval"}
NO_ORDERS_DELETE = {"name": "keep-orders", "sql": {"statements": ["delete"], "tables": ["orders"]},
                    "action": "block"}
GUARDRAILS = [NO_DROP, NO_ORDERS_DELETE, BULK]  # first match wins


def psql(p: ProxyUnderTest, *args: str, stdin: str | None = None, token: str | None = None,
         extra: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PGPASSWORD": token or p.token(), "PGSSLMODE": "disable", "PGCONNECT_TIMEOUT": "10"}
    return subprocess.run(
        ["psql", "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(p.port), "-U", "app", "-d",
         p.pg.database + extra, *args],
        input=stdin, capture_output=True, text=True, env=env, timeout=60,
    )


async def direct(pg: PG) -> asyncpg.Connection:
    return await asyncpg.connect(host=pg.host, port=pg.port, user=pg.admin_user, password=pg.admin_password,
                                 database=pg.database, ssl=False)


# --------------------------------------------------------------------------- results equal direct


QUERIES = [
    ("SELECT * FROM customers ORDER BY id", ()),
    ("SELECT id, email, salary, note FROM customers WHERE id > $1 ORDER BY id", (50,)),
    ("SELECT c.id, o.ref, o.amount FROM customers c JOIN orders o ON o.customer_id = c.id ORDER BY 1, 2", ()),
    ("SELECT now()::date, 1.5::numeric, ARRAY[1,2,3], '{\"a\": 1}'::jsonb, NULL::text, true", ()),
    ("SELECT * FROM v_customers WHERE email LIKE $1", ("%7@%",)),
]


async def test_asyncpg_results_equal_direct(postgres: PG, tmp_path: Path) -> None:
    async with run_proxy(postgres, tmp_path, guardrails=GUARDRAILS) as p:
        via, ref = await asyncpg.connect(**p.kwargs()), await direct(postgres)
        try:
            for sql, args in QUERIES:
                assert await via.fetch(sql, *args) == await ref.fetch(sql, *args), sql
                stmt = await via.prepare(sql)  # named statement, binary results
                assert await stmt.fetch(*args) == await ref.fetch(sql, *args)
                assert await stmt.fetch(*args) == await ref.fetch(sql, *args)  # re-execution, no re-Parse
            async with via.transaction():
                cur = await via.cursor("SELECT id FROM customers ORDER BY id")  # portal suspension
                assert [r["id"] for r in await cur.fetch(7)] == list(range(1, 8))
                assert [r["id"] for r in await cur.fetch(3)] == [8, 9, 10]
            await via.executemany("INSERT INTO tmp_import VALUES ($1)", [(i,) for i in range(5)])
            assert await via.fetchval("SELECT count(*) FROM tmp_import") == 5
            await via.execute("DELETE FROM tmp_import WHERE true")
        finally:
            await via.close()
            await ref.close()
        events = p.audit.commands()
        assert any(e.rows == 100 and "customers" in (e.command or "") for e in events)
        assert all(e.decision == "allow" for e in events)


async def test_psycopg_server_side_binding(postgres: PG, tmp_path: Path) -> None:
    async with run_proxy(postgres, tmp_path, guardrails=GUARDRAILS) as p, \
            await psycopg.AsyncConnection.connect(p.dsn()) as via, \
            await psycopg.AsyncConnection.connect(postgres.dsn) as ref:
        for sql, args in QUERIES:
            q = sql.replace("$1", "%s")
            got = await (await via.execute(q, args, prepare=True)).fetchall()
            assert got == await (await ref.execute(q, args)).fetchall()
            got = await (await via.execute(q, args, binary=True)).fetchall()
            assert got == await (await ref.execute(q, args, binary=True)).fetchall()
        async with via.cursor() as cur:  # pipeline mode: several statements before one Sync
            async with via.pipeline():
                await cur.execute("SELECT 1")
                await cur.execute("SELECT %s::int", (2,))
                await cur.execute("SELECT count(*) FROM orders")
            assert await cur.fetchone() == (300,)


async def test_psql_single_and_multi_statement(postgres: PG, tmp_path: Path) -> None:
    async with run_proxy(postgres, tmp_path, guardrails=GUARDRAILS) as p:
        out = await asyncio.to_thread(psql, p, "-c", "SELECT count(*) FROM customers")
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "100"
        script = "SELECT 1; SELECT email FROM customers WHERE id = 2;\nSELECT 'a' || 'b'\n;"
        out = await asyncio.to_thread(psql, p, "-v", "ON_ERROR_STOP=1", stdin=script)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["1", "customer2@example.com", "ab"]
        out = await asyncio.to_thread(psql, p, "-c", "SELECT 1; SELECT 2")  # one Query message
        assert out.stdout.split() == ["1", "2"] or out.stdout.split() == ["2"]


async def test_database_parameter(postgres: PG, tmp_path: Path) -> None:
    async with run_proxy(postgres, tmp_path) as p:
        with pytest.raises(asyncpg.InvalidCatalogNameError):
            await asyncpg.connect(**p.kwargs(database="postgres"))
        c = await asyncpg.connect(**{**p.kwargs(), "database": "app", "user": "app"})
        await c.close()


@pytest.mark.parametrize(("user", "password"), [(MD5_USER, MD5_PASSWORD), (PW_USER, PW_PASSWORD)])
async def test_upstream_md5_and_cleartext_logins(postgres: PG, tmp_path: Path, user: str, password: str) -> None:
    async with run_proxy(postgres, tmp_path, credentials=(user, password)) as p:
        c = await asyncpg.connect(**p.kwargs())
        assert await c.fetchval("SELECT current_user") == user
        await c.close()


async def test_wrong_upstream_password_is_not_leaked(postgres: PG, tmp_path: Path) -> None:
    async with run_proxy(postgres, tmp_path, credentials=(postgres.admin_user, "wrong-secret-xyz")) as p:
        with pytest.raises(asyncpg.PostgresError) as err:
            await asyncpg.connect(**p.kwargs())
        assert "wrong-secret-xyz" not in str(err.value)
        assert postgres.admin_user not in str(err.value)


# --------------------------------------------------------------------------- guardrails


BLOCKED = [
    ("DROP TABLE tmp_import", "no-drop"),
    ("drop/**/table tmp_import", "no-drop"),
    ("TRUNCATE tmp_import", "no-drop"),
    ("SELECT 1; DROP TABLE tmp_import", "no-drop"),
    ("WITH gone AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM gone", "keep-orders"),
    ("DELETE FROM customers", "bulk-writes"),
    ("UPDATE customers SET note = 'x'", "bulk-writes"),
    ("EXPLAIN ANALYZE DELETE FROM orders WHERE id = 1", "keep-orders"),
    ("DO $$ BEGIN EXECUTE 'DROP TABLE tmp_import'; END $$", "builtin-unknown"),
    ("SELECT pg_read_file('/etc/passwd')", "builtin-server-functions"),
    ("COPY tmp_import FROM PROGRAM 'id'", "builtin-server-programs"),
    ("ALTER SYSTEM SET work_mem = '1MB'", "builtin-alter-system"),
    ("SELEC garbage", "builtin-unknown"),
]


@pytest.mark.parametrize(("sql", "rule"), BLOCKED)
async def test_guardrails_block_and_session_survives(postgres: PG, tmp_path: Path, sql: str, rule: str) -> None:
    async with run_proxy(postgres, tmp_path, guardrails=GUARDRAILS) as p:
        c = await asyncpg.connect(**p.kwargs())
        try:
            for run in (c.execute, c.fetch):  # simple protocol, then extended
                if run is c.fetch and ";" in sql.replace("$$;", ""):
                    continue  # several statements cannot be prepared anyway
                with pytest.raises(asyncpg.PostgresError) as err:
                    await run(sql)
                assert err.value.sqlstate == "42501"
                assert f'"{rule}"' in str(err.value) and str(err.value).startswith("sidegate:")
                assert await c.fetchval("SELECT 41 + 1") == 42
            assert await c.fetchval("SELECT count(*) FROM tmp_import") is not None  # table still there
            assert await c.fetchval("SELECT count(*) FROM customers") == 100
        finally:
            await c.close()
        blocked = [e for e in p.audit.commands() if e.decision != "allow"]
        assert blocked and blocked[0].rule == rule and blocked[0].sqlstate == "42501"


async def test_require_approval_message(postgres: PG, tmp_path: Path) -> None:
    async with run_proxy(postgres, tmp_path, guardrails=GUARDRAILS) as p:
        c = await asyncpg.connect(**p.kwargs())
        with pytest.raises(asyncpg.PostgresError) as err:
            await c.execute("DELETE FROM customers")
        assert err.value.sqlstate == "42501"
        assert "approval required" in str(err.value) and '"bulk-writes"' in str(err.value)
        await c.close()


async def test_block_inside_transaction_aborts_it(postgres: PG, tmp_path: Path) -> None:
    async with run_proxy(postgres, tmp_path, guardrails=GUARDRAILS) as p, \
            await psycopg.AsyncConnection.connect(p.dsn()) as conn:
        await conn.execute("INSERT INTO tmp_import VALUES (777)")  # autocommit off: a transaction
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await conn.execute("DROP TABLE tmp_import")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            await conn.execute("SELECT 1")
        await conn.rollback()
        assert await (await conn.execute("SELECT count(*) FROM tmp_import WHERE id = 777")).fetchone() == (0,)


async def test_extended_pipeline_with_block_skips_until_sync(postgres: PG, tmp_path: Path) -> None:
    async with run_proxy(postgres, tmp_path, guardrails=GUARDRAILS) as p, \
            await psycopg.AsyncConnection.connect(p.dsn(), autocommit=True) as conn:
        async with conn.cursor() as cur:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                async with conn.pipeline():
                    await cur.execute("INSERT INTO tmp_import VALUES (%s)", (888,))
                    await cur.execute("DROP TABLE tmp_import")
                    await cur.execute("INSERT INTO tmp_import VALUES (%s)", (889,))
        cur2 = await conn.execute("SELECT count(*) FROM tmp_import WHERE id IN (888, 889)")
        assert await cur2.fetchone() == (0,)  # the implicit transaction of the batch was rolled back


async def test_sql_prepare_execute_tracked(postgres: PG, tmp_path: Path) -> None:
    async with run_proxy(postgres, tmp_path, guardrails=GUARDRAILS) as p:
        c = await asyncpg.connect(**p.kwargs())
        with pytest.raises(asyncpg.PostgresError) as err:
            await c.execute("PREPARE wipe AS DELETE FROM orders")
        assert err.value.sqlstate == "42501"
        await c.execute("PREPARE one AS SELECT count(*) FROM customers")
        assert await c.fetchval("EXECUTE one") == 100
        await c.execute("DEALLOCATE one")
        await c.close()


async def test_fast_path_function_call_refused(postgres: PG, tmp_path: Path) -> None:
    async with run_proxy(postgres, tmp_path) as p:
        reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
        try:
            await _login(writer, reader, p.token())
            # FunctionCall 'F': pg_read_file by OID (2624) with one text argument
            body = b"\0\0\x0a\x40" + b"\0\0" + b"\0\1" + b"\0\0\0\x0b/etc/passwd" + b"\0\0"
            writer.write(b"F" + (len(body) + 4).to_bytes(4, "big") + body)
            reply = await _until_ready(reader)
            assert b"42501" in reply and b"fast-path" in reply and b"root:" not in reply
            writer.write(b"Q\0\0\0\x0dselect 7\0")
            assert b"7" in await _until_ready(reader)
        finally:
            writer.close()


async def _login(writer: asyncio.StreamWriter, reader: asyncio.StreamReader, token: str) -> bytes:
    from sidegate_proxy import pgwire

    writer.write(pgwire.startup_message({"user": "app", "database": "app"}))
    assert (await reader.readexactly(9))[:1] == b"R"
    writer.write(pgwire.password_message(token))
    return await _until_ready(reader)


async def _until_ready(reader: asyncio.StreamReader) -> bytes:
    buf = b""
    while not (len(buf) >= 6 and buf[-6:-5] == b"Z" and buf[-5:-1] == b"\0\0\0\5"):
        chunk = await asyncio.wait_for(reader.read(65536), 10)
        if not chunk:
            break
        buf += chunk
    return buf


# --------------------------------------------------------------------------- authentication


def _forge_none(p: ProxyUnderTest) -> str:
    import base64
    import json

    def b64(d: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    import time

    claims = {"iss": p.issuer.url, "sub": "system:serviceaccount:payments:reporter", "aud": "sidegate",
              "exp": int(time.time()) + 300}
    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."


@pytest.mark.parametrize("case", ["garbage", "expired", "audience", "none", "subject", "empty"])
async def test_bad_tokens_refused_without_upstream(postgres: PG, tmp_path: Path, case: str) -> None:
    async with run_proxy(postgres, tmp_path) as p:
        token = {
            "garbage": "not-a-jwt",
            "expired": p.token(exp_in=-3600),
            "audience": p.token(aud="someone-else"),
            "none": _forge_none(p),
            "subject": p.token(sub="system:serviceaccount:other:intruder"),
            "empty": "",
        }[case]
        before = await client_backends(postgres)
        with pytest.raises(asyncpg.PostgresError) as err:
            await asyncpg.connect(**p.kwargs(token))
        assert err.value.sqlstate == "28P01"
        assert "sidegate: authentication failed" in str(err.value)
        assert p.server.upstream_connects == 0
        assert await client_backends(postgres) == before
        [event] = [e for e in p.audit.events if e.kind == "session_start"]
        assert event.decision == "block"


async def client_backends(pg: PG) -> int:
    c = await direct(pg)
    try:
        return int(await c.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"))
    finally:
        await c.close()


async def test_client_tls(postgres: PG, tmp_path: Path) -> None:
    from oidc_issuer import loopback_tls

    server_ctx, _client_ctx, ca_file = loopback_tls(str(tmp_path))
    async with run_proxy(postgres, tmp_path, ssl_context=server_ctx) as p:
        dsn = p.dsn(sslmode="verify-full", sslrootcert=ca_file, host="localhost")
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            assert conn.pgconn.ssl_in_use
            assert await (await conn.execute("SELECT 5")).fetchone() == (5,)
    async with run_proxy(postgres, tmp_path) as p:  # no certificate: SSLRequest answered 'N'
        with pytest.raises(psycopg.OperationalError):
            await psycopg.AsyncConnection.connect(p.dsn(sslmode="require"))


async def test_reload_applies_to_new_sessions_only(postgres: PG, tmp_path: Path) -> None:
    from sidegate_proxy.config import build_config
    from sidegate_proxy.guardrails import Guard

    async with run_proxy(postgres, tmp_path) as p:
        old = await asyncpg.connect(**p.kwargs())
        src = p.config.source
        conn_obj = dict(src["connection"])
        conn_obj["spec"] = {**conn_obj["spec"], "guardrails": [NO_DROP]}
        new_config = build_config(conn_obj, [])
        p.server.reload(new_config, guard=Guard(new_config.connection))
        new = await asyncpg.connect(**p.kwargs())
        with pytest.raises(asyncpg.PostgresError):
            await new.execute("CREATE TABLE reload_t (i int); DROP TABLE reload_t")
        await old.execute("CREATE TABLE reload_t (i int); DROP TABLE reload_t")  # old policy: allowed
        await old.close()
        await new.close()


# --------------------------------------------------------------------------- cancel, COPY, streaming


async def test_cancel_with_asyncpg(postgres: PG, tmp_path: Path) -> None:
    async with run_proxy(postgres, tmp_path) as p:
        c = await asyncpg.connect(**p.kwargs())
        with pytest.raises(TimeoutError):  # asyncpg sends a CancelRequest on timeout
            await c.execute("SELECT pg_sleep(10)", timeout=0.5)
        assert await c.fetchval("SELECT 3") == 3
        ref = await direct(postgres)
        try:
            for _ in range(50):  # the upstream query really stopped, well before its 10 s
                if not await ref.fetchval("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                                          "AND query LIKE 'SELECT pg_sleep(10)%'"):
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("pg_sleep was not cancelled upstream")
        finally:
            await ref.close()
        await c.close()


async def test_cancel_with_psycopg(postgres: PG, tmp_path: Path) -> None:
    async with run_proxy(postgres, tmp_path) as p, \
            await psycopg.AsyncConnection.connect(p.dsn(), autocommit=True) as conn:
        key = conn.pgconn.backend_pid
        assert key != await _upstream_pid(postgres)  # the proxy never exposes the real pid

        async def cancel_soon() -> None:
            await asyncio.sleep(0.3)
            # cancel_safe: PQcancel in a thread would hold the GIL against this in-process proxy
            await conn.cancel_safe()

        task = asyncio.create_task(cancel_soon())
        with pytest.raises(psycopg.errors.QueryCanceled):
            await conn.execute("SELECT pg_sleep(10)")
        await task
        assert await (await conn.execute("SELECT 4")).fetchone() == (4,)


async def test_cancel_ends_an_approval_hold(postgres: PG, tmp_path: Path) -> None:
    """Ctrl-C in psql while a statement waits for its review: the wait ends with 57014, the
    statement never runs, the session stays usable and the audit trail says who cancelled."""
    held = asyncio.Event()
    released = asyncio.Event()

    async def never_reviewed(session: Any, sql: str, verdict: Any) -> Any:
        held.set()
        try:
            await asyncio.Event().wait()
        finally:
            released.set()

    async with run_proxy(postgres, tmp_path, guardrails=GUARDRAILS) as p, \
            await psycopg.AsyncConnection.connect(p.dsn(), autocommit=True) as conn:
        p.server.on_approval_required = never_reviewed
        await conn.execute("INSERT INTO tmp_import VALUES (42)")

        async def cancel_when_held() -> None:
            await asyncio.wait_for(held.wait(), 10)
            await conn.cancel_safe()

        task = asyncio.create_task(cancel_when_held())
        with pytest.raises(psycopg.errors.QueryCanceled, match="canceling statement"):
            await conn.execute("DELETE FROM tmp_import")
        await task
        await asyncio.wait_for(released.wait(), 5)  # the hold itself was stopped
        assert await (await conn.execute("SELECT count(*) FROM tmp_import WHERE id = 42")).fetchone() == (1,)
        await conn.execute("DELETE FROM tmp_import WHERE true")
    (event,) = [e for e in p.audit.commands() if e.command == "DELETE FROM tmp_import"]
    assert (event.decision, event.rule, event.sqlstate) == ("block", "client-cancel", "57014")


async def test_a_rule_named_like_a_cancel_still_blocks_as_a_rule(postgres: PG, tmp_path: Path) -> None:
    """Only the proxy's own cancelled-hold decision answers 57014: a user's guardrail that happens
    to be called ``client-cancel`` blocks with 42501 and its own reason, in the answer and the audit."""
    rule = {"name": "client-cancel", "sql": {"statements": ["truncate"]}, "action": "block"}
    async with run_proxy(postgres, tmp_path, guardrails=[rule]) as p, \
            await psycopg.AsyncConnection.connect(p.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match='blocked by guardrail "client-cancel"'):
            await conn.execute("TRUNCATE tmp_import")
        assert await (await conn.execute("SELECT 1")).fetchone() == (1,)
    (event,) = [e for e in p.audit.commands() if e.command == "TRUNCATE tmp_import"]
    assert (event.decision, event.rule, event.sqlstate) == ("block", "client-cancel", "42501")


async def test_idle_sessions_time_out_but_running_queries_do_not(postgres: PG, tmp_path: Path) -> None:
    async with run_proxy(postgres, tmp_path, settings=ProxySettings(idle_timeout=0.5)) as p:
        c = await asyncpg.connect(**p.kwargs())
        assert await c.fetchval("SELECT 7 FROM pg_sleep(1.2)") == 7  # busy upstream, not idle
        await asyncio.sleep(1.5)
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):  # closed by the proxy
            await c.fetchval("SELECT 1")
        await c.close(timeout=2)
        for _ in range(100):
            if any(e.kind == "session_end" for e in p.audit.events):
                break
            await asyncio.sleep(0.05)
        assert any(e.kind == "session_end" for e in p.audit.events)


async def _upstream_pid(pg: PG) -> int | None:
    c = await direct(pg)
    try:
        return await c.fetchval("SELECT max(pid) FROM pg_stat_activity WHERE usename = $1 AND pid <> "
                                "pg_backend_pid()", pg.admin_user)
    finally:
        await c.close()


async def test_copy_both_directions(postgres: PG, tmp_path: Path) -> None:
    async with run_proxy(postgres, tmp_path) as p:
        c = await asyncpg.connect(**p.kwargs())
        await c.execute("CREATE TABLE IF NOT EXISTS copy_t (i int, t text)")
        await c.copy_records_to_table("copy_t", records=[(i, f"r{i}") for i in range(1000)])
        out = tmp_path / "out.txt"
        await c.copy_from_table("copy_t", output=str(out))
        assert len(out.read_text().splitlines()) == 1000
        await c.execute("DROP TABLE copy_t")
        await c.close()
        res = await asyncio.to_thread(psql, p, "-c", "COPY (SELECT id FROM customers ORDER BY id) TO STDOUT")
        assert res.stdout.split()[:3] == ["1", "2", "3"]


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


async def test_large_result_streams_with_bounded_memory(postgres: PG, tmp_path: Path) -> None:
    async with run_proxy(postgres, tmp_path) as p:
        _reset_peak_rss()
        base = _rss_kb("VmRSS")
        sql = "SELECT i, repeat('x', 1000) FROM generate_series(1, 100000) AS i"  # ~100 MB
        res = await asyncio.to_thread(psql, p, "-c", f"COPY ({sql}) TO STDOUT", "-o", "/dev/null")
        assert res.returncode == 0, res.stderr
        res = await asyncio.to_thread(psql, p, "-c", sql, "-o", "/dev/null", "-v", "FETCH_COUNT=0")
        assert res.returncode == 0, res.stderr
        growth_mb = (_rss_kb("VmHWM") - base) / 1024
        assert growth_mb < 40, f"proxy peak memory grew by {growth_mb:.0f} MB for a 100 MB result"
