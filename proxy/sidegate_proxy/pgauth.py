"""Upstream login with the gateway-held credential: SCRAM-SHA-256, md5 and cleartext.

``UpstreamLogin`` is a pure state machine: feed it each ``Authentication`` message the server
sends and write back whatever bytes it returns. It never sees a socket, so it is tested against
canned exchanges as well as a real server. SCRAM is mutual: the server must prove it knows the
verifier (``v=`` in SASLFinal) before an ``AuthenticationOk`` is believed, so a spoofed upstream
cannot skip the proof. Which methods the gateway accepts is configurable (``allowed``), like
libpq's ``require_auth``: cleartext hands the password to whoever answers the TCP connection, so
it is only safe over verified TLS.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import unicodedata
from collections.abc import Callable, Iterable

from . import pgwire
from .pgwire import Authentication

__all__ = ["METHODS", "AuthFailed", "UpstreamLogin", "md5_password", "salted_password", "scram_client_first"]

METHODS: frozenset[str] = frozenset({"scram-sha-256", "md5", "password"})
MAX_ITERATIONS = 1_000_000  # a hostile server must not make us burn minutes of CPU
SCRAM = "SCRAM-SHA-256"

Derive = Callable[[bytes, bytes, int], bytes]


class AuthFailed(Exception):
    """The upstream login cannot proceed; the message never contains the credential."""


def saslprep(password: str) -> bytes:
    """RFC 4013 in the subset PostgreSQL relies on: ASCII is unchanged, the rest is NFKC with
    non-ASCII spaces mapped to a space (PostgreSQL falls back to the raw bytes on failure)."""
    if password.isascii():
        return password.encode()
    mapped = "".join(" " if unicodedata.category(ch) == "Zs" else ch for ch in password)
    return unicodedata.normalize("NFKC", mapped).encode()


def salted_password(password: bytes, salt: bytes, iterations: int) -> bytes:
    """Hi() of RFC 5802: the expensive step, worth caching per (salt, iterations)."""
    return hashlib.pbkdf2_hmac("sha256", password, salt, iterations)


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    inner = hashlib.md5(password.encode() + user.encode()).hexdigest()  # noqa: S324 - protocol
    return b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode()  # noqa: S324


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _attrs(message: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        text = message.decode("ascii")
    except UnicodeDecodeError:
        raise AuthFailed("SCRAM message is not ASCII") from None
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or len(key) != 1:
            raise AuthFailed("malformed SCRAM message")
        out.setdefault(key, value)
    return out


def scram_client_first(nonce: str, user: str = "") -> tuple[bytes, bytes]:
    """(client-first-message, client-first-message-bare); PostgreSQL ignores the user name here
    (it uses the startup packet's), so it is left empty."""
    bare = f"n={user.replace('=', '=3D').replace(',', '=2C')},r={nonce}".encode()
    return b"n,," + bare, bare


class UpstreamLogin:
    """One login attempt. ``feed(msg)`` returns the bytes to send (possibly empty); ``done`` turns
    true on a trusted ``AuthenticationOk``; any refusal raises ``AuthFailed``."""

    def __init__(self, user: str, password: str, *, allowed: Iterable[str] = METHODS,
                 derive: Derive = salted_password, nonce: str | None = None, sasl_user: str = "") -> None:
        self.user = user
        self._password = password
        self.allowed = frozenset(allowed)
        unknown = self.allowed - METHODS
        if unknown:
            raise ValueError(f"unknown authentication methods: {sorted(unknown)}")
        self._derive = derive
        self._sasl_user = sasl_user
        self._nonce = nonce or base64.b64encode(secrets.token_bytes(18)).decode()
        self.method: str | None = None
        self.done = False
        self._client_first_bare = b""
        self._server_signature: bytes | None = None
        self._scram_verified = False

    def __repr__(self) -> str:  # never show the password
        return f"UpstreamLogin(user={self.user!r}, method={self.method!r}, done={self.done})"

    def _use(self, method: str) -> None:
        if method not in self.allowed:
            raise AuthFailed(f"upstream asked for {method} authentication, which is not allowed")
        if self.method is not None and self.method != method:
            raise AuthFailed("upstream changed the authentication method mid-exchange")
        self.method = method

    def feed(self, msg: Authentication) -> bytes:
        if self.done:
            raise AuthFailed("unexpected authentication message after login")
        code = msg.code
        if code == pgwire.AUTH_OK:
            if self.method == "scram-sha-256" and not self._scram_verified:
                raise AuthFailed("upstream skipped the SCRAM server proof")
            if self.method is None and self.allowed != METHODS:
                raise AuthFailed("upstream accepted the login without authentication (trust)")
            self.done = True
            return b""
        if code == pgwire.AUTH_CLEARTEXT:
            self._use("password")
            return pgwire.password_message(self._password)
        if code == pgwire.AUTH_MD5:
            self._use("md5")
            if len(msg.data) != 4:
                raise AuthFailed("malformed md5 salt")
            return pgwire.password_message(md5_password(self.user, self._password, msg.data))
        if code == pgwire.AUTH_SASL:
            mechanisms = [m.decode("utf-8", "replace") for m in msg.data.split(b"\0") if m]
            if SCRAM not in mechanisms:
                raise AuthFailed(f"upstream offers no supported SASL mechanism: {mechanisms}")
            self._use("scram-sha-256")
            first, self._client_first_bare = scram_client_first(self._nonce, self._sasl_user)
            return pgwire.sasl_initial_response(SCRAM, first)
        if code == pgwire.AUTH_SASL_CONTINUE:
            return self._scram_continue(msg.data)
        if code == pgwire.AUTH_SASL_FINAL:
            self._scram_final(msg.data)
            return b""
        raise AuthFailed(f"unsupported upstream authentication request (code {code})")

    def _scram_continue(self, server_first: bytes) -> bytes:
        if self.method != "scram-sha-256" or not self._client_first_bare or self._server_signature:
            raise AuthFailed("unexpected SASLContinue")
        a = _attrs(server_first)
        nonce, salt_b64, iterations = a.get("r", ""), a.get("s"), a.get("i", "")
        if not nonce.startswith(self._nonce) or len(nonce) <= len(self._nonce):
            raise AuthFailed("SCRAM server nonce does not extend the client nonce")
        if salt_b64 is None or not iterations.isdigit():
            raise AuthFailed("malformed SCRAM server-first message")
        n = int(iterations)
        if not 1 <= n <= MAX_ITERATIONS:
            raise AuthFailed(f"SCRAM iteration count {n} out of range")
        try:
            salt = base64.b64decode(salt_b64, validate=True)
        except ValueError:
            raise AuthFailed("malformed SCRAM salt") from None
        salted = self._derive(saslprep(self._password), salt, n)
        client_key = _hmac(salted, b"Client Key")
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c=biws,r={nonce}".encode()
        auth_message = self._client_first_bare + b"," + server_first + b"," + without_proof
        signature = _hmac(stored_key, auth_message)
        proof = bytes(x ^ y for x, y in zip(client_key, signature, strict=True))
        self._server_signature = _hmac(_hmac(salted, b"Server Key"), auth_message)
        return pgwire.sasl_response(without_proof + b",p=" + base64.b64encode(proof))

    def _scram_final(self, server_final: bytes) -> None:
        if self._server_signature is None:
            raise AuthFailed("unexpected SASLFinal")
        a = _attrs(server_final)
        if "e" in a:
            raise AuthFailed(f"SCRAM error from upstream: {a['e']}")
        try:
            got = base64.b64decode(a.get("v", ""), validate=True)
        except ValueError:
            raise AuthFailed("malformed SCRAM server signature") from None
        if not hmac.compare_digest(got, self._server_signature):
            raise AuthFailed("SCRAM server signature does not verify: not the expected server")
        self._scram_verified = True
