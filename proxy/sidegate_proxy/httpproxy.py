"""The HTTP data plane: an aiohttp reverse proxy that knows who is asking.

Per request: identity (bearer JWT, or the pod's own identity in sidecar mode) -> access list ->
guardrails on method, path and JSON body -> forward with the gateway-held credential -> mask the
response -> one audit event. Bodies stream both ways; only a response that must be masked is
buffered, up to a limit past which it is refused rather than passed through in clear.

What is masked for a caller with an active masker: every response whose type is not known to be
binary (JSON field rules and detectors for JSON, detectors for any other text; a missing
Content-Type counts as text). Binary types (``application/octet-stream``, images, archives, ...)
stream through unmasked. A body that cannot be masked (too large, undecodable, declared JSON but
not JSON) is refused with a 502 problem, never passed on in clear.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import ssl
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import aiohttp
import brotli  # type: ignore[import-untyped]
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .approvals import ApprovalBroker
from .audit import AuditError, AuditTrail, http_request_event
from .config import Connection, ProxyConfig, TLSConfig
from .guardrails import Guard
from .identity import Authenticator, AuthError, WorkloadIdentity
from .masking import Masker, MaskingEngine
from .metrics import Metrics
from .policy import ApprovalRef, Caller, Decision, check_access
from .secrets import SecretMissing, SecretStore

log = logging.getLogger(__name__)

PROTOCOL = "http"
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Never forwarded upstream: the caller's own credential and what we compute ourselves. aiohttp's
# server undoes a request body's Content-Encoding as it reads it, so the target gets it decoded.
STRIP_REQUEST = frozenset(
    {"authorization", "host", "content-length", "content-encoding", "expect", "x-sidegate-reason"}
)
# A masked caller must get the whole representation: a byte range of a JSON document cannot be
# parsed, so its field rules could not apply.
STRIP_MASKED_REQUEST = frozenset({"range", "if-range"})
# Headers that describe the upstream's bytes, which a masked body no longer is.
BODY_HEADERS = frozenset(
    {"content-length", "content-encoding", "etag", "content-md5", "digest", "content-digest",
     "repr-digest", "accept-ranges", "content-range"}
)
BINARY_TYPES = (
    "application/octet-stream", "image/", "audio/", "video/", "font/", "application/pdf",
    "application/zip", "application/gzip", "application/x-gzip", "application/x-tar",
    "application/x-bzip2", "application/x-xz", "application/zstd", "application/wasm",
    "application/x-protobuf", "application/protobuf", "application/grpc", "multipart/byteranges",
)
NDJSON_TYPES = ("application/x-ndjson", "application/jsonl", "application/x-jsonlines")
DECODABLE_ENCODINGS = "gzip, deflate, br"
PROBLEM_BASE = "https://sidegate.dev/problems/"
MAX_CACHED_CALLERS = 4096


class BodyTooLarge(Exception):
    pass


class Unmaskable(Exception):
    """A response body the masker cannot be sure to cover: refused, never passed on in clear."""


class MalformedBody(ValueError):
    pass


@dataclass(frozen=True)
class HTTPSettings:
    """Limits of the HTTP proxy; the defaults suit API traffic, not bulk downloads.

    ``read_timeout`` is the longest silence from the target (waiting for headers or between body
    chunks); ``total_timeout`` caps a whole exchange (``None``: no cap, so large transfers that
    keep moving are never cut)."""

    max_mask_bytes: int = 10 * 1024 * 1024
    max_inspect_bytes: int = 1024 * 1024
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    total_timeout: float | None = None
    chunk_size: int = 64 * 1024
    allow_websockets: bool = True
    max_connections: int = 256
    # Masked answers remembered by a digest of the clear body, per masker (0: none): an API
    # answering the same document again (polling, lists) is masked once. Masking is a pure
    # function of masker, content type and body, so a hit is exactly what masking would give.
    mask_cache_entries: int = 256
    mask_cache_max_bytes: int = 64 * 1024


@dataclass(frozen=True)
class Policy:
    """Everything one request is judged with, swapped as a whole by ``reload``: a request in
    flight keeps the snapshot it started with."""

    config: ProxyConfig
    authenticator: Authenticator
    guard: Guard
    masking: MaskingEngine
    workload: WorkloadIdentity | None = None
    # caller -> (access decision, masker): both pure functions of this snapshot and the caller,
    # and a bot sends many requests with one token (the authenticator hands back the same Caller)
    _per_caller: dict[Caller, tuple[Decision, Masker]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def connection(self) -> Connection:
        return self.config.connection

    def judge(self, caller: Caller) -> tuple[Decision, Masker]:
        """The access-list decision and the masker for ``caller``, memoised per caller."""
        hit = self._per_caller.get(caller)
        if hit is None:
            hit = (check_access(self.config.connection, caller), self.masking.for_caller(caller))
            if len(self._per_caller) >= MAX_CACHED_CALLERS:
                self._per_caller.clear()
            self._per_caller[caller] = hit
        return hit


# --------------------------------------------------------------------------- pure helpers


def problem(status: int, slug: str, title: str, detail: str, **extra: Any) -> web.Response:
    """An RFC 9457 problem+json answer: machine-readable type, human-readable detail."""
    body = {"type": PROBLEM_BASE + slug, "title": title, "status": status, "detail": detail, **extra}
    headers = None
    if status == 401:
        headers = {"WWW-Authenticate": 'Bearer realm="sidegate"', "Cache-Control": "no-store"}
    return web.Response(
        status=status,
        text=json.dumps(body),
        content_type="application/problem+json",
        headers=headers,
    )


def bearer_token(headers: Mapping[str, str]) -> str | None:
    value = headers.get("Authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def credential_headers(connection: Connection, secrets: SecretStore) -> dict[str, str]:
    """The gateway-held credential as headers; read per request so rotation needs no restart."""
    cred = connection.credentials
    ref = cred.secret_ref
    if cred.inject == "basic":
        user = secrets.get(ref, "username").decode()
        password = secrets.get(ref, "password").decode()
        encoded = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {encoded}"}
    token = secrets.get(ref, ref.key or "token").decode().strip()
    if not token or any(c in token for c in "\r\n"):
        raise SecretMissing(ref, "the token is empty or spans lines")
    if cred.inject == "header":
        return {cred.header or "X-Api-Key": token}
    return {"Authorization": f"Bearer {token}"}


def _connection_named(headers: CIMultiDictProxy[str]) -> set[str]:
    return {h.strip().lower() for v in headers.getall("Connection", []) for h in v.split(",")}


def forward_headers(
    headers: CIMultiDictProxy[str], peer: str | None, scheme: str, *, masked: bool = False
) -> CIMultiDict[str]:
    """Drops hop-by-hop headers (including those a Connection header names) and the caller's
    credential, then adds the standard forwarding headers."""
    named = _connection_named(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        lk = key.lower()
        if lk in HOP_BY_HOP or lk in STRIP_REQUEST or lk in named:
            continue
        if masked and lk in STRIP_MASKED_REQUEST:
            continue
        out.add(key, value)
    if masked and "Accept-Encoding" in out:
        out["Accept-Encoding"] = DECODABLE_ENCODINGS  # only what we can undo to mask
    if peer:
        prior = headers.get("X-Forwarded-For")
        out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    out["X-Forwarded-Proto"] = scheme
    return out


def response_headers(headers: CIMultiDictProxy[str], *, drop_body_headers: bool) -> CIMultiDict[str]:
    named = _connection_named(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        lk = key.lower()
        if lk in HOP_BY_HOP or lk in named or lk == "content-length":
            continue  # aiohttp sets Content-Length (or chunked encoding) from what we send
        if drop_body_headers and lk in BODY_HEADERS:
            continue
        out.add(key, value)
    return out


def decode_body(raw: bytes, encoding: str, limit: int) -> bytes:
    """Undo Content-Encoding with a size cap, so a compression bomb is refused, not expanded."""
    enc = encoding.strip().lower()
    if enc in ("", "identity"):
        if len(raw) > limit:
            raise BodyTooLarge
        return raw
    if enc in ("gzip", "x-gzip", "deflate"):
        wbits = 16 + zlib.MAX_WBITS if enc != "deflate" else zlib.MAX_WBITS
        d = zlib.decompressobj(wbits)
        try:
            out = d.decompress(raw, limit + 1)
        except zlib.error:
            if enc != "deflate":
                raise
            d = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, as some servers send
            out = d.decompress(raw, limit + 1)
        if len(out) > limit or d.unconsumed_tail:
            raise BodyTooLarge
        if not d.eof:
            raise ValueError("truncated compressed body")
        return out
    if enc == "br":
        dec = brotli.Decompressor()
        out = dec.process(raw, output_buffer_limit=limit + 1)
        if len(out) > limit or not dec.can_accept_more_data():
            raise BodyTooLarge
        if not dec.is_finished():
            raise ValueError("truncated compressed body")
        return bytes(out)
    raise ValueError(f"unsupported content-encoding {encoding!r}")


def mime_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def is_maskable(content_type: str) -> bool:
    """Fail closed: everything not known to be binary is text to scan (a missing type too)."""
    ct = mime_type(content_type)
    if ct.endswith(("+json", "+xml")) or "json" in ct:
        return True
    return not ct.startswith(BINARY_TYPES)


def is_json_type(content_type: str) -> bool:
    ct = mime_type(content_type)
    return ct not in NDJSON_TYPES and (ct.endswith("+json") or ct == "application/json" or ct == "text/json")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:  # parsers disagree on which one wins: refuse rather than guess
            raise MalformedBody(f"duplicate JSON key {key!r}")
        out[key] = value
    return out


def inspectable_body(data: bytes, content_type: str) -> Any:
    """The (decoded) request body as guardrails see it: JSON whatever the declared type, since
    targets often parse JSON regardless, or the fields of a form; ``None`` when it is neither."""
    ct = mime_type(content_type)
    if ct == "application/x-www-form-urlencoded":
        fields = parse_qs(data.decode("utf-8", "replace"), keep_blank_values=True)
        return {k: v[0] if len(v) == 1 else v for k, v in fields.items()}
    if not data.strip():
        return None
    try:
        return json.loads(data, object_pairs_hook=_no_duplicate_keys)
    except MalformedBody:
        raise
    except ValueError:
        if "json" in ct:
            raise MalformedBody("the JSON request body is malformed") from None
        return None


def decode_text(data: bytes, charset: str | None) -> tuple[str, str]:
    """Text and the charset to re-encode it with. Bytes that are not valid in the declared charset
    go through latin-1, which round-trips every byte, so nothing but masked spans changes."""
    for cs in (charset or "utf-8", "latin-1"):
        try:
            return data.decode(cs), cs
        except (UnicodeDecodeError, LookupError):
            continue
    raise AssertionError("latin-1 decodes any bytes")


def _merge(total: dict[str, int], counts: Mapping[str, int]) -> None:
    for rule, n in counts.items():
        total[rule] = total.get(rule, 0) + n


def mask_body(masker: Masker, text: str, content_type: str) -> tuple[str, dict[str, int]]:
    """Mask one body. JSON gets field rules and detectors; text that looks like JSON is treated as
    JSON whatever its label; anything else gets detectors."""
    counts: dict[str, int] = {}
    ct = mime_type(content_type)
    if ct in NDJSON_TYPES:
        lines = []
        for line in text.split("\n"):
            if not line.strip():
                lines.append(line)
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                raise Unmaskable("a JSON Lines record is not valid JSON") from None
            doc, c = masker.mask_json(doc)
            _merge(counts, c)
            lines.append(json.dumps(doc, ensure_ascii=False))
        return "\n".join(lines), counts
    if is_json_type(content_type) or text.lstrip()[:1] in ("{", "["):
        try:
            doc = json.loads(text)
        except ValueError:
            if is_json_type(content_type):
                raise Unmaskable("the response is declared JSON but is not valid JSON") from None
        else:
            doc, c = masker.mask_json(doc)
            _merge(counts, c)
            return json.dumps(doc, ensure_ascii=False), counts
    masked, c = masker.mask_text(text)
    _merge(counts, c)
    return masked, counts


def upstream_ssl(connection: Connection, secrets: SecretStore) -> ssl.SSLContext | bool:
    """TLS towards the target per ``target.tls``: verify-full (optionally with a private CA from a
    Secret), require (encrypted but unverified), or default verification for https URLs."""
    tls = connection.target.tls
    if tls.mode == "require":
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if tls.ca_secret_ref is not None:
        ca = secrets.get(tls.ca_secret_ref).decode()
        try:
            ctx = ssl.create_default_context(cadata=ca)
        except ssl.SSLError as exc:
            raise SecretMissing(tls.ca_secret_ref, f"not a PEM CA bundle: {exc}") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx
    return True


def _upstream_error(exc: BaseException) -> tuple[int, str, str, str]:
    """(status, problem slug, metric kind, detail) for a failure reaching the target."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | ssl.SSLCertVerificationError):
        return 502, "upstream-tls", "tls", "the target's TLS certificate is not trusted"
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        return 502, "upstream-tls", "tls", "TLS with the target failed"
    if isinstance(exc, TimeoutError):
        return 504, "upstream-timeout", "timeout", "the target did not answer in time"
    return 502, "upstream-unavailable", "connect", "the target could not be reached"


