"""pytest plugin: one throwaway PostgreSQL cluster per test session (``postgres`` fixture).

Built on ``sidegate_proxy.localpg`` (initdb into a temp dir, loopback port, runs as the
``postgres`` system user when the tests run as root). TCP logins need SCRAM, except two extra
users that exercise the other upstream methods: ``sidegate_md5`` (md5) and ``sidegate_pw``
(cleartext ``password``). The sample schema is localpg's: customers (100 rows with emails and
card numbers), orders, the view v_customers.
"""

from __future__ import annotations

import contextlib
import secrets
import ssl
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from oidc_issuer import OIDCIssuer
from sidegate_proxy.audit import AuditEvent, AuditLog
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


# --------------------------------------------------------------------------- the proxy, in-process


class RecordingAuditLog(AuditLog):
    """The real audit log (spool, chain) that also keeps every event for assertions."""

    def __init__(self, spool: Path) -> None:
        super().__init__(spool, [], b"k" * 32, "test", fsync=False, flush_interval=0.01)
        self.events: list[AuditEvent] = []

    def emit_nowait(self, event: AuditEvent | Mapping[str, Any]) -> dict[str, Any]:
        assert isinstance(event, AuditEvent)
        self.events.append(event)
        return super().emit_nowait(event)

    async def emit(self, event: AuditEvent | Mapping[str, Any]) -> dict[str, Any]:
        assert isinstance(event, AuditEvent)
        self.events.append(event)
        return await super().emit(event)

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

