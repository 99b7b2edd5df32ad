"""The durable local spool: audit lines on disk before anyone is told a command happened.

Layout of the spool directory::

    segment-000000000001.jsonl   append-only JSON lines, rotated by size
    cursor-<sink>.json           how far each sink has acknowledged: {"segment": n, "offset": bytes}

``SpoolWriter`` group-commits: every line appended while an fsync is in flight rides the next
one, so durable emits cost one fsync per batch, not per event. Shippers only ever read up to the
*durable* end, so nothing a crash could still take back is ever sent. A segment is deleted once
every sink's cursor is past it (the newest segment with data is kept: a restart resumes the
chain from its last line).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .sinks import Sink

log = logging.getLogger(__name__)

_SEGMENT = re.compile(r"^segment-(\d{12})\.jsonl$")
_SINK_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class SpoolError(OSError):
    """The spool directory cannot be used; the audit trail must not silently continue."""


@dataclass(frozen=True, order=True)
class Cursor:
    """A position in the spool: byte ``offset`` in segment number ``segment``."""

    segment: int
    offset: int


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Segment files and cursors; synchronous (the async edge runs it in a thread)."""

    def __init__(self, directory: Path, *, max_segment_bytes: int = 16 << 20) -> None:
        self.directory = Path(directory)
        self.max_segment_bytes = max_segment_bytes
        self._file: IO[bytes] | None = None
        self._segment = 0
        self._size = 0
        self._last_data_segment = 0

    # ---------------------------------------------------------------- segments

    def _path(self, segment: int) -> Path:
        return self.directory / f"segment-{segment:012d}.jsonl"

    def segments(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        found = (_SEGMENT.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def open(self) -> bytes | None:
        """Recover and open for appending; returns the last complete line (chain head) if any.

        A torn last line (crash mid-write) was never acknowledged, so it is cut off.
        """
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            message = f"cannot create audit spool {self.directory}: {exc.strerror}"
            raise SpoolError(exc.errno, message) from None
        segments = self.segments()
        last_line: bytes | None = None
        for seg in reversed(segments):
            last_line = self._recover_tail(seg, truncate=seg == segments[-1])
            if last_line is not None:
                self._last_data_segment = seg
                break
        self._segment = segments[-1] if segments else 1
        path = self._path(self._segment)
        self._file = open(path, "ab")  # noqa: SIM115 - held open for the spool's lifetime
        self._size = self._file.tell()
        if not segments:
            _fsync_dir(self.directory)
        return last_line

    def _recover_tail(self, segment: int, truncate: bool) -> bytes | None:
        path = self._path(segment)
        with open(path, "r+b" if truncate else "rb") as f:
            size = f.seek(0, os.SEEK_END)
            pos, tail = size, b""
            while pos > 0:
                step = min(65536, pos)
                pos -= step
                f.seek(pos)
                tail = f.read(step) + tail
                if tail.count(b"\n") >= 2 or pos == 0:
                    break
            end = tail.rfind(b"\n")
            if truncate and (end + 1) + pos != size:
                log.warning("audit spool %s: cutting a torn last line (%d bytes)", path, size - pos - end - 1)
                f.truncate(pos + end + 1)
                f.flush()
                os.fsync(f.fileno())
            if end < 0:
                return None
            start = tail.rfind(b"\n", 0, end) + 1
            return tail[start:end] if start or pos == 0 else None

    @property
    def end(self) -> Cursor:
        return Cursor(self._segment, self._size)

    def first(self) -> Cursor:
        segments = self.segments()
        return Cursor(segments[0] if segments else self._segment, 0)

    def write(self, lines: Sequence[bytes], fsync: bool = True) -> Cursor:
        """Append complete lines, fsync, rotate when the segment is full; returns the new end."""
        if self._file is None:
            raise SpoolError(0, "spool is not open")
        data = b"".join(lines)
        try:
            self._file.write(data)
            self._file.flush()
            if fsync:
                os.fsync(self._file.fileno())
        except OSError:
            with contextlib.suppress(OSError):
                self._file.truncate(self._size)
            raise
        self._size += len(data)
        if data:
            self._last_data_segment = self._segment
        if self._size >= self.max_segment_bytes:
            self._rotate()
        return self.end

    def _rotate(self) -> None:
        assert self._file is not None
        os.fsync(self._file.fileno())
        self._file.close()
        self._segment += 1
        self._file = open(self._path(self._segment), "ab")  # noqa: SIM115
        self._size = 0
        _fsync_dir(self.directory)

    def read(self, cursor: Cursor, limit: Cursor, max_lines: int) -> tuple[list[bytes], Cursor]:
        """Complete lines from ``cursor`` up to (not past) ``limit``; empty with a moved cursor
        when only a segment boundary was crossed."""
        if cursor >= limit:
            return [], cursor
        path = self._path(cursor.segment)
        stop = limit.offset if cursor.segment == limit.segment else None
        size = 1 << 20
        try:
            with open(path, "rb") as f:
                while True:
                    f.seek(cursor.offset)
                    want = size if stop is None else min(size, stop - cursor.offset)
                    chunk = f.read(want)
                    if b"\n" in chunk or len(chunk) < want:
                        break
                    size *= 4  # one very long line
        except FileNotFoundError:
            if cursor.segment < limit.segment:
                log.error("audit spool segment %s is missing; skipping it", path)
                return [], Cursor(cursor.segment + 1, 0)
            return [], cursor
        complete = chunk.split(b"\n")[:-1][:max_lines]
        if not complete:
            if cursor.segment < limit.segment:
                if chunk:
                    log.error("audit spool segment %s ends in a torn line; skipping it", path)
                return [], Cursor(cursor.segment + 1, 0)
            return [], cursor
        advanced = sum(len(line) + 1 for line in complete)
        return complete, Cursor(cursor.segment, cursor.offset + advanced)

    # ---------------------------------------------------------------- cursors and cleanup

    def _cursor_path(self, name: str) -> Path:
        if not _SINK_NAME.match(name):
            raise ValueError(f"audit sink name {name!r} must match {_SINK_NAME.pattern}")
        return self.directory / f"cursor-{name}.json"

    def load_cursor(self, name: str) -> Cursor:
        """A sink's acknowledged position; a new sink starts at the oldest spooled event."""
        try:
            raw = json.loads(self._cursor_path(name).read_text())
            cursor = Cursor(int(raw["segment"]), int(raw["offset"]))
        except FileNotFoundError:
            return self.first()
        except (ValueError, KeyError, TypeError) as exc:
            log.error("audit cursor for sink %s unreadable (%s): re-sending from the oldest event", name, exc)
            return self.first()
        return max(cursor, self.first())

    def save_cursor(self, name: str, cursor: Cursor) -> None:
        """Atomically persist a cursor (written after the sink acknowledged)."""
        path = self._cursor_path(name)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump({"segment": cursor.segment, "offset": cursor.offset}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.directory)

    def gc(self, cursors: Sequence[Cursor]) -> list[Path]:
        """Delete segments every sink is past, except the newest one holding data."""
        floor = min((c.segment for c in cursors), default=self._segment)
        deleted = []
        for seg in self.segments():
            if seg >= floor or seg >= self._segment:
                break
            if seg == self._last_data_segment:
                continue
            path = self._path(seg)
            path.unlink(missing_ok=True)
            deleted.append(path)
        return deleted

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None


class SpoolWriter:
    """Group commit in front of a ``Spool``: appends are cheap, waiters share one fsync.

    ``append`` returns a future resolved when the line is durable. While one write+fsync runs in a
    worker thread, new lines gather for the next one; lines nobody waits for are written at the
    latest after ``flush_interval``.
    """

    def __init__(self, spool: Spool, *, fsync: bool = True, flush_interval: float = 0.05) -> None:
        self.spool = spool
        self.fsync = fsync
        self.flush_interval = flush_interval
        self.durable_end = spool.end
        self._buffer: list[bytes] = []
        self._batch_done: asyncio.Future[None] | None = None  # of the lines in ``_buffer``
        self._committing: asyncio.Future[None] | None = None  # of the batch being written
        self._urgent = asyncio.Event()
        self._pending = asyncio.Event()
        self._durable_changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-spool-writer")

    def append(self, line: bytes, *, urgent: bool = False) -> asyncio.Future[None]:
        """Queue a complete line; the future resolves when it is durable. ``urgent`` commits at
        once (someone is waiting), otherwise within ``flush_interval``."""
        if self._closing:
            raise SpoolError(0, "audit spool is closed")
        done = self._next_batch()
        self._buffer.append(line)
        self._pending.set()
        if urgent:
            self._urgent.set()
        return done

    def _next_batch(self) -> asyncio.Future[None]:
        """The future of the lines in ``_buffer`` (made with the first of them)."""
        if self._batch_done is None:
            self._batch_done = asyncio.get_running_loop().create_future()
            # Nobody may await it (emit_nowait): a write error is logged, not "never retrieved".
            self._batch_done.add_done_callback(lambda f: f.cancelled() or f.exception())
        return self._batch_done

    async def flush(self) -> None:
        """Wait until every line appended so far is durable: the buffered ones and the batch
        being written right now (an ``emit_nowait`` whose commit already started)."""
        waits = [f for f in (self._committing, self._batch_done) if f is not None]
        if self._batch_done is not None:
            self._urgent.set()
        for f in waits:
            await asyncio.shield(f)

    async def wait_durable(self, seen: Cursor) -> None:
        """Sleep until the durable end is past ``seen`` (at once if it already is).

        A condition, not an edge: a commit that lands between the caller reading ``durable_end``
        and this coroutine first running (a task starts a loop turn later) is not missed.
        """
        while self.durable_end <= seen:
            await self._durable_changed.wait()

    async def _run(self) -> None:
        while True:
            await self._pending.wait()
            if not self._urgent.is_set() and not self._closing:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), self.flush_interval)
            await self._commit()
            if self._closing and not self._buffer:
                return

    async def _commit(self) -> None:
        self._pending.clear()
        self._urgent.clear()
        if not self._buffer:
            return
        batch, done = self._buffer, self._next_batch()
        self._buffer, self._batch_done = [], None
        self._committing = done
        try:
            end = await asyncio.to_thread(self.spool.write, batch, self.fsync)
        except OSError as exc:
            log.error("audit spool write failed (%s); retrying with the next commit", exc)
            self._buffer[:0] = batch
            self._next_batch()  # the retry is a batch like any other: flush() waits for it
            self._pending.set()
            self._committing = None
            if not done.done():
                done.set_exception(SpoolError(exc.errno or 0, f"audit spool write failed: {exc}"))
            await asyncio.sleep(self.flush_interval)
            return
        self._committing = None
        self.durable_end = end
        if not done.done():
            done.set_result(None)
        changed, self._durable_changed = self._durable_changed, asyncio.Event()
        changed.set()

    async def close(self) -> None:
        """Write out everything buffered and stop."""
        self._closing = True
        self._urgent.set()
        self._pending.set()
        if self._task is not None:
            await self._task


