"""``make bench``: the HTTP, PostgreSQL and operator benchmarks in one go, written up.

Runs each benchmark's ``run(quick)`` in turn (a failing one is reported, the others still run),
then writes ``bench/results.md`` (tables, machine facts, a short reading of the numbers) and
``bench/results.png`` (throughput ratio and added latency per target). Every ratio is measured
side by side in the same run, never against a number from another machine or day.

    .venv/bin/python bench/run_all.py --quick     # about 2 minutes
    .venv/bin/python bench/run_all.py             # about 6 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

import bench_http  # noqa: E402
import bench_operator  # noqa: E402
import bench_pg  # noqa: E402

BENCHES: dict[str, Callable[[bool], dict[str, Any]]] = {
    "http": bench_http.run,
    "pg": bench_pg.run,
    "operator": bench_operator.run,
}
HTTP_SIDEGATE = "sidegate (JWT + masking)"


# --------------------------------------------------------------------------- facts


def _first_line(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None and not os.path.exists(argv[0]):
        return "not installed"
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return lines[0].strip() if lines else "?"


def machine_facts() -> dict[str, str]:
    cpu = "?"
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = m.group(1).strip() if m else platform.processor() or "?"
    except OSError:
        pass
    mem = "?"
    try:
        m = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        mem = f"{int(m.group(1)) / 1024 / 1024:.1f} GiB" if m else "?"
    except OSError:
        pass
    from sidegate_operator import __version__

    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "nproc": str(os.cpu_count()),
        "CPU": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "load average at start (1/5/15 min)": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
        "Python": platform.python_version(),
        "Sidegate": __version__,
        "wrk": _first_line(["wrk", "--version"]),
        "nginx": _first_line([bench_http.NGINX, "-v"]),
    }


# --------------------------------------------------------------------------- markdown


def _http_md(data: dict[str, Any]) -> list[str]:
    rows = data["results"]
    direct = rows[0]
    out = [
        f"{data['connections']} connections, {data['duration_s']:.0f} s per target, load from {data['tool']}; "
        "1 kB JSON from one aiohttp upstream; Sidegate = `ProxyRuntime` in its own process "
        "(JWT verification with a token cache, guardrails, masking of the body, audit spool).",
        "",
        "| target | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | throughput / direct | non-2xx |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(f"| {r['name']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                   f"{r['p50_ms'] - direct['p50_ms']:+.2f} | {r['p99_ms'] - direct['p99_ms']:+.2f} | "
                   f"{r['rps'] / direct['rps']:.2f} | {r['errors']} |")
    return out


def _pg_md(data: dict[str, Any]) -> list[str]:
    out = [
        f"`pgbench -S -n -j 1`, scale {data['scale']}, {data.get('rounds', 1)} round(s) of {data['duration_s']} s "
        "per point, 1 and 8 clients, simple protocol and `-M prepared`. Latency average from pgbench; "
        "p50/p99 from its per-transaction logs (`-l`). Added latency = average latency minus direct's at "
        "the same point of the same round; each row is the point's median round, and the TPS ratio's "
        "range over all rounds follows it.",
        "",
        "| target | protocol | clients | TPS | avg ms | p50 ms | p99 ms | added ms/query | TPS / direct "
        "| proxy CPU µs/query | failed |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["results"]:
        out.append(f"| {r['target']} | {r['mode']} | {r['clients']} | {r['tps']:.0f} | {r['latency_avg_ms']:.3f} | "
                   f"{r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['added_ms']:+.3f} | {bench_pg.ratio_text(r)} | "
                   f"{bench_pg._cpu(r)} | {r['failed']} |")
    out += ["", *[f"- {n}" for n in data["notes"]]]
    out += ["- " + ", ".join(f"{k}: {v}" for k, v in data["versions"].items())]
    return out


def _operator_md(data: dict[str, Any]) -> list[str]:
    out = [
        f"kube-apiserver {data['kubernetes']} + etcd on loopback.",
        "",
        "| Connections | apply (client) s | all Ready s | per Connection p50 s | p99 s | Connections/s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["reconcile"]:
        q = r["per_connection_s"]
        out.append(f"| {r['connections']} | {r['apply_s']:.2f} | {r['all_ready_s']:.2f} | {q['p50']:.2f} | "
                   f"{q['p99']:.2f} | {r['connections_per_s']:.1f} |")
    w = data["webhook"]
    out += [
        "",
        f"Mutating webhook, {w['pods']} pod creations per side (sequential, alternating):",
        "",
        "| measured | p50 ms | p99 ms | mean ms |",
        "|---|---:|---:|---:|",
    ]
    for label, key in (("pod create, namespace covered by the webhook", "create_with_webhook_ms"),
                       ("pod create, webhook not called", "create_without_webhook_ms"),
                       ("difference (the webhook's share, client-observed)", "added_by_webhook_ms"),
                       ("webhook server alone (AdmissionReview posted directly, TLS)", "webhook_direct_ms")):
        q = w[key]
        out.append(f"| {label} | {q['p50']:.2f} | {q['p99']:.2f} | {q['mean']:.2f} |")
    out += ["", *[f"- {n}" for n in data["notes"]]]
    return out


def interpretation(results: dict[str, Any]) -> list[str]:
    """A few sentences computed from this run's numbers, so the reading never goes stale."""
    out: list[str] = []
    http = results.get("http")
    if isinstance(http, dict) and "results" in http:
        by = {r["name"]: r for r in http["results"]}
        d, sg = by["direct"], by.get(HTTP_SIDEGATE)
        if sg:
            text = (f"- **HTTP**: Sidegate with JWT and body masking serves {sg['rps'] / d['rps']:.2f}x the "
                    f"direct request rate and adds {sg['p50_ms'] - d['p50_ms']:.1f} ms at p50 under "
                    f"{http['connections']} connections")
            if "nginx" in by:
                text += f" (nginx: {by['nginx']['rps'] / d['rps']:.2f}x, {by['nginx']['p50_ms'] - d['p50_ms']:+.2f} ms)"
            ex = by.get("sidegate (JWT, exempt)")
            if ex:
                text += (f"; an exempt caller (no masking) gets {ex['rps'] / d['rps']:.2f}x, so masking the body "
                         f"divides throughput by {ex['rps'] / sg['rps']:.2f}")
            out.append(text + ".")
    pg = results.get("pg")
    if isinstance(pg, dict) and "results" in pg:
        at = {(r["target"], r["mode"], r["clients"]): r for r in pg["results"]}
        sg1, pb1 = at.get(("Sidegate", "simple", 1)), at.get(("PgBouncer", "simple", 1))
        sg8, pb8 = at.get(("Sidegate", "simple", 8)), at.get(("PgBouncer", "simple", 8))
        if sg1 and pb1 and sg8 and pb8:
            out.append(
                f"- **PostgreSQL**: one client sees Sidegate add {sg1['added_ms']:.3f} ms per query "
                f"(PgBouncer {pb1['added_ms']:.3f} ms); at 8 clients Sidegate delivers {sg8['tps_ratio']:.2f}x the "
                f"direct TPS (PgBouncer {pb8['tps_ratio']:.2f}x). pgbench's select is a ~0.2 ms point lookup, "
                "so a fixed per-query cost in the proxy dominates the ratio: for heavier queries the added "
                "milliseconds, not the ratio, are the number to carry over.")
        st8, pt8 = at.get(("Sidegate TLS", "prepared", 8)), at.get(("PgBouncer TLS", "prepared", 8))
        if st8 and pt8:
            text = (f"- **PostgreSQL over TLS** (client side, prepared, 8 clients): Sidegate {st8['tps_ratio']:.2f}x "
                    f"the plain direct TPS, PgBouncer {pt8['tps_ratio']:.2f}x")
            sb8 = at.get((bench_pg.BOTH_SIDES.format("Sidegate"), "prepared", 8))
            pb8b = at.get((bench_pg.BOTH_SIDES.format("PgBouncer"), "prepared", 8))
            if sb8 and pb8b:
                text += (f"; with TLS to PostgreSQL as well, Sidegate {sb8['tps_ratio']:.2f}x, "
                         f"PgBouncer {pb8b['tps_ratio']:.2f}x")
            out.append(text + ".")
    op = results.get("operator")
    if isinstance(op, dict) and "reconcile" in op:
        big = op["reconcile"][-1]
        w = op["webhook"]
        out.append(
            f"- **Operator**: {big['connections']} Connections go from apply to Ready in {big['all_ready_s']:.1f} s "
            f"({big['connections_per_s']:.0f}/s); the injection webhook adds "
            f"{w['added_by_webhook_ms']['p50']:.1f} ms at p50 to a pod creation "
            f"({w['webhook_direct_ms']['p50']:.1f} ms of it in the webhook server itself).")
    out.append(
        "- **Caveats**: every process (load generator, proxies, PostgreSQL, upstream, API server) shares "
        f"the same {os.cpu_count()} cores and nothing is pinned, so a proxy that burns CPU also slows the "
        "load generator and the database; Sidegate's data plane is one process: a Python event loop and "
        "the native lane's thread (statements Python already allowed, relayed without the GIL), plus its "
        "audit worker with `--audit-worker`; its per-statement modules are compiled with mypyc, and "
        "`Sidegate (pure Python)` runs the same source uncompiled, without the lane. "
        "`--quick` runs are 3 s long: expect run-to-run noise of 10-20 %, more when the load average "
        f"at start (see Machine) is above 0 on these {os.cpu_count()} cores.")
    return out


