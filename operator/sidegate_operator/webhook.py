"""Pod admission: inject the proxy sidecar into pods that ask for it.

kopf serves the webhook; the MutatingWebhookConfiguration is ours, not kopf-managed, because Pods
need what kopf's generated one lacks: a namespaceSelector that spares kube-system and the
operator's own namespace (else the operator could not restart itself), a short timeout and
``reinvocationPolicy: IfNeeded``. A pod naming a Connection that does not exist is refused with a
message saying so, rather than started without its proxy.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, cast

import kopf

from sidegate_proxy.config import GROUP, ConfigError, Connection, parse_connection

from .build import INJECT_ANNOTATION, inject_sidecar, token_exchange_args
from .kube import OperatorContext, connection_path

WEBHOOK_ID = "sidegate-inject"
WEBHOOK_NAME = "inject.sidegate.dev"
CONFIGURATION_NAME = "sidegate-inject"
OPT_OUT_LABEL = f"{GROUP}/injection"


class InjectionError(ValueError):
    """A pod's inject annotation cannot be honoured; the message is shown to whoever created it."""


def requested(annotations: Mapping[str, str] | None) -> list[str]:
    """The Connection names in ``sidegate.dev/inject`` (empty when the pod does not ask)."""
    value = (annotations or {}).get(INJECT_ANNOTATION)
    if value is None:
        return []
    names = [n.strip() for n in str(value).split(",")]
    if not all(names):
        raise InjectionError(f"{INJECT_ANNOTATION}: expected a comma-separated list of Connection names, "
                             f"got {value!r}")
    return list(dict.fromkeys(names))


def resolve(names: Sequence[str], namespace: str, found: Mapping[str, Mapping[str, Any] | None],
            ) -> list[Connection]:
    """The Connections a pod asked for, checked to be servable together by one sidecar."""
    conns: list[Connection] = []
    ports: dict[int, str] = {}
    for name in names:
        obj = found.get(name)
        if obj is None:
            raise InjectionError(f"{INJECT_ANNOTATION}: Connection {namespace}/{name} does not exist")
        try:
            conn = parse_connection(obj)
        except ConfigError as exc:
            raise InjectionError(f"{INJECT_ANNOTATION}: Connection {namespace}/{name} is invalid: "
                                 f"{exc}") from None
        if conn.mode != "sidecar":
            raise InjectionError(f"{INJECT_ANNOTATION}: Connection {namespace}/{name} is in {conn.mode} "
                                 "mode; connect to its Service instead of injecting it")
        other = ports.setdefault(conn.listen_port, name)
        if other != name:
            raise InjectionError(f"{INJECT_ANNOTATION}: Connections {other} and {name} both listen on "
                                 f"127.0.0.1:{conn.listen_port}")
        conns.append(conn)
    try:
        token_exchange_args(conns)
    except ConfigError as exc:
        raise InjectionError(f"{INJECT_ANNOTATION}: {exc.message}") from None
    return conns


async def mutate_pod(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger,
                     connections_by_namespace: kopf.Index[str, Any], **_: Any) -> None:
    ctx: OperatorContext = memo["sidegate"]
    namespace = body.metadata.namespace
    try:
        names = requested(body.metadata.annotations)
    except InjectionError as exc:
        raise kopf.AdmissionError(str(exc), code=400) from None
    if not names:
        return
    if not namespace:
        raise kopf.AdmissionError("cannot tell the pod's namespace", code=400)
    known = {c["metadata"]["name"]: c for c in connections_by_namespace.get(namespace, [])}
    found: dict[str, Mapping[str, Any] | None] = {}
    for name in names:
        # The index can lag a Connection created a moment ago: ask the API server before refusing.
        found[name] = known.get(name) or await ctx.kube.get(connection_path(namespace, name))
    try:
        conns = resolve(names, namespace, found)
    except InjectionError as exc:
        raise kopf.AdmissionError(str(exc), code=400) from None
    logger.info("injecting the Sidegate sidecar for %s", ", ".join(names))
    patch.fns.append(functools.partial(_inject, conns=tuple(conns), image=ctx.image))


def _inject(pod: dict[str, Any], *, conns: Sequence[Connection], image: str) -> None:
    inject_sidecar(pod, conns, image)


class WebhookServer(kopf.WebhookServer):
    """kopf's server, plus the request's namespace filled into pods created without one
    (pods of controllers arrive with an empty ``metadata.namespace``)."""

    async def __call__(self, fn: Any) -> AsyncIterator[Any]:
        async def with_namespace(request: dict[str, Any], **kwargs: Any) -> Any:
            payload = request.get("request") or {}
            obj = payload.get("object")
            if isinstance(obj, dict) and payload.get("namespace"):
                meta = obj.setdefault("metadata", {})
                if not meta.get("namespace"):
                    meta["namespace"] = payload["namespace"]
            return await fn(request, **kwargs)

        async for client_config in super().__call__(cast(Any, with_namespace)):
            yield client_config


def build_webhook_configuration(client_config: Mapping[str, Any], *, operator_namespace: str | None,
                                name: str = CONFIGURATION_NAME) -> dict[str, Any]:
    """The MutatingWebhookConfiguration for pod injection, pointing at ``client_config``
    (``{"service": ...}`` in a cluster, ``{"url": ...}`` in tests, plus ``caBundle``)."""
    skip = ["kube-system", *([operator_namespace] if operator_namespace else [])]
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "sidegate",
                                              "app.kubernetes.io/component": "webhook"}},
        "webhooks": [{
            "name": WEBHOOK_NAME,
            "clientConfig": dict(client_config),
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                       "resources": ["pods"], "scope": "Namespaced"}],
            "namespaceSelector": {"matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": skip},
                {"key": OPT_OUT_LABEL, "operator": "NotIn", "values": ["disabled"]},
            ]},
            # Only annotated pods reach the webhook, so failurePolicy Fail (an injection must never
            # be skipped silently) cannot block unrelated pods while the operator is down.
            "matchConditions": [{
                "name": "sidegate-inject-annotated",
                "expression": (f"has(object.metadata.annotations) && "
                               f"'{INJECT_ANNOTATION}' in object.metadata.annotations"),
            }],
            "failurePolicy": "Fail",
            "matchPolicy": "Equivalent",
            "sideEffects": "None",
            "timeoutSeconds": 5,
            "reinvocationPolicy": "IfNeeded",
            "admissionReviewVersions": ["v1"],
        }],
    }


def register(registry: kopf.OperatorRegistry) -> None:
    # cast: kopf's handler protocol cannot know the index kwarg mutate_pod takes.
    kopf.on.mutate("v1", "pods", id=WEBHOOK_ID, operation="CREATE", registry=registry)(cast(Any, mutate_pod))
