"""The end-to-end expectations (e2e_expectations.json) and their checks, shared by
hack/e2e-kind.sh (through the command line below) and tests/test_e2e_expectations.py.

    python tests/e2e_expectations.py cases [--approve | --no-approve]   case names, one a line
    python tests/e2e_expectations.py sql NAME                           the case's statement
    python tests/e2e_expectations.py psql-args                          psql flags, one a line
    python tests/e2e_expectations.py check-output NAME EXIT_CODE FILE   psql's output vs the case
    python tests/e2e_expectations.py check-audit FILE [--reviewer R]    audit JSON lines vs all cases

Checks print one line per problem and exit 1 when there is any.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().with_suffix(".json")


def load(path: Path = DATA) -> dict[str, Any]:
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get("cases"), list):
        raise ValueError(f"{path}: expected an object with a list of cases")
    return doc


def case(doc: Mapping[str, Any], name: str) -> dict[str, Any]:
    for c in doc["cases"]:
        if c["name"] == name:
            return dict(c)
    raise KeyError(f"no case named {name!r}")


def check_output(c: Mapping[str, Any], exit_code: int, output: str) -> list[str]:
    """What is wrong with one psql run (empty when it is as expected)."""
    problems = []
    if exit_code != c["exit"]:
        problems.append(f"{c['name']}: psql exited {exit_code}, expected {c['exit']}")
    problems += [f"{c['name']}: {s!r} missing from the output" for s in c.get("contains", ()) if s not in output]
    problems += [f"{c['name']}: {s!r} must not be in the output" for s in c.get("absent", ()) if s in output]
    if problems:
        problems.append(f"{c['name']}: output was: {output.strip()!r}")
    return problems


def _matches(event: Mapping[str, Any], c: Mapping[str, Any], caller: str, reviewer: str | None) -> bool:
    want = c["audit"]
    unmapped = event.get("unmapped") or {}
    if (event.get("query_info") or {}).get("query_string") != c["sql"]:
        return False
    if ((event.get("actor") or {}).get("user") or {}).get("name") != caller:
        return False
    if unmapped.get("decision") != want["decision"]:
        return False
    if "rule" in want and (event.get("policy") or {}).get("name") != want["rule"]:
        return False
    if not set(want.get("masked", ())) <= set(unmapped.get("masked") or {}):
        return False
    if not want.get("approved"):
        return True
    approval = unmapped.get("approval") or {}
    return bool(approval.get("name")) and reviewer in (None, approval.get("reviewer"))


def check_audit(doc: Mapping[str, Any], events: Sequence[Mapping[str, Any]], *, reviewer: str | None = None,
                cases: Iterable[Mapping[str, Any]] | None = None) -> list[str]:
    """One problem per case with no audit event showing what the case expects."""
    chosen = doc["cases"] if cases is None else cases
    return [f"{c['name']}: no audit event for {c['sql']!r} with {c['audit']}"
            for c in chosen if not any(_matches(e, c, doc["caller"], reviewer) for e in events)]


def audit_events(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The audit records among log lines (kubectl logs mixes them with the proxy's own log)."""
    events = []
    for line in lines:
        line = line.strip()
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "chain_id" in record:
                events.append(record)
    return events


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="e2e_expectations.py")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("cases")
    s.add_argument("--approve", dest="approve", action="store_const", const=True, default=None)
    s.add_argument("--no-approve", dest="approve", action="store_const", const=False)
    sub.add_parser("sql").add_argument("name")
    sub.add_parser("psql-args")
    s = sub.add_parser("check-output")
    s.add_argument("name")
    s.add_argument("exit_code", type=int)
    s.add_argument("file")
    s = sub.add_parser("check-audit")
    s.add_argument("file")
    s.add_argument("--reviewer")
    args = p.parse_args(argv)
    doc = load()
    problems: list[str] = []
    if args.command == "cases":
        for c in doc["cases"]:
            if args.approve is None or bool(c.get("approve")) == args.approve:
                print(c["name"])
    elif args.command == "sql":
        print(case(doc, args.name)["sql"])
    elif args.command == "psql-args":
        print("\n".join(doc["psql_args"]))
    elif args.command == "check-output":
        problems = check_output(case(doc, args.name), args.exit_code, Path(args.file).read_text())
    else:
        events = audit_events(Path(args.file).read_text().splitlines())
        problems = check_audit(doc, events, reviewer=args.reviewer)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
