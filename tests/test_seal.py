"""The native lane's audit sealer (``_seal.c``) writes exactly the lines ``Chain.seal_run`` writes.

The lane seals the records of the statements it relays in C, onto the same chain Python seals
everything else onto; ``sidegate audit verify`` re-hashes every line, so a single byte of
difference would break the chain. These tests compare the two on generated templates, runs and
texts (``Sealer.seal``), check each refusal is one the sealer documents (Python then seals the
run), and compare real spools written with and without the C sealer.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

import sidegate_proxy
from pg_fixtures import PG, ProxyUnderTest, run_proxy
from sidegate_proxy import audit
from sidegate_proxy.audit import GENESIS, LANE_SLOTS, AuditEvent, Chain, CommandTemplate, lane_shape
from sidegate_proxy.auditverify import load_key, verify_lines
from sidegate_proxy.metrics import LATENCY_BOUNDS, LATENCY_BUCKETS, observe_buckets
from sidegate_proxy.pgproxy import ProxySettings
from sidegate_proxy.sqlparse import statement_text
from test_audit_shapes import events
from test_pgproxy_lane import sessions_ended

LANE = sidegate_proxy.LANE
pytestmark = pytest.mark.skipif(LANE is None, reason="the native lane is not built (make native)")
CODES = {name: getattr(LANE, f"SEAL_{name.upper()}") for name in LANE_SLOTS} if LANE is not None else {}


def sealer(openssl: bool = True) -> Any:
    return LANE.Sealer(tuple(w.encode() for w in audit.SENSITIVE_WORDS), audit.MAX_COMMAND, openssl=openssl)


def template_of(event: AuditEvent) -> CommandTemplate:
    return CommandTemplate(event._replace(kind="command", connection_type="postgres", command="", time=0.0,
                                          duration_ms=None, rows=None, masked={}, sqlstate=None))


@pytest.mark.parametrize("openssl", [True, False])
def test_digest_is_sha256(openssl: bool) -> None:
    s = sealer(openssl)
    assert s.openssl == openssl  # this process has hashlib's libcrypto loaded
    data = bytes(range(256)) * 9
    for n in (0, 1, 55, 56, 63, 64, 65, 119, 120, 128, 1150, len(data)):
        assert s.sha256(data[:n]) == hashlib.sha256(data[:n]).digest(), n


# what a simple query's text may be: the lane hands over bytes; edge cases of trimming and escaping
query_texts = st.one_of(
    st.text(st.characters(min_codepoint=0, max_codepoint=0x7F), max_size=40),
    st.sampled_from([
        "SELECT 1", " SELECT 1 ; ", "SELECT 1;;", "\x1c SELECT '\x1f' \x1d;\x0b", "SELECT ';'", ";", "",
        "SELECT 'a\"b\\\\c\\n\x7f\x00'", "SELECT password FROM t", "select PassWd", "SELECT 'Secret'",
        "SELECT 'Zürich'", "SELECT 1 /* \u2028 */", "SELECT '" + "x" * audit.MAX_COMMAND + "'",
        "SELECT '" + "x" * (audit.MAX_COMMAND - 9) + "'",
    ]),
)
lane_runs = st.tuples(
    st.floats(0, 4e9) | st.sampled_from([1714564800.0005, 1714564800.0015, 0.0, 253402300799.999, 253402300800.0]),
    st.floats(0, 1e4) | st.sampled_from([0.0005, 0.0015, 0.0025]),
    st.none() | st.integers(-1, 2**62),
    st.none() | st.sampled_from(["22012", "57014"]),
)


def refused(text: str | None, wall: float, rows: int | None, sqlstate: str | None) -> bool:
    """The runs the sealer documents it leaves to Python."""
    if rows is None or rows < 0 or sqlstate is not None:
        return True
    if round(wall * 1000) // 1000 >= 253402300800:  # after 9999-12-31
        return True
    if text is None:
        return False
    if not text.isascii():
        return True
    evidence = statement_text(text)  # Python may redact it (it mentions a password) or truncate it
    return any(w in evidence.lower() for w in audit.SENSITIVE_WORDS) or len(evidence) > audit.MAX_COMMAND


@settings(max_examples=300, deadline=None)
@given(events, st.booleans(), query_texts, st.lists(lane_runs, min_size=1, max_size=4),
       st.text(st.characters(max_codepoint=0x7F), max_size=12), st.integers(0, 2**40))
def test_sealed_lines_equal_seal_run(event: AuditEvent, simple: bool, text: str,
                                     runs: list[tuple[float, float, int | None, str | None]], chain_id: str,
                                     seq: int) -> None:
    template = template_of(event)
    sql = None if simple else (event.command or "SELECT 1")
    shape = lane_shape(template, sql, CODES)
    if shape is None:
        return  # no shape: every run is Python's
    assert all(isinstance(p, bytes) for p in shape[::2]) and all(isinstance(p, int) for p in shape[1::2])
    c, python = Chain(chain_id, seq=seq), Chain(chain_id, seq=seq)
    s = sealer()
    for wall, seconds, rows, sqlstate in runs:
        query = text.encode("utf-8") if simple else None
        before = (c.seq, c.last_hash)
        lines, count = s.seal(c, shape, [(wall, seconds, rows, sqlstate, query)])
        if count == 0:
            assert lines == b"" and (c.seq, c.last_hash) == before
            assert refused(text if simple else None, wall, rows, sqlstate), (text, wall, rows, sqlstate)
            continue
        statement = statement_text(text) if simple else sql
        assert statement is not None
        want = python.seal_run(template, statement, wall, seconds * 1000, rows, {})
        assert lines == want
        assert (c.seq, c.last_hash) == (python.seq, python.last_hash)


def test_a_batch_stops_at_the_first_run_python_seals() -> None:
    template = CommandTemplate(audit.command_event(session_id="s-1", connection="ns/db", connection_type="postgres",
                                                   caller=None, command="", decision="allow", command_class="select",
                                                   time=0.0))
    shape = lane_shape(template, "SELECT $1", CODES)
    c, python = Chain("pod-a"), Chain("pod-a")
    runs = [(1714564800.0 + i, 0.001, i, None, None) for i in range(3)]
    lines, count = sealer().seal(c, shape, [*runs, (1714564900.0, 0.001, None, None, None), runs[0]])
    assert count == 3
    assert lines == b"".join(python.seal_run(template, "SELECT $1", t, d * 1000, r, {}) for t, d, r, _, _ in runs)
    assert c.seq == 3 and c.last_hash == python.last_hash
    report = verify_lines([line.decode() for line in lines.splitlines()])
    assert report.ok, report.problems


def test_shapes_need_the_sealers_encoders() -> None:
    """A template whose shape the sealer cannot fill exactly has none: Python seals its runs."""
    event = audit.command_event(session_id="s", connection="ns/db", connection_type="postgres", caller=None,
                                command="", decision="allow", time=0.0)
    template = CommandTemplate(event)
    assert lane_shape(template, "SELECT 1", CODES) is not None
    without_rows = {k: v for k, v in CODES.items() if k != "rows"}
    assert lane_shape(CommandTemplate(event), "SELECT 1", without_rows) is None
    assert lane_shape(template, None, CODES) is lane_shape(template, None, CODES)  # memoised


# --------------------------------------------------------------------------- real spools


def spooled(p: ProxyUnderTest) -> list[dict[str, Any]]:
    segments = sorted(p.audit.spool.directory.glob("segment-*.jsonl"))
    lines = [line for segment in segments for line in segment.read_text().splitlines()]
    report = verify_lines(lines, keys=[load_key(b"k" * 32)])
    assert report.ok, report.problems
    return [json.loads(line) for line in lines]


VARYING = ("time", "time_dt", "duration", "hash", "prev_hash", "seq", "chain_id")


def comparable(record: dict[str, Any]) -> dict[str, Any]:
    """A command record without what differs between two runs of the same workload."""
    r = {k: v for k, v in record.items() if k not in VARYING}
    r["metadata"] = {k: v for k, v in r["metadata"].items() if k not in ("sequence", "uid")}
    r["actor"] = {k: v for k, v in r["actor"].items() if k != "session"}
    r["src_endpoint"] = {k: v for k, v in r.get("src_endpoint", {}).items() if k != "port"}
    return r


async def test_spools_with_and_without_the_sealer_agree(postgres: PG, tmp_path: Path) -> None:
    trails, counted = [], []
    for seals in (True, False):
        async with run_proxy(postgres, tmp_path, settings=ProxySettings(lane_seals=seals)) as p:
            c = await asyncpg.connect(**p.kwargs())
            try:
                for i in range(60):  # runs the lane seals, mixed with runs it leaves to Python
                    assert await c.fetchval("SELECT $1::int + 1", i) == i + 1
                    await c.fetch("SELECT id FROM customers WHERE id <= $1 ORDER BY id", i % 7)
                    await c.execute(f"SELECT id FROM customers WHERE id = {i % 9}")  # simple query
                    await c.execute(f"SELECT {i} AS secret_{i % 2}")  # mentions a secret: Python's
                    if i % 5 == 0:
                        with pytest.raises(asyncpg.DivisionByZeroError):
                            await c.fetchval("SELECT 10 / $1::int", 0)  # an error: Python's
            finally:
                await c.close()
            await sessions_ended(p, 1)
            await p.audit.flush()
            assert (p.audit.sealed > 0) == seals
            records = spooled(p)
            counted.append(metric_counts(p))
        trails.append([comparable(r) for r in records if r["unmapped"].get("event") == "command"])
    assert len(trails[0]) >= 4 * 60 + 12
    assert trails[0] == trails[1]
    assert counted[0] == counted[1]  # commands and latency observations, sealed in C or not
    assert counted[0][0] == counted[0][1] == len(trails[0])


def metric_counts(p: ProxyUnderTest) -> tuple[float, float]:
    metrics = p.server.metrics
    assert metrics is not None
    registry = metrics.registry
    labels = {"connection": p.config.connection.name, "protocol": "postgres"}
    allowed = registry.get_sample_value("sidegate_commands_total", {**labels, "decision": "allow"})
    observed = registry.get_sample_value("sidegate_command_duration_seconds_count", labels)
    return allowed or 0.0, observed or 0.0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 30) | st.sampled_from([*LATENCY_BUCKETS, 0.0]), max_size=40))
def test_bucket_counts_observe_like_observe(seconds: list[float]) -> None:
    one, many = (Histogram("h", "h", buckets=LATENCY_BUCKETS, registry=CollectorRegistry()) for _ in range(2))
    for s in seconds:
        one.observe(s)
    counts = [0] * len(LATENCY_BOUNDS)
    for s in seconds:
        counts[next(i for i, bound in enumerate(LATENCY_BOUNDS) if s <= bound)] += 1
    observe_buckets(many, counts, math.fsum(seconds))
    got, want = ({s.name + repr(s.labels): s.value for s in h.collect()[0].samples if "created" not in s.name}
                 for h in (many, one))
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name] == pytest.approx(value), name


def test_chain_ids_the_sealer_cannot_spell_are_refused() -> None:
    with pytest.raises(TypeError):
        sealer().seal(Chain("pod-ä"), (b"{}",), [])
    c = Chain("pod-a", seq=5, prev_hash=GENESIS)
    assert sealer().seal(c, (b"{}",), []) == (b"", 0)


def test_bucket_counts_without_prometheus_internals() -> None:
    class Plain:
        def __init__(self) -> None:
            self.seen: list[float] = []

        def observe(self, amount: float) -> None:
            self.seen.append(amount)

    h = Plain()
    counts = [0] * len(LATENCY_BOUNDS)
    counts[0], counts[3], counts[-1] = 2, 1, 1
    observe_buckets(h, counts, 99.0)
    assert h.seen == [LATENCY_BUCKETS[0]] * 2 + [LATENCY_BUCKETS[3], 2 * LATENCY_BUCKETS[-1]]
