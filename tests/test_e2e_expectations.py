"""The kind end-to-end expectations (e2e_expectations.json), run here against the local stack.

The same example policy hack/e2e-kind.sh applies (examples/postgres), served by ProxyRuntime in
front of a real PostgreSQL holding the same sample data, with the caller identified the way the
sidecar identifies it (``identity.workload``: the pod's token from a file, nothing asked of the
client), and psql run with the same flags. Only what a laptop cannot have is swapped: the issuer
(a local RSA key instead of the cluster's) and, for the approval, a throwaway API server instead
of kind's.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import e2e_expectations
from sidegate_proxy.config import build_config
from sidegate_proxy.demo import ISSUER, LocalIssuer
from sidegate_proxy.kube import CONNECTIONS, KubeClient, KubeConfig
from sidegate_proxy.localpg import LocalPostgres, find_pg_bin, sample_database
from sidegate_proxy.runtime import ProxyRuntime, RuntimeOptions
from sidegate_proxy.secrets import DictSecretStore
from sidegate_proxy.sinks import FileSink
from test_approvals import (  # noqa: F401  (fixtures shared with the approval tests)
    admin_kube,
    approvals_cluster,
    approvals_ns,
    plugin,
    wait_for_request,
)

REPO = Path(__file__).resolve().parent.parent
EXPECT = e2e_expectations.load()


def example_objects(namespace: str, pg: LocalPostgres) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """examples/postgres's Connection and MaskingPolicy, pointed at ``pg`` and the local issuer."""
    folder = REPO / "examples" / "postgres"
    conn = yaml.safe_load((folder / "connection.yaml").read_text())
    policy = yaml.safe_load((folder / "maskingpolicy.yaml").read_text())
    for obj in (conn, policy):
        obj["metadata"]["namespace"] = namespace
    spec = conn["spec"]
    spec["target"] = {"host": pg.host, "port": pg.port, "database": pg.database, "tls": {"mode": "disable"}}
    assert spec["identity"]["workload"] is True
    spec["identity"]["issuers"][0].update(issuer=ISSUER, jwksSecretRef={"name": "local-jwks", "key": "jwks.json"})
    return conn, [policy]


@pytest.fixture(scope="module")
def sample_pg() -> Iterator[LocalPostgres]:
    with sample_database() as pg:
        yield pg


