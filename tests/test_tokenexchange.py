"""Token exchange: issue, verify as just another issuer, and the RFC 8693 endpoint on loopback."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from oidc_issuer import OIDCIssuer
from sidegate_proxy.config import ConfigError, IdentityConfig, SubjectMatch
from sidegate_proxy.identity import Authenticator, AuthError
from sidegate_proxy.policy import Caller, who_matches
from sidegate_proxy.secrets import DictSecretStore, DirSecretStore
from sidegate_proxy.tokenexchange import (
    GRANT_TYPE,
    ISSUER_NAME,
    MAX_TTL,
    RETIRE_AFTER,
    TOKEN_TYPE_JWT,
    ExchangeKey,
    KeyLoader,
    TokenIssuer,
    TokenKeys,
    jwk_thumbprint,
    token_exchange_app,
    token_exchange_routes,
)

SIDEGATE = "https://sidegate.sidegate-system.svc"
NO_SECRETS = DictSecretStore({})


class FakeClock:
    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now


def pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def ec_pem() -> bytes:
    return pem(ec.generate_private_key(ec.SECP256R1()))


def thumbprint(private: Any) -> str:
    """RFC 7638 computed here from the key's numbers, independently of the code under test."""
    def b64(n: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes((n.bit_length() + 7) // 8 or 1, "big")).rstrip(b"=").decode()

    numbers = private.public_key().public_numbers()
    if isinstance(numbers, rsa.RSAPublicNumbers):
        canonical = f'{{"e":"{b64(numbers.e)}","kty":"RSA","n":"{b64(numbers.n)}"}}'
    else:
        size = (numbers.curve.key_size + 7) // 8
        x, y = (base64.urlsafe_b64encode(v.to_bytes(size, "big")).rstrip(b"=").decode() for v in (numbers.x, numbers.y))
        crv = {"secp256r1": "P-256", "secp384r1": "P-384"}[numbers.curve.name]
        canonical = f'{{"crv":"{crv}","kty":"EC","x":"{x}","y":"{y}"}}'
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


CALLER = Caller(subject="system:serviceaccount:ci:deployer", issuer="https://k8s", groups=frozenset({"ci"}),
                expires_at=time.time() + 3600)


def proxy_auth(ti: TokenIssuer, connection: str, **kw: Any) -> Authenticator:
    """What a proxy for ``connection`` runs: exchanged tokens accepted as just another issuer."""
    return Authenticator(IdentityConfig(), NO_SECRETS, extra_issuers=(ti.as_issuer(connection),),
                         key_sources={ISSUER_NAME: ti.key_source()}, **kw)


@pytest.mark.parametrize("keygen,alg", [(ec_pem, "ES256"),
                                        (lambda: pem(rsa.generate_private_key(65537, 2048)), "RS256")])
async def test_exchanged_token_accepted_for_its_connection_only(keygen: Any, alg: str) -> None:
    ti = TokenIssuer(keygen(), SIDEGATE)
    assert ti.algorithm == alg
    token, expires_in = ti.issue(CALLER, "payments/orders-db", 300)
    assert expires_in == 300
    header = jwt.get_unverified_header(token)
    assert header["kid"] == ti.key_id == thumbprint(ti.keys.signing.private) and header["alg"] == alg

    caller = await proxy_auth(ti, "payments/orders-db").authenticate(token)
    assert caller.subject == CALLER.subject and caller.groups == {"ci"}
    assert caller.issuer == SIDEGATE and caller.issuer_name == ISSUER_NAME
    assert caller.claims["sidegate.orig_iss"] == "https://k8s" and caller.claims["jti"]

    for other in ("payments/billing-api", "other/orders-db"):
        with pytest.raises(AuthError, match="wrong audience"):
            await proxy_auth(ti, other).authenticate(token)


async def test_exchanged_token_expires() -> None:
    clock = FakeClock()
    ti = TokenIssuer(ec_pem(), SIDEGATE, clock=clock)
    token, _ = ti.issue(CALLER, "payments/orders-db", 60)
    auth = proxy_auth(ti, "payments/orders-db", clock=clock, leeway=0)
    await auth.authenticate(token)
    clock.now += 61
    with pytest.raises(AuthError, match="token expired"):
        await auth.authenticate(token)


def test_ttl_capped_at_15_minutes_and_by_subject_token() -> None:
    ti = TokenIssuer(ec_pem(), SIDEGATE)
    token, expires_in = ti.issue(CALLER, "payments/orders-db", 24 * 3600)
    assert expires_in == 900
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 900
    short = Caller("x", "https://k8s", expires_at=time.time() + 100)
    assert ti.issue(short, "payments/orders-db")[1] <= 100
    with pytest.raises(AuthError):
        ti.issue(Caller("x", "https://k8s", expires_at=time.time() - 1), "payments/orders-db")


def test_bad_signing_keys_refused() -> None:
    with pytest.raises(ConfigError):
        TokenIssuer(b"not a key", SIDEGATE)
    with pytest.raises(ConfigError, match="2048"):
        TokenIssuer(pem(rsa.generate_private_key(65537, 1024)), SIDEGATE)
    with pytest.raises(ConfigError):
        TokenIssuer(pem(ec.generate_private_key(ec.SECP256K1())), SIDEGATE)


def test_jwks_has_only_public_material() -> None:
    ti = TokenIssuer(ec_pem(), SIDEGATE)
    (key,) = ti.jwks()["keys"]
    assert key["kid"] == ti.key_id and key["alg"] == "ES256" and "d" not in key


# --------------------------------------------------------------------------- POST /v1/token


@pytest.fixture
async def setup() -> AsyncIterator[tuple[OIDCIssuer, TokenIssuer, str, aiohttp.ClientSession]]:
    async with OIDCIssuer() as idp:
        ti = TokenIssuer(ec_pem(), SIDEGATE)
        connections = {"payments/orders-db": (SubjectMatch(subjects=("repo:acme/*",)),)}
        auths = {ref: Authenticator(IdentityConfig(issuers=(idp.issuer_config(),)), NO_SECRETS)
                 for ref in connections}

        def allowed(caller: Caller, ref: str) -> bool:
            return any(who_matches(w, caller) for w in connections[ref])

        runner = web.AppRunner(token_exchange_app(ti, auths.get, allowed))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        async with aiohttp.ClientSession() as session:
            yield idp, ti, url, session
        await runner.cleanup()
        for a in auths.values():
            await a.aclose()


def form(subject_token: str, audience: str = "payments/orders-db", **extra: str) -> dict[str, str]:
    return {"grant_type": GRANT_TYPE, "subject_token": subject_token,
            "subject_token_type": TOKEN_TYPE_JWT, "audience": audience, **extra}


async def test_exchange_endpoint_issues_usable_token(setup: Any) -> None:
    idp, ti, url, session = setup
    subject = idp.mint(sub="repo:acme/api:ref:refs/heads/main", aud="sidegate", groups=["ci"])
    async with session.post(f"{url}/v1/token", data=form(subject)) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Cache-Control"] == "no-store"
        body = await resp.json()
    assert body["issued_token_type"] == TOKEN_TYPE_JWT and body["token_type"] == "Bearer"
    assert 0 < body["expires_in"] <= 300  # never outlives the subject token

    local = proxy_auth(ti, "payments/orders-db")  # in-process keys
    caller = await local.authenticate(body["access_token"])
    assert caller.subject == "repo:acme/api:ref:refs/heads/main" and caller.groups == {"ci"}

    # a proxy in another pod fetches the published keys over HTTP
    async with session.get(f"{url}/.well-known/jwks.json") as resp:
        assert (await resp.json()) == ti.jwks()
    remote_cfg = dataclasses.replace(ti.as_issuer("payments/orders-db"), jwks_uri=f"{url}/v1/jwks")
    remote = Authenticator(IdentityConfig(issuers=(remote_cfg,)), NO_SECRETS)
    assert (await remote.authenticate(body["access_token"])).subject == caller.subject
    await remote.aclose()


async def test_exchange_resource_parameter(setup: Any) -> None:
    idp, _, url, session = setup
    data = form(idp.mint(sub="repo:acme/api", aud="sidegate"))
    data["resource"] = data.pop("audience")
    async with session.post(f"{url}/v1/token", data=data) as resp:
        assert resp.status == 200


@pytest.mark.parametrize(
    "change,status,error",
    [
        ({"subject_token": "garbage"}, 400, "invalid_grant"),
        ({"subject_token": "EXPIRED"}, 400, "invalid_grant"),
        ({"subject_token": "FOREIGN"}, 400, "invalid_grant"),
        ({"subject_token": "OTHER_SUBJECT"}, 403, "unauthorized_client"),
        ({"grant_type": "client_credentials"}, 400, "unsupported_grant_type"),
        ({"actor_token": "x"}, 400, "invalid_request"),
        ({"subject_token_type": "urn:ietf:params:oauth:token-type:saml2"}, 400, "invalid_request"),
        ({"requested_token_type": "urn:ietf:params:oauth:token-type:saml2"}, 400, "invalid_request"),
        ({"subject_token": ""}, 400, "invalid_request"),
        ({"audience": ""}, 400, "invalid_request"),
        ({"audience": "payments/unknown"}, 400, "invalid_target"),
        ({"audience": "orders-db"}, 400, "invalid_target"),
        ({"resource": "payments/other"}, 400, "invalid_target"),
    ],
)
async def test_exchange_errors(setup: Any, change: dict[str, str], status: int, error: str) -> None:
    idp, _, url, session = setup
    async with OIDCIssuer() as foreign:
        tokens = {
            "EXPIRED": idp.mint(sub="repo:acme/api", aud="sidegate", exp_in=-300),
            "FOREIGN": foreign.mint(sub="repo:acme/api", aud="sidegate"),
            "OTHER_SUBJECT": idp.mint(sub="repo:evil/api", aud="sidegate"),
        }
    data = form(idp.mint(sub="repo:acme/api", aud="sidegate"))
    data.update({k: tokens.get(v, v) for k, v in change.items()})
    async with session.post(f"{url}/v1/token", data=data) as resp:
        body = await resp.json()
        assert (resp.status, body["error"]) == (status, error), body
        assert data["subject_token"] not in str(body) or not data["subject_token"]


async def test_exchange_needs_form_encoding_and_single_values(setup: Any) -> None:
    idp, _, url, session = setup
    as_json = form(idp.mint(sub="repo:acme/api", aud="sidegate"))
    async with session.post(f"{url}/v1/token", json=as_json) as resp:
        assert resp.status == 400 and (await resp.json())["error"] == "invalid_request"
    token = idp.mint(sub="repo:acme/api", aud="sidegate")
    twice = [*form(token).items(), ("audience", "payments/other")]
    async with session.post(f"{url}/v1/token", data=twice) as resp:
        assert resp.status == 400 and (await resp.json())["error"] == "invalid_request"
    async with session.post(f"{url}/v1/token", data={"subject_token": "x" * 70_000}) as resp:
        assert resp.status == 413 and (await resp.json())["error"] == "invalid_request"


async def test_routes_share_an_existing_app(setup: Any) -> None:
    """How the admin port serves it: plain routes next to its own, paths unchanged."""
    idp, ti, _, session = setup
    auth = Authenticator(IdentityConfig(issuers=(idp.issuer_config(),)), NO_SECRETS)
    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    admin = web.Application()
    admin.router.add_get("/healthz", healthz)
    admin.add_routes(token_exchange_routes(ti, {"payments/orders-db": auth}.get, lambda c, r: True))
    runner = web.AppRunner(admin)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    async with session.post(f"{url}/v1/token", data=form(idp.mint(sub="x", aud="sidegate"))) as resp:
        assert resp.status == 200
    async with session.get(f"{url}/.well-known/openid-configuration") as resp:
        assert (await resp.json())["issuer"] == SIDEGATE
    await runner.cleanup()
    await auth.aclose()


# --------------------------------------------------------------------------- spec.tokenExchange


def _config(name: str, exchange: dict[str, Any] | None, **more: Any) -> Any:
    from sidegate_proxy.config import build_config

    spec: dict[str, Any] = {"type": "postgres", "target": {"host": "db", "port": 5432, "database": "d"},
                            "credentials": {"secretRef": {"name": "admin"}}, **more}
    if exchange is not None:
        spec["tokenExchange"] = exchange
    return build_config({"apiVersion": "sidegate.dev/v1alpha1", "kind": "Connection",
                         "metadata": {"name": name, "namespace": "payments"}, "spec": spec}, [])


async def test_only_connections_with_token_exchange_issue_and_trust_exchanged_tokens(tmp_path: Any) -> None:
    from sidegate_proxy.runtime import ProxyGroup, RuntimeOptions, configured_token_keys

    key = ec_pem()
    secrets = DictSecretStore({"admin": {"username": b"u", "password": b"p"}, "exchange": {"tls.key": key}})
    exchange = {"signingKeySecretRef": {"name": "exchange"}, "issuer": "https://sidegate.example.com"}
    configs = [_config("orders", exchange), _config("billing", None)]
    keys = configured_token_keys(configs, secrets)  # what --manifests uses without the flag
    assert keys is not None and keys.signing.kid == thumbprint(serialization.load_pem_private_key(key, None))
    assert configured_token_keys([configs[1]], secrets) is None
    group = ProxyGroup(configs, secrets, RuntimeOptions(token_signing_key=key, spool_dir=tmp_path))
    orders, billing = group.runtimes
    assert billing.token_issuer is None
    assert orders.token_issuer is not None and orders.token_issuer.issuer == "https://sidegate.example.com"
    token, _ = orders.token_issuer.issue(CALLER, "payments/orders")
    assert (await orders.components.authenticator.authenticate(token)).subject == CALLER.subject
    with pytest.raises(AuthError, match="untrusted issuer"):
        await billing.components.authenticator.authenticate(token)
    for r in group.runtimes:
        await r.components.authenticator.aclose()
    with pytest.raises(ConfigError, match="different signing keys"):
        configured_token_keys([configs[0], _config("ledger", {"signingKeySecretRef": {"name": "other"}})],
                              secrets)


# --------------------------------------------------------------------------- key rotation

RFC7638_EXAMPLE = {  # RFC 7638 section 3.1
    "kty": "RSA",
    "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCi"
         "FV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0"
         "zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csF"
         "Cur-kEgU8awapJzKnqDKgw",
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}


def kid_of(key_pem: bytes) -> str:
    return ExchangeKey.from_pem(key_pem).kid


def put(path: Path, data: bytes | None) -> None:
    """Change a mounted key as the kubelet does: the new content appears whole, or the key goes."""
    if data is None:
        path.unlink()
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def kids(jwks: dict[str, Any]) -> list[str]:
    return [k["kid"] for k in jwks["keys"]]


def test_kid_is_the_rfc7638_thumbprint() -> None:
    assert jwk_thumbprint(RFC7638_EXAMPLE) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    for private in (ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP384R1()),
                    rsa.generate_private_key(65537, 2048)):
        key = ExchangeKey.from_pem(pem(private))
        assert key.kid == thumbprint(private) == key.jwk["kid"] == key.verifier.kid
        assert kid_of(pem(private)) == key.kid  # every replica names the same key the same
        ti = TokenIssuer(pem(private), SIDEGATE)
        assert jwt.get_unverified_header(ti.issue(CALLER, "payments/orders-db")[0])["kid"] == key.kid
    assert kid_of(ec_pem()) != kid_of(ec_pem())


def test_signing_key_file_change_switches_the_signing_key(tmp_path: Path) -> None:
    old, new = ec_pem(), pem(rsa.generate_private_key(65537, 2048))
    (path := tmp_path / "tls.key").write_bytes(old)
    clock = FakeClock()
    keys = TokenKeys(KeyLoader.file(path), clock=clock)
    ti = TokenIssuer(keys, SIDEGATE)
    before = keys.snapshot()
    keys.reload()  # nothing changed: nothing happens
    assert (ti.key_id, ti.algorithm, kids(ti.jwks())) == (kid_of(old), "ES256", [kid_of(old)])

    put(path, new)
    assert keys.snapshot() != before
    keys.reload()
    token, _ = ti.issue(CALLER, "payments/orders-db")
    assert jwt.get_unverified_header(token) == {"alg": "RS256", "kid": kid_of(new), "typ": "JWT"}
    assert kids(ti.jwks()) == [kid_of(new), kid_of(old)]  # the old key is retired, still published


async def test_retired_key_trusted_until_its_last_token_expired(tmp_path: Path) -> None:
    (path := tmp_path / "tls.key").write_bytes(old := ec_pem())
    clock = FakeClock()
    ti = TokenIssuer(TokenKeys(KeyLoader.file(path), clock=clock), SIDEGATE)
    auth = proxy_auth(ti, "payments/orders-db", clock=clock)  # built once, never rebuilt
    last_old, _ = ti.issue(CALLER, "payments/orders-db")  # signed just before the swap, 15 minutes

    put(path, new := ec_pem())
    ti.keys.reload()
    first_new, _ = ti.issue(CALLER, "payments/orders-db")
    assert (await auth.authenticate(first_new)).subject == CALLER.subject  # the new key: at once

    clock.now += RETIRE_AFTER  # the last moment the old token is valid (exp + 30 s of leeway)
    assert RETIRE_AFTER == MAX_TTL + 30
    assert (await auth.authenticate(last_old)).subject == CALLER.subject
    assert kid_of(old) in kids(ti.jwks())

    clock.now += 1  # its every token has expired: the key is dropped, from the JWKS as well
    fresh = proxy_auth(ti, "payments/orders-db", clock=clock, leeway=3600)  # would take an expired token
    with pytest.raises(AuthError, match="unknown signing key"):
        await fresh.authenticate(last_old)
    assert kids(ti.jwks()) == [kid_of(new)]
    await auth.aclose()
    await fresh.aclose()


@pytest.mark.parametrize("bad", [b"", b"not a key", pem(rsa.generate_private_key(65537, 1024)),
                                 pem(ec.generate_private_key(ec.SECP256K1())), None])
def test_unusable_new_key_keeps_the_current_one_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: bytes | None
) -> None:
    (path := tmp_path / "tls.key").write_bytes(good := ec_pem())
    keys = TokenKeys(KeyLoader.file(path))
    ti = TokenIssuer(keys, SIDEGATE)
    put(path, bad)  # garbage, a weak or odd key, or the file gone
    with caplog.at_level(logging.ERROR, logger="sidegate_proxy.tokenexchange"):
        keys.reload()
    assert ti.key_id == kid_of(good) and kids(ti.jwks()) == [kid_of(good)]
    assert jwt.get_unverified_header(ti.issue(CALLER, "payments/orders-db")[0])["kid"] == kid_of(good)
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert str(path) in record.getMessage() and f"keeping key {kid_of(good)}" in record.getMessage()
    assert "PRIVATE KEY" not in caplog.text


