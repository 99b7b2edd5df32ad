"""pytest plugin: one throwaway PostgreSQL cluster per test session (``postgres`` fixture).

Built on ``sidegate_proxy.localpg`` (initdb into a temp dir, loopback port, runs as the
``postgres`` system user when the tests run as root). TCP logins need SCRAM, except two extra
users that exercise the other upstream methods: ``sidegate_md5`` (md5) and ``sidegate_pw``
(cleartext ``password``). The sample schema is localpg's: customers (100 rows with emails and
card numbers), orders, the view v_customers.

Opt-in TLS variants for the upstream-TLS tests (``postgres_tls``, ``postgres_tls_wrong_host``): more
clusters, started only when a test asks, with ``ssl = on``, a server certificate from a throwaway
CA (``test_ca``) and a pg_hba that admits the gateway user over ``hostssl`` only (``hostnossl``
logins are rejected), so a session that works proves TLS was used.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import pwd
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from oidc_issuer import OIDCIssuer
from sidegate_proxy.audit import AuditEvent, AuditLog, CommandTemplate, command_event
from sidegate_proxy.config import ProxyConfig, build_config
from sidegate_proxy.guardrails import Guard
from sidegate_proxy.identity import Authenticator
from sidegate_proxy.localpg import SAMPLE_SCHEMA, LocalPostgres, PostgresUnavailable
from sidegate_proxy.masking import MaskingEngine
from sidegate_proxy.metrics import Metrics
from sidegate_proxy.pgproxy import ProxyServer, ProxySettings
from sidegate_proxy.secrets import DictSecretStore

MD5_USER, MD5_PASSWORD = "sidegate_md5", "md5-secret-1"
PW_USER, PW_PASSWORD = "sidegate_pw", "cleartext-secret-1"


@dataclass(frozen=True)
class PG:
    host: str
    port: int
    database: str
    admin_user: str
    admin_password: str
    server: LocalPostgres

    @property
    def dsn(self) -> str:
        return self.dsn_for(self.admin_user, self.admin_password)

    def dsn_for(self, user: str, password: str) -> str:
        return f"host={self.host} port={self.port} dbname={self.database} user={user} password={password}"

    def sql(self, statements: str) -> str:
        """Run SQL as the superuser over the Unix socket."""
        return self.server.sql(statements)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PG]:
    try:
        server = LocalPostgres(database="app")
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    server.start()
    try:
        server.sql(SAMPLE_SCHEMA)
        server.sql(
            f"SET password_encryption = 'md5';"
            f"CREATE ROLE {MD5_USER} LOGIN SUPERUSER PASSWORD '{MD5_PASSWORD}';"
            f"SET password_encryption = 'scram-sha-256';"
            f"CREATE ROLE {PW_USER} LOGIN SUPERUSER PASSWORD '{PW_PASSWORD}';"
        )
        hba = server.data / "pg_hba.conf"
        rules = (f"host all {MD5_USER} 127.0.0.1/32 md5\n"
                 f"host all {PW_USER} 127.0.0.1/32 password\n")
        hba.write_text(rules + hba.read_text())
        server.sql("SELECT pg_reload_conf()")
        yield PG(server.host, server.port, server.database, server.user, server.password, server)
    finally:
        server.stop()


# --------------------------------------------------------------------------- opt-in: PostgreSQL with TLS


@dataclass(frozen=True)
class TestCA:
    """A throwaway certificate authority: ``cert_pem`` goes into the caSecretRef Secret."""

    __test__ = False  # not a test class, despite the name

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def create(cls, name: str = "sidegate test upstream CA") -> TestCA:
        now = datetime.datetime.now(datetime.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    def issue(self, dns_names: Sequence[str] = ("localhost",),
              ips: Sequence[str] = ("127.0.0.1",)) -> tuple[bytes, bytes]:
        """A server certificate for these names: ``(cert_pem, key_pem)``."""
        now = datetime.datetime.now(datetime.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        cn = (list(dns_names) + list(ips))[0]
        cert = (
            x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem


@dataclass(frozen=True)
class TLSPG(PG):
    """A cluster serving TLS with a certificate from ``ca`` for ``cert_names``."""

    ca: TestCA
    cert_names: tuple[str, ...]

    def authorized_logins(self) -> list[str]:
        """The server log's ``connection authorized`` lines for the gateway user over TCP (not the
        fixture's own psql on the Unix socket): a login that never got that far left no line; a TLS
        one says ``SSL enabled``."""
        text = self.server.logfile.read_text(errors="replace")
        return [line for line in text.splitlines()
                if " tcp=127.0.0.1 " in line and f"connection authorized: user={self.admin_user} " in line]


def _write_for_server(server: LocalPostgres, path: Path, data: bytes, mode: int) -> None:
    path.write_bytes(data)
    os.chmod(path, mode)
    if os.geteuid() == 0:  # the server runs as the postgres system user, which must own its key
        pw = pwd.getpwnam("postgres")
        os.chown(path, pw.pw_uid, pw.pw_gid)


def _wait_plaintext_refused(pg: PG, timeout: float = 10.0) -> None:
    """pg_reload_conf() only signals the postmaster: wait until a non-TLS login is turned away."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(pg.dsn + " sslmode=disable connect_timeout=5"):
                pass
        except psycopg.OperationalError as exc:
            if "no pg_hba.conf entry" in str(exc) or "rejects connection" in str(exc):
                return
            raise
        if time.monotonic() > deadline:
            raise RuntimeError("pg_hba.conf reload did not take effect")
        time.sleep(0.05)


