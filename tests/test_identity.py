"""Caller authentication against a real OIDC issuer on loopback: the token attack matrix and more."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, hmac

from oidc_issuer import OIDCIssuer
from sidegate_proxy.config import ClaimMapping, ConfigError, IdentityConfig, Issuer, SecretKeyRef
from sidegate_proxy.identity import (
    MAX_TOKEN_BYTES,
    Authenticator,
    AuthError,
    WorkloadIdentity,
)
from sidegate_proxy.secrets import DictSecretStore


class FakeClock:
    def __init__(self, now: float | None = None) -> None:
        self.now = float(int(now if now is not None else time.time()))

    def __call__(self) -> float:
        return self.now


NO_SECRETS = DictSecretStore({})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture
async def issuer() -> AsyncIterator[OIDCIssuer]:
    async with OIDCIssuer() as iss:
        yield iss


@pytest.fixture
async def auth(issuer: OIDCIssuer) -> AsyncIterator[Authenticator]:
    a = Authenticator(IdentityConfig(issuers=(issuer.issuer_config(),)), NO_SECRETS)
    yield a
    await a.aclose()


def make_auth(*issuers: Issuer, **kw: object) -> Authenticator:
    return Authenticator(IdentityConfig(issuers=issuers), NO_SECRETS, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- accepted


@pytest.mark.parametrize("alg", ["RS256", "ES256", "ES384", "PS256"])
async def test_valid_tokens_accepted(alg: str) -> None:
    async with OIDCIssuer(alg=alg) as iss:
        a = make_auth(iss.issuer_config())
        caller = await a.authenticate(iss.mint(sub="bot", aud="sidegate", groups=["ci", "ops"]))
        await a.aclose()
    assert caller.subject == "bot"
    assert caller.issuer == iss.url and caller.issuer_name == "test"
    assert caller.groups == {"ci", "ops"}
    assert caller.expires_at is not None and caller.claims["sub"] == "bot"


async def test_audience_list_and_space_separated_groups(issuer: OIDCIssuer, auth: Authenticator) -> None:
    token = issuer.mint(sub="bot", aud=["other", "sidegate"], groups="a b  c")
    caller = await auth.authenticate(token)
    assert caller.groups == {"a", "b", "c"}


async def test_subject_claim_and_nested_groups_claim(issuer: OIDCIssuer) -> None:
    cfg = issuer.issuer_config(subject_claim="email", groups_claim="realm_access.roles")
    a = make_auth(cfg)
    caller = await a.authenticate(
        issuer.mint(sub="123", email="bot@acme.test", aud="sidegate", realm_access={"roles": ["admin"]})
    )
    await a.aclose()
    assert caller.subject == "bot@acme.test" and caller.groups == {"admin"}


async def test_audience_not_checked_when_none_configured(issuer: OIDCIssuer) -> None:
    a = make_auth(issuer.issuer_config(audiences=()))
    assert (await a.authenticate(issuer.mint(sub="x", aud="anything"))).subject == "x"
    assert (await a.authenticate(issuer.mint(sub="y"))).subject == "y"
    await a.aclose()


# --------------------------------------------------------------------------- the attack matrix


def forge_none(issuer: OIDCIssuer) -> str:
    header = b64(json.dumps({"alg": "none", "typ": "JWT", "kid": "k1"}).encode())
    body = b64(json.dumps({"iss": issuer.url, "sub": "admin", "aud": "sidegate",
                           "exp": int(time.time()) + 300}).encode())
    return f"{header}.{body}."


def forge_hs256_with_public_key(issuer: OIDCIssuer) -> str:
    """The alg-confusion attack: HMAC keyed with the issuer's (public) RSA key PEM."""
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    body = b64(json.dumps({"iss": issuer.url, "sub": "admin", "aud": "sidegate",
                           "exp": int(time.time()) + 300}).encode())
    mac = hmac.HMAC(issuer.current.public_pem, hashes.SHA256())
    mac.update(f"{header}.{body}".encode())
    return f"{header}.{body}.{b64(mac.finalize())}"


def tamper(token: str) -> str:
    header, body, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["sub"] = "admin"
    claims["groups"] = ["dba-oncall"]
    return f"{header}.{b64(json.dumps(claims).encode())}.{sig}"


