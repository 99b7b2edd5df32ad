"""PostgreSQL v3 wire protocol, sans-IO: bytes in, typed messages out, and builders for replies.

Nothing here touches a socket or an event loop, so the framing and every decoder can be tested
(and fuzzed) byte by byte. The parsers keep each message's original frame in ``raw``: a proxy
that forwards a message unchanged writes those bytes back and never re-encodes anything. Only
the messages a proxy needs to look at get a typed class; everything else is ``Raw``. ``DataRow``
is decoded only when asked (``values()``), because most rows of most results are passed through.

Malformed input raises ``ProtocolError`` and nothing else; a parser that raised is not usable
any more (the connection must be closed, as PostgreSQL does).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = [
    "CANCEL_REQUEST_CODE",
    "GSSENC_REQUEST_CODE",
    "MAX_MESSAGE",
    "MAX_STARTUP",
    "PROTOCOL_3",
    "SSL_REQUEST_CODE",
    "BackendParser",
    "FrontendParser",
    "ProtocolError",
]

SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
PROTOCOL_3 = 196608  # 3.0
MAX_MESSAGE = 1 << 30  # PostgreSQL's own limit for one message (MaxAllocSize)
MAX_STARTUP = 10_000  # MAX_STARTUP_PACKET_LENGTH in postmaster.c
_NO_FIELDS: Mapping[str, str] = MappingProxyType({})

_I32 = struct.Struct("!i")
_I16 = struct.Struct("!h")
_U32 = struct.Struct("!I")
_HEADER = struct.Struct("!ci")
_FIELD = struct.Struct("!IhIhih")


class ProtocolError(Exception):
    """Bytes that are not a valid PostgreSQL protocol stream (at this point of a session)."""


# --------------------------------------------------------------------------- decoding helpers


class _Reader:
    """A cursor over one message body; every read checks bounds."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes, pos: int = 0) -> None:
        self.buf = buf  # a whole frame, read from ``pos`` on: no copy of the body
        self.pos = pos

    def i32(self) -> int:
        if self.pos + 4 > len(self.buf):
            raise ProtocolError("message truncated (int32)")
        (v,) = _I32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(v)

    def u32(self) -> int:
        if self.pos + 4 > len(self.buf):
            raise ProtocolError("message truncated (uint32)")
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(v)

    def i16(self) -> int:
        if self.pos + 2 > len(self.buf):
            raise ProtocolError("message truncated (int16)")
        (v,) = _I16.unpack_from(self.buf, self.pos)
        self.pos += 2
        return int(v)

    def byte(self) -> int:
        if self.pos >= len(self.buf):
            raise ProtocolError("message truncated (byte)")
        v = self.buf[self.pos]
        self.pos += 1
        return v

    def bytes_(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise ProtocolError("message truncated (bytes)")
        v = self.buf[self.pos : self.pos + n]
        self.pos += n
        return v

    def cstr(self) -> str:
        if self.pos < len(self.buf) and self.buf[self.pos] == 0:  # "": unnamed portals and statements
            self.pos += 1
            return ""
        end = self.buf.find(b"\0", self.pos)
        if end < 0:
            raise ProtocolError("unterminated string")
        try:
            v = self.buf[self.pos : end].decode()
        except UnicodeDecodeError:
            raise ProtocolError("string is not valid UTF-8") from None
        self.pos = end + 1
        return v

    def rest(self) -> bytes:
        v = self.buf[self.pos :]
        self.pos = len(self.buf)
        return v

    def count(self, what: str) -> int:
        n = self.i16()
        if n < 0:
            raise ProtocolError(f"negative {what} count")
        return n

    def i16s(self, what: str) -> tuple[int, ...]:
        """A count, then that many int16s (format codes): one unpack for all of them."""
        n = self.count(what)
        if not n:
            return ()
        if self.pos + 2 * n > len(self.buf):
            raise ProtocolError(f"message truncated ({what}s)")
        values = _int16_array(n).unpack_from(self.buf, self.pos)
        self.pos += 2 * n
        return values

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise ProtocolError("trailing bytes in message")


@functools.lru_cache(maxsize=64)
def _int16_array(n: int) -> struct.Struct:
    return struct.Struct(f"!{n}h")


def _frame(kind: bytes, body: bytes) -> bytes:
    return kind + _I32.pack(len(body) + 4) + body


def _cstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    if b"\0" in b:
        raise ValueError("NUL byte in protocol string")
    return b + b"\0"


# --------------------------------------------------------------------------- messages


# The messages keep ``@dataclass`` for equality and repr, but each writes its own ``__init__``:
# the compiled data plane builds one per frame, and a dataclass-generated initialiser would
# run as interpreted Python every time (mypyc compiles only the methods written here).


@dataclass(slots=True, init=False)
class Message:
    """Any message; ``raw`` is the complete frame as received (type byte, length, body)."""

    raw: bytes = field(repr=False)

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    @property
    def type(self) -> bytes:
        return self.raw[:1]

    @property
    def body(self) -> memoryview:
        return memoryview(self.raw)[5:]


@dataclass(slots=True, init=False)
class Raw(Message):
    """A message passed through without interpretation."""


# ---- startup phase (untyped frames, client to server)


@dataclass(slots=True, init=False)
class SSLRequest(Message):
    pass


@dataclass(slots=True, init=False)
class GSSENCRequest(Message):
    pass


@dataclass(slots=True, init=False)
class CancelRequest(Message):
    pid: int = 0
    secret: int = 0

    def __init__(self, raw: bytes, pid: int = 0, secret: int = 0) -> None:
        self.raw = raw
        self.pid = pid
        self.secret = secret


@dataclass(slots=True, init=False)
class StartupMessage(Message):
    version: int = PROTOCOL_3
    params: Mapping[str, str] = field(default_factory=dict)

    def __init__(self, raw: bytes, version: int = PROTOCOL_3, params: Mapping[str, str] = _NO_FIELDS) -> None:
        self.raw = raw
        self.version = version
        self.params = params

    @property
    def minor(self) -> int:
        return self.version & 0xFFFF


# ---- frontend (client to server)


@dataclass(slots=True, init=False)
class Query(Message):
    sql: str = ""

    def __init__(self, raw: bytes, sql: str = "") -> None:
        self.raw = raw
        self.sql = sql


@dataclass(slots=True, init=False)
class Parse(Message):
    name: str = ""
    sql: str = ""
    param_types: tuple[int, ...] = ()

    def __init__(self, raw: bytes, name: str = "", sql: str = "", param_types: tuple[int, ...] = ()) -> None:
        self.raw = raw
        self.name = name
        self.sql = sql
        self.param_types = param_types


@dataclass(slots=True, init=False)
class Bind(Message):
    portal: str = ""
    statement: str = ""
    param_formats: tuple[int, ...] = ()
    params: tuple[bytes | None, ...] = ()
    result_formats: tuple[int, ...] = ()

    def __init__(
        self,
        raw: bytes,
        portal: str = "",
        statement: str = "",
        param_formats: tuple[int, ...] = (),
        params: tuple[bytes | None, ...] = (),
        result_formats: tuple[int, ...] = (),
    ) -> None:
        self.raw = raw
        self.portal = portal
        self.statement = statement
        self.param_formats = param_formats
        self.params = params
        self.result_formats = result_formats

    def result_format(self, column: int) -> int:
        """The format code of result column ``column`` (one code applies to all)."""
        f = self.result_formats
        if not f:
            return 0
        return f[0] if len(f) == 1 else f[column] if column < len(f) else 0


@dataclass(slots=True, init=False)
class Describe(Message):
    kind: str = "S"  # S: statement, P: portal
    name: str = ""

    def __init__(self, raw: bytes, kind: str = "S", name: str = "") -> None:
        self.raw = raw
        self.kind = kind
        self.name = name


@dataclass(slots=True, init=False)
class Execute(Message):
    portal: str = ""
    max_rows: int = 0

    def __init__(self, raw: bytes, portal: str = "", max_rows: int = 0) -> None:
        self.raw = raw
        self.portal = portal
        self.max_rows = max_rows


@dataclass(slots=True, init=False)
class Close(Message):
    kind: str = "S"
    name: str = ""

    def __init__(self, raw: bytes, kind: str = "S", name: str = "") -> None:
        self.raw = raw
        self.kind = kind
        self.name = name


@dataclass(slots=True, init=False)
class Sync(Message):
    pass


@dataclass(slots=True, init=False)
class Flush(Message):
    pass


@dataclass(slots=True, init=False)
class Terminate(Message):
    pass


@dataclass(slots=True, init=False)
class FunctionCall(Message):
    """The fast-path interface: calls a function by OID, with no SQL a guardrail could see."""


@dataclass(slots=True, init=False)
class CopyData(Message):
    @property
    def data(self) -> memoryview:
        return self.body


@dataclass(slots=True, init=False)
class CopyDone(Message):
    pass


@dataclass(slots=True, init=False)
class CopyFail(Message):
    message: str = ""

    def __init__(self, raw: bytes, message: str = "") -> None:
        self.raw = raw
        self.message = message


@dataclass(slots=True, init=False)
class PasswordMessage(Message):
    """'p': a cleartext/md5 password, or a SASL (initial) response: the meaning is contextual."""

    def password(self) -> str:
        r = _Reader(self.raw, 5)
        value = r.cstr()
        r.end()
        return value


# ---- backend (server to client)


@dataclass(slots=True, init=False)
class Authentication(Message):
    code: int = 0
    data: bytes = b""

    def __init__(self, raw: bytes, code: int = 0, data: bytes = b"") -> None:
        self.raw = raw
        self.code = code
        self.data = data


@dataclass(slots=True, init=False)
class ParameterStatus(Message):
    name: str = ""
    value: str = ""

    def __init__(self, raw: bytes, name: str = "", value: str = "") -> None:
        self.raw = raw
        self.name = name
        self.value = value


@dataclass(slots=True, init=False)
class BackendKeyData(Message):
    pid: int = 0
    secret: int = 0

    def __init__(self, raw: bytes, pid: int = 0, secret: int = 0) -> None:
        self.raw = raw
        self.pid = pid
        self.secret = secret


@dataclass(slots=True, init=False)
class ReadyForQuery(Message):
    status: bytes = b"I"  # I idle, T in transaction, E failed transaction

    def __init__(self, raw: bytes, status: bytes = b"I") -> None:
        self.raw = raw
        self.status = status


@dataclass(frozen=True, slots=True)  # shared by memoised RowDescriptions: must stay immutable
class Field:
    name: str
    table_oid: int = 0
    attnum: int = 0
    type_oid: int = 25
    typlen: int = -1
    typmod: int = -1
    format: int = 0


@dataclass(slots=True, init=False)
class RowDescription(Message):
    fields: tuple[Field, ...] = ()

    def __init__(self, raw: bytes, fields: tuple[Field, ...] = ()) -> None:
        self.raw = raw
        self.fields = fields


@dataclass(slots=True, init=False)
class DataRow(Message):
    """Decoded lazily: ``values()`` walks the frame only when a row has to be rewritten."""

    def values(self) -> list[bytes | None]:
        return decode_data_row(self.raw)


@dataclass(slots=True, init=False)
class CommandComplete(Message):
    tag: str = ""

    def __init__(self, raw: bytes, tag: str = "") -> None:
        self.raw = raw
        self.tag = tag

    @property
    def rows(self) -> int | None:
        """The row count of tags like ``SELECT 5``, ``INSERT 0 3``, ``COPY 10``."""
        last = self.tag.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() and " " in self.tag else None


@dataclass(slots=True, init=False)
class ErrorResponse(Message):
    fields: Mapping[str, str] = field(default_factory=dict)

    def __init__(self, raw: bytes, fields: Mapping[str, str] = _NO_FIELDS) -> None:
        self.raw = raw
        self.fields = fields

    @property
    def sqlstate(self) -> str:
        return self.fields.get("C", "")

    @property
    def severity(self) -> str:
        return self.fields.get("V", self.fields.get("S", ""))

    @property
    def message(self) -> str:
        return self.fields.get("M", "")


@dataclass(slots=True, init=False)
class NoticeResponse(ErrorResponse):
    pass


@dataclass(slots=True, init=False)
class NotificationResponse(Message):
    pid: int = 0
    channel: str = ""
    payload: str = ""

    def __init__(self, raw: bytes, pid: int = 0, channel: str = "", payload: str = "") -> None:
        self.raw = raw
        self.pid = pid
        self.channel = channel
        self.payload = payload


@dataclass(slots=True, init=False)
class CopyResponse(Message):
    """CopyInResponse ('G'), CopyOutResponse ('H') or CopyBothResponse ('W')."""

    format: int = 0
    column_formats: tuple[int, ...] = ()

    def __init__(self, raw: bytes, format: int = 0, column_formats: tuple[int, ...] = ()) -> None:
        self.raw = raw
        self.format = format
        self.column_formats = column_formats


@dataclass(slots=True, init=False)
class ParseComplete(Message):
    pass


@dataclass(slots=True, init=False)
class BindComplete(Message):
    pass


@dataclass(slots=True, init=False)
class CloseComplete(Message):
    pass


@dataclass(slots=True, init=False)
class NoData(Message):
    pass


@dataclass(slots=True, init=False)
class PortalSuspended(Message):
    pass


@dataclass(slots=True, init=False)
class EmptyQueryResponse(Message):
    pass


@dataclass(slots=True, init=False)
class ParameterDescription(Message):
    type_oids: tuple[int, ...] = ()

    def __init__(self, raw: bytes, type_oids: tuple[int, ...] = ()) -> None:
        self.raw = raw
        self.type_oids = type_oids


# --------------------------------------------------------------------------- decoders


def decode_data_row(raw: bytes | memoryview) -> list[bytes | None]:
    """The column values of a complete DataRow frame (``None`` for SQL NULL)."""
    r = _Reader(bytes(raw), 5)
    values: list[bytes | None] = []
    for _ in range(r.count("column")):
        n = r.i32()
        values.append(None if n == -1 else r.bytes_(n))
    r.end()
    return values


def _strings(r: _Reader) -> tuple[str, ...]:
    return tuple(r.cstr() for _ in range(r.count("string")))


def _int16s(r: _Reader, what: str) -> tuple[int, ...]:
    return r.i16s(what)


def _error_fields(r: _Reader) -> dict[str, str]:
    out: dict[str, str] = {}
    while True:
        code = r.byte()
        if code == 0:
            break
        out[chr(code)] = r.cstr()
    return out


_Decoder = Callable[[bytes], Message]  # the whole frame in, a message out


def _empty(cls: type[Message]) -> _Decoder:
    def decode(raw: bytes) -> Message:
        if len(raw) != 5:
            raise ProtocolError("trailing bytes in message")
        return cls(raw)

    return decode


def _d_query(raw: bytes) -> Message:
    r = _Reader(raw, 5)
    m = Query(raw, r.cstr())
    r.end()
    return m


def _d_parse(raw: bytes) -> Message:
    r = _Reader(raw, 5)
    name, sql = r.cstr(), r.cstr()
    types = tuple(r.u32() for _ in range(r.count("parameter type")))
    r.end()
    return Parse(raw, name, sql, types)


_FORMAT_CODES = frozenset({0, 1})  # text, binary


def _d_bind(raw: bytes) -> Message:
    r = _Reader(raw, 5)
    portal, statement = r.cstr(), r.cstr()
    param_formats = _int16s(r, "parameter format")
    params: list[bytes | None] = []
    for _ in range(r.count("parameter")):
        n = r.i32()
        params.append(None if n == -1 else r.bytes_(n))
    result_formats = _int16s(r, "result format")
    r.end()
    if not (_FORMAT_CODES.issuperset(param_formats) and _FORMAT_CODES.issuperset(result_formats)):
        raise ProtocolError("invalid format code in Bind")
    return Bind(raw, portal, statement, param_formats, tuple(params), result_formats)


def _d_describe_or_close(cls: type[Describe] | type[Close]) -> _Decoder:
    def decode(raw: bytes) -> Message:
        r = _Reader(raw, 5)
        kind = chr(r.byte())
        if kind not in ("S", "P"):
            raise ProtocolError(f"invalid {cls.__name__} target {kind!r}")
        m = cls(raw, kind, r.cstr())
        r.end()
        return m

    return decode


def _d_execute(raw: bytes) -> Message:
    r = _Reader(raw, 5)
    m = Execute(raw, r.cstr(), r.i32())
    r.end()
    return m


def _d_copy_fail(raw: bytes) -> Message:
    r = _Reader(raw, 5)
    m = CopyFail(raw, r.cstr())
    r.end()
    return m


def _d_auth(raw: bytes) -> Message:
    r = _Reader(raw, 5)
    return Authentication(raw, r.i32(), r.rest())


def _d_param_status(raw: bytes) -> Message:
    r = _Reader(raw, 5)
    m = ParameterStatus(raw, r.cstr(), r.cstr())
    r.end()
    return m


def _d_key_data(raw: bytes) -> Message:
    r = _Reader(raw, 5)
    pid, secret = r.i32(), r.i32()
    r.rest()  # protocol 3.2 allows longer keys; the proxy never forwards them
    return BackendKeyData(raw, pid, secret)


def _d_ready(raw: bytes) -> Message:
    status = raw[5:]
    if status not in (b"I", b"T", b"E"):
        raise ProtocolError(f"invalid transaction status {status!r}")
    return ReadyForQuery(raw, status)


def _d_row_description(raw: bytes) -> Message:
    if len(raw) <= _MEMO_ROW_DESCRIPTION:
        return RowDescription(raw, _memo_fields(raw))
    return RowDescription(raw, _row_fields(_Reader(raw, 5)))


# A prepared statement's RowDescription recurs byte for byte with every execution (twice with the
# proxy's own Describe): decoding is pure and Fields are immutable, so small ones are memoised.
_MEMO_ROW_DESCRIPTION = 2048


@functools.lru_cache(maxsize=256)
def _memo_fields(raw: bytes) -> tuple[Field, ...]:
    return _row_fields(_Reader(raw, 5))


def _row_fields(r: _Reader) -> tuple[Field, ...]:
    fields = []
    for _ in range(r.count("field")):
        name = r.cstr()
        if r.pos + _FIELD.size > len(r.buf):
            raise ProtocolError("message truncated (field)")
        values = _FIELD.unpack_from(r.buf, r.pos)
        r.pos += _FIELD.size
        fields.append(Field(name, *values))
    r.end()
    return tuple(fields)


def _d_command_complete(raw: bytes) -> Message:
    r = _Reader(raw, 5)
    m = CommandComplete(raw, r.cstr())
    r.end()
    return m


def _d_error(cls: type[ErrorResponse]) -> _Decoder:
    def decode(raw: bytes) -> Message:
        r = _Reader(raw, 5)
        m = cls(raw, _error_fields(r))
        r.end()
        return m

    return decode


def _d_notification(raw: bytes) -> Message:
    r = _Reader(raw, 5)
    m = NotificationResponse(raw, r.i32(), r.cstr(), r.cstr())
    r.end()
    return m


def _d_copy_response(raw: bytes) -> Message:
    r = _Reader(raw, 5)
    fmt = r.byte()
    m = CopyResponse(raw, fmt, _int16s(r, "column format"))
    r.end()
    return m


def _d_param_description(raw: bytes) -> Message:
    r = _Reader(raw, 5)
    m = ParameterDescription(raw, tuple(r.u32() for _ in range(r.count("parameter"))))
    r.end()
    return m


def _lazy(cls: type[Message]) -> _Decoder:
    return cls


FRONTEND: Mapping[bytes, _Decoder] = {
    b"Q": _d_query,
    b"P": _d_parse,
    b"B": _d_bind,
    b"D": _d_describe_or_close(Describe),
    b"E": _d_execute,
    b"C": _d_describe_or_close(Close),
    b"S": _empty(Sync),
    b"H": _empty(Flush),
    b"X": _empty(Terminate),
    b"F": _lazy(FunctionCall),
    b"d": _lazy(CopyData),
    b"c": _empty(CopyDone),
    b"f": _d_copy_fail,
    b"p": _lazy(PasswordMessage),
}

BACKEND: Mapping[bytes, _Decoder] = {
    b"R": _d_auth,
    b"S": _d_param_status,
    b"K": _d_key_data,
    b"Z": _d_ready,
    b"T": _d_row_description,
    b"D": _lazy(DataRow),
    b"C": _d_command_complete,
    b"E": _d_error(ErrorResponse),
    b"N": _d_error(NoticeResponse),
    b"A": _d_notification,
    b"G": _d_copy_response,
    b"H": _d_copy_response,
    b"W": _d_copy_response,
    b"d": _lazy(CopyData),
    b"c": _empty(CopyDone),
    b"1": _empty(ParseComplete),
    b"2": _empty(BindComplete),
    b"3": _empty(CloseComplete),
    b"n": _empty(NoData),
    b"s": _empty(PortalSuspended),
    b"I": _empty(EmptyQueryResponse),
    b"t": _d_param_description,
}


# --------------------------------------------------------------------------- parsers


class _Parser:
    """Framing of typed messages: ``feed`` returns every complete message, keeps the rest."""

    decoders: Mapping[bytes, _Decoder] = {}

    def __init__(self, max_length: int = MAX_MESSAGE) -> None:
        self.max_length = max_length
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a complete message."""
        return len(self._buf)

    def take_pending(self) -> bytes:
        """Those bytes, handed over (to the native lane, which frames them itself)."""
        data = bytes(self._buf)
        self._buf = bytearray()
        return data

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        out: list[Message] = []
        if self._untyped():
            self._buf += data
            data = b""
            out = self._feed_startup()
            if self._untyped():
                return out
        # Typed frames, the hot path: a chunk is usually whole messages, so parse straight from
        # it and keep only a trailing partial frame.
        if self._buf:
            self._buf += data
            buf = bytes(self._buf)
        else:
            buf = data if isinstance(data, bytes) else bytes(data)
        append = out.append
        header = _HEADER.unpack_from
        decoders = self.decoders
        max_length = self.max_length
        pos, n = 0, len(buf)
        kind = b""
        try:
            while n - pos >= 5:
                kind, length = header(buf, pos)
                if length < 4 or length > max_length:
                    raise ProtocolError(f"invalid length {length} for message type {kind!r}")
                end = pos + length + 1
                if end > n:
                    break
                decoder = decoders.get(kind)  # inlined: this loop runs for every message relayed
                append(self._unknown(kind, buf[pos:end]) if decoder is None else decoder(buf[pos:end]))
                pos = end
        except (ValueError, struct.error, IndexError) as exc:  # defensive: never crash the caller
            raise ProtocolError(f"malformed message {kind!r}: {exc}") from None
        finally:
            self._buf = bytearray(buf[pos:]) if pos < n else bytearray()
        return out

    def _feed_startup(self) -> list[Message]:
        """Untyped startup frames from the buffer, until the parser switches to typed ones."""
        out: list[Message] = []
        buf = self._buf
        pos, n = 0, len(buf)
        try:
            while self._untyped():
                msg, size = self._startup(buf, pos, n)
                if msg is None:
                    break
                out.append(msg)
                pos += size
        finally:
            del buf[:pos]
        return out

    def _unknown(self, kind: bytes, raw: bytes) -> Message:
        return Raw(raw)

    def _untyped(self) -> bool:
        return False

    def _startup(self, buf: bytearray, pos: int, n: int) -> tuple[Message | None, int]:
        raise NotImplementedError


class BackendParser(_Parser):
    """Server-to-client messages (after the single-byte SSL answer, which the caller reads)."""

    decoders = BACKEND


class FrontendParser(_Parser):
    """Client-to-server messages, including the untyped startup phase.

    ``startup_max`` bounds a startup packet (before anyone is authenticated, so it is small);
    after the StartupMessage the parser switches to typed messages bounded by ``max_length``.
    Unknown typed messages are a protocol violation: the proxy must not forward what it does
    not understand from an untrusted client.
    """

    decoders = FRONTEND

    def __init__(self, max_length: int = MAX_MESSAGE, *, startup: bool = True,
                 startup_max: int = MAX_STARTUP) -> None:
        super().__init__(max_length)
        self.in_startup = startup
        self.startup_max = startup_max

    def _untyped(self) -> bool:
        return self.in_startup

    def _unknown(self, kind: bytes, raw: bytes) -> Message:
        raise ProtocolError(f"unknown message type {kind!r}")

    def _startup(self, buf: bytearray, pos: int, n: int) -> tuple[Message | None, int]:
        if n - pos < 8:
            return None, 0
        (length,) = _I32.unpack_from(buf, pos)
        if length < 8 or length > self.startup_max:
            raise ProtocolError(f"invalid startup packet length {length}")
        if n - pos < length:
            return None, 0
        raw = bytes(buf[pos : pos + length])
        (code,) = _I32.unpack_from(raw, 4)
        if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
            if length != 8:
                raise ProtocolError("invalid SSL/GSSENC request length")
            return (SSLRequest(raw) if code == SSL_REQUEST_CODE else GSSENCRequest(raw)), length
        if code == CANCEL_REQUEST_CODE:
            if length != 16:
                raise ProtocolError("invalid cancel request length")
            pid, secret = struct.unpack_from("!ii", raw, 8)
            self.in_startup = False
            return CancelRequest(raw, pid, secret), length
        if code >> 16 != 3:
            raise ProtocolError(f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}")
        self.in_startup = False
        return StartupMessage(raw, code, _startup_params(raw[8:])), length


def _startup_params(body: bytes) -> dict[str, str]:
    if body == b"\0":
        return {}
    if not body.endswith(b"\0\0"):
        raise ProtocolError("startup packet is not terminated")
    parts = body[:-2].split(b"\0")
    if len(parts) % 2:
        raise ProtocolError("startup packet has a name without a value")
    params: dict[str, str] = {}
    try:
        for k, v in zip(parts[::2], parts[1::2], strict=True):
            if not k:
                raise ProtocolError("empty startup parameter name")
            params[k.decode()] = v.decode()
    except UnicodeDecodeError:
        raise ProtocolError("startup parameter is not valid UTF-8") from None
    return params


# --------------------------------------------------------------------------- builders


def startup_message(params: Mapping[str, str], version: int = PROTOCOL_3) -> bytes:
    body = _I32.pack(version) + b"".join(_cstr(k) + _cstr(v) for k, v in params.items()) + b"\0"
    return _I32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return _I32.pack(8) + _I32.pack(SSL_REQUEST_CODE)


def gssenc_request() -> bytes:
    return _I32.pack(8) + _I32.pack(GSSENC_REQUEST_CODE)


def cancel_request(pid: int, secret: int) -> bytes:
    return struct.pack("!iiii", 16, CANCEL_REQUEST_CODE, pid, secret)


def query(sql: str) -> bytes:
    return _frame(b"Q", _cstr(sql))


def parse(name: str, sql: str, param_types: Sequence[int] = ()) -> bytes:
    types = b"".join(_U32.pack(t) for t in param_types)
    return _frame(b"P", _cstr(name) + _cstr(sql) + _I16.pack(len(param_types)) + types)


def bind(portal: str, statement: str, params: Sequence[bytes | None] = (),
         param_formats: Sequence[int] = (), result_formats: Sequence[int] = ()) -> bytes:
    body = bytearray(_cstr(portal) + _cstr(statement))
    body += _I16.pack(len(param_formats)) + b"".join(_I16.pack(f) for f in param_formats)
    body += _I16.pack(len(params))
    for p in params:
        body += _I32.pack(-1) if p is None else _I32.pack(len(p)) + p
    body += _I16.pack(len(result_formats)) + b"".join(_I16.pack(f) for f in result_formats)
    return _frame(b"B", bytes(body))


def describe(kind: str, name: str = "") -> bytes:
    return _frame(b"D", kind.encode() + _cstr(name))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return _frame(b"E", _cstr(portal) + _I32.pack(max_rows))


def close(kind: str, name: str = "") -> bytes:
    return _frame(b"C", kind.encode() + _cstr(name))


def sync() -> bytes:
    return b"S\0\0\0\4"


def flush() -> bytes:
    return b"H\0\0\0\4"


def terminate() -> bytes:
    return b"X\0\0\0\4"


def copy_data(data: bytes) -> bytes:
    return _frame(b"d", data)


def copy_done() -> bytes:
    return b"c\0\0\0\4"


def copy_fail(message: str) -> bytes:
    return _frame(b"f", _cstr(message))


def password_message(password: str | bytes) -> bytes:
    return _frame(b"p", _cstr(password))


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return _frame(b"p", _cstr(mechanism) + _I32.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return _frame(b"p", data)


def authentication(code: int, data: bytes = b"") -> bytes:
    return _frame(b"R", _I32.pack(code) + data)


AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


def authentication_ok() -> bytes:
    return authentication(AUTH_OK)


def authentication_cleartext_password() -> bytes:
    return authentication(AUTH_CLEARTEXT)


def parameter_status(name: str, value: str) -> bytes:
    return _frame(b"S", _cstr(name) + _cstr(value))


def backend_key_data(pid: int, secret: int) -> bytes:
    return _frame(b"K", struct.pack("!ii", pid, secret))


def negotiate_protocol_version(minor: int, unsupported: Iterable[str]) -> bytes:
    names = list(unsupported)
    return _frame(b"v", _I32.pack(minor) + _I32.pack(len(names)) + b"".join(_cstr(n) for n in names))


def ready_for_query(status: bytes | str = b"I") -> bytes:
    s = status.encode() if isinstance(status, str) else status
    if s not in (b"I", b"T", b"E"):
        raise ValueError(f"invalid transaction status {status!r}")
    return _frame(b"Z", s)


def row_description(fields: Sequence[Field | str]) -> bytes:
    body = bytearray(_I16.pack(len(fields)))
    for f in fields:
        f = Field(f) if isinstance(f, str) else f
        body += _cstr(f.name) + _FIELD.pack(f.table_oid, f.attnum, f.type_oid, f.typlen, f.typmod, f.format)
    return _frame(b"T", bytes(body))


def data_row(values: Sequence[bytes | str | None]) -> bytes:
    parts = [_I16.pack(len(values))]
    for v in values:
        if v is None:
            parts.append(b"\xff\xff\xff\xff")
        else:
            b = v.encode() if isinstance(v, str) else v
            parts.append(_I32.pack(len(b)))
            parts.append(b)
    return _frame(b"D", b"".join(parts))


def command_complete(tag: str) -> bytes:
    return _frame(b"C", _cstr(tag))


def empty_query_response() -> bytes:
    return b"I\0\0\0\4"


def parse_complete() -> bytes:
    return b"1\0\0\0\4"


def bind_complete() -> bytes:
    return b"2\0\0\0\4"


def close_complete() -> bytes:
    return b"3\0\0\0\4"


def no_data() -> bytes:
    return b"n\0\0\0\4"


def portal_suspended() -> bytes:
    return b"s\0\0\0\4"


def _notice_fields(severity: str, sqlstate: str, message: str, detail: str | None, hint: str | None) -> bytes:
    fields = [(b"S", severity), (b"V", severity), (b"C", sqlstate), (b"M", message)]
    if detail:
        fields.append((b"D", detail))
    if hint:
        fields.append((b"H", hint))
    # a string with a NUL would truncate the field on the client: replace rather than fail
    return b"".join(code + _cstr(value.replace("\0", "\\0")) for code, value in fields) + b"\0"


def error_response(severity: str, sqlstate: str, message: str, detail: str | None = None,
                   hint: str | None = None) -> bytes:
    return _frame(b"E", _notice_fields(severity, sqlstate, message, detail, hint))


def notice_response(severity: str, sqlstate: str, message: str, detail: str | None = None,
                    hint: str | None = None) -> bytes:
    return _frame(b"N", _notice_fields(severity, sqlstate, message, detail, hint))
