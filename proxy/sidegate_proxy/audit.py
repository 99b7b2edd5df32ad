"""Audit evidence: what happened, in OCSF shape, sealed into a tamper-evident hash chain.

Three layers, innermost first:

* ``redact_statement`` and the ``AuditEvent`` constructors are pure: the front ends describe a
  session or a command, nothing is written.
* ``Chain`` numbers and seals events (``seq``, ``prev_hash``, ``hash``) and signs checkpoints; it
  is synchronous so the hot path costs one JSON dump and one SHA-256. ``Chain.seal_event`` makes
  that dump cheap: a session's records differ in a few values, so each kind of record is
  serialised once and later ones only fill in the gaps (``_Shape``), with the same bytes.
* ``AuditLog`` is the I/O edge: a durable spool (group-committed fsync) and one shipper per sink.

The wire format is documented in ``docs/audit-schema.md``; ``sidegate audit verify`` checks it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import re
import secrets
import time as _time
from collections.abc import Awaitable, Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from operator import attrgetter, call, itemgetter
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, NamedTuple, Protocol
from urllib.parse import parse_qsl, quote, urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from . import __version__
from .config import Action, Connection, ConnectionType
from .policy import ApprovalRef, Caller, Decision
from .sinks import Sink
from .spool import Shipper, Spool, SpoolWriter

log = logging.getLogger(__name__)

OCSF_VERSION = "1.3.0"
PRODUCT = {"name": "Sidegate", "vendor_name": "Sidegate", "version": __version__}
GENESIS = "0" * 64
REDACTED = "'***'"
MAX_COMMAND = 32 * 1024  # characters of statement text kept; a 5 MB INSERT is not evidence

EventKind = Literal["session_start", "session_end", "command"]
_NO_MASKS: Mapping[str, int] = MappingProxyType({})


class AuditError(RuntimeError):
    """The audit trail cannot be written or resumed: callers must fail closed."""


# --------------------------------------------------------------------------- statement redaction

SENSITIVE_WORDS = ("password", "passwd", "secret")  # a statement mentioning one has its literals redacted
_IDENT_START = re.compile(r"[A-Za-z_\u0080-\uffff]")
_IDENT = re.compile(r"[A-Za-z0-9_$\u0080-\uffff]*")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\u0080-\uffff][A-Za-z0-9_\u0080-\uffff]*)?\$")

TokenKind = Literal["literal", "comment", "word", "semicolon", "other"]


def _is_ident_char(ch: str) -> bool:
    return ch.isalnum() or ch in "_$" or ord(ch) >= 0x80


def _quoted_end(sql: str, start: int, quote_char: str, backslash: bool) -> int:
    """Index just past the closing quote (doubled quotes escape it); ``len(sql)`` if unterminated."""
    i, n = start, len(sql)
    while i < n:
        ch = sql[i]
        if backslash and ch == "\\":
            i += 2
            continue
        if ch == quote_char:
            if i + 1 < n and sql[i + 1] == quote_char:
                i += 2
                continue
            return i + 1
        i += 1
    return n


def _comment_end(sql: str, start: int) -> int:
    """Block comments nest in PostgreSQL; an unterminated one runs to the end."""
    depth, i, n = 1, start + 2, len(sql)
    while i < n and depth:
        if sql.startswith("/*", i):
            depth, i = depth + 1, i + 2
        elif sql.startswith("*/", i):
            depth, i = depth - 1, i + 2
        else:
            i += 1
    return i


def sql_tokens(sql: str) -> Iterator[tuple[TokenKind, int, int]]:
    """Just enough of PostgreSQL's lexer to know what is a literal: ``(kind, start, end)`` spans.

    Knows '' escapes, E'' strings (backslash escapes), U&'' strings, dollar quotes, quoted
    identifiers and nested comments. Assumes ``standard_conforming_strings = on`` (the default
    since 9.1). Anything unterminated runs to the end, so a stray quote never un-hides a secret.
    """
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        prev_ident = i > 0 and _is_ident_char(sql[i - 1])
        if ch == "'":
            end = _quoted_end(sql, i + 1, "'", backslash=False)
            yield "literal", i, end
        elif ch in "eE" and not prev_ident and sql.startswith("'", i + 1):
            end = _quoted_end(sql, i + 2, "'", backslash=True)
            yield "literal", i, end
        elif ch in "uU" and not prev_ident and sql.startswith("&'", i + 1):
            end = _quoted_end(sql, i + 3, "'", backslash=False)
            yield "literal", i, end
        elif ch == "$" and not prev_ident and (m := _DOLLAR_TAG.match(sql, i)):
            tag = m.group(0)
            close = sql.find(tag, m.end())
            end = n if close < 0 else close + len(tag)
            yield "literal", i, end
        elif ch == '"':
            end = _quoted_end(sql, i + 1, '"', backslash=False)
            yield "word", i, end
        elif sql.startswith("--", i):
            nl = sql.find("\n", i)
            end = n if nl < 0 else nl
            yield "comment", i, end
        elif sql.startswith("/*", i):
            end = _comment_end(sql, i)
            yield "comment", i, end
        elif _IDENT_START.match(ch):
            m2 = _IDENT.match(sql, i + 1)
            end = m2.end() if m2 else i + 1
            yield "word", i, end
        elif ch == ";":
            end = i + 1
            yield "semicolon", i, end
        else:
            end = i + 1
            yield "other", i, end
        i = max(end, i + 1)


def redact_statement(sql: str) -> str:
    """Replace every string literal (and comment) in statements that handle passwords.

    A statement is sensitive when a keyword or identifier outside literals mentions a password or
    secret: ``ALTER ROLE x PASSWORD '...'``, ``CREATE USER ... PASSWORD``, ``SET ... password``,
    ``UPDATE users SET password = ...``, ``CREATE USER MAPPING ... OPTIONS (password '...')``.
    Other statements are returned unchanged so the audit trail keeps its evidence value.
    """
    lowered = sql.lower()
    for word in SENSITIVE_WORDS:  # a loop, not any(genexpr): this runs for every statement
        if word in lowered:
            break
    else:
        return sql
    out: list[str] = []
    statement: list[tuple[TokenKind, int, int]] = []

    def flush() -> None:
        sensitive = any(
            kind == "word" and any(w in lowered[s:e] for w in SENSITIVE_WORDS) for kind, s, e in statement
        )
        for kind, s, e in statement:
            if sensitive and kind == "literal":
                out.append(REDACTED)
            elif sensitive and kind == "comment":
                out.append("/* *** */")
            else:
                out.append(sql[s:e])
        statement.clear()

    for token in sql_tokens(sql):
        statement.append(token)
        if token[0] == "semicolon":
            flush()
    flush()
    return "".join(out)


@functools.lru_cache(maxsize=256)  # a session's statements repeat: prepared ones are the same text
def sql_evidence(sql: str) -> str:
    """A statement as the audit records it: password literals redacted, length bounded."""
    return _truncated(redact_statement(sql))


def _truncated(command: str) -> str:
    if len(command) > MAX_COMMAND:
        return command[:MAX_COMMAND] + f"... [{len(command) - MAX_COMMAND} more characters]"
    return command


def redact_request_target(target: str) -> str:
    """An HTTP request target with query values hidden (tokens travel in query strings)."""
    parts = urlsplit(target)
    if not parts.query:
        return target
    query = "&".join(f"{quote(k, safe='')}=***" for k, _ in parse_qsl(parts.query, keep_blank_values=True))
    return f"{parts.path}?{query}"


# --------------------------------------------------------------------------- the event model


class AuditEvent(NamedTuple):
    """One session start/end or one command, protocol-neutral; ``to_dict`` gives the OCSF shape.

    Immutable like the frozen dataclass it was, but built in a third of the time: one is made
    for every proxied statement.
    """

    kind: EventKind
    time: float
    session_id: str
    connection: str
    connection_type: ConnectionType
    caller: Caller | None = None
    client: str | None = None
    target: str | None = None
    database: str | None = None
    command: str | None = None
    command_class: str | None = None
    decision: Action | None = None
    rule: str | None = None
    reason: str = ""
    masked: Mapping[str, int] = _NO_MASKS
    rows: int | None = None
    duration_ms: float | None = None
    sqlstate: str | None = None
    http_status: int | None = None
    approval: ApprovalRef | None = None
    commands: int | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled for the audit worker: a read-only ``masked`` view is refused, its dict is not
        i = _MASKED_FIELD
        return type(self), (*self[:i], dict(self.masked), *self[i + 1:])

    def to_dict(self) -> dict[str, Any]:
        return ocsf_event(self)


_MASKED_FIELD = AuditEvent._fields.index("masked")


def _decision(decision: Decision | Action | None, rule: str | None, reason: str) -> tuple[Any, Any, str]:
    if isinstance(decision, Decision):
        return decision.action, rule or decision.rule, reason or decision.reason
    return decision, rule, reason


def session_start(
    *,
    session_id: str,
    connection: str,
    connection_type: ConnectionType,
    caller: Caller | None,
    decision: Decision | Action = "allow",
    rule: str | None = None,
    reason: str = "",
    client: str | None = None,
    target: str | None = None,
    database: str | None = None,
    time: float | None = None,
) -> AuditEvent:
    """A caller connected (or was refused: ``decision`` from ``check_access``)."""
    action, rule, reason = _decision(decision, rule, reason)
    return AuditEvent(
        kind="session_start", time=_time.time() if time is None else time, session_id=session_id,
        connection=connection, connection_type=connection_type, caller=caller, client=client,
        target=target, database=database, decision=action, rule=rule, reason=reason,
    )


def session_end(
    *,
    session_id: str,
    connection: str,
    connection_type: ConnectionType,
    caller: Caller | None,
    duration_ms: float | None = None,
    commands: int | None = None,
    reason: str = "",
    client: str | None = None,
    target: str | None = None,
    database: str | None = None,
    time: float | None = None,
) -> AuditEvent:
    return AuditEvent(
        kind="session_end", time=_time.time() if time is None else time, session_id=session_id,
        connection=connection, connection_type=connection_type, caller=caller, client=client,
        target=target, database=database, duration_ms=duration_ms, commands=commands, reason=reason,
    )


def command_event(
    *,
    session_id: str,
    connection: str,
    connection_type: ConnectionType,
    caller: Caller | None,
    command: str,
    decision: Decision | Action,
    rule: str | None = None,
    reason: str = "",
    command_class: str | None = None,
    masked: Mapping[str, int] | None = None,
    rows: int | None = None,
    duration_ms: float | None = None,
    sqlstate: str | None = None,
    http_status: int | None = None,
    approval: ApprovalRef | None = None,
    client: str | None = None,
    target: str | None = None,
    database: str | None = None,
    time: float | None = None,
) -> AuditEvent:
    """One SQL statement (``command`` = its text) or HTTP request (``command`` = "METHOD /path?q").

    Redaction happens here, so no front end can forget it: password literals in SQL, query
    values in HTTP targets.
    """
    action, rule, reason = _decision(decision, rule, reason)
    if connection_type == "postgres":
        command = sql_evidence(command)
    else:
        method, _, path = command.partition(" ")
        command = _truncated(f"{method.upper()} {redact_request_target(path)}")
        command_class = command_class or method.lower()
    return AuditEvent(
        kind="command", time=_time.time() if time is None else time, session_id=session_id,
        connection=connection, connection_type=connection_type, caller=caller, client=client,
        target=target, database=database, command=command, command_class=command_class,
        decision=action, rule=rule, reason=reason, masked=dict(masked or {}), rows=rows,
        duration_ms=duration_ms, sqlstate=sqlstate, http_status=http_status,
        approval=approval or (decision.approval if isinstance(decision, Decision) else None),
    )


def http_request_event(
    *,
    connection: Connection,
    caller: Caller | None,
    session_id: str,
    method: str,
    path: str,
    query: str = "",
    status: int | None,
    decision: Decision | Action,
    masked: Mapping[str, int] | None = None,
    duration_ms: float | None = None,
    client: str | None = None,
    reason: str | None = None,
    approval: ApprovalRef | None = None,
    time: float | None = None,
) -> AuditEvent:
    """``command_event`` for the HTTP proxy: one request; ``status`` 0/None = no response sent."""
    target = urlsplit(connection.target.url or "").netloc or None
    return command_event(
        session_id=session_id, connection=connection.ref, connection_type="http", caller=caller,
        command=f"{method} {path}" + (f"?{query}" if query else ""), decision=decision,
        reason=reason or "", masked=masked, duration_ms=duration_ms, http_status=status or None,
        client=client, target=target, approval=approval, time=time,
    )


# --------------------------------------------------------------------------- OCSF mapping

CATEGORY_APPLICATION = 6
CLASS_DATASTORE = 6005
CLASS_API = 6003
CLASS_BASE = 0

_SQL_ACTIVITY: dict[str, tuple[int, str]] = {
    "select": (4, "Query"), "read": (4, "Query"), "show": (4, "Query"), "explain": (4, "Query"),
    "insert": (5, "Write"), "copy": (5, "Write"), "merge": (5, "Write"), "write": (5, "Write"),
    "update": (2, "Update"),
    "delete": (7, "Delete"), "truncate": (7, "Delete"), "drop": (7, "Delete"),
    "create": (6, "Create"),
}
_HTTP_ACTIVITY: dict[str, tuple[int, str]] = {
    "post": (1, "Create"), "get": (2, "Read"), "head": (2, "Read"),
    "put": (3, "Update"), "patch": (3, "Update"), "delete": (4, "Delete"),
}
_SEVERITY = {"allow": (1, "Informational"), "requireApproval": (2, "Low"), "block": (3, "Medium")}
_ACTION = {"allow": (1, "Allowed"), "requireApproval": (2, "Denied"), "block": (2, "Denied")}
_DISPOSITION = {
    "allow": (1, "Allowed"), "requireApproval": (99, "Approval Required"), "block": (2, "Blocked"),
}


def rfc3339(ts: float) -> str:
    """UTC with milliseconds: 2024-05-01T12:00:00.123Z."""
    return _rfc3339_ms(round(ts * 1000))


def _rfc3339_ms(ms: int) -> str:
    """``rfc3339`` from epoch milliseconds: an event's ``time`` and ``time_dt`` share one rounding."""
    return _utc_seconds(ms // 1000) + f".{ms % 1000:03d}Z"


@functools.lru_cache(maxsize=16)
def _utc_seconds(seconds: int) -> str:
    """Memoised: consecutive events mostly share their second (strftime is the cost of rfc3339)."""
    return _time.strftime("%Y-%m-%dT%H:%M:%S", _time.gmtime(seconds))


def _endpoint(address: str) -> dict[str, Any]:
    """'10.0.0.1:5432', '[::1]:80' or a bare host/path to an OCSF network endpoint."""
    return dict(_endpoint_fields(address))


@functools.lru_cache(maxsize=1024)
def _endpoint_fields(address: str) -> tuple[tuple[str, Any], ...]:
    """Memoised: a session's client and target recur in every one of its events."""
    host, sep, port = address.rpartition(":")
    if sep and port.isdigit() and host:
        return (("ip" if _looks_ip(host) else "hostname", host.strip("[]")), ("port", int(port)))
    return (("ip" if _looks_ip(address) else "hostname", address),)


def _looks_ip(host: str) -> bool:
    h = host.strip("[]")
    return ":" in h or bool(re.fullmatch(r"[0-9.]+", h))


def _activity(event: AuditEvent) -> tuple[int, int, str]:
    """(class_uid, activity_id, activity_name) for an event."""
    cls = CLASS_DATASTORE if event.connection_type == "postgres" else CLASS_API
    if event.kind == "session_start":
        return (cls, 3, "Connect") if cls == CLASS_DATASTORE else (cls, 99, "Session Start")
    if event.kind == "session_end":
        return cls, 99, "Disconnect" if cls == CLASS_DATASTORE else "Session End"
    table = _SQL_ACTIVITY if cls == CLASS_DATASTORE else _HTTP_ACTIVITY
    key = (event.command_class or "").lower()
    activity_id, name = table.get(key, (99, key.upper() or "Other"))
    return cls, activity_id, name


def _status(event: AuditEvent) -> tuple[int, str]:
    if event.decision not in (None, "allow"):
        return 2, "Failure"
    if event.sqlstate and not event.sqlstate.startswith(("00", "01", "02")):
        return 2, "Failure"
    if event.http_status is not None and event.http_status >= 400:
        return 2, "Failure"
    return 1, "Success"


class _Values(NamedTuple):
    """What changes from one event to the next of the same shape (see ``_Shape``).

    ``None`` means the field is absent from the record. Everything else in a record follows from
    the event's other fields, which repeat for every statement of a session.
    """

    time: int
    time_dt: str
    session: str
    duration: int | None
    query: str | None
    method: str | None
    path: str | None
    query_string: str | None
    rows: int | None
    masked: dict[str, int] | None


_CommandValues = tuple[str | None, str | None, str | None, str | None]
# ``_Values`` from a tuple in one C call: the class's own ``__new__`` is interpreted Python.
_new_values: Callable[[tuple[Any, ...]], _Values] = functools.partial(tuple.__new__, _Values)


def _command_values(event: AuditEvent) -> _CommandValues:
    """``_Values``' (query, method, path, query_string): what the event's command becomes."""
    if event.command is None:
        return None, None, None, None
    if event.connection_type == "postgres":
        return event.command, None, None, None
    method, _, target = event.command.partition(" ")
    path, _, q = target.partition("?")
    return None, method, path, q or None


def _run_values(event: AuditEvent, command: _CommandValues, time: float, duration_ms: float | None,
                rows: int | None, masked: Mapping[str, int]) -> _Values:
    """The per-event values of a record: the command's, then one run's."""
    ms = round(time * 1000)
    return _new_values((
        ms, _rfc3339_ms(ms), event.session_id,
        None if duration_ms is None else round(duration_ms),
        *command, rows,
        {str(k): int(v) for k, v in masked.items()} if masked else None,
    ))


def _event_values(event: AuditEvent) -> _Values:
    """The per-event values of ``event``'s record, computed once for the dict and the JSON line."""
    return _run_values(event, _command_values(event), event.time, event.duration_ms, event.rows, event.masked)


def ocsf_event(event: AuditEvent) -> dict[str, Any]:
    """The OCSF 1.x shape of an event, without the chain fields (see docs/audit-schema.md)."""
    return _ocsf_record(event, _event_values(event))


def _ocsf_record(event: AuditEvent, v: _Values) -> dict[str, Any]:
    """``ocsf_event`` with the per-event values given: with placeholders, it maps out a ``_Shape``.

    Only copies ``v``'s values into place (never computes with them), so a placeholder lands
    exactly where its value goes.
    """
    class_uid, activity_id, activity_name = _activity(event)
    status_id, status = _status(event)
    d: dict[str, Any] = {
        "category_uid": CATEGORY_APPLICATION,
        "category_name": "Application Activity",
        "class_uid": class_uid,
        "class_name": "Datastore Activity" if class_uid == CLASS_DATASTORE else "API Activity",
        "activity_id": activity_id,
        "activity_name": activity_name,
        "type_uid": class_uid * 100 + activity_id,
        "time": v.time,
        "time_dt": v.time_dt,
        "status_id": status_id,
        "status": status,
        "metadata": {"version": OCSF_VERSION, "product": PRODUCT, "log_name": "sidegate-audit"},
        "dst_endpoint": {"svc_name": event.connection, **(_endpoint(event.target) if event.target else {})},
    }
    severity = _SEVERITY.get(event.decision or "allow", (1, "Informational"))
    d["severity_id"], d["severity"] = severity
    actor: dict[str, Any] = {"session": {"uid": v.session}}
    if event.caller is not None:
        c = event.caller
        groups = [{"name": g} for g in sorted(c.groups)]
        actor["user"] = {"name": c.subject, "uid": c.subject, "groups": groups}
        actor["idp"] = {"name": c.issuer}
    d["actor"] = actor
    if event.client:
        d["src_endpoint"] = _endpoint(event.client)
    if event.decision is not None:
        d["action_id"], d["action"] = _ACTION[event.decision]
        d["disposition_id"], d["disposition"] = _DISPOSITION[event.decision]
    if event.rule:
        d["policy"] = {"name": event.rule}
    if event.reason:
        d["status_detail"] = event.reason
        d["message"] = event.reason
    if v.duration is not None:
        d["duration"] = v.duration
    if event.sqlstate:
        d["status_code"] = event.sqlstate
    elif event.http_status is not None:
        d["status_code"] = str(event.http_status)
    if class_uid == CLASS_DATASTORE:
        db: dict[str, Any] = {"type_id": 1, "type": "Relational"}
        if event.database:
            db["name"] = event.database
        d["database"] = db
        if v.query is not None:
            d["query_info"] = {"query_string": v.query}
    elif v.method is not None:
        url: dict[str, Any] = {"path": v.path}
        if v.query_string is not None:
            url["query_string"] = v.query_string
        d["api"] = {"operation": v.method}
        d["http_request"] = {"http_method": v.method, "url": url}
        if event.http_status is not None:
            d["http_response"] = {"code": event.http_status}
    unmapped: dict[str, Any] = {
        "event": event.kind,
        "connection": event.connection,
        "connection_type": event.connection_type,
    }
    if event.decision is not None:
        unmapped["decision"] = event.decision
    if event.command_class:
        unmapped["command_class"] = event.command_class
    if v.masked is not None:
        unmapped["masked"] = v.masked
    if v.rows is not None:
        unmapped["rows"] = v.rows
    if event.approval is not None:
        unmapped["approval"] = event.approval.to_dict()
    if event.commands is not None:
        unmapped["commands"] = event.commands
    d["unmapped"] = unmapped
    return d


# --------------------------------------------------------------------------- the hash chain


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)
# ``JSONEncoder.encode`` builds this C encoder anew for every call; the hot path builds it once.
# Same function, same arguments, so the same bytes; only without the circular-reference check
# (records are built here, never circular: one would end in RecursionError, still an error).
_C_CANONICAL = (
    None if c_make_encoder is None
    else c_make_encoder(None, _CANONICAL.default, encode_basestring_ascii, None, ":", ",", True, False, True)
)


