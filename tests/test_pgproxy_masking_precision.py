"""Fail-closed masking by column, through the PostgreSQL proxy: a column of unknown origin
(expression, aggregate, UNION) is masked only when the statement reads a masked column, a star or
whole-row of a relation with one, or calls a function that could read anything; views behave as
the base columns behind them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pg_fixtures import PG, run_proxy
from sidegate_proxy.pgcatalog import view_var_reads

pytestmark = pytest.mark.postgres

RULES = [{"name": "emails", "columns": ["customers.email"], "strategy": "redact"}]
RED = "[REDACTED]"
MASKED = {RED, None, f"\"{RED}\""}  # a json column carries the marker as a JSON string

SETUP = """
CREATE OR REPLACE VIEW v_prec_filtered AS SELECT id, name FROM customers WHERE email LIKE '%1@%';
CREATE OR REPLACE VIEW v_prec_sorted AS SELECT id, email FROM customers ORDER BY email;
CREATE OR REPLACE VIEW v_prec_rows AS SELECT id, row_to_json(c)::text AS j FROM customers c;
CREATE OR REPLACE VIEW v_prec_nested AS SELECT id AS ident, email AS mail FROM v_customers;
CREATE OR REPLACE FUNCTION prec_email_of(i int) RETURNS text LANGUAGE sql STABLE
    AS $$ SELECT email FROM customers WHERE id = i $$;
"""


@pytest.fixture(scope="module")
def schema(postgres: PG) -> PG:
    postgres.sql(SETUP)
    return postgres


async def values(c: asyncpg.Connection, sql: str) -> set[Any]:
    return {r[0] for r in await c.fetch(sql)}


@pytest.mark.parametrize("via", ["customers", "v_customers"])
async def test_unknown_origin_masked_only_when_a_masked_column_is_read(
    schema: PG, tmp_path: Path, via: str
) -> None:
    async with run_proxy(schema, tmp_path, masking=RULES) as p:
        c = await asyncpg.connect(**p.kwargs())
        try:
            # reads no column, or none masked: clear
            assert await c.fetchval(f"SELECT count(*) FROM {via}") == 100
            row = await c.fetchrow(f"SELECT id, id + 1 AS n FROM {via} WHERE id = 7")
            assert (row["id"], row["n"]) == (7, 8)
            assert await values(c, f"SELECT id FROM {via} UNION SELECT 1") == set(range(1, 101))
            assert await c.fetchval(f"SELECT max(length(name)) FROM {via}") == len("Customer 100")
            # computed from a masked column: masked
            for sql in (
                f"SELECT lower(email) FROM {via}",
                f"SELECT email || '' AS e FROM {via}",
                f"SELECT email FROM {via} UNION SELECT 'x'",
                f"SELECT row_to_json(c) FROM {via} c",
                f"SELECT c::text FROM {via} c",
                f"SELECT (SELECT max(email) FROM {via})",
            ):
                assert await values(c, sql) <= MASKED, sql
            # a masked column read anywhere (WHERE, ORDER BY, JOIN USING) masks unknown columns
            assert await c.fetchval(f"SELECT count(*) FROM {via} WHERE email LIKE 'customer1%'") is None
            assert await c.fetchval(
                f"SELECT count(*) FROM {via} a JOIN {via} b USING (email)"
            ) is None
            # known origins keep their own rule: the star masks email, not id or name
            row = await c.fetchrow(f"SELECT c.* FROM {via} c WHERE id = 3")
            assert row["email"] == RED and row["id"] == 3 and row["name"] == "Customer 3"
        finally:
            await c.close()


async def test_salary_expression_clear_with_email_rule(schema: PG, tmp_path: Path) -> None:
    async with run_proxy(schema, tmp_path, masking=RULES) as p:
        c = await asyncpg.connect(**p.kwargs())
        try:
            row = await c.fetchrow("SELECT id, salary + 1 AS s FROM customers WHERE id = 2")
            assert row["s"] == 40021  # 40000 + 2 * 10, + 1
            # an alias of a joined table resolves to it: orders' columns only
            total = await c.fetchval(
                "SELECT sum(o.amount) FROM customers c JOIN orders o ON o.customer_id = c.id WHERE c.id = 2"
            )
            assert total is not None
            # a user-defined function could read anything: fail closed as before
            assert await values(c, "SELECT prec_email_of(id) FROM customers WHERE id < 3") <= MASKED
            # prepared (extended protocol) statements follow the same rules
            stmt = await c.prepare("SELECT count(*) FROM customers WHERE id > $1")
            assert await stmt.fetchval(90) == 10
            stmt = await c.prepare("SELECT upper(email) FROM customers WHERE id = $1")
            assert await stmt.fetchval(1) in MASKED
        finally:
            await c.close()


async def test_views_filters_ordering_and_whole_rows(schema: PG, tmp_path: Path) -> None:
    async with run_proxy(schema, tmp_path, masking=RULES) as p:
        c = await asyncpg.connect(**p.kwargs())
        try:
            # the view filters on email: counting it reads email
            assert await c.fetchval("SELECT count(*) FROM v_prec_filtered") is None
            # ordered by email: any computed column over it reads email
            assert await c.fetchval("SELECT count(id) FROM v_prec_sorted") is None
            # a whole-row read inside the view (not in pg_depend by column) is seen
            assert await values(c, "SELECT j FROM v_prec_rows WHERE id < 3") <= MASKED
            assert await c.fetchval("SELECT count(id) FROM v_prec_rows") == 100
            # nested views: plain columns map through to customers
            assert await c.fetchval("SELECT count(ident) FROM v_prec_nested") == 100
            assert await values(c, "SELECT mail || '' FROM v_prec_nested") <= MASKED
            assert await values(c, "SELECT mail FROM v_prec_nested WHERE ident < 4") == {RED}
        finally:
            await c.close()


def test_view_var_reads_keeps_plain_columns_apart() -> None:
    action = (
        "({QUERY :rtable ({RANGETBLENTRY :rtekind 0 :relid 10} {RANGETBLENTRY :rtekind 0 :relid 20}"
        " {RANGETBLENTRY :rtekind 2 :joinaliasvars ({VAR :varno 1 :varattno 1 :varlevelsup 0}"
        " {VAR :varno 2 :varattno 1 :varlevelsup 0})})"
        " :jointree {FROMEXPR :quals {OPEXPR :args ({VAR :varno 1 :varattno 3 :varlevelsup 0})}}"
        " :setOperations <>"
        " :targetList ({TARGETENTRY :expr {VAR :varno 1 :varattno 2 :varlevelsup 0} :resno 1"
        " :ressortgroupref 0 :resjunk false}"
        " {TARGETENTRY :expr {FUNCEXPR :args ({VAR :varno 3 :varattno 2 :varlevelsup 0})} :resno 2"
        " :ressortgroupref 0 :resjunk false}"
        " {TARGETENTRY :expr {VAR :varno 2 :varattno 0 :varlevelsup 0} :resno 3 :ressortgroupref 0"
        " :resjunk false})})"
    )
    always, every = view_var_reads(action)
    assert always == {(10, 3)}  # WHERE
    # output columns (plain, computed through a join alias, a whole row) only when selected
    assert every == always | {(10, 2), (20, 1), (20, 0)}
