"""Just-in-time approvals: the data plane's side of an AccessRequest.

A statement that a ``requireApproval`` guardrail holds runs only under an AccessRequest that an
approver reviewed. The proxy never decides who may approve: it reads ``spec.review``, which
admission in the API server guarantees was written by an approver of the Connection, who is not
the requester, and which can never change once made. Status written by the operator is only a
cache: a request counts as approved when its *spec* says so, so a forged ``status.phase`` grants
nothing and approvals still work while the operator is down.

The rules, all in the pure ``request_state``/``usable`` functions:

* an approval is bound to the sha256 of the exact statement text: approving X never allows Y;
* a statement-scoped approval is used at most once, marked ``Used`` by a status patch that
  applies only to the version that was read, so two replicas cannot both use it;
* denied, expired and used requests authorise nothing; an approval without a recorded expiry
  expires ``ttl`` after the request was created (the earliest it could have been decided).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from .audit import rfc3339
from .config import API_VERSION, GROUP, ConfigError, Connection, parse_duration
from .kube import ACCESS_REQUESTS, Conflict, KubeClient, KubeError, NotFound
from .policy import ApprovalRef, Caller, Decision

log = logging.getLogger(__name__)

KIND = "AccessRequest"
CONNECTION_LABEL = f"{GROUP}/connection"
REQUESTER_LABEL = f"{GROUP}/requester-hash"
MAX_STATEMENT = 65536  # the CRD's spec.statement maxLength
MAX_REASON = 4096

State = Literal["pending", "approved", "denied", "expired", "used"]


def statement_hash(text: str) -> str:
    """What an approval is bound to: sha256 of the exact statement text, ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def requester_hash(subject: str) -> str:
    """A label-safe stand-in for a subject (subjects hold ':' and '/', labels cannot)."""
    return hashlib.sha256(subject.encode("utf-8")).hexdigest()[:40]


_NOT_DNS = re.compile(r"[^a-z0-9-]+")


def short_subject(subject: str) -> str:
    """The readable tail of a subject for object names: ``system:serviceaccount:ci:deployer`` ->
    ``deployer``, ``repo:acme/api:ref:refs/heads/main`` -> ``main``."""
    tail = re.split(r"[:/@]", subject.rstrip(":/@"))[-1].lower()
    tail = _NOT_DNS.sub("-", tail).strip("-")[:20].strip("-")
    return tail or "caller"