def canonical_json(obj: Any) -> bytes:
    """What the hash covers: sorted keys, no whitespace, ASCII only (no encoding ambiguity)."""
    if _C_CANONICAL is None:
        return _CANONICAL.encode(obj).encode("ascii")
    return "".join(_C_CANONICAL(obj, 0)).encode("ascii")


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 hex of a record's canonical JSON without its own ``hash`` field."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def checkpoint_message(chain_id: str, seq: int, digest: str) -> bytes:
    """The bytes a checkpoint signs: the chain position it vouches for."""
    return canonical_json({"chain_id": chain_id, "hash": digest, "seq": seq})


def key_id(material: bytes) -> str:
    return hashlib.sha256(material).hexdigest()[:16]


def _seal_fields(record: dict[str, Any], chain_id: str, seq: int, prev_hash: str, uid: str) -> None:
    """The chain fields of a record (``Chain.seal``, and placeholders in a ``_Shape``)."""
    record["chain_id"] = chain_id
    record["seq"] = seq
    record["prev_hash"] = prev_hash
    meta = record.setdefault("metadata", {})
    meta["uid"] = uid
    meta["sequence"] = seq


# --------------------------------------------------------------------------- pre-serialised shapes
#
# Every statement of a session gives the same record but for a handful of values (time, the
# statement, rows, duration, chain position). A ``_Shape`` is that record built once with
# placeholders and serialised once; an event then costs a few string escapes and one ``%``.
# ``sidegate audit verify`` re-canonicalises each line, so the bytes must be exactly
# ``canonical_json(record)``: the placeholders pass through the same encoder and each value is
# escaped by the same function the encoder uses (tests/test_audit_shapes.py proves it).