def strip_kid_and_swap_alg(issuer: OIDCIssuer) -> str:
    """An RS256 token whose header says ES256: the key type must not fit."""
    token = issuer.mint(sub="x", aud="sidegate")
    _, body, sig = token.split(".")
    header = b64(json.dumps({"alg": "ES256", "kid": "k1"}).encode())
    return f"{header}.{body}.{sig}"


ATTACKS = {
    "alg none": (forge_none, "signature algorithm not allowed"),
    "HS256 with public key": (forge_hs256_with_public_key, "signature algorithm not allowed"),
    "wrong issuer": (lambda i: i.mint(sub="x", aud="sidegate", iss="https://evil.test"), "untrusted issuer"),
    "no issuer": (lambda i: i.mint(sub="x", aud="sidegate", iss=None), "untrusted issuer"),
    "wrong audience": (lambda i: i.mint(sub="x", aud="another-service"), "wrong audience"),
    "no audience": (lambda i: i.mint(sub="x"), "wrong audience"),
    "expired": (lambda i: i.mint(sub="x", aud="sidegate", exp_in=-120), "token expired"),
    "no exp": (lambda i: i.mint(sub="x", aud="sidegate", exp=None), "token has no expiry"),
    "string exp": (lambda i: i.mint(sub="x", aud="sidegate", exp="never"), "token has no expiry"),
    "not yet valid": (
        lambda i: i.mint(sub="x", aud="sidegate", nbf=int(time.time()) + 600), "token not yet valid"
    ),
    "issued in the future": (
        lambda i: i.mint(sub="x", aud="sidegate", now=time.time() + 600), "token not yet valid"
    ),
    "unknown kid": (lambda i: i.mint(sub="x", aud="sidegate", kid="nope"), "unknown signing key"),
    "tampered claims": (lambda i: tamper(i.mint(sub="x", aud="sidegate")), "invalid signature"),
    "alg/key mismatch": (strip_kid_and_swap_alg, "unknown signing key"),
    "missing sub": (lambda i: i.mint(aud="sidegate"), "token has no subject"),
    "empty sub": (lambda i: i.mint(sub="", aud="sidegate"), "token has no subject"),
    "groups not strings": (lambda i: i.mint(sub="x", aud="sidegate", groups=[1, 2]), "malformed token"),
    "oversized": (lambda i: i.mint(sub="x", aud="sidegate", pad="A" * MAX_TOKEN_BYTES), "token too large"),
    "garbage": (lambda i: "not-a-jwt", "malformed token"),
    "three garbage parts": (lambda i: "a.b.c", "malformed token"),
    "empty": (lambda i: "", "malformed token"),
    "json array payload": (
        lambda i: ".".join([b64(b'{"alg":"RS256"}'), b64(b"[1]"), b64(b"x")]), "malformed token"
    ),
}


@pytest.mark.parametrize("name", list(ATTACKS))
async def test_attack_refused(name: str, issuer: OIDCIssuer, auth: Authenticator) -> None:
    forge, reason = ATTACKS[name]
    token = forge(issuer)
    with pytest.raises(AuthError) as err:
        await auth.authenticate(token)
    assert err.value.reason == reason, err.value
    if len(token) > 20:  # never echo the token (or its signature) back
        assert token not in str(err.value)
        sig = token.split(".")[-1]
        assert not sig or sig not in str(err.value)


async def test_signature_by_other_issuers_key_refused(issuer: OIDCIssuer, auth: Authenticator) -> None:
    """Same kid, same iss, but signed by a key the issuer never published."""
    async with OIDCIssuer() as other:
        forged = other.mint(sub="x", aud="sidegate", iss=issuer.url, kid="k1")
    with pytest.raises(AuthError, match="invalid signature"):
        await auth.authenticate(forged)


async def test_issuer_selected_by_iss_verifies_with_that_issuers_keys_only() -> None:
    async with OIDCIssuer() as a, OIDCIssuer() as b:
        auth = make_auth(a.issuer_config("a"), b.issuer_config("b"))
        assert (await auth.authenticate(b.mint(sub="x", aud="sidegate"))).issuer_name == "b"
        # b's key (same kid "k1") does not verify a token claiming to come from a
        with pytest.raises(AuthError, match="invalid signature"):
            await auth.authenticate(b.mint(sub="x", aud="sidegate", iss=a.url))
        await auth.aclose()


async def test_algorithm_allow_list_per_issuer() -> None:
    async with OIDCIssuer(alg="ES256") as iss:
        auth = make_auth(iss.issuer_config(algorithms=("RS256",)))
        with pytest.raises(AuthError, match="signature algorithm not allowed"):
            await auth.authenticate(iss.mint(sub="x", aud="sidegate"))
        await auth.aclose()


