"""What a SQL string would do, read from PostgreSQL's own parser (libpg_query via postgast).

Guardrails must not be fooled by case, comments, quoting, dollar quotes or several statements in
one string, so nothing here looks at the text itself: the text goes through the real PostgreSQL
grammar and the raw JSON parse tree is walked in full. A write hidden below the top-level statement
(a DELETE in a CTE, EXPLAIN ANALYZE of a write, PREPARE of a write, a rule's actions, the static SQL
of a DO block) counts as if written at the top. What cannot be understood is ``unknown``, which
the built-in guardrails block: the classifier fails closed, never open.

The JSON entry point is called directly (parse + ``json.loads`` is ~30 us) and results are cached
per exact text, since drivers and ORMs send the same statements over and over; a SELECT that only
differs in numeric literals from one already seen reuses its classification (``_literal_key``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from postgast.native import lib as _lib

__all__ = [
    "ALL_COLUMNS",
    "COMMAND_GROUPS",
    "DYNAMIC_SQL_FUNCTIONS",
    "GROUPS",
    "Classified",
    "ColumnReads",
    "SQLSyntaxError",
    "StatementInfo",
    "classify",
    "groups_of",
    "normalize",
    "resolve_execute",
]

GROUPS: frozenset[str] = frozenset(
    {"read", "write", "ddl", "dcl", "admin", "unknown", "transaction", "session"}
)

# Every command the walker can emit and the groups it belongs to. A command missing here is
# ``unknown`` (groups_of fails closed), so a typo in this table can never let something through.
COMMAND_GROUPS: Mapping[str, frozenset[str]] = {
    name: frozenset(groups)
    for name, groups in {
        # read
        "select": {"read"},
        "explain": {"read"},
        "declare": {"read"},
        "fetch": {"read"},
        "copy_to": {"read"},
        # write
        "insert": {"write"},
        "update": {"write"},
        "delete": {"write"},
        "merge": {"write"},
        "truncate": {"write"},
        "copy_from": {"write"},
        "select_into": {"write"},
        "create_table_as": {"write"},
        "refresh": {"write"},
        "call": {"write"},
        "lock": {"write"},
        # ddl
        "create": {"ddl"},
        "alter": {"ddl"},
        "drop": {"ddl"},
        "comment": {"ddl"},
        "security_label": {"ddl"},
        # dcl
        "grant": {"dcl"},
        "revoke": {"dcl"},
        "create_role": {"dcl"},
        "alter_role": {"dcl"},
        "drop_role": {"dcl"},
        "reassign_owned": {"dcl"},
        "drop_owned": {"dcl"},
        "set_role": {"dcl"},
        # admin: server files, programs, configuration, whole databases, maintenance
        "copy_program": {"admin"},
        "copy_file": {"admin"},
        "alter_system": {"admin"},
        "create_database": {"admin"},
        "drop_database": {"admin"},
        "create_extension": {"admin"},
        "untrusted_language": {"admin"},
        "tablespace": {"admin"},
        "subscription": {"admin"},
        "load": {"admin"},
        "vacuum": {"admin"},
        "analyze": {"admin"},
        "reindex": {"admin"},
        "cluster": {"admin"},
        "checkpoint": {"admin"},
        # transaction control
        "begin": {"transaction"},
        "start": {"transaction"},
        "commit": {"transaction"},
        "rollback": {"transaction"},
        "savepoint": {"transaction"},
        "release": {"transaction"},
        "rollback_to": {"transaction"},
        "prepare_transaction": {"transaction"},
        "commit_prepared": {"transaction"},
        "rollback_prepared": {"transaction"},
        "set_constraints": {"transaction"},
        # session state
        "set": {"session"},
        "reset": {"session"},
        "show": {"session"},
        "discard": {"session"},
        "prepare": {"session"},
        "deallocate": {"session"},
        "close": {"session"},
        "listen": {"session"},
        "unlisten": {"session"},
        "notify": {"session"},
        # no group of their own: the companion command carries it
        "copy": set(),
        "execute": set(),  # ``unknown`` is added until the prepared statement is resolved
        "do": {"unknown"},
        "unknown": {"unknown"},
    }.items()
}

# Functions that run SQL given as text (or on another server): their effect is unknowable here.
DYNAMIC_SQL_FUNCTIONS: frozenset[str] = frozenset(
    {
        "query_to_xml",
        "query_to_xmlschema",
        "query_to_xml_and_xmlschema",
        "cursor_to_xml",
        "ts_stat",
        "ts_rewrite",
        "dblink",
        "dblink_exec",
        "dblink_open",
        "dblink_fetch",
        "dblink_send_query",
        "dblink_get_result",
        "pg_background_launch",
    }
)

UNTRUSTED_LANGUAGES: frozenset[str] = frozenset(
    {"c", "internal", "plpythonu", "plpython2u", "plpython3u", "plperlu", "pltclu", "plsh", "plv8u"}
)

_CACHE_SIZE = 4096
_CACHE_MAX_TEXT = 64 * 1024  # longer texts are classified every time rather than pinned in memory
_MAX_DEPTH = 4  # nesting of bodies parsed as text (DO, function bodies, PL/pgSQL expressions)


# A column read meaning "every column of every relation the statement reads" (see StatementInfo).
ALL_COLUMNS = "*"
_EVERY: frozenset[str] = frozenset({ALL_COLUMNS})


class SQLSyntaxError(ValueError):
    """PostgreSQL's grammar rejects the text."""


