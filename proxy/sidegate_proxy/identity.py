"""Who the caller is: JWT verification shared by the PostgreSQL and HTTP proxies.

A token is trusted only through the issuer it names, and only with that issuer's keys: the
unverified ``iss`` claim selects one configured ``Issuer`` (an unknown issuer is refused without
any network access), then the signature is checked with a key from that issuer's ``KeySource``
and an algorithm from its allow-list. ``none`` and HMAC algorithms never verify, so the classic
"HS256 signed with the public key" forgery fails before any key is touched.

Audience rule: when an issuer lists ``audiences`` the token's ``aud`` must contain one of them.
An issuer with no ``audiences`` accepts any audience (a warning is logged at start): list one
whenever the issuer serves more than Sidegate, or a token minted for another service is accepted.

Verified tokens are cached by SHA-256 of the token until they expire (bounded LRU, and at most
``cache_ttl`` seconds so a key withdrawn at the issuer stops working soon): a cache hit is a dict
lookup, a miss is a ~175 us RS256 verification.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeGuard

import aiohttp
import jwt

from .config import ConfigError, IdentityConfig, Issuer
from .jwks import (
    ASYMMETRIC_ALGORITHMS,
    REFRESH_INTERVAL,
    DiscoveryJWKS,
    Fetcher,
    JWKSError,
    KeySource,
    RemoteJWKS,
    StaticJWKS,
)
from .policy import Caller
from .secrets import SecretStore

log = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 16 * 1024
CACHE_SIZE = 10_000
CACHE_TTL = 300.0
DEFAULT_LEEWAY = 30  # seconds of clock skew allowed on exp, nbf and iat
DEFAULT_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/token"
SA_PREFIX = "system:serviceaccount:"


class AuthError(Exception):
    """A refused token. ``reason`` is safe to show the client; ``detail`` is for logs. Neither ever
    contains the token itself."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------- claims -> Caller


