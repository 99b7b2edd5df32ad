"""Masking: what a caller never sees in clear text, for PostgreSQL values and JSON/text bodies.

Pure and synchronous. A ``MaskingEngine`` is built once per ``ProxyConfig`` and hands each
authenticated caller a ``Masker`` holding only the rules of the policies that caller is not exempt
from (exemption is per policy). Everything a hot path needs is precompiled: the detector
``Scanner`` per set of active policies, column globs, JSON paths, and per result set a
``ColumnPlan`` whose ``apply`` is the only thing the PostgreSQL proxy runs per DataRow.

Strategies: ``redact`` writes the fixed marker ``[REDACTED]`` (unmistakably the gateway's, unlike
``***`` which could be data); ``partial`` masks all but the last ``keepLast`` letters and digits,
keeping punctuation; ``hash`` is a keyed HMAC-SHA256, ``h:`` + 16 hex (stable and joinable across
queries, not reversible without the key); ``null`` is SQL NULL / JSON null.

Typing rule, fail closed: a mask is text, so a value whose wire type is not text-like (int8,
numeric, timestamp, arrays under a column rule, ...) cannot carry one and becomes NULL, which is
valid for every type. Where two rules match the same value the strictest strategy wins
(null > redact > hash > partial).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from types import MappingProxyType
from typing import Any

from .config import MaskingPolicy, MaskingRule
from .detectors import Match, Scanner
from .policy import Caller, who_matches

__all__ = [
    "HASH_PREFIX",
    "JSON_OIDS",
    "REDACTED",
    "STRICTNESS",
    "TEXT_LIKE_OIDS",
    "ColumnOrigin",
    "ColumnPlan",
    "Masker",
    "MaskingEngine",
    "MaskingError",
    "apply_strategy",
    "compile_json_path",
    "hash_value",
    "partial",
    "strictest",
]

REDACTED = "[REDACTED]"
HASH_PREFIX = "h:"
HASH_HEX = 16
MIN_HMAC_KEY = 16
STRICTNESS: Mapping[str, int] = MappingProxyType({"partial": 0, "hash": 1, "redact": 2, "null": 3})

# text 25, varchar 1043, bpchar 1042, name 19, "char" 18, unknown 705, json 114, jsonb 3802.
TEXT_LIKE_OIDS: frozenset[int] = frozenset({25, 1043, 1042, 19, 18, 705, 114, 3802})
JSON_OIDS: frozenset[int] = frozenset({114, 3802})
JSONB_OID = 3802
# Types created in a database (citext, enums) get OIDs from here on; their binary form is, for the
# ones that hold text, the text itself, so they are treated as text-like.
FIRST_USER_OID = 16384
_INT_DIGITS: Mapping[int, int] = MappingProxyType({21: 5, 23: 10, 20: 19})  # int2, int4, int8: most digits
_INT_OIDS: frozenset[int] = frozenset(_INT_DIGITS)
_NUMERIC_OID = 1700
# Arrays of text-like elements: text[], varchar[], bpchar[], name[], "char"[], json[], jsonb[].
_TEXT_ARRAY_OIDS: frozenset[int] = frozenset({1009, 1015, 1014, 1003, 1002, 199, 3807})
# Types whose text form cannot hold anything a detector looks for: not scanned at all.
_UNSCANNED_OIDS: frozenset[int] = frozenset(
    {16, 17, 26, 700, 701, 1082, 1083, 1114, 1184, 1186, 1266, 2950, 3220}
)

Counts = dict[str, int]
_NO_COUNTS: Mapping[str, int] = MappingProxyType({})
_UNKNOWN_ORIGIN = MaskingRule(name="unknown-origin", strategy="redact")
_MAX_TRANSITIONS = 4096  # cached JSON path transitions per Masker
_MAX_CLEAN_KEYS = 4096  # cached JSON keys with no finding per Masker
_MAX_CACHED_KEY = 128


_ASCII_ALNUM = frozenset(c for c in range(128) if chr(c).isalnum())
_ASCII_NOT_ALNUM = bytes(c for c in range(256) if c not in _ASCII_ALNUM)
_ASCII_STARS = bytes(42 if c in _ASCII_ALNUM else c for c in range(256))  # b"*"


class MaskingError(ValueError):
    """A masking policy that cannot be enforced (bad column glob, JSON path, missing HMAC key)."""


class _NullValue(Exception):
    """Internal: a ``null``-strategy detector hit inside a value that must then become NULL."""


# --------------------------------------------------------------------------- strategies


def partial(value: str, keep_last: int) -> str:
    """Letters and digits become ``*`` except the last ``keep_last``; punctuation stays.

    A value with no more than ``keep_last`` letters and digits is masked completely: showing "the
    last four" of a four-digit PIN would show all of it.
    """
    if value.isascii():  # the usual case, at C speed: count, then mask all before the kept tail
        data = value.encode()
        alnum = len(data.translate(None, _ASCII_NOT_ALNUM))
        cut, kept = len(data), 0
        while kept < keep_last and alnum > keep_last:
            cut -= 1
            kept += data[cut] in _ASCII_ALNUM
        return (data[:cut].translate(_ASCII_STARS) + data[cut:]).decode()
    alnum = sum(ch.isalnum() for ch in value)
    keep = keep_last if alnum > keep_last else 0
    out, masked_budget = [], alnum - keep
    for ch in value:
        if ch.isalnum() and masked_budget > 0:
            out.append("*")
            masked_budget -= 1
        else:
            out.append(ch)
    return "".join(out)


def hash_value(value: str, key: bytes) -> str:
    """Keyed, so nobody without the key can hash a guess and compare."""
    digest = hmac.new(key, value.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
    return HASH_PREFIX + digest[:HASH_HEX]


def apply_strategy(rule: MaskingRule, value: str, key: bytes) -> str | None:
    """One value through one rule's strategy; ``None`` is NULL."""
    if rule.strategy == "null":
        return None
    if rule.strategy == "partial":
        return partial(value, rule.keep_last if rule.keep_last is not None else 4)
    if rule.strategy == "hash":
        return hash_value(value, key)
    return REDACTED


