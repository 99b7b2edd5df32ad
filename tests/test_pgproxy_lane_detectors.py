"""The native lane under detector rules (``ColumnPlan.lane_filter``, ``_lane.c`` ``row_clean``):
a result whose text columns the detectors scan is relayed by the lane row by row as long as no
value meets any detector's necessary condition; at the first row that might hold a finding the
lane stops, and Python masks that row and the rest of the result with the plan it holds.

The oracle is the Python relay: every result, masked value and audit count through the lane
equals what the same statements give without it.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pg_fixtures import PG, ProxyUnderTest, run_proxy
from sidegate_proxy.detectors import _PREFILTERS, DETECTOR_PATTERNS, LANE_CONDITIONS, Scanner, _required_literal
from test_pgproxy_lane import (
    NO_LANE,
    assert_commands_counted,
    compared,
    need_lane,
    outcome,
    sessions_ended,
    through_proxy,
)

pytestmark = pytest.mark.postgres

DETECT = [
    {"name": "emails", "detectors": ["email"], "strategy": "redact"},
    {"name": "cards", "detectors": ["credit-card"], "strategy": "partial", "keepLast": 4},
    {"name": "keys", "detectors": ["aws-access-key", "jwt"], "strategy": "redact"},
    {"name": "refs", "pattern": "\\bREF-[0-9]{4}", "strategy": "hash"},  # its literal: REF-
]
# near misses a coarse check lets through or stops, and real findings
SEEDS = ["plain words", "", "a@b", "mail me: ana@example.com now", "order 4111 1111 1111 1111 paid",
         "call 555-0100", "card 4111111111111112 (bad Luhn)", "id 123456789012", "AKIAABCDEFGHIJKLMNOP",
         "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig", "two@ then ana@example.org", "é unicode ✓ text",
         "12 34 56 78 90 12 34", "x" * 5000, "see REF-2024 and REF-", "REF-12", "pref REF-9999x"]


def rows(n: int = 300) -> list[tuple[int, str | None, str]]:
    """Mostly clean text, some findings and near misses, a few NULLs (seeded: the same each run)."""
    rnd = random.Random(7)
    out = []
    for i in range(1, n + 1):
        if i % 9 == 0:
            body: str | None = SEEDS[(i // 9) % len(SEEDS)]  # every seed, twice or more
        elif i % 31 == 0:
            body = None
        else:
            body = " ".join(rnd.choice(["alpha", "beta", "42", "gamma", "x1", "7", "delta."]) for _ in range(6))
        out.append((i, body, f"note {i}"))
    return out


@pytest.fixture
def notes(postgres: PG) -> PG:
    postgres.sql("DROP TABLE IF EXISTS lane_notes; CREATE TABLE lane_notes (id int PRIMARY KEY, body text, title text)")
    with psycopg.connect(postgres.dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany("INSERT INTO lane_notes VALUES (%s, %s, %s)", rows())
    return postgres


async def asyncpg_workload(c: asyncpg.Connection) -> list[Any]:
    one = await c.prepare("SELECT id, body, title FROM lane_notes WHERE id = $1")
    many = await c.prepare("SELECT id, body FROM lane_notes WHERE id BETWEEN $1 AND $2 ORDER BY id")
    got: list[Any] = []
    for i in range(1, 301):
        got.append([tuple(r) for r in await one.fetch(i)])
        if i % 10 == 0:
            got.append([tuple(r) for r in await many.fetch(i - 9, i + 5)])  # a finding mid-result, often
    return got


async def run(pg: PG, tmp_path: Path, settings: Any) -> tuple[ProxyUnderTest, list[Any]]:
    p, got = await through_proxy(pg, tmp_path, settings, asyncpg_workload, masking=DETECT)
    return p, list(got)


async def test_detector_rules_in_the_lane_equal_the_python_relay(notes: PG, tmp_path: Path) -> None:
    lane, plain, got = await compared(lambda settings: run(notes, tmp_path, settings))
    assert lane.server.lane_statements > 200  # most rows hold nothing a detector could match
    flat = [r for result in got for r in result]
    assert all("ana@example" not in (body or "") for _id, body, *_ in flat)
    assert any(body == "mail me: [REDACTED] now" for _id, body, *_ in flat)
    assert all("4111 1111 1111 1111" not in (body or "") for _id, body, *_ in flat)
    assert all("REF-2024" not in (body or "") for _id, body, *_ in flat)  # the custom pattern's finding
    assert any((body or "").startswith("see ") and "REF-" in body for _id, body, *_ in flat)  # too short: kept
    events, expected = lane.audit.commands(), plain.audit.commands()
    assert outcome(events) == outcome(expected)
    assert [e.masked for e in events] == [e.masked for e in expected]  # the same counts, row for row
    assert_commands_counted(lane)


@pytest.mark.parametrize("binary", [False, True])
async def test_psycopg_text_and_binary_results(notes: PG, tmp_path: Path, binary: bool) -> None:
    need_lane()
    results = []
    for settings in (None, NO_LANE):
        async with run_proxy(notes, tmp_path, masking=DETECT, settings=settings) as p, \
                await psycopg.AsyncConnection.connect(p.dsn(), autocommit=True) as conn:
            got = []
            sql = "SELECT id, body, title FROM lane_notes WHERE id BETWEEN %s AND %s ORDER BY id"
            for i in range(1, 121, 3):
                cur = await conn.execute(sql, (i, i + 4), prepare=True, binary=binary)
                got.append(await cur.fetchall())
            results.append(got)
            if settings is None:
                assert p.server.lane_statements > 0
    assert results[0] == results[1]


async def test_simple_queries_under_detector_rules(notes: PG, tmp_path: Path) -> None:
    need_lane()
    results = []
    for settings in (None, NO_LANE):
        async with run_proxy(notes, tmp_path, masking=DETECT, settings=settings) as p, \
                await psycopg.AsyncConnection.connect(p.dsn(), autocommit=True,
                                                      cursor_factory=psycopg.AsyncClientCursor) as conn:
            got = []
            for i in range(1, 151):
                cur = await conn.execute(f"SELECT id, body FROM lane_notes WHERE id = {i}")
                got.append(await cur.fetchall())
            results.append(got)
            lane_statements = p.server.lane_statements
        await sessions_ended(p, 1)
        if settings is None:
            assert lane_statements > 50
    assert results[0] == results[1]


async def test_custom_patterns_without_a_literal_keep_results_in_python(notes: PG, tmp_path: Path) -> None:
    """A rule's own regex that does not start with a literal is not something the lane can
    check for: results it scans stay in Python (results it does not scan still run in the lane)."""
    need_lane()
    rules = [*DETECT, {"name": "codes", "pattern": "[A-Z]{3}-[0-9]+", "strategy": "redact"}]
    async with run_proxy(notes, tmp_path, masking=rules) as p:
        c = await asyncpg.connect(**p.kwargs())
        try:
            texts = await c.prepare("SELECT id, body FROM lane_notes WHERE id = $1")
            for i in range(1, 40):
                await texts.fetch(i)
            before = p.server.lane_statements
            ints = await c.prepare("SELECT id FROM lane_notes WHERE id = $1")  # no text: nothing to scan
            for i in range(1, 40):
                assert await ints.fetchval(i) == i
        finally:
            await c.close()
        await sessions_ended(p, 1)
        assert before == 0 and p.server.lane_statements > 20


# --------------------------------------------------------------------------- the conditions themselves


def _meets(detector: str, data: bytes) -> bool:
    digits, subs = LANE_CONDITIONS[detector]
    return bool(digits and sum(c in b"0123456789" for c in data) >= digits) or any(s in data for s in subs)


@given(st.one_of(st.binary(max_size=60),
                 st.text(alphabet="0123456789 -.@eyJAKIASPRIVATE KEY-abcxyz", max_size=60).map(str.encode)))
def test_every_text_a_prefilter_admits_meets_the_lane_condition(data: bytes) -> None:
    digits = len(data) - len(data.translate(None, b"0123456789"))
    for detector, prefilter in _PREFILTERS.items():
        if prefilter(data, digits):
            assert _meets(detector, data), (detector, data)


def test_the_lane_conditions_are_per_rule_set() -> None:
    assert set(LANE_CONDITIONS) == set(DETECTOR_PATTERNS)
    scanner = Scanner([("r1", ("email", "credit-card"), None), ("r2", ("phone",), None)])
    assert scanner.lane_conditions() == (7, (b"@",))
    assert Scanner([("r", ("jwt",), "REF-[0-9]+")]).lane_conditions() == (0, (b"eyJ", b"REF-"))
    assert Scanner([("r", (), "[A-Z]{3}-[0-9]+")]).lane_conditions() is None  # no literal first


LITERALS = {"ACME-[0-9]{8}": b"ACME-", r"\bREF-\d+": b"REF-", "^tok_[a-z]+": b"tok_", "AB*": b"A",
            "abc|abd": b"ab", "é-\\d": "é-".encode(), "(?i)acme": None, "A?B": None, "[A-Z]{3}": None,
            "ab|cd": None, "(ACME)-1": None, "[[:digit:]]x": None, r"\Qa.b\E": None}


def test_required_literals() -> None:
    for pattern, literal in LITERALS.items():
        assert _required_literal(pattern) == literal, pattern


@given(st.text(alphabet="ACMEREFtokab_-0123456789 xé", max_size=40))
def test_a_match_always_holds_its_literal(text: str) -> None:
    for pattern, literal in LITERALS.items():
        if literal is not None and re.search(pattern, text):
            assert literal in text.encode(), (pattern, text)