class Shipper:
    """Delivers spooled events to one sink from its persisted cursor, at least once.

    The cursor is saved only after ``deliver`` returned, so an acknowledged batch is never sent
    again and an unacknowledged one always is (after a restart too). Failures back off
    exponentially with jitter up to ``retry_max``; audit events are never dropped.
    """

    def __init__(
        self,
        sink: Sink,
        spool: Spool,
        writer: SpoolWriter,
        *,
        batch_size: int = 100,
        batch_interval: float = 0.2,
        retry_initial: float = 0.2,
        retry_max: float = 30.0,
        on_progress: Callable[[], None] | None = None,
    ) -> None:
        self.sink = sink
        self.spool = spool
        self.writer = writer
        self.batch_size = getattr(sink, "batch_size", batch_size)
        self.batch_interval = getattr(sink, "batch_interval", batch_interval)
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.cursor = spool.load_cursor(sink.name)
        self.delivered = 0
        self.failures = 0
        self.last_error: str | None = None
        self._on_progress = on_progress
        self._task: asyncio.Task[None] | None = None
        self._draining = False
        self._wake = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"audit-shipper-{self.sink.name}")

    @property
    def caught_up(self) -> bool:
        return self.cursor >= self.writer.durable_end

    async def _run(self) -> None:
        while True:
            durable = self.writer.durable_end
            lines, nxt = self.spool.read(self.cursor, durable, self.batch_size)
            if not lines:
                if nxt != self.cursor:
                    self.cursor = nxt
                    continue
                if self._draining:
                    return
                await self._idle(durable)
                continue
            if len(lines) < self.batch_size and self.batch_interval > 0 and not self._draining:
                await self._wait(self.batch_interval)
                lines, nxt = self.spool.read(self.cursor, self.writer.durable_end, self.batch_size)
            batch = []
            for line in lines:
                try:
                    batch.append(json.loads(line))
                except ValueError:
                    log.error("audit sink %s: unparseable spool line at %s", self.sink.name, self.cursor)
            if batch and not await self._deliver(batch):
                return  # draining and the sink is down: the batch stays spooled for next time
            await asyncio.to_thread(self.spool.save_cursor, self.sink.name, nxt)
            self.cursor = nxt
            self.delivered += len(batch)
            if self._on_progress is not None:
                self._on_progress()

    async def _wait(self, seconds: float) -> None:
        """Sleep, but wake early when asked to drain."""
        self._wake.clear()
        if self._draining:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _idle(self, seen: Cursor) -> None:
        """Wait for lines durable past ``seen`` (what the last read was limited to) or a drain."""
        durable = asyncio.ensure_future(self.writer.wait_durable(seen))
        wake = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait((durable, wake), return_when=asyncio.FIRST_COMPLETED)
        finally:
            durable.cancel()
            wake.cancel()

    async def _deliver(self, batch: list[dict[str, Any]]) -> bool:
        """Deliver with retries; False only when giving up because of a drain."""
        attempt = 0
        while True:
            try:
                await self.sink.deliver(batch)
                self.last_error = None
                return True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                if self._draining:
                    log.warning("audit sink %s: %s; %d events stay spooled", self.sink.name,
                                self.last_error, len(batch))
                    return False
                delay = min(self.retry_max, self.retry_initial * 2**attempt) * random.uniform(0.5, 1.0)
                attempt += 1
                log.warning("audit sink %s: delivery failed (%s); retry in %.1fs", self.sink.name,
                            self.last_error, delay)
                await self._wait(delay)

    async def stop(self, drain_timeout: float) -> None:
        """Try to deliver what is durable within ``drain_timeout``, then stop."""
        if self._task is None:
            return
        self._draining = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), drain_timeout)
        except TimeoutError:
            log.warning("audit sink %s: %s undelivered at shutdown; it will be re-sent after restart",
                        self.sink.name, "events" if not self.caught_up else "nothing")
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
