"""Pattern detectors: find values with a recognisable shape (emails, cards, keys) in any text.

The regex engine decides the speed (notes.md: Python ``re`` 3.6 MB/s, RE2 69 MB/s), so a
``Scanner`` compiles all of a rule set's patterns into ONE leftmost-longest RE2 alternation and
runs it over UTF-8 bytes (the RE2 wrapper re-encodes ``str`` input on every call). Cheap
prefilters drop detectors that cannot match a given text (no ``@``, no email) before the
alternation for the remaining subset is picked from a per-scanner cache. Shapes that need more
than a regex (Luhn for cards, mod-97 for IBANs) are validated after the match, so order ids are
not masked as cards.

A custom pattern RE2 cannot compile (lookaround, backreferences) falls back to Python ``re`` and
runs as a separate, slower pass over the decoded text.

Each call into the RE2 wrapper costs microseconds whatever the text's size, so many small values (the
strings of a JSON document, the columns of a row) are scanned as ONE text: ``scan_chunks`` joins
them with newlines, finds which of them can hold a finding, and scans only those alone again, so
its findings are exactly those of scanning each value alone (see ``_candidates`` for why).
"""

from __future__ import annotations

import importlib
import re
import warnings
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import re2

from .config import DETECTORS

__all__ = ["CUSTOM", "DETECTOR_PATTERNS", "DetectorError", "Match", "Scanner", "iban_valid", "luhn_valid"]

_Spans = Sequence[tuple[int, int]]  # (start, end) of the whole match, then of each group; -1: none

CUSTOM = "pattern"  # Match.detector for a rule's custom ``pattern``

_DIGITS = b"0123456789"
_MAX_MEM = 256 << 20


class DetectorError(ValueError):
    """A detector name or custom pattern that cannot be scanned for."""


@dataclass(frozen=True, slots=True)
class Match:
    """One finding: ``[start, end)`` offsets (chars for ``scan``, UTF-8 bytes for ``scan_bytes``)."""

    start: int
    end: int
    rule: str
    detector: str


# --------------------------------------------------------------------------- validators


_DOUBLED = bytes.maketrans(b"0123456789", bytes([0, 2, 4, 6, 8, 1, 3, 5, 7, 9]))
_DIGIT_VALUE = bytes.maketrans(b"0123456789", bytes(range(10)))
_SEPARATORS = b" -"


def luhn_valid(digits: bytes) -> bool:
    """The card checksum; all-same-digit runs (``0000 0000 0000 0000``) are not cards."""
    if len(set(digits)) < 2:
        return False
    total = sum(digits[-1::-2].translate(_DIGIT_VALUE)) + sum(digits[-2::-2].translate(_DOUBLED))
    return total % 10 == 0


def iban_valid(iban: bytes) -> bool:
    """ISO 13616 mod-97: move the first four characters to the end, letters to numbers."""
    s = iban.replace(b" ", b"").upper()
    if not 15 <= len(s) <= 34 or not s[:2].isalpha() or not s[2:4].isdigit() or not s.isalnum():
        return False
    rearranged = s[4:] + s[:4]
    number = "".join(str(c - 48) if c < 58 else str(c - 55) for c in rearranged)
    return int(number) % 97 == 1


def _only_digits(data: bytes, start: int, end: int) -> bytes:
    return data[start:end].translate(None, b" -.()+")


def _card(data: bytes, start: int, end: int) -> bool:
    digits = data[start:end].translate(None, _SEPARATORS)
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def _iban(data: bytes, start: int, end: int) -> bool:
    return iban_valid(data[start:end])


def _ssn(data: bytes, start: int, end: int) -> bool:
    d = _only_digits(data, start, end)
    area, group, serial = d[:3], d[3:5], d[5:]
    return area not in (b"000", b"666") and area[:1] != b"9" and group != b"00" and serial != b"0000"


def _phone(data: bytes, start: int, end: int) -> bool:
    return 7 <= len(_only_digits(data, start, end)) <= 15


def _is_digit(data: bytes, i: int) -> bool:
    return 0 <= i < len(data) and 48 <= data[i] <= 57


def _ipv4(data: bytes, start: int, end: int) -> bool:
    """Not a slice of a longer dotted number such as a version ``1.2.3.4.5``."""
    before = start >= 2 and data[start - 1] == 46 and _is_digit(data, start - 2)
    after = end + 1 < len(data) and data[end] == 46 and _is_digit(data, end + 1)
    return not (before or after)


