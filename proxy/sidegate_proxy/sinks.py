"""Where audit events go after the spool: stdout, a file, a SIEM webhook (Kubernetes Events later).

A sink only has to deliver one batch or raise: batching, retries with backoff, cursors and
re-sending after a restart are the shipper's job (``spool.Shipper``), so every sink gets them.
Delivery is at least once; ``metadata.uid`` (chain id + seq) lets receivers drop duplicates.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

import aiohttp

from .config import AuditConfig
from .secrets import SecretStore

SIGNATURE_HEADER = "X-Sidegate-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"


class DeliveryError(RuntimeError):
    """A sink did not accept a batch; the shipper retries it."""


@runtime_checkable
class Sink(Protocol):
    """An audit destination. Optional attributes ``batch_size``/``batch_interval`` override the
    shipper's batching; an optional ``async aclose()`` is called at shutdown."""

    name: str

    async def deliver(self, batch: list[dict[str, Any]]) -> None:
        """Deliver every event of ``batch`` or raise."""
        ...


def json_lines(batch: Sequence[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(e, separators=(",", ":"), sort_keys=True).encode() + b"\n" for e in batch)


class StdoutSink:
    """JSON lines on stdout: the default, picked up by the cluster's log pipeline."""

    def __init__(self, stream: IO[str] | None = None, name: str = "stdout") -> None:
        self.name = name
        self._stream = stream

    async def deliver(self, batch: list[dict[str, Any]]) -> None:
        stream = self._stream or sys.stdout
        stream.write(json_lines(batch).decode())
        stream.flush()


class FileSink:
    """JSON lines appended (and fsync'd) to a file: ``sidegate audit verify`` reads it directly."""

    def __init__(self, path: str | Path, name: str = "file", fsync: bool = True) -> None:
        self.name = name
        self.path = Path(path)
        self.fsync = fsync

    def _write(self, data: bytes) -> None:
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())

    async def deliver(self, batch: list[dict[str, Any]]) -> None:
        await asyncio.to_thread(self._write, json_lines(batch))


def sign_body(token: bytes, body: bytes) -> str:
    """The ``X-Sidegate-Signature`` value: ``sha256=<hex HMAC-SHA256 of the body>``."""
    return "sha256=" + hmac.new(token, body, hashlib.sha256).hexdigest()


def verify_signature(token: bytes, body: bytes, header: str | None) -> bool:
    """For receivers: constant-time check of an ``X-Sidegate-Signature`` header."""
    return header is not None and hmac.compare_digest(sign_body(token, body), header)


class WebhookSink:
    """POSTs a JSON array per batch; 2xx acknowledges it, anything else is retried by the shipper.

    Headers: ``Authorization: Bearer <token>`` and ``X-Sidegate-Signature`` (HMAC of the body with
    the same Secret token), ``Idempotency-Key`` naming the batch's first and last event ids.
    """

    def __init__(
        self,
        url: str,
        token: bytes | None = None,
        *,
        name: str = "webhook",
        timeout: float = 10.0,
        batch_size: int = 200,
        batch_interval: float = 1.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        if not url.startswith(("https://", "http://")):
            raise ValueError(f"audit webhook url must be http(s): {url!r}")
        self.name = name
        self.url = url
        self.batch_size = batch_size
        self.batch_interval = batch_interval
        self._token = token
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session = session
        self._own_session = session is None

    async def deliver(self, batch: list[dict[str, Any]]) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        body = json.dumps(batch, separators=(",", ":")).encode()
        ids = [str((e.get("metadata") or {}).get("uid", "")) for e in batch]
        headers = {"Content-Type": "application/json", IDEMPOTENCY_HEADER: f"{ids[0]}..{ids[-1]}"}
        if self._token:
            token = self._token.strip()
            headers["Authorization"] = "Bearer " + token.decode("utf-8", "replace")
            headers[SIGNATURE_HEADER] = sign_body(token, body)
        try:
            post = self._session.post(self.url, data=body, headers=headers, timeout=self._timeout)
            async with post as resp:
                if resp.status // 100 != 2:
                    text = (await resp.text())[:200]
                    raise DeliveryError(f"{self.url} answered {resp.status}: {text}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DeliveryError(f"{self.url}: {type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        if self._session is not None and self._own_session:
            await self._session.close()
        self._session = None


def sinks_from_config(audit: AuditConfig, secrets: SecretStore, *, stdout: bool = True) -> list[Sink]:
    """The sinks a Connection's ``spec.audit`` asks for (stdout always, unless turned off).

    A webhook whose Secret is missing raises ``SecretMissing``: no silent unauthenticated SIEM.
    """
    sinks: list[Sink] = [StdoutSink()] if stdout else []
    if audit.webhook is not None:
        token = secrets.get(audit.webhook.secret_ref) if audit.webhook.secret_ref else None
        sinks.append(WebhookSink(audit.webhook.url, token))
    return sinks
