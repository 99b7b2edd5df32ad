"""The memoised record shapes (``Chain.seal_event``) write exactly what the generic path writes.

``sidegate audit verify`` re-canonicalises every parsed line to check the hash chain, so the fast
serialisation must be byte-identical to ``canonical_json(record)`` for every event, not just the
common one: these tests compare the two paths on generated events, siblings that reuse a cached
shape, values whose equality hides a different JSON (``True == 1``), and a real spool.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidegate_proxy import audit
from sidegate_proxy.audit import (
    GENESIS,
    AuditEvent,
    AuditLog,
    Chain,
    CommandTemplate,
    canonical_json,
    command_event,
    http_request_event,
    ocsf_event,
    record_hash,
    session_end,
    session_start,
)
from sidegate_proxy.auditverify import load_key, verify_lines
from sidegate_proxy.config import parse_connection
from sidegate_proxy.policy import ApprovalRef, Caller, Decision

KEY = b"0123456789abcdef0123456789abcdef"
EDGE_TEXT = ["", "'", '"', "\\", "%s", "%%", "\x00", "\u2028", "\ud800", "Zürich ☃", "\x00sidegate-slot:0:1\x00"]

texts = st.text(max_size=20) | st.sampled_from(EDGE_TEXT)
maybe_texts = st.none() | texts
callers = st.none() | st.builds(
    Caller, texts, texts, st.frozensets(texts, max_size=3), issuer_name=texts,
    expires_at=st.none() | st.floats(0, 2e9),
)
addresses = st.none() | st.sampled_from(["10.0.0.1:5432", "[::1]:80", "db.svc", "db.svc:notaport", ":5432"]) | texts
approvals = st.none() | st.builds(ApprovalRef, texts, texts, maybe_texts)
small_ints = st.integers(-(2**40), 2**70)
http_commands = st.tuples(
    st.sampled_from(["GET", "post", "DELETE", ""]), texts, st.none() | texts
).map(lambda t: f"{t[0]} /{t[1]}" + ("" if t[2] is None else f"?{t[2]}"))

events = st.builds(
    AuditEvent,
    kind=st.sampled_from(["session_start", "session_end", "command"]),
    time=st.floats(0, 4e9),
    session_id=texts,
    connection=texts,
    connection_type=st.sampled_from(["postgres", "http"]),
    caller=callers,
    client=addresses,
    target=addresses,
    database=maybe_texts,
    command=st.none() | texts | http_commands,
    command_class=st.none() | st.sampled_from(["select", "insert", "get", "post", "other"]) | texts,
    decision=st.none() | st.sampled_from(["allow", "block", "requireApproval"]),
    rule=maybe_texts,
    reason=texts,
    masked=st.dictionaries(texts, st.integers(0, 10**6), max_size=3),
    rows=st.none() | small_ints | st.booleans(),
    duration_ms=st.none() | st.floats(0, 1e7),
    sqlstate=st.none() | st.sampled_from(["00000", "02000", "23505", "57014"]) | texts,
    http_status=st.none() | st.sampled_from([200, 404, 503]) | st.booleans() | small_ints,
    approval=approvals,
    commands=st.none() | small_ints | st.booleans(),
)
siblings = st.fixed_dictionaries({
    "time": st.floats(0, 4e9),
    "session_id": texts,
    "rows": st.none() | small_ints,
    "duration_ms": st.none() | st.floats(0, 1e7),
    "masked": st.dictionaries(texts, st.integers(0, 10**6), max_size=2),
})


def both_paths(event: AuditEvent, chain_id: str = "pod-a@2024-05-01T00:00:00.000Z", seq: int = 0,
               prev: str = GENESIS) -> tuple[dict[str, Any], bytes]:
    """Seal ``event`` on the fast and the generic path from the same chain state; they must agree."""
    fast, generic = Chain(chain_id, seq=seq, prev_hash=prev), Chain(chain_id, seq=seq, prev_hash=prev)
    record, line = fast.seal_event(event)
    expected_record, expected_line = generic.seal(ocsf_event(event))
    assert line == expected_line
    assert record == expected_record
    assert (fast.seq, fast.last_hash) == (generic.seq, generic.last_hash)
    return record, line


def assert_verifiable(record: dict[str, Any], line: bytes) -> None:
    """What ``sidegate audit verify`` does with a line: parse it, re-canonicalise, compare hashes."""
    parsed = json.loads(line)
    assert parsed == record
    assert record_hash(parsed) == parsed["hash"]
    body = {k: v for k, v in record.items() if k != "hash"}
    assert line == canonical_json(body)[:-1] + b',"hash":"' + record["hash"].encode() + b'"}\n'


@settings(max_examples=400, deadline=None)
@given(events, st.text(max_size=12), st.integers(0, 2**40))
def test_fast_path_equals_canonical_json(event: AuditEvent, chain_id: str, seq: int) -> None:
    record, line = both_paths(event, chain_id, seq)
    assert_verifiable(record, line)


@settings(max_examples=200, deadline=None)
@given(events, st.lists(siblings, min_size=1, max_size=4))
def test_siblings_reuse_the_shape_and_still_match(event: AuditEvent, changes: list[dict[str, Any]]) -> None:
    """Events differing only in per-event values share a cached shape: each still gets its own bytes."""
    fast, generic = Chain("c"), Chain("c")
    for change in [{}, *changes]:
        sibling = event._replace(**change)
        assert fast.seal_event(sibling) == generic.seal(ocsf_event(sibling))


runs = st.fixed_dictionaries({
    "sql": texts | st.sampled_from(["ALTER ROLE bob PASSWORD 'hunter2'", "SELECT 'x' -- password"]),
    "time": st.floats(0, 4e9),
    "duration_ms": st.none() | st.floats(0, 1e7),
    "rows": st.none() | small_ints | st.booleans(),
    "masked": st.dictionaries(texts, st.integers(0, 10**6), max_size=2),
})


@settings(max_examples=300, deadline=None)
@given(events, st.lists(runs, min_size=1, max_size=5))
def test_template_runs_write_what_whole_events_write(event: AuditEvent, changes: list[dict[str, Any]]) -> None:
    """``seal_run`` (the per-statement hot path) gives each run the line ``seal_event`` gives its
    whole event, including after the template's shapes are memoised and for shapeless events."""
    template = CommandTemplate(event._replace(kind="command", connection_type="postgres", command="", time=0.0,
                                              duration_ms=None, rows=None, masked={}))
    fast, generic = Chain("c", seq=41), Chain("c", seq=41)
    for change in changes * 2:
        line = fast.seal_run(template, **change)
        assert line == generic.seal(ocsf_event(template.run(**change)))[1]
        assert (fast.seq, fast.last_hash) == (generic.seq, generic.last_hash)


