"""Where an issuer's signing keys come from: a static JWKS (a Secret), a ``jwksUri``, or OIDC discovery.

Every source is a ``KeySource``: ``await source.key(kid, alg)`` returns a public key that fits the
algorithm, or ``None``. Keys are cached; an unknown ``kid`` triggers one refresh (at most one per
``refresh_interval`` per source, concurrent refreshes share one fetch), so a key rotated in at the
issuer is picked up at once while a flood of made-up ``kid`` values cannot turn the gateway into
a request amplifier against the issuer.

Network rules, all fail closed: TLS verification is always on (tests pass an ``ssl_context`` with
their own CA); plain ``http://`` is refused unless the host is loopback or ``allow_insecure`` is
set explicitly; redirects are not followed; each fetch has a 5 s timeout and a 256 KiB size cap.
The cache lifetime follows ``Cache-Control: max-age`` clamped to [60 s, 1 h] (300 s without one).
When a refresh fails, the keys already held stay in use: an issuer outage must not log everyone
out, and a key removed at the issuer still disappears on the next successful refresh.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from .config import SecretKeyRef
from .secrets import SecretStore

log = logging.getLogger(__name__)

#: The only algorithms an issuer may use: public-key signatures. ``none`` and HS* never verify.
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
DEFAULT_TTL = 300.0
MIN_TTL = 60.0
MAX_TTL = 3600.0
REFRESH_INTERVAL = 30.0
FETCH_TIMEOUT = 5.0
MAX_DOCUMENT_BYTES = 256 * 1024

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
Clock = Callable[[], float]

_EC_CURVES = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?:,|$)", re.IGNORECASE)


class JWKSError(Exception):
    """Keys could not be fetched or parsed; the message names the URL or Secret, never a token."""


@dataclass(frozen=True)
class JWK:
    """One usable verification key: its public key and the ``alg`` it is pinned to, if any."""

    kid: str | None
    key: PublicKey
    alg: str | None = None

    def fits(self, alg: str) -> bool:
        """A key only verifies the algorithm family it was made for (no RSA key for ES256...)."""
        if alg not in ASYMMETRIC_ALGORITHMS or (self.alg is not None and self.alg != alg):
            return False
        if alg[:2] in ("RS", "PS"):
            return isinstance(self.key, rsa.RSAPublicKey)
        if alg in _EC_CURVES:
            return isinstance(self.key, ec.EllipticCurvePublicKey) and isinstance(
                self.key.curve, _EC_CURVES[alg]
            )
        return isinstance(self.key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)


@dataclass(frozen=True)
class KeySet:
    by_kid: Mapping[str, JWK] = field(default_factory=dict)
    anonymous: tuple[JWK, ...] = ()

    def find(self, kid: str | None, alg: str) -> JWK | None:
        """By ``kid``; a token without one is accepted only if exactly one key could verify it."""
        if kid is not None:
            found = self.by_kid.get(kid)
            return found if found is not None and found.fits(alg) else None
        candidates = [k for k in (*self.by_kid.values(), *self.anonymous) if k.fits(alg)]
        return candidates[0] if len(candidates) == 1 else None

    def __len__(self) -> int:
        return len(self.by_kid) + len(self.anonymous)


def parse_jwks(document: bytes | str | Mapping[str, Any], source: str = "JWKS") -> KeySet:
    """A JWKS document to usable public keys. Symmetric (``oct``), encryption-only and unsupported
    keys are skipped; a document with no usable key at all is an error."""
    try:
        doc = json.loads(document) if isinstance(document, bytes | str) else document
    except ValueError as exc:
        raise JWKSError(f"{source}: not JSON: {exc}") from None
    if not isinstance(doc, Mapping) or not isinstance(doc.get("keys"), list):
        raise JWKSError(f"{source}: expected an object with a 'keys' list")
    by_kid: dict[str, JWK] = {}
    anonymous: list[JWK] = []
    for i, raw in enumerate(doc["keys"]):
        if not isinstance(raw, Mapping) or raw.get("kty") == "oct" or raw.get("use", "sig") != "sig":
            continue
        alg = raw.get("alg")
        if alg is not None and alg not in ASYMMETRIC_ALGORITHMS:
            continue
        try:
            key: Any = jwt.PyJWK(dict(raw)).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError) as exc:
            log.warning("%s: skipping key %d (kid %r): %s", source, i, raw.get("kid"), exc)
            continue
        if hasattr(key, "public_key"):  # a private key published by mistake: use its public half
            key = key.public_key()
        kid = raw.get("kid")
        jwk = JWK(kid=str(kid) if kid is not None else None, key=key, alg=alg)
        if jwk.kid is None:
            anonymous.append(jwk)
        else:
            by_kid.setdefault(jwk.kid, jwk)
    if not by_kid and not anonymous:
        raise JWKSError(f"{source}: no usable signing keys")
    return KeySet(by_kid=by_kid, anonymous=tuple(anonymous))


def max_age(cache_control: str | None, default: float = DEFAULT_TTL) -> float:
    """The cache lifetime from ``Cache-Control``, clamped so keys are neither hammered nor stale."""
    seconds = default
    if cache_control:
        if re.search(r"no-(?:store|cache)", cache_control, re.IGNORECASE):
            seconds = MIN_TTL
        elif m := _MAX_AGE.search(cache_control):
            seconds = float(m.group(1))
    return min(max(seconds, MIN_TTL), MAX_TTL)


def is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_url(url: str, *, allow_insecure: bool = False) -> str:
    """Only https, or http to loopback (tests) or with an explicit opt-in."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and parts.hostname and (allow_insecure or is_loopback(parts.hostname)):
        return url
    raise JWKSError(f"{url!r}: key URLs must be https (http only for loopback or with allow_insecure)")


