"""A MaskingPolicy change re-renders every Connection it touches.

The policies of a namespace are held in a kopf index (what ``reconcile`` renders from). When one
changes, each Connection of that namespace whose applicable policies now hash differently gets
its ``sidegate.dev/policy-hash`` annotation bumped, which kopf turns into an ordinary update of
that Connection. Deletions work the same way: the index has already dropped the policy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, cast

import kopf

from sidegate_proxy.config import (
    API_VERSION,
    GROUP,
    ConfigError,
    config_hash,
    parse_masking_policy,
    render_config,
)

from .build import select_policies
from .connection import (
    CONNECTIONS,
    INVALID_POLICY,
    POLICY_HASH_ANNOTATION,
    READY,
    Outcome,
    conditions_for,
    slim,
    utcnow,
)
from .kube import KubeError, OperatorContext, connection_path, resource_path

MASKINGPOLICIES = (GROUP, "v1alpha1", "maskingpolicies")
MASKINGPOLICY_API = (API_VERSION, "MaskingPolicy")


def policy_fingerprint(conn_obj: Mapping[str, Any], masking_objs: Iterable[Mapping[str, Any]]) -> str:
    """A hash of exactly the policies that apply to one Connection (or of why they cannot)."""
    try:
        chosen = select_policies(conn_obj, masking_objs)
    except ConfigError as exc:
        return config_hash({"error": str(exc)})
    return config_hash({"maskingPolicies": render_config(conn_obj, chosen)["maskingPolicies"]})


def applies_to(policy_obj: Mapping[str, Any], connections: Iterable[Mapping[str, Any]]) -> list[str]:
    """Names of the Connections a (valid) policy applies to, sorted."""
    policy = parse_masking_policy(policy_obj)
    return sorted(
        str(c["metadata"]["name"])
        for c in connections
        if policy.applies_to(str(c["metadata"]["name"]), (c.get("metadata") or {}).get("labels") or {})
    )


def maskingpolicies_by_namespace(namespace: str, body: kopf.Body, **_: Any) -> dict[str, Any]:
    return {namespace: slim(body)}


async def maskingpolicy_event(type: str | None, name: str, namespace: str, body: kopf.Body, patch: kopf.Patch,
                              memo: kopf.Memo, logger: kopf.Logger,
                              connections_by_namespace: kopf.Index[str, Any],
                              maskingpolicies_by_namespace: kopf.Index[str, Any], **_: Any) -> None:
    ctx: OperatorContext = memo["sidegate"]
    policies = list(maskingpolicies_by_namespace.get(namespace, []))
    connections = list(connections_by_namespace.get(namespace, []))
    for conn in connections:
        fingerprint = policy_fingerprint(conn, policies)
        annotations = conn["metadata"].get("annotations") or {}
        if annotations.get(POLICY_HASH_ANNOTATION) == fingerprint:
            continue
        conn_name = conn["metadata"]["name"]
        logger.info("MaskingPolicy %s changed: re-rendering Connection %s", name, conn_name)
        try:
            await ctx.kube.merge_patch(connection_path(namespace, conn_name),
                                       {"metadata": {"annotations": {POLICY_HASH_ANNOTATION: fingerprint}}})
        except KubeError as exc:
            if exc.status != 404:
                raise
    if type != "DELETED":
        write_status(body, patch, connections)


def write_status(body: kopf.Body, patch: kopf.Patch, connections: Iterable[Mapping[str, Any]]) -> None:
    """Which Connections the policy applies to, or why it is invalid (only when that changed)."""
    raw = dict(body)
    status = raw.get("status") or {}
    generation = raw["metadata"].get("generation")
    try:
        names = applies_to(raw, connections)
        outcome = Outcome(True, "Valid", f"applies to {len(names)} Connection(s)")
    except ConfigError as exc:
        names, outcome = [], Outcome(False, INVALID_POLICY, str(exc))
    previous = status.get("conditions") or []
    conds = [c for c in conditions_for(outcome, previous, generation, utcnow()) if c["type"] == READY]
    new = {"conditions": conds, "observedGeneration": generation, "connections": names}
    if any(status.get(k) != v for k, v in new.items()):
        patch.status.update(new)
        if not outcome.ready:
            kopf.warn(body, reason=INVALID_POLICY, message=outcome.message)


async def connection_event(namespace: str, memo: kopf.Memo, connections_by_namespace: kopf.Index[str, Any],
                           maskingpolicies_by_namespace: kopf.Index[str, Any], **_: Any) -> None:
    """A Connection came, went or was relabelled: keep the policies' ``status.connections`` true."""
    ctx: OperatorContext = memo["sidegate"]
    connections = list(connections_by_namespace.get(namespace, []))
    for policy in list(maskingpolicies_by_namespace.get(namespace, [])):
        try:
            names = applies_to(policy, connections)
        except ConfigError:
            continue
        if (policy.get("status") or {}).get("connections") == names:
            continue
        path = resource_path(*MASKINGPOLICY_API, namespace, policy["metadata"]["name"]) + "/status"
        try:
            await ctx.kube.merge_patch(path, {"status": {"connections": names}})
        except KubeError as exc:
            if exc.status != 404:
                raise


def register(registry: kopf.OperatorRegistry) -> None:
    kopf.index(*MASKINGPOLICIES, registry=registry)(cast(Any, maskingpolicies_by_namespace))
    kopf.on.event(*MASKINGPOLICIES, registry=registry)(cast(Any, maskingpolicy_event))
    kopf.on.event(*CONNECTIONS, registry=registry)(cast(Any, connection_event))
