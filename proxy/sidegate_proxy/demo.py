"""``make demo``: Sidegate's main job on an embedded default, with nothing but this machine.

A throwaway PostgreSQL with customers (emails, card numbers), a local OIDC issuer (an RSA key
whose JWKS the gateway reads from a Secret), and Sidegate in front. The demo runs a masked query
as a bot, the same query as an auditor (exempt), a blocked DROP, then prints the audit trail and
verifies its hash chain, and leaves the gateway running for psql until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jwt
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .config import build_config
from .localpg import LocalPostgres, find_pg_bin, free_port, sample_database
from .runtime import ProxyRuntime, RuntimeOptions, run_event_loop
from .secrets import DictSecretStore
from .sinks import FileSink

ISSUER = "https://issuer.demo.sidegate.local"
KID = "demo-1"

DEMO_MANIFESTS = """
apiVersion: sidegate.dev/v1alpha1
kind: Connection
metadata: {name: orders-db, namespace: payments}
spec:
  type: postgres
  target: {host: 127.0.0.1, port: 5432, database: app, tls: {mode: disable}}
  credentials: {secretRef: {name: orders-db-admin}}
  mode: gateway
  listen: {port: 15432}
  identity:
    issuers:
      - name: demo
        issuer: https://issuer.demo.sidegate.local
        audiences: [sidegate]
        jwksSecretRef: {name: demo-jwks, key: jwks.json}
        groupsClaim: groups
  access:
    - subjects: ["system:serviceaccount:payments:*"]
    - groups: [auditors]
  guardrails:
    - name: no-drop
      sql: {statements: [drop, truncate]}
      action: block
    - name: bulk-writes
      sql: {statements: [delete, update], withoutWhere: true}
      action: requireApproval
  approval:
    approvers: {groups: [dba-oncall]}
    holdSeconds: 0
---
apiVersion: sidegate.dev/v1alpha1
kind: MaskingPolicy
metadata: {name: pii, namespace: payments}
spec:
  connections: [orders-db]
  rules:
    - name: emails
      columns: ["*.email"]
      detectors: [email]
      strategy: redact
    - name: cards
      detectors: [credit-card]
      strategy: partial
      keepLast: 4
    - name: internal-ids
      pattern: "ACME-[0-9]{8}"
      strategy: hash
  exempt: {groups: [auditors]}
"""


class LocalIssuer:
    """An RSA signing key and the JWKS a gateway trusts it by: a stand-in for a cluster issuer."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> bytes:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update({"kid": KID, "alg": "RS256", "use": "sig"})
        return json.dumps({"keys": [jwk]}).encode()

    def mint(self, subject: str, groups: list[str] | None = None, ttl: int = 3600) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": ISSUER, "sub": subject, "aud": "sidegate", "iat": now, "nbf": now,
                                  "exp": now + ttl, "groups": groups or []}
        pem = self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
        return jwt.encode(claims, pem, algorithm="RS256", headers={"kid": KID})


