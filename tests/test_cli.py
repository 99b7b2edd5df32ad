"""The command line as a user runs it: real processes, a real PostgreSQL, psql as the client."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sidegate_proxy.demo import LocalIssuer
from sidegate_proxy.localpg import find_pg_bin, free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent
SIDEGATE = [sys.executable, "-m", "sidegate_operator.cli"]


def run(args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SIDEGATE, *args], capture_output=True, text=True, timeout=180, cwd=ROOT,
                          check=False, **kw)  # type: ignore[call-overload]


def test_help_and_unknown_command() -> None:
    assert run(["--help"]).returncode == 0
    bad = run(["frobnicate"])
    assert bad.returncode == 2
    assert "unknown command" in bad.stderr


def test_validate_examples_clean() -> None:
    result = run(["validate", "examples"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_validate_reports_broken_yaml(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("apiVersion: sidegate.dev/v1alpha1\nkind: Connection\nspec: [\n")
    result = run(["validate", str(tmp_path)])
    assert result.returncode == 1
    assert "bad.yaml" in result.stdout + result.stderr


def test_demo_once_shows_masking_block_and_audit() -> None:
    result = run(["demo", "--once"])
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "[REDACTED]" in out
    assert "customer1@example.com" in out  # the exempt auditor
    assert 'blocked by guardrail "no-drop"' in out
    assert "approval required" in out
    assert "OK: 1 chain(s) intact" in out


def _manifests(tmp_path: Path, pg_port: int, user: str, password: str, issuer: LocalIssuer) -> Path:
    from sidegate_proxy import demo

    docs = [d for d in yaml.safe_load_all(demo.DEMO_MANIFESTS) if d]
    docs[0]["spec"]["target"]["port"] = pg_port
    docs.append({"apiVersion": "v1", "kind": "Secret",
                 "metadata": {"name": "orders-db-admin", "namespace": "payments"},
                 "stringData": {"username": user, "password": password}})
    docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "demo-jwks", "namespace": "payments"},
                 "stringData": {"jwks.json": issuer.jwks().decode()}})
    folder = tmp_path / "gitops"
    folder.mkdir()
    (folder / "all.yaml").write_text(yaml.safe_dump_all(docs))
    return folder


def _psql(port: int, token: str, sql: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PGPASSWORD": token, "PGCONNECT_TIMEOUT": "10"}
    return subprocess.run([str(find_pg_bin() / "psql"), "-X", "-At", "-h", "127.0.0.1", "-p", str(port), "-U", "bot",
                           "-d", "app", "-c", sql], capture_output=True, text=True, env=env, timeout=60, check=False)


@pytest.mark.parametrize("worker", [False, True], ids=["audit-inline", "audit-worker"])
def test_proxy_from_manifests_folder(postgres, tmp_path: Path, worker: bool) -> None:  # type: ignore[no-untyped-def]
    issuer = LocalIssuer()
    folder = _manifests(tmp_path, postgres.port, postgres.admin_user, postgres.admin_password, issuer)
    port, admin = free_port(), free_port()
    audit_dir = tmp_path / "audit"
    proc = subprocess.Popen(
        [*SIDEGATE, "proxy", "--manifests", str(folder), "--connection", "orders-db",
         "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}", "--audit-dir", str(audit_dir),
         *(["--audit-worker"] if worker else [])],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_port("127.0.0.1", port, timeout=30)
        bot = issuer.mint("system:serviceaccount:payments:reporter")
        masked = _psql(port, bot, "SELECT email FROM customers ORDER BY id LIMIT 1")
        assert masked.returncode == 0, masked.stderr
        assert masked.stdout.strip() == "[REDACTED]"
        blocked = _psql(port, bot, "DROP TABLE customers")
        assert blocked.returncode != 0
        assert "no-drop" in blocked.stderr
        refused = _psql(port, "not-a-token", "SELECT 1")
        assert refused.returncode != 0
        assert "authentication failed" in refused.stderr
        assert postgres.admin_password not in refused.stderr + masked.stdout + blocked.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    decisions = [(e.get("unmapped") or {}).get("decision") for e in events]
    assert "block" in decisions
    query = "SELECT email FROM customers ORDER BY id LIMIT 1"
    (select,) = [e for e in events if (e.get("query_info") or {}).get("query_string") == query]
    assert (select["unmapped"]["decision"], select["unmapped"]["rows"]) == ("allow", 1)
    assert select["actor"]["user"]["name"] == "system:serviceaccount:payments:reporter"
    assert postgres.admin_password not in stdout + stderr
    # The spool on disk verifies as an intact chain.
    spooled = sorted(audit_dir.rglob("*.jsonl")) or sorted(p for p in audit_dir.rglob("*") if p.is_file()
                                                          and p.suffix not in (".cursor", ".json"))
    verify = run(["audit", "verify", *map(str, spooled)])
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_proxy_refuses_missing_connection(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    result = run(["proxy", "--manifests", str(tmp_path), "--connection", "nope"])
    assert result.returncode == 1
    assert "no Connection named 'nope'" in result.stderr


def test_proxy_refuses_malformed_config(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text("{not json")
    result = run(["proxy", "--config", str(cfg)])
    assert result.returncode == 1
    assert "not JSON" in result.stderr


def test_proxy_from_manifests_needs_the_token_signing_key_it_names(tmp_path: Path) -> None:
    conn = {"apiVersion": "sidegate.dev/v1alpha1", "kind": "Connection",
            "metadata": {"name": "orders", "namespace": "payments"},
            "spec": {"type": "postgres", "target": {"host": "db", "port": 5432, "database": "d"},
                     "credentials": {"secretRef": {"name": "admin"}},
                     "tokenExchange": {"signingKeySecretRef": {"name": "exchange"}}}}
    admin = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "admin", "namespace": "payments"},
             "stringData": {"username": "u", "password": "p"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump_all([conn, admin]))
    result = run(["proxy", "--manifests", str(tmp_path), "--connection", "orders", "--admin", "off"])
    assert result.returncode == 1
    assert "exchange" in result.stderr and "tls.key" in result.stderr, result.stderr


def _exchange_key(path: Path) -> str:
    """A fresh EC key written to ``path`` (replaced whole, as the kubelet does); its ``kid``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from sidegate_proxy.tokenexchange import ExchangeKey

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.with_name(".tmp").write_bytes(pem)
    os.replace(path.with_name(".tmp"), path)
    return ExchangeKey.from_pem(pem).kid


