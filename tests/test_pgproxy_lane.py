"""The native lane of the PostgreSQL proxy (``_lane.c``, ``Session._enter_lane``): a plain-TCP
session's steady state (Bind / Describe / Execute / Sync / Flush of statements Python already
allowed, results Python found nothing to mask in) relayed without Python, with real clients.

What must hold with the lane exactly as without it: the results, the masking, the errors, the
audit trail (one event per execution, same rows, sqlstates and durations), cancels, pipelining,
disconnects, and hostile bytes arriving while a session is in the lane.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sidegate_proxy
from pg_fixtures import PG, ProxyUnderTest, run_proxy
from sidegate_proxy import pgwire
from sidegate_proxy.audit import AuditEvent
from sidegate_proxy.auditverify import load_key, verify_lines
from sidegate_proxy.pgproxy import ProxySettings
from test_pgproxy import client_backends, direct

pytestmark = pytest.mark.postgres

EMAILS = {"name": "emails", "columns": ["customers.email"], "strategy": "redact"}
EXEMPT = {"groups": ["auditors"]}
RED = "[REDACTED]"
NO_LANE = ProxySettings(lane=False)


def need_lane() -> None:
    if sidegate_proxy.LANE is None:
        pytest.skip("the native lane is not built (or the data plane runs as Python)")


async def wait_for(predicate: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def psycopg_via_and_direct(
    pg: PG, tmp_path: Path,
) -> AsyncIterator[tuple[ProxyUnderTest, psycopg.AsyncConnection[Any], psycopg.AsyncConnection[Any]]]:
    """A proxy, a psycopg connection through it and one straight to PostgreSQL (autocommit)."""
    async with run_proxy(pg, tmp_path) as p, \
            await psycopg.AsyncConnection.connect(p.dsn(), autocommit=True) as via, \
            await psycopg.AsyncConnection.connect(pg.dsn, autocommit=True) as ref:
        yield p, via, ref


def session_ends(p: ProxyUnderTest) -> list[AuditEvent]:
    return [e for e in p.audit.events if e.kind == "session_end"]


async def sessions_ended(p: ProxyUnderTest, n: int) -> list[AuditEvent]:
    """Every audit event of ``n`` sessions is in once their session_end is (the lane's last
    slice is audited before the session finishes)."""
    await wait_for(lambda: len(session_ends(p)) >= n)
    return session_ends(p)


def outcome(events: list[AuditEvent]) -> list[tuple[str | None, str | None, int | None, str | None]]:
    return [(e.command, e.decision, e.rows, e.sqlstate) for e in events]


def assert_commands_counted(p: ProxyUnderTest) -> None:
    """Each session_end counts exactly the command events of its session."""
    for end in session_ends(p):
        mine = [e for e in p.audit.commands() if e.session_id == end.session_id]
        assert end.commands == len(mine), (end.commands, outcome(mine))


# --------------------------------------------------------------------------- raw protocol


def frame(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def bind(statement: bytes, params: list[bytes | None], result_formats: tuple[int, ...] = (), portal: bytes = b"",
         param_formats: tuple[int, ...] = ()) -> bytes:
    body = portal + b"\0" + statement + b"\0"
    body += struct.pack("!h", len(param_formats)) + b"".join(struct.pack("!h", f) for f in param_formats)
    body += struct.pack("!h", len(params))
    for v in params:
        body += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    body += struct.pack("!h", len(result_formats)) + b"".join(struct.pack("!h", f) for f in result_formats)
    return frame(b"B", body)


def execute(max_rows: int = 0, portal: bytes = b"") -> bytes:
    return frame(b"E", portal + b"\0" + struct.pack("!i", max_rows))


def describe(kind: bytes, name: bytes = b"") -> bytes:
    return frame(b"D", kind + name + b"\0")


SYNC = frame(b"S", b"")
FLUSH = frame(b"H", b"")


def parse(name: bytes, sql: bytes) -> bytes:
    return frame(b"P", name + b"\0" + sql + b"\0" + b"\0\0")


def test_the_lane_reports_a_full_batch_before_its_time() -> None:
    """Records wait for Python at most ``report_every`` seconds, or until ``report_records`` of
    them do (a busy lane's batches stay short): a Loop over socket pairs, the server side played
    by the test."""
    need_lane()
    loop = sidegate_proxy.LANE.Loop(30.0, 3)
    client, client_end = socket.socketpair()
    server, server_end = socket.socketpair()
    answer = frame(b"2", b"") + frame(b"C", b"SELECT 1\0") + frame(b"Z", b"I")
    try:
        loop.adopt(7, client_end.fileno(), server_end.fileno(), b"", b"", (b"s1",), (), None, False, 1 << 20,
                   float("inf"))
        seen: list[Any] = []
        for i in range(7):
            client.sendall(bind(b"s1", []) + execute() + SYNC)
            got = b""
            while len(got) < len(bind(b"s1", []) + execute() + SYNC):
                got += server.recv(4096)
            server.sendall(answer)
            got = b""
            while len(got) < len(answer):
                got += client.recv(4096)
            if i in (2, 5):  # two since the last report: they wait for a third (or 30 s)
                time.sleep(0.05)
                assert not select_readable(loop.fileno())
            if i in (0, 3, 6):  # the first at once (no report for 30 s), then every third
                deadline = time.monotonic() + 5
                while not select_readable(loop.fileno()) and time.monotonic() < deadline:
                    time.sleep(0.005)
                records, done = loop.drain()
                assert [(token, index, rows) for token, index, _, _, rows, _, _ in records] == \
                    [(7, 0, 1)] * (1 if i == 0 else 3)
                assert not done
                seen += records
        assert len(seen) == 7
    finally:
        loop.recall(7)
        loop.close()
        for s in (client, client_end, server, server_end):
            s.close()


def select_readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def ready_count(buf: bytes) -> tuple[int, int]:
    """ReadyForQuery messages among the whole messages of ``buf``, and where those end."""
    pos = count = 0
    while len(buf) - pos >= 5 and len(buf) - pos >= 1 + struct.unpack_from("!i", buf, pos + 1)[0]:
        count += buf[pos:pos + 1] == b"Z"
        pos += 1 + struct.unpack_from("!i", buf, pos + 1)[0]
    return count, pos


def read_until_ready(s: socket.socket, what: str, count: int = 1) -> bytes:
    """Read whole messages until ``count`` ReadyForQuery have come (and nothing after them)."""
    buf = b""
    while (got := ready_count(buf))[0] < count:
        chunk = s.recv(65536)
        if not chunk:
            raise AssertionError(f"{what}: connection closed: {buf!r}")
        buf += chunk
    assert got == (count, len(buf)), f"{what}: more than asked for: {buf!r}"
    return buf


async def read_ready(reader: asyncio.StreamReader, what: str, count: int = 1, within: float = 5.0) -> bytes:
    """``read_until_ready`` on an asyncio stream, in ``within`` seconds."""
    buf = b""
    async with asyncio.timeout(within):
        while (got := ready_count(buf))[0] < count:
            chunk = await reader.read(65536)
            if not chunk:
                raise AssertionError(f"{what}: connection closed: {buf!r}")
            buf += chunk
    assert got == (count, len(buf)), f"{what}: more than asked for: {buf!r}"
    return buf


async def raw_login(p: ProxyUnderTest) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(pgwire.startup_message({"user": "app", "database": "app"}) + pgwire.password_message(p.token()))
    await read_ready(reader, "login")
    return reader, writer


async def raw_lane_session(p: ProxyUnderTest, statements: dict[bytes, bytes],
                           ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw session that parsed ``statements`` (each with one int parameter) and ran a full
    cycle of each, then one more of the first: in the lane from there on."""
    reader, writer = await raw_login(p)
    cycle = b"".join(parse(name, sql) for name, sql in statements.items())
    cycle += b"".join(bind(name, [b"1"]) + describe(b"P") + execute() + SYNC for name in statements)
    writer.write(cycle)
    await read_ready(reader, "cycle", len(statements))
    writer.write(bind(next(iter(statements)), [b"2"]) + execute() + SYNC)
    await read_ready(reader, "lane")
    assert p.server.lane_slices > 0
    return reader, writer



# --------------------------------------------------------------------------- 1. results equal direct


PREPARED: list[tuple[str, Callable[[int], tuple[Any, ...]]]] = [
    ("SELECT id, name, email, card, salary, note FROM customers WHERE id = $1", lambda i: (i % 100 + 1,)),
    ("SELECT id, customer_id, ref, amount FROM orders WHERE customer_id = $1 ORDER BY id", lambda i: (i % 100 + 1,)),
    ("SELECT id FROM customers WHERE id > $1 ORDER BY id", lambda i: (i % 100,)),  # 100 - i % 100 rows
    ("SELECT $1::int + 1, $2::text || 'x', ARRAY[$1::int, 2], jsonb_build_object('a', $1::int), NULL::text, "
     "$1::int % 2 = 0, 1.5::numeric * $1::int", lambda i: (i, f"t{i}")),
    ("UPDATE customers SET note = note WHERE id = $1", lambda i: (i % 100 + 1,)),
    ("SELECT count(*) FROM orders WHERE amount > $1", lambda i: (i * 3,)),
]
ROUNDS = 12  # 12 x 6 = 72 executions of prepared statements


async def prepared_workload(c: asyncpg.Connection, ref: asyncpg.Connection) -> int:
    """Runs PREPARED, each ROUNDS times with varying arguments, checking every result against
    the same statement run directly; returns the number of executions."""
    stmts = [await c.prepare(sql) for sql, _ in PREPARED]
    refs = [await ref.prepare(sql) for sql, _ in PREPARED]
    n = 0
    for i in range(ROUNDS):
        for (sql, args), stmt, want in zip(PREPARED, stmts, refs, strict=True):
            got = await stmt.fetch(*args(i))
            assert got == await want.fetch(*args(i)), (sql, i)
            n += 1
    return n


async def through_proxy(pg: PG, tmp_path: Path, settings_: ProxySettings | None,
                        work: Callable[[asyncpg.Connection], Coroutine[Any, Any, Any]], *,
                        connect: dict[str, Any] | None = None, **proxy: Any) -> tuple[ProxyUnderTest, Any]:
    """``work`` on one asyncpg session (``connect``: more of its arguments) through a proxy
    (``proxy``: more of run_proxy's): the proxy, once that session ended, and what it returned."""
    async with run_proxy(pg, tmp_path, settings=settings_, **proxy) as p:
        c = await asyncpg.connect(**p.kwargs(**(connect or {})))
        try:
            result = await work(c)
        finally:
            await c.close()
        await sessions_ended(p, 1)
        return p, result


async def compared(run: Callable[[ProxySettings | None], Coroutine[Any, Any, tuple[ProxyUnderTest, Any]]],
                   ) -> tuple[ProxyUnderTest, ProxyUnderTest, Any]:
    """``run`` with the lane, then without it (the oracle): both proxies and the results, which
    must be equal."""
    need_lane()
    lane, got = await run(None)
    plain, want = await run(NO_LANE)
    assert got == want
    assert lane.server.lane_slices > 0 and plain.server.lane_slices == 0
    return lane, plain, got


async def run_workload(pg: PG, tmp_path: Path, settings_: ProxySettings | None) -> tuple[ProxyUnderTest, int]:
    async def work(c: asyncpg.Connection) -> int:
        ref = await direct(pg)
        try:
            return await prepared_workload(c, ref)
        finally:
            await ref.close()

    p, n = await through_proxy(pg, tmp_path, settings_, work)
    return p, int(n)


async def test_prepared_results_and_audit_equal_python_relay(postgres: PG, tmp_path: Path) -> None:
    need_lane()
    lane, n = await run_workload(postgres, tmp_path, None)
    plain, n2 = await run_workload(postgres, tmp_path, NO_LANE)
    assert n == n2 == len(PREPARED) * ROUNDS >= 50
    assert lane.server.lane_slices > 0
    assert plain.server.lane_slices == 0
    # the same trail, asyncpg's own introspection queries included
    assert outcome(lane.audit.commands()) == outcome(plain.audit.commands())
    texts = {sql for sql, _ in PREPARED}
    events = [e for e in lane.audit.commands() if e.command in texts]
    assert len(events) == n  # one per execution: preparing runs nothing
    assert all(e.decision == "allow" and e.sqlstate is None and not e.masked for e in events)
    third = [e.rows for e in events if e.command == PREPARED[2][0]]  # ids greater than i % 100
    assert third == [100 - i % 100 for i in range(ROUNDS)]
    assert [e.rows for e in events if e.command == PREPARED[4][0]] == [1] * ROUNDS  # UPDATE 1
    assert all(e.duration_ms is not None and 0 <= e.duration_ms < 5000 for e in events)
    assert_commands_counted(lane)


async def test_psycopg_prepared_text_and_binary(postgres: PG, tmp_path: Path) -> None:
    need_lane()
    async with psycopg_via_and_direct(postgres, tmp_path) as (p, via, ref):
        sql = "SELECT id, name, salary, note FROM customers WHERE id BETWEEN %s AND %s ORDER BY id"
        for i in range(30):
            args = (i, i + i % 7)
            binary = i % 2 == 1
            got = await (await via.execute(sql, args, prepare=True, binary=binary)).fetchall()
            assert got == await (await ref.execute(sql, args, binary=binary)).fetchall()
        assert p.server.lane_slices > 0
    events = p.audit.commands()
    assert [e.rows for e in events if e.command and "BETWEEN" in e.command] == \
        [min(i + i % 7, 100) - max(i, 1) + 1 for i in range(30)]


async def test_simple_queries_equal_python_relay(postgres: PG, tmp_path: Path) -> None:
    """Simple queries of one shape with varying numbers (the lane may relay those Python allowed
    outright): the same answers, byte for byte, the same masking and the same audit trail."""
    need_lane()
    queries = [f"SELECT id, name FROM customers WHERE id = {i}" for i in range(1, 21)]
    queries += [f"SELECT id, email FROM customers WHERE id = {i}" for i in range(1, 11)]
    queries += [f"SELECT count(*) FROM orders WHERE customer_id IN ({i}, {i + 1}) AND amount > {i}.5"
                for i in range(1, 11)]
    queries += ["SELECT id FROM customers WHERE id = 1; SELECT 2", "SELECT 10 / 0", "SELECT 'x@example.com'"]
    answers, trails = [], []
    for settings_ in (None, NO_LANE):
        async with run_proxy(postgres, tmp_path, masking=[EMAILS], settings=settings_) as p:
            reader, writer = await raw_login(p)
            try:
                got = []
                for _ in range(2):  # every query once for Python to see, then again
                    for sql in queries:
                        writer.write(pgwire.query(sql))
                        got.append(await read_ready(reader, sql))
            finally:
                writer.write(frame(b"X", b""))
                writer.close()
            await sessions_ended(p, 1)
            answers.append(got)
            trails.append(outcome(p.audit.commands()))
            masked = [e.masked for e in p.audit.commands() if e.command and "email" in e.command]
            assert masked == [{"emails": 1}] * 20
    assert answers[0] == answers[1]
    assert trails[0] == trails[1]
    assert all(RED.encode() in a for a in answers[0][20:30])


# --------------------------------------------------------------------------- 2. masking


async def test_masking_applies_while_the_lane_runs(postgres: PG, tmp_path: Path) -> None:
    need_lane()
    async with run_proxy(postgres, tmp_path, masking=[EMAILS], exempt=EXEMPT) as p:
        c = await asyncpg.connect(**p.kwargs())
        try:
            ids = await c.prepare("SELECT id FROM customers WHERE id = $1")
            emails = await c.prepare("SELECT id, email FROM customers WHERE id = $1")
            names = await c.prepare("SELECT id, name FROM customers WHERE id = $1")
            for i in range(1, 41):
                assert await ids.fetch(i) == [(i,)]
                assert await names.fetch(i) == [(i, f"Customer {i}")]
                assert await emails.fetch(i) == [(i, RED)]
                assert await ids.fetch(i) == [(i,)]  # straight after a masked result
                assert await emails.fetchrow(i) == (i, RED)  # Execute with a row limit
            slices = p.server.lane_slices
            assert slices > 0  # the unmasked shapes ran in the lane
            rows = await c.fetch("SELECT email FROM customers WHERE id <= $1", 5)  # unnamed statement
            assert [r["email"] for r in rows] == [RED] * 5
            for i in range(1, 11):  # and back
                assert await emails.fetch(i) == [(i, RED)]
                assert await ids.fetch(i) == [(i,)]
        finally:
            await c.close()
        await sessions_ended(p, 1)
        by_text: dict[str, list[AuditEvent]] = {}
        for e in p.audit.commands():
            by_text.setdefault(e.command or "", []).append(e)
        masked = by_text["SELECT id, email FROM customers WHERE id = $1"]
        assert len(masked) == 90 and all(e.masked == {"emails": 1} for e in masked)
        assert [e.rows for e in masked] == [1, None] * 40 + [1] * 10
        clear = by_text["SELECT id FROM customers WHERE id = $1"]
        assert len(clear) == 90 and all(not e.masked and e.rows == 1 for e in clear)
        assert_commands_counted(p)

        # the exempt group: clear text, and nothing to mask for it at all (the lane passes every result)
        auditor = await asyncpg.connect(**p.kwargs(p.token(sub="auditor-1", groups=["auditors"])))
        try:
            before = p.server.lane_slices
            emails = await auditor.prepare("SELECT id, email FROM customers WHERE id = $1")
            for i in range(1, 31):
                assert await emails.fetchrow(i) == (i, f"customer{i}@example.com")
            assert p.server.lane_slices > before
        finally:
            await auditor.close()


async def test_masking_psycopg_describe_and_binary(postgres: PG, tmp_path: Path) -> None:
    """psycopg sends its own Describe of the portal after Bind (the lane injects none then)."""
    need_lane()
    async with run_proxy(postgres, tmp_path, masking=[EMAILS]) as p, \
            await psycopg.AsyncConnection.connect(p.dsn(), autocommit=True) as conn:
        for i in range(1, 31):
            for binary in (False, True):
                cur = await conn.execute("SELECT id, email FROM customers WHERE id = %s", (i,),
                                         prepare=True, binary=binary)
                assert await cur.fetchall() == [(i, RED)]
                cur = await conn.execute("SELECT id, name FROM customers WHERE id = %s", (i,),
                                         prepare=True, binary=binary)
                assert await cur.fetchall() == [(i, f"Customer {i}")]
        assert p.server.lane_slices > 0


async def test_detectors_still_apply(postgres: PG, tmp_path: Path) -> None:
    """Detector rules scan values of any column: only shapes with nothing to scan may pass."""
    need_lane()
    rules: list[dict[str, Any]] = [
        EMAILS, {"name": "cards", "detectors": ["credit-card"], "strategy": "partial", "keepLast": 4},
        {"name": "emails-anywhere", "detectors": ["email"], "strategy": "redact"}]
    async with run_proxy(postgres, tmp_path, masking=rules) as p:
        c = await asyncpg.connect(**p.kwargs())
        try:
            ids = await c.prepare("SELECT id FROM customers WHERE id = $1")
            notes = await c.prepare("SELECT id, note, card FROM customers WHERE id = $1")
            for i in range(1, 31):
                assert await ids.fetch(i) == [(i,)]
                [(got, note, card)] = await notes.fetch(i)
                assert got == i and "@" not in note and card[-3:] in ("111", "004", "009")
                assert card not in ("4111 1111 1111 1111", "5500-0000-0000-0004", "3400 0000 0000 009")
                if i % 10 == 0:
                    assert RED in note
                else:
                    assert note == "ok"
            assert p.server.lane_slices > 0
        finally:
            await c.close()


@pytest.mark.parametrize(("name", "value", "why"), [
    ("standard_conforming_strings", "off", "sidegate: standard_conforming_strings must stay on"),
    ("client_encoding", "LATIN1", "sidegate: client_encoding must be UTF8"),
], ids=["standard_conforming_strings", "client_encoding"])
async def test_parameter_guard_still_applies(postgres: PG, tmp_path: Path, name: str, value: str, why: str) -> None:
    """A setting that would make the classifier misread statements ends the session, even when
    a statement the lane relays changes it (its ParameterStatus is Python's to see)."""
    need_lane()
    seen = []
    for settings_ in (None, NO_LANE):
        async with run_proxy(postgres, tmp_path, settings=settings_) as p:
            c = await asyncpg.connect(**p.kwargs())
            try:
                setting = await c.prepare(f"SELECT set_config('{name}', $1, false)")
                current = await c.fetchval(f"SELECT current_setting('{name}')")
                for _ in range(5):
                    assert await setting.fetch(current) == [(current,)]
                assert (p.server.lane_slices > 0) == (settings_ is None)
                with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)) as err:
                    await setting.fetch(value)  # the FATAL ends the session in the middle of it
                    await c.fetchval("SELECT 1")
                seen.append((type(err.value), str(err.value)))
                assert why in str(err.value)
                assert not await _still_open(c)
            finally:
                c.terminate()
            await sessions_ended(p, 1)
    assert seen[0] == seen[1]


