"""Reconciling a Connection: its config Secret, its gateway, and a status that says why.

One function, ``reconcile``, does the work for every trigger: create, update, resume, a Secret it
needs appearing (the Secret handler bumps the ``sidegate.dev/secret-version`` annotation) or a
MaskingPolicy changing (``sidegate.dev/policy-hash``). Both annotations are part of what kopf
diffs, so a bump becomes an ordinary update, serialised with every other change of the object.
All state lives in Kubernetes objects; the kopf indexes are caches of them.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import kopf

from sidegate_proxy.config import DEFAULT_SIGNING_KEY, GROUP, ConfigError, Connection, parse_connection
from sidegate_proxy.secrets import secret_data
from sidegate_proxy.tokenexchange import ExchangeKey

from . import build
from .kube import KubeError, OperatorContext, connection_path, owned_by, resource_path

CONNECTIONS = (GROUP, "v1alpha1", "connections")
SECRET_VERSION_ANNOTATION = f"{GROUP}/secret-version"
POLICY_HASH_ANNOTATION = f"{GROUP}/policy-hash"

READY = "Ready"
DEGRADED = "Degraded"
RECONCILED = "Reconciled"
SECRET_MISSING = "SecretMissing"
INVALID_POLICY = "InvalidPolicy"


@dataclass(frozen=True)
class Outcome:
    """What one reconciliation concluded, before it is written as status."""

    ready: bool
    reason: str
    message: str
    config_hash: str | None = None
    endpoint: str | None = None


@dataclass(frozen=True)
class SecretUser:
    """A Connection that needs a Secret: the value of the ``connections_by_secret`` index."""

    connection: str
    waiting: bool  # not Ready for want of a Secret (or not reconciled yet)
    annotation: str | None


# --------------------------------------------------------------------------- pure parts


def slim(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the indexes keep of an object: enough to render and to decide, no managedFields."""
    meta = body.get("metadata") or {}
    keep = ("name", "namespace", "uid", "generation", "labels", "annotations")
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {k: meta[k] for k in keep if k in meta},
        "spec": dict(body.get("spec") or {}),
        "status": dict(body.get("status") or {}),
    }


def condition(conditions: Iterable[Mapping[str, Any]], kind: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions if c.get("type") == kind), None)


def conditions_for(outcome: Outcome, previous: Sequence[Mapping[str, Any]], generation: int | None,
                   now: str) -> list[dict[str, Any]]:
    """Ready and Degraded, keeping each one's lastTransitionTime while its status holds."""
    out: list[dict[str, Any]] = []
    for kind, status in ((READY, outcome.ready), (DEGRADED, not outcome.ready)):
        value = "True" if status else "False"
        before = condition(previous, kind)
        since = before.get("lastTransitionTime") if before and before.get("status") == value else None
        cond: dict[str, Any] = {
            "type": kind,
            "status": value,
            "reason": outcome.reason,
            "message": outcome.message,
            "lastTransitionTime": since or now,
        }
        if generation is not None:
            cond["observedGeneration"] = generation
        out.append(cond)
    return out


def status_for(outcome: Outcome, body: Mapping[str, Any], now: str) -> dict[str, Any]:
    """The status fields to write; the previous configHash/endpoint stay when the new config is bad."""
    status = body.get("status") or {}
    generation = (body.get("metadata") or {}).get("generation")
    previous = status.get("conditions") or []
    out: dict[str, Any] = {"conditions": conditions_for(outcome, previous, generation, now)}
    if generation is not None:
        out["observedGeneration"] = generation
    if outcome.config_hash:
        out["configHash"] = outcome.config_hash
    if outcome.endpoint:
        out["endpoint"] = outcome.endpoint
    return out


