"""The listener's certificate from a Secret (``spec.listen.tls``), followed when it is renewed.

A renewal (cert-manager rewrites the mounted Secret) must reach new handshakes without a
restart and without dropping sessions, and a broken renewal (a key that does not match) must not
take down what works: each renewal is loaded into a fresh ``SSLContext`` first, and handshakes
switch to it (through the server-name callback, which OpenSSL calls for every ClientHello) only
once it loaded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import tempfile
from collections.abc import Iterator

from .config import LISTEN_TLS_KEYS, SecretKeyRef
from .secrets import SecretStore

log = logging.getLogger(__name__)


def server_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def load_pair(cert: bytes, key: bytes) -> ssl.SSLContext:
    """A server context with this PEM chain and key (``ssl.SSLError`` when they do not load or
    match). OpenSSL reads them from files: anonymous in-memory ones (``memfd``), since the proxy's
    root filesystem is read-only and a sidecar has no writable /tmp."""
    ctx = server_context()
    with _in_memory(cert) as cert_path, _in_memory(key) as key_path:
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


@contextlib.contextmanager
def _in_memory(data: bytes) -> Iterator[str]:
    """A path to ``data`` that lives in memory only (a private temporary file where Linux's
    memfd is missing)."""
    if not hasattr(os, "memfd_create"):
        with tempfile.TemporaryDirectory(prefix="sidegate-tls-") as folder:
            path = os.path.join(folder, "pem")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            yield path
        return
    fd = os.memfd_create("sidegate-tls", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


class ServerCertificate:
    """``context`` is what the listener serves with; ``reload`` follows the Secret."""

    def __init__(self, secrets: SecretStore, ref: SecretKeyRef) -> None:
        self.secrets = secrets
        self.ref = ref
        self._pair = self.snapshot()
        self._current = load_pair(*self._pair)
        # what the listener holds: the first pair, handing each handshake the latest one
        self.context = self._current
        self.context.sni_callback = self._choose

    def snapshot(self) -> tuple[bytes, bytes]:
        """The Secret's certificate and key as mounted now (``SecretMissing`` if gone)."""
        cert, key = (self.secrets.get(self.ref, k) for k in LISTEN_TLS_KEYS)
        return cert, key

    def reload(self) -> None:
        """Serve the Secret's pair from the next handshake on, if it changed and loads."""
        pair = self.snapshot()
        if pair == self._pair:
            return
        self._current = load_pair(*pair)  # raises (and the old pair stays) when it does not load
        self._pair = pair
        log.info("listener certificate from Secret %s renewed", self.ref.name)

    def _choose(self, sslobj: ssl.SSLObject, _server_name: str | None, context: ssl.SSLContext) -> None:
        if self._current is not context:
            sslobj.context = self._current