_escape: Callable[[str], str] = encode_basestring_ascii  # the C encoder's own string escaping
_CHAIN_SLOTS = ("chain_id", "seq", "prev_hash", "uid")  # after _Values: what Chain._position gives
_SLOT_COUNT = len(_Values._fields) + len(_CHAIN_SLOTS)
# Unguessable per process, so no caller-supplied string (subject, reason) can pose as one.
_SLOT_NONCE = secrets.token_hex(8)
_SLOTS = tuple(f"\x00sidegate-slot:{_SLOT_NONCE}:{i}\x00" for i in range(_SLOT_COUNT))
_SLOT_INDEX = {slot: i for i, slot in enumerate(_SLOTS)}
_SLOT_RE = re.compile(
    re.escape(_escape(f"\x00sidegate-slot:{_SLOT_NONCE}:")[:-1]) + r"(\d+)" + re.escape(_escape("\x00")[1:])
)
# Event fields that are not per-event values: equal values of these give the same shape.
_SLOTTED_FIELDS = frozenset({"time", "session_id", "command", "duration_ms", "rows", "masked"})
_shape_fields = attrgetter(*(name for name in AuditEvent._fields if name not in _SLOTTED_FIELDS))
# Field types whose equal values always serialise alike (unlike True == 1 == 1.0, or 0.0 == -0.0).
_SHAPE_KINDS = frozenset({str, int, type(None), Caller, ApprovalRef})
_MAX_SHAPES = 1024
_SHAPES: dict[Hashable, _Shape | None] = {}


