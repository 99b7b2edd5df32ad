"""Audit delivery under failure: a real webhook receiver that goes away, restarts, and a SIGKILL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from loopback import serve
from sidegate_proxy.audit import AuditLog, command_event
from sidegate_proxy.auditverify import load_key, verify_lines
from sidegate_proxy.config import AuditConfig, SecretKeyRef
from sidegate_proxy.config import WebhookSink as WebhookConfig
from sidegate_proxy.policy import Caller
from sidegate_proxy.secrets import DictSecretStore, SecretMissing
from sidegate_proxy.sinks import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    StdoutSink,
    WebhookSink,
    sinks_from_config,
    verify_signature,
)

TOKEN = b"siem-shared-token-0123456789"
KEY = b"chain-key-0123456789abcdef012345"
CALLER = Caller(
    "repo:acme/api:ref:refs/heads/main", "https://token.actions.githubusercontent.com", frozenset()
)


def event(i: int) -> Any:
    return command_event(
        session_id=f"s{i // 10}",
        connection="payments/orders-db",
        connection_type="postgres",
        caller=CALLER,
        command=f"UPDATE t SET n = {i} WHERE id = 1",
        command_class="update",
        decision="allow",
        rows=1,
    )


class Receiver:
    """A SIEM stand-in: checks auth and signature, records every event id it acknowledged."""

    def __init__(self) -> None:
        self.acked: Counter[str] = Counter()
        self.events: list[dict[str, Any]] = []
        self.requests = 0
        self.bad_signatures = 0
        self.idempotency_keys: list[str] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests += 1
        if request.headers.get("Authorization") != "Bearer " + TOKEN.decode():
            return web.Response(status=401)
        if not verify_signature(TOKEN, body, request.headers.get(SIGNATURE_HEADER)):
            self.bad_signatures += 1
            return web.Response(status=401)
        self.idempotency_keys.append(request.headers[IDEMPOTENCY_HEADER])
        batch = json.loads(body)
        for e in batch:
            self.acked[e["metadata"]["uid"]] += 1
            self.events.append(e)
        return web.json_response({"accepted": len(batch)})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/ingest", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        if not self.port:
            self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/ingest"


async def wait_for(predicate: Any, what: str, deadline: float = 30.0) -> None:
    """Poll a condition (a generous deadline, not a timing assertion)."""

    async def loop() -> None:
        while not predicate():  # noqa: ASYNC110 - the state lives in other tasks' objects
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(loop(), deadline)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


def make_log(spool: Path, receiver: Receiver) -> AuditLog:
    sink = WebhookSink(receiver.url, TOKEN, timeout=2.0, batch_size=7, batch_interval=0.01)
    return AuditLog(
        spool, [sink], KEY, "pod-w", checkpoint_every=9, retry_initial=0.02, retry_max=0.2, drain_timeout=1.0
    )


async def test_webhook_outage_and_restart_deliver_every_event_exactly_once(tmp_path: Path) -> None:
    receiver = Receiver()
    await receiver.start()
    spool = tmp_path / "spool"
    emitted: list[str] = []

    log = make_log(spool, receiver)
    await log.start()
    for i in range(25):
        emitted.append((await log.emit(event(i)))["metadata"]["uid"])
    await wait_for(lambda: set(emitted) <= set(receiver.acked), "the first events")

    await receiver.stop()  # the SIEM goes away ...
    for i in range(25, 60):
        emitted.append(log.emit_nowait(event(i))["metadata"]["uid"])
    await log.flush()
    await wait_for(lambda: log.shippers[0].failures > 0, "a failed delivery")
    await log.close()  # ... and the proxy restarts while it is gone

    log = make_log(spool, receiver)
    await log.start()
    for i in range(60, 80):
        emitted.append((await log.emit(event(i)))["metadata"]["uid"])
    await receiver.start()  # the SIEM comes back on the same address
    await wait_for(lambda: set(emitted) <= set(receiver.acked), "all events after recovery")
    await log.close()

    assert receiver.bad_signatures == 0
    # at-least-once on the wire, but an acknowledged batch is never sent again
    assert {uid: n for uid, n in receiver.acked.items() if n != 1} == {}
    assert len(set(receiver.idempotency_keys)) == len(receiver.idempotency_keys)
    # everything the receiver got (events and checkpoints) still forms one verified chain
    report = verify_lines([json.dumps(e) for e in receiver.events], keys=[load_key(KEY)])
    assert report.ok, report.problems
    assert len(report.chains) == 1 and report.chains[0].verified_checkpoints >= 8


async def test_webhook_rejects_are_retried_not_dropped(tmp_path: Path) -> None:
    attempts: list[int] = []

    async def flaky(request: web.Request) -> web.Response:
        attempts.append(len(json.loads(await request.read())))
        return web.Response(status=503 if len(attempts) < 3 else 200)

    app = web.Application()
    app.router.add_post("/", flaky)
    runner, url = await serve(app)
    try:
        sink = WebhookSink(f"{url}/", TOKEN, batch_size=50, batch_interval=0.0)
        log = AuditLog(tmp_path / "spool", [sink], None, "pod-f", retry_initial=0.01, retry_max=0.05)
        await log.start()
        await log.emit(event(1))
        await wait_for(lambda: len(attempts) >= 3, "the third attempt")
        await log.close()
    finally:
        await runner.cleanup()
    assert attempts == [1, 1, 1]
    assert log.shippers[0].failures == 2


def test_sinks_from_config() -> None:
    store = DictSecretStore({"siem-token": {"token": TOKEN + b"\n"}})
    audit = AuditConfig(
        webhook=WebhookConfig("https://siem.internal/ingest", SecretKeyRef("siem-token", "token"))
    )
    sinks = sinks_from_config(audit, store)
    assert [type(s) for s in sinks] == [StdoutSink, WebhookSink]
    with pytest.raises(SecretMissing):
        sinks_from_config(audit, DictSecretStore({}))
    with pytest.raises(ValueError, match="http"):
        WebhookSink("ftp://x/")


async def test_signature_helpers_match_the_header_format() -> None:
    from sidegate_proxy.sinks import sign_body

    sig = sign_body(TOKEN, b"[]")
    assert sig.startswith("sha256=") and len(sig) == 7 + 64
    assert verify_signature(TOKEN, b"[]", sig)
    assert not verify_signature(TOKEN, b"[ ]", sig)
    assert not verify_signature(b"other", b"[]", sig)
    assert aiohttp  # the receiver above is a real aiohttp server


# --------------------------------------------------------------------------- crash


CRASHER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from sidegate_proxy.audit import AuditLog, command_event
    from sidegate_proxy.policy import Caller

    async def main():
        log = AuditLog(Path(sys.argv[1]), [], b"k" * 32, "pod-c", checkpoint_every=5)
        await log.start()
        caller = Caller("svc", "iss")
        i = 0
        while True:
            ev = command_event(session_id="s", connection="ns/db", connection_type="postgres",
                               caller=caller, command=f"DELETE FROM t WHERE id = {i}", decision="block")
            for _ in range(3):  # plain allowed statements batch behind the durable one
                log.emit_nowait(ev)
            rec = await log.emit(ev)
            print(rec["metadata"]["uid"], flush=True)
            i += 1

    asyncio.run(main())
    """
)


async def test_sigkill_loses_nothing_that_was_acknowledged(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CRASHER,
        str(spool),
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    acked: list[str] = []
    assert proc.stdout is not None
    while len(acked) < 40:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line, "the emitter died on its own"
        acked.append(line.decode().strip())
    proc.send_signal(signal.SIGKILL)  # no close(), no flush: the proxy is simply gone
    await proc.wait()

    log = AuditLog(spool, [], b"k" * 32, "pod-c")
    await log.start()
    after = await log.emit(event(0))
    await log.close()

    lines = []
    for seg in sorted(spool.glob("segment-*.jsonl")):
        lines.extend(seg.read_text().splitlines())
    uids = {json.loads(line)["metadata"]["uid"] for line in lines}
    assert set(acked) <= uids
    report = verify_lines(lines, keys=[load_key(b"k" * 32)])
    assert report.ok, report.problems
    assert after["chain_id"] == acked[0].rsplit(":", 1)[0]
    assert after["seq"] + 1 == report.chains[0].last_seq  # close() sealed a final checkpoint after it
