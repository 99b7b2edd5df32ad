"""The typed, immutable policy model shared by the data plane and the operator.

Everything the proxy enforces is built here from Kubernetes-shaped objects (the CRDs of
``sidegate.dev/v1alpha1``) or from the config document the operator renders, so both planes agree
on one meaning of every field. Parsing is strict: a malformed object raises ``ConfigError`` naming
the field path, and nothing half-parsed is ever enforced.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

GROUP = "sidegate.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CONFIG_KIND = "ProxyConfig"
EXCHANGE_ISSUER_NAME = "sidegate-exchange"  # the token-exchange issuer's name (reserved)
DEFAULT_SIGNING_KEY = "tls.key"  # the key of spec.tokenExchange.signingKeySecretRef (a kubernetes.io/tls Secret)

ConnectionType = Literal["postgres", "http"]
Action = Literal["allow", "block", "requireApproval"]
Strategy = Literal["redact", "partial", "hash", "null"]
TLSMode = Literal["disable", "require", "verify-full"]

ACTIONS: tuple[str, ...] = ("allow", "block", "requireApproval")
STRATEGIES: tuple[str, ...] = ("redact", "partial", "hash", "null")
TLS_MODES: tuple[str, ...] = ("disable", "require", "verify-full")
DETECTORS: tuple[str, ...] = (
    "email",
    "credit-card",
    "us-ssn",
    "phone",
    "iban",
    "ipv4",
    "aws-access-key",
    "jwt",
    "private-key",
)


class ConfigError(ValueError):
    """A policy object that cannot be enforced; ``path`` names the offending field."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


# --------------------------------------------------------------------------- small value types


@dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str | None = None


@dataclass(frozen=True)
class TLSConfig:
    mode: TLSMode = "disable"
    ca_secret_ref: SecretKeyRef | None = None


LISTEN_TLS_KEYS = ("tls.crt", "tls.key")  # a kubernetes.io/tls Secret's keys


@dataclass(frozen=True)
class ListenTLS:
    """``spec.listen.tls``: TLS for callers, with the certificate of a kubernetes.io/tls Secret
    (``tls.crt``, ``tls.key``; followed when it is renewed). ``required``: a PostgreSQL caller
    that does not ask for TLS is refused (an HTTP listener with TLS speaks nothing else)."""

    secret_ref: SecretKeyRef
    required: bool = True


@dataclass(frozen=True)
class Target:
    host: str | None = None
    port: int | None = None
    database: str | None = None
    url: str | None = None
    tls: TLSConfig = field(default_factory=TLSConfig)


@dataclass(frozen=True)
class Credentials:
    secret_ref: SecretKeyRef
    inject: Literal["bearer", "basic", "header"] | None = None
    header: str | None = None


@dataclass(frozen=True)
class ClaimMapping:
    """Turns a token claim into an extra group (``prefix`` + value), e.g. GitHub's ``repository``."""

    claim: str
    prefix: str = ""


@dataclass(frozen=True)
class Issuer:
    name: str
    issuer: str
    audiences: tuple[str, ...] = ()
    jwks_uri: str | None = None
    jwks_secret_ref: SecretKeyRef | None = None
    subject_claim: str = "sub"
    groups_claim: str | None = None
    algorithms: tuple[str, ...] = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256")
    claim_mappings: tuple[ClaimMapping, ...] = ()


@dataclass(frozen=True)
class IdentityConfig:
    workload: bool = False
    issuers: tuple[Issuer, ...] = ()


@dataclass(frozen=True)
class SubjectMatch:
    """Who a rule is about: subject globs and/or group names (either one matching is enough)."""

    subjects: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.subjects and not self.groups


@dataclass(frozen=True)
class SQLMatch:
    statements: tuple[str, ...] = ()
    tables: tuple[str, ...] = ()
    functions: tuple[str, ...] = ()
    without_where: bool = False


@dataclass(frozen=True)
class BodyMatch:
    """A JSON request body field (dotted or JSONPath) and the values that trigger the rule."""

    path: str
    values: tuple[Any, ...] = ()


@dataclass(frozen=True)
class HTTPMatch:
    methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    body: tuple[BodyMatch, ...] = ()


@dataclass(frozen=True)
class Guardrail:
    name: str
    action: Action
    sql: SQLMatch | None = None
    http: HTTPMatch | None = None
    who: SubjectMatch = field(default_factory=SubjectMatch)
    builtin: bool = False


