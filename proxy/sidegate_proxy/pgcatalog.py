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

__all__ = ["Catalog", "CatalogError", "ColumnSource", "Origin", "view_column_origins"]

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


@dataclass
class _Relation:
    schema: str
    name: str
    kind: str
    columns: dict[int, str] = field(default_factory=dict)
    view_columns: dict[int, tuple[int, int]] = field(default_factory=dict)  # attnum -> (oid, attnum)
    reads: tuple[tuple[int, int], ...] = ()
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
        self.queries = 0

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
                found[view].reads = tuple(sorted(set(reads.get(view, ()))))
        for oid in oids:
            self._relations[oid] = found.get(oid)  # None: no such relation (dropped)
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
            if inner is not None and inner.kind in VIEW_KINDS:
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
        wanted = sorted({n for n in names if "\0" not in n})
        out: dict[str, frozenset[ColumnSource] | None] = {n: None for n in names}
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
        for n in wanted:
            oid = self._names.get(n, (None, 0.0))[0]
            if oid is not None and self._relations.get(oid) is not None:
                out[n] = self._reads(oid)
        return out

    def names(self) -> Mapping[int, str]:
        """Cached relation names by OID (diagnostics)."""
        return {oid: f"{r.schema}.{r.name}" for oid, r in self._relations.items() if r is not None}
