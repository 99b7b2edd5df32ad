"""``sidegate operator``: run the control plane.

Everything is wired explicitly (own registry, settings and memo) rather than through kopf's
module-level defaults, so tests can run several operators in one process and nothing leaks
between them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import kopf

from . import __version__, accessrequest, connection, maskingpolicy, review_admission, webhook
from .kube import ClusterAccess, Kube, OperatorContext

DEFAULT_IMAGE = f"ghcr.io/sidegate/sidegate:{__version__}"
KOPF_PREFIX = "kopf.sidegate.dev"  # not sidegate.dev: kopf ignores its own prefix when diffing
WEBHOOK_CERT_DIR = "/etc/sidegate/webhook"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OperatorOptions:
    kubeconfig: str | None = None
    namespaces: tuple[str, ...] = ()  # empty: cluster-wide
    image: str = DEFAULT_IMAGE
    operator_namespace: str | None = None
    peering: str | None = None  # None: standalone
    priority: int = 0
    posting_level: int = logging.INFO
    webhook: bool = True
    webhook_addr: str = "0.0.0.0"
    webhook_port: int = 8443
    webhook_host: str | None = None
    webhook_cert: str | None = f"{WEBHOOK_CERT_DIR}/tls.crt"
    webhook_key: str | None = f"{WEBHOOK_CERT_DIR}/tls.key"
    liveness: str | None = None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sidegate operator", description="Run the Sidegate control plane.")
    p.add_argument("--kubeconfig", help="default: in-cluster service account, else ~/.kube/config")
    p.add_argument("--namespace", "-n", action="append", default=[],
                   help="watch only this namespace (repeatable; default: all namespaces)")
    p.add_argument("--image", default=os.environ.get("SIDEGATE_IMAGE", DEFAULT_IMAGE),
                   help="the proxy image for gateways and sidecars")
    p.add_argument("--operator-namespace", default=os.environ.get("POD_NAMESPACE"),
                   help="the operator's own namespace (never injected)")
    leader = p.add_mutually_exclusive_group()
    leader.add_argument("--peering", metavar="NAME",
                        help="kopf peering object for leader election between replicas (needs kopf's "
                             "ClusterKopfPeering CRD)")
    leader.add_argument("--standalone", action="store_true", help="no peering (development; the default)")
    p.add_argument("--priority", type=int, default=0, help="peering priority of this replica")
    p.add_argument("--posting-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="lowest level of what is posted as Kubernetes Events")
    p.add_argument("--no-webhook", action="store_true", help="do not serve pod injection")
    p.add_argument("--webhook-addr", default="0.0.0.0")
    p.add_argument("--webhook-port", type=int, default=8443)
    p.add_argument("--webhook-host", help="host name in the webhook URL kopf reports")
    p.add_argument("--webhook-cert", default=f"{WEBHOOK_CERT_DIR}/tls.crt")
    p.add_argument("--webhook-key", default=f"{WEBHOOK_CERT_DIR}/tls.key")
    p.add_argument("--liveness", metavar="URL", help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    p.add_argument("--verbose", "-v", action="store_true")
    return p


def options_from_args(args: argparse.Namespace) -> OperatorOptions:
    return OperatorOptions(
        kubeconfig=args.kubeconfig,
        namespaces=tuple(args.namespace),
        image=args.image,
        operator_namespace=args.operator_namespace,
        peering=args.peering,
        priority=args.priority,
        posting_level=getattr(logging, args.posting_level),
        webhook=not args.no_webhook,
        webhook_addr=args.webhook_addr,
        webhook_port=args.webhook_port,
        webhook_host=args.webhook_host,
        webhook_cert=args.webhook_cert,
        webhook_key=args.webhook_key,
        liveness=args.liveness,
    )


def make_registry(options: OperatorOptions, access: ClusterAccess) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return access.connection_info()

    connection.register(registry)
    maskingpolicy.register(registry)
    accessrequest.register(registry)
    if options.webhook:
        webhook.register(registry)
        review_admission.register(registry)
    return registry


def make_settings(options: OperatorOptions) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.posting.level = options.posting_level
    settings.posting.reporting_component = "sidegate-operator"
    # Annotations, not status: a strict status schema must not be able to prune kopf's bookkeeping.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=KOPF_PREFIX)
    settings.persistence.finalizer = f"{KOPF_PREFIX}/finalizer"
    settings.peering.standalone = options.peering is None
    if options.peering is not None:
        settings.peering.name = options.peering
        settings.peering.priority = options.priority
        settings.peering.mandatory = True
        settings.peering.clusterwide = not options.namespaces
    settings.networking.request_timeout = 30
    if options.webhook:
        settings.admission.server = webhook.WebhookServer(
            addr=options.webhook_addr,
            port=options.webhook_port,
            host=options.webhook_host,
            certfile=options.webhook_cert,
            pkeyfile=options.webhook_key,
        )
        settings.admission.managed = None  # self-managed: see manifests/webhook.yaml
    return settings


async def operate(options: OperatorOptions, *, stop_flag: Any = None, ready_flag: Any = None) -> None:
    """Run until ``stop_flag`` is set (an asyncio/threading Event or Future) or the task is cancelled."""
    access = ClusterAccess.load(options.kubeconfig)
    kube = Kube(access)
    kube.open()
    try:
        memo = kopf.Memo(sidegate=OperatorContext(kube=kube, image=options.image,
                                                  operator_namespace=options.operator_namespace))
        await kopf.operator(
            registry=make_registry(options, access),
            settings=make_settings(options),
            memo=memo,
            clusterwide=not options.namespaces,
            namespaces=options.namespaces,
            standalone=options.peering is None,
            peering_name=options.peering,
            priority=options.priority,
            liveness_endpoint=options.liveness,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
    finally:
        await kube.close()


def run_operator(argv: Sequence[str]) -> int:
    args = parser().parse_args(list(argv))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = options_from_args(args)
    if options.webhook:
        for path in (options.webhook_cert, options.webhook_key):
            if path and not os.path.exists(path):
                print(f"sidegate operator: webhook certificate file {path} not found "
                      "(mount the webhook TLS Secret there, or pass --no-webhook)", file=sys.stderr)
                return 2
    try:
        asyncio.run(operate(options))
    except KeyboardInterrupt:
        return 0
    except Exception as exc:  # the last line of an operator that stops: say why, exit non-zero
        log.exception("operator stopped: %s", exc)
        return 1
    return 0


class BackgroundOperator:
    """An operator in its own thread and event loop (tests, embedding): ``start()`` / ``stop()``."""

    def __init__(self, options: OperatorOptions) -> None:
        self.options = options
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sidegate-operator", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(operate(self.options, stop_flag=self.stop_flag, ready_flag=self.ready_flag))
        except BaseException as exc:
            self.error = exc
            self.ready_flag.set()

    def start(self, timeout: float = 30.0) -> BackgroundOperator:
        self._thread.start()
        if not self.ready_flag.wait(timeout):
            raise TimeoutError("the operator did not get ready")
        if self.error is not None:
            raise RuntimeError(f"the operator failed to start: {self.error}") from self.error
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.stop_flag.set()
        self._thread.join(timeout)

    def __enter__(self) -> BackgroundOperator:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
