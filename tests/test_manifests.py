"""The shipped manifests: kustomize builds every entry point, and every object it produces passes a
server-side dry run against a real kube-apiserver (with the CRDs and namespaces created for real,
since custom objects and namespaced objects need them).

kustomize comes from $SIDEGATE_KUSTOMIZE or hack/install-kustomize.sh (built once with Go into
~/.cache/sidegate/bin).
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidegate_operator import main as operator_main
from sidegate_operator import review_admission, webhook

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = REPO / "manifests"
OPERATOR_NAMESPACE = "sidegate-system"
WEBHOOK_SERVICE = {"namespace": OPERATOR_NAMESPACE, "name": "sidegate-operator-webhook", "port": 443}
CA_INJECTION = {"cert-manager.io/inject-ca-from": f"{OPERATOR_NAMESPACE}/sidegate-operator-webhook"}
ENTRY_POINTS = ["crds", ".", "cert-manager",
                *sorted(f"overlays/{p.name}" for p in (MANIFESTS / "overlays").iterdir() if p.is_dir())]
FIELD_MANAGER = "sidegate-manifests-test"


@cache
def kustomize_bin() -> str:
    given = os.environ.get("SIDEGATE_KUSTOMIZE")
    if given:
        return given
    out = subprocess.run(["bash", str(REPO / "hack" / "install-kustomize.sh")], capture_output=True, text=True,
                         check=True, timeout=900)
    return out.stdout.strip().splitlines()[-1]


@cache
def build(entry: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run([kustomize_bin(), "build", str(MANIFESTS / entry)], capture_output=True, text=True,
                         check=False, timeout=120)
    assert out.returncode == 0, f"kustomize build manifests/{entry}: {out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def find(entry: str, kind: str, name: str) -> dict[str, Any]:
    found = [d for d in build(entry) if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name} in manifests/{entry}: {len(found)} found"
    return found[0]


def without_labels_and(obj: Mapping[str, Any], *drop: str) -> dict[str, Any]:
    """``obj`` minus what kustomize adds (common labels) and the named metadata keys."""
    out = json.loads(json.dumps(obj))
    out["metadata"].pop("labels", None)
    for key in drop:
        out["metadata"].pop(key, None)
    return out


# --------------------------------------------------------------------------- builds (no cluster)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_builds(entry: str) -> None:
    assert build(entry)


def test_crds_are_referenced_not_copied() -> None:
    shipped = {d["metadata"]["name"]: d for d in build("crds")}
    for path in sorted((REPO / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        assert without_labels_and(shipped[crd["metadata"]["name"]]) == without_labels_and(crd)
    assert {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"} <= set(shipped)
    assert not list(MANIFESTS.rglob("connection.yaml")), "CRDs and examples are used by reference only"


def test_operator_deployment_runs_what_the_operator_accepts() -> None:
    deploy = find(".", "Deployment", "sidegate-operator")
    assert deploy["spec"]["replicas"] == 2
    [container] = deploy["spec"]["template"]["spec"]["containers"]
    assert container["image"] == operator_main.DEFAULT_IMAGE
    env = {e["name"]: e for e in container["env"]}
    assert env["SIDEGATE_IMAGE"]["value"] == container["image"]
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert container["args"][0] == "operator"
    options = operator_main.options_from_args(operator_main.parser().parse_args(container["args"][1:]))
    assert options.peering is not None and options.webhook
    assert find(".", "ClusterKopfPeering", options.peering)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert options.webhook_cert and os.path.dirname(options.webhook_cert) in mounts
    secret = next(v["secret"]["secretName"] for v in deploy["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == mounts[os.path.dirname(options.webhook_cert)])
    cert = find("cert-manager", "Certificate", "sidegate-operator-webhook")
    assert cert["spec"]["secretName"] == secret
    assert f"{WEBHOOK_SERVICE['name']}.{OPERATOR_NAMESPACE}.svc" in cert["spec"]["dnsNames"]
    service = find(".", "Service", WEBHOOK_SERVICE["name"])
    assert service["spec"]["ports"][0]["port"] == 443
    assert service["spec"]["ports"][0]["targetPort"] == "webhook"
    assert {"name": "webhook", "containerPort": options.webhook_port, "protocol": "TCP"} in container["ports"]
    pdb = find(".", "PodDisruptionBudget", "sidegate-operator")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()


def test_webhook_configurations_match_the_operator() -> None:
    """The shipped configurations are what the operator's builders produce (no drift)."""
    inject = find(".", "MutatingWebhookConfiguration", webhook.CONFIGURATION_NAME)
    want = webhook.build_webhook_configuration(
        {"service": {**WEBHOOK_SERVICE, "path": f"/{webhook.WEBHOOK_ID}"}}, operator_namespace=OPERATOR_NAMESPACE)
    assert without_labels_and(inject, "annotations") == without_labels_and(want)
    assert inject["metadata"]["annotations"] == CA_INJECTION
    review = find(".", "ValidatingWebhookConfiguration", review_admission.CONFIGURATION_NAME)
    want = review_admission.build_webhook_configuration({"service": WEBHOOK_SERVICE})
    assert without_labels_and(review, "annotations") == without_labels_and(want)
    assert review["metadata"]["annotations"] == CA_INJECTION


def _rules(entry: str, name: str) -> list[dict[str, Any]]:
    return list(find(entry, "ClusterRole", name)["rules"])


