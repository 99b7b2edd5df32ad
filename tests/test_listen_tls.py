"""TLS for callers from the Connection (``spec.listen.tls``): a gateway's callers cross the
network with their tokens, so the listener serves the certificate of a kubernetes.io/tls Secret,
refuses PostgreSQL callers that do not ask for TLS (unless ``required: false``), and follows the
Secret when it is renewed, without a restart and without serving a broken pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest

from oidc_issuer import OIDCIssuer, loopback_tls
from pg_fixtures import PG, connection_object
from sidegate_operator.build import build_deployment, required_secret_keys, secret_names
from sidegate_proxy import pgwire
from sidegate_proxy.config import ConfigError, ListenTLS, SecretKeyRef, build_config, parse_connection
from sidegate_proxy.runtime import ProxyRuntime, RuntimeOptions
from sidegate_proxy.secrets import DirSecretStore

TLS_SECRET = "orders-db-tls"
LISTEN = {"tls": {"secretRef": {"name": TLS_SECRET}}}
SUB = "system:serviceaccount:payments:reporter"


def put_pair(secrets: Path, source: Path) -> None:
    """A kubernetes.io/tls Secret as the kubelet mounts it (replaced whole)."""
    folder = secrets / TLS_SECRET
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tls.crt", "tls.key"):
        tmp = folder / f".{name}.new"
        shutil.copyfile(source / name, tmp)
        os.replace(tmp, folder / name)


def mount_secrets(tmp_path: Path, pg: PG, issuer: OIDCIssuer) -> Path:
    """The gateway's credential and the issuer's JWKS, mounted as the operator mounts Secrets."""
    secrets = tmp_path / "secrets"
    for name, files in {"orders-db-admin": {"username": pg.admin_user, "password": pg.admin_password},
                        "jwks": {"jwks.json": issuer.jwks_bytes().decode()}}.items():
        (secrets / name).mkdir(parents=True)
        for key, value in files.items():
            (secrets / name / key).write_text(value)
    return secrets


@contextlib.asynccontextmanager
async def gateway(pg: PG, tmp_path: Path, listen: dict[str, Any]) -> AsyncIterator[tuple[ProxyRuntime, OIDCIssuer,
                                                                                        Path, str]]:
    """A PostgreSQL gateway (the runtime as ``sidegate proxy`` runs it) with mounted Secrets:
    (runtime, issuer, the Secrets' folder, the CA file clients trust)."""
    issuer = OIDCIssuer()
    secrets = mount_secrets(tmp_path, pg, issuer)
    (first := tmp_path / "first").mkdir()
    _server, _client, ca_file = loopback_tls(str(first))
    put_pair(secrets, first)
    config = build_config(connection_object(pg, issuer=issuer, listen=listen), [])
    runtime = ProxyRuntime(config, DirSecretStore(secrets), RuntimeOptions(
        listen_host="127.0.0.1", listen_port=0, admin_port=None, spool_dir=tmp_path / "audit", audit_stdout=False,
        audit_fsync=False, watch_interval=0.02))
    await runtime.start()
    try:
        yield runtime, issuer, secrets, ca_file
    finally:
        await runtime.close()


def dsn(runtime: ProxyRuntime, issuer: OIDCIssuer, pg: PG, **extra: str) -> str:
    parts = {"host": "localhost", "port": str(runtime.port), "dbname": pg.database, "user": "app",
             "password": issuer.mint(sub=SUB, aud="sidegate"), "connect_timeout": "10", **extra}
    return " ".join(f"{k}={v}" for k, v in parts.items())


def served_certificate(port: int) -> bytes:
    """The certificate a PostgreSQL client is shown now (DER), trusting nothing."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(pgwire.ssl_request())
        assert raw.recv(1) == b"S"
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with ctx.wrap_socket(raw) as s:
            der = s.getpeercert(binary_form=True)
            assert der is not None
            return der


# --------------------------------------------------------------------------- the API


def test_listen_tls_parses(postgres: PG) -> None:
    obj = connection_object(postgres, issuer=OIDCIssuer(), listen={"port": 6432, **LISTEN})
    conn = parse_connection(obj)
    assert conn.listen_tls == ListenTLS(SecretKeyRef(TLS_SECRET), required=True)
    obj = connection_object(postgres, issuer=OIDCIssuer(),
                            listen={"tls": {"secretRef": {"name": TLS_SECRET}, "required": False}})
    assert parse_connection(obj).listen_tls == ListenTLS(SecretKeyRef(TLS_SECRET), required=False)
    assert parse_connection(connection_object(postgres, issuer=OIDCIssuer())).listen_tls is None
    for bad, path in (({}, "spec.listen.tls.secretRef"), ({"secretRef": {"name": "x"}, "required": "yes"},
                                                          "spec.listen.tls")):
        with pytest.raises(ConfigError) as err:
            parse_connection(connection_object(postgres, issuer=OIDCIssuer(), listen={"tls": bad}))
        assert err.value.path.startswith(path), err.value


def test_the_operator_mounts_the_certificate(postgres: PG) -> None:
    obj = connection_object(postgres, issuer=OIDCIssuer(), listen=LISTEN, mode="gateway")
    obj["metadata"]["uid"] = "u-1"
    conn = parse_connection(obj)
    assert TLS_SECRET in secret_names(conn)
    assert required_secret_keys(conn)[TLS_SECRET] == ("tls.crt", "tls.key")  # else SecretMissing, Degraded
    pod = build_deployment(conn, "hash", "sidegate:dev")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == TLS_SECRET)
    mounts = pod["containers"][0]["volumeMounts"]
    assert any(m["name"] == volume["name"] and m["mountPath"].endswith(f"/{TLS_SECRET}") and m["readOnly"]
               for m in mounts)


# --------------------------------------------------------------------------- PostgreSQL callers


async def test_tls_callers_served_plaintext_refused(postgres: PG, tmp_path: Path) -> None:
    async with gateway(postgres, tmp_path, LISTEN) as (runtime, issuer, _secrets, ca_file):
        async with await psycopg.AsyncConnection.connect(
                dsn(runtime, issuer, postgres, sslmode="verify-full", sslrootcert=ca_file)) as conn:
            assert conn.pgconn.ssl_in_use
            assert await (await conn.execute("SELECT 6 * 7")).fetchone() == (42,)
        with pytest.raises(psycopg.OperationalError, match="accepts TLS connections only") as err:
            await psycopg.AsyncConnection.connect(dsn(runtime, issuer, postgres, sslmode="disable"))
        assert "28000" in str(err.value.sqlstate or "28000")
        await asyncio.sleep(0.3)  # the spool's group commit
        records = [json.loads(line) for seg in sorted((tmp_path / "audit").glob("segment-*.jsonl"))
                   for line in seg.read_text().splitlines()]
        refused = [r for r in records if r["unmapped"].get("event") == "session_start"
                   and r["unmapped"].get("decision") == "block"]
        assert [(r["policy"]["name"], r["message"], "actor" in r and "user" in r["actor"]) for r in refused] == [
            ("tls-required", "the caller did not ask for TLS", False)]  # refused before any token was read


async def test_plaintext_allowed_when_not_required(postgres: PG, tmp_path: Path) -> None:
    listen = {"tls": {"secretRef": {"name": TLS_SECRET}, "required": False}}
    async with gateway(postgres, tmp_path, listen) as (runtime, issuer, _secrets, ca_file):
        for mode in ("disable", "verify-full"):
            async with await psycopg.AsyncConnection.connect(
                    dsn(runtime, issuer, postgres, sslmode=mode, sslrootcert=ca_file)) as conn:
                assert conn.pgconn.ssl_in_use == (mode != "disable")


async def test_a_renewed_certificate_is_served_without_a_restart(postgres: PG, tmp_path: Path) -> None:
    async with gateway(postgres, tmp_path, LISTEN) as (runtime, issuer, secrets, ca_file):
        assert runtime.port is not None
        first = await asyncio.to_thread(served_certificate, runtime.port)
        async with await psycopg.AsyncConnection.connect(
                dsn(runtime, issuer, postgres, sslmode="verify-full", sslrootcert=ca_file)) as open_session:
            (second := tmp_path / "second").mkdir()
            _s, _c, second_ca = loopback_tls(str(second))
            put_pair(secrets, second)
            for _ in range(200):
                if await asyncio.to_thread(served_certificate, runtime.port) != first:
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("the renewed certificate was never served")
            renewed = await asyncio.to_thread(served_certificate, runtime.port)
            # the session opened before the renewal goes on
            assert await (await open_session.execute("SELECT 1")).fetchone() == (1,)
        async with await psycopg.AsyncConnection.connect(
                dsn(runtime, issuer, postgres, sslmode="verify-full", sslrootcert=second_ca)) as conn:
            assert await (await conn.execute("SELECT 2")).fetchone() == (2,)

        # a broken renewal (this key does not belong to the certificate) is not served
        (broken := tmp_path / "broken").mkdir()
        (third := tmp_path / "third").mkdir()
        loopback_tls(str(third))
        shutil.copyfile(second / "tls.crt", broken / "tls.crt")
        shutil.copyfile(third / "tls.key", broken / "tls.key")
        put_pair(secrets, broken)
        await asyncio.sleep(0.3)
        assert await asyncio.to_thread(served_certificate, runtime.port) == renewed
        async with await psycopg.AsyncConnection.connect(
                dsn(runtime, issuer, postgres, sslmode="verify-full", sslrootcert=second_ca)) as conn:
            assert await (await conn.execute("SELECT 3")).fetchone() == (3,)


async def test_a_missing_certificate_secret_fails_the_start(postgres: PG, tmp_path: Path) -> None:
    from sidegate_proxy.secrets import SecretMissing

    issuer = OIDCIssuer()
    config = build_config(connection_object(postgres, issuer=issuer, listen=LISTEN), [])
    runtime = ProxyRuntime(config, DirSecretStore(mount_secrets(tmp_path, postgres, issuer)), RuntimeOptions(
        listen_host="127.0.0.1", listen_port=0, admin_port=None, spool_dir=tmp_path / "audit", audit_stdout=False))
    with pytest.raises(SecretMissing, match=TLS_SECRET):
        await runtime.start()
    await runtime.close()


# --------------------------------------------------------------------------- HTTP callers


async def test_http_listener_serves_tls_from_the_secret(tmp_path: Path) -> None:
    """An HTTP Connection's listener speaks TLS with the Secret's certificate."""
    from aiohttp import web

    async def hello(_request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/v1/ping", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    issuer = OIDCIssuer()
    secrets = tmp_path / "secrets"
    (secrets / "api-token").mkdir(parents=True)
    (secrets / "api-token" / "token").write_text("upstream-token")
    (secrets / "jwks").mkdir()
    (secrets / "jwks" / "jwks.json").write_bytes(issuer.jwks_bytes())
    (first := tmp_path / "first").mkdir()
    _s, client_ctx, _ca = loopback_tls(str(first))
    put_pair(secrets, first)
    obj = {
        "apiVersion": "sidegate.dev/v1alpha1", "kind": "Connection",
        "metadata": {"name": "billing", "namespace": "payments"},
        "spec": {"type": "http", "target": {"url": f"http://127.0.0.1:{upstream_port}"},
                 "credentials": {"secretRef": {"name": "api-token"}, "inject": "bearer"},
                 "identity": {"issuers": [{"name": "test", "issuer": issuer.url, "audiences": ["sidegate"],
                                           "jwksSecretRef": {"name": "jwks", "key": "jwks.json"}}]},
                 "access": [{"subjects": [SUB]}], "listen": LISTEN},
    }
    runtime = ProxyRuntime(build_config(obj, []), DirSecretStore(secrets), RuntimeOptions(
        listen_host="127.0.0.1", listen_port=0, admin_port=None, spool_dir=tmp_path / "audit", audit_stdout=False,
        audit_fsync=False))
    await runtime.start()
    try:
        headers = {"Authorization": f"Bearer {issuer.mint(sub=SUB, aud='sidegate')}"}
        async with aiohttp.ClientSession() as http:
            async with http.get(f"https://localhost:{runtime.port}/v1/ping", headers=headers, ssl=client_ctx) as r:
                assert r.status == 200 and await r.json() == {"ok": True}
            with pytest.raises(aiohttp.ClientError):  # plain HTTP: not served
                async with http.get(f"http://127.0.0.1:{runtime.port}/v1/ping", headers=headers) as r:
                    await r.read()
    finally:
        await runtime.close()
        await runner.cleanup()


def test_certificates_load_without_a_writable_filesystem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The proxy's root filesystem is read-only and a sidecar has no /tmp: nothing is written."""
    import tempfile

    from sidegate_proxy.servercert import load_pair

    _s, _c, _ca = loopback_tls(str(tmp_path))
    cert, key = (tmp_path / "tls.crt").read_bytes(), (tmp_path / "tls.key").read_bytes()

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryDirectory", refuse)
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    ctx = load_pair(cert, key)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        load_pair(cert, (tmp_path / "tls.crt").read_bytes())  # not a key
