"""The native lane over TLS (``tls.py``, ``_tls.c``): a session whose client side, target side or
both are encrypted has its steady state relayed natively too, through the very SSL objects
Python's handshake made, and gives what the Python relay gives: the same results, masking,
errors and audit trail, with hand-backs to Python in the middle of a session (masked results,
blocked statements) that lose or reorder no byte either way.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import psycopg
import pytest

import sidegate_proxy
from oidc_issuer import loopback_tls
from pg_fixtures import PG, TLSPG, ProxyUnderTest, run_proxy
from sidegate_proxy.pgproxy import ProxySettings
from test_pgproxy import NO_DROP, client_backends
from test_pgproxy_lane import (
    EMAILS,
    NO_LANE,
    RED,
    assert_commands_counted,
    need_lane,
    outcome,
    sessions_ended,
)
from test_pgproxy_upstream_tls import CA_REF, STAT_SSL, ca_secret

pytestmark = pytest.mark.postgres

# statements that cross many TLS records each way: a 20,000-row result, a 300 kB parameter
BIG = [
    ("SELECT g, md5(g::text) FROM generate_series(1, $1::int) AS g", (1, 10, 1000, 20_000, 3)),
    ("SELECT length($1::text), md5($1::text)", ("y", "z" * 300_000, "w" * 70_000, "v")),
    ("SELECT repeat('x', $1::int)", (5, 1_000_000, 17_000, 1)),
]


def client_tls(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(the proxy's server context, a client context that trusts it)."""
    server_ctx, client_ctx, _ca = loopback_tls(str(tmp_path))
    return server_ctx, client_ctx


async def big_workload(c: asyncpg.Connection) -> list[Any]:
    results: list[Any] = []
    stmts = [(await c.prepare(sql), args) for sql, args in BIG]
    for _ in range(3):
        for stmt, args in stmts:
            for arg in args:
                results.append([tuple(r) for r in await stmt.fetch(arg)])
    return results


async def both_sides(pg: TLSPG, tmp_path: Path, settings: ProxySettings | None) -> tuple[ProxyUnderTest, list[Any]]:
    server_ctx, client_ctx = client_tls(tmp_path)
    async with run_proxy(pg, tmp_path, tls={"mode": "verify-full", "caSecretRef": CA_REF},
                         extra_secrets=ca_secret(pg.ca), ssl_context=server_ctx, settings=settings) as p:
        c = await asyncpg.connect(**p.kwargs(ssl=client_ctx))
        try:
            row = await c.fetchrow(STAT_SSL)  # the gateway's own backend
            assert row is not None and row["ssl"] is True
            results = await big_workload(c)
        finally:
            await c.close()
        await sessions_ended(p, 1)
        return p, results


async def test_both_sides_tls_results_and_audit_equal_python_relay(postgres_tls: TLSPG, tmp_path: Path) -> None:
    need_lane()
    lane, got = await both_sides(postgres_tls, tmp_path, None)
    plain, want = await both_sides(postgres_tls, tmp_path, NO_LANE)
    assert got == want
    assert got[3] == [(g, _md5(g)) for g in range(1, 20_001)]
    assert plain.server.lane_slices == 0
    assert lane.server.lane_slices > 0
    assert lane.server.lane_statements >= 20  # most of the 3 x 12 executions
    assert outcome(lane.audit.commands()) == outcome(plain.audit.commands())
    assert_commands_counted(lane)


def _md5(g: int) -> str:
    """PostgreSQL's md5(), for comparison."""
    return hashlib.md5(str(g).encode()).hexdigest()


async def test_client_tls_hand_backs_in_the_middle(postgres: PG, tmp_path: Path) -> None:
    """Masked results and a blocked statement send the session back to Python and then into the
    lane again, dozens of times, with the client's TLS state carried across every time."""
    need_lane()
    server_ctx, client_ctx = client_tls(tmp_path)
    async with run_proxy(postgres, tmp_path, masking=[EMAILS], guardrails=[NO_DROP], ssl_context=server_ctx) as p:
        c = await asyncpg.connect(**p.kwargs(ssl=client_ctx))
        try:
            ids = await c.prepare("SELECT id FROM customers WHERE id = $1")
            emails = await c.prepare("SELECT id, email FROM customers WHERE id = $1")
            names = await c.prepare("SELECT id, name FROM customers WHERE id > $1 ORDER BY id")
            for i in range(1, 41):
                assert await ids.fetch(i) == [(i,)]
                assert await emails.fetch(i) == [(i, RED)]
                assert await names.fetch(i) == [(j, f"Customer {j}") for j in range(i + 1, 101)]
                if i % 10 == 0:
                    with pytest.raises(asyncpg.PostgresError, match="no-drop"):
                        await c.execute("DROP TABLE orders")
                    assert await c.fetchval("SELECT 7") == 7
            assert p.server.lane_slices > 10
        finally:
            await c.close()
        await sessions_ended(p, 1)
        masked = [e for e in p.audit.commands() if e.command == "SELECT id, email FROM customers WHERE id = $1"]
        assert len(masked) == 40 and all(e.masked == {"emails": 1} for e in masked)
        blocked = [e for e in p.audit.commands() if e.decision == "block"]
        assert [e.command for e in blocked] == ["DROP TABLE orders"] * 4
        assert_commands_counted(p)


