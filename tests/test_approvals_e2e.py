"""Just-in-time approval end to end: a bot's DROP through the real PostgreSQL proxy is held, an
AccessRequest appears in the real API server, alice approves with the kubectl plugin, the held
statement runs, and the audit event names the approval and its reviewer."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from sidegate_proxy.config import build_config
from sidegate_proxy.demo import LocalIssuer
from sidegate_proxy.kube import CONNECTIONS, KubeClient, KubeConfig
from sidegate_proxy.runtime import ProxyRuntime, RuntimeOptions
from sidegate_proxy.secrets import DictSecretStore
from sidegate_proxy.sinks import FileSink
from test_approvals import (  # noqa: F401  (fixtures shared with the broker tests)
    admin_kube,
    approvals_cluster,
    approvals_ns,
    connection_obj,
    plugin,
    wait_for_request,
)

pytestmark = pytest.mark.k8s


async def test_bot_drop_is_held_approved_with_the_plugin_and_runs(
    approvals_cluster: Any, approvals_ns: str, admin_kube: KubeClient, postgres: Any, tmp_path: Path  # noqa: F811 (pytest fixtures)
) -> None:
    ns = approvals_ns
    postgres.sql("CREATE TABLE IF NOT EXISTS jit_victim (id int)")
    issuer = LocalIssuer()
    conn = connection_obj(ns, hold=60)
    conn["spec"]["target"] = {"host": postgres.host, "port": postgres.port, "database": postgres.database}
    conn["spec"]["identity"] = {"issuers": [{
        "name": "ci", "issuer": "https://issuer.demo.sidegate.local", "audiences": ["sidegate"],
        "jwksSecretRef": {"name": "ci-jwks", "key": "jwks.json"},
    }]}
    await admin_kube.create(CONNECTIONS, ns, conn)
    secrets = DictSecretStore({
        "orders-db-admin": {"username": postgres.admin_user.encode(), "password": postgres.admin_password.encode()},
        "ci-jwks": {"jwks.json": issuer.jwks()},
    })
    audit_file = tmp_path / "audit.jsonl"
    runtime = ProxyRuntime(
        build_config(conn, []), secrets,
        RuntimeOptions(listen_host="127.0.0.1", listen_port=0, admin_port=None, audit_stdout=False,
                       spool_dir=tmp_path / "spool", extra_sinks=(FileSink(audit_file),),
                       kube=KubeConfig.from_kubeconfig(approvals_cluster.kubeconfig)),
    )
    await runtime.start()
    try:
        token = issuer.mint("system:serviceaccount:ci:deployer")
        db = await asyncpg.connect(host="127.0.0.1", port=runtime.port, user="deployer", password=token,
                                   database=postgres.database, server_settings={"application_name": "cleanup"})
        try:
            held = asyncio.ensure_future(db.execute("DROP TABLE jit_victim"))
            request = await wait_for_request(admin_kube, ns)
            name = request["metadata"]["name"]
            assert request["spec"]["statement"] == "DROP TABLE jit_victim"
            assert request["spec"]["requester"] == "system:serviceaccount:ci:deployer"
            assert request["spec"]["reason"] == "cleanup"
            assert not held.done()
            assert await plugin(approvals_cluster, "alice", "approve", name, "-n", ns, "--comment", "ok") == 0
            assert await asyncio.wait_for(held, 30) == "DROP TABLE"
            # The session is still usable after the held statement ran.
            assert await db.fetchval("SELECT 1") == 1
        finally:
            await db.close()
        assert postgres.sql("SELECT to_regclass('jit_victim') IS NULL").strip() == "t"
    finally:
        await runtime.close()

    events = [json.loads(line) for line in audit_file.read_text().splitlines()]
    drops = [e for e in events if "DROP TABLE jit_victim" in ((e.get("query_info") or {}).get("query_string") or "")]
    assert drops, events
    approved = [e for e in drops if (e.get("unmapped") or {}).get("decision") == "allow"]
    assert approved, drops
    assert approved[0]["unmapped"]["approval"] == {"namespace": ns, "name": name, "reviewer": "alice"}