class Fetcher:
    """Small JSON documents over HTTPS with the limits above; one shared session per Authenticator."""

    def __init__(
        self,
        session: aiohttp.ClientSession | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        allow_insecure: bool = False,
        timeout: float = FETCH_TIMEOUT,
        max_bytes: int = MAX_DOCUMENT_BYTES,
    ) -> None:
        self._session = session
        self._owned = session is None
        self.ssl_context = ssl_context
        self.allow_insecure = allow_insecure
        self.timeout = timeout
        self.max_bytes = max_bytes

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers={"User-Agent": "sidegate"})
            self._owned = True
        return self._session

    async def get_json(self, url: str) -> tuple[Any, float]:
        """The parsed document and its cache lifetime in seconds."""
        check_url(url, allow_insecure=self.allow_insecure)
        try:
            async with self._get_session().get(
                url,
                ssl=self.ssl_context if self.ssl_context is not None else True,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"Accept": "application/json"},
            ) as resp:
                if resp.status != 200:
                    raise JWKSError(f"{url}: HTTP {resp.status}")
                if (resp.content_length or 0) > self.max_bytes:
                    raise JWKSError(f"{url}: document larger than {self.max_bytes} bytes")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(16384):
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise JWKSError(f"{url}: document larger than {self.max_bytes} bytes")
                ttl = max_age(resp.headers.get("Cache-Control"))
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError) as exc:
            raise JWKSError(f"{url}: {type(exc).__name__}: {exc}") from None
        try:
            return json.loads(body), ttl
        except ValueError as exc:
            raise JWKSError(f"{url}: not JSON: {exc}") from None

    async def aclose(self) -> None:
        if self._owned and self._session is not None:
            await self._session.close()
        self._session = None


class KeySource:
    """Cached keys with rate-limited, coalesced refresh; subclasses only say how to load them."""

    def __init__(self, *, clock: Clock = time.time, refresh_interval: float = REFRESH_INTERVAL) -> None:
        self.clock = clock
        self.refresh_interval = refresh_interval
        self.fetches = 0
        self._keys: KeySet | None = None
        self._expires_at = 0.0
        self._last_attempt: float | None = None
        self._last_miss: float | None = None
        self._inflight: asyncio.Task[None] | None = None
        self._last_error: str | None = None

    @property
    def name(self) -> str:
        return type(self).__name__

    async def _load(self) -> tuple[KeySet, float]:
        """The current keys and how long (seconds) they may be cached."""
        raise NotImplementedError

    async def aclose(self) -> None:
        if self._inflight is not None:
            self._inflight.cancel()

    async def key(self, kid: str | None, alg: str) -> JWK | None:
        """The key for ``kid`` that fits ``alg``; refreshes when stale or when ``kid`` is unknown."""
        if self._keys is None or self.clock() >= self._expires_at:
            await self.refresh()
        if self._keys is None:
            raise JWKSError(f"{self.name}: no keys loaded: {self._last_error}")
        found = self._keys.find(kid, alg)
        if found is None and await self.refresh(unknown_kid=True):
            found = self._keys.find(kid, alg)
        return found

    async def refresh(self, *, unknown_kid: bool = False) -> bool:
        """Fetch now unless one was attempted within ``refresh_interval``; True if keys were reloaded.

        Refreshes for an unknown ``kid`` are limited separately from scheduled ones, so a key
        rotated in right after a scheduled fetch is still found at once."""
        if self._inflight is None:
            now = self.clock()
            last = self._last_miss if unknown_kid else self._last_attempt
            if last is not None and now - last < self.refresh_interval:
                return False
            self._last_attempt = now
            if unknown_kid:
                self._last_miss = now
            self._inflight = asyncio.ensure_future(self._do_refresh())
            self._inflight.add_done_callback(self._refresh_done)
        task = self._inflight
        await asyncio.shield(task)
        return self._last_error is None

    def _refresh_done(self, task: asyncio.Task[None]) -> None:
        self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved: failures are recorded in _last_error, never raised

    async def _do_refresh(self) -> None:
        self.fetches += 1
        try:
            keys, ttl = await self._load()
        except Exception as exc:  # any failure: keep the old keys, report it to the waiting callers
            self._last_error = str(exc) if isinstance(exc, JWKSError) else f"{type(exc).__name__}: {exc}"
            log.warning("%s: key refresh failed (keeping %d cached keys): %s", self.name,
                        len(self._keys or ()), exc)
            return
        self._keys, self._last_error = keys, None
        self._expires_at = self.clock() + ttl