async def _still_open(c: asyncpg.Connection) -> bool:
    try:
        await c.fetchval("SELECT 1", timeout=2)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError):
        return False
    return True


# --------------------------------------------------------------------------- 3. errors


async def division_errors(c: asyncpg.Connection) -> None:
    div = await c.prepare("SELECT 10 / $1::int")
    for _ in range(5):
        assert await div.fetch(1) == [(10,)]
    with pytest.raises(asyncpg.DivisionByZeroError):
        await div.fetch(0)
    assert await div.fetch(1) == [(10,)]
    assert await div.fetchval(2) == 5
    assert await c.fetchval("SELECT 41 + 1") == 42
    await c.execute("BEGIN")  # an error inside a transaction block aborts it
    with pytest.raises(asyncpg.DivisionByZeroError):
        await div.fetch(0)
    with pytest.raises(asyncpg.InFailedSQLTransactionError):  # refused at Bind: audited with its error
        await div.fetch(1)
    await c.execute("ROLLBACK")
    assert await div.fetch(5) == [(2,)]


async def with_and_without_lane(
    pg: PG, tmp_path: Path, work: Callable[[asyncpg.Connection], Coroutine[Any, Any, None]],
) -> list[ProxyUnderTest]:
    """``work`` on an asyncpg session through a proxy with the lane, then through one without:
    the two proxies, once their session has ended."""
    proxies = []
    for settings_ in (None, NO_LANE):
        async with run_proxy(pg, tmp_path, settings=settings_) as p:
            c = await asyncpg.connect(**p.kwargs())
            try:
                await work(c)
            finally:
                await c.close()
            await sessions_ended(p, 1)
            assert (p.server.lane_slices > 0) == (settings_ is None)
            proxies.append(p)
    return proxies


