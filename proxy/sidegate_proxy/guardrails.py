"""Guardrails: what a caller may run through a Connection, decided per statement or request.

A Connection's own rules are evaluated in order and the first match wins; the built-in rules
(``BUILTIN_GUARDRAILS``) come after them and cover what no gateway user should get by accident:
server files and programs, ``ALTER SYSTEM``, ``DROP DATABASE``, extensions, and anything the SQL
classifier does not understand. A Connection rule that *allows* something only overrides a
built-in rule when it names what that rule is about (``statements: [unknown]``, ``[copy_program]``
or the ``admin`` group, ``functions: [dblink*]``): a broad ``allow read`` never unlocks
``pg_read_file`` by accident.

Matching semantics:

* SQL: a rule matches a statement when its subjects/groups apply to the caller and every matcher
  it gives matches somewhere in that statement's parse tree (nested statements included), see
  ``sqlparse``. ``tables`` and ``functions`` are case-insensitive globs; a pattern without a dot
  matches the bare name (``customers`` matches ``public.customers``), a dotted pattern matches the
  qualified name, where an unqualified table counts as ``public.<name>`` and an unqualified
  function as ``pg_catalog.<name>``. A string of several statements gets the strictest decision
  of its statements (block > requireApproval > allow).
* HTTP: methods are compared upper-case; path globs are shell-style and ``*`` crosses ``/``
  (``/v1/*`` matches ``/v1/a/b``). Paths are matched after percent-decoding, collapsing ``//``
  and resolving ``.``/``..``; they stay case-sensitive. As what an upstream does with a path is
  not knowable (decode twice? strip ``;params``? treat ``\\`` as ``/``?), a path is checked in
  every plausible reading: a block or requireApproval rule matches if *any* reading matches, an
  allow rule only if *all* do. Body matchers address JSON fields (``amount``, ``$.a.b``,
  ``$.items[0].id``, ``$.items[*].id``, ``$..email``); a matcher hits when the field exists and, if
  values are given, one of them equals the field (numbers and numeric strings by value).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import unquote

from .config import ConfigError, Connection, Guardrail, HTTPMatch, SQLMatch
from .policy import Caller, Decision, glob_match, rule_applies
from .sqlparse import (
    COMMAND_GROUPS,
    DYNAMIC_SQL_FUNCTIONS,
    GROUPS,
    Classified,
    StatementInfo,
    StatementSet,
    classify,
    groups_of,
    resolve_execute,
)

__all__ = [
    "BUILTIN_GUARDRAILS",
    "KNOWN_STATEMENTS",
    "Guard",
    "SQLVerdict",
    "normalize_path",
    "path_readings",
]

KNOWN_STATEMENTS: frozenset[str] = frozenset(COMMAND_GROUPS) | GROUPS

SERVER_FUNCTIONS: tuple[str, ...] = (
    # server files
    "pg_read_file",
    "pg_read_binary_file",
    "pg_stat_file",
    "pg_ls_dir",
    "pg_ls_logdir",
    "pg_ls_waldir",
    "pg_ls_tmpdir",
    "pg_ls_archive_statusdir",
    "pg_ls_logicalsnapdir",
    "pg_ls_logicalmapdir",
    "pg_ls_replslotdir",
    "pg_file_write",
    "pg_file_rename",
    "pg_file_unlink",
    "pg_file_sync",
    "pg_logdir_ls",
    "lo_import",
    "lo_export",
    # other servers, and SQL the classifier cannot see
    "dblink*",
    # the server process itself
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_promote",
    "pg_terminate_backend",
)


def _builtin(name: str, **sql: Any) -> Guardrail:
    return Guardrail(name=name, action="block", sql=SQLMatch(**sql), builtin=True)


BUILTIN_GUARDRAILS: tuple[Guardrail, ...] = (
    _builtin("builtin-drop-database", statements=("drop_database",)),
    _builtin("builtin-alter-system", statements=("alter_system",)),
    _builtin("builtin-server-programs", statements=("copy_program",)),
    _builtin("builtin-server-files", statements=("copy_file", "tablespace")),
    _builtin("builtin-server-functions", functions=SERVER_FUNCTIONS),
    _builtin("builtin-load", statements=("load",)),
    # Extensions and untrusted languages run code in the server (dblink, file_fdw, plpython3u):
    # migrations that need one say so with an allow rule naming create_extension.
    _builtin("builtin-extensions", statements=("create_extension", "untrusted_language")),
    _builtin("builtin-remote-connections", statements=("subscription",)),
    _builtin("builtin-unknown", statements=("unknown",)),
    Guardrail(
        name="builtin-http-trace-connect",
        action="block",
        http=HTTPMatch(methods=("TRACE", "TRACK", "CONNECT")),
        builtin=True,
    ),
)

_SEVERITY: Mapping[str, int] = {"allow": 0, "requireApproval": 1, "block": 2}
_VERB: Mapping[str, str] = {"allow": "allowed", "block": "blocked", "requireApproval": "approval required"}


def _decision(rule: Guardrail, what: str) -> Decision:
    reason = f'{_VERB[rule.action]} by guardrail "{rule.name}": {what}'
    return Decision(rule.action, rule=rule.name, reason=reason)


# --------------------------------------------------------------------------- SQL


def _name_matches(patterns: Sequence[str], name: str, default_schema: str) -> bool:
    """Globs against a (possibly qualified) lower-case name, see the module docstring."""
    bare = name.rsplit(".", 1)[-1]
    qualified = name if "." in name else f"{default_schema}.{name}"
    two_part = ".".join(qualified.split(".")[-2:])
    for pattern in patterns:
        if "." in pattern:
            if glob_match(pattern, qualified) or glob_match(pattern, two_part):
                return True
        elif glob_match(pattern, bare):
            return True
    return False


@dataclass(frozen=True)
class _SQLRule:
    rule: Guardrail
    names: frozenset[str] = frozenset()
    tables: tuple[str, ...] = ()
    functions: tuple[str, ...] = ()
    without_where: bool = False

    @classmethod
    def compile(cls, rule: Guardrail, path: str) -> _SQLRule:
        match = rule.sql or SQLMatch()
        for j, name in enumerate(match.statements):
            if name.lower() not in KNOWN_STATEMENTS:
                raise ConfigError(
                    f"{path}.sql.statements[{j}]",
                    f"unknown statement class {name!r} (known: {', '.join(sorted(KNOWN_STATEMENTS))})",
                )
        return cls(
            rule=rule,
            names=frozenset(n.lower() for n in match.statements),
            tables=tuple(t.lower() for t in match.tables),
            functions=tuple(f.lower() for f in match.functions),
            without_where=match.without_where,
        )

    def named(self, st: StatementInfo) -> frozenset[str]:
        """The commands and groups of ``st`` this rule's ``statements`` names."""
        return self.names & (st.commands | st.groups)

    def matches(self, st: StatementInfo) -> bool:
        if self.names and not self.named(st):
            return False
        if self.without_where:
            bulk = st.writes_without_where
            if self.names:
                bulk = frozenset(c for c in bulk if c in self.names or COMMAND_GROUPS[c] & self.names)
            if not bulk:
                return False
        if self.tables and not any(_name_matches(self.tables, t, "public") for t in st.tables):
            return False
        return not self.functions or any(_name_matches(self.functions, f, "pg_catalog") for f in st.functions)

    def covers(self, builtin: _SQLRule, st: StatementInfo) -> bool:
        """Whether this (allow) rule names what the built-in rule matched in ``st``."""
        matched = builtin.named(st)
        sources = matched | groups_of(m for m in matched if m in COMMAND_GROUPS)
        sources |= {c for c in st.commands if COMMAND_GROUPS.get(c, frozenset()) & matched}
        if self.names & sources:
            return True
        if not self.functions:
            return False
        for f in st.functions:
            flagged = builtin.functions and _name_matches(builtin.functions, f, "pg_catalog")
            dynamic = "unknown" in matched and f.rsplit(".", 1)[-1] in DYNAMIC_SQL_FUNCTIONS
            if (flagged or dynamic) and _name_matches(self.functions, f, "pg_catalog"):
                return True
        return False

    def describe(self, st: StatementInfo) -> str:
        if st.commands == {"unknown"}:
            return "a statement that could not be classified"
        commands = sorted(
            c for c in st.commands
            if not self.names or c in self.names or COMMAND_GROUPS.get(c, frozenset()) & self.names
        ) or sorted(st.commands)
        what = ", ".join(c.upper().replace("_", " ") for c in commands if c != "unknown") or "UNKNOWN"
        if self.without_where:
            what += " without WHERE"
        if self.tables:
            hits = sorted(t for t in st.tables if _name_matches(self.tables, t, "public"))
            what += " on " + ", ".join(hits)
        if self.functions:
            hits = sorted(f for f in st.functions if _name_matches(self.functions, f, "pg_catalog"))
            what += " calling " + ", ".join(hits)
        return what


