"""Token exchange: a caller trades its own JWT for a short-lived Sidegate token for one Connection.

The exchanged token is bound to exactly one Connection (``aud = sidegate:<namespace>/<name>``),
lives at most 15 minutes and never longer than the token it was exchanged for, and carries the
caller's subject and groups, so the proxies accept it through ``TokenIssuer.as_issuer`` as just
another issuer. The HTTP side is RFC 8693 (``POST /v1/token``), errors are RFC 6749 section 5.2.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets as pysecrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .config import EXCHANGE_ISSUER_NAME, ConfigError, Issuer
from .identity import DEFAULT_LEEWAY, Authenticator, AuthError
from .jwks import JWK, KeySet, KeySource
from .policy import Caller

log = logging.getLogger(__name__)

MAX_TTL = 900
MAX_FORM_BYTES = 64 * 1024
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"
TOKEN_TYPE_ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
TOKEN_TYPE_ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
SUBJECT_TOKEN_TYPES = frozenset({TOKEN_TYPE_JWT, TOKEN_TYPE_ID_TOKEN, TOKEN_TYPE_ACCESS_TOKEN})
REQUESTED_TOKEN_TYPES = frozenset({TOKEN_TYPE_JWT, TOKEN_TYPE_ACCESS_TOKEN})
ORIGINAL_ISSUER_CLAIM = "sidegate.orig_iss"
ISSUER_NAME = EXCHANGE_ISSUER_NAME  # reserved: no spec.identity issuer may take it
_EC_ALGS = {"secp256r1": "ES256", "secp384r1": "ES384"}
EXCHANGE_ALGORITHMS = ("RS256", *_EC_ALGS.values())
_THUMBPRINT_MEMBERS = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y")}
#: How long a key that stopped signing (or being listed) stays trusted: the longest an exchanged
#: token lives, plus the clock skew verifiers allow past ``exp``.
RETIRE_AFTER = MAX_TTL + DEFAULT_LEEWAY
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def audience_for(connection_ref: str) -> str:
    return f"sidegate:{connection_ref}"


# --------------------------------------------------------------------------- keys


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638: base64url SHA-256 of the key's required members, sorted, without white space.
    The key names itself, so old and new keys never share a ``kid``."""
    members = _THUMBPRINT_MEMBERS.get(str(jwk.get("kty")))
    if members is None:
        raise ValueError(f"no RFC 7638 thumbprint for key type {jwk.get('kty')!r}")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


@dataclass(frozen=True)
class ExchangeKey:
    """One usable key pair: the private half signs (when it is the signing key), ``jwk`` is what
    the JWKS publishes and ``verifier`` what the in-process verifier checks with."""

    private: PrivateKey = field(repr=False)
    algorithm: str
    kid: str
    jwk: Mapping[str, Any]
    verifier: JWK

    @classmethod
    def from_pem(cls, pem: bytes) -> ExchangeKey:
        """An unencrypted PEM private key: RSA (at least 2048 bit) or EC P-256/P-384."""
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError("signingKey", f"not an unencrypted PEM private key: {exc}") from None
        if isinstance(key, rsa.RSAPrivateKey):
            if key.key_size < 2048:
                raise ConfigError("signingKey", "RSA keys must be at least 2048 bits")
            algorithm = "RS256"
        elif isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in _EC_ALGS:
            algorithm = _EC_ALGS[key.curve.name]
        else:
            raise ConfigError("signingKey", "use an RSA (>= 2048 bit) or EC P-256/P-384 key")
        public = key.public_key()
        jwk = json.loads(jwt.get_algorithm_by_name(algorithm).to_jwk(public))
        kid = jwk_thumbprint(jwk)
        jwk.update({"kid": kid, "alg": algorithm, "use": "sig"})
        return cls(key, algorithm, kid, jwk, JWK(kid=kid, key=public, alg=algorithm))


@dataclass(frozen=True)
class KeyLoader:
    """Where one key is read from: read again on every reload, so a rotated Secret is followed.
    ``read`` raises ``FileNotFoundError`` or ``LookupError`` (``SecretMissing``) when it is absent."""

    name: str  # what the logs call it: a file, or a Secret and key
    read: Callable[[], bytes]

    @classmethod
    def file(cls, path: str | Path) -> KeyLoader:
        return cls(str(path), Path(path).read_bytes)

    @classmethod
    def fixed(cls, pem: bytes, name: str = "the configured key") -> KeyLoader:
        return cls(name, lambda: pem)