@dataclass(frozen=True)
class Approval:
    approver_groups: tuple[str, ...] = ()
    approver_users: tuple[str, ...] = ()
    hold_seconds: int = 60
    ttl_seconds: int = 3600


@dataclass(frozen=True)
class WebhookSink:
    url: str
    secret_ref: SecretKeyRef | None = None


@dataclass(frozen=True)
class AuditConfig:
    kubernetes_events: bool = True
    webhook: WebhookSink | None = None


@dataclass(frozen=True)
class TokenExchange:
    """``spec.tokenExchange``: the proxy signs exchanged tokens with this key (never in the config)."""

    signing_key_ref: SecretKeyRef
    issuer: str | None = None  # default: where the operator serves it (the gateway Service)
    verification_keys: tuple[str, ...] = ()  # keys of the same Secret: published and trusted, never signing


@dataclass(frozen=True)
class Connection:
    name: str
    namespace: str
    type: ConnectionType
    target: Target
    credentials: Credentials
    mode: Literal["sidecar", "gateway"] = "sidecar"
    replicas: int = 2
    listen_port: int = 15432
    listen_tls: ListenTLS | None = None
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    access: tuple[SubjectMatch, ...] = ()
    guardrails: tuple[Guardrail, ...] = ()
    approval: Approval = field(default_factory=Approval)
    audit: AuditConfig = field(default_factory=AuditConfig)
    token_exchange: TokenExchange | None = None
    uid: str | None = None
    generation: int | None = None

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class MaskingRule:
    name: str
    strategy: Strategy
    columns: tuple[str, ...] = ()
    fields: tuple[str, ...] = ()
    detectors: tuple[str, ...] = ()
    pattern: str | None = None
    keep_last: int | None = None


@dataclass(frozen=True)
class MaskingPolicy:
    name: str
    namespace: str
    rules: tuple[MaskingRule, ...]
    connections: tuple[str, ...] = ()
    selector: Mapping[str, str] | None = None
    exempt: SubjectMatch = field(default_factory=SubjectMatch)

    def applies_to(self, connection: str, labels: Mapping[str, str]) -> bool:
        if connection in self.connections:
            return True
        if self.selector is not None:
            return all(labels.get(k) == v for k, v in self.selector.items())
        return False


@dataclass(frozen=True)
class ProxyConfig:
    """Everything one proxy instance enforces: one Connection and the MaskingPolicies for it."""

    connection: Connection
    masking: tuple[MaskingPolicy, ...] = ()
    secrets_dir: str | None = None
    source: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def hash(self) -> str:
        return config_hash(self.source)


# --------------------------------------------------------------------------- parsing helpers


def config_hash(document: Mapping[str, Any]) -> str:
    """A stable hash of a rendered document: what operator status and rollouts key on."""
    raw = json.dumps(document, sort_keys=True, separators=(",", ":"), default=str).encode()
    return "sha256:" + hashlib.sha256(raw).hexdigest()


_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")  # a Secret's data key
MAX_VERIFICATION_KEYS = 4
_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def parse_duration(value: str | int, path: str = "") -> int:
    """Kubernetes-style durations ('1h', '30m', '1h30m', '45s' or plain seconds) to seconds."""
    if isinstance(value, bool):
        raise ConfigError(path, f"not a duration: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(path, "duration must not be negative")
        return value
    m = _DURATION.match(str(value).strip())
    if not value or not m or not any(m.groups()):
        raise ConfigError(path, f"not a duration: {value!r} (use e.g. 30s, 15m, 1h)")
    h, mi, s = (int(g) if g else 0 for g in m.groups())
    return h * 3600 + mi * 60 + s


def _map(obj: Any, path: str) -> Mapping[str, Any]:
    if obj is None:
        return {}
    if not isinstance(obj, Mapping):
        raise ConfigError(path, f"expected a mapping, got {type(obj).__name__}")
    return obj


def _str(obj: Mapping[str, Any], key: str, path: str, default: str | None = None) -> str:
    value = obj.get(key, default)
    if value is None:
        raise ConfigError(f"{path}.{key}", "required")
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path}.{key}", "expected a non-empty string")
    return value


