"""AccessRequest lifecycle: Pending -> Approved | Denied -> Used | Expired, written as status.

The operator only *records* what happened; it grants nothing. The review in ``spec.review`` is
guarded by admission (``review_admission``), and the proxy checks the reviewed spec itself
(``sidegate_proxy.approvals``), so a stopped operator delays status, not approvals.

Timing rules, shared with the proxy through ``approvals.approval_window``:

* a request nobody reviews expires ``approval.ttl`` after it was created;
* an approval lasts ``ttl`` from the moment it is recorded (``decidedAt``); for scope session it
  lasts ``spec.duration``, capped by ``ttl`` (a reviewer cannot grant more than the Connection
  allows);
* ``Used``, ``Expired`` and ``Denied`` are final: nothing here moves a request out of them.

kopf's own bookkeeping goes to annotations (see ``main.make_settings``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, cast

import kopf

from sidegate_proxy.approvals import approval_window, parse_time, statement_hash
from sidegate_proxy.audit import rfc3339
from sidegate_proxy.config import GROUP, ConfigError, parse_connection

from .kube import OperatorContext, connection_path

ACCESSREQUESTS = (GROUP, "v1alpha1", "accessrequests")
FINAL = ("Used", "Expired", "Denied")
EXPIRY_INTERVAL = 10.0


def desired_status(body: Mapping[str, Any], ttl_seconds: int, now: float) -> dict[str, Any]:
    """The status fields that must change (empty when none): pure, so it is tested alone."""
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    meta = body.get("metadata") or {}
    phase = status.get("phase")
    if phase in ("Used", "Expired") or status.get("usedAt"):
        return {"phase": "Used"} if status.get("usedAt") and phase != "Used" else {}
    want: dict[str, Any] = {}
    requested = status.get("requestedAt") or meta.get("creationTimestamp") or rfc3339(now)
    want["requestedAt"] = requested
    if spec.get("scope", "statement") == "statement" and isinstance(spec.get("statement"), str):
        want["statementHash"] = statement_hash(spec["statement"])
    review = spec.get("review") or {}
    decision = review.get("decision")
    if decision in ("Approved", "Denied"):
        decided = status.get("decidedAt") or rfc3339(now)
        want["decidedAt"] = decided
        want["reviewer"] = review.get("reviewer")
        if decision == "Denied":
            want["phase"] = "Denied"
        else:
            expires = status.get("expiresAt") or rfc3339(
                (parse_time(decided) or now) + approval_window(spec, ttl_seconds))
            want["expiresAt"] = expires
            want["phase"] = "Approved" if now < (parse_time(expires) or 0) else "Expired"
    elif phase != "Denied":
        created = parse_time(requested) or now
        want["phase"] = "Pending" if now < created + ttl_seconds else "Expired"
    if phase == "Denied":
        want["phase"] = "Denied"
    return {k: v for k, v in want.items() if status.get(k) != v}


async def connection_ttl(ctx: OperatorContext, namespace: str, name: str | None) -> int:
    """The Connection's approval ttl; 0 (everything expires) when it is gone or invalid."""
    if not name:
        return 0
    obj = await ctx.kube.get(connection_path(namespace, name))
    if obj is None:
        return 0
    try:
        return parse_connection(obj).approval.ttl_seconds
    except ConfigError:
        return 0


async def reconcile(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, logger: kopf.Logger,
                    **_: Any) -> None:
    ctx: OperatorContext = memo["sidegate"]
    spec = body.get("spec") or {}
    ttl = await connection_ttl(ctx, body.metadata.namespace or "", spec.get("connection"))
    changes = desired_status(body, ttl, time.time())
    if not changes:
        return
    patch.setdefault("status", {}).update(changes)
    phase = changes.get("phase")
    meta = body.metadata
    if phase == "Pending":
        note = (f"{spec.get('requester')} asks to run a held statement on {spec.get('connection')}; review "
                f"with: kubectl sidegate approve|deny {meta.name} -n {meta.namespace}")
    elif phase in ("Approved", "Denied"):
        reviewer = changes.get("reviewer") or (body.get("status") or {}).get("reviewer")
        until = f" until {changes.get('expiresAt')}" if phase == "Approved" else ""
        note = f"{phase.lower()} by {reviewer}{until}"
    elif phase:
        note = phase.lower()
    else:
        return
    # Explicit Events (kopf does not post log lines unless told to): what a reviewer reads.
    post = kopf.warn if phase == "Denied" else kopf.info
    post(cast(Any, body), reason=f"AccessRequest{phase}", message=note)
    logger.info(note)


def _open(status: Mapping[str, Any], **_: Any) -> bool:
    return status.get("phase") not in FINAL and not status.get("usedAt")


def register(registry: kopf.OperatorRegistry, *, expiry_interval: float = EXPIRY_INTERVAL) -> None:
    handler = cast(Any, reconcile)
    kopf.on.create(*ACCESSREQUESTS, id="accessrequest", registry=registry)(handler)
    kopf.on.resume(*ACCESSREQUESTS, id="accessrequest-resume", registry=registry, when=_open)(handler)
    kopf.on.field(*ACCESSREQUESTS, field="spec.review", id="accessrequest-review",
                  registry=registry)(handler)
    kopf.timer(*ACCESSREQUESTS, id="accessrequest-expiry", interval=expiry_interval,
               registry=registry, when=_open)(handler)