@contextlib.contextmanager
def tls_postgres(ca: TestCA, dns_names: Sequence[str] = ("localhost",),
                 ips: Sequence[str] = ("127.0.0.1",)) -> Iterator[TLSPG]:
    """A throwaway cluster with ``ssl = on`` and a certificate from ``ca`` for these names; TCP logins
    for the gateway user only over ``hostssl`` (SCRAM), plaintext TCP logins rejected."""
    try:
        server = LocalPostgres(database="app")
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))
    try:
        cert_pem, key_pem = ca.issue(dns_names, ips)
        cert_file, key_file = server.root / "server.crt", server.root / "server.key"
        _write_for_server(server, cert_file, cert_pem, 0o644)
        _write_for_server(server, key_file, key_pem, 0o600)
        server.settings = (*server.settings, "ssl = on", f"ssl_cert_file = '{cert_file}'",
                           f"ssl_key_file = '{key_file}'", "ssl_min_protocol_version = 'TLSv1.2'",
                           "log_connections = on", "log_line_prefix = '%m [%p] tcp=%h '")
        server.start()
        hba = server.data / "pg_hba.conf"
        rules = (f"hostssl all {server.user} 127.0.0.1/32 scram-sha-256\n"
                 "hostnossl all all 127.0.0.1/32 reject\n"
                 "hostnossl all all ::1/128 reject\n")
        hba.write_text(rules + hba.read_text())
        server.sql("SELECT pg_reload_conf()")
        pg = TLSPG(server.host, server.port, server.database, server.user, server.password, server,
                   ca, (*dns_names, *ips))
        _wait_plaintext_refused(pg)
        yield pg
    finally:
        server.stop()


@pytest.fixture(scope="session")
def test_ca() -> TestCA:
    """The CA behind the TLS clusters' certificates (a session's worth; never on disk)."""
    return TestCA.create()


@pytest.fixture(scope="session")
def postgres_tls(test_ca: TestCA) -> Iterator[TLSPG]:
    """A TLS-only cluster whose certificate names 127.0.0.1 and localhost."""
    with tls_postgres(test_ca) as pg:
        yield pg


@pytest.fixture(scope="session")
def postgres_tls_wrong_host(test_ca: TestCA) -> Iterator[TLSPG]:
    """A TLS-only cluster on 127.0.0.1 whose certificate (from the same CA) names another host."""
    with tls_postgres(test_ca, dns_names=("db.other.invalid",), ips=()) as pg:
        yield pg


# --------------------------------------------------------------------------- the proxy, in-process


def sealed_command(record: dict[str, Any]) -> AuditEvent:
    """The command event a record sealed by the native lane stands for, as far as tests compare
    events (statement, decision, class, rows, duration, session, time); the record itself is
    checked byte for byte against ``Chain.seal_run`` in tests/test_seal.py."""
    extra = record["unmapped"]
    assert extra["event"] == "command" and "sqlstate" not in extra and "masked" not in extra, record
    return command_event(
        session_id=record["actor"]["session"]["uid"], connection=extra["connection"], connection_type="postgres",
        caller=None, command=record["query_info"]["query_string"], decision=extra["decision"],
        command_class=extra.get("command_class"), rows=extra.get("rows"), duration_ms=record["duration"],
        time=record["time"] / 1000,
    )


class RecordingAuditLog(AuditLog):
    """The real audit log (spool, chain) that also keeps every event for assertions."""

    def __init__(self, spool: Path) -> None:
        super().__init__(spool, [], b"k" * 32, "test", fsync=False, flush_interval=0.01)
        self.events: list[AuditEvent] = []
        self.sealed = 0  # command records the native lane sealed itself

    def emit_nowait(self, event: AuditEvent | Mapping[str, Any]) -> dict[str, Any]:
        assert isinstance(event, AuditEvent)
        self.events.append(event)
        return super().emit_nowait(event)

    def emit_run_nowait(self, template: CommandTemplate, sql: str, time: float, duration_ms: float | None,
                        rows: int | None, masked: Mapping[str, int]) -> None:
        self.events.append(template.run(sql, time, duration_ms, rows, masked))
        super().emit_run_nowait(template, sql, time, duration_ms, rows, masked)

    async def emit(self, event: AuditEvent | Mapping[str, Any]) -> dict[str, Any]:
        assert isinstance(event, AuditEvent)
        self.events.append(event)
        return await super().emit(event)

    def append_sealed(self, lines: bytes, count: int) -> None:
        """Lines the native lane sealed: recorded as the command events they stand for."""
        assert lines.count(b"\n") == count and lines.endswith(b"\n")
        self.events.extend(sealed_command(json.loads(line)) for line in lines.splitlines())
        self.sealed += count
        super().append_sealed(lines, count)

    def commands(self) -> list[AuditEvent]:
        return [e for e in self.events if e.kind == "command"]