@dataclass(frozen=True)
class StatementInfo:
    """One top-level statement and everything its parse tree would do, nested parts included."""

    text: str
    commands: frozenset[str]
    groups: frozenset[str]
    tables: frozenset[str] = frozenset()
    functions: frozenset[str] = frozenset()
    writes_without_where: frozenset[str] = frozenset()
    # The columns it reads: see ``columns`` (the default: a statement not understood reads all).
    reads: ColumnReads = field(default_factory=lambda: ColumnReads(_EVERY))
    # PREPARE / EXECUTE / DEALLOCATE name (None for DEALLOCATE ALL): the PG proxy tracks these per
    # session and hands them back to ``resolve_execute``.
    prepared_name: str | None = None

    @property
    def columns(self) -> frozenset[str]:
        """The columns it reads, lowercase: ``rel.col`` where the FROM clause says which relation
        (``rel`` as written there, aliases resolved), a bare ``col`` when it could be any visible
        relation's, ``rel.*`` for a star or a whole-row reference (``row_to_json(c)``, ``c::text``),
        ``*`` for every column of every relation. ``count(*)`` reads none."""
        return self.reads.columns


class ColumnReads:
    """A statement's column references, resolved against its FROM clauses on first use: only
    masking asks, and only for results with columns of unknown origin, so the walk just notes them
    (classify stays as fast as it was)."""

    __slots__ = ("_columns", "_fixed", "_refs", "_scopes")

    def __init__(self, fixed: Iterable[str] = (), scopes: Iterable[_Scope] = (),
                 refs: Iterable[tuple[_Scope, Any]] = ()) -> None:
        self._fixed = frozenset(fixed)
        self._scopes = tuple(scopes)
        self._refs = tuple(refs)
        self._columns: frozenset[str] | None = None if self._scopes or self._refs else self._fixed

    @property
    def columns(self) -> frozenset[str]:
        if self._columns is None:
            out = set(self._fixed)
            try:
                for scope in self._scopes:
                    scope.build(out)
                for scope, fields in self._refs:
                    _column_ref(scope, fields, out)
            except (AttributeError, KeyError, TypeError, ValueError):
                out.add(ALL_COLUMNS)  # a tree shape not foreseen: every column, fail closed
            self._columns = frozenset(out)
            self._scopes, self._refs = (), ()  # the parse tree is not needed any more
        return self._columns

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ColumnReads) and self.columns == other.columns

    def __hash__(self) -> int:
        return hash(self.columns)

    def __repr__(self) -> str:
        return f"ColumnReads({sorted(self.columns)!r})"


class StatementSet:
    """What a sequence of statements does as a whole: the union over its statements."""

    statements: tuple[StatementInfo, ...]

    @property
    def commands(self) -> frozenset[str]:
        return frozenset[str]().union(*(s.commands for s in self.statements))

    @property
    def groups(self) -> frozenset[str]:
        return frozenset[str]().union(*(s.groups for s in self.statements))

    @property
    def tables(self) -> frozenset[str]:
        return frozenset[str]().union(*(s.tables for s in self.statements))

    @property
    def functions(self) -> frozenset[str]:
        return frozenset[str]().union(*(s.functions for s in self.statements))

    @property
    def columns(self) -> frozenset[str]:
        return frozenset[str]().union(*(s.columns for s in self.statements))


@dataclass(frozen=True)
class Classified(StatementSet):
    """A whole query string: one ``StatementInfo`` per top-level statement."""

    text: str
    statements: tuple[StatementInfo, ...]
    error: str | None = None


def groups_of(commands: Iterable[str]) -> frozenset[str]:
    """The groups a set of commands falls into; an unlisted command is ``unknown``."""
    out: set[str] = set()
    for command in commands:
        out |= COMMAND_GROUPS.get(command, {"unknown"})
    return frozenset(out)


# --------------------------------------------------------------------------- libpg_query calls


def _error_message(error: Any) -> str:
    err = error.contents
    message = (err.message or b"parse error").decode("utf-8", "replace")
    return f"{message} (at character {err.cursorpos})" if err.cursorpos else message


def _parse(sql: str) -> Any:
    """The raw parse tree as JSON, or ``SQLSyntaxError``."""
    if "\x00" in sql:
        # C strings end at NUL: whatever follows would be invisible to the parser.
        raise SQLSyntaxError("NUL byte in query text")
    result = _lib.pg_query_parse(sql.encode("utf-8", "surrogatepass"))
    try:
        if result.error:
            raise SQLSyntaxError(_error_message(result.error))
        return json.loads(result.parse_tree or b"{}")
    finally:
        _lib.pg_query_free_parse_result(result)


def _parse_plpgsql(create_function: str) -> Any:
    result = _lib.pg_query_parse_plpgsql(create_function.encode("utf-8", "surrogatepass"))
    try:
        if result.error:
            raise SQLSyntaxError(_error_message(result.error))
        return json.loads(result.plpgsql_funcs or b"[]")
    finally:
        _lib.pg_query_free_plpgsql_parse_result(result)


def normalize(sql: str) -> str:
    """The statement with every literal replaced by ``$n``: what the audit log may keep verbatim.

    Covers ``ALTER ROLE x PASSWORD '...'`` and ``CREATE USER ... PASSWORD '...'``. Raises
    ``SQLSyntaxError`` for text PostgreSQL cannot parse; the caller must then redact by other means.
    """
    if "\x00" in sql:
        raise SQLSyntaxError("NUL byte in query text")
    result = _lib.pg_query_normalize(sql.encode("utf-8", "surrogatepass"))
    try:
        if result.error:
            raise SQLSyntaxError(_error_message(result.error))
        return bytes(result.normalized_query or b"").decode("utf-8", "replace")
    finally:
        _lib.pg_query_free_normalize_result(result)


# --------------------------------------------------------------------------- the tree walk