def strictest(rules: Iterable[MaskingRule | None]) -> MaskingRule | None:
    """The rule revealing least; on a tie the first one."""
    best: MaskingRule | None = None
    for rule in rules:
        if rule is not None and (best is None or STRICTNESS[rule.strategy] > STRICTNESS[best.strategy]):
            best = rule
    return best


def _bump(counts: Counts, rule: MaskingRule, n: int = 1) -> None:
    counts[rule.name] = counts.get(rule.name, 0) + n


# --------------------------------------------------------------------------- column globs


@dataclass(frozen=True)
class _ColumnGlob:
    """``column``, ``table.column`` or ``schema.table.column``; ``*`` anywhere; case-insensitive."""

    parts: tuple[str, ...]
    rule: MaskingRule

    @classmethod
    def parse(cls, pattern: str, rule: MaskingRule) -> _ColumnGlob:
        parts = tuple(pattern.lower().split("."))
        if not 1 <= len(parts) <= 3 or not all(parts):
            raise MaskingError(
                f"rule {rule.name}: column {pattern!r} must be column, table.column or schema.table.column"
            )
        return cls(parts, rule)

    def matches(self, schema: str | None, table: str | None, column: str | None) -> bool:
        # An unknown component (None) matches: the caller could not tell, so assume the worst.
        values = (schema, table, column)[3 - len(self.parts) :]
        return all(v is None or fnmatchcase(v.lower(), p) for p, v in zip(self.parts, values, strict=True))

    def matches_table(self, qualified: str, columns: Sequence[str] | None) -> bool:
        names = qualified.lower().split(".")
        table, schema = names[-1], (names[-2] if len(names) > 1 else None)
        if len(self.parts) >= 2 and not self.matches(schema, table, None):
            return False
        if columns is None:
            return True
        col = self.parts[-1]
        return any(c == "*" or fnmatchcase(c.lower().rsplit(".", 1)[-1], col) for c in columns)


# --------------------------------------------------------------------------- JSON paths


@dataclass(frozen=True)
class _Step:
    kind: str  # "key" | "index" | "any"
    key: str | int | None = None
    descendant: bool = False  # ``..``: at any depth below

    def accepts(self, key: str | int, length: int) -> bool:
        if self.kind == "any":
            return True
        if self.kind == "index":
            if not isinstance(key, int) or not isinstance(self.key, int):
                return False
            return key == (self.key if self.key >= 0 else length + self.key)
        return self.key == key