@dataclass(frozen=True)
class SQLVerdict(StatementSet):
    """A query string's decision, and what it was found to do (for the audit record)."""

    decision: Decision
    classified: Classified
    statements: tuple[StatementInfo, ...] = ()  # EXECUTE resolved against the session's PREPAREs
    statement: StatementInfo | None = None  # the one that decided


# --------------------------------------------------------------------------- HTTP


_BODY_TOKEN = re.compile(r"\.\.([^.\[\]]+)|\.([^.\[\]]+)|\[(\d+|\*)\]|\[(?:'([^']*)'|\"([^\"]*)\")\]")
_RECURSE = object()  # marker: the next key is searched at any depth ($..email)
_Step = tuple[object, str | int]


def _compile_body_path(path: str, where: str) -> tuple[_Step, ...]:
    text = path.strip()
    text = text[1:] if text.startswith("$") else text
    if text and text[0] not in ".[":
        text = "." + text
    steps: list[_Step] = []
    pos = 0
    while pos < len(text):
        m = _BODY_TOKEN.match(text, pos)
        if m is None:
            raise ConfigError(where, f"cannot parse JSON path {path!r} at {text[pos:]!r}")
        recursive, key, index, quoted1, quoted2 = m.groups()
        if recursive is not None:
            steps.append((_RECURSE, recursive))
        elif index is not None:
            steps.append((None, "*" if index == "*" else int(index)))
        else:
            name = key if key is not None else quoted1 if quoted1 is not None else quoted2
            steps.append((None, name or ""))
        pos = m.end()
    if not steps:
        raise ConfigError(where, f"empty JSON path {path!r}")
    return tuple(steps)


