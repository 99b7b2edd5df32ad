"""``sidegate validate``: examples pass, and each kind of mistake is named with its field path."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidegate_operator.validate import Problem, main, openapi_to_jsonschema, validate_paths

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def example(relpath: str, index: int = 0) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((EXAMPLES / relpath).read_text()) if d]
    return copy.deepcopy(docs[index])


CONNECTION = example("postgres/connection.yaml")
SECRET = example("postgres/secret.yaml")
MASKING = example("postgres/maskingpolicy.yaml")
HTTP_CONNECTION = example("http/connection.yaml")
ACCESS_REQUEST = example("accessrequest.yaml")
DEPLOYMENT = example("workload/deployment.yaml")


def write(tmp_path: Path, *docs: dict[str, Any], name: str = "manifests.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def check(tmp_path: Path, *docs: dict[str, Any], **kwargs: Any) -> list[Problem]:
    return validate_paths([str(write(tmp_path, *docs))], **kwargs)


def check_one(tmp_path: Path, doc: dict[str, Any]) -> list[Problem]:
    """``doc`` checked beside a valid Connection and its Secret, so only ``doc``'s problems show."""
    others = [SECRET] if doc["kind"] == "Connection" else [CONNECTION, SECRET]
    return check(tmp_path, doc, *others)


def errors(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]


def only_error(problems: list[Problem]) -> Problem:
    errs = errors(problems)
    assert len(errs) == 1, [str(p) for p in errs]
    return errs[0]


def mutate(obj: dict[str, Any], path: str, value: Any = None, *, delete: bool = False) -> dict[str, Any]:
    """A copy of ``obj`` with the dotted ``path`` (list indexes as numbers) set or deleted."""
    out = copy.deepcopy(obj)
    *parents, last = path.split(".")
    node: Any = out
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    key: Any = int(last) if isinstance(node, list) else last
    if delete:
        del node[key]
    else:
        node[key] = value
    return out


# --------------------------------------------------------------------------- examples


def test_examples_validate() -> None:
    problems = validate_paths([str(EXAMPLES)])
    assert problems == [], "\n".join(map(str, problems))


def test_examples_validate_with_required_secrets() -> None:
    problems = validate_paths([str(EXAMPLES)], require_secrets=True)
    assert problems == [], "\n".join(map(str, problems))


@pytest.mark.parametrize("folder", ["postgres", "http", "github-actions"])
def test_each_example_folder_is_self_contained(folder: str) -> None:
    assert validate_paths([str(EXAMPLES / folder)], require_secrets=True) == []


def test_clean_set_exits_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, CONNECTION, SECRET, MASKING, ACCESS_REQUEST, DEPLOYMENT)
    assert main([str(path)]) == 0
    assert capsys.readouterr().out == ""


# --------------------------------------------------------------------------- schema


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        (mutate(CONNECTION, "spec.type", delete=True), "spec.type"),
        (mutate(CONNECTION, "spec.credentials.secretRef", delete=True), "spec.credentials.secretRef"),
        (mutate(MASKING, "spec.rules", delete=True), "spec.rules"),
        (mutate(MASKING, "spec.rules.0.name", delete=True), "spec.rules[0].name"),
        (mutate(ACCESS_REQUEST, "spec.requester", delete=True), "spec.requester"),
        (mutate(ACCESS_REQUEST, "spec.connection", delete=True), "spec.connection"),
    ],
)
def test_missing_required_field(tmp_path: Path, doc: dict[str, Any], field: str) -> None:
    problems = [p for p in errors(check_one(tmp_path, doc)) if p.field == field]
    assert problems, f"no problem reported at {field}"
    assert "required" in problems[0].message


