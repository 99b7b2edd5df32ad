"""TLS on an ordinary transport, through an ``ssl.SSLObject`` and two memory BIOs.

asyncio's TLS transport keeps its socket and its TLS state to itself, so a session over it could
only ever be relayed by Python. Here the socket stays a plain transport that can be paused, and
the TLS state is an ``SSLObject`` whose BIOs hold every byte not yet decrypted or sent: the native
lane (``_lane.c``) drives that same object on the raw socket while Python is paused, and Python
carries on with it, in order, when the session comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

READ_SIZE = 65536


def take_over(reader: asyncio.StreamReader, transport: Any, protocol: asyncio.BaseProtocol) -> tuple[bytes, bool]:
    """Move a transport from its stream reader to ``protocol``: what the reader had buffered
    but nobody read yet, and whether it had seen EOF."""
    buffer = getattr(reader, "_buffer", bytearray())
    data = bytes(buffer)
    buffer.clear()
    transport.set_protocol(protocol)
    transport.resume_reading()  # the stream protocol may have paused a full buffer
    return data, reader.at_eof() or bool(getattr(reader, "_eof", False))


async def handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, context: ssl.SSLContext, *,
                    server_side: bool, server_hostname: str | None = None
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Run the handshake over a plain connection's streams; returns streams of its plaintext.

    Raises ``ssl.SSLError`` (the peer's alert is sent first) or ``ConnectionResetError``."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sslobj = context.wrap_bio(incoming, outgoing, server_side=server_side, server_hostname=server_hostname)
    while True:
        try:
            sslobj.do_handshake()
            break
        except ssl.SSLWantReadError:
            pass
        finally:
            flight = outgoing.read()  # our next flight, or the alert that says why we give up
            if flight:
                writer.write(flight)
        await writer.drain()
        data = await reader.read(READ_SIZE)
        if not data:
            raise ConnectionResetError("the peer closed the connection during the TLS handshake")
        incoming.write(data)
    transport = TLSTransport(writer.transport, sslobj, incoming, outgoing)
    transport.ciphertext_writer = writer  # a StreamWriter closes its transport when collected
    plain = asyncio.StreamReader(limit=READ_SIZE, loop=asyncio.get_running_loop())
    protocol = asyncio.StreamReaderProtocol(plain)
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    behind, eof = take_over(reader, writer.transport, _Ciphertext(transport))  # right behind the handshake
    incoming.write(behind)
    transport.decrypt()
    if eof:
        transport.raw_eof()
    return plain, asyncio.StreamWriter(transport, protocol, plain, asyncio.get_running_loop())


class TLSTransport(asyncio.Transport):
    """The plaintext side of a TLS connection whose ciphertext goes over ``raw``.

    Everything written is encrypted and handed to ``raw`` at once, so the raw transport's buffer
    is the only place bytes wait to be sent (``get_write_buffer_size``)."""

    def __init__(self, raw: Any, sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
        super().__init__()
        self.raw = raw
        self.ssl_object = sslobj
        self.incoming = incoming
        self.outgoing = outgoing
        self._protocol: Any = None
        self._closed = False
        self._error: BaseException | None = None
        self.ciphertext_writer: asyncio.StreamWriter | None = None

    # ---- ciphertext

    def write_raw(self, data: bytes) -> None:
        """Bytes already encrypted with this connection's state (the lane's, when it hands back)."""
        if data:
            self.raw.write(data)

    def _send(self) -> None:
        self.write_raw(self.outgoing.read())

    def decrypt(self) -> None:
        """Hand the protocol all the plaintext the incoming BIO holds whole records of."""
        chunks: list[bytes] = []
        eof = False
        try:
            while self.incoming.pending or self.ssl_object.pending():
                chunk = self.ssl_object.read(READ_SIZE)
                if not chunk:  # close_notify (CPython returns b"" for it)
                    eof = True
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass  # the rest of a record is still on its way
        except ssl.SSLZeroReturnError:
            eof = True  # close_notify, as older versions report it
        except ssl.SSLError as bad:
            self._error = bad
        finally:
            self._send()  # what reading answered (a key update)
        if chunks and self._protocol is not None:
            self._protocol.data_received(b"".join(chunks))
        if self._error is not None:
            self.raw.abort()
        elif eof:
            self.raw_eof()

    def raw_eof(self) -> None:
        keep_open = self._protocol is not None and self._protocol.eof_received()
        if not keep_open:
            self.close()

    # ---- asyncio.Transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed or not data:
            return
        try:
            self.ssl_object.write(data)
        except ssl.SSLError as broken:  # a transport's write does not raise: the loss is reported
            self._error = broken
            self.abort()
            return
        self._send()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half close")

    def get_write_buffer_size(self) -> int:
        return int(self.raw.get_write_buffer_size())

    def get_write_buffer_limits(self) -> tuple[int, int]:
        low, high = self.raw.get_write_buffer_limits()
        return low, high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.raw.set_write_buffer_limits(high, low)

    def pause_reading(self) -> None:
        self.raw.pause_reading()

    def resume_reading(self) -> None:
        self.raw.resume_reading()

    def is_reading(self) -> bool:
        return bool(self.raw.is_reading())

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol  # type: ignore[no-any-return]

    def is_closing(self) -> bool:
        return self._closed or bool(self.raw.is_closing())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(ssl.SSLError, ValueError):
            self.ssl_object.unwrap()  # close_notify; the peer's answer is not waited for
        with contextlib.suppress(ssl.SSLError):
            self._send()
        self.raw.close()

    def abort(self) -> None:
        self._closed = True
        self.raw.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self.ssl_object
        if name == "sslcontext":
            return self.ssl_object.context
        if name == "peercert":
            return self.ssl_object.getpeercert()
        if name == "cipher":
            return self.ssl_object.cipher()
        return self.raw.get_extra_info(name, default)

    def lost(self, exc: BaseException | None) -> None:
        self._closed = True
        if self._protocol is not None:
            protocol, self._protocol = self._protocol, None
            protocol.connection_lost(self._error or exc)


class _Ciphertext(asyncio.Protocol):
    """The raw transport's protocol: ciphertext in, plaintext to the TLS transport's protocol."""

    def __init__(self, tls: TLSTransport) -> None:
        self.tls = tls

    def data_received(self, data: bytes) -> None:
        self.tls.incoming.write(data)
        self.tls.decrypt()

    def eof_received(self) -> bool:
        # without close_notify too: PostgreSQL's clients end with Terminate, then just close
        if not self.tls.is_closing():
            self.tls.raw_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.tls.lost(exc)

    def pause_writing(self) -> None:
        if self.tls._protocol is not None:
            self.tls._protocol.pause_writing()

    def resume_writing(self) -> None:
        if self.tls._protocol is not None:
            self.tls._protocol.resume_writing()
