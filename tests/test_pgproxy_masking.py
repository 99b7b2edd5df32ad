"""Masking through the PostgreSQL proxy: column rules by origin (views included), detectors,
fail-closed columns of unknown origin, exempt callers, COPY, and the catalog resolver."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import psycopg
import pytest

from pg_fixtures import PG, run_proxy
from sidegate_proxy.config import parse_connection
from sidegate_proxy.pgcatalog import Catalog, ColumnSource
from sidegate_proxy.pgproxy import ProxySettings, _CatalogPool, open_upstream
from sidegate_proxy.secrets import DictSecretStore
from test_pgproxy import psql

pytestmark = pytest.mark.postgres

RULES = [
    {"name": "emails", "columns": ["customers.email"], "strategy": "redact"},
    {"name": "salaries", "columns": ["customers.salary"], "strategy": "redact"},
    {"name": "cards", "detectors": ["credit-card"], "strategy": "partial", "keepLast": 4},
    {"name": "emails-anywhere", "detectors": ["email"], "strategy": "redact"},
]
EXEMPT = {"groups": ["auditors"]}
RED = "[REDACTED]"


def masked_proxy(pg: PG, tmp_path: Path):  # type: ignore[no-untyped-def]
    return run_proxy(pg, tmp_path, masking=RULES, exempt=EXEMPT)


async def test_column_rules_and_detectors_binary_and_text(postgres: PG, tmp_path: Path) -> None:
    async with masked_proxy(postgres, tmp_path) as p:
        c = await asyncpg.connect(**p.kwargs())
        try:
            row = await c.fetchrow("SELECT id, name, email, card, salary, note FROM customers WHERE id = $1", 10)
            assert row["id"] == 10 and row["name"] == "Customer 10"
            assert row["email"] == RED
            assert row["salary"] is None  # numeric cannot carry a mask: NULL
            assert row["card"] != "5500-0000-0000-0004" and row["card"].endswith("0004")
            assert "@" not in row["note"] and RED in row["note"]
            stmt = await c.prepare("SELECT email FROM customers ORDER BY id")  # named, binary
            assert {r["email"] for r in await stmt.fetch()} == {RED}
            for sql in (
                "SELECT e FROM (SELECT email AS e FROM customers) x",
                "WITH w AS (SELECT email FROM customers) SELECT email FROM w",
                "SELECT email FROM v_customers",
                "SELECT upper(email) FROM customers",
                "SELECT email FROM customers UNION SELECT 'x'",
                "SELECT c.email FROM customers c JOIN orders o ON o.customer_id = c.id",
            ):
                values = {r[0] for r in await c.fetch(sql)}
                assert values <= {RED, None}, sql
            assert await c.fetchval("SELECT count(*) FROM orders") == 300  # no masked column read
            # count(*) reads no column: clear (test_pgproxy_masking_precision has the column rules)
            assert await c.fetchval("SELECT count(*) FROM customers") == 100
            refs = [r["ref"] for r in await c.fetch("SELECT ref FROM orders ORDER BY id LIMIT 2")]
            assert refs == ["ACME-00000001", "ACME-00000002"]
        finally:
            await c.close()
        res = await asyncio.to_thread(psql, p, "-c", "SELECT email, card FROM customers WHERE id = 3")
        email, card = res.stdout.strip().split("|")
        assert email == RED and card.endswith("1111") and card != "4111 1111 1111 1111"
        masked = [e for e in p.audit.commands() if e.masked]
        assert masked and "emails" in masked[0].masked


async def test_psycopg_extended_and_describe(postgres: PG, tmp_path: Path) -> None:
    async with masked_proxy(postgres, tmp_path) as p, await psycopg.AsyncConnection.connect(p.dsn()) as conn:
        for binary in (False, True):
            cur = await conn.execute("SELECT id, email FROM customers WHERE id < %s ORDER BY id", (4,),
                                     binary=binary, prepare=True)
            assert [r[1] for r in await cur.fetchall()] == [RED] * 3
        async with conn.cursor("server_side") as named:  # DECLARE + FETCH
            await named.execute("SELECT email FROM customers ORDER BY id")
            assert {r[0] for r in await named.fetchmany(5)} == {RED}


async def test_exempt_caller_sees_clear_text(postgres: PG, tmp_path: Path) -> None:
    async with masked_proxy(postgres, tmp_path) as p:
        token = p.token(sub="auditor-1", groups=["auditors"])
        c = await asyncpg.connect(**p.kwargs(token))
        assert await c.fetchval("SELECT email FROM customers WHERE id = 1") == "customer1@example.com"
        await c.close()


async def test_copy_out_with_masking(postgres: PG, tmp_path: Path) -> None:
    async with masked_proxy(postgres, tmp_path) as p:
        c = await asyncpg.connect(**p.kwargs())
        try:
            with pytest.raises(asyncpg.PostgresError) as err:
                await c.copy_from_table("customers", output=str(tmp_path / "x"))
            assert err.value.sqlstate == "42501" and "COPY" in str(err.value)
            out = tmp_path / "orders.txt"
            await c.copy_from_query("SELECT id, ref FROM orders ORDER BY id LIMIT 3", output=str(out))
            assert out.read_text().splitlines()[0] == "1\tACME-00000001"
            out2 = tmp_path / "cards.txt"
            await c.copy_from_query("SELECT '4111 1111 1111 1111 and bob@example.com'", output=str(out2))
            text = out2.read_text()
            assert "4111 1111 1111 1111" not in text and "bob@example.com" not in text
        finally:
            await c.close()


async def test_catalog_resolves_tables_and_views(postgres: PG) -> None:
    conn = parse_connection({
        "metadata": {"name": "db"},
        "spec": {"type": "postgres", "target": {"host": postgres.host, "port": postgres.port,
                                                  "database": postgres.database},
                 "credentials": {"secretRef": {"name": "admin"}}},
    })
    store = DictSecretStore({"admin": {"username": postgres.admin_user.encode(),
                                       "password": postgres.admin_password.encode()}})
    settings = ProxySettings()
    pool = _CatalogPool(lambda: open_upstream(conn, store, {}, settings=settings), 1)
    catalog = Catalog(pool.run)
    try:
        up = await open_upstream(conn, store, {}, settings=settings)
        up.close()
        ref = await asyncpg.connect(host=postgres.host, port=postgres.port, user=postgres.admin_user,
                                    password=postgres.admin_password, database=postgres.database, ssl=False)
        customers = await ref.fetchval("SELECT 'customers'::regclass::oid")
        view = await ref.fetchval("SELECT 'v_customers'::regclass::oid")
        await ref.execute("CREATE OR REPLACE VIEW v_nested AS SELECT id AS ident, email AS mail, "
                          "length(name) AS n FROM v_customers")
        nested = await ref.fetchval("SELECT 'v_nested'::regclass::oid")
        await ref.close()
        o = await catalog.resolve([(customers, 3), (view, 3), (nested, 2), (nested, 3), (0, 0)])
        email = ColumnSource("public", "customers", "email")
        assert o[0].source == email and o[0].view is None
        assert o[1].source == email and o[1].view == "public.v_customers"
        assert o[2].source == email and o[2].view == "public.v_nested"
        assert o[3].source is None and ColumnSource("public", "customers", "name") in o[3].reads
        assert o[4].source is None and o[4].table_oid == 0
        queries = catalog.queries
        assert catalog.cached([(customers, 3), (view, 3)]) is not None
        await catalog.resolve([(customers, 2)])
        assert catalog.queries == queries  # cached per OID
        reads = await catalog.reads_of(["customers", "public.v_customers", "no_such_table"])
        assert email in (reads["customers"] or ()) and email in (reads["public.v_customers"] or ())
        assert reads["no_such_table"] is None
    finally:
        pool.close()