def _psql(port: int, token: str, sql: str) -> tuple[int, str]:
    psql = shutil.which("psql") or str(find_pg_bin() / "psql")
    env = {**os.environ, "PGPASSWORD": token, "PGCONNECT_TIMEOUT": "10"}
    proc = subprocess.run(
        [psql, "-X", "-h", "127.0.0.1", "-p", str(port), "-U", "bot", "-d", "app", "-c", sql],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def _banner(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def describe_event(ev: dict[str, Any]) -> str:
    """One audit event as a terminal line: sequence, activity, who, decision, rule, command."""
    u = ev.get("unmapped") or {}
    actor = ((ev.get("actor") or {}).get("user") or {}).get("name", "-")
    rule = (ev.get("policy") or {}).get("name") or ""
    command = (ev.get("query_info") or {}).get("query_string") or ""
    masked = u.get("masked") or {}
    extra = f" masked={masked}" if masked else ""
    return (f"#{ev.get('seq'):<3} {ev.get('activity_name', ''):<10} {actor:<40} {u.get('decision') or '':<16}"
            f"{rule:<12} {command[:58]}{extra}")


def build_demo(pg: LocalPostgres, issuer: LocalIssuer) -> tuple[Any, DictSecretStore]:
    docs = [d for d in yaml.safe_load_all(DEMO_MANIFESTS) if d]
    conn, policies = docs[0], docs[1:]
    conn["spec"]["target"]["port"] = pg.port
    secrets = DictSecretStore({
        "orders-db-admin": {"username": pg.user.encode(), "password": pg.password.encode()},
        "demo-jwks": {"jwks.json": issuer.jwks()},
    })
    return build_config(conn, policies), secrets


async def run_demo(once: bool, port: int | None) -> int:
    issuer = LocalIssuer()
    workdir = Path(tempfile.mkdtemp(prefix="sidegate-demo-"))
    audit_file = workdir / "audit.jsonl"
    with sample_database() as pg:
        config, secrets = build_demo(pg, issuer)
        options = RuntimeOptions(
            listen_host="127.0.0.1", listen_port=port if port is not None else free_port(),
            admin_port=free_port(), spool_dir=workdir / "spool", audit_stdout=False,
            extra_sinks=(FileSink(audit_file),),
        )
        runtime = ProxyRuntime(config, secrets, options)
        await runtime.start()
        try:
            assert runtime.port is not None
            bot = issuer.mint("system:serviceaccount:payments:reporter")
            auditor = issuer.mint("alice@example.com", groups=["auditors"])
            query = "SELECT id, name, email, card FROM customers ORDER BY id LIMIT 3"
            steps = [
                ("A bot reads customers: emails redacted, cards partially masked", bot, query),
                ("An auditor (exempt group) reads the same rows in clear", auditor, query),
                ("Order references are hashed (stable, joinable, not reversible)", bot,
                 "SELECT ref, amount FROM orders ORDER BY id LIMIT 2"),
                ("The bot tries to DROP a table: blocked before it reaches PostgreSQL", bot,
                 "DROP TABLE customers"),
                ("A DELETE without WHERE needs a human approval", bot, "DELETE FROM orders"),
                ("Smuggling through a CTE is caught by the real parser", bot,
                 "WITH gone AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM gone"),
                ("A forged token is refused: no upstream connection is opened", bot[:-4] + "AAAA", "SELECT 1"),
            ]
            for title, token, sql in steps:
                _banner(title)
                print(f"$ psql -c {sql!r}")
                _, out = await asyncio.to_thread(_psql, runtime.port, token, sql)
                print(out)
            assert runtime.audit is not None
            await runtime.audit.flush()
            await asyncio.sleep(0.5)  # let the file sink's shipper catch up
            _banner(f"The audit trail ({audit_file})")
            for line in audit_file.read_text().splitlines():
                print("  " + describe_event(json.loads(line)))
            from .auditverify import format_report, verify_files

            _banner("sidegate audit verify: the hash chain is intact")
            print(format_report(verify_files([str(audit_file)])))
            token_file = workdir / "bot.token"
            token_file.write_text(bot)
            _banner("Try it yourself")
            print(f'  PGPASSWORD="$(cat {token_file})" psql "host=127.0.0.1 port={runtime.port} '
                  f'dbname=app user=bot"')
            print(f"  metrics: curl http://127.0.0.1:{runtime.admin_port}/metrics")
            if not once:
                print("\nSidegate is running; Ctrl-C stops it and removes the throwaway database.", flush=True)
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                import signal

                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, stop.set)
                await stop.wait()
        finally:
            await runtime.close()
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sidegate demo", description=__doc__)
    p.add_argument("--once", action="store_true", help="run the scripted steps and exit")
    p.add_argument("--port", type=int, default=None, help="gateway port (default: a free one)")
    args = p.parse_args(argv)
    return run_event_loop(run_demo(args.once, args.port))


if __name__ == "__main__":
    sys.exit(main())
