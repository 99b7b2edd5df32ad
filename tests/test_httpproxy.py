"""The HTTP data plane end to end: a real OIDC issuer, real aiohttp targets (plain, TLS with a
private CA, WebSocket), the proxy on loopback, and what each side actually saw on the wire."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import os
import re
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import brotli
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from multidict import CIMultiDict
from yarl import URL

from audit_sinks import MemorySink
from oidc_issuer import OIDCIssuer, loopback_tls
from sidegate_proxy.admin import admin_app
from sidegate_proxy.audit import AuditLog
from sidegate_proxy.config import build_config
from sidegate_proxy.guardrails import Guard
from sidegate_proxy.httpproxy import (
    BodyTooLarge,
    HTTPProxy,
    HTTPSettings,
    decode_body,
    forward_headers,
    is_maskable,
    request_id,
)
from sidegate_proxy.identity import Authenticator
from sidegate_proxy.masking import MaskingEngine
from sidegate_proxy.metrics import Metrics
from sidegate_proxy.runtime import ProxyRuntime, RuntimeOptions
from sidegate_proxy.secrets import DictSecretStore
from sidegate_proxy.tokenexchange import GRANT_TYPE, TOKEN_TYPE_JWT

NS = "payments"
UPSTREAM_TOKEN = "upstream-secret-token-7f3a"
CARD = "4111 1111 1111 1111"
EMAIL = "alice@example.com"
PROBLEM = "application/problem+json"
MB = 1024 * 1024

# --------------------------------------------------------------------------- the target


@dataclass
class Seen:
    method: str
    path: str
    headers: CIMultiDict[str]
    size: int
    body: bytes | None
    sha256: str


Responder = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Upstream:
    """A target that records every request (bodies streamed and hashed, kept only when small) and
    answers from ``responders[path]`` or with a JSON echo."""

    def __init__(self, ssl_context: Any = None) -> None:
        self.ssl_context = ssl_context
        self.seen: list[Seen] = []
        self.responders: dict[str, Responder] = {}
        self.ws_seen: list[CIMultiDict[str]] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        self.ws_seen.append(CIMultiDict(request.headers))
        ws = web.WebSocketResponse(protocols=("chat.v1",))
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                if msg.data == "pii":
                    await ws.send_str(json.dumps({"user": {"email": EMAIL}, "note": f"card {CARD}"}))
                else:
                    await ws.send_str("echo:" + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws

    async def _any(self, request: web.Request) -> web.StreamResponse:
        size, digest, kept = 0, hashlib.sha256(), bytearray()
        async for chunk in request.content.iter_chunked(64 * 1024):
            size += len(chunk)
            digest.update(chunk)
            if len(kept) < MB:
                kept += chunk
        self.seen.append(
            Seen(
                request.method,
                request.rel_url.raw_path_qs,
                CIMultiDict(request.headers),
                size,
                bytes(kept) if size <= MB else None,
                digest.hexdigest(),
            )
        )
        responder = self.responders.get(request.path)
        if responder is not None:
            return await responder(request)
        return web.json_response(
            {"method": request.method, "path": request.rel_url.raw_path_qs, "size": size}
        )

    async def start(self) -> Upstream:
        app = web.Application(client_max_size=0)
        app.router.add_get("/ws", self._ws)
        app.router.add_route("*", "/{tail:.*}", self._any)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def json_doc(doc: Any, **headers: str) -> Responder:
    async def respond(_: web.Request) -> web.StreamResponse:
        return web.json_response(doc, headers=headers)

    return respond


def raw(body: bytes, content_type: str, **headers: str) -> Responder:
    async def respond(_: web.Request) -> web.StreamResponse:
        return web.Response(body=body, headers={"Content-Type": content_type, **headers})

    return respond


# --------------------------------------------------------------------------- the gateway


def connection(url: str, issuer: OIDCIssuer, name: str = "billing-api", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "http",
        "target": {"url": url},
        "credentials": {"secretRef": {"name": "billing-token"}, "inject": "bearer"},
        "mode": "gateway",
        "identity": {
            "issuers": [
                {"name": "ci", "issuer": issuer.url, "audiences": ["sidegate"], "groupsClaim": "groups"}
            ]
        },
        "access": [{"subjects": ["repo:acme/*"], "groups": ["auditors"]}],
        "guardrails": [
            {
                "name": "read-only-admin",
                "http": {"methods": ["POST", "PUT", "PATCH", "DELETE"], "paths": ["/admin/*"]},
                "action": "block",
            },
            {
                "name": "no-big-refunds",
                "action": "block",
                "http": {
                    "methods": ["POST"],
                    "paths": ["/v1/refunds"],
                    "body": [{"path": "$.amount", "values": [1000000]}],
                },
            },
            {
                "name": "delete-needs-approval",
                "action": "requireApproval",
                "http": {"methods": ["DELETE"], "paths": ["/v1/customers/*"]},
            },
        ],
    }
    base.update(spec)
    return {
        "apiVersion": "sidegate.dev/v1alpha1",
        "kind": "Connection",
        "metadata": {"name": name, "namespace": NS},
        "spec": base,
    }


PII_POLICY = {
    "apiVersion": "sidegate.dev/v1alpha1",
    "kind": "MaskingPolicy",
    "metadata": {"name": "pii", "namespace": NS},
    "spec": {
        "connections": ["billing-api"],
        "rules": [
            {"name": "emails", "fields": ["$..email"], "strategy": "redact"},
            {"name": "names", "fields": ["$.customer.name", "$.items[*].owner"], "strategy": "redact"},
            {"name": "cards", "detectors": ["credit-card"], "strategy": "partial", "keepLast": 4},
            {"name": "internal-ids", "pattern": "ACME-[0-9]{8}", "strategy": "hash"},
        ],
        "exempt": {"groups": ["auditors"]},
    },
}

SECRETS = {
    "billing-token": {"token": UPSTREAM_TOKEN.encode(), "username": b"svc-billing", "password": b"s3cr3t:pw"}
}


@dataclass
class Gateway:
    url: str
    proxy: HTTPProxy
    metrics: Metrics
    sink: MemorySink
    audit: AuditLog
    issuer: OIDCIssuer
    client: aiohttp.ClientSession
    tokens: dict[str, str] = field(default_factory=dict)

    def token(
        self, sub: str = "repo:acme/api:ref:refs/heads/main", groups: tuple[str, ...] = ("ci",), **claims: Any
    ) -> str:
        return self.issuer.mint(sub=sub, aud="sidegate", groups=list(groups), **claims)

    def auth(self, token: str | None = None, **kw: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token(**kw)}"}

    async def events(self, n: int) -> list[dict[str, Any]]:
        """The first ``n`` audit events once shipped (a bounded wait, not a timing assertion)."""
        await self.audit.flush()
        for _ in range(3000):
            if len(self.sink.events) >= n:
                break
            await asyncio.sleep(0.01)
        return self.sink.events


@contextlib.asynccontextmanager
async def gateway(
    upstream: Upstream,
    issuer: OIDCIssuer,
    tmp_path: Path,
    *,
    masking: tuple[dict[str, Any], ...] = (PII_POLICY,),
    secrets: dict[str, dict[str, bytes]] | None = None,
    settings: HTTPSettings | None = None,
    url: str | None = None,
    **spec: Any,
) -> AsyncIterator[Gateway]:
    cfg = build_config(connection(url or upstream.url, issuer, **spec), list(masking))
    store = DictSecretStore(SECRETS if secrets is None else secrets)
    auth = Authenticator(cfg.connection.identity, store)
    sink = MemorySink()
    spool = tmp_path / f"spool-{os.urandom(4).hex()}"
    audit = AuditLog(spool, [sink], b"chain-key", "test", fsync=False, flush_interval=0.0)
    await audit.start()
    metrics = Metrics()
    proxy = HTTPProxy(
        cfg,
        store,
        authenticator=auth,
        guard=Guard(cfg.connection),
        masking=MaskingEngine(cfg.masking, b"m" * 32),
        audit=audit,
        metrics=metrics,
        settings=settings,
    )
    runner = web.AppRunner(proxy.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    client = aiohttp.ClientSession()
    try:
        yield Gateway(f"http://127.0.0.1:{port}", proxy, metrics, sink, audit, issuer, client)
    finally:
        await client.close()
        await runner.cleanup()
        await auth.aclose()
        await audit.close()


@pytest.fixture
async def issuer() -> AsyncIterator[OIDCIssuer]:
    async with OIDCIssuer() as iss:
        yield iss


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = await Upstream().start()
    yield up
    await up.stop()


@pytest.fixture
async def gw(upstream: Upstream, issuer: OIDCIssuer, tmp_path: Path) -> AsyncIterator[Gateway]:
    async with gateway(upstream, issuer, tmp_path) as g:
        yield g


async def problem_of(resp: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == PROBLEM
    body: dict[str, Any] = json.loads(await resp.read())
    assert body["status"] == status and body["type"].startswith("https://sidegate.dev/problems/")
    return body


async def refused(g: Gateway, path: str, status: int) -> dict[str, Any]:
    async with g.client.get(g.url + path, headers=g.auth()) as r:
        return await problem_of(r, status)


# --------------------------------------------------------------------------- identity and headers


async def test_bearer_injected_caller_token_and_hop_headers_never_forwarded(
    gw: Gateway, upstream: Upstream
) -> None:
    token = gw.token()
    headers = {
        "Authorization": f"Bearer {token}",
        "Connection": "keep-alive, X-Private-Hop",
        "X-Private-Hop": "secret",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        "X-Sidegate-Reason": "ticket-42",
        "X-Request-Id": "r-1",
    }
    async with gw.client.get(URL(gw.url + "/v1/items/a%2Fb?q=1&x=%20y", encoded=True), headers=headers) as r:
        assert r.status == 200, await r.text()
        assert await r.json() == {"method": "GET", "path": "/v1/items/a%2Fb?q=1&x=%20y", "size": 0}
    seen = upstream.seen[-1]
    assert seen.path == "/v1/items/a%2Fb?q=1&x=%20y"  # exactly what the guardrails judged
    assert seen.headers.getall("Authorization") == [f"Bearer {UPSTREAM_TOKEN}"]
    for hop in ("X-Private-Hop", "Keep-Alive", "TE", "Proxy-Authorization", "X-Sidegate-Reason"):
        assert hop not in seen.headers, hop
    assert token not in json.dumps(list(seen.headers.items()))
    assert seen.headers["X-Request-Id"] == "r-1"
    assert seen.headers["X-Forwarded-For"] == "127.0.0.1"
    assert seen.headers["Host"] == f"127.0.0.1:{upstream.port}"

    [event] = await gw.events(1)
    assert event["unmapped"]["decision"] == "allow"
    assert event["actor"]["user"]["name"] == "repo:acme/api:ref:refs/heads/main"
    assert event["http_request"]["url"] == {"path": "/v1/items/a%2Fb", "query_string": "q=***&x=***"}
    assert event["http_response"] == {"code": 200} and event["message"] == "ticket-42"


async def test_response_hop_headers_stripped(gw: Gateway, upstream: Upstream) -> None:
    async def hop(_: web.Request) -> web.StreamResponse:
        return web.Response(
            body=b"\x00\x01",
            headers={
                "Content-Type": "application/octet-stream",
                "X-Up-Hop": "1",
                "Connection": "X-Up-Hop",
                "X-Kept": "yes",
            },
        )

    upstream.responders["/hop"] = hop
    async with gw.client.get(gw.url + "/hop", headers=gw.auth()) as r:
        assert r.status == 200 and await r.read() == b"\x00\x01"
        assert "X-Up-Hop" not in r.headers and r.headers["X-Kept"] == "yes"


@pytest.mark.parametrize(
    "inject,extra,header,expected",
    [
        ("basic", {}, "Authorization", "Basic c3ZjLWJpbGxpbmc6czNjcjN0OnB3"),
        ("header", {"header": "X-Api-Key"}, "X-Api-Key", UPSTREAM_TOKEN),
    ],
)
async def test_basic_and_header_injection(
    upstream: Upstream,
    issuer: OIDCIssuer,
    tmp_path: Path,
    inject: str,
    extra: dict[str, str],
    header: str,
    expected: str,
) -> None:
    creds = {"secretRef": {"name": "billing-token"}, "inject": inject, **extra}
    async with gateway(upstream, issuer, tmp_path, credentials=creds) as g:
        token = g.token()
        headers = {"Authorization": f"Bearer {token}", "X-Api-Key": "caller-supplied"}
        async with g.client.get(g.url + "/v1/x", headers=headers) as r:
            assert r.status == 200
    seen = upstream.seen[-1]
    assert seen.headers.getall(header) == [expected]
    if inject == "header":
        assert "Authorization" not in seen.headers  # the caller's token goes nowhere
    assert token not in json.dumps(list(seen.headers.items()))


async def test_refused_callers_never_reach_the_target(
    gw: Gateway, upstream: Upstream, issuer: OIDCIssuer
) -> None:
    async with OIDCIssuer() as stranger:
        cases = {
            "missing": {},
            "not bearer": {"Authorization": "Basic Zm9vOmJhcg=="},
            "garbage": {"Authorization": "Bearer not.a.jwt"},
            "expired": gw.auth(gw.token(exp=1_000_000)),
            "wrong audience": gw.auth(issuer.mint(sub="repo:acme/api", aud="other-service")),
            "other issuer": gw.auth(stranger.mint(sub="repo:acme/api", aud="sidegate")),
        }
        for name, headers in cases.items():
            async with gw.client.post(gw.url + "/v1/anything", headers=headers, data=b"{}") as r:
                body = await problem_of(r, 401)
                assert r.headers["WWW-Authenticate"].startswith("Bearer"), name
                assert body["type"].endswith("/unauthenticated"), name
    async with gw.client.get(gw.url + "/v1/x", headers=gw.auth(sub="repo:evil/fork")) as r:
        body = await problem_of(r, 403)
        assert body["type"].endswith("/access-denied") and "repo:evil/fork" in body["detail"]
    assert upstream.seen == []
    events = await gw.events(len(cases) + 1)
    assert {e["unmapped"]["decision"] for e in events} == {"block"}
    assert gw.metrics.auth_failures.labels("billing-api", "http", "missing")._value.get() == 2
    assert gw.metrics.auth_failures.labels("billing-api", "http", "access")._value.get() == 1


async def test_missing_gateway_secret_fails_closed(
    upstream: Upstream, issuer: OIDCIssuer, tmp_path: Path
) -> None:
    async with gateway(upstream, issuer, tmp_path, secrets={}) as g:
        body = await refused(g, "/v1/x", 502)
        assert body["type"].endswith("/secret-missing") and "billing-token" not in body["detail"]
    assert upstream.seen == []


# --------------------------------------------------------------------------- guardrails


async def test_guardrails_method_path_and_body(gw: Gateway, upstream: Upstream) -> None:
    auth = gw.auth()
    blocked = [
        ("POST", "/admin/users", None, "read-only-admin"),
        ("DELETE", "/admin/users/7", None, "read-only-admin"),
        ("POST", "/v1/%2e%2e/admin/users", None, "read-only-admin"),
        ("POST", "/v1//../admin/users", None, "read-only-admin"),
        ("POST", "/v1/refunds", {"amount": 1000000, "currency": "EUR"}, "no-big-refunds"),
        ("POST", "/v1/refunds", {"amount": "1000000"}, "no-big-refunds"),
        ("TRACE", "/v1/x", None, "builtin-http-trace-connect"),
    ]
    for method, path, body, rule in blocked:
        async with gw.client.request(method, URL(gw.url + path, encoded=True), headers=auth, json=body) as r:
            problem = await problem_of(r, 403)
            assert problem["rule"] == rule, (method, path)
            assert problem["type"].endswith("/blocked") and rule in problem["detail"]
    async with gw.client.delete(gw.url + "/v1/customers/9", headers=auth) as r:
        problem = await problem_of(r, 403)
        assert problem["type"].endswith("/approval-required") and problem["rule"] == "delete-needs-approval"
    assert upstream.seen == []

    # JSON hidden behind another content type, and form fields, are judged too
    smuggled = [
        (b'{"amount": 1000000}', "text/plain"),
        (b"amount=1000000&currency=EUR", "application/x-www-form-urlencoded"),
        (gzip.compress(b'{"amount": 1000000}'), "application/json", "gzip"),
    ]
    for data, ctype, *enc in smuggled:
        headers = {**auth, "Content-Type": ctype, **({"Content-Encoding": enc[0]} if enc else {})}
        async with gw.client.post(gw.url + "/v1/refunds", headers=headers, data=data) as r:
            assert (await problem_of(r, 403))["rule"] == "no-big-refunds", ctype
    for data in (b'{"amount": 5, "amount": 1000000}', b'{"amount": 1000000'):
        async with gw.client.post(
            gw.url + "/v1/refunds", headers={**auth, "Content-Type": "application/json"}, data=data
        ) as r:
            assert (await problem_of(r, 400))["type"].endswith("/malformed-body")
    assert upstream.seen == []

    async with gw.client.get(gw.url + "/admin/users", headers=auth) as r:
        assert r.status == 200
    async with gw.client.post(gw.url + "/v1/refunds", headers=auth, json={"amount": 5}) as r:
        assert r.status == 200
    assert [s.method + " " + s.path for s in upstream.seen] == ["GET /admin/users", "POST /v1/refunds"]
    assert json.loads(upstream.seen[-1].body or b"") == {"amount": 5}  # the inspected body, unchanged

    events = await gw.events(len(blocked) + 1 + 3 + 2 + 2)
    blocked_events = [e for e in events if e["unmapped"]["decision"] == "block"]
    assert {e["policy"]["name"] for e in blocked_events} >= {"read-only-admin", "no-big-refunds"}
    assert any(e["unmapped"]["decision"] == "requireApproval" for e in events)


async def test_too_large_body_to_inspect_refused(
    upstream: Upstream, issuer: OIDCIssuer, tmp_path: Path
) -> None:
    async with gateway(upstream, issuer, tmp_path, settings=HTTPSettings(max_inspect_bytes=1024)) as g:
        body = json.dumps({"amount": 5, "pad": "x" * 4096})
        async with g.client.post(g.url + "/v1/refunds", headers=g.auth(), data=body) as r:
            assert (await problem_of(r, 413))["type"].endswith("/body-too-large")
        async with g.client.post(g.url + "/v1/other", headers=g.auth(), data=body) as r:
            assert r.status == 200  # no rule reads this body: it streams, whatever its size
    assert [s.path for s in upstream.seen] == ["/v1/other"]


# --------------------------------------------------------------------------- masking

CUSTOMER = {
    "customer": {"name": "Alice Liddell", "email": EMAIL, "id": 7},
    "items": [
        {"owner": "Bob Builder", "contact": {"email": "bob@example.com"}, "sku": "ACME-12345678"},
        {"owner": "Carol Danvers", "note": f"paid with {CARD}", "sku": "X-1"},
    ],
    "history": [[{"email": "deep@example.com"}]],
    "total": 42.5,
}
SECRETS_IN_CUSTOMER = (
    "Alice Liddell",
    EMAIL,
    "bob@example.com",
    "Bob Builder",
    "Carol Danvers",
    CARD,
    "ACME-12345678",
    "deep@example.com",
)


async def test_json_masked_nested_arrays_recursive(gw: Gateway, upstream: Upstream) -> None:
    upstream.responders["/v1/customers/7"] = json_doc(CUSTOMER, ETag='"abc"')
    async with gw.client.get(gw.url + "/v1/customers/7", headers=gw.auth()) as r:
        assert r.status == 200 and r.content_type == "application/json"
        assert "ETag" not in r.headers
        text = await r.text()
    for secret in SECRETS_IN_CUSTOMER:
        assert secret not in text, secret
    doc = json.loads(text)
    assert doc["customer"]["id"] == 7 and doc["total"] == 42.5 and doc["items"][1]["sku"] == "X-1"
    assert doc["items"][1]["note"].endswith("1111") and doc["items"][1]["note"].startswith("paid with ")
    assert doc["items"][0]["sku"] != "ACME-12345678"

    # the same caller gets the same hash: joinable, not reversible
    async with gw.client.get(gw.url + "/v1/customers/7", headers=gw.auth()) as r:
        assert json.loads(await r.text())["items"][0]["sku"] == doc["items"][0]["sku"]

    [event, _] = await gw.events(2)
    masked = event["unmapped"]["masked"]
    assert set(masked) == {"emails", "names", "cards", "internal-ids"}
    assert (
        masked["emails"] >= 3
        and masked["names"] == 3
        and masked["cards"] == 1
        and masked["internal-ids"] == 1
    )
    assert gw.metrics.masked.labels("billing-api", "http", "emails")._value.get() == 2 * masked["emails"]


async def test_exempt_group_sees_clear_text(gw: Gateway, upstream: Upstream) -> None:
    upstream.responders["/v1/customers/7"] = json_doc(CUSTOMER)
    async with gw.client.get(
        gw.url + "/v1/customers/7", headers=gw.auth(sub="auditor-1", groups=("auditors",))
    ) as r:
        assert r.status == 200
        assert await r.json() == CUSTOMER


async def test_detectors_in_text_and_mislabelled_json(gw: Gateway, upstream: Upstream) -> None:
    upstream.responders["/report.txt"] = raw(
        f"order ACME-87654321 paid by {EMAIL} with {CARD}; order id 1234567812345678\n".encode(),
        "text/plain; charset=utf-8",
    )
    upstream.responders["/mislabelled"] = raw(json.dumps(CUSTOMER).encode(), "text/html")
    upstream.responders["/untyped"] = raw(f"card {CARD}".encode(), "")
    async with gw.client.get(gw.url + "/report.txt", headers=gw.auth()) as r:
        text = await r.text()
    assert CARD not in text and "ACME-87654321" not in text
    assert "1234567812345678" in text  # fails the Luhn check: an order id, not a card
    async with gw.client.get(gw.url + "/mislabelled", headers=gw.auth()) as r:
        text = await r.text()
    assert not any(s in text for s in SECRETS_IN_CUSTOMER)
    async with gw.client.get(gw.url + "/untyped", headers=gw.auth()) as r:
        assert CARD not in await r.text()


@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate"])
async def test_compressed_bodies_decoded_masked_and_sent_plain(
    gw: Gateway, upstream: Upstream, encoding: str
) -> None:
    plain = json.dumps(CUSTOMER).encode()
    packed = {"gzip": gzip.compress, "br": brotli.compress, "deflate": __import__("zlib").compress}[encoding](
        plain
    )
    upstream.responders["/c"] = raw(packed, "application/json", **{"Content-Encoding": encoding})
    async with gw.client.get(
        gw.url + "/c", headers={**gw.auth(), "Accept-Encoding": "zstd, gzip"}, auto_decompress=False
    ) as r:
        assert r.status == 200 and "Content-Encoding" not in r.headers
        body = await r.read()
    text = body.decode()
    assert not any(s in text for s in SECRETS_IN_CUSTOMER)
    assert json.loads(text)["customer"]["id"] == 7
    # what the target was asked for: only encodings the gateway can undo to mask
    assert upstream.seen[-1].headers["Accept-Encoding"] == "gzip, deflate, br"


async def test_unmaskable_responses_refused_not_passed_in_clear(
    upstream: Upstream, issuer: OIDCIssuer, tmp_path: Path
) -> None:
    big = json.dumps({"rows": [{"email": EMAIL}] * 5000}).encode()  # ~130 kB

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(big), 8192):
            await resp.write(big[i : i + 8192])
        await resp.write_eof()
        return resp

    upstream.responders["/big"] = raw(big, "application/json")
    upstream.responders["/big-chunked"] = chunked
    upstream.responders["/bomb"] = raw(
        gzip.compress(b"\x20" * (50 * MB)), "application/json", **{"Content-Encoding": "gzip"}
    )
    upstream.responders["/br-bomb"] = raw(
        brotli.compress(b"a" * (50 * MB)), "text/plain", **{"Content-Encoding": "br"}
    )
    upstream.responders["/zstd"] = raw(
        b"\x28\xb5\x2f\xfd", "application/json", **{"Content-Encoding": "zstd"}
    )
    upstream.responders["/not-json"] = raw(b'{"email": "' + EMAIL.encode() + b'", oops', "application/json")
    settings = HTTPSettings(max_mask_bytes=64 * 1024)
    async with gateway(upstream, issuer, tmp_path, settings=settings) as g:
        expected = {
            "/big": "response-too-large",
            "/big-chunked": "response-too-large",
            "/bomb": "response-too-large",
            "/br-bomb": "response-too-large",
            "/zstd": "undecodable-response",
            "/not-json": "unmaskable-response",
        }
        for path, slug in expected.items():
            async with g.client.get(g.url + path, headers=g.auth()) as r:
                body = await problem_of(r, 502)
                assert body["type"].endswith("/" + slug), path
                assert EMAIL not in json.dumps(body)
        # the exempt caller is not masked, so nothing needs buffering
        async with g.client.get(g.url + "/big", headers=g.auth(sub="aud", groups=("auditors",))) as r:
            assert r.status == 200 and await r.read() == big


async def test_masked_answers_memoised_per_masker_and_only_when_masked(
    upstream: Upstream, issuer: OIDCIssuer, tmp_path: Path
) -> None:
    """A repeated answer is masked once: the memo gives the same bytes and counts as masking
    would, never a clear body to a masked caller nor a masked one to an exempt caller, and never
    remembers a refusal."""
    upstream.responders["/c"] = json_doc(CUSTOMER)
    upstream.responders["/other"] = json_doc({**CUSTOMER, "total": 1})
    upstream.responders["/not-json"] = raw(b'{"email": "' + EMAIL.encode() + b'", oops', "application/json")
    bodies: dict[int, list[bytes]] = {}
    for entries in (0, 2):
        settings = HTTPSettings(mask_cache_entries=entries)
        async with gateway(upstream, issuer, tmp_path, settings=settings) as g:
            got = bodies.setdefault(entries, [])
            for path in ("/c", "/c", "/other", "/c", "/not-json", "/not-json"):
                async with g.client.get(g.url + path, headers=g.auth()) as r:
                    got.append(await r.read())
                    assert r.status == (502 if path == "/not-json" else 200)
            async with g.client.get(g.url + "/c", headers=g.auth(sub="aud", groups=("auditors",))) as r:
                assert await r.json() == CUSTOMER  # the exempt caller's masker is another one
            assert len(g.proxy._masked_bodies) == (2 if entries else 0)
            events = await g.events(7)
            masked = [e["unmapped"].get("masked") for e in events[:7]]
            assert masked[0] == masked[1] == masked[3] and masked[0]["emails"] >= 3
            assert not masked[4] and not masked[5] and not masked[6]
    assert bodies[0] == bodies[2]
    assert bodies[0][0] == bodies[0][1] and not any(s.encode() in bodies[0][0] for s in SECRETS_IN_CUSTOMER)


async def test_reload_drops_what_was_remembered_per_caller(
    gw: Gateway, upstream: Upstream, issuer: OIDCIssuer
) -> None:
    """Access decisions and maskers are memoised per caller within one policy snapshot only."""
    upstream.responders["/c"] = json_doc(CUSTOMER)
    token = gw.token()
    async with gw.client.get(gw.url + "/c", headers=gw.auth(token)) as r:
        assert r.status == 200 and EMAIL not in await r.text()
    p = gw.proxy.policy
    exempting = {**PII_POLICY, "spec": {**PII_POLICY["spec"], "exempt": {"subjects": ["repo:acme/*"]}}}
    cfg = build_config(connection(upstream.url, issuer), [exempting])
    gw.proxy.reload(cfg, authenticator=p.authenticator, guard=p.guard,
                    masking_engine=MaskingEngine(cfg.masking, b"m" * 32))
    async with gw.client.get(gw.url + "/c", headers=gw.auth(token)) as r:
        assert r.status == 200 and await r.json() == CUSTOMER
    cfg = build_config(connection(upstream.url, issuer, access=[{"groups": ["auditors"]}]), [PII_POLICY])
    gw.proxy.reload(cfg, authenticator=p.authenticator, guard=p.guard, masking_engine=p.masking)
    async with gw.client.get(gw.url + "/c", headers=gw.auth(token)) as r:
        await problem_of(r, 403)


def test_request_ids_are_uuid4() -> None:
    import uuid

    ids = {request_id() for _ in range(2000)}
    assert len(ids) == 2000
    for rid in ids:
        u = uuid.UUID(hex=rid)
        assert u.hex == rid and u.version == 4 and u.variant == uuid.RFC_4122


async def test_range_requests_stripped_for_masked_callers(gw: Gateway, upstream: Upstream) -> None:
    upstream.responders["/c"] = json_doc(CUSTOMER)
    async with gw.client.get(
        gw.url + "/c", headers={**gw.auth(), "Range": "bytes=10-40", "If-Range": '"x"'}
    ) as r:
        assert r.status == 200
    assert "Range" not in upstream.seen[-1].headers and "If-Range" not in upstream.seen[-1].headers
    async with gw.client.get(
        gw.url + "/c", headers={**gw.auth(groups=("auditors",)), "Range": "bytes=1-2"}
    ) as r:
        assert r.status == 200
    assert upstream.seen[-1].headers["Range"] == "bytes=1-2"


async def test_head_and_no_content(gw: Gateway, upstream: Upstream) -> None:
    async def empty(_: web.Request) -> web.StreamResponse:
        return web.Response(status=204)

    upstream.responders["/empty"] = empty
    upstream.responders["/c"] = json_doc(CUSTOMER)
    async with gw.client.head(gw.url + "/c", headers=gw.auth()) as r:
        assert r.status == 200 and await r.read() == b""
    async with gw.client.delete(gw.url + "/empty", headers=gw.auth()) as r:
        assert r.status == 204


# --------------------------------------------------------------------------- streaming, bounded memory


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's RSS while a transfer runs (proxy, target and client all live here)."""

    def __init__(self) -> None:
        self.base = rss()
        self.peak = self.base
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss())
            await asyncio.sleep(0.002)

    def __enter__(self) -> PeakRSS:
        self._task = asyncio.get_running_loop().create_task(self._sample())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        self.peak = max(self.peak, rss())

    @property
    def growth(self) -> int:
        return self.peak - self.base