async def test_psycopg_pipeline_over_tls(postgres: PG, tmp_path: Path) -> None:
    need_lane()
    server_ctx, _client_ctx = client_tls(tmp_path)
    ca_file = str(tmp_path / "ca.crt")
    async with run_proxy(postgres, tmp_path, ssl_context=server_ctx) as p, \
            await psycopg.AsyncConnection.connect(p.dsn(sslmode="verify-full", sslrootcert=ca_file),
                                                  autocommit=True) as via, \
            await psycopg.AsyncConnection.connect(postgres.dsn, autocommit=True) as ref:
        assert via.pgconn.ssl_in_use
        sql = "SELECT id, name, salary FROM customers WHERE id BETWEEN %s AND %s ORDER BY id"
        for batch in range(4):
            async with via.pipeline():
                cursors = [await via.execute(sql, (i, i + batch), prepare=True, binary=i % 2 == 0)
                           for i in range(1, 31)]
            for i, cur in enumerate(cursors, 1):
                assert await cur.fetchall() == await (await ref.execute(sql, (i, i + batch))).fetchall()
        assert p.server.lane_slices > 0


async def test_tls_cancel_in_the_lane(postgres: PG, tmp_path: Path) -> None:
    need_lane()
    server_ctx, client_ctx = client_tls(tmp_path)
    async with run_proxy(postgres, tmp_path, ssl_context=server_ctx) as p:
        c = await asyncpg.connect(**p.kwargs(ssl=client_ctx))
        try:
            stmt = await c.prepare("SELECT pg_sleep($1::float8)::text, 'tls-cancel'")
            for _ in range(3):
                assert await stmt.fetch(0) == [("", "tls-cancel")]
            assert p.server.lane_slices > 0
            with pytest.raises(TimeoutError):  # asyncpg sends a CancelRequest on timeout
                await stmt.fetch(30, timeout=0.5)
            assert await stmt.fetch(0) == [("", "tls-cancel")]
        finally:
            await c.close()
        await sessions_ended(p, 1)
        events = [e for e in p.audit.commands() if e.command and "tls-cancel" in e.command]
        assert [(e.rows, e.sqlstate) for e in events] == [(1, None)] * 3 + [(None, "57014"), (1, None)]


async def test_tls_client_vanishes_while_in_the_lane(postgres: PG, tmp_path: Path) -> None:
    need_lane()
    server_ctx, client_ctx = client_tls(tmp_path)
    async with run_proxy(postgres, tmp_path, ssl_context=server_ctx) as p:
        baseline = await client_backends(postgres)
        for n, running in enumerate((False, True), 1):
            c = await asyncpg.connect(**p.kwargs(ssl=client_ctx))
            stmt = await c.prepare("SELECT pg_sleep($1::float8)::text")
            for _ in range(5):
                await stmt.fetch(0)
            assert p.server.lane_slices > 0
            if running:
                task = asyncio.ensure_future(stmt.fetch(0.5))
                await asyncio.sleep(0.05)
                c.terminate()  # no Terminate, no close_notify: the socket just closes
                with pytest.raises((asyncpg.InterfaceError, asyncpg.PostgresConnectionError, ConnectionError)):
                    await task
            else:
                c.terminate()
            await sessions_ended(p, n)
        deadline = asyncio.get_running_loop().time() + 10
        while await client_backends(postgres) > baseline:  # the upstream sessions went too
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)


def test_the_lane_drives_only_real_ssl_objects() -> None:
    need_lane()
    lane = sidegate_proxy.LANE
    assert lane.tls_ready()
    ctx = ssl.create_default_context()
    sslobj = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="localhost")
    assert lane.tls_drivable(sslobj._sslobj)
    for other in (sslobj, object(), b"x" * 64, None, ctx):
        assert not lane.tls_drivable(other)
