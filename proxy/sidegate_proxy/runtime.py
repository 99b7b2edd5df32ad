"""Assembles one proxy instance from a config: the only place that wires the pieces together.

Both ``sidegate proxy --manifests`` and ``sidegate proxy --config`` end here, and so do the
tests and the demo, so what they run is what a Deployment or a sidecar runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import signal
import socket
import ssl
import tempfile
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from . import LANE, NATIVE
from .admin import admin_app
from .approvals import ApprovalBroker, pg_approval_hook
from .audit import AuditError, AuditLog, AuditTrail
from .auditworker import AuditProcess, AuditRecipe
from .config import DEFAULT_SIGNING_KEY, ConfigError, ProxyConfig, SecretKeyRef
from .guardrails import Guard
from .identity import Authenticator, WorkloadIdentity
from .kube import KubeClient, KubeConfig, KubeConfigError
from .kubeevents import KubeEventSink
from .masking import MaskingEngine
from .metrics import Metrics
from .policy import Caller, check_access
from .secrets import SecretMissing, SecretStore
from .servercert import ServerCertificate, server_context
from .sinks import Sink, sinks_from_config
from .tokenexchange import ISSUER_NAME, KeyLoader, TokenIssuer, TokenKeys, token_exchange_routes

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/token"


@dataclass(frozen=True)
class RuntimeOptions:
    """Process-level settings (flags and environment), as opposed to policy (the config)."""

    listen_host: str | None = None  # default: 127.0.0.1 in sidecar mode, 0.0.0.0 in gateway mode
    listen_port: int | None = None  # default: the Connection's listen.port (0 picks a free one)
    admin_host: str = "127.0.0.1"
    admin_port: int | None = 9090  # None: no admin port
    spool_dir: Path | None = None
    audit_stdout: bool = True
    extra_sinks: Sequence[Sink] = ()
    audit_fsync: bool = True
    audit_process: bool = False  # seal and spool in a worker process (--audit-worker)
    native_lane: bool = True  # relay PostgreSQL sessions' steady state natively (--no-native-lane)
    chain_key: bytes | None = None
    masking_key: bytes | None = None
    tls_cert: str | None = None  # files, instead of the Connection's spec.listen.tls Secret
    tls_key: str | None = None
    watch_interval: float = 2.0  # seconds between looks at mounted files that may change (certificates)
    token_signing_key: bytes | None = None  # one fixed key; a followed one is passed as TokenKeys
    token_issuer_url: str | None = None
    workload_token_path: str = DEFAULT_TOKEN_PATH
    kubeconfig: str | None = None  # approvals and Kubernetes Events; default: in-cluster when there
    kube: KubeConfig | None = None  # an already-loaded API config (tests), instead of kubeconfig
    instance_id: str = field(default_factory=socket.gethostname)


def derive_key(secret: bytes, purpose: str) -> bytes:
    """A per-purpose key from one secret (HKDF-style extract+expand with HMAC-SHA256)."""
    prk = hmac.new(b"sidegate", secret, hashlib.sha256).digest()
    return hmac.new(prk, purpose.encode() + b"\x01", hashlib.sha256).digest()


def default_masking_key(config: ProxyConfig, secrets: SecretStore) -> bytes:
    """The hash strategy must be stable across replicas and restarts and unknown to callers:
    derived from the gateway-held credential of the Connection, which has both properties."""
    ref = config.connection.credentials.secret_ref
    material = b""
    for key in ("password", "token", ref.key or "password"):
        with contextlib.suppress(SecretMissing):
            material = secrets.get(ref, key)
            break
    if not material:
        raise SecretMissing(ref, "no password or token to derive the masking key from")
    return derive_key(material + config.connection.ref.encode(), "masking")


def server_ssl_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if not cert:
        return None
    ctx = server_context()
    ctx.load_cert_chain(cert, key)
    return ctx


@dataclass
class Components:
    """Everything derived from one config; rebuilt as a whole when the config changes."""

    config: ProxyConfig
    authenticator: Authenticator
    guard: Guard
    masking: MaskingEngine
    workload: WorkloadIdentity | None


@dataclass(frozen=True)
class AuditSinks:
    """The sinks a Connection's ``spec.audit`` asks for, as a picklable factory, so the audit
    worker can build them itself; Kubernetes Events get an API client of their own, opened in
    the event loop that ships them."""

    config: ProxyConfig
    secrets: SecretStore
    options: RuntimeOptions
    kube: KubeConfig | None

    def __call__(self) -> list[Sink]:
        conn = self.config.connection
        sinks = [*sinks_from_config(conn.audit, self.secrets, stdout=self.options.audit_stdout),
                 *self.options.extra_sinks]
        if self.kube is not None and conn.audit.kubernetes_events:
            sinks.append(KubeEventSink(KubeClient(self.kube), conn, instance=self.options.instance_id,
                                       owns_client=True))
        return sinks


class ProxyRuntime:
    """One running proxy: data listener, admin port, audit log; ``reload`` swaps policy for new
    sessions without dropping the ones already open."""

    def __init__(self, config: ProxyConfig, secrets: SecretStore, options: RuntimeOptions | None = None,
                 *, metrics: Metrics | None = None, token_keys: TokenKeys | None = None) -> None:
        """``token_keys``: the exchange keys (shared by a ``ProxyGroup``, followed by
        ``watch_token_keys``); default: ``options.token_signing_key``, if any, as a fixed key."""
        self.options = options or RuntimeOptions()
        self.secrets = secrets
        self.metrics = metrics or Metrics()
        self.token_issuer: TokenIssuer | None = None
        keys = token_keys or fixed_token_keys(self.options)
        if keys is not None:
            te = config.connection.token_exchange
            url = (self.options.token_issuer_url or (te.issuer if te is not None else None)
                   or f"https://sidegate.{config.connection.namespace}.svc")
            self.token_issuer = TokenIssuer(keys, url)
        self.components = self.build(config)
        self.audit: AuditTrail | None = None
        self.kube: KubeClient | None = None
        self._server: object | None = None
        self._runners: list[web.AppRunner] = []
        self._spool_tmp: tempfile.TemporaryDirectory[str] | None = None
        self.port: int | None = None
        self.admin_port: int | None = None
        self.certificate: ServerCertificate | None = None  # spec.listen.tls, followed by watch_certificate
        self._watches: list[asyncio.Task[None]] = []

    @property
    def config(self) -> ProxyConfig:
        return self.components.config

    def build(self, config: ProxyConfig) -> Components:
        conn = config.connection
        extra = []
        key_sources = {}
        if self.token_issuer is not None:
            extra.append(self.token_issuer.as_issuer(conn.ref))
            key_sources[ISSUER_NAME] = self.token_issuer.key_source()
        authenticator = Authenticator(conn.identity, self.secrets, extra_issuers=extra, key_sources=key_sources)
        masking_key = self.options.masking_key or default_masking_key(config, self.secrets)
        workload = None
        if conn.identity.workload:
            workload = WorkloadIdentity(authenticator, path=self.options.workload_token_path)
        return Components(
            config=config,
            authenticator=authenticator,
            guard=Guard(conn),
            masking=MaskingEngine(config.masking, masking_key),
            workload=workload,
        )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        conn = self.config.connection
        opts = self.options
        spool = opts.spool_dir
        if spool is None:
            self._spool_tmp = tempfile.TemporaryDirectory(prefix="sidegate-audit-")
            spool = Path(self._spool_tmp.name)
        self.kube = self._kube_client()
        chain_key = opts.chain_key or derive_key(default_masking_key(self.config, self.secrets), "audit-chain")
        sinks = AuditSinks(self.config, self.secrets, opts, self.kube.config if self.kube else None)
        if opts.audit_process:
            self.audit = AuditProcess(AuditRecipe(spool, sinks, chain_key, opts.instance_id, fsync=opts.audit_fsync,
                                                  log_level=logging.getLogger().getEffectiveLevel()))
        else:
            self.audit = AuditLog(spool, sinks(), chain_key, opts.instance_id, fsync=opts.audit_fsync)
        await self.audit.start()

        host = opts.listen_host or ("127.0.0.1" if conn.mode == "sidecar" else "0.0.0.0")
        port = conn.listen_port if opts.listen_port is None else opts.listen_port
        tls = self._listener_tls()
        c = self.components
        if conn.type == "postgres":
            from .pgproxy import ProxyServer, ProxySettings

            server = ProxyServer(
                self.config, self.secrets, authenticator=c.authenticator, guard=c.guard,
                masking_engine=c.masking, audit_log=self.audit, host=host, port=port,
                ssl_context=tls, metrics=self.metrics, workload=c.workload,
                on_approval_required=pg_approval_hook(self.approvals) if self.approvals else None,
                settings=ProxySettings(lane=opts.native_lane),
                tls_required=conn.listen_tls is not None and conn.listen_tls.required,  # with a certificate
            )
            await server.start()
            self._server = server
            self.port = server.port
        else:
            from .httpproxy import HTTPProxy

            http = HTTPProxy(
                self.config, self.secrets, authenticator=c.authenticator, guard=c.guard,
                masking=c.masking, audit=self.audit, metrics=self.metrics, workload=c.workload,
                approvals=self.approvals,
            )
            self._server = http
            self.port = await self._serve(http.app(), host, port, tls)
        if opts.admin_port is not None:
            self.admin_port = await self._serve(
                admin_app(self.metrics, self.ready, routes=exchange_routes([self])), opts.admin_host,
                opts.admin_port, None,
            )
        lane = ("on" if opts.native_lane else "off (--no-native-lane)") if LANE is not None else "not built"
        log.info("sidegate proxy for %s (%s) listening on %s:%s; data plane: %s; native lane: %s", conn.ref,
                 conn.type, host, self.port, NATIVE.reason, lane)

    def _listener_tls(self) -> ssl.SSLContext | None:
        """TLS for callers: ``--tls-cert`` files when given, else the Connection's
        ``spec.listen.tls`` Secret (renewals followed), else none."""
        opts, conn = self.options, self.config.connection
        if opts.tls_cert:
            return server_ssl_context(opts.tls_cert, opts.tls_key)
        if conn.listen_tls is None:
            return None
        self.certificate = ServerCertificate(self.secrets, conn.listen_tls.secret_ref)
        self._watches.append(asyncio.create_task(watch_certificate(self.certificate, self.options.watch_interval)))
        return self.certificate.context

    async def _serve(self, app: web.Application, host: str, port: int, tls: ssl.SSLContext | None) -> int:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=tls, reuse_address=True)
        await site.start()
        self._runners.append(runner)
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        return int(sockets[0].getsockname()[1]) if sockets else port

    def failures(self) -> list[asyncio.Future[AuditError]]:
        """Resolve when the proxy can no longer record (its audit worker died): it must stop."""
        failed = self.audit.failed if isinstance(self.audit, AuditProcess) else None
        return [failed] if failed is not None else []

    def _kube_client(self) -> KubeClient | None:
        """The API server, when there is one: approvals and Events need it; without it a
        requireApproval guardrail refuses at once and Events are skipped."""
        cfg = self.options.kube
        if cfg is None:
            try:
                cfg = KubeConfig.load(self.options.kubeconfig) if self.options.kubeconfig else KubeConfig.in_cluster()
            except KubeConfigError as exc:
                if self.options.kubeconfig:
                    raise
                log.info("no Kubernetes API (%s): approvals refuse at once, no Kubernetes Events", exc)
                return None
        return KubeClient(cfg)

    @property
    def approvals(self) -> ApprovalBroker | None:
        if self.kube is None:
            return None
        return ApprovalBroker(self.kube, self.config.connection)

    def ready(self) -> str | None:
        if self._server is None or self.audit is None:
            return "starting"
        try:
            self.secrets.get(self.config.connection.credentials.secret_ref,
                             "token" if self.config.connection.type == "http" else "username")
        except SecretMissing as exc:
            return str(exc)
        return None

    async def reload(self, config: ProxyConfig) -> None:
        """New sessions get the new policy; open sessions finish on the one they started with."""
        if config.hash == self.config.hash:
            return
        old = self.components
        self.components = self.build(config)
        server = self._server
        c = self.components
        if hasattr(server, "reload"):
            server.reload(config, authenticator=c.authenticator, guard=c.guard, masking_engine=c.masking,
                          workload=c.workload)
        log.info("config reloaded: %s -> %s", old.config.hash, config.hash)

    async def close(self) -> None:
        for watch in self._watches:
            watch.cancel()
        server = self._server
        if server is not None and hasattr(server, "close"):
            await server.close()
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        await self.components.authenticator.aclose()
        if self.audit is not None:
            await self.audit.close()
        if self.kube is not None:
            await self.kube.close()
        if self._spool_tmp is not None:
            self._spool_tmp.cleanup()


def fixed_token_keys(options: RuntimeOptions) -> TokenKeys | None:
    """``options.token_signing_key`` as keys that never change (tests, embedding)."""
    return TokenKeys.fixed(options.token_signing_key) if options.token_signing_key else None


def configured_token_keys(configs: Sequence[ProxyConfig], secrets: SecretStore, *, signing_key_file: str | None = None,
                          verification_key_files: Sequence[str] = ()) -> TokenKeys | None:
    """The exchange keys: ``--token-signing-key`` or else ``spec.tokenExchange.signingKeySecretRef``
    signs; ``--token-verification-key`` or else ``spec.tokenExchange.verificationKeys`` (keys of the
    same Secret) are only trusted. Each is read again on every ``reload``; ``None``: no exchange."""
    declared = {(te.signing_key_ref, te.verification_keys)
                for c in configs if (te := c.connection.token_exchange) is not None}
    if len(declared) > 1:
        raise ConfigError("spec.tokenExchange", "the Connections served here name different signing keys "
                                                "or verification keys; one proxy holds one set")
    ref, names = next(iter(declared), (None, ()))

    def in_secret(secret: SecretKeyRef, key: str) -> KeyLoader:
        return KeyLoader(f"Secret {secret.name} key {key}", lambda: secrets.get(SecretKeyRef(secret.name, key)))

    if signing_key_file is not None:
        signing = KeyLoader.file(signing_key_file)
    elif ref is not None:
        signing = in_secret(ref, ref.key or DEFAULT_SIGNING_KEY)
    elif verification_key_files:
        raise ConfigError("--token-verification-key", "needs a signing key (--token-signing-key or "
                                                       "spec.tokenExchange)")
    else:
        return None
    if verification_key_files:
        verification = [KeyLoader.file(f) for f in verification_key_files]
    else:
        verification = [in_secret(ref, name) for name in names] if ref is not None else []
    return TokenKeys(signing, verification)


def exchange_routes(runtimes: Sequence[ProxyRuntime]) -> list[web.RouteDef]:
    """``POST /v1/token`` for the Connections served here that have a token-signing key."""
    issuing = [r for r in runtimes if r.token_issuer is not None]
    if not issuing:
        return []
    by_ref = {r.config.connection.ref: r for r in issuing}  # no tokens for what would not trust them

    def authenticator_for(ref: str) -> Authenticator | None:
        r = by_ref.get(ref)
        return r.components.authenticator if r is not None else None

    def allowed(caller: Caller, ref: str) -> bool:
        r = by_ref.get(ref)
        return r is not None and check_access(r.config.connection, caller).allowed

    assert issuing[0].token_issuer is not None
    return token_exchange_routes(issuing[0].token_issuer, authenticator_for, allowed)


class ProxyGroup:
    """Several Connections in one process (a sidecar serving ``inject: "a,b"``): one listener and
    one audit chain each, one shared admin port and metrics registry."""

    def __init__(self, configs: Sequence[ProxyConfig], secrets: SecretStore, options: RuntimeOptions,
                 *, token_keys: TokenKeys | None = None) -> None:
        self.metrics = Metrics()
        self.options = options
        self.token_keys = token_keys or fixed_token_keys(options)  # one key ring for all, followed once
        several = len(configs) > 1
        # With spec.tokenExchange on some Connections, only those issue and trust exchanged tokens;
        # without it anywhere, --token-signing-key applies to every Connection served here.
        declared = any(c.connection.token_exchange is not None for c in configs)
        self.runtimes = [
            ProxyRuntime(
                c, secrets,
                replace(
                    options,
                    admin_port=None,
                    spool_dir=(options.spool_dir / f"{c.connection.namespace}-{c.connection.name}"
                               if several and options.spool_dir is not None else options.spool_dir),
                    instance_id=f"{options.instance_id}/{c.connection.name}" if several else options.instance_id,
                    token_signing_key=None,  # the shared self.token_keys, or none for this Connection
                ),
                metrics=self.metrics,
                token_keys=self.token_keys if not declared or c.connection.token_exchange is not None else None,
            )
            for c in configs
        ]
        self._admin: web.AppRunner | None = None
        self.admin_port: int | None = None

    def failures(self) -> list[asyncio.Future[AuditError]]:
        return [f for r in self.runtimes for f in r.failures()]

    def ready(self) -> str | None:
        for r in self.runtimes:
            reason = r.ready()
            if reason is not None:
                return f"{r.config.connection.ref}: {reason}"
        return None

    async def start(self) -> None:
        for r in self.runtimes:
            await r.start()
        if self.options.admin_port is not None:
            app = admin_app(self.metrics, self.ready, routes=exchange_routes(self.runtimes))
            self._admin = web.AppRunner(app, access_log=None)
            await self._admin.setup()
            site = web.TCPSite(self._admin, self.options.admin_host, self.options.admin_port, reuse_address=True)
            await site.start()
            self.admin_port = self.options.admin_port

    async def close(self) -> None:
        if self._admin is not None:
            await self._admin.cleanup()
        for r in reversed(self.runtimes):
            await r.close()


async def poll(what: str, stamp: Callable[[], Hashable], apply: Callable[[], Awaitable[None]],
               interval: float = 2.0) -> None:
    """Run ``apply`` whenever ``stamp()`` changes (mounted files: the kubelet updates Secret and
    ConfigMap volumes in place, atomically). A failed ``apply`` is logged and what runs is kept;
    it is tried again on the next change."""
    last = stamp()
    while True:
        await asyncio.sleep(interval)
        current = stamp()
        if current == last:
            continue
        last = current
        try:
            await apply()
        except (ConfigError, OSError, ValueError) as exc:
            log.error("%s not reloaded, keeping the previous one: %s", what, exc)


async def watch_config(path: Path, runtime: ProxyRuntime, load: Callable[[Path], ProxyConfig],
                       interval: float = 2.0) -> None:
    """Reload when the mounted config changes."""
    async def reload() -> None:
        await runtime.reload(load(path))

    await poll(f"config {path}", lambda: _stamp(path), reload, interval)


async def watch_certificate(certificate: ServerCertificate, interval: float = 2.0) -> None:
    """Follow the listener's mounted certificate (compared by content): a renewal needs no restart."""
    async def reload() -> None:
        certificate.reload()

    def stamp() -> Hashable:
        try:
            return certificate.snapshot()
        except SecretMissing:
            return None  # mid-update or gone: what is loaded keeps serving

    await poll(f"listener certificate (Secret {certificate.ref.name})", stamp, reload, interval)


async def watch_token_keys(keys: TokenKeys, interval: float = 2.0) -> None:
    """Follow the mounted exchange keys (compared by content): a rotation needs no restart."""
    async def reload() -> None:
        keys.reload()

    await poll("token-exchange keys", keys.snapshot, reload, interval)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns)


async def run_until_signal(runtime: ProxyRuntime | ProxyGroup, *extra: asyncio.Task[None]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await runtime.start()
    stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    failures = runtime.failures()
    try:
        await asyncio.wait([stopped, *failures], return_when=asyncio.FIRST_COMPLETED)
        for failed in failures:
            if failed.done() and not failed.cancelled():
                raise failed.result()
    finally:
        stopped.cancel()
        for task in extra:
            task.cancel()
        await runtime.close()


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run the data plane on uvloop where it is installed: its C transports halve the event
    loop's share of every proxied round trip; plain asyncio otherwise (same behaviour)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