def test_unusable_verification_key_keeps_the_one_it_held(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "tls.key").write_bytes(signing := ec_pem())
    (tmp_path / "next.key").write_bytes(b"not a key")
    with caplog.at_level(logging.ERROR, logger="sidegate_proxy.tokenexchange"):
        keys = TokenKeys(KeyLoader.file(tmp_path / "tls.key"), [KeyLoader.file(tmp_path / "next.key")])
    assert kids(keys.jwks()) == [kid_of(signing)]  # not trusted, and the proxy starts all the same
    assert "next.key is not usable" in caplog.text and "not trusted" in caplog.text

    put(tmp_path / "next.key", nxt := ec_pem())
    keys.reload()
    put(tmp_path / "next.key", b"-----BEGIN PRIVATE KEY-----\ntruncated")
    keys.reload()
    assert kids(keys.jwks()) == [kid_of(signing), kid_of(nxt)]
    assert f"keeping key {kid_of(nxt)}" in caplog.text


async def test_verification_key_is_published_and_trusted_but_never_signs(tmp_path: Path) -> None:
    (tmp_path / "tls.key").write_bytes(current := ec_pem())
    (tmp_path / "next.key").write_bytes(nxt := pem(rsa.generate_private_key(65537, 2048)))
    clock = FakeClock()
    keys = TokenKeys(KeyLoader.file(tmp_path / "tls.key"),
                     [KeyLoader.file(tmp_path / "next.key"), KeyLoader.file(tmp_path / "absent.key")], clock=clock)
    ti = TokenIssuer(keys, SIDEGATE)
    assert kids(ti.jwks()) == [kid_of(current), kid_of(nxt)]  # an absent one is nothing to trust
    for _ in range(5):
        assert jwt.get_unverified_header(ti.issue(CALLER, "payments/orders-db")[0])["kid"] == kid_of(current)
    # a replica that already signs with it: its tokens are accepted here
    elsewhere, _ = TokenIssuer(nxt, SIDEGATE).issue(CALLER, "payments/orders-db")
    auth = proxy_auth(ti, "payments/orders-db", clock=clock)
    assert (await auth.authenticate(elsewhere)).subject == CALLER.subject

    put(tmp_path / "next.key", None)  # taken out of the Secret: retired like a signing key
    keys.reload()
    clock.now += RETIRE_AFTER
    assert kid_of(nxt) in kids(ti.jwks())
    clock.now += 1
    assert kids(ti.jwks()) == [kid_of(current)]
    await auth.aclose()


