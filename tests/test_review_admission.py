"""Who may review an AccessRequest: the pure rules, then the API server enforcing them through the
ValidatingAdmissionPolicy and the operator's webhook (run in-process), plus the status lifecycle."""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kopf
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sidegate_operator import accessrequest, review_admission
from sidegate_operator.accessrequest import desired_status
from sidegate_operator.kube import ClusterAccess, Kube, OperatorContext
from sidegate_operator.review_admission import ReviewRefused, check_request
from sidegate_proxy.approvals import statement_hash
from sidegate_proxy.config import parse_connection
from sidegate_proxy.kube import ACCESS_REQUESTS, CONNECTIONS, Forbidden, Invalid, KubeClient, KubeError
from test_approvals import REVIEWER_RULES, connection_obj, install_review_policy, plugin
from test_kube_client import grant, install_crds, kube_for

REQUESTER = "system:serviceaccount:ci:deployer"
CONN = parse_connection(connection_obj("payments"))


def ar(review: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    s: dict[str, Any] = {
        "connection": "orders-db",
        "requester": REQUESTER,
        "scope": "statement",
        "statement": "DROP TABLE t",
        **spec,
    }
    if review is not None:
        s["review"] = review
    return {"metadata": {"name": "r", "namespace": "payments"}, "spec": s}


APPROVED_BY_ALICE = {"decision": "Approved", "reviewer": "alice"}


# --------------------------------------------------------------------------- pure rules


def test_approver_by_group_or_user_is_accepted() -> None:
    check_request("UPDATE", ar(APPROVED_BY_ALICE), ar(), "alice", ["dba-oncall"], CONN)
    check_request("UPDATE", ar({"decision": "Denied", "reviewer": "carol"}), ar(), "carol", [], CONN)


@pytest.mark.parametrize(
    ("new", "old", "user", "groups", "message"),
    [
        (ar(APPROVED_BY_ALICE), ar(), "mallory", [], "must be your own user name 'mallory'"),
        (ar({"decision": "Approved", "reviewer": "mallory"}), ar(), "mallory", [], "not an approver"),
        (ar({"decision": "Approved", "reviewer": "bob"}), ar(), "alice", ["dba-oncall"], "own user name"),
        (
            ar(APPROVED_BY_ALICE, requester="alice"),
            ar(requester="alice"),
            "alice",
            ["dba-oncall"],
            "requester cannot review",
        ),
        (
            ar({"decision": "Denied", "reviewer": "alice"}),
            ar(APPROVED_BY_ALICE),
            "alice",
            ["dba-oncall"],
            "already approved by alice",
        ),
        (ar(), ar(APPROVED_BY_ALICE), "admin", ["system:masters"], "cannot be changed"),
        (ar(APPROVED_BY_ALICE, reason="x"), ar(), "alice", ["dba-oncall"], "changed: spec.reason"),
        (ar(statement="DROP TABLE u"), ar(), "admin", [], "changed: spec.statement"),
    ],
)
def test_refused_changes(
    new: dict[str, Any], old: dict[str, Any], user: str, groups: list[str], message: str
) -> None:
    with pytest.raises(ReviewRefused, match=message):
        check_request("UPDATE", new, old, user, groups, CONN)


def test_review_needs_an_existing_connection() -> None:
    with pytest.raises(ReviewRefused, match="does not exist"):
        check_request("UPDATE", ar(APPROVED_BY_ALICE), ar(), "alice", ["dba-oncall"], None)


def test_creation_rules() -> None:
    check_request("CREATE", ar(statementHash=statement_hash("DROP TABLE t")), None, "proxy", [], None)
    with pytest.raises(ReviewRefused, match=r"cannot carry spec\.review"):
        check_request("CREATE", ar(APPROVED_BY_ALICE), None, "alice", ["dba-oncall"], CONN)
    with pytest.raises(ReviewRefused, match="does not match"):
        check_request("CREATE", ar(statementHash=statement_hash("SELECT 1")), None, "proxy", [], None)


T0 = 1714564800.0  # 2024-05-01T12:00:00Z


def test_status_lifecycle() -> None:
    created = {**ar(), "metadata": {"name": "r", "creationTimestamp": "2024-05-01T12:00:00Z"}}
    first = desired_status(created, 3600, T0 + 5)
    assert first == {
        "phase": "Pending",
        "requestedAt": "2024-05-01T12:00:00Z",
        "statementHash": statement_hash("DROP TABLE t"),
    }
    pending = {**created, "status": first}
    assert desired_status(pending, 3600, T0 + 10) == {}
    assert desired_status(pending, 3600, T0 + 3600) == {"phase": "Expired"}
    approved = {**pending, "spec": {**pending["spec"], "review": APPROVED_BY_ALICE}}
    decided = desired_status(approved, 3600, T0 + 60)
    assert decided == {
        "phase": "Approved",
        "decidedAt": "2024-05-01T12:01:00.000Z",
        "reviewer": "alice",
        "expiresAt": "2024-05-01T13:01:00.000Z",
    }
    approved["status"] = {**first, **decided}
    assert desired_status(approved, 3600, T0 + 3000) == {}
    assert desired_status(approved, 3600, T0 + 3661) == {"phase": "Expired"}
    used = {**approved, "status": {**approved["status"], "phase": "Used", "usedAt": "x"}}
    assert desired_status(used, 3600, T0 + 9999) == {}  # Used is final
    reverted = {**approved, "status": {**approved["status"], "usedAt": "x"}}
    assert desired_status(reverted, 3600, T0 + 70) == {"phase": "Used"}
    denied = {**pending, "spec": {**pending["spec"], "review": {"decision": "Denied", "reviewer": "bob"}}}
    assert desired_status(denied, 3600, T0 + 70)["phase"] == "Denied"


def test_session_approval_is_capped_by_ttl() -> None:
    session = ar(APPROVED_BY_ALICE, scope="session", duration="3h", statement=None)
    session["metadata"]["creationTimestamp"] = "2024-05-01T12:00:00Z"
    assert desired_status(session, 3600, T0)["expiresAt"] == "2024-05-01T13:00:00.000Z"
    session["spec"]["duration"] = "30m"
    assert desired_status(session, 3600, T0)["expiresAt"] == "2024-05-01T12:30:00.000Z"


# --------------------------------------------------------------------------- the operator, in-process


def self_signed(tmp: Path) -> tuple[Path, Path, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp / "tls.crt").write_bytes(pem)
    (tmp / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return tmp / "tls.crt", tmp / "tls.key", pem


class ReviewOperator:
    """kopf with only the AccessRequest handlers and the review webhook, in its own thread."""

    def __init__(self, kubeconfig: str, cert: Path, key: Path, port: int) -> None:
        self.access = ClusterAccess.load(kubeconfig)
        self.port = port
        self.cert, self.key = cert, key
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="review-operator", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._operate())
        except BaseException as exc:
            self.error = exc
            self.ready_flag.set()

    async def _operate(self) -> None:
        registry = kopf.OperatorRegistry()
        access = self.access

        @kopf.on.login(registry=registry)
        def login(**_: Any) -> kopf.ConnectionInfo:
            return access.connection_info()

        accessrequest.register(registry, expiry_interval=0.5)
        review_admission.register(registry)
        settings = kopf.OperatorSettings()
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.sidegate.dev")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kopf.sidegate.dev")
        settings.persistence.finalizer = "kopf.sidegate.dev/finalizer"
        settings.admission.server = kopf.WebhookServer(
            addr="127.0.0.1", port=self.port, certfile=str(self.cert), pkeyfile=str(self.key)
        )
        settings.admission.managed = None
        async with Kube(access) as kube:
            await kopf.operator(
                registry=registry,
                settings=settings,
                clusterwide=True,
                standalone=True,
                memo=kopf.Memo(sidegate=OperatorContext(kube=kube, image="unused")),
                stop_flag=self.stop_flag,
                ready_flag=self.ready_flag,
            )

    def start(self) -> None:
        self.thread.start()
        assert self.ready_flag.wait(60), "the operator did not get ready"
        if self.error is not None:
            raise RuntimeError(f"operator failed: {self.error}") from self.error

    def stop(self) -> None:
        self.stop_flag.set()
        self.thread.join(30)


