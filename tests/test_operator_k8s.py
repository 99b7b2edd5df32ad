"""The operator against a real kube-apiserver: reconciling, status, masking, admission, restarts.

The operator runs in-process (its own thread and event loop) with the admin kubeconfig; its
webhook server listens on 127.0.0.1 with a certificate from a CA made here, and the
MutatingWebhookConfiguration is registered with that URL, limited to this module's namespaces.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from controlplane import ControlPlane, free_port
from sidegate_operator.build import CONFIG_HASH_ANNOTATION, CONFIG_KEY
from sidegate_operator.kube import ClusterAccess, Kube, KubeError, resource_path
from sidegate_operator.main import BackgroundOperator, OperatorOptions
from sidegate_operator.webhook import WEBHOOK_ID, build_webhook_configuration
from sidegate_proxy.demo import LocalIssuer

pytestmark = pytest.mark.k8s

REPO = Path(__file__).resolve().parent.parent
IMAGE = "example.test/sidegate:test"
TEST_LABEL = "sidegate-operator-test"
CONN_API = "sidegate.dev/v1alpha1"
T = TypeVar("T")


# --------------------------------------------------------------------------- helpers


def make_tls(tmp: Path) -> tuple[Path, Path, bytes]:
    """A CA and a serving certificate for 127.0.0.1: (cert file, key file, CA PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sidegate-webhook-test-ca")])
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1)
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    cert_file, key_file = tmp / "tls.crt", tmp / "tls.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file, ca.public_bytes(serialization.Encoding.PEM)


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str, within: float = 60.0) -> T:
    """Poll ``probe`` until it returns something truthy (waiting on state, not asserting speed)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = await probe()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


class ResumeLog(logging.Handler):
    """Counts kopf's 'Resuming is processed' lines per object, to know a restart has settled."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.resumed: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        ref = getattr(record, "k8s_ref", None)
        if isinstance(ref, dict) and record.getMessage().startswith("Resuming is processed"):
            self.resumed.append(f"{ref.get('namespace')}/{ref.get('name')}")


class Harness:
    """The running operator (restartable) and what the tests need to talk to the cluster."""

    def __init__(self, cp: ControlPlane, options: OperatorOptions) -> None:
        self.cp = cp
        self.options = options
        self.access = ClusterAccess.load(cp.kubeconfig)
        self.operator = BackgroundOperator(options).start(timeout=60)
        self.resume_log = ResumeLog()
        kopf_logger = logging.getLogger("kopf")
        self.saved_level = kopf_logger.level
        kopf_logger.setLevel(logging.INFO)
        kopf_logger.addHandler(self.resume_log)

    def restart(self) -> None:
        self.operator.stop()
        self.resume_log.resumed.clear()
        self.operator = BackgroundOperator(self.options).start(timeout=60)

    def stop(self) -> None:
        self.operator.stop()
        logging.getLogger("kopf").removeHandler(self.resume_log)
        logging.getLogger("kopf").setLevel(self.saved_level)


