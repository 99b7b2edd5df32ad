"""Token exchange: a caller trades its own JWT for a short-lived Sidegate token for one Connection.

The exchanged token is bound to exactly one Connection (``aud = sidegate:<namespace>/<name>``),
lives at most 15 minutes and never longer than the token it was exchanged for, and carries the
caller's subject and groups, so the proxies accept it through ``TokenIssuer.as_issuer`` as just
another issuer. The HTTP side is RFC 8693 (``POST /v1/token``), errors are RFC 6749 section 5.2.
"""

from __future__ import annotations

import json
import logging
import secrets as pysecrets
import time
from collections.abc import Callable
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .config import EXCHANGE_ISSUER_NAME, ConfigError, Issuer
from .identity import Authenticator, AuthError
from .jwks import StaticJWKS
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


def audience_for(connection_ref: str) -> str:
    return f"sidegate:{connection_ref}"


class TokenIssuer:
    """Signs exchanged tokens with the gateway's key (RS256 for RSA, ES256/ES384 for EC)."""

    def __init__(
        self,
        signing_key_pem: bytes,
        issuer: str,
        key_id: str,
        *,
        clock: Callable[[], float] = time.time,
        max_ttl: int = MAX_TTL,
    ) -> None:
        try:
            key = serialization.load_pem_private_key(signing_key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError("signingKey", f"not an unencrypted PEM private key: {exc}") from None
        if isinstance(key, rsa.RSAPrivateKey):
            if key.key_size < 2048:
                raise ConfigError("signingKey", "RSA keys must be at least 2048 bits")
            self.algorithm = "RS256"
        elif isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in _EC_ALGS:
            self.algorithm = _EC_ALGS[key.curve.name]
        else:
            raise ConfigError("signingKey", "use an RSA (>= 2048 bit) or EC P-256/P-384 key")
        if not issuer or not key_id:
            raise ConfigError("issuer", "issuer and key_id are required")
        self._key = key
        self.issuer = issuer
        self.key_id = key_id
        self.clock = clock
        self.max_ttl = min(max_ttl, MAX_TTL)

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
        token = jwt.encode(claims, self._key, algorithm=self.algorithm, headers={"kid": self.key_id})
        return token, exp - now

    def jwks(self) -> dict[str, Any]:
        """The public JWKS the proxies (or anyone) verify exchanged tokens with."""
        public = self._key.public_key()
        alg = jwt.get_algorithm_by_name(self.algorithm)
        jwk = json.loads(alg.to_jwk(public))
        jwk.update({"kid": self.key_id, "alg": self.algorithm, "use": "sig"})
        return {"keys": [jwk]}

    def key_source(self) -> StaticJWKS:
        """In-process keys for ``Authenticator(key_sources={ISSUER_NAME: ...})``: no HTTP round trip."""
        return StaticJWKS(json.dumps(self.jwks()).encode(), source=f"token issuer {self.issuer}")

    def as_issuer(self, connection_ref: str) -> Issuer:
        """This issuer as the proxies see it: accepted for exactly one Connection."""
        return Issuer(
            name=ISSUER_NAME,
            issuer=self.issuer,
            audiences=(audience_for(connection_ref),),
            groups_claim="groups",
            algorithms=(self.algorithm,),
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
                "id_token_signing_alg_values_supported": [issuer.algorithm],
            },
            headers={"Cache-Control": "public, max-age=300"},
        )

    return [
        web.post("/v1/token", token),
        web.get("/v1/jwks", jwks),
        web.get("/.well-known/jwks.json", jwks),
        web.get("/.well-known/openid-configuration", discovery),
    ]