def _fragment(value: Any) -> str:
    """One value's canonical JSON, for any value the encoder takes."""
    return canonical_json(value).decode("ascii")


def _encoder(kind: type) -> Callable[[Any], str]:
    """What turns a value of type ``kind`` into its canonical JSON: the encoder's own functions.

    The encoder writes ``str`` with ``encode_basestring_ascii`` and ``int`` with ``int.__repr__``;
    subclasses (``bool``) and everything else go through the encoder itself.
    """
    if kind is str:
        return _escape
    if kind is int:
        return int.__repr__
    return _fragment


def _slot_ops(
    d: dict[str, Any], at: int, copies: list[tuple[int, str, dict[str, Any]]], sets: list[tuple[int, str, int]]
) -> bool:
    """Find the placeholders in ``d`` (container ``at``): which dicts to copy, which keys to set."""
    found = False
    for key, value in d.items():
        if isinstance(value, str) and value in _SLOT_INDEX:
            sets.append((at, key, _SLOT_INDEX[value]))
            found = True
        elif isinstance(value, dict):
            copies.append((at, key, value))
            if _slot_ops(value, len(copies), copies, sets):
                found = True
            else:
                copies.pop()
    return found


@dataclass(frozen=True)
class _Shape:
    """One kind of record, serialised once: ``parts`` is its JSON with a gap where each slot goes.

    ``pick`` takes the slots' values in the order of the gaps, ``encoders`` serialise them.

    ``copies`` are the dicts on a slot's path, parents first (``(container, key, dict)``, where
    container 0 is the record and n the n-th copy); ``sets`` put each slot's value in place.
    """

    parts: tuple[str, ...]
    order: tuple[int, ...]  # the slot in each gap
    pick: Callable[[Sequence[Any]], tuple[Any, ...]]
    encoders: tuple[Callable[[Any], str], ...]
    skeleton: dict[str, Any]
    copies: tuple[tuple[int, str, dict[str, Any]], ...]
    sets: tuple[tuple[int, str, int], ...]

    @classmethod
    def build(cls, event: AuditEvent, filled: Sequence[Any]) -> _Shape | None:
        """Map ``event``'s record with placeholders; None if they cannot be told apart in the JSON.

        ``filled`` is an example of the slots' values (``_Values`` then the chain position): which
        are absent (None) and their types are part of the shape.
        """
        placeholders: list[Any] = [None if v is None else slot for v, slot in zip(filled, _SLOTS, strict=True)]
        n = len(_Values._fields)
        skeleton = _ocsf_record(event, _Values._make(placeholders[:n]))
        _seal_fields(skeleton, *placeholders[n:])
        copies: list[tuple[int, str, dict[str, Any]]] = []
        sets: list[tuple[int, str, int]] = []
        _slot_ops(skeleton, 0, copies, sets)
        pieces = _SLOT_RE.split(canonical_json(skeleton).decode("ascii"))
        order = [int(i) for i in pieces[1::2]]
        if len(order) != len(sets) or len(order) < 2:
            return None
        pieces[1::2] = [""] * len(order)  # the gaps: odd positions, filled in ``body``
        encoders = tuple(_encoder(type(filled[i])) for i in order)
        return cls(tuple(pieces), tuple(order), itemgetter(*order), encoders, skeleton, tuple(copies), tuple(sets))

    def body(self, values: Sequence[Any]) -> bytes:
        """``canonical_json`` of the record these values fill in: one C-level pass, no Python loop."""
        parts = list(self.parts)
        parts[1::2] = map(call, self.encoders, self.pick(values))
        return "".join(parts).encode("ascii")

    def record(self, values: Sequence[Any]) -> dict[str, Any]:
        """The record itself; dicts without a slot are shared by every record of the shape."""
        containers = [self.skeleton.copy()]
        for at, key, sub in self.copies:
            copy = sub.copy()
            containers[at][key] = copy
            containers.append(copy)
        for at, key, slot in self.sets:
            containers[at][key] = values[slot]
        return containers[0]


