"""Pattern detectors: true and false positives, validation, offsets, custom patterns, speed."""

from __future__ import annotations

import itertools
import random
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidegate_proxy.config import DETECTORS
from sidegate_proxy.detectors import (
    CUSTOM,
    DIGITS_ONLY_MIN,
    DetectorError,
    Match,
    Scanner,
    iban_valid,
    luhn_valid,
)

ALL = Scanner([("pii", DETECTORS, None)])


def found(text: str, scanner: Scanner = ALL) -> list[tuple[str, str]]:
    return [(m.detector, text[m.start : m.end]) for m in scanner.scan(text)]


@pytest.mark.parametrize(
    ("detector", "value"),
    [
        ("email", "alice@example.com"),
        ("email", "first.last+tag@mail.example.co.uk"),
        ("credit-card", "4111111111111111"),
        ("credit-card", "4111 1111 1111 1111"),
        ("credit-card", "5500-0000-0000-0004"),
        ("credit-card", "3400 0000 0000 009"),  # Amex printed 4-4-4-3
        ("credit-card", "3782 822463 10005"),  # Amex printed 4-6-5
        ("credit-card", "4222222222222"),  # 13-digit Visa
        ("us-ssn", "123-45-6789"),
        ("phone", "+1 (555) 123-4567"),
        ("phone", "+44 20 7946 0958"),
        ("phone", "555-123-4567"),
        ("phone", "(555) 123-4567"),
        ("iban", "DE89 3704 0044 0532 0130 00"),
        ("iban", "GB82WEST12345698765432"),
        ("ipv4", "192.168.10.200"),
        ("aws-access-key", "AKIAIOSFODNN7EXAMPLE"),
        ("aws-access-key", "ASIAY34FZKBOKMUTVV7A"),
        ("jwt", "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJjaSJ9.c2lnbmF0dXJl"),
    ],
)
def test_detects_inside_text(detector: str, value: str) -> None:
    text = f"before {value} after"
    assert found(text) == [(detector, value)]


def test_private_key_block_is_one_finding() -> None:
    key = (
        "-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAKj34GkxFhD9\n0fXk+3Pq==\n-----END RSA PRIVATE KEY-----"
    )
    assert found(f"key:\n{key}\nrest") == [("private-key", key)]
    # A key cut short by substr() still does not leak its body.
    cut = key[:60]
    assert found(f'"{cut}"') == [("private-key", cut)]
    enc = (
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,AB12\n\nMIIB\n"
    )
    assert found(enc + "-----END ENCRYPTED PRIVATE KEY-----")[0][0] == "private-key"


@pytest.mark.parametrize(
    "text",
    [
        "order 1234567890123 shipped",  # 13 digits, fails Luhn
        "order 4111111111111112",  # one digit off
        "0000 0000 0000 0000",  # Luhn-valid but no card
        "2024-01-15 2024-01-15 42",  # dates next to each other
        "000-12-3456 666-12-3456 900-12-3456 123-00-4567 123-45-0000",  # impossible SSNs
        "DE89 3704 0044 0532 0130 02",  # IBAN checksum off
        "version 1.2.3.4.5 and 999.1.1.1",  # not addresses
        "AKIA1234",  # too short
        "no at sign here, example.com",
        "12345",
    ],
)
def test_false_positives(text: str) -> None:
    assert found(text) == []


def test_iban_checksum_decides() -> None:
    s = Scanner([("r", ["iban"], None)])
    assert found("DE89 3704 0044 0532 0130 00", s) == [("iban", "DE89 3704 0044 0532 0130 00")]
    assert found("DE89 3704 0044 0532 0130 01", s) == []


def test_validators() -> None:
    assert luhn_valid(b"79927398713")
    assert not luhn_valid(b"79927398710")
    assert iban_valid(b"FR14 2004 1010 0505 0001 3M02 606")
    assert not iban_valid(b"FR14 2004 1010 0505 0001 3M02 607")
    assert not iban_valid(b"XX00")


def test_offsets_are_characters_for_str_and_bytes_for_bytes() -> None:
    text = "Zoë — naïve ☃ bob@x.io and 4111 1111 1111 1111"
    matches = ALL.scan(text)
    assert [text[m.start : m.end] for m in matches] == ["bob@x.io", "4111 1111 1111 1111"]
    data = text.encode()
    assert [data[m.start : m.end] for m in ALL.scan_bytes(data)] == [b"bob@x.io", b"4111 1111 1111 1111"]