@pytest.mark.parametrize(
    ("doc", "field", "value"),
    [
        (CONNECTION, "spec.type", "mysql"),
        (CONNECTION, "spec.mode", "daemonset"),
        (CONNECTION, "spec.target.tls.mode", "prefer"),
        (CONNECTION, "spec.guardrails.0.action", "deny"),
        (MASKING, "spec.rules.0.strategy", "scramble"),
        (ACCESS_REQUEST, "spec.scope", "forever"),
        (ACCESS_REQUEST, "spec.review", {"decision": "Maybe", "reviewer": "alice"}),
    ],
)
def test_wrong_enum(tmp_path: Path, doc: dict[str, Any], field: str, value: Any) -> None:
    problem = only_error(check_one(tmp_path, mutate(doc, field, value)))
    assert "must be one of" in problem.message
    assert problem.field.startswith(field.replace(".0.", "[0].").split(".review")[0])
    assert repr("Maybe" if isinstance(value, dict) else value) in problem.message


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        (CONNECTION, "spec.target.hostname"),
        (CONNECTION, "spec.guardrails.0.sql.statement"),
        (CONNECTION, "spex"),
        (MASKING, "spec.rules.0.colums"),
        (ACCESS_REQUEST, "spec.approver"),
    ],
)
def test_unknown_field(tmp_path: Path, doc: dict[str, Any], field: str) -> None:
    problem = only_error(check_one(tmp_path, mutate(doc, field, "x")))
    assert problem.message == "unknown field"
    assert problem.field == field.replace(".0.", "[0].")
    assert problem.kind == doc["kind"] and problem.name == doc["metadata"]["name"]


def test_unknown_fields_allowed_where_preserved(tmp_path: Path) -> None:
    conn = mutate(CONNECTION, "spec.resources", {"limits": {"cpu": "1"}, "anything": True})
    conn = mutate(conn, "status", {"kopf": {"progress": {}}, "create_fn": {"done": True}})
    assert errors(check(tmp_path, conn, SECRET)) == []


def test_wrong_type_and_range(tmp_path: Path) -> None:
    problem = only_error(check(tmp_path, mutate(CONNECTION, "spec.target.port", 70000), SECRET))
    assert problem.field == "spec.target.port"
    assert "70000" in problem.message
    problem = only_error(check(tmp_path, mutate(CONNECTION, "spec.identity.workload", "false"), SECRET))
    assert problem.field == "spec.identity.workload"


def test_unknown_kind_and_version(tmp_path: Path) -> None:
    problem = only_error(check(tmp_path, {**CONNECTION, "kind": "Database"}, SECRET))
    assert problem.field == "kind" and "Database" in problem.message
    problem = only_error(check(tmp_path, {**MASKING, "apiVersion": "sidegate.dev/v1"}))
    assert "sidegate.dev/v1" in problem.message


def test_bad_name(tmp_path: Path) -> None:
    problem = only_error(check(tmp_path, mutate(ACCESS_REQUEST, "metadata.name", "Bad_Name")))
    assert problem.field == "metadata.name" and "Bad_Name" in problem.message


# --------------------------------------------------------------------------- cross-field rules


@pytest.mark.parametrize(
    ("doc", "field", "value", "expected_field", "words"),
    [
        (CONNECTION, "spec.target.database", None, "spec.target.database", "postgres"),
        (HTTP_CONNECTION, "spec.target.url", None, "spec.target.url", "http"),
        (HTTP_CONNECTION, "spec.credentials.inject", "header", "spec.credentials.header", "header"),
        (CONNECTION, "spec.guardrails.0.sql", None, "spec.guardrails[0]", "sql or http"),
        (
            CONNECTION,
            "spec.identity.issuers.0.algorithms",
            ["RS256", "HS256"],
            "spec.identity.issuers[0].algorithms[1]",
            "HS256",
        ),
        (CONNECTION, "spec.approval.ttl", "1 hour", "spec.approval.ttl", "1 hour"),
        (MASKING, "spec.rules.1.keepLast", None, "spec.rules[1].keepLast", "partial"),
        (MASKING, "spec.rules.2.pattern", None, "spec.rules[2]", "columns, fields, detectors or pattern"),
        (ACCESS_REQUEST, "spec.statement", None, "spec.statement", "statement"),
        (ACCESS_REQUEST, "spec.review", {"decision": "Approved"}, "spec.review.reviewer", "decision"),
    ],
)
def test_cross_field_rules(
    tmp_path: Path, doc: dict[str, Any], field: str, value: Any, expected_field: str, words: str
) -> None:
    changed = mutate(doc, field, value, delete=value is None)
    others = [example("http/secret.yaml", i) for i in range(3)]
    problem = only_error(
        check_one(tmp_path, changed) if doc is not HTTP_CONNECTION else check(tmp_path, changed, *others)
    )
    assert problem.field == expected_field
    assert words in problem.message


