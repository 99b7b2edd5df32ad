"""Upstream TLS of the PostgreSQL proxy (Connection ``spec.target.tls``) against real servers.

api.md defines three modes: ``disable``, ``require`` (encrypted but unverified) and
``verify-full`` (chain and host name checked, optionally against a private CA from
``caSecretRef``). The TLS clusters (``postgres_tls``, ``postgres_tls_wrong_host`` in
pg_fixtures) admit the gateway user over ``hostssl`` only and reject every plaintext TCP login,
so a session that works proves the gateway's own backend is encrypted; the tests also read
``pg_stat_ssl`` for that backend, through the proxy and from the server side.

Failures must fail closed: the client gets a FATAL with an 08xxx SQLSTATE, a message that names
TLS, and never the gateway-held credential.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from oidc_issuer import OIDCIssuer
from pg_fixtures import PG, TLSPG, ProxyUnderTest, TestCA, connection_object, run_proxy
from sidegate_proxy import pgwire
from sidegate_proxy.config import TLS_MODES, ConfigError, build_config
from sidegate_proxy.pgproxy import ProxySettings, UpstreamError, open_upstream
from sidegate_proxy.secrets import DictSecretStore

pytestmark = pytest.mark.postgres

CA_SECRET = "orders-db-ca"
CA_REF = {"name": CA_SECRET, "key": "ca.crt"}
STAT_SSL = "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


def ca_secret(ca: TestCA | bytes) -> dict[str, dict[str, bytes]]:
    pem = ca if isinstance(ca, bytes) else ca.cert_pem
    return {CA_SECRET: {"ca.crt": pem}}


def at_host(pg: PG, host: str) -> PG:
    """The same cluster, addressed by another name (the Connection's ``target.host``)."""
    return dataclasses.replace(pg, host=host)


def upstream_tls_errors(p: ProxyUnderTest) -> float:
    value = p.server.metrics.registry.get_sample_value(  # type: ignore[union-attr]
        "sidegate_upstream_errors_total", {"connection": "orders-db", "protocol": "postgres", "kind": "tls"})
    return value or 0.0


async def refused(p: ProxyUnderTest) -> asyncpg.PostgresError:
    """A client's login through the proxy fails: the FATAL it got."""
    with pytest.raises(asyncpg.PostgresError) as err:
        conn = await asyncpg.connect(**p.kwargs())
        await conn.close()
    return err.value


def assert_fails_closed(err: asyncpg.PostgresError, pg: PG) -> None:
    assert err.sqlstate is not None and err.sqlstate.startswith("08"), (err.sqlstate, str(err))
    text = f"{err} {getattr(err, 'detail', '')} {getattr(err, 'hint', '')}"
    assert pg.admin_password not in text
    assert pg.admin_user not in text
    assert str(err).startswith("sidegate:")


def gateway_backends_over_tls(pg: PG) -> list[tuple[str, str]]:
    """Server side: (client_addr, ssl) of every TCP backend of the gateway user."""
    out = pg.sql("SELECT a.client_addr, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
                 f"WHERE a.usename = '{pg.admin_user}' AND a.client_addr IS NOT NULL")
    return [(line.split("|")[0], line.split("|")[1]) for line in out.splitlines() if line]


@contextlib.contextmanager
def no_upstream_login(pg: TLSPG) -> Iterator[None]:
    """The block makes the gateway user log in to ``pg`` not even once (per the server's log)."""
    before = len(pg.authorized_logins())
    yield
    assert pg.authorized_logins()[before:] == []


@pytest.fixture
def other_ca() -> TestCA:
    return TestCA.create("an unrelated CA")


# --------------------------------------------------------------------------- the modes that work


def test_modes_are_the_api_contract(postgres: PG) -> None:
    """disable | require | verify-full (api.md); libpq's verify-ca is not one: refused, not guessed."""
    assert TLS_MODES == ("disable", "require", "verify-full")
    obj = connection_object(postgres, issuer=OIDCIssuer(), tls={"mode": "verify-ca"})
    with pytest.raises(ConfigError, match=r"spec\.target\.tls"):
        build_config(obj, [])


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_verify_full_with_private_ca(postgres_tls: TLSPG, tmp_path: Path, host: str) -> None:
    target = at_host(postgres_tls, host)
    async with run_proxy(target, tmp_path, tls={"mode": "verify-full", "caSecretRef": CA_REF},
                         extra_secrets=ca_secret(postgres_tls.ca)) as p:
        conn = await asyncpg.connect(**p.kwargs())
        try:
            row = await conn.fetchrow(STAT_SSL)
            assert row is not None and row["ssl"] is True
            assert row["version"] in ("TLSv1.2", "TLSv1.3")
            assert await conn.fetchval("SELECT count(*) FROM pg_class WHERE relname = 'pg_class'") == 1
            backends = gateway_backends_over_tls(postgres_tls)
            assert backends and all(ssl_on == "t" for _addr, ssl_on in backends), backends
            logins = postgres_tls.authorized_logins()
            assert logins and all("SSL enabled" in line for line in logins), logins
        finally:
            await conn.close()
        assert upstream_tls_errors(p) == 0


def psql(p: ProxyUnderTest, sql: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PGPASSWORD": p.token(), "PGSSLMODE": "disable", "PGCONNECT_TIMEOUT": "10"}
    return subprocess.run(["psql", "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(p.port), "-U", "app",
                           "-d", p.pg.database, "-c", sql], capture_output=True, text=True, env=env, timeout=60)


async def test_require_encrypts_without_verifying(postgres_tls_wrong_host: TLSPG, tmp_path: Path) -> None:
    """require: no CA, and a certificate for another host from a CA nobody trusts: still TLS."""
    async with run_proxy(postgres_tls_wrong_host, tmp_path, tls={"mode": "require"}) as p:
        out = await asyncio.to_thread(psql, p, STAT_SSL)
        assert out.returncode == 0, out.stderr
        ssl_on, version = out.stdout.strip().split("|")
        assert ssl_on == "t" and version.startswith("TLSv1.")


async def test_disable_is_plaintext(postgres: PG, tmp_path: Path) -> None:
    async with run_proxy(postgres, tmp_path, tls={"mode": "disable"}) as p:
        conn = await asyncpg.connect(**p.kwargs())
        try:
            row = await conn.fetchrow(STAT_SSL)
            assert row is not None and row["ssl"] is False
        finally:
            await conn.close()


async def test_no_tls_section_means_disable(postgres: PG, tmp_path: Path) -> None:
    async with run_proxy(postgres, tmp_path) as p:
        assert p.config.connection.target.tls.mode == "disable"
        conn = await asyncpg.connect(**p.kwargs())
        try:
            assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is False
        finally:
            await conn.close()


# --------------------------------------------------------------------------- failing closed


async def test_disable_against_tls_only_server_fails_closed(postgres_tls: TLSPG, tmp_path: Path) -> None:
    """The server's hostnossl reject is what refuses: the gateway sent no SSLRequest."""
    async with run_proxy(postgres_tls, tmp_path, tls={"mode": "disable"}) as p:
        with no_upstream_login(postgres_tls):
            err = await refused(p)
        assert_fails_closed(err, postgres_tls)


@pytest.mark.parametrize("mode", ["require", "verify-full"])
async def test_tls_against_plaintext_server_fails_closed(postgres: PG, tmp_path: Path, mode: str) -> None:
    """The target answers the SSLRequest with 'N': no fallback to plaintext."""
    async with run_proxy(postgres, tmp_path, tls={"mode": mode}) as p:
        err = await refused(p)
        assert_fails_closed(err, postgres)
        assert "TLS" in str(err)
        assert upstream_tls_errors(p) == 1
        assert not any(e.kind == "command" for e in p.audit.events)


# Certificates verify-full must refuse: (cluster fixture, host, CA secret or None for the system store).
BAD_CERTS = {
    "wrong-ca": ("postgres_tls", "127.0.0.1", "other"),
    "wrong-host": ("postgres_tls_wrong_host", "127.0.0.1", "right"),
    "wrong-host-dns": ("postgres_tls_wrong_host", "localhost", "right"),
    "system-trust-store": ("postgres_tls", "127.0.0.1", None),
}


def bad_cert_proxy(request: pytest.FixtureRequest, case: str, tmp_path: Path,
                   other_ca: TestCA) -> tuple[TLSPG, contextlib.AbstractAsyncContextManager[ProxyUnderTest]]:
    fixture, host, ca = BAD_CERTS[case]
    pg: TLSPG = request.getfixturevalue(fixture)
    tls: dict[str, Any] = {"mode": "verify-full"}
    secrets: Mapping[str, Mapping[str, bytes]] = {}
    if ca is not None:
        tls["caSecretRef"] = CA_REF
        secrets = ca_secret(pg.ca if ca == "right" else other_ca)
    return pg, run_proxy(at_host(pg, host), tmp_path, tls=tls, extra_secrets=secrets)


@pytest.mark.parametrize("case", list(BAD_CERTS))
async def test_verify_full_refuses_bad_certificate(request: pytest.FixtureRequest, tmp_path: Path,
                                                   other_ca: TestCA, case: str) -> None:
    pg, proxy = bad_cert_proxy(request, case, tmp_path, other_ca)
    async with proxy as p:
        with no_upstream_login(pg):
            err = await refused(p)
        assert_fails_closed(err, pg)
        assert upstream_tls_errors(p) == 1  # counted as a TLS failure, not "unreachable"
        assert not any(e.kind == "command" for e in p.audit.events)


@pytest.mark.parametrize("case", list(BAD_CERTS))
async def test_verify_full_refusal_names_tls(request: pytest.FixtureRequest, tmp_path: Path,
                                             other_ca: TestCA, case: str) -> None:
    _pg, proxy = bad_cert_proxy(request, case, tmp_path, other_ca)
    async with proxy as p:
        err = await refused(p)
        assert "TLS" in str(err), str(err)
        assert "unreachable" not in str(err)


# --------------------------------------------------------------------------- caSecretRef problems


CA_SECRET_PROBLEMS: dict[str, Mapping[str, Mapping[str, bytes]]] = {
    "secret-missing": {},
    "key-missing": {CA_SECRET: {"tls.crt": b"-----BEGIN CERTIFICATE-----"}},
    "not-pem": {CA_SECRET: {"ca.crt": b"this is not a certificate"}},
    "not-utf8": {CA_SECRET: {"ca.crt": b"\xff\xfe"}},
}


@pytest.mark.parametrize("case", list(CA_SECRET_PROBLEMS))
async def test_unusable_ca_secret_fails_closed(postgres_tls: TLSPG, tmp_path: Path, case: str) -> None:
    async with run_proxy(postgres_tls, tmp_path, tls={"mode": "verify-full", "caSecretRef": CA_REF},
                         extra_secrets=CA_SECRET_PROBLEMS[case]) as p:
        with no_upstream_login(postgres_tls):
            err = await refused(p)
        assert_fails_closed(err, postgres_tls)
        # The secret is fixed in place (the store is live): the next session works.
        p.secrets._secrets[CA_SECRET] = {"ca.crt": postgres_tls.ca.cert_pem}
        conn = await asyncpg.connect(**p.kwargs())
        try:
            assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True
        finally:
            await conn.close()


@pytest.mark.parametrize("case", list(CA_SECRET_PROBLEMS))
async def test_unusable_ca_secret_error_names_the_ca(postgres_tls: TLSPG, tmp_path: Path, case: str) -> None:
    async with run_proxy(postgres_tls, tmp_path, tls={"mode": "verify-full", "caSecretRef": CA_REF},
                         extra_secrets=CA_SECRET_PROBLEMS[case]) as p:
        err = await refused(p)
        assert "TLS" in str(err) and "CA" in str(err), str(err)
        assert "credentials" not in str(err)


async def test_ca_secret_ignored_by_require(postgres_tls_wrong_host: TLSPG, tmp_path: Path, other_ca: TestCA) -> None:
    """require is "encrypted but unverified" (api.md): a CA that does not match does not matter."""
    async with run_proxy(postgres_tls_wrong_host, tmp_path, tls={"mode": "require", "caSecretRef": CA_REF},
                         extra_secrets=ca_secret(other_ca)) as p:
        conn = await asyncpg.connect(**p.kwargs())
        try:
            assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True
        finally:
            await conn.close()


# --------------------------------------------------------------------------- plaintext before the handshake




@contextlib.asynccontextmanager
async def fake_tls_target(ca: TestCA, tmp_path: Path, seen: list[bytes]) -> AsyncIterator[int]:
    """A target that answers the SSLRequest with 'S' plus a plaintext NoticeResponse in the same
    segment (what a man in the middle would inject), then speaks TLS honestly and lets anyone in."""
    cert_pem, key_pem = ca.issue()
    (tmp_path / "fake.crt").write_bytes(cert_pem)
    (tmp_path / "fake.key").write_bytes(key_pem)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "fake.crt", tmp_path / "fake.key")

    handlers: set[asyncio.Task[Any]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            handlers.add(task)
        try:
            seen.append(await reader.readexactly(8))  # SSLRequest
            writer.write(b"S" + pgwire.notice_response("WARNING", "01000", "INJECTED before TLS"))
            await writer.drain()
            await writer.start_tls(ctx)
            seen.append(await reader.read(4096))  # StartupMessage, inside TLS
            writer.write(pgwire.authentication_cleartext_password())
            await writer.drain()
            seen.append(await reader.read(4096))  # the gateway's password
            writer.write(pgwire.authentication_ok() + pgwire.backend_key_data(1, 2) + pgwire.ready_for_query())
            await writer.drain()
            await reader.read(1)
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


async def test_plaintext_injected_before_upstream_tls_is_refused(postgres: PG, tmp_path: Path,
                                                                 test_ca: TestCA) -> None:
    seen: list[bytes] = []
    async with fake_tls_target(test_ca, tmp_path, seen) as port:
        target = dataclasses.replace(postgres, port=port)
        obj = connection_object(target, issuer=OIDCIssuer(), tls={"mode": "verify-full", "caSecretRef": CA_REF})
        conn = build_config(obj, []).connection
        store = DictSecretStore({"orders-db-admin": {"username": b"gw", "password": b"gateway-held-secret"},
                                 **ca_secret(test_ca)})
        with pytest.raises(UpstreamError) as err:
            up = await open_upstream(conn, store, {}, settings=ProxySettings(connect_timeout=5))
            up.close()
        # Today the injected NoticeResponse is parsed as the target's first answer inside TLS.
        assert "INJECTED" not in str(err.value)
        assert err.value.kind == "tls" and "TLS" in str(err.value), (err.value.kind, str(err.value))
        assert len(seen) == 1  # nothing was sent after the SSLRequest: no startup, no password


# --------------------------------------------------------------------------- a warning during login




async def test_login_warning_from_target_does_not_end_the_session(postgres_tls: TLSPG, tmp_path: Path) -> None:
    """PostgreSQL warns at every login to a database whose recorded collation version does not match."""
    if not postgres_tls.server.sql("SELECT 1 FROM pg_database WHERE datname = 'warned'").strip():
        postgres_tls.server.sql("CREATE DATABASE warned", database="postgres")
        postgres_tls.server.sql("UPDATE pg_database SET datcollversion = '0.bogus' WHERE datname = 'warned'",
                                database="postgres")
    target = dataclasses.replace(postgres_tls, database="warned")
    async with run_proxy(target, tmp_path, tls={"mode": "verify-full", "caSecretRef": CA_REF},
                         extra_secrets=ca_secret(postgres_tls.ca)) as p:
        conn = await asyncpg.connect(**p.kwargs())
        try:
            assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True
        finally:
            await conn.close()