def claim(claims: Mapping[str, Any], name: str) -> Any:
    """A claim by name, or by dotted path into nested objects (``realm_access.roles``) when no
    claim has that literal name (``kubernetes.io`` is a literal name)."""
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _strings(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise AuthError("malformed token", f"claim {what!r} must be a string or a list of strings")


def kubernetes_groups(subject: str, claims: Mapping[str, Any]) -> set[str]:
    """The groups Kubernetes itself gives a service account, for tokens it issued."""
    k8s = claims.get("kubernetes.io")
    legacy_ns = claims.get("kubernetes.io/serviceaccount/namespace")
    if not (isinstance(k8s, Mapping) or isinstance(legacy_ns, str)) or not subject.startswith(SA_PREFIX):
        return set()
    namespace, _, name = subject[len(SA_PREFIX):].partition(":")
    claimed = k8s.get("namespace") if isinstance(k8s, Mapping) else legacy_ns
    if not namespace or not name or (claimed is not None and claimed != namespace):
        raise AuthError("malformed token", f"service account subject {subject!r} disagrees with claims")
    return {"system:serviceaccounts", f"system:serviceaccounts:{namespace}"}


def caller_from_claims(claims: Mapping[str, Any], issuer: Issuer | None, issuer_name: str = "") -> Caller:
    """Subject, groups (groups claim, claim mappings, Kubernetes service-account groups) and expiry."""
    subject_claim = issuer.subject_claim if issuer else "sub"
    subject = claim(claims, subject_claim)
    if not isinstance(subject, str) or not subject:
        raise AuthError("token has no subject", f"claim {subject_claim!r} missing or not a string")
    groups: set[str] = set()
    if issuer is not None:
        if issuer.groups_claim:
            groups.update(_strings(claim(claims, issuer.groups_claim), issuer.groups_claim))
        for mapping in issuer.claim_mappings:
            value = claim(claims, mapping.claim)
            if isinstance(value, int | float) and not isinstance(value, bool):
                value = str(value)
            groups.update(mapping.prefix + v for v in _strings(value, mapping.claim))
    groups |= kubernetes_groups(subject, claims)
    exp = claims.get("exp")
    iss = claims.get("iss")
    return Caller(
        subject=subject,
        issuer=iss if isinstance(iss, str) else "",
        groups=frozenset(groups),
        issuer_name=issuer_name or (issuer.name if issuer else ""),
        expires_at=float(exp) if _is_number(exp) else None,
        claims=MappingProxyType(dict(claims)),
    )


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def unverified_claims(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and payload, unverified: only for choosing which issuer and key to verify with (PyJWT
    parses again when verifying; its own unverified decode costs ~150 us, this ~5 us)."""
    if not isinstance(token, str) or not token:
        raise AuthError("malformed token", "empty or not a string")
    if len(token) > MAX_TOKEN_BYTES:
        raise AuthError("token too large", f"{len(token)} bytes > {MAX_TOKEN_BYTES}")
    parts = token.split(".")
    if len(parts) != 3:
        raise AuthError("malformed token", f"{len(parts)} segments, expected 3")
    try:
        header, payload = (
            json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4))) for p in parts[:2]
        )
    except (ValueError, TypeError) as exc:  # binascii.Error and UnicodeDecodeError are ValueErrors
        raise AuthError("malformed token", f"{type(exc).__name__}: {exc}") from None
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise AuthError("malformed token", "header or payload is not a JSON object")
    return header, payload


# --------------------------------------------------------------------------- Authenticator


@dataclass
class _Trusted:
    config: Issuer
    keys: KeySource
    algorithms: frozenset[str]


class Authenticator:
    """Verifies caller JWTs against the Connection's issuers (plus e.g. the token-exchange issuer)."""

    def __init__(
        self,
        identity: IdentityConfig,
        secrets: SecretStore,
        *,
        extra_issuers: Sequence[Issuer] = (),
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.time,
        leeway: int = DEFAULT_LEEWAY,
        key_sources: Mapping[str, KeySource] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        allow_insecure: bool = False,
        refresh_interval: float = REFRESH_INTERVAL,
        cache_size: int = CACHE_SIZE,
        cache_ttl: float = CACHE_TTL,
    ) -> None:
        """``key_sources`` (by issuer name) overrides where an issuer's keys come from, e.g.
        ``{"sidegate": token_issuer.key_source()}`` for in-process token exchange."""
        self.identity = identity
        self.clock = clock
        self.leeway = leeway
        self.cache_size = cache_size
        self.cache_ttl = cache_ttl
        self.verifications = 0
        self._fetcher = Fetcher(session, ssl_context=ssl_context, allow_insecure=allow_insecure)
        self._cache: OrderedDict[bytes, tuple[Caller, float]] = OrderedDict()
        self._issuers: dict[str, _Trusted] = {}
        overrides = dict(key_sources or {})
        for i, cfg in enumerate((*identity.issuers, *extra_issuers)):
            path = f"spec.identity.issuers[{i}]"
            if cfg.issuer in self._issuers:
                raise ConfigError(f"{path}.issuer", f"issuer {cfg.issuer!r} is configured twice")
            algorithms = frozenset(cfg.algorithms) & ASYMMETRIC_ALGORITHMS
            if not algorithms:
                raise ConfigError(f"{path}.algorithms", "no asymmetric signature algorithm allowed")
            kwargs: dict[str, Any] = {"clock": clock, "refresh_interval": refresh_interval}
            source: KeySource
            if cfg.name in overrides:
                source = overrides.pop(cfg.name)
            elif cfg.jwks_secret_ref is not None:
                source = StaticJWKS.from_secret(secrets, cfg.jwks_secret_ref, **kwargs)
            else:
                try:
                    if cfg.jwks_uri:
                        source = RemoteJWKS(cfg.jwks_uri, fetcher=self._fetcher, **kwargs)
                    else:
                        source = DiscoveryJWKS(cfg.issuer, fetcher=self._fetcher, **kwargs)
                except JWKSError as exc:
                    raise ConfigError(path, str(exc)) from None
            if not cfg.audiences:
                log.warning("issuer %s (%s) has no audiences: tokens for any audience are accepted",
                            cfg.name, cfg.issuer)
            self._issuers[cfg.issuer] = _Trusted(cfg, source, algorithms)
        if overrides:
            raise ConfigError("key_sources", f"no issuer named {', '.join(sorted(overrides))}")

    @property
    def issuers(self) -> tuple[Issuer, ...]:
        return tuple(t.config for t in self._issuers.values())

    async def aclose(self) -> None:
        for trusted in self._issuers.values():
            await trusted.keys.aclose()
        await self._fetcher.aclose()

    async def authenticate(self, token: str) -> Caller:
        """The verified caller, or ``AuthError``."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
            raise AuthError("token too large" if isinstance(token, str) else "malformed token")
        digest = hashlib.sha256(token.encode()).digest()
        hit = self._cache.get(digest)
        if hit is not None:
            if self.clock() < hit[1]:
                self._cache.move_to_end(digest)
                return hit[0]
            del self._cache[digest]
        caller = await self._verify(token)
        expires_at = caller.expires_at if caller.expires_at is not None else 0.0  # exp is required
        self._cache[digest] = (caller, min(expires_at + self.leeway, self.clock() + self.cache_ttl))
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return caller

    async def _verify(self, token: str) -> Caller:
        header, unverified = unverified_claims(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ASYMMETRIC_ALGORITHMS:
            raise AuthError("signature algorithm not allowed", f"alg {alg!r}")
        iss = unverified.get("iss")
        trusted = self._issuers.get(iss) if isinstance(iss, str) else None
        if trusted is None:
            raise AuthError("untrusted issuer", f"iss {iss!r} is not configured")
        if alg not in trusted.algorithms:
            raise AuthError("signature algorithm not allowed", f"{alg} not allowed for {trusted.config.name}")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthError("malformed token", "kid is not a string")
        try:
            key = await trusted.keys.key(kid, alg)
        except JWKSError as exc:
            raise AuthError("issuer keys unavailable", str(exc)) from None
        if key is None:
            raise AuthError("unknown signing key", f"no {alg} key {kid!r} at {trusted.keys.name}")
        self.verifications += 1
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                options={
                    "verify_signature": True,
                    "verify_exp": False,  # checked below against self.clock
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                },
            )
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise AuthError("invalid signature", f"{type(exc).__name__}: {exc}") from None
        self._check_claims(claims, trusted.config)
        return caller_from_claims(claims, trusted.config)

    def _check_claims(self, claims: Mapping[str, Any], issuer: Issuer) -> None:
        now, leeway = self.clock(), self.leeway
        if claims.get("iss") != issuer.issuer:
            raise AuthError("untrusted issuer", "iss changed between parse and verify")
        exp = claims.get("exp")
        if not _is_number(exp):
            raise AuthError("token has no expiry", "exp missing or not a number")
        if now > exp + leeway:
            raise AuthError("token expired", f"exp {exp} < now {now:.0f} - {leeway}")
        for name in ("nbf", "iat"):
            value = claims.get(name)
            if value is None:
                continue
            if not _is_number(value):
                raise AuthError("malformed token", f"{name} is not a number")
            if value > now + leeway:
                raise AuthError("token not yet valid", f"{name} {value} > now {now:.0f} + {leeway}")
        if issuer.audiences:
            aud = claims.get("aud")
            auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
            if not any(isinstance(a, str) and a in issuer.audiences for a in auds):
                raise AuthError("wrong audience", f"aud {aud!r} not in {list(issuer.audiences)}")


# --------------------------------------------------------------------------- workload identity


class WorkloadIdentity:
    """Sidecar mode: the pod's own projected service-account token is the caller's identity.

    With issuers configured on the Connection (``identity.issuers``; extra issuers such as token
    exchange do not count) the token is verified like any other. Without, the token is only
    decoded: that is safe only because the sidecar shares the pod's network and volumes, so every
    process that can reach its 127.0.0.1 listener is the workload itself, and whoever could replace
    the mounted file already controls the pod. It is not safe for gateway mode, and nothing here
    is used for tokens that arrive over the network.

    The file is re-read when the kubelet rotates it (checked at most every ``recheck_interval``)."""

    def __init__(
        self,
        authenticator: Authenticator | None = None,
        *,
        path: str | os.PathLike[str] = DEFAULT_TOKEN_PATH,
        clock: Callable[[], float] = time.time,
        recheck_interval: float = 1.0,
    ) -> None:
        verify = authenticator is not None and bool(authenticator.identity.issuers)
        self.authenticator = authenticator if verify else None
        self.path = Path(path)
        self.clock = clock
        self.recheck_interval = recheck_interval
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at = float("-inf")
        self._caller: Caller | None = None
        self._token: str | None = None

    def _read_if_changed(self) -> str:
        now = self.clock()
        if self._token is not None and now - self._checked_at < self.recheck_interval:
            return self._token
        try:
            st = self.path.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp != self._stamp or self._token is None:
                if st.st_size > MAX_TOKEN_BYTES:
                    raise AuthError("workload token unavailable", f"{self.path}: too large")
                self._token = self.path.read_text().strip()
                self._stamp, self._caller = stamp, None
        except OSError as exc:
            raise AuthError("workload token unavailable", f"{self.path}: {exc.strerror}") from None
        self._checked_at = now
        return self._token

    async def caller(self) -> Caller:
        token = self._read_if_changed()
        if self.authenticator is not None:
            return await self.authenticator.authenticate(token)  # cached there until expiry
        caller = self._caller
        if caller is None:
            _, claims = unverified_claims(token)
            caller = self._caller = caller_from_claims(claims, None, "workload")
        if caller.expires_at is not None and self.clock() > caller.expires_at:
            raise AuthError("workload token expired", f"{self.path} was not rotated by the kubelet")
        return caller
