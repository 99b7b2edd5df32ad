"""``sidegate validate``: check manifests offline, before GitOps applies them.

The API server prunes unknown fields and only reports CEL rules one object at a time; this check
runs in CI or pre-commit on a whole folder: the CRD schemas (with unknown fields rejected), the
cross-field rules through the same parser the proxy uses (so both agree), regular expressions in
both engines, and references between documents (Connections, Secrets, workload annotations).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib.resources import files
from typing import Any, Literal

import jsonschema
import re2
import yaml

from sidegate_proxy.config import (
    DEFAULT_SIGNING_KEY,
    GROUP,
    LISTEN_TLS_KEYS,
    ConfigError,
    Connection,
    SecretKeyRef,
    parse_connection,
    parse_duration,
    parse_masking_policy,
)
from sidegate_proxy.manifests import Document, ManifestError, iter_files, load_file
from sidegate_proxy.secrets import secret_data

Severity = Literal["error", "warning"]

INJECT_ANNOTATION = f"{GROUP}/inject"
CRD_FILES = ("connection.yaml", "maskingpolicy.yaml", "accessrequest.yaml")

# Workload kinds whose pods may carry the inject annotation, and where their pod template is.
POD_TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}

# Objects that make a Secret in their namespace, so that the Secret is not committed in clear
# text: the field naming it (None: the object's own name) and its keys (None: unknown offline).
SECRET_SOURCES: dict[tuple[str, str], tuple[tuple[str, ...] | None, frozenset[str] | None]] = {
    ("bitnami.com", "SealedSecret"): (None, None),
    ("external-secrets.io", "ExternalSecret"): (("spec", "target", "name"), None),
    # a kubernetes.io/tls Secret (ca.crt: when the issuer gives it)
    ("cert-manager.io", "Certificate"): (("spec", "secretName"), frozenset({"tls.crt", "tls.key", "ca.crt"})),
}

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass(frozen=True)
class Problem:
    """One finding, located well enough to fix it without reading the tool's source."""

    path: str
    index: int | None  # document position in the file (0-based); None for file-level problems
    kind: str
    name: str
    field: str
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        where = self.path if self.index is None else f"{self.path} (document {self.index})"
        what = ""
        if self.kind or self.name:
            what = f" {self.kind or '?'} {self.name or '?'}:"
        at = f" {self.field}:" if self.field else ""
        level = " warning:" if self.severity == "warning" else ""
        return f"{where}:{level}{what}{at} {self.message}"


# --------------------------------------------------------------------------- CRD schemas


def openapi_to_jsonschema(node: Any) -> Any:
    """A CRD's structural OpenAPI v3 schema as JSON Schema that also rejects unknown fields.

    The API server prunes unknown fields silently; offline we would rather say so, so every
    object node with ``properties`` gets ``additionalProperties: false`` unless it preserves
    unknown fields.
    """
    if isinstance(node, list):
        return [openapi_to_jsonschema(n) for n in node]
    if not isinstance(node, Mapping):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "default", "format"):
            continue
        if key in ("properties", "patternProperties"):
            out[key] = {k: openapi_to_jsonschema(v) for k, v in value.items()}
        else:
            out[key] = openapi_to_jsonschema(value)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    preserve = bool(node.get("x-kubernetes-preserve-unknown-fields"))
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


@dataclass(frozen=True)
class Schemas:
    """The JSON Schema validator of each sidegate.dev kind, per served version."""

    validators: Mapping[tuple[str, str], jsonschema.protocols.Validator]

    @classmethod
    def load(cls) -> Schemas:
        validators: dict[tuple[str, str], jsonschema.protocols.Validator] = {}
        root = files("sidegate_operator").joinpath("crds")
        for name in CRD_FILES:
            crd = yaml.safe_load(root.joinpath(name).read_text(encoding="utf-8"))
            spec = crd["spec"]
            for version in spec["versions"]:
                if not version.get("served", True):
                    continue
                schema = openapi_to_jsonschema(version["schema"]["openAPIV3Schema"])
                cls_ = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
                api_version = f"{spec['group']}/{version['name']}"
                validators[(api_version, spec["names"]["kind"])] = cls_(schema)
        return cls(validators)


