"""Audit micro-benchmark: what one proxied command costs in ``sidegate_proxy.audit``.

Not a test: prints microseconds per event (best of several rounds, CPU time) for the path the
proxies take, ``command_event`` + ``Chain.seal_event`` (memoised record shapes), next to the
generic path every event took before, ``command_event`` + ``Chain.seal(ocsf_event(...))``, whose
cost is dominated by ``canonical_json(record)``. Both give the same bytes (tests/test_audit_shapes.py).
The spool write after sealing is the same for both and not measured.

    .venv/bin/python bench/bench_audit.py
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "proxy")]

from sidegate_proxy.audit import (  # noqa: E402
    AuditEvent,
    Chain,
    _event_values,
    _shape_for,
    canonical_json,
    command_event,
    ocsf_event,
)
from sidegate_proxy.policy import ApprovalRef, Caller, Decision  # noqa: E402

CALLER = Caller(
    "system:serviceaccount:ci:runner", "https://kubernetes.default.svc",
    frozenset({"system:serviceaccounts", "system:serviceaccounts:ci"}),
)
ALLOW = Decision("allow", rule="readers")


def pg_select(i: int) -> AuditEvent:
    """The common case: an allowed pgbench SELECT, same session, caller, client and target."""
    return command_event(
        session_id="3f2a9c1e0b7d", connection="shop/orders-db", connection_type="postgres", caller=CALLER,
        command=f"SELECT abalance FROM pgbench_accounts WHERE aid = {i};", decision=ALLOW,
        command_class="select", masked={}, rows=1, duration_ms=0.25 + i % 7, sqlstate=None,
        client="10.244.0.17:51234", target="orders-db.shop.svc:5432", database="orders",
    )


def pg_masked(i: int) -> AuditEvent:
    """A masked SELECT run under an approved AccessRequest, with quotes and non-ASCII text."""
    return command_event(
        session_id="3f2a9c1e0b7d", connection="shop/orders-db", connection_type="postgres", caller=CALLER,
        command=f"SELECT email, name FROM customers WHERE city = 'Zürich' AND id > {i}", decision=ALLOW,
        command_class="select", masked={"emails": i % 5 + 1}, rows=i % 50, duration_ms=1.5,
        approval=ApprovalRef("shop", "orders-db-x7k2p", "alice@example.com"),
        client="10.244.0.17:51234", target="orders-db.shop.svc:5432", database="orders",
    )


def http_get(i: int) -> AuditEvent:
    """One HTTP request: every request is its own session (its request id)."""
    return command_event(
        session_id=f"req-{i:08x}", connection="shop/billing-api", connection_type="http", caller=CALLER,
        command=f"GET /v1/invoices/{i}?expand=lines&token=abc", decision=ALLOW, http_status=200,
        duration_ms=3.2, client="10.244.0.23", target="billing.shop.svc:8443",
    )


def cpu_us(fn: Callable[[int], object], n: int, rounds: int) -> float:
    """Best round, in CPU time per call: the machine is shared, wall time is noisy."""
    best = float("inf")
    for _ in range(rounds):
        t = time.process_time()
        for i in range(n):
            fn(i)
        best = min(best, (time.process_time() - t) / n)
    return best * 1e6


def measure(make: Callable[[int], AuditEvent], n: int, rounds: int) -> dict[str, float]:
    """us/event for one case: full path (event + seal) and serialisation alone, fast and generic."""
    fast, generic = Chain("bench"), Chain("bench")
    event = make(1)
    assert fast.seal_event(event)[1] == generic.seal(ocsf_event(event))[1], "fast path bytes differ"
    values = _event_values(event)
    filled = (*values, *fast._position())
    shape = _shape_for(event, filled)
    assert shape is not None, "no shape for the case"
    record = shape.record(filled)
    return {
        "event + seal, fast": cpu_us(lambda i: fast.seal_event(make(i)), n, rounds),
        "event + seal, generic": cpu_us(lambda i: generic.seal(ocsf_event(make(i))), n, rounds),
        "serialise, fast (_Shape.body)": cpu_us(lambda i: shape.body(filled), n, rounds),
        "serialise, generic (canonical_json)": cpu_us(lambda i: canonical_json(record), n, rounds),
        "command_event alone": cpu_us(make, n, rounds),
    }


def run(quick: bool = False) -> dict[str, dict[str, float]]:
    """us/event per case (see ``measure``)."""
    n, rounds = (2000, 5) if quick else (10000, 9)
    cases = {"pg SELECT (common case)": pg_select, "pg masked + approval": pg_masked, "http GET": http_get}
    return {name: measure(make, n, rounds) for name, make in cases.items()}


def main() -> None:
    results = run(quick="--quick" in sys.argv[1:])
    for name, row in results.items():
        print(f"\n{name}")
        print(f"  {'':40} {'us/event':>9}")
        for label, us in row.items():
            print(f"  {label:40} {us:9.2f}")
        full = row["event + seal, generic"] / row["event + seal, fast"]
        ser = row["serialise, generic (canonical_json)"] / row["serialise, fast (_Shape.body)"]
        print(f"  {'speed-up: event + seal / serialise':40} {full:8.1f}x {ser:5.1f}x")


if __name__ == "__main__":
    main()
