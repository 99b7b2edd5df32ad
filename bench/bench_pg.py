"""PostgreSQL data plane benchmark: pgbench select-only through Sidegate vs direct vs PgBouncer.

Not a test: prints a table. One throwaway PostgreSQL (``LocalPostgres``) initialised by
``pgbench -i`` at a small scale; three targets in front of it, measured one after the other in
the same run so the ratios compare like with like:

* direct: pgbench to PostgreSQL (SCRAM);
* PgBouncer: Debian's pgbouncer, ``pool_mode = transaction`` (for ``-M prepared`` a session-mode
  alias of the same database, since PgBouncer before 1.21 cannot keep protocol-level prepared
  statements across transaction pooling), SCRAM with a userlist;
* Sidegate: ``sidegate proxy --manifests DIR`` in its own process, the demo's policy (JWT
  password from a local issuer, guardrails, masking active for the caller, audit to a spool).

PgBouncer and Sidegate also serve TLS to clients (a throwaway self-signed certificate): their
``TLS`` rows are the same processes with pgbench connecting ``sslmode=require``, the target side
plain, and their ratios still against plain direct, so they carry the cost of the encryption.

Each runs ``pgbench -S -n`` for a fixed duration at 1 and 8 clients, with the simple protocol
(pgbench's default) and ``-M prepared`` (extended protocol). pgbench reports TPS and average
latency; p50/p99 come from its per-transaction logs (``-l``). Every process shares the
machine's cores: nothing is pinned, so the proxies compete with pgbench and PostgreSQL.

    .venv/bin/python bench/bench_pg.py --quick
    .venv/bin/python bench/bench_pg.py --duration 20 --scale 10
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pwd
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "proxy"), str(ROOT / "operator")]

from sidegate_proxy import NATIVE, _native  # noqa: E402
from sidegate_proxy.demo import DEMO_MANIFESTS, LocalIssuer  # noqa: E402
from sidegate_proxy.localpg import LocalPostgres, free_port, stop_process, wait_port  # noqa: E402

PGBOUNCER = "/usr/sbin/pgbouncer"
CLIENTS = (1, 8)
MODES = ("simple", "prepared")
PURE = "Sidegate (pure Python)"
BOTH_SIDES = "{} TLS both sides"  # TLS to the client and to PostgreSQL
BOT = "system:serviceaccount:payments:pgbench"


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    user: str
    password: str
    database: str
    pid: int | None = None  # the proxy's process, whose CPU time per query is reported
    tls: bool = False  # clients connect with sslmode=require


@dataclass
class Result:
    target: str
    mode: str
    clients: int
    tps: float
    latency_avg_ms: float
    p50_ms: float
    p99_ms: float
    transactions: int
    failed: int
    added_ms: float = 0.0  # average latency minus direct's, same mode and clients
    proxy_cpu_us: float | None = None  # the proxy process's CPU (user + system) per transaction
    lane_cpu_us: float | None = None  # ... of it, its native lane thread's (relaying)
    tps_ratio: float = 1.0  # TPS over direct's, same mode and clients
    # with several rounds: this is the median round's run; the ratio's spread over all rounds
    rounds: int = 1
    ratio_min: float = 1.0
    ratio_max: float = 1.0


# --------------------------------------------------------------------------- targets


def pg_tool(name: str, pg: LocalPostgres) -> str:
    return shutil.which(name) or str(pg.bin / name)


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 (its own CA, so ``verify-full`` accepts it) and its
    key, for the proxies' client-side TLS and PostgreSQL's."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "tls.crt", folder / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    for path in (folder, cert, key):
        os.chmod(path, 0o755 if path == folder else 0o644)  # PgBouncer reads them as postgres
    return cert, key


def server_tls(tls: tuple[Path, Path], folder: Path) -> tuple[str, ...]:
    """PostgreSQL settings serving ``tls`` (plain connections still accepted): its own copy of the
    key, which PostgreSQL only reads when nobody else may (as the server's user when run as root)."""
    folder.mkdir()
    cert, key = folder / "server.crt", folder / "server.key"
    shutil.copy(tls[0], cert)
    shutil.copy(tls[1], key)
    os.chmod(key, 0o600)
    if os.geteuid() == 0:  # LocalPostgres runs the server as postgres
        pw = pwd.getpwnam("postgres")
        for path in (folder, cert, key):
            os.chown(path, pw.pw_uid, pw.pw_gid)
    return ("ssl = on", f"ssl_cert_file = '{cert}'", f"ssl_key_file = '{key}'")


def write_manifests(folder: Path, pg: LocalPostgres, issuer: LocalIssuer, port: int,
                    target_ca: Path | None = None) -> str:
    """The demo's Connection and MaskingPolicy, pointed at this cluster, plus their Secrets;
    ``target_ca``: TLS to the cluster (``verify-full``), trusting this certificate."""
    docs = [d for d in yaml.safe_load_all(DEMO_MANIFESTS) if d]
    conn = docs[0]
    conn["spec"]["target"].update(host=pg.host, port=pg.port, database=pg.database)
    conn["spec"]["listen"] = {"port": port}
    ns = conn["metadata"]["namespace"]
    secrets = [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "orders-db-admin", "namespace": ns},
         "stringData": {"username": pg.user, "password": pg.password}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "demo-jwks", "namespace": ns},
         "stringData": {"jwks.json": issuer.jwks().decode()}},
    ]
    if target_ca is not None:
        conn["spec"]["target"]["tls"] = {"mode": "verify-full", "caSecretRef": {"name": "bench-ca", "key": "ca.crt"}}
        secrets.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bench-ca", "namespace": ns},
                        "stringData": {"ca.crt": target_ca.read_text()}})
    (folder / "sidegate.yaml").write_text(yaml.safe_dump_all([*docs, *secrets], sort_keys=False))
    return str(conn["metadata"]["name"])