def compile_json_path(path: str) -> tuple[_Step, ...]:
    """The JSONPath subset rules use: ``$.a.b``, ``$.a[*].b``, ``$..email``, ``$.items[0].x``,
    ``$['odd key']``, ``.*``; a leading ``$`` is optional (``customer.email``)."""
    s = path.strip()
    i = 1 if s.startswith("$") else 0
    if i == 0 and s and s[0] not in ".[":
        s, i = "." + s, 0
    steps: list[_Step] = []

    def fail(why: str) -> MaskingError:
        return MaskingError(f"JSON path {path!r}: {why}")

    while i < len(s):
        descendant = False
        if s.startswith("..", i):
            descendant, i = True, i + 2
        elif s[i] == ".":
            i += 1
        elif s[i] != "[":
            raise fail(f"unexpected {s[i]!r} at {i}")
        if i < len(s) and s[i] == "[":
            close = s.find("]", i)
            if close < 0:
                raise fail("unclosed [")
            inner = s[i + 1 : close].strip()
            i = close + 1
            if inner == "*":
                steps.append(_Step("any", None, descendant))
            elif len(inner) >= 2 and inner[0] == inner[-1] and inner[0] in "'\"":
                steps.append(_Step("key", inner[1:-1], descendant))
            else:
                try:
                    steps.append(_Step("index", int(inner), descendant))
                except ValueError:
                    raise fail(f"bad index [{inner}]") from None
            continue
        j = i
        while j < len(s) and s[j] not in ".[":
            j += 1
        name = s[i:j]
        if not name:
            raise fail(f"empty name at {i}")
        steps.append(_Step("any", None, descendant) if name == "*" else _Step("key", name, descendant))
        i = j
    return tuple(steps)


@dataclass(frozen=True)
class _JsonPath:
    steps: tuple[_Step, ...]
    rule: MaskingRule


_State = tuple[int, int]  # (path index, steps matched so far)


# --------------------------------------------------------------------------- column origins


@dataclass(frozen=True)
class ColumnOrigin:
    """One RowDescription field; the PG proxy fills schema/table/column from the catalog (views
    resolved to their base columns), leaving them None when the origin is unknown."""

    name: str
    table_oid: int = 0
    attnum: int = 0
    type_oid: int = 25
    format: int = 0  # 0 text, 1 binary
    schema: str | None = None
    table: str | None = None
    column: str | None = None

    @property
    def known(self) -> bool:
        return self.table_oid != 0 and self.table is not None and self.column is not None


_Action = Callable[[bytes, Counts], "bytes | None"]