async def test_replicas_mid_rotation_accept_each_others_tokens(tmp_path: Path) -> None:
    """Each replica sees the Secret on its own schedule: one has swapped, the other has only
    the next key published yet; neither refuses what the other signs, before or after."""
    from sidegate_proxy.runtime import ProxyRuntime, RuntimeOptions, configured_token_keys

    current, nxt = ec_pem(), ec_pem()
    exchange = {"signingKeySecretRef": {"name": "exchange"}, "verificationKeys": ["next.key"],
                "issuer": SIDEGATE}
    config = _config("orders", exchange)

    def replica(name: str) -> tuple[ProxyRuntime, Path]:
        mount = tmp_path / name  # the replica's own view of the Secret volumes
        for secret, data in {"admin": {"username": b"u", "password": b"p"},
                             "exchange": {"tls.key": current, "next.key": nxt}}.items():
            (mount / secret).mkdir(parents=True)
            for key, value in data.items():
                (mount / secret / key).write_bytes(value)
        store = DirSecretStore(mount)
        keys = configured_token_keys([config], store)
        return ProxyRuntime(config, store, RuntimeOptions(spool_dir=tmp_path / f"{name}-audit"),
                            token_keys=keys), mount / "exchange"

    (a, a_secret), (b, b_secret) = replica("a"), replica("b")
    assert a.token_issuer is not None and b.token_issuer is not None

    async def accepted(token: str, by: ProxyRuntime) -> bool:
        try:
            await by.components.authenticator.authenticate(token)
        except AuthError:
            return False
        return True

    # a has swapped (step 3 of the procedure); b has not seen it yet
    put(a_secret / "tls.key", nxt)
    put(a_secret / "next.key", current)
    a.token_issuer.keys.reload()
    from_a, _ = a.token_issuer.issue(CALLER, "payments/orders")
    from_b, _ = b.token_issuer.issue(CALLER, "payments/orders")
    assert jwt.get_unverified_header(from_a)["kid"] == kid_of(nxt)
    assert jwt.get_unverified_header(from_b)["kid"] == kid_of(current)
    assert await accepted(from_a, b) and await accepted(from_b, a)
    assert sorted(kids(a.token_issuer.jwks())) == sorted(kids(b.token_issuer.jwks()))

    # a even dropped the old key from the Secret too early: it is retired, still trusted
    put(a_secret / "next.key", None)
    a.token_issuer.keys.reload()
    from_b_later, _ = b.token_issuer.issue(CALLER, "payments/orders")
    assert await accepted(from_b_later, a)

    # b catches up
    put(b_secret / "tls.key", nxt)
    put(b_secret / "next.key", current)
    b.token_issuer.keys.reload()
    for token in (from_a, from_b, from_b_later):
        assert await accepted(token, a) and await accepted(token, b)
    for r in (a, b):
        await r.components.authenticator.aclose()


