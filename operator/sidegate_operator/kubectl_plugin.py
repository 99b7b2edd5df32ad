"""``kubectl sidegate approve|deny NAME``: a reviewer's side of just-in-time approvals.

The plugin asks the API server who the caller is (SelfSubjectReview) and writes that name as the
reviewer; it never decides anything itself. Admission in the API server checks that the reviewer
is the authenticated user, an approver of the Connection, not the requester, and that a decision
never changes, so a modified plugin or a plain ``kubectl patch`` gains nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from sidegate_proxy.kube import ACCESS_REQUESTS, KubeClient, KubeConfig, KubeConfigError, KubeError

SELF_SUBJECT_REVIEWS = "/apis/authentication.k8s.io/v1/selfsubjectreviews"


async def whoami(kube: KubeClient) -> str:
    """The authenticated username, as the API server sees it."""
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
    answer = await kube.request("POST", SELF_SUBJECT_REVIEWS, body=body)
    return str(((answer.get("status") or {}).get("userInfo") or {}).get("username") or "")


async def review(kube: KubeClient, namespace: str, name: str, decision: str,
                 comment: str | None) -> dict[str, Any]:
    reviewer = await whoami(kube)
    verdict: dict[str, Any] = {"decision": decision, "reviewer": reviewer}
    if comment:
        verdict["comment"] = comment
    return await kube.merge_patch(ACCESS_REQUESTS, namespace, name, {"spec": {"review": verdict}})


async def pending(kube: KubeClient, namespace: str | None) -> list[dict[str, Any]]:
    if namespace:
        items = (await kube.list(ACCESS_REQUESTS, namespace)).items
    else:
        everywhere = await kube.request("GET", ACCESS_REQUESTS.path(None))
        items = tuple(everywhere.get("items") or [])
    return [i for i in items
            if (i.get("status") or {}).get("phase", "Pending") == "Pending"
            and not ((i.get("spec") or {}).get("review") or {}).get("decision")]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubectl sidegate", description="Review Sidegate AccessRequests.")
    p.add_argument("--kubeconfig")
    p.add_argument("--context")
    sub = p.add_subparsers(dest="command", required=True)
    for verb in ("approve", "deny"):
        s = sub.add_parser(verb, help=f"{verb} an AccessRequest as yourself")
        s.add_argument("name")
        s.add_argument("-n", "--namespace")
        s.add_argument("--comment", "-m")
    s = sub.add_parser("pending", help="AccessRequests waiting for a review")
    s.add_argument("-n", "--namespace")
    s.add_argument("-A", "--all-namespaces", action="store_true")
    return p


async def _run(args: argparse.Namespace, config: KubeConfig) -> int:
    async with KubeClient(config, user_agent="kubectl-sidegate") as kube:
        ns = args.namespace or config.namespace
        if args.command == "pending":
            rows = await pending(kube, None if args.all_namespaces else ns)
            print(f"{'NAMESPACE':<16} {'NAME':<40} {'CONNECTION':<20} {'REQUESTER':<48} STATEMENT")
            for r in rows:
                spec = r.get("spec") or {}
                what = spec.get("statement") or f"session {spec.get('duration', '')}"
                print(f"{r['metadata']['namespace']:<16} {r['metadata']['name']:<40} "
                      f"{spec.get('connection', ''):<20} {spec.get('requester', ''):<48} {what[:60]}")
            return 0
        decision = "Approved" if args.command == "approve" else "Denied"
        await review(kube, ns, args.name, decision, args.comment)
        print(f"accessrequest.sidegate.dev/{args.name} {decision.lower()}")
        return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        config = KubeConfig.load(args.kubeconfig, args.context)
    except (KubeConfigError, OSError) as exc:
        print(f"kubectl sidegate: cannot load kubeconfig: {exc}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(_run(args, config))
    except KubeError as exc:
        print(f"kubectl sidegate: {exc.message or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