BULK = 200 * MB
BLOCK = os.urandom(64 * 1024)


async def bulk_download(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.content_length = BULK
    await resp.prepare(request)
    for _ in range(BULK // len(BLOCK)):
        await resp.write(BLOCK)
    await resp.write_eof()
    return resp


@pytest.mark.slow
async def test_200mb_download_and_upload_stream_with_bounded_memory(gw: Gateway, upstream: Upstream) -> None:
    upstream.responders["/download"] = bulk_download
    for headers in (gw.auth(), gw.auth(sub="aud", groups=("auditors",))):
        received, digest = 0, hashlib.sha256()
        with PeakRSS() as mem:
            async with gw.client.get(gw.url + "/download", headers=headers) as r:
                assert r.status == 200 and r.content_length == BULK
                async for chunk in r.content.iter_chunked(256 * 1024):
                    received += len(chunk)
                    digest.update(chunk)
        assert received == BULK
        assert mem.growth < 100 * MB, f"RSS grew {mem.growth / MB:.0f} MB"

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(BULK // len(BLOCK)):
            yield BLOCK

    expected = hashlib.sha256(BLOCK * 1).copy()
    expected = hashlib.sha256()
    for _ in range(BULK // len(BLOCK)):
        expected.update(BLOCK)
    with PeakRSS() as mem:
        async with gw.client.put(
            gw.url + "/upload",
            headers={**gw.auth(), "Content-Type": "application/octet-stream"},
            data=chunks(),
        ) as r:
            assert r.status == 200
            assert (await r.json())["size"] == BULK
    assert mem.growth < 100 * MB, f"RSS grew {mem.growth / MB:.0f} MB"
    assert upstream.seen[-1].size == BULK and upstream.seen[-1].sha256 == expected.hexdigest()


# --------------------------------------------------------------------------- TLS towards the target


@pytest.fixture
def private_cas(tmp_path: Path) -> tuple[ssl.SSLContext, bytes, bytes]:
    """A server context signed by a private CA, that CA's PEM, and an unrelated CA's PEM."""
    server_ctx, _, ca_file = loopback_tls(str(tmp_path))
    (tmp_path / "other").mkdir()
    _, _, other_ca = loopback_tls(str(tmp_path / "other"))
    return server_ctx, Path(ca_file).read_bytes(), Path(other_ca).read_bytes()


async def test_upstream_tls_verify_full_with_private_ca(
    issuer: OIDCIssuer, tmp_path: Path, private_cas: tuple[ssl.SSLContext, bytes, bytes]
) -> None:
    server_ctx, ca_pem, other_pem = private_cas
    up = await Upstream(ssl_context=server_ctx).start()
    tls = {"url": up.url, "tls": {"mode": "verify-full", "caSecretRef": {"name": "billing-ca"}}}
    try:
        for ca, status in ((ca_pem, 200), (other_pem, 502)):
            secrets = {**SECRETS, "billing-ca": {"ca.crt": ca}}
            async with (
                gateway(up, issuer, tmp_path, secrets=secrets, target=tls) as g,
                g.client.get(g.url + "/v1/x", headers=g.auth()) as r,
            ):
                if status == 200:
                    assert r.status == 200 and (await r.json())["path"] == "/v1/x"
                else:
                    body = await problem_of(r, 502)
                    assert body["type"].endswith("/upstream-tls") and "not trusted" in body["detail"]
        # without the CA the system trust store is used, which does not know ours either
        async with gateway(up, issuer, tmp_path, target={"url": up.url, "tls": {"mode": "verify-full"}}) as g:
            await refused(g, "/v1/x", 502)
        # a CA Secret that is missing fails the request, not the process
        async with gateway(up, issuer, tmp_path, target=tls) as g:
            assert (await refused(g, "/v1/x", 502))["type"].endswith("/secret-missing")
    finally:
        await up.stop()
    assert len(up.seen) == 1  # only the trusted exchange reached it


# --------------------------------------------------------------------------- WebSocket


async def test_websocket_passes_through_with_credential_and_masking(gw: Gateway, upstream: Upstream) -> None:
    token = gw.token()
    ws_url = gw.url.replace("http", "ws") + "/ws"
    async with gw.client.ws_connect(
        ws_url, headers={"Authorization": f"Bearer {token}"}, protocols=("chat.v1",)
    ) as ws:
        assert ws.protocol == "chat.v1"
        await ws.send_str("hello")
        assert (await ws.receive_str()) == "echo:hello"
        await ws.send_bytes(b"\x01\x02\x03")
        assert (await ws.receive_bytes()) == b"\x03\x02\x01"
        await ws.send_str("pii")
        text = await ws.receive_str()
        assert EMAIL not in text and CARD not in text
    [seen] = upstream.ws_seen
    assert seen.getall("Authorization") == [f"Bearer {UPSTREAM_TOKEN}"]
    assert token not in json.dumps(list(seen.items()))
    async with gw.client.ws_connect(ws_url, headers=gw.auth(sub="aud", groups=("auditors",))) as ws:
        await ws.send_str("pii")
        assert EMAIL in await ws.receive_str()
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await gw.client.ws_connect(ws_url)
    assert exc.value.status == 401
    assert len(upstream.ws_seen) == 2


# --------------------------------------------------------------------------- failures of the target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_timeouts_and_unreachable_targets(
    upstream: Upstream, issuer: OIDCIssuer, tmp_path: Path
) -> None:
    release = asyncio.Event()

    async def slow(_: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(text="late")

    async def stalls_mid_body(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = int(request.query.get("size", "1000"))
        await resp.prepare(request)
        await resp.write(b"x" * 100)
        await release.wait()
        return resp

    upstream.responders["/slow"] = slow
    upstream.responders["/stall"] = stalls_mid_body
    settings = HTTPSettings(read_timeout=0.3, connect_timeout=2.0)
    try:
        async with gateway(upstream, issuer, tmp_path, settings=settings) as g:
            async with g.client.get(g.url + "/slow", headers=g.auth()) as r:
                assert (await problem_of(r, 504))["type"].endswith("/upstream-timeout")
            # a small body is read whole before answering: the stall is a clean 504
            assert (await refused(g, "/stall", 504))["type"].endswith("/upstream-timeout")
            # a large one streams: once the status is sent, a stall cuts the connection
            async with g.client.get(g.url + "/stall?size=1000000", headers=g.auth()) as r:
                assert r.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await r.read()  # truncated, never a clean end of a partial body
            assert g.metrics.upstream_errors.labels("billing-api", "http", "timeout")._value.get() == 3
        async with gateway(upstream, issuer, tmp_path, url=f"http://127.0.0.1:{free_port()}") as g:
            assert (await refused(g, "/x", 502))["type"].endswith("/upstream-unavailable")
    finally:
        release.set()


# --------------------------------------------------------------------------- metrics and reload


def sample(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^(\w+)\{(.*)\} (\S+)$", line)
        if m and m.group(1) == name and ",".join(sorted(m.group(2).split(","))) == want:
            return float(m.group(3))
    return 0.0


async def test_metrics_move_with_traffic(gw: Gateway, upstream: Upstream) -> None:
    upstream.responders["/c"] = json_doc(CUSTOMER)
    async with TestClient(TestServer(admin_app(gw.metrics, lambda: None))) as admin:

        async def scrape() -> str:
            r = await admin.get("/metrics")
            assert r.status == 200
            return await r.text()

        before = await scrape()
        for _ in range(3):
            async with gw.client.get(gw.url + "/c", headers=gw.auth()) as r:
                assert r.status == 200
        async with gw.client.post(gw.url + "/admin/x", headers=gw.auth()) as r:
            assert r.status == 403
        async with gw.client.get(gw.url + "/c") as r:
            assert r.status == 401
        after = await scrape()
    labels = {"connection": "billing-api", "protocol": "http"}
    cmd = "sidegate_commands_total"
    assert (
        sample(after, cmd, **labels, decision="allow") - sample(before, cmd, **labels, decision="allow") == 3
    )
    assert (
        sample(after, cmd, **labels, decision="block") - sample(before, cmd, **labels, decision="block") == 2
    )
    emails = sample(after, "sidegate_masked_values_total", **labels, rule="emails")
    assert emails >= 9 and emails % 3 == 0
    assert sample(after, "sidegate_auth_failures_total", **labels, reason="missing") == 1
    assert sample(after, "sidegate_command_duration_seconds_count", **labels) == 5
    assert sample(after, "sidegate_active_sessions", **labels) == 0


async def test_reload_applies_to_new_requests(gw: Gateway, upstream: Upstream, issuer: OIDCIssuer) -> None:
    async with gw.client.get(gw.url + "/v1/reports", headers=gw.auth()) as r:
        assert r.status == 200
    spec = connection(upstream.url, issuer)
    spec["spec"]["guardrails"].insert(
        0, {"name": "no-reports", "http": {"paths": ["/v1/reports*"]}, "action": "block"}
    )
    cfg = build_config(spec, [PII_POLICY])
    p = gw.proxy.policy
    gw.proxy.reload(cfg, authenticator=p.authenticator, guard=Guard(cfg.connection), masking_engine=p.masking)
    async with gw.client.get(gw.url + "/v1/reports", headers=gw.auth()) as r:
        assert (await problem_of(r, 403))["rule"] == "no-reports"


# --------------------------------------------------------------------------- token exchange end to end


def rsa_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


async def test_token_exchange_end_to_end(upstream: Upstream, issuer: OIDCIssuer, tmp_path: Path) -> None:
    """A CI token is exchanged at the admin port's POST /v1/token; the exchanged token works on
    this Connection and is refused by another one that trusts the same CI issuer."""
    signing_key = rsa_pem()
    sidegate_url = "https://sidegate.payments.svc"

    def runtime(name: str) -> ProxyRuntime:
        cfg = build_config(connection(upstream.url, issuer, name=name), [PII_POLICY])
        opts = RuntimeOptions(
            listen_host="127.0.0.1",
            listen_port=0,
            admin_port=0,
            spool_dir=tmp_path / name,
            audit_stdout=False,
            audit_fsync=False,
            token_signing_key=signing_key,
            token_issuer_url=sidegate_url,
        )
        return ProxyRuntime(cfg, DictSecretStore(SECRETS), opts)

    billing, other = runtime("billing-api"), runtime("ledger-api")
    await billing.start()
    await other.start()
    try:
        async with aiohttp.ClientSession() as client:
            ci_token = issuer.mint(sub="repo:acme/api:ref:refs/heads/main", aud="sidegate", groups=["ci"])
            form = {
                "grant_type": GRANT_TYPE,
                "subject_token": ci_token,
                "subject_token_type": TOKEN_TYPE_JWT,
                "audience": f"{NS}/billing-api",
            }
            async with client.post(f"http://127.0.0.1:{billing.admin_port}/v1/token", data=form) as r:
                assert r.status == 200, await r.text()
                exchanged = (await r.json())["access_token"]
            upstream.responders["/c"] = json_doc(CUSTOMER)
            async with client.get(
                f"http://127.0.0.1:{billing.port}/c", headers={"Authorization": f"Bearer {exchanged}"}
            ) as r:
                assert r.status == 200
                assert EMAIL not in await r.text()  # same caller, same masking
            assert upstream.seen[-1].headers["Authorization"] == f"Bearer {UPSTREAM_TOKEN}"
            seen = len(upstream.seen)
            async with client.get(
                f"http://127.0.0.1:{other.port}/c", headers={"Authorization": f"Bearer {exchanged}"}
            ) as r:
                body = await problem_of(r, 401)
                assert body["detail"] == "wrong audience"
            assert len(upstream.seen) == seen
            # the CI token itself still works on the other Connection: only the exchanged one is bound
            async with client.get(
                f"http://127.0.0.1:{other.port}/c", headers={"Authorization": f"Bearer {ci_token}"}
            ) as r:
                assert r.status == 200
            async with client.get(f"http://127.0.0.1:{billing.admin_port}/metrics") as r:
                text = await r.text()
            assert (
                sample(
                    text,
                    "sidegate_commands_total",
                    connection="billing-api",
                    protocol="http",
                    decision="allow",
                )
                == 1
            )
    finally:
        await billing.close()
        await other.close()


# --------------------------------------------------------------------------- pure helpers


def test_decode_body_caps_expansion() -> None:
    assert decode_body(gzip.compress(b"abc"), "gzip", 10) == b"abc"
    assert decode_body(brotli.compress(b"abc"), "br", 10) == b"abc"
    with pytest.raises(BodyTooLarge):
        decode_body(gzip.compress(b"a" * 1000), "gzip", 999)
    with pytest.raises(BodyTooLarge):
        decode_body(brotli.compress(b"a" * 1000), "br", 999)
    with pytest.raises(ValueError, match="truncated"):
        decode_body(gzip.compress(b"a" * 1000)[:-12], "gzip", 5000)
    with pytest.raises(ValueError, match="unsupported"):
        decode_body(b"x", "gzip, br", 10)


@pytest.mark.parametrize(
    "ctype,maskable",
    [
        ("application/json", True),
        ("application/vnd.api+json; charset=utf-8", True),
        ("text/csv", True),
        ("", True),
        ("application/xml", True),
        ("application/x-msgpack", True),
        ("application/octet-stream", False),
        ("image/png", False),
        ("application/zip", False),
    ],
)
def test_maskable_types_fail_closed(ctype: str, maskable: bool) -> None:
    assert is_maskable(ctype) is maskable


def test_forward_headers_drop_connection_named_headers() -> None:
    from multidict import CIMultiDictProxy

    h = CIMultiDictProxy(
        CIMultiDict(
            [
                ("Connection", "close, X-A"),
                ("X-A", "1"),
                ("X-B", "2"),
                ("Authorization", "Bearer t"),
                ("Range", "bytes=0-1"),
                ("X-Forwarded-For", "10.0.0.1"),
            ]
        )
    )
    out = forward_headers(h, "127.0.0.1", "https", masked=True)
    assert dict(out) == {"X-B": "2", "X-Forwarded-For": "10.0.0.1, 127.0.0.1", "X-Forwarded-Proto": "https"}