def psql(port: int, database: str, sql: str) -> tuple[int, str]:
    """psql as the workload runs it through its sidecar: no password (the sidecar knows the pod)."""
    argv = [str(find_pg_bin() / "psql"), *EXPECT["psql_args"], "-h", "127.0.0.1", "-p", str(port),
            "-U", "orders-api", "-d", database, "-c", sql]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    proc = subprocess.run(argv, capture_output=True, text=True, env={**env, "PGCONNECT_TIMEOUT": "10"},
                          timeout=120, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def read_audit(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class LocalStack:
    """ProxyRuntime serving the example Connection, audit to a file."""

    def __init__(self, tmp: Path, pg: LocalPostgres, conn: dict[str, Any], policies: list[dict[str, Any]],
                 kube: KubeConfig | None = None, audit_process: bool = False) -> None:
        issuer = LocalIssuer()
        token = tmp / "token"
        token.write_text(issuer.mint(EXPECT["caller"]))
        self.audit_file = tmp / "audit.jsonl"
        secrets = DictSecretStore({
            "orders-db-admin": {"username": pg.user.encode(), "password": pg.password.encode()},
            "local-jwks": {"jwks.json": issuer.jwks()},
        })
        self.runtime = ProxyRuntime(build_config(conn, policies), secrets, RuntimeOptions(
            listen_host="127.0.0.1", listen_port=0, admin_port=None, audit_stdout=False,
            spool_dir=tmp / "spool", extra_sinks=(FileSink(self.audit_file),),
            workload_token_path=str(token), kube=kube, audit_process=audit_process))

    async def __aenter__(self) -> LocalStack:
        await self.runtime.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.runtime.close()  # flushes every sink

    @property
    def port(self) -> int:
        assert self.runtime.port is not None
        return self.runtime.port


@pytest.mark.postgres
@pytest.mark.parametrize("name", [c["name"] for c in EXPECT["cases"] if not c.get("approve")])
async def test_case_without_approval(name: str, sample_pg: LocalPostgres, tmp_path: Path) -> None:
    c = e2e_expectations.case(EXPECT, name)
    conn, policies = example_objects(EXPECT["connection"]["namespace"], sample_pg)
    async with LocalStack(tmp_path, sample_pg, conn, policies) as stack:
        code, out = await asyncio.to_thread(psql, stack.port, sample_pg.database, c["sql"])
    assert e2e_expectations.check_output(c, code, out) == []
    assert e2e_expectations.check_audit(EXPECT, read_audit(stack.audit_file), cases=[c]) == []


@pytest.mark.postgres
async def test_every_case_through_the_audit_worker(sample_pg: LocalPostgres, tmp_path: Path) -> None:
    """As ``sidegate proxy`` runs by default: the audit sealed and spooled by a worker process."""
    cases = [c for c in EXPECT["cases"] if not c.get("approve")]
    conn, policies = example_objects(EXPECT["connection"]["namespace"], sample_pg)
    async with LocalStack(tmp_path, sample_pg, conn, policies, audit_process=True) as stack:
        for c in cases:
            code, out = await asyncio.to_thread(psql, stack.port, sample_pg.database, c["sql"])
            assert e2e_expectations.check_output(c, code, out) == [], c["name"]
    assert e2e_expectations.check_audit(EXPECT, read_audit(stack.audit_file), cases=cases) == []


def test_checks_catch_a_leak() -> None:
    """The checks themselves fail on the output and audit of an unmasked read."""
    c = e2e_expectations.case(EXPECT, "emails-and-cards-masked")
    leaked = "1|customer1@example.com|5500-0000-0000-0004\n"
    assert len(e2e_expectations.check_output(c, 0, leaked)) >= 3
    event = {"chain_id": "x", "query_info": {"query_string": c["sql"]},
             "actor": {"user": {"name": EXPECT["caller"]}}, "unmapped": {"decision": "allow", "masked": {}}}
    assert e2e_expectations.check_audit(EXPECT, [event], cases=[c])
    assert e2e_expectations.audit_events(["INFO started", json.dumps(event)]) == [event]


# --------------------------------------------------------------------------- the approval


@pytest.mark.k8s
@pytest.mark.postgres
@pytest.mark.parametrize("name", [c["name"] for c in EXPECT["cases"] if c.get("approve")])
async def test_case_with_approval(name: str, approvals_cluster: Any, approvals_ns: str,  # noqa: F811
                                  admin_kube: KubeClient, sample_pg: LocalPostgres,  # noqa: F811
                                  tmp_path: Path) -> None:
    c = e2e_expectations.case(EXPECT, name)
    conn, policies = example_objects(approvals_ns, sample_pg)
    created = copy.deepcopy(conn)
    created["spec"]["identity"]["issuers"][0].pop("jwksSecretRef")  # the Secret is local, not in the cluster
    await admin_kube.create(CONNECTIONS, approvals_ns, created)
    kube = KubeConfig.from_kubeconfig(approvals_cluster.kubeconfig)
    async with LocalStack(tmp_path, sample_pg, conn, policies, kube=kube) as stack:
        held = asyncio.ensure_future(asyncio.to_thread(psql, stack.port, sample_pg.database, c["sql"]))
        request = await wait_for_request(admin_kube, approvals_ns)
        assert request["spec"]["statement"] == c["sql"]
        assert request["spec"]["requester"] == EXPECT["caller"]
        assert not held.done()
        name_ = request["metadata"]["name"]
        assert await plugin(approvals_cluster, "alice", "approve", name_, "-n", approvals_ns) == 0
        code, out = await asyncio.wait_for(held, 60)
    assert e2e_expectations.check_output(c, code, out) == []
    assert e2e_expectations.check_audit(EXPECT, read_audit(stack.audit_file), reviewer="alice", cases=[c]) == []
