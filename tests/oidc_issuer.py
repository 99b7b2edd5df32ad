"""A real OIDC issuer on loopback for tests: discovery, JWKS, RSA/EC keys, rotation, minting.

Async::

    async with OIDCIssuer() as iss:           # RS256 key "k1" published at iss.jwks_uri
        token = iss.mint(sub="ci", aud="sidegate", groups=["deployers"], exp_in=300)
        issuer_cfg = iss.issuer_config(audiences=("sidegate",))   # a config.Issuer for it
        new_kid = iss.rotate()                 # new key becomes current; old one still published
        iss.jwks_fetches, iss.discovery_fetches  # how often keys were fetched

From synchronous code or other threads (the server runs on its own event loop thread)::

    with ThreadedOIDCIssuer(alg="ES256") as iss:
        token = iss.mint(sub="x", aud="sidegate")

Over TLS with a throwaway CA (``server_ctx, client_ctx, ca_file = loopback_tls(str(tmp_path))``)::

    async with OIDCIssuer(ssl_context=server_ctx) as iss:   # iss.url is https://127.0.0.1:PORT
        Authenticator(..., ssl_context=client_ctx)

``mint`` sets ``iss``, ``iat`` and ``exp`` (``now + exp_in``; pass ``now=`` for fake clocks);
a claim given as ``None`` is left out (``exp=None`` gives a token without expiry). ``kid``/``alg``
pick a key or override the header, ``headers`` adds raw header fields.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from sidegate_proxy.config import ClaimMapping, Issuer

_CURVES = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: Any

    @property
    def private_pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @property
    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def jwk(self) -> dict[str, Any]:
        data = json.loads(jwt.get_algorithm_by_name(self.alg).to_jwk(self.private.public_key()))
        data.update({"kid": self.kid, "alg": self.alg, "use": "sig"})
        return data


def generate_key(alg: str, kid: str) -> SigningKey:
    if alg in _CURVES:
        return SigningKey(kid, alg, ec.generate_private_key(_CURVES[alg]()))
    if alg[:2] in ("RS", "PS"):
        return SigningKey(kid, alg, rsa.generate_private_key(public_exponent=65537, key_size=2048))
    raise ValueError(f"unsupported alg {alg}")


def loopback_tls(tmp_dir: str) -> tuple[ssl.SSLContext, ssl.SSLContext, str]:
    """A throwaway CA and a 127.0.0.1/localhost server certificate:
    ``(server_context, client_context, ca_file)`` for ``OIDCIssuer(ssl_context=server_context)``."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sidegate test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = {name: f"{tmp_dir}/{name}" for name in ("ca.crt", "tls.crt", "tls.key")}
    with open(paths["ca.crt"], "wb") as f:
        f.write(ca.public_bytes(pem))
    with open(paths["tls.crt"], "wb") as f:
        f.write(cert.public_bytes(pem))
    with open(paths["tls.key"], "wb") as f:
        f.write(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(paths["tls.crt"], paths["tls.key"])
    client = ssl.create_default_context(cafile=paths["ca.crt"])
    return server, client, paths["ca.crt"]


class _IssuerCore:
    """Keys, minting and the aiohttp app; shared by the async and threaded front ends."""

    def __init__(self, *, alg: str = "RS256", max_age: int | None = 300, host: str = "127.0.0.1",
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.ssl_context = ssl_context
        self.port = 0
        self.max_age = max_age
        self.keys: dict[str, SigningKey] = {}
        self.current: SigningKey = self.add_key(alg)
        self.jwks_fetches = 0
        self.discovery_fetches = 0
        self.issuer_override: str | None = None  # makes discovery lie about the issuer

    # -- keys
    def add_key(self, alg: str = "RS256", kid: str | None = None) -> SigningKey:
        key = generate_key(alg, kid or f"k{len(self.keys) + 1}")
        self.keys[key.kid] = key
        return key

    def rotate(self, alg: str | None = None, *, drop_old: bool = False) -> str:
        """A new current key (published at once); ``drop_old`` unpublishes the previous ones."""
        key = self.add_key(alg or self.current.alg)
        if drop_old:
            self.keys = {key.kid: key}
        self.current = key
        return key.kid

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.jwk() for k in self.keys.values()]}

    def jwks_bytes(self) -> bytes:
        return json.dumps(self.jwks()).encode()

    # -- URLs
    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://{self.host}:{self.port}"

    @property
    def jwks_uri(self) -> str:
        return f"{self.url}/jwks"

    def issuer_config(self, name: str = "test", *, audiences: tuple[str, ...] = ("sidegate",),
                      groups_claim: str | None = "groups", jwks_uri: str | None = None,
                      claim_mappings: tuple[ClaimMapping, ...] = (), **kw: Any) -> Issuer:
        return Issuer(name=name, issuer=self.url, audiences=audiences, groups_claim=groups_claim,
                      jwks_uri=jwks_uri, claim_mappings=claim_mappings, **kw)

    # -- tokens
    def mint(
        self,
        claims: Mapping[str, Any] | None = None,
        /,
        *,
        kid: str | None = None,
        alg: str | None = None,
        exp_in: float = 300,
        now: float | None = None,
        headers: Mapping[str, Any] | None = None,
        **more: Any,
    ) -> str:
        key = self.keys.get(kid or "", self.current)
        t = int(time.time() if now is None else now)
        body: dict[str, Any] = {"iss": self.url, "iat": t, "exp": int(t + exp_in)}
        body.update(claims or {})
        body.update(more)
        body = {k: v for k, v in body.items() if v is not None}
        header = {"kid": kid or key.kid, **(headers or {})}
        return jwt.encode(body, key.private, algorithm=alg or key.alg, headers=header)

    # -- HTTP
    def app(self) -> web.Application:
        cache = {"Cache-Control": f"max-age={self.max_age}"} if self.max_age is not None else {}

        async def discovery(_: web.Request) -> web.Response:
            self.discovery_fetches += 1
            return web.json_response(
                {"issuer": self.issuer_override or self.url, "jwks_uri": self.jwks_uri,
                 "id_token_signing_alg_values_supported": sorted({k.alg for k in self.keys.values()})},
                headers=cache,
            )

        async def jwks(_: web.Request) -> web.Response:
            self.jwks_fetches += 1
            return web.json_response(self.jwks(), headers=cache)

        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", discovery)
        app.router.add_get("/jwks", jwks)
        return app


class OIDCIssuer(_IssuerCore):
    """``async with OIDCIssuer() as iss`` in the test's own event loop."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._runner: web.AppRunner | None = None

    async def start(self) -> OIDCIssuer:
        self._runner = web.AppRunner(self.app())
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0, ssl_context=self.ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> OIDCIssuer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class ThreadedOIDCIssuer(_IssuerCore):
    """The same issuer served from a background thread, for sync tests and threaded code."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="oidc-issuer", daemon=True)

    def start(self) -> ThreadedOIDCIssuer:
        self._thread.start()
        self._runner = web.AppRunner(self.app())

        async def up() -> int:
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.host, 0, ssl_context=self.ssl_context)
            await site.start()
            return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

        self.port = asyncio.run_coroutine_threadsafe(up(), self._loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> ThreadedOIDCIssuer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