class StaticJWKS(KeySource):
    """A JWKS held in a Secret (air-gapped clusters). With ``loader`` the Secret is re-read when an
    unknown ``kid`` shows up, so a rotated Secret volume is followed without a restart."""

    def __init__(
        self,
        jwks_json: bytes | None = None,
        *,
        loader: Callable[[], bytes] | None = None,
        source: str = "static JWKS",
        clock: Clock = time.time,
        refresh_interval: float = REFRESH_INTERVAL,
    ) -> None:
        super().__init__(clock=clock, refresh_interval=refresh_interval)
        if (jwks_json is None) == (loader is None):
            raise ValueError("StaticJWKS needs exactly one of jwks_json or loader")
        self._source = source
        if jwks_json is not None:
            data = jwks_json
            self._loader: Callable[[], bytes] = lambda: data
            self._keys = parse_jwks(jwks_json, source)  # bad inline JWKS fails at construction
            self._expires_at = float("inf")
        else:
            assert loader is not None
            self._loader = loader

    @classmethod
    def from_secret(cls, secrets: SecretStore, ref: SecretKeyRef, **kwargs: Any) -> StaticJWKS:
        return cls(loader=lambda: secrets.get(ref), source=f"secret {ref.name}/{ref.key}", **kwargs)

    @property
    def name(self) -> str:
        return self._source

    async def _load(self) -> tuple[KeySet, float]:
        try:
            raw = self._loader()
        except LookupError as exc:  # SecretMissing
            raise JWKSError(f"{self._source}: {exc}") from None
        return parse_jwks(raw, self._source), float("inf")


class RemoteJWKS(KeySource):
    """A ``jwksUri``."""

    def __init__(
        self,
        uri: str,
        *,
        fetcher: Fetcher | None = None,
        clock: Clock = time.time,
        refresh_interval: float = REFRESH_INTERVAL,
    ) -> None:
        super().__init__(clock=clock, refresh_interval=refresh_interval)
        self.fetcher = fetcher or Fetcher()
        self._owns_fetcher = fetcher is None
        self.uri = check_url(uri, allow_insecure=self.fetcher.allow_insecure)

    @property
    def name(self) -> str:
        return self.uri

    async def _jwks_uri(self) -> str:
        return self.uri

    async def _load(self) -> tuple[KeySet, float]:
        uri = await self._jwks_uri()
        doc, ttl = await self.fetcher.get_json(uri)
        return parse_jwks(doc, uri), ttl

    async def aclose(self) -> None:
        await super().aclose()
        if self._owns_fetcher:
            await self.fetcher.aclose()


class DiscoveryJWKS(RemoteJWKS):
    """OIDC discovery: ``<issuer>/.well-known/openid-configuration`` names the ``jwks_uri``. The
    document must name the same issuer (OIDC Discovery 1.0, section 4.3), or nothing is trusted."""

    def __init__(
        self,
        issuer: str,
        *,
        fetcher: Fetcher | None = None,
        clock: Clock = time.time,
        refresh_interval: float = REFRESH_INTERVAL,
    ) -> None:
        self.issuer = issuer
        super().__init__(
            issuer.rstrip("/") + "/.well-known/openid-configuration",
            fetcher=fetcher,
            clock=clock,
            refresh_interval=refresh_interval,
        )
        self.discovery_url = self.uri
        self._jwks: str | None = None
        self._jwks_expires = 0.0

    async def _jwks_uri(self) -> str:
        if self._jwks is not None and self.clock() < self._jwks_expires:
            return self._jwks
        doc, ttl = await self.fetcher.get_json(self.discovery_url)
        if not isinstance(doc, Mapping) or doc.get("issuer") != self.issuer:
            got = doc.get("issuer") if isinstance(doc, Mapping) else None
            raise JWKSError(f"{self.discovery_url}: names issuer {got!r}, expected {self.issuer!r}")
        uri = doc.get("jwks_uri")
        if not isinstance(uri, str):
            raise JWKSError(f"{self.discovery_url}: no jwks_uri")
        self._jwks = check_url(uri, allow_insecure=self.fetcher.allow_insecure)
        self._jwks_expires = self.clock() + ttl
        return self._jwks