def _descendants(value: Any) -> Iterator[Any]:
    stack = [value]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _children(value: Any, key: str | int) -> Iterator[Any]:
    if key == "*":
        if isinstance(value, dict):
            yield from value.values()
        elif isinstance(value, list):
            yield from value
    elif isinstance(value, dict) and isinstance(key, str):
        if key in value:
            yield value[key]
    elif isinstance(value, list) and isinstance(key, int):
        if -len(value) <= key < len(value):
            yield value[key]
    elif isinstance(value, list) and isinstance(key, str):
        # a dotted path through an array applies to its elements: items.id
        for element in value:
            yield from _children(element, key)


def _resolve(document: Any, steps: Sequence[_Step]) -> Iterator[Any]:
    current: list[Any] = [document]
    for mode, key in steps:
        bases = [d for c in current for d in _descendants(c)] if mode is _RECURSE else current
        current = [child for base in bases for child in _children(base, key)]
        if not current:
            return
    yield from current


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if a == b:
        return True
    if isinstance(a, int | float | str) and isinstance(b, int | float | str) and not (
        isinstance(a, str) and isinstance(b, str)
    ):
        try:
            return float(a) == float(b)
        except ValueError:
            return False
    return False


@dataclass(frozen=True)
class _BodyRule:
    steps: tuple[_Step, ...]
    values: tuple[Any, ...]

    def matches(self, body: Any) -> bool:
        return any(
            not self.values or any(_same(found, v) for v in self.values) for found in _resolve(body, self.steps)
        )


def normalize_path(path: str, decode_rounds: int = 1) -> str:
    """Percent-decode (``decode_rounds`` times), collapse ``//``, resolve ``.`` and ``..``."""
    path = path.split("?", 1)[0].split("#", 1)[0]
    for _ in range(decode_rounds):
        decoded = unquote(path, errors="surrogateescape")
        if decoded == path:
            break
        path = decoded
    if not path.startswith("/"):
        path = "/" + path
    trailing = path.endswith("/") or path.endswith("/.") or path.endswith("/..")
    out = posixpath.normpath(path)
    if out.startswith("//"):  # normpath keeps a leading '//' (POSIX): HTTP does not
        out = "/" + out.lstrip("/")
    return out + "/" if trailing and out != "/" else out


