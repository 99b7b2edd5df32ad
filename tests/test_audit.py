"""Audit events, redaction, the hash chain and ``sidegate audit verify`` (pure parts + local spool)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sidegate_proxy.audit import (
    GENESIS,
    REDACTED,
    ApprovalRef,
    AuditLog,
    Chain,
    command_event,
    record_hash,
    redact_statement,
    rfc3339,
    session_end,
    session_start,
)
from sidegate_proxy.auditverify import load_key, main, verify_lines
from sidegate_proxy.policy import Caller, Decision
from sidegate_proxy.sinks import FileSink

CALLER = Caller(
    "system:serviceaccount:ci:deployer", "https://kubernetes.default.svc", frozenset({"ci", "dev"})
)
KEY = b"0123456789abcdef0123456789abcdef"


# --------------------------------------------------------------------------- redaction


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("ALTER ROLE bob PASSWORD 'hunter2'", f"ALTER ROLE bob PASSWORD {REDACTED}"),
        (
            "alter user bob with encrypted password 'it''s; secret'",
            f"alter user bob with encrypted password {REDACTED}",
        ),
        (
            "CREATE USER x PASSWORD E'a\\'b;c' VALID UNTIL '2030-01-01'",
            f"CREATE USER x PASSWORD {REDACTED} VALID UNTIL {REDACTED}",
        ),
        ("CREATE ROLE r LOGIN PASSWORD $pw$ with ' quote; $pw$", f"CREATE ROLE r LOGIN PASSWORD {REDACTED}"),
        ("CREATE ROLE r PASSWORD $$x$$", f"CREATE ROLE r PASSWORD {REDACTED}"),
        ("SET my.password = 'p'", f"SET my.password = {REDACTED}"),
        (
            "UPDATE users SET \"Password\" = U&'d\\0061t' WHERE id = 1",
            f'UPDATE users SET "Password" = {REDACTED} WHERE id = 1',
        ),
        (
            "CREATE USER MAPPING FOR u SERVER s OPTIONS (user 'a', password 'b')",
            f"CREATE USER MAPPING FOR u SERVER s OPTIONS (user {REDACTED}, password {REDACTED})",
        ),
        # unterminated literal: everything after the quote is hidden
        ("ALTER ROLE bob PASSWORD 'never closed; SELECT 1", f"ALTER ROLE bob PASSWORD {REDACTED}"),
        # comments in a sensitive statement may carry the secret too
        ("ALTER ROLE bob PASSWORD /* was: old */ 'new'", f"ALTER ROLE bob PASSWORD /* *** */ {REDACTED}"),
    ],
)
def test_redact_password_commands(sql: str, expected: str) -> None:
    assert redact_statement(sql) == expected


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 'password' FROM t",  # the word only inside a literal: not a password command
        "SELECT * FROM customers WHERE email = 'a@b.c'",
        "SELECT $$ALTER ROLE x PASSWORD 'y'$$",  # dollar-quoted text is data, not a command
        "-- password\nSELECT 'keep'",  # the word only in a comment
        "SELECT e'x' , E'\\'' FROM t",
    ],
)
def test_redact_leaves_ordinary_statements_alone(sql: str) -> None:
    assert redact_statement(sql) == sql


def test_redact_is_per_statement() -> None:
    sql = "SELECT 'visible'; ALTER ROLE a PASSWORD 'x'; SELECT 'also visible'"
    assert (
        redact_statement(sql) == f"SELECT 'visible'; ALTER ROLE a PASSWORD {REDACTED}; SELECT 'also visible'"
    )


def test_redact_is_idempotent() -> None:
    once = redact_statement("ALTER ROLE a PASSWORD 'x'")
    assert redact_statement(once) == once


# --------------------------------------------------------------------------- OCSF mapping


def test_command_event_ocsf_shape() -> None:
    ev = command_event(
        session_id="s-1",
        connection="payments/orders-db",
        connection_type="postgres",
        caller=CALLER,
        command="DROP TABLE tmp_import",
        command_class="drop",
        decision="allow",
        rule="no-drop",
        approval=ApprovalRef("payments", "ci-deployer-drop-tmp-7f3a", "alice"),
        rows=0,
        duration_ms=3.4,
        sqlstate="00000",
        client="10.1.2.3:40000",
        target="orders-db.payments.svc:5432",
        database="orders",
        time=1714564800.1234,
    ).to_dict()
    assert (ev["category_uid"], ev["class_uid"], ev["activity_id"]) == (6, 6005, 7)
    assert ev["type_uid"] == 600507
    assert ev["time"] == 1714564800123 and ev["time_dt"] == "2024-05-01T12:00:00.123Z"
    assert ev["actor"]["user"]["name"] == CALLER.subject
    assert ev["actor"]["user"]["groups"] == [{"name": "ci"}, {"name": "dev"}]
    assert ev["actor"]["idp"]["name"] == CALLER.issuer
    assert ev["actor"]["session"]["uid"] == "s-1"
    assert ev["src_endpoint"] == {"ip": "10.1.2.3", "port": 40000}
    assert ev["dst_endpoint"] == {
        "svc_name": "payments/orders-db",
        "hostname": "orders-db.payments.svc",
        "port": 5432,
    }
    assert ev["query_info"]["query_string"] == "DROP TABLE tmp_import"
    assert ev["database"]["name"] == "orders"
    assert ev["policy"] == {"name": "no-drop"}
    assert ev["duration"] == 3 and ev["status_code"] == "00000" and ev["status_id"] == 1
    assert ev["unmapped"]["approval"] == {
        "namespace": "payments",
        "name": "ci-deployer-drop-tmp-7f3a",
        "reviewer": "alice",
    }
    assert ev["metadata"]["product"]["name"] == "Sidegate"


def test_blocked_http_event_redacts_query_and_maps_api_activity() -> None:
    ev = command_event(
        session_id="h-1",
        connection="payments/billing-api",
        connection_type="http",
        caller=CALLER,
        command="post /v1/refunds?token=abc&x=1",
        decision=Decision("block", "read-only-api", "writes blocked"),
        http_status=403,
    ).to_dict()
    assert (ev["class_uid"], ev["activity_id"], ev["type_uid"]) == (6003, 1, 600301)
    assert ev["http_request"] == {
        "http_method": "POST",
        "url": {"path": "/v1/refunds", "query_string": "token=***&x=***"},
    }
    assert ev["api"]["operation"] == "POST"
    assert (ev["action_id"], ev["disposition_id"], ev["status_id"]) == (2, 2, 2)
    assert ev["policy"]["name"] == "read-only-api" and ev["status_detail"] == "writes blocked"
    assert ev["http_response"]["code"] == 403
    assert "abc" not in json.dumps(ev)


def test_http_request_event_adapter() -> None:
    from sidegate_proxy.audit import http_request_event
    from sidegate_proxy.config import parse_connection

    conn = parse_connection({
        "metadata": {"name": "billing-api", "namespace": "payments"},
        "spec": {"type": "http", "target": {"url": "https://billing.internal:8443"},
                 "credentials": {"secretRef": {"name": "billing-token"}}},
    })
    ev = http_request_event(
        connection=conn, caller=CALLER, session_id="r1", method="GET", path="/v1/customers/7",
        query="api_key=s3cret", status=200, decision=Decision("allow"), masked={"$..email": 2},
        duration_ms=12.5, client="127.0.0.1",
    ).to_dict()
    assert (ev["class_uid"], ev["activity_id"]) == (6003, 2)
    assert ev["http_request"]["url"] == {"path": "/v1/customers/7", "query_string": "api_key=***"}
    dst = {"svc_name": "payments/billing-api", "hostname": "billing.internal", "port": 8443}
    assert ev["dst_endpoint"] == dst
    assert ev["unmapped"]["masked"] == {"$..email": 2} and ev["http_response"]["code"] == 200
    assert "s3cret" not in json.dumps(ev)


def test_password_statement_is_redacted_at_construction() -> None:
    ev = command_event(
        session_id="s",
        connection="ns/db",
        connection_type="postgres",
        caller=CALLER,
        command="ALTER ROLE app PASSWORD 'hunter2'",
        decision="allow",
    )
    assert "hunter2" not in json.dumps(ev.to_dict())


def test_session_events() -> None:
    start = session_start(
        session_id="s",
        connection="ns/db",
        connection_type="postgres",
        caller=None,
        decision=Decision("block", "access", "not allowed"),
    ).to_dict()
    assert start["activity_id"] == 3 and start["action_id"] == 2 and "user" not in start["actor"]
    end = session_end(
        session_id="s",
        connection="ns/api",
        connection_type="http",
        caller=CALLER,
        duration_ms=1000,
        commands=4,
    ).to_dict()
    assert (end["class_uid"], end["activity_id"]) == (6003, 99)
    assert end["unmapped"]["commands"] == 4


def test_rfc3339() -> None:
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(1.9996) == "1970-01-01T00:00:02.000Z"


# --------------------------------------------------------------------------- the chain and verify


def _event(i: int) -> dict[str, Any]:
    return command_event(
        session_id="s",
        connection="ns/db",
        connection_type="postgres",
        caller=CALLER,
        command=f"SELECT {i}",
        decision="allow",
        time=1714564800 + i,
    ).to_dict()


def chain_lines(
    n: int, chain_id: str = "pod-a@2024-05-01T00:00:00.000Z", every: int = 0, **keys: Any
) -> list[str]:
    chain = Chain(chain_id, **keys)
    out = []
    for i in range(n):
        out.append(chain.seal(_event(i))[1].decode())
        if every and (i + 1) % every == 0:
            out.append(chain.seal(chain.checkpoint(1714564800 + i))[1].decode())
    return out


def kinds(lines: list[str], **kw: Any) -> list[str]:
    return [p.kind for p in verify_lines(lines, **kw).problems]


def test_sealed_lines_are_canonical_and_linked() -> None:
    lines = chain_lines(3)
    records = [json.loads(line) for line in lines]
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert records[0]["prev_hash"] == GENESIS
    assert records[1]["prev_hash"] == records[0]["hash"]
    assert all(record_hash(r) == r["hash"] for r in records)
    assert records[2]["metadata"]["uid"] == "pod-a@2024-05-01T00:00:00.000Z:3"
    report = verify_lines(lines)
    assert report.ok and report.problems == () and report.chains[0].last_seq == 3


def test_verify_detects_an_edited_line() -> None:
    lines = chain_lines(5)
    lines[2] = lines[2].replace("SELECT 2", "SELECT 9")
    assert kinds(lines) == ["edited"]


def test_verify_detects_an_edit_with_a_recomputed_hash() -> None:
    lines = chain_lines(5)
    rec = json.loads(lines[2])
    rec["query_info"]["query_string"] = "SELECT harmless"
    rec["hash"] = record_hash(rec)
    lines[2] = json.dumps(rec)
    assert kinds(lines) == ["broken-link"]


def test_verify_detects_a_deleted_line() -> None:
    lines = chain_lines(5)
    del lines[3]
    report = verify_lines(lines)
    assert not report.ok
    assert [(p.kind, p.seq) for p in report.problems] == [("gap", 5)]
    assert "seq 4 missing" in report.problems[0].message


def test_verify_detects_reordering() -> None:
    lines = chain_lines(5)
    lines[1], lines[2] = lines[2], lines[1]
    assert kinds(lines) == ["reordered"]


def test_verify_detects_a_truncated_middle_and_head() -> None:
    lines = chain_lines(10)
    assert kinds(lines[:3] + lines[7:]) == ["gap"]
    assert kinds(lines[2:]) == ["truncated-head"]


def test_verify_handles_interleaved_chains_and_duplicates() -> None:
    a = chain_lines(4, "pod-a@t")
    b = chain_lines(3, "pod-b@t")
    mixed = [a[0], b[0], a[1], b[1], b[2], a[2], a[3], a[3]]  # a[3] delivered twice
    report = verify_lines(mixed)
    assert report.ok, report.problems
    assert {c.chain_id for c in report.chains} == {"pod-a@t", "pod-b@t"}
    assert [p.kind for p in report.problems] == ["duplicate"]


def test_verify_reports_garbage_lines() -> None:
    assert kinds([*chain_lines(2), "not json"]) == ["unparseable"]
    assert kinds([*chain_lines(2), '{"x": 1}']) == ["malformed"]


def test_hmac_checkpoints(tmp_path: Path) -> None:
    lines = chain_lines(10, every=4, hmac_key=KEY)
    checkpoint = json.loads(lines[4])
    assert checkpoint["unmapped"]["checkpoint"]["seq"] == 4 and checkpoint["class_uid"] == 0
    report = verify_lines(lines, keys=[load_key(KEY)])
    assert report.ok and report.chains[0].checkpoints == 2 and report.chains[0].verified_checkpoints == 2
    assert kinds(lines, keys=[load_key(b"another key")]) == ["bad-signature", "bad-signature"]


def test_forged_checkpoint_is_detected() -> None:
    lines = chain_lines(8, every=4, hmac_key=KEY)
    rec = json.loads(lines[4])
    rec["unmapped"]["checkpoint"]["signatures"][0]["signature"] = "00" * 32
    rec["hash"] = record_hash(rec)
    lines[4] = json.dumps(rec)
    # the forger also has to re-link the next record, which the checkpoint key still catches
    nxt = json.loads(lines[5])
    nxt["prev_hash"] = rec["hash"]
    nxt["hash"] = record_hash(nxt)
    lines[5] = json.dumps(nxt)
    assert "bad-signature" in kinds(lines, keys=[load_key(KEY)])


def test_ed25519_checkpoints(tmp_path: Path) -> None:
    private = Ed25519PrivateKey.generate()
    pem = private.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    lines = chain_lines(6, every=3, signing_key=private)
    report = verify_lines(lines, keys=[load_key(pem)])
    assert report.ok and report.chains[0].verified_checkpoints == 2
    other = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    assert set(kinds(lines, keys=[load_key(other)])) == {"bad-signature"}


def test_cli_exit_codes_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "audit.jsonl"
    lines = chain_lines(6, every=3, hmac_key=KEY)
    good.write_text("\n".join(lines) + "\n")
    key = tmp_path / "key"
    key.write_bytes(KEY)
    assert main(["verify", str(good), "--key-file", str(key)]) == 0
    assert "OK" in capsys.readouterr().out

    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    assert main([str(bad), "--output", "json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["problems"][0]["kind"] == "gap"

    assert main([str(tmp_path / "missing.jsonl")]) == 2


# --------------------------------------------------------------------------- AuditLog + spool (local)


async def _emit_some(log: AuditLog, n: int, start: int = 0) -> list[dict[str, Any]]:
    out = []
    for i in range(start, start + n):
        if i % 3 == 0:
            out.append(await log.emit(_event(i)))
        else:
            out.append(log.emit_nowait(_event(i)))
    return out


def spooled_lines(spool_dir: Path) -> list[str]:
    out: list[str] = []
    for seg in sorted(spool_dir.glob("segment-*.jsonl")):
        out.extend(seg.read_text().splitlines())
    return out


async def test_auditlog_file_sink_restart_continues_chain(tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    opts: dict[str, Any] = {"checkpoint_every": 7, "batch_interval": 0.0}
    log = AuditLog(tmp_path / "spool", [FileSink(out)], KEY, "pod-a", **opts)
    await log.start()
    first = await _emit_some(log, 20)
    await log.close()

    log2 = AuditLog(tmp_path / "spool", [FileSink(out)], KEY, "pod-a", **opts)
    await log2.start()
    second = await _emit_some(log2, 20)
    await log2.close()

    assert second[0]["chain_id"] == first[0]["chain_id"]
    assert second[0]["seq"] > first[-1]["seq"]
    lines = out.read_text().splitlines()
    report = verify_lines(lines, keys=[load_key(KEY)])
    assert report.ok, report.problems
    assert len(report.chains) == 1 and report.chains[0].first_seq == 1
    assert (
        report.chains[0].checkpoints >= 5
        and report.chains[0].checkpoints == report.chains[0].verified_checkpoints
    )
    uids = [json.loads(line)["metadata"]["uid"] for line in lines]
    assert len(uids) == len(set(uids))


async def test_spool_rotates_and_collects_delivered_segments(tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    spool = tmp_path / "spool"
    log = AuditLog(spool, [FileSink(out)], None, "pod-r", max_segment_bytes=4096, batch_interval=0.0)
    await log.start()
    await _emit_some(log, 60)
    await log.close()
    assert verify_lines(out.read_text().splitlines()).ok
    remaining = sorted(spool.glob("segment-*.jsonl"))
    assert 1 <= len(remaining) <= 2  # everything delivered was collected; the chain head stays
    assert json.loads((spool / "cursor-file.json").read_text())["segment"] >= 5
    # the restart still resumes from the head even though older segments are gone
    log2 = AuditLog(spool, [FileSink(out)], None, "pod-r", batch_interval=0.0)
    await log2.start()
    rec = await log2.emit(_event(999))
    await log2.close()
    assert rec["seq"] == 61
    assert verify_lines(out.read_text().splitlines()).ok


async def test_torn_tail_is_cut_on_restart(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    log = AuditLog(spool, [], None, "pod-t")
    await log.start()
    await _emit_some(log, 5)
    await log.close()
    seg = sorted(spool.glob("segment-*.jsonl"))[-1]
    seg.write_bytes(seg.read_bytes() + b'{"chain_id": "pod-t", "seq": 6, "half a rec')
    log2 = AuditLog(spool, [], None, "pod-t")
    await log2.start()
    rec = await log2.emit(_event(6))
    await log2.close()
    assert rec["seq"] == 6
    assert verify_lines(spooled_lines(spool)).ok


async def test_unhashable_spool_head_fails_closed(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    log = AuditLog(spool, [], None, "pod-x")
    await log.start()
    await _emit_some(log, 3)
    await log.close()
    seg = sorted(spool.glob("segment-*.jsonl"))[-1]
    seg.write_text(seg.read_text().replace("SELECT 2", "SELECT 7"))
    from sidegate_proxy.audit import AuditError

    with pytest.raises(AuditError, match="modified"):
        await AuditLog(spool, [], None, "pod-x").start()