class ColumnPlan:
    """Per result set: the masking action of each column, computed once from the RowDescription.

    Columns whose values are scanned as they are (text, and the text form of other types) go to
    the scanner together (``Scanner.scan_chunks``: one joined pass for a wide row); the others
    (column rules, JSON, binary numbers and arrays) have an action of their own."""

    def __init__(self, masker: Masker, columns: Sequence[ColumnOrigin], rules: Sequence[MaskingRule | None]):
        self._masker = masker
        self.columns = tuple(columns)
        self.rules = tuple(rules)  # the rule masking each whole column (None: only detectors)
        actions: list[tuple[int, _Action]] = []
        scanned: list[tuple[int, bool]] = []
        for i, (col, rule) in enumerate(zip(self.columns, self.rules, strict=True)):
            kind = masker._raw_scan(col.type_oid, col.format) if rule is None else None
            if kind is not None:
                scanned.append((i, kind))
            elif (action := masker._column_action(col, rule)) is not None:
                actions.append((i, action))
        self._actions = tuple(actions)
        self._scanned = tuple(scanned)
        self._lane_filter: bytes | None = None
        self._lane_filter_known = False

    @property
    def active(self) -> bool:
        """False: every value passes unchanged, the proxy may forward DataRows as they are."""
        return bool(self._actions or self._scanned)

    def lane_filter(self) -> bytes | None:
        """What the native lane needs to relay this result's rows itself, checking each one:
        the columns the detectors scan and their conditions (``Scanner.lane_conditions``), as
        ``!H`` column count, a flag byte per column, the fewest digits, the substring count, then
        each substring after its length byte. None when a row needs Python whatever its values
        (a column rule or other action, a custom pattern)."""
        if not self._lane_filter_known:
            self._lane_filter_known = True
            conditions = self._masker._scanner.lane_conditions() if self._scanned and not self._actions else None
            if conditions is not None:
                digits, subs = conditions
                flags = bytearray(len(self.columns))
                for i, _typed in self._scanned:
                    flags[i] = 1
                self._lane_filter = (struct.pack("!H", len(flags)) + bytes(flags)
                                     + bytes((digits, len(subs))) + b"".join(bytes((len(x),)) + x for x in subs))
        return self._lane_filter

    def with_formats(self, formats: Sequence[int]) -> ColumnPlan:
        """The same plan for Bind's result format codes (none: all text; one: for all; or each)."""
        if not formats:
            codes = [0] * len(self.columns)
        elif len(formats) == 1:
            codes = [formats[0]] * len(self.columns)
        elif len(formats) == len(self.columns):
            codes = list(formats)
        else:
            raise MaskingError(f"{len(formats)} format codes for {len(self.columns)} columns")
        cols = [replace(c, format=f) for c, f in zip(self.columns, codes, strict=True)]
        return ColumnPlan(self._masker, cols, self.rules)

    def apply(self, values: Sequence[bytes | None]) -> tuple[list[bytes | None], Mapping[str, int]]:
        """One DataRow: masked values (None is NULL) and per-rule counts of what was masked."""
        if not self.active:
            return list(values), _NO_COUNTS
        (masked,), counts = self.apply_rows([values])
        return (list(values) if masked is None else masked), counts

    def apply_rows(
        self, rows: Sequence[Sequence[bytes | None]]
    ) -> tuple[list[list[bytes | None] | None], Mapping[str, int]]:
        """Several DataRows of one result: each one's masked values, or None where nothing in it
        changed (the frame can go out as it came), and the per-rule counts of them all.

        The detectors get every row's scanned values in one ``scan_chunks`` call: many values
        make one joined pass, and only those it finds something in are scanned again alone."""
        width = len(self.columns)
        out: list[list[bytes | None] | None] = [None] * len(rows)
        counts: Counts = {}
        chunks: list[bytes] = []
        where: list[tuple[int, int, bool]] = []  # (row, column, typed) of each chunk
        for r, values in enumerate(rows):
            if len(values) != width:
                raise MaskingError(f"DataRow has {len(values)} values for {width} columns")
            for i, action in self._actions:
                raw = values[i]
                if raw is not None and (masked := action(raw, counts)) is not raw:
                    row = out[r]
                    if row is None:
                        row = out[r] = list(values)
                    row[i] = masked
            for i, typed in self._scanned:  # never a column with an action of its own
                raw = values[i]
                if raw is not None:
                    chunks.append(raw)
                    where.append((r, i, typed))
        if chunks:
            for j, found in self._masker._scanner.scan_chunks(chunks).items():
                r, i, typed = where[j]
                masked = self._masker._masked_value(chunks[j], found, counts)
                row = out[r]
                if row is None:
                    row = out[r] = list(rows[r])
                # a type that cannot carry the mask (int8 holding a card number) becomes NULL
                row[i] = None if typed and masked != chunks[j] else masked
        return out, (counts or _NO_COUNTS)


# --------------------------------------------------------------------------- the per-caller masker