def _shape_for(event: AuditEvent, filled: Sequence[Any]) -> _Shape | None:
    """The memoised shape of ``event`` and its slots' values; None when only the generic encoder is safe."""
    same = _shape_fields(event)
    if not _SHAPE_KINDS.issuperset(map(type, same)):
        return None
    key = (same, tuple(map(type, filled)))
    try:
        return _SHAPES[key]
    except KeyError:
        pass
    except TypeError:  # an unhashable field value
        return None
    shape = _Shape.build(event, filled)
    if len(_SHAPES) >= _MAX_SHAPES:
        del _SHAPES[next(iter(_SHAPES))]
    _SHAPES[key] = shape
    return shape


# The slots a sealer outside Python fills per run (``lane_shape``), by name, with their encoders.
LANE_SLOTS: Mapping[str, Callable[[Any], str]] = MappingProxyType({
    "time": int.__repr__, "time_dt": _escape, "duration": int.__repr__, "rows": int.__repr__,
    "query": _escape, "chain_id": _escape, "seq": int.__repr__, "prev_hash": _escape, "uid": _escape,
})
_SLOT_NAMES = (*_Values._fields, *_CHAIN_SLOTS)


def lane_shape(template: CommandTemplate, sql: str | None, codes: Mapping[str, int]) -> tuple[bytes | int, ...] | None:
    """What the native lane seals ``template``'s runs with (``_seal.c``): the canonical JSON of
    ``seal_run``'s line for a run with a duration and a row count and nothing masked, cut at the
    slots it fills per run (``codes``: slot name to its code there; the chain's own among them),
    JSON text first and last. The statement is ``sql``'s evidence, or a slot when None (simple
    queries). None: such runs have no shape, Python seals them. Memoised on the template
    (``codes`` are the lane's own, the same for the whole process)."""
    try:
        return template.lanes[sql]
    except KeyError:
        pass
    if len(template.lanes) >= _MAX_SHAPES:
        template.lanes.clear()
    made = template.lanes[sql] = _lane_shape(template, sql, codes)
    return made