class TokenKeys:
    """The exchange keys one proxy holds, followed without a restart (``reload``).

    The signing key signs; verification keys (the next key, published before any replica signs
    with it, or the previous one) are published and trusted but never sign; a key that stops
    being either is retired: still published and trusted for ``retire_after`` seconds, as long
    as a token it signed may be accepted, then dropped. A key that cannot be read or used is
    logged and the key held so far is kept."""

    def __init__(
        self,
        signing: KeyLoader,
        verification: Sequence[KeyLoader] = (),
        *,
        clock: Callable[[], float] = time.time,
        retire_after: float = RETIRE_AFTER,
    ) -> None:
        self.clock = clock
        self.retire_after = retire_after
        self._signing_loader = signing
        self._verification_loaders = tuple(verification)
        try:  # without a usable signing key at start, the proxy does not start
            self._signing = ExchangeKey.from_pem(signing.read())
        except ConfigError as exc:
            raise ConfigError(exc.path, f"{signing.name}: {exc.message}") from None
        self._slots = {v.name: self._load(v, None) for v in self._verification_loaders}
        self._retired: dict[str, tuple[ExchangeKey, float]] = {}
        log.info("token exchange: signing with key %s (%s) from %s; verification keys: %s", self._signing.kid,
                 self._signing.algorithm, signing.name,
                 ", ".join(f"{k.kid} from {name}" for name, k in self._slots.items() if k is not None) or "none")

    @classmethod
    def fixed(cls, signing_key_pem: bytes, *, clock: Callable[[], float] = time.time) -> TokenKeys:
        """One key given as bytes (tests, ``RuntimeOptions.token_signing_key``): nothing to follow."""
        return cls(KeyLoader.fixed(signing_key_pem), clock=clock)

    @property
    def signing(self) -> ExchangeKey:
        return self._signing

    def snapshot(self) -> tuple[str, ...]:
        """What the key sources hold now, as digests (never the keys): a change means ``reload``."""
        return tuple(_digest(loader) for loader in (self._signing_loader, *self._verification_loaders))

    def reload(self) -> None:
        """Read every key again and apply what changed: rotate, publish, retire."""
        signing = self._load(self._signing_loader, self._signing)
        assert signing is not None  # the signing key is never dropped, only replaced
        slots = {v.name: self._load(v, self._slots.get(v.name)) for v in self._verification_loaders}
        before = self._configured()
        if signing.kid != self._signing.kid:
            log.warning("token exchange: now signing with key %s (%s) from %s, was %s", signing.kid,
                        signing.algorithm, self._signing_loader.name, self._signing.kid)
        self._signing, self._slots = signing, slots
        after = self._configured()
        until = self.clock() + self.retire_after
        for kid, key in before.items():
            if kid not in after:
                self._retired[kid] = (key, until)
                log.warning("token exchange: key %s retired: published and trusted until %s, when every "
                            "token it signed has expired", kid, _utc(until))
        for kid in after:
            if kid not in before:
                log.info("token exchange: key %s published and trusted", kid)
            self._retired.pop(kid, None)

    def _load(self, loader: KeyLoader, held: ExchangeKey | None) -> ExchangeKey | None:
        """The key ``loader`` holds now; an absent verification key is ``None`` (nothing to trust),
        anything else unusable keeps ``held``."""
        signs = loader is self._signing_loader
        role = "signing key" if signs else "verification key"
        try:
            return ExchangeKey.from_pem(loader.read())
        except (FileNotFoundError, LookupError) as exc:
            if not signs:
                return None
            problem = f"not found ({exc})"
        except OSError as exc:
            problem = f"unreadable ({exc})"
        except ConfigError as exc:
            problem = f"not usable ({exc.message})"
        kept = f"keeping key {held.kid}" if held is not None else "not trusted"
        log.error("token exchange: %s %s is %s; %s", role, loader.name, problem, kept)
        return held

    def _configured(self) -> dict[str, ExchangeKey]:
        keys = (self._signing, *(k for k in self._slots.values() if k is not None))
        return {k.kid: k for k in keys}

    def published(self) -> list[ExchangeKey]:
        """Every key an accepted token may name now (signing key first); retired keys past their
        time are dropped here."""
        now = self.clock()
        for kid, (_, until) in list(self._retired.items()):
            if now > until:  # a token valid at this instant is still accepted
                del self._retired[kid]
                log.info("token exchange: retired key %s dropped", kid)
        return list({**self._configured(), **{kid: k for kid, (k, _) in self._retired.items()}}.values())

    def jwks(self) -> dict[str, Any]:
        """The public JWKS: public halves only."""
        return {"keys": [dict(k.jwk) for k in self.published()]}

    def keyset(self) -> KeySet:
        return KeySet(by_kid={k.kid: k.verifier for k in self.published()})


