"""The native lane over TLS (``tls.py``, ``_tls.c``): a session whose client side, target side or
both are encrypted has its steady state relayed natively too, through the very SSL objects
Python's handshake made, and gives what the Python relay gives: the same results, masking,
errors and audit trail, with hand-backs to Python in the middle of a session (masked results,
blocked statements) that lose or reorder no byte either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import ssl
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

import sidegate_proxy
from oidc_issuer import loopback_tls
from pg_fixtures import PG, TLSPG, ProxyUnderTest, run_proxy
from sidegate_proxy import pgwire
from sidegate_proxy.pgproxy import ProxySettings
from sidegate_proxy.tls import TLSTransport
from test_pgproxy import NO_DROP, client_backends
from test_pgproxy_lane import (
    EMAILS,
    FUZZ,
    RED,
    SYNC,
    UPSTREAM_SECRETS_NOTE,
    AuditTrail,
    LoopThread,
    assert_commands_counted,
    bind,
    compared,
    describe,
    enter_lane,
    exchange_in_lane,
    execute,
    lane_frames,
    need_lane,
    outcome,
    parse,
    read_ready,
    read_until_ready,
    sessions_ended,
    through_proxy,
)
from test_pgproxy_upstream_tls import CA_REF, STAT_SSL, ca_secret
from test_tls import BAD_RECORD

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

    async def work(c: asyncpg.Connection) -> list[Any]:
        row = await c.fetchrow(STAT_SSL)  # the gateway's own backend
        assert row is not None and row["ssl"] is True
        return await big_workload(c)

    p, results = await through_proxy(pg, tmp_path, settings, work, connect={"ssl": client_ctx},
                                     tls={"mode": "verify-full", "caSecretRef": CA_REF},
                                     extra_secrets=ca_secret(pg.ca), ssl_context=server_ctx)
    return p, list(results)


async def test_both_sides_tls_results_and_audit_equal_python_relay(postgres_tls: TLSPG, tmp_path: Path) -> None:
    lane, plain, got = await compared(lambda settings: both_sides(postgres_tls, tmp_path, settings))
    assert got[3] == [(g, _md5(g)) for g in range(1, 20_001)]
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


# --------------------------------------------------------------------------- raw TLS clients


async def tls_raw_session(p: ProxyUnderTest, client_ctx: ssl.SSLContext, sql: bytes,
                          ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw session over TLS that prepared ``sql`` (one int parameter) as ``s`` and ran it five
    times: in the lane from there on."""
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(pgwire.ssl_request())
    assert await reader.readexactly(1) == b"S"
    await writer.start_tls(client_ctx, server_hostname="localhost")
    writer.write(pgwire.startup_message({"user": "app", "database": "app"}) + pgwire.password_message(p.token()))
    await read_ready(reader, "login")
    writer.write(parse(b"s", sql) + bind(b"s", [b"1"]) + describe(b"P") + execute() + SYNC)
    await read_ready(reader, "first")
    for n in range(2, 6):  # a masking plan is checked once more before its shape is cleared
        writer.write(bind(b"s", [str(n).encode()]) + execute() + SYNC)
        await read_ready(reader, "lane")
    assert p.server.lane_slices > 0 and p.server.lane_statements > 0
    return reader, writer


async def read_results(reader: asyncio.StreamReader, ready: int, within: float) -> list[bytes]:
    """The first column of every DataRow until ``ready`` ReadyForQuery have come."""
    buf, values, seen = bytearray(), [], 0
    async with asyncio.timeout(within):
        while seen < ready:
            chunk = await reader.read(1 << 20)
            assert chunk, "connection closed"
            buf += chunk
            while len(buf) >= 5 and len(buf) >= 1 + struct.unpack_from("!i", buf, 1)[0]:
                size = 1 + struct.unpack_from("!i", buf, 1)[0]
                kind, body = bytes(buf[:1]), bytes(buf[5:size])
                del buf[:size]
                if kind == b"D":
                    n = struct.unpack_from("!i", body, 2)[0]
                    values.append(body[6:6 + n])
                seen += kind == b"Z"
    return values


