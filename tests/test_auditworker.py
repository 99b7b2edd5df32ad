"""The audit worker process: same chain, same spool, same sinks as the inline ``AuditLog``, and
every way the two processes can part loses nothing that was handed over."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from decimal import Decimal
from http import HTTPStatus
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from sidegate_proxy import auditworker
from sidegate_proxy.audit import AuditError, AuditEvent, CommandTemplate, command_event
from sidegate_proxy.auditverify import load_key, verify_lines
from sidegate_proxy.auditworker import AuditProcess, AuditRecipe, main
from sidegate_proxy.demo import LocalIssuer, build_demo
from sidegate_proxy.kube import KubeConfig
from sidegate_proxy.kubeevents import KubeEventSink
from sidegate_proxy.policy import ApprovalRef, Caller, Decision
from sidegate_proxy.runtime import AuditSinks, RuntimeOptions
from sidegate_proxy.sinks import FileSink

KEY = b"0123456789abcdef0123456789abcdef"
CALLER = Caller("system:serviceaccount:ci:bot", "https://issuer.test", frozenset({"ci"}),
                claims=MappingProxyType({"sub": "system:serviceaccount:ci:bot", "exp": 2000000000}))


def event(i: int) -> AuditEvent:
    return command_event(session_id="s1", connection="ns/db", connection_type="postgres", caller=CALLER,
                         command=f"SELECT {i}", decision="allow", rows=1, masked={"email": i % 3})


def recipe(tmp_path: Path) -> AuditRecipe:
    """A picklable sink factory, as ``runtime.AuditSinks`` is: the worker builds the sinks."""
    sinks = functools.partial(list, [FileSink(tmp_path / "audit.jsonl", fsync=False)])
    return AuditRecipe(tmp_path / "spool", sinks, KEY, "pod-w", fsync=False)


def delivered(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def commands(records: list[dict[str, Any]]) -> list[str]:
    return [r["query_info"]["query_string"] for r in records if "query_info" in r]


def test_a_caller_survives_pickling_with_its_claims_read_only() -> None:
    back = pickle.loads(pickle.dumps(CALLER))
    assert back == CALLER and dict(back.claims) == dict(CALLER.claims)
    assert isinstance(back.claims, MappingProxyType)
    with pytest.raises(TypeError):
        back.claims["sub"] = "someone else"  # type: ignore[index]


async def test_events_are_sealed_in_the_order_the_relay_emitted_them(tmp_path: Path) -> None:
    audit = AuditProcess(recipe(tmp_path), batch_interval=0.001)
    await audit.start()
    assert audit.pid is not None and audit.pid != os.getpid()
    durable = []
    for i in range(300):
        if i % 50 == 7:
            durable.append(await audit.emit(event(i)))  # after the batch queued before it
        else:
            audit.emit_nowait(event(i))
        if i % 40 == 0:
            await asyncio.sleep(0)
    await audit.close()

    records = delivered(tmp_path)
    assert commands(records) == [f"SELECT {i}" for i in range(300)]
    assert [r["seq"] for r in records if "query_info" in r] == list(range(1, 301))
    report = verify_lines((tmp_path / "audit.jsonl").read_text().splitlines(), keys=[load_key(KEY)])
    assert report.ok, report.problems
    assert [d["seq"] for d in durable] == [i + 1 for i in range(300) if i % 50 == 7]
    assert records[8]["actor"]["user"]["name"] == CALLER.subject
    assert records[8]["unmapped"]["masked"] == {"email": 8 % 3}


async def test_every_field_travels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Approvals, many callers (beyond what the relay remembers by number), mapping events, and
    a mapping marshal cannot carry (sent pickled instead) all arrive as emitted."""
    monkeypatch.setattr(auditworker, "MAX_CALLERS", 2)
    audit = AuditProcess(recipe(tmp_path))
    await audit.start()
    callers = [Caller(f"bot-{n}", "https://issuer.test", frozenset({f"g{n}"})) for n in range(5)]
    approval = ApprovalRef("ci", "req-1", reviewer="alice")
    for round_ in range(2):
        for n, caller in enumerate(callers):
            audit.emit_nowait(command_event(
                session_id=f"s{n}", connection="ns/db", connection_type="postgres", caller=caller,
                command=f"DELETE FROM t WHERE id = {round_}", decision=Decision("allow", "needs-approval",
                                                                                approval=approval)))
    audit.emit_nowait({"kind": "custom", "note": "a mapping"})
    audit.emit_nowait({"kind": "custom", "note": "an int subclass", "status": HTTPStatus.OK})
    await audit.close()
    records = delivered(tmp_path)
    subjects = [r["actor"]["user"]["name"] for r in records if "query_info" in r]
    assert subjects == [f"bot-{n}" for n in range(5)] * 2
    reviewed = [r for r in records if "query_info" in r]
    assert all(r["unmapped"]["approval"] == {"namespace": "ci", "name": "req-1", "reviewer": "alice"}
               for r in reviewed)
    assert [(r["note"], r.get("status")) for r in records if r.get("kind") == "custom"] == [
        ("a mapping", None), ("an int subclass", 200)]