class Masker:
    """The rules one caller is subject to, compiled; ``active`` False means mask nothing."""

    def __init__(self, rules: Sequence[MaskingRule], hmac_key: bytes) -> None:
        # Strictest first: a detector listed by two rules belongs to the stricter one. Rule names
        # repeat across policies, so the scanner knows each rule by its position.
        self.rules = tuple(sorted(rules, key=lambda r: -STRICTNESS[r.strategy]))
        self._key = hmac_key
        self._by_id = {f"{i}:{r.name}": r for i, r in enumerate(self.rules)}
        self._scanner = Scanner((rid, r.detectors, r.pattern) for rid, r in self._by_id.items())
        self._scans = not self._scanner.empty
        self._columns = tuple(_ColumnGlob.parse(c, r) for r in self.rules for c in r.columns)
        self._paths = tuple(_JsonPath(compile_json_path(f), r) for r in self.rules for f in r.fields)
        # JSON walks: sets of path states by number, and bounded caches of pure functions, (state
        # set, key) -> (rule masking the value, state set below) and the keys detectors find nothing in
        self._state_sets: list[tuple[_State, ...]] = [()]
        self._state_ids: dict[tuple[_State, ...], int] = {(): 0}
        self._roots = self._state_set(tuple((i, 0) for i in range(len(self._paths))))
        self._transitions: dict[tuple[int, str | int], tuple[MaskingRule | None, int]] = {}
        self._clean_keys: set[str] = set()

    @property
    def active(self) -> bool:
        return bool(self.rules)

    # ---------------------------------------------------------------- column rules

    def column_rule(self, schema: str | None, table: str, column: str) -> MaskingRule | None:
        """The rule masking this source column, if any (strictest of those matching)."""
        return strictest(g.rule for g in self._columns if g.matches(schema, table, column))

    def touches_masked(
        self, tables: Iterable[str], columns: Iterable[str] | None = None
    ) -> MaskingRule | None:
        """Whether a statement reading ``tables`` (and ``columns``, when known) reads a masked
        column: the strictest such rule, for columns of unknown origin in its results."""
        cols = None if columns is None else tuple(columns)
        return strictest(g.rule for t in tables for g in self._columns if g.matches_table(t, cols))

    def plan_columns(
        self, columns: Sequence[ColumnOrigin], query_reads_masked: MaskingRule | bool | None = False
    ) -> ColumnPlan:
        """The plan for one RowDescription. ``query_reads_masked`` (``touches_masked``'s answer,
        or True for the default redact) makes columns of unknown origin fail closed."""
        fallback: MaskingRule | None = None
        if isinstance(query_reads_masked, MaskingRule):
            fallback = query_reads_masked
        elif query_reads_masked:
            fallback = _UNKNOWN_ORIGIN
        rules = [
            self.column_rule(c.schema, c.table or "", c.column or "") if c.known else fallback
            for c in columns
        ]
        return ColumnPlan(self, columns, rules)

    def _column_action(self, col: ColumnOrigin, rule: MaskingRule | None) -> _Action | None:
        if rule is not None:
            oid, fmt = col.type_oid, col.format

            def masked(raw: bytes, counts: Counts) -> bytes | None:
                _bump(counts, rule)
                return self._mask_typed(rule, oid, fmt, raw)

            return masked
        if not self._scans:
            return None
        return self._scanner_for(col.type_oid, col.format)

    # ---------------------------------------------------------------- values

    def mask_column_value(self, rule: MaskingRule, value: str) -> str | None:
        """A text value of a masked column; None is SQL NULL (strategy null)."""
        return apply_strategy(rule, value, self._key)

    def mask_binary(self, rule: MaskingRule, type_oid: int, raw: bytes) -> bytes | None:
        """A binary-format value of a masked column, still valid for its wire type: text-like types
        get the masked UTF-8 (jsonb with its version byte), any other type NULL (fail closed)."""
        return self._mask_typed(rule, type_oid, 1, raw)

    def _mask_typed(self, rule: MaskingRule, oid: int, fmt: int, raw: bytes) -> bytes | None:
        if rule.strategy == "null" or not _text_like(oid):
            return None
        jsonb = fmt == 1 and oid == JSONB_OID
        if jsonb:
            raw = raw[1:]
        masked = apply_strategy(rule, raw.decode("utf-8", "replace"), self._key)
        if masked is None:
            return None
        if oid in JSON_OIDS:
            masked = json.dumps(masked)
        return (b"\x01" if jsonb else b"") + masked.encode()

    def mask_text(self, value: str) -> tuple[str, Counts]:
        """Detectors and custom patterns over free text (a null-strategy hit becomes the marker:
        part of a string cannot be NULL)."""
        counts: Counts = {}
        if not self._scans:
            return value, counts
        data = value.encode("utf-8", "surrogatepass")
        out = self._replace(data, self._scanner.scan_bytes(data), counts, null_ok=False)
        return (value if out is data else out.decode("utf-8", "surrogatepass")), counts

    def _replace(self, data: bytes, found: list[Match], counts: Counts, *, null_ok: bool) -> bytes:
        """Masks each finding in place; raises ``_NullValue`` on a null-strategy hit if allowed."""
        if not found:
            return data
        parts, last = [], 0
        for m in found:
            rule = self._by_id[m.rule]
            _bump(counts, rule)
            if rule.strategy == "null" and null_ok:
                raise _NullValue
            text = data[m.start : m.end].decode("utf-8", "replace")
            parts += [data[last : m.start], (apply_strategy(rule, text, self._key) or REDACTED).encode()]
            last = m.end
        parts.append(data[last:])
        return b"".join(parts)

    def _scan_value(self, data: bytes, counts: Counts) -> bytes | None:
        """A text value with detector hits masked inside; None when a hit's strategy is null."""
        return self._masked_value(data, self._scanner.scan_bytes(data), counts)

    def _masked_value(self, data: bytes, found: list[Match], counts: Counts) -> bytes | None:
        try:
            return self._replace(data, found, counts, null_ok=True)
        except _NullValue:
            return None

    def _raw_scan(self, oid: int, fmt: int) -> bool | None:
        """For a column scanned byte for byte: whether a hit makes it NULL (its type cannot carry
        a mask); None when its values are not scanned as they are (or not at all)."""
        if not self._scans or oid in JSON_OIDS or not self._integers_scanned(oid):
            return None
        if fmt == 0:
            if oid in _UNSCANNED_OIDS:
                return None
            return not (_text_like(oid) or oid in _TEXT_ARRAY_OIDS)
        return False if _text_like(oid) else None

    def _integers_scanned(self, oid: int) -> bool:
        digits = _INT_DIGITS.get(oid)
        return digits is None or self._scanner.matches_integers(digits)

    def _scanner_for(self, oid: int, fmt: int) -> _Action | None:
        """How detectors reach a column's values, or None when they cannot hold a finding."""
        if oid in JSON_OIDS:
            binary = fmt == 1 and oid == JSONB_OID
            return lambda raw, counts: self._scan_json_value(raw, counts, binary=binary)
        typed = self._raw_scan(oid, fmt)
        if typed is False:
            return self._scan_value
        if typed:
            # int8 holding a card number: a hit cannot be written into the type, so NULL.
            return lambda raw, counts: raw if self._scan_value(raw, counts) == raw else None
        if fmt == 0:
            return None
        if (oid in _INT_OIDS and self._integers_scanned(oid)) or oid == _NUMERIC_OID:
            return lambda raw, counts: self._scan_number(oid, raw, counts)
        if oid in _TEXT_ARRAY_OIDS:
            return self._scan_array
        return None

    def _scan_number(self, oid: int, raw: bytes, counts: Counts) -> bytes | None:
        text = _binary_number_text(oid, raw)
        if text is None:
            return raw
        data = text.encode()
        return raw if self._scan_value(data, counts) == data else None

    def _scan_json_value(self, raw: bytes, counts: Counts, *, binary: bool) -> bytes | None:
        body = raw[1:] if binary else raw
        try:
            doc = json.loads(body)
        except ValueError:
            return self._scan_value(raw, counts) if not binary else _prefix(self._scan_value(body, counts))
        before = sum(counts.values())
        masked = self._mask_doc(doc, 0, counts)
        if sum(counts.values()) == before:
            return raw
        text = json.dumps(masked, ensure_ascii=False).encode()
        return b"\x01" + text if binary else text

    def _scan_array(self, raw: bytes, counts: Counts) -> bytes | None:
        """Binary arrays of text-like elements: each element scanned, NULL elements allowed."""
        try:
            ndim, _flags, elem = struct.unpack_from("!iiI", raw)
            pos = 12 + 8 * ndim
            header = bytearray(raw[:pos])
            elems: list[bytes | None] = []
            while pos < len(raw):
                (n,) = struct.unpack_from("!i", raw, pos)
                pos += 4
                if n < 0:
                    elems.append(None)
                    continue
                elems.append(raw[pos : pos + n])
                pos += n
        except struct.error:
            return None  # malformed: nothing to trust, nothing to show
        action = self._scanner_for(elem, 1)
        if action is None:
            return raw
        masked = [None if e is None else action(e, counts) for e in elems]
        if masked == elems:
            return raw
        if any(e is None for e in masked):
            header[4:8] = struct.pack("!i", 1)
        body = b"".join(struct.pack("!i", -1) if e is None else struct.pack("!i", len(e)) + e for e in masked)
        return bytes(header) + body

    # ---------------------------------------------------------------- JSON

    def mask_json(self, doc: Any) -> tuple[Any, Counts]:
        """A decoded JSON document with rule ``fields`` masked and detectors run on every string
        (and number: card numbers are sometimes sent as numbers) and every key. Returns a copy;
        ``doc`` is left as it is."""
        counts: Counts = {}
        if not self._paths and not self._scans:
            return doc, counts
        if any(not p.steps for p in self._paths):  # "$": the whole document
            rule = strictest(p.rule for p in self._paths if not p.steps)
            assert rule is not None
            _bump(counts, rule)
            return self._json_masked(rule, doc), counts
        return self._mask_doc(doc, self._roots, counts), counts

    def _mask_doc(self, doc: Any, states: int, counts: Counts) -> Any:
        """One walk copies the document, masking what field rules match and collecting every
        string, number and key; then ONE scan over all of them together (``scan_texts``) tells
        which to mask, and only those are rewritten in the copy."""
        box: list[Any] = [None]
        walk = _Walk(self._scans)
        self._copy(box, 0, doc, states, counts, walk)
        texts, values = walk.texts, len(walk.values)
        if walk.keys:
            texts += [k for _, k in walk.keys]
        if not texts:
            return box[0]
        found = self._scanner.scan_texts(texts)
        if walk.keys:  # keys seen for the first time: remember the clean ones
            fresh = [k for i, (_, k) in enumerate(walk.keys, values) if i not in found and len(k) <= _MAX_CACHED_KEY]
            if len(self._clean_keys) + len(fresh) > _MAX_CLEAN_KEYS:
                self._clean_keys.clear()
            self._clean_keys.update(fresh)
        renames: dict[int, tuple[dict[str, Any], dict[str, str]]] = {}
        for i, matches in sorted(found.items()):
            data = texts[i].encode("utf-8", "surrogatepass")
            if i < values:
                container, slot = walk.values[i]
                masked = self._masked_value(data, matches, counts)
                container[slot] = None if masked is None else masked.decode("utf-8", "surrogatepass")
                continue
            obj, key = walk.keys[i - values]
            new_key = self._replace(data, matches, counts, null_ok=False).decode("utf-8", "surrogatepass")
            renames.setdefault(id(obj), (obj, {}))[1][key] = new_key
        for obj, names in renames.values():  # in place, keeping the order (last one wins)
            items = list(obj.items())
            obj.clear()
            for key, value in items:
                obj[names.get(key, key)] = value
        return box[0]

    def _copy(self, out: Any, slot: str | int, node: Any, states: int, counts: Counts, walk: _Walk) -> None:
        """``out[slot]`` = a copy of ``node`` with field rules applied; scannable leaves noted.

        The hot loop of JSON masking: one call per container (copied at C speed, then only its
        containers and masked values replaced), scalars inline, path transitions and keys
        already known to be clean looked up in caches."""
        scans = walk.scans
        if isinstance(node, dict):
            pairs: Iterable[tuple[Any, Any]] = node.items()
            copy: Any = dict(node)
            new_keys = walk.keys if scans else None
        elif isinstance(node, list):
            pairs = enumerate(node)
            copy = list(node)
            new_keys = None
        else:
            out[slot] = node
            if scans and _scannable(node):
                walk.leaf(out, slot, node)
            return
        out[slot] = copy
        length = len(node)
        transitions, clean = self._transitions, self._clean_keys
        values, texts = walk.values, walk.texts
        for key, value in pairs:
            if new_keys is not None and key not in clean:
                new_keys.append((copy, key))
            nxt = states
            if states:
                hit, nxt = transitions.get((states, key)) or self._transition(states, key, length)
                if hit is not None:
                    _bump(counts, hit)
                    copy[key] = self._json_masked(hit, value)
                    continue
            kind = type(value)
            if kind is str:
                if scans:
                    values.append((copy, key))
                    texts.append(value)
            elif kind is int or kind is float:
                if scans:
                    values.append((copy, key))
                    texts.append(str(value))
            elif kind is not bool and value is not None:  # containers, and the unusual
                self._copy(copy, key, value, nxt, counts, walk)

    def _transition(self, states: int, key: str | int, length: int) -> tuple[MaskingRule | None, int]:
        """Where the field paths go below ``key``: the rule masking its value, or the state set
        for its children. The same keys recur in every document, so the answer is cached (not
        for list indexes a negative index step depends on, nor for long keys)."""
        nxt: list[_State] = []
        hit: MaskingRule | None = None
        depends_on_length = False
        for pi, si in self._state_sets[states]:
            path = self._paths[pi]
            step = path.steps[si]
            depends_on_length |= step.kind == "index" and isinstance(step.key, int) and step.key < 0
            if step.descendant:
                nxt.append((pi, si))
            if step.accepts(key, length):
                if si + 1 == len(path.steps):
                    hit = strictest((hit, path.rule))
                else:
                    nxt.append((pi, si + 1))
        result = (hit, self._state_set(tuple(dict.fromkeys(nxt))))
        if not depends_on_length and (isinstance(key, int) or len(key) <= _MAX_CACHED_KEY):
            if len(self._transitions) >= _MAX_TRANSITIONS:
                self._transitions.clear()
            self._transitions[(states, key)] = result
        return result

    def _state_set(self, states: tuple[_State, ...]) -> int:
        """A set of path states by number (0: none); finitely many, all derived from the paths."""
        sid = self._state_ids.get(states)
        if sid is None:
            sid = self._state_ids[states] = len(self._state_sets)
            self._state_sets.append(states)
        return sid

    def _json_masked(self, rule: MaskingRule, value: Any) -> Any:
        if isinstance(value, str):
            text = value
        elif isinstance(value, dict | list):
            text = json.dumps(value, sort_keys=True, separators=(",", ":"))
        else:
            text = json.dumps(value)
        return apply_strategy(rule, text, self._key)