class _Acc:
    """What one statement's tree adds up to; built during a walk, frozen into ``StatementInfo``."""

    def __init__(self) -> None:
        self.commands: set[str] = set()
        self.tables: set[str] = set()
        self.functions: set[str] = set()
        self.without_where: set[str] = set()
        self.columns: set[str] = set()  # column reads known as such during the walk
        self.scopes: list[_Scope] = []
        self.refs: list[tuple[_Scope, Any]] = []  # ColumnRef fields, resolved on first use
        self.prepared_name: str | None = None

    def merge(self, info: StatementInfo, executed: bool) -> None:
        self.tables |= info.tables
        self.functions |= info.functions
        self.columns |= info.columns
        if executed:
            self.commands |= info.commands
            self.without_where |= info.writes_without_where
        else:
            # A function body that reaches the server's files or programs is that access, one
            # SELECT later: it counts at CREATE time so the built-in rules see it.
            self.commands |= {c for c in info.commands if "admin" in COMMAND_GROUPS.get(c, ())}

    def freeze(self, text: str) -> StatementInfo:
        commands = frozenset(self.commands or {"unknown"})
        return StatementInfo(
            text=text,
            commands=commands,
            groups=groups_of(commands),
            tables=frozenset(self.tables),
            functions=frozenset(self.functions),
            writes_without_where=frozenset(self.without_where),
            reads=ColumnReads(self.columns, self.scopes, self.refs),
            prepared_name=self.prepared_name,
        )


class _Scope:
    """One query level's FROM clause, for resolving column references: each name a column can be
    qualified with (alias, or table name as written) to the relations behind it; a subquery, CTE
    or function is ``()`` (what it reads is collected from its own body). A subquery sees the
    enclosing levels too. Built on first use (``ColumnReads``), enclosing levels first."""

    __slots__ = ("blind", "built", "ctes", "items", "names", "opaque", "parent", "relations", "visible",
                 "with_clause")

    def __init__(self, parent: _Scope | None, items: Iterable[Any] = (), with_clause: Any = None,
                 opaque: bool = False) -> None:
        self.parent = parent
        self.items = items
        self.with_clause = with_clause
        self.names: dict[str, tuple[str, ...]] = {}  # this level's, then the visible ones
        self.relations: list[str] = []
        self.opaque = opaque  # something in FROM not understood: unqualified names stay bare
        self.ctes: frozenset[str] = frozenset()
        self.visible: tuple[str, ...] = ()  # relations of this level and the enclosing ones
        self.blind = opaque
        self.built = parent is None and not items and not with_clause

    def build(self, out: set[str]) -> None:
        if self.built:
            return
        self.built = True
        parent = self.parent
        if parent is not None:
            parent.build(out)
            self.ctes = parent.ctes
        if type(self.with_clause) is dict:
            names = [c["CommonTableExpr"].get("ctename") for c in self.with_clause.get("ctes") or ()
                     if type(c) is dict and type(c.get("CommonTableExpr")) is dict]
            self.ctes = self.ctes | {n.lower() for n in names if type(n) is str}
        for item in self.items:
            self.add_from(item, self.ctes, out)
        if parent is None:
            self.visible, self.blind = tuple(self.relations), self.opaque
        else:
            self.names = {**parent.names, **self.names}
            self.visible = (*self.relations, *parent.visible)
            self.blind = self.opaque or parent.blind

    def lookup(self, qualifier: str) -> tuple[str, ...] | None:
        return self.names.get(qualifier)

    def unqualified(self, name: str, out: set[str]) -> None:
        """A bare name: a column of any relation in scope (inner levels first in PostgreSQL, but
        which relation has it is the catalog's to say), or a whole-row reference to one."""
        rows = self.names.get(name)
        if rows:
            out.update([rel + ".*" for rel in rows])
        if self.blind:
            out.add(name)
        else:
            out.update([rel + "." + name for rel in self.visible])

    def add_from(self, item: Any, ctes: frozenset[str], out: set[str]) -> tuple[str, ...]:
        """One FROM item (or join side) into the scope; the relations it holds. A join's USING
        columns are read (NATURAL: whichever columns the sides share)."""
        if type(item) is not dict or len(item) != 1:
            self.opaque = True
            return ()
        ((kind, v),) = item.items()
        alias = v.get("alias")
        aliasname = alias.get("aliasname") if type(alias) is dict else None
        if kind == "RangeVar":
            name = _rangevar_name(v)
            if not v.get("schemaname") and name in ctes:
                rels: tuple[str, ...] = ()
            else:
                rels = (name,)
                self.relations.append(name)
            if aliasname:
                self.names[aliasname.lower()] = rels
            else:
                self.names[name] = rels
                self.names.setdefault(name.rsplit(".", 1)[-1], rels)
            return rels
        if kind == "JoinExpr":
            rels = self.add_from(v.get("larg"), ctes, out) + self.add_from(v.get("rarg"), ctes, out)
            if v.get("isNatural"):
                out.update([f"{rel}.*" for rel in rels])
            for name in v.get("usingClause") or ():
                col = _sval(name)
                out.update([f"{rel}.{col.lower()}" for rel in rels] if col else [ALL_COLUMNS])
        elif kind == "RangeTableSample":
            rels = self.add_from(v.get("relation"), ctes, out)
        elif kind in _DERIVED_FROM:
            rels = ()
        else:
            self.opaque = True
            return ()
        if aliasname:
            self.names[aliasname.lower()] = rels
        return rels


# FROM items whose columns come from their own bodies (walked like everything else).
_DERIVED_FROM = frozenset({"RangeSubselect", "RangeFunction", "RangeTableFunc", "JsonTable"})


