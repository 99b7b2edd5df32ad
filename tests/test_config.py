"""The policy model: strict parsing with field paths, defaults, and the rendered config round trip."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from sidegate_proxy.config import (
    API_VERSION,
    CONFIG_KIND,
    ConfigError,
    SecretKeyRef,
    build_config,
    config_hash,
    load_config,
    parse_connection,
    parse_duration,
    parse_masking_policy,
    render_config,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example(relpath: str) -> dict[str, Any]:
    return copy.deepcopy(next(d for d in yaml.safe_load_all((EXAMPLES / relpath).read_text()) if d))


def minimal_postgres(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "postgres",
        "target": {"host": "db", "port": 5432, "database": "app"},
        "credentials": {"secretRef": {"name": "db-admin"}},
    }
    base.update(spec)
    return {
        "apiVersion": API_VERSION,
        "kind": "Connection",
        "metadata": {"name": "db", "namespace": "ns"},
        "spec": base,
    }


def minimal_http(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "http",
        "target": {"url": "https://api.internal"},
        "credentials": {"secretRef": {"name": "api-token"}},
    }
    base.update(spec)
    return {
        "apiVersion": API_VERSION,
        "kind": "Connection",
        "metadata": {"name": "api", "namespace": "ns"},
        "spec": base,
    }


def policy(*rules: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "MaskingPolicy",
        "metadata": {"name": "pii", "namespace": "ns"},
        "spec": {"connections": ["db"], "rules": list(rules), **spec},
    }


@contextmanager
def raises(path: str, words: str = "") -> Iterator[None]:
    """Expect a ConfigError at exactly ``path`` whose message contains ``words``."""
    with pytest.raises(ConfigError) as info:
        yield
    assert info.value.path == path, f"path {info.value.path!r} != {path!r} ({info.value.message})"
    assert words in info.value.message
    assert str(info.value).startswith(f"{path}: ")


# --------------------------------------------------------------------------- Connection


def test_postgres_defaults() -> None:
    conn = parse_connection(minimal_postgres())
    assert (conn.name, conn.namespace, conn.type, conn.ref) == ("db", "ns", "postgres", "ns/db")
    assert conn.mode == "sidecar" and conn.replicas == 2 and conn.listen_port == 15432
    assert conn.target.tls.mode == "disable" and conn.target.tls.ca_secret_ref is None
    assert conn.credentials.secret_ref == SecretKeyRef("db-admin") and conn.credentials.inject is None
    assert conn.identity.workload is False and conn.identity.issuers == ()
    assert conn.access == () and conn.guardrails == ()
    assert conn.approval.hold_seconds == 60 and conn.approval.ttl_seconds == 3600
    assert conn.audit.kubernetes_events is True and conn.audit.webhook is None


def test_http_defaults() -> None:
    conn = parse_connection(minimal_http())
    assert conn.listen_port == 18080
    assert conn.credentials.inject == "bearer"
    assert conn.target.url == "https://api.internal"


def test_namespace_defaults_to_default() -> None:
    obj = minimal_postgres()
    del obj["metadata"]["namespace"]
    assert parse_connection(obj).namespace == "default"


def test_full_example_parses() -> None:
    conn = parse_connection(example("postgres/connection.yaml"))
    assert conn.identity.workload is True
    assert [g.name for g in conn.guardrails] == ["no-drop", "bulk-writes", "reporter-read-only"]
    assert conn.guardrails[1].sql is not None and conn.guardrails[1].sql.without_where is True
    assert conn.guardrails[2].who.subjects == ("system:serviceaccount:payments:reporter",)
    assert conn.access[1].groups == ("dba-oncall",)
    assert conn.approval.approver_groups == ("dba-oncall",)
    http = parse_connection(example("http/connection.yaml"))
    assert http.target.tls.ca_secret_ref == SecretKeyRef("billing-api-ca", "ca.crt")
    assert http.listen_tls is not None and http.listen_tls.secret_ref.name == "billing-api-gateway-tls"
    assert http.audit.webhook is not None and http.audit.webhook.secret_ref == SecretKeyRef(
        "siem-token", "token"
    )
    refunds = http.guardrails[2].http
    assert (
        refunds is not None
        and refunds.body[0].path == "$.amount_class"
        and refunds.body[0].values == ("large",)
    )
    gha = parse_connection(example("github-actions/connection.yaml"))
    assert gha.listen_tls is not None and gha.listen_tls.required  # tokens from the internet: TLS only
    [issuer] = gha.identity.issuers
    assert issuer.algorithms == ("RS256",)
    assert [(m.claim, m.prefix) for m in issuer.claim_mappings] == [
        ("repository", "github:"),
        ("repository_owner", "github-org:"),
    ]


def test_issuer_defaults_and_secret_ref_default_keys() -> None:
    conn = parse_connection(
        minimal_postgres(
            identity={"issuers": [{"name": "k", "issuer": "https://k", "jwksSecretRef": {"name": "jwks"}}]},
            target={
                "host": "db",
                "port": 5432,
                "database": "app",
                "tls": {"mode": "verify-full", "caSecretRef": {"name": "ca"}},
            },
            audit={"webhook": {"url": "https://siem", "secretRef": {"name": "siem"}}},
        )
    )
    [issuer] = conn.identity.issuers
    assert issuer.subject_claim == "sub" and issuer.groups_claim is None
    assert "RS256" in issuer.algorithms and not any(a.startswith("HS") for a in issuer.algorithms)
    assert issuer.jwks_secret_ref == SecretKeyRef("jwks", "jwks.json")
    assert conn.target.tls.ca_secret_ref == SecretKeyRef("ca", "ca.crt")
    assert conn.audit.webhook is not None and conn.audit.webhook.secret_ref == SecretKeyRef("siem", "token")


@pytest.mark.parametrize(
    ("change", "path", "words"),
    [
        ({"type": "mysql"}, "spec.type", "postgres, http"),
        ({"target": {"host": "db", "port": 5432}}, "spec.target.database", "postgres"),
        ({"target": {"host": "db", "port": 0, "database": "x"}}, "spec.target.port", "between 1 and 65535"),
        ({"target": {"host": "db", "port": "5432", "database": "x"}}, "spec.target.port", "integer"),
        ({"credentials": {}}, "spec.credentials.secretRef", "required"),
        ({"credentials": {"secretRef": {"key": "k"}}}, "spec.credentials.secretRef.name", "required"),
        ({"mode": "daemonset"}, "spec.mode", "sidecar, gateway"),
        ({"replicas": -1}, "spec.replicas", "between"),
        ({"listen": {"port": 70000}}, "spec.listen.port", "between"),
        ({"identity": {"workload": "false"}}, "spec.identity.workload", "true or false"),
        (
            {"identity": {"issuers": [{"name": "x", "issuer": "https://x", "algorithms": ["none"]}]}},
            "spec.identity.issuers[0].algorithms",
            "none",
        ),
        (
            {
                "identity": {
                    "issuers": [{"name": "x", "issuer": "https://x", "algorithms": ["RS256", "HS256"]}]
                }
            },
            "spec.identity.issuers[0].algorithms",
            "HS256",
        ),
        ({"identity": {"issuers": [{"name": "x"}]}}, "spec.identity.issuers[0].issuer", "required"),
        (
            {
                "identity": {
                    "issuers": [{"name": "x", "issuer": "https://x", "claimMappings": [{"prefix": "p"}]}]
                }
            },
            "spec.identity.issuers[0].claimMappings[0].claim",
            "required",
        ),
        ({"access": [{"subjects": "everyone"}]}, "spec.access[0].subjects", "list of strings"),
        ({"access": ["everyone"]}, "spec.access[0]", "mapping"),
        ({"guardrails": [{"name": "g", "action": "block"}]}, "spec.guardrails[0]", "sql or http"),
        (
            {"guardrails": [{"name": "g", "action": "deny", "sql": {"statements": ["drop"]}}]},
            "spec.guardrails[0].action",
            "allow, block, requireApproval",
        ),
        (
            {"guardrails": [{"name": "g", "action": "block", "sql": {"withoutWhere": "yes"}}]},
            "spec.guardrails[0].sql.withoutWhere",
            "true or false",
        ),
        (
            {
                "guardrails": [
                    {"name": "g", "action": "block", "sql": {"statements": ["drop"]}},
                    {"name": "g", "action": "allow", "sql": {"statements": ["select"]}},
                ]
            },
            "spec.guardrails",
            "duplicate rule names: g",
        ),
        ({"approval": {"ttl": "1 day"}}, "spec.approval.ttl", "not a duration"),
        ({"approval": {"holdSeconds": -5}}, "spec.approval.holdSeconds", "between"),
        ({"audit": {"kubernetesEvents": "no"}}, "spec.audit.kubernetesEvents", "true or false"),
        ({"audit": {"webhook": {"secretRef": {"name": "s"}}}}, "spec.audit.webhook.url", "required"),
        ({"target": "db:5432"}, "spec.target", "mapping"),
    ],
)
def test_postgres_connection_errors(change: dict[str, Any], path: str, words: str) -> None:
    with raises(path, words):
        parse_connection(minimal_postgres(**change))


@pytest.mark.parametrize(
    ("change", "path", "words"),
    [
        ({"target": {"host": "api"}}, "spec.target.url", "http"),
        (
            {"credentials": {"secretRef": {"name": "t"}, "inject": "cookie"}},
            "spec.credentials.inject",
            "bearer",
        ),
        (
            {"credentials": {"secretRef": {"name": "t"}, "inject": "header"}},
            "spec.credentials.header",
            "header",
        ),
        (
            {
                "guardrails": [
                    {"name": "g", "action": "block", "http": {"methods": ["POST"], "body": [{"values": [1]}]}}
                ]
            },
            "spec.guardrails[0].http.body[0].path",
            "required",
        ),
        (
            {
                "guardrails": [
                    {"name": "g", "action": "block", "http": {"body": [{"path": "$.a", "values": "abc"}]}}
                ]
            },
            "spec.guardrails[0].http.body[0].values",
            "list",
        ),
    ],
)
def test_http_connection_errors(change: dict[str, Any], path: str, words: str) -> None:
    with raises(path, words):
        parse_connection(minimal_http(**change))


def test_header_injection_and_case_normalisation() -> None:
    conn = parse_connection(
        minimal_http(
            credentials={"secretRef": {"name": "t"}, "inject": "header", "header": "X-Api-Key"},
            guardrails=[
                {"name": "g", "action": "block", "http": {"methods": ["post"], "paths": ["/v1/*"]}},
                {"name": "s", "action": "block", "sql": {"statements": ["DROP"], "functions": ["PG_Sleep"]}},
            ],
        )
    )
    assert conn.credentials.inject == "header" and conn.credentials.header == "X-Api-Key"
    assert conn.guardrails[0].http is not None and conn.guardrails[0].http.methods == ("POST",)
    assert conn.guardrails[1].sql is not None
    assert conn.guardrails[1].sql.statements == ("drop",) and conn.guardrails[1].sql.functions == (
        "pg_sleep",
    )


def test_connection_is_immutable_and_hashable() -> None:
    conn = parse_connection(example("postgres/connection.yaml"))
    assert conn == parse_connection(example("postgres/connection.yaml"))
    assert hash(conn) == hash(parse_connection(example("postgres/connection.yaml")))
    with pytest.raises(AttributeError):
        conn.name = "other"  # type: ignore[misc]


# --------------------------------------------------------------------------- MaskingPolicy


def test_masking_example_parses() -> None:
    mp = parse_masking_policy(example("postgres/maskingpolicy.yaml"))
    assert (mp.name, mp.namespace, mp.connections) == ("pii", "payments", ("orders-db",))
    emails, cards, ids = mp.rules
    assert emails.columns == ("customers.email", "*.email") and emails.strategy == "redact"
    assert cards.detectors == ("credit-card",) and cards.strategy == "partial" and cards.keep_last == 4
    assert ids.pattern == "ACME-[0-9]{8}" and ids.strategy == "hash"
    assert mp.exempt.groups == ("auditors",)


def test_masking_defaults() -> None:
    mp = parse_masking_policy(
        policy(
            {"name": "r", "columns": ["T.Email"]},
            {"name": "p", "detectors": ["EMAIL"], "strategy": "partial"},
        )
    )
    assert mp.rules[0].strategy == "redact" and mp.rules[0].columns == ("t.email",)
    assert mp.rules[1].keep_last == 4 and mp.rules[1].detectors == ("email",)
    assert mp.selector is None


@pytest.mark.parametrize(
    ("rules", "path", "words"),
    [
        ([], "spec.rules", "at least one"),
        ([{"name": "r"}], "spec.rules[0]", "columns, fields, detectors or pattern"),
        ([{"name": "r", "detectors": ["visa"]}], "spec.rules[0].detectors[0]", "unknown detector 'visa'"),
        ([{"name": "r", "pattern": "ACME-[0-9"}], "spec.rules[0].pattern", "invalid regular expression"),
        ([{"name": "r", "columns": ["a"], "strategy": "scramble"}], "spec.rules[0].strategy", "redact"),
        ([{"name": "r", "columns": ["a"], "keepLast": 500}], "spec.rules[0].keepLast", "between"),
        ([{"columns": ["a"]}], "spec.rules[0].name", "required"),
        (
            [{"name": "r", "columns": ["a"]}, {"name": "r", "fields": ["$.a"]}],
            "spec.rules",
            "duplicate rule names: r",
        ),
        (["emails"], "spec.rules[0]", "mapping"),
    ],
)
def test_masking_errors(rules: list[Any], path: str, words: str) -> None:
    with raises(path, words):
        parse_masking_policy(policy(*rules))


def test_masking_selector() -> None:
    mp = parse_masking_policy(
        policy({"name": "r", "columns": ["a"]}, connections=[], selector={"matchLabels": {"tier": "pii"}})
    )
    assert mp.selector == {"tier": "pii"}
    assert mp.applies_to("anything", {"tier": "pii", "x": "y"})
    assert not mp.applies_to("anything", {"tier": "public"})
    named = parse_masking_policy(policy({"name": "r", "columns": ["a"]}))
    assert named.applies_to("db", {}) and not named.applies_to("other", {"tier": "pii"})
    with raises("spec.selector.matchLabels", "mapping"):
        parse_masking_policy(policy({"name": "r", "columns": ["a"]}, selector={"matchLabels": ["tier"]}))


# --------------------------------------------------------------------------- durations


@given(st.integers(0, 1000), st.integers(0, 59), st.integers(0, 59))
def test_parse_duration_roundtrip(h: int, m: int, s: int) -> None:
    text = "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (s, "s")) if v) or "0s"
    assert parse_duration(text) == h * 3600 + m * 60 + s


@pytest.mark.parametrize(
    ("value", "seconds"), [("1h", 3600), ("30m", 1800), ("1h30m", 5400), (" 45s ", 45), (90, 90)]
)
def test_parse_duration_values(value: str | int, seconds: int) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "1d", "h", "1m1h", -1, True, "ten minutes"])
def test_parse_duration_rejects(value: Any) -> None:
    with raises("spec.x"):
        parse_duration(value, "spec.x")


# --------------------------------------------------------------------------- rendered config


def test_render_and_load_roundtrip() -> None:
    conn_obj = example("postgres/connection.yaml")
    conn_obj["metadata"].update(uid="u-1", generation=3, managedFields=[{"manager": "kubectl"}])
    conn_obj["status"] = {"conditions": []}
    mask_obj = example("postgres/maskingpolicy.yaml")
    doc = render_config(conn_obj, [mask_obj], secrets_dir="/etc/sidegate/secrets")
    assert doc["apiVersion"] == API_VERSION and doc["kind"] == CONFIG_KIND
    assert "status" not in doc["connection"] and "managedFields" not in doc["connection"]["metadata"]
    cfg = load_config(yaml.safe_load(yaml.safe_dump(doc)))
    assert cfg.connection == parse_connection(conn_obj)
    assert cfg.connection.uid == "u-1" and cfg.connection.generation == 3
    assert cfg.masking == (parse_masking_policy(mask_obj),)
    assert cfg.secrets_dir == "/etc/sidegate/secrets"
    assert cfg.hash == config_hash(doc) and cfg.hash.startswith("sha256:")


def test_hash_ignores_status_and_order() -> None:
    conn_obj = example("postgres/connection.yaml")
    a = example("postgres/maskingpolicy.yaml")
    b = copy.deepcopy(a)
    b["metadata"]["name"] = "aaa"
    first = config_hash(render_config(conn_obj, [a, b]))
    conn_obj["status"] = {"observedGeneration": 9}
    assert config_hash(render_config(conn_obj, [b, a])) == first
    conn_obj["spec"]["replicas"] = 3
    assert config_hash(render_config(conn_obj, [a, b])) != first


def test_load_config_errors() -> None:
    with raises("kind", "ProxyConfig"):
        load_config({"kind": "Connection"})
    doc = render_config(minimal_postgres(), [policy({"name": "r", "detectors": ["visa"]})])
    with raises("maskingPolicies[0].spec.rules[0].detectors[0]", "visa"):
        load_config(doc)


def test_build_config_selects_policies() -> None:
    conn_obj = minimal_postgres()
    conn_obj["metadata"]["labels"] = {"tier": "pii"}
    by_name = policy({"name": "r", "columns": ["a"]})
    by_label = policy(
        {"name": "r", "columns": ["b"]}, connections=[], selector={"matchLabels": {"tier": "pii"}}
    )
    by_label["metadata"]["name"] = "by-label"
    other_ns = copy.deepcopy(by_name)
    other_ns["metadata"]["namespace"] = "elsewhere"
    other_conn = policy({"name": "r", "columns": ["c"]}, connections=["not-db"])
    other_conn["metadata"]["name"] = "other-conn"
    cfg = build_config(conn_obj, [by_name, by_label, other_ns, other_conn])
    assert sorted(m.name for m in cfg.masking) == ["by-label", "pii"]