async def test_error_inside_the_lane(postgres: PG, tmp_path: Path) -> None:
    need_lane()
    proxies = await with_and_without_lane(postgres, tmp_path, division_errors)
    for p in proxies:
        assert_commands_counted(p)
    lane, plain = (p.audit.commands() for p in proxies)
    assert outcome(lane) == outcome(plain)
    events = [e for e in lane if e.command == "SELECT 10 / $1::int"]
    assert [(e.rows, e.sqlstate) for e in events] == \
        [(1, None)] * 5 + [(None, "22012"), (1, None), (None, None), (None, "22012"), (None, "25P02"), (1, None)]
    assert all(e.decision == "allow" for e in events)


@pytest.mark.parametrize("settings_", [None, NO_LANE], ids=["lane", "python"])
async def test_a_statement_refused_at_bind_is_audited(postgres: PG, tmp_path: Path,
                                                      settings_: ProxySettings | None) -> None:
    """Parameters the server refuses (or a plan-time error) fail the Bind: the Execute it skips
    is still the caller's attempt, audited with the error, in the lane as in Python."""
    async with run_proxy(postgres, tmp_path, settings=settings_) as p:
        async with await psycopg.AsyncConnection.connect(p.dsn(), autocommit=True) as c:
            for i in range(6):
                value = "abc" if i in (3, 5) else str(i)
                if value == "abc":
                    with pytest.raises(psycopg.errors.InvalidTextRepresentation):
                        await c.execute("SELECT %s::int * 2", [value], prepare=True)
                else:
                    assert await (await c.execute("SELECT %s::int * 2", [value], prepare=True)).fetchall() == \
                        [(2 * i,)]
        await sessions_ended(p, 1)
        assert_commands_counted(p)
        assert (p.server.lane_statements > 0) == (settings_ is None)
    events = [e for e in p.audit.commands() if e.command == "SELECT $1::int * 2"]
    assert [(e.rows, e.sqlstate) for e in events] == [(1, None)] * 3 + [(None, "22P02"), (1, None), (None, "22P02")]
    assert all(e.duration_ms is not None for e in events)