async def test_rotation_on_a_running_proxy_over_http(tmp_path: Path) -> None:
    """The proxy as it runs: a key Secret volume followed by ``watch_token_keys``, tokens from
    ``POST /v1/token`` on the admin port, the JWKS a remote proxy fetches."""
    from sidegate_proxy.runtime import ProxyRuntime, RuntimeOptions, configured_token_keys, watch_token_keys

    async with OIDCIssuer() as idp, aiohttp.ClientSession() as http:
        spec = {"signingKeySecretRef": {"name": "exchange"}, "verificationKeys": ["next.key"], "issuer": SIDEGATE}
        config = _config("orders", spec, identity={"issuers": [{"name": "ci", "issuer": idp.url,
                                                                 "audiences": ["sidegate"]}]},
                         access=[{"subjects": ["repo:acme/*"]}])
        (mount := tmp_path / "secrets" / "exchange").mkdir(parents=True)
        (tmp_path / "secrets" / "admin").mkdir()
        (tmp_path / "secrets" / "admin" / "password").write_bytes(b"p")
        (tmp_path / "secrets" / "admin" / "username").write_bytes(b"u")
        (mount / "tls.key").write_bytes(old := ec_pem())
        store = DirSecretStore(tmp_path / "secrets")
        keys = configured_token_keys([config], store)
        assert keys is not None
        runtime = ProxyRuntime(config, store, RuntimeOptions(listen_host="127.0.0.1", listen_port=0, admin_port=0,
                                                             spool_dir=tmp_path / "audit", audit_stdout=False,
                                                             audit_fsync=False), token_keys=keys)
        await runtime.start()
        watcher = asyncio.create_task(watch_token_keys(keys, interval=0.02))
        admin = f"http://127.0.0.1:{runtime.admin_port}"
        authenticator = runtime.components.authenticator

        async def exchange() -> str:
            data = form(idp.mint(sub="repo:acme/api", aud="sidegate"), "payments/orders")
            async with http.post(f"{admin}/v1/token", data=data) as resp:
                assert resp.status == 200, await resp.text()
                return str((await resp.json())["access_token"])

        async def published() -> list[str]:
            async with http.get(f"{admin}/.well-known/jwks.json") as resp:
                return kids(await resp.json())

        async def until(kid: str) -> None:
            for _ in range(250):
                if kid in await published():
                    return
                await asyncio.sleep(0.02)
            raise AssertionError(f"{kid} never published")

        try:
            old_token = await exchange()
            assert jwt.get_unverified_header(old_token)["kid"] == kid_of(old)
            put(mount / "next.key", new := ec_pem())
            await until(kid_of(new))
            assert jwt.get_unverified_header(await exchange())["kid"] == kid_of(old)  # published, not signing
            put(mount / "tls.key", new)
            put(mount / "next.key", None)
            for _ in range(250):
                new_token = await exchange()
                if jwt.get_unverified_header(new_token)["kid"] == kid_of(new):
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("the new key never signed")
            assert sorted(await published()) == sorted([kid_of(old), kid_of(new)])
            assert runtime.components.authenticator is authenticator  # same verifier, no rebuild
            for token in (old_token, new_token):
                assert (await authenticator.authenticate(token)).subject == "repo:acme/api"
            remote_cfg = dataclasses.replace(runtime.token_issuer.as_issuer("payments/orders"),  # type: ignore[union-attr]
                                             jwks_uri=f"{admin}/.well-known/jwks.json")
            remote = Authenticator(IdentityConfig(issuers=(remote_cfg,)), NO_SECRETS)
            for token in (old_token, new_token):
                assert (await remote.authenticate(token)).subject == "repo:acme/api"
            await remote.aclose()
        finally:
            watcher.cancel()
            await runtime.close()