@contextlib.contextmanager
def sidegate(pg: LocalPostgres, issuer: LocalIssuer, workdir: Path, *flags: str,
             pure: bool = False, target_ca: Path | None = None) -> Iterator[tuple[int, int]]:
    """``sidegate proxy --manifests`` as production runs it: its own process, audit spooled.

    ``pure``: the data plane's Python source instead of its compiled modules (SIDEGATE_PURE_PYTHON);
    ``target_ca``: TLS to PostgreSQL too (``write_manifests``)."""
    port = free_port()
    workdir.mkdir(exist_ok=True)
    manifests = workdir / "manifests"
    manifests.mkdir()
    name = write_manifests(manifests, pg, issuer, port, target_ca)
    log = (workdir / "sidegate.log").open("wb")
    argv = [sys.executable, "-m", "sidegate_operator.cli", "proxy", "--manifests", str(manifests),
            "--connection", name, "--listen", f"127.0.0.1:{port}", "--admin", "off",
            "--audit-dir", str(workdir / "spool"), "--no-audit-stdout", "--log-level", "WARNING", *flags]
    env = {**os.environ, _native.PURE_ENV: "1" if pure else ""}
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        try:
            wait_port("127.0.0.1", port, timeout=30)
        except TimeoutError:
            raise RuntimeError(f"sidegate did not start: {(workdir / 'sidegate.log').read_text()}") from None
        yield port, proc.pid
    finally:
        stop_process(proc, 15)
        log.close()