def write_markdown(path: Path, results: dict[str, Any], facts: dict[str, str], quick: bool,
                   png: Path | None) -> None:
    lines = [
        "# Sidegate benchmarks",
        "",
        f"Generated by `bench/run_all.py{' --quick' if quick else ''}` ({facts['date']}). "
        "Each ratio compares targets measured one after the other in the same run on the same machine.",
        "",
        "## Reading",
        "",
        *interpretation(results),
        "",
    ]
    if png is not None:
        lines += [f"![throughput ratio and added latency]({png.name})", ""]
    sections = (("HTTP data plane", "http", _http_md), ("PostgreSQL data plane", "pg", _pg_md),
                ("Operator", "operator", _operator_md))
    for title, key, render in sections:
        lines += [f"## {title}", ""]
        data = results.get(key)
        if isinstance(data, dict) and "error" not in data:
            lines += render(data)
        else:
            err = data["error"] if isinstance(data, dict) else "not run"
            lines += ["Not measured in this run:", "", "```", str(err).strip()[-1500:], "```"]
        lines.append("")
    lines += ["## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in facts.items()]
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- chart


def write_chart(path: Path, results: dict[str, Any]) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels: list[str] = []
    ratios: list[float] = []
    added: list[float] = []
    colors: list[str] = []
    palette = {"nginx": "#7f7f7f", "PgBouncer": "#7f7f7f", "PgBouncer TLS": "#bcbcbc", "Sidegate TLS": "#8c564b",
               "Sidegate --audit-worker": "#ff7f0e",
               bench_pg.BOTH_SIDES.format("PgBouncer"): "#dcdcdc", bench_pg.BOTH_SIDES.format("Sidegate"): "#c49c94",
               "Sidegate (pure Python)": "#9467bd"}
    http = results.get("http")
    if isinstance(http, dict) and "results" in http:
        direct = http["results"][0]
        for r in http["results"][1:]:
            labels.append(f"HTTP {r['name']}")
            ratios.append(r["rps"] / direct["rps"])
            added.append(r["p50_ms"] - direct["p50_ms"])
            colors.append(palette.get(r["name"], "#1f77b4"))
    pg = results.get("pg")
    if isinstance(pg, dict) and "results" in pg:
        for r in pg["results"]:
            if r["target"] == "direct":
                continue
            labels.append(f"PG {r['target']} {r['mode']} c{r['clients']}")
            ratios.append(r["tps_ratio"])
            added.append(r["added_ms"])
            colors.append(palette.get(r["target"], "#d62728"))
    if not labels:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.45 * len(labels) + 1.8), sharey=True)
    y = list(range(len(labels)))
    ax1.barh(y, ratios, color=colors)
    ax1.axvline(1.0, color="black", linewidth=0.8)
    ax1.set_yticks(y, labels)
    ax1.invert_yaxis()
    ax1.set_xlabel("throughput / direct (higher is better)")
    ax2.barh(y, added, color=colors)
    ax2.set_xlabel("added latency vs direct, ms (HTTP: p50; PG: average per query)")
    for ax, values, fmt in ((ax1, ratios, "{:.2f}"), (ax2, added, "{:.2f}")):
        for i, v in enumerate(values):
            ax.annotate(fmt.format(v), (max(v, 0), i), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize=8)
    fig.suptitle(f"Sidegate vs direct (grey: nginx / PgBouncer), {os.cpu_count()} shared CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs (under ~3 minutes in all)")
    ap.add_argument("--only", choices=sorted(BENCHES), action="append", help="run only these (repeatable)")
    ap.add_argument("--out", type=Path, default=HERE, help="folder for results.md and results.png")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    args = ap.parse_args()
    facts = machine_facts()
    results: dict[str, Any] = {}
    for name, bench in BENCHES.items():
        if args.only and name not in args.only:
            continue
        print(f"== {name}", flush=True)
        t0 = time.monotonic()
        try:
            results[name] = bench(args.quick)
        except Exception:
            traceback.print_exc()
            results[name] = {"error": traceback.format_exc(limit=3)}
        print(f"   {time.monotonic() - t0:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "results.png"
    drawn = write_chart(png, results)
    write_markdown(args.out / "results.md", results, facts, args.quick, png if drawn else None)
    if args.json is not None:
        args.json.write_text(json.dumps({"facts": facts, "results": results}, indent=1) + "\n")
    print("\n".join(interpretation(results)))
    print(f"\nwrote {args.out / 'results.md'}" + (f" and {png}" if drawn else ""))
    return 1 if any(isinstance(v, dict) and "error" in v for v in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