async def test_statement_runs_travel_as_runs_and_arrive_as_whole_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``emit_run_nowait`` sends a template once (re-sent after either end forgets it) and then
    only each run's values: the worker's records are those of the whole events, in emit order."""
    monkeypatch.setattr(auditworker, "MAX_TEMPLATES", 2)
    audit = AuditProcess(recipe(tmp_path), batch_interval=0.001)
    await audit.start()
    templates = [CommandTemplate(command_event(
        session_id=f"s{n}", connection="ns/db", connection_type="postgres", caller=CALLER, command="",
        decision="allow", command_class="select", sqlstate=None if n else "02000", time=0.0)) for n in range(3)]
    expected = []
    for i in range(60):
        template = templates[i % 3]
        if i % 10 == 5:
            audit.emit_nowait(event(1000 + i))  # whole events keep their place among the runs
            expected.append(event(1000 + i))
        expected.append(template.run(f"SELECT {i}", 1714564800.0 + i, 0.5 * i, i,
                                     {"emails": 1} if i % 4 == 0 else {}))
        audit.emit_run_nowait(template, f"SELECT {i}", 1714564800.0 + i, 0.5 * i, i,
                              {"emails": 1} if i % 4 == 0 else {})
        if i % 7 == 0:
            await asyncio.sleep(0.002)
    await audit.close()
    records = [r for r in delivered(tmp_path) if "query_info" in r]
    assert commands(records) == [e.command for e in expected]
    for record, whole in zip(records, expected, strict=True):
        assert record["actor"]["session"]["uid"] == whole.session_id
        assert record["unmapped"].get("rows") == whole.rows
        assert record["unmapped"].get("masked") == (dict(whole.masked) or None)
        assert record.get("status_code") == whole.sqlstate
        assert record["time"] == round(whole.time * 1000)
    report = verify_lines((tmp_path / "audit.jsonl").read_text().splitlines(), keys=[load_key(KEY)])
    assert report.ok, report.problems


async def test_an_event_that_cannot_be_sealed_is_lost_alone(tmp_path: Path) -> None:
    """As with the inline log (where ``emit_nowait`` raises to its caller): logged, the rest go on."""
    audit = AuditProcess(recipe(tmp_path))
    await audit.start()
    audit.emit_nowait(event(1))
    audit.emit_nowait({"kind": "custom", "amount": Decimal("1.5")})  # no JSON for it
    audit.emit_nowait(event(2))
    await audit.flush()
    audit.emit_nowait(event(3))
    await audit.close()
    assert commands(delivered(tmp_path)) == ["SELECT 1", "SELECT 2", "SELECT 3"]


async def test_flush_means_durable_in_the_spool(tmp_path: Path) -> None:
    audit = AuditProcess(recipe(tmp_path), batch_interval=10.0)  # only flush sends the batch
    await audit.start()
    try:
        for i in range(5):
            audit.emit_nowait(event(i))
        await audit.flush()
        spooled = [json.loads(line) for seg in sorted((tmp_path / "spool").glob("segment-*.jsonl"))
                   for line in seg.read_text().splitlines()]
        assert commands(spooled) == [f"SELECT {i}" for i in range(5)]
    finally:
        await audit.close()


async def test_a_restarted_worker_continues_the_chain(tmp_path: Path) -> None:
    for start in (0, 10):
        audit = AuditProcess(recipe(tmp_path))
        await audit.start()
        for i in range(start, start + 10):
            audit.emit_nowait(event(i))
        await audit.close()
    records = delivered(tmp_path)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))  # with the close markers
    assert commands(records) == [f"SELECT {i}" for i in range(20)]
    assert len({r["chain_id"] for r in records}) == 1
    assert verify_lines((tmp_path / "audit.jsonl").read_text().splitlines(), keys=[load_key(KEY)]).ok


async def test_a_worker_that_cannot_open_its_spool_says_why(tmp_path: Path) -> None:
    (tmp_path / "spool").write_text("a file, not a folder")
    audit = AuditProcess(recipe(tmp_path))
    with pytest.raises(AuditError, match=r"did not start: .*spool"):
        await audit.start()
    with pytest.raises(AuditError, match="did not start"):
        audit.emit_nowait(event(1))


async def test_the_runtime_sinks_travel_to_the_worker(tmp_path: Path) -> None:
    """``runtime.AuditSinks`` pickles (config, Secrets, API address) and builds, in the worker's
    loop, an Events sink with a client of its own, closed with it."""
    issuer = LocalIssuer()
    config, secrets = build_demo(_FakePG(), issuer)
    kube = KubeConfig("https://127.0.0.1:6443", token="t")
    factory = pickle.loads(pickle.dumps(AuditSinks(config, secrets, RuntimeOptions(audit_stdout=False), kube)))
    sinks = factory()
    events = [s for s in sinks if isinstance(s, KubeEventSink)]
    assert len(events) == 1 and events[0].kube.config == kube
    await events[0].aclose()


async def test_a_recipe_that_cannot_travel_is_refused_clearly(tmp_path: Path) -> None:
    audit = AuditProcess(AuditRecipe(tmp_path / "spool", lambda: [], KEY, "pod-w"))
    with pytest.raises(AuditError, match="did not start"):
        await audit.start()


class _FakePG:
    host, port, user, password, database = "127.0.0.1", 5432, "app", "secret", "app"


async def test_a_dead_worker_fails_closed(tmp_path: Path) -> None:
    audit = AuditProcess(recipe(tmp_path))
    await audit.start()
    assert audit.pid is not None and audit.failed is not None
    audit.emit_nowait(event(1))
    await audit.flush()
    os.kill(audit.pid, signal.SIGKILL)
    error = await asyncio.wait_for(audit.failed, 30)
    assert isinstance(error, AuditError) and "exited (code -9)" in str(error)
    with pytest.raises(AuditError, match="exited"):
        audit.emit_nowait(event(2))
    with pytest.raises(AuditError, match="exited"):
        await audit.emit(event(3))
    await audit.close()  # nothing left to hand over; does not hang
    spooled = [line for seg in (tmp_path / "spool").glob("segment-*.jsonl") for line in seg.read_text().splitlines()]
    assert commands([json.loads(s) for s in spooled]) == ["SELECT 1"]  # what was durable stays


async def test_a_worker_that_falls_behind_fails_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The relay's memory stays bounded: a stalled worker counts as a dead one."""
    monkeypatch.setattr(auditworker, "MAX_BACKLOG", 1 << 20)
    audit = AuditProcess(recipe(tmp_path), batch_interval=0.001)
    await audit.start()
    assert audit.pid is not None and audit.failed is not None
    os.kill(audit.pid, signal.SIGSTOP)
    try:
        for i in range(100_000):
            if audit.failed.done():
                break
            audit.emit_nowait(event(i))
            if i % 100 == 0:
                await asyncio.sleep(0.002)
        error = await asyncio.wait_for(audit.failed, 30)
        assert "fell" in str(error) and "behind" in str(error)
        with pytest.raises(AuditError, match="behind"):
            audit.emit_nowait(event(0))
    finally:
        os.kill(audit.pid, signal.SIGCONT)
    await audit.close()