@pytest.fixture(scope="module")
def review_operator(controlplane: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from kubernetes import client

    from controlplane import free_port

    install_crds(controlplane)
    install_review_policy(controlplane)
    cert, key, pem = self_signed(tmp_path_factory.mktemp("webhook"))
    port = free_port()
    op = ReviewOperator(controlplane.kubeconfig, cert, key, port)
    objects_log = logging.getLogger("kopf.objects")
    level = objects_log.level
    objects_log.setLevel(logging.INFO)  # as `sidegate operator` configures it: INFO reaches the poster
    op.start()
    config = review_admission.build_webhook_configuration(
        {"url": f"https://127.0.0.1:{port}", "caBundle": base64.b64encode(pem).decode()}
    )
    api = controlplane.api_client("admin")
    adm = client.AdmissionregistrationV1Api(api)
    adm.create_validating_webhook_configuration(config)
    try:
        yield controlplane
    finally:
        # Fail-closed webhook: it must not outlive the operator or later tests cannot write requests.
        adm.delete_validating_webhook_configuration(config["metadata"]["name"])
        api.close()
        op.stop()
        objects_log.setLevel(level)


@pytest.fixture
def ns(review_operator: Any, k8s_namespace: str) -> str:
    for user in ("alice", "bob", "mallory", "carol"):
        grant(review_operator, k8s_namespace, user, REVIEWER_RULES, f"review-{user}")
    return k8s_namespace


async def make_request(
    kube: KubeClient, ns: str, *, ttl: str = "1h", requester: str = REQUESTER, connection: bool = True
) -> str:
    if connection:
        try:
            await kube.create(CONNECTIONS, ns, connection_obj(ns, ttl=ttl))
        except KubeError as exc:
            if exc.status != 409:
                raise
    body = {
        "apiVersion": "sidegate.dev/v1alpha1",
        "kind": "AccessRequest",
        "metadata": {"generateName": "orders-db-"},
        "spec": {"connection": "orders-db", "requester": requester, "statement": "DROP TABLE tmp"},
    }
    for _ in range(100):  # the webhook may still be starting up right after registration
        try:
            made = await kube.create(ACCESS_REQUESTS, ns, body)
            return str(made["metadata"]["name"])
        except KubeError as exc:
            if exc.status not in (0, 500):
                raise
            await asyncio.sleep(0.2)
    raise AssertionError("could not create an AccessRequest")


async def wait_status(
    kube: KubeClient, ns: str, name: str, phase: str, limit: float = 30
) -> dict[str, Any]:
    deadline = time.monotonic() + limit
    while True:
        obj = await kube.get(ACCESS_REQUESTS, ns, name)
        if (obj.get("status") or {}).get("phase") == phase:
            return obj
        assert time.monotonic() < deadline, f"{name} never became {phase}: {obj.get('status')}"
        await asyncio.sleep(0.1)


@pytest.mark.k8s
async def test_alice_approves_and_the_operator_records_it(review_operator: Any, ns: str) -> None:
    async with kube_for(review_operator) as kube:
        name = await make_request(kube, ns)
        pending = await wait_status(kube, ns, name, "Pending")
        assert pending["status"]["statementHash"] == statement_hash("DROP TABLE tmp")
        assert pending["status"]["requestedAt"]
        assert await plugin(review_operator, "alice", "approve", name, "-n", ns, "-m", "ok") == 0
        approved = await wait_status(kube, ns, name, "Approved")
        assert approved["spec"]["review"] == {"decision": "Approved", "reviewer": "alice", "comment": "ok"}
        assert approved["status"]["reviewer"] == "alice"
        assert approved["status"]["decidedAt"] < approved["status"]["expiresAt"]
        assert not any(k.startswith("kopf.sidegate.dev") for k in approved["status"])
        deadline = time.monotonic() + 30
        while True:  # kopf posts Events in the background
            events = await kube.request(
                "GET",
                f"/api/v1/namespaces/{ns}/events",
                params={"fieldSelector": f"involvedObject.name={name}"},
            )
            if any("approved by alice" in e.get("message", "") for e in events["items"]):
                break
            assert time.monotonic() < deadline, [e.get("message") for e in events["items"]]
            await asyncio.sleep(0.2)


@pytest.mark.k8s
async def test_non_approver_is_refused_by_the_webhook(
    review_operator: Any, ns: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async with kube_for(review_operator) as kube:
        name = await make_request(kube, ns)
        assert await plugin(review_operator, "mallory", "approve", name, "-n", ns) == 1
        assert "mallory is not an approver of Connection orders-db" in capsys.readouterr().err
        obj = await kube.get(ACCESS_REQUESTS, ns, name)
        assert "review" not in obj["spec"]


@pytest.mark.k8s
async def test_requester_cannot_approve_themselves(
    review_operator: Any, ns: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async with kube_for(review_operator) as kube:
        name = await make_request(kube, ns, requester="alice")
        assert await plugin(review_operator, "alice", "approve", name, "-n", ns) == 1
        assert "requester cannot review" in capsys.readouterr().err


@pytest.mark.k8s
async def test_review_in_someone_elses_name_is_refused(review_operator: Any, ns: str) -> None:
    async with kube_for(review_operator) as kube, kube_for(review_operator, "alice") as alice:
        name = await make_request(kube, ns)
        with pytest.raises(Forbidden, match="must be your own user name 'alice'"):
            await alice.merge_patch(
                ACCESS_REQUESTS, ns, name, {"spec": {"review": {"decision": "Approved", "reviewer": "bob"}}}
            )


@pytest.mark.k8s
async def test_a_decision_never_changes(review_operator: Any, ns: str) -> None:
    async with kube_for(review_operator) as kube, kube_for(review_operator, "bob") as bob:
        name = await make_request(kube, ns)
        assert await plugin(review_operator, "alice", "approve", name, "-n", ns) == 0
        assert await plugin(review_operator, "bob", "deny", name, "-n", ns) == 1
        assert await plugin(review_operator, "alice", "deny", name, "-n", ns) == 1
        with pytest.raises((Forbidden, Invalid)):
            await kube.merge_patch(ACCESS_REQUESTS, ns, name, {"spec": {"review": None}})
        with pytest.raises((Forbidden, Invalid)):
            await bob.merge_patch(ACCESS_REQUESTS, ns, name, {"spec": {"reason": "changed my mind"}})
        obj = await kube.get(ACCESS_REQUESTS, ns, name)
        assert obj["spec"]["review"]["decision"] == "Approved" and "reason" not in obj["spec"]


@pytest.mark.k8s
async def test_new_request_cannot_come_pre_approved(review_operator: Any, ns: str) -> None:
    async with kube_for(review_operator) as admin:  # even an admin: admission is not RBAC
        body = {
            "apiVersion": "sidegate.dev/v1alpha1",
            "kind": "AccessRequest",
            "metadata": {"name": "sneaky"},
            "spec": {
                "connection": "orders-db",
                "requester": REQUESTER,
                "statement": "DROP TABLE x",
                "review": {"decision": "Approved", "reviewer": "alice"},
            },
        }
        with pytest.raises(Forbidden, match=r"cannot carry spec\.review"):
            await admin.create(ACCESS_REQUESTS, ns, body)


@pytest.mark.k8s
async def test_review_without_connection_is_refused(review_operator: Any, k8s_namespace: str) -> None:
    grant(review_operator, k8s_namespace, "alice", REVIEWER_RULES, "review-alice")
    async with kube_for(review_operator) as kube:
        name = await make_request(kube, k8s_namespace, connection=False)
        assert await plugin(review_operator, "alice", "approve", name, "-n", k8s_namespace) == 1


@pytest.mark.k8s
async def test_unreviewed_and_approved_requests_expire(review_operator: Any, ns: str) -> None:
    async with kube_for(review_operator) as kube:
        name = await make_request(kube, ns, ttl="2s")
        await wait_status(kube, ns, name, "Expired")
        other = await make_request(kube, ns, ttl="2s")
        assert await plugin(review_operator, "alice", "approve", other, "-n", ns) == 0
        await wait_status(kube, ns, other, "Expired")
