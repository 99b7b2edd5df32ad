"""Audit records as Kubernetes Events on the Connection: which ones, aggregated, rate-limited."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sidegate_proxy import audit
from sidegate_proxy.audit import ApprovalRef, AuditLog
from sidegate_proxy.config import parse_connection
from sidegate_proxy.kube import EVENTS, KubeClient
from sidegate_proxy.kubeevents import KubeEventSink, TokenBucket, micro_time, notable
from sidegate_proxy.policy import Caller, Decision
from test_approvals import connection_obj
from test_kube_client import install_crds, kube_for

BOT = Caller("system:serviceaccount:ci:deployer", "https://kubernetes.default.svc")
COMMON: dict[str, Any] = {"connection": "payments/orders-db", "connection_type": "postgres", "caller": BOT}


def start(decision: str = "allow", session: str = "s1") -> dict[str, Any]:
    return audit.session_start(
        session_id=session,
        decision=Decision(decision, "access", "nope"),  # type: ignore[arg-type]
        time=1714564800.0,
        **COMMON,
    ).to_dict()


def end(session: str = "s1") -> dict[str, Any]:
    return audit.session_end(session_id=session, time=1714564801.0, **COMMON).to_dict()


def command(
    sql: str, decision: str, rule: str | None = None, approval: ApprovalRef | None = None
) -> dict[str, Any]:
    return audit.command_event(
        session_id="s1",
        command=sql,
        decision=decision,
        rule=rule,  # type: ignore[arg-type]
        approval=approval,
        time=1714564802.0,
        **COMMON,
    ).to_dict()


def test_which_records_become_events() -> None:
    assert notable(start()).reason == "SessionStarted"  # type: ignore[union-attr]
    refused = notable(start("block"))
    assert refused is not None and (refused.reason, refused.type) == ("SessionRefused", "Warning")
    assert notable(end()).reason == "SessionEnded"  # type: ignore[union-attr]
    blocked = notable(command("DROP TABLE t", "block", "no-drop"))
    assert blocked is not None and blocked.reason == "Blocked" and "no-drop" in blocked.note
    held = notable(command("DROP TABLE t", "requireApproval", "drops"))
    assert held is not None and held.reason == "ApprovalRequired"
    ran = notable(command("DROP TABLE t", "allow", approval=ApprovalRef("payments", "orders-db-x", "alice")))
    assert ran is not None and ran.reason == "Approved" and "alice" in ran.note
    assert ran.related == {
        "apiVersion": "sidegate.dev/v1alpha1",
        "kind": "AccessRequest",
        "name": "orders-db-x",
        "namespace": "payments",
    }
    assert notable(command("SELECT 1", "allow")) is None  # ordinary traffic stays in the audit log
    assert notable({"unmapped": {"event": "checkpoint"}}) is None


def test_token_bucket() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] = 0.5
    assert [bucket.take(), bucket.take()] == [True, False]
    now[0] = 100.0
    assert sum(bucket.take() for _ in range(10)) == 3
    with pytest.raises(ValueError):
        TokenBucket(0, 1)


def test_micro_time() -> None:
    assert micro_time(1714564800.25) == "2024-05-01T12:00:00.250000Z"


# --------------------------------------------------------------------------- against the API server


@pytest.fixture
async def kube(controlplane: Any) -> AsyncIterator[KubeClient]:
    install_crds(controlplane)
    async with kube_for(controlplane) as k:
        yield k


async def events_in(kube: KubeClient, ns: str) -> list[dict[str, Any]]:
    return list((await kube.list(EVENTS, ns)).items)


@pytest.mark.k8s
async def test_a_busy_bot_makes_one_event_with_a_series(kube: KubeClient, k8s_namespace: str) -> None:
    ns = k8s_namespace
    conn = parse_connection(connection_obj(ns))
    now = [0.0]
    sink = KubeEventSink(kube, conn, instance="orders-db-proxy-0", rate=1.0, burst=5, clock=lambda: now[0])
    await sink.deliver([start(session=f"s{i}") for i in range(200)] + [command("SELECT 1", "allow")] * 50)
    events = await events_in(kube, ns)
    assert len(events) == 1
    (event,) = events
    assert (event["reason"], event["type"], event["action"]) == ("SessionStarted", "Normal", "Connect")
    assert event["regarding"]["kind"] == "Connection" and event["regarding"]["name"] == "orders-db"
    assert event["reportingController"] == "sidegate.dev/proxy"
    assert event["series"]["count"] == 200

    # distinct things get their own Events until the bucket is empty; the rest are counted
    await sink.deliver([command(f"DROP TABLE t{i}", "block", f"rule-{i}") for i in range(10)])
    events = await events_in(kube, ns)
    # burst 5: one create and one series patch so far, so 3 new Events and 7 suppressed
    assert len(events) == 4 and sink.suppressed == 7

    # repeats past the rate are written with the next token, not lost
    await sink.deliver([start(session="late")])
    now[0] = 10.0
    await sink.deliver([])
    started = [e for e in await events_in(kube, ns) if e["reason"] == "SessionStarted"]
    assert started[0]["series"]["count"] == 201


@pytest.mark.k8s
async def test_events_through_the_audit_log(kube: KubeClient, k8s_namespace: str, tmp_path: Path) -> None:
    ns = k8s_namespace
    conn = parse_connection(connection_obj(ns))
    sink = KubeEventSink(kube, conn, instance="pod-1")
    sink.batch_interval = 0.05
    log = AuditLog(tmp_path / "spool", [sink], None, "pod-1", fsync=False)
    await log.start()
    try:
        log.emit_nowait(start())
        await log.emit(command("DROP TABLE tmp", "requireApproval", "drops"))
        await log.emit(command("DROP TABLE tmp", "allow", approval=ApprovalRef(ns, "orders-db-abc", "alice")))
        log.emit_nowait(end())
        deadline = time.monotonic() + 30
        while len(await events_in(kube, ns)) < 4:
            assert time.monotonic() < deadline, await events_in(kube, ns)
            await asyncio.sleep(0.1)
    finally:
        await log.close()
    by_reason = {e["reason"]: e for e in await events_in(kube, ns)}
    assert set(by_reason) == {"SessionStarted", "ApprovalRequired", "Approved", "SessionEnded"}
    assert by_reason["Approved"]["related"]["name"] == "orders-db-abc"
    assert "alice" in by_reason["Approved"]["note"]


@pytest.mark.k8s
async def test_refused_events_are_skipped_not_retried(controlplane: Any, k8s_namespace: str) -> None:
    conn = parse_connection(connection_obj(k8s_namespace))
    async with kube_for(controlplane, "mallory") as mallory:  # no RBAC for events
        sink = KubeEventSink(mallory, conn, instance="pod-1")
        await sink.deliver([start()])  # does not raise: the audit log still has it
