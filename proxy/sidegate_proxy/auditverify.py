"""``sidegate audit verify FILE``: is this audit log complete, in order and unmodified?

Reads JSON lines (chains of several proxy instances may be interleaved), groups them by
``chain_id`` and checks, per chain: every record's own hash (edits), ``seq`` continuity (deleted
or truncated lines), file order (reordering), ``prev_hash`` links, and checkpoint signatures when
a key is given. Exact duplicates (at-least-once delivery) are reported but are not failures.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import itertools
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from .audit import GENESIS, checkpoint_message, key_id, record_hash

ProblemKind = Literal[
    "unparseable", "malformed", "edited", "gap", "truncated-head", "reordered", "conflict",
    "broken-link", "bad-checkpoint", "bad-signature", "duplicate",
]
NON_FATAL: frozenset[str] = frozenset({"duplicate"})


@dataclass(frozen=True)
class Problem:
    kind: ProblemKind
    message: str
    line: int | None = None
    chain_id: str | None = None
    seq: int | None = None

    @property
    def fatal(self) -> bool:
        return self.kind not in NON_FATAL


@dataclass(frozen=True)
class ChainSummary:
    chain_id: str
    first_seq: int
    last_seq: int
    records: int
    checkpoints: int
    verified_checkpoints: int


@dataclass(frozen=True)
class Report:
    chains: tuple[ChainSummary, ...]
    problems: tuple[Problem, ...]
    lines: int
    keys: int = 0

    @property
    def ok(self) -> bool:
        return not any(p.fatal for p in self.problems)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "lines": self.lines,
            "chains": [asdict(c) for c in self.chains],
            "problems": [{**asdict(p), "fatal": p.fatal} for p in self.problems],
        }


@dataclass(frozen=True)
class VerifyKey:
    """A checkpoint key: the HMAC secret bytes, or an Ed25519 public key."""

    alg: Literal["hmac-sha256", "ed25519"]
    key_id: str
    secret: bytes = field(default=b"", repr=False)
    public: Ed25519PublicKey | None = field(default=None, repr=False)

    def verify(self, message: bytes, signature: str) -> bool:
        try:
            sig = bytes.fromhex(signature)
        except ValueError:
            return False
        if self.alg == "hmac-sha256":
            return hmac.compare_digest(hmac.new(self.secret, message, hashlib.sha256).digest(), sig)
        if self.public is None:
            return False
        try:
            self.public.verify(sig, message)
        except InvalidSignature:
            return False
        return True


def load_key(data: bytes) -> VerifyKey:
    """A PEM Ed25519 public (or private) key, else the raw HMAC secret (exact bytes of the file)."""
    if b"-----BEGIN" in data:
        try:
            if b"PRIVATE KEY" in data:
                priv = load_pem_private_key(data, password=None)
                if not isinstance(priv, Ed25519PrivateKey):
                    raise ValueError("only Ed25519 private keys are supported")
                pub: Any = priv.public_key()
            else:
                pub = load_pem_public_key(data)
        except ValueError as exc:
            raise ValueError(f"cannot load PEM key: {exc}") from None
        if not isinstance(pub, Ed25519PublicKey):
            raise ValueError("only Ed25519 public keys are supported for checkpoint signatures")
        raw = pub.public_bytes(Encoding.Raw, PublicFormat.Raw)
        return VerifyKey("ed25519", key_id(raw), public=pub)
    if not data:
        raise ValueError("the key file is empty")
    return VerifyKey("hmac-sha256", key_id(data), secret=data)


@dataclass
class _Rec:
    line: int
    seq: int
    prev_hash: str
    hash: str
    record: dict[str, Any]


def verify_lines(lines: Iterable[str | bytes], keys: Sequence[VerifyKey] = ()) -> Report:
    """Check every chain in a stream of JSON lines (pure: no I/O)."""
    problems: list[Problem] = []
    chains: dict[str, list[_Rec]] = {}
    n = 0
    for n, raw in enumerate(lines, start=1):
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        if not text.strip():
            continue
        try:
            record = json.loads(text)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            problems.append(Problem("unparseable", f"not a JSON object: {exc}", line=n))
            continue
        try:
            chain_id = str(record["chain_id"])
            rec = _Rec(n, int(record["seq"]), str(record["prev_hash"]), str(record["hash"]), record)
        except (KeyError, TypeError, ValueError):
            problems.append(Problem("malformed", "missing chain_id/seq/prev_hash/hash", line=n))
            continue
        if record_hash(record) != rec.hash:
            message = "content does not match its hash (modified)"
            problems.append(Problem("edited", message, n, chain_id, rec.seq))
        chains.setdefault(chain_id, []).append(rec)

    summaries = [_check_chain(chain_id, recs, keys, problems) for chain_id, recs in chains.items()]
    problems.sort(key=lambda p: (p.line or 0, p.kind))
    return Report(tuple(summaries), tuple(problems), n, len(keys))


def _check_chain(
    chain_id: str, recs: list[_Rec], keys: Sequence[VerifyKey], problems: list[Problem]
) -> ChainSummary:
    def problem(kind: ProblemKind, message: str, rec: _Rec) -> None:
        problems.append(Problem(kind, message, rec.line, chain_id, rec.seq))

    by_seq: dict[int, _Rec] = {}
    highest = 0
    for rec in recs:
        seen = by_seq.get(rec.seq)
        if seen is not None:
            if seen.hash == rec.hash and seen.record == rec.record:
                problem("duplicate", f"seq {rec.seq} repeated (first at line {seen.line})", rec)
            else:
                problem("conflict", f"seq {rec.seq} also at line {seen.line} with different content", rec)
            continue
        if rec.seq < highest:
            problem("reordered", f"seq {rec.seq} appears after seq {highest}", rec)
        highest = max(highest, rec.seq)
        by_seq[rec.seq] = rec

    ordered = sorted(by_seq.values(), key=lambda r: r.seq)
    first = ordered[0]
    if first.seq != 1:
        problem("truncated-head", f"chain starts at seq {first.seq}: seq 1..{first.seq - 1} missing", first)
    elif first.prev_hash != GENESIS:
        problem("broken-link", "seq 1 does not start from the genesis hash", first)
    for prev, rec in itertools.pairwise(ordered):
        if rec.seq != prev.seq + 1:
            missing = f"{prev.seq + 1}" if rec.seq == prev.seq + 2 else f"{prev.seq + 1}..{rec.seq - 1}"
            problem("gap", f"seq {missing} missing (deleted or truncated lines)", rec)
        elif rec.prev_hash != prev.hash:
            problem("broken-link", f"prev_hash does not match the hash of seq {prev.seq}", rec)

    checkpoints = verified = 0
    for rec in ordered:
        unmapped = rec.record.get("unmapped")
        cp = unmapped.get("checkpoint") if isinstance(unmapped, dict) else None
        if not isinstance(cp, dict):
            continue
        checkpoints += 1
        try:
            cp_seq, cp_hash = int(cp["seq"]), str(cp["hash"])
            signatures = list(cp.get("signatures") or [])
        except (KeyError, TypeError, ValueError):
            problem("bad-checkpoint", "checkpoint without seq/hash", rec)
            continue
        covered = by_seq.get(cp_seq)
        if cp_seq != rec.seq - 1 or (covered is not None and covered.hash != cp_hash):
            problem("bad-checkpoint", f"checkpoint does not match the chain at seq {cp_seq}", rec)
        if not keys:
            continue
        message = checkpoint_message(chain_id, cp_seq, cp_hash)
        good = any(
            key.verify(message, str(sig.get("signature", "")))
            for sig in signatures
            if isinstance(sig, dict)
            for key in keys
            if key.alg == sig.get("alg") and key.key_id == sig.get("key_id")
        )
        if good:
            verified += 1
        else:
            problem("bad-signature", f"checkpoint at seq {cp_seq}: no valid signature for the key(s)", rec)
    return ChainSummary(chain_id, first.seq, ordered[-1].seq, len(recs), checkpoints, verified)


def verify_files(paths: Sequence[str], keys: Sequence[VerifyKey] = ()) -> Report:
    """Files are read in the order given (e.g. rotated segments oldest first); '-' is stdin."""

    def lines() -> Iterable[bytes]:
        for path in paths:
            if path == "-":
                yield from sys.stdin.buffer
            else:
                with open(path, "rb") as f:
                    yield from f

    return verify_lines(lines(), keys)


def format_report(report: Report) -> str:
    out = []
    for p in report.problems:
        where = f"line {p.line}" if p.line else "-"
        chain = f" chain {p.chain_id} seq {p.seq}" if p.chain_id else ""
        out.append(f"{'ERROR' if p.fatal else 'note '} {where}:{chain}: {p.kind}: {p.message}")
    for c in report.chains:
        signed = f", {c.verified_checkpoints} verified" if report.keys else " (not verified: no --key-file)"
        out.append(
            f"chain {c.chain_id}: seq {c.first_seq}..{c.last_seq}, {c.records} records, "
            f"{c.checkpoints} checkpoints{signed if c.checkpoints else ''}"
        )
    fatal = sum(p.fatal for p in report.problems)
    if report.ok:
        out.append(f"OK: {len(report.chains)} chain(s) intact ({report.lines} lines)")
    else:
        out.append(f"FAILED: {fatal} problem(s) in {len(report.chains)} chain(s) ({report.lines} lines)")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """``sidegate audit verify FILE... [--key-file F] [--output text|json]``; 0 intact, 1 not, 2 usage."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["verify"]:
        args = args[1:]
    parser = argparse.ArgumentParser(prog="sidegate audit verify", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", metavar="FILE", help="JSON lines audit log(s); '-' for stdin")
    parser.add_argument("--key-file", action="append", default=[], metavar="F",
                        help="checkpoint key: HMAC secret (raw bytes) or Ed25519 PEM public key; repeatable")
    parser.add_argument("--output", choices=("text", "json"), default="text")
    ns = parser.parse_args(args)
    try:
        keys = [load_key(Path(f).read_bytes()) for f in ns.key_file]
        report = verify_files(ns.files, keys)
    except (OSError, ValueError) as exc:
        print(f"sidegate audit verify: {exc}", file=sys.stderr)
        return 2
    if ns.output == "json":
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_report(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