def _lane_shape(template: CommandTemplate, sql: str | None, codes: Mapping[str, int]) -> tuple[bytes | int, ...] | None:
    query = sql_evidence(sql) if sql is not None else ""
    # an example run: which slots are absent, and their types, make the shape
    filled = (*_run_values(template.event, (query, None, None, None), 0.0, 0.0, 0, {}), "c", 1, GENESIS, "c:1")
    key = (False, int, True)  # seal_run's: a duration, an int row count, nothing masked
    try:
        shape = template.shapes[key]
    except KeyError:
        shape = template.shapes[key] = _shape_for(template.event, filled)
    if shape is None:
        return None
    pieces: list[bytes | int] = []
    text = shape.parts[0]
    for slot, encode, part in zip(shape.order, shape.encoders, shape.parts[2::2], strict=True):
        name = _SLOT_NAMES[slot]
        if name in codes and (name != "query" or sql is None):
            if encode is not LANE_SLOTS[name]:
                return None
            pieces += [text.encode("ascii"), codes[name]]
            text = part
        elif name in LANE_SLOTS and name != "query":
            return None  # a per-run value the sealer was not given a code for
        else:
            text += encode(filled[slot]) + part
    pieces.append(text.encode("ascii"))
    return tuple(pieces)


class CommandTemplate:
    """What the SQL statements a session runs with one decision and outcome audit alike.

    A front end builds it once (``command_event`` with no statement, time, rows, duration or
    masks) and hands each run to ``AuditTrail.emit_run_nowait``: the record is filled in from the
    template's memoised shapes, with no event, values or shape key built per statement. The
    bytes are those of ``emit_nowait(template.run(...))`` (tests/test_audit_shapes.py).
    """

    __slots__ = ("event", "lanes", "shapes")

    def __init__(self, event: AuditEvent) -> None:
        if event.connection_type != "postgres":
            raise ValueError("command templates are for SQL statements")
        self.event = event
        # by the types of the run's values (the statement and time are always str and int)
        self.shapes: dict[tuple[bool, type, bool], _Shape | None] = {}
        self.lanes: dict[str | None, tuple[bytes | int, ...] | None] = {}  # lane_shape's, by statement

    def run(self, sql: str, time: float, duration_ms: float | None, rows: int | None,
            masked: Mapping[str, int]) -> AuditEvent:
        """The whole event of one run, as ``command_event`` would have built it."""
        return self.event._replace(command=sql_evidence(sql), time=time, duration_ms=duration_ms, rows=rows,
                                   masked=dict(masked) if masked else {})


@dataclass(frozen=True)
class ChainHead:
    chain_id: str
    seq: int
    hash: str


