"""Joined scanning (many values in one RE2 pass) finds exactly what scanning each value alone does.

The fast paths of JSON and row masking are only allowed to be faster, never different: these
tests compare them with the one-value-at-a-time reference on generated inputs, including patterns
that look at the edges of a text (anchors, word boundaries, lookaround on Python ``re``).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidegate_proxy.config import DETECTORS, MaskingPolicy, MaskingRule, parse_masking_policy
from sidegate_proxy.detectors import Scanner
from sidegate_proxy.masking import ColumnOrigin, Masker, MaskingEngine, _NullValue, apply_strategy, strictest
from sidegate_proxy.policy import Caller

KEY = b"k" * 32

SCANNERS = {
    "detectors": Scanner([("pii", DETECTORS, None)]),
    "anchored": Scanner([("pii", ["email", "credit-card"], r"^ACME-\d{4}$")]),
    "multiline": Scanner([("x", [], r"(?m)^id:\d+$"), ("y", ["phone"], None)]),
    "crossing": Scanner([("x", [], r"(?s)<.{1,40}?>"), ("y", ["email"], None)]),
    "negated": Scanner([("x", [], r"[^a-z ]{6,}"), ("y", ["ipv4", "us-ssn"], None)]),
    "boundary": Scanner([("x", [], r"\btok_[a-z0-9]+\b"), ("y", ["aws-access-key", "jwt"], None)]),
    "edges": Scanner([("x", [], r"\Aabc"), ("y", [], r"(?-m:xyz$)"), ("z", ["iban"], None)]),
    "fallback": Scanner([("x", [], r"(?<![\w@])secret\d"), ("y", ["email"], None)]),
    "key": Scanner([("k", ["private-key"], None), ("c", ["credit-card"], None)]),
}

PIECES = [
    "alice@example.com", "4111 1111 1111 1111", "4111111111111111", "4111", "1111 1111", "+1 555 123 4567",
    "555-123-4567", "123-45-6789", "10.0.0.1", "1.2.3.4.5", "DE89 3704 0044 0532 0130 00", "GB82WEST1234",
    "AKIAIOSFODNN7EXAMPLE", "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJjaSJ9.c2ln", "-----BEGIN PRIVATE KEY-----\nMIIB",
    "-----END PRIVATE KEY-----", "ACME-1234", "id:42", "abc", "xyz", "tok_abc1", "secret7", "<", ">", "@", ".",
    "-", " ", "\n", "\x00", "é", "☃", "\ud800", "x", "Z", "7", "ACME-", "PRIVATE KEY-----",
]
texts = st.lists(st.sampled_from(PIECES), max_size=6).map("".join)


def reference(scanner: Scanner, values: list[str]) -> dict[int, list[Any]]:
    out = {}
    for i, v in enumerate(values):
        found = scanner.scan_bytes(v.encode("utf-8", "surrogatepass"))
        if found:
            out[i] = found
    return out


@pytest.mark.parametrize("name", sorted(SCANNERS))
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(values=st.lists(texts, min_size=0, max_size=40))
def test_scan_texts_equals_one_by_one(name: str, values: list[str]) -> None:
    scanner = SCANNERS[name]
    assert scanner.scan_texts(values) == reference(scanner, values)
    chunks = [v.encode("utf-8", "surrogatepass") for v in values]
    assert scanner.scan_chunks(chunks) == reference(scanner, values)


def test_a_value_found_only_when_alone_is_still_found() -> None:
    # Joined, "^ACME" would not match at the start of the third value without multi-line anchors.
    s = SCANNERS["anchored"]
    values = ["x"] * 20 + ["ACME-1234"] + ["y"] * 20
    assert list(s.scan_texts(values)) == [20]
    # A match running across values flags both, which are then scanned alone.
    c = SCANNERS["crossing"]
    values = ["<a"] + ["b"] * 20 + ["c>", "<ok>"]
    assert c.scan_texts(values) == reference(c, values)


# --------------------------------------------------------------------------- JSON and rows


def policy(rules: list[dict[str, Any]]) -> MaskingPolicy:
    return parse_masking_policy(
        {"metadata": {"name": "p", "namespace": "n"}, "spec": {"connections": ["c"], "rules": rules}}
    )


POLICIES = [
    policy(
        [
            {"name": "emails", "fields": ["$..email", "$.items[-1].note", "$.a[*].b"], "strategy": "redact"},
            {"name": "cards", "detectors": ["credit-card"], "strategy": "partial"},
            {"name": "keys", "detectors": ["aws-access-key", "private-key"], "strategy": "null"},
            {"name": "ids", "pattern": r"^ACME-\d{4}$", "strategy": "hash"},
        ]
    ),
    policy(
        [
            {"name": "pii", "detectors": list(DETECTORS), "strategy": "redact"},
            {"name": "ips", "fields": ["$.items[0]", "$..tok_abc1"], "strategy": "null"},
        ]
    ),
]
MASKERS = [MaskingEngine([p], KEY).for_caller(Caller(subject="s", issuer="i")) for p in POLICIES]

keys = st.sampled_from(["email", "note", "items", "a", "b", "id", "tok_abc1", "4111111111111111", "x@y.io"])
scalars = st.one_of(
    texts, st.none(), st.booleans(), st.sampled_from([4111111111111111, 42, 1.5, 4.111111111111111e15, -7])
)
docs = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(keys, inner, max_size=6),
    max_leaves=60,
)


def reference_json(m: Masker, doc: Any) -> tuple[Any, dict[str, int]]:
    """The one-value-at-a-time walk the fast path must agree with."""
    counts: dict[str, int] = {}

    def scan(text: str, null_ok: bool) -> str | None:
        data = text.encode("utf-8", "surrogatepass")
        try:
            out = m._replace(data, m._scanner.scan_bytes(data), counts, null_ok=null_ok)
        except _NullValue:
            return None
        return out.decode("utf-8", "surrogatepass")

    def walk(node: Any, states: tuple[tuple[int, int], ...]) -> Any:
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                out[scan(k, False)] = child(k, len(node), v, states)
            return out
        if isinstance(node, list):
            return [child(i, len(node), v, states) for i, v in enumerate(node)]
        if isinstance(node, bool) or node is None:
            return node
        if isinstance(node, str):
            return scan(node, True)
        return scan(str(node), True)

    def child(key: str | int, length: int, value: Any, states: tuple[tuple[int, int], ...]) -> Any:
        nxt, hit = [], None
        for pi, si in states:
            path = m._paths[pi]
            step = path.steps[si]
            if step.descendant:
                nxt.append((pi, si))
            if step.accepts(key, length):
                if si + 1 == len(path.steps):
                    hit = strictest((hit, path.rule))
                else:
                    nxt.append((pi, si + 1))
        if hit is not None:
            counts[hit.name] = counts.get(hit.name, 0) + 1
            return m._json_masked(hit, value)
        return walk(value, tuple(dict.fromkeys(nxt)))

    return walk(doc, tuple((i, 0) for i in range(len(m._paths)))), counts


def same_numbers_as_text(doc: Any) -> Any:
    # The reference turns every scanned number into its text; the fast path keeps an unmasked
    # number a number. Compare through that one difference.
    return json.loads(json.dumps(doc), parse_int=str, parse_float=str)


@pytest.mark.parametrize("which", range(len(MASKERS)))
@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(doc=docs)
def test_mask_json_equals_one_value_at_a_time(which: int, doc: Any) -> None:
    m = MASKERS[which]
    snapshot = json.dumps(doc)
    for _ in range(2):  # the second time, transitions and clean keys come from the caches
        masked, counts = m.mask_json(doc)
        want, want_counts = reference_json(m, doc)
        assert same_numbers_as_text(masked) == same_numbers_as_text(want)
        assert counts == want_counts
    assert json.dumps(doc) == snapshot  # the input is not touched


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(row=st.lists(st.one_of(st.none(), texts), min_size=12, max_size=12))
def test_row_plan_equals_value_by_value(row: list[str | None]) -> None:
    m = MASKERS[1]
    # text-like, int8 (text form: int2/int4 cannot hold a built-in finding and are not scanned), ...
    oids = [25, 1043, 20, 20, 25, 25, 1700, 25, 19, 25, 1009, 25]
    plan = m.plan_columns([ColumnOrigin(f"c{i}", type_oid=o) for i, o in enumerate(oids)])
    raw = [None if v is None else v.encode("utf-8", "surrogatepass") for v in row]
    values, counts = plan.apply(raw)
    want: list[bytes | None] = []
    want_counts: dict[str, int] = {}
    for v, oid in zip(raw, oids, strict=True):
        if v is None:
            want.append(None)
            continue
        masked = m._scan_value(v, want_counts)
        typed = oid not in (25, 1043, 19, 1009)
        want.append(None if typed and masked != v else masked)
    assert values == want
    assert dict(counts) == want_counts


def test_rules_without_detectors_walk_only() -> None:
    m = MaskingEngine([policy([{"name": "e", "fields": ["$..email"], "strategy": "redact"}])], KEY).for_caller(
        Caller(subject="s", issuer="i")
    )
    doc = {"a": [{"email": "x@y.io", "n": 4111111111111111}], "email": {"deep": 1}}
    masked, counts = m.mask_json(doc)
    rule = MaskingRule(name="e", strategy="redact")
    assert masked == {"a": [{"email": apply_strategy(rule, "x@y.io", KEY), "n": 4111111111111111}],
                      "email": apply_strategy(rule, '{"deep":1}', KEY)}
    assert counts == {"e": 2}