@contextlib.contextmanager
def pgbouncer(pg: LocalPostgres, workdir: Path, tls: tuple[Path, Path],
              server_tls: bool = False) -> Iterator[tuple[int, int]]:
    """PgBouncer on loopback: ``app`` in transaction mode, ``app_session`` in session mode; TLS
    for the clients that ask (``tls``: certificate and key); ``server_tls``: TLS to PostgreSQL too
    (``verify-full``, trusting that certificate)."""
    port = free_port()
    folder = workdir / ("pgbouncer-server-tls" if server_tls else "pgbouncer")
    folder.mkdir()
    (folder / "userlist.txt").write_text(f'"{pg.user}" "{pg.password}"\n')
    upstream = f"host={pg.host} port={pg.port} dbname={pg.database}"
    (folder / "pgbouncer.ini").write_text(f"""\
[databases]
{pg.database} = {upstream}
{pg.database}_session = {upstream} pool_mode=session

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {folder}/userlist.txt
pool_mode = transaction
default_pool_size = 8
max_client_conn = 100
logfile = {folder}/pgbouncer.log
pidfile = {folder}/pgbouncer.pid
client_tls_sslmode = allow
client_tls_cert_file = {tls[0]}
client_tls_key_file = {tls[1]}
""" + (f"server_tls_sslmode = verify-full\nserver_tls_ca_file = {tls[0]}\n" if server_tls else ""))
    argv = [PGBOUNCER, str(folder / "pgbouncer.ini")]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root, like PostgreSQL
        pw = pwd.getpwnam("postgres")
        for p in (workdir, folder, *folder.iterdir()):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        argv = ["runuser", "-u", "postgres", "--", *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        try:
            wait_port("127.0.0.1", port, timeout=15)
        except TimeoutError:
            log = folder / "pgbouncer.log"
            raise RuntimeError(f"pgbouncer did not start: {log.read_text() if log.exists() else ''}") from None
        pidfile = folder / "pgbouncer.pid"  # runuser's child, not proc
        yield port, int(pidfile.read_text().strip()) if pidfile.exists() else proc.pid
    finally:
        stop_process(proc, 10)


# --------------------------------------------------------------------------- load


def _env(target: Target) -> dict[str, str]:
    return {**os.environ, "PGPASSWORD": target.password, "PGCONNECT_TIMEOUT": "10",
            "PGSSLMODE": "require" if target.tls else "disable"}


def psql(pg: LocalPostgres, target: Target, sql: str) -> tuple[int, str]:
    argv = [pg_tool("psql", pg), "-X", "-At", "-h", "127.0.0.1", "-p", str(target.port), "-U", target.user,
            "-d", target.database, "-c", sql]
    proc = subprocess.run(argv, capture_output=True, text=True, env=_env(target), timeout=60, check=False)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def check_policy(pg: LocalPostgres, target: Target) -> None:
    """Refuse to benchmark a Sidegate that is not doing its job for this caller."""
    code, out = psql(pg, target, "SELECT 'someone@example.com'::text AS email")
    if code != 0 or "someone@example.com" in out:
        raise RuntimeError(f"masking is not active for the benchmark caller: {out}")
    code, out = psql(pg, target, "DROP TABLE pgbench_history")
    if code == 0 or "no-drop" not in out:
        raise RuntimeError(f"the no-drop guardrail did not block: {out}")


def check_upstream_tls(pg: LocalPostgres, target: Target) -> None:
    """Refuse to report a "both sides" row whose proxy talks to PostgreSQL in plaintext."""
    code, out = psql(pg, target, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    if code != 0 or out.strip().splitlines()[-1:] != ["t"]:
        raise RuntimeError(f"{target.name} does not reach PostgreSQL over TLS: {out}")


def _find(pattern: str, text: str, what: str) -> str:
    m = re.search(pattern, text)
    if m is None:
        raise RuntimeError(f"cannot find {what} in pgbench output:\n{text}")
    return m.group(1)


def _cpu_ticks(stat: Path) -> tuple[int, str] | None:
    """User + system ticks of a process or thread, and its parent's pid; None once it is gone."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12]), fields[1]


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User + system CPU time so far of a process and its live children (Sidegate's audit
    worker), and the part of it spent by its native lane's thread (``_native.LANE_THREAD``,
    0 without one), from Linux /proc."""
    ticks = lane = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        got = _cpu_ticks(stat)
        if got is not None and (stat.parent.name == str(pid) or got[1] == str(pid)):
            ticks += got[0]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            if (task / "comm").read_text().strip() == _native.LANE_THREAD and (got := _cpu_ticks(task / "stat")):
                lane += got[0]
    hz = os.sysconf("SC_CLK_TCK")
    return ticks / hz, lane / hz


def pgbench(pg: LocalPostgres, target: Target, mode: str, clients: int, duration: int, logdir: Path) -> Result:
    prefix = logdir / f"{re.sub(r'[^a-z0-9]+', '_', target.name.lower())}_{mode}_{clients}"
    argv = [pg_tool("pgbench", pg), "-n", "-S", "-M", mode, "-c", str(clients), "-j", "1", "-T", str(duration),
            "-l", f"--log-prefix={prefix}", "-h", "127.0.0.1", "-p", str(target.port), "-U", target.user,
            target.database]
    cpu_before = cpu_seconds(target.pid) if target.pid else (0.0, 0.0)
    proc = subprocess.run(argv, capture_output=True, text=True, env=_env(target), timeout=duration + 120,
                          check=False)
    cpu_after = cpu_seconds(target.pid) if target.pid else None
    cpu, lane_cpu = (cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1]) if cpu_after else (None, None)
    if cpu is None or lane_cpu is None or not 0 < lane_cpu <= cpu:
        lane_cpu = None  # no lane thread, or one that ended meanwhile (its share left /proc/PID/task)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench against {target.name} failed ({proc.returncode}):\n{out}")
    logs = list(prefix.parent.glob(prefix.name + ".*"))
    latencies = sorted(int(line.split()[2]) for log in logs for line in log.read_text().splitlines() if line.strip())
    for log in logs:  # the next round's run of this point writes under the same prefix
        log.unlink()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [latencies[0] if latencies else 0] * 99
    failed = _find(r"number of failed transactions: (\d+)", out, "failed transactions") \
        if "failed transactions" in out else "0"
    transactions = int(_find(r"number of transactions actually processed: (\d+)", out, "transactions"))
    return Result(
        target=target.name, mode=mode, clients=clients,
        tps=float(_find(r"tps = ([\d.]+) \(without initial connection time\)", out, "tps")),
        latency_avg_ms=float(_find(r"latency average = ([\d.]+) ms", out, "latency average")),
        p50_ms=q[49] / 1000.0, p99_ms=q[98] / 1000.0,
        transactions=transactions,
        failed=int(failed),
        proxy_cpu_us=cpu / transactions * 1e6 if cpu is not None and transactions else None,
        lane_cpu_us=lane_cpu / transactions * 1e6 if lane_cpu and transactions else None,
    )


# --------------------------------------------------------------------------- run


def run(quick: bool = False, duration: int | None = None, scale: int | None = None,
        rounds: int | None = None) -> dict[str, Any]:
    """Every target at every mode and client count, ``rounds`` times over; ratios are against
    direct at the same point of the same round, and the median round is reported."""
    # many short rounds rather than a few long ones: on a shared VM a slow spell of a few seconds
    # then spoils one round of nine, which the median leaves out, instead of one of three
    duration = duration or (3 if quick else 2)
    rounds = rounds or (1 if quick else 9)
    scale = scale or (2 if quick else 5)
    issuer = LocalIssuer()
    workdir = Path(tempfile.mkdtemp(prefix="sidegate-bench-pg-"))
    os.chmod(workdir, 0o755)
    tls = self_signed(workdir / "tls")
    tls_flags = ("--tls-cert", str(tls[0]), "--tls-key", str(tls[1]))
    try:
        with LocalPostgres(settings=server_tls(tls, workdir / "pgtls")) as pg, \
                sidegate(pg, issuer, workdir / "inline", *tls_flags) as (sg_port, sg_pid), \
                sidegate(pg, issuer, workdir / "worker", "--audit-worker") as (sw_port, sw_pid), \
                sidegate(pg, issuer, workdir / "pure", pure=True) as (sp_port, sp_pid), \
                sidegate(pg, issuer, workdir / "both", *tls_flags, target_ca=tls[0]) as (sb_port, sb_pid), \
                pgbouncer(pg, workdir, tls) as (pb_port, pb_pid), \
                pgbouncer(pg, workdir, tls, server_tls=True) as (pbb_port, pbb_pid):
            subprocess.run([pg_tool("pgbench", pg), "-i", "-q", "-s", str(scale), "-h", str(pg.sockdir), "-p",
                            str(pg.port), "-U", pg.user, pg.database], check=True, capture_output=True)
            direct = Target("direct", pg.port, pg.user, pg.password, pg.database)
            bouncer = Target("PgBouncer", pb_port, pg.user, pg.password, pg.database, pb_pid)
            bouncer_session = Target("PgBouncer", pb_port, pg.user, pg.password, f"{pg.database}_session", pb_pid)
            gate = Target("Sidegate", sg_port, "bot", issuer.mint(BOT), pg.database, sg_pid)
            worker = Target("Sidegate --audit-worker", sw_port, "bot", issuer.mint(BOT), pg.database, sw_pid)
            pure = Target(PURE, sp_port, "bot", issuer.mint(BOT), pg.database, sp_pid)
            bouncer_tls = dataclasses.replace(bouncer, name="PgBouncer TLS", tls=True)
            bouncer_session_tls = dataclasses.replace(bouncer_session, name="PgBouncer TLS", tls=True)
            gate_tls = dataclasses.replace(gate, name="Sidegate TLS", tls=True)
            bouncer_both = Target(BOTH_SIDES.format("PgBouncer"), pbb_port, pg.user, pg.password, pg.database,
                                  pbb_pid, tls=True)
            bouncer_session_both = dataclasses.replace(bouncer_both, database=f"{pg.database}_session")
            gate_both = Target(BOTH_SIDES.format("Sidegate"), sb_port, "bot", issuer.mint(BOT), pg.database, sb_pid,
                               tls=True)
            for target in (gate, worker, pure, gate_tls, gate_both):
                check_policy(pg, target)
            for target in (bouncer_both, bouncer_session_both, gate_both):
                check_upstream_tls(pg, target)
            logdir = workdir / "logs"
            logdir.mkdir()
            runs: list[list[Result]] = []
            for _ in range(rounds):  # a round measures every point once: a slow spell hits all targets
                runs.append([
                    pgbench(pg, target, mode, clients, duration, logdir)
                    for mode in MODES for clients in CLIENTS
                    for target in (direct, bouncer_session if mode == "prepared" else bouncer, gate, worker, pure,
                                   bouncer_session_tls if mode == "prepared" else bouncer_tls, gate_tls,
                                   bouncer_session_both if mode == "prepared" else bouncer_both, gate_both)
                ])
            versions = {
                "postgres": subprocess.run([str(pg.bin / "postgres"), "--version"], capture_output=True,
                                           text=True, check=False).stdout.strip(),
                "pgbench": subprocess.run([pg_tool("pgbench", pg), "--version"], capture_output=True,
                                          text=True, check=False).stdout.strip(),
                "pgbouncer": subprocess.run([PGBOUNCER, "--version"], capture_output=True, text=True,
                                            check=False).stdout.splitlines()[0].strip(),
            }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results = median_rounds(runs)
    return {
        "duration_s": duration,
        "rounds": rounds,
        "scale": scale,
        "cpus": os.cpu_count(),
        "versions": versions,
        "notes": [
            f"pgbench -S -n -j 1, {rounds} round(s) of one fixed-duration run per target/mode/clients, "
            "nothing pinned; each ratio is against direct in the same round, the row is the median "
            "round's, the range spans all rounds",
            "PgBouncer: pool_mode=transaction for simple; session-mode alias for -M prepared "
            "(PgBouncer < 1.21 cannot pool protocol-level prepared statements in transaction mode)",
            "Sidegate: separate process, JWT password (token cache), guardrails, masking active for "
            "the caller (demo policy), audit spooled to disk (stdout audit off); with --audit-worker the "
            "audit is sealed and spooled by a second process, whose CPU is counted in the proxy's",
            "proxy CPU µs/query: the proxy process's user + system time per transaction; in brackets the "
            "part of Sidegate's native lane thread (the relay of statements Python allowed), the rest being "
            "its Python thread (sessions, sealing the lane's audit records) and the audit spool's writer",
            f"Sidegate's data plane: {NATIVE.reason}; '{PURE}' runs the same source as Python "
            "(SIDEGATE_PURE_PYTHON=1)",
            "TLS rows: the same PgBouncer (client_tls_sslmode=allow) and Sidegate (--tls-cert) with pgbench "
            "connecting sslmode=require (TLS 1.3, P-256 certificate); the target side plain; ratios against "
            "plain direct",
            f"'{BOTH_SIDES.format('...')}' rows: a second PgBouncer (server_tls_sslmode=verify-full) and Sidegate "
            "(spec.target.tls mode verify-full) that also reach PostgreSQL over TLS (checked in pg_stat_ssl), "
            "the same certificate as its CA",
        ],
        "results": [asdict(r) for r in results],
    }


def median_rounds(runs: list[list[Result]]) -> list[Result]:
    """Each point's median round (by its TPS ratio to the same round's direct), with the spread."""
    for results in runs:
        base = {(r.mode, r.clients): r for r in results if r.target == "direct"}
        for r in results:
            d = base[(r.mode, r.clients)]
            r.added_ms = r.latency_avg_ms - d.latency_avg_ms
            r.tps_ratio = r.tps / d.tps if d.tps else 0.0
    out = []
    for point in zip(*runs, strict=True):  # the same target/mode/clients in every round
        ranked = sorted(point, key=lambda r: r.tps if r.target == "direct" else r.tps_ratio)
        best = ranked[(len(ranked) - 1) // 2]
        best.rounds = len(point)
        best.ratio_min = min(r.tps_ratio for r in point)
        best.ratio_max = max(r.tps_ratio for r in point)
        out.append(best)
    return out


def ratio_text(r: dict[str, Any]) -> str:
    """``0.43`` or, measured over several rounds, ``0.43 (0.38-0.45)``."""
    text = f"{r['tps_ratio']:.2f}"
    if r.get("rounds", 1) > 1 and r["target"] != "direct":
        text += f" ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"
    return text


def _cpu(r: dict[str, Any]) -> str:
    """The proxy's CPU per query, and its lane thread's part: ``35 (lane 29)``."""
    if r.get("proxy_cpu_us") is None:
        return "-"
    lane = f" (lane {r['lane_cpu_us']:.0f})" if r.get("lane_cpu_us") else ""
    return f"{r['proxy_cpu_us']:.0f}{lane}"


def format_table(data: dict[str, Any]) -> str:
    lines = [
        f"{'target':<26}{'mode':<10}{'clients':>8}{'TPS':>10}{'avg ms':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'+avg ms':>9}{'TPS/direct':>20}{'proxy CPU us/q':>18}{'failed':>8}",
    ]
    for r in data["results"]:
        lines.append(
            f"{r['target']:<26}{r['mode']:<10}{r['clients']:>8}{r['tps']:>10.0f}{r['latency_avg_ms']:>9.3f}"
            f"{r['p50_ms']:>9.3f}{r['p99_ms']:>9.3f}{r['added_ms']:>9.3f}{ratio_text(r):>20}"
            f"{_cpu(r):>18}{r['failed']:>8}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 s per run, scale 2 (about 1 minute in all)")
    ap.add_argument("--duration", type=int, default=None, help="seconds per pgbench run (default 2)")
    ap.add_argument("--scale", type=int, default=None, help="pgbench -i scale (default 5)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds over every point (default 9, --quick 1)")
    args = ap.parse_args()
    data = run(args.quick, args.duration, args.scale, args.rounds)
    print(f"\nPostgreSQL data plane, pgbench -S, scale {data['scale']}, "
          f"{data['rounds']} x {data['duration_s']} s per point, {data['cpus']} CPUs shared by every process\n")
    print(format_table(data))
    print()
    for note in data["notes"]:
        print(f"- {note}")


if __name__ == "__main__":
    main()
