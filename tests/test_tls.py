"""TLS over a plain transport (``sidegate_proxy.tls``), on loopback with real certificates.

The PostgreSQL proxy runs both of its TLS sides on it (tests/test_pgproxy*.py, and the lane's
tests/test_pgproxy_lane_tls.py); here its own contract: the handshake both ways, bytes that come
right behind the handshake, ciphertext written raw in order, both kinds of end, and failures
that say what failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from oidc_issuer import loopback_tls
from sidegate_proxy.tls import TLSTransport, handshake

# an application data record that fails its MAC
BAD_RECORD = b"\x17\x03\x03\x00\x20" + b"\x00" * 32
Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def tls_server(ctx: ssl.SSLContext, serve: Serve) -> AsyncIterator[tuple[int, list[BaseException]]]:
    """A loopback server whose connections do ``handshake`` then ``serve``; its errors are collected."""
    errors: list[BaseException] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            plain = await handshake(reader, writer, ctx, server_side=True)
            await serve(*plain)
        except Exception as exc:
            errors.append(exc)
            writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], errors
    finally:
        server.close()
        await server.wait_closed()


async def upper(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data.upper())
        await writer.drain()
    writer.close()


async def connect(port: int, ctx: ssl.SSLContext, host: str | None = "localhost",
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, TLSTransport]:
    """A client's plaintext streams, and the TLS transport under them."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    reader, writer = await handshake(reader, writer, ctx, server_side=False, server_hostname=host)
    transport = writer.transport
    assert isinstance(transport, TLSTransport)
    return reader, writer, transport


async def read_exactly(reader: asyncio.StreamReader, n: int) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), 10)


async def test_round_trip_both_sides(tmp_path: Path) -> None:
    server_ctx, client_ctx, _ca = loopback_tls(str(tmp_path))
    async with tls_server(server_ctx, upper) as (port, errors):
        reader, writer, transport = await connect(port, client_ctx)
        assert transport.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
        assert transport.get_extra_info("peercert")["subject"]
        assert transport.get_extra_info("cipher")
        assert transport.get_extra_info("peername")[0] == "127.0.0.1"  # the raw transport's
        big = bytes(range(256)) * 4096  # 1 MiB: dozens of records each way
        writer.write(b"hello")
        assert await read_exactly(reader, 5) == b"HELLO"
        writer.write(big)
        assert await read_exactly(reader, len(big)) == big.upper()
        writer.close()
        await asyncio.sleep(0.05)
    assert errors == []


async def test_bytes_right_behind_the_handshake_are_not_lost(tmp_path: Path) -> None:
    """A client's Finished and its first data in one segment: the server's handshake reads both."""
    server_ctx, client_ctx, _ca = loopback_tls(str(tmp_path))
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.set_result(await read_exactly(reader, 9))
        writer.close()

    async with tls_server(server_ctx, first) as (port, errors):
        loop = asyncio.get_running_loop()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setblocking(False)
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            client = client_ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
            while True:
                try:
                    client.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await loop.sock_sendall(sock, outgoing.read())
                    incoming.write(await loop.sock_recv(sock, 65536))
            client.write(b"right now")
            await loop.sock_sendall(sock, outgoing.read())  # Finished + data, one write
            assert await asyncio.wait_for(got, 10) == b"right now"
    assert errors == []


async def test_raw_ciphertext_keeps_its_place(tmp_path: Path) -> None:
    """What the lane encrypted but could not send goes out raw, before what Python encrypts next."""
    server_ctx, client_ctx, _ca = loopback_tls(str(tmp_path))
    async with tls_server(server_ctx, upper) as (port, errors):
        reader, writer, transport = await connect(port, client_ctx)
        transport.ssl_object.write(b"first,")  # as _tls.c does, on the same SSL object
        sealed = transport.outgoing.read()
        transport.write_raw(sealed)
        writer.write(b"second")
        assert await read_exactly(reader, 12) == b"FIRST,SECOND"
        writer.close()
    assert errors == []


@pytest.mark.parametrize("how", ["close_notify", "close_notify_alone", "ragged"])
async def test_both_kinds_of_end_read_as_eof(tmp_path: Path, how: str) -> None:
    server_ctx, client_ctx, _ca = loopback_tls(str(tmp_path))
    ended: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ended.set_result(await reader.read())
        writer.close()

    async with tls_server(server_ctx, until_eof) as (port, errors):
        _reader, writer, transport = await connect(port, client_ctx)
        writer.write(b"last words")
        await writer.drain()
        if how == "close_notify":
            writer.close()
        elif how == "close_notify_alone":  # a TLS half-close: the TCP connection stays open
            with contextlib.suppress(ssl.SSLWantReadError):
                transport.ssl_object.unwrap()
            transport.write_raw(transport.outgoing.read())
        else:  # PostgreSQL's clients: Terminate, then the socket just closes
            transport.raw.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
            transport.abort()
        assert await asyncio.wait_for(ended, 10) == b"last words"
    assert errors == []


async def test_untrusted_certificate_fails_on_both_ends(tmp_path: Path) -> None:
    server_ctx, _client_ctx, _ca = loopback_tls(str(tmp_path))
    stranger = ssl.create_default_context()  # the system CAs: not the test CA
    async with tls_server(server_ctx, upper) as (port, errors):
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect(port, stranger)
        for _ in range(100):
            if errors:
                break
            await asyncio.sleep(0.02)
    assert len(errors) == 1 and isinstance(errors[0], ssl.SSLError)  # the alert it was sent


async def test_wrong_host_name_is_refused(tmp_path: Path) -> None:
    server_ctx, client_ctx, _ca = loopback_tls(str(tmp_path))
    async with tls_server(server_ctx, upper) as (port, _errors):
        with pytest.raises(ssl.SSLCertVerificationError, match=r"mismatch|match"):
            await connect(port, client_ctx, host="db.other.invalid")


async def test_peer_gone_during_the_handshake(tmp_path: Path) -> None:
    _server_ctx, client_ctx, _ca = loopback_tls(str(tmp_path))

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    try:
        with pytest.raises(ConnectionResetError, match="during the TLS handshake"):
            await connect(server.sockets[0].getsockname()[1], client_ctx)
    finally:
        server.close()
        await server.wait_closed()


async def test_garbage_instead_of_records_ends_the_connection(tmp_path: Path) -> None:
    """Bytes that are not TLS after the handshake: the connection is lost with the TLS error."""
    server_ctx, client_ctx, _ca = loopback_tls(str(tmp_path))
    lost: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def read_all(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            lost.set_result(await reader.read())
        except Exception as exc:
            lost.set_exception(exc)

    async with tls_server(server_ctx, read_all) as (port, _errors):
        _reader, _writer, transport = await connect(port, client_ctx)
        transport.write_raw(BAD_RECORD)
        with pytest.raises(ssl.SSLError):  # not an EOF: the reader learns why
            await asyncio.wait_for(lost, 10)
        transport.abort()


async def test_writing_after_a_fatal_error_reports_the_loss(tmp_path: Path) -> None:
    server_ctx, client_ctx, _ca = loopback_tls(str(tmp_path))
    async with tls_server(server_ctx, upper) as (port, _errors):
        reader, writer, transport = await connect(port, client_ctx)
        transport.incoming.write(BAD_RECORD)  # as if the server had sent it
        transport.decrypt()  # bad record MAC: the connection is lost
        writer.write(b"too late")  # no exception here
        with pytest.raises(ssl.SSLError):
            await asyncio.wait_for(reader.read(), 10)