class _Walk:
    """What one walk over a JSON document collects for the scan: value slots, then keys."""

    __slots__ = ("keys", "scans", "texts", "values")

    def __init__(self, scans: bool) -> None:
        self.scans = scans
        self.values: list[tuple[Any, str | int]] = []  # (container in the copy, key or index)
        self.texts: list[str] = []  # the values' texts; the keys' are appended before the scan
        self.keys: list[tuple[dict[str, Any], str]] = []  # keys not known to be clean

    def leaf(self, container: Any, slot: str | int, value: Any) -> None:
        self.values.append((container, slot))
        self.texts.append(value if isinstance(value, str) else str(value))


def _scannable(node: Any) -> bool:
    """Strings and numbers (card numbers are sometimes sent as numbers), not booleans or null."""
    return isinstance(node, _SCANNABLE) and not isinstance(node, bool)


_SCANNABLE = (str, int, float)


def _text_like(oid: int) -> bool:
    return oid in TEXT_LIKE_OIDS or oid >= FIRST_USER_OID


def _prefix(value: bytes | None) -> bytes | None:
    return None if value is None else b"\x01" + value


def _binary_number_text(oid: int, raw: bytes) -> str | None:
    """The integer digits of a binary int2/int4/int8/numeric (what a card detector needs)."""
    if oid in _INT_OIDS:
        return str(int.from_bytes(raw, "big", signed=True)) if len(raw) in (2, 4, 8) else None
    try:
        ndigits, weight, sign, _dscale = struct.unpack_from("!hhHH", raw)
        digits = struct.unpack_from(f"!{ndigits}H", raw, 8)
    except struct.error:
        return None
    if sign not in (0x0000, 0x4000) or weight < 0:
        return "0" if sign in (0x0000, 0x4000) else None
    groups = list(digits[: weight + 1]) + [0] * max(0, weight + 1 - ndigits)
    return ("-" if sign == 0x4000 else "") + str(groups[0]) + "".join(f"{g:04d}" for g in groups[1:])


