"""Orderings of the spool writer and a shipper that once lost audit events.

Each test forces one interleaving deterministically (no sleeps standing in for luck):

* a commit finishing between the shipper seeing the durable end and its waiter starting (the
  tail event was never shipped: tests/test_httpproxy.py waited 30 s for its second event);
* ``flush()`` while the batch holding the flushed line is being written;
* the retry after a failed spool write.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from audit_sinks import MemorySink
from sidegate_proxy.spool import Cursor, Shipper, Spool, SpoolWriter


async def eventually(cond: Callable[[], bool], what: str) -> None:
    for _ in range(200):  # 2 s
        if cond():
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"timed out waiting for {what}")


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def line(n: int) -> bytes:
    return b'{"n":%d}\n' % n


async def test_a_commit_before_the_shippers_waiter_starts_is_not_missed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The writer's thread finishing first is what a loaded machine does; running its work inline
    # makes that the only ordering.
    async def inline(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", inline)
    spool = Spool(tmp_path)
    spool.open()
    writer = SpoolWriter(spool, fsync=False, flush_interval=0.0)
    writer.start()
    await settle()  # the writer waits for lines

    read = spool.read
    injected = False

    def read_then_emit(cursor: Cursor, limit: Cursor, max_lines: int) -> tuple[list[bytes], Cursor]:
        # The shipper found nothing new; an event is emitted before it starts waiting for more,
        # and the writer (scheduled first) makes it durable before the shipper's waiter runs.
        nonlocal injected
        lines, nxt = read(cursor, limit, max_lines)
        if not lines and not injected:
            injected = True
            writer.append(line(1), urgent=True)
        return lines, nxt

    monkeypatch.setattr(spool, "read", read_then_emit)
    sink = MemorySink()
    shipper = Shipper(sink, spool, writer)
    shipper.start()
    try:
        await eventually(lambda: sink.events == [{"n": 1}], "the event to be shipped")
        assert injected
    finally:
        await writer.close()
        await shipper.stop(1.0)
        spool.close()


class GatedSpool(Spool):
    """A spool whose writes wait for ``gate`` (and can be told to fail once)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.fail_next = False

    def write(self, lines: Sequence[bytes], fsync: bool = True) -> Cursor:
        self.entered.set()
        self.gate.wait(5.0)
        if self.fail_next:
            self.fail_next = False
            raise OSError(28, "No space left on device")
        return super().write(lines, fsync)


async def test_flush_waits_for_the_batch_being_written(tmp_path: Path) -> None:
    spool = GatedSpool(tmp_path)
    spool.open()
    writer = SpoolWriter(spool, fsync=False, flush_interval=0.0)
    writer.start()
    try:
        writer.append(line(1))  # emit_nowait
        await asyncio.to_thread(spool.entered.wait, 5.0)  # its commit is in flight, nothing after it
        flush = asyncio.ensure_future(writer.flush())
        await asyncio.sleep(0.05)
        assert not flush.done(), "flush() returned before the line it covers was durable"
        spool.gate.set()
        await asyncio.wait_for(flush, 5.0)
        assert writer.durable_end == spool.end and spool.end.offset == len(line(1))
    finally:
        spool.gate.set()
        await writer.close()
        spool.close()


async def test_a_failed_write_is_retried_not_dropped(tmp_path: Path) -> None:
    spool = GatedSpool(tmp_path)
    spool.gate.set()
    spool.fail_next = True
    spool.open()
    writer = SpoolWriter(spool, fsync=False, flush_interval=0.01)
    writer.start()
    try:
        writer.append(line(1))  # emit_nowait: nobody waits, the retry is all it gets
        await eventually(lambda: writer.durable_end.offset == len(line(1)), "the retried line")
        assert spool._path(spool.end.segment).read_bytes() == line(1)
        await asyncio.wait_for(writer.flush(), 5.0)
    finally:
        await writer.close()
        spool.close()
