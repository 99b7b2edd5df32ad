"""Hostile bytes over a real socket: the proxy answers or closes, never crashes, never leaks.

The proxy runs on its own event loop thread so hypothesis can drive plain blocking sockets.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pg_fixtures import PG, ProxyUnderTest, run_proxy
from sidegate_proxy import pgwire

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

SECRETS = (b"gateway-held-secret",)


@pytest.fixture(scope="module")
def proxy(postgres: PG, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyUnderTest]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="proxy-loop", daemon=True)
    thread.start()
    guard = [{"name": "no-drop", "sql": {"statements": ["drop", "truncate", "delete", "update"]},
              "action": "block"}]
    cm = run_proxy(postgres, tmp_path_factory.mktemp("fuzz"), guardrails=guard,
                   masking=[{"name": "e", "columns": ["customers.email"], "strategy": "redact"}])
    p = asyncio.run_coroutine_threadsafe(cm.__aenter__(), loop).result(30)
    try:
        yield p
    finally:
        asyncio.run_coroutine_threadsafe(cm.__aexit__(None, None, None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def exchange(port: int, prefix: bytes, payload: bytes) -> bytes:
    """Send prefix + payload, half-close, and read whatever comes back until EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(prefix)
        if prefix:
            _read_until_ready(s)
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the proxy may already have hung up on a bad prefix of the payload
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        return out


def _read_until_ready(s: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"Z\0\0\0\5I"):
        chunk = s.recv(65536)
        if not chunk:
            raise AssertionError(f"login failed: {buf!r}")
        buf += chunk
    return buf


def login_bytes(p: ProxyUnderTest) -> bytes:
    return pgwire.startup_message({"user": "app", "database": "app"}) + pgwire.password_message(p.token())


def still_serves(p: ProxyUnderTest) -> None:
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(login_bytes(p))
        _read_until_ready(s)
        s.sendall(pgwire.query("SELECT email FROM customers WHERE id = 1"))
        reply = _read_until_ready(s)
        assert b"[REDACTED]" in reply and b"customer1@" not in reply


FRONTEND_TYPES = b"QPBDECSHXdcfFpZ\x00v"


@st.composite
def frames(draw: Any) -> bytes:
    out = b""
    for _ in range(draw(st.integers(1, 6))):
        kind = bytes([draw(st.sampled_from(FRONTEND_TYPES))])
        body = draw(st.binary(max_size=40))
        length = draw(st.one_of(st.just(len(body) + 4), st.integers(-5, 1 << 31 - 1)))
        out += kind + struct.pack("!i", length) + body
    return out


@st.composite
def startup_packets(draw: Any) -> bytes:
    code = draw(st.sampled_from([196608, 80877103, 80877104, 80877102, 131072, 196609]))
    body = draw(st.binary(max_size=60))
    length = draw(st.one_of(st.just(len(body) + 8), st.integers(-1, 20000)))
    return struct.pack("!ii", length, code) + body + draw(st.binary(max_size=20))


# SIDEGATE_FUZZ_EXAMPLES=6000 for a long run (both the compiled and the Python data plane pass it)
FUZZ = settings(max_examples=int(os.environ.get("SIDEGATE_FUZZ_EXAMPLES", "120")), deadline=None,
                suppress_health_check=list(HealthCheck))


@FUZZ
@given(st.one_of(startup_packets(), st.binary(max_size=200)))
def test_fuzz_before_authentication(proxy: ProxyUnderTest, payload: bytes) -> None:
    reply = exchange(proxy.port, b"", payload)
    assert not any(s in reply for s in SECRETS)
    assert b"XX000" not in reply, reply  # malformed input is the client's error, never an internal one
    assert proxy.server.upstream_connects <= 1 + _logins  # nothing unauthenticated reached upstream


_logins = 0


@FUZZ
@given(frames())
def test_fuzz_after_authentication(proxy: ProxyUnderTest, payload: bytes) -> None:
    global _logins
    _logins += 1
    reply = exchange(proxy.port, login_bytes(proxy), payload)
    assert not any(s in reply for s in SECRETS)
    assert b"XX000" not in reply, reply  # malformed input is the client's error, never an internal one
    assert b"customer1@example.com" not in reply


def test_still_serving_after_fuzzing(proxy: ProxyUnderTest) -> None:
    still_serves(proxy)
    # a malformed message gets a FATAL 08P01 and a closed connection, not silence
    reply = exchange(proxy.port, login_bytes(proxy), b"Q\0\0\0\2")
    assert b"08P01" in reply and reply.startswith(b"E")
    reply = exchange(proxy.port, b"", struct.pack("!ii", 8, 1234))
    assert b"08P01" in reply
    still_serves(proxy)