def _opt_str(obj: Mapping[str, Any], key: str, path: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{path}.{key}", "expected a string")
    return value


def _int(obj: Mapping[str, Any], key: str, path: str, default: int | None = None) -> int | None:
    value = obj.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}.{key}", "expected an integer")
    return value


def _bool(obj: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
    """Strictly a boolean: YAML's quoted "false" must not turn a switch on."""
    value = obj.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{path}.{key}", f"expected true or false, got {value!r}")
    return value


def _range(value: int | None, path: str, low: int, high: int) -> int | None:
    if value is not None and not low <= value <= high:
        raise ConfigError(path, f"must be between {low} and {high}, got {value}")
    return value


def _strs(obj: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
    value = obj.get(key) or []
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(f"{path}.{key}", "expected a list of strings")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ConfigError(f"{path}.{key}[{i}]", "expected a string")
    return tuple(value)


def _enum(obj: Mapping[str, Any], key: str, path: str, allowed: Sequence[str], default: str | None) -> str:
    value = obj.get(key, default)
    if value not in allowed:
        raise ConfigError(f"{path}.{key}", f"must be one of {', '.join(allowed)}; got {value!r}")
    return str(value)


def _secret_ref(obj: Any, path: str, default_key: str | None = None) -> SecretKeyRef | None:
    if obj is None:
        return None
    m = _map(obj, path)
    return SecretKeyRef(name=_str(m, "name", path), key=_opt_str(m, "key", path) or default_key)


def _who(obj: Mapping[str, Any], path: str) -> SubjectMatch:
    return SubjectMatch(subjects=_strs(obj, "subjects", path), groups=_strs(obj, "groups", path))


# --------------------------------------------------------------------------- Connection


def parse_connection(obj: Mapping[str, Any]) -> Connection:
    """A ``Connection`` custom object (dict) to the typed model."""
    meta = _map(obj.get("metadata"), "metadata")
    spec = _map(obj.get("spec"), "spec")
    name = _str(meta, "name", "metadata")
    namespace = str(meta.get("namespace") or "default")
    ctype = _enum(spec, "type", "spec", ("postgres", "http"), None)

    t = _map(spec.get("target"), "spec.target")
    tls = _map(t.get("tls"), "spec.target.tls")
    target = Target(
        host=_opt_str(t, "host", "spec.target"),
        port=_range(_int(t, "port", "spec.target"), "spec.target.port", 1, 65535),
        database=_opt_str(t, "database", "spec.target"),
        url=_opt_str(t, "url", "spec.target"),
        tls=TLSConfig(
            mode=_enum(tls, "mode", "spec.target.tls", TLS_MODES, "disable"),  # type: ignore[arg-type]
            ca_secret_ref=_secret_ref(tls.get("caSecretRef"), "spec.target.tls.caSecretRef", "ca.crt"),
        ),
    )
    if ctype == "postgres":
        for key in ("host", "port", "database"):
            if getattr(target, key) in (None, ""):
                raise ConfigError(f"spec.target.{key}", "required for type postgres")
    elif not target.url:
        raise ConfigError("spec.target.url", "required for type http")

    c = _map(spec.get("credentials"), "spec.credentials")
    secret_ref = _secret_ref(c.get("secretRef"), "spec.credentials.secretRef")
    if secret_ref is None:
        raise ConfigError("spec.credentials.secretRef", "required")
    inject = c.get("inject")
    if ctype == "http":
        inject = _enum(c, "inject", "spec.credentials", ("bearer", "basic", "header"), "bearer")
        if inject == "header" and not c.get("header"):
            raise ConfigError("spec.credentials.header", "required when inject is header")
    credentials = Credentials(
        secret_ref=secret_ref, inject=inject, header=_opt_str(c, "header", "spec.credentials")
    )

    ident = _map(spec.get("identity"), "spec.identity")
    issuers = []
    for i, raw in enumerate(ident.get("issuers") or []):
        p = f"spec.identity.issuers[{i}]"
        im = _map(raw, p)
        issuers.append(
            Issuer(
                name=_str(im, "name", p),
                issuer=_str(im, "issuer", p),
                audiences=_strs(im, "audiences", p),
                jwks_uri=_opt_str(im, "jwksUri", p),
                jwks_secret_ref=_secret_ref(im.get("jwksSecretRef"), f"{p}.jwksSecretRef", "jwks.json"),
                subject_claim=_str(im, "subjectClaim", p, "sub"),
                groups_claim=_opt_str(im, "groupsClaim", p),
                algorithms=_strs(im, "algorithms", p) or Issuer.algorithms,
                claim_mappings=tuple(
                    ClaimMapping(
                        claim=_str(_map(cm, f"{p}.claimMappings[{j}]"), "claim", f"{p}.claimMappings[{j}]"),
                        prefix=str(_map(cm, f"{p}.claimMappings[{j}]").get("prefix") or ""),
                    )
                    for j, cm in enumerate(im.get("claimMappings") or [])
                ),
            )
        )
    for i, alg_issuer in enumerate(issuers):
        bad = [a for a in alg_issuer.algorithms if a.lower() == "none" or a.startswith("HS")]
        if bad:
            raise ConfigError(f"spec.identity.issuers[{i}].algorithms", f"algorithms not allowed: {bad}")
    workload = _bool(ident, "workload", "spec.identity", False)
    identity = IdentityConfig(workload=workload, issuers=tuple(issuers))

    access = tuple(
        _who(_map(a, f"spec.access[{i}]"), f"spec.access[{i}]")
        for i, a in enumerate(spec.get("access") or [])
    )

    guardrails = tuple(
        parse_guardrail(_map(g, f"spec.guardrails[{i}]"), f"spec.guardrails[{i}]")
        for i, g in enumerate(spec.get("guardrails") or [])
    )
    names = [g.name for g in guardrails]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError("spec.guardrails", f"duplicate rule names: {', '.join(dupes)}")

    ap = _map(spec.get("approval"), "spec.approval")
    approvers = _map(ap.get("approvers"), "spec.approval.approvers")
    hold_seconds = _range(_int(ap, "holdSeconds", "spec.approval", 60), "spec.approval.holdSeconds", 0, 3600)
    approval = Approval(
        approver_groups=_strs(approvers, "groups", "spec.approval.approvers"),
        approver_users=_strs(approvers, "users", "spec.approval.approvers"),
        hold_seconds=hold_seconds or 0,
        ttl_seconds=parse_duration(ap.get("ttl", "1h"), "spec.approval.ttl"),
    )

    au = _map(spec.get("audit"), "spec.audit")
    wh = au.get("webhook")
    webhook = None
    if wh is not None:
        whm = _map(wh, "spec.audit.webhook")
        webhook = WebhookSink(
            url=_str(whm, "url", "spec.audit.webhook"),
            secret_ref=_secret_ref(whm.get("secretRef"), "spec.audit.webhook.secretRef", "token"),
        )
    audit = AuditConfig(kubernetes_events=_bool(au, "kubernetesEvents", "spec.audit", True), webhook=webhook)

    token_exchange = _token_exchange(spec.get("tokenExchange"), issuers)

    listen = _map(spec.get("listen"), "spec.listen")
    default_port = 15432 if ctype == "postgres" else 18080
    listen_tls = None
    if listen.get("tls") is not None:
        ltm = _map(listen.get("tls"), "spec.listen.tls")
        tls_secret = _secret_ref(ltm.get("secretRef"), "spec.listen.tls.secretRef")
        if tls_secret is None:
            raise ConfigError("spec.listen.tls.secretRef", "required: a kubernetes.io/tls Secret (tls.crt, tls.key)")
        listen_tls = ListenTLS(tls_secret, _bool(ltm, "required", "spec.listen.tls", True))
    return Connection(
        name=name,
        namespace=namespace,
        type=ctype,  # type: ignore[arg-type]
        target=target,
        credentials=credentials,
        mode=_enum(spec, "mode", "spec", ("sidecar", "gateway"), "sidecar"),  # type: ignore[arg-type]
        replicas=_range(_int(spec, "replicas", "spec", 2), "spec.replicas", 0, 100) or 0,
        listen_port=_range(_int(listen, "port", "spec.listen", default_port), "spec.listen.port", 1, 65535)
        or default_port,
        listen_tls=listen_tls,
        identity=identity,
        access=access,
        guardrails=guardrails,
        approval=approval,
        audit=audit,
        token_exchange=token_exchange,
        uid=meta.get("uid"),
        generation=meta.get("generation"),
    )


def _token_exchange(obj: Any, issuers: Sequence[Issuer]) -> TokenExchange | None:
    if obj is None:
        return None
    path = "spec.tokenExchange"
    m = _map(obj, path)
    ref = _secret_ref(m.get("signingKeySecretRef"), f"{path}.signingKeySecretRef", DEFAULT_SIGNING_KEY)
    if ref is None:
        raise ConfigError(f"{path}.signingKeySecretRef", "required")
    issuer = _opt_str(m, "issuer", path)
    if issuer is not None and not re.match(r"^https?://\S+$", issuer):
        raise ConfigError(f"{path}.issuer", "must be an http(s) URL")
    for i, other in enumerate(issuers):
        # The proxy trusts its exchanged tokens as one more issuer, named EXCHANGE_ISSUER_NAME.
        if other.name == EXCHANGE_ISSUER_NAME:
            raise ConfigError(f"spec.identity.issuers[{i}].name",
                              f"{EXCHANGE_ISSUER_NAME!r} is reserved for spec.tokenExchange")
        if issuer is not None and other.issuer == issuer:
            raise ConfigError(f"{path}.issuer", f"also spec.identity.issuers[{i}]; exchanged tokens are "
                                                "trusted without listing their issuer")
    verification = _strs(m, "verificationKeys", path)
    for i, name in enumerate(verification):
        where = f"{path}.verificationKeys[{i}]"
        if not _SECRET_KEY.match(name) or len(name) > 253:
            raise ConfigError(where, "a key of the signing key's Secret ([-._a-zA-Z0-9]+)")
        if name == ref.key:
            raise ConfigError(where, f"{name!r} is the signing key")
        if name in verification[:i]:
            raise ConfigError(where, f"{name!r} is listed twice")
    if len(verification) > MAX_VERIFICATION_KEYS:
        raise ConfigError(f"{path}.verificationKeys", f"at most {MAX_VERIFICATION_KEYS} keys")
    return TokenExchange(signing_key_ref=ref, issuer=issuer, verification_keys=verification)


def parse_guardrail(g: Mapping[str, Any], path: str) -> Guardrail:
    sql = http = None
    if g.get("sql") is not None:
        s = _map(g.get("sql"), f"{path}.sql")
        sql = SQLMatch(
            statements=tuple(x.lower() for x in _strs(s, "statements", f"{path}.sql")),
            tables=_strs(s, "tables", f"{path}.sql"),
            functions=tuple(x.lower() for x in _strs(s, "functions", f"{path}.sql")),
            without_where=_bool(s, "withoutWhere", f"{path}.sql", False),
        )
    if g.get("http") is not None:
        h = _map(g.get("http"), f"{path}.http")
        body = tuple(_body_match(b, f"{path}.http.body[{i}]") for i, b in enumerate(h.get("body") or []))
        http = HTTPMatch(
            methods=tuple(m.upper() for m in _strs(h, "methods", f"{path}.http")),
            paths=_strs(h, "paths", f"{path}.http"),
            body=body,
        )
    if sql is None and http is None:
        raise ConfigError(path, "a guardrail needs sql or http")
    return Guardrail(
        name=_str(g, "name", path),
        action=_enum(g, "action", path, ACTIONS, None),  # type: ignore[arg-type]
        sql=sql,
        http=http,
        who=_who(g, path),
    )


def _body_match(obj: Any, path: str) -> BodyMatch:
    b = _map(obj, path)
    values = b.get("values") or []
    if not isinstance(values, list):
        raise ConfigError(f"{path}.values", "expected a list")
    return BodyMatch(path=_str(b, "path", path), values=tuple(values))


# --------------------------------------------------------------------------- MaskingPolicy


def parse_masking_policy(obj: Mapping[str, Any]) -> MaskingPolicy:
    meta = _map(obj.get("metadata"), "metadata")
    spec = _map(obj.get("spec"), "spec")
    rules = []
    for i, raw in enumerate(spec.get("rules") or []):
        p = f"spec.rules[{i}]"
        r = _map(raw, p)
        strategy = _enum(r, "strategy", p, STRATEGIES, "redact")
        detectors = tuple(d.lower() for d in _strs(r, "detectors", p))
        for j, d in enumerate(detectors):
            if d not in DETECTORS:
                known = ", ".join(DETECTORS)
                raise ConfigError(f"{p}.detectors[{j}]", f"unknown detector {d!r} (known: {known})")
        pattern = _opt_str(r, "pattern", p)
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"{p}.pattern", f"invalid regular expression: {exc}") from None
        keep_last = _range(_int(r, "keepLast", p), f"{p}.keepLast", 0, 64)
        if strategy == "partial" and keep_last is None:
            keep_last = 4
        rule = MaskingRule(
            name=_str(r, "name", p),
            strategy=strategy,  # type: ignore[arg-type]
            columns=tuple(c.lower() for c in _strs(r, "columns", p)),
            fields=_strs(r, "fields", p),
            detectors=detectors,
            pattern=pattern,
            keep_last=keep_last,
        )
        if not (rule.columns or rule.fields or rule.detectors or rule.pattern):
            raise ConfigError(p, "a rule needs columns, fields, detectors or pattern")
        rules.append(rule)
    if not rules:
        raise ConfigError("spec.rules", "at least one rule is required")
    names = [r.name for r in rules]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError("spec.rules", f"duplicate rule names: {', '.join(dupes)}")
    selector = spec.get("selector")
    match_labels = None
    if selector is not None:
        labels = _map(_map(selector, "spec.selector").get("matchLabels"), "spec.selector.matchLabels")
        match_labels = {str(k): str(v) for k, v in labels.items()}
    return MaskingPolicy(
        name=_str(meta, "name", "metadata"),
        namespace=str(meta.get("namespace") or "default"),
        rules=tuple(rules),
        connections=_strs(spec, "connections", "spec"),
        selector=match_labels,
        exempt=_who(_map(spec.get("exempt"), "spec.exempt"), "spec.exempt"),
    )


# --------------------------------------------------------------------------- rendered config


def render_config(
    connection_obj: Mapping[str, Any],
    masking_objs: Sequence[Mapping[str, Any]],
    secrets_dir: str | None = None,
) -> dict[str, Any]:
    """The document the operator writes into the proxy's config Secret (and ``--config`` reads).

    Only the parts of each object the proxy needs are kept (no status, no managedFields), so the
    hash changes exactly when enforcement would.
    """

    def slim(o: Mapping[str, Any]) -> dict[str, Any]:
        meta = o.get("metadata") or {}
        keep = {k: meta[k] for k in ("name", "namespace", "uid", "generation", "labels") if k in meta}
        return {"apiVersion": o.get("apiVersion", API_VERSION), "kind": o.get("kind"), "metadata": keep,
                "spec": o.get("spec") or {}}

    doc: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": CONFIG_KIND,
        "connection": slim(connection_obj),
        "maskingPolicies": [slim(m) for m in sorted(masking_objs, key=lambda m: m["metadata"]["name"])],
    }
    if secrets_dir:
        doc["secretsDir"] = secrets_dir
    return doc