def test_template_run_is_the_event_command_event_builds() -> None:
    pg: dict[str, Any] = {"session_id": "s", "connection": "ns/db", "connection_type": "postgres",
                          "caller": None, "decision": "allow", "command_class": "alter",
                          "client": "10.0.0.1:5000", "target": "db:5432"}
    template = CommandTemplate(command_event(**pg, command="", time=0.0))
    for sql in ("ALTER ROLE bob PASSWORD 'x'", "SELECT 1", "SELECT '" + "x" * audit.MAX_COMMAND + "'"):
        for masked in ({}, {"emails": 2}):
            assert template.run(sql, 5.0, 1.5, 3, masked) == command_event(
                **pg, command=sql, time=5.0, duration_ms=1.5, rows=3, masked=masked)
    with pytest.raises(ValueError):
        CommandTemplate(command_event(**{**pg, "connection_type": "http"}, command="GET /"))


async def test_template_runs_spool_a_verifiable_chain(tmp_path: Path) -> None:
    caller = Caller("system:serviceaccount:ci:deployer", "https://kubernetes.default.svc", frozenset({"ci"}))
    log = AuditLog(tmp_path / "spool", [], KEY, "pod-a", checkpoint_every=5, fsync=False)
    await log.start()
    template = CommandTemplate(command_event(session_id="s-1", connection="ns/db", connection_type="postgres",
                                             caller=caller, command="", decision="allow", time=0.0))
    for i in range(12):
        log.emit_run_nowait(template, f"SELECT {i}", 1714564800.0 + i, 0.25 * i, i, {"emails": i} if i % 2 else {})
    await log.close()
    segments = sorted((tmp_path / "spool").glob("segment-*.jsonl"))
    lines = [line for seg in segments for line in seg.read_text().splitlines()]
    report = verify_lines(lines, keys=[load_key(KEY)])
    assert report.ok, report.problems
    commands = [json.loads(line) for line in lines if json.loads(line)["class_uid"] != 0]
    assert [c["query_info"]["query_string"] for c in commands] == [f"SELECT {i}" for i in range(12)]
    assert [c["unmapped"]["rows"] for c in commands] == list(range(12))
    assert [c["unmapped"].get("masked") for c in commands[:2]] == [None, {"emails": 1}]


@pytest.mark.parametrize(
    ("field", "values"),
    [("http_status", [1, True]), ("commands", [0, False]), ("rows", [1, True, 1.0]), ("duration_ms", [0.0, -0.0])],
)
def test_equal_values_with_different_json_never_share_a_shape(field: str, values: list[Any]) -> None:
    """``True == 1 == 1.0`` and ``0.0 == -0.0``, but their JSON differs: neither may hit the other's shape."""
    base = command_event(session_id="s", connection="ns/api", connection_type="http", caller=None,
                         command="GET /x", decision="allow", time=1714564800.0)
    for value in values * 2:
        both_paths(base._replace(**{field: value}))


def test_common_case_builds_one_shape() -> None:
    """A session's allowed SELECTs map their record once; later statements are cache hits."""
    caller = Caller("svc", "https://issuer", frozenset({"ci"}))
    built: list[AuditEvent] = []
    original = audit._Shape.build

    def counting(event: AuditEvent, filled: Any) -> Any:
        built.append(event)
        return original(event, filled)

    fast, generic = Chain("c"), Chain("c")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(audit._Shape, "build", counting)
        for i in range(20):
            event = command_event(
                session_id=f"unique-session-{id(built)}", connection="ns/db", connection_type="postgres",
                caller=caller, command=f"SELECT * FROM t WHERE id = {i} AND note = 'it''s %s'",
                decision=Decision("allow", rule="readers"), command_class="select", rows=i, duration_ms=i / 3,
                client="10.0.0.1:5555", target="db.ns.svc:5432", database="app", masked={"emails": i} if i else {},
            )
            assert fast.seal_event(event) == generic.seal(ocsf_event(event))
    assert len(built) == 2  # one without masked counts, one with