@dataclass
class ProxyUnderTest:
    server: ProxyServer
    issuer: OIDCIssuer
    audit: RecordingAuditLog
    pg: PG
    secrets: DictSecretStore
    config: ProxyConfig

    @property
    def port(self) -> int:
        return self.server.port

    def token(self, sub: str = "system:serviceaccount:payments:reporter", **claims: Any) -> str:
        claims.setdefault("aud", "sidegate")
        return self.issuer.mint(sub=sub, **claims)

    def dsn(self, token: str | None = None, *, user: str = "app", **extra: Any) -> str:
        parts = {"host": "127.0.0.1", "port": self.port, "dbname": self.pg.database, "user": user,
                 "password": token if token is not None else self.token(), "sslmode": "disable", **extra}
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def kwargs(self, token: str | None = None, **extra: Any) -> dict[str, Any]:
        """asyncpg.connect keyword arguments."""
        return {"host": "127.0.0.1", "port": self.port, "database": self.pg.database, "user": "app",
                "password": token if token is not None else self.token(), "ssl": False, **extra}


def connection_object(pg: PG, *, guardrails: Sequence[Mapping[str, Any]] = (),
                      access: Sequence[Mapping[str, Any]] | None = None, issuer: OIDCIssuer,
                      tls: Mapping[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "sidegate.dev/v1alpha1", "kind": "Connection",
        "metadata": {"name": "orders-db", "namespace": "payments"},
        "spec": {
            "type": "postgres",
            "target": {"host": pg.host, "port": pg.port, "database": pg.database,
                       **({"tls": dict(tls)} if tls else {})},
            "credentials": {"secretRef": {"name": "orders-db-admin"}},
            "identity": {"issuers": [{"name": "test", "issuer": issuer.url, "audiences": ["sidegate"],
                                      "groupsClaim": "groups",
                                      "jwksSecretRef": {"name": "jwks", "key": "jwks.json"}}]},
            "access": list(access) if access is not None else [
                {"subjects": ["system:serviceaccount:payments:*"], "groups": ["auditors"]}],
            "guardrails": list(guardrails),
            **spec,
        },
    }


def masking_object(rules: Sequence[Mapping[str, Any]],
                   exempt: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "sidegate.dev/v1alpha1", "kind": "MaskingPolicy",
        "metadata": {"name": "pii", "namespace": "payments"},
        "spec": {"connections": ["orders-db"], "rules": list(rules), "exempt": dict(exempt or {})},
    }


@contextlib.asynccontextmanager
async def run_proxy(
    pg: PG,
    tmp_path: Path,
    *,
    guardrails: Sequence[Mapping[str, Any]] = (),
    masking: Sequence[Mapping[str, Any]] = (),
    exempt: Mapping[str, Any] | None = None,
    credentials: tuple[str, str] | None = None,
    extra_secrets: Mapping[str, Mapping[str, bytes]] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    settings: ProxySettings | None = None,
    **spec: Any,
) -> AsyncIterator[ProxyUnderTest]:
    """A ProxyServer for the test cluster, configured from Connection/MaskingPolicy dicts."""
    issuer = OIDCIssuer()  # never started: its static JWKS goes into a Secret
    user, password = credentials or (pg.admin_user, pg.admin_password)
    store = DictSecretStore({
        "orders-db-admin": {"username": user.encode(), "password": password.encode()},
        "jwks": {"jwks.json": issuer.jwks_bytes()},
        **(extra_secrets or {}),
    })
    conn = connection_object(pg, guardrails=guardrails, issuer=issuer, **spec)
    policies = [masking_object(masking, exempt)] if masking else []
    config = build_config(conn, policies)
    audit = RecordingAuditLog(tmp_path / f"spool-{secrets.token_hex(4)}")
    await audit.start()
    authenticator = Authenticator(config.connection.identity, store)
    server = ProxyServer(
        config, store, authenticator=authenticator, guard=Guard(config.connection),
        masking_engine=MaskingEngine(config.masking, b"m" * 32), audit_log=audit, port=0,
        ssl_context=ssl_context, metrics=Metrics(), settings=settings,
    )
    await server.start()
    try:
        yield ProxyUnderTest(server, issuer, audit, pg, store, config)
    finally:
        await server.close()
        await authenticator.aclose()
        await audit.close()