# --------------------------------------------------------------------------- 4. longer than a slice


async def test_statement_running_past_the_slice(postgres: PG, tmp_path: Path) -> None:
    need_lane()
    async with run_proxy(postgres, tmp_path) as p:
        c = await asyncpg.connect(**p.kwargs())
        try:
            slow = await c.prepare("SELECT pg_sleep(0.06)::text, $1::int")
            quick = await c.prepare("SELECT $1::int * 2")
            for i in range(6):
                assert await slow.fetch(i) == [("", i)]
                assert await quick.fetch(i) == [(2 * i,)]
            assert p.server.lane_slices > 0
        finally:
            await c.close()
        await sessions_ended(p, 1)
        slow_events = [e for e in p.audit.commands() if e.command == "SELECT pg_sleep(0.06)::text, $1::int"]
        assert len(slow_events) == 6
        for e in slow_events:
            assert e.rows == 1 and e.sqlstate is None and e.decision == "allow"
            assert e.duration_ms is not None and 60 <= e.duration_ms < 2000, e.duration_ms
        quick_events = [e for e in p.audit.commands() if e.command == "SELECT $1::int * 2"]
        assert [e.rows for e in quick_events] == [1] * 6
        assert_commands_counted(p)


# --------------------------------------------------------------------------- 5. pipelining


