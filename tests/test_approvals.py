"""Just-in-time approvals: the broker's rules, then the broker against a real API server."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidegate_operator import kubectl_plugin
from sidegate_proxy.approvals import (
    CONNECTION_LABEL,
    REQUESTER_LABEL,
    ApprovalBroker,
    access_request,
    request_state,
    requester_hash,
    short_subject,
    statement_hash,
    usable,
)
from sidegate_proxy.config import parse_connection
from sidegate_proxy.kube import ACCESS_REQUESTS, KubeClient, KubeConfig
from sidegate_proxy.policy import Caller
from test_kube_client import grant, install_crds, kube_for

REPO = Path(__file__).resolve().parent.parent
BOT = Caller("system:serviceaccount:ci:deployer", "https://kubernetes.default.svc", frozenset({"ci"}))
DROP = "DROP TABLE tmp_import"


def connection_obj(
    namespace: str, *, hold: int = 0, ttl: str = "1h", name: str = "orders-db"
) -> dict[str, Any]:
    return {
        "apiVersion": "sidegate.dev/v1alpha1",
        "kind": "Connection",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "type": "postgres",
            "target": {"host": "127.0.0.1", "port": 5432, "database": "orders"},
            "credentials": {"secretRef": {"name": "orders-db-admin"}},
            "access": [{"subjects": ["system:serviceaccount:ci:*"]}],
            "guardrails": [{"name": "drops", "sql": {"statements": ["drop"]}, "action": "requireApproval"}],
            "approval": {
                "approvers": {"groups": ["dba-oncall"], "users": ["carol"]},
                "holdSeconds": hold,
                "ttl": ttl,
            },
        },
    }


# --------------------------------------------------------------------------- pure rules


def test_statement_hash_is_exact_text() -> None:
    assert statement_hash("DROP TABLE t") == "sha256:" + hashlib.sha256(b"DROP TABLE t").hexdigest()
    assert statement_hash("DROP TABLE t") != statement_hash("DROP TABLE t ")
    assert statement_hash("DROP TABLE t") != statement_hash("drop table t")


def test_names_and_labels_are_kubernetes_safe() -> None:
    assert short_subject("system:serviceaccount:ci:deployer") == "deployer"
    assert short_subject("repo:acme/api:ref:refs/heads/Main_Branch") == "main-branch"
    assert short_subject(":::") == "caller"
    assert len(requester_hash("x" * 1000)) <= 63
    conn = parse_connection(connection_obj("payments"))
    body = access_request(conn, BOT, DROP, "cleanup", "s-1")
    assert body["metadata"]["generateName"] == "orders-db-deployer-"
    assert body["metadata"]["labels"] == {
        CONNECTION_LABEL: "orders-db",
        REQUESTER_LABEL: requester_hash(BOT.subject),
    }
    assert body["spec"] == {
        "connection": "orders-db",
        "requester": BOT.subject,
        "requesterGroups": ["ci"],
        "scope": "statement",
        "statement": DROP,
        "statementHash": statement_hash(DROP),
        "sessionId": "s-1",
        "reason": "cleanup",
    }


def _ar(
    review: str | None = None,
    status: dict[str, Any] | None = None,
    created: str = "2024-05-01T12:00:00Z",
    **spec: Any,
) -> dict[str, Any]:
    s: dict[str, Any] = {
        "connection": "orders-db",
        "requester": BOT.subject,
        "scope": "statement",
        "statement": DROP,
        "statementHash": statement_hash(DROP),
        **spec,
    }
    if review:
        s["review"] = {"decision": review, "reviewer": "alice"}
    return {
        "metadata": {"name": "r", "namespace": "payments", "creationTimestamp": created},
        "spec": s,
        "status": status or {},
    }


T0 = 1714564800.0  # 2024-05-01T12:00:00Z


def test_request_states() -> None:
    ttl = 3600
    assert request_state(_ar(), T0 + 10, ttl) == "pending"
    assert request_state(_ar(), T0 + ttl, ttl) == "expired"
    assert request_state(_ar("Approved"), T0 + 10, ttl) == "approved"
    assert request_state(_ar("Approved"), T0 + ttl + 1, ttl) == "expired"  # no expiresAt: from creation
    later = {"phase": "Approved", "expiresAt": "2024-05-01T14:00:00Z"}
    assert request_state(_ar("Approved", later), T0 + ttl + 1, ttl) == "approved"
    assert request_state(_ar("Approved", later), T0 + 2 * ttl, ttl) == "expired"
    assert request_state(_ar("Denied"), T0, ttl) == "denied"
    assert request_state(_ar("Approved", {"phase": "Used"}), T0, ttl) == "used"
    assert request_state(_ar("Approved", {"phase": "Approved", "usedAt": "x"}), T0, ttl) == "used"
    assert request_state(_ar("Approved", {"phase": "Expired"}), T0, ttl) == "expired"
    # status is not trusted to grant: only the admission-guarded spec.review does
    assert request_state(_ar(None, {"phase": "Approved"}), T0, ttl) == "pending"


def test_usable_binds_to_statement_requester_and_connection() -> None:
    conn = parse_connection(connection_obj("payments"))
    ok = _ar("Approved")
    assert usable(ok, connection=conn, subject=BOT.subject, statement=DROP, now=T0 + 1)
    assert not usable(ok, connection=conn, subject=BOT.subject, statement=DROP + ";", now=T0 + 1)
    assert not usable(
        ok, connection=conn, subject="system:serviceaccount:ci:other", statement=DROP, now=T0 + 1
    )
    other = parse_connection(connection_obj("payments", name="billing-db"))
    assert not usable(ok, connection=other, subject=BOT.subject, statement=DROP, now=T0 + 1)
    forged = _ar("Approved", statementHash=statement_hash("SELECT 1"))
    assert not usable(forged, connection=conn, subject=BOT.subject, statement=DROP, now=T0 + 1)
    session = _ar("Approved", scope="session", duration="30m", statement=None)
    assert usable(session, connection=conn, subject=BOT.subject, statement="TRUNCATE x", now=T0 + 1)
    assert not usable(session, connection=conn, subject=BOT.subject, statement="TRUNCATE x", now=T0 + 1801)


# --------------------------------------------------------------------------- against the API server


def install_review_policy(controlplane: Any) -> None:
    """The ValidatingAdmissionPolicy + binding from manifests/base, effective before returning."""
    from kubernetes import client

    api = controlplane.api_client("admin")
    try:
        adm = client.AdmissionregistrationV1Api(api)
        docs = list(yaml.safe_load_all((REPO / "manifests/base/review-admission-policy.yaml").read_text()))
        for doc in docs:
            create = (
                adm.create_validating_admission_policy
                if doc["kind"] == "ValidatingAdmissionPolicy"
                else adm.create_validating_admission_policy_binding
            )
            try:
                create(doc)
            except client.ApiException as exc:
                if exc.status != 409:
                    raise
        custom = client.CustomObjectsApi(api)
        probe = {
            "apiVersion": "sidegate.dev/v1alpha1",
            "kind": "AccessRequest",
            "metadata": {"generateName": "probe-"},
            "spec": {
                "connection": "x",
                "requester": "y",
                "statement": "z",
                "review": {"decision": "Approved", "reviewer": "admin"},
            },
        }
        deadline = time.monotonic() + 30
        while True:  # the policy takes a moment to be compiled and bound
            try:
                made = custom.create_namespaced_custom_object(
                    "sidegate.dev", "v1alpha1", "default", "accessrequests", probe
                )
                custom.delete_namespaced_custom_object(
                    "sidegate.dev", "v1alpha1", "default", "accessrequests", made["metadata"]["name"]
                )
            except client.ApiException as exc:
                assert exc.status in (403, 422), exc
                return
            assert time.monotonic() < deadline, "the review admission policy never took effect"
            time.sleep(0.2)
    finally:
        api.close()


@pytest.fixture(scope="session")
def approvals_cluster(controlplane: Any) -> Any:
    install_crds(controlplane)
    install_review_policy(controlplane)
    return controlplane


REVIEWER_RULES = [
    {
        "apiGroups": ["sidegate.dev"],
        "resources": ["accessrequests"],
        "verbs": ["get", "list", "watch", "patch"],
    },
]


@pytest.fixture
def approvals_ns(approvals_cluster: Any, k8s_namespace: str) -> str:
    for user in ("alice", "bob", "mallory", "carol"):
        grant(approvals_cluster, k8s_namespace, user, REVIEWER_RULES, f"review-{user}")
    return k8s_namespace


@pytest.fixture
async def admin_kube(approvals_cluster: Any) -> AsyncIterator[KubeClient]:
    async with kube_for(approvals_cluster) as kube:
        yield kube


async def plugin(cp: Any, user: str, *args: str) -> int:
    """``kubectl sidegate`` as ``user`` (it runs its own event loop: a thread)."""
    argv = ["--kubeconfig", cp.kubeconfig_for(user), *args]
    return await asyncio.to_thread(kubectl_plugin.main, argv)


async def requests_of(kube: KubeClient, ns: str) -> list[dict[str, Any]]:
    listed = await kube.list(ACCESS_REQUESTS, ns, label_selector=f"{CONNECTION_LABEL}=orders-db")
    return sorted(listed.items, key=lambda o: o["metadata"]["creationTimestamp"] + o["metadata"]["name"])


async def wait_for_request(kube: KubeClient, ns: str, count: int = 1) -> dict[str, Any]:
    for _ in range(400):
        items = await requests_of(kube, ns)
        if len(items) >= count:
            return items[count - 1]
        await asyncio.sleep(0.05)
    raise AssertionError("no AccessRequest was created")


@pytest.mark.k8s
async def test_approve_then_retry_runs_once(
    approvals_cluster: Any, approvals_ns: str, admin_kube: KubeClient
) -> None:
    ns = approvals_ns
    broker = ApprovalBroker(admin_kube, parse_connection(connection_obj(ns, hold=0)))
    first = await broker.authorize(BOT, DROP, "cleanup after migration", "sess-1")
    assert not first.allowed
    name = first.request_name
    assert name and name.startswith("orders-db-deployer-")
    assert f"kubectl sidegate approve {name} -n {ns}" in first.message
    created = await admin_kube.get(ACCESS_REQUESTS, ns, name)
    assert created["spec"]["statementHash"] == statement_hash(DROP)
    assert created["spec"]["reason"] == "cleanup after migration"

    # retrying before a review waits on the same request instead of piling up new ones
    again = await broker.authorize(BOT, DROP, None, "sess-1")
    assert (again.allowed, again.request_name) == (False, name)

    assert await plugin(approvals_cluster, "alice", "approve", name, "-n", ns, "--comment", "ok") == 0
    ran = await broker.authorize(BOT, DROP, None, "sess-2")
    assert (ran.allowed, ran.request_name, ran.reviewer) == (True, name, "alice")
    assert ran.approval is not None and ran.approval.to_dict() == {
        "namespace": ns,
        "name": name,
        "reviewer": "alice",
    }
    used = await admin_kube.get(ACCESS_REQUESTS, ns, name)
    assert used["status"]["phase"] == "Used" and used["status"]["usedAt"]

    # a second run needs a new approval
    second = await broker.authorize(BOT, DROP, None, "sess-3")
    assert not second.allowed and second.request_name != name
    # and an approval of X never allows Y
    assert await plugin(approvals_cluster, "bob", "approve", second.request_name or "", "-n", ns) == 0
    other = await broker.authorize(BOT, "DROP TABLE customers", None, "sess-3")
    assert not other.allowed and other.request_name not in (name, second.request_name)
    # nor does it allow someone else
    mallet = Caller("system:serviceaccount:ci:other", "iss")
    assert not (await broker.authorize(mallet, DROP, None, "sess-4")).allowed
    assert (await broker.authorize(BOT, DROP, None, "sess-3")).allowed


@pytest.mark.k8s
async def test_held_statement_runs_when_approved_while_waiting(
    approvals_cluster: Any, approvals_ns: str, admin_kube: KubeClient
) -> None:
    ns = approvals_ns
    broker = ApprovalBroker(admin_kube, parse_connection(connection_obj(ns, hold=60)))
    task = asyncio.create_task(broker.authorize(BOT, DROP, "please", "sess-1"))
    pending = await wait_for_request(admin_kube, ns)
    assert not task.done()
    assert await plugin(approvals_cluster, "alice", "approve", pending["metadata"]["name"], "-n", ns) == 0
    outcome = await asyncio.wait_for(task, 30)
    assert (outcome.allowed, outcome.reviewer) == (True, "alice")


@pytest.mark.k8s
async def test_denied_while_waiting(
    approvals_cluster: Any, approvals_ns: str, admin_kube: KubeClient
) -> None:
    ns = approvals_ns
    broker = ApprovalBroker(admin_kube, parse_connection(connection_obj(ns, hold=60)))
    task = asyncio.create_task(broker.authorize(BOT, DROP, None, "sess-1"))
    pending = await wait_for_request(admin_kube, ns)
    assert await plugin(approvals_cluster, "bob", "deny", pending["metadata"]["name"], "-n", ns) == 0
    outcome = await asyncio.wait_for(task, 30)
    assert not outcome.allowed and "denied" in outcome.message
    # and a denied request never comes back to life
    assert not (await broker.authorize(BOT, DROP, None, "sess-2")).allowed


@pytest.mark.k8s
async def test_hold_time_passes(approvals_ns: str, admin_kube: KubeClient) -> None:
    broker = ApprovalBroker(admin_kube, parse_connection(connection_obj(approvals_ns, hold=1)))
    outcome = await broker.authorize(BOT, DROP, None, "sess-1")
    assert not outcome.allowed
    assert "waited 1s" in outcome.message and "kubectl sidegate approve" in outcome.message


@pytest.mark.k8s
async def test_expired_approval_allows_nothing(
    approvals_cluster: Any, approvals_ns: str, admin_kube: KubeClient
) -> None:
    ns = approvals_ns
    offset = [0.0]
    broker = ApprovalBroker(
        admin_kube, parse_connection(connection_obj(ns, ttl="2s")), clock=lambda: time.time() + offset[0]
    )
    first = await broker.authorize(BOT, DROP, None, "s")
    assert await plugin(approvals_cluster, "alice", "approve", first.request_name or "", "-n", ns) == 0
    offset[0] = 3600.0  # an hour later
    late = await broker.authorize(BOT, DROP, None, "s")
    assert not late.allowed
    assert late.request_name != first.request_name  # the expired one is not even waited on


@pytest.mark.k8s
async def test_two_replicas_cannot_both_use_one_approval(
    approvals_cluster: Any, approvals_ns: str, admin_kube: KubeClient
) -> None:
    ns = approvals_ns
    conn = parse_connection(connection_obj(ns))
    first = await ApprovalBroker(admin_kube, conn).authorize(BOT, DROP, None, "s")
    assert await plugin(approvals_cluster, "alice", "approve", first.request_name or "", "-n", ns) == 0
    async with kube_for(approvals_cluster) as other_kube:
        replicas = [ApprovalBroker(admin_kube, conn), ApprovalBroker(other_kube, conn)] * 3
        outcomes = await asyncio.gather(
            *(b.authorize(BOT, DROP, None, f"s{i}") for i, b in enumerate(replicas))
        )
    assert sum(o.allowed for o in outcomes) == 1


@pytest.mark.k8s
async def test_forged_status_grants_nothing(approvals_ns: str, admin_kube: KubeClient) -> None:
    ns = approvals_ns
    broker = ApprovalBroker(admin_kube, parse_connection(connection_obj(ns)))
    first = await broker.authorize(BOT, DROP, None, "s")
    name = first.request_name or ""
    await admin_kube.merge_patch(
        ACCESS_REQUESTS, ns, name, {"status": {"phase": "Approved"}}, subresource="status"
    )
    assert not (await broker.authorize(BOT, DROP, None, "s")).allowed


@pytest.mark.k8s
async def test_session_scope_covers_a_window(
    approvals_cluster: Any, approvals_ns: str, admin_kube: KubeClient
) -> None:
    ns = approvals_ns
    conn = parse_connection(connection_obj(ns))
    body = access_request(conn, BOT, "unused", "maintenance window", "s")
    body["spec"].update(scope="session", duration="30m")
    del body["spec"]["statement"], body["spec"]["statementHash"]
    made = await admin_kube.create(ACCESS_REQUESTS, ns, body)
    assert await plugin(approvals_cluster, "carol", "approve", made["metadata"]["name"], "-n", ns) == 0
    broker = ApprovalBroker(admin_kube, conn)
    for stmt in ("DROP TABLE a", "DROP TABLE b"):
        outcome = await broker.authorize(BOT, stmt, None, "s")
        assert (outcome.allowed, outcome.request_name, outcome.reviewer) == (
            True,
            made["metadata"]["name"],
            "carol",
        )
    later = ApprovalBroker(admin_kube, conn, clock=lambda: time.time() + 3600)
    assert not (await later.authorize(BOT, "DROP TABLE c", None, "s")).allowed


async def test_unreachable_api_server_fails_closed() -> None:
    conn = parse_connection(connection_obj("payments"))
    async with KubeClient(KubeConfig(server="http://127.0.0.1:9"), timeout=2) as kube:
        outcome = await ApprovalBroker(kube, conn).authorize(BOT, DROP, None, "s")
    assert not outcome.allowed and "unavailable" in outcome.message


async def test_oversized_statement_is_refused() -> None:
    conn = parse_connection(connection_obj("payments"))
    async with KubeClient(KubeConfig(server="http://127.0.0.1:9")) as kube:
        outcome = await ApprovalBroker(kube, conn).authorize(BOT, "x" * 70000, None, "s")
    assert not outcome.allowed and "longer than" in outcome.message


@pytest.mark.k8s
async def test_pg_hook_holds_then_allows(
    approvals_cluster: Any, approvals_ns: str, admin_kube: KubeClient
) -> None:
    from types import SimpleNamespace

    from sidegate_proxy.approvals import pg_approval_hook
    from sidegate_proxy.policy import Decision

    ns = approvals_ns
    hook = pg_approval_hook(ApprovalBroker(admin_kube, parse_connection(connection_obj(ns))))
    session = SimpleNamespace(id="sess-9", caller=BOT, params={"application_name": "nightly cleanup"})
    verdict = SimpleNamespace(decision=Decision("requireApproval", "drops", "drop needs approval"))
    held = await hook(session, DROP, verdict)
    assert held.action == "requireApproval" and held.rule == "drops"
    assert held.reason.startswith("approval required: AccessRequest")
    (req,) = await requests_of(admin_kube, ns)
    assert req["spec"]["reason"] == "nightly cleanup"
    assert await plugin(approvals_cluster, "alice", "approve", req["metadata"]["name"], "-n", ns) == 0
    ran = await hook(session, DROP, verdict)
    assert ran.action == "allow" and "alice" in ran.reason
