"""Who is asking and what the gateway decided: the pure core every protocol shares.

No I/O here: an authenticated ``Caller`` and a ``Connection`` go in, a ``Decision`` comes out, so
the PostgreSQL and HTTP front ends (and the tests) apply exactly the same rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from types import MappingProxyType
from typing import Any

from .config import Action, Connection, SubjectMatch


@dataclass(frozen=True)
class Caller:
    """An authenticated identity: the subject, who vouched for it, and its groups."""

    subject: str
    issuer: str
    groups: frozenset[str] = frozenset()
    issuer_name: str = ""
    expires_at: float | None = None
    claims: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def audit_fields(self) -> dict[str, Any]:
        return {"subject": self.subject, "issuer": self.issuer, "groups": sorted(self.groups)}

    def __getstate__(self) -> dict[str, Any]:
        # claims are a read-only view, which pickle refuses: the audit worker process needs callers
        return {**self.__dict__, "claims": dict(self.claims)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, MappingProxyType(value) if name == "claims" else value)


@dataclass(frozen=True)
class ApprovalRef:
    """The AccessRequest a command ran under: who reviewed it is the evidence."""

    namespace: str
    name: str
    reviewer: str | None = None

    def to_dict(self) -> dict[str, str]:
        d = {"namespace": self.namespace, "name": self.name}
        if self.reviewer:
            d["reviewer"] = self.reviewer
        return d


@dataclass(frozen=True)
class Decision:
    action: Action
    rule: str | None = None
    reason: str = ""
    approval: ApprovalRef | None = None  # set when an approved AccessRequest allowed the command

    @property
    def allowed(self) -> bool:
        return self.action == "allow"


ALLOW = Decision("allow")


def glob_match(pattern: str, value: str) -> bool:
    """Subject globs: ``*`` and ``?`` as in shell patterns, case-sensitive (subjects are IDs)."""
    return fnmatchcase(value, pattern)


def who_matches(who: SubjectMatch, caller: Caller) -> bool:
    """True when the caller's subject matches a glob or the caller is in one of the groups."""
    if any(glob_match(p, caller.subject) for p in who.subjects):
        return True
    return bool(caller.groups.intersection(who.groups))


def check_access(connection: Connection, caller: Caller) -> Decision:
    """The Connection's ``access`` list: default deny, any entry matching lets the caller in."""
    for i, entry in enumerate(connection.access):
        if who_matches(entry, caller):
            return Decision("allow", rule=f"access[{i}]", reason="caller matches access list")
    return Decision(
        "block",
        rule="access",
        reason=f"{caller.subject} is not allowed to use connection {connection.name}",
    )


def rule_applies(who: SubjectMatch, caller: Caller) -> bool:
    """A guardrail with no subjects/groups applies to everyone."""
    return who.empty or who_matches(who, caller)