def status_changed(body: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    status = body.get("status") or {}
    return any(status.get(k) != v for k, v in new.items())


def missing_secrets(required: Mapping[str, Sequence[str]], found: Mapping[str, Mapping[str, Any] | None],
                    namespace: str, fields: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """One line per absent Secret or key, naming exactly what to create (and, given ``fields``,
    which fields of the Connection need it)."""
    problems = []
    for name, keys in required.items():
        used_by = f" ({', '.join(fields[name])})" if fields and fields.get(name) else ""
        obj = found.get(name)
        if obj is None:
            problems.append(f"Secret {namespace}/{name} not found{used_by}")
            continue
        try:
            present = secret_data(obj)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        absent = [k for k in keys if k not in present]
        if absent:
            problems.append(f"Secret {namespace}/{name} has no key {', '.join(absent)}{used_by}")
    return problems


def signing_key_problem(conn: Connection, found: Mapping[str, Mapping[str, Any] | None]) -> str | None:
    """Why a token-exchange key in the Secret is unusable: the signing key (present, else
    ``missing_secrets`` says so) would stop the proxy from starting, checked here so a bad key
    degrades the Connection instead of crash-looping pods; a bad verification key (optional, the
    next one in a rotation) is skipped by the proxies, and said here before it is swapped in."""
    te = conn.token_exchange
    obj = found.get(te.signing_key_ref.name) if te is not None else None
    if te is None or obj is None:
        return None
    try:
        data = secret_data(obj)
    except ValueError:
        return None  # reported by missing_secrets
    keys = [("signingKeySecretRef", te.signing_key_ref.key or DEFAULT_SIGNING_KEY),
            *((f"verificationKeys[{i}]", name) for i, name in enumerate(te.verification_keys))]
    problems = []
    for field, key in keys:
        pem = data.get(key)
        if pem is None:
            continue
        try:
            ExchangeKey.from_pem(pem)
        except ConfigError as exc:
            problems.append(f"Secret {conn.namespace}/{te.signing_key_ref.name} key {key} "
                            f"(spec.tokenExchange.{field}): {exc.message}")
    return "; ".join(problems) or None


def waiting_for_secret(body: Mapping[str, Any]) -> bool:
    ready = condition((body.get("status") or {}).get("conditions") or [], READY)
    return ready is None or (ready.get("status") != "True" and ready.get("reason") == SECRET_MISSING)


def gateway_children(conn_obj: Mapping[str, Any], conn: Connection, config_hash: str,
                     image: str) -> list[dict[str, Any]]:
    """The objects gateway mode needs (none in sidecar mode)."""
    if conn.mode != "gateway":
        return []
    children = [
        build.build_service_account(conn),
        build.build_role_binding(conn),
        build.build_deployment(conn, config_hash, image, resources=build.resources_of(conn_obj)),
        build.build_service(conn),
    ]
    if build.wants_network_policy(conn_obj):
        children.append(build.build_network_policy(conn))
    return children


# (apiVersion, kind) of everything reconcile may create besides the config Secret.
GATEWAY_KINDS = (("apps/v1", "Deployment"), ("v1", "Service"), ("networking.k8s.io/v1", "NetworkPolicy"),
                 ("rbac.authorization.k8s.io/v1", "RoleBinding"), ("v1", "ServiceAccount"))


# --------------------------------------------------------------------------- I/O


async def reconcile(ctx: OperatorContext, body: Mapping[str, Any],
                    masking_objs: Iterable[Mapping[str, Any]]) -> Outcome:
    """Bring the children of one Connection in line with it; raises ``KubeError`` on API trouble."""
    try:
        conn = parse_connection(body)
        secret = build.build_config_secret(body, masking_objs)
        config_hash = secret["metadata"]["annotations"][build.CONFIG_HASH_ANNOTATION]
        children = gateway_children(body, conn, config_hash, ctx.image)
    except ConfigError as exc:
        return Outcome(False, INVALID_POLICY, str(exc))

    required = build.required_secret_keys(conn)
    found = {name: await ctx.kube.get(resource_path("v1", "Secret", conn.namespace, name))
             for name in required}
    # The config holds no credentials, so it is written even while they are missing.
    await ctx.kube.apply(secret)
    problems = missing_secrets(required, found, conn.namespace, build.secret_fields(conn))
    problems += filter(None, [signing_key_problem(conn, found)])
    if problems:
        # Nothing rolls out without its credentials: running pods keep the last good setup.
        return Outcome(False, SECRET_MISSING, "; ".join(problems), config_hash, build.endpoint(conn))

    for child in children:
        await ctx.kube.apply(child)
    wanted = {(c["apiVersion"], c["kind"]) for c in children}
    for api_version, kind in GATEWAY_KINDS:
        if (api_version, kind) in wanted:
            continue
        path = resource_path(api_version, kind, conn.namespace, build.gateway_name(conn.name))
        existing = await ctx.kube.get(path)
        if existing is not None and owned_by(existing, conn.uid):
            await ctx.kube.delete(path, uid=existing["metadata"].get("uid"))
    what = ", ".join(f"{c['kind']} {c['metadata']['name']}" for c in [secret, *children])
    return Outcome(True, RECONCILED, f"applied {what}", config_hash, build.endpoint(conn))


def utcnow() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def reconcile_connection(body: kopf.Body, namespace: str, patch: kopf.Patch, memo: kopf.Memo,
                               logger: kopf.Logger, maskingpolicies_by_namespace: kopf.Index[str, Any],
                               **_: Any) -> None:
    """The kopf handler for create, update and resume."""
    ctx: OperatorContext = memo["sidegate"]
    raw = dict(body)
    try:
        outcome = await reconcile(ctx, raw, list(maskingpolicies_by_namespace.get(namespace, [])))
    except KubeError as exc:
        raise kopf.TemporaryError(f"Kubernetes API: {exc}", delay=5) from exc
    new = status_for(outcome, raw, utcnow())
    if not status_changed(raw, new):
        return
    patch.status.update(new)
    before = (raw.get("status") or {})
    if outcome.ready:
        if before.get("configHash") != outcome.config_hash or not _was_ready(raw):
            kopf.info(body, reason=RECONCILED, message=f"config {outcome.config_hash}: {outcome.message}")
    else:
        kopf.warn(body, reason=outcome.reason, message=outcome.message)
    logger.info("%s: %s", outcome.reason, outcome.message)


def _was_ready(body: Mapping[str, Any]) -> bool:
    ready = condition((body.get("status") or {}).get("conditions") or [], READY)
    return ready is not None and ready.get("status") == "True"


# --------------------------------------------------------------------------- indexes and triggers


def connections_by_namespace(namespace: str, body: kopf.Body, **_: Any) -> dict[str, Any]:
    return {namespace: slim(body)}


def connections_by_secret(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Any, SecretUser]:
    try:
        conn = parse_connection(body)
    except ConfigError:
        return {}
    version = body.metadata.annotations.get(SECRET_VERSION_ANNOTATION)
    user = SecretUser(name, waiting_for_secret(body), version)
    return {(namespace, secret): user for secret in build.secret_names(conn)}


async def secret_event(type: str | None, name: str, namespace: str, body: kopf.Body, memo: kopf.Memo,
                       logger: kopf.Logger, connections_by_secret: kopf.Index[Any, SecretUser],
                       **_: Any) -> None:
    """A Secret a Connection needs came or went: re-reconcile the Connections waiting on it."""
    users = list(connections_by_secret.get((namespace, name), []))
    if not users:
        return
    ctx: OperatorContext = memo["sidegate"]
    deleted = type == "DELETED"
    version = f"{name}:{'deleted' if deleted else body.metadata.get('resourceVersion')}"
    for user in users:
        if not (deleted or user.waiting) or user.annotation == version:
            continue
        logger.info("Secret %s/%s changed: re-reconciling Connection %s", namespace, name, user.connection)
        try:
            await ctx.kube.merge_patch(connection_path(namespace, user.connection),
                                       {"metadata": {"annotations": {SECRET_VERSION_ANNOTATION: version}}})
        except KubeError as exc:
            if exc.status != 404:
                raise


def register(registry: kopf.OperatorRegistry) -> None:
    # cast: kopf's handler protocols cannot know the index kwargs these functions take.
    kopf.index(*CONNECTIONS, registry=registry)(cast(Any, connections_by_namespace))
    kopf.index(*CONNECTIONS, registry=registry)(cast(Any, connections_by_secret))
    for on in (kopf.on.create, kopf.on.update, kopf.on.resume):
        on(*CONNECTIONS, registry=registry, id="reconcile", backoff=5)(cast(Any, reconcile_connection))
    kopf.on.event("v1", "secrets", registry=registry)(cast(Any, secret_event))


__all__ = [
    "Outcome",
    "conditions_for",
    "missing_secrets",
    "reconcile",
    "register",
    "signing_key_problem",
    "status_for",
]
