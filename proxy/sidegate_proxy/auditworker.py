"""The audit log in a process of its own, so sealing and spooling leave the relay's core.

Building the canonical record, linking the hash chain and spooling it cost a PostgreSQL relay
about a third of its work per statement. ``AuditProcess`` keeps the relay's share to a list
append: every ``batch_interval`` the events queued since go over a socket pair (as builtins, with
``marshal``; each caller once, then by number) to ``python -m sidegate_proxy.auditworker``, which
runs the ordinary ``AuditLog`` (chain, spool, shippers, sinks) on another core. One socket keeps
one order, so the chain is the relay's order. It pays where that other core is free (a gateway
with two); on a shared core it costs a little latency (docs/performance.md).

What can go wrong, and what happens then:
- the worker cannot start (spool locked or unwritable, a sink's Secret missing): ``start``
  raises ``AuditError`` with the worker's reason, and the proxy does not serve;
- the worker dies, or falls ``MAX_BACKLOG`` bytes behind: every later ``emit``/``emit_nowait``
  raises ``AuditError`` (new sessions are refused, since a session's start is recorded durably
  first) and ``failed`` resolves, which
  stops ``sidegate proxy`` with an error so Kubernetes restarts it. Events already in the spool
  are shipped after the restart; at most the last ``batch_interval`` of queued events is lost,
  as it would be by a crash of a single process;
- the relay dies (even SIGKILL): the worker reads to the end of the socket, spools what it got,
  drains its shippers and exits; it ignores SIGINT/SIGTERM, which its parent handles for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import marshal
import os
import pickle
import signal
import socket
import struct
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

from .audit import AuditError, AuditEvent, AuditLog, Chain, CommandTemplate
from .policy import ApprovalRef, Caller
from .sinks import Sink

log = logging.getLogger(__name__)

_LENGTH = struct.Struct(">I")
MAX_FRAME = 256 << 20  # a batch of events, pickled; far above any real one
START_TIMEOUT = 60.0
CLOSE_TIMEOUT = 30.0
MAX_BACKLOG = 64 << 20  # bytes of events the worker has not read yet
MAX_CALLERS = 10_000  # identities remembered by number on both ends
MAX_TEMPLATES = 10_000  # statement templates remembered by number on both ends
_CALLER, _MASKED, _APPROVAL = (AuditEvent._fields.index(f) for f in ("caller", "masked", "approval"))
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)  # the worker imports this very package

Event = AuditEvent | Mapping[str, Any]
# One statement run (``emit_run_nowait``): its template, then text, time, duration, rows, masks.
_Run = tuple[CommandTemplate, str, float, float | None, int | None, Mapping[str, int]]


@dataclass(frozen=True)
class AuditRecipe:
    """How the worker builds its ``AuditLog``: picklable, ``sinks`` a picklable factory (the
    sinks' clients are made in the worker, on its own event loop)."""

    spool_dir: Path
    sinks: Callable[[], Sequence[Sink]]
    chain_key: bytes | None
    instance_id: str
    fsync: bool = True
    log_level: int = logging.WARNING


def _frame(message: tuple[Any, ...]) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


async def _read_frame(reader: asyncio.StreamReader) -> tuple[Any, ...]:
    """The next message; ``asyncio.IncompleteReadError`` at the end of the socket."""
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if length > MAX_FRAME:
        raise AuditError(f"audit worker channel: frame of {length} bytes")
    # a private socket pair between this process and its own child: nothing else can write to it
    message = pickle.loads(await reader.readexactly(length))  # noqa: S301
    if not isinstance(message, tuple) or not message:
        raise AuditError(f"audit worker channel: unexpected {type(message).__name__}")
    return message


class AuditProcess:
    """The relay's end: an ``AuditTrail`` whose events are sealed by a worker process."""

    def __init__(self, recipe: AuditRecipe, *, batch_interval: float = 0.005) -> None:
        self.recipe = recipe
        self.batch_interval = batch_interval
        self.pid: int | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None
        self._replies: asyncio.Task[None] | None = None
        self._batch: list[Event | _Run] = []
        self._timer: asyncio.TimerHandle | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        # id(caller) or id(template) -> (its number on the channel, the object kept alive)
        self._callers: dict[int, tuple[int, object]] = {}
        self._templates: dict[int, tuple[int, object]] = {}
        self._error: AuditError | None = None
        self._closing = False
        self.failed: asyncio.Future[AuditError] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.failed = loop.create_future()
        ours, theirs = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")])))
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sidegate_proxy.auditworker", str(theirs.fileno()),
                pass_fds=(theirs.fileno(),), env=env, stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self.pid = self._proc.pid
        self._reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        try:
            self._writer.write(_frame(("start", self.recipe)))
            reply = await asyncio.wait_for(_read_frame(self._reader), START_TIMEOUT)
        except (asyncio.IncompleteReadError, TimeoutError, OSError, pickle.PicklingError, TypeError,
                AttributeError) as exc:  # the last three: a recipe that cannot be pickled
            reply = ("failed", repr(exc))
        if reply[0] != "ready":
            self._error = AuditError(f"the audit worker did not start: {reply[1]}")
            self._writer.close()
            await self._reap()
            raise self._error
        self._replies = asyncio.create_task(self._read_replies(), name="audit-worker-replies")
        log.info("audit worker %s sealing chain %s", self.pid, reply[1])

    def emit_nowait(self, event: Event) -> None:
        self._check_running()
        self._batch.append(event)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.batch_interval, self._send_batch)

    def emit_run_nowait(self, template: CommandTemplate, sql: str, time: float, duration_ms: float | None,
                        rows: int | None, masked: Mapping[str, int]) -> None:
        """A statement travels as its run alone: its template is sent once and named by a number
        after that, and the worker seals the run from its own copy (``Chain.seal_run``)."""
        self._check_running()
        self._batch.append((template, sql, time, duration_ms, rows, masked))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.batch_interval, self._send_batch)

    def sealing_chain(self) -> Chain | None:
        return None  # the worker seals: the lane hands its runs over as they are

    def append_sealed(self, lines: bytes, count: int) -> None:
        raise AuditError("the audit worker seals its own lines")

    def emit(self, event: Event) -> Awaitable[dict[str, Any]]:
        """The event's place in the chain is taken now (after everything queued before it)."""
        return self._request("emit", event)

    async def flush(self) -> None:
        """Wait until everything emitted so far is durable in the worker's spool."""
        await self._request("flush")

    def _check_running(self) -> None:
        if self._error is not None:
            raise self._error
        if self._writer is None or self._closing:
            raise AuditError("the audit worker is not running")

    def _request(self, kind: str, *args: Any) -> asyncio.Future[Any]:
        self._check_running()
        self._send_batch()
        request = next(self._ids)
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[request] = waiter
        self._write((kind, request, *args))
        return waiter

    def _send_batch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._batch and self._writer is not None and self._error is None:
            batch, self._batch = self._batch, []
            callers: dict[int, Caller] = {}
            templates: dict[int, list[Any]] = {}
            rows = [self._item_row(item, templates, callers) for item in batch]
            if callers:
                self._write(("callers", callers))
            if templates:
                self._write(("templates", templates))
            try:
                packed = marshal.dumps(rows)
            except ValueError:  # a mapping event holding something marshal can't carry
                self._write(("events", [_whole(item) for item in batch]))
            else:
                self._write(("rows", packed))

    def _item_row(self, item: Event | _Run, new_templates: dict[int, list[Any]],
                  new_callers: dict[int, Caller]) -> Any:
        if isinstance(item, AuditEvent):  # a NamedTuple: before the runs' plain tuples
            return self._row(item, new_callers)
        if isinstance(item, tuple):
            return self._run_row(item, new_templates, new_callers)
        return dict(item)

    def _run_row(self, run: _Run, new_templates: dict[int, list[Any]],
                 new_callers: dict[int, Caller]) -> tuple[Any, ...]:
        """A run as builtins: its template's number (the template itself the first time), then
        the run's own values."""
        template, sql, time, duration_ms, rows, masked = run
        number, new = self._numbered(self._templates, template, MAX_TEMPLATES)
        if new:
            new_templates[number] = self._row(template.event, new_callers)
        return number, sql, time, duration_ms, rows, dict(masked)

    def _numbered(self, table: dict[int, tuple[int, object]], obj: object, limit: int) -> tuple[int, bool]:
        """The number ``obj`` goes by on the channel, and whether it is new there (to be sent
        before its first use). Numbers are never reused, so once ``table`` is cleared at ``limit``
        the worker's old ones are just stale."""
        known = table.get(id(obj))
        if known is not None and known[1] is obj:
            return known[0], False
        if len(table) >= limit:
            table.clear()
        number = next(self._ids)
        table[id(obj)] = (number, obj)  # keeps obj alive, so its id is not reused while numbered
        return number, True

    def _row(self, event: AuditEvent, new_callers: dict[int, Caller]) -> list[Any]:
        """The event as builtins only (marshal is several times cheaper than pickle): the caller
        is sent once per identity and named by a number after that."""
        row: list[Any] = list(event)
        caller = event.caller
        if caller is not None:
            number, new = self._numbered(self._callers, caller, MAX_CALLERS)
            if new:
                new_callers[number] = caller
            row[_CALLER] = number
        if type(event.masked) is not dict:
            row[_MASKED] = dict(event.masked)
        if event.approval is not None:
            row[_APPROVAL] = astuple(event.approval)
        return row

    def _write(self, message: tuple[Any, ...]) -> None:
        assert self._writer is not None
        try:
            frame = _frame(message)
        except Exception as exc:  # an event that cannot travel is a bug: stop recording, loudly
            self._fail(AuditError(f"audit events could not be handed to the worker: {exc!r}"))
            raise self._error from exc  # type: ignore[misc]
        self._writer.write(frame)
        backlog = self._writer.transport.get_write_buffer_size()
        if backlog > MAX_BACKLOG:  # memory stays bounded: a worker this far behind is as good as gone
            self._fail(AuditError(f"the audit worker fell {backlog} bytes behind"))

    async def _read_replies(self) -> None:
        assert self._reader is not None
        try:
            while True:
                reply = await _read_frame(self._reader)
                if reply[0] == "closed":
                    return
                waiter = self._waiting.pop(reply[1], None)
                if waiter is None or waiter.done():
                    continue
                if reply[0] == "done":
                    waiter.set_result(reply[2])
                else:
                    waiter.set_exception(AuditError(reply[2]))
        except (asyncio.IncompleteReadError, OSError, AuditError, pickle.UnpicklingError) as exc:
            code = await self._reap()
            self._fail(AuditError(f"the audit worker exited (code {code}): "
                                  f"{'' if isinstance(exc, asyncio.IncompleteReadError) else exc}".rstrip(": ")))

    def _fail(self, error: AuditError) -> None:
        self._error = error
        if not self._closing:
            log.critical("%s; audit events can no longer be recorded", error)
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(error)
        self._waiting.clear()
        if self.failed is not None and not self.failed.done() and not self._closing:
            self.failed.set_result(error)

    async def _reap(self) -> int | None:
        if self._proc is None:
            return None
        try:
            return await asyncio.wait_for(self._proc.wait(), CLOSE_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            return await self._proc.wait()

    async def close(self) -> None:
        """Hand over what is queued, let the worker checkpoint, flush and drain its shippers."""
        if self._closing or self._writer is None:
            return
        self._send_batch()
        self._closing = True
        if self._error is None:
            with contextlib.suppress(OSError):
                self._writer.write(_frame(("close",)))
                await self._writer.drain()
        else:
            self._writer.close()  # a live worker that fell behind still spools what it has, then sees the end
        if self._replies is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._replies
        code = await self._reap()
        self._writer.close()
        if code:
            log.error("the audit worker exited with code %s", code)
        if self.failed is not None and not self.failed.done():
            self.failed.cancel()


# --------------------------------------------------------------------------- the worker


async def _serve(sock: socket.socket) -> int:
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    start = await _read_frame(reader)
    recipe: AuditRecipe = start[1]
    logging.getLogger().setLevel(recipe.log_level)
    try:
        audit = AuditLog(recipe.spool_dir, recipe.sinks(), recipe.chain_key, recipe.instance_id,
                         fsync=recipe.fsync)
        await audit.start()
    except Exception as exc:  # anything: the parent must learn why, not just that we died
        writer.write(_frame(("failed", f"{type(exc).__name__}: {exc}")))
        await writer.drain()
        return 1
    writer.write(_frame(("ready", audit.chain.chain_id)))
    pending: set[asyncio.Task[None]] = set()
    callers: dict[int, Caller] = {}
    templates: dict[int, CommandTemplate] = {}

    async def answer(request: int, done: Awaitable[Any]) -> None:
        try:
            result = await done
        except Exception as exc:
            writer.write(_frame(("error", request, f"{type(exc).__name__}: {exc}")))
        else:
            writer.write(_frame(("done", request, result)))

    def later(request: int, done: Awaitable[Any]) -> None:
        task = asyncio.create_task(answer(request, done))
        pending.add(task)
        task.add_done_callback(pending.discard)

    try:
        while True:
            try:
                message = await _read_frame(reader)
            except asyncio.IncompleteReadError:
                log.warning("audit worker: the proxy went away; spooling what it sent and stopping")
                break
            kind = message[0]
            if kind == "rows":
                for row in marshal.loads(message[1]):  # noqa: S302 (our own child, see _read_frame)
                    if type(row) is tuple:
                        _seal(audit.emit_run_nowait, templates[row[0]], *row[1:])
                    else:
                        _seal(audit.emit_nowait, _event(row, callers) if type(row) is list else row)
            elif kind == "callers":
                if len(callers) >= MAX_CALLERS:
                    callers.clear()  # the proxy forgot them first: it sends a caller again before using it
                callers.update(message[1])
            elif kind == "templates":
                if len(templates) >= MAX_TEMPLATES:
                    templates.clear()  # likewise
                templates.update((n, CommandTemplate(_event(row, callers))) for n, row in message[1].items())
            elif kind == "events":
                for event in message[1]:
                    _seal(audit.emit_nowait, event)
            elif kind == "emit":
                try:
                    later(message[1], audit.emit(message[2]))  # sealed here, in channel order
                except Exception as exc:
                    writer.write(_frame(("error", message[1], f"{type(exc).__name__}: {exc}")))
            elif kind == "flush":
                later(message[1], audit.flush())
            elif kind == "close":
                break
            else:
                raise AuditError(f"audit worker channel: unknown message {kind!r}")
    finally:
        await audit.close()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    with contextlib.suppress(OSError):
        writer.write(_frame(("closed",)))
        await writer.drain()
        writer.close()
    return 0


def _seal(emit: Callable[..., object], *event: Any) -> None:
    try:
        emit(*event)
    except AuditError:
        raise
    except Exception:  # a malformed event is lost alone, as ``emit_nowait`` inline would lose it
        log.exception("audit event lost: %r", event)


def _whole(item: Event | _Run) -> Event:
    """A batch item as a whole event (for the pickled fallback)."""
    if isinstance(item, AuditEvent) or not isinstance(item, tuple):
        return item
    template, sql, time, duration_ms, rows, masked = item
    return template.run(sql, time, duration_ms, rows, masked)


def _event(row: list[Any], callers: Mapping[int, Caller]) -> AuditEvent:
    if row[_CALLER] is not None:
        row[_CALLER] = callers[row[_CALLER]]
    if row[_APPROVAL] is not None:
        row[_APPROVAL] = ApprovalRef(*row[_APPROVAL])
    return AuditEvent(*row)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m sidegate_proxy.auditworker FD (started by AuditProcess)", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # the proxy stops us by closing the socket, after its last event
    logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s[worker]: %(message)s")
    from .runtime import run_event_loop

    return run_event_loop(_serve(socket.socket(fileno=int(args[0]))))


if __name__ == "__main__":
    sys.exit(main())