def test_many_in_one_text_do_not_overlap() -> None:
    text = "a@b.io,c@d.io;4111111111111111 123-45-6789 10.0.0.1"
    ms = ALL.scan(text)
    assert [m.detector for m in ms] == ["email", "email", "credit-card", "us-ssn", "ipv4"]
    assert all(a.end <= b.start for a, b in itertools.pairwise(ms))


def test_rules_own_their_detectors_first_listed_wins() -> None:
    s = Scanner([("strict", ["email"], None), ("loose", ["email", "ipv4"], None)])
    assert [(m.rule, m.detector) for m in s.scan("x@y.io 1.2.3.4")] == [
        ("strict", "email"),
        ("loose", "ipv4"),
    ]


def test_custom_pattern_on_re2() -> None:
    s = Scanner([("ids", [], r"ACME-[0-9]{8}")])
    assert s.python_fallback == ()
    assert s.scan("ref ACME-00000042 and ACME-1") == [Match(4, 17, "ids", CUSTOM)]


def test_custom_pattern_re2_rejects_falls_back_to_python_re() -> None:
    # Lookahead is not RE2 syntax: only this rule runs on Python re.
    s = Scanner([("ids", [], r"ID(?=-)-\d+"), ("mail", ["email"], None)])
    assert s.python_fallback == ("ids",)
    text = "é ID-42 a@b.io ID+7"
    assert [(m.rule, text[m.start : m.end]) for m in s.scan(text)] == [("ids", "ID-42"), ("mail", "a@b.io")]


def test_named_groups_may_repeat_across_rules() -> None:
    s = Scanner([("a", [], r"(?P<n>AA\d)"), ("b", [], r"(?P<n>BB\d)")])
    assert [m.rule for m in s.scan("AA1 BB2")] == ["a", "b"]


def test_a_longer_candidate_failing_validation_leaves_room_for_others() -> None:
    # "4111 1111 1111 1112" is the longest match but fails Luhn; the custom pattern at the same
    # place must still be found.
    s = Scanner([("cards", ["credit-card"], None), ("prefix", [], r"4111 1111")])
    text = "x 4111 1111 1111 1112"
    assert [(m.rule, text[m.start : m.end]) for m in s.scan(text)] == [("prefix", "4111 1111")]


def test_bad_rules_fail_at_build_time() -> None:
    with pytest.raises(DetectorError, match="unknown detector 'passport'"):
        Scanner([("r", ["passport"], None)])
    with pytest.raises(DetectorError, match="invalid pattern"):
        Scanner([("r", [], "(unclosed")])


def test_empty_scanner() -> None:
    s = Scanner([])
    assert s.empty and s.scan("a@b.io") == []


@st.composite
def card_numbers(draw: st.DrawFn) -> str:
    body = draw(st.lists(st.integers(0, 9), min_size=14, max_size=14))
    digits = [4, *body]
    total = 0
    for i, d in enumerate(reversed(digits)):
        d = d * 2 if i % 2 == 0 else d
        total += d - 9 if d > 9 else d
    digits.append((10 - total % 10) % 10)
    return "".join(map(str, digits))


@given(card=card_numbers(), sep=st.sampled_from(["", " ", "-"]), prefix=st.text(max_size=20))
@settings(max_examples=200)
def test_every_valid_card_is_found(card: str, sep: str, prefix: str) -> None:
    if len(set(card)) < 2:
        return
    printed = sep.join(card[i : i + 4] for i in range(0, 16, 4))
    text = prefix + " " + printed + " end"
    assert ("credit-card", printed) in found(text)


