"""The CRDs: valid apiextensions/v1 objects, structural schemas, and in step with the policy model."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import re2
import yaml
from hypothesis import given
from hypothesis import strategies as st

from sidegate_operator.validate import openapi_to_jsonschema
from sidegate_proxy import config

REPO = Path(__file__).resolve().parent.parent
CRD_DIR = REPO / "crds"
K8S_VERSION = "1.33.0"

KINDS = {
    "Connection": ("connection.yaml", "connections", "sgconn"),
    "MaskingPolicy": ("maskingpolicy.yaml", "maskingpolicies", "sgmask"),
    "AccessRequest": ("accessrequest.yaml", "accessrequests", "sgar"),
}


def load(kind: str) -> dict[str, Any]:
    return yaml.safe_load((CRD_DIR / KINDS[kind][0]).read_text())


def schema_of(kind: str) -> dict[str, Any]:
    return load(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node below (and including) ``node``, with its field path."""
    yield path, node
    for name, child in (node.get("properties") or {}).items():
        yield from walk(child, f"{path}.{name}" if path else name)
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def sub(schema: dict[str, Any], path: str) -> dict[str, Any]:
    node = schema
    for part in path.split("."):
        node = node["items"] if part == "[]" else node["properties"][part]
    return node


@pytest.mark.parametrize("kind", KINDS)
def test_is_a_valid_crd(kind: str) -> None:
    crd = load(kind)
    kubernetes_validate.validate(crd, K8S_VERSION, strict=True)