def _column_ref(scope: _Scope, fields: Any, out: set[str]) -> None:
    """One ColumnRef as column reads (see ``StatementInfo.columns``)."""
    if type(fields) is list and len(fields) <= 2:  # the usual ``col`` and ``rel.col``: no detour
        last = fields[-1].get("String") if fields and type(fields[-1]) is dict else None
        if last is not None:
            if len(fields) == 1:
                scope.unqualified(last["sval"].lower(), out)
                return
            first = fields[0].get("String") if type(fields[0]) is dict else None
            if first is not None:
                found = scope.names.get(first["sval"].lower())
                if found is not None:
                    col = last["sval"].lower()
                    out.update([rel + "." + col for rel in found])
                    return
    names: list[str] = []
    star = False
    for f in fields if type(fields) is list else ():
        s = f.get("String") if type(f) is dict else None
        if s is not None:
            names.append(s["sval"].lower())
        elif type(f) is dict and "A_Star" in f:
            star = True
        else:
            out.add(ALL_COLUMNS)
            return
    n = len(names)
    if star:
        if n:
            found = scope.lookup(".".join(names))
            if found is None:
                out.add(ALL_COLUMNS)
            else:
                out.update([rel + ".*" for rel in found])
        else:
            out.update([rel + ".*" for rel in scope.relations])
            if scope.opaque:
                out.add(ALL_COLUMNS)
    elif n == 1:
        scope.unqualified(names[0], out)
    elif n == 0:
        out.add(ALL_COLUMNS)
    else:
        # rel.col (schema.rel.col), else rel.col.field, else col.field of a composite column
        for cut in (n - 1, n - 2):
            found = scope.lookup(".".join(names[:cut])) if cut else None
            if found is not None:
                out.update([f"{rel}.{names[cut]}" for rel in found])
                return
        scope.unqualified(names[0], out)
        out.add(names[-1])


class _Walk:
    """One statement's walk: ``executed`` is False below EXPLAIN (no ANALYZE) and function bodies,
    where tables and functions are still collected but commands are not (nothing runs)."""

    __slots__ = ("acc", "depth", "root", "scope", "stack", "text")

    def __init__(self, acc: _Acc, text: str, depth: int) -> None:
        self.acc = acc
        self.text = text
        self.depth = depth
        # each entry: a subtree and its context (whether it runs, the query level its column
        # references are in), one shared tuple per handler call: the loop only passes it on
        self.stack: list[tuple[Any, _Ctx]] = []
        # outside any query level (DDL, CALL arguments...) a column reference may be anything's
        self.root = self.scope = _Scope(None, opaque=True)
    def command(self, executed: bool, *names: str) -> None:
        if executed:
            self.acc.commands.update(names)

    def push(self, node: Any, executed: bool) -> None:
        self.stack.append((node, (executed, self.scope)))

    def enter(self, v: Mapping[str, Any], from_items: Iterable[Any]) -> None:
        """A new query level for everything below it (a subquery may refer to enclosing levels)."""
        parent = self.scope
        self.scope = scope = _Scope(None if parent is self.root else parent, from_items, v.get("withClause"))
        self.acc.scopes.append(scope)

    def body(self, sql: str, executed: bool) -> None:
        """SQL held as text (function and DO bodies): classified in turn, up to a fixed depth."""
        if self.depth >= _MAX_DEPTH:
            self.command(executed, "unknown")
            return
        for info in _classify(sql, self.depth + 1).statements:
            self.acc.merge(info, executed)

    def plpgsql(self, create_function: str, executed: bool) -> None:
        """The static SQL of a PL/pgSQL body; dynamic ``EXECUTE`` makes the whole thing unknown."""
        if self.depth >= _MAX_DEPTH:
            self.command(executed, "unknown")
            return
        try:
            tree = _parse_plpgsql(create_function)
        except SQLSyntaxError:
            self.command(executed, "unknown")
            return
        for key, value in _items(tree):
            if key in ("PLpgSQL_stmt_dynexecute", "PLpgSQL_stmt_dynfors") or (
                key in ("PLpgSQL_stmt_open", "PLpgSQL_stmt_return_query") and value.get("dynquery")
            ):
                self.command(executed, "unknown")
            elif key == "PLpgSQL_expr" and isinstance(value.get("query"), str):
                self.body(_plpgsql_expr_sql(value["query"], value.get("parseMode", 0)), executed)


def _items(tree: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, dict value) pair of a JSON tree, iteratively (trees can be deep)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, dict):
                    yield key, value
                if isinstance(value, dict | list):
                    stack.append(value)


def _plpgsql_expr_sql(query: str, mode: Any) -> str:
    """PL/pgSQL expressions are SQL fragments: make each one a statement PostgreSQL can parse."""
    if mode == 0:  # RAW_PARSE_DEFAULT: a whole SQL statement
        return query
    if mode in (3, 4, 5):  # RAW_PARSE_PLPGSQL_ASSIGNn: "target := expression"
        for op in (":=", "="):
            if op in query:
                return "SELECT " + query.split(op, 1)[1]
    return "SELECT " + query


def _sval(node: Any) -> str | None:
    if isinstance(node, dict):
        inner = node.get("String")
        value = inner.get("sval") if isinstance(inner, dict) else None
        if isinstance(value, str):
            return value
    return None


def _dotted(names: Any) -> str:
    parts = [_sval(n) for n in names] if isinstance(names, list) else []
    return ".".join(p for p in parts if p).lower()


def _rangevar_name(node: Mapping[str, Any]) -> str:
    parts = [node.get("catalogname"), node.get("schemaname"), node.get("relname")]
    return ".".join(str(p) for p in parts if p).lower()