def test_hmac_only_issuer_config_refused() -> None:
    with pytest.raises(ConfigError, match="asymmetric"):
        make_auth(Issuer(name="x", issuer="https://x.example", algorithms=("HS256",)))


def test_duplicate_issuer_refused() -> None:
    i = Issuer(name="x", issuer="https://x.example")
    with pytest.raises(ConfigError, match="twice"):
        make_auth(i, Issuer(name="y", issuer="https://x.example"))


def test_plain_http_issuer_refused_unless_loopback() -> None:
    with pytest.raises(ConfigError, match="https"):
        make_auth(Issuer(name="x", issuer="http://idp.example.com"))
    make_auth(Issuer(name="x", issuer="http://idp.example.com"), allow_insecure=True)


async def test_issuer_down_fails_closed() -> None:
    iss = OIDCIssuer()
    await iss.start()
    token = iss.mint(sub="x", aud="sidegate")
    auth = make_auth(iss.issuer_config())
    await iss.stop()
    with pytest.raises(AuthError) as err:
        await auth.authenticate(token)
    assert err.value.reason == "issuer keys unavailable"
    await auth.aclose()


# --------------------------------------------------------------------------- keys: rotation, refresh


async def test_key_rotation_followed(issuer: OIDCIssuer, auth: Authenticator) -> None:
    await auth.authenticate(issuer.mint(sub="x", aud="sidegate"))
    fetches = issuer.jwks_fetches
    issuer.rotate(drop_old=True)
    caller = await auth.authenticate(issuer.mint(sub="y", aud="sidegate"))
    assert caller.subject == "y"
    assert issuer.jwks_fetches == fetches + 1


async def test_unknown_kid_refresh_is_rate_limited(issuer: OIDCIssuer) -> None:
    clock = FakeClock()
    auth = make_auth(issuer.issuer_config(), clock=clock)
    await auth.authenticate(issuer.mint(sub="x", aud="sidegate", now=clock.now))
    assert issuer.jwks_fetches == 1
    for i in range(20):
        with pytest.raises(AuthError, match="unknown signing key"):
            await auth.authenticate(issuer.mint(sub=f"x{i}", aud="sidegate", kid=f"bogus{i}", now=clock.now))
    assert issuer.jwks_fetches == 2  # the first miss refreshes, the next 19 within 30 s do not
    clock.now += 31
    with pytest.raises(AuthError, match="unknown signing key"):
        await auth.authenticate(issuer.mint(sub="x", aud="sidegate", kid="bogus", now=clock.now))
    with pytest.raises(AuthError, match="unknown signing key"):
        await auth.authenticate(issuer.mint(sub="x", aud="sidegate", kid="bogus2", now=clock.now))
    assert issuer.jwks_fetches == 3
    await auth.aclose()


async def test_discovery_used_and_cached(issuer: OIDCIssuer, auth: Authenticator) -> None:
    for i in range(5):
        await auth.authenticate(issuer.mint(sub=f"x{i}", aud="sidegate"))
    assert issuer.discovery_fetches == 1 and issuer.jwks_fetches == 1


async def test_explicit_jwks_uri_skips_discovery(issuer: OIDCIssuer) -> None:
    auth = make_auth(issuer.issuer_config(jwks_uri=issuer.jwks_uri))
    await auth.authenticate(issuer.mint(sub="x", aud="sidegate"))
    assert issuer.discovery_fetches == 0 and issuer.jwks_fetches == 1
    await auth.aclose()


async def test_discovery_naming_another_issuer_refused(issuer: OIDCIssuer, auth: Authenticator) -> None:
    issuer.issuer_override = "https://evil.example"
    with pytest.raises(AuthError, match="issuer keys unavailable"):
        await auth.authenticate(issuer.mint(sub="x", aud="sidegate"))


async def test_static_jwks_from_secret() -> None:
    async with OIDCIssuer(alg="ES256") as iss:
        store = DictSecretStore({"cluster-jwks": {"jwks.json": iss.jwks_bytes()}})
        cfg = Issuer(name="air-gapped", issuer="https://kubernetes.default.svc.cluster.local",
                     audiences=("sidegate",), jwks_secret_ref=SecretKeyRef("cluster-jwks", "jwks.json"))
        auth = Authenticator(IdentityConfig(issuers=(cfg,)), store)
        token = iss.mint(sub="system:serviceaccount:payments:reporter", aud="sidegate", iss=cfg.issuer)
        assert (await auth.authenticate(token)).subject == "system:serviceaccount:payments:reporter"
        assert iss.jwks_fetches == 0 and iss.discovery_fetches == 0  # no network at all
        await auth.aclose()


