"""The data plane's Kubernetes client against a real API server (and a fake one for 410 Gone)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from loopback import serve
from sidegate_proxy.kube import (
    ACCESS_REQUESTS,
    EVENTS,
    Conflict,
    Forbidden,
    Invalid,
    KubeClient,
    KubeConfig,
    KubeConfigError,
    NotFound,
    Resource,
    Unauthorized,
)

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- shared helpers


def install_crds(controlplane: Any) -> None:
    """Create the sidegate CRDs (idempotent) and wait until the API server serves them."""
    from kubernetes import client

    api = controlplane.api_client("admin")
    try:
        ext = client.ApiextensionsV1Api(api)
        for path in sorted((REPO / "crds").glob("*.yaml")):
            body = yaml.safe_load(path.read_text())
            try:
                ext.create_custom_resource_definition(body)
            except client.ApiException as exc:
                if exc.status != 409:
                    raise
                current = ext.read_custom_resource_definition(body["metadata"]["name"])
                body["metadata"]["resourceVersion"] = current.metadata.resource_version
                ext.replace_custom_resource_definition(body["metadata"]["name"], body)
        deadline = time.monotonic() + 30
        for path in sorted((REPO / "crds").glob("*.yaml")):
            name = yaml.safe_load(path.read_text())["metadata"]["name"]
            while True:
                crd = ext.read_custom_resource_definition(name)
                conds = {c.type: c.status for c in (crd.status.conditions or [])}
                if conds.get("Established") == "True":
                    break
                assert time.monotonic() < deadline, f"CRD {name} not established"
                time.sleep(0.1)
    finally:
        api.close()


def kube_for(controlplane: Any, user: str = "admin") -> KubeClient:
    return KubeClient(KubeConfig.from_kubeconfig(controlplane.kubeconfig_for(user)))


def grant(controlplane: Any, namespace: str, user: str, rules: list[dict[str, Any]], name: str) -> None:
    """A namespaced Role + RoleBinding for a static user."""
    from kubernetes import client

    api = controlplane.api_client("admin")
    try:
        rbac = client.RbacAuthorizationV1Api(api)
        rbac.create_namespaced_role(namespace, {"metadata": {"name": name}, "rules": rules})
        rbac.create_namespaced_role_binding(
            namespace,
            {
                "metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": [{"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}],
            },
        )
    finally:
        api.close()


@pytest.fixture(scope="session")
def sidegate_crds(controlplane: Any) -> Any:
    install_crds(controlplane)
    return controlplane


def access_request_body(name: str, statement: str = "DROP TABLE t", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "sidegate.dev/v1alpha1",
        "kind": "AccessRequest",
        "metadata": {"name": name, "labels": {"test": "kube-client"}},
        "spec": {
            "connection": "orders-db",
            "requester": "system:serviceaccount:ci:deployer",
            "statement": statement,
            **spec,
        },
    }


# --------------------------------------------------------------------------- configuration


def test_in_cluster_config_reads_the_service_account(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("tok-1\n")
    (tmp_path / "namespace").write_text("payments")
    cfg = KubeConfig.in_cluster(
        {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}, tmp_path
    )
    assert cfg.server == "https://10.0.0.1:443"
    assert cfg.namespace == "payments"
    assert cfg.token_file == str(tmp_path / "token")
    v6 = KubeConfig.in_cluster(
        {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}, tmp_path
    )
    assert v6.server == "https://[fd00::1]:443"


def test_in_cluster_config_fails_outside_a_cluster(tmp_path: Path) -> None:
    with pytest.raises(KubeConfigError, match="not in a cluster"):
        KubeConfig.in_cluster({}, tmp_path)
    with pytest.raises(KubeConfigError, match="token"):
        KubeConfig.in_cluster({"KUBERNETES_SERVICE_HOST": "h", "KUBERNETES_SERVICE_PORT": "1"}, tmp_path)


def test_kubeconfig_with_inline_data_and_context(tmp_path: Path) -> None:
    doc = {
        "clusters": [
            {
                "name": "c",
                "cluster": {
                    "server": "https://k:6443/",
                    "certificate-authority-data": base64.b64encode(b"CA").decode(),
                },
            }
        ],
        "users": [{"name": "u", "user": {"tokenFile": "tok"}}],
        "contexts": [
            {"name": "x", "context": {"cluster": "c", "user": "u", "namespace": "ns1"}},
            {"name": "y", "context": {"cluster": "c", "user": "u"}},
        ],
        "current-context": "x",
    }
    (tmp_path / "kc").write_text(yaml.safe_dump(doc))
    cfg = KubeConfig.from_kubeconfig(tmp_path / "kc")
    assert (cfg.server, cfg.namespace, cfg.ca_data, cfg.token_file) == (
        "https://k:6443",
        "ns1",
        b"CA",
        str(tmp_path / "tok"),
    )
    assert KubeConfig.from_kubeconfig(tmp_path / "kc", "y").namespace == "default"
    with pytest.raises(KubeConfigError, match="no context named 'z'"):
        KubeConfig.from_kubeconfig(tmp_path / "kc", "z")
    doc["users"] = [{"name": "u", "user": {"exec": {"command": "aws"}}}]
    (tmp_path / "kc").write_text(yaml.safe_dump(doc))
    with pytest.raises(KubeConfigError, match="exec"):
        KubeConfig.from_kubeconfig(tmp_path / "kc")


def test_bad_server_and_half_a_key_pair_are_refused() -> None:
    with pytest.raises(KubeConfigError, match="http"):
        KubeConfig(server="k:6443")
    with pytest.raises(KubeConfigError, match="both"):
        KubeConfig(server="https://k", cert_data=b"x")


async def test_token_file_is_reread_after_rotation(tmp_path: Path) -> None:
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({"kind": "Thing", "metadata": {"name": "x"}})

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner, url = await serve(app)
    token = tmp_path / "token"
    token.write_text("first")
    now = [0.0]
    try:
        cfg = KubeConfig(server=url, token_file=str(token))
        async with KubeClient(cfg, clock=lambda: now[0]) as kube:
            await kube.get(ACCESS_REQUESTS, "ns", "x")
            token.write_text("second")
            await kube.get(ACCESS_REQUESTS, "ns", "x")  # cached for a minute
            now[0] = 61.0
            await kube.get(ACCESS_REQUESTS, "ns", "x")
    finally:
        await runner.cleanup()
    assert seen == ["Bearer first", "Bearer first", "Bearer second"]


# --------------------------------------------------------------------------- 410 Gone (fake server)


async def test_watch_relists_after_gone() -> None:
    """An expired resourceVersion: list again, yield the current objects, watch on from there."""
    requests: list[dict[str, str]] = []

    def obj(name: str, rv: str) -> dict[str, Any]:
        return {"metadata": {"name": name, "resourceVersion": rv}}

    async def handler(request: web.Request) -> web.StreamResponse:
        q = dict(request.query)
        requests.append(q)
        if "watch" not in q:
            return web.json_response({"metadata": {"resourceVersion": "50"}, "items": [obj("a", "49")]})
        resp = web.StreamResponse()
        await resp.prepare(request)
        if q["resourceVersion"] == "5":
            gone = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old resource version"}
            await resp.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
        else:
            await resp.write(json.dumps({"type": "MODIFIED", "object": obj("a", "51")}).encode() + b"\n")
            await asyncio.sleep(30)
        return resp

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner, url = await serve(app)
    try:
        async with KubeClient(KubeConfig(server=url)) as kube:
            events = []
            async for ev in kube.watch(ACCESS_REQUESTS, "ns", resource_version="5"):
                events.append((ev.type, ev.object["metadata"]["resourceVersion"]))
                if len(events) == 2:
                    break
    finally:
        await runner.cleanup()
    assert events == [("ADDED", "49"), ("MODIFIED", "51")]
    assert [r.get("resourceVersion") for r in requests] == ["5", None, "50"]


# --------------------------------------------------------------------------- the real API server


@pytest.fixture
async def admin_kube(sidegate_crds: Any) -> AsyncIterator[KubeClient]:
    async with kube_for(sidegate_crds) as kube:
        yield kube


@pytest.fixture
def ns(k8s_namespace: str) -> Iterator[str]:
    yield k8s_namespace


@pytest.mark.k8s
async def test_create_get_list_and_merge_patch(admin_kube: KubeClient, ns: str) -> None:
    created = await admin_kube.create(ACCESS_REQUESTS, ns, access_request_body("one"))
    assert created["metadata"]["name"] == "one"
    assert created["spec"]["scope"] == "statement"  # the CRD default
    got = await admin_kube.get(ACCESS_REQUESTS, ns, "one")
    assert got["metadata"]["uid"] == created["metadata"]["uid"]
    listed = await admin_kube.list(ACCESS_REQUESTS, ns, label_selector="test=kube-client")
    assert [i["metadata"]["name"] for i in listed.items] == ["one"]
    assert listed.resource_version
    assert (await admin_kube.list(ACCESS_REQUESTS, ns, label_selector="test=other")).items == ()
    patched = await admin_kube.merge_patch(
        ACCESS_REQUESTS, ns, "one", {"status": {"phase": "Pending"}}, subresource="status"
    )
    assert patched["status"]["phase"] == "Pending"


@pytest.mark.k8s
async def test_errors_are_typed(admin_kube: KubeClient, sidegate_crds: Any, ns: str) -> None:
    with pytest.raises(NotFound):
        await admin_kube.get(ACCESS_REQUESTS, ns, "nope")
    with pytest.raises(Invalid, match=r"scope statement needs spec\.statement"):
        body = access_request_body("bad")
        del body["spec"]["statement"]
        await admin_kube.create(ACCESS_REQUESTS, ns, body)
    async with kube_for(sidegate_crds, "mallory") as mallory:
        with pytest.raises(Forbidden):
            await mallory.list(ACCESS_REQUESTS, ns)
    cfg = KubeConfig.from_kubeconfig(sidegate_crds.kubeconfig_for("mallory"))
    bogus = KubeConfig(server=cfg.server, ca_data=cfg.ca_data, token="not-a-token")
    async with KubeClient(bogus) as kube:
        with pytest.raises(Unauthorized):
            await kube.list(ACCESS_REQUESTS, ns)


@pytest.mark.k8s
async def test_json_patch_with_resource_version_applies_once(admin_kube: KubeClient, ns: str) -> None:
    created = await admin_kube.create(ACCESS_REQUESTS, ns, access_request_body("once"))
    rv = created["metadata"]["resourceVersion"]
    ops = [{"op": "add", "path": "/status", "value": {"phase": "Used"}}]
    first = await admin_kube.json_patch(
        ACCESS_REQUESTS, ns, "once", ops, subresource="status", resource_version=rv
    )
    assert first["status"]["phase"] == "Used"
    with pytest.raises(Conflict):
        await admin_kube.json_patch(
            ACCESS_REQUESTS, ns, "once", ops, subresource="status", resource_version=rv
        )


@pytest.mark.k8s
async def test_watch_streams_and_resumes(admin_kube: KubeClient, ns: str) -> None:
    await admin_kube.create(ACCESS_REQUESTS, ns, access_request_body("w1"))
    seen: list[tuple[str, str]] = []

    async def consume() -> None:
        # No resourceVersion: the existing object first, then changes; the server ends the
        # stream after 1 s and the client resumes from the last version it saw.
        async for ev in admin_kube.watch(ACCESS_REQUESTS, ns, timeout_seconds=1):
            seen.append((ev.type, ev.object["metadata"]["name"]))
            first.set()
            if ev.type == "DELETED":
                return

    first = asyncio.Event()
    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 20)
    await asyncio.sleep(1.5)  # past one server-side timeout
    await admin_kube.create(ACCESS_REQUESTS, ns, access_request_body("w2"))
    await admin_kube.request("DELETE", ACCESS_REQUESTS.path(ns, "w2"))
    await asyncio.wait_for(task, 20)
    assert seen == [("ADDED", "w1"), ("ADDED", "w2"), ("DELETED", "w2")]


@pytest.mark.k8s
async def test_watch_from_an_expired_version_relists(admin_kube: KubeClient, ns: str) -> None:
    await admin_kube.create(ACCESS_REQUESTS, ns, access_request_body("old"))
    got = []
    async for ev in admin_kube.watch(ACCESS_REQUESTS, ns, resource_version="1"):
        got.append(ev)
        break
    assert got[0].object["metadata"]["name"] == "old"


@pytest.mark.k8s
async def test_events_k8s_io(admin_kube: KubeClient, ns: str) -> None:
    body = {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"name": f"e-{uuid.uuid4().hex[:6]}"},
        "eventTime": "2024-05-01T12:00:00.000000Z",
        "reportingController": "sidegate.dev/proxy",
        "reportingInstance": "p-1",
        "action": "Connect",
        "reason": "SessionStarted",
        "type": "Normal",
        "note": "hi",
        "regarding": {
            "apiVersion": "sidegate.dev/v1alpha1",
            "kind": "Connection",
            "namespace": ns,
            "name": "orders-db",
        },
    }
    created = await admin_kube.create(EVENTS, ns, body)
    assert created["reason"] == "SessionStarted"
    assert Resource("", "v1", "events").path(ns) == f"/api/v1/namespaces/{ns}/events"