def _defelems(options: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in options if isinstance(options, list) else []:
        elem = item.get("DefElem") if isinstance(item, dict) else None
        if isinstance(elem, dict) and isinstance(elem.get("defname"), str):
            out[elem["defname"].lower()] = elem.get("arg")
    return out


def _is_false(arg: Any) -> bool:
    """EXPLAIN (ANALYZE off|false|0|no): anything else, including odd spellings, means on."""
    if not isinstance(arg, dict):
        return False
    if (s := _sval(arg)) is not None:
        return s.lower() in ("off", "false", "no", "0")
    if "Integer" in arg:
        return not arg["Integer"].get("ival")
    if "Boolean" in arg:
        return not arg["Boolean"].get("boolval")
    return False


def _function_sources(value: Mapping[str, Any]) -> tuple[str, list[str]]:
    opts = _defelems(value.get("options"))
    language = (_sval(opts.get("language")) or "sql").lower()
    bodies: list[str] = []
    as_arg = opts.get("as")
    if isinstance(as_arg, dict):
        items = as_arg.get("List", {}).get("items", []) if "List" in as_arg else [as_arg]
        bodies = [s for s in (_sval(i) for i in items) if s is not None]
    return language, bodies


def _dollar_quote(body: str) -> str:
    tag = "$sidegate$"
    n = 0
    while tag in body:
        n += 1
        tag = f"$sidegate{n}$"
    return f"{tag}{body}{tag}"


# Statement handlers: record the statement's commands, push the subtrees to walk (and whether
# what is in them runs). Node types that are not listed and end in "Stmt" are unknown.

_Handler = Callable[[_Walk, Mapping[str, Any], bool], None]
_Ctx = tuple[bool, "_Scope"]


_CONTAINERS = (dict, list)
# Node types that hold nothing but names and constants: not worth descending into (hot path).
_LEAVES = frozenset(
    {"ColumnRef", "A_Const", "String", "Integer", "Float", "Boolean", "BitString", "ParamRef", "A_Star"}
)


def _push_all(w: _Walk, v: Mapping[str, Any], executed: bool, skip: tuple[str, ...] = ()) -> None:
    ctx = (executed, w.scope)
    w.stack.extend(
        [(child, ctx) for key, child in v.items() if type(child) in _CONTAINERS and key not in skip]
    )


def _relation(v: Mapping[str, Any], *keys: str) -> list[Any]:
    """FROM items of a DML statement: its target relation (a bare RangeVar) and the lists at keys."""
    target = v.get("relation")
    items: list[Any] = [{"RangeVar": target}] if type(target) is dict else []
    for key in keys:
        more = v.get(key)
        if type(more) is list:
            items.extend(more)
        elif type(more) is dict:
            items.append(more)
    return items


def _simple(*commands: str) -> _Handler:
    def handler(w: _Walk, v: Mapping[str, Any], executed: bool) -> None:
        w.command(executed, *commands)
        _push_all(w, v, executed)

    return handler


def _select(w: _Walk, v: Mapping[str, Any], executed: bool) -> None:
    w.command(executed, "select")
    if v.get("intoClause"):
        w.command(executed, "create", "select_into")
    w.enter(v, v.get("fromClause") or ())
    if v.get("op", "SETOP_NONE") != "SETOP_NONE":
        # each side of a UNION is a query level of its own
        _push_all(w, v, executed, skip=("larg", "rarg"))
        w.push([{"SelectStmt": v[k]} for k in ("larg", "rarg") if type(v.get(k)) is dict], executed)
    else:
        _push_all(w, v, executed)


def _update_delete(command: str) -> _Handler:
    def handler(w: _Walk, v: Mapping[str, Any], executed: bool) -> None:
        w.command(executed, command)
        if executed and not v.get("whereClause"):
            w.acc.without_where.add(command)
        w.enter(v, _relation(v, "fromClause", "usingClause"))
        _push_all(w, v, executed)

    return handler


def _insert(w: _Walk, v: Mapping[str, Any], executed: bool) -> None:
    w.command(executed, "insert")
    w.enter(v, _relation(v))
    conflict = v.get("onConflictClause")
    if isinstance(conflict, dict) and conflict.get("action") == "ONCONFLICT_UPDATE":
        w.command(executed, "update")
    source = v.get("selectStmt")
    inner = source.get("SelectStmt") if isinstance(source, dict) else None
    if isinstance(inner, dict) and inner.get("valuesLists") and not inner.get("targetList"):
        # INSERT ... VALUES reads nothing: walk the rows (subqueries count), not a SELECT
        _push_all(w, v, executed, skip=("selectStmt",))
        w.push(inner, executed)
    else:
        _push_all(w, v, executed)


def _merge(w: _Walk, v: Mapping[str, Any], executed: bool) -> None:
    w.command(executed, "merge")
    for clause in v.get("mergeWhenClauses") or []:
        when = clause.get("MergeWhenClause") if isinstance(clause, dict) else None
        ctype = when.get("commandType", "") if isinstance(when, dict) else ""
        if ctype in ("CMD_INSERT", "CMD_UPDATE", "CMD_DELETE"):
            w.command(executed, ctype[4:].lower())
    w.enter(v, _relation(v, "sourceRelation"))
    _push_all(w, v, executed)


def _truncate(w: _Walk, v: Mapping[str, Any], executed: bool) -> None:
    w.command(executed, "truncate")
    if executed:
        w.acc.without_where.add("truncate")  # TRUNCATE has no WHERE: it is always every row
    _push_all(w, v, executed)


def _copy(w: _Walk, v: Mapping[str, Any], executed: bool) -> None:
    w.command(executed, "copy", "copy_from" if v.get("is_from") else "copy_to")
    relation = v.get("relation")
    if type(relation) is dict:
        name = _rangevar_name(relation)
        cols = [_sval(a) for a in v.get("attlist") or ()]
        w.acc.columns.update([f"{name}.{c.lower()}" if c else f"{name}.*" for c in cols] or [f"{name}.*"])
    if v.get("is_program"):
        w.command(executed, "copy_program")
    elif v.get("filename") is not None:
        w.command(executed, "copy_file")
    _push_all(w, v, executed)


def _explain(w: _Walk, v: Mapping[str, Any], executed: bool) -> None:
    w.command(executed, "explain")
    opts = _defelems(v.get("options"))
    analyze = "analyze" in opts and not _is_false(opts["analyze"])
    w.push(v.get("query"), executed and analyze)


def _prepare(w: _Walk, v: Mapping[str, Any], executed: bool) -> None:
    w.command(executed, "prepare")
    w.acc.prepared_name = v.get("name")
    _push_all(w, v, executed)


def _execute(w: _Walk, v: Mapping[str, Any], executed: bool) -> None:
    w.command(executed, "execute", "unknown")
    w.acc.columns.add(ALL_COLUMNS)  # until resolved, like the commands
    w.acc.prepared_name = v.get("name")
    _push_all(w, v, executed)


def _deallocate(w: _Walk, v: Mapping[str, Any], executed: bool) -> None:
    w.command(executed, "deallocate")
    w.acc.prepared_name = v.get("name")


def _do(w: _Walk, v: Mapping[str, Any], executed: bool) -> None:
    w.command(executed, "do", "unknown")
    opts = _defelems(v.get("args"))
    language = (_sval(opts.get("language")) or "plpgsql").lower()
    body = _sval(opts.get("as"))
    if language in UNTRUSTED_LANGUAGES:
        w.command(executed, "untrusted_language")
    if language == "plpgsql" and body is not None:
        w.plpgsql(
            f"CREATE FUNCTION sidegate_do() RETURNS void LANGUAGE plpgsql AS {_dollar_quote(body)}",
            executed,
        )


def _create_function(w: _Walk, v: Mapping[str, Any], executed: bool) -> None:
    # The function is created, not run: its body only contributes tables and functions, so a
    # rule on pg_read_file also stops wrapping pg_read_file in a function of one's own.
    w.command(executed, "create")
    language, bodies = _function_sources(v)
    if language in UNTRUSTED_LANGUAGES:
        w.command(executed, "untrusted_language")
    if language == "sql":
        for body in bodies:
            w.body(body, executed=False)
    elif language == "plpgsql" and bodies:
        w.plpgsql(w.text, executed=False)
    _push_all(w, v, executed=False)


def _vacuum(w: _Walk, v: Mapping[str, Any], executed: bool) -> None:
    if v.get("is_vacuumcmd"):
        w.command(executed, "vacuum")
        if "analyze" in _defelems(v.get("options")):
            w.command(executed, "analyze")
    else:
        w.command(executed, "analyze")
    _push_all(w, v, executed)


def _transaction(w: _Walk, v: Mapping[str, Any], executed: bool) -> None:
    name = str(v.get("kind", "")).removeprefix("TRANS_STMT_").lower()
    w.command(executed, "prepare_transaction" if name == "prepare" else name)


def _variable_set(w: _Walk, v: Mapping[str, Any], executed: bool) -> None:
    kind = str(v.get("kind", ""))
    w.command(executed, "reset" if kind.startswith("VAR_RESET") else "set")
    if str(v.get("name", "")).lower() in ("role", "session_authorization"):
        w.command(executed, "set_role")
    _push_all(w, v, executed)


def _grant(w: _Walk, v: Mapping[str, Any], executed: bool) -> None:
    w.command(executed, "grant" if v.get("is_grant") else "revoke")
    _push_all(w, v, executed)


def _drop(w: _Walk, v: Mapping[str, Any], executed: bool) -> None:
    w.command(executed, "drop")
    if v.get("removeType") in _DROP_TABLE_TYPES:
        for obj in v.get("objects") or []:
            if isinstance(obj, dict) and "List" in obj:
                name = _dotted(obj["List"].get("items"))
                if name:
                    w.acc.tables.add(name)
    _push_all(w, v, executed)


_DROP_TABLE_TYPES = frozenset(
    {"OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE", "OBJECT_SEQUENCE",
     "OBJECT_INDEX"}
)

_HANDLERS: Mapping[str, _Handler] = {
    "SelectStmt": _select,
    "InsertStmt": _insert,
    "UpdateStmt": _update_delete("update"),
    "DeleteStmt": _update_delete("delete"),
    "MergeStmt": _merge,
    "CopyStmt": _copy,
    "TruncateStmt": _truncate,
    "ExplainStmt": _explain,
    "PrepareStmt": _prepare,
    "ExecuteStmt": _execute,
    "DeallocateStmt": _deallocate,
    "DoStmt": _do,
    "CallStmt": _simple("call"),
    "CreateFunctionStmt": _create_function,
    "CreateTableAsStmt": _simple("create", "create_table_as"),
    "RefreshMatViewStmt": _simple("refresh"),
    "DropStmt": _drop,
    "DropdbStmt": _simple("drop", "drop_database"),
    "CreatedbStmt": _simple("create", "create_database"),
    "AlterDatabaseStmt": _simple("alter"),
    "AlterDatabaseSetStmt": _simple("alter"),
    "AlterDatabaseRefreshCollStmt": _simple("alter"),
    "AlterSystemStmt": _simple("alter", "alter_system"),
    "CreateExtensionStmt": _simple("create", "create_extension"),
    "AlterExtensionStmt": _simple("alter", "create_extension"),
    "AlterExtensionContentsStmt": _simple("alter", "create_extension"),
    "CreatePLangStmt": _simple("create", "untrusted_language"),
    "CreateTableSpaceStmt": _simple("create", "tablespace"),
    "DropTableSpaceStmt": _simple("drop", "tablespace"),
    "AlterTableSpaceOptionsStmt": _simple("alter", "tablespace"),
    "AlterTableMoveAllStmt": _simple("alter", "tablespace"),
    "CreateSubscriptionStmt": _simple("create", "subscription"),
    "AlterSubscriptionStmt": _simple("alter", "subscription"),
    "DropSubscriptionStmt": _simple("drop", "subscription"),
    "CreateRoleStmt": _simple("create", "create_role"),
    "AlterRoleStmt": _simple("alter", "alter_role"),
    "AlterRoleSetStmt": _simple("alter", "alter_role"),
    "DropRoleStmt": _simple("drop", "drop_role"),
    "GrantStmt": _grant,
    "GrantRoleStmt": _grant,
    "AlterDefaultPrivilegesStmt": _simple("alter", "grant"),
    "ReassignOwnedStmt": _simple("reassign_owned"),
    "DropOwnedStmt": _simple("drop", "drop_owned"),
    "ViewStmt": _simple("create"),
    "IndexStmt": _simple("create"),
    "RuleStmt": _simple("create"),  # the rule's actions are walked: they run when it fires
    "DefineStmt": _simple("create"),
    "CompositeTypeStmt": _simple("create"),
    "RenameStmt": _simple("alter"),
    "CommentStmt": _simple("comment"),
    "SecLabelStmt": _simple("security_label"),
    "LoadStmt": _simple("load"),
    "VacuumStmt": _vacuum,
    "ReindexStmt": _simple("reindex"),
    "ClusterStmt": _simple("cluster"),
    "CheckPointStmt": _simple("checkpoint"),
    "LockStmt": _simple("lock"),
    "TransactionStmt": _transaction,
    "VariableSetStmt": _variable_set,
    "VariableShowStmt": _simple("show"),
    "ConstraintsSetStmt": _simple("set_constraints"),
    "DiscardStmt": _simple("discard"),
    "ListenStmt": _simple("listen"),
    "UnlistenStmt": _simple("unlisten"),
    "NotifyStmt": _simple("notify"),
    "DeclareCursorStmt": _simple("declare"),
    "FetchStmt": _simple("fetch"),
    "ClosePortalStmt": _simple("close"),
}

# Families that are plain DDL whatever the object: CREATE/ALTER/DROP of types, schemas, triggers...
_DDL_PREFIXES: tuple[tuple[str, _Handler], ...] = tuple(
    (prefix, _simple(prefix.lower())) for prefix in ("Create", "Alter", "Drop")
)


def _statement_handler(node_type: str) -> _Handler | None:
    handler = _HANDLERS.get(node_type)
    if handler is not None:
        return handler
    for prefix, generic in _DDL_PREFIXES:
        if node_type.startswith(prefix):
            return generic
    return None


def _walk_statement(tree: Any, text: str, depth: int) -> StatementInfo:
    w = _Walk(acc=_Acc(), text=text, depth=depth)
    stack = w.stack
    stack.append((tree, (True, w.root)))
    tables, functions, refs = w.acc.tables, w.acc.functions, w.acc.refs
    while stack:
        node, ctx = stack.pop()
        if type(node) is list:
            stack.extend([(child, ctx) for child in node if type(child) in _CONTAINERS])
            continue
        if type(node) is not dict:
            continue
        if "relname" in node and type(node["relname"]) is str:
            tables.add(_rangevar_name(node))
        if "funcformat" in node and "funcname" in node:  # FuncCall, wrapped or inline (CALL)
            name = _dotted(node["funcname"])
            if name:
                functions.add(name)
                if name.rsplit(".", 1)[-1] in DYNAMIC_SQL_FUNCTIONS:
                    w.command(ctx[0], "unknown")
        for key, value in node.items():
            kind = type(value)
            if kind is dict:
                if key in _LEAVES:
                    if key == "ColumnRef":
                        refs.append((ctx[1], value.get("fields")))
                    continue
                if key[-4:] == "Stmt" and key[0].isupper():
                    handler = _statement_handler(key)
                    if handler is None:
                        w.command(ctx[0], "unknown")
                        stack.append((value, ctx))
                    else:
                        w.scope = ctx[1]
                        handler(w, value, ctx[0])
                else:
                    stack.append((value, ctx))
            elif kind is list:
                stack.append((value, ctx))
    return w.acc.freeze(text)


# --------------------------------------------------------------------------- entry points


def _unknown(sql: str, error: str) -> Classified:
    info = StatementInfo(text=sql, commands=frozenset({"unknown"}), groups=frozenset({"unknown"}))
    return Classified(text=sql, statements=(info,), error=error)


def _classify(sql: str, depth: int = 0) -> Classified:
    try:
        tree = _parse(sql)
    except SQLSyntaxError as exc:
        return _unknown(sql, str(exc))
    except (RecursionError, ValueError) as exc:  # pathological nesting in the JSON
        return _unknown(sql, f"cannot classify: {exc.__class__.__name__}")
    raw = sql.encode("utf-8", "surrogatepass")
    statements = []
    try:
        for entry in tree.get("stmts") or []:
            start = entry.get("stmt_location", 0)
            length = entry.get("stmt_len", 0) or len(raw) - start
            text = raw[start : start + length].decode("utf-8", "replace").strip()
            statements.append(_walk_statement(entry.get("stmt"), text, depth))
    except (AttributeError, KeyError, TypeError, ValueError) as exc:  # a tree shape not foreseen
        return _unknown(sql, f"cannot classify: {exc.__class__.__name__}: {exc}")
    return Classified(text=sql, statements=tuple(statements))


# ------------------------------------------------------------- numeric literals: one parse per shape
#
# Drivers that inline their parameters (psycopg2, pgbench -M simple) send ``... WHERE aid = 48213``
# with a new number each time, which the exact-text cache never sees twice. ``_literal_key``
# rewrites such a text to its canonical form (``... WHERE aid = 0``), and the canonical text is
# classified once in its place. That is sound because of what is rewritten, and nothing else is:
#
# * The text is ASCII and starts (after whitespace) with the keyword SELECT. Outside quoted tokens
#   it has no ``$`` (dollar quotes, parameters), no comment opener (``--``, ``/*``), no ``;`` but a
#   trailing one. Every quote opens a well-formed '...' or "..." token (doubled quotes inside) that
#   holds no backslash (escape strings) and no NUL: skipped whole, nothing in it is ever rewritten.
#   Anything else (an unbalanced quote, a backslash anywhere) gives up. So the scan sees the tokens
#   PostgreSQL's lexer sees.
# * Only an unsigned decimal number (``123``, ``1.5``) that is a token of its own (ASCII whitespace,
#   ``)``, ``,``, ``;`` or the end after it) right after a comparison operator (``=``, ``<``, ``>``,
#   ``<=``, ``>=``, ``<>``, ``!=``, not the end of a longer operator) or as an element of an
#   ``IN (...)`` list of such numbers. The grammar makes each an operand: an ``A_Const`` leaf,
#   which the walk never looks into (no EXPLAIN option, DO or function body can be reached from a
#   plain SELECT, and those read only strings anyway). An integer becomes ``0`` and a decimal
#   ``0.0`` (the same kind of token), so the canonical text has the same parse tree but for
#   constant values and locations.
#
# Hence a text and its canonical form classify alike but for the texts recorded, which a hit
# rebuilds from the text at hand. The canonical result is only used when it is a single
# understood SELECT without error whose text is the canonical text stripped as ``_classify``
# strips it; for anything else the text takes the exact path.

_WS = r"[ \t\n\r\f]"  # what PostgreSQL's lexer skips as whitespace (ASCII)
_NUMBER = r"[0-9]+(?:\.[0-9]+)?"
_NOT_OP = r"[^-+*/<>=~!@#%^&|`?]"  # a character that cannot end an operator
_LITERAL_TOKENS = re.compile(
    # every alternative starts with one of these characters: the scan skips the others fast
    r"""[<>=!Ii'"$\\\x00;/-](?:"""
    # a quoted token, skipped whole
    r"""(?<=')[^'\\\x00]*(?:''[^'\\\x00]*)*'|(?<=")[^"\\\x00]*(?:""[^"\\\x00]*)*\""""
    # a number right after a comparison operator
    rf"|(?:(?<={_NOT_OP}<)[=>]?|(?<={_NOT_OP}>)=?|(?<={_NOT_OP}=)|(?<={_NOT_OP}!)=)"
    rf"{_WS}*(?P<num>{_NUMBER})(?={_WS}|[),;]|\Z)"
    # an IN list of numbers only, IN a word of its own
    rf"|(?<=[^0-9A-Za-z_$.][Ii])[Nn]{_WS}*\((?P<list>{_WS}*{_NUMBER}(?:{_WS}*,{_WS}*{_NUMBER})*{_WS}*)\)"
    # anything else that is not understood: give up
    rf"""|(?:(?<=['"$\\\x00])|(?<=-)-|(?<=/)\*|(?<=;)(?!{_WS}*\Z))(?P<stop>)"""
    ")"
)
_LITERAL_START = re.compile(rf"{_WS}*[Ss][Ee][Ll][Ee][Cc][Tt]{_WS}")
_LIST_NUMBER = re.compile(_NUMBER)


class _NoKey(Exception):
    pass


def _zero(number: str) -> str:
    return "0.0" if "." in number else "0"


def _canonical_token(m: re.Match[str]) -> str:
    kind = m.lastgroup
    if kind is None:  # a quoted token, or a lone - / ; / ... that starts nothing
        return m.group()
    if kind == "num":  # the number ends the match
        text, number = m.group(0, "num")
        return text[: -len(number)] + _zero(number)
    if kind == "list":
        return _LIST_NUMBER.sub(lambda n: _zero(n.group()), m.group())
    raise _NoKey


def _literal_key(sql: str) -> str | None:
    """``sql`` with its rewritable numbers set to zero (see above), or None: take the exact path."""
    if not sql.isascii() or _LITERAL_START.match(sql) is None:
        return None
    try:
        key = _LITERAL_TOKENS.sub(_canonical_token, sql)
    except _NoKey:
        return None
    return None if key == sql else key


def statement_text(sql: str) -> str:
    """What ``_classify`` records as the text of ``sql``'s only statement."""
    text = sql.strip()
    return text[:-1].rstrip() if text.endswith(";") else text


@lru_cache(maxsize=_CACHE_SIZE)
def _canonical(key: str) -> StatementInfo | None:
    """The one statement of a canonical text, or None when it is anything else."""
    classified = _classify(key)
    if classified.error is not None or len(classified.statements) != 1:
        return None
    info = classified.statements[0]
    if info.text != statement_text(key) or "select" not in info.commands or "unknown" in info.groups:
        return None
    return info


def _with_text(info: StatementInfo, text: str) -> StatementInfo:
    """``dataclasses.replace(info, text=text)``, without its cost (~4 us: it runs the frozen
    ``__init__``); the other fields are immutable values, shared (``reads`` depends on names only)."""
    new = object.__new__(StatementInfo)
    fields = new.__dict__
    fields.update(info.__dict__)
    fields["text"] = text
    return new


def _classify_text(sql: str) -> Classified:
    key = _literal_key(sql)
    info = _canonical(key) if key is not None else None
    if info is None:
        return _classify(sql)
    return Classified(text=sql, statements=(_with_text(info, statement_text(sql)),))


_classify_cached = lru_cache(maxsize=_CACHE_SIZE)(_classify_text)


def classify(sql: str) -> Classified:
    """Classify a query string (cached per exact text, then per shape: see ``_literal_key``).
    Never raises: failures are ``unknown``."""
    if len(sql) > _CACHE_MAX_TEXT:
        return _classify(sql)
    return _classify_cached(sql)


def resolve_execute(execute: StatementInfo, prepare_text: str) -> StatementInfo:
    """``EXECUTE name`` with the text of the session's ``PREPARE name AS ...``: what it runs."""
    prepared = _Acc()
    for info in classify(prepare_text).statements:
        prepared.merge(info, executed=True)
    commands = (prepared.commands - {"prepare"}) | (execute.commands - {"unknown"})
    return StatementInfo(
        text=execute.text,
        commands=frozenset(commands),
        groups=groups_of(commands),
        tables=execute.tables | prepared.tables,
        functions=execute.functions | prepared.functions,
        writes_without_where=execute.writes_without_where | prepared.without_where,
        reads=ColumnReads((execute.columns - _EVERY) | prepared.columns),
        prepared_name=execute.prepared_name,
    )