def load_config(doc: Mapping[str, Any]) -> ProxyConfig:
    """A rendered config document to the enforced model (what ``sidegate proxy --config`` runs)."""
    if doc.get("kind") != CONFIG_KIND:
        raise ConfigError("kind", f"expected {CONFIG_KIND}, got {doc.get('kind')!r}")
    connection = parse_connection(_map(doc.get("connection"), "connection"))
    policies = []
    for i, m in enumerate(doc.get("maskingPolicies") or []):
        try:
            policies.append(parse_masking_policy(_map(m, f"maskingPolicies[{i}]")))
        except ConfigError as exc:
            raise ConfigError(f"maskingPolicies[{i}].{exc.path}", exc.message) from None
    return ProxyConfig(
        connection=connection,
        masking=tuple(policies),
        secrets_dir=doc.get("secretsDir"),
        source=dict(doc),
    )


def build_config(
    connection_obj: Mapping[str, Any],
    masking_objs: Sequence[Mapping[str, Any]],
    secrets_dir: str | None = None,
) -> ProxyConfig:
    """Pick the MaskingPolicies that apply to a Connection and build the proxy config from them."""
    conn = parse_connection(connection_obj)
    labels = (connection_obj.get("metadata") or {}).get("labels") or {}
    applicable = [
        m
        for m in masking_objs
        if (m.get("metadata") or {}).get("namespace", "default") == conn.namespace
        and parse_masking_policy(m).applies_to(conn.name, labels)
    ]
    return load_config(render_config(connection_obj, applicable, secrets_dir))