def test_session_scope_needs_duration(tmp_path: Path) -> None:
    request = mutate(mutate(ACCESS_REQUEST, "spec.scope", "session"), "spec.statement", delete=True)
    problem = only_error(check(tmp_path, request))
    assert problem.field == "spec.duration" and "session" in problem.message
    assert errors(check(tmp_path, mutate(request, "spec.duration", "30m"))) == []


def test_masking_policy_needs_connections_or_selector(tmp_path: Path) -> None:
    policy = mutate(MASKING, "spec.connections", delete=True)
    problem = only_error(check(tmp_path, policy))
    assert problem.field == "spec" and "selector" in problem.message
    assert errors(check(tmp_path, mutate(policy, "spec.selector", {"matchLabels": {"a": "b"}}))) == []


@pytest.mark.parametrize(
    ("pattern", "words"),
    [
        ("ACME-[0-9", "invalid regular expression"),
        ("(a)\\1", "RE2"),  # a backreference: Python re accepts it, RE2 does not
        ("foo(?=bar)", "RE2"),
    ],
)
def test_bad_regex(tmp_path: Path, pattern: str, words: str) -> None:
    problem = only_error(
        check(tmp_path, mutate(MASKING, "spec.rules.2.pattern", pattern), CONNECTION, SECRET)
    )
    assert problem.field == "spec.rules[2].pattern"
    assert words in problem.message
    assert problem.kind == "MaskingPolicy" and problem.name == "pii"


def test_unknown_detector(tmp_path: Path) -> None:
    problem = only_error(
        check(tmp_path, mutate(MASKING, "spec.rules.1.detectors", ["visa"]), CONNECTION, SECRET)
    )
    assert problem.field == "spec.rules[1].detectors[0]"
    assert "'visa'" in problem.message and "credit-card" in problem.message


# --------------------------------------------------------------------------- references


def test_dangling_masking_policy_connection(tmp_path: Path) -> None:
    policy = mutate(MASKING, "spec.connections", ["orders-db", "billing-api"])
    problem = only_error(check(tmp_path, CONNECTION, SECRET, policy))
    assert problem.field == "spec.connections[1]"
    assert "payments/billing-api" in problem.message


def test_references_are_per_namespace(tmp_path: Path) -> None:
    policy = mutate(MASKING, "metadata.namespace", "other")
    problem = only_error(check(tmp_path, CONNECTION, SECRET, policy))
    assert "other/orders-db" in problem.message


def test_dangling_access_request_connection(tmp_path: Path) -> None:
    request = mutate(ACCESS_REQUEST, "spec.connection", "billing-db")
    problem = only_error(check(tmp_path, CONNECTION, SECRET, request))
    assert problem.field == "spec.connection" and "billing-db" in problem.message
    # Alone (no Connections in the set), an AccessRequest cannot be checked against anything.
    assert check(tmp_path, request) == []


def test_dangling_inject_annotation(tmp_path: Path) -> None:
    deployment = mutate(
        DEPLOYMENT, "spec.template.metadata.annotations", {"sidegate.dev/inject": "orders-db,nope"}
    )
    problem = only_error(check(tmp_path, CONNECTION, SECRET, deployment))
    assert problem.kind == "Deployment" and problem.name == "orders-api"
    assert problem.field == "spec.template.metadata.annotations[sidegate.dev/inject]"
    assert "payments/nope" in problem.message