# --------------------------------------------------------------------------- the engine


class MaskingEngine:
    """All MaskingPolicies of one proxy, compiled once; ``for_caller`` is cheap and cached per set
    of policies a caller is subject to."""

    def __init__(self, policies: Sequence[MaskingPolicy], hmac_key: bytes) -> None:
        self.policies = tuple(policies)
        self.hmac_key = hmac_key
        self._maskers: dict[tuple[bool, ...], Masker] = {}
        hashing = [r.name for p in self.policies for r in p.rules if r.strategy == "hash"]
        if hashing and len(self.hmac_key) < MIN_HMAC_KEY:
            raise MaskingError(
                f"rules {', '.join(hashing)} use strategy hash: an HMAC key of at least "
                f"{MIN_HMAC_KEY} bytes is required"
            )
        self._masker(tuple(True for _ in self.policies))  # every glob, path and pattern checked now

    def for_caller(self, caller: Caller) -> Masker:
        """Exemption is per policy: exempt from policy A is still masked by policy B."""
        return self._masker(tuple(not who_matches(p.exempt, caller) for p in self.policies))

    def _masker(self, subject: tuple[bool, ...]) -> Masker:
        masker = self._maskers.get(subject)
        if masker is None:
            rules = [r for p, on in zip(self.policies, subject, strict=True) if on for r in p.rules]
            masker = self._maskers[subject] = Masker(rules, self.hmac_key)
        return masker