async def test_the_worker_ignores_the_terminal_interrupt(tmp_path: Path) -> None:
    """Ctrl-C reaches the whole process group: the worker must outlive it to take the proxy's
    last events, and stop only when the proxy closes the channel."""
    audit = AuditProcess(recipe(tmp_path))
    await audit.start()
    assert audit.pid is not None
    os.kill(audit.pid, signal.SIGINT)
    os.kill(audit.pid, signal.SIGTERM)
    await asyncio.sleep(0.2)
    for i in range(3):
        audit.emit_nowait(event(i))
    await audit.close()
    assert commands(delivered(tmp_path)) == ["SELECT 0", "SELECT 1", "SELECT 2"]


def test_a_killed_proxy_loses_nothing_it_handed_over(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import asyncio, os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from sidegate_proxy.auditworker import AuditProcess
        from test_auditworker import event, recipe

        async def main():
            audit = AuditProcess(recipe(Path({str(tmp_path)!r})), batch_interval=0.001)
            await audit.start()
            print(audit.pid, flush=True)
            for i in range(100):
                audit.emit_nowait(event(i))
            await asyncio.sleep(0.2)  # the batch is on its way; no close, no flush
            os.kill(os.getpid(), signal.SIGKILL)

        asyncio.run(main())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    worker = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _alive(worker):
        time.sleep(0.05)
    assert not _alive(worker), "the worker outlived its proxy"
    records = delivered(tmp_path)
    assert commands(records) == [f"SELECT {i}" for i in range(100)]
    assert verify_lines((tmp_path / "audit.jsonl").read_text().splitlines(), keys=[load_key(KEY)]).ok


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (no parent left to reap it yet) is gone too
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_the_worker_refuses_to_run_by_hand(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "started by AuditProcess" in capsys.readouterr().err