def test_inject_annotation_on_pod_and_cronjob(tmp_path: Path) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "payments", "annotations": {"sidegate.dev/inject": "missing"}},
        "spec": {"containers": [{"name": "c", "image": "x"}]},
    }
    cron = {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": "c", "namespace": "payments"},
        "spec": {
            "schedule": "@daily",
            "jobTemplate": {
                "spec": {
                    "template": {
                        "metadata": {"annotations": {"sidegate.dev/inject": "orders-db"}},
                        "spec": {},
                    }
                }
            },
        },
    }
    problems = errors(check(tmp_path, CONNECTION, SECRET, pod, cron))
    assert [(p.kind, p.field) for p in problems] == [("Pod", "metadata.annotations[sidegate.dev/inject]")]


def test_inject_port_clash(tmp_path: Path) -> None:
    other = mutate(mutate(CONNECTION, "metadata.name", "orders-replica"), "spec.target.host", "replica")
    deployment = mutate(
        DEPLOYMENT, "spec.template.metadata.annotations", {"sidegate.dev/inject": "orders-db, orders-replica"}
    )
    problem = only_error(check(tmp_path, CONNECTION, other, SECRET, deployment))
    assert "15432" in problem.message


def test_workloads_without_annotation_are_skipped(tmp_path: Path) -> None:
    deployment = mutate(DEPLOYMENT, "spec.template.metadata.annotations", {})
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"anything": 1}}
    assert check(tmp_path, deployment, service) == []


def test_missing_secret_is_a_warning_unless_required(tmp_path: Path) -> None:
    problems = check(tmp_path, CONNECTION)
    assert [(p.severity, p.field) for p in problems] == [("warning", "spec.credentials.secretRef")]
    assert "payments/orders-db-admin" in problems[0].message
    problem = only_error(check(tmp_path, CONNECTION, require_secrets=True))
    assert problem.field == "spec.credentials.secretRef"


def test_all_secret_refs_are_checked(tmp_path: Path) -> None:
    problems = check(tmp_path, HTTP_CONNECTION, require_secrets=True)
    assert sorted(p.field for p in problems) == [
        "spec.audit.webhook.secretRef",
        "spec.credentials.secretRef",
        "spec.listen.tls.secretRef",
        "spec.target.tls.caSecretRef",
    ]


def test_secret_without_needed_key(tmp_path: Path) -> None:
    secret = mutate(SECRET, "stringData", {"username": "u"})
    problem = only_error(check(tmp_path, CONNECTION, secret))
    assert problem.field == "spec.credentials.secretRef" and "password" in problem.message


def test_sealed_secret_satisfies_reference(tmp_path: Path) -> None:
    sealed = {
        "apiVersion": "bitnami.com/v1alpha1",
        "kind": "SealedSecret",
        "metadata": {"name": "orders-db-admin", "namespace": "payments"},
        "spec": {"encryptedData": {}},
    }
    assert check(tmp_path, CONNECTION, sealed, require_secrets=True) == []


def test_cert_manager_certificate_satisfies_listen_tls(tmp_path: Path) -> None:
    """The Secret a Certificate makes is the one ``spec.secretName`` names, not the Certificate's."""
    certificate = example("http/certificate.yaml")
    secrets = [example("http/secret.yaml", i) for i in range(3)]
    assert check(tmp_path, HTTP_CONNECTION, certificate, *secrets, require_secrets=True) == []
    renamed = mutate(certificate, "spec.secretName", "another-tls")
    problem = only_error(check(tmp_path, HTTP_CONNECTION, renamed, *secrets, require_secrets=True))
    assert problem.field == "spec.listen.tls.secretRef" and "billing-api-gateway-tls" in problem.message
    # its keys are known: tls.crt and tls.key, never a database login
    as_login = mutate(CONNECTION, "spec.credentials.secretRef.name", "billing-api-gateway-tls")
    problem = only_error(check(tmp_path, as_login, certificate, require_secrets=True))
    assert problem.field == "spec.credentials.secretRef" and "password" in problem.message


def test_duplicate_name(tmp_path: Path) -> None:
    problem = only_error(check(tmp_path, CONNECTION, SECRET, CONNECTION))
    assert problem.index == 2 and problem.field == "metadata.name"
    assert "duplicate Connection payments/orders-db" in problem.message
    # Same name in another namespace, or another kind, is fine.
    assert errors(check(tmp_path, CONNECTION, SECRET, mutate(MASKING, "metadata.name", "orders-db"))) == []