def _digest(loader: KeyLoader) -> str:
    try:
        return hashlib.sha256(loader.read()).hexdigest()
    except (OSError, LookupError) as exc:
        return type(exc).__name__


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


class LiveKeys(KeySource):
    """What a ``TokenKeys`` holds at this moment, for the in-process verifier: nothing cached, so
    a rotation, a new verification key or a retirement counts for the very next token."""

    def __init__(self, keys: TokenKeys, name: str) -> None:
        super().__init__(clock=keys.clock)
        self._ring = keys
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    async def _load(self) -> tuple[KeySet, float]:
        return self._ring.keyset(), float("inf")

    async def key(self, kid: str | None, alg: str) -> JWK | None:
        return self._ring.keyset().find(kid, alg)


class TokenIssuer:
    """Signs exchanged tokens with the current signing key (RS256 for RSA, ES256/ES384 for EC),
    naming it by its thumbprint in ``kid``."""

    def __init__(
        self,
        keys: TokenKeys | bytes,
        issuer: str,
        *,
        clock: Callable[[], float] | None = None,
        max_ttl: int = MAX_TTL,
    ) -> None:
        """``keys``: the proxy's ``TokenKeys``, or one PEM private key that never changes."""
        self.keys = keys if isinstance(keys, TokenKeys) else TokenKeys.fixed(keys, clock=clock or time.time)
        if not issuer:
            raise ConfigError("issuer", "issuer is required")
        self.issuer = issuer
        self.clock = clock or self.keys.clock
        self.max_ttl = min(max_ttl, MAX_TTL)

    @property
    def algorithm(self) -> str:
        return self.keys.signing.algorithm

    @property
    def key_id(self) -> str:
        return self.keys.signing.kid

    def issue(self, caller: Caller, connection: str, ttl: int = MAX_TTL) -> tuple[str, int]:
        """A token for ``connection`` (``namespace/name``) and its lifetime in seconds."""
        if "/" not in connection:
            raise ValueError(f"connection must be namespace/name, got {connection!r}")
        now = int(self.clock())
        exp = now + max(1, min(int(ttl), self.max_ttl))
        if caller.expires_at is not None:
            exp = min(exp, int(caller.expires_at))
        if exp <= now:
            raise AuthError("subject token expired", "nothing left to exchange")
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": caller.subject,
            "aud": audience_for(connection),
            "groups": sorted(caller.groups),
            "iat": now,
            "nbf": now,
            "exp": exp,
            "jti": pysecrets.token_urlsafe(16),
            ORIGINAL_ISSUER_CLAIM: caller.issuer,
        }
        key = self.keys.signing
        token = jwt.encode(claims, key.private, algorithm=key.algorithm, headers={"kid": key.kid})
        return token, exp - now

    def jwks(self) -> dict[str, Any]:
        """The public JWKS the proxies (or anyone) verify exchanged tokens with."""
        return self.keys.jwks()

    def key_source(self) -> KeySource:
        """In-process keys for ``Authenticator(key_sources={ISSUER_NAME: ...})``: no HTTP round
        trip, and always the keys the JWKS publishes."""
        return LiveKeys(self.keys, f"token issuer {self.issuer}")

    def as_issuer(self, connection_ref: str) -> Issuer:
        """This issuer as the proxies see it: accepted for exactly one Connection. Every algorithm
        a key may have, so a rotation to another key type needs no rebuild (each key is pinned to
        its own algorithm by ``kid``)."""
        return Issuer(
            name=ISSUER_NAME,
            issuer=self.issuer,
            audiences=(audience_for(connection_ref),),
            groups_claim="groups",
            algorithms=EXCHANGE_ALGORITHMS,
        )


# --------------------------------------------------------------------------- HTTP


def _error(status: int, error: str, description: str) -> web.Response:
    return web.json_response(
        {"error": error, "error_description": description},
        status=status,
        headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
    )


def token_exchange_app(
    issuer: TokenIssuer,
    authenticator_for: Callable[[str], Authenticator | None],
    allowed: Callable[[Caller, str], bool],
    *,
    ttl: int = MAX_TTL,
) -> web.Application:
    """``POST /v1/token`` (RFC 8693) and the public keys at ``GET /v1/jwks`` and
    ``/.well-known/jwks.json``. ``authenticator_for(connection_ref)`` verifies the subject token
    with that Connection's issuers (``None``: no such Connection); ``allowed`` is its access list.
    Serve it at the root of ``issuer.issuer`` so discovery finds the keys; to share a port with
    other routes, add ``token_exchange_routes(...)`` to that app instead of mounting a sub-app
    (``add_subapp("/v1", ...)`` would serve ``/v1/v1/token``)."""
    app = web.Application(client_max_size=MAX_FORM_BYTES)
    app.add_routes(token_exchange_routes(issuer, authenticator_for, allowed, ttl=ttl))
    return app


