"""``kubectl sidegate approve|deny NAME``: a reviewer's side of just-in-time approvals.

The plugin asks the API server who the caller is (SelfSubjectReview) and writes that name as the
reviewer; it never decides anything itself. Admission in the API server checks that the reviewer
is the authenticated user, an approver of the Connection, not the requester, and that a decision
never changes, so a modified plugin or a plain ``kubectl patch`` gains nothing.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

GROUP, VERSION, PLURAL = "sidegate.dev", "v1alpha1", "accessrequests"


def _api(kubeconfig: str | None, context: str | None) -> client.ApiClient:
    config.load_kube_config(config_file=kubeconfig, context=context)
    return client.ApiClient()


def _namespace(explicit: str | None, kubeconfig: str | None, context: str | None) -> str:
    if explicit:
        return explicit
    try:
        _, active = config.list_kube_config_contexts(config_file=kubeconfig)
        ctx = active if context is None else {"context": {}}
        return str((ctx.get("context") or {}).get("namespace") or "default")
    except (config.ConfigException, OSError):
        return "default"


def whoami(api: client.ApiClient) -> str:
    """The authenticated username, as the API server sees it."""
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
    resp = api.call_api(
        "/apis/authentication.k8s.io/v1/selfsubjectreviews", "POST", body=body,
        response_type="object", auth_settings=["BearerToken"], _return_http_data_only=True,
    )
    return str(resp["status"]["userInfo"]["username"])


def review(api: client.ApiClient, namespace: str, name: str, decision: str, comment: str | None) -> dict[str, Any]:
    reviewer = whoami(api)
    patch: dict[str, Any] = {"spec": {"review": {"decision": decision, "reviewer": reviewer}}}
    if comment:
        patch["spec"]["review"]["comment"] = comment
    custom = client.CustomObjectsApi(api)
    result: dict[str, Any] = custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, patch)
    return result


def pending(api: client.ApiClient, namespace: str | None) -> list[dict[str, Any]]:
    custom = client.CustomObjectsApi(api)
    if namespace:
        items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
    else:
        items = custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
    return [i for i in items if (i.get("status") or {}).get("phase", "Pending") == "Pending"]


def main(argv: list[str] | None = None) -> int:
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
    args = p.parse_args(argv)
    try:
        api = _api(args.kubeconfig, args.context)
    except (config.ConfigException, OSError) as exc:
        print(f"kubectl sidegate: cannot load kubeconfig: {exc}", file=sys.stderr)
        return 1
    try:
        if args.command == "pending":
            ns = None if args.all_namespaces else _namespace(args.namespace, args.kubeconfig, args.context)
            rows = pending(api, ns)
            print(f"{'NAMESPACE':<16} {'NAME':<40} {'CONNECTION':<20} {'REQUESTER':<48} STATEMENT")
            for r in rows:
                spec = r.get("spec") or {}
                print(f"{r['metadata']['namespace']:<16} {r['metadata']['name']:<40} "
                      f"{spec.get('connection', ''):<20} {spec.get('requester', ''):<48} "
                      f"{(spec.get('statement') or spec.get('scope', ''))[:60]}")
            return 0
        ns = _namespace(args.namespace, args.kubeconfig, args.context)
        decision = "Approved" if args.command == "approve" else "Denied"
        review(api, ns, args.name, decision, args.comment)
        print(f"accessrequest.sidegate.dev/{args.name} {decision.lower()}")
        return 0
    except ApiException as exc:
        message = exc.reason
        try:
            import json

            message = json.loads(exc.body).get("message", message)
        except (TypeError, ValueError):
            pass
        print(f"kubectl sidegate: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