def test_rbac_is_least_privilege() -> None:
    for role in ("sidegate-operator", "sidegate-proxy", "sidegate-reviewer"):
        for rule in _rules(".", role):
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], (role, rule)
    operator = _rules(".", "sidegate-operator")
    secrets = [r for r in operator if "secrets" in r["resources"]]
    assert secrets and all("delete" not in r["verbs"] for r in secrets)
    proxy = _rules(".", "sidegate-proxy")
    # A proxy can open AccessRequests and mark them Used, never write a review.
    assert not any("accessrequests" in r["resources"] and {"patch", "update"} & set(r["verbs"]) for r in proxy)
    assert any(r["resources"] == ["accessrequests/status"] and r["verbs"] == ["patch"] for r in proxy)
    binding = find("overlays/workload", "RoleBinding", "sidegate-proxy")
    assert binding["roleRef"]["name"] == "sidegate-proxy"


def test_e2e_overlay_runs_the_example_policy() -> None:
    conn = find("overlays/e2e-kind", "Connection", "orders-db")
    example = yaml.safe_load((REPO / "examples/postgres/connection.yaml").read_text())
    assert conn["spec"]["guardrails"] == example["spec"]["guardrails"]
    assert conn["spec"]["identity"]["workload"] is True
    pod = find("overlays/e2e-kind", "Deployment", "orders-api")["spec"]["template"]
    assert pod["metadata"]["annotations"]["sidegate.dev/inject"] == "orders-db"


# --------------------------------------------------------------------------- server-side dry run


class Api:
    """Raw REST as the control plane's admin: enough for discovery, apply and dry runs."""

    def __init__(self, cp: Any) -> None:
        self.cp = cp
        self.ctx = ssl.create_default_context(cafile=cp.ca_file)

    def call(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
             ) -> tuple[int, dict[str, Any]]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.cp.url + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.cp.token('admin')}", "Content-Type": content_type,
            "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30, context=self.ctx) as resp:
                return int(resp.status), json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return int(exc.code), json.loads(exc.read() or b"{}")

    @cache  # noqa: B019 - one Api per session
    def resources(self, api_version: str) -> dict[str, tuple[str, bool]]:
        """kind -> (plural, namespaced) served for ``api_version``."""
        path = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        status, doc = self.call("GET", path)
        assert status == 200, f"{api_version} is not served: {doc.get('message')}"
        return {r["kind"]: (r["name"], r["namespaced"]) for r in doc["resources"] if "/" not in r["name"]}

    def path(self, obj: Mapping[str, Any]) -> str:
        api_version, kind, meta = obj["apiVersion"], obj["kind"], obj["metadata"]
        plural, namespaced = self.resources(api_version)[kind]
        base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        if namespaced:
            assert meta.get("namespace"), f"{kind} {meta['name']} names no namespace"
            base += f"/namespaces/{meta['namespace']}"
        else:
            assert "namespace" not in meta, f"cluster-scoped {kind} {meta['name']} has a namespace"
        return f"{base}/{plural}/{meta['name']}"

    def apply(self, obj: Mapping[str, Any], *, dry_run: bool) -> tuple[int, dict[str, Any]]:
        # Strict: an unknown or duplicate field is an error, as with kubectl apply.
        query = f"?fieldManager={FIELD_MANAGER}&force=true&fieldValidation=Strict" + ("&dryRun=All" if dry_run else "")
        return self.call("PATCH", self.path(obj) + query, obj, "application/apply-patch+yaml")


# Stand-ins for cert-manager's CRDs (the dry run then checks kinds, versions and scope, not
# cert-manager's schema); real clusters install cert-manager itself.
CERT_MANAGER_KINDS = {"Issuer": "issuers", "Certificate": "certificates"}


def cert_manager_stub_crds() -> list[dict[str, Any]]:
    return [{
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.cert-manager.io"},
        "spec": {"group": "cert-manager.io", "scope": "Namespaced",
                 "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
                 "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                     "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]},
    } for kind, plural in CERT_MANAGER_KINDS.items()]


@pytest.fixture(scope="module")
def cluster(controlplane: Any) -> Iterator[Api]:
    """The CRDs and namespaces of every build, created for real (objects of those need them)."""
    api = Api(controlplane)
    crds = [d for e in ENTRY_POINTS for d in build(e) if d["kind"] == "CustomResourceDefinition"]
    for crd in [*crds, *cert_manager_stub_crds()]:
        status, doc = api.apply(crd, dry_run=False)
        assert status in (200, 201), doc
    deadline = time.monotonic() + 60
    for crd in crds:
        while True:
            _, doc = api.call("GET", api.path(crd))
            conditions = {c["type"]: c["status"] for c in doc.get("status", {}).get("conditions", [])}
            if conditions.get("Established") == "True":
                break
            assert time.monotonic() < deadline, f"CRD {crd['metadata']['name']} not established"
            time.sleep(0.2)
    namespaces = {d["metadata"]["name"] for e in ENTRY_POINTS for d in build(e) if d["kind"] == "Namespace"}
    for name in namespaces:
        status, doc = api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}, dry_run=False)
        assert status in (200, 201), doc
    yield api


@pytest.mark.k8s
def test_dry_run_refuses_a_bad_object(cluster: Api) -> None:
    """The check has teeth: a misspelt field fails it."""
    deploy = json.loads(json.dumps(find(".", "Deployment", "sidegate-operator")))
    deploy["spec"]["replica"] = 2
    status, doc = cluster.apply(deploy, dry_run=True)
    assert status >= 400 and "replica" in doc.get("message", ""), doc


@pytest.mark.k8s
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_server_side_dry_run(entry: str, cluster: Api) -> None:
    failures = []
    for obj in build(entry):
        status, doc = cluster.apply(obj, dry_run=True)
        if status not in (200, 201):
            failures.append(f"{obj['kind']} {obj['metadata']['name']}: {status} {doc.get('message')}")
    assert not failures, "\n".join(failures)