def token_exchange_routes(
    issuer: TokenIssuer,
    authenticator_for: Callable[[str], Authenticator | None],
    allowed: Callable[[Caller, str], bool],
    *,
    ttl: int = MAX_TTL,
) -> list[web.RouteDef]:
    """The routes of ``token_exchange_app`` (absolute paths), for an existing application."""

    async def token(request: web.Request) -> web.Response:
        if request.content_type != "application/x-www-form-urlencoded":
            return _error(400, "invalid_request", "use application/x-www-form-urlencoded")
        if request.content_length is None or request.content_length > MAX_FORM_BYTES:
            return _error(413, "invalid_request", f"Content-Length up to {MAX_FORM_BYTES} required")
        try:
            form = await request.post()
        except (ValueError, web.HTTPException):
            return _error(400, "invalid_request", "unreadable form body")

        def field(name: str) -> str | None:
            values = form.getall(name, [])
            if not values:
                return None
            if len(values) > 1 or not isinstance(values[0], str):
                raise ValueError(name)
            return values[0]

        try:
            grant_type = field("grant_type")
            subject_token = field("subject_token")
            subject_token_type = field("subject_token_type")
            requested = field("requested_token_type")
            audience, resource = field("audience"), field("resource")
        except ValueError as exc:
            return _error(400, "invalid_request", f"parameter {exc} must appear once")
        if "actor_token" in form:
            return _error(400, "invalid_request", "delegation (actor_token) is not supported")
        if grant_type != GRANT_TYPE:
            return _error(400, "unsupported_grant_type", f"grant_type must be {GRANT_TYPE}")
        if not subject_token:
            return _error(400, "invalid_request", "subject_token is required")
        if subject_token_type not in SUBJECT_TOKEN_TYPES:
            return _error(400, "invalid_request", f"subject_token_type must be {TOKEN_TYPE_JWT}")
        if requested is not None and requested not in REQUESTED_TOKEN_TYPES:
            return _error(400, "invalid_request", f"requested_token_type must be {TOKEN_TYPE_JWT}")
        if audience and resource and audience != resource:
            return _error(400, "invalid_target", "audience and resource name different connections")
        connection = audience or resource
        if not connection:
            return _error(400, "invalid_request", "audience (the Connection, namespace/name) is required")
        authenticator = authenticator_for(connection) if "/" in connection else None
        if authenticator is None:
            return _error(400, "invalid_target", "unknown connection")
        try:
            caller = await authenticator.authenticate(subject_token)
        except AuthError as exc:
            log.info("token exchange for %s refused: %s", connection, exc)
            return _error(400, "invalid_grant", exc.reason)
        if not allowed(caller, connection):
            log.info("token exchange: %s may not use %s", caller.subject, connection)
            return _error(403, "unauthorized_client", "caller is not allowed to use this connection")
        try:
            access_token, expires_in = issuer.issue(caller, connection, ttl)
        except AuthError as exc:
            return _error(400, "invalid_grant", exc.reason)
        log.info("token exchange: issued %s for %s (%d s)", caller.subject, connection, expires_in)
        return web.json_response(
            {
                "access_token": access_token,
                "issued_token_type": TOKEN_TYPE_JWT,
                "token_type": "Bearer",
                "expires_in": expires_in,
            },
            headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
        )

    async def jwks(_: web.Request) -> web.Response:
        return web.json_response(issuer.jwks(), headers={"Cache-Control": "public, max-age=300"})

    async def discovery(_: web.Request) -> web.Response:
        base = issuer.issuer.rstrip("/")
        return web.json_response(
            {
                "issuer": issuer.issuer,
                "jwks_uri": f"{base}/.well-known/jwks.json",
                "token_endpoint": f"{base}/v1/token",
                "grant_types_supported": [GRANT_TYPE],
                "id_token_signing_alg_values_supported": sorted({k.algorithm for k in issuer.keys.published()}),
            },
            headers={"Cache-Control": "public, max-age=300"},
        )

    return [
        web.post("/v1/token", token),
        web.get("/v1/jwks", jwks),
        web.get("/.well-known/jwks.json", jwks),
        web.get("/.well-known/openid-configuration", discovery),
    ]