class _ConnectionMetrics:
    """The metric children one Connection's requests touch, bound once: ``.labels()`` takes a
    lock and builds a key tuple on every call, which adds up at thousands of requests a second."""

    __slots__ = ("_commands", "_masked", "latency", "metrics", "name", "sessions")

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.metrics = metrics
        self.name = name
        self.sessions = metrics.sessions.labels(name, PROTOCOL)
        self.latency = metrics.latency.labels(name, PROTOCOL)
        self._commands: dict[str, Any] = {}
        self._masked: dict[str, Any] = {}

    def command(self, action: str) -> None:
        child = self._commands.get(action)
        if child is None:
            child = self._commands[action] = self.metrics.commands.labels(self.name, PROTOCOL, action)
        child.inc()

    def masked(self, rule: str, n: int) -> None:
        child = self._masked.get(rule)
        if child is None:
            if len(self._masked) >= 1024:  # rule names come from config, but stay bounded
                self._masked.clear()
            child = self._masked[rule] = self.metrics.masked.labels(self.name, PROTOCOL, rule)
        child.inc(n)


# --------------------------------------------------------------------------- the proxy


class HTTPProxy:
    """One ``type: http`` Connection served on one aiohttp application."""

    def __init__(
        self,
        config: ProxyConfig,
        secrets: SecretStore,
        *,
        authenticator: Authenticator,
        guard: Guard,
        masking: MaskingEngine,
        audit: AuditTrail,
        metrics: Metrics,
        workload: WorkloadIdentity | None = None,
        settings: HTTPSettings | None = None,
        approvals: ApprovalBroker | None = None,
    ) -> None:
        self.secrets = secrets
        self.audit = audit
        self.metrics = metrics
        self.settings = settings or HTTPSettings()
        self.approvals = approvals
        self.policy = Policy(config, authenticator, guard, masking, workload)
        self._sessions: dict[TLSConfig, aiohttp.ClientSession] = {}
        self._metrics: _ConnectionMetrics | None = None
        self._masked_bodies: dict[tuple[Masker, str, bytes], tuple[bytes, dict[str, int]]] = {}

    @property
    def config(self) -> ProxyConfig:
        return self.policy.config

    @property
    def connection(self) -> Connection:
        return self.policy.connection

    def reload(
        self,
        config: ProxyConfig,
        *,
        authenticator: Authenticator,
        guard: Guard,
        masking_engine: MaskingEngine,
        workload: WorkloadIdentity | None = None,
    ) -> None:
        """New requests get the new policy; requests in flight finish on the one they started with."""
        self.policy = Policy(config, authenticator, guard, masking_engine, workload)
        self._masked_bodies = {}

    # ------------------------------------------------------------------ lifecycle

    def app(self) -> web.Application:
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_cleanup.append(self._on_cleanup)
        return app

    def _session(self, connection: Connection) -> aiohttp.ClientSession:
        """One pooled session per upstream TLS setting, built on first use (a CA Secret that is
        missing fails the request, not the process)."""
        tls = connection.target.tls
        session = self._sessions.get(tls)
        if session is None:
            s = self.settings
            session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    total=s.total_timeout, sock_connect=s.connect_timeout, sock_read=s.read_timeout
                ),
                auto_decompress=False,
                connector=aiohttp.TCPConnector(
                    limit=s.max_connections, ssl=upstream_ssl(connection, self.secrets)
                ),
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
                cookie_jar=aiohttp.DummyCookieJar(),  # one jar would share cookies between callers
            )
            self._sessions[tls] = session
        return session

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()

    async def _on_cleanup(self, _: web.Application) -> None:
        await self.close()

    # ------------------------------------------------------------------ the request path

    async def handle(self, request: web.Request) -> web.StreamResponse:
        policy = self.policy
        conn = policy.connection
        m = self._metrics
        if m is None or m.name != conn.name:
            m = self._metrics = _ConnectionMetrics(self.metrics, conn.name)
        record = RequestRecord(request=request, started=time.perf_counter())
        m.sessions.inc()
        try:
            response = await self._handle(policy, request, record)
            record.status = record.status or response.status
            return response
        finally:
            m.sessions.dec()
            elapsed = time.perf_counter() - record.started
            m.command(record.decision.action)
            m.latency.observe(elapsed)
            for rule, n in record.masked.items():
                m.masked(rule, n)
            await self._record(conn, record, elapsed)

    async def _handle(
        self, policy: Policy, request: web.Request, record: RequestRecord
    ) -> web.StreamResponse:
        conn = policy.connection
        caller = await self._authenticate(policy, request, record)
        if caller is None:
            return problem(401, "unauthenticated", "Unauthorized", record.reason)
        record.caller = caller
        access, masker = policy.judge(caller)
        if not access.allowed:
            record.decision = access
            record.reason = access.reason
            self.metrics.auth_failures.labels(conn.name, PROTOCOL, "access").inc()
            return problem(403, "access-denied", "Forbidden", access.reason)

        method, path = request.method, request.rel_url.raw_path
        body: bytes | None = None
        json_body: Any = None
        if policy.guard.needs_http_body(method, path) and request.body_exists:
            limit = self.settings.max_inspect_bytes
            try:
                body = await self._read_limited(request.content, limit)
                json_body = inspectable_body(body, request.headers.get("Content-Type", ""))
            except BodyTooLarge:
                record.decision = Decision("block", "body-inspection", "request body too large to inspect")
                return problem(413, "body-too-large", "Request body too large",
                               f"guardrails inspect request bodies up to {limit} bytes; it was not forwarded")
            except MalformedBody as exc:
                record.decision = Decision("block", "body-inspection", str(exc))
                return problem(400, "malformed-body", "Bad Request", str(exc))
        decision = policy.guard.check_http(caller, method, path, json_body)
        record.decision = decision
        if decision.action == "block":
            return problem(403, "blocked", "Blocked by guardrail", decision.reason, rule=decision.rule)
        if decision.action == "requireApproval":
            if self.approvals is None:
                return problem(403, "approval-required", "Approval required", decision.reason, rule=decision.rule)
            if body is None and request.body_exists:
                try:
                    body = await self._read_limited(request.content, self.settings.max_inspect_bytes)
                except BodyTooLarge:
                    return problem(413, "body-too-large", "Request body too large",
                                   "a request that needs approval is bound to its body, which is too large")
            statement = approval_statement(method, request.rel_url.raw_path_qs, body)
            outcome = await self.approvals.authorize(
                caller, statement, request.headers.get("X-Sidegate-Reason"), record.request_id
            )
            if not outcome.allowed:
                record.reason = outcome.message
                return problem(403, "approval-required", "Approval required", outcome.message, rule=decision.rule,
                               accessRequest=outcome.request_name)
            record.approval = outcome.approval
            record.decision = Decision("allow", decision.rule, f"approved in AccessRequest {outcome.request_name}")

        try:
            cred = credential_headers(conn, self.secrets)
            session = self._session(conn)
        except SecretMissing as exc:
            log.error("connection %s: %s", conn.ref, exc)
            self.metrics.upstream_errors.labels(conn.name, PROTOCOL, "secret").inc()
            record.reason = "gateway secret unavailable"
            return problem(502, "secret-missing", "Bad Gateway",
                           "a Secret the gateway needs for this connection is unavailable")

        if (
            self.settings.allow_websockets
            and method == "GET"
            and request.headers.get("Upgrade", "").lower() == "websocket"
        ):
            return await self._websocket(conn, session, request, cred, masker, record)
        return await self._forward(conn, session, request, cred, body, masker, record)

    async def _authenticate(
        self, policy: Policy, request: web.Request, record: RequestRecord
    ) -> Caller | None:
        conn = policy.connection
        try:
            if conn.identity.workload and policy.workload is not None:
                return await policy.workload.caller()
            token = bearer_token(request.headers)
            if token is None:
                record.reason = "a bearer token is required"
                self.metrics.auth_failures.labels(conn.name, PROTOCOL, "missing").inc()
                return None
            return await policy.authenticator.authenticate(token)
        except AuthError as exc:
            record.reason = exc.reason
            self.metrics.auth_failures.labels(conn.name, PROTOCOL, "invalid").inc()
            return None

    async def _read_limited(self, stream: aiohttp.StreamReader, limit: int) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in stream.iter_chunked(self.settings.chunk_size):
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def _upstream_url(conn: Connection, request: web.Request) -> URL:
        """The target URL with the request's path and query exactly as received (already encoded:
        what the guardrails judged is what the target gets)."""
        base = (conn.target.url or "").rstrip("/")
        return URL(base + request.rel_url.raw_path_qs, encoded=True)

    def _fail(self, conn: Connection, record: RequestRecord, exc: BaseException) -> web.Response:
        status, slug, kind, detail = _upstream_error(exc)
        self.metrics.upstream_errors.labels(conn.name, PROTOCOL, kind).inc()
        record.reason = f"{detail}: {type(exc).__name__}"
        log.warning("connection %s: %s (%s: %s)", conn.ref, detail, type(exc).__name__, exc)
        return problem(status, slug, "Gateway Timeout" if status == 504 else "Bad Gateway", detail)

    async def _forward(
        self,
        conn: Connection,
        session: aiohttp.ClientSession,
        request: web.Request,
        cred: dict[str, str],
        body: bytes | None,
        masker: Masker,
        record: RequestRecord,
    ) -> web.StreamResponse:
        headers = forward_headers(request.headers, request.remote, request.scheme, masked=masker.active)
        headers.update(cred)
        data: Any = None
        if body is not None:
            data = body
        elif request.body_exists:
            data = request.content.iter_chunked(self.settings.chunk_size)
            if request.content_length is not None and not request.headers.get("Content-Encoding"):
                # keep it: not every target takes chunked uploads
                headers["Content-Length"] = str(request.content_length)
        try:
            upstream = await session.request(
                request.method, self._upstream_url(conn, request), headers=headers, data=data,
                allow_redirects=False,
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return self._fail(conn, record, exc)
        async with upstream:
            content_type = upstream.headers.get("Content-Type", "")
            bodiless = request.method == "HEAD" or upstream.status in (204, 304)
            if masker.active and not bodiless and is_maskable(content_type):
                return await self._masked_response(conn, request, upstream, masker, record)
            return await self._stream_response(conn, request, upstream, record)

    async def _stream_response(
        self, conn: Connection, request: web.Request, upstream: aiohttp.ClientResponse, record: RequestRecord
    ) -> web.StreamResponse:
        headers = response_headers(upstream.headers, drop_body_headers=False)
        record.status = upstream.status
        size = upstream.content_length
        if size is not None and size <= self.settings.chunk_size and request.method != "HEAD":
            # small bodies (most API answers) go out in one write with their headers
            try:
                body = await upstream.content.readexactly(size)
            except (aiohttp.ClientError, TimeoutError, asyncio.IncompleteReadError) as exc:
                return self._fail(conn, record, exc)
            return web.Response(status=upstream.status, reason=upstream.reason, body=body, headers=headers)
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        if upstream.content_length is not None:
            resp.content_length = upstream.content_length
        record.status = upstream.status
        await resp.prepare(request)
        try:
            async for chunk in upstream.content.iter_chunked(self.settings.chunk_size):
                await resp.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The status line is gone: cut the connection so the client sees a truncated body,
            # never a clean end of a partial one.
            _, _, kind, detail = _upstream_error(exc)
            self.metrics.upstream_errors.labels(conn.name, PROTOCOL, kind).inc()
            record.reason = f"response body interrupted: {detail}"
            if request.transport is not None:
                request.transport.abort()
            return resp
        except OSError:
            record.reason = "client went away"
            return resp
        await resp.write_eof()
        return resp

    async def _masked_response(
        self,
        conn: Connection,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        masker: Masker,
        record: RequestRecord,
    ) -> web.StreamResponse:
        limit = self.settings.max_mask_bytes

        def refuse(slug: str, title: str, detail: str) -> web.Response:
            record.reason = detail
            self.metrics.upstream_errors.labels(conn.name, PROTOCOL, "unmaskable").inc()
            return problem(502, slug, title, detail + "; it was refused rather than passed on in clear")

        too_large = f"the response exceeds the masking limit of {limit} bytes"
        if upstream.content_length is not None and upstream.content_length > limit:
            return refuse("response-too-large", "Response too large to mask", too_large)
        try:
            if upstream.content_length is not None:  # most API answers: one read, no chunk loop
                raw = await upstream.content.readexactly(upstream.content_length)
            else:
                raw = await self._read_limited(upstream.content, limit)
            data = decode_body(raw, upstream.headers.get("Content-Encoding", ""), limit)
        except BodyTooLarge:
            return refuse("response-too-large", "Response too large to mask", too_large)
        except (aiohttp.ClientError, TimeoutError, asyncio.IncompleteReadError) as exc:
            return self._fail(conn, record, exc)
        except (ValueError, zlib.error, brotli.error) as exc:
            log.warning("connection %s: undecodable response body: %s", conn.ref, exc)
            return refuse("undecodable-response", "Bad Gateway", "the response body could not be decoded")
        content_type = upstream.headers.get("Content-Type", "")
        try:
            body, counts = self._mask_cached(masker, data, content_type, upstream.charset)
        except Unmaskable as exc:
            return refuse("unmaskable-response", "Bad Gateway", str(exc))
        record.masked = counts
        headers = response_headers(upstream.headers, drop_body_headers=True)
        return web.Response(status=upstream.status, reason=upstream.reason, body=body, headers=headers)

    def _mask_cached(
        self, masker: Masker, data: bytes, content_type: str, charset: str | None
    ) -> tuple[bytes, dict[str, int]]:
        """The masked body and its counts; from the memo when this masker has masked the same
        bytes of the same type before. Only successes are remembered: an unmaskable body is
        judged (and refused) every time."""
        s = self.settings
        key = None
        if s.mask_cache_entries > 0 and len(data) <= s.mask_cache_max_bytes:
            key = (masker, content_type, hashlib.sha256(data).digest())
            hit = self._masked_bodies.get(key)
            if hit is not None:
                return hit[0], dict(hit[1])
        text, cs = decode_text(data, charset)
        masked, counts = mask_body(masker, text, content_type)
        body = masked.encode(cs, "replace")
        if key is not None:
            memo = self._masked_bodies
            if len(memo) >= s.mask_cache_entries:
                del memo[next(iter(memo))]  # the oldest
            memo[key] = (body, dict(counts))
        return body, counts

    async def _websocket(
        self,
        conn: Connection,
        session: aiohttp.ClientSession,
        request: web.Request,
        cred: dict[str, str],
        masker: Masker,
        record: RequestRecord,
    ) -> web.StreamResponse:
        headers = forward_headers(request.headers, request.remote, request.scheme)
        for h in ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions",
                  "Sec-WebSocket-Protocol"):
            headers.popall(h, None)
        headers.update(cred)
        offered = request.headers.get("Sec-WebSocket-Protocol", "")
        protocols = [p.strip() for p in offered.split(",") if p.strip()]
        try:
            upstream = await session.ws_connect(
                self._upstream_url(conn, request), headers=headers, protocols=protocols,
                autoping=True, max_msg_size=self.settings.max_mask_bytes,
            )
        except aiohttp.WSServerHandshakeError as exc:
            record.reason = f"the target refused the WebSocket: HTTP {exc.status}"
            return problem(502, "upstream-refused-websocket", "Bad Gateway", record.reason)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return self._fail(conn, record, exc)
        ws = web.WebSocketResponse(protocols=[upstream.protocol] if upstream.protocol else (),
                                   max_msg_size=self.settings.max_mask_bytes)
        await ws.prepare(request)
        record.status = 101
        masked: dict[str, int] = {}

        async def client_to_upstream() -> None:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await upstream.send_str(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    await upstream.send_bytes(msg.data)

        async def upstream_to_client() -> None:
            async for msg in upstream:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    data = msg.data
                    if masker.active:
                        try:
                            data, counts = mask_body(masker, data, "")
                        except Unmaskable:
                            break
                        _merge(masked, counts)
                    await ws.send_str(data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)

        tasks = [asyncio.ensure_future(client_to_upstream()), asyncio.ensure_future(upstream_to_client())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await upstream.close()
            await ws.close()
            record.masked = masked
        return ws

    async def _record(self, conn: Connection, record: RequestRecord, elapsed: float) -> None:
        request = record.request
        event = http_request_event(
            connection=conn,
            caller=record.caller,
            session_id=record.request_id,
            method=request.method,
            path=request.rel_url.raw_path,
            query=request.rel_url.raw_query_string,
            status=record.status,
            decision=record.decision,
            masked=record.masked,
            duration_ms=elapsed * 1000.0,
            client=request.remote,
            reason=request.headers.get("X-Sidegate-Reason") or record.reason or None,
            approval=record.approval,
        )
        try:
            if record.decision.action == "allow":
                self.audit.emit_nowait(event)
            else:
                await self.audit.emit(event)  # durable before the refusal is sent
        except AuditError as exc:
            log.error("connection %s: audit event lost: %s", conn.ref, exc)


def approval_statement(method: str, target: str, body: bytes | None) -> str:
    """What an HTTP approval is bound to: method, path and query, and a digest of the body, so an
    approval of one request body does not authorise another."""
    statement = f"{method.upper()} {target}"
    if body:
        statement += f" body:sha256:{hashlib.sha256(body).hexdigest()}"
    return statement


_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def request_id() -> str:
    """``uuid.uuid4().hex`` (random, version 4, RFC 4122 variant) without building a UUID object."""
    n = int.from_bytes(os.urandom(16), "big")
    return f"{(n & _UUID4_CLEAR) | _UUID4_SET:032x}"


class RequestRecord:
    """What one request did, filled in as it goes, turned into its audit event at the end."""

    __slots__ = ("approval", "caller", "decision", "masked", "reason", "request", "request_id", "started", "status")

    def __init__(self, request: web.Request, started: float) -> None:
        self.request = request
        self.started = started
        self.request_id = request_id()
        self.caller: Caller | None = None
        self.decision: Decision = Decision("block", "identity", "unauthenticated")
        self.masked: dict[str, int] = {}
        self.approval: ApprovalRef | None = None
        self.reason = ""
        self.status = 0
