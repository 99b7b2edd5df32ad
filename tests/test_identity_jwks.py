"""Key sources: caching, coalesced and rate-limited refresh, limits, TLS, static JWKS."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from loopback import serve
from oidc_issuer import OIDCIssuer, loopback_tls
from sidegate_proxy.jwks import (
    DiscoveryJWKS,
    Fetcher,
    JWKSError,
    RemoteJWKS,
    StaticJWKS,
    check_url,
    max_age,
    parse_jwks,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_max_age_is_clamped() -> None:
    assert max_age(None) == 300
    assert max_age("public, max-age=5") == 60
    assert max_age("max-age=600, must-revalidate") == 600
    assert max_age("max-age=86400") == 3600
    assert max_age("no-store") == 60


@pytest.mark.parametrize(
    "url,ok",
    [
        ("https://idp.example.com/jwks", True),
        ("http://127.0.0.1:8080/jwks", True),
        ("http://[::1]:8080/jwks", True),
        ("http://localhost/jwks", True),
        ("http://idp.example.com/jwks", False),
        ("http://10.0.0.1/jwks", False),
        ("file:///etc/passwd", False),
        ("ftp://idp.example.com/jwks", False),
        ("https:///nohost", False),
    ],
)
def test_url_policy(url: str, ok: bool) -> None:
    if ok:
        assert check_url(url) == url
    else:
        with pytest.raises(JWKSError):
            check_url(url)


def test_insecure_opt_in() -> None:
    assert check_url("http://idp.example.com/jwks", allow_insecure=True)


async def test_parse_skips_symmetric_and_encryption_keys() -> None:
    async with OIDCIssuer(alg="ES256") as iss:
        good = iss.jwks()["keys"][0]
    doc = {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
                    {**good, "kid": "enc", "use": "enc"},
                    {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
                    {**good, "kid": "hs", "alg": "HS256"},
                    good]}
    keys = parse_jwks(json.dumps(doc).encode())
    assert set(keys.by_kid) == {"k1"}
    with pytest.raises(JWKSError, match="no usable"):
        parse_jwks(json.dumps({"keys": doc["keys"][:2]}))
    with pytest.raises(JWKSError, match="'keys' list"):
        parse_jwks(b'{"keys": {}}')
    with pytest.raises(JWKSError, match="not JSON"):
        parse_jwks(b"<html>")


async def test_static_jwks_token_without_kid_needs_a_single_key() -> None:
    async with OIDCIssuer() as iss:
        anon = {**iss.jwks()["keys"][0]}
        del anon["kid"]
        src = StaticJWKS(json.dumps({"keys": [anon]}).encode())
        assert await src.key(None, "RS256") is not None
        assert await src.key(None, "ES256") is None  # an RSA key never verifies ES256
        iss.rotate()
        two = StaticJWKS(iss.jwks_bytes())
        assert await two.key(None, "RS256") is None  # ambiguous: refuse rather than guess


def test_static_jwks_bad_document_fails_at_construction() -> None:
    with pytest.raises(JWKSError):
        StaticJWKS(b"{}")


async def test_static_jwks_from_secret_follows_rotation() -> None:
    async with OIDCIssuer() as iss:
        holder = {"data": iss.jwks_bytes()}
        clock = FakeClock()
        src = StaticJWKS(loader=lambda: holder["data"], clock=clock)
        assert await src.key("k1", "RS256") is not None
        iss.rotate(drop_old=True)
        holder["data"] = iss.jwks_bytes()
        assert await src.key("k2", "RS256") is not None  # unknown kid: the Secret is re-read


async def test_remote_cache_follows_max_age_and_keeps_stale_keys_on_failure() -> None:
    clock = FakeClock()
    async with OIDCIssuer(max_age=120) as iss:
        src = RemoteJWKS(iss.jwks_uri, clock=clock)
        for _ in range(3):
            assert await src.key("k1", "RS256") is not None
        assert iss.jwks_fetches == 1
        clock.now += 121
        assert await src.key("k1", "RS256") is not None
        assert iss.jwks_fetches == 2
        await iss.stop()
        clock.now += 121
        assert await src.key("k1", "RS256") is not None  # issuer down: stale keys still verify
        assert src.fetches == 3
        await src.aclose()


async def test_concurrent_refreshes_are_coalesced() -> None:
    release = asyncio.Event()
    fetches = 0

    async with OIDCIssuer() as iss:

        async def slow_jwks(_: web.Request) -> web.Response:
            nonlocal fetches
            fetches += 1
            await release.wait()
            return web.json_response(iss.jwks())

        app = web.Application()
        app.router.add_get("/jwks", slow_jwks)
        runner, url = await serve(app)
        src = RemoteJWKS(f"{url}/jwks")
        waiters = [asyncio.create_task(src.key("k1", "RS256")) for _ in range(50)]
        await asyncio.sleep(0.05)
        release.set()
        keys = await asyncio.gather(*waiters)
        assert all(k is not None for k in keys)
        assert fetches == 1
        await src.aclose()
        await runner.cleanup()


async def test_oversized_and_non_200_documents_refused() -> None:
    async def huge(_: web.Request) -> web.StreamResponse:
        return web.Response(body=b'{"keys": [' + b" " * 300_000 + b"]}", content_type="application/json")

    async def missing(_: web.Request) -> web.Response:
        return web.Response(status=404)

    async def redirect(_: web.Request) -> web.Response:
        raise web.HTTPFound("http://127.0.0.1:1/jwks")

    app = web.Application()
    app.router.add_get("/huge", huge)
    app.router.add_get("/missing", missing)
    app.router.add_get("/redirect", redirect)
    runner, url = await serve(app)
    fetcher = Fetcher()
    for path, message in (("huge", "larger than"), ("missing", "HTTP 404"), ("redirect", "HTTP 302")):
        src = RemoteJWKS(f"{url}/{path}", fetcher=fetcher)
        with pytest.raises(JWKSError, match=message):
            await src.key("k1", "RS256")
    await fetcher.aclose()
    await runner.cleanup()


async def test_tls_verified_with_custom_ca(tmp_path) -> None:
    server_ctx, client_ctx, _ = loopback_tls(str(tmp_path))
    async with OIDCIssuer(ssl_context=server_ctx) as iss:
        assert iss.url.startswith("https://")
        untrusting = DiscoveryJWKS(iss.url)
        with pytest.raises(JWKSError, match="no keys loaded"):
            await untrusting.key("k1", "RS256")  # the system trust store does not know the test CA
        await untrusting.aclose()
        trusting = DiscoveryJWKS(iss.url, fetcher=Fetcher(ssl_context=client_ctx))
        assert await trusting.key("k1", "RS256") is not None
        await trusting.fetcher.aclose()


async def test_discovery_refuses_insecure_jwks_uri() -> None:
    async def discovery(_: web.Request) -> web.Response:
        return web.json_response({"issuer": issuer_url, "jwks_uri": "http://idp.example.com/jwks"})

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", discovery)
    runner, issuer_url = await serve(app)
    src = DiscoveryJWKS(issuer_url)
    with pytest.raises(JWKSError, match="must be https"):
        await src.key("k1", "RS256")
    await src.aclose()
    await runner.cleanup()
