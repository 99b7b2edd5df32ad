"""The PostgreSQL data plane: an asyncio server speaking the v3 protocol on both sides.

A session is two loops over one state: the *client loop* reads frontend messages, decides
(guardrails), and forwards; the *server loop* reads backend messages, masks DataRows, audits
results and writes everything the client sees. Every message sent upstream that will be answered
pushes an expectation on a FIFO, so the server loop knows which request each response belongs to
(the protocol answers strictly in order, pipelining included).

The upstream stays the authority on protocol and transaction state: a blocked statement is not
answered by the proxy out of band, it is replaced by a *poison* statement (a syntax error) that
the upstream rejects exactly where the real one would have failed, and the proxy rewrites that
error into its own. A blocked statement therefore aborts the transaction it was in, a pipeline is
skipped until Sync, and ReadyForQuery always carries the server's real transaction status.

Decisions in brief (see also the module docstrings of guardrails, masking and pgcatalog):

* Client identity: the password is a JWT (``AuthenticationCleartextPassword``: serve TLS with
  ``ssl_context``); sidecar ``identity.workload`` uses the pod's own token and asks for nothing.
* Startup parameters forwarded upstream: ``application_name``, ``client_encoding`` (UTF8 or
  SQL_ASCII only, since statement text is checked as UTF-8), ``DateStyle``, ``TimeZone``,
  ``IntervalStyle``, ``extra_float_digits``. Not ``options`` (it sets arbitrary GUCs, roles
  included, invisible to guardrails) and never ``replication``.
* A session whose upstream reports ``standard_conforming_strings=off`` or a client encoding that
  is not ASCII-compatible UTF-8 is closed: the classifier could read strings differently.
* Fast-path ``FunctionCall`` is refused (it calls functions by OID, past every SQL rule).
* Audit: one event per statement of a simple Query (statements that never ran because an earlier
  one failed are not reported), one per Execute in the extended protocol; blocked statements are
  spooled (``await emit``) before the client sees the error.
* COPY TO STDOUT with masking active: refused (42501) when the copied relation has a masked
  column or cannot be resolved, otherwise every data line goes through the detectors.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import secrets as _secrets
import ssl
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

from . import LANE, pgwire
from .audit import (
    LANE_SLOTS,
    MAX_COMMAND,
    SENSITIVE_WORDS,
    AuditTrail,
    CommandTemplate,
    command_event,
    lane_shape,
    session_end,
    session_start,
)
from .config import Connection, ProxyConfig
from .guardrails import Guard, SQLVerdict
from .httpproxy import upstream_ssl
from .identity import Authenticator, AuthError, WorkloadIdentity
from .masking import ColumnOrigin, ColumnPlan, Masker, MaskingEngine, MaskingError, strictest
from .metrics import LATENCY_BOUNDS, Metrics, observe_buckets
from .pgauth import METHODS, AuthFailed, UpstreamLogin, salted_password
from .pgcatalog import Catalog, CatalogError, Origin
from .pgwire import (
    Bind,
    CancelRequest,
    Close,
    CommandComplete,
    CopyData,
    CopyDone,
    CopyFail,
    CopyResponse,
    DataRow,
    Describe,
    EmptyQueryResponse,
    ErrorResponse,
    Execute,
    Flush,
    FunctionCall,
    GSSENCRequest,
    Message,
    NoData,
    NoticeResponse,
    NotificationResponse,
    ParameterDescription,
    ParameterStatus,
    Parse,
    PasswordMessage,
    PortalSuspended,
    ProtocolError,
    Query,
    ReadyForQuery,
    RowDescription,
    SSLRequest,
    StartupMessage,
    Sync,
    Terminate,
)
from .policy import Caller, Decision, check_access
from .secrets import SecretMissing, SecretStore
from .sqlparse import ALL_COLUMNS, statement_text
from .tls import TLSTransport, take_over
from .tls import handshake as tls_handshake

__all__ = ["ProxyServer", "ProxySettings", "UpstreamError", "open_upstream"]

log = logging.getLogger(__name__)

PROTOCOL: Final = "postgres"
READ_SIZE = 256 * 1024
MAX_PASSWORD = 64 * 1024  # a JWT, before anyone is authenticated
CATALOG_TIMEOUT = 10.0
FORWARDED_PARAMS = ("application_name", "DateStyle", "TimeZone", "IntervalStyle", "extra_float_digits")
SAFE_ENCODINGS = frozenset({"UTF8", "UTF-8", "UNICODE", "SQL_ASCII"})
# A statement PostgreSQL rejects at parse time: sent upstream in place of a blocked one.
POISON_SQL = "sidegate: statement blocked by the gateway"
CANCELLED_RULE = "client-cancel"  # the rule of a statement the client cancelled while it was held
# The one decision that means "cancelled while held": told apart by identity, never by its rule
# name, which a user's own guardrail could also have.
CANCELLED: Final = Decision("block", CANCELLED_RULE, "canceling statement due to user request")
MAX_PLANS_PER_SESSION = 256  # cached masking plans (result shapes) per session
MAX_AUDIT_TEMPLATES = 16  # audit templates a session keeps (by decision, class and outcome)
# what the native lane may relay (``Session._enter_lane``): statements that only read or write rows;
# and how long a session stays in it, at most, while masking plans hold (then Python checks that
# the catalog still gives them; a session without masking stays until it needs Python)
LANE_COMMANDS = frozenset({"select", "insert", "update", "delete"})
LANE_RECHECK = 1.0
MAX_LANE_QUERIES = 64  # simple-query shapes a session hands the lane (by literal key)
LANE_REPORT_EVERY = 0.02  # seconds: how late the lane's statements reach the audit, at most
LANE_REPORT_RECORDS = 128  # ... or sooner, once this many wait (bench/: fewer wake-ups, short bursts)
_LANE: Final[Any] = LANE
# the lane's code for each slot of an audit record it fills per statement (``audit.lane_shape``)
_SEAL_CODES: Final[dict[str, int]] = {name: getattr(LANE, f"SEAL_{name.upper()}") for name in LANE_SLOTS} \
    if LANE is not None else {}
_NO_MASKS: Final[dict[str, int]] = {}
_SELECT: Final = frozenset({"select"})


class UpstreamError(Exception):
    """The target could not be reached or logged in to; ``str()`` is safe to show a client."""

    def __init__(self, message: str, kind: str = "connect", sqlstate: str = "08006") -> None:
        super().__init__(message)
        self.kind = kind
        self.sqlstate = sqlstate


class _Closed(Exception):
    """The session ends (client or upstream went away, Terminate, FATAL)."""


@dataclass(frozen=True)
class ProxySettings:
    handshake_timeout: float = 15.0  # TLS + startup + token, before anything upstream happens
    connect_timeout: float = 10.0
    idle_timeout: float | None = None  # seconds without a client message; None: no limit
    max_message: int = pgwire.MAX_MESSAGE
    upstream_auth: frozenset[str] = METHODS  # like libpq's require_auth
    catalog_connections: int = 2
    catalog_ttl: float = 300.0
    lane: bool = True  # relay a session's steady state natively (plain TCP or TLS), when the lane is built
    lane_seals: bool = True  # the lane seals its statements' audit records in C (else Python does)


# --------------------------------------------------------------------------- upstream connections


@dataclass
class Upstream:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    parser: pgwire.BackendParser
    key: tuple[int, int] | None
    status: list[Message]  # ParameterStatus and notices of the login, to replay to the client

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


def _upstream_tls(connection: Connection, secrets: SecretStore) -> ssl.SSLContext | None:
    if connection.target.tls.mode == "disable":
        return None
    ctx = upstream_ssl(connection, secrets)
    return ctx if isinstance(ctx, ssl.SSLContext) else ssl.create_default_context()


async def open_upstream(
    connection: Connection,
    secrets: SecretStore,
    params: Mapping[str, str],
    *,
    settings: ProxySettings,
    derive: Callable[[bytes, bytes, int], bytes] = salted_password,
) -> Upstream:
    """Connect to the target and log in with the gateway-held credential (SCRAM, md5, password).

    Returns after ReadyForQuery. Raises ``UpstreamError`` with a message that never includes the
    credential; the upstream's own error text is only passed on after a successful login.
    """
    target = connection.target
    ref = connection.credentials.secret_ref
    try:
        user = secrets.get(ref, "username").decode()
        password = secrets.get(ref, "password").decode()
    except (SecretMissing, UnicodeDecodeError, ValueError) as missing:
        log.error("credentials for %s unusable: %s", connection.ref, missing)
        raise UpstreamError("sidegate: the gateway's credentials for the target are unavailable",
                            "secret") from None
    try:
        tls = _upstream_tls(connection, secrets)
    except (SecretMissing, UnicodeDecodeError, ssl.SSLError, ValueError) as bad_ca:
        log.error("TLS CA (spec.target.tls.caSecretRef) for %s unusable: %s", connection.ref, bad_ca)
        raise UpstreamError("sidegate: the CA bundle for TLS with the target is unavailable", "secret") from None
    host, port = str(target.host), int(target.port or 5432)
    # each ``except ... as`` of a coroutine has its own name: compiled (mypyc), one name keeps the
    # type of its first clause for the whole function, and a later clause's exception fails that check
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), settings.connect_timeout)
    except (OSError, TimeoutError) as unreachable:
        log.warning("upstream %s:%s unreachable: %s", host, port, unreachable)
        raise UpstreamError("sidegate: the target database is unreachable") from None
    try:
        if tls is not None:
            writer.write(pgwire.ssl_request())
            answer = await asyncio.wait_for(reader.readexactly(1), settings.connect_timeout)
            if answer != b"S":
                raise UpstreamError("sidegate: the target does not support TLS", "tls")
            if getattr(reader, "_buffer", b""):  # CVE-2021-23222: plaintext injected before the handshake
                raise UpstreamError("sidegate: TLS with the target failed: unencrypted data after its answer",
                                    "tls")
            reader, writer = await asyncio.wait_for(
                tls_handshake(reader, writer, tls, server_side=False,
                              server_hostname=host if tls.check_hostname else None),
                settings.connect_timeout,
            )
        startup = {"user": user, "database": str(target.database), **params}
        writer.write(pgwire.startup_message(startup))
        login = UpstreamLogin(user, password, allowed=settings.upstream_auth, derive=derive)
        parser = pgwire.BackendParser(settings.max_message)
        key: tuple[int, int] | None = None
        status: list[Message] = []
        while True:
            data = await asyncio.wait_for(reader.read(READ_SIZE), settings.connect_timeout)
            if not data:
                raise UpstreamError("sidegate: the target closed the connection during login")
            for msg in parser.feed(data):
                if isinstance(msg, pgwire.Authentication):
                    out = login.feed(msg)
                    if out:
                        writer.write(out)
                elif isinstance(msg, ParameterStatus | NoticeResponse):  # NoticeResponse is an ErrorResponse
                    status.append(msg)
                elif isinstance(msg, ErrorResponse):
                    if not login.done:
                        log.warning("upstream login for %s refused: %s %s", connection.ref, msg.sqlstate,
                                    msg.message)
                        raise UpstreamError("sidegate: the gateway could not log in to the target", "auth")
                    raise UpstreamError(f"sidegate: the target refused the session: {msg.message}", "refused",
                                        msg.sqlstate or "08006")
                elif isinstance(msg, pgwire.BackendKeyData):
                    key = (msg.pid, msg.secret)
                elif isinstance(msg, ReadyForQuery):
                    if not login.done:
                        raise UpstreamError("sidegate: the target skipped authentication", "auth")
                    return Upstream(reader, writer, parser, key, status)
                else:
                    raise _unexpected(msg)
            await writer.drain()
    except AuthFailed as refused:
        writer.close()
        log.warning("upstream login for %s failed: %s", connection.ref, refused)
        raise UpstreamError("sidegate: the gateway could not log in to the target", "auth") from None
    except ProtocolError as garbled:
        writer.close()
        raise UpstreamError(f"sidegate: protocol error from the target: {garbled}", "protocol") from None
    except ssl.SSLError as tls_failed:
        writer.close()
        log.warning("upstream %s:%s TLS failed: %r", host, port, tls_failed)
        why = ": its certificate is not trusted" if isinstance(tls_failed, ssl.SSLCertVerificationError) else ""
        raise UpstreamError(f"sidegate: TLS with the target failed{why}", "tls") from None
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as lost:
        writer.close()
        log.warning("upstream %s:%s failed during login: %r", host, port, lost)
        raise UpstreamError("sidegate: the target database is unreachable", "connect") from None
    except BaseException:
        writer.close()
        raise


class _CatalogPool:
    """The gateway's own connections for catalog lookups (never a client's session)."""

    def __init__(self, connect: Callable[[], Awaitable[Upstream]], size: int) -> None:
        self._connect = connect
        self._idle: list[Upstream] = []
        self._slots = asyncio.Semaphore(max(1, size))

    async def run(self, sql: str) -> list[list[str | None]]:
        async with self._slots:
            up = self._idle.pop() if self._idle else None
            try:
                if up is None:
                    up = await self._connect()
                rows = await _simple_query(up, sql)
            except (UpstreamError, OSError, ProtocolError, TimeoutError, asyncio.IncompleteReadError) as exc:
                if up is not None:
                    up.close()
                raise CatalogError(f"catalog lookup failed: {exc}") from None
            except CatalogError:
                assert up is not None
                self._idle.append(up)  # an SQL error leaves the connection usable
                raise
            self._idle.append(up)
            return rows

    def close(self) -> None:
        for up in self._idle:
            up.close()
        self._idle.clear()


async def _simple_query(up: Upstream, sql: str) -> list[list[str | None]]:
    up.writer.write(pgwire.query(sql))
    await up.writer.drain()
    rows: list[list[str | None]] = []
    error: str | None = None
    while True:
        data = await asyncio.wait_for(up.reader.read(READ_SIZE), CATALOG_TIMEOUT)
        if not data:
            raise UpstreamError("catalog connection closed")
        for msg in up.parser.feed(data):
            if isinstance(msg, DataRow):
                rows.append([None if v is None else v.decode("utf-8", "replace") for v in msg.values()])
            elif isinstance(msg, ErrorResponse):
                error = f"{msg.sqlstate} {msg.message}"
            elif isinstance(msg, ReadyForQuery):
                if error is not None:
                    raise CatalogError(error)
                return rows


# --------------------------------------------------------------------------- per-session policy


@dataclass(frozen=True)
class _Policy:
    """Everything one session enforces, fixed when it starts (``reload`` makes a new one)."""

    config: ProxyConfig
    authenticator: Authenticator
    guard: Guard
    masking: MaskingEngine | None
    workload: WorkloadIdentity | None
    catalog: Catalog | None

    @property
    def connection(self) -> Connection:
        return self.config.connection


ApprovalHook = Callable[["Session", str, SQLVerdict], Awaitable[Decision]]


# --------------------------------------------------------------------------- expectations


# Per-request bookkeeping, made for every statement: plain classes with written-out initialisers,
# which the compiled data plane runs natively (a dataclass-generated one runs as Python).


class _Statement:
    __slots__ = ("command_class", "decision", "native", "sql", "verdict")

    def __init__(self, sql: str, verdict: SQLVerdict, decision: Decision, command_class: str | None) -> None:
        self.sql = sql
        self.verdict = verdict
        self.decision = decision  # what allowed it: the guardrail's verdict, or an approval
        self.command_class = command_class  # for the audit of each execution, worked out once
        self.native = decision.allowed and verdict.commands <= LANE_COMMANDS  # the lane may relay it


class _Portal:
    __slots__ = ("formats", "plan", "plan_on_describe", "statement")

    def __init__(self, statement: _Statement | None, formats: tuple[int, ...]) -> None:
        self.statement = statement
        self.formats = formats
        self.plan: ColumnPlan | None = None
        self.plan_on_describe = False  # planned from the client's Describe, not an injected one


class _Pending:
    """A request sent upstream whose responses are still to come."""

    __slots__ = (
        "copy_scan",
        "decision",
        "describe_portal",
        "index",
        "kind",
        "masked",
        "plan",
        "portal",
        "replace_error",
        "started",
        "verdict",
    )

    def __init__(self, kind: str, replace_error: bytes | None = None, portal: _Portal | None = None,
                 describe_portal: str | None = None, verdict: SQLVerdict | None = None,
                 decision: Decision | None = None) -> None:
        self.kind = kind  # query parse bind describe inject execute close sync
        self.replace_error = replace_error  # poison: the upstream's error is replaced by this one
        self.portal = portal
        self.describe_portal = describe_portal
        self.started = time.perf_counter()
        # simple Query bookkeeping
        self.verdict = verdict
        self.decision = decision
        self.index = 0
        self.plan: ColumnPlan | None = None
        self.masked: dict[str, int] = {}
        self.copy_scan = False


# Requests whose answer is one fixed acknowledgement carry no state of their own: one shared,
# never-modified entry each (answers to "query", "execute", "describe" and poison are per request).
_ACK_PARSE: Final = _Pending("parse")
_ACK_BIND: Final = _Pending("bind")
_ACK_CLOSE: Final = _Pending("close")
_ACK_SYNC: Final = _Pending("sync")
_ACKNOWLEDGED_BY: Final[Mapping[str, type[Message]]] = {
    "parse": pgwire.ParseComplete, "bind": pgwire.BindComplete, "close": pgwire.CloseComplete, "sync": ReadyForQuery,
}


# --------------------------------------------------------------------------- the session


CLIENT: Final = 0
SERVER: Final = 1
_NO_PLAN: Final = (None, 0, 0.0)  # ``Session._known_plan`` without a masker: nothing to mask
# a message handled synchronously (None) or the coroutine that finishes handling it
_Handler = Coroutine[Any, Any, None] | None


def _lane_tls(transport: Any) -> object:
    """What the lane is given for one side: None (plain TCP), the SSL object it drives (a
    ``TLSTransport``'s), or False when it cannot carry that side."""
    if transport.get_extra_info("ssl_object") is None:
        return None
    owner = getattr(transport.ssl_object, "_sslobj", None) if isinstance(transport, TLSTransport) else None
    return owner if owner is not None and _LANE is not None and _LANE.tls_drivable(owner) else False


class _RelayProtocol(asyncio.Protocol):
    """One side of a session past its handshake: bytes straight to the session's handlers."""

    def __init__(self, session: Session, side: int) -> None:
        self.session = session
        self.side = side

    def data_received(self, data: bytes) -> None:
        self.session._on_data(self.side, data)

    def eof_received(self) -> bool:
        self.session._on_eof(self.side)
        # keep a plain client socket writable (half close) for the answers still in flight
        return self.side == CLIENT and not self.session._client_tls

    def connection_lost(self, exc: Exception | None) -> None:
        self.session._on_lost(self.side, exc)

    def pause_writing(self) -> None:
        self.session._set_backpressure(1 - self.side, True)

    def resume_writing(self) -> None:
        self.session._set_backpressure(1 - self.side, False)


async def _in_task() -> None:
    """Called before anything that truly waits: a handler driven by hand from a transport
    callback (no current task) continues in a task from here, where timeouts and locks that
    ask for ``asyncio.current_task()`` work."""
    if asyncio.current_task() is None:
        await asyncio.sleep(0)


class _Resume:
    """Awaitable that finishes a coroutine already started by hand (``coro.send(None)`` gave
    ``waiting``): the handlers run synchronously until one really has to wait."""

    def __init__(self, coro: Coroutine[Any, Any, None], waiting: Any) -> None:
        self.coro = coro
        self.waiting = waiting

    def __await__(self) -> Generator[Any, Any, None]:
        waiting = self.waiting
        while True:
            try:
                sent = yield waiting
            except GeneratorExit:
                self.coro.close()
                raise
            except BaseException as exc:  # thrown in by the task (cancellation...): pass it on
                try:
                    waiting = self.coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    waiting = self.coro.send(sent)
                except StopIteration:
                    return


class Session:
    """One client connection: authentication, the upstream, and the two loops."""

    def __init__(self, server: ProxyServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.policy = server._policy
        self.reader = reader
        self.writer = writer
        self.id = uuid.uuid4().hex
        peer = writer.get_extra_info("peername")
        self.client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else None
        self.caller: Caller | None = None
        self.masker: Masker | None = None
        self.upstream: Upstream | None = None
        self.key: tuple[int, int] | None = None
        self.fparser = pgwire.FrontendParser(server.settings.max_message)
        self.pending: deque[_Pending] = deque()
        self.statements: dict[str, _Statement] = {}
        self.portals: dict[str, _Portal] = {}
        self.prepared: dict[str, str] = {}  # SQL-level PREPARE name -> text
        self.skip_until_sync = False
        # Messages each way are gathered and written once per read chunk: one syscall per
        # round trip instead of one per message (RowDescription, DataRows, CommandComplete, ...).
        self._to_client: list[bytes] = []
        self._to_upstream: list[bytes] = []
        self._early: list[Message] = []
        self.params: Mapping[str, str] = {}  # the client's startup parameters (application_name...)
        self.started = time.perf_counter()
        self.commands = 0
        self.database: str | None = None
        # per-session hot-path caches: metric children (``labels`` is a locked dict lookup per
        # call) and masking plans of result sets whose every column origin is known
        self._metric_children: dict[tuple[str, ...], Any] = {}
        # masking plans by RowDescription bytes, with the catalog epoch and expiry they hold for
        self._plans: dict[bytes, tuple[ColumnPlan | None, int, float]] = {}
        self._target_str: str | None = None
        # finished statements, audited once the server loop has written their responses
        self._audit_templates: list[tuple[Decision, CommandTemplate]] = []
        self._completed: list[tuple[str, Decision, str | None, dict[str, int], int | None, str | None, float]] = []
        # relay state (``_relay``): one entry per side, CLIENT then SERVER
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Future[None] | None = None
        self._transports: tuple[Any, Any] | None = None
        self._busy = [False, False]
        self._blocks: tuple[set[str], set[str]] = (set(), set())
        self._backlog: tuple[deque[bytes], deque[bytes]] = (deque(), deque())
        self._tasks: set[asyncio.Task[None]] = set()
        self._client_left = False
        self._client_tls = False
        self._lane_tls: tuple[object, object] = (None, None)  # per side, for the lane: see _lane_tls
        self._last_client = 0.0
        self._idle_handle: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._holding: asyncio.Future[Decision] | None = None  # an approval wait in progress
        # the native lane (``_enter_lane``): while ``_lane_run`` is set, its thread has the sockets
        self._lane_run: asyncio.Future[None] | None = None
        self._lane_token = 0
        self._lane_chosen: list[_Statement] = []
        self._lane_result_shapes: tuple[bytes, ...] = ()  # the shapes handed to the lane, by its index
        # simple queries the guardrails allowed outright (one SELECT each), by the lane's literal
        # key of their text: the decision every query of that shape gets
        self._lane_queries: dict[bytes, Decision] = {}
        self._lane_query_decisions: list[Decision] = []
        self._lane_records = 0
        # stays that relayed nothing make the next ones wait: cycles to skip, and the last wait
        self._lane_skip = 0
        self._lane_backoff = 0
        self._lane_resuming = False

    @property
    def connection(self) -> Connection:
        return self.policy.connection

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        metrics = self.server.metrics
        labels = (self.connection.name, PROTOCOL)
        if metrics:
            metrics.sessions.labels(*labels).inc()
        try:
            if not await self._handshake():
                return
            await self._relay()
        except ProtocolError as bad:  # distinct names: see open_upstream
            log.info("session %s: protocol error from client: %s", self.id, bad)
            self._fatal("08P01", f"sidegate: protocol violation: {bad}")
        except UpstreamError as failed:
            if metrics:
                metrics.upstream_errors.labels(*labels, failed.kind).inc()
            self._fatal(failed.sqlstate, str(failed))
        except (_Closed, ConnectionError, asyncio.IncompleteReadError):
            pass
        except TimeoutError:
            self._fatal("57P05" if self.caller else "08006", "sidegate: session timed out")
        except Exception:
            log.exception("session %s failed", self.id)
            self._fatal("XX000", "sidegate: internal error")
        finally:
            if metrics:
                metrics.sessions.labels(*labels).dec()
            await self._finish()

    def _fatal(self, sqlstate: str, message: str) -> None:
        with contextlib.suppress(Exception):
            self._flush()
            self.writer.write(pgwire.error_response("FATAL", sqlstate, message))

    async def _finish(self) -> None:
        if self.key is not None:
            self.server._cancel_keys.pop(self.key[0], None)
        if self.upstream is not None:
            self.upstream.close()
            if self.caller is not None:
                self._audit_nowait(self.server.audit.emit_nowait, session_end(
                    session_id=self.id, connection=self.connection.ref, connection_type=PROTOCOL,
                    caller=self.caller, duration_ms=(time.perf_counter() - self.started) * 1000,
                    commands=self.commands, client=self.client, target=self._target(), database=self.database,
                ))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.drain(), 1.0)
        with contextlib.suppress(Exception):
            self.writer.close()

    def _target(self) -> str:
        if self._target_str is None:
            t = self.connection.target
            self._target_str = f"{t.host}:{t.port}"
        return self._target_str

    def _metric(self, name: str, *labels: str) -> Any:
        """``metrics.<name>.labels(connection, protocol, *labels)``, looked up once per session."""
        key = (name, *labels)
        child = self._metric_children.get(key)
        if child is None:
            metrics = self.server.metrics
            assert metrics is not None
            child = getattr(metrics, name).labels(self.connection.name, PROTOCOL, *labels)
            self._metric_children[key] = child
        return child

    def _audit_nowait(self, emit: Callable[..., object], *event: Any) -> None:
        """Queue an event with ``emit`` (an ``AuditTrail`` method): if that fails, the event is
        lost alone (and logged), not the session."""
        try:
            emit(*event)
        except Exception:
            log.exception("audit event lost for session %s", self.id)

    # ------------------------------------------------------------------ startup

    async def _read_startup(self) -> list[Message]:
        data = await self.reader.read(pgwire.MAX_STARTUP)
        if not data:
            raise _Closed
        return self.fparser.feed(data)

    async def _handshake(self) -> bool:
        timeout = self.server.settings.handshake_timeout
        async with asyncio.timeout(timeout):
            startup: StartupMessage | None = None
            queued: list[Message] = []
            while startup is None:
                msgs = await self._read_startup()
                while msgs:
                    msg = msgs.pop(0)
                    if isinstance(msg, SSLRequest | GSSENCRequest):
                        if msgs or self.fparser.pending:
                            raise ProtocolError("data received after an encryption request")
                        await self._encryption(msg)
                    elif isinstance(msg, CancelRequest):
                        await self.server._cancel(msg.pid, msg.secret)
                        return False
                    elif isinstance(msg, StartupMessage):
                        startup, queued = msg, msgs
                        break
            if self.server.tls_required and self.writer.get_extra_info("ssl_object") is None:
                await self._refuse_plaintext(startup)
                return False
            if len(queued) > 1 or (queued and not isinstance(queued[0], PasswordMessage)):
                raise ProtocolError("messages received before authentication")
            self._early = queued  # a client may pipeline its password: it is read when asked for
            return await self._authenticate(startup)

    async def _encryption(self, msg: Message) -> None:
        ctx = self.server.ssl_context
        if isinstance(msg, GSSENCRequest) or ctx is None:
            self.writer.write(b"N")
            await self.writer.drain()
            return
        if self.writer.get_extra_info("ssl_object") is not None:
            raise ProtocolError("SSLRequest on an encrypted connection")
        buffered = getattr(self.reader, "_buffer", b"")
        if buffered:  # CVE-2021-23214: plaintext injected before the TLS handshake
            raise ProtocolError("data received after an encryption request")
        self.writer.write(b"S")
        await self.writer.drain()
        self.reader, self.writer = await tls_handshake(self.reader, self.writer, ctx, server_side=True)

    async def _authenticate(self, startup: StartupMessage) -> bool:
        params = self.params = startup.params
        user = params.get("user")
        if not user:
            self._fatal("28000", "sidegate: no user name in the startup packet")
            return False
        if params.get("replication", "false").lower() not in ("false", "off", "no", "0"):
            self._fatal("28000", "sidegate: replication connections are not supported")
            return False
        database = params.get("database") or user
        target_db = self.connection.target.database
        if database not in (target_db, user):
            self._fatal("3D000", f'sidegate: database "{database}" is not served here (use "{target_db}")')
            return False
        self.database = target_db
        unsupported = [k for k in params if k.startswith("_pq_.")]
        if startup.minor != 0 or unsupported:
            self.writer.write(pgwire.negotiate_protocol_version(0, unsupported))
        policy = self.policy
        metrics = self.server.metrics
        try:
            if policy.workload is not None:
                caller = await policy.workload.caller()
            else:
                self.writer.write(pgwire.authentication_cleartext_password())
                await self.writer.drain()
                self.fparser.max_length = MAX_PASSWORD  # nobody is authenticated yet
                token = await self._password()
                self.fparser.max_length = self.server.settings.max_message
                caller = await policy.authenticator.authenticate(token)
        except AuthError as exc:
            log.info("session %s: authentication refused for user %s: %s", self.id, user, exc)
            if metrics:
                metrics.auth_failures.labels(self.connection.name, PROTOCOL, exc.reason[:40]).inc()
            await self._refuse(None, Decision("block", "authentication", exc.reason), user)
            return False
        decision = check_access(self.connection, caller)
        if not decision.allowed:
            if metrics:
                metrics.auth_failures.labels(self.connection.name, PROTOCOL, "access").inc()
            await self._refuse(caller, decision, user)
            return False
        self.caller = caller
        masker = policy.masking.for_caller(caller) if policy.masking is not None else None
        self.masker = masker if masker is not None and masker.active else None

        forwarded = {k: params[k] for k in FORWARDED_PARAMS if k in params}
        encoding = params.get("client_encoding")
        if encoding is not None and encoding.upper() in SAFE_ENCODINGS:
            forwarded["client_encoding"] = encoding
        self.upstream = await self.server._open_upstream(policy.connection, forwarded)
        up = self.upstream
        self.key = self.server._register(self, up.key)
        await self.server.audit.emit(session_start(
            session_id=self.id, connection=self.connection.ref, connection_type=PROTOCOL, caller=caller,
            decision=decision, client=self.client, target=self._target(), database=self.database,
        ))
        out = [pgwire.authentication_ok()]
        for msg in up.status:
            if isinstance(msg, ParameterStatus):
                self._check_parameter(msg)
            out.append(msg.raw)
        out.append(pgwire.backend_key_data(*self.key))
        out.append(pgwire.ready_for_query(b"I"))
        self.writer.write(b"".join(out))
        await self.writer.drain()
        return True

    async def _password(self) -> str:
        while True:
            msgs, self._early = self._early or await self._read_startup(), []
            if not msgs:
                continue
            if len(msgs) != 1 or not isinstance(msgs[0], PasswordMessage):
                raise ProtocolError("expected a password message")
            try:
                return msgs[0].password()
            except ProtocolError:
                raise AuthError("malformed password message") from None

    async def _refuse_plaintext(self, startup: StartupMessage) -> None:
        """``spec.listen.tls.required``: a caller that did not ask for TLS is refused before it
        sends its token (audited: a client is sending credentials in the clear)."""
        self.params = startup.params
        with contextlib.suppress(Exception):
            await self.server.audit.emit(session_start(
                session_id=self.id, connection=self.connection.ref, connection_type=PROTOCOL, caller=None,
                decision=Decision("block", "tls-required", "the caller did not ask for TLS"), client=self.client,
                target=self._target(), database=self.connection.target.database,
            ))
        self._fatal("28000", "sidegate: this gateway accepts TLS connections only (sslmode=require or stricter)")

    async def _refuse(self, caller: Caller | None, decision: Decision, user: str) -> None:
        """No upstream connection is ever opened for a refused caller."""
        with contextlib.suppress(Exception):
            await self.server.audit.emit(session_start(
                session_id=self.id, connection=self.connection.ref, connection_type=PROTOCOL, caller=caller,
                decision=decision, client=self.client, target=self._target(), database=self.database,
            ))
        self._fatal("28P01", f'sidegate: authentication failed for user "{user}"')

    def _check_parameter(self, msg: ParameterStatus) -> None:
        """Settings that would make the classifier read statement text differently end the session."""
        if msg.name == "standard_conforming_strings" and msg.value != "on":
            raise UpstreamError("sidegate: standard_conforming_strings must stay on", "protocol", "0A000")
        if msg.name == "client_encoding" and msg.value.upper() not in SAFE_ENCODINGS:
            raise UpstreamError("sidegate: client_encoding must be UTF8", "protocol", "0A000")

    # ------------------------------------------------------------------ relaying

    async def _relay(self) -> None:
        """Past the handshake both transports feed the session's handlers directly: a chunk is
        parsed and answered in the transport's callback, and only a handler that really waits
        (catalog lookup, approval hold, durable audit) continues in a task, with that side's
        reading paused so messages keep their order."""
        up = self.upstream
        assert up is not None
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._done = loop.create_future()
        self._client_tls = self.writer.get_extra_info("ssl_object") is not None
        self._lane_tls = (_lane_tls(self.writer.transport), _lane_tls(up.writer.transport))
        self._transports = (self.writer.transport, up.writer.transport)
        early = [take_over(self.reader, self.writer.transport, _RelayProtocol(self, CLIENT)),
                 take_over(up.reader, up.writer.transport, _RelayProtocol(self, SERVER))]
        self._last_client = loop.time()
        idle = self.server.settings.idle_timeout
        if idle:
            self._idle_handle = loop.call_later(idle, self._idle_check, idle)
        for side in (SERVER, CLIENT):
            data, eof = early[side]
            if data:
                self._on_data(side, data)
            if eof:
                self._on_eof(side)
        try:
            await self._done
        finally:
            if self._idle_handle is not None:
                self._idle_handle.cancel()
            if self._linger is not None:
                self._linger.cancel()
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._lane_settled()  # its thread holds the sockets: never close them under it

    # ---- transport callbacks (synchronous)

    def _on_data(self, side: int, data: bytes) -> None:
        if self._done is None or self._done.done():
            return
        if self._lane_run is not None:  # both sides are paused while the lane has them
            self._end(RuntimeError("data read from a socket the native lane holds"))
            return
        if self._busy[side]:
            self._backlog[side].append(data)  # reading is paused; this was already in flight
            return
        try:
            if side == CLIENT:
                assert self._loop is not None
                self._last_client = self._loop.time()
                self._run_frontend(self.fparser.feed(data), 0)
            else:
                assert self.upstream is not None
                self._run_backend(self.upstream.parser.feed(data), 0)
        except Exception as exc:
            self._end(exc)

    def _run_frontend(self, msgs: list[Message], start: int) -> None:
        n = len(msgs)
        for i in range(start, n):
            msg = msgs[i]
            if type(msg) is Terminate:
                self._flush()
                assert self.upstream is not None
                self.upstream.writer.write(msg.raw)
                self._client_gone()
                return
            coro = self._on_frontend(msg, msgs[i + 1] if i + 1 < n else None)
            if coro is None:
                continue
            try:
                waiting = coro.send(None)
            except StopIteration:
                continue
            self._suspend(CLIENT, coro, waiting, msgs, i + 1)
            return
        self._flush()

    def _run_backend(self, msgs: list[Message], start: int) -> None:
        try:
            n = len(msgs)
            i = start
            while i < n:
                msg = msgs[i]
                i += 1
                if type(msg) is DataRow:  # the hot path: a run of rows is masked together
                    first = i - 1
                    while i < n and type(msgs[i]) is DataRow:
                        i += 1
                    self._on_rows(msgs, first, i)
                    continue
                coro = self._on_backend(msg)
                if coro is None:
                    continue
                try:
                    waiting = coro.send(None)
                except StopIteration:
                    continue
                self._flush()  # what is answered so far need not wait for the lookup
                self._suspend(SERVER, coro, waiting, msgs, i)
                return
            self._flush()
        finally:
            self._audit_completed()  # after the client has its answer: off the latency path
        if self._client_left and not self.pending:
            self._end(None)
        elif not self.pending and (self.statements or self._lane_queries):
            self._enter_lane()

    def _suspend(self, side: int, coro: Coroutine[Any, Any, None], waiting: Any,
                 msgs: list[Message], resume_at: int) -> None:
        """A handler awaits: pause this side and finish the chunk in a task."""
        assert self._loop is not None
        self._busy[side] = True
        self._update_reading(side)
        task = self._loop.create_task(self._continue(side, coro, waiting, msgs, resume_at))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _continue(self, side: int, coro: Coroutine[Any, Any, None], waiting: Any,
                        msgs: list[Message], resume_at: int) -> None:
        try:
            await _Resume(coro, waiting)
            self._busy[side] = False
            (self._run_frontend if side == CLIENT else self._run_backend)(msgs, resume_at)
            backlog = self._backlog[side]
            while backlog and not self._busy[side] and not self._done_or_none():
                self._on_data(side, backlog.popleft())
            self._update_reading(side)
        except asyncio.CancelledError:
            coro.close()
            raise
        except Exception as exc:
            self._end(exc)

    def _done_or_none(self) -> bool:
        return self._done is None or self._done.done()

    def _on_eof(self, side: int) -> None:
        if side == CLIENT:
            self._client_gone()
        else:
            self._on_lost(SERVER, None)

    def _on_lost(self, side: int, exc: Exception | None) -> None:
        if side == CLIENT or self._client_left:
            self._end(None)
        else:
            self._end(UpstreamError("sidegate: the target closed the connection", "closed", "08006"))

    def _client_gone(self) -> None:
        """The client sent Terminate or closed its end: answers in flight get half a second."""
        self._client_left = True
        self._blocks[CLIENT].add("gone")
        self._update_reading(CLIENT)
        if not self.pending:
            self._end(None)
        elif self._linger is None and self._loop is not None:
            self._linger = self._loop.call_later(0.5, self._end, None)

    def _end(self, exc: BaseException | None) -> None:
        if self._done is None or self._done.done():
            return
        if exc is None:
            self._done.set_result(None)
        else:
            self._done.set_exception(exc)

    def _set_backpressure(self, side: int, on: bool) -> None:
        """The other side's transport is over its high-water mark: stop reading this one."""
        (self._blocks[side].add if on else self._blocks[side].discard)("backpressure")
        self._update_reading(side)

    def _update_reading(self, side: int) -> None:
        if self._transports is None:
            return
        transport = self._transports[side]
        with contextlib.suppress(Exception):
            if self._busy[side] or self._blocks[side]:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _idle_check(self, idle: float) -> None:
        assert self._loop is not None
        quiet = self._loop.time() - self._last_client
        if self._lane_run is not None and quiet >= idle:
            self.server._lane_recall(self._lane_token)  # it knows when the client last spoke
            self._idle_handle = self._loop.call_later(0.05, self._idle_check, idle)
        elif quiet >= idle and not self._busy[CLIENT] and not self.pending:  # a running query is not idle
            self._end(TimeoutError())
        else:
            self._idle_handle = self._loop.call_later(max(idle - quiet, 0.05), self._idle_check, idle)

    # ---- the native lane

    def _enter_lane(self) -> None:
        """Hand the session's sockets to the native lane (``_lane.c``) when it is quiet (nothing
        in flight, nothing unwritten) and holds statements the lane may relay: ones Python
        allowed that only read or write rows, answered by result shapes Python found nothing to
        mask in. Anything else the lane hands back untouched, see ``_lane_done``."""
        if (_LANE is None or not self.server.settings.lane or self._lane_run is not None or self._lane_resuming
                or self.skip_until_sync or self._done_or_none()
                or self._busy[CLIENT] or self._busy[SERVER] or self._blocks[CLIENT] or self._blocks[SERVER]
                or self._backlog[CLIENT] or self._backlog[SERVER] or self._to_client or self._to_upstream
                or self._transports is None or self.upstream is None or self._loop is None):
            return
        if self._lane_skip:  # the last stays relayed nothing: the client mostly sends what Python handles
            self._lane_skip -= 1
            return
        transports = self._transports
        if transports[CLIENT].get_write_buffer_size() or transports[SERVER].get_write_buffer_size():
            return
        tls = self._lane_tls
        if tls[CLIENT] is False or tls[SERVER] is False:
            return
        names: list[bytes] = []
        chosen: list[_Statement] = []
        for name, st in self.statements.items():
            if st.native:
                names.append(name.encode())
                chosen.append(st)
        if not chosen and not self._lane_queries:
            return
        shapes: tuple[bytes, ...] | None = None
        filters: tuple[bytes, ...] | None = None
        seconds = float("inf")
        if self.masker is not None:
            catalog = self.policy.catalog
            if catalog is None:
                return  # no plan is cached without one: every result needs Python
            now, epoch = catalog.clock(), catalog.epoch
            # a shape with nothing to mask, or whose rows the lane can check for what the
            # detectors need (ColumnPlan.lane_filter): a row it is unsure of comes back here
            valid: list[tuple[bytes, float, bytes]] = []
            for raw, (plan, made, until) in self._plans.items():
                check = b"" if plan is None else plan.lane_filter()
                if check is not None and made == epoch and now < until:
                    valid.append((raw, until, check))
            if not valid:
                return
            shapes = tuple(raw for raw, _, _ in valid)
            filters = tuple(check for _, _, check in valid)
            seconds = min(LANE_RECHECK, *(until - now for _, until, _ in valid))
        lane, token = self.server._lane_adopt(self)
        for side in (CLIENT, SERVER):
            self._blocks[side].add("lane")
            self._update_reading(side)
        try:
            lane.adopt(token, transports[CLIENT].get_extra_info("socket").fileno(),
                       transports[SERVER].get_extra_info("socket").fileno(), self.fparser.take_pending(),
                       self.upstream.parser.take_pending(), tuple(names), tuple(self._lane_queries), shapes,
                       self.masker is not None,
                       self.server.settings.max_message, seconds, tls[CLIENT], tls[SERVER], filters)
        except Exception as exc:
            self.server._in_lane.pop(token, None)
            self._end(exc)
            return
        self._lane_token = token
        self._lane_chosen = chosen
        self._lane_result_shapes = shapes or ()
        self._lane_query_decisions = list(self._lane_queries.values())
        self._lane_records = 0
        self._lane_run = self._loop.create_future()
        if self.server._lane_chain() is not None:  # the lane seals their audit records, in these shapes
            self.server._lane_shapes[token] = (
                tuple(self._lane_shape(st.decision, st.command_class, st.sql) for st in chosen),
                tuple(self._lane_shape(d, "select", None) for d in self._lane_query_decisions),
            )

    def _lane_shape(self, decision: Decision, command_class: str | None,
                    sql: str | None) -> tuple[bytes | int, ...] | None:
        return lane_shape(self._command_template(decision, command_class, None), sql, _SEAL_CODES)

    def _lane_counted(self, count: int) -> None:
        """``count`` more statements the lane relayed."""
        self.commands += count
        self._lane_records += count
        self.server.lane_statements += count

    def _lane_sealed(self, count: int) -> None:
        """``count`` statements the lane relayed and sealed the audit records of itself."""
        self._lane_counted(count)
        if self.server.metrics:
            self._metric("commands", "allow").inc(count)

    def _lane_record(self, index: int, at: float, seconds: float, rows: int | None, sqlstate: str | None,
                     query: bytes | None) -> None:
        """An Execute or simple query the lane saw answered: audited as the Python relay audits it."""
        self._lane_counted(1)
        if query is None:
            st = self._lane_chosen[index]
            self._emit_command(st.sql, st.decision, st.command_class, _NO_MASKS, rows, sqlstate, seconds, at)
        else:
            self._emit_command(statement_text(query.decode("ascii")), self._lane_query_decisions[index], "select",
                               _NO_MASKS, rows, sqlstate, seconds, at)

    def _lane_query_allowed(self, msg: Query, verdict: SQLVerdict, decision: Decision) -> None:
        """A simple query the guardrails let through outright: the lane may relay its shape."""
        if (_LANE is None or decision is not verdict.decision or decision.action != "allow"
                or len(verdict.statements) != 1 or verdict.commands != _SELECT):
            return
        key = _LANE.literal_key(msg.raw[5:-1])
        if key is None or key in self._lane_queries:
            return
        if len(self._lane_queries) >= MAX_LANE_QUERIES:
            self._lane_queries.clear()
        self._lane_queries[key] = decision

    def _lane_done(self, stop: int, client_rest: bytes, server_rest: bytes, to_client: bytes, to_server: bytes,
                   in_flight: list[tuple[int, int, int, float, bytes | None, int]], bound: tuple[int, int] | None,
                   last_client: float, shape: int) -> None:
        """Back from the lane: take over what it left in flight, and carry on with the bytes it
        did not relay as if they had just been read."""
        run, self._lane_run = self._lane_run, None
        if run is not None and not run.done():
            run.set_result(None)
        for side in (CLIENT, SERVER):
            self._blocks[side].discard("lane")
        if log.isEnabledFor(logging.DEBUG):
            log.debug("session %s: back from the lane (%d) after %d statements, %d requests in flight",
                      self.id, stop, self._lane_records, len(in_flight))
        self._lane_skip = self._lane_backoff = 0 if self._lane_records else min(2 * self._lane_backoff + 1, 64)
        lane = _LANE
        chosen = self._lane_chosen
        assert self._transports is not None
        for side, unsent in ((SERVER, to_server), (CLIENT, to_client)):
            if unsent:
                transport = self._transports[side]
                if isinstance(transport, TLSTransport):
                    transport.write_raw(unsent)  # already encrypted, in the order the lane made it
                else:
                    transport.write(unsent)
        self._last_client = max(self._last_client, last_client)
        portals: dict[int, _Portal] = {}

        def portal(serial: int, index: int) -> _Portal:
            made = portals.get(serial)
            if made is None:
                made = portals[serial] = _Portal(chosen[index], ())
                made.plan_on_describe = self.masker is not None
            return made

        if bound is not None:
            self.portals[""] = portal(*bound)
        for kind, index, serial, started, query, answered in in_flight:
            if kind == lane.QUERY and query is not None:
                assert self.caller is not None
                sql = query.decode("ascii")
                verdict = self.policy.guard.check_sql(self.caller, sql, self.prepared)
                asked = _Pending("query", verdict=verdict, decision=self._lane_query_decisions[index])
                asked.started = started
                asked.index = answered
                self.pending.append(asked)
            elif kind == lane.BIND:
                self.pending.append(_ACK_BIND)
            elif kind == lane.SYNC:
                self.pending.append(_ACK_SYNC)
            elif kind == lane.DESCRIBE_STATEMENT:
                self.pending.append(_Pending("describe"))
            elif kind == lane.DESCRIBE_PORTAL:
                made = portal(serial, index)
                self.pending.append(_Pending("describe", describe_portal="",
                                             portal=made if made.plan_on_describe else None))
            elif kind == lane.INJECT:
                self.pending.append(_Pending("inject", portal=portal(serial, index)))
            else:
                execute = _Pending("execute", portal=portal(serial, index))
                execute.started = started
                self.pending.append(execute)
        if shape >= 0 and self.pending and self.pending[0].kind in ("execute", "query"):
            # the rest of the result the lane was relaying (it stops at a row it cannot vouch
            # for): masked by that shape's plan, which Python still holds
            front = self.pending[0]
            raw = self._lane_result_shapes[shape] if shape < len(self._lane_result_shapes) else None
            hit = self._plans.get(raw) if raw is not None else None
            if hit is None:
                self._end(UpstreamError("sidegate: a result's masking plan was lost", "masking", "XX000"))
                return
            if front.kind == "query":
                front.plan = hit[0]
            elif front.portal is not None:
                front.portal.plan = hit[0]
        if self._done_or_none():
            return
        self._lane_resuming = True
        try:
            if server_rest:
                self._on_data(SERVER, server_rest)
            if client_rest:
                self._on_data(CLIENT, client_rest)
            if stop == lane.STOP_CLIENT_EOF:
                self._on_eof(CLIENT)
            elif stop == lane.STOP_SERVER_EOF:
                self._on_eof(SERVER)
            elif stop == lane.STOP_CLIENT_ERROR:
                self._on_lost(CLIENT, None)
            elif stop == lane.STOP_SERVER_ERROR:
                self._on_lost(SERVER, None)
            elif stop == lane.STOP_NO_MEMORY:
                self._end(MemoryError("the native lane ran out of memory"))
        finally:
            self._lane_resuming = False
        for side in (CLIENT, SERVER):
            self._update_reading(side)
        if stop == lane.STOP_SLICE and not self.pending:
            self._enter_lane()  # its result shapes expired: planned again as they come

    async def _lane_settled(self) -> None:
        """Call the session back from the lane and wait for it, even when cancelled: the lane's
        thread holds the sockets until then."""
        cancelled = False
        while self._lane_run is not None:
            self.server._lane_recall(self._lane_token)
            try:
                await asyncio.shield(self._lane_run)
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError

    def _send(self, data: bytes, pending: _Pending | None = None) -> None:
        assert self.upstream is not None
        if pending is not None:
            self.pending.append(pending)
        self._to_upstream.append(data)

    def _flush(self) -> None:
        """Hand both gathered streams to their transports (in order, each as one write)."""
        if self._to_upstream:
            assert self.upstream is not None
            self.upstream.writer.transport.write(b"".join(self._to_upstream))
            self._to_upstream.clear()
        if self._to_client:
            self.writer.transport.write(b"".join(self._to_client))
            self._to_client.clear()

    def _on_frontend(self, msg: Message, following: Message | None = None) -> _Handler:
        """Handled here, or the coroutine that decides (Query, Parse: the guardrails may wait
        for an approval, a catalog lookup, a durable audit record)."""
        # exact types, most frequent first: one comparison per message on the hot path
        if self.skip_until_sync and type(msg) is not Sync:
            return None  # discarded, like the server does after an error in an extended-protocol batch
        if type(msg) is Bind:
            described = (type(following) is Describe and following.kind == "P"
                         and following.name == msg.portal)
            self._on_bind(msg, described)
        elif type(msg) is Execute:
            self._send(msg.raw, _Pending("execute", portal=self.portals.get(msg.portal)))
        elif type(msg) is Sync:
            self.skip_until_sync = False
            self._send(msg.raw, _ACK_SYNC)
        elif type(msg) is Describe:
            portal = self.portals.get(msg.name) if msg.kind == "P" else None
            self._send(msg.raw, _Pending("describe", describe_portal=msg.name if msg.kind == "P" else None,
                                         portal=portal if portal is not None and portal.plan_on_describe else None))
        elif type(msg) is Query:
            return self._on_query(msg)
        elif type(msg) is Parse:
            return self._on_parse(msg)
        elif type(msg) is Close:
            (self.statements if msg.kind == "S" else self.portals).pop(msg.name, None)
            self._send(msg.raw, _ACK_CLOSE)
        elif type(msg) is Flush or type(msg) is CopyData or type(msg) is CopyDone or type(msg) is CopyFail:
            self._send(msg.raw)
        elif type(msg) is FunctionCall:
            return self._on_function_call()
        else:
            raise ProtocolError(f"unexpected {type(msg).__name__} message")
        return None

    async def _on_function_call(self) -> None:
        decision = Decision("block", "builtin-fastpath", "fast-path function calls are not allowed")
        await self._audit_blocked("<fast-path function call>", decision, None)
        self._send(pgwire.query(POISON_SQL), _Pending("query", replace_error=self._block_error(decision)))

    # ---- decisions

    async def _decide(self, sql: str) -> tuple[SQLVerdict, Decision]:
        assert self.caller is not None
        verdict = self.policy.guard.check_sql(self.caller, sql, self.prepared)
        decision = verdict.decision
        if decision.action == "requireApproval":
            hook = self.server.on_approval_required
            self._flush()  # what came before the held statement must not wait for its review
            if hook is not None:
                await _in_task()
                decision = await self._hold(hook, sql, verdict)
        if decision.allowed and self.masker is not None and "copy_to" in verdict.commands:
            decision = await self._copy_decision(verdict, decision)
        return verdict, decision

    async def _hold(self, hook: ApprovalHook, sql: str, verdict: SQLVerdict) -> Decision:
        """The approval wait: the client's CancelRequest ends it, as it would a running statement."""
        hold = asyncio.ensure_future(hook(self, sql, verdict))
        self._holding = hold
        try:
            await asyncio.wait({hold})
        finally:
            self._holding = None
            if not hold.done():
                hold.cancel()  # this session is going away
        if hold.cancelled():
            return CANCELLED
        return hold.result()

    def _sqlstate(self, decision: Decision) -> str:
        return "57014" if decision is CANCELLED else "42501"

    async def _copy_decision(self, verdict: SQLVerdict, allowed: Decision) -> Decision:
        """COPY TO STDOUT cannot be masked by column: allowed only for relations without masked
        columns (data lines still go through the detectors)."""
        assert self.masker is not None
        await _in_task()
        catalog = self.policy.catalog
        refused = Decision("block", "masking-copy", "COPY TO of data with masked columns is not allowed")
        if not verdict.tables:
            return allowed  # reads no relation (like a SELECT of the same: detectors only)
        if catalog is None or await self._reads_masked(verdict.tables) is not None:
            return refused
        return allowed

    async def _reads_masked(
        self, tables: Iterable[str], columns: Iterable[str] = (ALL_COLUMNS,),
        functions: Iterable[str] = (),
    ) -> Any:
        """The strictest masking rule whose column a statement reads (None: none). ``columns``
        are the classifier's column reads (default: every column of ``tables``). A relation the
        catalog cannot resolve counts with all its columns, and a function that may be
        user-defined (it could read anything) makes every column of every relation read."""
        assert self.masker is not None
        await _in_task()
        masker = self.masker
        catalog = self.policy.catalog
        wanted = _column_selection(tables, columns)
        functions = frozenset(functions)
        if catalog is None:
            if functions:
                return masker.touches_masked(wanted)
            return strictest(masker.touches_masked([t], cols) for t, cols in wanted.items())
        try:
            if functions and await catalog.user_functions(functions):
                wanted = dict.fromkeys(wanted)
            relations = await catalog.columns_of(wanted)
        except CatalogError:
            return masker.touches_masked(wanted)
        rules = []
        for name, relation in relations.items():
            if relation is None:
                rules.append(masker.touches_masked([name]))
                continue
            by_table: dict[str, list[str]] = {}
            for s in relation.reads(wanted[name]):
                by_table.setdefault(f"{s.schema}.{s.table}", []).append(s.column)
            rules.extend(masker.touches_masked([t], cols) for t, cols in by_table.items())
        return strictest(rules)

    def _block_error(self, decision: Decision) -> bytes:
        if decision is CANCELLED:
            return pgwire.error_response("ERROR", "57014", f"sidegate: {decision.reason}")
        reason = decision.reason or decision.action
        verb = "approval required" if decision.action == "requireApproval" else "blocked"
        if not reason.startswith(verb):
            reason = f'{verb} by guardrail "{decision.rule}": {reason}'
        hint = None
        if decision.action == "requireApproval":
            hint = "ask an approver to review an AccessRequest for this statement"
        return pgwire.error_response("ERROR", "42501", f"sidegate: {reason}", hint=hint)

    async def _audit_blocked(self, sql: str, decision: Decision, verdict: SQLVerdict | None) -> None:
        """Spooled durably before the client is told."""
        await _in_task()
        self.commands += 1
        event = command_event(
            session_id=self.id, connection=self.connection.ref, connection_type=PROTOCOL, caller=self.caller,
            command=sql, decision=decision, command_class=_command_class(verdict), sqlstate=self._sqlstate(decision),
            client=self.client, target=self._target(), database=self.database,
        )
        await self.server.audit.emit(event)
        if self.server.metrics:
            self._metric("commands", decision.action).inc()

    def _track_prepared(self, verdict: SQLVerdict) -> None:
        for st in verdict.statements:
            if "prepare" in st.commands and st.prepared_name:
                self.prepared[st.prepared_name] = st.text
            elif "deallocate" in st.commands:
                if st.prepared_name is None:
                    self.prepared.clear()
                else:
                    self.prepared.pop(st.prepared_name, None)
            elif "discard" in st.commands:
                self.prepared.clear()

    async def _on_query(self, msg: Query) -> None:
        verdict, decision = await self._decide(msg.sql)
        if not decision.allowed:
            await self._audit_blocked(msg.sql, decision, verdict)
            self._send(pgwire.query(POISON_SQL), _Pending("query", replace_error=self._block_error(decision)))
            return
        self._track_prepared(verdict)
        self._lane_query_allowed(msg, verdict, decision)
        self._send(msg.raw, _Pending("query", verdict=verdict, decision=decision))

    async def _on_parse(self, msg: Parse) -> None:
        verdict, decision = await self._decide(msg.sql)
        if not decision.allowed:
            await self._audit_blocked(msg.sql, decision, verdict)
            poison = _Pending("parse", replace_error=self._block_error(decision))
            self._send(pgwire.parse("", POISON_SQL), poison)
            self.skip_until_sync = True
            return
        self._track_prepared(verdict)
        self.statements[msg.name] = _Statement(msg.sql, verdict, decision, _command_class(verdict))
        self._send(msg.raw, _ACK_PARSE)

    def _on_bind(self, msg: Bind, described: bool = False) -> None:
        """``described``: the client's own Describe of this portal comes next (libpq's
        PQexecPrepared does so), its RowDescription gives the plan without asking again."""
        portal = _Portal(self.statements.get(msg.statement), msg.result_formats)
        self.portals[msg.portal] = portal
        self._send(msg.raw, _ACK_BIND)
        if self.masker is not None and described:
            portal.plan_on_describe = True
        elif self.masker is not None:
            # the portal's columns and formats, for masking its rows: asked for by the proxy
            # itself (the client may never Describe) and swallowed in the server loop
            self._send(pgwire.describe("P", msg.portal), _Pending("inject", portal=portal))

    # ------------------------------------------------------------------ server side

    def _write(self, data: bytes) -> None:
        self._to_client.append(data)

    def _on_backend(self, msg: Message) -> _Handler:
        """Handled here, or the coroutine that finishes it (a result shape whose masking plan
        needs the catalog)."""
        # exact types (the decoders make no subclasses), most frequent first; DataRows never come
        # here: ``_run_backend`` hands runs of them to ``_on_rows``
        if type(msg) is ReadyForQuery and self.pending and self.pending[0].kind == "sync":
            self._to_client.append(msg.raw)
            self.pending.popleft()
            return None
        if type(msg) is NoticeResponse or type(msg) is NotificationResponse:
            self._write(msg.raw)
            return None
        if type(msg) is ParameterStatus:
            self._check_parameter(msg)
            self._write(msg.raw)
            return None
        if not self.pending:
            if type(msg) is ErrorResponse:  # e.g. FATAL admin shutdown
                self._write(msg.raw)
                raise _Closed
            raise _unexpected(msg)
        p = self.pending[0]
        if type(msg) is ErrorResponse:
            self._on_error(p, msg)
        elif p.kind == "query":
            if type(msg) is not RowDescription:
                self._on_query_response(p, msg)
            elif (known := self._known_plan(msg)) is not None:
                p.plan = known[0]
                self._write(msg.raw)
            else:
                return self._plan_query(p, msg)
        elif p.kind == "execute":
            self._on_execute_response(p, msg)
        elif p.kind in ("describe", "inject"):
            if type(msg) is not RowDescription or p.portal is None:
                self._on_describe_response(p, msg, None)
            elif (known := self._known_plan(msg)) is not None:
                self._on_describe_response(p, msg, known[0])
            else:
                return self._plan_describe(p, msg)
        else:
            if type(msg) is not _ACKNOWLEDGED_BY[p.kind]:
                raise _unexpected(msg)
            self._write(msg.raw)
            self.pending.popleft()
        return None

    def _on_rows(self, msgs: list[Message], start: int, end: int) -> None:
        """DataRows ``msgs[start:end]`` of the current result, masked by its plan as one batch;
        a row with nothing to mask goes out as the frame it came in."""
        p = self.pending[0] if self.pending else None
        plan = None if p is None else p.plan if p.kind == "query" else p.portal.plan if p.portal else None
        out = self._to_client
        if plan is None:
            for k in range(start, end):
                out.append(msgs[k].raw)
            return
        try:
            rows = [cast(DataRow, msgs[k]).values() for k in range(start, end)]
            masked, counts = plan.apply_rows(rows)
        except (MaskingError, ProtocolError) as exc:
            raise UpstreamError(f"sidegate: a result row could not be masked: {exc}", "masking",
                                "XX000") from None
        if counts and p is not None:
            for rule, n in counts.items():
                p.masked[rule] = p.masked.get(rule, 0) + n
        for k, values in enumerate(masked):
            out.append(msgs[start + k].raw if values is None else pgwire.data_row(values))

    def _known_plan(self, desc: RowDescription) -> tuple[ColumnPlan | None, int, float] | None:
        """The cached ``(plan, ...)`` of a result shape seen before (None: ask ``_plan``): a
        prepared statement's RowDescription recurs byte for byte, its plan holds while the
        catalog answers it came from do."""
        if self.masker is None:
            return _NO_PLAN
        catalog = self.policy.catalog
        if catalog is not None:
            hit = self._plans.get(desc.raw)
            if hit is not None and hit[1] == catalog.epoch and catalog.clock() < hit[2]:
                return hit
        return None

    async def _plan(self, desc: RowDescription, verdict: SQLVerdict | None) -> ColumnPlan | None:
        """The masking plan of one result set: origins from the catalog, fail closed for unknown
        columns when the statement reads a masked column."""
        masker = self.masker
        if masker is None:
            return None
        catalog = self.policy.catalog
        fields = desc.fields
        pairs = [(f.table_oid, f.attnum) for f in fields]
        origins: list[Origin]
        if catalog is None:
            origins = [Origin(o, a) for o, a in pairs]
        else:
            try:
                cached = catalog.cached(pairs)
                if cached is None:
                    await _in_task()
                    cached = await catalog.resolve(pairs)
                origins = cached
            except CatalogError as exc:
                log.warning("session %s: column origins unknown: %s", self.id, exc)
                origins = [Origin(o, a) for o, a in pairs]
        columns = [
            ColumnOrigin(
                name=f.name, table_oid=f.table_oid, attnum=f.attnum, type_oid=f.type_oid,
                format=f.format,
                schema=o.source.schema if o.source else None, table=o.source.table if o.source else None,
                column=o.source.column if o.source else None,
            )
            for f, o in zip(fields, origins, strict=True)
        ]
        reads: Any = None
        known = all(c.known for c in columns)  # only with a catalog: then the plan is the columns'
        if not known:
            tables = set(verdict.tables) if verdict is not None else set()
            reads_cols: set[str] = set()
            for st in verdict.statements if verdict is not None else ():
                reads_cols |= st.columns
            for view in {o.view for o in origins if o.view is not None}:
                if view not in tables and view.rsplit(".", 1)[-1] not in tables:
                    tables.add(view)  # reached under a name the statement does not spell: all of it
                    reads_cols.add(f"{view}.*")
            if tables:
                reads = await self._reads_masked(tables, reads_cols, verdict.functions if verdict else ())
            elif verdict is None:
                reads = True  # nothing known about the statement: fail closed
        plan = masker.plan_columns(columns, query_reads_masked=reads)
        result = plan if plan.active else None
        if known and catalog is not None:
            if len(self._plans) >= MAX_PLANS_PER_SESSION:
                self._plans.clear()
            self._plans[desc.raw] = (result, catalog.epoch, catalog.valid_until(o for o, _ in pairs))
        return result

    async def _plan_query(self, p: _Pending, msg: RowDescription) -> None:
        p.plan = await self._plan(msg, p.verdict)
        self._write(msg.raw)

    def _on_query_response(self, p: _Pending, msg: Message) -> None:
        if isinstance(msg, CommandComplete | EmptyQueryResponse):
            self._write(msg.raw)
            self._statement_done(p, msg.rows if isinstance(msg, CommandComplete) else None, None)
        elif isinstance(msg, CopyResponse):
            p.copy_scan = msg.type == b"H" and self.masker is not None
            self._write(msg.raw)
        elif isinstance(msg, CopyData):
            self._write(self._scan_copy(msg, p) if p.copy_scan else msg.raw)
        elif isinstance(msg, CopyDone):
            self._write(msg.raw)
        elif isinstance(msg, ReadyForQuery):
            self._write(msg.raw)
            self.pending.popleft()
        else:
            raise _unexpected(msg)

    def _scan_copy(self, msg: CopyData, p: _Pending) -> bytes:
        assert self.masker is not None
        text = bytes(msg.data).decode("utf-8", "surrogateescape")
        masked, counts = self.masker.mask_text(text)
        for rule, n in counts.items():
            p.masked[rule] = p.masked.get(rule, 0) + n
        return msg.raw if masked is text else pgwire.copy_data(masked.encode("utf-8", "surrogateescape"))

    def _statement_done(self, p: _Pending, rows: int | None, sqlstate: str | None) -> None:
        """One statement of a simple Query finished: audit it, reset the per-result state."""
        verdict = p.verdict
        statements = verdict.statements if verdict is not None else ()
        if p.index < len(statements):
            st = statements[p.index]
            text, command_class = st.text, ",".join(sorted(st.commands))
        else:
            text, command_class = (verdict.classified.text if verdict else ""), None
        decision = p.decision or (verdict.decision if verdict is not None else Decision("allow"))
        self._audit_command(text, decision, command_class, p, rows, sqlstate)
        p.index += 1
        p.plan = None
        p.masked = {}
        p.started = time.perf_counter()

    def _audit_command(self, text: str, decision: Decision, command_class: str | None, p: _Pending,
                       rows: int | None, sqlstate: str | None) -> None:
        """Queued until the server loop has handed the read chunk's responses to the client."""
        elapsed = time.perf_counter() - p.started
        self.commands += 1
        self._completed.append((text, decision, command_class, dict(p.masked), rows, sqlstate, elapsed))

    def _audit_completed(self) -> None:
        completed, self._completed = self._completed, []
        for text, decision, command_class, masked, rows, sqlstate, elapsed in completed:
            self._emit_command(text, decision, command_class, masked, rows, sqlstate, elapsed)

    def _emit_command(self, text: str, decision: Decision, command_class: str | None, masked: dict[str, int],
                      rows: int | None, sqlstate: str | None, elapsed: float, at: float = 0.0) -> None:
        self._audit_nowait(self.server.audit.emit_run_nowait, self._command_template(decision, command_class, sqlstate),
                           text, at or time.time(), elapsed * 1000, rows, masked)
        if self.server.metrics:
            self._metric("commands", decision.action).inc()
            self._metric("latency").observe(elapsed)
            for rule, n in masked.items():
                self._metric("masked", rule).inc(n)

    def _command_template(self, decision: Decision, command_class: str | None,
                          sqlstate: str | None) -> CommandTemplate:
        """What the audit events of this session's statements with this decision, class and
        outcome share: a handful per session, each made once."""
        for made_for, template in self._audit_templates:
            event = template.event
            if ((made_for is decision or made_for == decision) and event.command_class == command_class
                    and event.sqlstate == sqlstate):
                return template
        template = CommandTemplate(command_event(
            session_id=self.id, connection=self.connection.ref, connection_type=PROTOCOL, caller=self.caller,
            command="", decision=decision, command_class=command_class, sqlstate=sqlstate,
            client=self.client, target=self._target(), database=self.database, time=0.0,
        ))
        if len(self._audit_templates) >= MAX_AUDIT_TEMPLATES:
            self._audit_templates.pop(0)
        self._audit_templates.append((decision, template))
        return template

    def _on_execute_response(self, p: _Pending, msg: Message) -> None:
        if type(msg) is CommandComplete or type(msg) is EmptyQueryResponse or type(msg) is PortalSuspended:
            self._write(msg.raw)
            self.pending.popleft()
            self._execute_done(p, msg.rows if type(msg) is CommandComplete else None, None)
        elif isinstance(msg, CopyResponse):
            p.copy_scan = msg.type == b"H" and self.masker is not None
            self._write(msg.raw)
        elif isinstance(msg, CopyData):
            self._write(self._scan_copy(msg, p) if p.copy_scan else msg.raw)
        elif isinstance(msg, CopyDone):
            self._write(msg.raw)
        else:
            raise _unexpected(msg)

    def _execute_done(self, p: _Pending, rows: int | None, sqlstate: str | None) -> None:
        st = p.portal.statement if p.portal is not None else None
        if st is None:
            self._audit_command("<unknown portal>", Decision("allow"), None, p, rows, sqlstate)
            return
        self._audit_command(st.sql, st.decision, st.command_class, p, rows, sqlstate)

    async def _plan_describe(self, p: _Pending, msg: RowDescription) -> None:
        """An injected Describe, or the client's own right after Bind: the portal's plan."""
        assert p.portal is not None
        verdict = p.portal.statement.verdict if p.portal.statement else None
        self._on_describe_response(p, msg, await self._plan(msg, verdict))

    def _on_describe_response(self, p: _Pending, msg: Message, plan: ColumnPlan | None) -> None:
        """``plan``: the portal's, when ``msg`` is its RowDescription."""
        inject = p.kind == "inject"
        if isinstance(msg, ParameterDescription):
            if not inject:
                self._write(msg.raw)
            return
        if isinstance(msg, RowDescription):
            if p.portal is not None:
                p.portal.plan = plan
        elif not isinstance(msg, NoData):
            raise _unexpected(msg)
        if not inject:
            self._write(msg.raw)
        self.pending.popleft()

    def _on_error(self, p: _Pending, msg: ErrorResponse) -> None:
        self._write(p.replace_error if p.replace_error is not None else msg.raw)
        if msg.severity in ("FATAL", "PANIC"):
            raise _Closed
        if p.kind == "query":
            if p.replace_error is None:
                self._statement_done(p, None, msg.sqlstate)
            p.plan = None
            return  # ReadyForQuery follows
        if p.kind == "execute" and p.replace_error is None:
            self._execute_done(p, None, msg.sqlstate)
        elif p.replace_error is None:  # a Parse or Bind failed (bad parameters, errors at planning):
            for skipped in self.pending:  # the Execute it skips is audited with its error
                if skipped.kind == "sync":
                    break
                if skipped.kind == "execute":
                    self._execute_done(skipped, None, msg.sqlstate)
                    break
        # extended protocol: the server skips everything up to the next Sync
        while self.pending and self.pending[0].kind != "sync":
            self.pending.popleft()


def _unexpected(msg: Message) -> UpstreamError:
    return UpstreamError(f"sidegate: unexpected {type(msg).__name__} from the target", "protocol", "08P01")


def _column_selection(tables: Iterable[str], columns: Iterable[str]) -> dict[str, frozenset[str] | None]:
    """Column reads (``sqlparse.StatementInfo.columns``) to the columns read of each relation
    (None: all of them): a bare name counts for every relation, as does ``rel.col`` for a
    relation the statement does not name (the classifier saw something it could not place)."""
    columns = frozenset(columns)
    every = ALL_COLUMNS in columns
    names = set(tables)
    bare = {c for c in columns if "." not in c and c != ALL_COLUMNS}
    placed: dict[str, set[str] | None] = {}
    for c in columns:
        rel, dot, col = c.rpartition(".")
        if not dot:
            continue
        if rel not in names:
            if col == "*":
                every = True
            else:
                bare.add(col)
            continue
        current = placed.setdefault(rel, set())
        if current is not None:
            if col == "*":
                placed[rel] = None
            else:
                current.add(col)
    out: dict[str, frozenset[str] | None] = {}
    for t in names:
        extra = placed.get(t, set())
        out[t] = None if every or extra is None else frozenset(bare | extra)
    return out


def _command_class(verdict: SQLVerdict | None) -> str | None:
    if verdict is None:
        return None
    return ",".join(sorted(verdict.commands)) or None


# --------------------------------------------------------------------------- the server


class ProxyServer:
    """The PostgreSQL listener of one Connection.

    ``reload`` swaps the policy for new sessions; sessions already open keep the one they started
    with. ``on_approval_required(session, sql, verdict) -> Decision`` is the hook the approval
    flow plugs into (it may hold the statement); without it, requireApproval refuses at once.
    """

    def __init__(
        self,
        config: ProxyConfig,
        secrets: SecretStore,
        *,
        authenticator: Authenticator,
        guard: Guard,
        masking_engine: MaskingEngine | None,
        audit_log: AuditTrail,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        metrics: Metrics | None = None,
        workload: WorkloadIdentity | None = None,
        settings: ProxySettings | None = None,
        on_approval_required: ApprovalHook | None = None,
        tls_required: bool = False,
    ) -> None:
        self.secrets = secrets
        self.audit = audit_log
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.tls_required = tls_required and ssl_context is not None  # refuse callers without TLS
        self.metrics = metrics
        self.settings = settings or ProxySettings()
        self.on_approval_required = on_approval_required
        self.upstream_connects = 0  # logins for client sessions (tests check refusals open none)
        self._derive = functools.lru_cache(maxsize=64)(salted_password)
        self._server: asyncio.Server | None = None
        self._sessions: set[asyncio.Task[None]] = set()
        self._cancel_keys: dict[int, tuple[int, Session]] = {}
        self._catalog_pools: list[_CatalogPool] = []
        self.lane_slices = 0  # sessions handed to the native lane so far (tests check it was taken)
        self.lane_statements = 0  # statements it relayed
        self._lane: Any = None  # the native lane's ``Loop``, started with the first session it takes
        self._in_lane: dict[int, Session] = {}
        # audit shapes of the sessions in the lane (``Session._enter_lane``), and what seals with them
        self._lane_shapes: dict[int, tuple[tuple[Any, ...], tuple[Any, ...]]] = {}
        self._lane_sealer: Any = None if _LANE is None or not self.settings.lane_seals else \
            _LANE.Sealer(tuple(word.encode() for word in SENSITIVE_WORDS), MAX_COMMAND)
        self._policy = self._make_policy(config, authenticator, guard, masking_engine, workload)

    def _make_policy(self, config: ProxyConfig, authenticator: Authenticator, guard: Guard,
                     masking: MaskingEngine | None, workload: WorkloadIdentity | None) -> _Policy:
        catalog = None
        if masking is not None and config.masking:
            conn = config.connection
            pool = _CatalogPool(
                lambda: open_upstream(conn, self.secrets, {"application_name": "sidegate-catalog"},
                                      settings=self.settings, derive=self._derive),
                self.settings.catalog_connections,
            )
            self._catalog_pools.append(pool)
            catalog = Catalog(pool.run, ttl=self.settings.catalog_ttl)
        return _Policy(config, authenticator, guard, masking, workload, catalog)

    @property
    def config(self) -> ProxyConfig:
        return self._policy.config

    def _lane_adopt(self, session: Session) -> tuple[Any, int]:
        """The lane, and a token naming ``session`` in what it reports."""
        if self._lane is None:
            self._lane = _LANE.Loop(LANE_REPORT_EVERY, LANE_REPORT_RECORDS)
            asyncio.get_running_loop().add_reader(self._lane.fileno(), self._lane_events)
        self.lane_slices += 1
        token = self.lane_slices
        self._in_lane[token] = session
        return self._lane, token

    def _lane_recall(self, token: int) -> None:
        if self._lane is not None:
            self._lane.recall(token)

    def _lane_events(self) -> None:
        if self._lane is not None:
            self._lane_reports(self._lane)

    def _lane_chain(self) -> Any:
        """The audit chain the lane may seal records onto: the trail's, when it seals in this
        process (``AuditTrail.sealing_chain``) and the lane has a sealer."""
        if self._lane_sealer is None:
            return None
        try:
            chain = self.audit.sealing_chain()
        except Exception:
            return None  # not running: the Python path reports why, record by record
        return chain if chain is not None and chain.chain_id.isascii() else None  # what _seal.c spells

    def _lane_reports(self, lane: Any) -> None:
        """The lane's reports: statements it saw answered (their records sealed there, when it
        could), sessions it handed back."""
        sessions = self._in_lane
        chain = self._lane_chain()
        if chain is None:
            records, done = lane.drain()
        else:
            lines, sealed, counts, buckets, records, done = lane.drain_sealed(
                self._lane_sealer, chain, self._lane_shapes, LATENCY_BOUNDS if self.metrics is not None else None)
            self._lane_spool(lines, sealed, counts, buckets)
        for token, index, at, seconds, rows, sqlstate, query in records:
            session = sessions.get(token)
            if session is not None:
                session._lane_record(index, at, seconds, rows, sqlstate, query)
        for token, handed_back in done:
            self._lane_shapes.pop(token, None)
            session = sessions.pop(token, None)
            if session is not None:
                try:
                    session._lane_done(*handed_back)
                except Exception as exc:
                    session._end(exc)

    def _lane_spool(self, lines: bytes, sealed: int, counts: dict[int, int],
                    buckets: tuple[list[int], float] | None) -> None:
        """Lines the lane sealed (in order, before any record it handed over as it is)."""
        if lines:
            try:
                self.audit.append_sealed(lines, sealed)
            except Exception:
                log.exception("%d audit events the native lane sealed are lost", sealed)
        sessions = self._in_lane
        for token, count in counts.items():
            session = sessions.get(token)
            if session is not None:
                session._lane_sealed(count)
                if buckets is not None:  # every session here has the same connection: one histogram child
                    observe_buckets(session._metric("latency"), *buckets)
                    buckets = None

    def _lane_close(self) -> None:
        """After every session is back (``Session._lane_settled``): stop the lane's thread."""
        lane, self._lane = self._lane, None
        if lane is None:
            return
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(lane.fileno())
        lane.close()
        self._lane_reports(lane)  # sessions it still had, if any: their statements are audited

    def reload(
        self,
        config: ProxyConfig,
        *,
        authenticator: Authenticator | None = None,
        guard: Guard | None = None,
        masking_engine: MaskingEngine | None = None,
        workload: WorkloadIdentity | None = None,
    ) -> None:
        """New sessions get ``config``; open sessions keep the policy they started with."""
        old = self._policy
        self._policy = self._make_policy(
            config,
            authenticator or old.authenticator,
            guard or Guard(config.connection),
            masking_engine if masking_engine is not None else old.masking,
            workload if workload is not None
            else old.workload if config.connection.identity.workload else None,
        )

    async def start(self) -> None:
        # Any: uvloop's ``sockets`` is a list where typeshed says tuple (compiled code checks)
        server: Any = await asyncio.start_server(self._accept, self.host, self.port, limit=READ_SIZE)
        self._server = server
        sockets = server.sockets or ()
        if sockets:
            self.port = int(sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._sessions):
            task.cancel()
        await asyncio.gather(*self._sessions, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        for pool in self._catalog_pools:
            pool.close()
        self._lane_close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        try:
            await Session(self, reader, writer).run()
        except asyncio.CancelledError:
            pass  # close(): the session's own cleanup already ran; asyncio would log the cancel
        finally:
            self._sessions.discard(task)

    async def _open_upstream(self, connection: Connection, params: Mapping[str, str]) -> Upstream:
        self.upstream_connects += 1
        return await open_upstream(connection, self.secrets, params, settings=self.settings,
                                   derive=self._derive)

    # ------------------------------------------------------------------ cancellation

    def _register(self, session: Session, upstream_key: tuple[int, int] | None) -> tuple[int, int]:
        """A client-visible (pid, secret), never the upstream's, mapped to the session."""
        while True:
            pid = _secrets.randbelow(2**31 - 2) + 1
            if pid not in self._cancel_keys:
                break
        secret = _secrets.randbits(32) - 2**31
        self._cancel_keys[pid] = (secret, session)
        return pid, secret

    async def _cancel(self, pid: int, secret: int) -> None:
        entry = self._cancel_keys.get(pid)
        if entry is None or not hmac.compare_digest(entry[0].to_bytes(4, "big", signed=True),
                                                    secret.to_bytes(4, "big", signed=True)):
            return  # like PostgreSQL: no answer either way
        session = entry[1]
        if session._holding is not None:
            session._holding.cancel()  # nothing runs upstream yet: stop waiting for the review
            return
        up = session.upstream
        if up is None or up.key is None:
            return
        target = session.connection.target
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(str(target.host), int(target.port or 5432)),
                self.settings.connect_timeout,
            )
        except (OSError, TimeoutError):
            return
        try:
            writer.write(pgwire.cancel_request(*up.key))
            await writer.drain()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader.read(1), self.settings.connect_timeout)
        finally:
            writer.close()
