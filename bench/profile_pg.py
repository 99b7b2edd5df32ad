"""Where the PostgreSQL proxy's CPU goes per query, measured in place (not a test, not a ratio).

The proxy runs in this process (``ProxyRuntime``, the demo's policy: JWT caller, guardrails,
masking active, audit to a disk spool) in front of a throwaway PostgreSQL, driven by a minimal
raw-protocol client that sends pgbench's select one query at a time. A few of the session's
methods are wrapped with a nanosecond clock, so each stage's share is its cost *inside the
running relay*: the same functions in a tight microbenchmark run 2-4x faster, because there
they have the CPU caches to themselves. The wrappers add ~1 us per call to what they time.

    .venv/bin/python bench/profile_pg.py                  # -M prepared, 5000 queries
    .venv/bin/python bench/profile_pg.py --mode simple    # literal SELECTs, new text each time
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "proxy"), str(ROOT / "operator"), str(ROOT / "bench")]
# Stages are timed by wrapping methods, which compiled classes do not allow: the data plane runs
# from its Python source here (bench_pg compares the compiled one with it, side by side).
os.environ["SIDEGATE_PURE_PYTHON"] = "1"

from bench_pg import BOT, pg_tool  # noqa: E402
from sidegate_proxy import guardrails, pgproxy, pgwire  # noqa: E402
from sidegate_proxy.demo import LocalIssuer, build_demo  # noqa: E402
from sidegate_proxy.localpg import LocalPostgres  # noqa: E402
from sidegate_proxy.runtime import ProxyRuntime, RuntimeOptions, run_event_loop  # noqa: E402

# (owner, method, stage): the stages of one query, as the relay's own functions draw them
STAGES: tuple[tuple[Any, str, str], ...] = (
    (pgproxy.Session, "_on_data", "everything the relay does on a read (the total)"),
    (pgwire._Parser, "feed", "framing and decoding messages, both sides"),
    (guardrails.Guard, "check_sql", "guardrails: classify the statement, decide"),
    (pgproxy.Session, "_flush", "handing bytes to the sockets (send syscalls)"),
    (pgproxy.Session, "_audit_completed", "audit: event, seal, spool queue, metrics"),
    (pgproxy.Session, "_mask_row", "masking result rows"),
)


def instrument(spent: collections.Counter[str]) -> Callable[[], None]:
    """Wrap every stage's method with a clock; returns the undo."""
    originals = []
    for owner, name, stage in STAGES:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args: Any, __original: Any = original, __stage: str = stage, **kwargs: Any) -> Any:
            start = time.perf_counter_ns()
            try:
                return __original(*args, **kwargs)
            finally:
                spent[__stage] += time.perf_counter_ns() - start

        originals.append((owner, name, original))
        setattr(owner, name, timed)
        if getattr(owner, name) is not timed:
            raise RuntimeError(f"{owner.__name__}.{name} cannot be timed (a compiled class?)")

    def undo() -> None:
        for owner, name, original in originals:
            setattr(owner, name, original)

    return undo


class RawClient:
    """Just enough of a PostgreSQL client (cleartext password, one request at a time), framing
    answers by hand so none of its work lands in the proxy's ``pgwire`` stage."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, user: str, password: str, database: str) -> RawClient:
        client = cls(*await asyncio.open_connection("127.0.0.1", port))
        client.writer.write(pgwire.startup_message({"user": user, "database": database}))
        password_message = b"p" + (len(password) + 5).to_bytes(4, "big") + password.encode() + b"\0"
        await client.until_ready(on_auth=lambda: client.writer.write(password_message))
        return client

    async def until_ready(self, on_auth: Callable[[], None] | None = None) -> None:
        buf = b""
        while True:
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("the proxy closed the connection")
            buf += data
            pos = 0
            while len(buf) - pos >= 5:
                kind, end = buf[pos:pos + 1], pos + 1 + int.from_bytes(buf[pos + 1:pos + 5], "big")
                if end > len(buf):
                    break
                if kind == b"E":
                    raise RuntimeError(buf[pos + 5:end].decode("utf-8", "replace"))
                if kind == b"R" and buf[pos + 5:pos + 9] == b"\0\0\0\3" and on_auth is not None:
                    on_auth()
                if kind == b"Z":
                    return
                pos = end
            buf = buf[pos:]

    async def run(self, requests: list[bytes]) -> None:
        for request in requests:
            self.writer.write(request)
            await self.until_ready()


def requests(mode: str, n: int, salt: int) -> list[bytes]:
    if mode == "prepared":
        return [pgwire.bind("", "s1", [str(1 + i % 1000).encode()]) + pgwire.describe("P", "")
                + pgwire.execute("", 0) + pgwire.sync() for i in range(n)]
    return [pgwire.query(f"SELECT abalance FROM pgbench_accounts WHERE aid = {1 + (i * 7919 + salt) % 100000}")
            for i in range(n)]


async def profile(pg: LocalPostgres, spool: Path, mode: str, n: int) -> dict[str, float]:
    issuer = LocalIssuer()
    config, secrets = build_demo(pg, issuer)
    runtime = ProxyRuntime(config, secrets, RuntimeOptions(
        listen_host="127.0.0.1", listen_port=0, admin_port=None, spool_dir=spool, audit_stdout=False))
    await runtime.start()
    try:
        assert runtime.port is not None
        client = await RawClient.connect(runtime.port, "bot", issuer.mint(BOT), pg.database)
        if mode == "prepared":
            client.writer.write(pgwire.parse("s1", "SELECT abalance FROM pgbench_accounts WHERE aid = $1")
                                + pgwire.sync())
            await client.until_ready()
        await client.run(requests(mode, 500, salt=1))  # warm up: caches, plans, the catalog
        spent: collections.Counter[str] = collections.Counter()
        undo = instrument(spent)
        try:
            await client.run(requests(mode, n, salt=2))
        finally:
            undo()
    finally:
        await runtime.close()
    return {stage: ns / n / 1000 for stage, ns in spent.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--mode", choices=("prepared", "simple"), default="prepared")
    ap.add_argument("-n", type=int, default=5000, help="queries measured (after 500 to warm up)")
    args = ap.parse_args()
    with LocalPostgres() as pg, tempfile.TemporaryDirectory(prefix="sidegate-profile-") as spool:
        subprocess.run([pg_tool("pgbench", pg), "-i", "-q", "-s", "1", "-h", str(pg.sockdir), "-p", str(pg.port),
                        "-U", pg.user, pg.database], check=True, capture_output=True)
        result = run_event_loop(profile(pg, Path(spool), args.mode, args.n))
    print(f"\nproxy CPU per query in place, {args.mode}, {args.n} queries (us; stages overlap the total)\n")
    for _owner, _name, stage in STAGES:
        print(f"{result.get(stage, 0.0):8.1f}  {stage}")


if __name__ == "__main__":
    main()