class Chain:
    """Numbers and seals records; pure and synchronous so the hot path stays cheap."""

    def __init__(
        self,
        chain_id: str,
        *,
        seq: int = 0,
        prev_hash: str = GENESIS,
        hmac_key: bytes | None = None,
        signing_key: Ed25519PrivateKey | None = None,
    ) -> None:
        self.chain_id = chain_id
        self.seq = seq
        self.last_hash = prev_hash
        self._hmac_key = hmac_key
        self._signing_key = signing_key
        self._public = (
            signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) if signing_key else None
        )

    @classmethod
    def resume(cls, head: ChainHead, **keys: Any) -> Chain:
        return cls(head.chain_id, seq=head.seq, prev_hash=head.hash, **keys)

    @property
    def signs(self) -> bool:
        return self._hmac_key is not None or self._signing_key is not None

    def _position(self) -> tuple[str, int, str, str]:
        """The next record's (chain_id, seq, prev_hash, uid); the chain moves only in ``_link``."""
        seq = self.seq + 1
        return self.chain_id, seq, self.last_hash, f"{self.chain_id}:{seq}"

    def _link(self, seq: int, body: bytes) -> tuple[str, bytes]:
        """Hash a record's canonical JSON, advance the chain to it and give its spool line."""
        digest = hashlib.sha256(body).hexdigest()
        self.seq, self.last_hash = seq, digest
        return digest, b"".join((memoryview(body)[:-1], b',"hash":"', digest.encode(), b'"}\n'))

    def seal(self, record: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        """Add chain fields to ``record`` (in place) and return it with its JSON line.

        The line is the canonical JSON itself with ``hash`` appended, so sealing costs one dump.
        """
        position = self._position()
        _seal_fields(record, *position)
        digest, line = self._link(position[1], canonical_json(record))
        record["hash"] = digest
        return record, line

    def seal_event(self, event: AuditEvent) -> tuple[dict[str, Any], bytes]:
        """``seal(ocsf_event(event))`` with the same bytes, from the event's memoised ``_Shape``.

        The returned record shares the dicts that repeat across a session (actor, endpoints):
        treat it as read-only, as ``metadata.product`` always was.
        """
        values = _event_values(event)
        position = self._position()
        filled = (*values, *position)
        shape = _shape_for(event, filled)
        if shape is None:
            return self.seal(_ocsf_record(event, values))
        digest, line = self._link(position[1], shape.body(filled))
        record = shape.record(filled)
        record["hash"] = digest
        return record, line

    def seal_run(self, template: CommandTemplate, sql: str, time: float, duration_ms: float | None,
                 rows: int | None, masked: Mapping[str, int]) -> bytes:
        """The spool line of ``seal_event(template.run(...))``, without the event or its record."""
        event = template.event
        values = _run_values(event, (sql_evidence(sql), None, None, None), time, duration_ms, rows, masked)
        position = self._position()
        filled = values + position
        key = (duration_ms is None, type(rows), not masked)  # a bool row count must not share an int's shape
        try:
            shape = template.shapes[key]
        except KeyError:
            shape = template.shapes[key] = _shape_for(event, filled)
        if shape is None:
            return self.seal(_ocsf_record(event, values))[1]
        return self._link(position[1], shape.body(filled))[1]

    def checkpoint(self, now: float) -> dict[str, Any]:
        """A Base Event vouching (HMAC and/or Ed25519) for the chain up to the current head."""
        message = checkpoint_message(self.chain_id, self.seq, self.last_hash)
        signatures: list[dict[str, str]] = []
        if self._hmac_key is not None:
            signatures.append({
                "alg": "hmac-sha256",
                "key_id": key_id(self._hmac_key),
                "signature": hmac.new(self._hmac_key, message, hashlib.sha256).hexdigest(),
            })
        if self._signing_key is not None and self._public is not None:
            signatures.append({
                "alg": "ed25519",
                "key_id": key_id(self._public),
                "signature": self._signing_key.sign(message).hex(),
            })
        return {
            "category_uid": 0,
            "category_name": "Uncategorized",
            "class_uid": CLASS_BASE,
            "class_name": "Base Event",
            "activity_id": 99,
            "activity_name": "Checkpoint",
            "type_uid": CLASS_BASE * 100 + 99,
            "severity_id": 1,
            "severity": "Informational",
            "status_id": 1,
            "status": "Success",
            "time": round(now * 1000),
            "time_dt": rfc3339(now),
            "metadata": {"version": OCSF_VERSION, "product": PRODUCT, "log_name": "sidegate-audit"},
            "message": f"audit checkpoint at seq {self.seq}",
            "unmapped": {
                "event": "checkpoint",
                "checkpoint": {"seq": self.seq, "hash": self.last_hash, "signatures": signatures},
            },
        }


def chain_head(line: bytes) -> ChainHead:
    """The chain position a spooled line ends at (what a restart continues from)."""
    try:
        record = json.loads(line)
        head = ChainHead(str(record["chain_id"]), int(record["seq"]), str(record["hash"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise AuditError(
            f"the audit spool's last record is unreadable ({exc}): move the spool aside"
        ) from None
    if record_hash(record) != head.hash:
        raise AuditError(f"the audit spool's last record (seq {head.seq}) fails its hash: it was modified")
    return head


# --------------------------------------------------------------------------- the facade


class AuditTrail(Protocol):
    """What the front ends write to: ``AuditLog`` in this process, or ``AuditProcess`` handing the
    events to one of its own (``auditworker``)."""

    async def start(self) -> None: ...

    def emit_nowait(self, event: AuditEvent | Mapping[str, Any]) -> object:
        """Queue an event (allowed commands): sealed in order, durable with the next group commit."""
        ...

    def emit(self, event: AuditEvent | Mapping[str, Any]) -> Awaitable[dict[str, Any]]:
        """The sealed record, once durable (before answering a blocked or held command)."""
        ...

    def emit_run_nowait(self, template: CommandTemplate, sql: str, time: float, duration_ms: float | None,
                        rows: int | None, masked: Mapping[str, int]) -> None:
        """``emit_nowait(template.run(...))``, for the per-statement hot path."""
        ...

    def sealing_chain(self) -> Chain | None:
        """The chain lines are sealed onto in this process, for a sealer outside Python (the
        native lane) to advance before ``append_sealed``; None when another process seals."""
        ...

    def append_sealed(self, lines: bytes, count: int) -> None:
        """Spool ``count`` lines sealed onto ``sealing_chain()`` since anything else was."""
        ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...


class AuditLog:
    """Durable, chained, shipped audit events for one proxy instance.

    ``await emit(event)`` returns once the event is fsync'd to the spool (use it before answering a
    blocked or approved command); ``emit_nowait`` queues it for the next group commit (allowed
    statements). Each sink has a shipper that reads from its persisted cursor, so a restart
    re-sends exactly what was not acknowledged.
    """

    def __init__(
        self,
        spool_dir: Path,
        sinks: Sequence[Sink],
        chain_key: bytes | None,
        instance_id: str,
        *,
        signing_key: Ed25519PrivateKey | None = None,
        checkpoint_every: int = 1000,
        checkpoint_interval: float = 60.0,
        fsync: bool = True,
        flush_interval: float = 0.05,
        max_segment_bytes: int = 16 << 20,
        batch_size: int = 100,
        batch_interval: float = 0.2,
        retry_initial: float = 0.2,
        retry_max: float = 30.0,
        drain_timeout: float = 5.0,
    ) -> None:
        names = [s.name for s in sinks]
        if len(set(names)) != len(names):
            raise ValueError(f"audit sink names must be unique: {names}")
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be at least 1")
        self.instance_id = instance_id
        self.sinks = tuple(sinks)
        self.spool = Spool(Path(spool_dir), max_segment_bytes=max_segment_bytes)
        self._chain_key = chain_key
        self._signing_key = signing_key
        self._checkpoint_every = checkpoint_every
        self._checkpoint_interval = checkpoint_interval
        self._fsync = fsync
        self._flush_interval = flush_interval
        self._batch_size = batch_size
        self._batch_interval = batch_interval
        self._retry = (retry_initial, retry_max)
        self._drain_timeout = drain_timeout
        self._chain: Chain | None = None
        self._writer: SpoolWriter | None = None
        self._shippers: list[Shipper] = []
        self._timer: asyncio.Task[None] | None = None
        self._since_checkpoint = 0
        self._closed = False

    @property
    def chain(self) -> Chain:
        if self._chain is None:
            raise AuditError("AuditLog is not started")
        return self._chain

    @property
    def shippers(self) -> tuple[Shipper, ...]:
        return tuple(self._shippers)

    async def start(self) -> None:
        last = await asyncio.to_thread(self.spool.open)
        keys: dict[str, Any] = {"hmac_key": self._chain_key, "signing_key": self._signing_key}
        if last is not None:
            self._chain = Chain.resume(chain_head(last), **keys)
        else:
            self._chain = Chain(f"{self.instance_id}@{rfc3339(_time.time())}", **keys)
        self._writer = SpoolWriter(self.spool, fsync=self._fsync, flush_interval=self._flush_interval)
        self._writer.start()
        self._shippers = [
            Shipper(
                sink, self.spool, self._writer, batch_size=self._batch_size,
                batch_interval=self._batch_interval, retry_initial=self._retry[0],
                retry_max=self._retry[1], on_progress=self._collect,
            )
            for sink in self.sinks
        ]
        for shipper in self._shippers:
            shipper.start()
        if self.chain.signs and self._checkpoint_interval > 0:
            self._timer = asyncio.create_task(self._checkpoint_timer(), name="audit-checkpoints")

    def emit_nowait(self, event: AuditEvent | Mapping[str, Any]) -> dict[str, Any]:
        """Seal and queue an event for the next group commit; returns the sealed record."""
        record, _ = self._append(event, urgent=False)
        return record

    def emit(self, event: AuditEvent | Mapping[str, Any]) -> Awaitable[dict[str, Any]]:
        """Seal an event now (its place in the chain is this call's) and wait, when awaited,
        until it and everything before it is durable in the spool."""
        record, committed = self._append(event, urgent=True)
        return self._durable(record, committed)

    async def _durable(self, record: dict[str, Any], committed: asyncio.Future[None]) -> dict[str, Any]:
        try:
            await committed
        except OSError as exc:
            raise AuditError(f"audit event {record['metadata']['uid']} not durable: {exc}") from exc
        return record

    async def flush(self) -> None:
        """Wait until everything emitted so far is durable."""
        if self._writer is not None:
            await self._writer.flush()

    def emit_run_nowait(self, template: CommandTemplate, sql: str, time: float, duration_ms: float | None,
                        rows: int | None, masked: Mapping[str, int]) -> None:
        """``emit_nowait(template.run(...))`` with the same line, minus the event and the record."""
        self._queue(self._running_chain().seal_run(template, sql, time, duration_ms, rows, masked), False)

    def sealing_chain(self) -> Chain | None:
        return self._running_chain()

    def append_sealed(self, lines: bytes, count: int) -> None:
        """Lines ``Chain.seal_run`` would have given, sealed in C by the native lane (``_seal.c``)."""
        self._running_chain()
        assert self._writer is not None
        self._writer.append(lines)
        self._since_checkpoint += count
        if self.chain.signs and self._since_checkpoint >= self._checkpoint_every:
            self._checkpoint()

    def _running_chain(self) -> Chain:
        if self._writer is None or self._closed:
            raise AuditError("AuditLog is not running")
        return self.chain

    def _append(
        self, event: AuditEvent | Mapping[str, Any], urgent: bool
    ) -> tuple[dict[str, Any], asyncio.Future[None]]:
        chain = self._running_chain()
        if isinstance(event, AuditEvent):
            record, line = chain.seal_event(event)
        else:
            record, line = chain.seal(dict(event))
        return record, self._queue(line, urgent)

    def _queue(self, line: bytes, urgent: bool) -> asyncio.Future[None]:
        """Spool a sealed line; every ``checkpoint_every`` lines, a signed checkpoint follows."""
        assert self._writer is not None
        committed = self._writer.append(line, urgent=urgent)
        self._since_checkpoint += 1
        if self.chain.signs and self._since_checkpoint >= self._checkpoint_every:
            self._checkpoint()
        return committed

    def _checkpoint(self) -> None:
        if self._writer is None:
            return
        _record, line = self.chain.seal(self.chain.checkpoint(_time.time()))
        self._writer.append(line)
        self._since_checkpoint = 0

    async def _checkpoint_timer(self) -> None:
        while True:
            await asyncio.sleep(self._checkpoint_interval)
            if self._since_checkpoint:
                self._checkpoint()

    def _collect(self) -> None:
        with contextlib.suppress(OSError):
            self.spool.gc([s.cursor for s in self._shippers])

    async def close(self) -> None:
        """Checkpoint, flush, give shippers ``drain_timeout`` to catch up, then stop them."""
        if self._closed or self._writer is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
        if self.chain.signs and self._since_checkpoint:
            self._checkpoint()
        self._closed = True
        await self._writer.close()
        await asyncio.gather(*(s.stop(self._drain_timeout) for s in self._shippers))
        for sink in self.sinks:
            aclose = getattr(sink, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        self._collect()
        await asyncio.to_thread(self.spool.close)
