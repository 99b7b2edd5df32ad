"""The real control plane (tests/controlplane.py) starts and behaves like Kubernetes."""

from __future__ import annotations

import json
import time
import uuid

import pytest

pytest.importorskip("kubernetes")

from kubernetes import client

from controlplane import ControlPlane

pytestmark = pytest.mark.k8s


def test_readyz_ok(controlplane: ControlPlane) -> None:
    status, body = controlplane.get("/readyz")
    assert (status, body.strip()) == (200, b"ok")
    assert controlplane.url.startswith("https://127.0.0.1:")


def test_admin_creates_namespace_and_configmap(controlplane: ControlPlane) -> None:
    api = controlplane.api_client("admin")
    try:
        core = client.CoreV1Api(api)
        ns = f"cp-{uuid.uuid4().hex[:8]}"
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
        core.create_namespaced_config_map(
            ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="settings"), data={"k": "v"})
        )
        assert core.read_namespaced_config_map("settings", ns).data == {"k": "v"}
    finally:
        api.close()


def test_identity_comes_from_static_tokens(controlplane: ControlPlane) -> None:
    api = controlplane.api_client("alice")
    try:
        review = client.AuthenticationV1Api(api).create_self_subject_review(
            client.V1SelfSubjectReview(api_version="authentication.k8s.io/v1", kind="SelfSubjectReview")
        )
        assert review.status.user_info.username == "alice"
        assert "dba-oncall" in review.status.user_info.groups
    finally:
        api.close()


def test_plain_user_is_forbidden_to_create_secret(controlplane: ControlPlane, k8s_namespace: str) -> None:
    api = controlplane.api_client("mallory")
    try:
        with pytest.raises(client.ApiException) as err:
            client.CoreV1Api(api).create_namespaced_secret(
                k8s_namespace,
                client.V1Secret(metadata=client.V1ObjectMeta(name="stolen"), string_data={"a": "b"}),
            )
        assert err.value.status == 403
        assert json.loads(err.value.body)["reason"] == "Forbidden"
    finally:
        api.close()


def test_deployment_gets_replicaset(
    controlplane: ControlPlane, k8s_admin_client: object, k8s_namespace: str
) -> None:
    if not controlplane.with_controller_manager:
        pytest.skip("kube-controller-manager not built/started")
    apps = client.AppsV1Api(k8s_admin_client)
    labels = {"app": "web"}
    apps.create_namespaced_deployment(
        k8s_namespace,
        client.V1Deployment(
            metadata=client.V1ObjectMeta(name="web"),
            spec=client.V1DeploymentSpec(
                replicas=1,
                selector=client.V1LabelSelector(match_labels=labels),
                template=client.V1PodTemplateSpec(
                    metadata=client.V1ObjectMeta(labels=labels),
                    spec=client.V1PodSpec(containers=[client.V1Container(name="web", image="nginx")]),
                ),
            ),
        ),
    )
    deadline = time.monotonic() + 60
    replicasets: list[client.V1ReplicaSet] = []
    while time.monotonic() < deadline:
        replicasets = apps.list_namespaced_replica_set(k8s_namespace).items
        if replicasets:
            break
        time.sleep(0.5)
    assert replicasets, "no ReplicaSet for the Deployment within 60s"
    assert replicasets[0].metadata.owner_references[0].name == "web"
    # ... and the ReplicaSet controller creates the Pod (no kubelet/scheduler, so it stays Pending).
    core = client.CoreV1Api(k8s_admin_client)
    while time.monotonic() < deadline:
        if core.list_namespaced_pod(k8s_namespace).items:
            return
        time.sleep(0.5)
    pytest.fail("no Pod for the ReplicaSet within 60s")


def test_namespace_deletion_finishes(controlplane: ControlPlane, k8s_admin_client: object) -> None:
    if not controlplane.with_controller_manager:
        pytest.skip("kube-controller-manager not built/started")
    core = client.CoreV1Api(k8s_admin_client)
    ns = f"gone-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    core.create_namespaced_config_map(ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="x")))
    core.delete_namespace(ns)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            core.read_namespace(ns)
        except client.ApiException as e:
            assert e.status == 404
            return
        time.sleep(0.5)
    pytest.fail(f"namespace {ns} still there 60s after deletion")