def test_duplicate_across_files(tmp_path: Path) -> None:
    write(tmp_path, ACCESS_REQUEST, name="a.yaml")
    write(tmp_path, ACCESS_REQUEST, name="b.yml")
    problem = only_error(validate_paths([str(tmp_path)]))
    assert problem.path.endswith("b.yml") and "a.yaml" in problem.message


# --------------------------------------------------------------------------- files and output


def test_malformed_yaml(tmp_path: Path) -> None:
    good = write(tmp_path, CONNECTION, SECRET, name="good.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Secret\n---\nmetadata: {name: [unclosed\n")
    problems = validate_paths([str(good), str(bad)])
    problem = only_error(problems)
    assert problem.path == str(bad) and problem.index == 1
    assert "malformed YAML" in problem.message and "line" in problem.message


def test_non_mapping_document_and_missing_path(tmp_path: Path) -> None:
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    problems = validate_paths([str(bad), str(tmp_path / "nope.yaml")])
    assert len(errors(problems)) == 2
    assert "expected a mapping" in problems[0].message
    assert "no such file" in problems[1].message


def test_text_output_and_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, mutate(MASKING, "spec.rules.1.detectors", ["visa"]), CONNECTION, SECRET)
    assert main([str(path)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [
        f"{path} (document 0): MaskingPolicy pii: spec.rules[1].detectors[0]: "
        "must be one of email, credit-card, us-ssn, phone, iban, ipv4, aws-access-key, jwt, "
        "private-key; got 'visa'"
    ]


def test_warnings_do_not_fail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, CONNECTION)
    assert main([str(path)]) == 0
    assert "warning: Connection orders-db: spec.credentials.secretRef" in capsys.readouterr().out
    assert main(["--require-secrets", str(path)]) == 1


def test_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, mutate(CONNECTION, "spec.target.hostname", "x"))
    assert main(["--output", "json", str(path)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["errors"] == 1 and report["warnings"] == 0
    first = report["problems"][0]
    assert first == {
        "path": str(path),
        "index": 0,
        "kind": "Connection",
        "name": "orders-db",
        "field": "spec.target.hostname",
        "message": "unknown field",
        "severity": "error",
    }
    assert main(["-o", "json", str(EXAMPLES)]) == 0
    assert json.loads(capsys.readouterr().out) == {"errors": 0, "warnings": 0, "problems": []}


def test_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


def test_module_entry_point(tmp_path: Path) -> None:
    path = write(tmp_path, mutate(ACCESS_REQUEST, "spec.scope", "forever"))
    run = subprocess.run(
        [sys.executable, "-m", "sidegate_operator.validate", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 1
    assert "spec.scope: must be one of statement, session; got 'forever'" in run.stdout
    run = subprocess.run(
        [sys.executable, "-m", "sidegate_operator.validate", str(EXAMPLES)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_pre_commit_hook_definition() -> None:
    hooks = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())
    hook = next(h for h in hooks if h["id"] == "sidegate-validate")
    assert hook["entry"] == "sidegate validate"
    assert hook["files"] == r"\.(ya?ml)$"


# --------------------------------------------------------------------------- schema conversion


def test_openapi_conversion() -> None:
    schema = openapi_to_jsonschema(
        {
            "type": "object",
            "properties": {
                "a": {"x-kubernetes-int-or-string": True},
                "b": {"type": "string", "nullable": True, "default": "x"},
                "c": {
                    "type": "object",
                    "x-kubernetes-preserve-unknown-fields": True,
                    "properties": {"d": {"type": "string"}},
                },
                "e": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        }
    )
    assert schema["additionalProperties"] is False
    assert schema["properties"]["a"] == {"anyOf": [{"type": "integer"}, {"type": "string"}]}
    assert schema["properties"]["b"] == {"type": ["string", "null"]}
    assert "additionalProperties" not in schema["properties"]["c"]
    assert schema["properties"]["e"]["additionalProperties"] == {"type": "string"}
