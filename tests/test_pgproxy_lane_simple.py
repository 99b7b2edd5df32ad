"""Simple queries in the native lane: a shape the guardrails allowed outright (one SELECT, known by
its literal key) is relayed natively, with the same results and audit events as the Python relay;
nothing else ever is."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import pytest

import sidegate_proxy
from pg_fixtures import PG, ProxyUnderTest, run_proxy
from sidegate_proxy.pgproxy import ProxySettings
from test_pgproxy import psql
from test_pgproxy_masking import EXEMPT, RED, RULES

pytestmark = [pytest.mark.postgres,
              pytest.mark.skipif(sidegate_proxy.LANE is None, reason="the native lane is not built")]

NO_ORDERS = {"name": "no-orders", "sql": {"statements": ["select"], "tables": ["orders"]}, "action": "block"}
NO_DROP = {"name": "no-drop", "sql": {"statements": ["drop", "truncate"]}, "action": "block"}
HOLD = {"name": "hold-notes", "sql": {"statements": ["select"], "tables": ["v_customers"]},
        "action": "requireApproval"}


async def run_psql(p: ProxyUnderTest, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """psql, then until the proxy has recorded its session's end: the lane reports statements in
    batches, and a session's come before its end."""
    ended = sum(e.kind == "session_end" for e in p.audit.events)
    res = await asyncio.to_thread(psql, p, *args, **kwargs)
    for _ in range(250):
        if sum(e.kind == "session_end" for e in p.audit.events) > ended:
            break
        await asyncio.sleep(0.02)
    return res


def script(template: str, ids: range) -> str:
    return "".join(template.format(i) + "\n" for i in ids)


def lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line]


async def test_results_and_audit_equal_the_python_relay(postgres: PG, tmp_path: Path) -> None:
    sql = script("SELECT id, name, note FROM customers WHERE id = {};", range(1, 61))
    outputs, audits = [], []
    for lane in (True, False):
        async with run_proxy(postgres, tmp_path, settings=ProxySettings(lane=lane)) as p:
            res = await run_psql(p, stdin=sql)
            assert res.returncode == 0, res.stderr
            outputs.append(lines(res.stdout))
            audits.append([(e.command, e.decision, e.rows, e.sqlstate) for e in p.audit.commands()])
            if lane:
                assert p.server.lane_statements >= 50  # all but the first round trips
            else:
                assert p.server.lane_slices == 0
    assert outputs[0] == outputs[1] and len(outputs[0]) == 60
    assert audits[0] == audits[1]
    assert audits[0][7] == ("SELECT id, name, note FROM customers WHERE id = 8", "allow", 1, None)


async def test_masked_columns_stay_masked(postgres: PG, tmp_path: Path) -> None:
    async with run_proxy(postgres, tmp_path, masking=RULES, exempt=EXEMPT) as p:
        res = await run_psql(p, stdin=script("SELECT id, email FROM customers WHERE id = {};", range(1, 31))
                   + script("SELECT id, customer_id FROM orders WHERE id = {};", range(1, 31)))
        assert res.returncode == 0, res.stderr
        out = lines(res.stdout)
        assert len(out) == 60
        assert all(line.endswith(f"|{RED}") for line in out[:30])  # every time, not only the first
        assert "@" not in res.stdout
        assert [line.split("|")[0] for line in out[30:]] == [str(i) for i in range(1, 31)]
        assert p.server.lane_statements >= 25  # the shape with nothing to mask ran natively
        masked = [e for e in p.audit.commands() if e.masked]
        assert len(masked) == 30


async def test_a_blocked_shape_is_blocked_every_time(postgres: PG, tmp_path: Path) -> None:
    async with run_proxy(postgres, tmp_path, guardrails=[NO_ORDERS, NO_DROP]) as p:
        sql = "".join(f"SELECT id FROM customers WHERE id = {i};\nSELECT id FROM orders WHERE id = {i};\n"
                      for i in range(1, 21))
        res = await run_psql(p, stdin=sql)
        assert lines(res.stdout) == [str(i) for i in range(1, 21)]
        assert res.stderr.count('blocked by guardrail "no-orders"') == 20
        events = p.audit.commands()
        assert [e.decision for e in events if "orders" in (e.command or "")] == ["block"] * 20
        # a known shape with a second statement behind it is a new text: Python decides it
        smuggled = await run_psql(p, "-c", "SELECT id FROM customers WHERE id = 5; DROP TABLE tmp_import")
        assert "no-drop" in smuggled.stderr
        assert (await run_psql(p, "-c", "SELECT count(*) FROM tmp_import")).returncode == 0


async def test_a_held_shape_is_never_relayed(postgres: PG, tmp_path: Path) -> None:
    async with run_proxy(postgres, tmp_path, guardrails=[HOLD]) as p:
        sql = "".join(f"SELECT id FROM customers WHERE id = {i};\nSELECT id FROM v_customers WHERE id = {i};\n"
                      for i in range(1, 11))
        res = await run_psql(p, stdin=sql)
        assert res.stderr.count("approval required") == 10
        assert lines(res.stdout) == [str(i) for i in range(1, 11)]


async def test_errors_in_the_lane(postgres: PG, tmp_path: Path) -> None:
    async with run_proxy(postgres, tmp_path) as p:
        sql = "".join(f"SELECT id / 0 FROM customers WHERE id = {i};\nSELECT id FROM customers WHERE id = {i};\n"
                      for i in range(1, 21))
        res = await run_psql(p, stdin=sql)
        assert res.stderr.count("division by zero") == 20
        assert lines(res.stdout) == [str(i) for i in range(1, 21)]
        failed = [e for e in p.audit.commands() if e.sqlstate == "22012"]
        assert len(failed) == 20 and all(e.decision == "allow" and e.rows is None for e in failed)
        assert p.server.lane_statements >= 30


async def test_session_end_is_audited_after_the_lane(postgres: PG, tmp_path: Path) -> None:
    async with run_proxy(postgres, tmp_path) as p:
        res = await run_psql(p, stdin=script("SELECT id = {} FROM customers WHERE id = 1;", range(1, 11)))
        assert res.returncode == 0, res.stderr
        assert p.server.lane_statements > 0
        assert len(p.audit.commands()) == 10
        ends = [e for e in p.audit.events if e.kind == "session_end"]
        assert len(ends) == 1 and ends[0].commands == 10
