"""Where a result column comes from: RowDescription's (table OID, attnum) to schema.table.column.

PostgreSQL reports the origin of a result column as OIDs (see the field notes): a table column
for plain selects, aliases, subqueries and CTEs; the *view's* OID for a view; nothing for
expressions and UNIONs. Masking rules name columns, so OIDs are resolved here through the
catalog, once per relation, on a connection the gateway owns (never the client's session: that
would interleave with its protocol state).

Views are resolved to base columns from the view's stored query tree (``pg_rewrite.ev_action``,
whose target entries carry the same ``resorigtbl``/``resorigcol`` the parser computes for a
RowDescription), through nested views. A view column with no base column (an expression) is of
unknown origin, but carries every base column the view reads (``pg_depend``), so a masking
engine can fail closed on it.

I/O is injected: ``Catalog(run)`` takes an ``async run(sql) -> rows`` (text values), so this
module only builds catalog queries and interprets their results.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Catalog",
    "CatalogError",
    "ColumnSource",
    "Origin",
    "RelationColumns",
    "view_column_origins",
    "view_var_reads",
]

Rows = list[list[str | None]]
Runner = Callable[[str], Awaitable[Rows]]

MAX_VIEW_DEPTH = 8
VIEW_KINDS = frozenset({"v", "m"})  # views and materialized views hold other tables' data


class CatalogError(RuntimeError):
    """The catalog could not be read: callers must treat the columns as of unknown origin."""


@dataclass(frozen=True, slots=True)
class ColumnSource:
    schema: str
    table: str
    column: str

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}.{self.column}"


@dataclass(frozen=True, slots=True)
class Origin:
    """One result column: its base column (``source``), or ``None`` when PostgreSQL reported no
    origin or it could not be resolved; ``view`` names the view it was reached through, and
    ``reads`` is what that view reads when the column itself has no base column."""

    table_oid: int
    attnum: int
    source: ColumnSource | None = None
    view: str | None = None
    reads: frozenset[ColumnSource] = frozenset()

    @property
    def known(self) -> bool:
        return self.source is not None


@dataclass(frozen=True, slots=True)
class RelationColumns:
    """What reading some columns of one relation reads underneath. A table: those columns. A
    view: the base column behind each plain view column (everything the view reads for a computed
    one), plus what its filters, joins, grouping and ordering read whatever is selected."""

    columns: Mapping[str, frozenset[ColumnSource]]  # lowercase column name -> base columns
    always: frozenset[ColumnSource]
    every: frozenset[ColumnSource]

    def reads(self, columns: Iterable[str] | None) -> frozenset[ColumnSource]:
        """Base columns read by reading ``columns`` of the relation (None: all of them); a name
        the relation does not have reads nothing from it."""
        if columns is None:
            return self.every
        out = set(self.always)
        for name in columns:
            out |= self.columns.get(name.lower(), frozenset())
        return frozenset(out)


@dataclass
class _Relation:
    schema: str
    name: str
    kind: str
    columns: dict[int, str] = field(default_factory=dict)
    view_columns: dict[int, tuple[int, int]] = field(default_factory=dict)  # attnum -> (oid, attnum)
    reads: tuple[tuple[int, int], ...] = ()  # attnum 0: the whole row
    filters: tuple[tuple[int, int], ...] | None = None  # read whatever is selected (None: unknown)
    fetched_at: float = 0.0


# --------------------------------------------------------------------------- node strings


def _tokens(text: str) -> list[str]:
    """PostgreSQL's nodeToString tokens (read.c's pg_strtok): backslash escapes, ``{}()`` split."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t\n\r":
            i += 1
        elif c in "{}()":
            out.append(c)
            i += 1
        else:
            buf = []
            while i < n and text[i] not in " \t\n\r{}()":
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                buf.append(text[i])
                i += 1
            out.append("".join(buf))
    return out


def _parse_nodes(tokens: list[str]) -> Any:
    """Tokens to nested Python values: ``{NAME :field value...}`` -> dict (``_`` = NAME)."""
    pos = 0

    def value() -> Any:
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok == "{":
            node: dict[str, Any] = {"_": tokens[pos]}
            pos += 1
            key: str | None = None
            items: list[Any] = []
            while tokens[pos] != "}":
                if tokens[pos].startswith(":"):
                    if key is not None:
                        node[key] = items[0] if len(items) == 1 else items
                    key, items = tokens[pos][1:], []
                    pos += 1
                else:
                    items.append(value())
            pos += 1
            if key is not None:
                node[key] = items[0] if len(items) == 1 else items
            return node
        if tok == "(":
            seq: list[Any] = []
            while tokens[pos] != ")":
                seq.append(value())
            pos += 1
            return seq
        return tok

    try:
        return value()
    except IndexError:
        raise CatalogError("truncated node string") from None


