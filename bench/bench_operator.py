"""Control plane benchmark: Connection apply-to-Ready time and the pod-injection webhook's latency.

Not a test: prints a table. Runs against a real etcd + kube-apiserver (``tests/controlplane.py``,
built by ``make controlplane``) with no kube-controller-manager, so no pod ever runs: "Ready" is
the operator's own reconcile status (children created, config rendered), which is what the
operator controls. The operator runs as production does, ``sidegate operator`` in its own
process, with its webhook on loopback TLS and a MutatingWebhookConfiguration limited to the
benchmark's labelled namespaces.

* Reconcile: N gateway-mode Connections (their Secrets applied beforehand) are applied with 16
  requests in flight; the clock stops when every one reports ``Ready=True`` (polled by listing,
  so per-object times have the poll period's resolution: 0.25 s, 0.05 s for a single one).
* Webhook: pods carrying ``sidegate.dev/inject`` are created one at a time, alternating between a
  namespace the webhook covers and one it does not: the difference is what the webhook adds to a
  pod creation as a client sees it. The webhook server is also called directly with the same
  AdmissionReview (TLS on loopback, no API server): its own response time.

    .venv/bin/python bench/bench_operator.py --quick
    .venv/bin/python bench/bench_operator.py --connections 500 --pods 200
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "proxy"), str(ROOT / "operator"), str(ROOT / "tests")]

from controlplane import ControlPlane, free_port  # noqa: E402
from sidegate_operator.kube import ClusterAccess, Kube, KubeError, resource_path  # noqa: E402
from sidegate_operator.webhook import WEBHOOK_ID, build_webhook_configuration  # noqa: E402
from sidegate_proxy.localpg import stop_process  # noqa: E402
from test_operator_k8s import (  # noqa: E402
    CONN_API,
    app_pod,
    connection,
    credentials,
    install_crds,
    make_tls,
    ready,
)

LABEL = "sidegate-bench"
IMAGE = "example.test/sidegate:bench"
APPLY_CONCURRENCY = 16
POLL = 0.25


def quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p99": 0.0, "mean": 0.0}
    q = statistics.quantiles(values, n=100) if len(values) > 1 else [values[0]] * 99
    return {"p50": q[49], "p99": q[98], "mean": statistics.fmean(values)}


# --------------------------------------------------------------------------- operator


@contextlib.contextmanager
def operator_process(cp: ControlPlane, workdir: Path, port: int, cert: Path, key: Path) -> Iterator[Path]:
    """``sidegate operator`` in its own process, as a Deployment runs it; yields its log file."""
    log_path = workdir / "operator.log"
    argv = [sys.executable, "-m", "sidegate_operator.cli", "operator", "--kubeconfig", cp.kubeconfig,
            "--image", IMAGE, "--operator-namespace", "sidegate-system", "--standalone",
            "--webhook-addr", "127.0.0.1", "--webhook-port", str(port), "--webhook-host", "127.0.0.1",
            "--webhook-cert", str(cert), "--webhook-key", str(key)]
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            yield log_path
        finally:
            stop_process(proc, 30)


async def namespace(kube: Kube, prefix: str, hooked: bool) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    labels = {LABEL: "true"} if hooked else {}
    await kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
    return name


async def ready_times(kube: Kube, ns: str, expected: int, within: float) -> dict[str, float]:
    """Poll until ``expected`` Connections in ``ns`` are Ready=True: name -> first seen Ready."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + within
    while len(seen) < expected:
        try:
            objs = await kube.list(resource_path(CONN_API, "Connection", ns))
        except KubeError as exc:  # 429/503 while a new CRD's storage initialises
            if exc.status not in (429, 503):
                raise
            objs = []
        for obj in objs:
            cond = ready(obj)
            name = obj["metadata"]["name"]
            if cond and cond["status"] == "True" and name not in seen:
                seen[name] = time.monotonic()
        if len(seen) >= expected:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(seen)}/{expected} Connections in {ns} became Ready in {within:.0f}s")
        await asyncio.sleep(POLL if expected > 10 else POLL / 5)
    return seen