async def test_asyncpg_executemany(postgres: PG, tmp_path: Path) -> None:
    need_lane()
    async with run_proxy(postgres, tmp_path) as p:
        c = await asyncpg.connect(**p.kwargs())
        try:
            await c.execute("DELETE FROM tmp_import WHERE true")
            insert = "INSERT INTO tmp_import VALUES ($1)"
            await c.executemany(insert, [(i,) for i in range(200)])
            await c.executemany(insert, [(i,) for i in range(200, 400)])
            assert await c.fetchval("SELECT count(*) FROM tmp_import") == 400
            assert await c.fetchval("SELECT sum(id) FROM tmp_import") == sum(range(400))
            assert p.server.lane_slices > 0
            await c.execute("DELETE FROM tmp_import WHERE true")
        finally:
            await c.close()
        await sessions_ended(p, 1)
        inserts = [e for e in p.audit.commands() if e.command == "INSERT INTO tmp_import VALUES ($1)"]
        assert len(inserts) == 400
        assert all(e.rows == 1 and e.sqlstate is None and e.decision == "allow" for e in inserts)
        assert_commands_counted(p)


async def test_psycopg_pipeline_of_prepared_selects(postgres: PG, tmp_path: Path) -> None:
    need_lane()
    async with psycopg_via_and_direct(postgres, tmp_path) as (p, via, ref):
        one = "SELECT id, name FROM customers WHERE id = %s"
        many = "SELECT count(*), sum(amount) FROM orders WHERE customer_id <= %s"
        for i in range(1, 4):  # prepared and the lane engaged before the pipelines
            await (await via.execute(one, (i,), prepare=True)).fetchall()
            await (await via.execute(many, (i,), prepare=True)).fetchall()
        for batch in range(4):
            cursors = []
            async with via.pipeline() as pipe:
                for i in range(1, 26):
                    sql, arg = (one, i) if i % 3 else (many, i + batch)
                    cursors.append((sql, arg, await via.execute(sql, (arg,), prepare=True, binary=i % 2 == 0)))
                    if i == 12:
                        await pipe.sync()  # two Syncs in one pipeline
            for sql, arg, cur in cursors:
                assert await cur.fetchall() == await (await ref.execute(sql, (arg,))).fetchall()
        assert p.server.lane_slices > 0
    events = [e for e in p.audit.commands() if e.command in (one.replace("%s", "$1"), many.replace("%s", "$1"))]
    assert len(events) == 6 + 4 * 25
    assert all(e.rows == 1 and e.sqlstate is None for e in events)


# --------------------------------------------------------------------------- 5b. a batch half relayed


MID_BATCH = {
    "parse": parse(b"", b"SELECT 2") + bind(b"", []) + describe(b"P") + execute() + SYNC,
    "query": frame(b"Q", b"SELECT 2\0"),
    "close": frame(b"C", b"Ss1\0") + SYNC,
}