async def test_unsent_ciphertext_goes_back_to_python_in_order(postgres: PG, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that does not read while the lane hands its session back (masking plans are
    checked again every second): the ciphertext the lane made and the socket did not take is
    written by Python raw, ahead of what it encrypts itself, and the client gets every byte."""
    need_lane()
    written: list[int] = []
    write_raw = TLSTransport.write_raw

    def spy(self: TLSTransport, data: bytes) -> None:
        written.append(len(data))
        write_raw(self, data)

    monkeypatch.setattr(TLSTransport, "write_raw", spy)
    size = 32_000_000  # more than the kernel's socket buffers on both ends hold
    postgres.sql("DROP TABLE IF EXISTS tls_blob; CREATE TABLE tls_blob (id int PRIMARY KEY, body text); "
                 "INSERT INTO tls_blob SELECT g, repeat('x', g) FROM generate_series(1, 9) AS g; "
                 f"INSERT INTO tls_blob VALUES (99, repeat('x', {size}))")
    server_ctx, client_ctx = client_tls(tmp_path)
    try:
        async with run_proxy(postgres, tmp_path, masking=[EMAILS], ssl_context=server_ctx) as p:
            # a table's column: its plan (nothing to mask) is cached, so the lane may relay it
            reader, writer = await tls_raw_session(p, client_ctx, b"SELECT body FROM tls_blob WHERE id = $1")
            writer.write(bind(b"s", [b"99"]) + execute() + SYNC + bind(b"s", [b"3"]) + execute() + SYNC)
            await asyncio.sleep(1.5)  # reading nothing while the lane's second runs out
            values = await read_results(reader, 2, within=60)
            assert [len(v) for v in values] == [size, 3] and values[0] == b"x" * size and values[1] == b"xxx"
            assert any(written), written  # the hand-back carried ciphertext
            writer.write(bind(b"s", [b"4"]) + execute() + SYNC)  # and the session goes on
            assert await read_results(reader, 1, within=10) == [b"xxxx"]
            writer.close()
            await sessions_ended(p, 1)
    finally:
        postgres.sql("DROP TABLE IF EXISTS tls_blob")


@pytest.mark.parametrize("end", ["garbage", "close_notify"])
async def test_tls_trouble_while_in_the_lane(postgres: PG, tmp_path: Path, end: str) -> None:
    """Bytes that are not TLS records end the session as a lost connection; a close_notify ends
    it as an EOF; either way the proxy serves the next session."""
    need_lane()
    server_ctx, client_ctx = client_tls(tmp_path)
    async with run_proxy(postgres, tmp_path, ssl_context=server_ctx) as p:
        reader, writer = await tls_raw_session(p, client_ctx, b"SELECT $1::int")
        if end == "garbage":
            sock = writer.transport.get_extra_info("socket")
            os.write(sock.fileno(), BAD_RECORD)
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                assert await asyncio.wait_for(reader.read(), 10) == b""
        else:
            writer.close()
        ends = await sessions_ended(p, 1)
        assert ends[0].commands == 5
        c = await asyncpg.connect(**p.kwargs(ssl=client_ctx))
        assert await c.fetchval("SELECT 41 + 1") == 42
        await c.close()
        writer.close()


# --------------------------------------------------------------------------- fuzzing over TLS


class TLSClient:
    """A blocking TLS client socket over memory BIOs, with a real half-close (close_notify, and
    reading on): what ``exchange_in_lane`` does to a plain socket, over TLS."""

    def __init__(self, port: int, ctx: ssl.SSLContext) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(pgwire.ssl_request())
        assert self.sock.recv(1) == b"S"
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self.incoming.write(self.sock.recv(65536))
        self._flush()

    def _flush(self) -> None:
        if data := self.outgoing.read():
            self.sock.sendall(data)

    def sendall(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def recv(self, n: int) -> bytes:
        while True:
            try:
                return self.tls.read(n)
            except ssl.SSLWantReadError:
                data = self.sock.recv(65536)
                if not data:
                    return b""  # no close_notify: the proxy just closed
                self.incoming.write(data)
            except ssl.SSLZeroReturnError:
                return b""

    def shutdown(self, how: int) -> None:
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.unwrap()  # close_notify out; the proxy's answers may still come in
        self._flush()

    def __enter__(self) -> TLSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def tls_lane(postgres: PG, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AuditTrail, ssl.SSLContext]]:
    """The fuzz proxy of test_pgproxy_lane.py (masking, no-drop), serving TLS."""
    need_lane()
    tmp = tmp_path_factory.mktemp("lane-tls-fuzz")
    server_ctx, client_ctx = client_tls(tmp)
    runner = LoopThread()
    cm = run_proxy(postgres, tmp, masking=[EMAILS], guardrails=[NO_DROP], ssl_context=server_ctx)
    p: ProxyUnderTest = runner.run(cm.__aenter__())
    try:
        yield AuditTrail(p), client_ctx
    finally:
        runner.run(cm.__aexit__(None, None, None))
        runner.close()


def fuzz_over_tls(trail: AuditTrail, ctx: ssl.SSLContext, payload: bytes, proper_end: bool) -> None:
    p = trail.p
    slices = p.server.lane_slices
    reply = exchange_in_lane(p, payload, proper_end, lambda: TLSClient(p.port, ctx))
    assert p.server.lane_slices > slices
    assert p.pg.admin_password.encode() not in reply, UPSTREAM_SECRETS_NOTE
    assert b"@example.com" not in reply
    assert b"XX000" not in reply, reply
    trail.check()


@FUZZ
@given(lane_frames(), st.booleans())
def test_fuzz_frames_over_tls_in_the_lane(tls_lane: tuple[AuditTrail, ssl.SSLContext], payload: bytes,
                                          proper_end: bool) -> None:
    fuzz_over_tls(*tls_lane, payload, proper_end)


@FUZZ
@given(st.binary(min_size=1, max_size=300))
def test_fuzz_bytes_over_tls_in_the_lane(tls_lane: tuple[AuditTrail, ssl.SSLContext], payload: bytes) -> None:
    fuzz_over_tls(*tls_lane, payload, False)


def test_still_serving_tls_after_fuzzing(tls_lane: tuple[AuditTrail, ssl.SSLContext]) -> None:
    trail, ctx = tls_lane
    p = trail.p
    with TLSClient(p.port, ctx) as s:
        enter_lane(p, s)  # type: ignore[arg-type]
        s.sendall(bind(b"lane_mail", [b"1"]) + execute() + bind(b"lane_ids", [b"7"]) + execute() + SYNC)
        reply = read_until_ready(s, "after fuzzing")  # type: ignore[arg-type]
        assert RED.encode() in reply and b"customer1@" not in reply
        assert b"C\0\0\0\rSELECT 1\0" in reply
    trail.check()