def test_flags_replace_the_spec_each_for_its_own_field(tmp_path: Path) -> None:
    from sidegate_proxy.runtime import configured_token_keys

    signing, nxt, flag_signing, flag_nxt = ec_pem(), ec_pem(), ec_pem(), ec_pem()
    secrets = DictSecretStore({"exchange": {"tls.key": signing, "next.key": nxt}})
    config = _config("orders", {"signingKeySecretRef": {"name": "exchange"}, "verificationKeys": ["next.key"]})
    (tmp_path / "signing.pem").write_bytes(flag_signing)
    (tmp_path / "next.pem").write_bytes(flag_nxt)

    def published(**flags: Any) -> list[str]:
        keys = configured_token_keys([config], secrets, **flags)
        assert keys is not None
        return kids(keys.jwks())

    assert published() == [kid_of(signing), kid_of(nxt)]
    assert published(signing_key_file=str(tmp_path / "signing.pem")) == [kid_of(flag_signing), kid_of(nxt)]
    assert published(verification_key_files=[str(tmp_path / "next.pem")]) == [kid_of(signing), kid_of(flag_nxt)]
    without_spec = _config("orders", None)
    with pytest.raises(ConfigError, match="needs a signing key"):
        configured_token_keys([without_spec], secrets, verification_key_files=[str(tmp_path / "next.pem")])
    keys = configured_token_keys([without_spec], secrets, signing_key_file=str(tmp_path / "signing.pem"))
    assert keys is not None and kids(keys.jwks()) == [kid_of(flag_signing)]
