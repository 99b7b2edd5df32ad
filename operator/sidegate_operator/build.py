"""The Kubernetes objects the operator owns, built as plain dicts from a Connection.

Everything here is pure: same input, same output, byte for byte. That is what makes reconciling
idempotent (server-side apply of an unchanged dict is a no-op, so a restarted operator changes
nothing) and what lets the unit tests check every security setting without a cluster.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sidegate_proxy.config import (
    API_VERSION,
    DEFAULT_SIGNING_KEY,
    GROUP,
    ConfigError,
    Connection,
    config_hash,
    load_config,
    parse_masking_policy,
    render_config,
)

from .validate import INJECT_ANNOTATION, _secret_refs

__all__ = [
    "ADMIN_PORT",
    "CONFIG_HASH_ANNOTATION",
    "INJECT_ANNOTATION",
    "build_config_secret",
    "build_deployment",
    "build_network_policy",
    "build_service",
    "build_sidecar",
    "build_sidecar_volumes",
    "token_exchange_args",
    "token_issuer_url",
]

MANAGER = "sidegate-operator"
CONFIG_HASH_ANNOTATION = f"{GROUP}/config-hash"
INJECTED_ANNOTATION = f"{GROUP}/injected"
CONNECTION_LABEL = f"{GROUP}/connection"
PROTECTED_BY_LABEL = f"{GROUP}/protected-by"
CONFIG_KEY = "config.json"
CONFIG_DIR = "/etc/sidegate"
SECRETS_DIR = "/var/run/sidegate/secrets"  # written into the config as secretsDir
AUDIT_DIR = "/var/lib/sidegate/audit"
TOKEN_DIR = "/var/run/sidegate/token"
TOKEN_EXCHANGE_PORT_NAME = "token-exchange"
ADMIN_PORT = 9090
SIDECAR_ADMIN_PORT = 15090  # 9090 is too often the application's own (Prometheus) port
SIDECAR_NAME = "sidegate-proxy"
UID = 65532
DEFAULT_TOKEN_AUDIENCE = "sidegate"
AUDIT_WORKER_CORES = 2.0  # a gateway's CPU request from which its audit runs in a worker process
DEFAULT_RESOURCES: Mapping[str, Any] = {
    "requests": {"cpu": "50m", "memory": "64Mi"},
    "limits": {"memory": "256Mi"},
}


# --------------------------------------------------------------------------- names and metadata


def gateway_name(conn_name: str) -> str:
    return f"{conn_name}-sidegate"


def config_secret_name(conn_name: str) -> str:
    return f"{conn_name}-sidegate-config"


def endpoint(conn: Connection) -> str:
    """Where callers connect: the Service in gateway mode, loopback in the pod in sidecar mode."""
    if conn.mode == "gateway":
        return f"{gateway_name(conn.name)}.{conn.namespace}.svc:{conn.listen_port}"
    return f"127.0.0.1:{conn.listen_port}"


def labels(conn: Connection, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "sidegate",
        "app.kubernetes.io/instance": conn.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGER,
        CONNECTION_LABEL: conn.name,
    }


def selector_labels(conn: Connection) -> dict[str, str]:
    return {CONNECTION_LABEL: conn.name, "app.kubernetes.io/component": "gateway"}


def owner_reference(conn: Connection) -> dict[str, Any]:
    """Children die with their Connection (the garbage collector follows this, not the operator)."""
    if not conn.uid:
        raise ConfigError("metadata.uid", "a Connection without a uid cannot own objects")
    return {
        "apiVersion": API_VERSION,
        "kind": "Connection",
        "name": conn.name,
        "uid": conn.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(conn: Connection, name: str, component: str, annotations: Mapping[str, str] | None = None,
          ) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": conn.namespace,
        "labels": labels(conn, component),
        "ownerReferences": [owner_reference(conn)],
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def _dns_label(name: str, what: str) -> str:
    if len(name) > 63:
        raise ConfigError("metadata.name", f"too long for the {what} name {name!r} (at most 63 characters)")
    return name


def secret_names(conn: Connection) -> tuple[str, ...]:
    """Every Secret the proxy reads for this Connection, each mounted whole under SECRETS_DIR."""
    return tuple(dict.fromkeys(ref.name for _, ref, _ in _secret_refs(conn)))


def required_secret_keys(conn: Connection) -> dict[str, tuple[str, ...]]:
    """Secret name -> keys that must be in it (what makes a Connection Degraded/SecretMissing)."""
    out: dict[str, tuple[str, ...]] = {}
    for _, ref, keys in _secret_refs(conn):
        out[ref.name] = tuple(dict.fromkeys((*out.get(ref.name, ()), *keys)))
    return out


# --------------------------------------------------------------------------- token exchange


def token_issuer_url(conn: Connection) -> str | None:
    """The ``iss`` of the Connection's exchanged tokens: where ``POST /v1/token`` is reachable
    (the gateway Service's admin port, or the sidecar's admin port in the pod), unless set."""
    te = conn.token_exchange
    if te is None:
        return None
    if te.issuer:
        return te.issuer
    if conn.mode == "gateway":
        return f"http://{gateway_name(conn.name)}.{conn.namespace}.svc:{ADMIN_PORT}"
    return f"http://127.0.0.1:{SIDECAR_ADMIN_PORT}"


def _mounted_key(secret: str, key: str) -> str:
    """Where a key of a mounted Secret is (each one in ``secret_names`` is mounted whole)."""
    return f"{SECRETS_DIR}/{secret}/{key}"


def signing_key_path(conn: Connection) -> str | None:
    """Where the signing key is mounted."""
    te = conn.token_exchange
    if te is None:
        return None
    return _mounted_key(te.signing_key_ref.name, te.signing_key_ref.key or DEFAULT_SIGNING_KEY)


def verification_key_paths(conn: Connection) -> tuple[str, ...]:
    """Where the verification keys will be: in the signing key's Secret volume, which the kubelet
    updates in place, so a key added to the Secret later is found there without a rollout."""
    te = conn.token_exchange
    if te is None:
        return ()
    return tuple(_mounted_key(te.signing_key_ref.name, name) for name in te.verification_keys)


def token_exchange_args(conns: Sequence[Connection]) -> list[str]:
    """``--token-signing-key FILE --token-issuer URL [--token-verification-key FILE]...`` for the
    proxy process (one key set per process: Connections served together must name the same keys
    and issuer)."""
    chosen = {(signing_key_path(c), token_issuer_url(c), verification_key_paths(c))
              for c in conns if c.token_exchange is not None}
    if not chosen:
        return []
    if len(chosen) > 1:
        names = ", ".join(c.name for c in conns if c.token_exchange is not None)
        raise ConfigError("spec.tokenExchange", f"Connections {names} name different signing keys, "
                                                "verification keys or issuers; one proxy holds one")
    ((path, url, verification),) = chosen
    assert path is not None and url is not None
    return ["--token-signing-key", path, "--token-issuer", url,
            *(arg for v in verification for arg in ("--token-verification-key", v))]


def check_token_exchange(conn: Connection) -> None:
    """Refuse what would make the proxy fail at start: its exchange issuer also listed as a
    Connection issuer (the operator's default URL is checked here, an explicit one by the parser)."""
    url = token_issuer_url(conn)
    for i, issuer in enumerate(conn.identity.issuers):
        if url is not None and issuer.issuer == url:
            raise ConfigError(f"spec.identity.issuers[{i}].issuer",
                              f"{url} is the token-exchange issuer of this Connection; its tokens are "
                              "trusted without listing it")


def secret_fields(conn: Connection) -> dict[str, tuple[str, ...]]:
    """Secret name -> the Connection fields that reference it (to say what a missing one is for)."""
    out: dict[str, tuple[str, ...]] = {}
    for path, ref, _ in _secret_refs(conn):
        out[ref.name] = (*out.get(ref.name, ()), path)
    return out


def resources_of(conn_obj: Mapping[str, Any]) -> Mapping[str, Any]:
    spec = conn_obj.get("spec") or {}
    res = spec.get("resources")
    if res is None:
        return DEFAULT_RESOURCES
    if not isinstance(res, Mapping):
        raise ConfigError("spec.resources", "expected a mapping of requests and limits")
    return res


def cpu_cores(quantity: object) -> float | None:
    """A Kubernetes CPU quantity in cores (``"2"``, ``"1.5"``, ``"1500m"``); None if unreadable."""
    text = str(quantity).strip()
    try:
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        return None


def audit_worker_args(resources: Mapping[str, Any], connection_type: str) -> list[str]:
    """An HTTP gateway asking for two cores or more seals its audit in a second process, which
    then has a core of its own (docs/performance.md: more requests per second; with one core,
    fewer). A PostgreSQL gateway never does: its native lane seals in C in the relay's process,
    which costs less than handing the records to a worker (bench/results.md)."""
    if connection_type != "http":
        return []
    requests = resources.get("requests") if isinstance(resources, Mapping) else None
    cores = cpu_cores(requests.get("cpu")) if isinstance(requests, Mapping) and "cpu" in requests else None
    return ["--audit-worker"] if cores is not None and cores >= AUDIT_WORKER_CORES else []


def wants_network_policy(conn_obj: Mapping[str, Any]) -> bool:
    return (conn_obj.get("spec") or {}).get("networkPolicy") is True


# --------------------------------------------------------------------------- config Secret


def select_policies(conn_obj: Mapping[str, Any], masking_objs: Iterable[Mapping[str, Any]],
                    ) -> list[Mapping[str, Any]]:
    """The MaskingPolicies of the Connection's namespace that apply to it.

    A policy that cannot be parsed but names this Connection (or has a selector, so might match)
    fails the whole Connection: serving it without the masking meant for it would leak.
    """
    meta = conn_obj.get("metadata") or {}
    name, namespace = str(meta.get("name")), str(meta.get("namespace") or "default")
    conn_labels = meta.get("labels") or {}
    chosen: list[Mapping[str, Any]] = []
    for m in masking_objs:
        m_meta = m.get("metadata") or {}
        if str(m_meta.get("namespace") or "default") != namespace:
            continue
        try:
            policy = parse_masking_policy(m)
        except ConfigError as exc:
            spec = m.get("spec") or {}
            targets = spec.get("connections") if isinstance(spec, Mapping) else None
            maybe = (isinstance(targets, list) and name in targets) or (
                isinstance(spec, Mapping) and spec.get("selector") is not None)
            if maybe:
                raise ConfigError(f"MaskingPolicy {m_meta.get('name')}: {exc.path}", exc.message) from None
            continue
        if policy.applies_to(name, conn_labels):
            chosen.append(m)
    return chosen


def render(conn_obj: Mapping[str, Any], masking_objs: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The validated config document for one Connection (raises ``ConfigError`` when invalid)."""
    doc = render_config(conn_obj, select_policies(conn_obj, masking_objs), secrets_dir=SECRETS_DIR)
    # the exact parse the proxy will do: reject here what it would reject there
    check_token_exchange(load_config(doc).connection)
    return doc


def build_config_secret(conn_obj: Mapping[str, Any], masking_objs: Iterable[Mapping[str, Any]],
                        ) -> dict[str, Any]:
    """The Secret holding the rendered proxy config; its annotation carries the config hash.

    A Secret, not a ConfigMap: the config names Secret references and approvers, which readers
    of ConfigMaps need not see.
    """
    doc = render(conn_obj, masking_objs)
    conn = load_config(doc).connection
    raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(conn, config_secret_name(conn.name), "config",
                          {CONFIG_HASH_ANNOTATION: config_hash(doc)}),
        "type": "Opaque",
        "data": {CONFIG_KEY: base64.b64encode(raw).decode()},
    }


# --------------------------------------------------------------------------- pod parts


def _security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _probe(path: str, port: str, **extra: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": 10, "timeoutSeconds": 2, **extra}


def _secret_volume(volume: str, secret: str) -> dict[str, Any]:
    return {"name": volume, "secret": {"secretName": secret, "defaultMode": 0o440}}


def _credential_volumes(conns: Sequence[Connection]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(volume, mount) per distinct Secret the Connections need, mounted whole and read-only."""
    names = dict.fromkeys(n for c in conns for n in secret_names(c))
    return [
        (_secret_volume(f"sidegate-secret-{i}", name),
         {"name": f"sidegate-secret-{i}", "mountPath": f"{SECRETS_DIR}/{name}", "readOnly": True})
        for i, name in enumerate(names)
    ]


def build_deployment(conn: Connection, config_hash: str, image: str, *,
                     resources: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The gateway: a hardened Deployment whose pod template changes (and so rolls out) with the
    config hash."""
    name = _dns_label(gateway_name(conn.name), "gateway")
    resources = resources if resources is not None else DEFAULT_RESOURCES
    creds = _credential_volumes([conn])
    volumes = [
        _secret_volume("config", config_secret_name(conn.name)),
        *(v for v, _ in creds),
        {"name": "audit", "emptyDir": {"sizeLimit": "1Gi"}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
    ]
    mounts = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        *(m for _, m in creds),
        {"name": "audit", "mountPath": AUDIT_DIR},
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - a private emptyDir
    ]
    container = {
        "name": "proxy",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["proxy", "--config", f"{CONFIG_DIR}/{CONFIG_KEY}",
                 "--admin", f"0.0.0.0:{ADMIN_PORT}", "--audit-dir", AUDIT_DIR, *token_exchange_args([conn]),
                 *audit_worker_args(resources, conn.type)],
        "ports": [
            {"name": "proxy", "containerPort": conn.listen_port, "protocol": "TCP"},
            {"name": "admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
        ],
        "livenessProbe": _probe("/healthz", "admin", failureThreshold=3),
        "readinessProbe": _probe("/readyz", "admin", failureThreshold=2),
        "resources": dict(resources),
        "securityContext": _security_context(),
        "volumeMounts": mounts,
    }
    pod_labels = labels(conn, "gateway")
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(conn, name, "gateway", {CONFIG_HASH_ANNOTATION: config_hash}),
        "spec": {
            "replicas": conn.replicas,
            "selector": {"matchLabels": selector_labels(conn)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": pod_labels, "annotations": {CONFIG_HASH_ANNOTATION: config_hash}},
                "spec": {
                    # Its own account: gateways create AccessRequests and post Events.
                    "serviceAccountName": gateway_name(conn.name),
                    "automountServiceAccountToken": True,
                    "enableServiceLinks": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": UID,
                        "runAsGroup": UID,
                        "fsGroup": UID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


PROXY_CLUSTER_ROLE = "sidegate-proxy"  # manifests/base/rbac-proxy.yaml


def build_service_account(conn: Connection) -> dict[str, Any]:
    """The gateway's identity towards the API server (approvals, Events), owned by the Connection."""
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": _meta(conn, gateway_name(conn.name), "gateway")}


def build_role_binding(conn: Connection) -> dict[str, Any]:
    """Grants the gateway's account the proxy role in its own namespace only."""
    name = gateway_name(conn.name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(conn, name, "gateway"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": PROXY_CLUSTER_ROLE},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": conn.namespace}],
    }


def build_service(conn: Connection) -> dict[str, Any]:
    name = _dns_label(gateway_name(conn.name), "Service")
    ports = [{
        "name": "proxy",
        "port": conn.listen_port,
        "targetPort": "proxy",
        "protocol": "TCP",
        "appProtocol": "postgresql" if conn.type == "postgres" else "http",
    }]
    if conn.token_exchange is not None:
        # POST /v1/token and the public keys live on the admin port (so do /metrics and the probes).
        ports.append({"name": TOKEN_EXCHANGE_PORT_NAME, "port": ADMIN_PORT, "targetPort": "admin",
                      "protocol": "TCP", "appProtocol": "http"})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(conn, name, "gateway"),
        "spec": {"type": "ClusterIP", "selector": selector_labels(conn), "ports": ports},
    }


def build_network_policy(conn: Connection) -> dict[str, Any]:
    """Ingress to the target's pods only from this gateway.

    The target is a host name, which a NetworkPolicy cannot select, so its pods opt in with the
    label ``sidegate.dev/protected-by: <connection>``.
    """
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(conn, _dns_label(gateway_name(conn.name), "NetworkPolicy"), "network-policy"),
        "spec": {
            "podSelector": {"matchLabels": {PROTECTED_BY_LABEL: conn.name}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": selector_labels(conn)}}]}],
        },
    }


# --------------------------------------------------------------------------- sidecar


def token_audience(conns: Sequence[Connection]) -> str:
    """The audience of the projected token: the first one the Connections' issuers accept."""
    for conn in conns:
        for issuer in conn.identity.issuers:
            if issuer.audiences:
                return issuer.audiences[0]
    return DEFAULT_TOKEN_AUDIENCE


def _workload(conns: Sequence[Connection]) -> bool:
    return any(c.identity.workload for c in conns)


def build_sidecar(conns: Sequence[Connection], image: str, *,
                  resources: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One native sidecar (an init container with ``restartPolicy: Always``) for the Connections.

    Native, so it starts before the app and is ready when the app first connects, and it does not
    keep a Job's pod alive after the app exits.
    """
    if not conns:
        raise ConfigError("", "a sidecar needs at least one Connection")
    args = ["proxy"]
    for conn in conns:
        args += ["--config", f"{CONFIG_DIR}/{conn.name}/{CONFIG_KEY}"]
    args += ["--admin", f"0.0.0.0:{SIDECAR_ADMIN_PORT}", "--audit-dir", AUDIT_DIR, *token_exchange_args(conns)]
    mounts = [
        {"name": f"sidegate-config-{i}", "mountPath": f"{CONFIG_DIR}/{c.name}", "readOnly": True}
        for i, c in enumerate(conns)
    ]
    mounts += [m for _, m in _credential_volumes(conns)]
    mounts.append({"name": "sidegate-audit", "mountPath": AUDIT_DIR})
    if _workload(conns):
        args += ["--workload-token", f"{TOKEN_DIR}/token"]
        mounts.append({"name": "sidegate-token", "mountPath": TOKEN_DIR, "readOnly": True})
    return {
        "name": SIDECAR_NAME,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "restartPolicy": "Always",
        "args": args,
        "ports": [{"name": "sidegate-admin", "containerPort": SIDECAR_ADMIN_PORT, "protocol": "TCP"}],
        "startupProbe": _probe("/healthz", "sidegate-admin", failureThreshold=30, periodSeconds=1),
        "livenessProbe": _probe("/healthz", "sidegate-admin", failureThreshold=3),
        "readinessProbe": _probe("/readyz", "sidegate-admin", failureThreshold=2),
        "resources": dict(resources if resources is not None else DEFAULT_RESOURCES),
        "securityContext": _security_context(),
        "volumeMounts": mounts,
    }


def build_sidecar_volumes(conns: Sequence[Connection]) -> list[dict[str, Any]]:
    """The pod volumes ``build_sidecar``'s mounts refer to (all named ``sidegate-*``)."""
    volumes = [_secret_volume(f"sidegate-config-{i}", config_secret_name(c.name))
               for i, c in enumerate(conns)]
    volumes += [v for v, _ in _credential_volumes(conns)]
    volumes.append({"name": "sidegate-audit", "emptyDir": {"sizeLimit": "1Gi"}})
    if _workload(conns):
        volumes.append({"name": "sidegate-token", "projected": {"sources": [{"serviceAccountToken": {
            "audience": token_audience(conns), "expirationSeconds": 3600, "path": "token"}}]}})
    return volumes


def inject_sidecar(pod: dict[str, Any], conns: Sequence[Connection], image: str) -> None:
    """Add (or refresh in place) the sidecar and its volumes: applying it twice changes nothing.

    Written for kopf's ``patch.fns``: it edits the pod body it is given.
    """
    spec = pod.setdefault("spec", {})
    sidecar = build_sidecar(conns, image)
    inits = [c for c in spec.get("initContainers") or [] if c.get("name") != SIDECAR_NAME]
    # First, so the proxy is up before other init containers (migrations) need the database.
    spec["initContainers"] = [sidecar, *inits]
    volumes = [v for v in spec.get("volumes") or [] if not str(v.get("name", "")).startswith("sidegate-")]
    spec["volumes"] = volumes + build_sidecar_volumes(conns)
    if _workload(conns) and not spec.get("serviceAccountName"):
        # What the ServiceAccount admission plugin would set; a projected token needs it named.
        spec["serviceAccountName"] = spec.get("serviceAccount") or "default"
    annotations = pod.setdefault("metadata", {}).setdefault("annotations", {})
    annotations[INJECTED_ANNOTATION] = ",".join(c.name for c in conns)
