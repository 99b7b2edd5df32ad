"""Prometheus metrics for both protocols, in one registry per proxy instance (no global state).

Label sets are kept small and bounded (connection, protocol, decision): never a subject or a
statement, which would explode cardinality on a busy bot fleet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LATENCY_BOUNDS = (*LATENCY_BUCKETS, float("inf"))  # each bucket's upper bound, +Inf last


def observe_buckets(histogram: Any, counts: Sequence[int], total: float) -> None:
    """Add observations counted per bucket of ``LATENCY_BOUNDS`` (the native lane counts them),
    as many ``observe`` calls would: one pass, not one call per statement."""
    buckets, amount = getattr(histogram, "_buckets", None), getattr(histogram, "_sum", None)
    if buckets is None or amount is None or len(buckets) != len(counts):
        # not prometheus_client's layout: one observation per statement, at its bucket's bound
        # (the +Inf bucket's at twice the last), so the buckets still count right
        for bound, n in zip((*LATENCY_BUCKETS, 2 * LATENCY_BUCKETS[-1]), counts, strict=True):
            for _ in range(n):
                histogram.observe(bound)
        return
    amount.inc(total)
    for bucket, n in zip(buckets, counts, strict=True):
        if n:
            bucket.inc(n)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.commands = Counter(
            "sidegate_commands_total",
            "SQL statements and HTTP requests by connection, protocol and decision",
            ["connection", "protocol", "decision"],
            registry=r,
        )
        self.latency = Histogram(
            "sidegate_command_duration_seconds",
            "Time from a command's arrival to its last response byte, through the proxy",
            ["connection", "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.masked = Counter(
            "sidegate_masked_values_total",
            "Values masked in responses, by rule",
            ["connection", "protocol", "rule"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "sidegate_upstream_errors_total",
            "Failures talking to the protected target",
            ["connection", "protocol", "kind"],
            registry=r,
        )
        self.auth_failures = Counter(
            "sidegate_auth_failures_total",
            "Callers refused before any upstream connection was opened",
            ["connection", "protocol", "reason"],
            registry=r,
        )
        self.sessions = Gauge(
            "sidegate_active_sessions",
            "Open client sessions (PostgreSQL connections, in-flight HTTP requests)",
            ["connection", "protocol"],
            registry=r,
        )
        self.audit_backlog = Gauge(
            "sidegate_audit_backlog_events",
            "Audit events spooled but not yet delivered, by sink",
            ["sink"],
            registry=r,
        )

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