@pytest.mark.parametrize("masking", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("then", list(MID_BATCH))
async def test_batch_handed_back_half_way(postgres: PG, tmp_path: Path, then: str, masking: bool) -> None:
    """Bind/Execute relayed by the lane, then (before any Sync) a message Python handles: the
    whole batch is answered as promptly as the Python relay answers it (about a millisecond)."""
    need_lane()
    async with run_proxy(postgres, tmp_path, masking=[EMAILS] if masking else ()) as p:
        reader, writer = await raw_lane_session(p, {b"s1": b"SELECT id FROM customers WHERE id = $1"})
        try:
            started = time.monotonic()
            writer.write(bind(b"s1", [b"3"]) + execute() + MID_BATCH[then])
            reply = await read_ready(reader, then, within=1.5)
            assert time.monotonic() - started < 0.25
            assert reply.startswith(b"2\0\0\0\4D\0\0\0\x0b\0\1\0\0\0\x013C\0\0\0\rSELECT 1\0")
            assert reply.endswith(b"Z\0\0\0\5I")
        finally:
            writer.close()


@pytest.mark.parametrize("settings_", [None, NO_LANE], ids=["lane", "python"])
async def test_an_error_at_sync_is_not_pinned_on_the_next_batch(postgres: PG, tmp_path: Path,
                                                                 settings_: ProxySettings | None) -> None:
    """A deferred constraint fails at the implicit commit (the Sync), after its Execute was
    answered: no later Execute the client pipelined behind it takes that error."""
    need_lane()
    ref = await direct(postgres)
    try:
        await ref.execute("DROP TABLE IF EXISTS lane_deferred; "
                          "CREATE TABLE lane_deferred (v int UNIQUE DEFERRABLE INITIALLY DEFERRED)")
        async with run_proxy(postgres, tmp_path, settings=settings_) as p:
            sql = b"INSERT INTO lane_deferred VALUES ($1)"
            if settings_ is None:
                reader, writer = await raw_lane_session(p, {b"s1": sql})  # inserts 1 and 2
            else:
                reader, writer = await raw_login(p)
                writer.write(parse(b"s1", sql) + b"".join(bind(b"s1", [v]) + execute() + SYNC for v in (b"1", b"2")))
                await read_ready(reader, "inserts", 2)
            try:
                writer.write(bind(b"s1", [b"1"]) + execute() + SYNC + bind(b"s1", [b"7"]) + execute() + SYNC)
                reply = await read_ready(reader, "pipelined", 2)
                assert b"23505" in reply
            finally:
                writer.write(frame(b"X", b""))
                writer.close()
            await sessions_ended(p, 1)
            assert_commands_counted(p)
        events = [e for e in p.audit.commands() if e.command == sql.decode()]
        assert [(e.rows, e.sqlstate) for e in events] == [(1, None)] * 4
        assert await ref.fetch("SELECT v FROM lane_deferred ORDER BY v") == [(1,), (2,), (7,)]
    finally:
        await ref.execute("DROP TABLE IF EXISTS lane_deferred")
        await ref.close()


async def test_terminate_half_way_through_a_batch(postgres: PG, tmp_path: Path) -> None:
    """Bind/Execute relayed by the lane, then Terminate (no Sync) and the client closes: the
    session ends, its upstream connection is closed and session_end is audited."""
    need_lane()
    async with run_proxy(postgres, tmp_path) as p:
        _, writer = await raw_lane_session(p, {b"s1": b"SELECT id FROM customers WHERE id = $1"})
        writer.write(bind(b"s1", [b"3"]) + execute() + frame(b"X", b""))
        writer.close()
        await wait_for(lambda: len(session_ends(p)) == 1, within=1.5)


async def test_psycopg_pipeline_with_an_unprepared_statement(postgres: PG, tmp_path: Path) -> None:
    """A psycopg pipeline: a prepared statement (relayed by the lane) then one psycopg does not
    prepare (a Parse, for Python), one Sync at the end."""
    need_lane()
    async with run_proxy(postgres, tmp_path) as p, \
            await psycopg.AsyncConnection.connect(p.dsn(), autocommit=True) as conn:
        one = "SELECT id, name FROM customers WHERE id = %s"
        for i in range(1, 4):
            await (await conn.execute(one, (i,), prepare=True)).fetchall()
        assert p.server.lane_slices > 0

        async def pipeline() -> tuple[list[Any], list[Any]]:
            async with conn.pipeline():
                a = await conn.execute(one, (5,), prepare=True)
                b = await conn.execute("SELECT 2", prepare=False)
            return await a.fetchall(), await b.fetchall()

        task = asyncio.ensure_future(pipeline())
        done, _ = await asyncio.wait({task}, timeout=1.5)
        if task not in done:  # break the connection under psycopg: cancelling the pipeline takes long
            with socket.fromfd(conn.pgconn.socket, socket.AF_INET, socket.SOCK_STREAM) as s:
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(Exception):
                await task
            raise AssertionError("no answer to the pipeline within 1.5 s")
        assert task.result() == ([(5, "Customer 5")], [(2,)])


# --------------------------------------------------------------------------- 6. cancel


async def active_sleeps(pg: PG, pattern: str) -> int:
    ref = await direct(pg)
    try:
        return int(await ref.fetchval("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE $1",
                                      pattern))
    finally:
        await ref.close()


async def cancel_with_asyncpg(pg: PG, c: asyncpg.Connection) -> None:
    sleep = await c.prepare("SELECT pg_sleep($1::float8)::text, 'lane-cancel-a'")
    for _ in range(3):
        assert await sleep.fetch(0) == [("", "lane-cancel-a")]
    with pytest.raises(TimeoutError):  # asyncpg sends a CancelRequest on timeout
        await sleep.fetch(10, timeout=0.3)
    assert await sleep.fetch(0) == [("", "lane-cancel-a")]  # the same statement: usable
    assert await c.fetchval("SELECT 3") == 3
    for _ in range(50):
        if not await active_sleeps(pg, "%lane-cancel-a%"):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("pg_sleep was not cancelled upstream")


async def test_cancel_asyncpg_statement_in_the_lane(postgres: PG, tmp_path: Path) -> None:
    need_lane()

    async def work(c: asyncpg.Connection) -> None:
        await cancel_with_asyncpg(postgres, c)

    proxies = await with_and_without_lane(postgres, tmp_path, work)
    lane, plain = ([e for e in p.audit.commands() if e.command and "lane-cancel-a" in e.command] for p in proxies)
    assert [(e.rows, e.sqlstate) for e in lane] == [(1, None)] * 3 + [(None, "57014"), (1, None)]
    assert outcome(lane) == outcome(plain)
    assert 250 <= (lane[3].duration_ms or 0) < 5000  # it ran until the cancel


async def test_cancel_psycopg_statement_in_the_lane(postgres: PG, tmp_path: Path) -> None:
    need_lane()
    async with run_proxy(postgres, tmp_path) as p, \
            await psycopg.AsyncConnection.connect(p.dsn(), autocommit=True) as conn:
        sql = "SELECT pg_sleep(%s)::text, 'lane-cancel-b'"
        for _ in range(3):
            assert await (await conn.execute(sql, (0,), prepare=True)).fetchall() == [("", "lane-cancel-b")]
        assert p.server.lane_slices > 0

        async def cancel_soon() -> None:
            await asyncio.sleep(0.3)
            await conn.cancel_safe()

        task = asyncio.create_task(cancel_soon())
        with pytest.raises(psycopg.errors.QueryCanceled):
            await conn.execute(sql, (10,), prepare=True)
        await task
        assert await (await conn.execute(sql, (0,), prepare=True)).fetchall() == [("", "lane-cancel-b")]
        assert await (await conn.execute("SELECT 4")).fetchone() == (4,)
    await sessions_ended(p, 1)
    events = [e for e in p.audit.commands() if e.command and "lane-cancel-b" in e.command]
    assert [(e.rows, e.sqlstate) for e in events] == [(1, None)] * 3 + [(None, "57014"), (1, None)]


# --------------------------------------------------------------------------- 7. client disconnect


async def test_client_vanishes_while_in_the_lane(postgres: PG, tmp_path: Path) -> None:
    need_lane()
    async with run_proxy(postgres, tmp_path) as p:
        baseline = await client_backends(postgres)
        sessions = 0
        for mode in ("idle", "running", "pipelined"):
            c = await asyncpg.connect(**p.kwargs())
            sessions += 1
            stmt = await c.prepare("SELECT pg_sleep($1::float8)::text, $2::int")
            for i in range(5):
                assert await stmt.fetch(0, i) == [("", i)]
            assert p.server.lane_slices > 0
            if mode == "running":  # a statement in flight in the lane
                task = asyncio.ensure_future(stmt.fetch(0.2, 99))
                await asyncio.sleep(0.005)
                c.terminate()
                with pytest.raises((asyncpg.InterfaceError, asyncpg.PostgresConnectionError, ConnectionError)):
                    await task
            elif mode == "pipelined":  # many in flight
                task = asyncio.ensure_future(c.executemany("SELECT pg_sleep($1::float8)::text, $2::int",
                                                           [(0.001, i) for i in range(300)]))
                await asyncio.sleep(0.01)
                c.terminate()
                with pytest.raises((asyncpg.InterfaceError, asyncpg.PostgresConnectionError, ConnectionError)):
                    await task
            else:  # straight after an answer: still inside the slice
                c.terminate()
            await sessions_ended(p, sessions)
            c2 = await asyncpg.connect(**p.kwargs())  # a new session works
            s2 = await c2.prepare("SELECT $1::int + 1")
            for i in range(5):
                assert await s2.fetchval(i) == i + 1
            await c2.close()
            sessions += 1
            await sessions_ended(p, sessions)
        for _ in range(100):  # the proxy let go of every upstream connection
            if await client_backends(postgres) <= baseline:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("upstream connections left behind")
        ends = session_ends(p)
        assert len(ends) == sessions and len({e.session_id for e in ends}) == sessions
        assert_commands_counted(p)


# --------------------------------------------------------------------------- 8. hostile bytes in the lane


UPSTREAM_SECRETS_NOTE = "the upstream password (from the Secret) must never reach a client"
FUZZ_STATEMENTS = {
    b"lane_ids": b"SELECT id FROM customers WHERE id = $1",  # nothing to mask: the lane relays it
    b"lane_mail": b"SELECT id, email FROM customers WHERE id = $1",  # masked: Python must see its rows
    b"lane_many": b"SELECT id FROM customers WHERE id > $1::int ORDER BY id",  # Execute row limits: suspended
    b"lane_div": b"SELECT 10 / $1::int",  # 0: an error in the lane
}


LANE_QUERIES = ["SELECT id FROM customers WHERE id = 4", "SELECT id, email FROM customers WHERE id = 4",
                "SELECT id FROM customers WHERE id IN (4, 5)", "SELECT 10 / 1"]


class LoopThread:
    """A proxy on its own event loop thread, so hypothesis can drive blocking sockets."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="lane-fuzz-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def lane_proxy(postgres: PG, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyUnderTest]:
    if sidegate_proxy.LANE is None:
        pytest.skip("the native lane is not built (or the data plane runs as Python)")
    runner = LoopThread()
    cm = run_proxy(postgres, tmp_path_factory.mktemp("lane-fuzz"), masking=[EMAILS],
                   guardrails=[{"name": "no-drop", "sql": {"statements": ["drop", "truncate"]}, "action": "block"}])
    p: ProxyUnderTest = runner.run(cm.__aenter__())
    try:
        yield p
    finally:
        runner.run(cm.__aexit__(None, None, None))
        runner.close()


def enter_lane(p: ProxyUnderTest, s: socket.socket) -> bytes:
    """Log in, parse the fuzz statements and run a full cycle of each: the session is quiet and
    holds a cached no-mask plan, so it enters the lane when the last ReadyForQuery is out."""
    s.sendall(pgwire.startup_message({"user": "app", "database": "app"}) + pgwire.password_message(p.token()))
    out = read_until_ready(s, "login")
    cycle = b"".join(parse(name, sql) for name, sql in FUZZ_STATEMENTS.items())
    for name in FUZZ_STATEMENTS:
        cycle += bind(name, [b"1"]) + describe(b"P") + execute() + SYNC
    s.sendall(cycle)
    out += read_until_ready(s, "cycle", len(FUZZ_STATEMENTS))
    s.sendall(bind(b"lane_ids", [b"2"]) + execute() + SYNC)  # and one in the lane itself
    out += read_until_ready(s, "lane")
    for sql in LANE_QUERIES:  # simple queries Python allows (the lane may relay the same shapes)
        s.sendall(pgwire.query(sql))
        out += read_until_ready(s, sql)
    return out


@st.composite
def lane_frames(draw: Any) -> bytes:
    """Frames of the kinds the lane relays or hands back: well formed ones of known statements
    (with hostile parameters), near misses and random bodies; sometimes garbage around them."""
    out = b""
    for _ in range(draw(st.integers(1, 8))):
        choice = draw(st.integers(0, 11))
        name = draw(st.sampled_from([*FUZZ_STATEMENTS, b"", b"nope", b"lane_ids\xff"]))
        if choice <= 2:
            params = draw(st.lists(st.one_of(st.none(), st.binary(max_size=12), st.sampled_from([b"0", b"1", b"99"]),
                                             st.integers(-5, 200).map(lambda i: str(i).encode())), max_size=2))
            formats = draw(st.lists(st.integers(-1, 2), max_size=3))
            out += bind(name, params, tuple(formats), portal=draw(st.sampled_from([b"", b"", b"p1"])),
                        param_formats=tuple(draw(st.lists(st.integers(-1, 2), max_size=2))))
        elif choice == 3:
            out += execute(draw(st.integers(-2, 3)), draw(st.sampled_from([b"", b"", b"p1", b"zz"])))
        elif choice == 4:
            out += describe(draw(st.sampled_from([b"P", b"S", b"X"])), draw(st.sampled_from([b"", name])))
        elif choice == 5:
            out += draw(st.sampled_from([SYNC, SYNC, FLUSH]))
        elif choice == 6:
            out += parse(name, draw(st.sampled_from([b"SELECT 1", b"SELECT email FROM customers", b"DROP TABLE x",
                                                     b"SELEC broken"])))
        elif choice == 7:  # fixed ones, and shapes with numbers the lane may relay once Python allowed them
            n, m = draw(st.integers(-3, 120)), draw(st.integers(0, 10**12))
            out += frame(b"Q", draw(st.sampled_from([
                b"SELECT email FROM customers WHERE id = 3", b"SELECT 1", b"DROP TABLE tmp_import", b"",
                b"SELECT id FROM customers WHERE id = %d" % n, b"SELECT id, email FROM customers WHERE id = %d" % n,
                b"SELECT id FROM customers WHERE id IN (%d, %d)" % (n, m), b"SELECT 10 / %d" % (n % 3),
            ])) + b"\0")
        elif choice == 8:
            out += frame(b"X", b"")
        elif choice == 9:  # a random body, with its length or a wrong one
            kind = draw(st.sampled_from(list(b"BDESHPQX")))
            body = draw(st.binary(max_size=40))
            length = draw(st.one_of(st.just(len(body) + 4), st.integers(-5, 1 << 20)))
            out += bytes([kind]) + struct.pack("!i", length) + body
        elif choice == 10:
            out += draw(st.binary(max_size=30))
        else:  # a well formed frame cut short
            whole = bind(b"lane_ids", [b"5"]) + execute() + SYNC
            out += whole[: draw(st.integers(1, len(whole) - 1))]
    return out


# SIDEGATE_FUZZ_EXAMPLES=2000 for a long run
FUZZ = settings(max_examples=int(os.environ.get("SIDEGATE_FUZZ_EXAMPLES", "40")), deadline=None,
                suppress_health_check=list(HealthCheck))


def exchange_in_lane(p: ProxyUnderTest, payload: bytes, proper_end: bool,
                     connect: Callable[[], Any] | None = None) -> bytes:
    """Send ``payload`` to a session in the lane (then, with ``proper_end``, Sync and Terminate)
    and half-close: the proxy must answer what it owes and close, within seconds. ``connect``:
    a socket-like context manager (default: plain TCP to the proxy)."""
    with (connect or (lambda: socket.create_connection(("127.0.0.1", p.port), timeout=10)))() as s:
        out = enter_lane(p, s)
        try:
            s.sendall(payload + (SYNC + frame(b"X", b"") if proper_end else b""))
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the proxy may already have hung up on a bad frame
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            raise AssertionError(f"the proxy neither answered nor closed: {out[-200:]!r}") from None
        return out


class AuditTrail:
    """Checks each audit event of the fuzzed proxy once, as it comes (there are thousands)."""

    def __init__(self, p: ProxyUnderTest) -> None:
        self.p = p
        self.seen = 0
        self.open = 0  # sessions started and not ended yet
        self.commands: dict[str, int] = {}

    def check(self, within: float = 10.0) -> None:
        """Every session so far ended (shortly after EOF) with an audit trail that adds up."""
        deadline = time.monotonic() + within
        while True:
            events = self.p.audit.events
            while self.seen < len(events):
                e = events[self.seen]
                self.seen += 1
                if e.kind == "session_start" and e.decision == "allow":
                    self.open += 1
                elif e.kind == "command":
                    self.command(e)
                elif e.kind == "session_end":
                    self.open -= 1
                    assert e.commands == self.commands.pop(e.session_id, 0), e  # none lost, none twice
            if not self.open:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.open} sessions never ended")
            time.sleep(0.005)

    def command(self, e: AuditEvent) -> None:
        self.commands[e.session_id] = self.commands.get(e.session_id, 0) + 1
        assert e.rows is None or e.rows >= 0, e
        assert e.sqlstate is None or len(e.sqlstate) == 5, e
        assert e.duration_ms is None or 0 <= e.duration_ms < 10_000, e  # None: blocked, never ran
        mail = e.command == FUZZ_STATEMENTS[b"lane_mail"].decode() or (e.command or "").startswith("SELECT id, email")
        if mail and e.rows:
            assert e.masked == {"emails": e.rows}, e  # its rows were Python's to mask
        if e.command in LANE_TEXTS:
            assert e.decision == "allow" and not e.masked and e.duration_ms is not None, e


LANE_TEXTS = {FUZZ_STATEMENTS[name].decode() for name in (b"lane_ids", b"lane_many", b"lane_div")}


@pytest.fixture(scope="module")
def lane_trail(lane_proxy: ProxyUnderTest) -> AuditTrail:
    return AuditTrail(lane_proxy)


@FUZZ
@given(lane_frames(), st.booleans())
def test_fuzz_frames_while_in_the_lane(lane_trail: AuditTrail, payload: bytes, proper_end: bool) -> None:
    p = lane_trail.p
    password = p.pg.admin_password.encode()
    slices = p.server.lane_slices
    reply = exchange_in_lane(p, payload, proper_end)
    assert p.server.lane_slices > slices  # the payload met a session in (or entering) the lane
    assert password not in reply, UPSTREAM_SECRETS_NOTE
    assert b"@example.com" not in reply  # masked, however the lane and Python shared the rows
    assert b"XX000" not in reply, reply  # malformed input is the client's error, never an internal one
    lane_trail.check()


@FUZZ
@given(st.binary(min_size=1, max_size=300))
def test_fuzz_bytes_while_in_the_lane(lane_trail: AuditTrail, payload: bytes) -> None:
    p = lane_trail.p
    reply = exchange_in_lane(p, payload, False)
    assert p.pg.admin_password.encode() not in reply, UPSTREAM_SECRETS_NOTE
    assert b"@example.com" not in reply
    assert b"XX000" not in reply, reply
    lane_trail.check()


def test_still_serving_after_lane_fuzzing(lane_trail: AuditTrail) -> None:
    p = lane_trail.p
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        enter_lane(p, s)
        s.sendall(bind(b"lane_mail", [b"1"]) + execute() + bind(b"lane_ids", [b"7"]) + execute() + SYNC)
        reply = read_until_ready(s, "after fuzzing")
        assert RED.encode() in reply and b"customer1@" not in reply
        assert b"C\0\0\0\rSELECT 1\0" in reply
        s.sendall(pgwire.query("SELECT email FROM customers WHERE id = 1"))
        reply = read_until_ready(s, "query")
        assert RED.encode() in reply and b"customer1@" not in reply
    lane_trail.check()
    # the lane sealed records in C, between records Python sealed: the spooled chain holds
    assert p.audit.sealed > 0
    time.sleep(0.1)  # the spool's group commit (every 10 ms here)
    text = "".join(seg.read_text() for seg in sorted(p.audit.spool.directory.glob("segment-*.jsonl")))
    lines = text.splitlines(keepends=True)
    lines = [line.rstrip("\n") for line in lines if line.endswith("\n")]
    report = verify_lines(lines, keys=[load_key(b"k" * 32)])
    assert report.ok and len(lines) > 100, (len(lines), report.problems[:5])


# --------------------------------------------------------------------------- 9. idle timeout


async def test_idle_timeout_reaches_sessions_in_the_lane(postgres: PG, tmp_path: Path) -> None:
    """A session idle in the lane still times out; one whose statement runs in it does not."""
    need_lane()
    async with run_proxy(postgres, tmp_path, settings=ProxySettings(idle_timeout=0.5)) as p:
        c = await asyncpg.connect(**p.kwargs())
        try:
            slow = await c.prepare("SELECT 7 FROM pg_sleep($1)")
            for _ in range(3):
                assert await slow.fetchval(0.0) == 7  # the lane has the session from here
            assert await slow.fetchval(1.2) == 7  # busy upstream, not idle
            await asyncio.sleep(1.5)
            with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):  # closed by the proxy
                await slow.fetchval(0.0)
        finally:
            await c.close(timeout=2)
        ends = await sessions_ended(p, 1)
        assert p.server.lane_slices > 0
        assert ends[0].commands == 4


async def test_messages_larger_than_the_lane_buffers(postgres: PG, tmp_path: Path) -> None:
    """A Bind bigger than the lane's high-water mark (256 KiB) and results bigger than it."""
    need_lane()
    async with run_proxy(postgres, tmp_path) as p:
        c = await asyncpg.connect(**p.kwargs())
        try:
            stmt = await c.prepare("SELECT length($1::text), repeat('x', $2)")
            for size in (10, 300_000, 1_000_000, 10, 2_000_000):
                n, big = await stmt.fetchrow("y" * size, size)
                assert n == size and big == "x" * size
            assert p.server.lane_slices > 0
        finally:
            await c.close()
        await sessions_ended(p, 1)
        assert p.server.lane_statements >= 4