# --------------------------------------------------------------------------- the detectors

_Prefilter = Callable[[bytes, int], bool]  # (text, number of ASCII digits in it)
_Validator = Callable[[bytes, int, int], bool]

_AWS_PREFIXES = (b"AKIA", b"ASIA", b"AIDA", b"AROA", b"AGPA", b"ANPA", b"AIPA", b"ANVA", b"ABIA", b"ACCA")
_OCTET = rb"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_LABEL = rb"[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?"
_PEM_LABEL = rb"(?:[A-Z0-9]+ )*PRIVATE KEY-----"

# RE2 syntax, matched against UTF-8 bytes, leftmost-longest.
DETECTOR_PATTERNS: dict[str, bytes] = {
    "email": rb"[A-Za-z0-9._%+\-]+@" + _LABEL + rb"(?:\." + _LABEL + rb")*\.[A-Za-z]{2,63}",
    # unbroken, or the printed groupings (4-4-4-4[-3], 4-4-4-1..3, Amex/Diners 4-6-5/4-6-4) with
    # one kind of separator: dates and phone numbers next to each other do not form a "card".
    "credit-card": (
        rb"\b(?:\d{13,19}|\d{4}(?: \d{4}){2,3}(?: \d{1,3})?|\d{4}(?:-\d{4}){2,3}(?:-\d{1,3})?"
        rb"|\d{4} \d{6} \d{4,5}|\d{4}-\d{6}-\d{4,5})\b"
    ),
    "us-ssn": rb"\b\d{3}-\d{2}-\d{4}\b|\b\d{3} \d{2} \d{4}\b",
    "phone": (
        rb"\+[1-9]\d{0,2}(?:[ .\-]?\(?\d{1,4}\)?){2,5}\b"
        rb"|(?:\(\d{3}\)[ .\-]?|\b\d{3}[ .\-])\d{3}[ .\-]\d{4}\b"
    ),
    "iban": rb"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b",
    "ipv4": rb"\b(?:" + _OCTET + rb"\.){3}" + _OCTET + rb"\b",
    "aws-access-key": rb"\b(?:" + b"|".join(_AWS_PREFIXES) + rb")[A-Z0-9]{16}\b",
    "jwt": rb"\beyJ[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]*",
    # A key cut short (no END line, e.g. substr()) is still masked up to the first character that
    # cannot be in a PEM body: over-masking beats leaking half a key.
    "private-key": (
        rb"-----BEGIN " + _PEM_LABEL + rb"(?:[A-Za-z0-9+/=\s:,.\\]|-[A-Za-z0-9])*"
        rb"(?:-----END " + _PEM_LABEL + rb")?"
    ),
}

_AWS_PREFIX = re.compile(b"|".join(_AWS_PREFIXES))

# Necessary conditions for a match, and monotone (true for a text stays true for any text
# containing it): ``scan_chunks`` relies on that when it prefilters many values joined together.
_PREFILTERS: dict[str, _Prefilter] = {
    "email": lambda data, digits: b"@" in data,
    "credit-card": lambda data, digits: digits >= 13,
    "us-ssn": lambda data, digits: digits >= 9,
    "phone": lambda data, digits: digits >= 7,
    "iban": lambda data, digits: digits >= 4 and len(data) >= 15,
    "ipv4": lambda data, digits: digits >= 4 and data.count(b".") >= 3,
    "aws-access-key": lambda data, digits: b"A" in data and _AWS_PREFIX.search(data) is not None,
    "jwt": lambda data, digits: b"eyJ" in data,
    "private-key": lambda data, digits: b"PRIVATE KEY-----" in data,
}

# What the native lane (``_lane.c``) checks of a value before it relays a row unscanned: for each
# detector (fewest ASCII digits, substrings), met by every text its prefilter admits, so a value
# that meets none of its rule set's conditions cannot match (tests/test_detectors.py checks the
# implication). Coarser than the prefilters (IBAN and IPv4 need only 4 digits here): a value the
# lane is unsure of goes to Python, which scans it.
LANE_CONDITIONS: dict[str, tuple[int, tuple[bytes, ...]]] = {
    "email": (0, (b"@",)),
    "credit-card": (13, ()),
    "us-ssn": (9, ()),
    "phone": (7, ()),
    "iban": (4, ()),
    "ipv4": (4, ()),
    "aws-access-key": (0, _AWS_PREFIXES),
    "jwt": (0, (b"eyJ",)),
    "private-key": (0, (b"PRIVATE KEY-----",)),
}  # 0 digits: no digit condition

_VALIDATORS: dict[str, _Validator] = {
    "credit-card": _card,
    "iban": _iban,
    "us-ssn": _ssn,
    "phone": _phone,
    "ipv4": _ipv4,
}

# The fewest digits a detector's match holds when the text is an integer as PostgreSQL prints one
# (digits after an optional minus sign); a detector not listed never matches such a text (each
# needs a letter, '@', '+', '.', '(' or a separator between digits). Checked exhaustively in
# tests/test_detectors.py, so a new detector cannot slip past it.
DIGITS_ONLY_MIN: dict[str, int] = {"credit-card": 13}

assert set(DETECTOR_PATTERNS) == set(DETECTORS) == set(_PREFILTERS) == set(LANE_CONDITIONS)


_INTEGER_CHARS = "-0123456789"
# Python's own regex parser (no public API, no stubs): the parse tree of a custom pattern
re_parser: Any = importlib.import_module("re._parser")
re_constants: Any = importlib.import_module("re._constants")


def _parse(pattern: str) -> Any | None:
    """Python's parse tree of a custom pattern, or None where it may read the pattern otherwise
    than RE2 does (an RE2 POSIX class ``[[:digit:]]`` is a set of characters to Python) or cannot
    read it (RE2-only syntax: ``\\pN``, ``\\Q...\\E``, ``\\z``)."""
    if "[:" in pattern:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "possible nested set" and the like
            return re_parser.parse(pattern)
    except Exception:
        return None


def _needs_non_integer_char(pattern: str) -> bool:
    """True when every match of a custom pattern holds a character no integer's text has (a
    letter, '@', ...), so int2/int4 columns need not be scanned for it. Conservative: False for
    whatever the analysis does not follow."""
    parsed = _parse(pattern)
    return parsed is not None and _seq_needs(list(parsed))


def _required_literal(pattern: str) -> bytes | None:
    """The text every match of a custom pattern starts with (past zero-width anchors), as UTF-8,
    at most 255 bytes: what the native lane looks for in a value before it lets the value through
    unscanned. None when the analysis is not sure of one (a flag, or a group, class or repeat
    first)."""
    parsed = _parse(pattern)
    if parsed is None or parsed.state.flags & ~re_constants.SRE_FLAG_UNICODE:
        return None
    literal: list[str] = []
    for op, arg in parsed:
        if op is re_constants.LITERAL:
            literal.append(chr(arg))
        elif op is not re_constants.AT or literal:
            break
    return "".join(literal).encode()[:255] or None


def _seq_needs(items: list[Any]) -> bool:
    return any(_node_needs(op, arg) for op, arg in items)


def _node_needs(op: Any, arg: Any) -> bool:
    if op is re_constants.LITERAL:
        return chr(arg) not in _INTEGER_CHARS
    if op is re_constants.IN:
        return not any(_in_set(arg, ch) for ch in _INTEGER_CHARS)
    if op is re_constants.SUBPATTERN:
        return _seq_needs(list(arg[-1]))
    if op in (re_constants.MAX_REPEAT, re_constants.MIN_REPEAT, re_constants.POSSESSIVE_REPEAT):
        low, _high, sub = arg
        return low >= 1 and _seq_needs(list(sub))
    if op is re_constants.BRANCH:
        return all(_seq_needs(list(branch)) for branch in arg[1])
    if op is re_constants.ATOMIC_GROUP:
        return _seq_needs(list(arg))
    return False  # ANY, NOT_LITERAL, anchors, lookarounds, back references: a digit may do


def _in_set(items: list[tuple[Any, Any]], ch: str) -> bool:
    """Whether a character class may match ``ch`` (True where unsure)."""
    code = ord(ch)
    for op, arg in items:
        if op is re_constants.NEGATE:
            return True
        if op is re_constants.LITERAL and arg == code:
            return True
        if op is re_constants.RANGE and arg[0] <= code <= arg[1]:
            return True
        if op is re_constants.CATEGORY and _in_category(arg, ch):
            return True
        if op not in (re_constants.LITERAL, re_constants.RANGE, re_constants.CATEGORY):
            return True
    return False


def _in_category(category: Any, ch: str) -> bool:
    """\\s holds no integer character, \\d and \\w only digits; the negated ones may hold any."""
    if category is re_constants.CATEGORY_SPACE:
        return False
    if category in (re_constants.CATEGORY_DIGIT, re_constants.CATEGORY_WORD):
        return ch.isdigit()
    return True


def _first_byte_prefilter(first: bytes) -> _Prefilter | None:
    """A custom pattern's only cheap necessary condition: a byte it can start with."""
    if len(first) == 256:
        return None
    if len(first) == 1:
        return lambda data, digits: first in data
    return lambda data, digits: len(data.translate(None, first)) != len(data)


# The wrapper's ``search`` is a generator building a match object per call; RE2's own ``Match``
# returns the spans directly, at less than half the cost. Used when this wrapper version has it.
_RAW = hasattr(re2, "_Anchor") and hasattr(re2.compile(b"x"), "_regexp")
_UNANCHORED = re2._Anchor.UNANCHORED if _RAW else None
_ANCHOR_START = re2._Anchor.ANCHOR_START if _RAW else None
_NO_MATCH = (-1, -1)
_FEW = 16  # up to this many chunks, each one's own prefilter is cheaper than a joined scan


def _options(*, capture: bool = False) -> re2.Options:
    opts = re2.Options()
    opts.longest_match = True
    opts.never_capture = not capture
    opts.log_errors = False
    opts.max_mem = _MAX_MEM
    return opts


@dataclass(frozen=True)
class _Alt:
    """One alternative of the combined regex: a detector (or custom pattern) owned by a rule."""

    rule: str
    detector: str
    pattern: bytes
    regex: re2._Regexp
    prefilter: _Prefilter | None
    validate: _Validator | None

    first: bytes  # every byte a match can start with

    def accepts(self, data: bytes, start: int, end: int) -> bool:
        return self.validate is None or self.validate(data, start, end)


def _alt(rule: str, detector: str, pattern: bytes, prefilter: _Prefilter | None,
         validate: _Validator | None) -> _Alt:
    regex = re2.compile(pattern, _options())
    lo, hi = regex.possiblematchrange(1)
    first = bytes(range(lo[0], hi[0] + 1)) if lo and hi else bytes(range(256))
    if detector == CUSTOM:
        prefilter = _first_byte_prefilter(first)
    return _Alt(rule, detector, pattern, regex, prefilter, validate, first)


class _Combined:
    """The alternation for one subset of alternatives, with each one's wrapper group."""

    __slots__ = ("_raw", "groups", "regex")

    def __init__(self, regex: re2._Regexp, groups: tuple[tuple[int, int, _Alt], ...]) -> None:
        self.regex = regex
        self.groups = groups  # (group index, alternative index, alternative)
        self._raw = regex._regexp.Match if _RAW else None

    def find(self, data: bytes, pos: int, *, anchored: bool = False) -> _Spans | None:
        """The leftmost-longest match at or after ``pos`` (at ``pos`` if anchored)."""
        if self._raw is not None:
            spans: _Spans = self._raw(_ANCHOR_START if anchored else _UNANCHORED, data, pos, len(data))
            return None if spans[0] == _NO_MATCH else spans
        m = self.regex.match(data, pos) if anchored else self.regex.search(data, pos)
        return None if m is None else [m.span(g) for g in range(self.regex.groups + 1)]

    def which(self, spans: _Spans) -> tuple[int, _Alt]:
        for group, i, alt in self.groups:
            if spans[group][0] >= 0:
                return 1 << i, alt
        raise AssertionError("a match without a matching alternative")


_NAMED_GROUP = re.compile(rb"(?<!\\)((?:\\\\)*)\(\?P<[A-Za-z_][A-Za-z0-9_]*>")


def _strip_names(pattern: bytes) -> bytes:
    """Custom patterns' own named groups become plain groups so two rules can reuse a name."""
    return _NAMED_GROUP.sub(rb"\1(", pattern)


def _lane_conditions(alts: Sequence[_Alt]) -> tuple[int, tuple[bytes, ...]] | None:
    """``Scanner.lane_conditions`` of these alternatives (worked out once per rule set)."""
    digits: list[int] = []
    subs: dict[bytes, None] = {}
    for a in alts:
        if a.detector == CUSTOM:
            literal = _required_literal(a.pattern.decode())
            if literal is None:
                return None
            subs[literal] = None
        else:
            fewest, needed = LANE_CONDITIONS[a.detector]
            if fewest:
                digits.append(fewest)
            subs.update(dict.fromkeys(needed))
    return (min(digits, default=0), tuple(subs)) if len(subs) <= 255 else None


class Scanner:
    """All detectors and custom patterns of a rule set, compiled once and scanned in one pass.

    ``rules`` is a sequence of ``(rule name, detector names, custom pattern or None)``. When two
    rules name the same detector the first one owns it, so callers list the rule that should win
    first. Matches never overlap; among candidates starting at the same place the longest wins.
    """

    def __init__(self, rules: Iterable[tuple[str, Sequence[str], str | None]]) -> None:
        alts: list[_Alt] = []
        fallback: list[tuple[str, re.Pattern[str]]] = []
        seen: set[str] = set()
        for rule, detectors, pattern in rules:
            for name in detectors:
                name = name.lower()
                if name not in DETECTOR_PATTERNS:
                    known = ", ".join(DETECTORS)
                    raise DetectorError(f"rule {rule}: unknown detector {name!r} (known: {known})")
                if name in seen:
                    continue
                seen.add(name)
                raw = DETECTOR_PATTERNS[name]
                alts.append(_alt(rule, name, raw, _PREFILTERS[name], _VALIDATORS.get(name)))
            if pattern is None:
                continue
            encoded = pattern.encode()
            try:
                alts.append(_alt(rule, CUSTOM, encoded, None, None))
            except re2.error:
                try:
                    fallback.append((rule, re.compile(pattern)))
                except re.error as exc:
                    raise DetectorError(f"rule {rule}: invalid pattern {pattern!r}: {exc}") from None
        self._alts = tuple(alts)
        self._fallback = tuple(fallback)
        never = 1 << 30
        self._integer_digits = min(
            (DIGITS_ONLY_MIN.get(a.detector, never) if a.detector != CUSTOM
             else never if _needs_non_integer_char(a.pattern.decode()) else 0 for a in alts),
            default=never,
        )
        if any(not _needs_non_integer_char(rx.pattern) for _, rx in fallback):
            self._integer_digits = 0
        self._lane_conditions = None if fallback else _lane_conditions(alts)
        self._always = sum(1 << i for i, a in enumerate(alts) if a.prefilter is None)
        self._prefilters = tuple((1 << i, a.prefilter) for i, a in enumerate(alts) if a.prefilter is not None)
        self._compiled: dict[tuple[int, bool], _Combined] = {}
        # Joining values is exact only where no pattern can tell a joint from the edge of a text:
        # RE2 patterns (no lookaround); ^ and $ are made multi-line for it (see _edge_bound).
        self._joinable = not fallback and not any(a.detector == CUSTOM and _edge_bound(a.pattern) for a in alts)
        if alts:
            try:
                self._combined((1 << len(alts)) - 1)
                if self._joinable:
                    self._combined((1 << len(alts)) - 1, joined=True)
            except re2.error as exc:
                raise DetectorError(f"cannot combine detector patterns: {exc}") from None

    @property
    def empty(self) -> bool:
        return not self._alts and not self._fallback

    def lane_conditions(self) -> tuple[int, tuple[bytes, ...]] | None:
        """(fewest digits, substrings; 0: no digit condition) such that a value meeting none of
        them holds no finding (``LANE_CONDITIONS``; a custom pattern's leading literal); None
        when a custom pattern has no literal the analysis is sure of."""
        return self._lane_conditions

    def matches_integers(self, digits: int) -> bool:
        """Whether an integer of at most ``digits`` digits, printed as text, can hold a finding:
        not for int2 and int4 under the built-in detectors alone, so those columns skip the scan."""
        return digits >= self._integer_digits

    @property
    def python_fallback(self) -> tuple[str, ...]:
        """Rules whose custom pattern RE2 rejected and which run on Python ``re`` (slow)."""
        return tuple(rule for rule, _ in self._fallback)

    def _combined(self, mask: int, *, joined: bool = False) -> _Combined:
        combined = self._compiled.get((mask, joined))
        if combined is None:
            chosen = [(i, a) for i, a in enumerate(self._alts) if mask >> i & 1]
            pattern = b"|".join(b"(?P<_sg%d>%s)" % (i, _own(a, joined)) for i, a in chosen)
            rx = re2.compile(pattern, _options(capture=True))
            index = {(k.decode() if isinstance(k, bytes) else k): v for k, v in rx.groupindex.items()}
            groups = tuple((index[f"_sg{i}"], i, a) for i, a in chosen)
            combined = self._compiled[(mask, joined)] = _Combined(rx, groups)
        return combined

    def _selected(self, data: bytes) -> int:
        digits = len(data) - len(data.translate(None, _DIGITS))
        mask = self._always
        for bit, prefilter in self._prefilters:
            if prefilter(data, digits):
                mask |= bit
        return mask

    def scan_bytes(self, data: bytes) -> list[Match]:
        """Findings in UTF-8 ``data`` with byte offsets (what the PostgreSQL proxy masks in place)."""
        found: list[Match] = []
        if self._alts:
            mask = self._selected(data)
            if mask:
                found = self._scan_re2(data, mask)
        if self._fallback:
            found = _merge(found, self._scan_python(data))
        return found

    def scan(self, text: str) -> list[Match]:
        """Findings in ``text`` with character offsets."""
        data = text.encode("utf-8", "surrogatepass")
        found = self.scan_bytes(data)
        if not found or len(data) == len(text):
            return found
        return _to_char_offsets(data, found)

    def scan_chunks(self, chunks: Sequence[bytes]) -> dict[int, list[Match]]:
        """``{i: scan_bytes(chunks[i])}`` for the chunks with findings, in one pass over all of
        them where that is exact (byte offsets within each chunk)."""
        if len(chunks) <= _FEW or not self._joinable:
            return self._few(chunks)
        data = b"\n".join(chunks)
        return self._each(chunks, self._candidates(data, lambda: map(len, chunks)))

    def scan_texts(self, texts: Sequence[str]) -> dict[int, list[Match]]:
        """``scan_chunks`` for strings: byte offsets within each text's UTF-8 encoding."""
        if len(texts) <= _FEW or not self._joinable:
            return self._few([t.encode("utf-8", "surrogatepass") for t in texts])
        joined = "\n".join(texts)
        data = joined.encode("utf-8", "surrogatepass")
        if len(data) == len(joined):  # ASCII: characters are bytes
            candidates = self._candidates(data, lambda: map(len, texts))
            return self._each([texts[i].encode() for i in candidates], range(len(candidates)), candidates)
        chunks = [t.encode("utf-8", "surrogatepass") for t in texts]
        return self._each(chunks, self._candidates(data, lambda: map(len, chunks)))

    def _few(self, chunks: Sequence[bytes]) -> dict[int, list[Match]]:
        """A few chunks are scanned alone: their own prefilters skip most of them, and a joined
        scan would have to rescan each one it finds something in."""
        return self._each(chunks, range(len(chunks)))

    def _each(
        self, chunks: Sequence[bytes], which: Iterable[int], names: Sequence[int] | None = None
    ) -> dict[int, list[Match]]:
        """Chunks scanned alone, reported under their index (or under ``names[index]``)."""
        out: dict[int, list[Match]] = {}
        for i in which:
            found = self.scan_bytes(chunks[i])
            if found:
                out[i if names is None else names[i]] = found
        return out

    def _candidates(self, data: bytes, lengths: Callable[[], Iterable[int]]) -> list[int]:
        """Indexes of the newline-joined chunks that can hold a finding when scanned alone.

        Exact, with no chunk missed: prefilters are monotone, so every detector that can match
        inside a chunk is selected for the joined text. Newline is not a word character, a digit
        or a dot, so ``\\b`` and the validators see a joint as they see the edge of a text; no
        detector that has a validator can match across it; custom patterns are multi-line here, so
        ``^`` and ``$`` match at joints too. Hence wherever a chunk alone has a finding, the joined
        scan reports a finding overlapping that chunk (at that place, or one that started earlier
        and ran into it), and every chunk a finding overlaps is scanned alone again.
        """
        mask = self._selected(data)
        if not mask:
            return []
        found = self._scan_re2(data, mask, joined=True)
        if not found:
            return []
        before = list(accumulate(lengths(), initial=0))  # bytes of the chunks before chunk i
        count = len(before) - 1

        def chunk_at(pos: int) -> int:  # chunk i starts at before[i] + i (one newline each)
            return bisect_right(range(count), pos, key=lambda i: before[i] + i) - 1

        hit: dict[int, None] = {}
        for m in found:
            hit.update(dict.fromkeys(range(chunk_at(m.start), chunk_at(max(m.end - 1, m.start)) + 1)))
        return list(hit)

    def _scan_re2(self, data: bytes, mask: int, *, joined: bool = False) -> list[Match]:
        combined = self._combined(mask, joined=joined)
        out: list[Match] = []
        pos, size = 0, len(data)
        while pos < size:
            spans = combined.find(data, pos)
            if spans is None:
                break
            start, end = spans[0]
            bit, alt = combined.which(spans)
            if end > start and alt.accepts(data, start, end):
                out.append(Match(start, end, alt.rule, alt.detector))
                pos = end
                continue
            hit = self._retry(data, start, mask & ~bit, joined)
            if hit is None:
                pos = start + 1
            else:
                out.append(hit)
                pos = hit.end
        return out

    def _retry(self, data: bytes, start: int, mask: int, joined: bool) -> Match | None:
        """The longest match here rejected by its validator: try the other detectors at ``start``."""
        byte = data[start : start + 1]
        for i, alt in enumerate(self._alts):
            if mask >> i & 1 and byte not in alt.first:
                mask &= ~(1 << i)
        while mask:
            combined = self._combined(mask, joined=joined)
            spans = combined.find(data, start, anchored=True)
            if spans is None:
                return None
            end = spans[0][1]
            bit, alt = combined.which(spans)
            if end > start and alt.accepts(data, start, end):
                return Match(start, end, alt.rule, alt.detector)
            mask &= ~bit
        return None

    def _scan_python(self, data: bytes) -> list[Match]:
        text = data.decode("utf-8", "surrogateescape")
        found: list[Match] = []
        for rule, rx in self._fallback:
            found.extend(
                Match(m.start(), m.end(), rule, CUSTOM) for m in rx.finditer(text) if m.end() > m.start()
            )
        found.sort(key=lambda m: m.start)
        if len(text) == len(data):
            return _merge([], found)
        # char offsets back to byte offsets
        out, last_char, last_byte = [], 0, 0
        for m in found:
            last_byte += len(text[last_char : m.start].encode("utf-8", "surrogateescape"))
            last_char = m.start
            length = len(text[m.start : m.end].encode("utf-8", "surrogateescape"))
            out.append(Match(last_byte, last_byte + length, m.rule, m.detector))
        return _merge([], out)


def _own(alt: _Alt, joined: bool) -> bytes:
    """An alternative in a combined regex: group names dropped, and for a joined scan a custom
    pattern's ``^`` and ``$`` made multi-line (built-in detectors use neither)."""
    pattern = _strip_names(alt.pattern)
    return b"(?m:" + pattern + b")" if joined and alt.detector == CUSTOM else pattern


_FLAGS_OFF = re.compile(rb"\(\?[a-zA-Z]*-")


def _edge_bound(pattern: bytes) -> bool:
    """Whether a pattern may match at the edge of a text but not at a newline even when made
    multi-line: ``\\A``, ``\\z``, or flags switched off (``(?-m)``). Errs on the side of True."""
    return b"\\A" in pattern or b"\\z" in pattern or _FLAGS_OFF.search(pattern) is not None


def _merge(first: list[Match], second: list[Match]) -> list[Match]:
    """Non-overlapping union: leftmost first, then longest, then the earlier list."""
    if not second:
        return first
    ranked = sorted(
        [(m.start, m.start - m.end, n, m) for n, ms in enumerate((first, second)) for m in ms],
        key=lambda t: t[:3],
    )
    out: list[Match] = []
    for _, _, _, m in ranked:
        if not out or m.start >= out[-1].end:
            out.append(m)
    return out


def _to_char_offsets(data: bytes, found: list[Match]) -> list[Match]:
    out: list[Match] = []
    byte_pos = char_pos = 0
    for m in found:
        char_pos += len(data[byte_pos : m.start].decode("utf-8", "surrogatepass"))
        byte_pos = m.start
        length = len(data[m.start : m.end].decode("utf-8", "surrogatepass"))
        out.append(Match(char_pos, char_pos + length, m.rule, m.detector))
    return out