async def install_crds(kube: Kube) -> None:
    for path in sorted((REPO / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        await kube.apply(crd)

    async def established() -> bool:
        for path in sorted((REPO / "crds").glob("*.yaml")):
            name = yaml.safe_load(path.read_text())["metadata"]["name"]
            obj = await kube.get(resource_path("apiextensions.k8s.io/v1", "CustomResourceDefinition",
                                               None, name)) or {}
            conds = {c["type"]: c["status"] for c in (obj.get("status") or {}).get("conditions") or []}
            if conds.get("Established") != "True":
                return False
        return True

    await eventually(established, "CRDs established")


@pytest.fixture(scope="module")
def harness(controlplane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    tmp = tmp_path_factory.mktemp("webhook")
    cert, key, ca = make_tls(tmp)
    port = free_port()
    access = ClusterAccess.load(controlplane.kubeconfig)
    hook_name = f"sidegate-inject-{uuid.uuid4().hex[:6]}"

    async def setup() -> None:
        async with Kube(access) as kube:
            await install_crds(kube)
            config = build_webhook_configuration(
                {"url": f"https://127.0.0.1:{port}/{WEBHOOK_ID}", "caBundle": base64.b64encode(ca).decode()},
                operator_namespace="sidegate-system", name=hook_name)
            # Only this module's namespaces: other tests' pods must not depend on this operator.
            config["webhooks"][0]["namespaceSelector"]["matchLabels"] = {TEST_LABEL: "true"}
            await kube.apply(config)

    async def teardown() -> None:
        async with Kube(access) as kube:
            await kube.delete(resource_path("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration",
                                            None, hook_name))

    run(setup())
    options = OperatorOptions(
        kubeconfig=controlplane.kubeconfig, image=IMAGE, operator_namespace="sidegate-system",
        webhook_addr="127.0.0.1", webhook_port=port, webhook_host="127.0.0.1",
        webhook_cert=str(cert), webhook_key=str(key),
    )
    h = Harness(controlplane, options)
    try:
        yield h
    finally:
        run(teardown())
        h.stop()


@pytest.fixture
async def kube(harness: Harness) -> Any:
    async with Kube(harness.access) as k:
        yield k


@pytest.fixture
async def ns(kube: Kube) -> Any:
    name = f"op-{uuid.uuid4().hex[:8]}"
    await kube.apply({"apiVersion": "v1", "kind": "Namespace",
                      "metadata": {"name": name, "labels": {TEST_LABEL: "true"}}})
    yield name
    await kube.delete(resource_path("v1", "Namespace", None, name))


def connection(ns: str, name: str, mode: str = "gateway", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": CONN_API, "kind": "Connection",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "type": "postgres",
            "target": {"host": "db.example.svc", "port": 5432, "database": "orders"},
            "credentials": {"secretRef": {"name": f"{name}-admin"}},
            "mode": mode,
            "replicas": 1,
            "access": [{"subjects": ["system:serviceaccount:*:reporter"]}],
            **spec,
        },
    }


def credentials(ns: str, name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns},
            "type": "Opaque", "stringData": {"username": "gateway", "password": "s3cret"}}


def masking(ns: str, name: str, conn: str, strategy: str = "redact") -> dict[str, Any]:
    return {"apiVersion": CONN_API, "kind": "MaskingPolicy", "metadata": {"name": name, "namespace": ns},
            "spec": {"connections": [conn],
                     "rules": [{"name": "emails", "columns": ["*.email"], "strategy": strategy}]}}


async def get_conn(kube: Kube, ns: str, name: str) -> dict[str, Any]:
    obj = await kube.get(resource_path(CONN_API, "Connection", ns, name))
    assert obj is not None
    return obj


def ready(obj: dict[str, Any]) -> dict[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c["type"] == "Ready":
            return dict(c)
    return None


async def wait_ready(kube: Kube, ns: str, name: str, reason: str = "Reconciled",
                     status: str = "True") -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        obj = await get_conn(kube, ns, name)
        cond = ready(obj)
        return obj if cond and cond["status"] == status and cond["reason"] == reason else None

    return await eventually(probe, f"Connection {ns}/{name} Ready={status} ({reason})")


def config_doc(secret: dict[str, Any]) -> dict[str, Any]:
    return dict(json.loads(base64.b64decode(secret["data"][CONFIG_KEY])))


# --------------------------------------------------------------------------- reconciling


async def test_gateway_connection_gets_secret_deployment_service_and_status(kube: Kube, ns: str) -> None:
    await kube.apply(credentials(ns, "orders-admin"))
    await kube.apply(connection(ns, "orders"))
    conn = await wait_ready(kube, ns, "orders")
    uid = conn["metadata"]["uid"]
    status = conn["status"]
    assert status["observedGeneration"] == conn["metadata"]["generation"]
    assert status["endpoint"] == f"orders-sidegate.{ns}.svc:15432"
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "False"

    secret = await kube.get(resource_path("v1", "Secret", ns, "orders-sidegate-config"))
    dep = await kube.get(resource_path("apps/v1", "Deployment", ns, "orders-sidegate"))
    svc = await kube.get(resource_path("v1", "Service", ns, "orders-sidegate"))
    assert secret and dep and svc
    assert secret["metadata"]["annotations"][CONFIG_HASH_ANNOTATION] == status["configHash"]
    assert dep["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION] == status["configHash"]
    assert config_doc(secret)["connection"]["metadata"]["name"] == "orders"
    for child in (secret, dep, svc):
        (owner,) = child["metadata"]["ownerReferences"]
        assert owner["uid"] == uid and owner["kind"] == "Connection" and owner["controller"] is True
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == IMAGE
    assert container["securityContext"]["readOnlyRootFilesystem"] is True

    async def reconciled_event() -> bool:
        events = await kube.list(f"/api/v1/namespaces/{ns}/events")
        return any(e.get("reason") == "Reconciled" and e["involvedObject"]["name"] == "orders"
                   for e in events)

    await eventually(reconciled_event, "a Reconciled event")


async def test_missing_secret_degrades_and_recovers(kube: Kube, ns: str) -> None:
    await kube.apply(connection(ns, "billing"))
    conn = await wait_ready(kube, ns, "billing", reason="SecretMissing", status="False")
    assert f"Secret {ns}/billing-admin not found" in ready(conn)["message"]  # type: ignore[index]
    degraded = next(c for c in conn["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "SecretMissing"
    assert await kube.get(resource_path("apps/v1", "Deployment", ns, "billing-sidegate")) is None

    await kube.apply(credentials(ns, "billing-admin"))
    await wait_ready(kube, ns, "billing")
    assert await kube.get(resource_path("apps/v1", "Deployment", ns, "billing-sidegate")) is not None


async def test_masking_policy_edit_rerenders_the_config(kube: Kube, ns: str) -> None:
    await kube.apply(credentials(ns, "crm-admin"))
    await kube.apply(masking(ns, "pii", "crm"))
    await kube.apply(connection(ns, "crm"))
    first = (await wait_ready(kube, ns, "crm"))["status"]["configHash"]
    secret_path = resource_path("v1", "Secret", ns, "crm-sidegate-config")
    secret = await kube.get(secret_path)
    assert secret is not None
    assert config_doc(secret)["maskingPolicies"][0]["spec"]["rules"][0]["strategy"] == "redact"

    async def policy_status() -> bool:
        obj = await kube.get(resource_path(CONN_API, "MaskingPolicy", ns, "pii"))
        return bool(obj and (obj.get("status") or {}).get("connections") == ["crm"])

    await eventually(policy_status, "MaskingPolicy status.connections")

    await kube.apply(masking(ns, "pii", "crm", strategy="hash"))

    async def rerendered() -> str | None:
        obj = await get_conn(kube, ns, "crm")
        new = (obj.get("status") or {}).get("configHash")
        return new if new and new != first else None

    second = await eventually(rerendered, "a new config hash")
    secret = await kube.get(secret_path)
    assert secret is not None
    assert secret["metadata"]["annotations"][CONFIG_HASH_ANNOTATION] == second
    assert config_doc(secret)["maskingPolicies"][0]["spec"]["rules"][0]["strategy"] == "hash"
    dep = await kube.get(resource_path("apps/v1", "Deployment", ns, "crm-sidegate"))
    assert dep and dep["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION] == second

    # Deleting the policy re-renders too: no masking left.
    await kube.delete(resource_path(CONN_API, "MaskingPolicy", ns, "pii"))

    async def unmasked() -> bool:
        s = await kube.get(secret_path)
        return bool(s and config_doc(s)["maskingPolicies"] == [])

    await eventually(unmasked, "the config without the deleted policy")


async def test_switching_to_sidecar_mode_removes_the_gateway(kube: Kube, ns: str) -> None:
    await kube.apply(credentials(ns, "mode-admin"))
    await kube.apply(connection(ns, "mode"))
    await wait_ready(kube, ns, "mode")
    await kube.apply(connection(ns, "mode", mode="sidecar"))

    async def gone() -> bool:
        return await kube.get(resource_path("apps/v1", "Deployment", ns, "mode-sidegate")) is None

    await eventually(gone, "the gateway Deployment removed")
    assert await kube.get(resource_path("v1", "Service", ns, "mode-sidegate")) is None
    conn = await wait_ready(kube, ns, "mode")
    assert conn["status"]["endpoint"] == "127.0.0.1:15432"


async def test_children_are_owned_for_garbage_collection(kube: Kube, ns: str, harness: Harness) -> None:
    await kube.apply(credentials(ns, "gc-admin"))
    await kube.apply(connection(ns, "gc"))
    conn = await wait_ready(kube, ns, "gc")
    paths = [resource_path("v1", "Secret", ns, "gc-sidegate-config"),
             resource_path("apps/v1", "Deployment", ns, "gc-sidegate"),
             resource_path("v1", "Service", ns, "gc-sidegate")]
    for path in paths:
        child = await kube.get(path)
        assert child is not None
        refs = child["metadata"]["ownerReferences"]
        assert refs == [{"apiVersion": CONN_API, "kind": "Connection", "name": "gc",
                         "uid": conn["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]
    # No finalizer of ours holds the Connection back: it goes at once.
    assert not conn["metadata"].get("finalizers")
    await kube.delete(resource_path(CONN_API, "Connection", ns, "gc"))
    assert await kube.get(resource_path(CONN_API, "Connection", ns, "gc")) is None
    if harness.cp.with_controller_manager:

        async def collected() -> bool:
            return all([await kube.get(p) is None for p in paths])

        await eventually(collected, "children garbage-collected")


# --------------------------------------------------------------------------- admission


def app_pod(ns: str, name: str, inject: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if inject is not None:
        meta["annotations"] = {"sidegate.dev/inject": inject}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"containers": [{"name": "app", "image": "example.test/app:1"}]}}


async def create_pod(kube: Kube, pod: dict[str, Any]) -> dict[str, Any]:
    return await kube.request("POST", resource_path("v1", "Pod", pod["metadata"]["namespace"]), pod)


async def test_webhook_injects_the_sidecar(kube: Kube, ns: str) -> None:
    await kube.apply(credentials(ns, "side-admin"))
    await kube.apply(connection(ns, "side", mode="sidecar", identity={"workload": True}))
    await wait_ready(kube, ns, "side")

    pod = await create_pod(kube, app_pod(ns, "app", "side"))
    inits = pod["spec"].get("initContainers") or []
    assert [c["name"] for c in inits] == ["sidegate-proxy"]
    assert inits[0]["restartPolicy"] == "Always" and inits[0]["image"] == IMAGE
    assert "/etc/sidegate/side/config.json" in inits[0]["args"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["sidegate-config-0"]["secret"]["secretName"] == "side-sidegate-config"
    assert "serviceAccountToken" in volumes["sidegate-token"]["projected"]["sources"][0]
    assert pod["metadata"]["annotations"]["sidegate.dev/injected"] == "side"
    assert [c["name"] for c in pod["spec"]["containers"]] == ["app"]

    # Applying the mutation again (a pod that already carries it) adds nothing twice.
    again = {"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": "app-again", "namespace": ns,
                          "annotations": pod["metadata"]["annotations"]},
             "spec": {"containers": pod["spec"]["containers"], "initContainers": inits,
                      "volumes": [v for v in pod["spec"]["volumes"] if v["name"].startswith("sidegate-")]}}
    second = await create_pod(kube, again)
    assert [c["name"] for c in second["spec"]["initContainers"]] == ["sidegate-proxy"]
    names = [v["name"] for v in second["spec"]["volumes"] if v["name"].startswith("sidegate-")]
    assert len(names) == len(set(names)) == len([v for v in volumes if v.startswith("sidegate-")])


async def test_webhook_leaves_other_pods_alone(kube: Kube, ns: str) -> None:
    pod = await create_pod(kube, app_pod(ns, "plain", None))
    assert not pod["spec"].get("initContainers")
    assert "sidegate.dev/injected" not in (pod["metadata"].get("annotations") or {})


async def test_webhook_refuses_an_unknown_connection(kube: Kube, ns: str) -> None:
    with pytest.raises(KubeError) as err:
        await create_pod(kube, app_pod(ns, "lost", "does-not-exist"))
    assert err.value.status == 400
    assert f"Connection {ns}/does-not-exist does not exist" in err.value.message


# --------------------------------------------------------------------------- restarts


async def test_restarted_operator_changes_nothing(kube: Kube, ns: str, harness: Harness) -> None:
    await kube.apply(credentials(ns, "steady-admin"))
    await kube.apply(masking(ns, "pii", "steady"))
    await kube.apply(connection(ns, "steady"))
    await wait_ready(kube, ns, "steady")
    paths = [resource_path("v1", "Secret", ns, "steady-sidegate-config"),
             resource_path("apps/v1", "Deployment", ns, "steady-sidegate"),
             resource_path("v1", "Service", ns, "steady-sidegate")]

    async def versions() -> list[str]:
        return [(await kube.get(p) or {})["metadata"]["resourceVersion"] for p in paths]

    before = await versions()
    await asyncio.to_thread(harness.restart)

    async def resumed() -> bool:
        return f"{ns}/steady" in harness.resume_log.resumed

    await eventually(resumed, "the restarted operator to resume the Connection")
    assert await versions() == before
    conn = await wait_ready(kube, ns, "steady")
    assert conn["status"]["configHash"]


# --------------------------------------------------------------------------- end to end


async def apply_pg_connection(kube: Kube, ns: str, postgres: Any, **spec: Any) -> LocalIssuer:
    """The ``pg`` Connection of the end-to-end tests (gateway credentials, a local issuer's JWKS,
    the ``pii`` MaskingPolicy) with ``spec`` added; returns the issuer that mints callers' tokens."""
    issuer = LocalIssuer()
    await kube.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pg-admin", "namespace": ns},
                      "stringData": {"username": postgres.admin_user, "password": postgres.admin_password}})
    await kube.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "ci-jwks", "namespace": ns},
                      "stringData": {"jwks.json": issuer.jwks().decode()}})
    await kube.apply(masking(ns, "pii", "pg"))
    await kube.apply(connection(
        ns, "pg",
        target={"host": postgres.host, "port": postgres.port, "database": postgres.database},
        credentials={"secretRef": {"name": "pg-admin"}},
        identity={"issuers": [{"name": "demo", "issuer": "https://issuer.demo.sidegate.local",
                               "audiences": ["sidegate"], "jwksSecretRef": {"name": "ci-jwks", "key": "jwks.json"}}]},
        **spec,
    ))
    return issuer


async def test_rendered_config_enforces_policy_against_real_postgres(
    kube: Kube, ns: str, postgres: Any, tmp_path: Path
) -> None:
    """What the operator renders, run by ``sidegate proxy --config`` with the Secrets laid out as
    the kubelet mounts them, masks and blocks against a real PostgreSQL."""
    import os
    import signal
    import subprocess
    import sys

    from sidegate_proxy.localpg import find_pg_bin, wait_port

    issuer = await apply_pg_connection(
        kube, ns, postgres, guardrails=[{"name": "no-drop", "sql": {"statements": ["drop"]}, "action": "block"}])
    await wait_ready(kube, ns, "pg")
    secret = await kube.get(resource_path("v1", "Secret", ns, "pg-sidegate-config"))
    assert secret is not None
    config_file = tmp_path / CONFIG_KEY
    config_file.write_text(json.dumps(config_doc(secret)))
    mounted = tmp_path / "secrets"
    for name in ("pg-admin", "ci-jwks"):
        obj = await kube.get(resource_path("v1", "Secret", ns, name))
        assert obj is not None
        (mounted / name).mkdir(parents=True)
        for key, value in obj["data"].items():
            (mounted / name / key).write_bytes(base64.b64decode(value))

    port = free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220 (a long-running server, not awaited)
        [sys.executable, "-m", "sidegate_operator.cli", "proxy", "--config", str(config_file),
         "--secrets-dir", str(mounted), "--listen", f"127.0.0.1:{port}", "--admin", "off"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )

    def psql(sql: str) -> subprocess.CompletedProcess[str]:
        token = issuer.mint("system:serviceaccount:ci:reporter")
        return subprocess.run(
            [str(find_pg_bin() / "psql"), "-X", "-At", "-h", "127.0.0.1", "-p", str(port), "-U", "reporter",
             "-d", postgres.database, "-c", sql],
            capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, "PGPASSWORD": token, "PGCONNECT_TIMEOUT": "10"},
        )

    try:
        await asyncio.to_thread(wait_port, "127.0.0.1", port, 30.0)
        masked = await asyncio.to_thread(psql, "SELECT email FROM customers ORDER BY id LIMIT 1")
        assert masked.returncode == 0, masked.stderr
        assert masked.stdout.strip() == "[REDACTED]"
        blocked = await asyncio.to_thread(psql, "DROP TABLE customers")
        assert blocked.returncode != 0 and 'guardrail "no-drop"' in blocked.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.to_thread(proc.communicate, None, 30)
    assert proc.returncode == 0, err
    assert postgres.admin_password not in out + err


# --------------------------------------------------------------------------- token exchange


def signing_key_pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()


def signing_key_secret(ns: str, name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns},
            "type": "Opaque", "stringData": {"tls.key": signing_key_pem()}}


async def test_token_signing_key_degrades_until_its_secret_appears(kube: Kube, ns: str) -> None:
    await kube.apply(credentials(ns, "ledger-admin"))
    await kube.apply(connection(ns, "ledger", tokenExchange={"signingKeySecretRef": {"name": "ledger-exchange"}}))
    conn = await wait_ready(kube, ns, "ledger", reason="SecretMissing", status="False")
    message = ready(conn)["message"]  # type: ignore[index]
    assert f"Secret {ns}/ledger-exchange not found (spec.tokenExchange.signingKeySecretRef)" in message
    degraded = next(c for c in conn["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "SecretMissing"
    assert await kube.get(resource_path("apps/v1", "Deployment", ns, "ledger-sidegate")) is None
    config = await kube.get(resource_path("v1", "Secret", ns, "ledger-sidegate-config"))
    assert config is not None  # rendered meanwhile: it names the key's Secret, never holds the key

    await kube.apply(signing_key_secret(ns, "ledger-exchange"))
    conn = await wait_ready(kube, ns, "ledger")
    degraded = next(c for c in conn["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "False"
    dep = await kube.get(resource_path("apps/v1", "Deployment", ns, "ledger-sidegate"))
    svc = await kube.get(resource_path("v1", "Service", ns, "ledger-sidegate"))
    assert dep is not None and svc is not None
    pod_spec = dep["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    args = container["args"]
    assert args[args.index("--token-signing-key") + 1] == "/var/run/sidegate/secrets/ledger-exchange/tls.key"
    assert args[args.index("--token-issuer") + 1] == f"http://ledger-sidegate.{ns}.svc:9090"
    mount = next(m for m in container["volumeMounts"]
                 if m["mountPath"] == "/var/run/sidegate/secrets/ledger-exchange")
    assert mount["readOnly"] is True
    volume = next(v for v in pod_spec["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "ledger-exchange"
    assert not container.get("env") and not container.get("envFrom")
    assert {"name": "token-exchange", "port": 9090, "targetPort": "admin"}.items() <= next(
        p for p in svc["spec"]["ports"] if p["name"] == "token-exchange").items()
    assert "PRIVATE KEY" not in json.dumps(config_doc(config))


async def test_listener_certificate_degrades_until_its_secret_appears(kube: Kube, ns: str) -> None:
    """``spec.listen.tls``: the API server defaults ``required``; the operator waits for the
    kubernetes.io/tls Secret, then mounts it into the gateway."""
    await kube.apply(credentials(ns, "vault-admin"))
    await kube.apply(connection(ns, "vault", listen={"port": 5432, "tls": {"secretRef": {"name": "vault-tls"}}}))
    conn = await wait_ready(kube, ns, "vault", reason="SecretMissing", status="False")
    assert conn["spec"]["listen"]["tls"]["required"] is True  # the CRD's default
    assert f"Secret {ns}/vault-tls not found (spec.listen.tls.secretRef)" in ready(conn)["message"]  # type: ignore[index]
    assert await kube.get(resource_path("apps/v1", "Deployment", ns, "vault-sidegate")) is None

    pem = {"tls.crt": "-----BEGIN CERTIFICATE-----\n", "tls.key": "-----BEGIN PRIVATE KEY-----\n"}
    await kube.apply({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                      "metadata": {"name": "vault-tls", "namespace": ns}, "stringData": pem})
    await wait_ready(kube, ns, "vault")
    dep = await kube.get(resource_path("apps/v1", "Deployment", ns, "vault-sidegate"))
    assert dep is not None
    pod_spec = dep["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/var/run/sidegate/secrets/vault-tls")
    assert mount["readOnly"] is True
    assert next(v for v in pod_spec["volumes"] if v["name"] == mount["name"])["secret"]["secretName"] == "vault-tls"


async def test_verification_keys_are_checked_and_reach_the_gateway(kube: Kube, ns: str) -> None:
    for exchange in ({"signingKeySecretRef": {"name": "vk-exchange"}, "verificationKeys": ["tls.key"]},
                     {"signingKeySecretRef": {"name": "vk-exchange", "key": "a.pem"}, "verificationKeys": ["a.pem"]}):
        with pytest.raises(KubeError) as err:  # the API server's own CEL rule
            await kube.apply(connection(ns, "vk", tokenExchange=exchange))
        assert err.value.status == 422 and "must not list the signing key" in err.value.message

    await kube.apply(credentials(ns, "vk-admin"))
    secret = signing_key_secret(ns, "vk-exchange")
    secret["stringData"]["next.key"] = "not a key"
    await kube.apply(secret)
    await kube.apply(connection(ns, "vk", tokenExchange={"signingKeySecretRef": {"name": "vk-exchange"},
                                                          "verificationKeys": ["next.key"]}))
    conn = await wait_ready(kube, ns, "vk", reason="SecretMissing", status="False")
    assert "key next.key (spec.tokenExchange.verificationKeys[0])" in ready(conn)["message"]  # type: ignore[index]

    secret["stringData"]["next.key"] = signing_key_pem()
    await kube.apply(secret)
    await wait_ready(kube, ns, "vk")
    dep = await kube.get(resource_path("apps/v1", "Deployment", ns, "vk-sidegate"))
    assert dep is not None
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--token-verification-key") + 1] == "/var/run/sidegate/secrets/vk-exchange/next.key"


async def test_exchanged_token_works_on_the_gateway_the_operator_renders(
    kube: Kube, ns: str, postgres: Any, tmp_path: Path
) -> None:
    """The Deployment's own args (config, key, issuer), with its mounts laid out as the kubelet
    would: a CI token is exchanged at POST /v1/token and the exchanged token logs in to PostgreSQL,
    while a token exchanged for another Connection is refused."""
    import os
    import signal
    import subprocess
    import sys

    import aiohttp
    import jwt

    from sidegate_operator.build import AUDIT_DIR, CONFIG_DIR, SECRETS_DIR
    from sidegate_proxy.localpg import find_pg_bin, wait_port
    from sidegate_proxy.tokenexchange import GRANT_TYPE, TOKEN_TYPE_JWT

    await kube.apply(signing_key_secret(ns, "pg-exchange"))
    issuer = await apply_pg_connection(
        kube, ns, postgres, tokenExchange={"signingKeySecretRef": {"name": "pg-exchange"}})
    await wait_ready(kube, ns, "pg")
    secret = await kube.get(resource_path("v1", "Secret", ns, "pg-sidegate-config"))
    dep = await kube.get(resource_path("apps/v1", "Deployment", ns, "pg-sidegate"))
    assert secret is not None and dep is not None
    (config_file := tmp_path / "config" / CONFIG_KEY).parent.mkdir()
    config_file.write_text(json.dumps(config_doc(secret)))
    mounted = tmp_path / "secrets"
    for name in ("pg-admin", "ci-jwks", "pg-exchange"):
        obj = await kube.get(resource_path("v1", "Secret", ns, name))
        assert obj is not None
        (mounted / name).mkdir(parents=True)
        for key, value in obj["data"].items():
            (mounted / name / key).write_bytes(base64.b64decode(value))

    # The container's args, with its mount paths mapped to the folders above.
    paths = {CONFIG_DIR: str(config_file.parent), SECRETS_DIR: str(mounted), AUDIT_DIR: str(tmp_path / "audit")}
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    for i, arg in enumerate(args):
        for inside, outside in paths.items():
            if arg.startswith(inside):
                args[i] = outside + arg[len(inside):]
    port, admin = free_port(), free_port()
    args[args.index("--admin") + 1] = f"127.0.0.1:{admin}"
    issuer_url = args[args.index("--token-issuer") + 1]
    proc = subprocess.Popen(  # noqa: ASYNC220 (a long-running server, not awaited)
        [sys.executable, "-m", "sidegate_operator.cli", *args, "--listen", f"127.0.0.1:{port}",
         "--secrets-dir", str(mounted)],  # the config says secretsDir: the mount path in the pod
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )

    def psql(password: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(find_pg_bin() / "psql"), "-X", "-At", "-h", "127.0.0.1", "-p", str(port), "-U", "reporter",
             "-d", postgres.database, "-c", "SELECT email FROM customers ORDER BY id LIMIT 1"],
            capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "10"},
        )

    async def exchange(audience: str) -> tuple[int, dict[str, Any]]:
        form = {"grant_type": GRANT_TYPE, "subject_token": issuer.mint("system:serviceaccount:ci:reporter"),
                "subject_token_type": TOKEN_TYPE_JWT, "audience": audience}
        async with aiohttp.ClientSession() as client, \
                client.post(f"http://127.0.0.1:{admin}/v1/token", data=form) as r:
            return r.status, await r.json()

    try:
        try:
            await asyncio.to_thread(wait_port, "127.0.0.1", port, 30.0)
            await asyncio.to_thread(wait_port, "127.0.0.1", admin, 30.0)
        except TimeoutError:
            proc.kill()
            raise AssertionError(f"the proxy did not start: {proc.communicate()[1]}") from None
        status, answer = await exchange(f"{ns}/pg")
        assert status == 200, answer
        token = answer["access_token"]
        claims = jwt.decode(token, options={"verify_signature": False})
        assert claims["iss"] == issuer_url == f"http://pg-sidegate.{ns}.svc:9090"
        assert claims["aud"] == f"sidegate:{ns}/pg" and claims["sub"] == "system:serviceaccount:ci:reporter"
        masked = await asyncio.to_thread(psql, token)
        assert masked.returncode == 0, masked.stderr
        assert masked.stdout.strip() == "[REDACTED]"
        status, answer = await exchange(f"{ns}/other")
        assert status == 400 and answer["error"] == "invalid_target"
        forged = jwt.encode({**claims, "aud": f"sidegate:{ns}/pg"}, signing_key_pem(), algorithm="ES256",
                            headers={"kid": jwt.get_unverified_header(token)["kid"]})  # the real key's kid
        refused = await asyncio.to_thread(psql, forged)
        assert refused.returncode != 0
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.to_thread(proc.communicate, None, 30)
    assert proc.returncode == 0, err
    assert postgres.admin_password not in out + err
    assert "PRIVATE KEY" not in out + err