def path_readings(path: str) -> tuple[str, ...]:
    """Every way an upstream might read ``path``: decoded once or until stable, ``\\`` as ``/``,
    ``;params`` stripped, with and without a trailing slash."""
    once = normalize_path(path, 1)
    full = normalize_path(path.replace("\\", "/"), 8)
    full = normalize_path(full.replace("\\", "/"), 1)
    no_params = normalize_path("/".join(seg.split(";", 1)[0] for seg in full.split("/")), 1)
    readings: list[str] = []
    for p in (once, full, no_params):
        for q in (p, p.rstrip("/") or "/"):
            if q not in readings:
                readings.append(q)
    return tuple(readings)


@dataclass(frozen=True)
class _HTTPRule:
    rule: Guardrail
    methods: frozenset[str] = frozenset()
    paths: tuple[str, ...] = ()
    body: tuple[_BodyRule, ...] = ()

    @classmethod
    def compile(cls, rule: Guardrail, path: str) -> _HTTPRule:
        match = rule.http or HTTPMatch()
        body = tuple(
            _BodyRule(_compile_body_path(b.path, f"{path}.http.body[{i}].path"), tuple(b.values))
            for i, b in enumerate(match.body)
        )
        for j, p in enumerate(match.paths):
            if not p.startswith("/") and not p.startswith("*"):
                raise ConfigError(f"{path}.http.paths[{j}]", f"a path glob must start with / or *, got {p!r}")
        methods = frozenset(m.upper() for m in match.methods)
        return cls(rule=rule, methods=methods, paths=match.paths, body=body)

    def matches_target(self, method: str, readings: Sequence[str]) -> bool:
        if self.methods and method not in self.methods:
            return False
        if not self.paths:
            return True
        hit = [any(glob_match(p, r) for p in self.paths) for r in readings]
        return all(hit) if self.rule.action == "allow" else any(hit)

    def matches(self, method: str, readings: Sequence[str], body: Any | None) -> bool:
        return self.matches_target(method, readings) and self.matches_body(body)

    def matches_body(self, body: Any | None) -> bool:
        if not self.body:
            return True
        return body is not None and all(b.matches(body) for b in self.body)

    def covers(self, builtin: _HTTPRule, method: str) -> bool:
        return method in self.methods and method in builtin.methods


# --------------------------------------------------------------------------- the guard

_MAX_CACHED_PATH = 1024  # longer request paths are judged without the cache
_MATCHING_CACHE = 4096  # statement shapes whose matching rules a Guard remembers


@dataclass(frozen=True)
class _Target:
    """What a request's method and path alone decide: its readings and the rules they match."""

    method: str
    readings: tuple[str, ...]
    nul: bool
    http: tuple[_HTTPRule, ...]
    builtin: tuple[_HTTPRule, ...]


_NO_RULE = Decision("allow", rule=None, reason="no guardrail matched")