def _field_path(parts: Sequence[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def schema_problems(doc: Document, validator: jsonschema.protocols.Validator) -> Iterator[tuple[str, str]]:
    """(field path, message) for every schema violation, unknown fields named one by one."""
    errors = sorted(validator.iter_errors(doc.obj), key=lambda e: ([str(p) for p in e.absolute_path], str(e)))
    for err in errors:
        path = list(err.absolute_path)
        schema = err.schema if isinstance(err.schema, Mapping) else {}
        if err.validator == "additionalProperties" and isinstance(err.instance, Mapping):
            known = set(schema.get("properties") or {})
            for extra in sorted(set(err.instance) - known):
                yield _field_path([*path, extra]), "unknown field"
        elif err.validator == "required":
            missing = re.match(r"^'([^']+)'", err.message)
            yield _field_path([*path, missing.group(1)] if missing else path), "required field is missing"
        elif err.validator == "enum":
            allowed = ", ".join(str(v) for v in schema.get("enum") or ())
            yield _field_path(path), f"must be one of {allowed}; got {err.instance!r}"
        else:
            yield _field_path(path), err.message


def _made_secret(doc: Document, field: tuple[str, ...] | None) -> str:
    """The name of the Secret a ``SECRET_SOURCES`` object makes (its own when the field is unset)."""
    node: Any = doc.obj
    for key in field or ():
        node = node.get(key) if isinstance(node, dict) else None
    return str(node) if isinstance(node, str) and node else doc.name


# --------------------------------------------------------------------------- per-kind rules
# The CRDs' x-kubernetes-validations (CEL) rules that the proxy's parser does not enforce itself,
# mirrored here so a manifest the API server would refuse fails before it is applied.


def regex_problem(pattern: str) -> str | None:
    """Why a masking pattern cannot be used, or None: it must compile in ``re`` and in RE2."""
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"invalid regular expression: {exc}"
    options = re2.Options()
    options.log_errors = False
    try:
        re2.compile(pattern, options)
    except re2.error as exc:
        detail = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        return f"not supported by RE2 (the data plane's engine): {detail}"
    return None


def masking_rules(spec: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    if "connections" not in spec and "selector" not in spec:
        yield "spec", "a MaskingPolicy needs spec.connections or spec.selector"
    for i, rule in enumerate(spec.get("rules") or []):
        if not isinstance(rule, Mapping):
            continue
        if rule.get("strategy") == "partial" and rule.get("keepLast") is None:
            yield f"spec.rules[{i}].keepLast", "required when strategy is partial"
        pattern = rule.get("pattern")
        if isinstance(pattern, str):
            why = regex_problem(pattern)
            if why:
                yield f"spec.rules[{i}].pattern", why


def access_request_rules(spec: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    scope = spec.get("scope", "statement")
    if scope == "statement" and not spec.get("statement"):
        yield "spec.statement", "required when scope is statement"
    if scope == "session":
        if not spec.get("duration"):
            yield "spec.duration", "required when scope is session"
        else:
            try:
                parse_duration(spec["duration"], "spec.duration")
            except ConfigError as exc:
                yield exc.path, exc.message
    review = spec.get("review")
    if isinstance(review, Mapping) and review.get("decision") and not review.get("reviewer"):
        yield "spec.review.reviewer", "required when a decision is set"


# Connection needs none here: parse_connection enforces all of its rules.
KIND_RULES: Mapping[str, Callable[[Mapping[str, Any]], Iterator[tuple[str, str]]]] = {
    "MaskingPolicy": masking_rules,
    "AccessRequest": access_request_rules,
}


# --------------------------------------------------------------------------- the whole set


@dataclass(frozen=True)
class _Secret:
    keys: frozenset[str] | None  # None: the keys are not visible offline (sealed/external)


def _template_annotations(doc: Document) -> Mapping[str, Any] | None:
    node: Any = doc.obj
    for part in POD_TEMPLATE_PATHS[doc.kind]:
        node = node.get(part) if isinstance(node, Mapping) else None
    meta = node.get("metadata") if isinstance(node, Mapping) else None
    annotations = meta.get("annotations") if isinstance(meta, Mapping) else None
    return annotations if isinstance(annotations, Mapping) else None


def _group(doc: Document) -> str:
    api_version = str(doc.obj.get("apiVersion") or "")
    return api_version.split("/", 1)[0] if "/" in api_version else ""


def _secret_refs(conn: Connection) -> Iterator[tuple[str, SecretKeyRef, tuple[str, ...]]]:
    """Every Secret a Connection needs: (field path, reference, keys that must be in it)."""
    creds = conn.credentials
    if creds.secret_ref.key:
        keys: tuple[str, ...] = (creds.secret_ref.key,)
    elif conn.type == "postgres" or creds.inject == "basic":
        keys = ("username", "password")
    else:
        keys = ("token",)
    yield "spec.credentials.secretRef", creds.secret_ref, keys
    tls_ref = conn.target.tls.ca_secret_ref
    if tls_ref is not None:
        yield "spec.target.tls.caSecretRef", tls_ref, (tls_ref.key or "ca.crt",)
    if conn.listen_tls is not None:
        yield "spec.listen.tls.secretRef", conn.listen_tls.secret_ref, LISTEN_TLS_KEYS
    for i, issuer in enumerate(conn.identity.issuers):
        if issuer.jwks_secret_ref is not None:
            ref = issuer.jwks_secret_ref
            yield f"spec.identity.issuers[{i}].jwksSecretRef", ref, (ref.key or "jwks.json",)
    webhook = conn.audit.webhook
    if webhook is not None and webhook.secret_ref is not None:
        ref = webhook.secret_ref
        yield "spec.audit.webhook.secretRef", ref, (ref.key or "token",)
    if conn.token_exchange is not None:
        ref = conn.token_exchange.signing_key_ref
        yield "spec.tokenExchange.signingKeySecretRef", ref, (ref.key or DEFAULT_SIGNING_KEY,)


class _Checker:
    """Collects problems over one set of documents (one ``validate`` run)."""

    def __init__(self, schemas: Schemas, require_secrets: bool) -> None:
        self.schemas = schemas
        self.require_secrets = require_secrets
        self.problems: list[Problem] = []

    def add(self, doc: Document, field: str, message: str, severity: Severity = "error") -> None:
        self.problems.append(Problem(doc.path, doc.index, doc.kind, doc.name, field, message, severity))

    def run(self, docs: Sequence[Document]) -> None:
        self.check_duplicates(docs)
        connections: dict[tuple[str, str], tuple[Document, Connection | None]] = {}
        secrets: dict[tuple[str, str], _Secret] = {}
        for doc in docs:
            if _group(doc) == GROUP:
                conn = self.check_sidegate(doc)
                if doc.kind == "Connection" and self.known(doc):
                    connections[(doc.namespace, doc.name)] = (doc, conn)
            elif doc.kind == "Secret" and doc.obj.get("apiVersion") == "v1":
                try:
                    secrets[(doc.namespace, doc.name)] = _Secret(frozenset(secret_data(doc.obj)))
                except ValueError as exc:
                    self.add(doc, "data", str(exc))
            elif (_group(doc), doc.kind) in SECRET_SOURCES:
                field, keys = SECRET_SOURCES[(_group(doc), doc.kind)]
                secrets[(doc.namespace, _made_secret(doc, field))] = _Secret(keys)
        for doc in docs:
            if self.known(doc):
                self.check_references(doc, connections)
            elif doc.kind in POD_TEMPLATE_PATHS and doc.obj.get("apiVersion"):
                self.check_injection(doc, connections)
        for doc, conn in connections.values():
            if conn is not None:
                self.check_secrets(doc, conn, secrets)

    def known(self, doc: Document) -> bool:
        return (str(doc.obj.get("apiVersion")), doc.kind) in self.schemas.validators

    def check_duplicates(self, docs: Sequence[Document]) -> None:
        seen: dict[tuple[str, str, str, str], Document] = {}
        for doc in docs:
            if not doc.kind or not doc.name:
                continue
            key = (_group(doc), doc.kind, doc.namespace, doc.name)
            first = seen.setdefault(key, doc)
            if first is not doc:
                self.add(doc, "metadata.name", f"duplicate {doc.kind} {doc.namespace}/{doc.name} "
                                               f"(first defined in {first.where()})")

    def check_sidegate(self, doc: Document) -> Connection | None:
        """Schema and cross-field rules of one sidegate.dev object; the parsed Connection if valid."""
        api_version = str(doc.obj.get("apiVersion"))
        validator = self.schemas.validators.get((api_version, doc.kind))
        if validator is None:
            kinds = sorted({f"{v} {k}" for v, k in self.schemas.validators})
            self.add(doc, "kind", f"unknown kind {doc.kind!r} for apiVersion {api_version} "
                                  f"(known: {', '.join(kinds)})")
            return None
        meta = doc.obj.get("metadata")
        name = meta.get("name") if isinstance(meta, Mapping) else None
        if not name:
            self.add(doc, "metadata.name", "required field is missing")
        elif not isinstance(name, str) or len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
            self.add(doc, "metadata.name", f"{name!r} is not a valid Kubernetes name "
                                           "(lower case letters, digits, '-' and '.')")
        reported: list[str] = []
        for field, message in schema_problems(doc, validator):
            reported.append(field)
            self.add(doc, field, message)
        spec = doc.obj.get("spec")
        if not isinstance(spec, Mapping):
            return None
        rules = KIND_RULES.get(doc.kind)
        for field, message in rules(spec) if rules else ():
            if not _covered(field, reported):
                reported.append(field)
                self.add(doc, field, message)
        parser = {"Connection": parse_connection, "MaskingPolicy": parse_masking_policy}.get(doc.kind)
        if parser is None:
            return None
        try:
            parsed = parser(doc.obj)
        except ConfigError as exc:
            if not _covered(exc.path, reported):
                self.add(doc, exc.path, exc.message)
            return None
        return parsed if isinstance(parsed, Connection) and not reported else None

    def check_references(self, doc: Document,
                         connections: Mapping[tuple[str, str], tuple[Document, Connection | None]]) -> None:
        spec = doc.obj.get("spec")
        if not isinstance(spec, Mapping):
            return
        if doc.kind == "MaskingPolicy":
            names = spec.get("connections")
            for i, name in enumerate(names if isinstance(names, list) else []):
                if isinstance(name, str) and (doc.namespace, name) not in connections:
                    self.add(doc, f"spec.connections[{i}]",
                             f"Connection {doc.namespace}/{name} is not defined in the manifests")
        elif doc.kind == "AccessRequest" and connections:
            name = spec.get("connection")
            if isinstance(name, str) and (doc.namespace, name) not in connections:
                self.add(doc, "spec.connection",
                         f"Connection {doc.namespace}/{name} is not defined in the manifests")

    def check_injection(self, doc: Document,
                        connections: Mapping[tuple[str, str], tuple[Document, Connection | None]]) -> None:
        annotations = _template_annotations(doc)
        if annotations is None or INJECT_ANNOTATION not in annotations:
            return
        field = ".".join((*POD_TEMPLATE_PATHS[doc.kind], "metadata", "annotations", f"[{INJECT_ANNOTATION}]"))
        field = field.replace(".[", "[")
        value = annotations[INJECT_ANNOTATION]
        names = [n.strip() for n in value.split(",")] if isinstance(value, str) else []
        if not names or not all(names):
            self.add(doc, field, f"expected a comma-separated list of Connection names, got {value!r}")
            return
        ports: dict[int, str] = {}
        for name in names:
            found = connections.get((doc.namespace, name))
            if found is None:
                self.add(doc, field, f"Connection {doc.namespace}/{name} is not defined in the manifests")
                continue
            conn = found[1]
            if conn is None:
                continue
            if conn.mode != "sidecar":
                self.add(doc, field, f"Connection {name} is in {conn.mode} mode; only sidecar Connections "
                                     "are injected", "warning")
            other = ports.setdefault(conn.listen_port, name)
            if other != name:
                self.add(doc, field, f"Connections {other} and {name} both listen on port {conn.listen_port}")

    def check_secrets(self, doc: Document, conn: Connection,
                      secrets: Mapping[tuple[str, str], _Secret]) -> None:
        for field, ref, keys in _secret_refs(conn):
            secret = secrets.get((conn.namespace, ref.name))
            if secret is None:
                severity: Severity = "error" if self.require_secrets else "warning"
                self.add(doc, field, f"Secret {conn.namespace}/{ref.name} is not defined in the manifests",
                         severity)
                continue
            missing = [k for k in keys if secret.keys is not None and k not in secret.keys]
            if missing:
                self.add(doc, field, f"Secret {conn.namespace}/{ref.name} has no key {', '.join(missing)}")


def _covered(field: str, reported: Sequence[str]) -> bool:
    """True when a problem at ``field`` (or around it) was already reported."""
    return any(field == r or field.startswith((f"{r}.", f"{r}[")) or r.startswith((f"{field}.", f"{field}["))
               for r in reported)


def validate_paths(paths: Sequence[str], *, require_secrets: bool = False) -> list[Problem]:
    """Every problem found in the YAML files under ``paths`` (files or folders), in file order."""
    docs: list[Document] = []
    problems: list[Problem] = []
    for p in paths:
        try:
            found = list(iter_files([p]))
        except ManifestError as exc:
            problems.append(Problem(exc.path, exc.index, "", "", "", exc.message))
            continue
        if not found:
            problems.append(Problem(str(p), None, "", "", "", "no YAML files found", "warning"))
        for f in found:
            try:
                docs.extend(load_file(f))
            except ManifestError as exc:
                problems.append(Problem(exc.path, exc.index, "", "", "", exc.message))
    checker = _Checker(Schemas.load(), require_secrets)
    checker.run(docs)
    order: dict[tuple[str, int | None], int] = {(d.path, d.index): i for i, d in enumerate(docs)}
    found_problems = sorted(checker.problems, key=lambda pr: order.get((pr.path, pr.index), -1))
    return problems + found_problems


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sidegate validate",
        description="Check Sidegate manifests offline: CRD schemas, cross-field rules and references.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="YAML files or folders (searched recursively)")
    parser.add_argument("--output", "-o", choices=("text", "json"), default="text")
    parser.add_argument("--require-secrets", action="store_true",
                        help="a Secret referenced by a Connection but not in the manifests is an error")
    args = parser.parse_args(argv)
    problems = validate_paths(args.paths, require_secrets=args.require_secrets)
    errors = sum(p.severity == "error" for p in problems)
    if args.output == "json":
        report = {"errors": errors, "warnings": len(problems) - errors,
                  "problems": [asdict(p) for p in problems]}
        print(json.dumps(report, indent=2))
    else:
        for problem in problems:
            print(problem)
        if problems:
            print(f"{errors} error(s), {len(problems) - errors} warning(s)", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