def test_records_do_not_share_their_per_event_parts() -> None:
    chain = Chain("c")

    def make(i: int) -> AuditEvent:
        return command_event(
            session_id="s", connection="ns/db", connection_type="postgres", caller=Caller("a", "b"),
            command=f"SELECT {i}", decision="allow", rows=i, time=1714564800.0 + i,
        )

    first, _ = chain.seal_event(make(1))
    second, _ = chain.seal_event(make(2))
    assert first["metadata"]["sequence"] == 1 and second["metadata"]["sequence"] == 2
    assert first["unmapped"]["rows"] == 1 and second["unmapped"]["rows"] == 2
    assert first["actor"] is not second["actor"]
    first["metadata"]["uid"] = "edited"
    assert second["metadata"]["uid"] == "c:2"


def test_unencodable_value_fails_without_moving_the_chain() -> None:
    chain = Chain("c")
    event = command_event(session_id="s", connection="ns/db", connection_type="postgres", caller=None,
                          command="SELECT 1", decision="allow")
    with pytest.raises(TypeError):
        chain.seal_event(event._replace(rows=object()))  # type: ignore[arg-type]
    assert (chain.seq, chain.last_hash) == (0, GENESIS)
    assert chain.seal_event(event)[0]["seq"] == 1


def test_shape_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "_MAX_SHAPES", 3)
    monkeypatch.setattr(audit, "_SHAPES", {})
    for i in range(10):
        both_paths(command_event(session_id="s", connection=f"ns/db{i}", connection_type="postgres",
                                 caller=None, command="SELECT 1", decision="allow"))
    assert len(audit._SHAPES) <= 3


HTTP = parse_connection({
    "apiVersion": "sidegate.dev/v1alpha1", "kind": "Connection",
    "metadata": {"name": "billing", "namespace": "shop"},
    "spec": {"type": "http", "target": {"url": "https://billing.shop.svc:8443"},
             "credentials": {"secretRef": {"name": "billing-token"}}},
})


def varied_events() -> list[AuditEvent]:
    caller = Caller("system:serviceaccount:ci:deployer", "https://kubernetes.default.svc", frozenset({"ci", "dev"}))
    pg: dict[str, Any] = {"session_id": "s-1", "connection": "ns/db", "connection_type": "postgres",
                          "caller": caller, "client": "10.0.0.9:40000", "target": "db:5432", "database": "app"}
    out = [session_start(**pg)]
    for i in range(30):
        out.append(command_event(**pg, command=f"SELECT name FROM t WHERE city = 'Zürich {i}'", decision="allow",
                                 command_class="select", rows=i, duration_ms=0.5 * i,
                                 masked={"emails": i} if i % 3 else None))
    out.append(command_event(**pg, command="ALTER ROLE bob PASSWORD 'hunter2'", decision="block", rule="no-roles",
                             reason="role changes need review", command_class="alter"))
    out.append(command_event(**pg, command="DROP TABLE tmp", decision=Decision("allow"), command_class="drop",
                             approval=ApprovalRef("ns", "db-x1", "alice"), sqlstate="42P01"))
    for i in range(10):
        out.append(http_request_event(connection=HTTP, caller=caller if i % 2 else None, session_id=f"req-{i}",
                                      method="GET", path=f"/v1/invoices/{i}", query="token=abc&x=1" if i % 3 else "",
                                      status=200 if i % 4 else 503, decision="allow", client="10.0.0.7",
                                      duration_ms=3.0, masked={"cards": 1} if i == 5 else None))
    out.append(session_end(**pg, duration_ms=1234.5, commands=32))
    return out


async def test_spooled_chain_verifies(tmp_path: Path) -> None:
    """Through AuditLog (fast path), a restart and checkpoints, ``verify`` accepts every line."""
    spool = tmp_path / "spool"
    emitted: list[dict[str, Any]] = []
    for _ in range(2):  # the second run resumes the chain from the spool's last line
        log = AuditLog(spool, [], KEY, "pod-a", checkpoint_every=7, fsync=False)
        await log.start()
        for i, event in enumerate(varied_events()):
            emitted.append(await log.emit(event) if i % 5 == 0 else log.emit_nowait(event))
        await log.close()
    lines = [line for seg in sorted(spool.glob("segment-*.jsonl")) for line in seg.read_text().splitlines()]
    report = verify_lines(lines, keys=[load_key(KEY)])
    assert report.ok, report.problems
    by_hash = {json.loads(line)["hash"]: json.loads(line) for line in lines}
    assert all(by_hash[r["hash"]] == r for r in emitted)
    assert len(report.chains) == 1