@pytest.mark.parametrize(
    "vocabulary",
    [
        "the quick brown fox order ORD-20240115 ref 2024-01-15 total 42.50 EUR status ok",
        # every ~15th word a 13-digit id: a card candidate that fails Luhn (the slow path)
        "the quick brown fox order ORD-20240115 ref 2024-01-15 total 42.50 EUR status ok id 1234567890123",
    ],
    ids=["typical", "many-order-ids"],
)
def test_one_megabyte_scan_and_throughput(vocabulary: str) -> None:
    rng = random.Random(7)
    pii = [
        "alice@example.com",
        "4111 1111 1111 1111",
        "123-45-6789",
        "+1 (555) 123-4567",
        "DE89370400440532013000",
        "10.0.0.1",
        "AKIAIOSFODNN7EXAMPLE",
    ]
    vocab = vocabulary.split()
    parts, size, planted = [], 0, 0
    while size < 1_000_000:
        if rng.random() < 0.002:
            w = rng.choice(pii)
            planted += 1
        else:
            w = rng.choice(vocab)
        parts.append(w)
        size += len(w) + 1
    text = " ".join(parts)
    t0 = time.perf_counter()
    matches = ALL.scan(text)
    rate = len(text) / 1e6 / (time.perf_counter() - t0)
    print(f"\nscanner: {len(text) / 1e6:.2f} MB, {len(matches)} findings, {rate:.1f} MB/s")
    assert len(matches) == planted


# --------------------------------------------------------------------------- integers as text

INTEGER_TEXTS = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.builds(lambda n, neg: -int("9" * n) if neg else int("1" * n), st.integers(1, 19), st.booleans()),
).map(str)


@settings(max_examples=500, deadline=None)
@given(INTEGER_TEXTS)
def test_digits_only_min_bounds_what_each_detector_finds_in_an_integer(text: str) -> None:
    """``DIGITS_ONLY_MIN``: a detector not listed never matches an integer's text, a listed one
    only with at least that many digits; int2/int4 columns skip the scan on the strength of it."""
    for name in DETECTORS:
        hits = Scanner([("r", [name], None)]).scan(text)
        if name not in DIGITS_ONLY_MIN:
            assert hits == [], (name, text)
        else:
            assert all(sum(c.isdigit() for c in text[m.start:m.end]) >= DIGITS_ONLY_MIN[name] for m in hits)


def test_every_digit_string_up_to_ten_digits_is_clean_under_the_built_ins() -> None:
    """Exhaustively over shapes: every length, every leading digit, with and without a sign."""
    for n in range(1, 11):
        for lead in "123456789":
            for fill in "0123456789":
                for sign in ("", "-"):
                    assert found(sign + lead + fill * (n - 1)) == []


def test_integers_are_scanned_when_a_custom_pattern_could_match() -> None:
    assert not ALL.matches_integers(10)  # int4: no built-in detector can hold a finding
    assert ALL.matches_integers(19)  # int8: a card number fits
    custom = Scanner([("pii", DETECTORS, None), ("ids", [], r"\d{6}")])
    assert custom.matches_integers(5) and found("123456", custom) == [(CUSTOM, "123456")]


CUSTOM_PATTERNS = {  # pattern: whether every match needs a character no integer's text has
    "ACME-[0-9]{8}": True, r"[A-Z]{2}\d+": True, r"(?i)emp-\d+": True, r"(?:ab|cd)\d": True,
    r"(?P<k>key)=\d+": True, r"\bEMP\d{4}\b": True, r".*@.*": True, r"[a-z]+|[A-Z]+": True,
    r"\d{6}": False, r"(foo|\d+)": False, r"x?\d+": False, r"[^a]": False, r"\w+": False,
    r"\s*\d": False, r"[a-f0-9]{32}": False, r"-\d": False, r"\D": False, r"(?!x)\d": False,
    r"(\d)\1": False, r"[[:digit:]]": False, r"x|[[:digit:]]": False, r"\pN+": False, r"\Q-1\E": False,
}


@pytest.mark.parametrize(("pattern", "needs"), CUSTOM_PATTERNS.items())
def test_custom_patterns_that_cannot_match_an_integer(pattern: str, needs: bool) -> None:
    scanner = Scanner([("r", ["email"], pattern)])
    assert scanner.matches_integers(5) is not needs


@settings(max_examples=300, deadline=None)
@given(INTEGER_TEXTS)
def test_a_pattern_judged_integer_free_never_matches_an_integer(text: str) -> None:
    for pattern, needs in CUSTOM_PATTERNS.items():
        if needs:
            assert re.search(pattern, text) is None, (pattern, text)
