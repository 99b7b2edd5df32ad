"""Token exchange: issue, verify as just another issuer, and the RFC 8693 endpoint on loopback."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
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
from sidegate_proxy.secrets import DictSecretStore
from sidegate_proxy.tokenexchange import (
    GRANT_TYPE,
    ISSUER_NAME,
    TOKEN_TYPE_JWT,
    TokenIssuer,
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


CALLER = Caller(subject="system:serviceaccount:ci:deployer", issuer="https://k8s", groups=frozenset({"ci"}),
                expires_at=time.time() + 3600)


def proxy_auth(ti: TokenIssuer, connection: str, **kw: Any) -> Authenticator:
    """What a proxy for ``connection`` runs: exchanged tokens accepted as just another issuer."""
    return Authenticator(IdentityConfig(), NO_SECRETS, extra_issuers=(ti.as_issuer(connection),),
                         key_sources={ISSUER_NAME: ti.key_source()}, **kw)


@pytest.mark.parametrize("keygen,alg", [(ec_pem, "ES256"),
                                        (lambda: pem(rsa.generate_private_key(65537, 2048)), "RS256")])
async def test_exchanged_token_accepted_for_its_connection_only(keygen: Any, alg: str) -> None:
    ti = TokenIssuer(keygen(), SIDEGATE, "sg1")
    assert ti.algorithm == alg
    token, expires_in = ti.issue(CALLER, "payments/orders-db", 300)
    assert expires_in == 300
    header = jwt.get_unverified_header(token)
    assert header["kid"] == "sg1" and header["alg"] == alg

    caller = await proxy_auth(ti, "payments/orders-db").authenticate(token)
    assert caller.subject == CALLER.subject and caller.groups == {"ci"}
    assert caller.issuer == SIDEGATE and caller.issuer_name == ISSUER_NAME
    assert caller.claims["sidegate.orig_iss"] == "https://k8s" and caller.claims["jti"]

    for other in ("payments/billing-api", "other/orders-db"):
        with pytest.raises(AuthError, match="wrong audience"):
            await proxy_auth(ti, other).authenticate(token)


async def test_exchanged_token_expires() -> None:
    clock = FakeClock()
    ti = TokenIssuer(ec_pem(), SIDEGATE, "sg1", clock=clock)
    token, _ = ti.issue(CALLER, "payments/orders-db", 60)
    auth = proxy_auth(ti, "payments/orders-db", clock=clock, leeway=0)
    await auth.authenticate(token)
    clock.now += 61
    with pytest.raises(AuthError, match="token expired"):
        await auth.authenticate(token)


def test_ttl_capped_at_15_minutes_and_by_subject_token() -> None:
    ti = TokenIssuer(ec_pem(), SIDEGATE, "sg1")
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
        TokenIssuer(b"not a key", SIDEGATE, "sg1")
    with pytest.raises(ConfigError, match="2048"):
        TokenIssuer(pem(rsa.generate_private_key(65537, 1024)), SIDEGATE, "sg1")
    with pytest.raises(ConfigError):
        TokenIssuer(pem(ec.generate_private_key(ec.SECP256K1())), SIDEGATE, "sg1")


def test_jwks_has_only_public_material() -> None:
    ti = TokenIssuer(ec_pem(), SIDEGATE, "sg1")
    (key,) = ti.jwks()["keys"]
    assert key["kid"] == "sg1" and key["alg"] == "ES256" and "d" not in key


# --------------------------------------------------------------------------- POST /v1/token


@pytest.fixture
async def setup() -> AsyncIterator[tuple[OIDCIssuer, TokenIssuer, str, aiohttp.ClientSession]]:
    async with OIDCIssuer() as idp:
        ti = TokenIssuer(ec_pem(), SIDEGATE, "sg1")
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


def _config(name: str, exchange: dict[str, Any] | None) -> Any:
    from sidegate_proxy.config import build_config

    spec: dict[str, Any] = {"type": "postgres", "target": {"host": "db", "port": 5432, "database": "d"},
                            "credentials": {"secretRef": {"name": "admin"}}}
    if exchange is not None:
        spec["tokenExchange"] = exchange
    return build_config({"apiVersion": "sidegate.dev/v1alpha1", "kind": "Connection",
                         "metadata": {"name": name, "namespace": "payments"}, "spec": spec}, [])


async def test_only_connections_with_token_exchange_issue_and_trust_exchanged_tokens(tmp_path: Any) -> None:
    from sidegate_proxy.runtime import ProxyGroup, RuntimeOptions, configured_signing_key

    key = ec_pem()
    secrets = DictSecretStore({"admin": {"username": b"u", "password": b"p"}, "exchange": {"tls.key": key}})
    exchange = {"signingKeySecretRef": {"name": "exchange"}, "issuer": "https://sidegate.example.com"}
    configs = [_config("orders", exchange), _config("billing", None)]
    assert configured_signing_key(configs, secrets) == key  # what --manifests uses without the flag
    assert configured_signing_key([configs[1]], secrets) is None
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
        configured_signing_key([configs[0], _config("ledger", {"signingKeySecretRef": {"name": "other"}})],
                               secrets)
