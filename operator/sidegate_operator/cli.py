"""The ``sidegate`` command: one entry point for the control plane and the data plane.

Data-plane commands (``proxy``, ``audit``) are delegated to ``sidegate_proxy.cli`` so that the
proxy stays runnable without the operator installed; only ``validate`` and ``operator`` live here.
"""

from __future__ import annotations

import sys

from . import __version__

USAGE = """\
usage: sidegate <command> [options]

commands:
  validate PATH...              offline check of manifests (schemas and cross-references)
  proxy --manifests DIR --connection NAME
                                run the data plane from manifests in a folder
  proxy --config FILE           run the data plane from the config the operator renders
  operator                      run the control plane (kopf)
  audit verify FILE             check an audit log's hash chain
  version                       print the version

Run 'sidegate <command> --help' for a command's options.
"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command in ("version", "--version"):
        print(f"sidegate {__version__}")
        return 0
    if command == "validate":
        from .validate import main as validate_main

        return validate_main(rest)
    if command == "operator":
        from .main import run_operator

        return run_operator(rest)
    if command in ("proxy", "audit", "demo"):
        from sidegate_proxy.cli import main as proxy_main

        return proxy_main([command, *rest])
    print(f"sidegate: unknown command {command!r}\n\n{USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())