async def reconcile_run(kube: Kube, count: int) -> dict[str, Any]:
    """Apply ``count`` Connections at once (Secrets already there) and time them to Ready."""
    ns = await namespace(kube, f"bench-rec{count}", hooked=False)
    names = [f"db-{i:04d}" for i in range(count)]
    gate = asyncio.Semaphore(APPLY_CONCURRENCY)

    async def apply(obj: dict[str, Any]) -> float:
        async with gate:
            await kube.apply(obj)
            return time.monotonic()

    await asyncio.gather(*(apply(credentials(ns, f"{n}-admin")) for n in names))
    t0 = time.monotonic()
    poller = asyncio.create_task(ready_times(kube, ns, count, within=max(60.0, count * 0.5)))
    applied = await asyncio.gather(*(apply(connection(ns, n)) for n in names))
    apply_done = time.monotonic()
    seen = await poller
    per_object = [seen[n] - t for n, t in zip(names, applied, strict=True)]
    total = max(seen.values()) - t0
    return {
        "connections": count,
        "apply_s": apply_done - t0,
        "all_ready_s": total,
        "per_connection_s": quantiles(per_object),
        "connections_per_s": count / total if total else 0.0,
    }


# --------------------------------------------------------------------------- webhook


def admission_review(pod: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": pod["metadata"]["name"], "namespace": pod["metadata"]["namespace"],
            "operation": "CREATE", "userInfo": {"username": "bench", "groups": ["system:authenticated"]},
            "object": pod, "oldObject": None, "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


async def webhook_direct(url: str, ca: bytes, ns: str, count: int) -> list[float]:
    """The webhook server's own response time: AdmissionReviews posted straight to it."""
    ctx = ssl.create_default_context(cadata=ca.decode())
    out: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        for i in range(count + 5):
            review = admission_review(app_pod(ns, f"direct-{i}", "side"))
            t0 = time.perf_counter()
            async with s.post(url, json=review) as r:
                body = await r.json()
            elapsed = (time.perf_counter() - t0) * 1000.0
            response = body.get("response") or {}
            if r.status != 200 or not response.get("allowed") or not response.get("patch"):
                raise RuntimeError(f"webhook did not inject: HTTP {r.status} {body}")
            if i >= 5:  # the first few warm up connections and caches
                out.append(elapsed)
    return out


async def webhook_run(kube: Kube, url: str, ca: bytes, pods: int) -> dict[str, Any]:
    hooked = await namespace(kube, "bench-hook", hooked=True)
    plain = await namespace(kube, "bench-plain", hooked=False)
    await kube.apply(credentials(hooked, "side-admin"))
    await kube.apply(connection(hooked, "side", mode="sidecar", identity={"workload": True}))
    await ready_times(kube, hooked, 1, within=60)

    async def create(ns: str, name: str) -> tuple[float, dict[str, Any]]:
        pod = app_pod(ns, name, "side")
        t0 = time.perf_counter()
        created = await kube.request("POST", resource_path("v1", "Pod", ns), pod)
        return (time.perf_counter() - t0) * 1000.0, created

    with_hook: list[float] = []
    without: list[float] = []
    for i in range(pods + 5):
        ms_plain, _ = await create(plain, f"p-{i}")
        ms_hook, created = await create(hooked, f"p-{i}")
        if created["metadata"].get("annotations", {}).get("sidegate.dev/injected") != "side":
            raise RuntimeError("the webhook did not inject the sidecar")
        if i >= 5:
            without.append(ms_plain)
            with_hook.append(ms_hook)
    direct = await webhook_direct(url, ca, hooked, pods)
    a, b = quantiles(with_hook), quantiles(without)
    return {
        "pods": pods,
        "create_with_webhook_ms": a,
        "create_without_webhook_ms": b,
        "added_by_webhook_ms": {k: a[k] - b[k] for k in a},
        "webhook_direct_ms": quantiles(direct),
    }


# --------------------------------------------------------------------------- run


async def _bench(cp: ControlPlane, url: str, ca: bytes, counts: list[int], pods: int) -> dict[str, Any]:
    async with Kube(ClusterAccess.load(cp.kubeconfig), timeout=60) as kube:
        await reconcile_run(kube, 1)  # warm-up: the operator's watches are live once this is Ready
        reconcile = [await reconcile_run(kube, n) for n in counts]
        webhook = await webhook_run(kube, url, ca, pods)
    return {"reconcile": reconcile, "webhook": webhook}


def run(quick: bool = False, connections: int | None = None, pods: int | None = None) -> dict[str, Any]:
    counts = [1, connections or 500]
    pods = pods or (100 if quick else 200)
    workdir = Path(tempfile.mkdtemp(prefix="sidegate-bench-op-"))
    # Every gateway Connection gets a ClusterIP Service: the test default (a /24) runs out at 254.
    service_range = ["--service-cluster-ip-range=10.0.0.0/20"]
    try:
        with ControlPlane(controller_manager=False, extra_apiserver_args=service_range) as cp:
            data = _run_against(cp, workdir, counts, pods)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    data["cpus"] = os.cpu_count()
    data["notes"] = [
        "etcd + kube-apiserver, no kube-controller-manager: Ready is the operator's reconcile status",
        f"operator in its own process (kopf, standalone); Connections applied {APPLY_CONCURRENCY} at a time, "
        f"Ready polled every {POLL} s ({POLL / 5} s for one)",
        "webhook: client-observed pod create latency, alternating covered/uncovered namespaces",
    ]
    return data


def _run_against(cp: ControlPlane, workdir: Path, counts: list[int], pods: int) -> dict[str, Any]:
    cert, key, ca = make_tls(workdir)
    port = free_port()
    url = f"https://127.0.0.1:{port}/{WEBHOOK_ID}"

    async def setup() -> None:
        async with Kube(ClusterAccess.load(cp.kubeconfig)) as kube:
            await install_crds(kube)
            config = build_webhook_configuration(
                {"url": url, "caBundle": base64.b64encode(ca).decode()},
                operator_namespace="sidegate-system", name="sidegate-bench-inject")
            config["webhooks"][0]["namespaceSelector"]["matchLabels"] = {LABEL: "true"}
            await kube.apply(config)

    asyncio.run(setup())
    with operator_process(cp, workdir, port, cert, key) as log:
        try:
            data = asyncio.run(_bench(cp, url, ca, counts, pods))
        except Exception:
            print(f"operator log tail:\n{log.read_text()[-3000:]}", file=sys.stderr)
            raise
    data["kubernetes"] = json.loads(cp.get("/version")[1]).get("gitVersion", "?")
    return data


def format_table(data: dict[str, Any]) -> str:
    lines = [f"{'Connections':>11}{'apply s':>9}{'all Ready s':>13}{'per-conn p50 s':>16}{'p99 s':>8}{'conn/s':>8}"]
    for r in data["reconcile"]:
        q = r["per_connection_s"]
        lines.append(f"{r['connections']:>11}{r['apply_s']:>9.2f}{r['all_ready_s']:>13.2f}{q['p50']:>16.2f}"
                     f"{q['p99']:>8.2f}{r['connections_per_s']:>8.1f}")
    w = data["webhook"]
    lines += ["", f"pod creations: {w['pods']} each", f"{'':<34}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}"]
    for label, key in (("create, webhook covers the ns", "create_with_webhook_ms"),
                       ("create, webhook not called", "create_without_webhook_ms"),
                       ("difference (webhook's share)", "added_by_webhook_ms"),
                       ("webhook server alone (direct)", "webhook_direct_ms")):
        q = w[key]
        lines.append(f"{label:<34}{q['p50']:>9.2f}{q['p99']:>9.2f}{q['mean']:>9.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="100 pods instead of 200")
    ap.add_argument("--connections", type=int, default=None, help="the large batch (default 500)")
    ap.add_argument("--pods", type=int, default=None, help="pod creations per side (default 200)")
    args = ap.parse_args()
    data = run(args.quick, args.connections, args.pods)
    print(f"\nOperator against kube-apiserver {data['kubernetes']}, {data['cpus']} CPUs shared by every process\n")
    print(format_table(data))
    print()
    for note in data["notes"]:
        print(f"- {note}")


if __name__ == "__main__":
    main()
