"""Pure unit tests of what the operator builds: child objects, status, injection, fingerprints."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import pytest

from sidegate_operator import build
from sidegate_operator.connection import (
    DEGRADED,
    READY,
    Outcome,
    conditions_for,
    connections_by_secret,
    missing_secrets,
    status_for,
    waiting_for_secret,
)
from sidegate_operator.maskingpolicy import applies_to, policy_fingerprint
from sidegate_operator.webhook import InjectionError, build_webhook_configuration, requested, resolve
from sidegate_proxy.config import ConfigError, load_config, parse_connection

IMAGE = "example.test/sidegate:1"


def connection(name: str = "orders-db", mode: str = "gateway", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "sidegate.dev/v1alpha1",
        "kind": "Connection",
        "metadata": {"name": name, "namespace": "payments", "uid": f"uid-{name}", "generation": 1,
                     "labels": {"tier": "db"}},
        "spec": {
            "type": "postgres",
            "target": {"host": "db.payments.svc", "port": 5432, "database": "orders"},
            "credentials": {"secretRef": {"name": f"{name}-admin"}},
            "mode": mode,
            "replicas": 2,
            "access": [{"subjects": ["system:serviceaccount:payments:reporter"]}],
        },
    }
    body["spec"].update(spec)
    return body


def masking(name: str = "pii", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "sidegate.dev/v1alpha1",
        "kind": "MaskingPolicy",
        "metadata": {"name": name, "namespace": "payments"},
        "spec": {"connections": ["orders-db"], "rules": [{"name": "emails", "columns": ["*.email"],
                                                          "strategy": "redact"}], **spec},
    }


def secret_doc(secret: dict[str, Any]) -> dict[str, Any]:
    return dict(json.loads(base64.b64decode(secret["data"][build.CONFIG_KEY])))


# --------------------------------------------------------------------------- config Secret


def test_config_secret_holds_the_rendered_config_and_its_hash() -> None:
    secret = build.build_config_secret(connection(), [masking()])
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "orders-db-sidegate-config"
    doc = secret_doc(secret)
    config = load_config(doc)
    assert config.connection.name == "orders-db"
    assert [m.name for m in config.masking] == ["pii"]
    assert doc["secretsDir"] == build.SECRETS_DIR
    assert secret["metadata"]["annotations"][build.CONFIG_HASH_ANNOTATION] == config.hash
    owner = secret["metadata"]["ownerReferences"][0]
    assert owner == {"apiVersion": "sidegate.dev/v1alpha1", "kind": "Connection", "name": "orders-db",
                     "uid": "uid-orders-db", "controller": True, "blockOwnerDeletion": True}


def test_config_hash_changes_with_the_config_and_only_then() -> None:
    base = build.build_config_secret(connection(), [masking()])
    again = build.build_config_secret(copy.deepcopy(connection()), [masking()])
    assert again == base  # byte for byte: server-side apply of it is a no-op
    changed = build.build_config_secret(connection(), [masking(rules=[
        {"name": "emails", "columns": ["*.email"], "strategy": "hash"}])])
    key = build.CONFIG_HASH_ANNOTATION
    assert changed["metadata"]["annotations"][key] != base["metadata"]["annotations"][key]
    # A status or an unrelated annotation does not change what the proxy enforces.
    noisy = connection()
    noisy["status"] = {"configHash": "x"}
    noisy["metadata"]["annotations"] = {"sidegate.dev/secret-version": "a:1"}
    assert build.build_config_secret(noisy, [masking()]) == base


def test_policies_of_other_connections_and_namespaces_are_left_out() -> None:
    other_ns = masking("elsewhere")
    other_ns["metadata"]["namespace"] = "other"
    other_conn = masking("billing", connections=["billing-api"])
    by_label = masking("by-label", connections=[], selector={"matchLabels": {"tier": "db"}})
    doc = secret_doc(build.build_config_secret(connection(), [other_ns, other_conn, by_label, masking()]))
    assert [m["metadata"]["name"] for m in doc["maskingPolicies"]] == ["by-label", "pii"]


def test_an_invalid_policy_for_the_connection_fails_closed() -> None:
    bad = masking(rules=[{"name": "x", "strategy": "redact"}])
    with pytest.raises(ConfigError, match="MaskingPolicy pii"):
        build.build_config_secret(connection(), [bad])
    # ... but one aimed at another Connection does not take this one down.
    elsewhere = masking("other", connections=["billing-api"], rules=[{"name": "x", "strategy": "redact"}])
    build.build_config_secret(connection(), [elsewhere])


def test_an_invalid_connection_raises_config_error() -> None:
    with pytest.raises(ConfigError, match=r"spec\.target\.database"):
        build.build_config_secret(connection(target={"host": "db", "port": 5432}), [])


# --------------------------------------------------------------------------- gateway


def test_deployment_is_hardened() -> None:
    conn = parse_connection(connection())
    dep = build.build_deployment(conn, "sha256:abc", IMAGE)
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 65532
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    # Its own account (AccessRequests, Events), bound to the proxy role in this namespace only.
    assert pod["serviceAccountName"] == "orders-db-sidegate" and pod["automountServiceAccountToken"] is True
    assert container["args"][:3] == ["proxy", "--config", "/etc/sidegate/config.json"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert {"name": "admin", "containerPort": 9090, "protocol": "TCP"} in container["ports"]
    assert container["resources"] == dict(build.DEFAULT_RESOURCES)
    assert dep["spec"]["replicas"] == 2
    assert dep["metadata"]["ownerReferences"][0]["uid"] == "uid-orders-db"


@pytest.mark.parametrize(("cpu", "worker"), [
    (None, False), ("1", False), ("1500m", False), ("2", True), ("2000m", True), ("3.5", True), ("lots", False),
])
def test_an_http_gateway_with_two_cores_seals_its_audit_in_a_worker(cpu: str | None, worker: bool) -> None:
    resources = {"requests": {"memory": "256Mi", **({"cpu": cpu} if cpu else {})}}
    http = connection(type="http", target={"url": "https://billing.payments.svc:8443"})
    for body, wanted in ((http, worker), (connection(), False)):  # PostgreSQL: the lane seals in C, inline
        conn = parse_connection(body)
        (container,) = build.build_deployment(conn, "sha256:abc", IMAGE, resources=resources)["spec"]["template"][
            "spec"]["containers"]
        assert ("--audit-worker" in container["args"]) is wanted, conn.type
    assert build.cpu_cores("250m") == 0.25 and build.cpu_cores(2) == 2.0 and build.cpu_cores("") is None


def test_deployment_mounts_config_and_credentials_read_only() -> None:
    conn = parse_connection(connection(
        target={"host": "db", "port": 5432, "database": "orders",
                "tls": {"mode": "verify-full", "caSecretRef": {"name": "orders-db-ca"}}}))
    dep = build.build_deployment(conn, "sha256:abc", IMAGE)
    pod = dep["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path, secret in [("/etc/sidegate", "orders-db-sidegate-config"),
                         ("/var/run/sidegate/secrets/orders-db-admin", "orders-db-admin"),
                         ("/var/run/sidegate/secrets/orders-db-ca", "orders-db-ca")]:
        assert mounts[path]["readOnly"] is True
        assert volumes[mounts[path]["name"]]["secret"]["secretName"] == secret


def test_config_hash_rolls_the_pod_template() -> None:
    conn = parse_connection(connection())
    a = build.build_deployment(conn, "sha256:a", IMAGE)
    b = build.build_deployment(conn, "sha256:b", IMAGE)
    assert a["spec"]["template"]["metadata"]["annotations"] == {build.CONFIG_HASH_ANNOTATION: "sha256:a"}
    assert a["spec"]["template"] != b["spec"]["template"]
    assert a == build.build_deployment(conn, "sha256:a", IMAGE)


def test_custom_resources_are_used() -> None:
    body = connection(resources={"limits": {"memory": "1Gi"}})
    dep = build.build_deployment(parse_connection(body), "h", IMAGE, resources=build.resources_of(body))
    assert dep["spec"]["template"]["spec"]["containers"][0]["resources"] == {"limits": {"memory": "1Gi"}}


def test_service_selects_the_gateway_pods() -> None:
    conn = parse_connection(connection(listen={"port": 6432}))
    svc = build.build_service(conn)
    dep = build.build_deployment(conn, "h", IMAGE)
    assert svc["metadata"]["name"] == "orders-db-sidegate"
    assert svc["spec"]["ports"][0]["port"] == 6432
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels[k] == v for k, v in svc["spec"]["selector"].items())
    assert dep["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    assert build.endpoint(conn) == "orders-db-sidegate.payments.svc:6432"


def test_network_policy_admits_only_the_gateway() -> None:
    conn = parse_connection(connection(networkPolicy=True))
    np = build.build_network_policy(conn)
    assert np["spec"]["podSelector"] == {"matchLabels": {"sidegate.dev/protected-by": "orders-db"}}
    gateway = {"podSelector": {"matchLabels": build.selector_labels(conn)}}
    assert np["spec"]["ingress"] == [{"from": [gateway]}]
    assert build.wants_network_policy(connection(networkPolicy=True))
    assert not build.wants_network_policy(connection())


def test_names_too_long_for_a_service_are_refused() -> None:
    conn = parse_connection(connection(name="x" * 60))
    with pytest.raises(ConfigError, match="too long"):
        build.build_service(conn)


def test_owner_reference_needs_a_uid() -> None:
    body = connection()
    del body["metadata"]["uid"]
    with pytest.raises(ConfigError, match="uid"):
        build.build_service(parse_connection(body))


# --------------------------------------------------------------------------- sidecar


def pod(**annotations: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "app", "namespace": "payments", "annotations": dict(annotations)},
            "spec": {"containers": [{"name": "app", "image": "app:1"}],
                     "initContainers": [{"name": "migrate", "image": "app:1"}],
                     "volumes": [{"name": "data", "emptyDir": {}}]}}


def test_sidecar_is_native_and_hardened() -> None:
    conns = [parse_connection(connection(mode="sidecar")),
             parse_connection(connection("billing", mode="sidecar", listen={"port": 15433}))]
    sidecar = build.build_sidecar(conns, IMAGE)
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    assert sidecar["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert sidecar["args"].count("--config") == 2
    assert "/etc/sidegate/billing/config.json" in sidecar["args"]
    assert "--workload-token" not in sidecar["args"]
    with pytest.raises(ConfigError):
        build.build_sidecar([], IMAGE)


def test_sidecar_with_workload_identity_mounts_a_projected_token() -> None:
    conn = parse_connection(connection(mode="sidecar", identity={"workload": True, "issuers": [
        {"name": "cluster", "issuer": "https://kubernetes.default.svc", "audiences": ["sidegate-db"]}]}))
    sidecar = build.build_sidecar([conn], IMAGE)
    volumes = {v["name"]: v for v in build.build_sidecar_volumes([conn])}
    token = volumes["sidegate-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "sidegate-db"
    assert sidecar["args"][sidecar["args"].index("--workload-token") + 1] == "/var/run/sidegate/token/token"
    mounts = {m["name"] for m in sidecar["volumeMounts"]}
    assert mounts <= set(volumes)
    injected = pod(**{"sidegate.dev/inject": "orders-db"})
    build.inject_sidecar(injected, [conn], IMAGE)
    assert injected["spec"]["serviceAccountName"] == "default"


def test_injection_is_idempotent() -> None:
    conns = [parse_connection(connection(mode="sidecar"))]
    once = pod(**{"sidegate.dev/inject": "orders-db"})
    build.inject_sidecar(once, conns, IMAGE)
    names = [c["name"] for c in once["spec"]["initContainers"]]
    assert names == ["sidegate-proxy", "migrate"]
    assert once["spec"]["containers"] == [{"name": "app", "image": "app:1"}]
    assert once["metadata"]["annotations"][build.INJECTED_ANNOTATION] == "orders-db"
    twice = copy.deepcopy(once)
    build.inject_sidecar(twice, conns, IMAGE)
    assert twice == once
    assert next(v["name"] for v in once["spec"]["volumes"]) == "data"


# --------------------------------------------------------------------------- webhook (pure parts)


def test_inject_annotation_parsing() -> None:
    assert requested(None) == []
    assert requested({"other": "x"}) == []
    assert requested({"sidegate.dev/inject": " orders-db , billing,orders-db"}) == ["orders-db", "billing"]
    with pytest.raises(InjectionError, match="comma-separated"):
        requested({"sidegate.dev/inject": "orders-db,,x"})


def test_resolve_refuses_what_cannot_be_injected() -> None:
    found = {"orders-db": connection(mode="sidecar"), "gw": connection("gw", mode="gateway"),
             "twin": connection("twin", mode="sidecar")}
    assert [c.name for c in resolve(["orders-db"], "payments", found)] == ["orders-db"]
    with pytest.raises(InjectionError, match="Connection payments/nope does not exist"):
        resolve(["orders-db", "nope"], "payments", found)
    with pytest.raises(InjectionError, match="gateway mode"):
        resolve(["gw"], "payments", found)
    with pytest.raises(InjectionError, match=r"both listen on 127\.0\.0\.1:15432"):
        resolve(["orders-db", "twin"], "payments", found)


def test_webhook_configuration_spares_system_namespaces() -> None:
    cfg = build_webhook_configuration({"url": "https://127.0.0.1:1/sidegate-inject", "caBundle": "Zm9v"},
                                      operator_namespace="sidegate-system")
    (hook,) = cfg["webhooks"]
    assert hook["failurePolicy"] == "Fail" and hook["timeoutSeconds"] == 5
    assert hook["reinvocationPolicy"] == "IfNeeded" and hook["sideEffects"] == "None"
    skip = hook["namespaceSelector"]["matchExpressions"][0]
    assert skip["operator"] == "NotIn" and set(skip["values"]) == {"kube-system", "sidegate-system"}


# --------------------------------------------------------------------------- status


def test_conditions_keep_transition_time_while_status_holds() -> None:
    ok = Outcome(True, "Reconciled", "applied")
    first = conditions_for(ok, [], 1, "2024-01-01T00:00:00Z")
    again = conditions_for(ok, first, 2, "2024-01-02T00:00:00Z")
    assert [c["lastTransitionTime"] for c in again] == ["2024-01-01T00:00:00Z"] * 2
    assert again[0]["observedGeneration"] == 2
    bad = conditions_for(Outcome(False, "SecretMissing", "gone"), again, 2, "2024-01-03T00:00:00Z")
    by_type = {c["type"]: c for c in bad}
    assert by_type[READY]["status"] == "False" and by_type[DEGRADED]["status"] == "True"
    assert by_type[READY]["lastTransitionTime"] == "2024-01-03T00:00:00Z"
    assert by_type[DEGRADED]["reason"] == "SecretMissing"


def test_status_for_keeps_the_last_good_hash_on_invalid_policy() -> None:
    body = connection()
    body["status"] = {"configHash": "sha256:old"}
    status = status_for(Outcome(False, "InvalidPolicy", "bad"), body, "2024-01-01T00:00:00Z")
    assert "configHash" not in status and status["observedGeneration"] == 1


def test_missing_secrets_names_what_to_create() -> None:
    required = {"orders-db-admin": ("username", "password"), "ca": ("ca.crt",)}
    found: dict[str, Any] = {
        "orders-db-admin": {"data": {"username": base64.b64encode(b"u").decode()}},
        "ca": None,
    }
    assert missing_secrets(required, found, "payments") == [
        "Secret payments/orders-db-admin has no key password",
        "Secret payments/ca not found",
    ]
    found["orders-db-admin"]["stringData"] = {"password": "p"}
    found["ca"] = {"data": {"ca.crt": "Zm9v"}}
    assert missing_secrets(required, found, "payments") == []


def test_secret_index_marks_waiting_connections() -> None:
    import kopf

    body = connection()
    assert waiting_for_secret(body)  # not reconciled yet
    index = connections_by_secret(namespace="payments", name="orders-db", body=kopf.Body(body))  # type: ignore[arg-type]
    assert list(index) == [("payments", "orders-db-admin")]
    body["status"] = {"conditions": [{"type": "Ready", "status": "True", "reason": "Reconciled"}]}
    assert not waiting_for_secret(body)
    body["status"] = {"conditions": [{"type": "Ready", "status": "False", "reason": "InvalidPolicy"}]}
    assert not waiting_for_secret(body)


# --------------------------------------------------------------------------- masking fingerprints


def test_policy_fingerprint_follows_only_applicable_policies() -> None:
    conn = connection()
    base = policy_fingerprint(conn, [masking()])
    assert policy_fingerprint(conn, [masking(), masking("x", connections=["billing"])]) == base
    assert policy_fingerprint(conn, [masking(exempt={"groups": ["auditors"]})]) != base
    assert policy_fingerprint(conn, []) != base
    assert applies_to(masking(), [conn, connection("billing")]) == ["orders-db"]


def test_gateway_account_is_bound_to_the_proxy_role_in_its_namespace() -> None:
    conn = parse_connection(connection())
    sa, rb = build.build_service_account(conn), build.build_role_binding(conn)
    assert sa["metadata"]["name"] == rb["metadata"]["name"] == "orders-db-sidegate"
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "sidegate-proxy"}
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": "orders-db-sidegate", "namespace": conn.namespace}]
    for obj in (sa, rb):
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner["kind"] == "Connection"


# --------------------------------------------------------------------------- token exchange


def pem_key(kind: str = "ec") -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    key = (ec.generate_private_key(ec.SECP256R1()) if kind == "ec"
           else rsa.generate_private_key(public_exponent=65537, key_size=1024))
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


EXCHANGE = {"signingKeySecretRef": {"name": "orders-db-exchange"}}


def test_gateway_gets_the_signing_key_mounted_and_flags() -> None:
    body = connection(tokenExchange=EXCHANGE)
    conn = parse_connection(body)
    dep = build.build_deployment(conn, "sha256:abc", IMAGE)
    pod_spec = dep["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    args = container["args"]
    key_file = args[args.index("--token-signing-key") + 1]
    assert key_file == "/var/run/sidegate/secrets/orders-db-exchange/tls.key"  # key default tls.key
    assert args[args.index("--token-issuer") + 1] == "http://orders-db-sidegate.payments.svc:9090"
    mount = next(m for m in container["volumeMounts"] if key_file.startswith(m["mountPath"] + "/"))
    assert mount["readOnly"] is True
    volume = next(v for v in pod_spec["volumes"] if v["name"] == mount["name"])
    assert volume["secret"] == {"secretName": "orders-db-exchange", "defaultMode": 0o440}
    assert "env" not in container and "envFrom" not in container  # never in the environment
    # the rendered config names the Secret, never holds the key
    doc = secret_doc(build.build_config_secret(body, []))
    assert doc["connection"]["spec"]["tokenExchange"] == EXCHANGE
    assert "PRIVATE KEY" not in json.dumps(doc)
    # the exchange endpoint (admin port) is published on the Service, the issuer URL's port
    ports = {p["name"]: p for p in build.build_service(conn)["spec"]["ports"]}
    assert ports["token-exchange"] == {"name": "token-exchange", "port": 9090, "targetPort": "admin",
                                       "protocol": "TCP", "appProtocol": "http"}
    assert build.required_secret_keys(conn)["orders-db-exchange"] == ("tls.key",)


def test_gateway_without_token_exchange_has_no_key_nor_port() -> None:
    conn = parse_connection(connection())
    args = build.build_deployment(conn, "h", IMAGE)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--token-signing-key" not in args and "--token-issuer" not in args
    assert [p["name"] for p in build.build_service(conn)["spec"]["ports"]] == ["proxy"]


def test_token_exchange_key_name_and_issuer_can_be_set() -> None:
    conn = parse_connection(connection(tokenExchange={
        "signingKeySecretRef": {"name": "exchange", "key": "signing.pem"},
        "issuer": "https://sidegate.example.com"}))
    assert build.token_exchange_args([conn]) == [
        "--token-signing-key", "/var/run/sidegate/secrets/exchange/signing.pem",
        "--token-issuer", "https://sidegate.example.com"]


def test_sidecar_gets_the_signing_key_mounted_and_flags() -> None:
    conn = parse_connection(connection(mode="sidecar", tokenExchange=EXCHANGE))
    sidecar = build.build_sidecar([conn], IMAGE)
    args = sidecar["args"]
    assert args[args.index("--token-signing-key") + 1] == "/var/run/sidegate/secrets/orders-db-exchange/tls.key"
    assert args[args.index("--token-issuer") + 1] == "http://127.0.0.1:15090"
    volumes = {v["name"]: v for v in build.build_sidecar_volumes([conn])}
    mount = next(m for m in sidecar["volumeMounts"]
                 if m["mountPath"] == "/var/run/sidegate/secrets/orders-db-exchange")
    assert mount["readOnly"] is True
    assert volumes[mount["name"]]["secret"]["secretName"] == "orders-db-exchange"
    assert "env" not in sidecar


def test_one_sidecar_holds_one_signing_key() -> None:
    found = {
        "orders-db": connection(mode="sidecar", tokenExchange=EXCHANGE),
        "billing": connection("billing", mode="sidecar", listen={"port": 15433},
                              tokenExchange={"signingKeySecretRef": {"name": "billing-exchange"}}),
        "ledger": connection("ledger", mode="sidecar", listen={"port": 15434}, tokenExchange=EXCHANGE),
        "plain": connection("plain", mode="sidecar", listen={"port": 15435}),
    }
    with pytest.raises(InjectionError, match="different signing keys"):
        resolve(["orders-db", "billing"], "payments", found)
    conns = resolve(["orders-db", "ledger", "plain"], "payments", found)
    assert build.build_sidecar(conns, IMAGE)["args"].count("--token-signing-key") == 1


def test_token_exchange_issuer_cannot_clash_with_the_connection_issuers() -> None:
    reserved = connection(tokenExchange=EXCHANGE, identity={"issuers": [
        {"name": "sidegate-exchange", "issuer": "https://ci.example.com", "audiences": ["sidegate"]}]})
    with pytest.raises(ConfigError, match="reserved"):
        build.build_config_secret(reserved, [])
    default_url = connection(tokenExchange=EXCHANGE, identity={"issuers": [
        {"name": "self", "issuer": "http://orders-db-sidegate.payments.svc:9090"}]})
    with pytest.raises(ConfigError, match="token-exchange issuer"):
        build.build_config_secret(default_url, [])
    explicit = connection(tokenExchange={**EXCHANGE, "issuer": "https://ci.example.com"}, identity={"issuers": [
        {"name": "ci", "issuer": "https://ci.example.com"}]})
    with pytest.raises(ConfigError, match=r"spec\.tokenExchange\.issuer"):
        build.build_config_secret(explicit, [])
    with pytest.raises(ConfigError, match="signingKeySecretRef"):
        parse_connection(connection(tokenExchange={}))


def test_missing_or_bad_signing_key_names_the_field() -> None:
    from sidegate_operator.connection import signing_key_problem

    conn = parse_connection(connection(tokenExchange=EXCHANGE))
    required = build.required_secret_keys(conn)
    fields = build.secret_fields(conn)
    found: dict[str, Any] = {"orders-db-admin": {"stringData": {"username": "u", "password": "p"}},
                             "orders-db-exchange": None}
    assert missing_secrets(required, found, "payments", fields) == [
        "Secret payments/orders-db-exchange not found (spec.tokenExchange.signingKeySecretRef)"]
    assert signing_key_problem(conn, found) is None  # reported as missing, not as bad
    found["orders-db-exchange"] = {"stringData": {"tls.key": pem_key("rsa")}}  # 1024 bit: refused
    assert missing_secrets(required, found, "payments", fields) == []
    problem = signing_key_problem(conn, found)
    assert problem is not None and "orders-db-exchange key tls.key" in problem and "2048" in problem
    found["orders-db-exchange"] = {"data": {"tls.key": base64.b64encode(pem_key().encode()).decode()}}
    assert signing_key_problem(conn, found) is None


ROTATING = {**EXCHANGE, "verificationKeys": ["next.key"]}


def test_verification_keys_are_passed_as_files_of_the_mounted_secret() -> None:
    """The whole Secret is mounted, so a key added to it later is found without a rollout."""
    gateway = parse_connection(connection(tokenExchange=ROTATING))
    container = build.build_deployment(gateway, "h", IMAGE)["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--token-verification-key") + 1] == "/var/run/sidegate/secrets/orders-db-exchange/next.key"
    assert args.count("--token-verification-key") == 1
    assert any(m["mountPath"] == "/var/run/sidegate/secrets/orders-db-exchange" and m["readOnly"]
               for m in container["volumeMounts"])
    assert build.required_secret_keys(gateway)["orders-db-exchange"] == ("tls.key",)  # optional: may be absent
    sidecar = parse_connection(connection(mode="sidecar", tokenExchange={
        "signingKeySecretRef": {"name": "exchange", "key": "signing.pem"},
        "verificationKeys": ["next.pem", "previous.pem"]}))
    assert build.build_sidecar([sidecar], IMAGE)["args"][-8:] == [
        "--token-signing-key", "/var/run/sidegate/secrets/exchange/signing.pem",
        "--token-issuer", "http://127.0.0.1:15090",
        "--token-verification-key", "/var/run/sidegate/secrets/exchange/next.pem",
        "--token-verification-key", "/var/run/sidegate/secrets/exchange/previous.pem"]
    # without the field, nothing changes for existing Connections
    assert "--token-verification-key" not in build.token_exchange_args([parse_connection(connection(
        tokenExchange=EXCHANGE))])


@pytest.mark.parametrize("keys,words", [
    (["tls.key"], "is the signing key"),
    (["next.key", "next.key"], "listed twice"),
    (["../etc/passwd"], "a key of the signing key's Secret"),
    ([f"k{i}" for i in range(5)], "at most 4"),
    ("next.key", "expected a list"),
])
def test_verification_keys_are_checked(keys: Any, words: str) -> None:
    with pytest.raises(ConfigError, match=r"spec\.tokenExchange\.verificationKeys") as err:
        parse_connection(connection(tokenExchange={**EXCHANGE, "verificationKeys": keys}))
    assert words in str(err.value)


def test_one_sidecar_holds_one_set_of_verification_keys() -> None:
    found = {
        "orders-db": connection(mode="sidecar", tokenExchange=ROTATING),
        "ledger": connection("ledger", mode="sidecar", listen={"port": 15434}, tokenExchange=EXCHANGE),
    }
    with pytest.raises(InjectionError, match="different signing keys, verification keys or issuers"):
        resolve(["orders-db", "ledger"], "payments", found)


def test_bad_verification_key_is_reported_an_absent_one_is_not() -> None:
    from sidegate_operator.connection import signing_key_problem

    conn = parse_connection(connection(tokenExchange=ROTATING))
    found: dict[str, Any] = {"orders-db-exchange": {"stringData": {"tls.key": pem_key()}}}
    assert signing_key_problem(conn, found) is None  # next.key absent: nothing to publish yet
    found["orders-db-exchange"]["stringData"]["next.key"] = "not a key"
    problem = signing_key_problem(conn, found)
    assert problem is not None and problem.startswith(
        "Secret payments/orders-db-exchange key next.key (spec.tokenExchange.verificationKeys[0]): not an "
        "unencrypted PEM private key")
    assert "tls.key" not in problem  # the signing key is fine
    found["orders-db-exchange"]["stringData"]["next.key"] = pem_key()
    assert signing_key_problem(conn, found) is None


def test_signing_key_secret_is_watched_for_the_connection() -> None:
    import kopf

    body = connection(tokenExchange=EXCHANGE)
    index = connections_by_secret(namespace="payments", name="orders-db", body=kopf.Body(body))  # type: ignore[arg-type]
    assert set(index) == {("payments", "orders-db-admin"), ("payments", "orders-db-exchange")}