def parse_time(value: Any) -> float | None:
    """An RFC 3339 timestamp from the API server to epoch seconds (None when absent or bad)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        return None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


# --------------------------------------------------------------------------- the pure rules


def request_state(obj: Mapping[str, Any], now: float, ttl_seconds: int) -> State:
    """What an AccessRequest allows right now, from the reviewed spec first and status second."""
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    meta = obj.get("metadata") or {}
    phase = status.get("phase")
    if phase == "Used" or status.get("usedAt"):
        return "used"
    if phase == "Expired":
        return "expired"
    decision = (spec.get("review") or {}).get("decision")
    if decision == "Denied" or phase == "Denied":
        return "denied"
    created = parse_time(meta.get("creationTimestamp"))
    if created is None:
        created = now  # only objects not yet stored; the API server always sets it
    if decision == "Approved":
        expires = parse_time(status.get("expiresAt"))
        if expires is None:
            expires = created + approval_window(spec, ttl_seconds)
        return "approved" if now < expires else "expired"
    return "pending" if now < created + ttl_seconds else "expired"


def approval_window(spec: Mapping[str, Any], ttl_seconds: int) -> int:
    """How long an approval lasts: ``ttl``, and for a session the requested duration within it."""
    if spec.get("scope") == "session":
        try:
            return min(parse_duration(spec.get("duration") or 0, "spec.duration"), ttl_seconds)
        except ConfigError:
            return 0
    return ttl_seconds


def is_for(obj: Mapping[str, Any], connection: Connection, subject: str) -> bool:
    """Same Connection and exactly the same requester (labels only narrow the list)."""
    spec = obj.get("spec") or {}
    meta = obj.get("metadata") or {}
    return (
        meta.get("namespace") == connection.namespace
        and spec.get("connection") == connection.name
        and spec.get("requester") == subject
    )


def covers_statement(obj: Mapping[str, Any], statement: str) -> bool:
    spec = obj.get("spec") or {}
    return (
        spec.get("scope", "statement") == "statement"
        and spec.get("statement") == statement
        and spec.get("statementHash", statement_hash(statement)) == statement_hash(statement)
    )


def covers_session(obj: Mapping[str, Any]) -> bool:
    return (obj.get("spec") or {}).get("scope") == "session"


def usable(
    obj: Mapping[str, Any], *, connection: Connection, subject: str, statement: str, now: float
) -> bool:
    """True when ``obj`` lets ``subject`` run ``statement`` on ``connection`` now."""
    if not is_for(obj, connection, subject):
        return False
    if request_state(obj, now, connection.approval.ttl_seconds) != "approved":
        return False
    return covers_statement(obj, statement) or covers_session(obj)


def access_request(
    connection: Connection, caller: Caller, statement: str, reason: str | None, session_id: str
) -> dict[str, Any]:
    """The AccessRequest the proxy creates for a held statement."""
    spec: dict[str, Any] = {
        "connection": connection.name,
        "requester": caller.subject,
        "requesterGroups": sorted(caller.groups)[:256],
        "scope": "statement",
        "statement": statement,
        "statementHash": statement_hash(statement),
        "sessionId": session_id[:256],
    }
    if reason:
        spec["reason"] = reason[:MAX_REASON]
    prefix = f"{connection.name[:30].rstrip('-')}-{short_subject(caller.subject)}-"
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "generateName": prefix,
            "namespace": connection.namespace,
            "labels": {CONNECTION_LABEL: connection.name, REQUESTER_LABEL: requester_hash(caller.subject)},
        },
        "spec": spec,
    }


def review_hint(namespace: str, name: str) -> str:
    return f"kubectl sidegate approve {name} -n {namespace}"


# --------------------------------------------------------------------------- the broker


@dataclass(frozen=True)
class ApprovalOutcome:
    """What the front end does with a held statement; ``message`` is shown to the client."""

    allowed: bool
    request_name: str | None = None
    reviewer: str | None = None
    message: str = ""
    namespace: str | None = None

    @property
    def approval(self) -> ApprovalRef | None:
        """For the audit event of a statement that ran under an approval."""
        if not self.allowed or self.request_name is None or self.namespace is None:
            return None
        return ApprovalRef(self.namespace, self.request_name, self.reviewer)


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name"))


def _reviewer(obj: Mapping[str, Any]) -> str | None:
    reviewer = ((obj.get("spec") or {}).get("review") or {}).get("reviewer")
    return str(reviewer) if reviewer else None


class ApprovalBroker:
    """Finds, creates, waits for and consumes AccessRequests for one Connection."""

    def __init__(
        self,
        kube: KubeClient,
        connection: Connection,
        *,
        clock: Callable[[], float] = time.time,
        mark_attempts: int = 5,
    ) -> None:
        self.kube = kube
        self.connection = connection
        self._clock = clock
        self._mark_attempts = mark_attempts

    @property
    def namespace(self) -> str:
        return self.connection.namespace

    async def authorize(
        self, caller: Caller, statement: str, reason: str | None, session_id: str
    ) -> ApprovalOutcome:
        """Allowed only under a usable approval; otherwise a pending AccessRequest, held for
        ``holdSeconds``. Any failure to reach the API server refuses (fail closed)."""
        if len(statement) > MAX_STATEMENT:
            return ApprovalOutcome(False, message=(
                f"approval required, but the statement is longer than {MAX_STATEMENT} characters "
                "and cannot be put in an AccessRequest"))
        try:
            return await self._authorize(caller, statement, reason, session_id)
        except KubeError as exc:
            log.error("connection %s: approvals unavailable: %s", self.connection.ref, exc)
            return ApprovalOutcome(False, message=f"approval required, but AccessRequests are unavailable: "
                                                  f"{exc.message or exc}")

    async def _authorize(
        self, caller: Caller, statement: str, reason: str | None, session_id: str
    ) -> ApprovalOutcome:
        pending: dict[str, Any] | None = None
        for obj in await self._candidates(caller.subject):
            now = self._clock()
            if usable(obj, connection=self.connection, subject=caller.subject, statement=statement, now=now):
                if covers_session(obj):
                    return self._allowed(obj)
                used = await self._mark_used(obj, caller.subject, statement, session_id)
                if used is not None:
                    return self._allowed(used)
            elif (
                pending is None
                and is_for(obj, self.connection, caller.subject)
                and covers_statement(obj, statement)
                and request_state(obj, now, self.connection.approval.ttl_seconds) == "pending"
            ):
                pending = obj  # asked before and not reviewed yet: wait on that one, not a duplicate
        if pending is None:
            body = access_request(self.connection, caller, statement, reason, session_id)
            pending = await self.kube.create(ACCESS_REQUESTS, self.namespace, body)
            log.info("connection %s: AccessRequest %s created for %s", self.connection.ref,
                     _name(pending), caller.subject)
        hold = self.connection.approval.hold_seconds
        final = await self._wait(pending, hold) if hold > 0 else pending
        state = request_state(final, self._clock(), self.connection.approval.ttl_seconds)
        name = _name(final)
        if state == "approved" and covers_statement(final, statement):
            used = await self._mark_used(final, caller.subject, statement, session_id)
            if used is not None:
                return self._allowed(used)
            state = "used"
        if state == "pending":
            waited = f" (waited {hold}s)" if hold > 0 else ""
            message = (f"approval required: AccessRequest {self.namespace}/{name} is waiting for a review"
                       f"{waited}; an approver can run `{review_hint(self.namespace, name)}`, then retry")
        else:
            message = f"approval required: AccessRequest {self.namespace}/{name} is {state}"
        return ApprovalOutcome(False, name, _reviewer(final), message, self.namespace)

    def _allowed(self, obj: Mapping[str, Any]) -> ApprovalOutcome:
        name = _name(obj)
        reviewer = _reviewer(obj)
        return ApprovalOutcome(True, name, reviewer, f"approved by {reviewer} (AccessRequest {name})",
                               self.namespace)

    async def _candidates(self, subject: str) -> list[dict[str, Any]]:
        selector = f"{CONNECTION_LABEL}={self.connection.name},{REQUESTER_LABEL}={requester_hash(subject)}"
        listed = await self.kube.list(ACCESS_REQUESTS, self.namespace, label_selector=selector)
        # Oldest first: an earlier approval is used before a later one.
        return sorted(listed.items, key=lambda o: str((o.get("metadata") or {}).get("creationTimestamp")))

    async def _wait(self, obj: dict[str, Any], hold: int) -> dict[str, Any]:
        """The request once reviewed (or as last seen when ``hold`` seconds pass): a watch, not a poll."""
        latest = obj
        name = _name(obj)
        rv = str((obj.get("metadata") or {}).get("resourceVersion") or "") or None
        ttl = self.connection.approval.ttl_seconds
        try:
            async with asyncio.timeout(hold):
                async for event in self.kube.watch(
                    ACCESS_REQUESTS, self.namespace, field_selector=f"metadata.name={name}",
                    resource_version=rv,
                ):
                    if event.type == "DELETED":
                        return {**latest, "status": {**(latest.get("status") or {}), "phase": "Expired"}}
                    latest = event.object
                    if request_state(latest, self._clock(), ttl) != "pending":
                        return latest
        except TimeoutError:
            pass
        return latest

    async def _mark_used(
        self, obj: dict[str, Any], subject: str, statement: str, session_id: str
    ) -> dict[str, Any] | None:
        """Consume a statement approval exactly once: the status patch applies only to the version
        read, and a lost race re-reads and re-checks. None when it is no longer usable."""
        for _ in range(self._mark_attempts):
            now = self._clock()
            if not usable(obj, connection=self.connection, subject=subject, statement=statement, now=now):
                return None
            used = {"phase": "Used", "usedAt": rfc3339(now), "usedBySession": session_id[:256]}
            ops: list[dict[str, Any]]
            if obj.get("status"):
                ops = [{"op": "add", "path": f"/status/{k}", "value": v} for k, v in used.items()]
            else:
                ops = [{"op": "add", "path": "/status", "value": used}]
            rv = str(obj["metadata"]["resourceVersion"])
            try:
                return await self.kube.json_patch(
                    ACCESS_REQUESTS, self.namespace, _name(obj), ops,
                    subresource="status", resource_version=rv,
                )
            except Conflict:
                try:
                    obj = await self.kube.get(ACCESS_REQUESTS, self.namespace, _name(obj))
                except NotFound:
                    return None
        return None


# --------------------------------------------------------------------------- front-end hooks


class _PgSession(Protocol):
    id: str
    caller: Caller | None


class _Verdict(Protocol):
    @property
    def decision(self) -> Decision: ...


def pg_approval_hook(
    broker: ApprovalBroker,
) -> Callable[[_PgSession, str, _Verdict], Awaitable[Decision]]:
    """``ProxyServer(on_approval_required=...)`` for the PostgreSQL proxy: hold the statement
    until it is approved. The reason is the session's ``sidegate.reason`` (when the proxy tracks
    it as ``session.reason``) or else its ``application_name``."""

    async def hook(session: _PgSession, sql: str, verdict: _Verdict) -> Decision:
        held = verdict.decision
        if session.caller is None:
            return held
        params = getattr(session, "params", None) or {}
        reason = getattr(session, "reason", None) or params.get("application_name")
        outcome = await broker.authorize(session.caller, sql, reason, session.id)
        return Decision("allow" if outcome.allowed else "requireApproval", held.rule, outcome.message,
                        approval=outcome.approval)

    return hook
