"""HTTP data plane benchmark: requests/s and added latency through Sidegate vs direct vs nginx.

Not a test: prints a table. Every target serves the same 1 kB JSON body from the same aiohttp
upstream process; Sidegate runs as production does (``ProxyRuntime``: JWT verification against a
static JWKS, guardrails, masking of the body, audit spool) in its own process; nginx 1 worker as a
plain reverse proxy with upstream keep-alive. Load comes from ``wrk`` when installed (fixed
duration), else from an aiohttp client with N concurrent workers and a fixed number of requests.

    .venv/bin/python bench/bench_http.py --quick
    .venv/bin/python bench/bench_http.py --connections 64 --duration 15

Verified tokens are cached until expiry, as in production (a bot reuses its token), so the
steady state measures the cache hit, not the ~175 us RS256 verification.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import multiprocessing.queues
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "proxy")]

ISSUER = "https://ci.bench.invalid"
NGINX = "/usr/sbin/nginx"


def body_1k() -> bytes:
    """About 1 kB of JSON with things to mask: emails (field rule) and a card (detector)."""
    rows = [
        {"id": i, "name": f"Customer {i}", "email": f"user{i}@example.com", "plan": "pro", "seats": i * 3}
        for i in range(10)
    ]
    doc = {"customers": rows, "note": "paid with 4111 1111 1111 1111", "page": 1}
    data = json.dumps(doc).encode()
    assert 900 <= len(data) <= 1200, len(data)
    return data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- processes


def run_upstream(port: int) -> None:
    body = body_1k()

    async def handler(_: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def run_sidegate(port: int, upstream_port: int, jwks: str, ready: multiprocessing.queues.Queue[int]) -> None:
    from sidegate_proxy.config import build_config
    from sidegate_proxy.runtime import ProxyRuntime, RuntimeOptions, run_event_loop
    from sidegate_proxy.secrets import DictSecretStore

    connection = {
        "apiVersion": "sidegate.dev/v1alpha1",
        "kind": "Connection",
        "metadata": {"name": "bench-api", "namespace": "bench"},
        "spec": {
            "type": "http",
            "target": {"url": f"http://127.0.0.1:{upstream_port}"},
            "credentials": {"secretRef": {"name": "bench-token"}, "inject": "bearer"},
            "mode": "gateway",
            "identity": {
                "issuers": [
                    {
                        "name": "ci",
                        "issuer": ISSUER,
                        "audiences": ["sidegate"],
                        "groupsClaim": "groups",
                        "jwksSecretRef": {"name": "ci-jwks"},
                    }
                ]
            },
            "access": [{"subjects": ["bench-*"]}],
            "guardrails": [
                {
                    "name": "read-only",
                    "http": {"methods": ["POST", "PUT", "PATCH", "DELETE"], "paths": ["/admin/*"]},
                    "action": "block",
                }
            ],
        },
    }
    policy = {
        "apiVersion": "sidegate.dev/v1alpha1",
        "kind": "MaskingPolicy",
        "metadata": {"name": "pii", "namespace": "bench"},
        "spec": {
            "connections": ["bench-api"],
            "exempt": {"groups": ["auditors"]},
            "rules": [
                {"name": "emails", "fields": ["$..email"], "strategy": "redact"},
                {"name": "cards", "detectors": ["credit-card"], "strategy": "partial"},
            ],
        },
    }
    secrets = DictSecretStore(
        {"bench-token": {"token": b"upstream-token"}, "ci-jwks": {"jwks.json": jwks.encode()}}
    )
    spool = tempfile.mkdtemp(prefix="sidegate-bench-")
    options = RuntimeOptions(
        listen_host="127.0.0.1", listen_port=port, admin_port=None, spool_dir=Path(spool), audit_stdout=False
    )
    runtime = ProxyRuntime(build_config(connection, [policy]), secrets, options)

    async def main() -> None:
        await runtime.start()
        ready.put(runtime.port or port)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await runtime.close()

    try:
        run_event_loop(main())  # as `sidegate proxy` runs
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def start_nginx(port: int, upstream_port: int, workdir: Path) -> subprocess.Popen[bytes]:
    conf = workdir / "nginx.conf"
    user = "user root;" if os.geteuid() == 0 else ""
    conf.write_text(f"""
{user}
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    upstream target {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://target;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer upstream-token";
        }}
    }}
}}
""")
    return subprocess.Popen([NGINX, "-c", str(conf), "-p", str(workdir), "-g", "daemon off;"])


async def wait_ready(url: str, headers: dict[str, str], within: float = 20.0) -> bytes:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(url, headers=headers) as r:
                    if r.status == 200:
                        return await r.read()
                    raise RuntimeError(f"{url}: HTTP {r.status}: {await r.text()}")
            except aiohttp.ClientConnectionError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)


# --------------------------------------------------------------------------- load


@dataclass
class Result:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if m is None:
        raise ValueError(f"cannot parse wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def load_wrk(name: str, url: str, headers: dict[str, str], connections: int, duration: float) -> Result:
    cmd = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{max(1, round(duration))}s", "--latency"]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    out = subprocess.run([*cmd, url], check=True, capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(m.group(1)) if m else 0
    return Result(name, rps, p50, p99, total, errors)


async def load_aiohttp(
    name: str, url: str, headers: dict[str, str], connections: int, requests: int
) -> Result:
    latencies: list[float] = []
    errors = 0
    remaining = requests

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal remaining, errors
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            async with session.get(url, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
            latencies.append((time.perf_counter() - t0) * 1000.0)

    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(connections)))
        elapsed = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100)
    return Result(name, len(latencies) / elapsed, q[49], q[98], len(latencies), errors)


# --------------------------------------------------------------------------- main


def run(
    quick: bool = False,
    connections: int = 32,
    duration: float = 10.0,
    requests: int = 20000,
    tool: str = "auto",
) -> dict[str, Any]:
    """Every target in turn, in one run; what ``main`` prints and ``run_all`` tabulates."""
    if quick:
        duration, requests = 3.0, 3000
    tool = tool if tool != "auto" else ("wrk" if shutil.which("wrk") else "aiohttp")

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwks = json.dumps({"keys": [{**jwk, "kid": "bench", "alg": "RS256", "use": "sig"}]})
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )

    def token(groups: list[str]) -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": "bench-bot",
            "aud": "sidegate",
            "groups": groups,
            "iat": now,
            "exp": now + 3600,
        }
        return jwt.encode(claims, pem, algorithm="RS256", headers={"kid": "bench"})

    ctx = multiprocessing.get_context("spawn")
    up_port, sg_port, ng_port = free_port(), free_port(), free_port()
    ready: multiprocessing.queues.Queue[int] = ctx.Queue()
    procs = [
        ctx.Process(target=run_upstream, args=(up_port,), daemon=True),
        ctx.Process(target=run_sidegate, args=(sg_port, up_port, jwks, ready), daemon=True),
    ]
    for p in procs:
        p.start()
    workdir = Path(tempfile.mkdtemp(prefix="sidegate-bench-nginx-"))
    nginx = start_nginx(ng_port, up_port, workdir) if os.path.exists(NGINX) else None
    masked = {"Authorization": f"Bearer {token(['ci'])}"}
    exempt = {"Authorization": f"Bearer {token(['auditors'])}"}
    targets: list[tuple[str, str, dict[str, str]]] = [
        ("direct", f"http://127.0.0.1:{up_port}/v1/customers", {})
    ]
    if nginx is not None:
        targets.append(("nginx", f"http://127.0.0.1:{ng_port}/v1/customers", {}))
    targets += [
        ("sidegate (JWT + masking)", f"http://127.0.0.1:{sg_port}/v1/customers", masked),
        ("sidegate (JWT, exempt)", f"http://127.0.0.1:{sg_port}/v1/customers", exempt),
    ]
    try:
        ready.get(timeout=30)
        clear = body_1k()
        for name, url, headers in targets:
            got = asyncio.run(wait_ready(url, headers))
            if name == "sidegate (JWT + masking)":
                assert got != clear and b"user1@example.com" not in got, "masking is not on"
            else:
                assert got == clear, name
        results = []
        for name, url, headers in targets:
            if tool == "wrk":
                results.append(load_wrk(name, url, headers, connections, duration))
            else:
                results.append(asyncio.run(load_aiohttp(name, url, headers, connections, requests)))
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(10)
        for p in procs:
            if p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)
            p.join(10)
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "connections": connections,
        "duration_s": duration,
        "tool": tool,
        "cpus": os.cpu_count(),
        "results": [asdict(r) for r in results],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs (about 20 s in all)")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per target (wrk)")
    ap.add_argument("--requests", type=int, default=20000, help="requests per target (aiohttp client)")
    ap.add_argument("--tool", choices=("auto", "wrk", "aiohttp"), default="auto")
    args = ap.parse_args()
    data = run(args.quick, args.connections, args.duration, args.requests, args.tool)
    results = [Result(**r) for r in data["results"]]
    direct = results[0]
    by_name = {r.name: r for r in results}
    print(
        f"\nHTTP data plane, 1 kB JSON, {data['connections']} connections, load: {data['tool']}, "
        f"{data['cpus']} CPUs (all processes share them)\n"
    )
    print(
        f"{'target':<28}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'+p50 ms':>9}{'+p99 ms':>9}"
        f"{'requests':>10}{'non-2xx':>9}"
    )
    for r in results:
        print(
            f"{r.name:<28}{r.rps:>10.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}{r.p50_ms - direct.p50_ms:>9.2f}"
            f"{r.p99_ms - direct.p99_ms:>9.2f}{r.requests:>10}{r.errors:>9}"
        )
    sg = by_name["sidegate (JWT + masking)"]
    print(f"\nsidegate/direct throughput: {sg.rps / direct.rps:.2f}")
    if "nginx" in by_name:
        ng = by_name["nginx"]
        added = (sg.p50_ms - direct.p50_ms) / max(ng.p50_ms - direct.p50_ms, 1e-3)
        print(f"sidegate/nginx throughput:  {sg.rps / ng.rps:.2f}   added p50 vs nginx's: {added:.1f}x")
    ex = by_name["sidegate (JWT, exempt)"]
    print(f"masking cost: {ex.rps / sg.rps:.2f}x throughput (exempt vs masked caller)")


if __name__ == "__main__":
    main()
