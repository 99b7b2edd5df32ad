"""An audit sink that tells ``kubectl describe connection`` what happened, without flooding etcd.

Only what an operator of the cluster wants to see becomes an events.k8s.io/v1 Event on the
Connection: sessions starting (or refused) and ending, blocked statements, statements held for
approval and statements that ran under one. Every other command stays in the audit log only.

A busy bot opens thousands of sessions; each would be an etcd write. So repeats of the same thing
(same reason, caller and rule) within ``window`` seconds update one Event's ``series.count``
instead of creating new Events, and all writes share a token bucket: past its rate, repeats are
only counted and written with the next token, and new distinct events are dropped (and counted
in ``suppressed``). Events are a convenience view: the hash-chained audit log is the evidence, so
an Event the API server refuses is logged and skipped, not retried forever.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .config import API_VERSION, Connection
from .kube import EVENTS, KubeClient, KubeError
from .sinks import DeliveryError

log = logging.getLogger(__name__)

REPORTING_CONTROLLER = "sidegate.dev/proxy"
MAX_NOTE = 1024


def micro_time(ts: float) -> str:
    """The MicroTime format events.k8s.io wants: 2024-05-01T12:00:00.123456Z."""
    us = round(ts * 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(us // 1_000_000)) + f".{us % 1_000_000:06d}Z"


@dataclass(frozen=True)
class Notable:
    """What one audit record means as an Event; ``key`` is what repeats aggregate on."""

    reason: str
    action: str
    type: str
    note: str
    key: tuple[str, ...]
    time: float
    related: Mapping[str, str] | None = None


def _access_request_ref(approval: Any) -> dict[str, str] | None:
    if not isinstance(approval, Mapping) or not approval.get("name"):
        return None
    return {"apiVersion": API_VERSION, "kind": "AccessRequest", "name": str(approval["name"]),
            "namespace": str(approval.get("namespace") or "")}


def _command(record: Mapping[str, Any]) -> str:
    query = (record.get("query_info") or {}).get("query_string")
    if query:
        return str(query)
    method = str((record.get("api") or {}).get("operation") or "")
    path = str(((record.get("http_request") or {}).get("url") or {}).get("path") or "")
    return f"{method} {path}".strip()


def notable(record: Mapping[str, Any]) -> Notable | None:
    """The Event an audit record deserves, or None for the ones that stay in the audit log."""
    unmapped = record.get("unmapped") or {}
    kind = unmapped.get("event")
    decision = unmapped.get("decision")
    subject = str(((record.get("actor") or {}).get("user") or {}).get("name") or "unknown caller")
    rule = str((record.get("policy") or {}).get("name") or "")
    detail = str(record.get("status_detail") or "")
    suffix = f": {detail}" if detail else ""
    when = float(record.get("time") or 0) / 1000 or time.time()
    if kind == "session_start":
        if decision == "allow":
            return Notable("SessionStarted", "Connect", "Normal", f"{subject} connected",
                           ("start", subject), when)
        return Notable("SessionRefused", "Connect", "Warning", f"{subject} refused{suffix}",
                       ("refused", subject, rule), when)
    if kind == "session_end":
        return Notable("SessionEnded", "Disconnect", "Normal", f"{subject} disconnected",
                       ("end", subject), when)
    if kind != "command":
        return None
    command = _command(record)
    shown = command if len(command) <= 200 else command[:200] + "..."
    related = _access_request_ref(unmapped.get("approval"))
    by = rule or "policy"
    if decision == "block":
        return Notable("Blocked", "Block", "Warning", f"{subject}: {shown!r} blocked by {by}{suffix}",
                       ("block", subject, rule), when)
    if decision == "requireApproval":
        return Notable("ApprovalRequired", "RequireApproval", "Warning",
                       f"{subject}: {shown!r} held for approval by {by}{suffix}",
                       ("approval", subject, rule, command), when, related)
    if related is not None:
        reviewer = unmapped["approval"].get("reviewer") or "unknown"
        return Notable("Approved", "Approve", "Normal",
                       f"{subject}: {shown!r} ran under AccessRequest {related['name']}, "
                       f"approved by {reviewer}",
                       ("approved", related["name"]), when, related)
    return None


class TokenBucket:
    """``rate`` writes per second on average, bursts of up to ``burst``."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


@dataclass
class _Series:
    name: str
    first: float
    count: int
    written: int
    last: float


class KubeEventSink:
    """``Sink`` for ``AuditLog``: notable records as Events on the Connection (see module doc)."""

    batch_size = 100
    batch_interval = 1.0

    def __init__(
        self,
        kube: KubeClient,
        connection: Connection,
        *,
        instance: str,
        name: str = "kubernetes-events",
        rate: float = 1.0,
        burst: int = 20,
        window: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        owns_client: bool = False,
    ) -> None:
        self.name = name
        self.kube = kube
        self._owns_client = owns_client
        self.connection = connection
        self.instance = instance[:128]
        self.window = window
        self.suppressed = 0
        self._bucket = TokenBucket(rate, burst, clock)
        self._clock = clock
        self._series: dict[tuple[str, ...], _Series] = {}

    async def aclose(self) -> None:
        if self._owns_client:
            await self.kube.close()

    def _regarding(self) -> dict[str, str]:
        ref = {"apiVersion": API_VERSION, "kind": "Connection", "name": self.connection.name,
               "namespace": self.connection.namespace}
        if self.connection.uid:
            ref["uid"] = self.connection.uid
        return ref

    async def deliver(self, batch: list[dict[str, Any]]) -> None:
        for record in batch:
            event = notable(record)
            if event is not None:
                await self._observe(event)
        await self._flush()

    async def _observe(self, event: Notable) -> None:
        now = self._clock()
        series = self._series.get(event.key)
        if series is not None and now - series.first < self.window:
            series.count += 1
            series.last = event.time
            return  # written by _flush when a token is free
        if not self._bucket.take():
            self.suppressed += 1
            return
        body: dict[str, Any] = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"name": f"{self.connection.name}.{uuid.uuid4().hex[:16]}",
                         "namespace": self.connection.namespace},
            "eventTime": micro_time(event.time),
            "reportingController": REPORTING_CONTROLLER,
            "reportingInstance": self.instance,
            "action": event.action,
            "reason": event.reason,
            "type": event.type,
            "note": event.note[:MAX_NOTE],
            "regarding": self._regarding(),
        }
        if event.related:
            body["related"] = dict(event.related)
        created = await self._write(self.kube.create(EVENTS, self.connection.namespace, body))
        if created is not None:
            self._series[event.key] = _Series(created["metadata"]["name"], now, 1, 1, event.time)
        self._forget(now)

    async def _flush(self) -> None:
        for series in list(self._series.values()):
            if series.count == series.written:
                continue
            if not self._bucket.take():
                return
            patch = {"series": {"count": series.count, "lastObservedTime": micro_time(series.last)}}
            call = self.kube.merge_patch(EVENTS, self.connection.namespace, series.name, patch)
            if await self._write(call):
                series.written = series.count

    def _forget(self, now: float) -> None:
        for key, series in list(self._series.items()):
            if now - series.first >= self.window and series.count == series.written:
                del self._series[key]

    async def _write(self, call: Any) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = await call
            return result
        except KubeError as exc:
            if exc.status == 0 or exc.status >= 500 or exc.status == 429:
                raise DeliveryError(f"Kubernetes Events: {exc}") from exc
            log.warning("Kubernetes Event not recorded for %s: %s", self.connection.ref, exc)
            return None
