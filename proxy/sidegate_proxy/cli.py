"""Data-plane commands: ``sidegate proxy`` and ``sidegate audit verify`` (also ``sidegate-proxy``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from .audit import AuditError
from .config import ConfigError, ProxyConfig, load_config
from .manifests import ManifestError, config_from_manifests
from .runtime import (
    ProxyGroup,
    RuntimeOptions,
    configured_token_keys,
    run_event_loop,
    run_until_signal,
    watch_config,
    watch_token_keys,
)
from .secrets import DirSecretStore, SecretMissing, SecretStore

DEFAULT_SECRETS_DIR = "/var/run/sidegate/secrets"


def _read_optional(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def load_config_file(path: Path) -> ProxyConfig:
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError("", f"{path}: not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError("", f"{path}: expected a JSON object")
    return load_config(doc)


def proxy_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sidegate proxy", description="Run the Sidegate data plane for one Connection.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifests", metavar="DIR", action="append",
                     help="folder (or file) of Connection, MaskingPolicy and v1 Secret YAML; repeatable")
    src.add_argument("--config", metavar="FILE", action="append",
                     help="the config the operator renders (config.json); repeat to serve several Connections")
    p.add_argument("--connection", metavar="NAME", help="the Connection to serve (with --manifests)")
    p.add_argument("--namespace", metavar="NS", help="the Connection's namespace, when the name is ambiguous")
    p.add_argument("--kubeconfig", metavar="FILE",
                   help="API server for approvals (AccessRequests) and Kubernetes Events "
                        "(default: in-cluster when available)")
    p.add_argument("--secrets-dir", metavar="DIR",
                   help=f"mounted Secrets as DIR/<secret>/<key> (default with --config: {DEFAULT_SECRETS_DIR})")
    p.add_argument("--listen", metavar="[HOST:]PORT", help="override the listen address")
    p.add_argument("--admin", metavar="[HOST:]PORT", default="127.0.0.1:9090",
                   help="metrics/health/token-exchange port ('off' to disable)")
    p.add_argument("--audit-dir", metavar="DIR", default=os.environ.get("SIDEGATE_AUDIT_DIR"),
                   help="audit spool folder (default: a temporary folder; set it to survive restarts)")
    p.add_argument("--no-audit-stdout", action="store_true", help="do not print audit events to stdout")
    p.add_argument("--audit-worker", action="store_true",
                   help="seal and spool audit events in a worker process: more HTTP requests per second "
                        "when the pod has a second core, a little more latency when it has not; PostgreSQL "
                        "statements in the native lane cost more with it (the lane seals in C inline; see "
                        "docs/performance.md)")
    p.add_argument("--no-native-lane", action="store_true",
                   help="relay every PostgreSQL message in Python (by default, a session's prepared "
                        "statements run in the native lane once Python has allowed them; see docs/performance.md)")
    p.add_argument("--tls-cert", metavar="FILE", help="serve TLS to clients with this certificate")
    p.add_argument("--tls-key", metavar="FILE")
    p.add_argument("--token-signing-key", metavar="FILE",
                   help="PEM key that signs exchanged tokens (enables POST /v1/token on the admin port; "
                        "default: the Secret spec.tokenExchange names); followed: a new key signs without "
                        "a restart, the old one stays trusted for 15 minutes")
    p.add_argument("--token-verification-key", metavar="FILE", action="append", default=[],
                   help="PEM key published and trusted for exchanged tokens but never signing (the next key, "
                        "before it signs); repeatable; an absent file is skipped and followed "
                        "(default: spec.tokenExchange.verificationKeys)")
    p.add_argument("--token-issuer", metavar="URL",
                   help="issuer URL of exchanged tokens (default: spec.tokenExchange.issuer, "
                        "else https://sidegate.<namespace>.svc)")
    p.add_argument("--masking-key-file", metavar="FILE", help="HMAC key of the hash masking strategy")
    p.add_argument("--workload-token", metavar="FILE", default=None,
                   help="service-account token file used with identity.workload")
    p.add_argument("--log-level", default=os.environ.get("SIDEGATE_LOG_LEVEL", "INFO"))
    return p


def _hostport(value: str, default_host: str | None) -> tuple[str | None, int]:
    host, _, port = value.rpartition(":")
    return (host or default_host), int(port)


def run_proxy(argv: list[str]) -> int:
    args = proxy_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    secrets: SecretStore
    config_paths: list[Path] = []
    try:
        if args.manifests:
            if not args.connection:
                print("sidegate proxy: --connection is required with --manifests", file=sys.stderr)
                return 2
            config, mem = config_from_manifests(args.manifests, args.connection, args.namespace)
            configs = [config]
            secrets = DirSecretStore(args.secrets_dir) if args.secrets_dir else mem
        else:
            config_paths = [Path(c) for c in args.config]
            configs = [load_config_file(p) for p in config_paths]
            secrets = DirSecretStore(args.secrets_dir or configs[0].secrets_dir or DEFAULT_SECRETS_DIR)
        token_keys = configured_token_keys(configs, secrets, signing_key_file=args.token_signing_key,
                                           verification_key_files=args.token_verification_key)
    except (ConfigError, ManifestError, OSError, SecretMissing) as exc:
        print(f"sidegate proxy: {exc}", file=sys.stderr)
        return 1

    listen_host, listen_port = _hostport(args.listen, None) if args.listen else (None, None)
    admin_host, admin_port = ("127.0.0.1", None) if args.admin == "off" else _hostport(args.admin, "127.0.0.1")
    options = RuntimeOptions(
        listen_host=listen_host,
        listen_port=listen_port,
        admin_host=admin_host or "127.0.0.1",
        admin_port=admin_port,
        spool_dir=Path(args.audit_dir) if args.audit_dir else None,
        audit_stdout=not args.no_audit_stdout,
        audit_process=args.audit_worker,
        native_lane=not args.no_native_lane,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        token_issuer_url=args.token_issuer,
        masking_key=_read_optional(args.masking_key_file),
        kubeconfig=args.kubeconfig,
        **({"workload_token_path": args.workload_token} if args.workload_token else {}),
    )

    if listen_port is not None and len(configs) > 1:
        print("sidegate proxy: --listen cannot be used with several --config", file=sys.stderr)
        return 2

    async def main() -> None:
        group = ProxyGroup(configs, secrets, options, token_keys=token_keys)
        extra = [
            asyncio.create_task(watch_config(path, runtime, load_config_file))
            for path, runtime in zip(config_paths, group.runtimes, strict=False)
        ]
        if token_keys is not None:
            extra.append(asyncio.create_task(watch_token_keys(token_keys)))
        await run_until_signal(group, *extra)

    try:
        run_event_loop(main())
    except (ConfigError, SecretMissing, OSError, AuditError) as exc:
        print(f"sidegate proxy: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["proxy"]:
        return run_proxy(args[1:])
    if args[:2] == ["audit", "verify"]:
        from .auditverify import main as verify_main

        return verify_main(args[2:])
    if args[:1] == ["demo"]:
        from .demo import main as demo_main

        return demo_main(args[1:])
    print("usage: sidegate-proxy proxy ... | audit verify FILE... | demo", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