async def test_static_jwks_missing_secret_fails_closed() -> None:
    async with OIDCIssuer() as iss:
        cfg = Issuer(name="x", issuer=iss.url, audiences=("sidegate",),
                     jwks_secret_ref=SecretKeyRef("absent", "jwks.json"))
        auth = Authenticator(IdentityConfig(issuers=(cfg,)), NO_SECRETS)
        with pytest.raises(AuthError) as err:
            await auth.authenticate(iss.mint(sub="x", aud="sidegate"))
        assert err.value.reason == "issuer keys unavailable" and "absent" in err.value.detail
        await auth.aclose()


# --------------------------------------------------------------------------- verified-token cache


async def test_cache_hit_does_not_reverify(issuer: OIDCIssuer) -> None:
    clock = FakeClock()
    auth = make_auth(issuer.issuer_config(), clock=clock)
    token = issuer.mint(sub="x", aud="sidegate", now=clock.now, exp_in=600)
    first = await auth.authenticate(token)
    for _ in range(100):
        assert await auth.authenticate(token) is first
    assert auth.verifications == 1

    # measured, printed, never asserted: a miss pays the RS256 verify, a hit a hash and a dict lookup
    fresh = [issuer.mint(sub=f"u{i}", aud="sidegate", now=clock.now) for i in range(200)]
    t0 = time.perf_counter()
    for t in fresh:
        await auth.authenticate(t)
    miss = (time.perf_counter() - t0) / len(fresh)
    t0 = time.perf_counter()
    for _ in range(5000):
        await auth.authenticate(token)
    hit = (time.perf_counter() - t0) / 5000
    print(f"\n[identity] RS256 verify (cache miss): {miss * 1e6:.0f} us, cache hit: {hit * 1e6:.1f} us")
    await auth.aclose()


async def test_cached_token_expiry_honoured(issuer: OIDCIssuer) -> None:
    clock = FakeClock()
    auth = make_auth(issuer.issuer_config(), clock=clock, leeway=30)
    token = issuer.mint(sub="x", aud="sidegate", now=clock.now, exp_in=120)
    await auth.authenticate(token)
    clock.now += 100
    await auth.authenticate(token)
    assert auth.verifications == 1
    clock.now += 51  # past exp + leeway
    with pytest.raises(AuthError, match="token expired"):
        await auth.authenticate(token)


async def test_cache_is_bounded(issuer: OIDCIssuer) -> None:
    auth = make_auth(issuer.issuer_config(), cache_size=3)
    tokens = [issuer.mint(sub=f"x{i}", aud="sidegate") for i in range(5)]
    for t in tokens:
        await auth.authenticate(t)
    await auth.authenticate(tokens[0])  # evicted: verified again
    assert auth.verifications == 6
    await auth.authenticate(tokens[4])  # still cached
    assert auth.verifications == 6
    await auth.aclose()


# --------------------------------------------------------------------------- claim mappings


async def test_github_actions_claims(issuer: OIDCIssuer) -> None:
    cfg = issuer.issuer_config(
        "github",
        audiences=("sidegate",),
        groups_claim=None,
        claim_mappings=(
            ClaimMapping("repository", "repo:"),
            ClaimMapping("repository_owner", "org:"),
            ClaimMapping("environment", "env:"),
            ClaimMapping("repository_id", "repo-id:"),
        ),
    )
    auth = make_auth(cfg)
    caller = await auth.authenticate(
        issuer.mint(
            sub="repo:acme/api:ref:refs/heads/main",
            aud="sidegate",
            repository="acme/api",
            repository_owner="acme",
            repository_id=123456,
            ref="refs/heads/main",
            job_workflow_ref="acme/api/.github/workflows/deploy.yml@refs/heads/main",
        )
    )
    assert caller.subject == "repo:acme/api:ref:refs/heads/main"
    assert caller.groups == {"repo:acme/api", "org:acme", "repo-id:123456"}
    await auth.aclose()