def test_proxy_follows_its_token_keys_without_a_restart(tmp_path: Path) -> None:
    """``--token-signing-key`` and ``--token-verification-key`` files are followed by the running
    process: the next key is published first, the swap signs with it, the old one stays."""
    import time
    import urllib.request

    conn = {"apiVersion": "sidegate.dev/v1alpha1", "kind": "Connection",
            "metadata": {"name": "orders", "namespace": "payments"},
            "spec": {"type": "postgres", "target": {"host": "db", "port": 5432, "database": "d"},
                     "credentials": {"secretRef": {"name": "admin"}}}}
    admin = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "admin", "namespace": "payments"},
             "stringData": {"username": "u", "password": "p"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump_all([conn, admin]))
    (keys := tmp_path / "keys").mkdir()
    old = _exchange_key(keys / "tls.key")
    port, admin_port = free_port(), free_port()
    proc = subprocess.Popen(
        [*SIDEGATE, "proxy", "--manifests", str(tmp_path / "c.yaml"), "--connection", "orders",
         "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin_port}", "--no-audit-stdout",
         "--token-signing-key", str(keys / "tls.key"), "--token-verification-key", str(keys / "next.key")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )

    def published(expected: list[str]) -> None:
        deadline, kids = time.monotonic() + 20, None
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/.well-known/jwks.json", timeout=5) as r:
                kids = [k["kid"] for k in json.load(r)["keys"]]
            if kids == expected:
                return
            time.sleep(0.2)
        raise AssertionError(f"published {kids}, expected {expected}")

    try:
        wait_port("127.0.0.1", admin_port, timeout=30)
        published([old])  # next.key does not exist yet: nothing more to trust
        new = _exchange_key(keys / "next.key")
        published([old, new])
        (keys / "tls.key").write_bytes(b"not a key")  # a broken swap: the old key stays
        time.sleep(3)
        published([old, new])
        os.replace(keys / "next.key", keys / "tls.key")
        published([new, old])  # signs with the new key; the old one is retired, still published
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "tls.key is not usable" in stderr and f"keeping key {old}" in stderr
    assert f"now signing with key {new}" in stderr and f"key {old} retired" in stderr
    assert "PRIVATE KEY" not in stderr


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
    return out


def test_proxy_stops_when_its_audit_worker_dies(postgres, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Nothing may run unrecorded: the proxy exits with an error (and Kubernetes restarts it)."""
    issuer = LocalIssuer()
    folder = _manifests(tmp_path, postgres.port, postgres.admin_user, postgres.admin_password, issuer)
    port = free_port()
    proc = subprocess.Popen(
        [*SIDEGATE, "proxy", "--manifests", str(folder), "--connection", "orders-db", "--listen",
         f"127.0.0.1:{port}", "--admin", "off", "--audit-worker", "--no-audit-stdout"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_port("127.0.0.1", port, timeout=30)
        ok = _psql(port, issuer.mint("system:serviceaccount:payments:reporter"), "SELECT 1")
        assert ok.returncode == 0, ok.stderr
        workers = _children(proc.pid)
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, stderr
    assert "the audit worker exited (code -9)" in stderr


def test_audit_verify_detects_edit(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    # Build a small chain with the library, then tamper with it.
    code = (
        "import asyncio, pathlib, sys\n"
        "from sidegate_proxy.audit import AuditLog\n"
        "from sidegate_proxy.sinks import FileSink\n"
        "async def main():\n"
        f"    log = AuditLog(pathlib.Path({str(tmp_path / 'spool')!r}), [FileSink(pathlib.Path({str(log)!r}))],"
        " b'k'*32, 'test')\n"
        "    await log.start()\n"
        "    for i in range(5):\n"
        "        await log.emit({'n': i})\n"
        "    await log.close()\n"
        "asyncio.run(main())\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert run(["audit", "verify", str(log)]).returncode == 0
    lines = log.read_text().splitlines()
    lines[2] = lines[2].replace('"n":2', '"n":7')
    log.write_text("\n".join(lines) + "\n")
    tampered = run(["audit", "verify", str(log)])
    assert tampered.returncode == 1