def test_strict_validation_catches_typos() -> None:
    crd = load("Connection")
    crd["spec"]["versions"][0]["subresource"] = {"status": {}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(crd, K8S_VERSION, strict=True)


@pytest.mark.parametrize("kind", KINDS)
def test_names_and_versions(kind: str) -> None:
    crd = load(kind)
    _, plural, short = KINDS[kind]
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{plural}.sidegate.dev"
    assert spec["group"] == config.GROUP
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == kind
    assert spec["names"]["plural"] == plural
    assert spec["names"]["shortNames"] == [short]
    assert spec["names"]["categories"] == ["sidegate"]
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == (config.VERSION, True, True)
    assert version["subresources"] == {"status": {}}
    assert version["additionalPrinterColumns"][-1] == {
        "name": "Age",
        "type": "date",
        "jsonPath": ".metadata.creationTimestamp",
    }


def test_operator_package_ships_the_same_files() -> None:
    from importlib.resources import files

    shipped = files("sidegate_operator").joinpath("crds")
    for filename, _, _ in KINDS.values():
        assert shipped.joinpath(filename).read_text() == (CRD_DIR / filename).read_text()


def test_printer_columns() -> None:
    def columns(kind: str) -> dict[str, str]:
        return {
            c["name"]: c["jsonPath"] for c in load(kind)["spec"]["versions"][0]["additionalPrinterColumns"]
        }

    assert list(columns("Connection")) == ["Type", "Mode", "Ready", "Endpoint", "Age"]
    assert columns("Connection")["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
    assert list(columns("MaskingPolicy")) == ["Connections", "Age"]
    assert list(columns("AccessRequest")) == ["Connection", "Requester", "Scope", "Phase", "Reviewer", "Age"]


# --------------------------------------------------------------------------- structural schema rules


@pytest.mark.parametrize("kind", KINDS)
def test_schema_is_structural(kind: str) -> None:
    schema = schema_of(kind)
    assert schema["type"] == "object"
    assert schema["properties"]["metadata"] == {"type": "object"}, "metadata may not be constrained"
    for path, node in walk(schema):
        typed = (
            "type" in node
            or node.get("x-kubernetes-int-or-string")
            or node.get("x-kubernetes-preserve-unknown-fields")
        )
        assert typed, f"{kind} {path}: no type"
        assert node.get("additionalProperties") is not False, f"{kind} {path}: additionalProperties false"
        assert not ({"properties", "additionalProperties"} <= set(node)), f"{kind} {path}: both kinds of map"
        for forbidden in ("$ref", "oneOf", "uniqueItems", "definitions", "dependencies"):
            assert forbidden not in node, f"{kind} {path}: {forbidden} is not allowed"
        if node.get("type") == "array":
            assert "items" in node, f"{kind} {path}: array without items"


@pytest.mark.parametrize("kind", KINDS)
def test_defaults_and_enums_are_valid_for_their_node(kind: str) -> None:
    for _, node in walk(schema_of(kind)):
        if "default" in node:
            jsonschema.validate(node["default"], openapi_to_jsonschema(node))
        for value in node.get("enum") or ():
            jsonschema.validate(value, openapi_to_jsonschema({k: v for k, v in node.items() if k != "enum"}))
        if "pattern" in node:
            re.compile(node["pattern"])
            re2.compile(node["pattern"])  # the API server evaluates patterns with Go's RE2 syntax


@pytest.mark.parametrize("kind", KINDS)
def test_list_map_keys_are_required(kind: str) -> None:
    for path, node in walk(schema_of(kind)):
        if node.get("x-kubernetes-list-type") == "map":
            keys = node["x-kubernetes-list-map-keys"]
            assert set(keys) <= set(node["items"].get("required", ())), (
                f"{kind} {path}: map keys must be required"
            )


@pytest.mark.parametrize("kind", KINDS)
def test_status_keeps_unknown_fields(kind: str) -> None:
    status = schema_of(kind)["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True
    assert "required" not in status


@pytest.mark.parametrize("kind", KINDS)
def test_cel_rules_have_messages_and_bounded_lists(kind: str) -> None:
    schema = schema_of(kind)
    for path, node in walk(schema):
        for rule in node.get("x-kubernetes-validations") or ():
            assert rule.get("message"), f"{kind} {path}: CEL rule without a message"
        if node.get("type") == "array" and not path.startswith("status"):
            assert "maxItems" in node, f"{kind} {path}: unbounded list makes CEL cost estimates fail"


def test_defaults_match_the_model() -> None:
    conn = schema_of("Connection")["properties"]["spec"]
    defaults = config.Connection.__dataclass_fields__
    assert sub(conn, "mode")["default"] == defaults["mode"].default
    assert sub(conn, "replicas")["default"] == defaults["replicas"].default
    assert sub(conn, "target.tls.mode")["default"] == config.TLSConfig().mode
    assert sub(conn, "identity.issuers.[].subjectClaim")["default"] == "sub"
    assert sub(conn, "approval.holdSeconds")["default"] == config.Approval().hold_seconds
    assert config.parse_duration(sub(conn, "approval.ttl")["default"]) == config.Approval().ttl_seconds
    assert sub(conn, "audit.kubernetesEvents")["default"] is config.AuditConfig().kubernetes_events
    assert sub(conn, "networkPolicy")["default"] is False
    mask = schema_of("MaskingPolicy")["properties"]["spec"]
    assert sub(mask, "rules.[].strategy")["default"] == "redact"
    ar = schema_of("AccessRequest")["properties"]["spec"]
    assert sub(ar, "scope")["default"] == "statement"


def test_enums_match_the_model() -> None:
    conn = schema_of("Connection")["properties"]["spec"]
    assert tuple(sub(conn, "type")["enum"]) == ("postgres", "http")
    assert tuple(sub(conn, "target.tls.mode")["enum"]) == config.TLS_MODES
    assert tuple(sub(conn, "guardrails.[].action")["enum"]) == config.ACTIONS
    algorithms = set(sub(conn, "identity.issuers.[].algorithms.[]")["enum"])
    assert set(config.Issuer.algorithms) <= algorithms
    assert not {a for a in algorithms if a.startswith("HS") or a.lower() == "none"}
    mask = schema_of("MaskingPolicy")["properties"]["spec"]
    assert tuple(sub(mask, "rules.[].detectors.[]")["enum"]) == config.DETECTORS
    assert tuple(sub(mask, "rules.[].strategy")["enum"]) == config.STRATEGIES
    ar = schema_of("AccessRequest")
    assert sub(ar, "status.phase")["enum"] == ["Pending", "Approved", "Denied", "Expired", "Used"]
    assert sub(ar, "spec.review.decision")["enum"] == ["Approved", "Denied"]


def test_api_contract_fields_exist() -> None:
    """Every field of the public API contract is in the schema (never renamed or dropped)."""
    conn = schema_of("Connection")["properties"]["spec"]
    for path in (
        "type",
        "target.host",
        "target.port",
        "target.database",
        "target.url",
        "target.tls.mode",
        "target.tls.caSecretRef.name",
        "target.tls.caSecretRef.key",
        "credentials.secretRef.name",
        "credentials.inject",
        "credentials.header",
        "mode",
        "replicas",
        "listen.port",
        "identity.workload",
        "identity.issuers.[].name",
        "identity.issuers.[].issuer",
        "identity.issuers.[].audiences",
        "identity.issuers.[].jwksUri",
        "identity.issuers.[].jwksSecretRef",
        "identity.issuers.[].subjectClaim",
        "identity.issuers.[].groupsClaim",
        "identity.issuers.[].algorithms",
        "identity.issuers.[].claimMappings.[].claim",
        "identity.issuers.[].claimMappings.[].prefix",
        "access.[].subjects",
        "access.[].groups",
        "guardrails.[].name",
        "guardrails.[].sql.statements",
        "guardrails.[].sql.withoutWhere",
        "guardrails.[].sql.tables",
        "guardrails.[].sql.functions",
        "guardrails.[].http.methods",
        "guardrails.[].http.paths",
        "guardrails.[].http.body.[].path",
        "guardrails.[].http.body.[].values",
        "guardrails.[].action",
        "guardrails.[].subjects",
        "guardrails.[].groups",
        "approval.approvers.groups",
        "approval.approvers.users",
        "approval.holdSeconds",
        "approval.ttl",
        "audit.kubernetesEvents",
        "audit.webhook.url",
        "audit.webhook.secretRef.name",
        "networkPolicy",
        "resources",
    ):
        sub(conn, path)
    conn_status = schema_of("Connection")["properties"]["status"]
    for path in ("conditions", "observedGeneration", "configHash", "endpoint"):
        sub(conn_status, path)
    mask = schema_of("MaskingPolicy")["properties"]["spec"]
    for path in (
        "connections",
        "selector.matchLabels",
        "rules.[].name",
        "rules.[].columns",
        "rules.[].fields",
        "rules.[].strategy",
        "rules.[].detectors",
        "rules.[].keepLast",
        "rules.[].pattern",
        "exempt.groups",
        "exempt.subjects",
    ):
        sub(mask, path)
    ar = schema_of("AccessRequest")
    for path in (
        "spec.connection",
        "spec.requester",
        "spec.requesterGroups",
        "spec.scope",
        "spec.statement",
        "spec.statementHash",
        "spec.sessionId",
        "spec.duration",
        "spec.reason",
        "spec.review.decision",
        "spec.review.reviewer",
        "spec.review.comment",
        "status.phase",
        "status.statementHash",
        "status.requestedAt",
        "status.decidedAt",
        "status.expiresAt",
        "status.usedAt",
        "status.reviewer",
        "status.conditions",
        "status.observedGeneration",
    ):
        sub(ar, path)


def test_cross_field_rules_are_declared() -> None:
    def messages(kind: str) -> list[str]:
        return [
            r["message"] for _, n in walk(schema_of(kind)) for r in n.get("x-kubernetes-validations") or ()
        ]

    conn = " | ".join(messages("Connection"))
    for words in (
        "type postgres needs",
        "type http needs spec.target.url",
        "inject header needs",
        "a guardrail needs sql or http",
    ):
        assert words in conn
    mask = " | ".join(messages("MaskingPolicy"))
    for words in ("a rule needs columns, fields, detectors or pattern", "strategy partial needs keepLast"):
        assert words in mask
    ar = " | ".join(messages("AccessRequest"))
    for words in ("scope statement needs", "scope session needs", "spec.review.decision is immutable"):
        assert words in ar
    transition = [
        r["rule"]
        for _, n in walk(schema_of("AccessRequest"))
        for r in n.get("x-kubernetes-validations") or ()
        if "decision is immutable" in r["message"]
    ]
    assert transition and "oldSelf" in transition[0]


# --------------------------------------------------------------------------- durations

DURATION_PATTERN = sub(schema_of("Connection"), "spec.approval.ttl")["pattern"]


@given(
    st.integers(0, 99), st.integers(0, 99), st.integers(0, 99), st.booleans(), st.booleans(), st.booleans()
)
def test_duration_pattern_accepts_what_the_parser_reads(
    h: int, m: int, s: int, uh: bool, um: bool, us: bool
) -> None:
    text = (f"{h}h" if uh else "") + (f"{m}m" if um else "") + (f"{s}s" if us else "")
    matches = re.match(DURATION_PATTERN, text) is not None
    assert matches == bool(text)
    if matches:
        assert config.parse_duration(text) == h * 3600 * uh + m * 60 * um + s * us


@pytest.mark.parametrize("text", ["", "1", "1d", "m", "1m1h", "1 h", "-1s"])
def test_duration_pattern_rejects(text: str) -> None:
    assert re.match(DURATION_PATTERN, text) is None
    with pytest.raises(config.ConfigError):
        config.parse_duration(text)