def view_column_origins(ev_action: str) -> dict[int, tuple[int, int]]:
    """A view's ``_RETURN`` rule action to {view attnum: (origin table OID, attnum)}; columns
    without an origin are left out."""
    tree = _parse_nodes(_tokens(ev_action))
    queries = tree if isinstance(tree, list) else [tree]
    query = next((q for q in queries if isinstance(q, dict) and q.get("_") == "QUERY"), None)
    if query is None:
        raise CatalogError("view rule without a query")
    target_list = query.get("targetList") or []
    if not isinstance(target_list, list):
        target_list = [target_list]
    out: dict[int, tuple[int, int]] = {}
    for entry in target_list:
        if not isinstance(entry, dict) or entry.get("_") != "TARGETENTRY" or entry.get("resjunk") == "true":
            continue
        try:
            resno, table, column = int(entry["resno"]), int(entry["resorigtbl"]), int(entry["resorigcol"])
        except (KeyError, TypeError, ValueError):
            continue
        if table and column > 0:
            out[resno] = (table, column)
    return out


_RTE_RELATION, _RTE_JOIN = "0", "2"


def view_var_reads(ev_action: str) -> tuple[frozenset[tuple[int, int]], frozenset[tuple[int, int]]]:
    """A view's ``_RETURN`` rule action to the (table OID, attnum) its Vars read (attnum 0: the
    whole row, which pg_depend does not record by column): ``(always, every)``. ``always`` is what
    selecting anything from the view reads: FROM, WHERE, joins, subqueries, grouping, ordering,
    DISTINCT, set operations; not its output columns (unless they decide the rows), which read
    their inputs only when selected."""
    tree = _parse_nodes(_tokens(ev_action))
    queries = tree if isinstance(tree, list) else [tree]
    query = next((q for q in queries if isinstance(q, dict) and q.get("_") == "QUERY"), None)
    if query is None:
        raise CatalogError("view rule without a query")
    always: set[tuple[int, int]] = set()
    every: set[tuple[int, int]] = set()
    levels: list[list[Any]] = []

    def rtable_of(q: dict[str, Any]) -> list[Any]:
        rt = q.get("rtable")
        return rt if isinstance(rt, list) else []

    def resolve(var: dict[str, Any], level: int, out: set[tuple[int, int]]) -> bool:
        """Adds what a Var reads; True when it is a plain relation column."""
        lvl = level - int(var.get("varlevelsup", 0))
        varno, attno = int(var["varno"]), int(var["varattno"])
        rte = levels[lvl][varno - 1]
        kind = str(rte.get("rtekind"))
        if kind == _RTE_RELATION:
            out.add((int(rte["relid"]), attno))
            return attno > 0
        if kind == _RTE_JOIN:
            aliases = rte.get("joinaliasvars")
            aliases = aliases if isinstance(aliases, list) else []
            for alias in aliases if attno == 0 else [aliases[attno - 1]]:
                walk(alias, lvl, out)
        return False  # subquery, CTE, function, values: their bodies are walked in full

    def walk(node: Any, level: int, out: set[tuple[int, int]], depth: int = 0) -> None:
        if depth > 200:
            raise CatalogError("view query nested too deeply")
        if isinstance(node, list):
            for item in node:
                walk(item, level, out, depth + 1)
            return
        if not isinstance(node, dict):
            return
        kind = node.get("_")
        if kind == "VAR":
            resolve(node, level, out)
            return
        if kind == "RANGETBLENTRY" and str(node.get("rtekind")) == _RTE_JOIN:
            return  # its alias Vars count only where a Var points at them
        if kind == "QUERY":
            levels.append(rtable_of(node))
            try:
                for value in node.values():
                    walk(value, len(levels) - 1, out, depth + 1)
            finally:
                levels.pop()
            return
        for key, value in node.items():
            if key != "_":
                walk(value, level, out, depth + 1)

    try:
        levels.append(rtable_of(query))
        for key, value in query.items():
            if key != "targetList":
                walk(value, 0, always)
        targets = query.get("targetList")
        # a set operation or a set-returning output column decides the rows: all of it is read
        whole = query.get("setOperations") not in (None, "<>") or query.get("hasTargetSRFs") == "true"
        for entry in targets if isinstance(targets, list) else [targets] if targets else []:
            if not isinstance(entry, dict):
                continue
            expr = entry.get("expr")
            if whole or entry.get("resjunk") == "true" or str(entry.get("ressortgroupref", "0")) != "0":
                walk(entry, 0, always)  # sorted, grouped or distinct by: decides the rows
            elif isinstance(expr, dict) and expr.get("_") == "VAR" and str(expr.get("varlevelsup", "0")) == "0":
                if not resolve(expr, 0, every):
                    walk(entry, 0, every)
            else:
                walk(entry, 0, every)  # a computed column reads its inputs when selected
    except (IndexError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CatalogError(f"view query not understood: {exc.__class__.__name__}") from None
    return frozenset(always), frozenset(every | always)


# --------------------------------------------------------------------------- the catalog


def _ints(values: Iterable[int]) -> str:
    return ",".join(str(int(v)) for v in sorted(set(values)))


def _literal(text: str) -> str:
    """A SQL string literal (standard_conforming_strings is on for the gateway's connection)."""
    return "'" + text.replace("'", "''") + "'"


class Catalog:
    """Relation OIDs to names, cached per OID for ``ttl`` seconds (renames and dropped tables
    are picked up after that; OIDs are never reused while a relation exists)."""

    def __init__(self, run: Runner, *, ttl: float = 300.0, max_relations: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._run = run
        self.ttl = ttl
        self.max_relations = max_relations
        self.clock = clock
        self._relations: dict[int, _Relation | None] = {}
        self._names: dict[str, tuple[int | None, float]] = {}
        self._functions: dict[str, tuple[bool, float]] = {}  # name -> (outside pg_catalog, when)
        self.queries = 0
        self.epoch = 0  # bumped whenever relations are (re)fetched: keys caches derived from them

    def _fresh(self, oid: int) -> bool:
        if oid not in self._relations:
            return False
        rel = self._relations[oid]
        return rel is None or self.clock() - rel.fetched_at < self.ttl

    async def resolve(self, columns: Iterable[tuple[int, int]]) -> list[Origin]:
        """Origins of (table OID, attnum) pairs, in order; OID 0 is "no origin"."""
        pairs = list(columns)
        await self._load({oid for oid, _ in pairs if oid})
        return [self._origin(oid, attnum) for oid, attnum in pairs]

    def cached(self, columns: Iterable[tuple[int, int]]) -> list[Origin] | None:
        """Like ``resolve`` but only from the cache (``None`` if something must be fetched)."""
        pairs = list(columns)
        if not all(self._fresh(oid) for oid, _ in pairs if oid):
            return None
        return [self._origin(oid, attnum) for oid, attnum in pairs]

    def valid_until(self, oids: Iterable[int]) -> float:
        """When the first of these cached relations goes stale (``clock`` time)."""
        until = float("inf")
        for oid in oids:
            rel = self._relations.get(oid)
            if rel is not None:
                until = min(until, rel.fetched_at + self.ttl)
        return until

    async def _load(self, oids: set[int]) -> None:
        for _ in range(MAX_VIEW_DEPTH):
            missing = {o for o in oids if not self._fresh(o)}
            if not missing:
                return
            views = await self._fetch(missing)
            # base relations of views must be known too
            oids = {o for v in views for rel in [self._relations[v]] if rel is not None
                    for o, _ in (*rel.view_columns.values(), *rel.reads)}

    async def _fetch(self, oids: set[int]) -> list[int]:
        if len(self._relations) + len(oids) > self.max_relations:
            self._relations.clear()
        self.queries += 1
        rows = await self._run(
            "SELECT c.oid, n.nspname, c.relname, c.relkind, a.attnum, a.attname "  # noqa: S608 - ints only
            "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 "
            f"AND NOT a.attisdropped WHERE c.oid IN ({_ints(oids)})"
        )
        now = self.clock()
        found: dict[int, _Relation] = {}
        for oid_s, schema, name, kind, attnum, attname in rows:
            oid = int(oid_s or 0)
            rel = found.get(oid)
            if rel is None:
                rel = found[oid] = _Relation(str(schema), str(name), str(kind), fetched_at=now)
            if attnum is not None and attname is not None:
                rel.columns[int(attnum)] = attname
        views = [oid for oid, rel in found.items() if rel.kind in VIEW_KINDS]
        if views:
            self.queries += 1
            for oid_s, action in await self._run(
                "SELECT ev_class, ev_action FROM pg_catalog.pg_rewrite "  # noqa: S608
                f"WHERE rulename = '_RETURN' AND ev_class IN ({_ints(views)})"
            ):
                rel = found[int(oid_s or 0)]
                try:
                    rel.view_columns = view_column_origins(action or "")
                except CatalogError:
                    rel.view_columns = {}
                try:
                    always, every = view_var_reads(action or "")
                except CatalogError:
                    continue  # filters stay unknown: whatever is selected reads everything
                rel.filters = tuple(sorted(always))
                rel.reads = tuple(sorted(every))  # whole-row reads included; pg_depend added below
            self.queries += 1
            reads: dict[int, list[tuple[int, int]]] = {}
            for view_s, ref_s, sub_s in await self._run(
                "SELECT r.ev_class, d.refobjid, d.refobjsubid FROM pg_catalog.pg_depend d "  # noqa: S608
                "JOIN pg_catalog.pg_rewrite r ON d.classid = 'pg_catalog.pg_rewrite'::regclass "
                "AND d.objid = r.oid WHERE d.refclassid = 'pg_catalog.pg_class'::regclass "
                f"AND d.refobjsubid > 0 AND r.ev_class IN ({_ints(views)})"
            ):
                view, ref = int(view_s or 0), int(ref_s or 0)
                if ref != view:
                    reads.setdefault(view, []).append((ref, int(sub_s or 0)))
            for view in views:
                found[view].reads = tuple(sorted(set(reads.get(view, ())) | set(found[view].reads)))
        for oid in oids:
            self._relations[oid] = found.get(oid)  # None: no such relation (dropped)
        self.epoch += 1
        return views

    def _source(self, oid: int, attnum: int, depth: int = 0) -> tuple[ColumnSource | None, str | None]:
        """The base column behind (oid, attnum), and the outermost view it was reached through."""
        rel = self._relations.get(oid)
        if rel is None or depth > MAX_VIEW_DEPTH:
            return None, None
        if rel.kind in VIEW_KINDS:
            view = f"{rel.schema}.{rel.name}"
            base = rel.view_columns.get(attnum)
            if base is None:
                return None, view
            source, _ = self._source(base[0], base[1], depth + 1)
            return source, view
        name = rel.columns.get(attnum)
        return (ColumnSource(rel.schema, rel.name, name) if name else None), None

    def _reads(self, oid: int, depth: int = 0) -> frozenset[ColumnSource]:
        rel = self._relations.get(oid)
        if rel is None or depth > MAX_VIEW_DEPTH:
            return frozenset()
        if rel.kind not in VIEW_KINDS:
            return frozenset(ColumnSource(rel.schema, rel.name, c) for c in rel.columns.values())
        out: set[ColumnSource] = set()
        for ref, sub in rel.reads:
            inner = self._relations.get(ref)
            if ref == oid:
                continue  # a view's rule names the view itself (OLD/NEW)
            if (inner is not None and inner.kind in VIEW_KINDS) or sub == 0:
                out |= self._reads(ref, depth + 1)
            else:
                source, _ = self._source(ref, sub, depth + 1)
                if source is not None:
                    out.add(source)
        return frozenset(out)

    def _origin(self, oid: int, attnum: int) -> Origin:
        if not oid:
            return Origin(0, 0)
        source, view = self._source(oid, attnum)
        reads = self._reads(oid) if view is not None and source is None else frozenset()
        return Origin(oid, attnum, source, view, reads)

    async def reads_of(self, names: Iterable[str]) -> dict[str, frozenset[ColumnSource] | None]:
        """The base columns each relation name reads (a table: its columns; a view: what its query
        reads, through nested views); ``None`` when the name cannot be resolved (fail closed).

        Names are resolved with the gateway connection's search_path, which may differ from the
        client's: a name that resolves differently there is the price of not asking the session."""
        names = list(names)
        oids = await self._oids_of(names)
        out: dict[str, frozenset[ColumnSource] | None] = {n: None for n in names}
        for n, oid in oids.items():
            if oid is not None and self._relations.get(oid) is not None:
                out[n] = self._reads(oid)
        return out

    async def columns_of(self, names: Iterable[str]) -> dict[str, RelationColumns | None]:
        """Like ``reads_of``, by column: what reading given columns of each relation reads."""
        names = list(names)
        oids = await self._oids_of(names)
        out: dict[str, RelationColumns | None] = {n: None for n in names}
        for n, oid in oids.items():
            if oid is not None:
                out[n] = self._columns(oid)
        return out

    def _columns(self, oid: int, depth: int = 0) -> RelationColumns | None:
        rel = self._relations.get(oid)
        if rel is None or depth > MAX_VIEW_DEPTH:
            return None
        every = self._reads(oid, depth)
        if rel.kind not in VIEW_KINDS:
            return RelationColumns(
                {name.lower(): frozenset({ColumnSource(rel.schema, rel.name, name)})
                 for name in rel.columns.values()}, frozenset(), every)
        if rel.filters is None:
            return RelationColumns({name.lower(): every for name in rel.columns.values()}, every, every)
        columns: dict[str, frozenset[ColumnSource]] = {}
        for attnum, name in rel.columns.items():
            source, _ = self._source(oid, attnum)
            columns[name.lower()] = frozenset({source}) if source is not None else every
        always: set[ColumnSource] = set()
        for ref, sub in rel.filters:
            always |= self._ref_reads(ref, sub, depth + 1)
        for ref in {ref for ref, _ in rel.reads if ref != oid}:
            inner = self._relations.get(ref)
            if inner is not None and inner.kind in VIEW_KINDS:
                # a view read through this one reads its own filters too
                nested = self._columns(ref, depth + 1)
                always |= nested.always if nested is not None else self._reads(ref, depth + 1)
        return RelationColumns(columns, frozenset(always), every)

    def _ref_reads(self, oid: int, attnum: int, depth: int) -> frozenset[ColumnSource]:
        rel = self._relations.get(oid)
        if rel is None or depth > MAX_VIEW_DEPTH:
            return frozenset()
        name = rel.columns.get(attnum)
        if attnum == 0 or name is None:
            return self._reads(oid, depth)
        if rel.kind not in VIEW_KINDS:
            return frozenset({ColumnSource(rel.schema, rel.name, name)})
        inner = self._columns(oid, depth)
        return inner.reads([name]) if inner is not None else self._reads(oid, depth)

    async def _oids_of(self, names: Iterable[str]) -> dict[str, int | None]:
        """Relation names to OIDs (loaded into the cache), through the per-name cache."""
        names = list(names)
        wanted = sorted({n for n in names if "\0" not in n})
        out: dict[str, int | None] = {n: None for n in names}
        if not wanted:
            return out
        now = self.clock()
        todo = [n for n in wanted if n not in self._names or now - self._names[n][1] >= self.ttl]
        if todo:
            if len(self._names) + len(todo) > self.max_relations:
                self._names.clear()
            self.queries += 1
            values = ",".join(f"({_literal(n)})" for n in todo)
            try:
                rows = await self._run(
                    f"SELECT t.name, pg_catalog.to_regclass(t.name)::oid FROM (VALUES {values}) AS t(name)"  # noqa: S608
                )
            except CatalogError:
                rows = []
            found = {str(name): int(oid) for name, oid in rows if name is not None and oid is not None}
            await self._load(set(found.values()))
            for n in todo:
                self._names[n] = (found.get(n), now)
        stale = {oid for n in wanted if (oid := self._names.get(n, (None, 0.0))[0]) is not None
                 and not self._fresh(oid)}
        if stale:
            await self._load(stale)
        for n in wanted:
            out[n] = self._names.get(n, (None, 0.0))[0]
        return out

    async def user_functions(self, names: Iterable[str]) -> frozenset[str]:
        """The function names that may resolve outside pg_catalog: such a function can read any
        table, whatever columns the statement names. Unknown (catalog down) counts as outside."""
        wanted = {n.lower() for n in names}
        now = self.clock()
        todo = sorted(n for n in wanted if n not in self._functions or now - self._functions[n][1] >= self.ttl)
        plain = [n for n in todo if "." not in n and "\0" not in n]
        if plain:
            if len(self._functions) + len(plain) > self.max_relations:
                self._functions.clear()
            self.queries += 1
            values = ",".join(f"({_literal(n)})" for n in plain)
            rows = await self._run(
                "SELECT t.name FROM (VALUES " + values + ") AS t(name) WHERE NOT EXISTS ("  # noqa: S608
                "SELECT 1 FROM pg_catalog.pg_proc p WHERE p.proname = t.name "
                "AND p.pronamespace <> 'pg_catalog'::regnamespace)"
            )
            builtin = {str(r[0]) for r in rows if r and r[0] is not None}
            for n in plain:
                self._functions[n] = (n not in builtin, now)
        for n in todo:
            if n not in plain:  # schema-qualified: only pg_catalog's own are known to be safe
                self._functions[n] = (n.rsplit(".", 1)[0] != "pg_catalog", now)
        return frozenset(n for n in wanted if self._functions.get(n, (True, 0.0))[0])

    def names(self) -> Mapping[int, str]:
        """Cached relation names by OID (diagnostics)."""
        return {oid: f"{r.schema}.{r.name}" for oid, r in self._relations.items() if r is not None}