class Guard:
    """A Connection's guardrails, compiled once: build one per (re)loaded config.

    Raises ``ConfigError`` for rules that cannot be enforced as written (an unknown statement
    class, a bad JSON path), so a typo never silently turns a rule off.
    """

    __slots__ = ("_builtin_http", "_builtin_sql", "_http", "_matching", "_sql", "_targets", "connection")

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        rules = [(r, f"spec.guardrails[{i}]") for i, r in enumerate(connection.guardrails)]
        self._sql = tuple(_SQLRule.compile(r, p) for r, p in rules if r.sql is not None)
        self._http = tuple(_HTTPRule.compile(r, p) for r, p in rules if r.http is not None)
        self._builtin_sql = tuple(_SQLRule.compile(r, r.name) for r in BUILTIN_GUARDRAILS if r.sql)
        self._builtin_http = tuple(_HTTPRule.compile(r, r.name) for r in BUILTIN_GUARDRAILS if r.http)
        # which rules match a statement depends on neither the caller nor the statement's text
        # (``_SQLRule.matches``): cached per (commands, groups, tables, functions, bulk writes), so
        # statements that differ only in their constants share an entry
        self._matching: dict[tuple[frozenset[str], ...], tuple[tuple[_SQLRule, ...], tuple[_SQLRule, ...]]] = {}
        # nor which rules match a request's method and path (two calls per request, same answer)
        self._targets = lru_cache(maxsize=4096)(self._compute_target)

    def _rules_matching(self, st: StatementInfo) -> tuple[tuple[_SQLRule, ...], tuple[_SQLRule, ...]]:
        """The Connection's rules and the built-in ones that match ``st``, in order."""
        key = (st.commands, st.groups, st.tables, st.functions, st.writes_without_where)
        hit = self._matching.get(key)
        if hit is None:
            hit = (
                tuple(r for r in self._sql if r.matches(st)),
                tuple(b for b in self._builtin_sql if b.matches(st)),
            )
            if len(self._matching) >= _MATCHING_CACHE:
                del self._matching[next(iter(self._matching))]
            self._matching[key] = hit
        return hit

    # ------------------------------------------------------------------ SQL

    def check_sql(self, caller: Caller, sql: str, prepared: Mapping[str, str] | None = None) -> SQLVerdict:
        """Decide a query string. ``prepared`` maps this session's prepared statement names to
        their ``PREPARE`` texts, so ``EXECUTE name`` is judged by what it runs (else: unknown)."""
        classified = classify(sql)
        statements = tuple(self._resolve(st, prepared) for st in classified.statements)
        if not statements:
            return SQLVerdict(Decision("allow", None, "empty query"), classified, statements)
        best: tuple[Decision, StatementInfo] | None = None
        for st in statements:
            decision = self.decide_statement(caller, st)
            if best is None or _SEVERITY[decision.action] > _SEVERITY[best[0].action]:
                best = (decision, st)
        assert best is not None
        decision, st = best
        if classified.error and decision.action != "allow":
            decision = Decision(decision.action, decision.rule, f"{decision.reason} ({classified.error})")
        return SQLVerdict(decision, classified, statements, st)

    @staticmethod
    def _resolve(st: StatementInfo, prepared: Mapping[str, str] | None) -> StatementInfo:
        name = st.prepared_name
        if prepared and "execute" in st.commands and name is not None and name in prepared:
            return resolve_execute(st, prepared[name])
        return st

    def decide_statement(self, caller: Caller, st: StatementInfo) -> Decision:
        """One statement: the Connection's rules in order, then the built-in ones."""
        user, builtins = self._rules_matching(st)
        chosen = next((r for r in user if rule_applies(r.rule.who, caller)), None)
        if chosen is not None and chosen.rule.action != "allow":
            return _decision(chosen.rule, chosen.describe(st))
        for builtin in builtins:
            if not (chosen is not None and chosen.covers(builtin, st)):
                return _decision(builtin.rule, builtin.describe(st))
        return _decision(chosen.rule, chosen.describe(st)) if chosen is not None else _NO_RULE

    # ------------------------------------------------------------------ HTTP

    def _target(self, method: str, path: str) -> _Target:
        if len(path) > _MAX_CACHED_PATH:
            return self._compute_target(method, path)
        return self._targets(method, path)

    def _compute_target(self, method: str, path: str) -> _Target:
        method, readings = method.upper(), path_readings(path)
        return _Target(
            method=method,
            readings=readings,
            nul="\x00" in "".join(readings),
            http=tuple(r for r in self._http if r.matches_target(method, readings)),
            builtin=tuple(b for b in self._builtin_http if b.matches_target(method, readings)),
        )

    def needs_http_body(self, method: str, path: str) -> bool:
        """Whether some rule looks at the JSON body of this request (read it only then)."""
        target = self._target(method, path)
        return any(r.body for r in target.http + target.builtin)

    def check_http(self, caller: Caller, method: str, path: str, json_body: Any | None) -> Decision:
        """Decide one request; ``path`` is the raw (still percent-encoded) request path."""
        target = self._target(method, path)
        if target.nul:
            return Decision("block", "path", "NUL byte in request path")
        method = target.method
        what = f"{method} {target.readings[0]}"
        chosen = next(
            (r for r in target.http if r.matches_body(json_body) and rule_applies(r.rule.who, caller)),
            None,
        )
        if chosen is not None and chosen.rule.action != "allow":
            return _decision(chosen.rule, what)
        for builtin in target.builtin:
            if builtin.matches_body(json_body) and not (chosen is not None and chosen.covers(builtin, method)):
                return _decision(builtin.rule, what)
        return _decision(chosen.rule, what) if chosen is not None else _NO_RULE

