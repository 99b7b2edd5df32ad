"""Who may review an AccessRequest: the rules the API server enforces before a review exists.

Two layers check the same review. The ValidatingAdmissionPolicy in
``manifests/base/review-admission-policy.yaml`` runs inside the API server, so the rules that need
nothing but the request (reviewer is the authenticated user, not the requester, decisions never
change, a new request carries no review) hold even while the operator is down. This webhook adds
the rule that needs the Connection: the reviewer must be one of its approvers, by user name or by
a group of the *authenticated* user (``userinfo``), never by anything written in the object.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, cast

import kopf

from sidegate_proxy.approvals import statement_hash
from sidegate_proxy.config import GROUP, ConfigError, Connection, parse_connection

from .kube import OperatorContext, connection_path

WEBHOOK_ID = "review.accessrequests.sidegate.dev"
CONFIGURATION_NAME = "sidegate-accessrequest-review"


class ReviewRefused(ValueError):
    """An AccessRequest change admission must refuse; the message goes to the user."""


def _review(obj: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return ((obj or {}).get("spec") or {}).get("review") or {}


def check_request(
    operation: str,
    new: Mapping[str, Any],
    old: Mapping[str, Any] | None,
    username: str,
    groups: Collection[str],
    connection: Connection | None,
) -> None:
    """Raise ``ReviewRefused`` unless the change is allowed. Pure: the webhook fetches the rest."""
    spec = new.get("spec") or {}
    if operation == "CREATE":
        if spec.get("review"):
            raise ReviewRefused("a new AccessRequest cannot carry spec.review: "
                                "approvers review it afterwards")
        given = spec.get("statementHash")
        if given is not None and isinstance(spec.get("statement"), str) and given != statement_hash(
                spec["statement"]):
            raise ReviewRefused("spec.statementHash does not match spec.statement")
        return
    if operation != "UPDATE" or old is None:
        return
    old_spec = old.get("spec") or {}
    changed = sorted(k for k in {*spec, *old_spec} - {"review"} if spec.get(k) != old_spec.get(k))
    if changed:
        raise ReviewRefused(f"only spec.review can change after creation; changed: "
                            f"{', '.join('spec.' + k for k in changed)}")
    review, old_review = _review(new), _review(old)
    if old_review.get("decision"):
        if dict(review) != dict(old_review):
            raise ReviewRefused(f"this AccessRequest was already {old_review['decision'].lower()} by "
                                f"{old_review.get('reviewer')}; a review cannot be changed")
        return
    if review == old_review:
        return
    reviewer = review.get("reviewer")
    if reviewer != username:
        raise ReviewRefused(f"spec.review.reviewer must be your own user name {username!r}, not {reviewer!r}")
    if not review.get("decision"):
        return
    if username == spec.get("requester"):
        raise ReviewRefused("the requester cannot review their own AccessRequest")
    if connection is None:
        raise ReviewRefused(f"Connection {spec.get('connection')!r} does not exist or is invalid: "
                            "nobody can review requests for it")
    approvers = connection.approval
    if username not in approvers.approver_users and not set(groups) & set(approvers.approver_groups):
        who = [*(f"user {u}" for u in approvers.approver_users),
               *(f"group {g}" for g in approvers.approver_groups)]
        raise ReviewRefused(f"{username} is not an approver of Connection {connection.name} "
                            f"(approvers: {', '.join(who) or 'none'})")


async def validate_review(body: kopf.Body, old: Any, operation: str | None, userinfo: Mapping[str, Any],
                          memo: kopf.Memo, subresource: str | None = None, **_: Any) -> None:
    if subresource:
        return  # status is the operator's and the proxy's, guarded by RBAC
    ctx: OperatorContext = memo["sidegate"]
    new = cast(Mapping[str, Any], body)
    connection = None
    decision_added = operation == "UPDATE" and _review(new).get("decision") and not _review(old).get(
        "decision")
    if decision_added:
        name = (new.get("spec") or {}).get("connection")
        obj = await ctx.kube.get(connection_path(body.metadata.namespace or "", str(name))) if name else None
        try:
            connection = parse_connection(obj) if obj is not None else None
        except ConfigError:
            connection = None
    try:
        check_request(operation or "", new, old, str(userinfo.get("username") or ""),
                      tuple(userinfo.get("groups") or ()), connection)
    except ReviewRefused as exc:
        raise kopf.AdmissionError(str(exc), code=403) from None


def build_webhook_configuration(client_config: Mapping[str, Any], *, name: str = CONFIGURATION_NAME,
                                ) -> dict[str, Any]:
    """The ValidatingWebhookConfiguration for reviews (``client_config``: service or url, caBundle).

    ``failurePolicy: Fail``: with the operator down, reviews wait (the policy in the API server
    still guards identity); they are never let through unchecked.
    """
    client = dict(client_config)
    if "url" in client:
        client["url"] = str(client["url"]).rstrip("/") + "/" + WEBHOOK_ID
    if "service" in client:
        client["service"] = {**client["service"], "path": "/" + WEBHOOK_ID}
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "sidegate",
                                              "app.kubernetes.io/component": "webhook"}},
        "webhooks": [{
            "name": WEBHOOK_ID,
            "clientConfig": client,
            "rules": [{"apiGroups": [GROUP], "apiVersions": ["v1alpha1"], "operations": ["CREATE", "UPDATE"],
                       "resources": ["accessrequests"], "scope": "Namespaced"}],
            "failurePolicy": "Fail",
            "matchPolicy": "Equivalent",
            "sideEffects": "None",
            "timeoutSeconds": 5,
            "admissionReviewVersions": ["v1"],
        }],
    }


def register(registry: kopf.OperatorRegistry) -> None:
    kopf.on.validate(GROUP, "v1alpha1", "accessrequests", id=WEBHOOK_ID, operations=["CREATE", "UPDATE"],
                     registry=registry)(cast(Any, validate_review))