async def test_kubernetes_service_account_groups(issuer: OIDCIssuer, auth: Authenticator) -> None:
    token = issuer.mint(
        sub="system:serviceaccount:payments:reporter",
        aud="sidegate",
        **{"kubernetes.io": {"namespace": "payments", "serviceaccount": {"name": "reporter", "uid": "u1"},
                             "pod": {"name": "reporter-1", "uid": "u2"}}},
    )
    caller = await auth.authenticate(token)
    assert caller.subject == "system:serviceaccount:payments:reporter"
    assert caller.groups == {"system:serviceaccounts", "system:serviceaccounts:payments"}


async def test_kubernetes_namespace_mismatch_refused(issuer: OIDCIssuer, auth: Authenticator) -> None:
    token = issuer.mint(sub="system:serviceaccount:payments:reporter", aud="sidegate",
                        **{"kubernetes.io": {"namespace": "kube-system"}})
    with pytest.raises(AuthError, match="malformed token"):
        await auth.authenticate(token)


async def test_no_kubernetes_groups_without_kubernetes_claim(issuer: OIDCIssuer, auth: Authenticator) -> None:
    caller = await auth.authenticate(issuer.mint(sub="system:serviceaccount:payments:x", aud="sidegate"))
    assert caller.groups == frozenset()


# --------------------------------------------------------------------------- workload identity


async def test_workload_identity_verified_and_rotated(
    issuer: OIDCIssuer, auth: Authenticator, tmp_path: Path
) -> None:
    path = tmp_path / "token"
    sa = {"kubernetes.io": {"namespace": "payments"}}
    path.write_text(issuer.mint(sub="system:serviceaccount:payments:app", aud="sidegate", **sa))
    clock = FakeClock()
    wl = WorkloadIdentity(auth, path=path, clock=clock)
    caller = await wl.caller()
    assert caller.subject == "system:serviceaccount:payments:app"
    assert "system:serviceaccounts:payments" in caller.groups
    path.write_text(issuer.mint(sub="system:serviceaccount:payments:app2", aud="sidegate", **sa) + "\n")
    assert (await wl.caller()).subject == "system:serviceaccount:payments:app"  # not re-checked yet
    clock.now += 2
    assert (await wl.caller()).subject == "system:serviceaccount:payments:app2"


async def test_workload_identity_refuses_forged_file_when_issuers_configured(
    issuer: OIDCIssuer, auth: Authenticator, tmp_path: Path
) -> None:
    path = tmp_path / "token"
    claims = {"sub": "system:serviceaccount:kube-system:admin", "iss": issuer.url, "aud": "sidegate",
              "exp": int(time.time()) + 60}
    path.write_text(jwt.encode(claims, "k" * 32, algorithm="HS256"))
    with pytest.raises(AuthError):
        await WorkloadIdentity(auth, path=path).caller()


async def test_workload_identity_without_issuers_trusts_the_mounted_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    clock = FakeClock()
    path.write_text(jwt.encode({"sub": "system:serviceaccount:payments:app", "iss": "https://k8s",
                                "exp": int(clock.now) + 60, "kubernetes.io": {"namespace": "payments"}},
                               "unverified-secret-key-of-32-bytes!", algorithm="HS256"))
    # an extra issuer (token exchange) does not make the pod's own token need verification
    extra = Issuer(name="sidegate-exchange", issuer="https://sidegate.test", audiences=("sidegate:a/b",))
    wl = WorkloadIdentity(make_auth(extra_issuers=(extra,)), path=path, clock=clock)
    caller = await wl.caller()
    assert caller.subject == "system:serviceaccount:payments:app" and caller.issuer_name == "workload"
    assert "system:serviceaccounts:payments" in caller.groups
    clock.now += 61
    with pytest.raises(AuthError, match="workload token expired"):
        await wl.caller()


async def test_workload_identity_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AuthError, match="workload token unavailable"):
        await WorkloadIdentity(path=tmp_path / "absent").caller()


def test_threaded_issuer_for_sync_code() -> None:
    import asyncio

    from oidc_issuer import ThreadedOIDCIssuer

    with ThreadedOIDCIssuer(alg="ES256") as iss:

        async def check() -> str:
            auth = make_auth(iss.issuer_config())
            try:
                return (await auth.authenticate(iss.mint(sub="threaded", aud="sidegate"))).subject
            finally:
                await auth.aclose()

        assert asyncio.run(check()) == "threaded"
        assert iss.jwks_fetches == 1
